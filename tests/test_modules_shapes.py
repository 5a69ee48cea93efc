"""`instill modules --task shapes` on tiny runs: every output, resuming, reuse of a shapebias
run's base models (`--from`), the union transplant on a ResNet, and the `bake` export."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner

from instill.analysis import load_sparse
from instill.cli import main
from instill.core import Subnetwork, bake
from instill.errors import ConfigError
from instill.experiments.modules_common import union_model
from instill.experiments.modules_config import ShapesModulesConfig, load_config
from instill.experiments.modules_shapes import ModulesShapesRun, run_modules_shapes
from instill.experiments.shapebias import load_config as shapebias_config
from instill.experiments.shapebias import run_shapebias
from instill.tasks.shapes import make_split
from instill.training import FitConfig, fit

RESNET = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}
OPEN = {"natural_accuracy": 0.0, "texture_bias": 0.0, "subnetwork_accuracy": 0.0}
TINY = {
    "task": "shapes", "classes": 3, "size": 16, "resnet": RESNET, "replicates": 2,
    "gates": OPEN, "base_samples": 120, "base_val": 30,
    "base_fit": {"epochs": 2, "batch_size": 32, "patience": None},
    "discovery_samples": 90,
    "discovery": {"epochs": 2, "batch_size": 32, "lr": 0.1, "mask": {"l0_lambda": 3e-4}},
    "eval_samples": 30, "n_val": 30,
    "compression": {"fractions": [0.5, 0.1], "lambdas": [1e-4], "top_k": [0.2],
                    "samples": 60},
    "union": {"grid": [12, 24], "induction_min_examples": 0,
              "induction_fit": {"epochs": 1, "batch_size": 8}},
}
SHAPEBIAS_TINY = {
    "classes": 3, "size": 16, "resnet": RESNET, "replicates": 2, "seeds": 1,
    "gates": {**{k: 0.0 for k in ("natural_accuracy", "texture_bias",
                                  "subnetwork_accuracy")}, "ablation_margin": -1.0},
    "base_samples": 120, "base_val": 30,
    "base_fit": {"epochs": 2, "batch_size": 32, "patience": None},
    "discovery_samples": 60, "discovery": {"epochs": 1, "batch_size": 32},
    "grid": [12], "conditions": ["subnet"], "induction_fit": {"epochs": 1, "batch_size": 8},
    "induction_min_examples": 0, "n_val": 20, "n_test": 20, "n_eval": 20,
}
QUIET = {"log": lambda _: None}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("modules-shapes")
    cfg = load_config("quick", None, TINY)
    return cfg, out, run_modules_shapes(cfg, out, **QUIET)


def test_tiny_run_writes_every_output(tiny_run):
    cfg, out, summary = tiny_run
    assert isinstance(cfg, ShapesModulesConfig)
    for name in ("config.json", "manifest.json", "results.csv", "summary.json", "report.md",
                 "overlap.png", "ablation.png", "compression.png",
                 *(f"pipelines/r{r}/a0/{f}" for r in (0, 1) for f in (
                     "base.safetensors", "base.json", "sub-shape.safetensors",
                     "sub-texture.safetensors", "sub-base.safetensors", "analysis.json",
                     "pruned-base.safetensors"))):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "results.csv").open()))
    union = [r for r in rows if r["kind"] == "union"]
    assert len(union) == 2 * 2 * 4  # replicates x grid x conditions
    assert {r["condition"] for r in union} == {"union", "shape", "texture", "random"}
    for r in union:
        hits = int(r["shape_hits"]) + int(r["texture_hits"])
        if hits:
            assert float(r["shape_bias"]) == pytest.approx(int(r["shape_hits"]) / hits,
                                                           abs=1e-6)
    methods = {r["method"] for r in rows if r["kind"] == "compression"}
    assert methods == {"magnitude", "torch_prune", "continuous", "top_k", "hard_concrete"}
    saved = json.loads((out / "summary.json").read_text())
    assert saved["headline"] == summary["headline"]
    assert saved["headline"].startswith("Over 2 pipelines, the shape and texture subnetworks")
    assert set(saved["overlap"]["iou_vs_chance"]) == {"(shape, texture)", "(shape, base)",
                                                      "(texture, base)"}
    assert set(saved["cross_ablation"]["matrix"]) == {"shape", "texture"}
    assert set(saved["union"]["versus"]["shape_bias"]) == {
        "union vs shape", "union vs texture", "union vs random"}
    analysis = json.loads((out / "pipelines/r0/a0/analysis.json").read_text())
    sub = Subnetwork.load(out / "pipelines/r0/a0/sub-texture.safetensors")
    assert analysis["density"]["texture"] == pytest.approx(sub.density())
    assert sub.metadata["split"] == "texture_only"
    gates = json.loads((out / "pipelines/r0/attempts.json").read_text())
    assert [g["name"] for g in gates["attempts"][0]["gates"]] == [
        "base natural accuracy", "base texture bias", "`shape` subnetwork alone",
        "`texture` subnetwork alone"]
    report = (out / "report.md").read_text()
    for section in ("## Union induction", "## Base models", "## Compression", "## Gates"):
        assert section in report


def test_rerun_resumes_without_work(tiny_run, monkeypatch):
    cfg, out, summary = tiny_run
    monkeypatch.setattr("instill.experiments.modules_shapes.discover",
                        lambda *a, **k: pytest.fail("rediscovered on resume"))
    monkeypatch.setattr("instill.experiments.modules_shapes.fit",
                        lambda *a, **k: pytest.fail("retrained on resume"))
    assert run_modules_shapes(cfg, out, **QUIET)["headline"] == summary["headline"]


def test_union_transplant_freezes_exactly_the_union_on_a_resnet(tiny_run):
    cfg, out, _ = tiny_run
    run = ModulesShapesRun(cfg, out, **QUIET)
    trained, subs = run.source(0, 0)
    gen = torch.Generator().manual_seed(0)
    first, second = (Subnetwork({n: torch.rand(m.shape, generator=gen) < 0.3
                                 for n, m in subs["base"].masks.items()},
                                subs["base"].fingerprint) for _ in range(2))
    model = union_model(trained, first, second, seed=1)
    data = make_split(cfg.world, "natural", 64, seed=3)
    fit(model, [data.images, data.labels], run.task.loss,
        FitConfig(epochs=2, batch_size=16, lr=1e-2))
    after, before = dict(bake(model).named_parameters()), dict(trained.named_parameters())
    union = first | second
    assert any("convolution" in name for name in union.masks)
    for name, mask in union.masks.items():
        assert torch.equal(after[name][mask], before[name][mask]), name
        assert not torch.equal(after[name][~mask], before[name][~mask]), name


def test_bake_exports_a_pruned_vision_model(tiny_run, tmp_path):
    cfg, out, _ = tiny_run
    target = tmp_path / "texture.safetensors"
    result = CliRunner().invoke(main, ["bake", str(out), "--replicate", "1", "--mask",
                                       "texture", "--out", str(target)])
    assert result.exit_code == 0, result.output
    run = ModulesShapesRun(cfg, out, **QUIET)
    model, subs = run.source(1, 0)
    weights = dict(load_sparse(target, run.build()).named_parameters())
    for name, mask in subs["texture"].masks.items():
        assert torch.equal(weights[name], dict(model.named_parameters())[name] * mask), name
    bad = CliRunner().invoke(main, ["bake", str(out), "--mask", "a*b", "--out", str(target)])
    assert bad.exit_code == 2 and "is none of ['shape', 'texture', 'base']" in bad.output


@pytest.fixture(scope="module")
def shapebias_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapebias")
    run_shapebias(shapebias_config("quick", SHAPEBIAS_TINY), out, **QUIET)
    return out


def test_from_reuses_a_shapebias_runs_base_models(shapebias_run, tmp_path, monkeypatch):
    monkeypatch.setattr("instill.experiments.modules_shapes.fit",
                        lambda *a, **k: pytest.fail("trained a base model"))
    cfg = load_config("quick", None, {**TINY, "from_run": str(shapebias_run),
                                      "union": {**TINY["union"], "enabled": False}})
    summary = run_modules_shapes(cfg, tmp_path, **QUIET)
    for r in (0, 1):
        attempt = json.loads((shapebias_run / f"pipelines/r{r}/attempts.json").read_text())
        source = shapebias_run / f"pipelines/r{r}/a{attempt['attempt']}"
        assert (tmp_path / f"pipelines/r{r}/a0/base.safetensors").read_bytes() == \
            (source / "base.safetensors").read_bytes()
        base = json.loads((tmp_path / f"pipelines/r{r}/a0/base.json").read_text())
        assert base["source"] == str(source) and 0 <= base["natural_accuracy"] <= 1
    assert summary["units"] == ["r0", "r1"] and summary["union"] is None


def test_a_bad_from_directory_is_a_clear_error(shapebias_run, tmp_path):
    def run(source, **extra):
        cfg = load_config("quick", None, {**TINY, "from_run": str(source), **extra})
        return run_modules_shapes(cfg, tmp_path / "out", **QUIET)

    with pytest.raises(ConfigError, match=r"no config\.json there; pass the directory of an "
                                          r"`instill shapebias` run"):
        run(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"its size is 16 but this run needs 24; pass --set "
                                          r"size=\.\.\. to match"):
        run(shapebias_run, size=24)
    with pytest.raises(ConfigError, match="its resnet is"):
        run(shapebias_run, resnet={**RESNET, "depths": [2, 1]})
    with pytest.raises(ConfigError, match="fewer replicates"):
        run(shapebias_run, replicates=3)
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"config": {"arch": "vit"}}))
    with pytest.raises(ConfigError, match=r"its arch is 'vit'.*needs a ResNet"):
        run(vit)
    assert not (tmp_path / "out" / "pipelines").exists()  # refused before any work
    result = CliRunner().invoke(main, ["modules", "--task", "shapes", "--from",
                                       str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "`instill shapebias` run" in result.output
