"""Image data sets: the `ImageSet` container, real image folders, cue-conflict names, shape bias.

Real-data counterparts of the generated world in `instill.tasks.shapes`:

* `load_image_folder` reads a class-per-folder tree (``root/<class>/*.png``) into an `ImageSet`.
* `load_cue_conflict_folder` reads Geirhos-style cue-conflict images (``dog10-bird2.png``:
  shape of a dog, texture of a bird), flat or in class folders, via `parse_cue_conflict_name`.
* mean pooling (texture removal) of real images is in `instill.tasks.meanpool`.
* `shape_bias` scores predictions on cue-conflict images (Geirhos et al. 2019).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from instill.errors import ConfigError, FileFormatError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "load_cue_conflict_folder",
    "load_image_folder",
    "parse_cue_conflict_name",
    "shape_bias",
]


@dataclass(eq=False)
class ImageSet(Dataset):
    """Images with their labels; a torch Dataset whose items are ``(image, label)``.

    images:   float32 [n, 3, S, S] in [0, 1].
    labels:   long [n], the class a model is trained/scored on (= the shape class).
    shapes:   long [n], shape class of each image.
    textures: long [n], texture class of each image (equal to `shapes` where both cues agree;
              for an ordinary class-folder image, whose shape and texture are both its class).
    split:    name of the split ("natural", "shape_only", "cue_conflict", or a folder name).
    class_names: name of each (shape) class; ``labels`` index into it.
    texture_names: name of each texture class (defaults to `class_names`).
    masks:    optional bool [n, S, S] object masks (generated data only).
    poses:    optional float [n, 4] object poses (scale, cx, cy, angle; generated data only).
    """

    images: torch.Tensor
    labels: torch.Tensor
    shapes: torch.Tensor
    textures: torch.Tensor
    split: str
    class_names: list[str]
    texture_names: list[str] | None = None
    masks: torch.Tensor | None = None
    poses: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.ndim != 4:
            raise ConfigError("ImageSet.images must be a float tensor [n, 3, S, S]")
        if self.images.shape[1] != 3:
            raise ConfigError(
                f"ImageSet.images must have 3 colour channels, got shape {tuple(self.images.shape)}"
            )
        n = self.images.shape[0]
        for name in ("labels", "shapes", "textures"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.shape != (n,):
                raise ConfigError(f"ImageSet.{name} must be a tensor of shape ({n},)")
            if value.dtype != torch.long:
                setattr(self, name, value.long())
        self.class_names = list(self.class_names)
        self.texture_names = (
            list(self.class_names) if self.texture_names is None else list(self.texture_names)
        )
        if self.masks is not None and self.masks.shape != (n, *self.images.shape[2:]):
            raise ConfigError(f"ImageSet.masks must have shape ({n}, S, S)")
        if self.poses is not None and self.poses.shape[0] != n:
            raise ConfigError(f"ImageSet.poses must have {n} rows")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    @property
    def size(self) -> int:
        """Side length S of the (square) images."""
        return int(self.images.shape[-1])

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageSet:
        """A new ImageSet holding the given rows (tensors are indexed, not shared views)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(
            images=self.images[idx],
            labels=self.labels[idx],
            shapes=self.shapes[idx],
            textures=self.textures[idx],
            split=self.split,
            class_names=list(self.class_names),
            texture_names=list(self.texture_names or self.class_names),
            masks=None if self.masks is None else self.masks[idx],
            poses=None if self.poses is None else self.poses[idx],
            meta=dict(self.meta),
        )


# --------------------------------------------------------------------------------------------
# Reading folders
# --------------------------------------------------------------------------------------------


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"size must be a positive integer (pixels), got {size!r}")
    return size


def check_dir(root: str | os.PathLike[str], what: str) -> Path:
    path = Path(root)
    if not path.exists():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is not a directory")
    return path


def is_image(path: Path) -> bool:
    return (
        path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def read_rgb(path: Path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB; FileFormatError naming the file if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise FileFormatError(
            f"cannot read image {str(path)!r}: {exc}; replace or delete the file"
        ) from exc


def _load_resized(path: Path, size: int) -> torch.Tensor:
    """Read an image, resize to size x size (bilinear, antialiased); float32 [3, S, S] in [0,1]."""
    from PIL import Image

    array = read_rgb(path)
    if array.shape[0] != size or array.shape[1] != size:
        resample = Image.Resampling.BILINEAR
        array = np.array(Image.fromarray(array).resize((size, size), resample=resample))
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(255.0)


def load_image_folder(
    root: str | os.PathLike[str],
    size: int,
    class_names: Sequence[str] | None = None,
) -> ImageSet:
    """Load a class-per-folder tree ``root/<class>/*.png|jpg|jpeg`` as an ImageSet.

    Images are converted to RGB and resized to ``size`` x ``size``. Labels follow the sorted
    folder names, or the order of ``class_names`` when given (then only those folders are read;
    other folders are ignored). ``shapes`` and ``textures`` both equal ``labels``.
    """
    size = _check_size(size)
    root_path = check_dir(root, "image folder")
    if class_names is None:
        names = sorted(
            p.name for p in root_path.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not names:
            raise ConfigError(
                f"image folder {str(root_path)!r} has no class sub-folders; expected the layout "
                "root/<class>/<image>.png"
            )
    else:
        names = [str(n) for n in class_names]
        if not names:
            raise ConfigError("class_names is empty; give at least one class")
        if len(set(names)) != len(names):
            raise ConfigError(f"class_names has duplicates: {names}")
        for name in names:
            if not (root_path / name).is_dir():
                raise ConfigError(
                    f"class folder {str(root_path / name)!r} does not exist (class_names "
                    f"lists {name!r})"
                )

    tensors: list[torch.Tensor] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        files = sorted(p for p in (root_path / name).iterdir() if is_image(p))
        if not files:
            raise ConfigError(
                f"class folder {str(root_path / name)!r} has no images "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        for path in files:
            tensors.append(_load_resized(path, size))
            labels.append(label)
    label_tensor = torch.tensor(labels, dtype=torch.long)
    return ImageSet(
        images=torch.stack(tensors),
        labels=label_tensor,
        shapes=label_tensor.clone(),
        textures=label_tensor.clone(),
        split=root_path.name,
        class_names=names,
    )


_TRAILING_DIGITS = re.compile(r"\d+$")


def parse_cue_conflict_name(
    filename: str | os.PathLike[str], class_names: Sequence[str]
) -> tuple[int, int]:
    """Parse a Geirhos-style cue-conflict file name into ``(shape_index, texture_index)``.

    ``dog10-bird2.png`` (or ``dog/dog10-bird2.png``) is the shape of class ``dog`` with the
    texture of class ``bird``: the shape class is the part before the first '-', the texture
    class the part after it, each with trailing digits (and the extension) stripped. The indices
    are positions in ``class_names``. When the file sits in a folder named after a known class,
    that folder must agree with the shape class.
    """
    path = Path(filename)
    name = path.name
    stem = path.stem if path.suffix.lower() in IMAGE_EXTENSIONS else name
    index = {str(c): i for i, c in enumerate(class_names)}
    known = ", ".join(list(index)[:20]) + (", ..." if len(index) > 20 else "")
    if "-" not in stem:
        raise ConfigError(
            f"cue-conflict file {str(filename)!r} does not parse: expected "
            "'<shape class><n>-<texture class><n>.png', e.g. 'dog10-bird2.png'"
        )
    shape_part, texture_part = stem.split("-", 1)
    shape_name = _TRAILING_DIGITS.sub("", shape_part)
    texture_name = _TRAILING_DIGITS.sub("", texture_part)
    if not shape_name or not texture_name:
        raise ConfigError(
            f"cue-conflict file {str(filename)!r} does not parse: empty shape or texture class "
            "name (expected e.g. 'dog10-bird2.png')"
        )
    for role, cls in (("shape", shape_name), ("texture", texture_name)):
        if cls not in index:
            raise ConfigError(
                f"cue-conflict file {str(filename)!r}: unknown {role} class {cls!r}; "
                f"known classes: {known}"
            )
    folder = path.parent.name
    if folder in index and folder != shape_name:
        raise ConfigError(
            f"cue-conflict file {str(filename)!r} is in class folder {folder!r} but its name "
            f"says shape class {shape_name!r}"
        )
    return index[shape_name], index[texture_name]


def load_cue_conflict_folder(
    root: str | os.PathLike[str], size: int, class_names: Sequence[str]
) -> ImageSet:
    """Load cue-conflict images, flat (``root/dog10-bird2.png``) or in class folders
    (``root/dog/dog10-bird2.png``); shapes and textures come from the file names."""
    size = _check_size(size)
    root_path = check_dir(root, "cue-conflict folder")
    names = [str(c) for c in class_names]
    if not names:
        raise ConfigError("class_names is empty; give the class names the file names use")
    files = [p for p in root_path.iterdir() if is_image(p)]
    for sub in root_path.iterdir():
        if sub.is_dir() and not sub.name.startswith("."):
            files.extend(p for p in sub.iterdir() if is_image(p))
    files.sort(key=lambda p: p.relative_to(root_path).as_posix())
    if not files:
        raise ConfigError(
            f"cue-conflict folder {str(root_path)!r} has no images "
            f"({', '.join(IMAGE_EXTENSIONS)}) at its top level or in its sub-folders"
        )
    shapes: list[int] = []
    textures: list[int] = []
    tensors: list[torch.Tensor] = []
    for path in files:
        s, t = parse_cue_conflict_name(path.relative_to(root_path), names)
        shapes.append(s)
        textures.append(t)
        tensors.append(_load_resized(path, size))
    shape_tensor = torch.tensor(shapes, dtype=torch.long)
    return ImageSet(
        images=torch.stack(tensors),
        labels=shape_tensor,
        shapes=shape_tensor.clone(),
        textures=torch.tensor(textures, dtype=torch.long),
        split="cue_conflict",
        class_names=names,
        meta={"files": [p.relative_to(root_path).as_posix() for p in files]},
    )


# --------------------------------------------------------------------------------------------
# Shape bias
# --------------------------------------------------------------------------------------------


def _as_long_array(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ConfigError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ConfigError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    return array.astype(np.int64)


def shape_bias(pred: Any, shapes: Any, textures: Any) -> dict[str, Any]:
    """Shape bias of predictions on cue-conflict images (Geirhos et al. 2019).

    Only images whose shape and texture classes differ count. Over those images (pooled, not a
    mean of per-class ratios): shape_bias = shape_hits / (shape_hits + texture_hits), or None when
    no prediction matched either cue. ``pred`` may be class indices [n] or scores [n, classes]
    (argmax is taken). Returns shape_bias, shape_hits, texture_hits, other (predictions matching
    neither cue) and n (images counted).
    """
    if isinstance(pred, torch.Tensor) and pred.ndim == 2:
        pred = pred.argmax(dim=1)
    elif not isinstance(pred, torch.Tensor) and np.asarray(pred).ndim == 2:
        pred = np.asarray(pred).argmax(axis=1)
    p = _as_long_array(pred, "pred")
    s = _as_long_array(shapes, "shapes")
    t = _as_long_array(textures, "textures")
    if not (p.shape == s.shape == t.shape):
        raise ConfigError(
            f"pred, shapes and textures must have the same length, got {p.size}, {s.size}, {t.size}"
        )
    conflict = s != t
    shape_hits = int(np.sum((p == s) & conflict))
    texture_hits = int(np.sum((p == t) & conflict))
    n = int(np.sum(conflict))
    hits = shape_hits + texture_hits
    return {
        "shape_bias": shape_hits / hits if hits else None,
        "shape_hits": shape_hits,
        "texture_hits": texture_hits,
        "other": n - hits,
        "n": n,
    }
