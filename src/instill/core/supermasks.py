"""Supermasks in superposition (SupSup, Wortsman et al. 2020): one binary mask per task over
one fixed network, and the task inferred from the masks' output entropy.

Each task's mask is a `Subnetwork` (found with the `top_k` method over the untrained weights);
`superpose` computes every masked weight as `W * sum_i alpha_i M_i`, and `infer_task` is the
paper's one-shot algorithm: from uniform `alpha`, one gradient of the output entropy with
respect to `alpha`; the task is the coefficient whose increase lowers the entropy most.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from instill.errors import ConfigError

from .subnetwork import Subnetwork
from .targets import add_parametrization, parameter_sites, strip_parametrizations
from .transplant import _require_plain


class MaskMixture(nn.Module):
    """Parametrization `W * sum_i alpha_i M_i`: a superposition of binary masks."""

    def __init__(self, masks: Tensor, alpha: Tensor) -> None:
        super().__init__()
        self.register_buffer("masks", masks)
        self.alpha = alpha  # a plain tensor (it may require grad), not a model parameter

    def forward(self, weight: Tensor) -> Tensor:
        mixed = torch.tensordot(self.alpha.to(weight.dtype), self.masks.to(weight.dtype), dims=1)
        return weight * mixed


@contextmanager
def superpose(model: nn.Module, masks: Sequence[Subnetwork],
              alpha: Tensor) -> Iterator[nn.Module]:
    """Temporarily compute each masked weight as `W * sum_i alpha[i] * masks[i]`; the model
    is plain again on exit."""
    _require_plain(model, "superpose")
    if not masks or alpha.shape != (len(masks),):
        raise ConfigError(f"superpose needs one coefficient per mask: {len(masks)} masks, "
                          f"alpha of shape {tuple(alpha.shape)}")
    for sub in masks:
        sub.check_model(model)
    sites, params = parameter_sites(model), dict(model.named_parameters())
    touched = set()
    try:
        for name in masks[0].masks:
            stacked = torch.stack([sub.masks[name] for sub in masks]).to(params[name].device)
            add_parametrization(model, sites[name], MaskMixture(stacked, alpha))
            touched |= {site.module_name for site in sites[name]}
        yield model
    finally:
        for module_name in touched:
            strip_parametrizations(model.get_submodule(module_name))


def infer_task(model: nn.Module, masks: Sequence[Subnetwork],
               entropy: Callable[[nn.Module, Tensor], Tensor]) -> int:
    """SupSup's one-shot task inference: the index of the mask whose coefficient has the most
    negative entropy gradient at uniform `alpha`. `entropy(model, alpha)` is the mean output
    entropy of the superposed model on the inputs (`alpha` also weighs per-task heads)."""
    device = next(model.parameters()).device
    alpha = torch.full((len(masks),), 1.0 / len(masks), device=device, requires_grad=True)
    with torch.enable_grad(), superpose(model, masks, alpha) as mixed:
        (grad,) = torch.autograd.grad(entropy(mixed, alpha), alpha)
    return int(grad.argmin())


__all__ = ["MaskMixture", "infer_task", "superpose"]
