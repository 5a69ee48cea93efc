"""A generated shape/texture world: the stand-in for ImageNet in the shape-bias experiment.

Every image holds one object: a silhouette of one of K shape classes (an implicit function on a
coordinate grid, at a random position, scale and rotation, always inside the image) filled with
one of K procedural textures (pattern + class-specific colour palette, with phase, frequency and
colour jitter), on a dull, low-contrast background. Class i pairs ``shape_names[i]`` with
``texture_names[i]``, like Geirhos et al.'s classes that have both a shape and a texture.

Splits (`make_split`):

* ``natural``      label = shape; the texture is the same class with probability ``rho``, else a
                   uniformly drawn other class. Texture (colour + pattern) is the easy shortcut.
* ``shape_only``   the "mean-pooled" analogue: the object is filled with its mean colour and the
                   background with its own, so only the silhouette is left. Its hidden textures
                   are drawn independently of the shape, so the fill colour carries no label.
* ``cue_conflict`` shape i with texture j != i; the set records both.
* ``texture_only`` label = texture: a natural-style image of a uniformly drawn texture on an
                   independently drawn shape, cut into a grid of square patches (side
                   ``size // 8``) that are shuffled per image, so the texture is kept and the
                   silhouette destroyed (its `masks` are shuffled likewise). Not in `SPLITS`
                   (the three of the shape-bias experiment); `ALL_SPLITS` holds all four.

Everything is pure torch on the CPU, vectorised over images (loops run over classes only), and
deterministic given the seed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch

from instill.errors import ConfigError
from instill.storage import atomic_path
from instill.tasks.images import ImageSet
from instill.tasks.shape_atlas import (
    PALETTES,
    SHAPE_NAMES,
    SHAPES,
    TEX_PARAMS,
    TEXTURE_NAMES,
    TEXTURES,
    TWO_PI,
)

__all__ = [
    "ALL_SPLITS",
    "MAX_CLASSES",
    "SHAPE_NAMES",
    "SPLITS",
    "TEXTURE_NAMES",
    "ImageSet",
    "ShapeWorld",
    "make_split",
    "preview_grid",
]

SPLITS = ("natural", "shape_only", "cue_conflict")
ALL_SPLITS = (*SPLITS, "texture_only")

Tensor = torch.Tensor
_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for a while.

    Generation is many small element-wise ops; with several threads each op pays a thread
    barrier, which on a busy machine (other processes on the cores) made it 10-20x slower.
    One thread is about as fast on an idle machine, and makes every reduction's rounding (and
    so the images) independent of the thread count. Process-wide, restored on exit.
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _single_threaded(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with _one_thread():
            return fn(*args, **kwargs)

    return wrapper



MAX_CLASSES = min(len(SHAPES), len(TEXTURES))
_SIZE_RANGE = (16, 256)
_COLOUR_JITTER = 0.06
_BG_NOISE = 0.02
_BG_TINT = 0.06
_MIN_BG_GAP = 0.25


@dataclass(frozen=True)
class ShapeWorld:
    """A generated world of K shape classes x K texture classes at size x size pixels.

    classes: K, number of classes (2..12); class i = (shape_names[i], texture_names[i]).
    size:    image side in pixels (16..256; 32 and 64 are the intended sizes).
    rho:     probability that a `natural` image's texture is its shape's class (0..1).
    """

    classes: int = 8
    size: int = 32
    rho: float = 0.9

    def __post_init__(self) -> None:
        k = self.classes
        if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= MAX_CLASSES:
            raise ConfigError(
                f"ShapeWorld.classes must be an integer from 2 to {MAX_CLASSES}, got {k!r}"
            )
        s = self.size
        lo, hi = _SIZE_RANGE
        if isinstance(s, bool) or not isinstance(s, int) or not lo <= s <= hi:
            raise ConfigError(f"ShapeWorld.size must be an integer from {lo} to {hi}, got {s!r}")
        r = self.rho
        if (
            isinstance(r, bool)
            or not isinstance(r, int | float)
            or not math.isfinite(r)
            or not 0.0 <= r <= 1.0
        ):
            raise ConfigError(f"ShapeWorld.rho must be a number from 0 to 1, got {r!r}")

    @property
    def shape_names(self) -> list[str]:
        return list(SHAPE_NAMES[: self.classes])

    @property
    def texture_names(self) -> list[str]:
        return list(TEXTURE_NAMES[: self.classes])

    def grid(self) -> tuple[Tensor, Tensor]:
        """Pixel-centre coordinates (x, y), each [S, S], spanning (-1, 1); y grows downwards."""
        c = (torch.arange(self.size, dtype=torch.float32) + 0.5) / self.size * 2 - 1
        y, x = torch.meshgrid(c, c, indexing="ij")
        return x, y

    def sample_poses(self, n: int, generator: torch.Generator) -> Tensor:
        """Random object poses [n, 4]: (scale, cx, cy, angle); the object stays in the image."""
        u = torch.rand(n, 4, generator=generator)
        scale = 0.5 + 0.3 * u[:, 0]
        limit = 1.0 - scale - 2.0 / self.size  # keep a one-pixel margin
        cx = (2 * u[:, 1] - 1) * limit
        cy = (2 * u[:, 2] - 1) * limit
        angle = TWO_PI * u[:, 3]
        return torch.stack([scale, cx, cy, angle], dim=1)

    @_single_threaded
    def masks(self, shape_ids: Tensor, poses: Tensor) -> Tensor:
        """Object masks bool [n, S, S] of the given shape classes at the given poses."""
        shape_ids = self._check_ids(shape_ids, "shape_ids")
        n = shape_ids.shape[0]
        if poses.shape != (n, 4):
            raise ConfigError(f"poses must have shape ({n}, 4), got {tuple(poses.shape)}")
        x, y = self.grid()
        scale, cx, cy, angle = (poses[:, i, None, None].float() for i in range(4))
        dx, dy = x - cx, y - cy
        c, s = torch.cos(angle), torch.sin(angle)
        lu = (c * dx + s * dy) / scale
        lv = (-s * dx + c * dy) / scale
        out = torch.zeros(n, self.size, self.size, dtype=torch.bool)
        for k in torch.unique(shape_ids).tolist():
            idx = (shape_ids == k).nonzero(as_tuple=True)[0]
            out[idx] = SHAPES[k][1](lu[idx], lv[idx]) <= 0
        return out

    @_single_threaded
    def render(
        self,
        shape_ids: Tensor,
        texture_ids: Tensor,
        generator: torch.Generator,
        *,
        poses: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Render objects: images float32 [n, 3, S, S] in [0, 1] and masks bool [n, S, S].

        The generator is consumed in a fixed order and amount that depends only on n (poses,
        when not given, then texture parameters, pixel noise, colour jitter, background), so
        the same generator state with other texture ids gives the same poses and masks, and
        with other shape ids the same texture fields.
        """
        shape_ids = self._check_ids(shape_ids, "shape_ids")
        texture_ids = self._check_ids(texture_ids, "texture_ids")
        n, size = shape_ids.shape[0], self.size
        if texture_ids.shape[0] != n:
            raise ConfigError(
                f"shape_ids and texture_ids must have the same length, got {n} and "
                f"{texture_ids.shape[0]}"
            )
        if poses is None:
            poses = self.sample_poses(n, generator)
        tex_u = torch.rand(n, TEX_PARAMS, generator=generator)
        tex_noise = torch.rand(n, size, size, generator=generator)
        jitter = (torch.rand(n, 2, 3, generator=generator) * 2 - 1) * _COLOUR_JITTER
        bg_u = torch.rand(n, 2, generator=generator)
        bg_tint = (torch.rand(n, 3, generator=generator) * 2 - 1) * _BG_TINT
        bg_noise = torch.randn(n, 3, size, size, generator=generator) * _BG_NOISE

        mask = self.masks(shape_ids, poses)
        x, y = self.grid()
        obj = torch.empty(n, 3, size, size)
        for k in torch.unique(texture_ids).tolist():
            idx = (texture_ids == k).nonzero(as_tuple=True)[0]
            t = TEXTURES[k][1](x, y, tex_u[idx], tex_noise[idx]).unsqueeze(1)
            colours = (PALETTES[k].unsqueeze(0) + jitter[idx]).clamp(0.0, 1.0)
            c0, c1 = colours[:, 0, :, None, None], colours[:, 1, :, None, None]
            obj[idx] = c0 + (c1 - c0) * t

        # Background: a dull grey-ish colour whose brightness is kept away from the object's mean.
        m = mask.unsqueeze(1).float()
        obj_mean = (obj * m).sum(dim=(1, 2, 3)) / (3 * m.sum(dim=(1, 2, 3)).clamp(min=1))
        grey = 0.2 + 0.6 * bg_u[:, 0]
        away = torch.where(
            obj_mean >= 0.5,
            obj_mean - _MIN_BG_GAP - 0.15 * bg_u[:, 1],
            obj_mean + _MIN_BG_GAP + 0.15 * bg_u[:, 1],
        )
        grey = torch.where((grey - obj_mean).abs() < _MIN_BG_GAP, away, grey)
        bg = (grey[:, None] + bg_tint)[:, :, None, None] + bg_noise
        images = torch.where(mask.unsqueeze(1), obj, bg).clamp_(0.0, 1.0)
        return images.float(), mask

    def _check_ids(self, ids: Tensor, name: str) -> Tensor:
        ids = torch.as_tensor(ids)
        if ids.ndim != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ConfigError(f"{name} must be a 1-D integer tensor")
        ids = ids.long()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.classes):
            raise ConfigError(
                f"{name} must lie in 0..{self.classes - 1} (ShapeWorld.classes="
                f"{self.classes}), got {ids.min().item()}..{ids.max().item()}"
            )
        return ids


def _mean_pool(images: Tensor, mask: Tensor) -> Tensor:
    """Fill the object with its mean colour and the background with its own mean colour."""
    m = mask.unsqueeze(1).float()
    inv = 1.0 - m
    obj_mean = (images * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp(min=1)
    bg_mean = (images * inv).sum(dim=(2, 3)) / inv.sum(dim=(2, 3)).clamp(min=1)
    return torch.where(mask.unsqueeze(1), obj_mean[:, :, None, None], bg_mean[:, :, None, None])


def _split_seed(seed: int, split: str) -> int:
    # A fixed mix of the seed and the split, so the splits of one seed are independent draws.
    return (seed * 1_000_003 + 7919 * (ALL_SPLITS.index(split) + 1)) % (2**63)


def _shuffle_patches(x: Tensor, side: int, generator: torch.Generator) -> Tensor:
    """Permute the side x side patches of each image [n, c, S, S] independently."""
    n, c, size, _ = x.shape
    g = size // side
    patches = x.reshape(n, c, g, side, g, side).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
    order = torch.argsort(torch.rand(n, g * g, generator=generator), dim=1)
    patches = patches.gather(1, order[:, :, None].expand_as(patches))
    return patches.reshape(n, g, g, c, side, side).permute(0, 3, 1, 4, 2, 5).reshape(x.shape)


def _other_class(ids: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """A uniformly drawn class different from each id."""
    return (ids + torch.randint(1, k, ids.shape, generator=generator)) % k


@_single_threaded
def make_split(world: ShapeWorld, split: str, n: int, seed: int) -> ImageSet:
    """Generate ``n`` images of one split ("natural", "shape_only", "cue_conflict" or
    "texture_only", whose labels are textures).

    Shape classes are balanced (each appears n // K or n // K + 1 times, shuffled). The result
    is a deterministic function of (world, split, n, seed).
    """
    if not isinstance(world, ShapeWorld):
        raise ConfigError(f"world must be a ShapeWorld, got {type(world).__name__}")
    if split not in ALL_SPLITS:
        raise ConfigError(f"split must be one of {', '.join(ALL_SPLITS)}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    k = world.classes
    gen = torch.Generator().manual_seed(_split_seed(seed, split))
    shapes = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]
    if split == "natural":
        keep = torch.rand(n, generator=gen) < world.rho
        textures = torch.where(keep, shapes, _other_class(shapes, k, gen))
    elif split in ("shape_only", "texture_only"):
        textures = torch.randint(0, k, (n,), generator=gen)
    else:
        textures = _other_class(shapes, k, gen)
    poses = world.sample_poses(n, gen)
    images, masks = world.render(shapes, textures, gen, poses=poses)
    if split == "shape_only":
        images = _mean_pool(images, masks)
    if split == "texture_only":
        side = max(1, world.size // 8)
        state = gen.get_state()
        images = _shuffle_patches(images, side, gen)
        gen.set_state(state)  # the same permutation for the masks
        masks = _shuffle_patches(masks[:, None].float(), side, gen)[:, 0].bool()
    return ImageSet(
        images=images.contiguous(),
        labels=(textures if split == "texture_only" else shapes).clone(),
        shapes=shapes,
        textures=textures,
        split=split,
        class_names=world.shape_names,
        texture_names=world.texture_names,
        masks=masks,
        poses=poses,
        meta={"world": world, "seed": seed},
    )


def _title(data: ImageSet, i: int) -> str:
    s, t = int(data.shapes[i]), int(data.textures[i])
    shape = data.class_names[s]
    texture = (data.texture_names or data.class_names)[t]
    if data.split == "shape_only":
        return shape
    if s == t:
        return shape
    return f"{shape}/{texture}"


def preview_grid(
    world: ShapeWorld, seed: int, path: str | os.PathLike[str], per_split: int = 8
) -> Path:
    """Write a PNG with one row per split (natural, shape_only, cue_conflict) of ``per_split``
    images each, titled with their labels ("shape/texture" where the two differ). Atomic."""
    if isinstance(per_split, bool) or not isinstance(per_split, int) or per_split < 1:
        raise ConfigError(f"per_split must be a positive integer, got {per_split!r}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(1.25 * per_split + 0.6, 1.45 * len(SPLITS)), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(SPLITS), per_split, squeeze=False)
    for row, split in enumerate(SPLITS):
        data = make_split(world, split, per_split, seed)
        for col in range(per_split):
            ax = axes[row][col]
            ax.imshow(data.images[col].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(_title(data, col), fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(split, fontsize=8)
    fig.suptitle(
        f"ShapeWorld(classes={world.classes}, size={world.size}, rho={world.rho}), seed {seed}",
        fontsize=9,
    )
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out
