"""Run I/O: atomic writes, safe tensor and config loading, run metadata and run directories.

Every file is written to a temp file in the same directory, fsynced and moved into place with
os.replace, so a killed run never leaves a half-written file that a later run would trust.
Only safe formats are read: safetensors for tensors, YAML/JSON for configs; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import numpy as np
import safetensors
import safetensors.torch
import torch
import yaml

from instill.errors import ConfigError, FileFormatError, InstillError

__all__ = [
    "RUN_FORMAT_VERSION",
    "RunDir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "file_sha256",
    "from_dict",
    "hash_files",
    "load_config_file",
    "load_tensors",
    "parse_assignments",
    "run_metadata",
    "save_tensors",
    "to_dict",
    "write_json",
]

RUN_FORMAT_VERSION = 1

T = TypeVar("T")
PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- atomic writes


def _current_umask() -> int:
    """Read the process umask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()


def _write_error(path: Path, err: OSError) -> InstillError:
    """Turn an OSError from a write into a user-facing error that says the old file is intact."""
    reason = err.strerror or str(err) or type(err).__name__
    return InstillError(
        f"could not write {path}: {reason} (is the disk full or the directory read-only?); "
        "the previous file, if any, is unchanged"
    )


def _fsync_dir(directory: Path) -> None:
    """Flush a directory entry so a rename survives a crash; best effort (not all OSes allow it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    """Delete a temp file if it is still there."""
    with contextlib.suppress(OSError):
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` (same suffix); move it onto `path` if the block succeeds.

    For libraries that write to a path themselves (matplotlib infers the format from the suffix).
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=target.suffix, dir=target.parent)
        os.close(fd)
    except OSError as err:
        raise _write_error(target, err) from err
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)  # after the block: some writers replace the file (mode 0600)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as err:
        _remove_quietly(tmp)
        raise _write_error(target, err) from err
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically: either the whole new file or the old one survives."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    """Convert a leaf value json cannot encode (numpy/torch scalars and arrays, Paths, sets)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.ndim == 0 else obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_dict(obj)
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON: {obj!r:.80}")


def _jsonable(obj: Any) -> Any:
    """Recursively turn `obj` into plain JSON values; non-finite floats become None (null)."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(_jsonable(key)): _jsonable(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(item) for item in obj]
    return _jsonable(_json_default(obj))


def write_json(path: PathLike, obj: Any) -> None:
    """Write `obj` as JSON atomically (indent 2, sorted keys, trailing newline, NaN as null)."""
    text = json.dumps(_jsonable(obj), indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False)
    atomic_write_text(path, text + "\n")


# --------------------------------------------------------------------------- tensors

# torch.save writes a zip archive (new format) or a raw pickle stream (legacy format).
_UNSAFE_HEADERS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_PICKLE_HINT = (
    "instill only loads safetensors and never unpickles, because unpickling can run arbitrary "
    "code. If you trust the file, load it yourself (torch.load) in trusted code and save the "
    "tensors with safetensors.torch.save_file"
)


def save_tensors(
    path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Save named tensors (and string metadata) to a safetensors file atomically."""
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"save_tensors needs str -> Tensor, got {key!r} -> {type(value)}")
    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata must be str -> str, got {key!r} -> {value!r}")
    plain = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    atomic_write_bytes(path, _sorted_header(safetensors.torch.save(plain, metadata=meta or None)))


def _sorted_header(data: bytes) -> bytes:
    """Rewrite a safetensors header with sorted keys, so equal content gives equal bytes.

    safetensors writes `__metadata__` in hash-map order, which changes from process to process.
    Offsets in the header are relative to the data, so the data bytes are kept as they are.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def _not_safetensors(path: Path, reason: str) -> FileFormatError:
    """Build the error for a file that is not a readable safetensors file."""
    return FileFormatError(f"{path} is not a valid safetensors file: {reason}")


def _check_tensor_file(path: Path) -> None:
    """Reject missing files and pickle/zip files (torch.save output) before opening them."""
    if not path.exists():
        raise FileFormatError(
            f"{path} does not exist; check the path (expected a safetensors file)"
        )
    if not path.is_file():
        raise _not_safetensors(path, "it is a directory or special file, not a regular file")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(_UNSAFE_HEADERS):
        raise _not_safetensors(
            path, f"it looks like a pickle/zip file (e.g. written by torch.save). {_PICKLE_HINT}"
        )
    if len(head) < 8:
        raise _not_safetensors(path, f"it is only {len(head)} bytes long (truncated or empty)")


def load_tensors(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors and metadata from a safetensors file; never unpickles anything."""
    file = Path(path)
    _check_tensor_file(file)
    try:
        with safetensors.safe_open(file, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as err:
        hint = f". {_PICKLE_HINT}" if file.suffix.lower() in _PICKLE_SUFFIXES else ""
        reason = f"{err} (truncated, corrupt or another format?){hint}"
        raise _not_safetensors(file, reason) from err
    return tensors, metadata


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


# --------------------------------------------------------------------------- run metadata

_TRACKED_PACKAGES = ("torch", "numpy", "transformers", "safetensors")


def _version(package: str) -> str | None:
    """Installed version of `package`, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(args: Sequence[str], cwd: Path) -> str | None:
    """Run a read-only git command with a short timeout; None on any failure."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # never take index.lock
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _git_info() -> tuple[str | None, bool | None]:
    """(HEAD revision, dirty flag) of the checkout holding the instill package, or (None, None)."""
    package_dir = Path(__file__).resolve().parent
    # An installed copy inside some other repository (e.g. a venv in a project) is not ours.
    if _git(["ls-files", "--error-unmatch", "--", "__init__.py"], package_dir) is None:
        return None, None
    revision = _git(["rev-parse", "HEAD"], package_dir)
    if revision is None:
        return None, None
    status = _git(["status", "--porcelain", "--", "."], package_dir)
    return revision, (None if status is None else bool(status))


def _device_info() -> dict[str, Any]:
    """Torch device facts that affect results and speed."""
    cuda = torch.cuda.is_available()
    return {
        "cuda_available": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "torch_threads": torch.get_num_threads(),
    }


def run_metadata(seed: int | None, config: Mapping[str, Any]) -> dict[str, Any]:
    """Everything needed to reproduce a run: config, seed, versions, git revision, device."""
    revision, dirty = _git_info()
    packages = {name: _version(name) for name in _TRACKED_PACKAGES}
    return {
        "instill_version": _version("instill") or "unknown",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: version for name, version in packages.items() if version},
        "git_revision": revision,
        "git_dirty": dirty,
        "seed": seed,
        "config": _jsonable(config),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": _device_info(),
        "argv": list(sys.argv),
    }


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError as err:
        raise FileFormatError(f"cannot hash {path}: the file does not exist") from err
    return digest.hexdigest()


def hash_files(root: PathLike, names: Iterable[str]) -> dict[str, str]:
    """SHA-256 of each named file under `root`, keyed by name."""
    return {name: file_sha256(Path(root) / name) for name in names}


# --------------------------------------------------------------------------- run directories


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys, e.g. {'a': {'b': 1}} -> {'a.b': 1}."""
    if not isinstance(data, Mapping):
        return {prefix: data}
    if not data:
        return {prefix: {}} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _selected(key: str, fields: Sequence[str] | None) -> bool:
    """Whether dotted `key` is one of `fields` or lies under one of them (None selects all)."""
    return fields is None or any(key == f or key.startswith(f + ".") for f in fields)


class RunDir:
    """A run's output directory: paths, config compatibility checks, config.json and manifest."""

    CONFIG = "config.json"
    MANIFEST = "manifest.json"

    def __init__(self, root: PathLike) -> None:
        """Create the directory (and parents) if needed."""
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(
                f"output path {self.root} is a file, not a directory; choose another --out"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InstillError(
                f"could not create output directory {self.root}: {err.strerror or err}; "
                "choose another --out"
            ) from err

    def path(self, name: str) -> Path:
        """Path of a file inside the run directory."""
        return self.root / name

    def exists(self, name: str) -> bool:
        """Whether a file already exists in the run directory (e.g. from an interrupted run)."""
        return self.path(name).exists()

    def _recorded(self) -> dict[str, Any] | None:
        """The config.json of an earlier run, or None when there is none."""
        if not self.exists(self.CONFIG):
            return None
        try:
            return load_config_file(self.path(self.CONFIG))
        except FileFormatError as err:
            raise FileFormatError(
                f"{err}. It was not written by instill (which writes atomically); "
                f"use a new --out directory or delete {self.root}"
            ) from err

    def check_compatible(
        self, config: Mapping[str, Any], version_key_fields: Sequence[str] | None = None,
        mutable: Sequence[str] = (),
    ) -> list[str]:
        """Refuse to reuse a directory written by another config or run format version.

        `version_key_fields` lists the dotted config keys that must match (None: all keys);
        keys under `mutable` may change (they decide nothing already computed). Returns the
        mutable keys that changed.
        """
        recorded = self._recorded()
        if recorded is None:
            return []
        fix = f"use a new --out directory or delete {self.root}"
        version = recorded.get("format_version")
        if version != RUN_FORMAT_VERSION:
            raise ConfigError(
                f"{self.root} was written with run format version {version!r}, but this instill "
                f"writes version {RUN_FORMAT_VERSION}; {fix}"
            )
        old = _flatten(recorded.get("config") or {})
        new = _flatten(json.loads(json.dumps(_jsonable(config))))
        changed = [key for key in sorted(set(old) | set(new))
                   if _selected(key, version_key_fields) and old.get(key, ...) != new.get(key, ...)]
        diffs = [f"{key} was {old.get(key, '<unset>')!r}, now {new.get(key, '<unset>')!r}"
                 for key in changed if not (mutable and _selected(key, mutable))]
        if diffs:
            shown = "; ".join(diffs[:10]) + ("; ..." if len(diffs) > 10 else "")
            raise ConfigError(
                f"{self.root} holds results from a different config ({shown}); "
                f"a resumed run must not mix results from different configs: {fix}"
            )
        return changed

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the `.tmp-*` files a killed run left behind (atomic writes that never finished
        their rename); call before any worker writes. Returns what was removed."""
        stale = sorted(p for p in self.root.rglob(".tmp-*") if p.is_file())
        for path in stale:
            _remove_quietly(path)
        return stale

    def begin(self, config: Mapping[str, Any], seed: int | None,
              log: Callable[[str], Any] = print, mutable: Sequence[str] = ()) -> None:
        """Start or resume a run here: refuse another config's directory (except for changes
        under `mutable`, which are recorded), delete what a killed run left half-written, and
        record config.json on a fresh start."""
        changed = self.check_compatible(config, mutable=mutable)
        for path in self.remove_stale_temporaries():
            log(f"removed {path}, left by an interrupted run")
        if changed:
            log(f"resuming with changed {', '.join(changed)}; config.json records the new values")
        if changed or not self.exists(self.CONFIG):
            self.write_config(config, seed)

    def write_config(self, config: Mapping[str, Any], seed: int | None) -> dict[str, Any]:
        """Write config.json (format version + full run metadata); returns what was written."""
        record = {"format_version": RUN_FORMAT_VERSION, **run_metadata(seed, config)}
        write_json(self.path(self.CONFIG), record)
        return record

    def record_outputs(self, names: Iterable[str]) -> dict[str, Any]:
        """Add/update the SHA-256 of each named file in manifest.json; returns the manifest."""
        manifest: dict[str, Any] = {"format_version": RUN_FORMAT_VERSION, "files": {}}
        if self.exists(self.MANIFEST):
            manifest["files"].update(load_config_file(self.path(self.MANIFEST)).get("files", {}))
        manifest["files"].update(hash_files(self.root, names))
        write_json(self.path(self.MANIFEST), manifest)
        return manifest
