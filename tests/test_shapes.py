"""The generated shape/texture world: determinism, label correctness, splits, preview."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from instill.errors import ConfigError
from instill.tasks.shapes import (
    MAX_CLASSES,
    SHAPE_NAMES,
    SPLITS,
    TEXTURE_NAMES,
    ImageSet,
    ShapeWorld,
    make_split,
    preview_grid,
)


@pytest.fixture(scope="module")
def world() -> ShapeWorld:
    return ShapeWorld(classes=MAX_CLASSES, size=32, rho=0.9)


def _object_means(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = masks.unsqueeze(1).float()
    inv = 1 - m
    obj = (images * m).sum((2, 3)) / m.sum((2, 3))
    bg = (images * inv).sum((2, 3)) / inv.sum((2, 3))
    return obj, bg


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"classes": 1}, "classes"),
        ({"classes": MAX_CLASSES + 1}, "classes"),
        ({"classes": 2.0}, "classes"),
        ({"size": 8}, "size"),
        ({"size": 1000}, "size"),
        ({"rho": 1.5}, "rho"),
        ({"rho": -0.1}, "rho"),
        ({"rho": math.nan}, "rho"),
    ],
)
def test_world_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"ShapeWorld.{field}"):
        ShapeWorld(**kwargs)


def test_make_split_validation(world: ShapeWorld) -> None:
    with pytest.raises(ConfigError, match="split"):
        make_split(world, "mosaic", 4, 0)
    with pytest.raises(ConfigError, match="n must"):
        make_split(world, "natural", 0, 0)
    with pytest.raises(ConfigError, match="shape_ids"):
        world.render(torch.tensor([world.classes]), torch.tensor([0]), torch.Generator())


def test_names_and_sizes() -> None:
    assert MAX_CLASSES >= 10
    assert len(set(SHAPE_NAMES)) == len(SHAPE_NAMES) >= MAX_CLASSES
    assert len(set(TEXTURE_NAMES)) == len(TEXTURE_NAMES) >= MAX_CLASSES
    w = ShapeWorld(classes=5)
    assert w.shape_names == list(SHAPE_NAMES[:5])
    assert w.texture_names == list(TEXTURE_NAMES[:5])
    for size in (32, 64):
        data = make_split(ShapeWorld(classes=4, size=size), "natural", 6, 0)
        assert isinstance(data, ImageSet)
        assert data.images.shape == (6, 3, size, size)
        assert data.images.dtype == torch.float32
        assert data.masks is not None and data.masks.shape == (6, size, size)
        assert data.images.min() >= 0.0 and data.images.max() <= 1.0
        image, label = data[0]
        assert image.shape == (3, size, size) and int(label) == int(data.shapes[0])
        assert len(data) == 6
        assert data.class_names == ShapeWorld(classes=4).shape_names


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("split", SPLITS)
def test_deterministic_from_seed(world: ShapeWorld, split: str) -> None:
    a = make_split(world, split, 64, seed=3)
    b = make_split(world, split, 64, seed=3)
    c = make_split(world, split, 64, seed=4)
    for name in ("images", "labels", "shapes", "textures", "masks"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.images, c.images)


def test_splits_of_one_seed_differ(world: ShapeWorld) -> None:
    a = make_split(world, "natural", 32, 0)
    b = make_split(world, "cue_conflict", 32, 0)
    assert a.poses is not None and b.poses is not None
    assert not torch.equal(a.poses, b.poses)


def test_shape_classes_balanced(world: ShapeWorld) -> None:
    data = make_split(world, "natural", 10 * world.classes + 3, 1)
    counts = torch.bincount(data.shapes, minlength=world.classes)
    assert counts.min() >= 10 and counts.max() <= 11
    assert torch.equal(data.labels, data.shapes)


# ----------------------------------------------------------------------------- labels


def test_mask_depends_on_shape_and_pose_only(world: ShapeWorld) -> None:
    k = world.classes
    shapes = torch.arange(k).repeat(3)
    gen = torch.Generator().manual_seed(0)
    poses = world.sample_poses(len(shapes), gen)
    tex_a = shapes.clone()
    tex_b = (shapes + 1) % k
    img_a, mask_a = world.render(shapes, tex_a, torch.Generator().manual_seed(5), poses=poses)
    img_b, mask_b = world.render(shapes, tex_b, torch.Generator().manual_seed(6), poses=poses)
    assert torch.equal(mask_a, mask_b)
    assert not torch.equal(img_a, img_b)
    # Same generator state without explicit poses: poses and masks are drawn identically.
    _, m1 = world.render(shapes, tex_a, torch.Generator().manual_seed(9))
    _, m2 = world.render(shapes, tex_b, torch.Generator().manual_seed(9))
    assert torch.equal(m1, m2)


def test_cue_conflict_mask_is_its_shape_label(world: ShapeWorld) -> None:
    data = make_split(world, "cue_conflict", 96, 2)
    assert data.masks is not None and data.poses is not None
    assert bool((data.shapes != data.textures).all())
    n, k = len(data), world.classes
    # Re-render every class's silhouette at each image's pose: exactly the labelled one matches.
    for cls in range(k):
        masks = world.masks(torch.full((n,), cls), data.poses)
        same = (masks == data.masks).flatten(1).all(1)
        assert torch.equal(same, data.shapes == cls), SHAPE_NAMES[cls]


def test_objects_inside_image_and_distinct_from_background(world: ShapeWorld) -> None:
    for split in SPLITS:
        data = make_split(world, split, 200, 7)
        assert data.masks is not None
        m = data.masks
        border = m[:, 0, :] | m[:, -1, :] | m[:, :, 0] | m[:, :, -1]
        assert not bool(border.any()), split
        assert bool((m.flatten(1).sum(1) >= 30).all()), split
        obj, bg = _object_means(data.images, m)
        gap = (obj - bg).abs().max(1).values
        assert float(gap.min()) > 0.15, split


def test_texture_statistics_identify_texture_class(world: ShapeWorld) -> None:
    """Object pixels' colour statistics identify the texture class (nearest centroid)."""
    k = world.classes

    def features(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        data = make_split(world, "cue_conflict", 40 * k, seed)
        assert data.masks is not None
        m = data.masks.unsqueeze(1).float()
        count = m.sum((2, 3))
        mean = (data.images * m).sum((2, 3)) / count
        var = ((data.images - mean[:, :, None, None]) ** 2 * m).sum((2, 3)) / count
        return torch.cat([mean, var.sqrt()], 1), data.textures, data.shapes

    train_x, train_y, _ = features(10)
    test_x, test_y, test_shapes = features(11)
    centroids = torch.stack([train_x[train_y == c].mean(0) for c in range(k)])
    pred = torch.cdist(test_x, centroids).argmin(1)
    accuracy = float((pred == test_y).float().mean())
    assert accuracy > 0.9
    # Texture ≠ shape in cue-conflict data, so these statistics say nothing of the shape label.
    assert float((pred == test_shapes).float().mean()) < 0.2


def test_same_shape_pose_different_textures_differ_inside_mask(world: ShapeWorld) -> None:
    n = 64
    shapes = torch.zeros(n, dtype=torch.long)
    poses = world.sample_poses(n, torch.Generator().manual_seed(1))
    for a, b in [(0, 1), (2, 3), (4, 7)]:
        img_a, mask = world.render(shapes, torch.full((n,), a), torch.Generator(), poses=poses)
        img_b, _ = world.render(shapes, torch.full((n,), b), torch.Generator(), poses=poses)
        mean_a, _ = _object_means(img_a, mask)
        mean_b, _ = _object_means(img_b, mask)
        assert float((mean_a - mean_b).abs().max(1).values.min()) > 0.1


# ----------------------------------------------------------------------------- splits


def test_shape_only_is_piecewise_constant(world: ShapeWorld) -> None:
    data = make_split(world, "shape_only", 100, 5)
    assert data.masks is not None
    images, masks = data.images, data.masks.unsqueeze(1).expand_as(data.images)
    for i in range(len(data)):
        inside = images[i][masks[i]].view(3, -1)
        outside = images[i][~masks[i]].view(3, -1)
        assert float((inside - inside[:, :1]).abs().max()) < 1e-6
        assert float((outside - outside[:, :1]).abs().max()) < 1e-6
        assert float((inside[:, 0] - outside[:, 0]).abs().max()) > 0.1
    # The fill colour carries no label: shape_only textures are independent of the shape.
    agree = float((data.shapes == data.textures).float().mean())
    assert agree < 0.3


@pytest.mark.parametrize("rho", [0.9, 0.5])
def test_natural_texture_agreement_close_to_rho(rho: float) -> None:
    w = ShapeWorld(classes=8, size=16, rho=rho)
    data = make_split(w, "natural", 4000, 0)
    agree = float((data.shapes == data.textures).float().mean())
    assert abs(agree - rho) < 0.03
    # Mismatched textures are spread over the other classes.
    off = data.textures[data.shapes != data.textures]
    assert torch.bincount(off, minlength=8).min() > 0


def test_cue_conflict_textures_cover_other_classes(world: ShapeWorld) -> None:
    data = make_split(world, "cue_conflict", 600, 0)
    k = world.classes
    pairs = torch.zeros(k, k, dtype=torch.long)
    pairs.index_put_((data.shapes, data.textures), torch.ones(600, dtype=torch.long), True)
    assert int(pairs.diagonal().sum()) == 0
    assert int((pairs > 0).sum()) > 0.8 * k * (k - 1)


# ----------------------------------------------------------------------------- preview


def test_preview_writes_png(tmp_path) -> None:
    out = preview_grid(ShapeWorld(classes=4), seed=0, path=tmp_path / "sub" / "p.png", per_split=3)
    assert out == tmp_path / "sub" / "p.png"
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.png"]  # no temp file left


def test_thread_count_restored_and_irrelevant(world: ShapeWorld) -> None:
    before = torch.get_num_threads()
    a = make_split(world, "shape_only", 16, 0)
    assert torch.get_num_threads() == before
    try:
        torch.set_num_threads(1)
        b = make_split(world, "shape_only", 16, 0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a.images, b.images)
