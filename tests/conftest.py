"""Tiny models and inputs shared by the core tests: every architecture instill must support."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from instill.models import build_model

# The models here are tiny: one thread is fastest, and more threads spin on a busy machine.
torch.set_num_threads(1)


class ConvNet1d(nn.Module):
    """A plain nn.Conv1d network."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, kernel_size=3)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).relu().mean(-1))


def _gpt2() -> nn.Module:
    return build_model("gpt2", vocab_size=20, n_positions=8, n_embd=16, n_layer=2, n_head=2)


def _resnet() -> nn.Module:
    return build_model("resnet", num_labels=4, embedding_size=8, hidden_sizes=(8, 16),
                       depths=(1, 1))


def _vit() -> nn.Module:
    return build_model("vit", num_labels=4, image_size=16, patch_size=4, hidden_size=16,
                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


def _mlp() -> nn.Module:
    return build_model("mlp", in_features=10, num_labels=4, hidden=(16, 16))


ARCHS = {
    "gpt2": (_gpt2, lambda: {"input_ids": torch.randint(0, 20, (4, 6))}),
    "resnet": (_resnet, lambda: {"pixel_values": torch.randn(4, 3, 16, 16)}),
    "vit": (_vit, lambda: {"pixel_values": torch.randn(4, 3, 16, 16)}),
    "mlp": (_mlp, lambda: {"input": torch.randn(4, 10)}),
    "conv1d": (ConvNet1d, lambda: {"x": torch.randn(4, 3, 12)}),
}


def make(arch: str, seed: int = 0) -> tuple[nn.Module, dict]:
    """A freshly built tiny model of `arch` and a matching input batch (keyword arguments)."""
    torch.manual_seed(seed)
    build, inputs = ARCHS[arch]
    return build().eval(), inputs()


def run(model: nn.Module, batch: dict) -> torch.Tensor:
    """Call the model like its users do and return the logits."""
    out = model(**batch)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(params=sorted(ARCHS))
def arch(request) -> str:
    return request.param
