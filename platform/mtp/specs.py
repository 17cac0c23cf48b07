"""One strict parser for every spec: a dataclass built from a mapping by its type hints.

Training configs, sweep files and their sections, serve configs and sandbox limits all
arrive as mappings (YAML, JSON, Serve ``args``, ``--set key=value``). ``build`` makes the
dataclass from one, a nested section over the values of the one it replaces (the
default, or ``base``'s), and every unknown key or wrongly typed value fails at once,
naming the key: ``task.params.foo: unknown key``, ``train.seq_len: expected int or null,
got 'abc'``. A field parsed some other way (a sweep's search space) names its parser in
``field(metadata={"parse": fn})``; ``fn(value, key)`` returns the value (``None`` stays
``None`` where that is the default). Value checks (ranges, cross-field rules) stay in
each spec's ``validate``.

Strings convert to the field's type where a command line would give one (``"3e-4"`` for
a float, ``"true"`` for a bool, ``"[1, 2]"`` for a list, ``"{a: 1}"`` for a mapping).
Stdlib only (YAML only for those strings): the sandbox uses it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def build(cls: type[T], data: Any, where: str = "", base: T | None = None) -> T:
    """``cls`` from the mapping ``data`` (over ``base``'s values when given); ``where`` prefixes keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        path = join(where, key)
        if key not in fields:
            raise ConfigError(f"{path}: unknown key; known: {', '.join(fields)}")
        parse, hint = fields[key].metadata.get("parse"), hints[key]
        if parse and value is None and fields[key].default is None:
            values[key] = None  # an optional section left empty
        elif parse:
            values[key] = parse(value, path)
        elif dataclasses.is_dataclass(hint) and isinstance(value, Mapping):  # a section: over what it replaces
            within = getattr(base, key) if base is not None else _default(fields[key])
            values[key] = build(hint, value, path, base=within if isinstance(within, hint) else None)
        else:
            values[key] = coerce(value, hint, path)
    if base is not None:
        return dataclasses.replace(base, **values)
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where or cls.__name__}: missing key(s) {', '.join(missing)}")
    return cls(**values)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the type ``hint`` says; a ConfigError naming ``where`` if it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for arg in options:
            try:
                return coerce(value, arg, where)
            except ConfigError as exc:
                inner = exc  # a list's item names itself (``tree[1]``): more precise than the union
        if len(options) == 1 and not str(inner).startswith(f"{where}: "):
            raise inner
        raise _wrong(value, hint, where)
    if origin is typing.Literal:
        if value in args:
            return value
        raise _wrong(value, hint, where)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else build(hint, value, where)
    if origin in (list, tuple) or hint in (list, tuple):
        if isinstance(value, str):
            value = _yaml(value, hint, where)
        if not isinstance(value, (list, tuple)):
            raise _wrong(value, hint, where)
        item = args[0] if args else Any
        items = [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or hint) is tuple else items
    if origin is dict or hint is dict:
        if isinstance(value, str):
            value = _yaml(value, hint, where)
        if not isinstance(value, Mapping):
            raise _wrong(value, hint, where)
        key_hint, value_hint = args or (Any, Any)
        return {coerce(k, key_hint, where): coerce(v, value_hint, join(where, k)) for k, v in value.items()}
    try:
        return _scalar(value, hint)
    except (TypeError, ValueError):
        raise _wrong(value, hint, where) from None


def _scalar(value: Any, hint: Any) -> Any:
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise TypeError
    if isinstance(value, bool) and hint in (int, float, str):
        raise TypeError
    if hint is int:
        if isinstance(value, float) and not value.is_integer():
            raise TypeError
        return int(value)
    if hint is float:
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise TypeError
        return str(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise TypeError
    return value


def _yaml(text: str, hint: Any, where: str) -> Any:
    import yaml  # only for lists given as text on a command line

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise _wrong(text, hint, where) from None


def describe(hint: Any) -> str:
    """``int or null``, ``list of int``, ``one of 'fifo', 'asha'``: a type as an error message says it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"list of {describe(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {describe(args[0])} to {describe(args[1])}" if args else "mapping"
    if dataclasses.is_dataclass(hint):
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def _wrong(value: Any, hint: Any, where: str) -> ConfigError:
    return ConfigError(f"{where}: expected {describe(hint)}, got {value!r}")


def field_hint(cls: type, dotted: str) -> Any:
    """The type hint of a dotted field path (``train.seq_len``) through nested dataclasses."""
    hint: Any = cls
    for name in dotted.split("."):
        hint = typing.get_type_hints(hint)[name]
    return hint


def is_integer(hint: Any) -> bool:
    """Whether a field holds integers (``int``, ``int | None``), deciding how a range is sampled."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (
        typing.Union, types.UnionType) else [hint]
    return args == [int]
