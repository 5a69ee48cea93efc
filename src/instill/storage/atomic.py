"""Atomic writes: every file goes to a temp file in its directory, is fsynced and moved into
place with os.replace, so a killed run never leaves a half-written file that a later run trusts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from instill.errors import InstillError

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


def remove_quietly(path: Path) -> None:
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
        remove_quietly(tmp)
        raise _write_error(target, err) from err
    except BaseException:
        remove_quietly(tmp)
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
        return dataclasses.asdict(obj)
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON: {obj!r:.80}")


def jsonable(obj: Any) -> Any:
    """Recursively turn `obj` into plain JSON values; non-finite floats become None (null)."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(jsonable(key)): jsonable(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(item) for item in obj]
    return jsonable(_json_default(obj))


def write_json(path: PathLike, obj: Any) -> None:
    """Write `obj` as JSON atomically (indent 2, sorted keys, trailing newline, NaN as null)."""
    text = json.dumps(jsonable(obj), indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False)
    atomic_write_text(path, text + "\n")
