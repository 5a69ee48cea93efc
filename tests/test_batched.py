"""fit_batched: K models trained in one vmapped step each end as their own `fit` would."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from instill.batched import discover_batched, fit_batched
from instill.core import MaskConfig, Subnetwork, bake, transplant
from instill.errors import ConfigError, TrainingError
from instill.models import build_model
from instill.tasks.arithmetic import ArithmeticSpec
from instill.tasks.sequences import SequenceTask
from instill.training import DiscoveryConfig, FitConfig, discover, fit

SPEC = ArithmeticSpec(numbers=19, modulus=7)  # vocabulary 20
TASK = SequenceTask(SPEC, "answer")
MASKED = ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight")


def gpt2(seed: int, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("gpt2", vocab_size=SPEC.vocab_size, n_positions=4, n_embd=16,
                       n_layer=1, n_head=2, dropout=dropout)


def sequences(seed: int, n: int = 48) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    a, b = (torch.randint(0, SPEC.numbers, (n,), generator=gen) for _ in range(2))
    return torch.stack([a, b, torch.full_like(a, SPEC.sep_token), (a * b + a) % 7], 1)


VAL = sequences(99, 32)


def neg_val_loss(model: nn.Module) -> float:
    """A smooth validation score (ties between epochs are unlikely, unlike accuracy)."""
    with torch.no_grad():
        return -TASK.loss(model, [VAL]).item()


def random_sub(model: nn.Module, seed: int) -> Subnetwork:
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    return Subnetwork({n: torch.rand(params[n].shape, generator=gen) < 0.4 for n in MASKED},
                      {n: tuple(p.shape) for n, p in params.items()})


def assert_close_states(a: nn.Module, b: nn.Module, atol: float = 1e-4) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=atol, rtol=1e-4, msg=name)


CFG = FitConfig(epochs=3, batch_size=16, lr=3e-3, weight_decay=0.1)


def test_each_model_matches_its_own_fit() -> None:
    """Plain, transplanted and masked-plain models, each with its own data order and data."""
    base = gpt2(7)
    plain, grafted, masked = gpt2(0), transplant(base, random_sub(base, 1), seed=3), gpt2(2)
    sub = random_sub(masked, 2)
    models = [plain, grafted, masked]
    refs = [copy.deepcopy(plain), copy.deepcopy(grafted),
            transplant(masked, sub, fresh=copy.deepcopy(masked))]  # freezes `masked` as is
    datas = [[sequences(10 + k)] for k in range(3)]
    results = fit_batched(models, datas, TASK.loss, CFG, seeds=[0, 1, 2],
                          evaluate=[neg_val_loss] * 3, masks=[None, None, sub])
    for k, (model, ref) in enumerate(zip(models, refs, strict=True)):
        expected = fit(ref, datas[k], TASK.loss, CFG, evaluate=neg_val_loss, seed=k)
        assert results[k].best_epoch == expected.best_epoch
        assert results[k].best_score == pytest.approx(expected.best_score, abs=1e-5)
        assert [r["epoch"] for r in results[k].history] == [0, 1, 2]
        for got, want in zip(results[k].history, expected.history, strict=True):
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
        assert_close_states(model, bake(ref) if k == 2 else ref)
        assert not model.training


def test_reruns_are_bit_identical_and_dropout_is_per_model() -> None:
    def run() -> list[nn.Module]:
        models = [gpt2(0, dropout=0.1), gpt2(0, dropout=0.1), gpt2(1, dropout=0.1)]
        torch.manual_seed(123)  # dropout draws come from the global generator
        fit_batched(models, [[sequences(5)]] * 3, TASK.loss, CFG, seeds=[4, 4, 5])
        return models

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
    # models 0 and 1 share weights, data and order: only their dropout draws differ
    w0, w1 = (m.transformer.h[0].mlp.c_fc.weight for m in first[:2])
    assert not torch.equal(w0, w1)


def test_with_counter_dropout_each_model_matches_its_own_fit_with_dropout() -> None:
    """Counter-based dropout draws each model's masks from its seed and step, so a stack with
    dropout 0.1 gives what each model's own `fit` gives, within float rounding."""
    cfg = FitConfig(epochs=3, batch_size=16, lr=3e-3, dropout_rng="counter")
    base = gpt2(0, dropout=0.1)
    models = [transplant(base, random_sub(base, 1), seed=10), gpt2(5, dropout=0.1)]
    alone = [copy.deepcopy(m) for m in models]
    datas, seeds = [[sequences(20)], [sequences(21)]], [100, 101]
    stacked = fit_batched(models, datas, TASK.loss, cfg, seeds=seeds,
                          evaluate=[neg_val_loss] * 2)
    for k, ref in enumerate(alone):
        expected = fit(ref, datas[k], TASK.loss, cfg, evaluate=neg_val_loss, seed=seeds[k])
        assert stacked[k].best_epoch == expected.best_epoch
        for got, want in zip(stacked[k].history, expected.history, strict=True):
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
        assert_close_states(models[k], ref)
    torch_rng = gpt2(5, dropout=0.1)  # the same model with torch's dropout trains otherwise
    fit(torch_rng, datas[1], TASK.loss, FitConfig(epochs=3, batch_size=16, lr=3e-3), seed=101)
    assert not torch.equal(torch_rng.transformer.h[0].mlp.c_fc.weight,
                           models[1].transformer.h[0].mlp.c_fc.weight)


def test_fused_adamw_on_the_stack_matches_each_model() -> None:
    """The vmapped gradients of a stack are not laid out like its weights; torch's fused CPU
    AdamW reads raw memory, so without making them contiguous it mixed the models' updates
    (a first-epoch loss 1e-3 off with three models, exact with one)."""
    cfg = FitConfig(epochs=2, batch_size=16, lr=3e-3, fused=True)
    models = [gpt2(k) for k in range(3)]
    alone = [copy.deepcopy(m) for m in models]
    datas = [[sequences(40 + k)] for k in range(3)]
    stacked = fit_batched(models, datas, TASK.loss, cfg, seeds=[0, 1, 2])
    for k, ref in enumerate(alone):
        expected = fit(ref, datas[k], TASK.loss, cfg, seed=k)
        for got, want in zip(stacked[k].history, expected.history, strict=True):
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
        assert_close_states(models[k], ref)


def test_frozen_entries_stay_and_weight_decay_applies() -> None:
    base = gpt2(7)
    grafted, plain = transplant(base, random_sub(base, 1), seed=3), gpt2(2)
    sub = random_sub(plain, 2)
    eff_before = {n: _effective(grafted, n).clone() for n in MASKED}
    original = grafted.transformer.h[0].attn.c_attn.parametrizations.weight.original
    orig_before = original.detach().clone()
    plain_before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    cfg = FitConfig(epochs=2, batch_size=16, lr=1e-2, weight_decay=0.5)
    fit_batched([grafted, plain], [[sequences(1)], [sequences(2)]], TASK.loss, cfg,
                seeds=[0, 1], masks=[None, sub])
    for name in MASKED:
        mask = _mask(grafted, name)
        after = _effective(grafted, name)
        assert torch.equal(after[mask], eff_before[name][mask])
        assert not torch.equal(after[~mask], eff_before[name][~mask])
        now = dict(plain.named_parameters())[name].detach()
        assert torch.equal(now[sub.masks[name]], plain_before[name][sub.masks[name]])
        assert not torch.equal(now[~sub.masks[name]], plain_before[name][~sub.masks[name]])
    # under the mask the trainable copy gets no gradient, so AdamW only decays it
    mask, steps = _mask(grafted, MASKED[0]), 2 * 3
    decayed = orig_before[mask] * (1 - cfg.lr * cfg.weight_decay) ** steps
    torch.testing.assert_close(original.detach()[mask], decayed, rtol=1e-5, atol=0)


def _mask(model: nn.Module, name: str) -> Tensor:
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name).parametrizations[attr][0].mask


def _effective(model: nn.Module, name: str) -> Tensor:
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attr).detach()


def scheduled(scores: list[float]) -> Callable[[nn.Module], float]:
    it = iter(scores)
    return lambda model: next(it)


def test_early_stopping_per_model() -> None:
    """One stops on stop_at, one on patience, one runs all epochs; each equals its own fit."""
    cfg = FitConfig(epochs=6, batch_size=16, lr=3e-3, patience=2, stop_at=0.9, stop_after=2)
    schedules = [[0.5, 0.9, 0.95], [0.3, 0.6, 0.5, 0.4], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]
    models = [gpt2(k) for k in range(3)]
    refs = [copy.deepcopy(m) for m in models]
    datas = [[sequences(20 + k)] for k in range(3)]
    results = fit_batched(models, datas, TASK.loss, cfg, seeds=[0, 1, 2],
                          evaluate=[scheduled(s) for s in schedules])
    assert [len(r.history) for r in results] == [3, 4, 6]
    assert [r.best_epoch for r in results] == [2, 1, 5]
    for k in range(3):
        expected = fit(refs[k], datas[k], TASK.loss, cfg, evaluate=scheduled(schedules[k]),
                       seed=k)
        assert expected.best_epoch == results[k].best_epoch
        assert len(expected.history) == len(results[k].history)
        assert_close_states(models[k], refs[k])


@pytest.mark.parametrize("fused", [False, True])
def test_stacked_adamw_is_per_model_adamw(fused: bool) -> None:
    """AdamW is elementwise: on stacked tensors it is each model's own AdamW. Unfused it is
    bit for bit; the fused kernel rounds a vector tail differently unless slices align."""
    gen = torch.Generator().manual_seed(0)
    for shape, exact in (((3, 4, 16), True), ((3, 5, 7), not fused)):
        start = torch.randn(shape, generator=gen)
        grads = [torch.randn(shape, generator=gen) for _ in range(4)]
        stacked = start.clone().requires_grad_()
        opt = torch.optim.AdamW([stacked], lr=1e-2, weight_decay=0.1, fused=fused)
        singles = [start[k].clone().requires_grad_() for k in range(3)]
        opts = [torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1, fused=fused)
                for p in singles]
        for grad in grads:
            stacked.grad = grad.clone()
            opt.step()
            for k, (p, o) in enumerate(zip(singles, opts, strict=True)):
                p.grad = grad[k].clone()
                o.step()
        for k in range(3):
            if exact:
                assert torch.equal(stacked[k], singles[k])
            else:
                torch.testing.assert_close(stacked[k], singles[k], rtol=1e-6, atol=1e-7)


def test_batchnorm_buffers_match_fit() -> None:
    """A ResNet's running statistics are updated per model inside the vmapped step."""
    def resnet(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_model("resnet", num_labels=4, embedding_size=8, hidden_sizes=(8, 16),
                           depths=(1, 1))

    def loss(model: nn.Module, batch) -> Tensor:
        return F.cross_entropy(model(pixel_values=batch[0]).logits, batch[1])

    gen = torch.Generator().manual_seed(0)
    datas = [[torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 4, (16,),
                                                                      generator=gen)]
             for _ in range(2)]
    models = [resnet(0), resnet(1)]
    refs = [copy.deepcopy(m) for m in models]
    cfg = FitConfig(epochs=1, batch_size=8, lr=3e-3)
    fit_batched(models, datas, loss, cfg, seeds=[0, 1])
    for k in range(2):
        fit(refs[k], datas[k], loss, cfg, seed=k)
        assert_close_states(models[k], refs[k], atol=1e-5)


def test_nan_loss_names_the_model_and_keeps_states() -> None:
    def mlp(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_model("mlp", in_features=4, num_labels=3, hidden=(8,))

    def loss(model: nn.Module, batch) -> Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    bad = x.clone()
    bad[0, 0] = float("nan")
    models = [mlp(0), mlp(1)]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    with pytest.raises(TrainingError, match="model 1"):
        fit_batched(models, [[x, y], [bad, y]], loss, FitConfig(epochs=2, batch_size=8),
                    seeds=[0, 0])
    for model, state in zip(models, before, strict=True):
        for name, value in model.state_dict().items():
            assert torch.equal(value, state[name])


def test_mismatched_inputs_are_config_errors() -> None:
    models, data = [gpt2(0), gpt2(1)], [sequences(0)]
    with pytest.raises(ConfigError, match="seeds has 1 entries"):
        fit_batched(models, [data, data], TASK.loss, CFG, seeds=[0])
    with pytest.raises(ConfigError, match="batches align"):
        fit_batched(models, [data, [sequences(0, 40)]], TASK.loss, CFG, seeds=[0, 1])
    other = build_model("gpt2", vocab_size=SPEC.vocab_size, n_positions=4, n_embd=32,
                        n_layer=1, n_head=2)
    with pytest.raises(ConfigError, match="another architecture"):
        fit_batched([models[0], other], [data, data], TASK.loss, CFG, seeds=[0, 1])
    with pytest.raises(ConfigError, match="lacks"):
        fit_batched(models, [data, data], TASK.loss, CFG, seeds=[0, 1],
                    masks=[{"nope": torch.ones(1, dtype=torch.bool)}, None])


@pytest.mark.parametrize("extra", [{}, {"target_density": 0.2, "keep_best": True}],
                         ids=["landing", "target-and-best"])
def test_each_discovery_matches_its_own_discover(extra) -> None:
    """Stacked continuous sparsification finds what each model's `discover` finds: the same
    masks (up to the odd logit that float rounding puts across 0) and history."""
    cfg = DiscoveryConfig(epochs=3, batch_size=16, lr=5e-2, final_temperature=20.0,
                          mask=MaskConfig(l0_lambda=1e-4), **extra)
    models = [gpt2(0), gpt2(1), gpt2(2)]
    datas = [[sequences(30 + k)] for k in range(3)]
    evaluate = [neg_val_loss] * 3
    stacked = discover_batched(models, datas, TASK.loss, cfg, seeds=[5, 6, 7],
                               evaluate=evaluate)
    assert all(not any(parametrize.is_parametrized(m) for m in model.modules())
               for model in models)  # every model comes back plain
    for k, (sub, history) in enumerate(stacked):
        alone, expected = discover(models[k], datas[k], TASK.loss, cfg, seed=5 + k,
                                   evaluate=evaluate[k])
        assert sub.metadata == alone.metadata
        agree = sum(int((sub.masks[n] == alone.masks[n]).sum()) for n in sub.masks)
        assert agree >= sub.total() - 3
        for got, want in zip(history, expected, strict=True):
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
            assert got["val"] == pytest.approx(want["val"], abs=1e-5)
            assert got["density"] == pytest.approx(want["density"], abs=1e-3)


def test_stacked_validation_scores_each_model_as_its_own_evaluate_would() -> None:
    """`score=(fn, val)` validates the whole stack in one vmapped pass: the same scores, best
    epochs and final states as `evaluate` model by model."""
    def accuracy(model, batch):
        return TASK.score(model, batch)

    def stack(use_score: bool) -> tuple[list, list[nn.Module]]:
        base = gpt2(7)
        models = [transplant(base, random_sub(base, 1), seed=3), gpt2(2)]
        kwargs = ({"score": (accuracy, [[VAL], [VAL]])} if use_score
                  else {"evaluate": [lambda m: TASK.accuracy(m, VAL)] * 2})
        results = fit_batched(models, [[sequences(1)], [sequences(2)]], TASK.loss, CFG,
                              seeds=[0, 1], **kwargs)
        return results, models

    (scored, a), (evaluated, b) = stack(True), stack(False)
    for x, y in zip(scored, evaluated, strict=True):
        assert [r["val"] for r in x.history] == pytest.approx([r["val"] for r in y.history])
        assert x.best_epoch == y.best_epoch
    for m, n in zip(a, b, strict=True):
        assert_close_states(m, n)


def test_a_stack_leaves_nothing_behind() -> None:
    """Each step's gradients come from torch.func; had the stack's weights also recorded an
    autograd graph of them, `.grad` would keep it alive in a cycle the collector cannot see
    (a stack's worth of memory per step, gigabytes over a preset)."""
    import gc

    def live() -> int:
        gc.collect()
        return sum(isinstance(o, Tensor) for o in gc.get_objects())

    models, datas = [gpt2(0), gpt2(1)], [[sequences(1)], [sequences(2)]]
    fit_batched(models, datas, TASK.loss, CFG, seeds=[0, 1])
    before = live()
    fit_batched(models, datas, TASK.loss, CFG, seeds=[0, 1])
    assert live() == before
