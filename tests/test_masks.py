"""attach_masks on every architecture and method: zeroing, soft/hard modes, freezing, detach."""

from __future__ import annotations

import pytest
import torch
from conftest import make, run
from torch.nn.utils import parametrize

import instill
from instill.errors import ConfigError, TargetError
from instill.methods import METHODS

METHOD_NAMES = sorted(METHODS)


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_attach_trains_only_masks_and_detach_restores(arch, method):
    model, batch = make(arch)
    before, names = state(model), [n for n, _ in model.named_parameters()]
    masked = instill.attach_masks(model, instill.MaskConfig(method=method, init=0.5))
    logits = run(masked, batch)
    mask_params = [p for g in masked.mask_parameters() for p in g["params"]]
    if METHODS[method].trainable:
        (logits.float().pow(2).mean() + masked.l0_penalty()).backward()
        assert mask_params and all(p.grad is not None for p in mask_params)
        assert sum(p.grad.abs().sum() for p in mask_params) > 0
    else:
        assert mask_params == []
    assert all(not p.requires_grad for p in masked.model.parameters() if
               not any(p is q for q in mask_params))
    restored = masked.detach_masks()
    assert restored is model
    assert not any(parametrize.is_parametrized(m) for m in restored.modules())
    assert [n for n, _ in restored.named_parameters()] == names
    assert all(torch.equal(before[n], p) for n, p in restored.named_parameters())
    assert all(p.requires_grad for p in restored.parameters())


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_eval_mode_zeroes_exactly_the_masked_out_weights(arch, method):
    model, batch = make(arch)
    masked = instill.attach_masks(model, instill.MaskConfig(method=method))
    gen = torch.Generator().manual_seed(1)
    for mask in masked.masks.values():
        for p in mask.parameters():
            p.data = torch.randn(p.shape, generator=gen)
    masked.eval()
    sub = masked.subnetwork()
    for name, sites in masked.sites.items():
        module = masked.model.get_submodule(sites[0].module_name)
        original = module.parametrizations[sites[0].attr].original
        effective = getattr(module, sites[0].attr)
        assert torch.equal(effective, original * sub.masks[name])
    with torch.no_grad():
        out_masked = run(masked, batch)
    plain = masked.detach_masks()
    with instill.apply_subnetwork(plain, sub, "keep"), torch.no_grad():
        out_plain = run(plain, batch)
    assert torch.allclose(out_masked, out_plain, atol=1e-6)
    assert 0 < sub.density() < 1


def test_continuous_sparsification_soft_in_training_hard_in_eval():
    model, _ = make("mlp")
    masked = instill.attach_masks(model, instill.MaskConfig(init=-0.1, l0_lambda=1e-3))
    mask = next(iter(masked.masks.values()))
    masked.temperature = 1.0
    assert torch.allclose(mask.soft_mask(), torch.full_like(mask.logits, 0.4750208))
    masked.temperature = 100.0
    assert mask.soft_mask().max() < 1e-4  # high temperature -> almost binary (all off)
    masked.train()
    first = masked.model.get_submodule("0")
    assert torch.allclose(first.weight, first.parametrizations.weight.original * 4.54e-5,
                          rtol=1e-2)
    masked.eval()
    assert torch.equal(first.weight, torch.zeros_like(first.weight))
    expected = 1e-3 * sum(torch.sigmoid(100.0 * m.logits).sum() for m in masked.masks.values())
    assert torch.allclose(masked.l0_penalty(), expected)


def test_mask_group_has_no_weight_decay_and_optimizer_moves_only_logits():
    model, batch = make("gpt2")
    before = state(model)
    masked = instill.attach_masks(model)
    groups = masked.mask_parameters()
    assert groups[0]["weight_decay"] == 0.0
    opt = torch.optim.AdamW(groups, lr=1e-2)
    logits_before = [p.detach().clone() for p in groups[0]["params"]]
    for _ in range(3):
        opt.zero_grad()
        (run(masked, batch).pow(2).mean() + masked.l0_penalty()).backward()
        opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(logits_before, groups[0]["params"],
                                                      strict=True))
    plain = masked.detach_masks()
    assert all(torch.equal(before[n], p) for n, p in plain.named_parameters())


def test_base_model_stays_in_eval_mode_so_batchnorm_statistics_are_frozen():
    model, batch = make("resnet")
    stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    masked = instill.attach_masks(model)
    masked.train()
    assert masked.training and not masked.model.training
    assert all(m.training for m in masked.masks.values())
    run(masked, batch).sum().backward()
    assert all(torch.equal(stats[n], b) for n, b in masked.model.named_buffers() if n in stats)


def test_neuron_granularity_masks_whole_output_neurons_including_gpt2_conv1d():
    model, _ = make("gpt2")
    masked = instill.attach_masks(model, instill.MaskConfig(granularity="neuron"))
    name = "transformer.h.0.attn.c_attn.weight"  # HF Conv1D stores (in, out)
    assert masked.masks[name].logits.shape == (1, 48)
    for m in masked.masks.values():
        m.logits.data.normal_()
    sub = masked.subnetwork()
    mask = sub.masks[name]
    assert mask.shape == (16, 48)
    assert torch.equal(mask, mask[:1].expand_as(mask))  # constant down each output column
    mlp, _ = make("mlp")
    masked = instill.attach_masks(mlp, instill.MaskConfig(granularity="neuron"))
    assert masked.masks["0.weight"].logits.shape == (16, 1)


def test_magnitude_keeps_the_largest_absolute_weights_per_layer_and_globally():
    model, _ = make("mlp")
    with torch.no_grad():
        model[0].weight.mul_(-1)  # large negative weights must be kept: pruning uses |W|
    masked = instill.attach_masks(model, instill.MaskConfig(method="magnitude", keep=0.25))
    sub = masked.subnetwork()
    for name, mask in sub.masks.items():
        weight = masked.model.get_submodule(name.rsplit(".", 1)[0]).parametrizations.weight
        w = weight.original.abs()
        assert int(mask.sum()) == round(0.25 * w.numel())
        assert w[mask].min() >= w[~mask].max()
    model = masked.detach_masks()
    cfg = instill.MaskConfig(method="magnitude", keep=0.25, scope="global")
    masked = instill.attach_masks(model, cfg)
    sub = masked.subnetwork()
    model = masked.detach_masks()
    kept = torch.cat([model.get_parameter(n).abs()[m] for n, m in sub.masks.items()])
    dropped = torch.cat([model.get_parameter(n).abs()[~m] for n, m in sub.masks.items()])
    assert abs(sub.density() - 0.25) < 0.01 and kept.min() >= dropped.max()


def test_hard_concrete_is_stochastic_in_training_and_deterministic_in_eval():
    model, _ = make("mlp")
    masked = instill.attach_masks(model, instill.MaskConfig(method="hard_concrete", init=0.0))
    gate = next(iter(masked.masks.values()))
    a, b = gate.soft_mask(), gate.soft_mask()
    assert not torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert (a == 0).any() or (a == 1).any()  # the stretch puts mass on exact 0 and 1
    assert a.device == gate.log_alpha.device
    assert 0 < gate.penalty() < gate.log_alpha.numel()
    masked.eval()
    gate.log_alpha.data.fill_(0.3)
    assert gate.hard_mask().all()


def test_tied_gpt2_head_must_be_targeted_with_its_embedding():
    model, _ = make("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    default = instill.attach_masks(model)
    assert "lm_head.weight" not in default.masks  # the default skips heads tied to embeddings
    model = default.detach_masks()
    with pytest.raises(TargetError, match=r"tied to transformer\.wte\.weight"):
        instill.attach_masks(model, instill.MaskConfig(targets=["lm_head"]))
    masked = instill.attach_masks(model, instill.MaskConfig(targets=["lm_head", "wte"]))
    assert list(masked.masks) == ["transformer.wte.weight"]  # one shared mask
    masked.eval()
    assert torch.equal(masked.model.lm_head.weight, masked.model.transformer.wte.weight)
    model = masked.detach_masks()
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize(("targets", "message"), [
    (r".*\.nothing_here$", "matches no module"),
    (["transformer.h.9.mlp.c_fc"], "'transformer.h.9.mlp.c_fc' matches no module"),
    ("([", "not a valid regular expression"),
])
def test_targets_that_match_nothing_are_clear_errors(targets, message):
    model, _ = make("gpt2")
    with pytest.raises((TargetError, ConfigError), match=message.replace("(", r"\(")):
        instill.attach_masks(model, instill.MaskConfig(targets=targets))


def test_unknown_method_and_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="unknown mask method 'l1'"):
        instill.MaskConfig(method="l1")
    with pytest.raises(ConfigError, match="keep must be in"):
        instill.MaskConfig(method="magnitude", keep=1.5)
    with pytest.raises(ConfigError, match="granularity"):
        instill.MaskConfig(granularity="row")


def test_mask_bias_and_exclude():
    model, _ = make("mlp")
    cfg = instill.MaskConfig(mask_bias=True, exclude=["2"])
    masked = instill.attach_masks(model, cfg)
    assert sorted(masked.masks) == ["0.bias", "0.weight", "4.bias", "4.weight"]


def test_penalty_reuses_the_forward_soft_mask_with_exact_gradients():
    model, batch = make("gpt2")
    masked = instill.attach_masks(model, instill.MaskConfig(init=0.05, l0_lambda=1e-2))
    masked.temperature = 3.0
    logits = {name: m.logits for name, m in masked.masks.items()}

    def step_loss():
        return run(masked, batch).square().mean() + masked.l0_penalty()

    step_loss().backward()
    grads = {name: p.grad.clone() for name, p in logits.items()}
    step_loss().backward()  # gradient accumulation: a second backward needs a fresh graph
    for name, p in logits.items():
        assert torch.allclose(p.grad, 2 * grads[name], atol=1e-6)

    # reference: the same loss written out with the sigmoid computed separately for each use
    plain = masked.detach_masks()
    leaves = {name: p.detach().clone().requires_grad_() for name, p in logits.items()}
    base = dict(plain.named_parameters())
    weights = {name: base[name].detach() * torch.sigmoid(3.0 * s) for name, s in leaves.items()}
    out = torch.func.functional_call(plain, weights, args=(), kwargs=batch)
    penalty = 1e-2 * sum(torch.sigmoid(3.0 * s).sum() for s in leaves.values())
    ((out if isinstance(out, torch.Tensor) else out.logits).square().mean() + penalty).backward()
    for name, leaf in leaves.items():
        assert torch.allclose(grads[name], leaf.grad, atol=1e-6, rtol=1e-4), name


def test_soft_mask_follows_optimizer_steps_and_temperature():
    model, batch = make("mlp")
    masked = instill.attach_masks(model, instill.MaskConfig(init=0.1))
    mask = next(iter(masked.masks.values()))
    opt = torch.optim.AdamW(masked.mask_parameters(), lr=0.1)
    first = mask.soft_mask()
    (run(masked, batch).sum() + masked.l0_penalty()).backward()
    opt.step()
    assert not torch.allclose(mask.soft_mask(), first)
    assert torch.equal(mask.soft_mask(), torch.sigmoid(mask.logits))
    masked.temperature = 5.0
    assert torch.equal(mask.soft_mask(), torch.sigmoid(5.0 * mask.logits))
    with torch.no_grad():
        assert not mask.soft_mask().requires_grad
    assert mask.soft_mask().requires_grad
    masked.double()  # new storage for the logits: the cached mask must not be reused
    assert mask.soft_mask().dtype == torch.float64


def test_top_k_starts_as_magnitude_and_trains_a_fixed_size_binary_mask():
    model, batch = make("mlp")
    magnitude = instill.attach_masks(model, instill.MaskConfig(method="magnitude", keep=0.3))
    start = magnitude.subnetwork()
    magnitude.detach_masks()
    masked = instill.attach_masks(model, instill.MaskConfig(method="top_k", keep=0.3))
    assert masked.subnetwork() == start  # scores start at |W|
    opt = torch.optim.AdamW(masked.mask_parameters(), lr=0.05)
    first = masked.model.get_submodule("0")
    for _ in range(20):
        masked.train()
        kept = first.weight != 0
        assert torch.equal(first.weight[kept], first.parametrizations.weight.original[kept])
        loss = run(masked, batch).square().mean() + masked.l0_penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = masked.subnetwork()
    assert trained != start  # the straight-through gradient moved the scores
    for name, mask in trained.masks.items():
        assert int(mask.sum()) == round(0.3 * mask.numel()), name
    with pytest.raises(ConfigError, match="scope 'layer'"):
        instill.attach_masks(masked.detach_masks(),
                             instill.MaskConfig(method="top_k", scope="global"))
