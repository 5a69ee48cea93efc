"""Real-data helpers: image folders, cue-conflict names, mean pooling, shape bias."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from instill.errors import ConfigError, FileFormatError
from instill.tasks.images import (
    ImageSet,
    load_cue_conflict_folder,
    load_image_folder,
    parse_cue_conflict_name,
    shape_bias,
)
from instill.tasks.meanpool import mean_pool_folder, mean_pool_image

CLASSES = ["bird", "cat", "dog"]


def _save(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 14)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[:] = colour
    array[: size[1] // 2, : size[0] // 2] = (255, 255, 255)
    Image.fromarray(array).save(path)


def _two_tone(size: int = 32, seed: int = 0) -> np.ndarray:
    """Left half reddish, right half bluish, plus pixel noise (many unique colours)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), dtype=np.float64)
    image[:, : size // 2] = (200, 40, 40)
    image[:, size // 2 :] = (30, 60, 210)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- folders


def test_load_image_folder(tmp_path: Path) -> None:
    _save(tmp_path / "dog" / "a.png", (0, 0, 200))
    _save(tmp_path / "dog" / "b.JPG", (0, 0, 200))
    _save(tmp_path / "cat" / "x.jpeg", (200, 0, 0))
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    data = load_image_folder(tmp_path, size=16)
    assert isinstance(data, ImageSet)
    assert data.class_names == ["cat", "dog"]
    assert data.images.shape == (3, 3, 16, 16) and data.images.dtype == torch.float32
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    assert data.labels.tolist() == [0, 1, 1]
    assert torch.equal(data.shapes, data.labels) and torch.equal(data.textures, data.labels)
    image, label = data[0]
    assert int(label) == 0 and image.shape == (3, 16, 16)
    # Bottom-right corner keeps the class colour (red for cat).
    assert float(image[0, -1, -1]) > 0.7 and float(image[2, -1, -1]) < 0.1


def test_load_image_folder_class_names_order_and_subset(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _save(tmp_path / name / "1.png", (10, 20, 30))
    data = load_image_folder(tmp_path, size=8, class_names=["c", "a"])
    assert data.class_names == ["c", "a"] and data.labels.tolist() == [0, 1]


def test_load_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_image_folder(tmp_path / "missing", size=8)
    with pytest.raises(ConfigError, match="no class sub-folders"):
        load_image_folder(tmp_path, size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty"):
        load_image_folder(tmp_path, size=8)
    _save(tmp_path / "empty" / "ok.png", (1, 2, 3))
    with pytest.raises(ConfigError, match="nope"):
        load_image_folder(tmp_path, size=8, class_names=["empty", "nope"])
    with pytest.raises(ConfigError, match="size"):
        load_image_folder(tmp_path, size=0)
    (tmp_path / "empty" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(FileFormatError, match=r"broken\.png"):
        load_image_folder(tmp_path, size=8)


# ----------------------------------------------------------------------------- cue conflict


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dog10-bird2.png", (2, 0)),
        ("cat1-dog1.jpg", (1, 2)),
        ("bird3-bird7.png", (0, 0)),
        ("dog/dog10-cat2.png", (2, 1)),
        (Path("data") / "cat" / "cat4-dog12.JPEG", (1, 2)),
        ("elsewhere/bird1-cat2.png", (0, 1)),
        ("dog-cat", (2, 1)),
    ],
)
def test_parse_cue_conflict_name_good(name: str | Path, expected: tuple[int, int]) -> None:
    assert parse_cue_conflict_name(name, CLASSES) == expected


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("dog10.png", "dog10.png.*does not parse"),
        ("10-2.png", "does not parse"),
        ("-bird2.png", "does not parse"),
        ("dog10-.png", "does not parse"),
        ("horse1-dog2.png", "horse1-dog2.png.*unknown shape class 'horse'"),
        ("dog1-horse2.png", "unknown texture class 'horse'"),
        ("cat/dog1-bird2.png", "class folder 'cat'"),
    ],
)
def test_parse_cue_conflict_name_bad(name: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_cue_conflict_name(name, CLASSES)


@pytest.mark.parametrize("layout", ["flat", "folders"])
def test_load_cue_conflict_folder(tmp_path: Path, layout: str) -> None:
    names = ["dog1-cat1.png", "cat2-bird1.png", "bird5-dog3.png", "dog2-dog4.png"]
    for name in names:
        sub = name.split("-")[0].rstrip("0123456789") if layout == "folders" else ""
        _save(tmp_path / sub / name, (50, 100, 150))
    data = load_cue_conflict_folder(tmp_path, size=12, class_names=CLASSES)
    assert data.images.shape == (4, 3, 12, 12)
    got = {
        Path(f).name: (int(s), int(t))
        for f, s, t in zip(data.meta["files"], data.shapes, data.textures, strict=True)
    }
    assert got == {
        "dog1-cat1.png": (2, 1),
        "cat2-bird1.png": (1, 0),
        "bird5-dog3.png": (0, 2),
        "dog2-dog4.png": (2, 2),
    }
    assert torch.equal(data.labels, data.shapes)
    assert data.split == "cue_conflict"


def test_load_cue_conflict_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no images"):
        load_cue_conflict_folder(tmp_path, 8, CLASSES)
    _save(tmp_path / "cow1-dog1.png", (1, 1, 1))
    with pytest.raises(ConfigError, match=r"cow1-dog1\.png"):
        load_cue_conflict_folder(tmp_path, 8, CLASSES)


# ----------------------------------------------------------------------------- mean pooling


@pytest.mark.parametrize("method", ["slic", "felzenszwalb"])
def test_mean_pool_image_piecewise_constant(method: str) -> None:
    image = _two_tone()
    pooled = mean_pool_image(image, method=method, n_segments=8)
    assert pooled.shape == image.shape and pooled.dtype == np.uint8
    colours_in = np.unique(image.reshape(-1, 3), axis=0)
    colours_out = np.unique(pooled.reshape(-1, 3), axis=0)
    assert len(colours_out) < len(colours_in) / 20
    assert len(colours_out) <= 32
    # Each output colour is a segment mean: close to the half it lies in, and noise is gone.
    assert np.abs(pooled[:, :14].astype(int) - (200, 40, 40)).max() < 20
    assert np.abs(pooled[:, 18:].astype(int) - (30, 60, 210)).max() < 20
    # Piecewise constant: most neighbouring pixels share their colour.
    same = (pooled[:, 1:] == pooled[:, :-1]).all(-1)
    assert same.mean() > 0.8


def test_mean_pool_image_flat_image_unchanged() -> None:
    image = np.full((16, 16, 3), (12, 34, 56), dtype=np.uint8)
    assert np.array_equal(mean_pool_image(image, n_segments=4), image)


def test_mean_pool_image_errors() -> None:
    with pytest.raises(ConfigError, match="HxWx3"):
        mean_pool_image(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ConfigError, match="uint8"):
        mean_pool_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ConfigError, match="method"):
        mean_pool_image(np.zeros((4, 4, 3), dtype=np.uint8), method="sam")
    with pytest.raises(ConfigError, match="n_segments"):
        mean_pool_image(np.zeros((4, 4, 3), dtype=np.uint8), n_segments=0)


def test_mean_pool_folder_mirrors_and_resumes(tmp_path: Path) -> None:
    src, dst = tmp_path / "in", tmp_path / "out"
    for rel, seed in [("dog/a.png", 0), ("dog/b.png", 1), ("cat/c.png", 2), ("top.png", 3)]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_two_tone(24, seed)).save(src / rel)
    (src / "cat" / "readme.txt").write_text("not an image")

    assert mean_pool_folder(src, dst, method="slic", n_segments=8, progress=False) == 4
    outputs = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert outputs == ["cat/c.png", "dog/a.png", "dog/b.png", "top.png"]
    with Image.open(dst / "dog" / "a.png") as im:
        out = np.asarray(im.convert("RGB"))
    assert out.shape == (24, 24, 3)
    assert len(np.unique(out.reshape(-1, 3), axis=0)) <= 32

    # Existing outputs are skipped (resumable): a sentinel survives, only the gap is filled.
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(dst / "dog" / "a.png")
    (dst / "cat" / "c.png").unlink()
    assert mean_pool_folder(src, dst, n_segments=8, progress=False) == 1
    with Image.open(dst / "dog" / "a.png") as im:
        assert im.size == (2, 2)
    assert (dst / "cat" / "c.png").exists()
    assert mean_pool_folder(src, dst, n_segments=8, progress=False) == 0
    assert not [p for p in dst.rglob(".*")]  # no temp files left


def test_mean_pool_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        mean_pool_folder(tmp_path / "missing", tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="no images"):
        mean_pool_folder(tmp_path, tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="differ"):
        mean_pool_folder(tmp_path, tmp_path, progress=False)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(FileFormatError, match=r"bad\.png"):
        mean_pool_folder(tmp_path, tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------- shape bias


def test_shape_bias_hand_made() -> None:
    shapes = [0, 1, 2, 3, 4, 5]
    textures = [1, 2, 3, 4, 0, 5]  # the last image has shape == texture: excluded
    pred = [0, 1, 2, 4, 3, 5]  # 3 shape hits, 1 texture hit, 1 other
    result = shape_bias(pred, shapes, textures)
    assert result == {
        "shape_bias": 0.75,
        "shape_hits": 3,
        "texture_hits": 1,
        "other": 1,
        "n": 5,
    }


def test_shape_bias_pools_over_images_and_accepts_tensors_and_logits() -> None:
    # Class 0: 1 shape hit of 1; class 1: 1 shape hit and 3 texture hits. Pooled: 2 / 5.
    shapes = torch.tensor([0, 1, 1, 1, 1])
    textures = torch.tensor([2, 0, 0, 0, 0])
    pred = torch.tensor([0, 1, 0, 0, 0])
    assert shape_bias(pred, shapes, textures)["shape_bias"] == pytest.approx(0.4)
    logits = torch.nn.functional.one_hot(pred, 3).float()
    assert shape_bias(logits, shapes, textures) == shape_bias(pred, shapes, textures)


def test_shape_bias_no_hits_and_errors() -> None:
    result = shape_bias([2, 2], [0, 1], [1, 0])
    assert result["shape_bias"] is None and result["other"] == 2 and result["n"] == 2
    assert shape_bias([], [], [])["n"] == 0
    with pytest.raises(ConfigError, match="same length"):
        shape_bias([0, 1], [0], [1])
