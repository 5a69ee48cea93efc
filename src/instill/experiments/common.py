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
    """A comparison condition: its report label, how its starting model is built, and whether
    it depends on the subnetwork's masks (then it runs once per subnetwork density)."""

    label: str
    build: Builder
    doc: str
    uses_mask: bool = False


CONDITIONS: dict[str, Condition] = {}


def register_condition(name: str, label: str, doc: str,
                       uses_mask: bool = False) -> Callable[[Builder], Builder]:
    """Add a condition under `name`; experiments list the names they compare."""

    def add(build: Builder) -> Builder:
        CONDITIONS[name] = Condition(label, build, doc, uses_mask)
        return build

    return add


def _kept(kind: str, sub: Subnetwork, gen: torch.Generator) -> Subnetwork:
    """The mask a masked condition transplants. The inverse kinds draw the same random mask as
    their same-size kind (one seed) and keep everything else: the reference's controls."""
    return {"subnet": lambda: sub,
            "sampled": lambda: sub.sample_like(gen),
            "complement": lambda: sub.sample_complement(gen),
            "sampled-inverse": lambda: ~sub.sample_like(gen),
            "complement-inverse": lambda: ~sub.sample_complement(gen)}[kind]()


def _masked(kind: str, keep_unmasked: bool, trainable: bool = False) -> Builder:
    """A transplant of the subnetwork or a random mask (`_kept`), with the untargeted
    parameters trained (`keep_unmasked`) or fresh, its kept weights frozen or `trainable`."""

    def build(trained: nn.Module, sub: Subnetwork, seed: int, freeze: bool) -> nn.Module:
        mask = _kept(kind, sub, torch.Generator().manual_seed(seed))
        return transplant(trained, mask, freeze=freeze and not trainable,
                          keep_unmasked=keep_unmasked, seed=seed)

    return build


_MASKED_DOCS = {
    "subnet": ("Subtask Induction", "the discovered subnetwork transplanted"),
    "sampled": ("sampled subnetwork", "a random mask with the subnetwork's count per layer"),
    "complement": ("complement subnetwork", "like sampled, drawn only outside the subnetwork"),
    "sampled-inverse": ("sampled inverse (reference)",
                        "every trained weight but k random ones per layer, k the subnetwork's "
                        "count there: the reference's `sampled` control (freezes 1 - density)"),
    "complement-inverse": ("complement inverse (reference)",
                           "the subnetwork and every other trained weight but k random ones "
                           "outside it: the reference's `complement` control"),
}
for _kind, (_label, _doc) in _MASKED_DOCS.items():
    register_condition(_kind, _label, _doc + "; untargeted parameters trained", True)(
        _masked(_kind, True))
    register_condition(f"{_kind}-trainable", f"{_label}, trainable",
                       _doc + "; the kept weights start trained and train too", True)(
        _masked(_kind, True, trainable=True))
    if "inverse" not in _kind:
        register_condition(f"{_kind}-fresh", f"{_label} (fresh untargeted)",
                           _doc + "; embeddings, norms and biases freshly initialized", True)(
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


def density_tag(target: float | None) -> str:
    """File-name suffix of a subnetwork discovered at a target density ('' where discovery
    landed by itself)."""
    return "" if target is None else f"-d{target:g}"


def at_density(condition: str, target: float | None) -> str:
    """A mask condition's name in results at a target density, e.g. `subnet@0.05`."""
    return condition if target is None else f"{condition}@{target:g}"


def base_condition(name: str) -> tuple[str, float | None]:
    """`subnet@0.05` -> ('subnet', 0.05); `random` -> ('random', None)."""
    condition, _, target = name.partition("@")
    return condition, float(target) if target else None


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
