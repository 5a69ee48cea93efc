"""The shape-bias pipeline end to end on tiny runs: replicated pipelines, gates, resuming,
worker processes, real folders, the decided headline, and its command line."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from instill import stats
from instill.cli import main
from instill.core import Subnetwork
from instill.errors import ConfigError
from instill.experiments import shapebias as sb
from instill.experiments import shapebias_report as sbr
from instill.experiments.pipeline import GateError, derive_seed
from instill.experiments.shapebias import (
    SHAPE_CONDITIONS,
    capped_complement,
    load_config,
    run_shapebias,
)
from instill.experiments.shapebias_data import load_data
from instill.tasks.shape_task import AugmentConfig, shape_preserving_augment
from instill.tasks.shapes import ShapeWorld, make_split

torch.set_num_threads(1)

# Gates that always pass: a model this small learns little (the gate tests set their own).
OPEN_GATES = {"natural_accuracy": 0.0, "texture_bias": 0.0, "subnetwork_accuracy": 0.0,
              "ablation_margin": -1.0}
TINY = {
    "classes": 3, "size": 16,
    "resnet": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]},
    "vit": {"patch_size": 4, "hidden_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 32},
    "replicates": 2, "seeds": 1, "gates": OPEN_GATES, "base_samples": 120, "base_val": 30,
    "base_fit": {"epochs": 2, "batch_size": 32, "patience": None},
    "discovery_samples": 90,
    "discovery": {"epochs": 2, "batch_size": 32, "lr": 0.1, "mask": {"l0_lambda": 3e-4}},
    "grid": [12, 24], "induction_fit": {"epochs": 1, "batch_size": 8},
    "induction_min_examples": 0, "n_val": 30, "n_test": 30, "n_eval": 30,
}
QUIET = {"log": lambda _: None}
GATE_NAMES = ["base natural accuracy", "base texture bias", "subnetwork alone on shape_only",
              "ablation specificity"]


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
    per_attempt = ("base.safetensors", "base.json", "subnetwork.safetensors", "subnetwork.json",
                   "verify.json", "random_init.safetensors",
                   "random_init_subnetwork.safetensors", "random_init_verify.json")
    names = ["config.json", "verify.json", "results.csv", "summary.json", "shape_bias.png",
             "examples.png", "augmentation.png", "report.md", "manifest.json",
             *[f"pipelines/r{r}/a0/{name}" for r in (0, 1) for name in per_attempt],
             *[f"pipelines/r{r}/attempts.json" for r in (0, 1)],
             *[f"cells/r{r}-a0-n{n}-s0.json" for r in (0, 1) for n in (12, 24)]]
    for name in names:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in (out / "cells").iterdir()) == [
        "r0-a0-n12-s0.json", "r0-a0-n24-s0.json", "r1-a0-n12-s0.json", "r1-a0-n24-s0.json"]
    for name in ("shape_bias.png", "examples.png", "augmentation.png"):
        width, height = _png_size(out / name)
        assert width > 300 and height > 150, name

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * 2 * len(SHAPE_CONDITIONS)  # replicates x grid x conditions x seeds
    assert [r["condition"] for r in rows[:7]] == list(SHAPE_CONDITIONS)
    assert {r["n"] for r in rows} == {"12", "24"} and {r["arch"] for r in rows} == {"resnet"}
    assert [r["replicate"] for r in rows] == ["0"] * 14 + ["1"] * 14
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
    random = [float(r["shape_bias"]) for r in rows
              if r["condition"] == "random" and r["n"] == "12" and r["shape_bias"]]
    per_n = saved["by_condition"]["random"]["per_n"]["12"]["shape_bias"]
    assert per_n["mean"] == pytest.approx(statistics.fmean(random), abs=1e-6)
    assert per_n["n"] == len(random) and per_n["low"] <= per_n["mean"] <= per_n["high"]
    assert set(saved["by_condition"]["subnet"]["per_n"]) == {"12", "24"}
    subnet = saved["by_condition"]["subnet"]
    assert set(subnet["per_replicate"]) == {"r0", "r1"}
    assert subnet["natural_accuracy"]["mean"] == pytest.approx(statistics.fmean(
        float(r["natural_accuracy"]) for r in rows if r["condition"] == "subnet"), abs=1e-6)
    assert saved["anchors"] == {"ImageNet ResNet-50": 0.22, "Stylized-ImageNet ResNet-50": 0.81,
                                "humans": 0.96}
    assert saved["data"]["sizes"]["base_train"] == 120 and saved["data"]["sizes"]["pool"] == 24
    assert saved["headline"].startswith("Subtask Induction's shape bias on cue-conflict images")
    assert "over 2 replicate pipelines" in saved["headline"]
    for metric in ("shape_bias", "natural_accuracy"):
        versus = saved["subnet_vs"][metric]
        assert set(versus) == set(SHAPE_CONDITIONS) - {"subnet"}
        for p in versus.values():
            assert p["n"] == 2 and p["p_adjusted"] >= p["p_value"]
            assert p["decision"] in ("better", "worse", "indistinguishable")
    assert saved["gates_overridden"] == [] and set(saved["gates"]) == {"r0", "r1"}

    for r in (0, 1):
        attempts = json.loads((out / f"pipelines/r{r}/attempts.json").read_text())
        assert (attempts["attempt"], attempts["overridden"]) == (0, False)
        assert [g["name"] for g in attempts["attempts"][0]["gates"]] == GATE_NAMES
        assert attempts == saved["gates"][f"r{r}"]
    verify = json.loads((out / "verify.json").read_text())
    assert set(verify) == {"r0", "r1"}
    for kinds in verify.values():
        assert set(kinds) == {"trained", "random_init"}
        for v in kinds.values():
            assert set(v["accuracy"]) == {"full model", "subnetwork only", "subnetwork ablated",
                                          "random same-size ablated"}
            assert set(v["accuracy"]["full model"]) == {"shape_only", "natural", "shape_bias"}
            assert 0 < v["density"] < 0.3
            assert max(v["per_layer_density"].values()) < 0.5  # room for a same-size complement
    bases = [json.loads((out / f"pipelines/r{r}/a0/base.json").read_text()) for r in (0, 1)]
    for r, base in enumerate(bases):
        assert {"natural_accuracy", "shape_only_accuracy", "shape_bias", "history"} <= set(base)
        assert base["seed"] == derive_seed(cfg.seed, "base", r, 0)  # each replicate its own
        assert saved["base_models"][f"r{r}"]["natural_accuracy"] == base["natural_accuracy"]
    assert saved["base_model"]["natural_accuracy"]["mean"] == pytest.approx(
        statistics.fmean(b["natural_accuracy"] for b in bases))

    recorded = json.loads((out / "config.json").read_text())
    assert recorded["config"]["classes"] == 3 and recorded["config"]["arch"] == "resnet"
    assert recorded["seed"] == cfg.seed and "torch" in recorded["packages"]
    report = (out / "report.md").read_text()
    for needle in ("# Subtask Induction: shape bias (resnet)", saved["headline"],
                   "## Gates", "| r1 | 0 | base natural accuracy", "## Base models",
                   "## Verification of the shape subnetwork", "| Subtask Induction |",
                   "| Subtask Induction - random init |", "shape_bias.png", "examples.png",
                   "`classes`: 3 (paper preset: 12)", "`replicates`: 2 (paper preset: 3)"):
        assert needle in report, needle
    assert "WARNING" not in report
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert {"results.csv", "summary.json", "shape_bias.png", "report.md",
            "pipelines/r1/attempts.json", "pipelines/r1/a0/base.safetensors",
            "cells/r1-a0-n24-s0.json"} <= set(manifest)


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
    (out / "cells/r1-a0-n24-s0.json").unlink()
    calls = []
    real_fit = sb.fit

    def counting_fit(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(sb, "fit", counting_fit)
    monkeypatch.setattr(sb, "discover", lambda *a, **k: pytest.fail("rediscovered"))
    run_shapebias(cfg, out, **QUIET)
    assert sorted(calls) == sorted(f"{c} r1 n=24 s0" for c in cfg.conditions)
    assert (out / "results.csv").read_text() == before  # same seeds -> same numbers


def test_worker_processes_give_the_same_results(tiny_run, tmp_path):
    cfg, out, _ = tiny_run
    run_shapebias(cfg, tmp_path, **QUIET, workers=2)  # pipelines and cells in 2 processes
    for name in ("results.csv", "verify.json"):
        assert (tmp_path / name).read_text() == (out / name).read_text(), name


def test_workers_without_the_run_directory_give_the_same_results(tiny_run, tmp_path):
    """The cells declare every file they read (random_subnet's included): workers that get only
    those files compute the same results."""
    from instill.experiments.executors import LocalExecutor
    from instill.experiments.shapebias import ShapeBiasRun

    cfg, out, _ = tiny_run
    ShapeBiasRun(cfg, tmp_path, **QUIET, executor=LocalExecutor(2, ship=True)).execute()
    for name in ("results.csv", "verify.json"):
        assert (tmp_path / name).read_text() == (out / name).read_text(), name


def test_changed_config_in_the_same_directory_is_refused(tiny_run):
    _, out, _ = tiny_run
    with pytest.raises(ConfigError, match="rho"):
        run_shapebias(load_config("quick", {**TINY, "rho": 0.5}), out, **QUIET)


#: A gate no base model can pass (accuracy is at most 1), with one retry.
UNREACHABLE = {**TINY, "conditions": ["subnet", "random"], "grid": [12],
               "gates": {**OPEN_GATES, "natural_accuracy": 1.01, "retries": 1}}


def test_failing_gate_stops_the_run_after_every_retry_and_writes_no_report(tmp_path):
    cfg = load_config("quick", UNREACHABLE)
    with pytest.raises(GateError) as caught:
        run_shapebias(cfg, tmp_path, **QUIET)
    attempts = json.loads((tmp_path / "pipelines/r0/attempts.json").read_text())
    assert [a["attempt"] for a in attempts["attempts"]] == [0, 1]  # retries + 1
    for a in attempts["attempts"]:
        assert not a["passed"]
        assert [g["name"] for g in a["gates"]] == GATE_NAMES[:2]  # stopped at the base gates
        assert a["gates"][0]["threshold"] == 1.01 and not a["gates"][0]["passed"]
    seeds = {json.loads((tmp_path / f"pipelines/r0/a{i}/base.json").read_text())["seed"]
             for i in (0, 1)}
    assert seeds == {derive_seed(cfg.seed, "base", 0, i) for i in (0, 1)}  # the next seed
    message = str(caught.value)
    last = attempts["attempts"][-1]["gates"][0]["value"]
    for needle in ("gate 'base natural accuracy'", "all 2 attempts", f"last: {last:.3f}",
                   "threshold 1.01", "base_fit.epochs", "attempts.json", "gates.enforce=false"):
        assert needle in message, needle
    for name in ("report.md", "summary.json", "results.csv"):
        assert not (tmp_path / name).exists(), name
    assert not (tmp_path / "cells").exists()


def test_overridden_gates_finish_with_a_warning(tmp_path):
    overrides = {"gates": {**UNREACHABLE["gates"], "enforce": False}}
    summary = run_shapebias(load_config("quick", UNREACHABLE, overrides), tmp_path, **QUIET)
    assert summary["headline"].startswith("WARNING: gates failed and were overridden for r0, r1")
    assert summary["gates_overridden"] == ["r0", "r1"]
    attempts = json.loads((tmp_path / "pipelines/r0/attempts.json").read_text())
    assert (attempts["attempt"], attempts["overridden"], len(attempts["attempts"])) == \
        (0, True, 1)
    # The chosen attempt failed before discovery; the cells still got its subnetwork.
    assert (tmp_path / "pipelines/r0/a0/subnetwork.safetensors").is_file()
    assert (tmp_path / "pipelines/r0/a0/verify.json").is_file()
    report = (tmp_path / "report.md").read_text()
    assert "**WARNING: gates were overridden (`gates.enforce: false`) for r0, r1" in report
    assert "chosen (overridden)" in report


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
    first, second, other = data.pool(0, 0), data.pool(0, 1), data.pool(1, 0)
    assert len(first) == 34 and not torch.equal(first.labels, second.labels)
    assert not torch.equal(first.images, other.images)  # each replicate its own order

    out = tmp_path / "run"
    summary = run_shapebias(cfg, out, **QUIET)
    assert summary["data"]["sources"] == {"natural": str(dirs["train"]),
                                          "shape_only": str(dirs["shape"]),
                                          "cue_conflict": str(dirs["cue"])}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["replicate"], r["n"], r["condition"]) for r in rows] == [
        (r, n, c) for r in ("0", "1") for n in ("10", "30") for c in ("subnet", "random")]
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
    assert not (tmp_path / "r" / "pipelines").exists()


def test_cli_runs_a_tiny_vit_from_a_config_file(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "grid": [12], "conditions": ["subnet", "random"]}))
    out = tmp_path / "vit"
    result = CliRunner().invoke(main, ["shapebias", "--preset", "quick", "--config", str(config),
                                       "--arch", "vit", "--replicates", "1", "--workers", "1",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Subtask Induction" in result.output and "report.md" in result.output
    assert "over 1 replicate pipeline (vit" in result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["arch"], r["condition"]) for r in rows] == [("vit", "subnet"), ("vit", "random")]
    recorded = json.loads((out / "config.json").read_text())["config"]
    assert recorded["vit"]["patch_size"] == 4 and recorded["replicates"] == 1


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
    assert (quick.classes, quick.size, quick.replicates, quick.seeds, quick.grid) == \
        (8, 32, 8, 1, [250, 1000])
    assert quick.discovery.mask.l0_lambda == 1e-5 and quick.conditions == list(SHAPE_CONDITIONS)
    assert quick.epochs_for(250) == 48 and quick.epochs_for(2000) == 10
    assert (quick.gates.natural_accuracy, quick.gates.texture_bias,
            quick.gates.subnetwork_accuracy, quick.gates.ablation_margin) == (0.8, 0.5, 0.6, -0.05)
    assert quick.gates.enforce and quick.gates.retries == 2
    paper = load_config("paper")
    assert paper.discovery.mask.l0_lambda == 1e-8 and paper.discovery.epochs == 100
    assert (paper.induction_fit.optimizer, paper.induction_fit.lr) == ("sgd", 1e-3)
    assert paper.replicates == 3
    assert load_config("quick", {"rho": 0.5}, {"arch": "vit"}).arch == "vit"
    with pytest.raises(ConfigError, match="patch_size"):
        load_config("quick", {"size": 30}, {"arch": "vit"})
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")
    with pytest.raises(ConfigError, match="grid"):
        load_config("quick", {"grid": [0, 10]})
    with pytest.raises(ConfigError, match="replicates must be >= 1"):
        load_config("quick", {"replicates": 0})
    with pytest.raises(ConfigError, match=r"gates\.retries"):
        load_config("quick", {"gates": {"retries": -1}})


def _summary(subnet: list[float], overridden: bool = False) -> dict:
    """The summary of made-up rows: subnet's shape bias per replicate, random init's 0.2."""
    cfg = load_config("quick", {"conditions": ["subnet", "random"], "grid": [10, 20],
                                "seeds": 1})
    rows = [{"condition": c, "replicate": r, "n": n, "seed": 0, "shape_bias": b,
             "natural_accuracy": 0.9, "shape_only_accuracy": 0.3}
            for r, s in enumerate(subnet) for n in (10, 20)
            for c, b in (("subnet", s), ("random", 0.2 + 0.01 * r))]
    units = [f"r{r}" for r in range(len(subnet))]
    verify = {u: {"trained": {"density": 0.1}} for u in units}
    bases = {u: {"natural_accuracy": 0.9, "shape_only_accuracy": 0.2, "shape_bias": 0.3,
                 "best_epoch": 3, "parameters": 10} for u in units}
    gates = {u: {"attempt": 0, "overridden": overridden, "attempts": []} for u in units}
    return sbr.summarize(cfg, rows, verify, bases, gates, {}, {})


@pytest.mark.parametrize(("subnet", "said"), [
    ([0.5, 0.6, 0.55, 0.52, 0.58], "higher than random init ("),
    ([0.1, 0.35, 0.25, 0.15, 0.3], "indistinguishable at this power from random init ("),
    ([0.1, 0.05, 0.12, 0.08, 0.1], "lower than random init (")])
def test_headline_states_only_what_the_intervals_support(subnet, said):
    summary = _summary(subnet)
    headline = summary["headline"]
    ours = stats.bootstrap_mean(subnet)
    random = stats.bootstrap_mean([0.2 + 0.01 * r for r in range(5)])
    assert headline.startswith(f"Subtask Induction's shape bias on cue-conflict images is "
                               f"{ours:.2f} over 5 replicate pipelines (resnet")
    assert f"against {random:.2f} for random init" in headline and said in headline
    assert "Holm-corrected" in headline
    paired = summary["subnet_vs"]["shape_bias"]["random"]
    assert paired["n"] == 5 and paired["mean_diff"] == pytest.approx(ours.mean - random.mean)
    assert summary["by_condition"]["subnet"]["shape_bias"] == ours.to_dict()
    # Natural accuracy is equal in every pipeline: no difference, and the headline says so.
    assert "natural accuracy 0.90 [0.90, 0.90] is indistinguishable at this power from random " \
           "init's 0.90 [0.90, 0.90]" in headline


def test_headline_warns_first_when_gates_were_overridden():
    summary = _summary([0.5, 0.6, 0.55], overridden=True)
    assert summary["headline"].startswith("WARNING: gates failed and were overridden for r0, "
                                          "r1, r2;")
    assert "Subtask Induction's shape bias" in summary["headline"]
