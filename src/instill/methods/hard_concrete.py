"""Hard-concrete L0 gates (Louizos, Welling and Kingma 2018)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import MaskMethod, logits_like, register

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1  # temperature and stretch interval of the paper


@register("hard_concrete")
class HardConcrete(MaskMethod):
    """Stochastic stretched-concrete gates while training; `log_alpha > 0` when evaluating.

    The penalty is the probability that each gate is non-zero. Noise is drawn on the logits'
    device, so a GPU forward never touches the CPU.
    """

    def __init__(self, weight, mask_shape, cfg) -> None:
        super().__init__(weight, mask_shape, cfg)
        self.log_alpha = logits_like(weight, mask_shape, cfg.init)

    def soft_mask(self) -> Tensor:
        u = torch.rand_like(self.log_alpha).clamp_(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / BETA)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def hard_mask(self) -> Tensor:
        return self.log_alpha > 0

    def penalty(self) -> Tensor:
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()
