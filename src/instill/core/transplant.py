"""Evaluate a subnetwork in place, and build new models around it (Subtask Induction)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from instill.errors import ConfigError, ModelStateError, SubnetworkMismatchError

from .subnetwork import Subnetwork
from .targets import (
    add_parametrization,
    fingerprint,
    parameter_sites,
    strip_parametrizations,
)


class FrozenSubnetwork(nn.Module):
    """Parametrization `where(mask, W_sub, W_new)`: the subnetwork's weights live in a buffer,
    out of reach of every optimizer (weight decay included), so they stay bit-for-bit fixed."""

    def __init__(self, frozen: Tensor, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(frozen.device))
        self.register_buffer("frozen", torch.where(self.mask, frozen, torch.zeros_like(frozen)))

    def forward(self, weight: Tensor) -> Tensor:
        return torch.where(self.mask, self.frozen, weight)


def _require_plain(model: nn.Module, what: str) -> None:
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ModelStateError(f"{what} needs a plain model, but this one has masks or a transplant "
                         "attached; call detach_masks() or instill.bake(model) first")


@contextmanager
def apply_subnetwork(model: nn.Module, sub: Subnetwork,
                     mode: Literal["keep", "ablate"] = "keep") -> Iterator[nn.Module]:
    """Temporarily zero every targeted weight outside (`keep`) or inside (`ablate`) the
    subnetwork; the original weights are restored exactly on exit."""
    if mode not in ("keep", "ablate"):
        raise ConfigError(f"mode must be 'keep' or 'ablate', got {mode!r}")
    _require_plain(model, "apply_subnetwork")
    sub.check_model(model)
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in sub.masks}
    try:
        with torch.no_grad():
            for name, mask in sub.masks.items():
                keep = mask if mode == "keep" else ~mask
                params[name].mul_(keep.to(params[name].device, params[name].dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def fresh_init(model: nn.Module, seed: int | None = None) -> nn.Module:
    """A new model of the same architecture with each module's own default initialization.

    HF models are rebuilt from their config (their `_init_weights`); other modules are copied
    and every submodule with `reset_parameters` is reset.
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if hasattr(model, "config") and hasattr(model, "post_init"):
            param = next(model.parameters())
            fresh = type(model)(model.config).to(param.device, param.dtype)
        else:
            fresh = copy.deepcopy(model)
            for module in fresh.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    fresh.train(model.training)
    return fresh


def transplant(trained: nn.Module, sub: Subnetwork, fresh: nn.Module | None = None,
               freeze: bool = True, keep_unmasked: bool = True,
               seed: int | None = None) -> nn.Module:
    """A new model whose masked weights are `W_sub * m + W_new * (1 - m)`.

    `W_sub` comes from `trained` (frozen unless `freeze=False`), `W_new` from `fresh` (by default
    a `fresh_init(trained, seed)`). `keep_unmasked` keeps the trained values of parameters the
    subnetwork does not cover (embeddings, norms, biases); otherwise they come from `fresh` too.
    """
    _require_plain(trained, "transplant")
    sub.check_model(trained)
    fresh = fresh_init(trained, seed) if fresh is None else fresh
    if fingerprint(fresh) != fingerprint(trained):
        raise SubnetworkMismatchError("`fresh` must have the same architecture (parameter "
                                      "names and shapes) as `trained`")
    new = copy.deepcopy(trained if keep_unmasked else fresh)
    trained_params, fresh_params = dict(trained.named_parameters()), dict(fresh.named_parameters())
    sites = parameter_sites(new)
    for name, mask in sub.masks.items():
        with torch.no_grad():
            dict(new.named_parameters())[name].copy_(fresh_params[name])
        frozen = trained_params[name].detach().clone()
        add_parametrization(new, sites[name], FrozenSubnetwork(frozen, mask))
    for param in new.parameters():
        param.requires_grad_(True)
    return new if freeze else unfreeze(new)


def _merge(model: nn.Module) -> nn.Module:
    """Replace every parametrization by its current value, in the original Parameter objects
    (so tied parameters stay tied); parameter names return to the plain architecture's."""
    was_training = model.training
    model.eval()  # masks use their hard form
    modules = [m for m in model.modules() if parametrize.is_parametrized(m)]
    values: dict[int, Tensor] = {}
    with torch.no_grad():
        for module in modules:
            for attr, plist in module.parametrizations.items():
                values.setdefault(id(plist.original), getattr(module, attr).detach().clone())
        originals = {id(plist.original): plist.original for module in modules
                     for plist in module.parametrizations.values()}
        for module in modules:
            strip_parametrizations(module)
        for key, original in originals.items():
            original.copy_(values[key])
    model.train(was_training)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Lift a transplant's freeze in place: every weight becomes a plain trainable parameter."""
    _merge(model)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def bake(model: nn.Module) -> nn.Module:
    """A plain copy of `model` (same architecture and parameter names) holding the effective
    weights: a transplant's `where(m, W_sub, W_new)`, or a masked model's `W * hard_mask`."""
    inner = getattr(model, "model", model) if hasattr(model, "detach_masks") else model
    return unfreeze(copy.deepcopy(inner))
