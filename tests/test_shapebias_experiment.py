"""The shape-bias pipeline end to end on tiny runs, resuming, real folders, and its command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from instill.cli import main
from instill.core import Subnetwork
from instill.errors import ConfigError
from instill.experiments import shapebias as sb
from instill.experiments import shapebias_report as sbr
from instill.experiments.shapebias import (
    SHAPE_CONDITIONS,
    AugmentConfig,
    capped_complement,
    load_config,
    load_data,
    run_shapebias,
    shape_preserving_augment,
)
from instill.tasks.shapes import ShapeWorld, make_split

torch.set_num_threads(1)

TINY = {
    "classes": 3, "size": 16,
    "resnet": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]},
    "vit": {"patch_size": 4, "hidden_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 32},
    "seeds": 1, "base_samples": 120, "base_val": 30,
    "base_fit": {"epochs": 2, "batch_size": 32, "patience": None},
    "discovery_samples": 90,
    "discovery": {"epochs": 2, "batch_size": 32, "lr": 0.1, "mask": {"l0_lambda": 1e-4}},
    "grid": [12, 24], "induction_fit": {"epochs": 1, "batch_size": 8},
    "induction_min_examples": 0, "n_val": 30, "n_test": 30, "n_eval": 30,
}
QUIET = {"log": lambda _: None}


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shape")
    cfg = load_config("quick", TINY)
    summary = run_shapebias(cfg, out, **QUIET)
    return cfg, out, summary


def test_tiny_run_writes_every_output_well_formed(tiny_run):
    cfg, out, summary = tiny_run
    for name in ("config.json", "base/model.safetensors", "base/model.json",
                 "base/random_init.safetensors", "subnetworks/trained.safetensors",
                 "subnetworks/random_init.safetensors", "verify.json", "results.csv",
                 "summary.json", "shape_bias.png", "examples.png", "augmentation.png",
                 "report.md", "manifest.json", "cells/n12-s0.json", "cells/n24-s0.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("shape_bias.png", "examples.png", "augmentation.png"):
        width, height = _png_size(out / name)
        assert width > 300 and height > 150, name

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * len(SHAPE_CONDITIONS)  # grid x conditions x seeds, none skipped
    assert [r["condition"] for r in rows[:7]] == list(SHAPE_CONDITIONS)
    assert {r["n"] for r in rows} == {"12", "24"} and {r["arch"] for r in rows} == {"resnet"}
    for r in rows:
        assert 0 <= float(r["natural_accuracy"]) <= 1 and 0 <= float(r["shape_only_accuracy"]) <= 1
        hits = int(r["shape_hits"]) + int(r["texture_hits"])
        assert hits + int(r["other"]) == int(r["cue_conflict_n"]) == 30
        if hits:
            assert float(r["shape_bias"]) == pytest.approx(int(r["shape_hits"]) / hits, abs=1e-6)
        assert int(r["epochs"]) == 1

    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert set(saved["by_condition"]) == set(SHAPE_CONDITIONS)
    random = [r for r in rows if r["condition"] == "random" and r["shape_bias"]]
    assert saved["by_condition"]["random"]["per_n"]["12"]["shape_bias"] == pytest.approx(
        float(random[0]["shape_bias"]), abs=1e-6)
    assert set(saved["by_condition"]["subnet"]["per_n"]) == {"12", "24"}
    assert saved["anchors"] == {"ImageNet ResNet-50": 0.22, "Stylized-ImageNet ResNet-50": 0.81,
                                "humans": 0.96}
    assert saved["data"]["sizes"]["base_train"] == 120 and saved["data"]["sizes"]["pool"] == 24
    assert saved["headline"].startswith("Subtask Induction ")
    assert saved["paired"]["pairs"] == 2

    verify = json.loads((out / "verify.json").read_text())
    assert set(verify) == {"trained", "random_init"}
    for v in verify.values():
        assert set(v["accuracy"]) == {"full model", "subnetwork only", "subnetwork ablated",
                                      "random same-size ablated"}
        assert set(v["accuracy"]["full model"]) == {"shape_only", "natural", "shape_bias"}
        assert 0 < v["density"] < 0.3
        assert max(v["per_layer_density"].values()) < 0.5  # room for a same-size complement
    base = json.loads((out / "base/model.json").read_text())
    assert {"natural_accuracy", "shape_only_accuracy", "shape_bias", "history"} <= set(base)
    assert saved["base_model"]["natural_accuracy"] == base["natural_accuracy"]

    recorded = json.loads((out / "config.json").read_text())
    assert recorded["config"]["classes"] == 3 and recorded["config"]["arch"] == "resnet"
    assert recorded["seed"] == cfg.seed and "torch" in recorded["packages"]
    report = (out / "report.md").read_text()
    for needle in ("# Subtask Induction: shape bias (resnet)", saved["headline"],
                   "## Verification of the shape subnetwork", "| Subtask Induction |",
                   "shape_bias.png", "examples.png", "`classes`: 3 (paper preset: 12)"):
        assert needle in report, needle
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert {"results.csv", "summary.json", "shape_bias.png", "report.md"} <= set(manifest)


def test_rerun_resumes_without_retraining(tiny_run, monkeypatch):
    cfg, out, _ = tiny_run
    before = (out / "results.csv").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("finished work was recomputed")

    monkeypatch.setattr(sb, "fit", no_training)
    monkeypatch.setattr(sb, "discover", no_training)
    run_shapebias(cfg, out, **QUIET)
    assert (out / "results.csv").read_text() == before


def test_missing_cell_is_recomputed_identically_and_others_are_not(tiny_run, monkeypatch):
    cfg, out, _ = tiny_run
    before = (out / "results.csv").read_text()
    (out / "cells/n24-s0.json").unlink()
    calls = []
    real_fit = sb.fit

    def counting_fit(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(sb, "fit", counting_fit)
    run_shapebias(cfg, out, **QUIET)
    assert sorted(calls) == sorted(f"{c} n=24 s0" for c in cfg.conditions)
    assert (out / "results.csv").read_text() == before  # same seeds -> same numbers


def test_changed_config_in_the_same_directory_is_refused(tiny_run):
    _, out, _ = tiny_run
    with pytest.raises(ConfigError, match="rho"):
        run_shapebias(load_config("quick", {**TINY, "rho": 0.5}), out, **QUIET)


def test_capped_complement_stays_outside_and_caps_dense_layers():
    masks = {"a": torch.tensor([True, True, True, False]),  # 3 kept, 1 outside: capped
             "b": torch.tensor([True, False, False, False, False, False])}
    sub = Subnetwork(masks, {"a": (4,), "b": (6,)})
    comp, note = capped_complement(sub, torch.Generator().manual_seed(0))
    assert torch.equal(comp.masks["a"], torch.tensor([False, False, False, True]))
    assert int(comp.masks["b"].sum()) == 1 and not bool(comp.masks["b"][0])
    assert "capped layers: a 1 of 3" in note and "b" not in note.split(";")[0]


def test_augmentation_keeps_the_silhouette_and_scrambles_colour():
    world = ShapeWorld(classes=4, size=32, rho=1.0)
    data = make_split(world, "natural", 64, seed=3)
    cfg = AugmentConfig(blur=0.0, noise=0.0)
    out = shape_preserving_augment(data.images, torch.Generator().manual_seed(0), cfg)
    again = shape_preserving_augment(data.images, torch.Generator().manual_seed(0), cfg)
    assert out.shape == data.images.shape and torch.equal(out, again)
    assert out.min() >= 0 and out.max() <= 1
    m = data.masks.unsqueeze(1).float()

    def contrast(x):
        obj = (x * m).sum((2, 3)) / m.sum((2, 3))
        bg = (x * (1 - m)).sum((2, 3)) / (1 - m).sum((2, 3))
        return (obj - bg).abs().sum(1), obj

    before, obj_before = contrast(data.images)
    after, obj_after = contrast(out)
    # Pixel-wise maps applied to whole images: the object still stands out from its background.
    assert (after > 0.5 * before.clamp(max=0.3)).all()
    # ...but the object colour of one texture class no longer identifies it.
    cls0 = data.textures == 0
    assert obj_before[cls0].std(0).max() < 0.08
    assert obj_after[cls0].std(0).max() > 0.2
    noisy = shape_preserving_augment(data.images, torch.Generator().manual_seed(0),
                                     AugmentConfig())
    assert not torch.equal(noisy, out)


def _write_png(path: Path, image: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


def _write_folders(root: Path, classes: int = 3, per_class: int = 14) -> dict[str, Path]:
    world = ShapeWorld(classes=classes, size=16, rho=0.9)
    names = world.shape_names
    dirs = {k: root / k for k in ("train", "shape", "cue")}
    natural = make_split(world, "natural", classes * per_class, seed=11)
    for i in range(len(natural)):
        _write_png(dirs["train"] / names[int(natural.labels[i])] / f"{i}.png", natural.images[i])
    shapes = make_split(world, "shape_only", classes * 4, seed=12)
    for i in range(len(shapes)):
        _write_png(dirs["shape"] / names[int(shapes.labels[i])] / f"{i}.png", shapes.images[i])
    cue = make_split(world, "cue_conflict", 9, seed=13)
    for i in range(len(cue)):
        s, t = names[int(cue.shapes[i])], names[int(cue.textures[i])]
        _write_png(dirs["cue"] / f"{s}{i}-{t}{i}.png", cue.images[i])
    return dirs


def test_real_folder_mode_reads_the_folders(tmp_path):
    dirs = _write_folders(tmp_path / "data")
    overrides = {"train_dir": str(dirs["train"]), "shape_dir": str(dirs["shape"]),
                 "cue_conflict_dir": str(dirs["cue"]), "conditions": ["subnet", "random"],
                 "grid": [10, 30]}
    cfg = load_config("quick", TINY, overrides)
    data = load_data(cfg)
    assert data.class_names == ["disk", "square", "triangle"]
    assert len(data.val) + len(data.test) == round(0.2 * 42) and data.pool_size == 42 - 8
    assert len(data.shape_eval) + len(data.shape_train) == 12 and len(data.cue_conflict) == 9
    assert (data.cue_conflict.shapes != data.cue_conflict.textures).all()
    first, second = data.pool(0), data.pool(1)
    assert len(first) == 34 and not torch.equal(first.labels, second.labels)

    out = tmp_path / "run"
    summary = run_shapebias(cfg, out, **QUIET)
    assert summary["data"]["sources"] == {"natural": str(dirs["train"]),
                                          "shape_only": str(dirs["shape"]),
                                          "cue_conflict": str(dirs["cue"])}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["n"], r["condition"]) for r in rows] == [
        ("10", "subnet"), ("10", "random"), ("30", "subnet"), ("30", "random")]
    assert all(int(r["cue_conflict_n"]) == 9 for r in rows)
    assert _png_size(out / "examples.png")[0] > 300
    assert str(dirs["train"]) in (out / "report.md").read_text()

    too_many = load_config("quick", TINY, {**overrides, "grid": [35]})
    with pytest.raises(ConfigError, match="only 34 are available"):
        load_data(too_many)


def test_real_classes_other_than_the_world_need_their_own_shape_folder(tmp_path):
    for name in ("cat", "dog"):
        for i in range(5):
            _write_png(tmp_path / "train" / name / f"{i}.png", torch.rand(3, 16, 16))
    cfg = load_config("quick", TINY, {"train_dir": str(tmp_path / "train")})
    with pytest.raises(ConfigError, match="give --shape-dir"):
        load_data(cfg)


@pytest.mark.parametrize(("args", "message"), [
    (["--arch", "cnn"], "unknown --arch 'cnn'"),
    (["--train-dir", "/no/such/dir"], "--train-dir '/no/such/dir' does not exist"),
    (["--grid", "10,x"], "--grid takes comma-separated integers"),
    (["--conditions", "subnet,magic"], "unknown conditions ['magic']"),
    (["--rho", "1.5"], "ShapeWorld.rho"),
])
def test_bad_command_line_input_is_one_clear_line(tmp_path, args, message):
    result = CliRunner().invoke(main, ["shapebias", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r" / "base").exists()


def test_cli_runs_a_tiny_vit_from_a_config_file(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "grid": [12], "conditions": ["subnet", "random"]}))
    out = tmp_path / "vit"
    result = CliRunner().invoke(main, ["shapebias", "--preset", "quick", "--config", str(config),
                                       "--arch", "vit", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Subtask Induction" in result.output and "report.md" in result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["arch"], r["condition"]) for r in rows] == [("vit", "subnet"), ("vit", "random")]
    assert json.loads((out / "config.json").read_text())["config"]["vit"]["patch_size"] == 4


def test_shapes_preview_command_writes_a_png(tmp_path):
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(main, ["shapes", "preview", "--out", str(out), "--classes", "4",
                                       "--size", "32", "--seed", "1", "--per-split", "3"])
    assert result.exit_code == 0, result.output
    width, height = _png_size(out)
    assert width > 200 and height > 200
    bad = CliRunner().invoke(main, ["shapes", "preview", "--out", str(out), "--classes", "40"])
    assert bad.exit_code == 2 and "ShapeWorld.classes" in bad.output


def test_meanpool_command_mirrors_the_folder(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "in" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
            tmp_path / "in" / name / "x.png")
    result = CliRunner().invoke(main, ["meanpool", str(tmp_path / "in"), str(tmp_path / "out"),
                                       "--method", "felzenszwalb", "--segments", "4"])
    assert result.exit_code == 0, result.output
    assert "wrote 2 image(s)" in result.output
    for name in ("a", "b"):
        pooled = np.asarray(Image.open(tmp_path / "out" / name / "x.png"))
        assert pooled.shape == (24, 24, 3)
        assert len(np.unique(pooled.reshape(-1, 3), axis=0)) < 24 * 24 / 4  # piecewise constant
    missing = CliRunner().invoke(main, ["meanpool", str(tmp_path / "nope"), str(tmp_path / "o")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_presets_and_config_checks():
    quick = load_config("quick")
    assert (quick.classes, quick.size, quick.seeds, quick.grid) == (8, 32, 2, [250, 1000])
    assert quick.discovery.mask.l0_lambda == 1e-5 and quick.conditions == list(SHAPE_CONDITIONS)
    assert quick.epochs_for(250) == 48 and quick.epochs_for(2000) == 10
    paper = load_config("paper")
    assert paper.discovery.mask.l0_lambda == 1e-8 and paper.discovery.epochs == 100
    assert (paper.induction_fit.optimizer, paper.induction_fit.lr) == ("sgd", 1e-3)
    assert load_config("quick", {"rho": 0.5}, {"arch": "vit"}).arch == "vit"
    with pytest.raises(ConfigError, match="patch_size"):
        load_config("quick", {"size": 30}, {"arch": "vit"})
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")
    with pytest.raises(ConfigError, match="grid"):
        load_config("quick", {"grid": [0, 10]})


@pytest.mark.parametrize(("subnet", "verb"), [
    ([0.5, 0.6], "raised"), ([0.5, 0.1], "did not consistently raise"),
    ([0.1, 0.1], "did not raise")])
def test_headline_says_raised_only_when_every_paired_run_agrees(subnet, verb):
    cfg = load_config("quick", {"conditions": ["subnet", "random"], "grid": [10, 20],
                                "seeds": 1})
    rows = [{"condition": c, "n": n, "seed": 0, "shape_bias": b, "natural_accuracy": 0.9,
             "shape_only_accuracy": 0.3}
            for n, s in zip((10, 20), subnet, strict=True)
            for c, b in (("subnet", s), ("random", 0.2))]
    verify = {"trained": {"density": 0.1}}
    summary = sbr.summarize(cfg, rows, verify, {"shape_bias": 0.3}, {})
    assert summary["paired"] == {"pairs": 2, "subnet_higher": sum(s > 0.2 for s in subnet)}
    assert summary["headline"].startswith(f"Subtask Induction {verb} the shape bias")
    assert f"{sum(subnet) / 2:.2f} against 0.20" in summary["headline"]
