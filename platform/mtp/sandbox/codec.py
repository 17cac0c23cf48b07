"""A plain-data codec for values crossing between a trusted and an untrusted process.

Only None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset,
Fraction and Decimal (nested) cross, plus an iterator's items (decoded as a list
iterator) and numpy's number, str and bytes scalars (rebuilt by numpy from a plain value
and a dtype code). Decoding builds new objects of exactly those types from JSON text with a tag
per container, so it never runs code: no pickle, no ``eval``, no class lookup. The
decoder is the guard: whatever the sender's encoder did, only these values come out.
Floats travel as ``float.hex`` (exact, NaN and infinities included), ints as hex (no
digit-count limit), Fractions as two ints, Decimals as their exact text. Size, depth and
item counts are bounded on both sides.

Encoding is strict by default (exact types: the judge's arguments, where anything else
must not be guessed at). The candidate's answers are encoded ``lenient``: what honest
code returns and plain Python would compare as such crosses as its plain value, so a
test sees what it would see in one process: a subclass of a plain type (a namedtuple, a
Counter, an IntEnum) as that type, a numpy scalar as itself (other numpy scalars as
``.item()``), a finite iterator as an iterator over its items (read up to the item limit).

    ["i", "0x2a"]  ["f", "0x1.8p+1"]  ["c", re, im]  ["b", "68656c6c6f"]  ["q", num, den]  ["m", "1.10"]
    ["n", "<i8", ["i", "0x2a"]]  ["l", [...]]  ["t", [...]]  ["s", [...]]  ["z", [...]]  ["d", [[k, v], ...]]  ["g", [...]]
    null  true  false  "text"
"""

from __future__ import annotations

import importlib
import itertools
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

MAX_BYTES = 16 << 20
MAX_DEPTH = 64
MAX_ITEMS = 1_000_000


class CodecError(ValueError):
    """A value that is not plain data, or bytes that do not decode to plain data."""


class NotPlainData(CodecError):
    """A value of a type that does not cross (as opposed to one that is too large)."""


@dataclass
class _Budget:
    items: int = MAX_ITEMS

    def take(self, n: int = 1) -> None:
        self.items -= n
        if self.items < 0:
            raise CodecError(f"more than {MAX_ITEMS} items")


_CONTAINERS = {list: "l", tuple: "t", set: "s", frozenset: "z"}
# numpy scalars rebuilt as themselves (``is True``, ``isinstance(x, bool)`` then read as in plain
# Python): bool, ints, floats up to 64 bits, complex, str, bytes, by their dtype code ("<i8", "|b1").
_NUMPY_SCALAR = re.compile(r"[<>|=]?(b1|[iu][1248]|f[248]|c(8|16)|[US]\d{1,6})")
_PLAIN_NAMES = "None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset, Fraction, Decimal"


def _plain(value):
    """Lenient encoding: the plain value an honest non-plain answer stands for, or ``value`` itself."""
    for base in (bool, int, float, complex, str, bytes, Fraction, Decimal):
        if isinstance(value, base):
            return {int: int.__index__, str: str.__str__}.get(base, base)(value)
    for base in (tuple, list, frozenset, set):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, dict):
        return dict(value.items())
    return value


def _to_tree(value, depth: int, budget: _Budget, lenient: bool):
    if depth > MAX_DEPTH:
        raise CodecError(f"nested deeper than {MAX_DEPTH}")
    budget.take()
    kind = type(value)
    if lenient and kind not in _EXACT:
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(value, numpy.generic):
            if _NUMPY_SCALAR.fullmatch(value.dtype.str):
                return ["n", value.dtype.str, _to_tree(value.item(), depth + 1, budget, lenient)]
            value = value.item()
        elif isinstance(value, Iterator):
            items = list(itertools.islice(value, budget.items + 1))
            budget.take(len(items))
            return ["g", [_to_tree(v, depth + 1, budget, lenient) for v in items]]
        value = _plain(value)
        kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return ["i", hex(value)]
    if kind is float:
        return ["f", value.hex()]
    if kind is complex:
        return ["c", value.real.hex(), value.imag.hex()]
    if kind is bytes:
        return ["b", value.hex()]
    if kind is Fraction:
        return ["q", hex(value.numerator), hex(value.denominator)]
    if kind is Decimal:
        return ["m", str(value)]
    tag = _CONTAINERS.get(kind)
    if tag is not None:
        return [tag, [_to_tree(v, depth + 1, budget, lenient) for v in value]]
    if kind is dict:
        return ["d", [[_to_tree(k, depth + 1, budget, lenient), _to_tree(v, depth + 1, budget, lenient)]
                      for k, v in value.items()]]
    raise NotPlainData(f"a {kind.__name__} is not plain data (only {_PLAIN_NAMES} cross)")


_EXACT = frozenset({type(None), bool, int, float, complex, str, bytes, Fraction, Decimal, dict, *_CONTAINERS})


def encode(value, lenient: bool = False) -> bytes:
    """JSON bytes for ``value``; raises CodecError for anything that is not plain data or too large.

    ``lenient``: convert what honest code returns to the plain value plain Python would compare
    it as (see the module docstring) instead of refusing it.
    """
    try:
        data = json.dumps(_to_tree(value, 0, _Budget(), lenient), ensure_ascii=True, separators=(",", ":")).encode()
    except RecursionError:
        raise CodecError(f"nested deeper than {MAX_DEPTH}") from None
    if len(data) > MAX_BYTES:
        raise CodecError(f"{len(data)} bytes encoded, more than {MAX_BYTES}")
    return data


def _hex_float(text) -> float:
    if type(text) is not str:
        raise CodecError("a float must be a hex string")
    return float.fromhex(text)


def _from_tree(node, depth: int, budget: _Budget):
    if depth > MAX_DEPTH:
        raise CodecError(f"nested deeper than {MAX_DEPTH}")
    budget.take()
    if node is None or type(node) in (bool, str):
        return node
    if type(node) is not list or not node or type(node[0]) is not str:
        raise CodecError(f"not a tagged value: {type(node).__name__}")
    tag, args = node[0], node[1:]
    if tag == "i" and len(args) == 1 and type(args[0]) is str:
        return int(args[0], 16)
    if tag == "f" and len(args) == 1:
        return _hex_float(args[0])
    if tag == "c" and len(args) == 2:
        return complex(_hex_float(args[0]), _hex_float(args[1]))
    if tag == "b" and len(args) == 1 and type(args[0]) is str:
        return bytes.fromhex(args[0])
    if tag == "q" and len(args) == 2 and type(args[0]) is str and type(args[1]) is str:
        return Fraction(int(args[0], 16), int(args[1], 16))
    if tag == "m" and len(args) == 1 and type(args[0]) is str:
        return Decimal(args[0])
    if tag == "n" and len(args) == 2 and type(args[0]) is str and _NUMPY_SCALAR.fullmatch(args[0]):
        value = _from_tree(args[1], depth + 1, budget)
        if type(value) not in (bool, int, float, complex, str, bytes):
            raise CodecError("a numpy scalar must hold a number, str or bytes")
        return importlib.import_module("numpy").dtype(args[0]).type(value)
    if len(args) != 1 or type(args[0]) is not list:
        raise CodecError(f"malformed value with tag {tag!r}")
    items = args[0]
    if tag == "d":
        pairs = []
        for pair in items:
            if type(pair) is not list or len(pair) != 2:
                raise CodecError("a dict entry must be a [key, value] pair")
            pairs.append((_from_tree(pair[0], depth + 1, budget), _from_tree(pair[1], depth + 1, budget)))
        return dict(pairs)
    container = {"l": list, "t": tuple, "s": set, "z": frozenset, "g": list}.get(tag)
    if container is None:
        raise CodecError(f"unknown tag {tag!r}")
    built = container(_from_tree(v, depth + 1, budget) for v in items)
    return iter(built) if tag == "g" else built


def decode(data: bytes):
    """The plain value in ``data``; raises CodecError for anything else. Never runs code."""
    if len(data) > MAX_BYTES:
        raise CodecError(f"{len(data)} bytes, more than {MAX_BYTES}")
    try:
        return _from_tree(json.loads(data), 0, _Budget())
    except CodecError:
        raise
    except Exception as exc:  # noqa: BLE001 - bad JSON or hex, an unhashable key, a float out of range...
        raise CodecError(f"undecodable: {type(exc).__name__}: {exc}") from None
