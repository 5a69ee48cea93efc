"""The comparison conditions of the registry build the starting models they name."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from instill.core import Subnetwork
from instill.experiments.common import starting_model


def test_reference_inverse_controls_freeze_everything_but_a_random_draw():
    """`sampled-inverse` freezes every targeted weight but the k a same-size draw picks (the
    reference's `sampled`); `complement-inverse` keeps the subnetwork and all but k outside it;
    the `-trainable` variants start from the same weights and freeze nothing."""
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))
    gen = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(p.shape, generator=gen) < 0.3
             for n, p in trained.named_parameters() if n.endswith("weight")}
    sub = Subnetwork(masks, {n: tuple(p.shape) for n, p in trained.named_parameters()})
    weights = {n: p.detach() for n, p in trained.named_parameters()}

    def frozen(model):
        return {n: m.parametrizations.weight[0].mask for n, m in
                (("0.weight", model[0]), ("2.weight", model[2]))}

    same = frozen(starting_model("sampled", trained, sub, seed=5))
    inverse = frozen(starting_model("sampled-inverse", trained, sub, seed=5))
    for name in masks:
        assert torch.equal(inverse[name], ~same[name])  # the same draw, inverted
        assert int((~inverse[name]).sum()) == int(masks[name].sum())  # k fresh per layer
    comp = frozen(starting_model("complement-inverse", trained, sub, seed=5))
    for name, mask in masks.items():
        assert bool(comp[name][mask].all())  # the subnetwork stays
        assert int((~comp[name]).sum()) == int(mask.sum())  # k fresh, all outside it
    open_model = starting_model("sampled-inverse-trainable", trained, sub, seed=5)
    assert not any(parametrize.is_parametrized(m) for m in open_model.modules())
    for name, mask in inverse.items():
        assert torch.equal(dict(open_model.named_parameters())[name][mask], weights[name][mask])
