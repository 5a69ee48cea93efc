"""Config files (YAML/JSON, duplicate keys refused) and `--set key=value` assignments."""

from __future__ import annotations

import json
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from instill.errors import ConfigError, FileFormatError
from instill.storage.atomic import PathLike

# --------------------------------------------------------------------------- config files


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of silently keeping the last."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    """Build a mapping, raising on a repeated key (a repeated key is almost always a typo)."""
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, typing.Hashable) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _load_yaml(path: Path, text: str) -> Any:
    """Parse YAML safely, naming the line and column of a syntax error."""
    try:
        return yaml.load(
            text, Loader=_UniqueKeyLoader
        )  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise FileFormatError(
            f"{path} is not valid YAML{where}: {problem}; fix the syntax there"
        ) from err


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook for json that rejects duplicate keys."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _load_json(path: Path, text: str) -> Any:
    """Parse JSON, naming the line and column of a syntax error."""
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as err:
        raise FileFormatError(
            f"{path} is not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}; "
            "fix the syntax there"
        ) from err
    except ValueError as err:
        raise FileFormatError(f"{path} is not valid JSON: {err}; remove the repeat") from err


_CONFIG_LOADERS = {".yaml": _load_yaml, ".yml": _load_yaml, ".json": _load_json}


def load_config_file(path: PathLike) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON (.json) config file whose top level is a mapping."""
    file = Path(path)
    loader = _CONFIG_LOADERS.get(file.suffix.lower())
    if loader is None:
        raise FileFormatError(
            f"{file}: unknown config file type {file.suffix!r}; use .yaml, .yml or .json"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise FileFormatError(f"config file {file} does not exist; check the path") from err
    except UnicodeDecodeError as err:
        raise FileFormatError(f"{file} is not UTF-8 text; save it as UTF-8") from err
    except OSError as err:
        raise FileFormatError(f"cannot read config file {file}: {err.strerror or err}") from err
    data = loader(file, text)
    if data is None:
        raise FileFormatError(
            f"{file} is empty; write a mapping such as `key: value` ({{}} for defaults)"
        )
    if not isinstance(data, dict):
        raise FileFormatError(
            f"{file}: the top level must be a mapping of keys to values, "
            f"got a {type(data).__name__}; write `key: value` lines"
        )
    return data


def _assigned_value(text: str) -> Any:
    """One --set value: JSON (1e-3, [2, 4], true, null), else YAML, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_assignments(items: Iterable[str], into: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    """`["base_fit.lr=1e-3", "layers=[2, 4]"]` as nested config values (each value read as
    JSON, else YAML, else kept as text, so numbers, lists, null, booleans and plain words such
    as `a + b` work; nothing is evaluated)."""
    out: dict[str, Any] = dict(into or {})
    for item in items:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set takes KEY=VALUE with a dotted key such as "
                              f"base_fit.lr=1e-3, got {item!r}")
        value = _assigned_value(text.strip())
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} was set to a value, not a section")
        node[parts[-1]] = value
    return out
