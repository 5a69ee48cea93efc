"""The shape-bias task on the generated world or real image folders: every image set a run uses,
the classification loss and metrics, and the shape-preserving augmentation of the `random_aug`
control. Pure data and tensor code; `experiments.shapebias` runs the phases."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instill.errors import ConfigError
from instill.models import logits_of
from instill.tasks.images import (
    ImageSet,
    shape_bias,
)


@dataclass
class AugmentConfig:
    """The `random_aug` control's shape-preserving augmentation, applied per image in the loss.

    Pixel-wise colour changes (grayscale, channel permutation, per-channel inversion) destroy
    the colour statistics a texture shortcut relies on; a light box blur and Gaussian noise
    blunt fine patterns. None of them moves a pixel, so the silhouette is untouched.
    """

    permute: bool = True
    invert: float = 0.5      # probability of inverting each colour channel
    grayscale: float = 0.25  # probability of turning the image gray
    blur: float = 0.5        # probability of a 3x3 box blur
    noise: float = 0.05      # std of additive Gaussian noise

    def __post_init__(self) -> None:
        for name in ("invert", "grayscale", "blur"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"augment.{name} is a probability in [0, 1], got "
                                  f"{getattr(self, name)}")
        if not self.noise >= 0:
            raise ConfigError(f"augment.noise must be >= 0, got {self.noise}")


_PERMUTATIONS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def shape_preserving_augment(images: Tensor, generator: torch.Generator,
                             cfg: AugmentConfig) -> Tensor:
    """Per-image random colour permutation/inversion/grayscale, blur and noise of a batch
    [n, 3, S, S] in [0, 1]; pixel positions never move, so the silhouette is kept."""
    n, dev = images.shape[0], images.device

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator).to(dev)

    x = images
    if cfg.grayscale > 0:  # first: the original colours' brightness contrast survives it
        gray = (x * _LUMA.to(dev)[None, :, None, None]).sum(1, keepdim=True).expand_as(x)
        x = torch.where((rand(n) < cfg.grayscale)[:, None, None, None], gray, x)
    if cfg.permute:
        perm = _PERMUTATIONS[torch.randint(0, 6, (n,), generator=generator)].to(dev)
        x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    if cfg.invert > 0:  # keeps every channel's |object - background| contrast
        x = torch.where((rand(n, 3) < cfg.invert)[:, :, None, None], 1 - x, x)
    if cfg.blur > 0:
        blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        x = torch.where((rand(n) < cfg.blur)[:, None, None, None], blurred, x)
    if cfg.noise > 0:
        x = x + torch.randn(x.shape, generator=generator).to(dev) * cfg.noise
    return x.clamp(0.0, 1.0)


class ImageTask:
    """Cross-entropy on (images, labels) batches; accuracy and shape bias of a model."""

    def __init__(self, augment: AugmentConfig, batch_size: int = 500) -> None:
        self.augment_cfg, self.batch_size = augment, batch_size

    @staticmethod
    def normalize(images: Tensor) -> Tensor:
        return (images - 0.5) / 0.25

    def loss(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        images, labels = batch
        return F.cross_entropy(logits_of(model(pixel_values=self.normalize(images))).float(),
                               labels)

    def augmented_loss(self, seed: int) -> Callable[[nn.Module, Sequence[Tensor]], Tensor]:
        """The loss on shape-preserving augmentations of each batch (a seeded stream)."""
        generator = torch.Generator().manual_seed(seed)

        def loss(model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
            images, labels = batch
            return self.loss(model, (shape_preserving_augment(images, generator,
                                                              self.augment_cfg), labels))

        return loss

    @torch.no_grad()
    def predict(self, model: nn.Module, images: Tensor) -> Tensor:
        model.eval()
        device = next(model.parameters()).device
        outs = [logits_of(model(pixel_values=self.normalize(chunk.to(device)))).argmax(-1).cpu()
                for chunk in images.split(self.batch_size)]
        return torch.cat(outs)

    def accuracy(self, model: nn.Module, data: ImageSet) -> float:
        return (self.predict(model, data.images) == data.labels).float().mean().item()

    def shape_bias(self, model: nn.Module, data: ImageSet) -> dict[str, Any]:
        return shape_bias(self.predict(model, data.images), data.shapes, data.textures)


__all__ = ["AugmentConfig", "ImageTask", "shape_preserving_augment"]
