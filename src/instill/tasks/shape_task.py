"""The shape-bias task on the generated world or real image folders: every image set a run uses,
the classification loss and metrics, and the shape-preserving augmentation of the `random_aug`
control. Pure data and tensor code; `experiments.shapebias` runs the phases."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instill.errors import ConfigError
from instill.experiments.pipeline import derive_seed
from instill.models import logits_of
from instill.tasks.images import (
    ImageSet,
    load_cue_conflict_folder,
    load_image_folder,
    shape_bias,
)
from instill.tasks.shapes import make_split

if TYPE_CHECKING:
    from instill.experiments.shapebias import ShapeBiasConfig


@dataclass
class AugmentConfig:
    """The `random_aug` control's shape-preserving augmentation, applied per image in the loss.

    Pixel-wise colour changes (grayscale, channel permutation, per-channel inversion) destroy
    the colour statistics a texture shortcut relies on; a light box blur and Gaussian noise
    blunt fine patterns. None of them moves a pixel, so the silhouette is untouched.
    """

    permute: bool = True
    invert: float = 0.5      # probability of inverting each colour channel
    grayscale: float = 0.25  # probability of turning the image gray
    blur: float = 0.5        # probability of a 3x3 box blur
    noise: float = 0.05      # std of additive Gaussian noise

    def __post_init__(self) -> None:
        for name in ("invert", "grayscale", "blur"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"augment.{name} is a probability in [0, 1], got "
                                  f"{getattr(self, name)}")
        if not self.noise >= 0:
            raise ConfigError(f"augment.noise must be >= 0, got {self.noise}")


_PERMUTATIONS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def shape_preserving_augment(images: Tensor, generator: torch.Generator,
                             cfg: AugmentConfig) -> Tensor:
    """Per-image random colour permutation/inversion/grayscale, blur and noise of a batch
    [n, 3, S, S] in [0, 1]; pixel positions never move, so the silhouette is kept."""
    n, dev = images.shape[0], images.device

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator).to(dev)

    x = images
    if cfg.grayscale > 0:  # first: the original colours' brightness contrast survives it
        gray = (x * _LUMA.to(dev)[None, :, None, None]).sum(1, keepdim=True).expand_as(x)
        x = torch.where((rand(n) < cfg.grayscale)[:, None, None, None], gray, x)
    if cfg.permute:
        perm = _PERMUTATIONS[torch.randint(0, 6, (n,), generator=generator)].to(dev)
        x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    if cfg.invert > 0:  # keeps every channel's |object - background| contrast
        x = torch.where((rand(n, 3) < cfg.invert)[:, :, None, None], 1 - x, x)
    if cfg.blur > 0:
        blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        x = torch.where((rand(n) < cfg.blur)[:, None, None, None], blurred, x)
    if cfg.noise > 0:
        x = x + torch.randn(x.shape, generator=generator).to(dev) * cfg.noise
    return x.clamp(0.0, 1.0)


class ImageTask:
    """Cross-entropy on (images, labels) batches; accuracy and shape bias of a model."""

    def __init__(self, augment: AugmentConfig, batch_size: int = 500) -> None:
        self.augment_cfg, self.batch_size = augment, batch_size

    @staticmethod
    def normalize(images: Tensor) -> Tensor:
        return (images - 0.5) / 0.25

    def loss(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        images, labels = batch
        return F.cross_entropy(logits_of(model(pixel_values=self.normalize(images))).float(),
                               labels)

    def augmented_loss(self, seed: int) -> Callable[[nn.Module, Sequence[Tensor]], Tensor]:
        """The loss on shape-preserving augmentations of each batch (a seeded stream)."""
        generator = torch.Generator().manual_seed(seed)

        def loss(model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
            images, labels = batch
            return self.loss(model, (shape_preserving_augment(images, generator,
                                                              self.augment_cfg), labels))

        return loss

    @torch.no_grad()
    def predict(self, model: nn.Module, images: Tensor) -> Tensor:
        model.eval()
        device = next(model.parameters()).device
        outs = [logits_of(model(pixel_values=self.normalize(chunk.to(device)))).argmax(-1).cpu()
                for chunk in images.split(self.batch_size)]
        return torch.cat(outs)

    def accuracy(self, model: nn.Module, data: ImageSet) -> float:
        return (self.predict(model, data.images) == data.labels).float().mean().item()

    def shape_bias(self, model: nn.Module, data: ImageSet) -> dict[str, Any]:
        return shape_bias(self.predict(model, data.images), data.shapes, data.textures)


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


__all__ = ["AugmentConfig", "ImageTask", "ShapeBiasData", "check_dirs", "load_data",
           "shape_preserving_augment"]
