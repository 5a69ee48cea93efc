"""Top-k "supermask" scores with a straight-through gradient (Ramanujan et al. 2020)."""

from __future__ import annotations

from torch import Tensor, nn

from instill.errors import ConfigError

from .base import MaskMethod, register
from .magnitude import magnitude_scores, top_fraction


@register("top_k")
class TopK(MaskMethod):
    """Keeps exactly the fraction `keep` of each tensor's entries: those with the largest scores.

    Scores start at `|W|` (so an untrained top-k mask is the magnitude mask) and train by the
    straight-through estimator: the forward pass uses the binary mask, the backward pass treats
    it as the identity of the scores. The kept count is fixed, so the penalty is zero.
    """

    def __init__(self, weight, mask_shape, cfg) -> None:
        super().__init__(weight, mask_shape, cfg)
        self.keep = cfg.keep
        self.scores = nn.Parameter(magnitude_scores(weight, mask_shape))

    @classmethod
    def build(cls, weights, mask_shapes, cfg):
        if cfg.scope != "layer":
            raise ConfigError("method 'top_k' keeps a fraction of each tensor: use scope "
                              "'layer' (or method 'magnitude' for a global top-k by |W|)")
        return super().build(weights, mask_shapes, cfg)

    def soft_mask(self) -> Tensor:
        hard = self.hard_mask().to(self.scores.dtype)
        return hard + (self.scores - self.scores.detach())  # exactly `hard`; gradient 1

    def hard_mask(self) -> Tensor:
        return top_fraction(self.scores.detach(), self.keep)

    def penalty(self) -> Tensor:
        return self.scores.new_zeros(())
