"""`instill continual`: frozen tasks stay bit-identical, task views use exactly their weights,
a tiny two-task run writes every output and resumes, capacity adds up, running out is clear."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from instill.core.isolation import Allocation, CapacityError, task_view
from instill.experiments.continual import ContinualRun, load_config, run_continual
from instill.experiments.continual_steps import replay_data
from instill.tasks.task_sequences import TaskTokenSpec, all_pairs, task_sequences

torch.set_num_threads(1)
TINY = {"replicates": 1, "sequence": ["a + b", "a - b"], "numbers": 5, "modulus": 5,
        "repeat": 4, "replay": 10, "n_layer": 1, "n_embd": 32, "gates": {"enforce": False},
        "methods": ["subnetwork", "subnetwork-reinit", "packnet", "packnet@0.1", "finetune",
                    "replay", "joint", "independent"],
        "fit": {"epochs": 3}, "retrain": {"epochs": 1},
        "discovery": {"epochs": 2, "batch_size": 16, "mask": {"init": 0.05, "l0_lambda": 1e-4}}}
OUTPUTS = ["results.csv", "summary.json", "accuracy_matrix.png", "capacity.png", "report.md",
           "manifest.json"]


def tiny(**changes):
    values = json.loads(json.dumps(TINY))
    values.update(changes)
    return load_config("quick", None, values)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("continual")
    summary = run_continual(tiny(), out, log=lambda _: None)
    return out, summary, ContinualRun(tiny(), out, log=lambda _: None)


def where(method: str) -> str:
    return f"pipelines/r0-{method}/a0"


def test_a_tiny_two_task_run_writes_every_output_and_resumes_without_training(tiny_run):
    out, summary, _ = tiny_run
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    assert summary["headline"] and set(summary["methods"]) == set(TINY["methods"])
    stamps = {p: p.stat().st_mtime_ns for p in (out / "pipelines").rglob("*.safetensors")}
    again = run_continual(tiny(), out, log=lambda _: None)
    assert again["headline"] == summary["headline"]
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "pipelines").rglob("*.safetensors")}


@pytest.mark.parametrize("method", ["subnetwork", "subnetwork-reinit", "packnet"])
def test_frozen_weights_of_task0_are_bit_identical_after_task1(tiny_run, method):
    _, _, run = tiny_run
    before, after = run.load(where(method), "task0"), run.load(where(method), "task1")
    alloc0 = run.allocation(where(method), 0)
    assert alloc0.owned(0).kept() > 0
    params0, params1 = dict(before.named_parameters()), dict(after.named_parameters())
    for name, mask in alloc0.owned(0).masks.items():
        assert torch.equal(params1[name][mask], params0[name][mask]), name
    moved = False
    for name, value in params0.items():
        if name in alloc0.owners:
            moved |= not torch.equal(params1[name], value)  # task 1 trained its weights
        else:  # embeddings (task tokens included), norms, biases: task 0's, frozen
            assert torch.equal(params1[name], value), name
    assert moved


@pytest.mark.parametrize("method", ["subnetwork", "packnet"])
def test_evaluating_task_t_uses_exactly_the_weights_of_tasks_up_to_t(tiny_run, method):
    out, _, run = tiny_run
    final, alloc = run.load(where(method), "task1"), run.allocation(where(method), 1)
    first, alloc0 = run.load(where(method), "task0"), run.allocation(where(method), 0)
    seqs = run.seq.evals[0][:, :4]
    with torch.no_grad():
        with task_view(first, alloc0, 0) as view:
            expected = view(input_ids=seqs).logits
        with task_view(final, alloc, 0) as view:
            assert torch.equal(view(input_ids=seqs).logits, expected)
        noisy = run.load(where(method), "task1")  # weights task 0 does not own: scrambled
        for name, owner in alloc.owners.items():
            param = noisy.get_parameter(name)
            param.copy_(torch.where(owner == 0, param, torch.randn_like(param)))
        with task_view(noisy, alloc, 0) as view:
            assert torch.equal(view(input_ids=seqs).logits, expected)
    rows = list(csv.DictReader((out / "results.csv").open()))
    acc = {(r["after"], r["task"]): r["accuracy"] for r in rows if r["method"] == method}
    assert acc["1", "0"] == acc["0", "0"]  # zero forgetting, to the last printed digit
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"][method]["bit_exact_replicates"] == 1
    assert summary["methods"][method]["forgetting"]["mean"] == 0.0


def test_capacity_accounting_adds_up(tiny_run):
    out, summary, _ = tiny_run
    for method in ("subnetwork", "packnet"):
        total_kept = 0
        for t in range(2):
            record = json.loads((out / where(method) / f"task{t}.json").read_text())
            cap = record["capacity"]
            total_kept += cap["kept"]
            assert cap["kept"] + cap["free"] + sum(  # earlier tasks' weights
                json.loads((out / where(method) / f"task{s}.json").read_text())
                ["capacity"]["kept"] for s in range(t)) == cap["total"]
            assert cap["density"] == pytest.approx(cap["kept"] / cap["total"])
            assert Allocation.load(out / where(method) / f"alloc{t}.safetensors") \
                .owned(t).kept() == cap["kept"]
        entry = summary["methods"][method]
        used = sum(d["mean"] for d in entry["density_per_task"])
        assert used + entry["free_left"]["mean"] == pytest.approx(1.0)
    packnet = [json.loads((out / where("packnet") / f"task{t}.json").read_text())["capacity"]
               for t in range(2)]
    assert packnet[0]["density"] == pytest.approx(0.25, abs=1e-3)  # packnet_keep of the free
    swept = [json.loads((out / where("packnet@0.1") / f"task{t}.json").read_text())["capacity"]
             for t in range(2)]
    assert swept[0]["density"] == pytest.approx(0.1, abs=1e-3)  # packnet@0.1: its own fraction
    assert swept[1]["density"] == pytest.approx(0.09, abs=1e-3)
    assert set(summary["density_vs"]) == {"packnet", "packnet@0.1"}


def test_replay_trains_on_the_task_plus_a_buffer_of_the_configured_count_of_task0(tiny_run):
    _, summary, run = tiny_run
    data = replay_data(run.seq, 1, run.cfg.replay, seed=0)[0]
    own = run.seq.train(1)[0]
    assert torch.equal(data[:len(own)], own)
    replayed = data[len(own):]
    assert (replayed[:, 0] == run.seq.spec.task_token(0)).all()  # task 0's rows only
    assert len(torch.unique(replayed, dim=0)) == run.cfg.replay
    assert "replay" in summary["subnetwork_vs"]


def test_running_out_of_capacity_is_a_clear_error(tmp_path):
    with pytest.raises(CapacityError, match="lower packnet_keep"):
        tiny(sequence=["a + b", "a - b", "a*b", "a^2 + b"], packnet_keep=0.9, min_free=0.05,
             methods=["packnet"])
    greedy = tiny(methods=["subnetwork"], discovery={"epochs": 1, "mask": {"init": 1.0}})
    with pytest.raises(CapacityError, match=r"0 of \d+ targeted weights .*fewer tasks"):
        run_continual(greedy, tmp_path, log=lambda _: None)


def test_task_token_sequences_share_the_vocabulary():
    spec = TaskTokenSpec(numbers=5, modulus=5, tasks=3)
    a, b = all_pairs(5)
    rows = task_sequences(a, b, "a - b", 2, spec)
    assert rows.shape == (25, 5) and spec.vocab_size == 9
    assert (rows[:, 0] == 8).all() and (rows[:, 3] == 5).all()
    assert torch.equal(rows[:, 4], (a - b) % 5)
