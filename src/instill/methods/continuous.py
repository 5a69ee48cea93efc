"""Continuous sparsification (Savarese et al. 2020), as used by Subtask Induction."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MaskMethod, logits_like, register


@register("continuous_sparsification")
class ContinuousSparsification(MaskMethod):
    """Soft mask `sigmoid(temperature * s)` in training, hard mask `s > 0` otherwise.

    The temperature is raised during training (see `MaskedModel.temperature`), which drives the
    soft mask towards the binary one; the penalty is `sum(sigmoid(temperature * s))`.
    """

    def __init__(self, weight, mask_shape, cfg) -> None:
        super().__init__(weight, mask_shape, cfg)
        self.logits = logits_like(weight, mask_shape, cfg.init)

    def soft_mask(self) -> Tensor:
        return torch.sigmoid(self.temperature * self.logits)

    def hard_mask(self) -> Tensor:
        return self.logits > 0

    def penalty(self) -> Tensor:
        return self.soft_mask().sum()
