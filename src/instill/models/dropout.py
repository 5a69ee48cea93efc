"""Counter-based dropout: masks that are a pure function of (seed, step, site, element).

torch's dropout draws from a generator whose state depends on everything drawn before, so K
models trained in one vmapped step (`instill.batched`) draw other masks than the same models
trained one at a time. Here each mask is an integer hash of a per-model key (set by the
training loop from the model's seed and step), the dropout site and the element index: the
same bits in `fit` and `fit_batched`, on any device (integer arithmetic is exact).

`counter_dropout(model)` swaps every `nn.Dropout` for a `CounterDropout` for the duration of a
`with` block, and routes a Hugging Face GPT-2's attention dropout through its module (an
attention function registered with transformers, same math as its eager attention).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from instill.errors import ConfigError

ATTENTION = "instill_counter_dropout"
_M1, _M2 = -49064778989728563, -4265267296055464877  # splitmix64's multipliers, as int64
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64


def _shift(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finalizer: a bijective scramble of 64 bits (wrapping int64 arithmetic)."""
    x = (x ^ _shift(x, 30)) * _M1
    x = (x ^ _shift(x, 27)) * _M2
    return x ^ _shift(x, 31)


def step_key(seed: int, step: int) -> int:
    """The dropout key of one training step of the model seeded `seed` (splitmix64 of both,
    as a signed 64-bit integer)."""
    x = (_mix_int(seed) + step * (_GOLDEN % (1 << 64))) % (1 << 64)
    x = _mix_int(x)
    return x - (1 << 64) if x >= 1 << 63 else x


def _mix_int(x: int) -> int:
    """`_mix` on a Python int, modulo 2**64."""
    mask = (1 << 64) - 1
    x &= mask
    x = ((x ^ (x >> 30)) * (_M1 % (1 << 64))) & mask
    x = ((x ^ (x >> 27)) * (_M2 % (1 << 64))) & mask
    return x ^ (x >> 31)


def uniform(key: Tensor, site: int, shape: torch.Size, device: torch.device) -> Tensor:
    """Floats in [0, 1) from (key, site, element index): 24 bits of a scrambled counter."""
    count = 1
    for size in shape:
        count *= size
    index = torch.arange(count, device=device, dtype=torch.int64).view(shape)
    x = _mix(index * _GOLDEN + (key + site * 7919))
    return _shift(x, 40).to(torch.float32) * (1.0 / (1 << 24))


class CounterDropout(nn.Module):
    """Dropout whose mask comes from `uniform(key, site, ...)`; `key` is set per step."""

    def __init__(self, p: float, site: int) -> None:
        super().__init__()
        self.p, self.site = p, site
        self.register_buffer("key", torch.zeros((), dtype=torch.int64), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = uniform(self.key, self.site, x.shape, x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
               attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               **kwargs) -> tuple[Tensor, Tensor]:
    """transformers' eager attention, with its dropout taken from `module.attn_dropout`."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1).type(value.dtype)
    weights = module.attn_dropout(weights)
    return torch.matmul(weights, value).transpose(1, 2), weights


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)


def sites(model: nn.Module) -> dict[str, CounterDropout]:
    """The counter-dropout modules of a model under `counter_dropout`, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CounterDropout)}


def set_step(model: nn.Module, seed: int, step: int) -> None:
    """Key every counter-dropout module of `model` for this training step."""
    key = step_key(seed, step)
    for module in sites(model).values():
        module.key.fill_(key)


@contextmanager
def counter_dropout(model: nn.Module) -> Iterator[nn.Module]:
    """Swap `model`'s dropout for `CounterDropout` inside the block; restored on exit."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    for module in list(model.modules()):
        for child_name, child in module.named_children():
            if type(child) is nn.Dropout:
                swapped.append((module, child_name, child))
    for site, (parent, child_name, child) in enumerate(swapped):
        counter = CounterDropout(child.p, site).to(_device(model))
        setattr(parent, child_name, counter.train(child.training))
    try:
        if config is not None and getattr(config, "model_type", None) == "gpt2":
            _register_attention()
            config._attn_implementation = ATTENTION
        elif any(getattr(config, key, 0) for key in ("attention_probs_dropout_prob",
                                                    "attention_dropout")):
            raise ConfigError(f"dropout_rng 'counter' covers attention dropout in GPT-2 only; "
                              f"this {type(model).__name__} has attention dropout: use "
                              "dropout_rng 'torch'")
        yield model
    finally:
        for parent, child_name, child in swapped:
            setattr(parent, child_name, child)
        if config is not None and attention is not None:
            config._attn_implementation = attention


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


__all__ = ["CounterDropout", "counter_dropout", "set_step", "sites", "step_key", "uniform"]
