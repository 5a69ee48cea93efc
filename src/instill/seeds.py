"""One seeding scheme for every run: a unit of work's seed is a hash of its name."""

from __future__ import annotations

import hashlib


def derive_seed(root: int, *parts: str | int) -> int:
    """A stable 31-bit seed for one unit of work, named by `parts` under the run's `root` seed
    (the same names give the same seed on every machine and in every process)."""
    digest = hashlib.sha256(repr((int(root), *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


__all__ = ["derive_seed"]
