"""Magnitude pruning: keep the largest `|W|`, a training-free baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MaskMethod, register


def magnitude_scores(weight: Tensor, mask_shape: tuple[int, ...]) -> Tensor:
    """`|W|`, averaged over the dimensions the mask broadcasts over (neuron granularity)."""
    dims = [d for d, size in enumerate(mask_shape) if size == 1 and weight.shape[d] != 1]
    scores = weight.detach().abs().float()
    return scores.mean(dim=dims, keepdim=True) if dims else scores


def top_fraction(scores: Tensor, keep: float) -> Tensor:
    """A bool tensor marking the `keep` fraction of largest scores (at least one)."""
    k = max(1, round(keep * scores.numel()))
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[scores.flatten().topk(k).indices] = True
    return flat.view(scores.shape)


@register("magnitude")
class Magnitude(MaskMethod):
    """Keeps the fraction `keep` of entries with the largest magnitude, per layer or globally."""

    trainable = False

    def __init__(self, weight, mask_shape, cfg, keep_mask: Tensor | None = None) -> None:
        super().__init__(weight, mask_shape, cfg)
        if keep_mask is None:
            keep_mask = top_fraction(magnitude_scores(weight, mask_shape), cfg.keep)
        self.register_buffer("keep_mask", keep_mask)

    @classmethod
    def build(cls, weights, mask_shapes, cfg):
        if cfg.scope == "layer":
            return super().build(weights, mask_shapes, cfg)
        scores = {n: magnitude_scores(w, mask_shapes[n]) for n, w in weights.items()}
        flat = torch.cat([s.flatten().cpu() for s in scores.values()])
        k = max(1, round(cfg.keep * flat.numel()))
        threshold = flat.topk(k).values.min()
        return {n: cls(weights[n], mask_shapes[n], cfg, keep_mask=s >= threshold.to(s.device))
                for n, s in scores.items()}

    def hard_mask(self) -> Tensor:
        return self.keep_mask

    def penalty(self) -> Tensor:
        return self.keep_mask.sum().float()
