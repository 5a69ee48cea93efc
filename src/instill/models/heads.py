"""A backbone with one linear head per task (task-incremental learning): each task's logits
come from its own parameters, so a task's head can be trained with it and frozen after."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from instill.errors import ConfigError

from .builders import register


class TaskHeads(nn.Module):
    """`backbone(pixel_values)`'s pooled features -> the concatenated logits of every head, in
    task order; head t is `heads.{t}`."""

    def __init__(self, backbone: nn.Module, features: int, sizes: Sequence[int]) -> None:
        super().__init__()
        if not sizes or any(int(s) < 1 for s in sizes):
            raise ConfigError(f"every task head needs at least one class, got sizes {sizes}")
        self.backbone = backbone
        self.heads = nn.ModuleList(nn.Linear(features, int(s)) for s in sizes)

    def forward(self, pixel_values: Tensor) -> Tensor:
        features = self.backbone(pixel_values=pixel_values).pooler_output.flatten(1)
        return torch.cat([head(features) for head in self.heads], dim=1)


@register("resnet_heads")
def resnet_heads(head_sizes: Sequence[int], embedding_size: int = 16,
                 hidden_sizes: tuple = (16, 32, 64), depths: tuple = (1, 1, 1),
                 layer_type: str = "basic") -> nn.Module:
    """A small HF ResNet backbone (Conv2d + BatchNorm) with one linear head per task."""
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(embedding_size=embedding_size, hidden_sizes=list(hidden_sizes),
                          depths=list(depths), layer_type=layer_type,
                          downsample_in_first_stage=False)
    return TaskHeads(ResNetModel(config), hidden_sizes[-1], head_sizes)


class MLPHeads(nn.Module):
    """A ReLU multilayer perceptron on flat inputs with one linear head per task; like
    `TaskHeads`, the logits of every head concatenated in task order, head t is `heads.{t}`."""

    def __init__(self, in_features: int, hidden: Sequence[int], sizes: Sequence[int]) -> None:
        super().__init__()
        if not sizes or any(int(s) < 1 for s in sizes) or not hidden:
            raise ConfigError(f"mlp_heads needs hidden layers and a class per head, got hidden "
                              f"{list(hidden)} and head sizes {list(sizes)}")
        widths, layers = [in_features, *hidden], []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.backbone = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(widths[-1], int(s)) for s in sizes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x.flatten(1))
        return torch.cat([head(features) for head in self.heads], dim=1)


@register("mlp_heads")
def mlp_heads(in_features: int, head_sizes: Sequence[int],
              hidden: Sequence[int] = (128, 128)) -> nn.Module:
    """A small MLP with one linear head per task (the digits sequences' model)."""
    return MLPHeads(in_features, hidden, head_sizes)


__all__ = ["MLPHeads", "TaskHeads", "mlp_heads", "resnet_heads"]
