"""Parameter isolation: frozen tasks stay bit-identical, task views, capacity, pruning, files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make, run
from torch import nn

import instill
from instill.core.isolation import (
    Allocation,
    CapacityError,
    IsolationError,
    isolate,
    packnet_prune,
    task_state,
    task_view,
)
from instill.errors import FileFormatError, SubnetworkMismatchError
from instill.training import FitConfig, fit

torch.set_num_threads(1)
ADAMW = FitConfig(epochs=3, batch_size=16, lr=1e-2, weight_decay=0.1)


def mlp(seed: int = 0) -> nn.Module:
    """A 2-layer MLP: both Linear weights are targeted, the biases are not."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


class NormNet(nn.Module):
    """Linear + BatchNorm body and a separate head, to test untargeted and per-task params."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(x)).relu())


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(64, 8, generator=gen), torch.randint(0, 4, (64,), generator=gen)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def split(alloc: Allocation, tasks: int, seed: int = 0) -> Allocation:
    """Give each of `tasks` tasks a random quarter of the weights."""
    owner = torch.Generator().manual_seed(seed)
    draws = {n: torch.randint(0, 4, o.shape, generator=owner) for n, o in alloc.owners.items()}
    for t in range(tasks):
        sub = instill.Subnetwork({n: d == t for n, d in draws.items()}, alloc.fingerprint)
        alloc = alloc.claim(t, sub)
    return alloc


def train_task(model: nn.Module, alloc: Allocation, task: int, **kw) -> nn.Module:
    """Isolate, train with AdamW (weight decay 0.1), and bake back to a plain model."""
    new = isolate(model, alloc, task, **kw)
    fit(new, data(task), loss_fn, ADAMW, seed=task)
    return instill.bake(new)


def test_task0_weights_are_bit_identical_after_training_task1_with_adamw():
    alloc = Allocation.from_model(mlp())
    after0 = train_task(mlp(), alloc, 0, reinit_free=False)
    alloc = alloc.claim(0, packnet_prune(after0, alloc, 0, 0.5))
    after1 = train_task(after0, alloc, 1, reinit_free=True, seed=1)
    for name, mask in alloc.owned(0).masks.items():
        w0, w1 = after0.get_parameter(name), after1.get_parameter(name)
        assert torch.equal(w1[mask], w0[mask])  # bit for bit, despite weight decay
        assert not torch.equal(w1[~mask], w0[~mask])  # the free weights did train
    for name in ("0.bias", "2.bias"):  # untargeted: frozen after task 0
        assert torch.equal(after1.get_parameter(name), after0.get_parameter(name))
    plain = mlp()  # control: without isolation the same training moves task 0's weights
    fit(plain, data(1), loss_fn, ADAMW, seed=1)
    assert not torch.equal(plain[0].weight, mlp()[0].weight)


def test_reinit_free_draws_fresh_values_only_in_free_weights():
    model, alloc = mlp(), split(Allocation.from_model(mlp()), 3)  # task 2 owns some already
    new = instill.bake(isolate(model, alloc, 2, reinit_free=True, seed=7))
    fresh = instill.fresh_init(model, seed=7)
    for name, mask in alloc.free().masks.items():
        expected = torch.where(mask, fresh.get_parameter(name), model.get_parameter(name))
        assert torch.equal(new.get_parameter(name), expected)


def test_norm_statistics_and_shared_params_freeze_after_task0_but_a_per_task_head_trains():
    torch.manual_seed(0)
    model = NormNet()
    alloc = Allocation.from_model(model, exclude=["head"])
    assert set(alloc.owners) == {"body.weight"}
    after0 = train_task(model, alloc, 0, reinit_free=False, per_task=["head"])
    assert not torch.equal(after0.norm.running_mean, model.norm.running_mean)  # task 0 trains it
    head0 = task_state(after0, ["head"])
    alloc = alloc.claim(0, packnet_prune(after0, alloc, 0, 0.5))
    after1 = train_task(after0, alloc, 1, reinit_free=False, per_task=["head"])
    trains = {n for n, p in isolate(after0, alloc, 1, reinit_free=False, per_task=["head"])
              .named_parameters() if p.requires_grad}  # frozen ones get no optimizer state
    assert trains == {"body.parametrizations.weight.original", "head.weight", "head.bias"}
    for name in ("norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
                 "body.bias"):
        assert torch.equal(after1.state_dict()[name], after0.state_dict()[name]), name
    assert not torch.equal(after1.head.weight, head0["head.weight"])
    x = data(0)[0]
    with torch.no_grad(), task_view(after1, alloc, 0, head=head0) as view:
        assert torch.equal(view.head.weight, head0["head.weight"])
        out = view.eval()(x)
    with torch.no_grad(), task_view(after0, alloc, 0):
        assert torch.equal(out, after0.eval()(x))  # task 0 answers exactly as when learnt
    assert not torch.equal(after1.head.weight, head0["head.weight"])  # restored
    with pytest.raises(ValueError, match="excluded"):
        isolate(model, alloc, 1, reinit_free=False, per_task=["body"])


def test_train_free_false_holds_free_weights_at_zero_and_trains_only_the_task():
    model = mlp()
    alloc = split(Allocation.from_model(model), 2)
    after = train_task(model, alloc, 1, reinit_free=False, train_free=False)
    for name, owner in alloc.owners.items():
        w, w_before = after.get_parameter(name), model.get_parameter(name)
        assert not w[owner == -1].any()
        assert torch.equal(w[owner == 0], w_before[owner == 0])
        assert not torch.equal(w[owner == 1], w_before[owner == 1])


def test_task_view_uses_exactly_the_weights_of_tasks_up_to_t_and_restores_exactly():
    model = mlp()
    alloc = split(Allocation.from_model(model), 3)
    before, x = snapshot(model), data(0)[0]
    for task in range(3):
        manual = mlp()
        with torch.no_grad():
            for name, owner in alloc.owners.items():
                keep = (owner >= 0) & (owner <= task)
                manual.get_parameter(name).mul_(keep)
        with torch.no_grad(), task_view(model, alloc, task) as view:
            for name, param in manual.named_parameters():
                assert torch.equal(view.get_parameter(name), param)
            assert torch.equal(view(x), manual(x))
        assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"), task_view(model, alloc, 0):
        raise RuntimeError("boom")
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_capacity_adds_up_to_the_total():
    alloc = split(Allocation.from_model(mlp()), 3)
    cap = alloc.capacity()
    assert cap["total"] == 8 * 16 + 16 * 4 == alloc.free().total()
    assert sorted(cap["tasks"]) == [0, 1, 2] == alloc.tasks()
    assert cap["free"] == alloc.free().kept() > 0
    assert cap["free"] + sum(t["kept"] for t in cap["tasks"].values()) == cap["total"]
    for task, row in cap["tasks"].items():
        assert row["kept"] == alloc.owned(task).kept() > 0
        assert row["fraction"] == pytest.approx(row["kept"] / cap["total"])
    assert cap["free_fraction"] + sum(t["fraction"] for t in cap["tasks"].values()) \
        == pytest.approx(1.0)
    assert alloc.upto(1) == alloc.owned(0) | alloc.owned(1)


def test_claiming_owned_weights_or_claiming_out_of_order_raises():
    alloc = split(Allocation.from_model(mlp()), 2)
    overlap = alloc.owned(0) | alloc.free()
    with pytest.raises(CapacityError, match=f"claims {alloc.owned(0).kept()} weights that tasks "
                                            r"\[0\] already own"):
        alloc.claim(2, overlap)
    with pytest.raises(IsolationError, match="in order"):
        alloc.claim(0, alloc.free())
    with pytest.raises(SubnetworkMismatchError):
        alloc.claim(2, instill.Subnetwork({"0.weight": alloc.free().masks["0.weight"]},
                                          alloc.fingerprint))
    assert alloc.claim(2, alloc.free()).free().kept() == 0
    assert alloc.free().kept() > 0  # claim returned a new allocation
    with pytest.raises(IsolationError, match="already owns"):
        isolate(mlp(), alloc, 0, reinit_free=False)


def test_running_out_of_capacity_raises_with_the_fix():
    alloc = split(Allocation.from_model(mlp()), 3)
    assert alloc.check_capacity(0.2)["free"] == alloc.free().kept()
    with pytest.raises(CapacityError, match=r"fewer tasks.*bigger model"):
        alloc.check_capacity(0.5)
    full = alloc.claim(3, alloc.free())
    with pytest.raises(CapacityError, match="no free weights"):
        packnet_prune(mlp(), full, 4, 0.5)
    model = mlp()
    with pytest.raises(CapacityError, match="nothing is left to train"):
        isolate(model, full, 4, reinit_free=False)


def test_packnet_prune_keeps_exactly_the_requested_count_among_free_weights_only():
    model = mlp()
    alloc = split(Allocation.from_model(model), 2)
    with torch.no_grad():  # owned weights are the largest: a prune ignoring owners takes them
        for name, owner in alloc.owners.items():
            model.get_parameter(name)[owner >= 0] = 100.0
    sub = packnet_prune(model, alloc, 2, 0.3)
    free = alloc.free()
    assert (sub - free).kept() == 0
    for name, mask in sub.masks.items():
        n_free = int(free.masks[name].sum())
        assert int(mask.sum()) == round(0.3 * n_free)
        w = model.get_parameter(name).abs()
        left = free.masks[name] & ~mask
        assert w[mask].min() >= w[left].max()  # the largest free magnitudes
    assert alloc.claim(2, sub).owned(2) == sub


def test_allocation_save_load_round_trip(tmp_path):
    alloc = split(Allocation.from_model(mlp()), 2)
    alloc = Allocation(alloc.owners, alloc.fingerprint, {"experiment": "continual"})
    alloc.save(tmp_path / "alloc.safetensors")
    back = Allocation.load(tmp_path / "alloc.safetensors")
    assert back.owners.keys() == alloc.owners.keys()
    assert all(torch.equal(back.owners[n], o) and back.owners[n].dtype == torch.int16
               for n, o in alloc.owners.items())
    assert back.fingerprint == alloc.fingerprint and back.metadata == alloc.metadata
    alloc.free().save(tmp_path / "sub.safetensors")
    with pytest.raises(FileFormatError, match="not an instill allocation"):
        Allocation.load(tmp_path / "sub.safetensors")


def test_isolate_and_task_view_reject_another_architecture():
    alloc = Allocation.from_model(mlp())
    other = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    with pytest.raises(SubnetworkMismatchError):
        isolate(other, alloc, 0, reinit_free=False)
    with pytest.raises(SubnetworkMismatchError), task_view(other, alloc, 0):
        pass


def test_task0_outputs_are_unchanged_after_task1_on_every_architecture(arch):
    model, batch = make(arch)
    alloc = Allocation.from_model(model)
    alloc = alloc.claim(0, packnet_prune(model, alloc, 0, 0.5))
    new = isolate(model, alloc, 1, reinit_free=True, seed=1).train()
    opt = torch.optim.AdamW(new.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        run(new, batch).pow(2).mean().backward()
        opt.step()
    after = instill.bake(new)
    before_state, after_state = model.state_dict(), after.state_dict()
    for name, tensor in before_state.items():  # norm statistics and tied embeddings included
        keep = alloc.owned(0).masks.get(name, torch.ones_like(tensor, dtype=torch.bool))
        assert torch.equal(after_state[name][keep], tensor[keep]), name
    with torch.no_grad(), task_view(after, alloc, 0) as view:
        out = run(view.eval(), batch)
    with torch.no_grad(), task_view(model, alloc, 0) as view:
        assert torch.equal(out, run(view.eval(), batch))


def test_a_layer_task0_owns_whole_gets_no_gradient_but_still_computes():
    model = mlp()
    alloc = Allocation.from_model(model)
    whole = {n: torch.full_like(o, n == "0.weight", dtype=torch.bool)
             for n, o in alloc.owners.items()}
    alloc = alloc.claim(0, instill.Subnetwork(whole, alloc.fingerprint))
    new = isolate(model, alloc, 1, reinit_free=True, seed=3)
    grads = {n: p.requires_grad for n, p in new.named_parameters()}
    assert grads == {"0.parametrizations.weight.original": False,
                     "0.parametrizations.bias.original": False,  # task 0's, in a buffer
                     "2.parametrizations.weight.original": True,
                     "2.parametrizations.bias.original": False}
    assert torch.equal(new[0].weight, model[0].weight)
