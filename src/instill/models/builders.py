"""Build HF transformers models (GPT-2, ResNet, ViT) and a plain MLP from keyword configs."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from instill.errors import ConfigError

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Make a builder available as `build_model(name, ...)`."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = fn
        return fn

    return add


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered architecture; unknown names and options are clear errors."""
    if name not in MODELS:
        raise ConfigError(f"unknown architecture {name!r}; choose one of {sorted(MODELS)}")
    try:
        return MODELS[name](**kwargs)
    except TypeError as err:
        raise ConfigError(f"bad options for architecture {name!r}: {err}") from None


def logits_of(output: Any) -> Tensor:
    """Logits from an HF output object or a plain tensor, so tasks never rely on `.loss`."""
    return output if isinstance(output, Tensor) else output.logits


def check_heads(n_embd: int, n_head: int) -> None:
    """Fail early when attention heads cannot split the embedding evenly."""
    if n_embd % n_head:
        raise ConfigError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")


def check_activation(name: str) -> None:
    """Fail early, naming the choices, for an activation HF's GPT-2 does not know."""
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ConfigError(f"unknown activation {name!r}; choose one of {sorted(ACT2FN)} "
                          "(gelu_new is HF GPT-2's default)")


def set_activation(model: nn.Module, name: str) -> nn.Module:
    """Switch a built GPT-2's MLP activation in place (weights untouched); returns the model."""
    from transformers.activations import ACT2FN

    check_activation(name)
    for block in model.transformer.h:
        block.mlp.act = ACT2FN[name]
    model.config.activation_function = name
    return model


@register("gpt2")
def gpt2(vocab_size: int, n_positions: int = 8, n_embd: int = 128, n_layer: int = 2,
         n_head: int = 4, dropout: float = 0.1,
         activation: str = "gelu_new") -> nn.Module:
    """GPT-2 decoder with tied input/output embeddings (the arithmetic experiment's model).

    `activation` defaults to HF GPT-2's `gelu_new` (tanh-approximated GELU as 8 ops);
    `"gelu_pytorch_tanh"` computes the same formula in one fused kernel (faster on a CPU,
    rounded differently).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    check_activation(activation)
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, activation_function=activation,
                        resid_pdrop=dropout,
                        embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=None,
                        eos_token_id=None, pad_token_id=None)
    return GPT2LMHeadModel(config)


@register("resnet")
def resnet(num_labels: int, embedding_size: int = 16, hidden_sizes: tuple = (16, 32, 64),
           depths: tuple = (1, 1, 1), layer_type: str = "basic") -> nn.Module:
    """A small HF ResNet classifier (Conv2d + BatchNorm)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_labels=num_labels, embedding_size=embedding_size,
                          hidden_sizes=list(hidden_sizes), depths=list(depths),
                          layer_type=layer_type, downsample_in_first_stage=False)
    return ResNetForImageClassification(config)


@register("vit")
def vit(num_labels: int, image_size: int = 32, patch_size: int = 4, hidden_size: int = 64,
        num_hidden_layers: int = 4, num_attention_heads: int = 4,
        intermediate_size: int = 128, dropout: float = 0.0) -> nn.Module:
    """A small HF ViT classifier."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(num_labels=num_labels, image_size=image_size, patch_size=patch_size,
                       hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                       num_attention_heads=num_attention_heads,
                       intermediate_size=intermediate_size, hidden_dropout_prob=dropout,
                       attention_probs_dropout_prob=dropout)
    return ViTForImageClassification(config)


@register("mlp")
def mlp(in_features: int, num_labels: int, hidden: tuple = (64, 64)) -> nn.Module:
    """A plain multilayer perceptron."""
    sizes = [in_features, *hidden]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], num_labels))
