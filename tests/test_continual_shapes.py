"""`instill continual --task shapes`: the shape world split into class groups with a head per
task. Earlier tasks' weights, BatchNorm parameters and statistics and heads stay bit-identical,
task t is evaluated with exactly its weights and head, a tiny run writes every output, test
images are held out, and replay's buffer holds the configured count from earlier tasks only."""

from __future__ import annotations

import json

import pytest
import torch

from instill.core import MaskConfig
from instill.core.isolation import Allocation, task_view
from instill.errors import ConfigError
from instill.experiments.continual import ContinualRun, load_config, run_continual
from instill.experiments.continual_config import parse_method
from instill.experiments.continual_steps import allocation_mask, replay_data
from instill.tasks.task_sequences import replay_buffer

torch.set_num_threads(1)
TINY = {"task": "shapes", "replicates": 1, "gates": {"enforce": False}, "replay": 6,
        "shapes": {"groups": [[0, 1], [2, 3]], "classes": 4, "train_per_class": 24,
                   "select_per_class": 6, "test_per_class": 10, "embedding_size": 8,
                   "hidden_sizes": [8, 8, 16]},
        "methods": ["subnetwork", "packnet", "finetune", "replay", "joint", "independent"],
        "fit": {"epochs": 2, "patience": None}, "retrain": {"epochs": 1},
        "discovery": {"epochs": 2, "batch_size": 16, "mask": {"init": 0.05, "l0_lambda": 1e-4}}}
OUTPUTS = ["results.csv", "summary.json", "accuracy_matrix.png", "capacity.png", "report.md",
           "manifest.json"]


def tiny(**changes):
    values = json.loads(json.dumps(TINY))
    values.update(changes)
    return load_config("quick", None, values)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("continual-shapes")
    summary = run_continual(tiny(), out, log=lambda _: None)
    return out, summary, ContinualRun(tiny(), out, log=lambda _: None)


def where(method: str) -> str:
    return f"pipelines/r0-{method}/a0"


def test_a_tiny_two_task_shapes_run_writes_every_output(tiny_run):
    out, summary, run = tiny_run
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    assert set(summary["methods"]) == set(TINY["methods"])
    assert summary["sequence"] == run.seq.names == ["disk+square", "triangle+cross"]
    assert "2 shapes tasks" in summary["headline"]


def test_test_images_are_held_out_and_tasks_see_only_their_classes(tiny_run):
    _, _, run = tiny_run
    for t in range(2):
        train, test = run.seq.train(t)[0].flatten(1), run.seq.test(t)[0].flatten(1)
        assert not (torch.cdist(test, train) == 0).any()  # no test image is a training image
        for data in (run.seq.train(t), run.seq.select(t), run.seq.test(t)):
            assert (data[2] == t).all() and set(data[1].tolist()) == {2 * t, 2 * t + 1}


@pytest.mark.parametrize("method", ["subnetwork", "packnet"])
def test_task0s_weights_batchnorm_and_head_are_bit_identical_after_task1(tiny_run, method):
    _, _, run = tiny_run
    before, after = run.load(where(method), "task0"), run.load(where(method), "task1")
    alloc0 = run.allocation(where(method), 0)
    assert alloc0.owned(0).kept() > 0 and not any(n.startswith("heads") for n in alloc0.owners)
    state0, state1 = before.state_dict(), after.state_dict()
    norms = [n for n in state0 if "normalization" in n]
    assert any(n.endswith("running_mean") for n in norms)
    for name, value in state0.items():
        if name in alloc0.owners:
            mask = alloc0.owned(0).masks[name]
            assert torch.equal(state1[name][mask], value[mask]), name
        elif not name.startswith("heads.1"):  # BN (stats too), task 0's head: frozen
            assert torch.equal(state1[name], value), name
    assert not torch.equal(state1["heads.1.weight"], state0["heads.1.weight"])  # task 1 trained


@pytest.mark.parametrize("method", ["subnetwork", "packnet"])
def test_evaluating_task_t_uses_exactly_its_weights_and_its_head(tiny_run, method):
    out, _, run = tiny_run
    images = run.seq.test(0)[0][:8]
    first, alloc0 = run.load(where(method), "task0"), run.allocation(where(method), 0)
    final, alloc = run.load(where(method), "task1"), run.allocation(where(method), 1)
    with torch.no_grad():
        with task_view(first, alloc0, 0) as view:
            expected = view(pixel_values=images)[:, :2]
        noisy = run.load(where(method), "task1")  # all task 0 does not own, scrambled
        for name, owner in alloc.owners.items():
            param = noisy.get_parameter(name)
            param.copy_(torch.where(owner == 0, param, torch.randn_like(param)))
        noisy.heads[1].weight.normal_()
        for model in (final, noisy):
            with task_view(model, alloc, 0) as view:
                assert torch.equal(view(pixel_values=images)[:, :2], expected)
        assert not torch.equal(noisy(pixel_values=images)[:, :2], expected)  # it does read them
    record = json.loads((out / where(method) / "task1.json").read_text())
    assert record["accuracy"][0] == run.accuracy(final, 0, alloc)
    assert record["accuracy"][0] == json.loads(
        (out / where(method) / "task0.json").read_text())["accuracy"][0]


def test_finetune_freezes_earlier_heads_but_moves_the_backbone(tiny_run):
    _, _, run = tiny_run
    before = run.load(where("finetune"), "task0").state_dict()
    after = run.load(where("finetune"), "task1").state_dict()
    assert torch.equal(after["heads.0.weight"], before["heads.0.weight"])
    assert not torch.equal(after["heads.1.weight"], before["heads.1.weight"])
    assert not all(torch.equal(after[n], before[n]) for n in before if n.startswith("backbone"))


def test_replay_buffer_holds_the_configured_count_from_earlier_tasks_only(tiny_run):
    _, _, run = tiny_run
    pools = [(torch.arange(10) + 100 * t, torch.full((10,), t)) for t in range(3)]
    (values, tags), owners = replay_buffer(pools, 7, seed=1)
    assert len(values) == 7 and owners.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert torch.equal(tags, owners) and torch.equal(values // 100, owners)
    assert len(set(values.tolist())) == 7  # drawn without replacement
    images, _, tasks = replay_data(run.seq, 1, 6, seed=0)
    own = run.seq.train(1)
    assert torch.equal(images[:len(own[0])], own[0])
    replayed = tasks[len(own[0]):]
    assert len(replayed) % 6 == 0 and (replayed == 0).all()
    assert len(torch.unique(images[len(own[0]):].flatten(1), dim=0)) == 6
    assert replay_data(run.seq, 0, 6, seed=0) is run.seq.train(0)


def test_replay_trains_earlier_heads_with_the_buffer(tiny_run):
    _, _, run = tiny_run
    before = run.load(where("replay"), "task0").state_dict()
    after = run.load(where("replay"), "task1").state_dict()
    assert not torch.equal(after["heads.0.weight"], before["heads.0.weight"])


@pytest.mark.parametrize("exclude", [None, r"backbone\.embedder\..*",
                                     ["backbone.embedder.embedder.convolution"]])
def test_every_head_is_left_out_of_the_allocation_whatever_the_users_exclude(tiny_run, exclude):
    _, _, run = tiny_run
    mask = allocation_mask(MaskConfig(exclude=exclude), run.seq)
    names = set(Allocation.from_model(run.seq.build(), mask.targets, mask.exclude).owners)
    assert names and not any(n.startswith("heads.") for n in names)
    assert any(n.startswith("backbone.embedder") for n in names) == (exclude is None)


def test_shape_groups_and_method_names_are_checked():
    with pytest.raises(ConfigError, match="disjoint"):
        tiny(shapes={**TINY["shapes"], "groups": [[0, 1], [1, 2]]})
    with pytest.raises(ConfigError, match="at least two groups"):
        tiny(shapes={**TINY["shapes"], "groups": [[0, 1]]})
    with pytest.raises(ConfigError, match="only after packnet"):
        tiny(methods=["finetune@0.1"])
    spec = parse_method("packnet-reinit@0.1")
    assert (spec.base, spec.reinit, spec.keep) == ("packnet", True, 0.1)
