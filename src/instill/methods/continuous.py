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
        self._soft: tuple[tuple, Tensor] | None = None

    def soft_mask(self) -> Tensor:
        """The sigmoid, computed once per logits storage and version, temperature and grad mode.

        A training step reads it in the forward pass and again in the penalty (and some models
        read a weight twice per forward); reusing it saves the recomputation and its backward.
        Backward through it drops it, so each step starts from a fresh graph.
        """
        logits = self.logits
        key = (logits.data_ptr(), logits._version, self.temperature, torch.is_grad_enabled())
        if self._soft is not None and self._soft[0] == key:
            return self._soft[1]
        mask = torch.sigmoid(self.temperature * logits)
        if mask.requires_grad:
            mask.register_hook(self._forget)
        self._soft = (key, mask)
        return mask

    def _forget(self, grad: Tensor) -> None:
        self._soft = None

    def __getstate__(self) -> dict:
        """Copies and pickles leave the cached mask (a graph node) behind."""
        return {**self.__dict__, "_soft": None}

    def hard_mask(self) -> Tensor:
        return self.logits > 0

    def penalty(self) -> Tensor:
        return self.soft_mask().sum()
