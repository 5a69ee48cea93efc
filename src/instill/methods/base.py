"""The mask-method interface and its registry: a new method is one module plus `@register`."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from .registry import METHODS, register  # noqa: F401  (re-exported with the interface)

if TYPE_CHECKING:
    from instill.methods.config import MaskConfig


class MaskMethod(nn.Module):
    """A parametrization `weight -> weight * mask` for one tensor.

    Subclasses define `soft_mask` (used in training mode), `hard_mask` (eval mode and export) and
    `penalty` (expected number of kept entries, before `l0_lambda`). The mask has `mask_shape`,
    which broadcasts against the weight (it equals the weight's shape at "weight" granularity).
    """

    name: ClassVar[str] = ""
    trainable: ClassVar[bool] = True

    def __init__(self, weight: Tensor, mask_shape: tuple[int, ...], cfg: MaskConfig) -> None:
        super().__init__()
        self.mask_shape = mask_shape
        self.temperature = 1.0

    @classmethod
    def build(cls, weights: dict[str, Tensor], mask_shapes: dict[str, tuple[int, ...]],
              cfg: MaskConfig) -> dict[str, MaskMethod]:
        """One mask per tensor; methods that need all weights at once (global scope) override."""
        return {name: cls(w, mask_shapes[name], cfg) for name, w in weights.items()}

    def soft_mask(self) -> Tensor:
        return self.hard_mask().float()

    def hard_mask(self) -> Tensor:
        raise NotImplementedError

    def penalty(self) -> Tensor:
        raise NotImplementedError

    def forward(self, weight: Tensor) -> Tensor:
        mask = self.soft_mask() if self.training else self.hard_mask()
        return weight * mask.to(weight.dtype)


def logits_like(weight: Tensor, mask_shape: tuple[int, ...], value: float) -> nn.Parameter:
    """Mask logits on the weight's device, in float32 even for half-precision weights."""
    return nn.Parameter(torch.full(mask_shape, float(value), device=weight.device))
