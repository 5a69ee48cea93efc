"""The image sets of a shape-bias run, generated from its config or read from real folders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from instill.errors import ConfigError
from instill.seeds import derive_seed
from instill.tasks.images import (
    ImageSet,
    load_cue_conflict_folder,
    load_image_folder,
)
from instill.tasks.shapes import make_split

if TYPE_CHECKING:
    from instill.experiments.shapebias_config import ShapeBiasConfig


@dataclass
class ShapeBiasData:
    """Every image set a run uses; all replicates share them except `pool(replicate, seed)`, the
    downstream natural set of one replicate and seed (its first n images train the cell of
    size n)."""

    class_names: list[str]
    base_train: ImageSet
    base_val: ImageSet
    val: ImageSet
    test: ImageSet
    shape_train: ImageSet
    shape_eval: ImageSet
    cue_conflict: ImageSet
    pool: Callable[[int, int], ImageSet]
    pool_size: int
    sources: dict[str, str]

    def describe(self) -> dict[str, Any]:
        sets = ("base_train", "base_val", "val", "test", "shape_train", "shape_eval",
                "cue_conflict")
        return {"classes": self.class_names, "sources": self.sources,
                "sizes": {s: len(getattr(self, s)) for s in sets} | {"pool": self.pool_size}}


def _data_seed(cfg: ShapeBiasConfig, kind: str, *parts: int) -> int:
    """The seed of one image set (`pipeline.derive_seed`, like every other seed of a run)."""
    return derive_seed(cfg.seed, "data", kind, *parts)


def _split_folder(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(held-out part, rest) by a seeded permutation; each part keeps at least one image."""
    if len(data) < 2:
        raise ConfigError(f"the folder for {data.split!r} has {len(data)} image(s); it needs "
                          "at least 2 to hold some out for evaluation")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    k = min(max(1, round(fraction * len(data))), len(data) - 1)
    return data.subset(order[:k]), data.subset(order[k:])


def check_dirs(cfg: ShapeBiasConfig) -> None:
    """Fail fast, before any training, on a real-data folder that is not there."""
    for name in ("train_dir", "shape_dir", "cue_conflict_dir"):
        value = getattr(cfg, name)
        if value is None:
            continue
        if not Path(value).exists():
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} does not exist")
        if not Path(value).is_dir():
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not a directory")


def load_data(cfg: ShapeBiasConfig) -> ShapeBiasData:
    """Generate (or read from the real folders given in the config) every image set."""
    check_dirs(cfg)
    world = cfg.world
    sources: dict[str, str] = {}
    gen: Callable[[str, int, str], ImageSet] = \
        lambda split, n, kind: make_split(world, split, n, _data_seed(cfg, kind))  # noqa: E731

    if cfg.train_dir is not None:
        everything = load_image_folder(cfg.train_dir, cfg.size)
        names = everything.class_names
        held, rest = _split_folder(everything, cfg.holdout, _data_seed(cfg, "val"))
        if len(held) < 2:
            raise ConfigError(f"--train-dir {cfg.train_dir!r} has too few images to hold out a "
                              f"validation and a test set (holdout {cfg.holdout})")
        half = len(held) // 2
        val, test = held.subset(range(half)), held.subset(range(half, len(held)))
        base_train, base_val, pool_all = rest, val, rest
        sources["natural"] = str(cfg.train_dir)

        def pool(replicate: int, seed: int) -> ImageSet:
            gen_ = torch.Generator().manual_seed(_data_seed(cfg, "pool", replicate, seed))
            return pool_all.subset(torch.randperm(len(pool_all), generator=gen_))

        pool_size = len(pool_all)
    else:
        names = world.shape_names
        base_train = gen("natural", cfg.base_samples, "base_train")
        base_val = gen("natural", cfg.base_val, "base_val")
        val, test = gen("natural", cfg.n_val, "val"), gen("natural", cfg.n_test, "test")
        pool_size = max(cfg.grid)
        sources["natural"] = f"generated ShapeWorld(classes={cfg.classes}, size={cfg.size}, " \
                             f"rho={cfg.rho})"

        cache: dict[tuple[int, int], ImageSet] = {}

        def pool(replicate: int, seed: int) -> ImageSet:  # cells of a pool often run in a row
            if (replicate, seed) not in cache:
                cache.clear()
                cache[replicate, seed] = make_split(world, "natural", pool_size,
                                                    _data_seed(cfg, "pool", replicate, seed))
            return cache[replicate, seed]

    def need_world(what: str, option: str) -> None:
        if names != world.shape_names:
            raise ConfigError(
                f"--train-dir's classes {names[:6]} are not the generated world's "
                f"{world.shape_names[:6]}, so the generated {what} images cannot be used with "
                f"them: give {option} (shape-only images can be made with `instill meanpool "
                "TRAIN_DIR OUT_DIR`)")

    if cfg.shape_dir is not None:
        shapes = load_image_folder(cfg.shape_dir, cfg.size, class_names=names)
        shape_eval, shape_train = _split_folder(shapes, cfg.holdout,
                                                _data_seed(cfg, "shape_eval"))
        sources["shape_only"] = str(cfg.shape_dir)
    else:
        need_world("shape-only", "--shape-dir")
        shape_train = gen("shape_only", cfg.discovery_samples, "shape_train")
        shape_eval = gen("shape_only", cfg.n_eval, "shape_eval")
        sources["shape_only"] = "generated"
    if cfg.cue_conflict_dir is not None:
        cue = load_cue_conflict_folder(cfg.cue_conflict_dir, cfg.size, class_names=names)
        sources["cue_conflict"] = str(cfg.cue_conflict_dir)
    else:
        need_world("cue-conflict", "--cue-conflict-dir")
        cue = gen("cue_conflict", cfg.n_eval, "cue_conflict")
        sources["cue_conflict"] = "generated"
    if max(cfg.grid) > pool_size:
        raise ConfigError(f"the grid asks for {max(cfg.grid)} downstream images but only "
                          f"{pool_size} are available from --train-dir after holding out "
                          f"{len(val) + len(test)}; lower --grid")
    return ShapeBiasData(list(names), base_train, base_val, val, test, shape_train, shape_eval,
                         cue, pool, pool_size, sources)


__all__ = ["ShapeBiasData", "check_dirs", "load_data"]
