"""Small model specs that configs of several experiments share (validated dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from instill.errors import ConfigError
from instill.models.builders import build_model


@dataclass
class ResNetSpec:
    """A small HF ResNet (`build_model("resnet")`); (64, [64,128,256,512], [2,2,2,2]) is
    ResNet-18's layout."""

    embedding_size: int = 64
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    layer_type: Literal["basic", "bottleneck"] = "basic"

    def __post_init__(self) -> None:
        if not self.hidden_sizes or len(self.hidden_sizes) != len(self.depths):
            raise ConfigError(f"resnet.hidden_sizes and resnet.depths must be non-empty lists of "
                              f"the same length, got {self.hidden_sizes} and {self.depths}")
        if min(self.hidden_sizes + self.depths + [self.embedding_size]) < 1:
            raise ConfigError("resnet sizes and depths must be >= 1")

    def build(self, num_labels: int) -> nn.Module:
        """A freshly initialized ResNet of this spec with `num_labels` outputs."""
        return build_model("resnet", num_labels=num_labels, embedding_size=self.embedding_size,
                           hidden_sizes=tuple(self.hidden_sizes), depths=tuple(self.depths),
                           layer_type=self.layer_type)
