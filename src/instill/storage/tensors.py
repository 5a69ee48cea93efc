"""Safe tensor files: safetensors only, written atomically; pickles are refused, never loaded."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from instill.errors import FileFormatError
from instill.storage.atomic import PathLike, atomic_write_bytes

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
