"""Mean pooling (texture removal): each superpixel (SLIC or Felzenszwalb, from scikit-image)
replaced by its mean colour, a stand-in for the paper's SAM-based "mean-pooled" ImageNet, where
texture is gone and shape remains."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from instill.errors import ConfigError
from instill.storage import atomic_path
from instill.tasks.images import IMAGE_EXTENSIONS, check_dir, is_image, read_rgb

SEGMENTATION_METHODS = ("slic", "felzenszwalb")


def mean_pool_image(
    image: np.ndarray,
    method: str = "slic",
    n_segments: int = 64,
    *,
    compactness: float = 10.0,
    scale: float = 100.0,
    sigma: float = 0.5,
) -> np.ndarray:
    """Replace every segment of an HxWx3 uint8 image by its mean colour; same shape and dtype.

    method "slic": scikit-image SLIC superpixels, about ``n_segments`` of them (``compactness``
    trades colour similarity for square-ness). method "felzenszwalb": graph-based segmentation
    with ``scale`` and ``sigma``; its minimum segment size is H*W / (2 * n_segments), so
    ``n_segments`` bounds the segment count there too.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ConfigError(f"mean_pool_image needs an HxWx3 uint8 array, got shape {shape}")
    if image.dtype != np.uint8:
        raise ConfigError(f"mean_pool_image needs a uint8 array, got dtype {image.dtype}")
    if method not in SEGMENTATION_METHODS:
        raise ConfigError(
            f"method must be one of {', '.join(SEGMENTATION_METHODS)}, got {method!r}"
        )
    if isinstance(n_segments, bool) or not isinstance(n_segments, int) or n_segments < 1:
        raise ConfigError(f"n_segments must be a positive integer, got {n_segments!r}")
    from skimage import segmentation

    h, w = image.shape[:2]
    if method == "slic":
        segments = segmentation.slic(
            image,
            n_segments=n_segments,
            compactness=compactness,
            sigma=sigma,
            start_label=0,
            channel_axis=-1,
        )
    else:
        min_size = max(1, (h * w) // (2 * n_segments))
        segments = segmentation.felzenszwalb(
            image, scale=scale, sigma=sigma, min_size=min_size, channel_axis=-1
        )
    _, segments = np.unique(segments.ravel(), return_inverse=True)
    counts = np.bincount(segments, minlength=1).astype(np.float64)
    flat = image.reshape(-1, 3).astype(np.float64)
    means = np.stack([np.bincount(segments, weights=flat[:, c]) / counts for c in range(3)], axis=1)
    pooled = np.clip(np.rint(means), 0, 255).astype(np.uint8)[segments]
    return pooled.reshape(image.shape)


def _atomic_save(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format=fmt, **kwargs)


def mean_pool_folder(
    in_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    method: str = "slic",
    n_segments: int = 64,
    progress: bool = True,
) -> int:
    """Mean-pool every image under ``in_dir`` into the same relative path under ``out_dir``.

    Files that already exist in ``out_dir`` are skipped (so an interrupted run resumes); each
    output is written atomically. Returns the number of images written by this call.
    """
    from tqdm.auto import tqdm

    src = check_dir(in_dir, "input folder").resolve()
    dst = Path(out_dir).resolve()
    if dst == src:
        raise ConfigError(f"out_dir must differ from in_dir ({str(src)!r})")
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"out_dir {str(dst)!r} exists and is not a directory")
    files = sorted(p for p in src.rglob("*") if is_image(p) and not p.is_relative_to(dst))
    if not files:
        raise ConfigError(
            f"input folder {str(src)!r} has no images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    written = 0
    for path in tqdm(files, desc="mean-pool", unit="img", disable=not progress):
        target = dst / path.relative_to(src)
        if target.exists():
            continue
        pooled = mean_pool_image(read_rgb(path), method=method, n_segments=n_segments)
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(pooled, target)
        written += 1
    return written


__all__ = ["SEGMENTATION_METHODS", "mean_pool_folder", "mean_pool_image"]
