"""Quality gates between phases, retries, replicated pipelines and their resumption, on tiny
real arithmetic runs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_arithmetic_experiment import TINY

from instill.experiments import arithmetic as arith
from instill.experiments.arithmetic import ArithmeticRun, load_config, run_arithmetic
from instill.experiments.pipeline import Gate, GateError, GatePolicy, derive_seed, run_attempts
from instill.runio import RunDir, parse_assignments
from instill.tasks.arithmetic import pair_codes

torch.set_num_threads(1)
QUIET = {"log": lambda _: None}


def test_a_gate_that_cannot_be_met_stops_the_run_with_the_numbers_and_no_headline(tmp_path):
    cfg = load_config("quick", {**TINY, "gates": {"base_accuracy": 0.99, "retries": 1}})
    with pytest.raises(GateError) as caught:
        run_arithmetic(cfg, tmp_path, **QUIET)
    message = str(caught.value)
    record = json.loads((tmp_path / "pipelines/L1-r0/attempts.json").read_text())
    value = record["attempts"][-1]["gates"][0]["value"]
    assert "gate 'base accuracy' failed on all 2 attempts" in message
    assert f"last: {value:.3f}, threshold 0.99" in message
    assert "train longer (base_fit.epochs)" in message and "gates.enforce=false" in message
    assert [a["attempt"] for a in record["attempts"]] == [0, 1]
    assert not any(a["passed"] for a in record["attempts"])
    assert (tmp_path / "pipelines/L1-r0/a1/base.safetensors").exists()
    for name in ("report.md", "summary.json", "results.csv"):
        assert not (tmp_path / name).exists()
    assert not (tmp_path / "pipelines/L1-r0/a0/subnetwork.safetensors").exists()  # stopped early


def test_overridden_gates_run_on_and_the_headline_says_so(tmp_path):
    cfg = load_config("quick", {**TINY, "gates": {"base_accuracy": 0.99, "enforce": False}})
    summary = run_arithmetic(cfg, tmp_path, **QUIET)
    assert summary["headline"].startswith("WARNING: gates failed and were overridden for "
                                          "L1-r0, L1-r1")
    assert summary["gates_overridden"] == ["L1-r0", "L1-r1"]
    report = (tmp_path / "report.md").read_text()
    assert "**Gates were overridden (`gates.enforce: false`)" in report and "FAIL" in report


def _fail_first_attempt(monkeypatch):
    """Attempt 0 of every pipeline fails a gate (its real phases still run and are cached)."""
    real = ArithmeticRun.attempt

    def attempt(self, unit, i):
        gates = real(self, unit, i)
        return [Gate("forced", 0.0, 1.0, "nothing")] if i == 0 else gates

    monkeypatch.setattr(ArithmeticRun, "attempt", attempt)


def _count_fits(monkeypatch) -> list[str]:
    calls: list[str] = []
    real_fit = arith.fit

    def counting_fit(*args, **kwargs):
        calls.append(kwargs["desc"])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(arith, "fit", counting_fit)
    return calls


def test_a_failed_attempt_is_retried_and_the_retry_resumes_without_retraining(tmp_path,
                                                                              monkeypatch):
    _fail_first_attempt(monkeypatch)
    cfg = load_config("quick", TINY)
    logged: list[str] = []
    run_arithmetic(cfg, tmp_path, log=logged.append)
    record = json.loads((tmp_path / "pipelines/L1-r0/attempts.json").read_text())
    assert record["attempt"] == 1 and [a["passed"] for a in record["attempts"]] == [False, True]
    assert any("attempt 0: gate failed (forced 0.000 < 1); retrying" in x for x in logged)
    seeds = {json.loads((tmp_path / f"pipelines/L1-r0/a{i}/base.json").read_text())["seed"]
             for i in (0, 1)}
    assert len(seeds) == 2  # the retry trains from the next seed
    verify = json.loads((tmp_path / "verify.json").read_text())["L1-r0"]
    assert verify == json.loads((tmp_path / "pipelines/L1-r0/a1/verify.json").read_text())
    before = (tmp_path / "results.csv").read_text()

    (tmp_path / "pipelines/L1-r0/attempts.json").unlink()  # killed between attempts
    for c in cfg.conditions:
        (tmp_path / f"cells/L1-r0-a1-n8-s0-{c}.json").unlink()
    calls = _count_fits(monkeypatch)
    run_arithmetic(cfg, tmp_path, **QUIET)
    assert sorted(calls) == sorted(f"{c} L1 r0 n=8 s0" for c in cfg.conditions)
    assert (tmp_path / "results.csv").read_text() == before


def test_a_replicate_lost_in_a_kill_is_redone_alone_with_the_same_results(tmp_path,
                                                                         monkeypatch):
    cfg = load_config("quick", TINY)
    run_arithmetic(cfg, tmp_path, **QUIET)
    before = (tmp_path / "results.csv").read_text()
    shutil.rmtree(tmp_path / "pipelines/L1-r1")
    for cell in (tmp_path / "cells").glob("L1-r1-*"):
        cell.unlink()
    calls = _count_fits(monkeypatch)
    run_arithmetic(cfg, tmp_path, **QUIET)
    assert "base L1 r1" in calls and not any(" r0" in c for c in calls)
    assert (tmp_path / "results.csv").read_text() == before


def test_replicates_differ_from_each_other(tmp_path):
    run = ArithmeticRun(load_config("quick", TINY), tmp_path, **QUIET)
    assert run.seed("base", 1, 0, 0) != run.seed("base", 1, 1, 0)
    assert derive_seed(0, "base", 1, 0, 0) == run.seed("base", 1, 0, 0)
    assert derive_seed(1, "base", 1, 0, 0) != derive_seed(0, "base", 1, 0, 0)


def test_base_validation_and_test_pairs_are_never_trained_on(tmp_path):
    run = ArithmeticRun(load_config("quick", TINY), tmp_path, **QUIET)
    train, val, test = run.base_data(seed=3)
    codes = [set(pair_codes(s[:, 0], s[:, 1], run.spec).tolist()) for s in (train, val, test)]
    assert not codes[0] & codes[1] and not codes[0] & codes[2] and not codes[1] & codes[2]
    assert len(val) == len(test) == TINY["base_val"]


def test_too_few_unseen_pairs_for_the_base_gate_is_a_clear_error(tmp_path):
    cfg = load_config("quick", {**TINY, "base_samples": 2000})
    with pytest.raises(Exception, match=r"leave 0 of 196 pairs unseen.*lower base_samples"):
        ArithmeticRun(cfg, tmp_path, **QUIET).base_data(seed=0)


def test_run_attempts_records_each_attempt_and_stops_at_the_first_pass(tmp_path):
    values = iter([0.2, 0.7, 0.9])
    chosen = run_attempts(RunDir(tmp_path), "p", lambda i: [Gate("g", next(values), 0.5, "x")],
                          GatePolicy(retries=2), lambda _: None)
    assert chosen["attempt"] == 1 and [a["passed"] for a in chosen["attempts"]] == [False, True]
    assert json.loads((tmp_path / "p/attempts.json").read_text()) == chosen


def test_set_assignments_reach_nested_config_values():
    overrides = parse_assignments(["base_fit.lr=1e-3", "layers=[2, 4]", "gates.enforce=false",
                                   "base=a + b"])
    cfg = load_config("quick", None, overrides)
    assert cfg.base_fit.lr == 1e-3 and cfg.layers == [2, 4] and not cfg.gates.enforce
    assert cfg.base == "a + b" and cfg.base_fit.batch_size == 128  # the rest of the section stays
    with pytest.raises(Exception, match="KEY=VALUE"):
        parse_assignments(["lr"])


def test_gates_may_change_when_resuming_and_the_change_is_recorded(tmp_path, monkeypatch):
    strict = load_config("quick", {**TINY, "gates": {"base_accuracy": 0.99, "retries": 0}})
    with pytest.raises(GateError):
        run_arithmetic(strict, tmp_path, **QUIET)
    calls = _count_fits(monkeypatch)
    logged: list[str] = []
    relaxed = load_config("quick", {**TINY, "gates": {"base_accuracy": 0.99, "retries": 0,
                                                      "enforce": False}})
    summary = run_arithmetic(relaxed, tmp_path, log=logged.append)
    assert "base L1 r0" not in calls  # the failed attempt's base model is reused
    assert any("resuming with changed gates.enforce" in line for line in logged)
    recorded = json.loads((tmp_path / "config.json").read_text())["config"]
    assert recorded["gates"]["enforce"] is False and summary["gates_overridden"]
    with pytest.raises(Exception, match="modulus was 7, now 5"):  # other keys stay fixed
        run_arithmetic(load_config("quick", {**TINY, "modulus": 5}), tmp_path, **QUIET)
