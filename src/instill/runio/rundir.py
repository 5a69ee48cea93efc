"""Run directories: one config per directory, resume checks, manifest of outputs."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from instill.errors import ConfigError, FileFormatError, InstillError
from instill.runio.configfiles import load_config_file
from instill.runio.provenance import hash_files, run_metadata
from instill.storage.atomic import (
    PathLike,
    jsonable,
    remove_quietly,
    write_json,
)

RUN_FORMAT_VERSION = 1

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
        mutable: Sequence[str] = (), defaults: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Refuse to reuse a directory written by another config or run format version.

        `version_key_fields` lists the dotted config keys that must match (None: all keys);
        keys under `mutable` may change (they decide nothing already computed). A key the
        recorded config lacks is compatible when its value equals its entry in `defaults` (a
        run from an older instill, which behaved as the default does). Returns the keys that
        changed or were added.
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
        new = _flatten(json.loads(json.dumps(jsonable(config))))
        default = _flatten(json.loads(json.dumps(jsonable(defaults or {}))))
        changed = [key for key in sorted(set(old) | set(new))
                   if _selected(key, version_key_fields) and old.get(key, ...) != new.get(key, ...)]
        added = [key for key in changed
                 if key not in old and key in default and new.get(key, ...) == default[key]]
        diffs = [f"{key} was {old.get(key, '<unset>')!r}, now {new.get(key, '<unset>')!r}"
                 for key in changed
                 if key not in added and not (mutable and _selected(key, mutable))]
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
            remove_quietly(path)
        return stale

    def begin(self, config: Mapping[str, Any], seed: int | None,
              log: Callable[[str], Any] = print, mutable: Sequence[str] = (),
              defaults: Mapping[str, Any] | None = None) -> None:
        """Start or resume a run here: refuse another config's directory (except for changes
        under `mutable`, and keys new since it was written that hold their `defaults`, which
        are recorded), delete what a killed run left half-written, and record config.json on a
        fresh start."""
        changed = self.check_compatible(config, mutable=mutable, defaults=defaults)
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
