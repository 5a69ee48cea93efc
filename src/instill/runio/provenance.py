"""Run provenance: config, seed, package versions, git revision, device; output hashes."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from instill.errors import FileFormatError
from instill.storage.atomic import PathLike, jsonable

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
    package_dir = Path(__file__).resolve().parent.parent
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
        "config": jsonable(config),
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
