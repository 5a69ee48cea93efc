"""`instill modules` on tiny runs: every output, union transplants, compression masks, reuse of
an arithmetic run's base models (`--from`), and the `bake` export."""

from __future__ import annotations

import csv
import json
from itertools import pairwise

import pytest
import torch
from click.testing import CliRunner

from instill.analysis import load_sparse, magnitude_mask
from instill.cli import main
from instill.core import Subnetwork, bake
from instill.errors import ConfigError
from instill.experiments.arithmetic import load_config as arith_config
from instill.experiments.arithmetic import run_arithmetic
from instill.experiments.modules import ModulesRun, load_config, run_modules, union_model
from instill.tasks.arithmetic import make_sequences, sample_pairs
from instill.tasks.expr import parse
from instill.training import FitConfig, fit

OPEN = {"base_accuracy": 0.0, "subnetwork_accuracy": 0.0}
TINY = {
    "numbers": 14, "layers": 1, "n_embd": 16, "n_head": 2, "replicates": 2, "gates": OPEN,
    "base_samples": 100, "base_val": 30,
    "base_fit": {"epochs": 3, "batch_size": 64, "lr": 3e-3, "patience": None},
    "subtask_samples": 300, "discovery": {"epochs": 2, "batch_size": 100}, "eval_samples": 100,
    "compression": {"fractions": [0.5, 0.2, 0.1], "lambdas": [1e-7], "top_k": [0.2],
                    "samples": 200},
    "union": {"grid": [0, 8], "n_val": 20, "n_test": 30,
              "induction_fit": {"epochs": 2, "batch_size": 16}},
}
ARITH_TINY = {
    "numbers": 14, "layers": [1], "n_embd": 16, "n_head": 2, "loss": "answer", "seeds": 1,
    "replicates": 2, "gates": {"base_accuracy": 0.0, "subnetwork_accuracy": 0.0,
                               "ablation_margin": -1.0},
    "base_samples": 100, "base_val": 30,
    "base_fit": {"epochs": 3, "batch_size": 64, "lr": 3e-3, "patience": None},
    "subtask_samples": 300, "discovery": {"epochs": 2, "batch_size": 100},
    "grid": [0], "conditions": ["subnet"], "induction_fit": {"epochs": 1, "batch_size": 16},
    "densities": [None], "n_val": 20, "n_test": 30,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("modules")
    cfg = load_config("quick", TINY)
    return cfg, out, run_modules(cfg, out, log=lambda _: None)


def test_tiny_run_writes_every_output(tiny_run):
    cfg, out, summary = tiny_run
    for name in ("config.json", "manifest.json", "results.csv", "summary.json", "report.md",
                 "overlap.png", "ablation.png", "compression.png",
                 *(f"pipelines/r{r}/a0/{f}" for r in (0, 1) for f in (
                     "base.safetensors", "sub-0.safetensors", "sub-2.safetensors",
                     "sub-base.safetensors", "analysis.json", "pruned-base.safetensors"))):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "results.csv").open()))
    union = [r for r in rows if r["kind"] == "union"]
    assert len(union) == 2 * 2 * 2 * 4  # replicates x targets x grid x conditions
    methods = {r["method"] for r in rows if r["kind"] == "compression"}
    assert methods == {"magnitude", "torch_prune", "continuous", "top_k", "hard_concrete"}
    saved = json.loads((out / "summary.json").read_text())
    assert saved["headline"] == summary["headline"]
    assert saved["headline"].startswith("Over 2 pipelines")
    pairs = saved["overlap"]["pairs"]
    assert set(pairs) == {f"({i}, {j})" for i in [*cfg.subtasks, "base"]
                          for j in [*cfg.subtasks, "base"] if i != j}
    assert set(saved["cross_ablation"]["matrix"]) == set(cfg.subtasks)
    assert set(saved["union"]["versus"]) == {f"{t}: union vs {c}" for t in cfg.union.targets
                                             for c in ("first", "second", "random")}
    assert 0 <= saved["frivolous"]["fraction"]["mean"] <= 1
    report = (out / "report.md").read_text()
    assert saved["headline"] in report and "## Gates" in report and "## Compression" in report


def test_rerun_resumes_without_work(tiny_run, monkeypatch):
    cfg, out, summary = tiny_run
    monkeypatch.setattr("instill.experiments.modules.discover",
                        lambda *a, **k: pytest.fail("rediscovered on resume"))
    monkeypatch.setattr("instill.experiments.modules.fit",
                        lambda *a, **k: pytest.fail("retrained on resume"))
    assert run_modules(cfg, out, log=lambda _: None)["headline"] == summary["headline"]


def test_union_transplant_freezes_exactly_the_union(tiny_run):
    cfg, out, _ = tiny_run
    run = ModulesRun(cfg, out, lambda _: None)
    trained, subs = run.source(0, 0)
    gen = torch.Generator().manual_seed(0)
    first, second = (Subnetwork({n: torch.rand(m.shape, generator=gen) < 0.3
                                 for n, m in subs["base"].masks.items()},
                                subs["base"].fingerprint) for _ in range(2))
    model = union_model(trained, first, second, seed=1)
    a, b = sample_pairs(200, run.spec, torch.Generator().manual_seed(2))
    data = make_sequences(a, b, parse("a + b"), run.spec)
    fit(model, [data], run.task.loss, FitConfig(epochs=2, batch_size=32, lr=1e-2))
    after = dict(bake(model).named_parameters())
    before = dict(trained.named_parameters())
    union = first | second
    for name, mask in union.masks.items():
        assert torch.equal(after[name][mask], before[name][mask]), name
        assert not torch.equal(after[name][~mask], before[name][~mask]), name


def test_magnitude_masks_are_nested_so_the_curve_is_monotone_in_kept(tiny_run):
    cfg, out, _ = tiny_run
    model, _ = ModulesRun(cfg, out, lambda _: None).source(0, 0)
    masks = [magnitude_mask(model, f) for f in (1.0, 0.5, 0.2, 0.1)]
    for big, small in pairwise(masks):
        assert (small - big).kept() == 0 and small.kept() < big.kept()
    rows = [r for r in csv.DictReader((out / "results.csv").open())
            if r["method"] == "magnitude" and r["replicate"] == "0"]
    kept = [int(r["kept"]) for r in sorted(rows, key=lambda r: -float(r["param"]))]
    assert kept == sorted(kept, reverse=True) and len(set(kept)) == len(kept)


def test_bake_exports_a_sparse_pruned_model(tiny_run, tmp_path):
    cfg, out, _ = tiny_run
    target = tmp_path / "pruned.safetensors"
    result = CliRunner().invoke(main, ["bake", str(out), "--mask", "magnitude:0.1",
                                       "--out", str(target)])
    assert result.exit_code == 0, result.output
    model, _ = ModulesRun(cfg, out, lambda _: None).source(0, 0)
    loaded = load_sparse(target, ModulesRun(cfg, out, lambda _: None).build())
    weights = dict(loaded.named_parameters())
    mask = magnitude_mask(model, 0.1)
    for name, m in mask.masks.items():
        assert torch.equal(weights[name], dict(model.named_parameters())[name] * m)
    bad = CliRunner().invoke(main, ["bake", str(out), "--mask", "nope", "--out", str(target)])
    assert bad.exit_code == 2 and "is none of" in bad.output


@pytest.fixture(scope="module")
def arith_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("arith")
    run_arithmetic(arith_config("quick", ARITH_TINY), out, log=lambda _: None)
    return out


def _reuse(source, **extra) -> dict:
    return {**TINY, "from_run": str(source), "base": "a + a*b", "subtasks": ["a", "a*b"],
            "union": {**TINY["union"], "pair": ["a", "a*b"]}, **extra}


def test_from_reuses_an_arithmetic_runs_base_models(arith_run, tmp_path):
    cfg = load_config("quick", _reuse(arith_run))
    summary = run_modules(cfg, tmp_path, log=lambda _: None)
    for r in (0, 1):
        attempt = json.loads((arith_run / f"pipelines/L1-r{r}/attempts.json").read_text())
        source = arith_run / f"pipelines/L1-r{r}/a{attempt['attempt']}/base.safetensors"
        assert (tmp_path / f"pipelines/r{r}/a0/base.safetensors").read_bytes() == \
            source.read_bytes()
    assert summary["units"] == ["r0", "r1"]


def test_a_bad_from_directory_is_a_clear_error(arith_run, tmp_path):
    with pytest.raises(ConfigError, match=r"no config\.json there"):
        run_modules(load_config("quick", _reuse(tmp_path / "nowhere")), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"its base is 'a \+ a\*b' but this run needs"):
        run_modules(load_config("quick", {**_reuse(arith_run), "base": "a^2 + a*b + b"}),
                    tmp_path / "b")
    with pytest.raises(ConfigError, match="fewer replicates"):
        run_modules(load_config("quick", _reuse(arith_run, replicates=3)), tmp_path / "c")
    result = CliRunner().invoke(main, ["modules", "--from", str(tmp_path / "nowhere"),
                                       "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "no config.json there" in result.output


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"union\.pair must name two different subtasks"):
        load_config("quick", {"union": {"pair": ["a^2", "a^3"]}})
    with pytest.raises(ConfigError, match="task must be 'arithmetic' or 'shapes'"):
        load_config("quick", {"task": "vision"})


def test_texture_only_split_keeps_texture_labels_and_shuffles_patches():
    from instill.tasks.shapes import ShapeWorld, _shuffle_patches, make_split

    world = ShapeWorld(classes=4, size=32, rho=0.9)
    data = make_split(world, "texture_only", 32, seed=0)
    assert torch.equal(data.labels, data.textures) and data.split == "texture_only"
    assert torch.equal(data.images, make_split(world, "texture_only", 32, seed=0).images)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).view(2, 3, 8, 8)
    y = _shuffle_patches(x, 2, torch.Generator().manual_seed(0))
    assert not torch.equal(x, y)
    assert torch.equal(x.flatten(1).sort(1).values, y.flatten(1).sort(1).values)
