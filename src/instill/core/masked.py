"""attach_masks: put a trainable mask on every targeted parameter of any nn.Module."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from instill.errors import ModelStateError
from instill.methods import METHODS, MaskMethod
from instill.methods.config import MaskConfig

from .subnetwork import Subnetwork
from .targets import (
    Site,
    add_parametrization,
    fingerprint,
    output_dim,
    select_parameters,
    strip_parametrizations,
)


def _mask_shape(module: nn.Module, attr: str, shape: torch.Size, granularity: str) -> tuple:
    """Full shape per weight, or one entry per output neuron (broadcast over the rest)."""
    if granularity == "weight" or len(shape) == 1:
        return tuple(shape)
    dim = output_dim(module)
    return tuple(size if d == dim else 1 for d, size in enumerate(shape))


class MaskedModel(nn.Module):
    """A model with masks attached through `torch.nn.utils.parametrize`; no weight is copied.

    Called exactly like the wrapped model. In training mode the masks are soft (per method) while
    the base model stays in eval mode (dropout off, batch-norm statistics frozen); in eval mode
    the masks are hard.
    """

    def __init__(self, model: nn.Module, cfg: MaskConfig, sites: dict[str, list[Site]],
                 masks: dict[str, MaskMethod], source: dict[str, tuple[int, ...]],
                 requires_grad: dict[str, bool], was_training: bool) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.sites = sites
        self.masks = masks  # plain dict: the modules are registered inside the model already
        self.source_fingerprint = source
        self._requires_grad = requires_grad
        self._was_training = was_training
        self._temperature = 1.0
        self.train()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def train(self, mode: bool = True) -> MaskedModel:
        self.training = mode
        self.model.eval()
        for mask in self.masks.values():
            mask.train(mode)
        return self

    @property
    def temperature(self) -> float:
        """Inverse temperature of soft masks (continuous sparsification's beta)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = float(value)
        for mask in self.masks.values():
            mask.temperature = self._temperature

    def l0_penalty(self) -> Tensor:
        """`l0_lambda` times the expected number of kept entries, summed over all masks."""
        total = sum(mask.penalty() for mask in self.masks.values())
        return self.cfg.l0_lambda * total

    def mask_parameters(self) -> list[dict[str, Any]]:
        """One optimizer parameter group holding every mask logit (no weight decay by default)."""
        params = [p for mask in self.masks.values() for p in mask.parameters()]
        return [{"params": params, "weight_decay": self.cfg.weight_decay}]

    def keep_fraction(self, fraction: float) -> None:
        """Shift every logit by one constant so that `fraction` of the targeted entries have
        logits > 0, i.e. are kept (continuous sparsification at weight granularity)."""
        logits = [mask.logits for mask in self.masks.values()]
        flat = torch.cat([t.detach().flatten() for t in logits])
        drop = flat.numel() - round(fraction * flat.numel())
        if not 0 < drop < flat.numel():
            raise ModelStateError(f"keep fraction {fraction} keeps none or all of the "
                                  f"{flat.numel()} targeted entries")
        below = flat.kthvalue(drop).values  # the largest dropped logit
        above = flat.kthvalue(drop + 1).values  # the smallest kept one
        with torch.no_grad():
            for t in logits:
                t.sub_((below + above) / 2)

    def mask_state(self) -> dict[str, Tensor]:
        """A copy of every mask's trainable tensors (to restore an earlier epoch)."""
        return {f"{name}.{key}": value.detach().clone() for name, mask in self.masks.items()
                for key, value in mask.named_parameters()}

    def load_mask_state(self, state: dict[str, Tensor]) -> None:
        """Restore what `mask_state` copied."""
        with torch.no_grad():
            for name, mask in self.masks.items():
                for key, value in mask.named_parameters():
                    value.copy_(state[f"{name}.{key}"])

    def subnetwork(self, metadata: dict[str, str] | None = None) -> Subnetwork:
        """The hard masks, expanded to each parameter's shape, as a Subnetwork."""
        masks = {}
        for name, mask in self.masks.items():
            shape = self.source_fingerprint[name]
            masks[name] = mask.hard_mask().detach().expand(shape).to("cpu", copy=True)
        meta = {"method": self.cfg.method, "granularity": self.cfg.granularity, **(metadata or {})}
        return Subnetwork(masks, dict(self.source_fingerprint), meta)

    def detach_masks(self) -> nn.Module:
        """Remove every mask and return the original model, weights and flags as before."""
        names = {site.module_name for sites in self.sites.values() for site in sites}
        for name in names:
            strip_parametrizations(self.model.get_submodule(name))
        for name, param in self.model.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, param.requires_grad))
        self.model.train(self._was_training)
        self.masks = {}
        self.sites = {}
        return self.model


def attach_masks(model: nn.Module, cfg: MaskConfig | None = None) -> MaskedModel:
    """Attach masks of `cfg.method` to the parameters `cfg` targets; base weights are frozen."""
    cfg = cfg or MaskConfig()
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ModelStateError("model already has parametrizations (masks or a transplant); "
                         "call detach_masks() or instill.bake(model) first")
    sites = select_parameters(model, cfg.targets, cfg.exclude, cfg.mask_bias)
    weights, shapes = {}, {}
    for name, where in sites.items():
        module = model.get_submodule(where[0].module_name)
        weights[name] = getattr(module, where[0].attr)
        shapes[name] = _mask_shape(module, where[0].attr, weights[name].shape, cfg.granularity)
    masks = METHODS[cfg.method].build(weights, shapes, cfg)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    source = fingerprint(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for name, where in sites.items():
        add_parametrization(model, where, masks[name])
    return MaskedModel(model, cfg, sites, masks, source, requires_grad, model.training)
