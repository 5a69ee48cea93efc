"""fit and discover on tiny real problems."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from instill.core import MaskConfig
from instill.errors import ConfigError, TrainingError
from instill.training import (
    FUSED_ADAMW,
    DiscoveryConfig,
    FitConfig,
    discover,
    fit,
    make_optimizer,
)


def xor_data(n: int = 256, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (n, 2), generator=gen).float()
    y = (x[:, 0] != x[:, 1]).long()
    return x + 0.05 * torch.randn(x.shape, generator=gen), y


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def test_fit_learns_and_keeps_the_best_epoch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    x, y = xor_data()
    scores = []

    def evaluate(m):
        scores.append(accuracy(m, x, y))
        return scores[-1]

    result = fit(model, [x, y], loss_fn, FitConfig(epochs=30, batch_size=32, lr=1e-2),
                 evaluate=evaluate)
    assert result.best_score == max(scores) > 0.95
    assert accuracy(model, x, y) == result.best_score  # the best state is restored
    assert len(result.history) == 30 and not model.training


def test_fit_stops_early_with_patience():
    model = nn.Linear(2, 2)
    x, y = xor_data()
    result = fit(model, [x, y], loss_fn, FitConfig(epochs=50, patience=2),
                 evaluate=lambda m: 0.5)
    assert len(result.history) == 3 and result.best_epoch == 0


def test_nan_loss_stops_with_the_step_and_keeps_the_best_state():
    model = nn.Linear(2, 2)
    x, y = xor_data()
    calls = {"n": 0}

    def exploding(m, batch):
        calls["n"] += 1
        loss = loss_fn(m, batch)
        return loss * float("nan") if calls["n"] > 10 else loss

    with pytest.raises(TrainingError, match=r"nan at epoch 1, step 2.*lower the learning rate"):
        fit(model, [x, y], exploding, FitConfig(epochs=5, batch_size=32),
            evaluate=lambda m: 1.0)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_discover_finds_a_working_sparse_subnetwork_and_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 2))
    x, y = xor_data(512)
    fit(model, [x, y], loss_fn, FitConfig(epochs=40, batch_size=32, lr=1e-2))
    before = {n: p.clone() for n, p in model.named_parameters()}
    cfg = DiscoveryConfig(epochs=20, batch_size=64, lr=0.05, final_temperature=100,
                          mask=MaskConfig(init=0.5, l0_lambda=1e-3))
    sub, history = discover(model, [x, y], loss_fn, cfg)
    assert history[-1]["temperature"] == pytest.approx(100.0)
    assert 0 < sub.density() < 0.9
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    from instill import apply_subnetwork

    with apply_subnetwork(model, sub, "keep"):
        assert accuracy(model, x, y) > 0.95


def test_eval_every_validates_every_kth_epoch_and_the_last():
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    x, y = xor_data()
    calls = []

    def evaluate(m):
        calls.append(1)
        return float(len(calls))  # later validations score higher

    result = fit(model, [x, y], loss_fn, FitConfig(epochs=7, eval_every=3), evaluate=evaluate)
    assert [row["epoch"] for row in result.history if "val" in row] == [2, 5, 6]
    assert len(calls) == 3 and result.best_epoch == 6
    with pytest.raises(ConfigError, match="eval_every"):
        FitConfig(eval_every=0)


@pytest.mark.parametrize("fused", [True, False])
def test_fused_adamw_is_an_option_that_gives_the_same_training(fused):
    def train(cfg):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
        fit(model, list(xor_data()), loss_fn, cfg)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    opt = make_optimizer([nn.Parameter(torch.zeros(2))], FitConfig(fused=fused))
    assert bool(opt.defaults.get("fused")) == (fused and FUSED_ADAMW)
    assert not FitConfig().fused and not DiscoveryConfig().fused  # torch's default AdamW
    reference = train(FitConfig(epochs=3, lr=1e-2, fused=False))
    assert torch.allclose(train(FitConfig(epochs=3, lr=1e-2, fused=fused)), reference,
                          atol=1e-5)


def test_stop_at_ends_training_once_validation_holds_the_target():
    scores = iter([0.4, 0.99, 0.5, 0.99, 1.0, 1.0, 1.0, 1.0])
    model = nn.Linear(2, 2)
    data = xor_data(32)
    cfg = FitConfig(epochs=8, stop_at=0.99, stop_after=2)
    result = fit(model, data, loss_fn, cfg, evaluate=lambda m: next(scores))
    assert [row["val"] for row in result.history] == [0.4, 0.99, 0.5, 0.99, 1.0]
    once = iter([0.4, 0.99, 0.5])
    result = fit(model, data, loss_fn, FitConfig(epochs=3, stop_at=0.99),
                 evaluate=lambda m: next(once))
    assert len(result.history) == 2  # stop_after=1: the first score at the target ends it
    with pytest.raises(ConfigError, match="stop_after must be >= 1"):
        FitConfig(stop_at=0.9, stop_after=0)
