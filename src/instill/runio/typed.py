"""Typed configs: nested dataclasses from plain dicts (`from_dict`) and back (`to_dict`).

Hand-written on purpose: `python benchmarks/config_libraries.py` (`--libs DIR` adds dacite and
cattrs, which are not dependencies) runs pydantic, dacite and cattrs on `ArithmeticConfig`.
pydantic 2 (installed only through transformers -> typer) comes closest, naming path, expected
and got, but gives no valid keys or "did you mean" for an unknown key, reports every union arm
instead of the deepest failure, and has no mode with our rules without an annotation on every
float field: lax takes "yes" for a bool and "3", 1.0 or true for an int; strict rejects "1e-3"
(a YAML 1.1 float). dacite names no path for unknown keys, no Literal choices, no list index;
cattrs needed 41 lines of hooks (it turns "no" into True, 2.7 into 2) and its `transform_error`
drops `__post_init__` messages. Any of them would replace the ~100-line type walk, not the ~50
lines of messages, and add a dependency, to save ~1 ms once per run.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from instill.errors import ConfigError, InstillError

T = TypeVar("T")

# --------------------------------------------------------------------------- dataclass configs


class _Mismatch(ConfigError):
    """A value of the wrong type; remembers the key path so unions can report the deepest cause."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _show(value: Any) -> str:
    """Short repr of a user value with its type, for error messages."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    """Readable name of a type annotation, e.g. `list[int]`, `int or null`, `one of 'a', 'b'`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is not None:
        inner = ", ".join("..." if arg is Ellipsis else _type_name(arg) for arg in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _mismatch(path: str, tp: Any, value: Any, hint: str = "") -> _Mismatch:
    """Build the error for `value` at `path` not matching annotation `tp`."""
    return _Mismatch(f"{path} must be {_type_name(tp)}, got {_show(value)}{hint}", path)


def _suggest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert_scalar(value: Any, tp: type, path: str) -> Any:
    """Check/convert a value for a plain class annotation (int, float, bool, str, Path, ...)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(path, tp, value, "; write true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _mismatch(path, tp, value, "; write a whole number (not true/false)")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        raise _mismatch(path, tp, value)
    if issubclass(tp, Path) and isinstance(value, str):
        return Path(value)
    if isinstance(value, tp):
        return value
    raise _mismatch(path, tp, value)


def _convert_union(value: Any, tp: Any, path: str) -> Any:
    """Accept the first arm of a Union that fits; report the deepest error if one arm got far."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors: list[_Mismatch] = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, path)
        except _Mismatch as err:
            errors.append(err)
    deeper = [err for err in errors if err.path != path]
    if len(deeper) == 1:
        raise deeper[0]
    raise _mismatch(path, tp, value)


def _convert_literal(value: Any, tp: Any, path: str) -> Any:
    """Accept one of the Literal's values (same type, so True is not taken for 1)."""
    for arg in typing.get_args(tp):
        if type(value) is type(arg) and value == arg:
            return value
    hint = ""
    if isinstance(value, str):
        hint = _suggest(value, [arg for arg in typing.get_args(tp) if isinstance(arg, str)])
    raise _mismatch(path, tp, value, hint)


def _convert_sequence(value: Any, tp: Any, path: str) -> Any:
    """Check a list[T] or tuple[...] value element by element."""
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if not isinstance(value, list | tuple):
        raise _mismatch(path, tp, value, "; write a list like [1, 2]")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _mismatch(path, tp, value, f"; it needs exactly {len(args)} items")
        items = [
            _convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        ]
    else:
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _convert_dict(value: Any, tp: Any, path: str) -> dict:
    """Check a dict[K, V] value key by key."""
    if not isinstance(value, Mapping):
        raise _mismatch(path, tp, value)
    key_tp, value_tp = typing.get_args(tp) or (Any, Any)
    return {
        _convert(k, key_tp, f"{path}[{k!r}]"): _convert(v, value_tp, f"{path}.{k}")
        for k, v in value.items()
    }


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against annotation `tp`, converting where safe (int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise _mismatch(path, tp, value)
        return _build(tp, value, path)
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, path)
    if origin is Literal:
        return _convert_literal(value, tp, path)
    if origin in (list, tuple) or tp in (list, tuple):
        return _convert_sequence(value, tp, path)
    if origin is dict or tp is dict:
        return _convert_dict(value, tp, path)
    if isinstance(tp, type):
        return _convert_scalar(value, tp, path)
    raise TypeError(f"from_dict does not support the annotation {tp!r} (at {path})")


def _build(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    """Build dataclass `cls` from `data`; `prefix` is the key path of `data` ('' at the top)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    dot = f"{prefix}." if prefix else ""
    unknown = [key for key in data if key not in fields]
    if unknown:
        parts = [f"{dot}{key}{_suggest(str(key), fields)}" for key in map(str, unknown)]
        raise ConfigError(
            f"unknown key(s): {', '.join(parts)}; valid keys"
            f"{' in ' + prefix if prefix else ''}: {', '.join(fields)}"
        )
    required = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [f"{dot}{name}" for name in required if name not in data]
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(missing)}")
    kwargs = {key: _convert(value, hints[key], f"{dot}{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:  # __post_init__ range checks: add where they happened
        if prefix:
            raise ConfigError(f"{prefix}: {err}") from err
        raise
    except InstillError:
        raise
    except ValueError as err:  # __post_init__ checks that raise plain ValueError
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from err


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "config") -> T:
    """Build a (nested) dataclass from a dict, rejecting unknown keys and wrong types clearly."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {_show(data)}")
    try:
        return _build(cls, data, "")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err


def _plain(value: Any) -> Any:
    """Turn tuples into lists and Paths into strings, recursively."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """Turn a dataclass instance into plain dicts/lists (for recording a run's config)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {type(obj).__name__}")
    return _plain(dataclasses.asdict(obj))
