"""Pieces every Subtask Induction experiment shares: config layering, the conditions compared,
and the verification of a discovered subnetwork."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from instill.core import Subnetwork, apply_subnetwork, fresh_init, transplant
from instill.errors import ConfigError


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update: nested sections are merged key by key, not replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def layered_config(cls: type, presets: dict[str, dict[str, Any]], preset: str | None,
                   file_values: dict | None, overrides: dict | None, where: str) -> Any:
    """Build `cls` from its defaults, then the preset, a config file's values and command-line
    overrides, in that order; unknown presets and keys are clear errors."""
    from instill.runio import from_dict, to_dict

    if preset is not None and preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    values = to_dict(cls())
    for layer in (presets.get(preset or "paper", {}), file_values or {}, overrides or {}):
        values = merge(values, layer)
    return from_dict(cls, values, where=where)


#: Builds a condition's starting model from (trained model, subnetwork, seed, freeze).
Builder = Callable[[nn.Module, Subnetwork, int, bool], nn.Module]


@dataclass(frozen=True)
class Condition:
    """A comparison condition: its report label and how its starting model is built."""

    label: str
    build: Builder
    doc: str


CONDITIONS: dict[str, Condition] = {}


def register_condition(name: str, label: str, doc: str) -> Callable[[Builder], Builder]:
    """Add a condition under `name`; experiments list the names they compare."""

    def add(build: Builder) -> Builder:
        CONDITIONS[name] = Condition(label, build, doc)
        return build

    return add


def _masked(kind: str, keep_unmasked: bool) -> Builder:
    """A transplant of the subnetwork (`subnet`) or a same-size random mask (`sampled`,
    `complement`), with the untargeted parameters trained (`keep_unmasked`) or fresh."""

    def build(trained: nn.Module, sub: Subnetwork, seed: int, freeze: bool) -> nn.Module:
        gen = torch.Generator().manual_seed(seed)
        mask = {"subnet": lambda: sub, "sampled": lambda: sub.sample_like(gen),
                "complement": lambda: sub.sample_complement(gen)}[kind]()
        return transplant(trained, mask, freeze=freeze, keep_unmasked=keep_unmasked, seed=seed)

    return build


_MASKED_DOCS = {
    "subnet": ("Subtask Induction", "the discovered subnetwork transplanted"),
    "sampled": ("sampled subnetwork", "a random mask with the subnetwork's count per layer"),
    "complement": ("complement subnetwork", "like sampled, drawn only outside the subnetwork"),
}
for _kind, (_label, _doc) in _MASKED_DOCS.items():
    register_condition(_kind, _label, _doc + "; untargeted parameters trained")(
        _masked(_kind, True))
    register_condition(f"{_kind}-fresh", f"{_label} (fresh untargeted)",
                       _doc + "; embeddings, norms and biases freshly initialized")(
        _masked(_kind, False))


@register_condition("full", "full model transfer", "the whole trained model fine-tuned")
def _full(trained: nn.Module, sub: Subnetwork, seed: int, freeze: bool) -> nn.Module:
    return copy.deepcopy(trained)


@register_condition("random", "random init", "a freshly initialized model")
def _random(trained: nn.Module, sub: Subnetwork, seed: int, freeze: bool) -> nn.Module:
    return fresh_init(trained, seed)


@register_condition("embeddings_only", "embeddings only",
                    "the trained untargeted parameters (embeddings, norms, biases) with every "
                    "targeted weight fresh: how much transfer needs no subnetwork")
def _embeddings_only(trained: nn.Module, sub: Subnetwork, seed: int,
                     freeze: bool) -> nn.Module:
    model = copy.deepcopy(trained)
    fresh = dict(fresh_init(trained, seed).named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in sub.masks:
                param.copy_(fresh[name])
    return model


#: The conditions of the paper (its figure), the default of both experiments before the
#: controls on where transfer comes from were added.
PAPER_CONDITIONS = ("subnet", "sampled", "complement", "full", "random")


def starting_model(condition: str, trained: nn.Module, sub: Subnetwork, seed: int, *,
                   freeze: bool = True) -> nn.Module:
    """The model a condition starts training from. The fresh weights depend only on `seed`, so
    every condition but `full` shares them within a cell."""
    if condition not in CONDITIONS:
        raise ConfigError(f"unknown condition {condition!r}; choose from {list(CONDITIONS)}")
    return CONDITIONS[condition].build(trained, sub, seed, freeze)


def check_conditions(names: Sequence[str], allowed: Sequence[str]) -> None:
    """Refuse an empty or unknown condition list, naming the choices."""
    unknown = sorted(set(names) - set(allowed))
    if unknown or not names:
        raise ConfigError(f"unknown conditions {unknown}; choose from {list(allowed)}")


def verify_subnetwork(model: nn.Module, sub: Subnetwork,
                      metrics: dict[str, Callable[[nn.Module], float]],
                      seed: int) -> dict[str, Any]:
    """Each metric on the full model, the subnetwork alone, the subnetwork ablated and a random
    same-size subnetwork ablated; plus density overall and per layer."""
    random_sub = sub.sample_like(torch.Generator().manual_seed(seed))
    rows: dict[str, dict[str, float]] = {"full model": {k: f(model) for k, f in metrics.items()}}
    for label, mask, mode in (("subnetwork only", sub, "keep"),
                              ("subnetwork ablated", sub, "ablate"),
                              ("random same-size ablated", random_sub, "ablate")):
        with apply_subnetwork(model, mask, mode):
            rows[label] = {k: f(model) for k, f in metrics.items()}
    return {"accuracy": rows, "density": sub.density(), "kept": sub.kept(),
            "per_layer_density": sub.per_layer_density()}
