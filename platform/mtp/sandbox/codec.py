"""A plain-data codec for values crossing between a trusted and an untrusted process.

Only None, bool, int, float, complex, str, bytes, list, tuple, dict, set and frozenset
(nested) cross, by exact type: a subclass (say an ``int`` whose ``__eq__`` is always
true) or any other object is not a value. Decoding builds new objects of exactly those
types from JSON text with a tag per container, so it never runs code: no pickle, no
``eval``, no class lookup. Floats travel as ``float.hex`` (exact, NaN and infinities
included) and ints as hex (no digit-count limit). Size, depth and item counts are
bounded on both sides.

    ["i", "0x2a"]  ["f", "0x1.8p+1"]  ["c", re, im]  ["b", "68656c6c6f"]
    ["l", [...]]  ["t", [...]]  ["s", [...]]  ["z", [...]]  ["d", [[k, v], ...]]
    null  true  false  "text"
"""

from __future__ import annotations

import json
from dataclasses import dataclass

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


def _to_tree(value, depth: int, budget: _Budget):
    if depth > MAX_DEPTH:
        raise CodecError(f"nested deeper than {MAX_DEPTH}")
    budget.take()
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
    tag = {list: "l", tuple: "t", set: "s", frozenset: "z"}.get(kind)
    if tag is not None:
        return [tag, [_to_tree(v, depth + 1, budget) for v in value]]
    if kind is dict:
        return ["d", [[_to_tree(k, depth + 1, budget), _to_tree(v, depth + 1, budget)] for k, v in value.items()]]
    raise NotPlainData(f"a {kind.__name__} is not plain data (only None, bool, int, float, complex, str, bytes, "
                     "list, tuple, dict, set, frozenset cross)")


def encode(value) -> bytes:
    """JSON bytes for ``value``; raises CodecError for anything that is not plain data or too large."""
    try:
        data = json.dumps(_to_tree(value, 0, _Budget()), ensure_ascii=True, separators=(",", ":")).encode()
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
    container = {"l": list, "t": tuple, "s": set, "z": frozenset}.get(tag)
    if container is None:
        raise CodecError(f"unknown tag {tag!r}")
    return container(_from_tree(v, depth + 1, budget) for v in items)


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
