"""The arithmetic pipeline end to end on a tiny run, resuming, and its command line."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from click.testing import CliRunner

from instill.cli import main
from instill.errors import ConfigError
from instill.experiments import arithmetic as arith
from instill.experiments.arithmetic import load_config, run_arithmetic

# Gates that always pass: a model this small learns nothing (the gate tests set their own).
OPEN_GATES = {"base_accuracy": 0.0, "subnetwork_accuracy": 0.0, "ablation_margin": -1.0}
TINY = {
    "numbers": 14, "layers": [1], "n_embd": 16, "n_head": 2, "loss": "answer", "seeds": 1,
    "replicates": 2, "gates": OPEN_GATES, "base_samples": 100, "base_val": 30,
    "base_fit": {"epochs": 3, "batch_size": 64, "lr": 3e-3, "patience": None},
    "subtask_samples": 300, "discovery": {"epochs": 2, "batch_size": 100},
    "grid": [0, 8], "conditions": ["subnet", "sampled", "random"], "densities": [None],
    "induction_fit": {"epochs": 2, "batch_size": 16}, "induction_batch": 1, "n_val": 20,
    "n_test": 30,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("arith")
    cfg = load_config("quick", TINY)
    summary = run_arithmetic(cfg, out, log=lambda _: None)
    return cfg, out, summary


def test_tiny_run_writes_every_output_well_formed(tiny_run):
    cfg, out, _ = tiny_run
    for name in ("config.json", *(f"pipelines/L1-r{r}/{f}" for r in (0, 1) for f in (
                 "attempts.json", "a0/base.safetensors", "a0/base.json",
                 "a0/subnetwork.safetensors", "a0/verify.json")),
                 "verify.json", "results.csv", "summary.json", "data_efficiency.png",
                 "report.md", "manifest.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * 3 * 2  # grid x conditions x seeds x depths x replicates
    assert set(rows[0]) >= {"layers", "replicate", "n", "seed", "condition", "test_accuracy",
                            "accuracy[2*a^2]", "accuracy[2*b^2]", "best_epoch"}
    assert {r["replicate"] for r in rows} == {"0", "1"}
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in rows)
    saved = json.loads((out / "summary.json").read_text())
    assert set(saved["conditions"]) == {"subnet", "sampled", "random"}
    assert saved["units"] == ["L1-r0", "L1-r1"]
    assert set(saved["subnet_vs"]) == {"sampled", "random"}
    for paired in saved["subnet_vs"].values():
        assert paired["n"] == 2 and paired["p_adjusted"] >= paired["p_value"]
        assert paired["decision"] in ("better", "worse", "indistinguishable")
    never = saved["conditions"]["random"]["never"]
    assert (saved["conditions"]["random"]["mean_samples_to_threshold"] is None) == (never > 0)
    auc = saved["conditions"]["subnet"]["auc"]
    assert auc["low"] <= auc["mean"] <= auc["high"] and auc["n"] == 2
    assert saved["headline"].startswith("Over 2 independent pipelines")
    assert saved["gates_overridden"] == []
    verify = json.loads((out / "verify.json").read_text())["L1-r0"]
    assert set(verify["accuracy"]) == {"full model", "subnetwork only", "subnetwork ablated",
                                       "random same-size ablated"}
    assert 0 <= verify["density"] <= 1 and verify["per_layer_density"]
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["config"]["numbers"] == 14 and recorded["seed"] == cfg.seed
    assert "torch" in recorded["packages"]
    report = (out / "report.md").read_text()
    assert saved["headline"] in report and "## Gates" in report
    assert "data_efficiency.png" in report and "`numbers`: 14 (paper: 1000)" in report
    assert "`base_fit.epochs`: 3 (paper: 50)" in report


def test_rerun_resumes_without_retraining(tiny_run, monkeypatch):
    cfg, out, _ = tiny_run
    before = (out / "results.csv").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("finished work was recomputed")

    monkeypatch.setattr(arith, "fit", no_training)
    monkeypatch.setattr(arith, "discover", no_training)
    run_arithmetic(cfg, out, log=lambda _: None)
    assert (out / "results.csv").read_text() == before


def test_resume_removes_temporaries_a_killed_run_left(tiny_run):
    cfg, out, _ = tiny_run
    stale = [out / ".tmp-abc123.json", out / "cells" / ".tmp-x9.json"]
    for path in stale:
        path.write_text("half a cell")
    logged = []
    run_arithmetic(cfg, out, log=logged.append)
    assert not any(path.exists() for path in stale)
    assert sum("left by an interrupted run" in line for line in logged) == 2
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(
        f"L1-r{r}-a0-n{n}-s0-{c}.json" for r in (0, 1) for n in (0, 8) for c in cfg.conditions)


def test_missing_cell_is_recomputed_and_others_are_not(tiny_run, monkeypatch):
    cfg, out, _ = tiny_run
    before = (out / "results.csv").read_text()
    (out / "cells/L1-r1-a0-n8-s0-sampled.json").unlink()
    calls = []
    real_fit = arith.fit

    def counting_fit(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(arith, "fit", counting_fit)
    run_arithmetic(cfg, out, log=lambda _: None)
    assert calls == ["sampled L1 r1 n=8 s0"]
    assert (out / "results.csv").read_text() == before  # same seed -> same numbers


def test_changed_config_in_the_same_directory_is_refused(tiny_run):
    _, out, _ = tiny_run
    cfg = load_config("quick", {**TINY, "modulus": 5})
    with pytest.raises(ConfigError, match="modulus"):
        run_arithmetic(cfg, out, log=lambda _: None)


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "a^2 + $b"], "unexpected character '$' at position 6"),
    (["--modulus", "1"], "modulus"),
    (["--layers", "2,x"], "--layers takes comma-separated integers"),
    (["--conditions", "subnet,magic"], "unknown conditions ['magic']"),
])
def test_bad_command_line_input_is_one_clear_line(tmp_path, args, message):
    result = CliRunner().invoke(main, ["arithmetic", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_unknown_config_file_key_is_an_error_with_a_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("numbrs: 10\n")
    result = CliRunner().invoke(main, ["arithmetic", "--config", str(path), "--out",
                                       str(tmp_path / "r")])
    assert result.exit_code == 2 and "numbrs" in result.output and "numbers" in result.output


def test_presets_and_overrides_layer_in_order():
    cfg = load_config("quick", {"numbers": 30}, {"grid": [0, 5]})
    assert cfg.numbers == 30 and cfg.grid == [0, 5] and cfg.layers == [2]
    assert load_config("paper").numbers == 1000
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")


def test_worker_processes_give_the_same_results(tiny_run, tmp_path):
    cfg, out, _ = tiny_run
    for name in ("config.json", "pipelines"):  # only the cells are recomputed
        (shutil.copytree if (out / name).is_dir() else shutil.copy)(out / name, tmp_path / name)
    run_arithmetic(cfg, tmp_path, log=lambda _: None, workers=2)
    assert (tmp_path / "results.csv").read_text() == (out / "results.csv").read_text()


def test_workers_without_the_run_directory_give_the_same_results(tiny_run, tmp_path):
    """Every file a cell reads is declared: workers that get only those files (as on a cluster
    without a shared filesystem) compute the same results."""
    from instill.experiments.arithmetic import ArithmeticRun
    from instill.experiments.executors import LocalExecutor

    cfg, out, _ = tiny_run
    ArithmeticRun(cfg, tmp_path, log=lambda _: None, executor=LocalExecutor(2, ship=True)
                  ).execute()
    assert (tmp_path / "results.csv").read_text() == (out / "results.csv").read_text()


def test_fused_gelu_option_computes_gpt2s_gelu_new():
    import copy

    import torch

    from instill.models import build_model, set_activation

    torch.manual_seed(0)
    paper = build_model("gpt2", vocab_size=20, n_embd=16, n_head=2).eval()
    fast = build_model("gpt2", vocab_size=20, n_embd=16, n_head=2,
                       activation="gelu_pytorch_tanh").eval()
    fast.load_state_dict(paper.state_dict())
    ids = torch.randint(0, 20, (4, 6))
    with torch.no_grad():
        assert torch.allclose(fast(input_ids=ids).logits, paper(input_ids=ids).logits, atol=1e-5)
    assert type(fast.transformer.h[0].mlp.act) is not type(paper.transformer.h[0].mlp.act)
    switched = set_activation(copy.deepcopy(paper), "gelu_pytorch_tanh")
    with torch.no_grad():
        assert torch.equal(switched(input_ids=ids).logits, fast(input_ids=ids).logits)
    assert switched.config.activation_function == "gelu_pytorch_tanh"
    with pytest.raises(ConfigError, match="unknown activation 'gleu'"):
        set_activation(switched, "gleu")
    assert paper.config.activation_function == "gelu_new"  # HF GPT-2's default stays the default
    assert load_config("paper").activation == "gelu_new"
    quick = load_config("quick")
    assert quick.activation == "gelu_pytorch_tanh" and quick.induction_fit.fused
    with pytest.raises(ConfigError, match="unknown activation 'gleu'"):
        load_config("quick", {**TINY, "activation": "gleu"})


def test_largest_cells_go_first_and_results_keep_job_order():
    from instill.experiments.executors import LocalExecutor, largest_first

    assert largest_first([(0, 25), (0, 1600), (1, 25), (1, 400)], lambda j: j[1]) == [1, 3, 0, 2]
    assert LocalExecutor(2).map(abs, [-1, 5, -3, 2], "jobs", cost=abs) == [1, 5, 3, 2]


DENSE = {**TINY, "replicates": 2, "densities": [None, 0.2],
         "gates": {**OPEN_GATES, "ablation_margin_by_density": [[0.5, -1.0]]},
         "conditions": ["subnet", "sampled", "sampled-inverse", "random"], "grid": [0, 8]}


def test_density_axis_runs_mask_conditions_once_per_density(tmp_path):
    """A target density gets its own subnetwork (of exactly that size), verification and gates,
    and every mask condition runs at it against the same base model; the report gains the
    specificity curve."""
    cfg = load_config("quick", DENSE)
    summary = run_arithmetic(cfg, tmp_path, log=lambda _: None)
    where = tmp_path / "pipelines/L1-r0/a0"
    assert (where / "subnetwork-d0.2.safetensors").is_file()
    from instill.core import Subnetwork

    sparse = Subnetwork.load(where / "subnetwork-d0.2.safetensors")
    assert abs(sparse.density() - 0.2) < 1e-3
    gates = json.loads((tmp_path / "pipelines/L1-r0/attempts.json").read_text())
    assert [g["name"] for g in gates["attempts"][0]["gates"]] == [
        "base accuracy", "subnetwork alone on subtask", "ablation specificity",
        "subnetwork alone on subtask at 0.2", "ablation specificity at 0.2"]
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert sorted({r["condition"] for r in rows}) == [
        "random", "sampled", "sampled-inverse", "sampled-inverse@0.2", "sampled@0.2", "subnet",
        "subnet@0.2"]
    assert len(rows) == 2 * 2 * 7  # replicates x grid x (3 mask conditions x 2 densities + 1)
    curve = {r["target"]: r for r in summary["specificity"]}
    assert set(curve) == {None, 0.2}
    assert abs(curve[0.2]["density"]["mean"] - 0.2) < 1e-3
    assert {"sampled", "sampled-inverse"} <= set(curve[0.2]) and "complement" not in curve[0.2]
    assert set(summary["subnet_vs"]) == {"sampled", "sampled-inverse", "random",
                                         "subnet@0.2 - sampled@0.2",
                                         "subnet@0.2 - sampled-inverse@0.2", "subnet@0.2 - random"}
    assert "At density 0.20 (target), Subtask Induction" in summary["headline"]
    report = (tmp_path / "report.md").read_text()
    assert "## Specificity over density" in report and (tmp_path / "specificity.png").is_file()


def test_batched_cells_give_each_model_its_one_at_a_time_record(tmp_path, monkeypatch):
    """Cells of one depth and n trained as one vmapped stack (with counter-based dropout)
    record what each model's own `fit` records; reruns are bit-identical."""
    stacks = []
    real = arith.fit_batched
    monkeypatch.setattr(arith, "fit_batched", lambda models, *a, **k: (
        stacks.append(len(models)), real(models, *a, **k))[1])
    counter = {**TINY, "induction_fit": {**TINY["induction_fit"], "dropout_rng": "counter"}}
    alone = run_arithmetic(load_config("quick", counter), tmp_path / "alone",
                           log=lambda _: None)
    cfg = load_config("quick", {**counter, "induction_batch": 64})
    stacked = run_arithmetic(cfg, tmp_path / "stacked", log=lambda _: None)
    assert stacks == [6, 6]  # per n: 2 pipelines x 3 conditions
    rows = [list(csv.DictReader((tmp_path / d / "results.csv").open()))
            for d in ("alone", "stacked")]
    for a, b in zip(*rows, strict=True):
        assert (a["condition"], a["n"], a["best_epoch"]) == (b["condition"], b["n"],
                                                            b["best_epoch"])
        assert abs(float(a["val_accuracy"]) - float(b["val_accuracy"])) < 1e-6
        assert abs(float(a["test_accuracy"]) - float(b["test_accuracy"])) < 1e-6
    assert stacked["headline"] == alone["headline"]
    shutil.rmtree(tmp_path / "stacked" / "cells")
    again = run_arithmetic(cfg, tmp_path / "stacked", log=lambda _: None)
    assert again == stacked


def test_stacked_base_training_and_discovery_match_each_pipelines_own(tmp_path, monkeypatch):
    """With pipeline_batch, the first attempt's base models of a depth, then their
    discoveries, train as stacks before the pipelines run, and give each pipeline what its
    own phases give (counter-based dropout, float rounding aside)."""
    stacks = []
    for name in ("fit_batched", "discover_batched"):
        real = getattr(arith, name)
        monkeypatch.setattr(arith, name, lambda models, *a, _real=real, _name=name, **k: (
            stacks.append((_name, len(models))), _real(models, *a, **k))[1])
    counter = {**TINY, "replicates": 3, "grid": [0], "conditions": ["subnet"],
               "base_fit": {**TINY["base_fit"], "dropout_rng": "counter"}}
    run_arithmetic(load_config("quick", counter), tmp_path / "alone", log=lambda _: None)
    assert stacks == []
    run_arithmetic(load_config("quick", {**counter, "pipeline_batch": 8}), tmp_path / "stacked",
                   log=lambda _: None)
    assert stacks == [("fit_batched", 3), ("discover_batched", 3)]
    from instill.core import Subnetwork

    for r in range(3):
        where = f"pipelines/L1-r{r}/a0"
        a, b = (json.loads((tmp_path / d / where / "base.json").read_text())
                for d in ("alone", "stacked"))
        assert a["best_epoch"] == b["best_epoch"] and a["seed"] == b["seed"]
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)
        for got, want in zip(b["history"], a["history"], strict=True):
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
        subs = [Subnetwork.load(tmp_path / d / where / "subnetwork.safetensors")
                for d in ("alone", "stacked")]
        assert subs[0].iou(subs[1]) > 0.99


def test_reference_comparison_places_its_points_against_our_intervals():
    """At the reference's task, each of its published points is inside, above or below our
    interval over pipelines; another task gets no comparison."""
    from instill.experiments.arithmetic_report import against_reference

    cfg = load_config("paper", {"layers": [2], "grid": [0, 250, 640],
                                "conditions": ["subnet", "sampled-inverse"]})
    rows = [{"layers": 2, "replicate": r, "n": n, "seed": 0, "condition": c,
             "test_accuracy": acc + 0.01 * r}
            for r in range(3) for c, by_n in (("subnet", {0: 0.3, 250: 0.61, 640: 0.95}),
                                               ("sampled-inverse", {0: 0.3, 250: 0.3, 640: 0.3}))
            for n, acc in by_n.items()]
    found = against_reference(cfg, rows)
    where = {(p["condition"], p["n"]): p["where"] for p in found["points"]}
    assert where == {("subnet", 250): "inside", ("subnet", 640): "below ours",
                     ("sampled-inverse", 250): "above ours", ("sampled-inverse", 640): "above ours"}
    gap = found["auc_gaps"][0]
    assert gap["control"] == "sampled-inverse" and gap["reference"] == 0.05
    assert gap["ours"]["mean_diff"] > 0.2
    assert against_reference(load_config("quick"), rows) == {}
