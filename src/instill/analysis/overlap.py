"""How several subnetworks of one model relate: overlap, its chance level, cross-ablation and
the weights none of them uses (modularity analyses, task-agnostic)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from functools import reduce
from typing import Any

import torch
from torch import nn

from instill.core import Subnetwork, apply_subnetwork
from instill.errors import ConfigError, SubnetworkMismatchError

#: A metric: a model in, a score out (higher is better, e.g. accuracy).
Metric = Callable[[nn.Module], float]


def _shape(shape: Sequence[int] | None) -> str:
    return "absent" if shape is None else str(tuple(shape))


def _first_difference(a: Subnetwork, b: Subnetwork) -> tuple[str, str] | None:
    """The first parameter (in `a`'s order) where two subnetworks' models or masks differ."""
    names = list(a.fingerprint) + [n for n in b.fingerprint if n not in a.fingerprint]
    for name in names:
        sa, sb = a.fingerprint.get(name), b.fingerprint.get(name)
        if (None if sa is None else tuple(sa)) != (None if sb is None else tuple(sb)):
            return name, f"model shapes {_shape(sa)} vs {_shape(sb)}"
    names = list(a.masks) + [n for n in b.masks if n not in a.masks]
    for name in names:
        ma, mb = a.masks.get(name), b.masks.get(name)
        if ma is None or mb is None:
            return name, "masked in only one of them (other mask targets)"
        if ma.shape != mb.shape:
            return name, f"mask shapes {tuple(ma.shape)} vs {tuple(mb.shape)}"
    return None


def check_same_model(subs: Mapping[str, Subnetwork]) -> None:
    """Raise SubnetworkMismatchError, naming the first differing parameter, unless all the
    subnetworks mask the same parameters of one architecture (comparisons need that)."""
    for name, sub in subs.items():
        if not isinstance(sub, Subnetwork):
            raise TypeError(f"{name!r} must be a Subnetwork, got {type(sub).__name__}")
    items = list(subs.items())
    for name, sub in items[1:]:
        diff = _first_difference(items[0][1], sub)
        if diff is not None:
            raise SubnetworkMismatchError(
                f"subnetworks {items[0][0]!r} and {name!r} do not belong to one model: they "
                f"differ at parameter {diff[0]!r} ({diff[1]}); compare only subnetworks found "
                "in the same model with the same mask targets"
            )


def _names(subs: Mapping[str, Subnetwork], what: str) -> list[str]:
    if not isinstance(subs, Mapping):
        raise TypeError(f"{what} needs a dict name -> Subnetwork, got {type(subs).__name__}")
    if not subs:
        raise ConfigError(f"{what} needs at least one subnetwork, got none")
    check_same_model(subs)
    return list(subs)


def _iou(inter: float, ka: float, kb: float) -> float:
    """|A∩B| / |A∪B|; 1.0 when both are empty, as `Subnetwork.iou`."""
    union = ka + kb - inter
    return inter / union if union else 1.0


def _ratio(inter: float, k: float) -> float:
    """|A∩B| / |A|; NaN when A is empty (undefined, not "fully shared")."""
    return inter / k if k else math.nan


def _summary(names: list[str], kept: dict[str, int],
             inter: dict[str, dict[str, int]]) -> dict[str, Any]:
    return {
        "kept": dict(kept),
        "intersection": {i: dict(inter[i]) for i in names},
        "iou": {i: {j: _iou(inter[i][j], kept[i], kept[j]) for j in names} for i in names},
        "shared_fraction": {i: {j: _ratio(inter[i][j], kept[i]) for j in names}
                            for i in names},
    }


def overlap_matrix(subs: Mapping[str, Subnetwork]) -> dict[str, Any]:
    """IoU and shared fraction of every ordered pair of subnetworks, overall and per layer.

    Returns `{"names", "kept", "intersection", "iou", "shared_fraction", "per_layer"}` where
    `iou[i][j]` = |i∩j|/|i∪j| (1.0 for two empty masks) and `shared_fraction[i][j]` =
    |i∩j|/|i|, the fraction of i's kept weights also in j (NaN when i keeps none);
    `per_layer[parameter]` holds the same keys for one masked parameter.
    """
    names = _names(subs, "overlap_matrix")
    total_kept = dict.fromkeys(names, 0)
    total_inter = {i: dict.fromkeys(names, 0) for i in names}
    per_layer = {}
    for layer in subs[names[0]].masks:
        masks = {i: subs[i].masks[layer] for i in names}
        kept = {i: int(m.sum()) for i, m in masks.items()}
        inter: dict[str, dict[str, int]] = {i: {} for i in names}
        for a, i in enumerate(names):
            for j in names[a:]:
                count = kept[i] if i == j else int((masks[i] & masks[j]).sum())
                inter[i][j] = inter[j][i] = count
        per_layer[layer] = _summary(names, kept, inter)
        for i in names:
            total_kept[i] += kept[i]
            for j in names:
                total_inter[i][j] += inter[i][j]
    return {"names": names, **_summary(names, total_kept, total_inter), "per_layer": per_layer}


def _chance_row(ka: int, kb: int, inter: float) -> dict[str, float]:
    return {"kept_a": ka, "kept_b": kb, "intersection": inter, "union": ka + kb - inter,
            "iou": _iou(inter, ka, kb), "shared_a_in_b": _ratio(inter, ka),
            "shared_b_in_a": _ratio(inter, kb)}


def chance_overlap(a: Subnetwork, b: Subnetwork) -> dict[str, Any]:
    """Overlap expected of two independent uniformly random masks with a's and b's per-layer
    kept counts: the chance level that observed overlap is compared to.

    Per layer of n entries, E|A∩B| = k_a k_b / n exactly (hypergeometric mean); layers are
    combined by summing the expected intersections and unions. The shared fractions
    (`shared_a_in_b` = E|A∩B|/k_a, `shared_b_in_a`) are exact expectations, since k_a and k_b
    are fixed. `iou` is E|A∩B| / E|A∪B|, an approximation of E[IoU] (the expectation of a
    ratio is not the ratio of expectations), close when the layers are large.
    Returns those keys plus `intersection`, `union`, `kept_a`, `kept_b` and `per_layer`.
    """
    check_same_model({"a": a, "b": b})
    per_layer = {}
    ka_total = kb_total = 0
    inter_total = 0.0
    for layer, mask_a in a.masks.items():
        n, ka, kb = mask_a.numel(), int(mask_a.sum()), int(b.masks[layer].sum())
        inter = ka * kb / n if n else 0.0
        per_layer[layer] = _chance_row(ka, kb, inter)
        ka_total, kb_total, inter_total = ka_total + ka, kb_total + kb, inter_total + inter
    return {**_chance_row(ka_total, kb_total, inter_total), "per_layer": per_layer}


def _evaluate(model: nn.Module, metrics: Mapping[str, Metric]) -> dict[str, float]:
    return {name: float(metric(model)) for name, metric in metrics.items()}


def _specificity(drop: dict[str, dict[str, float]]) -> dict[str, float]:
    """Own-metric drop minus the mean drop on the other metrics, for subnetworks that have a
    metric of their own name and at least one other metric."""
    out = {}
    for name, row in drop.items():
        others = [value for metric, value in row.items() if metric != name]
        if name in row and others:
            out[name] = row[name] - sum(others) / len(others)
    return out


def cross_ablation(model: nn.Module, subs: Mapping[str, Subnetwork],
                   metrics: Mapping[str, Metric], seed: int) -> dict[str, Any]:
    """Every metric with each subnetwork ablated, and with a same-size random ablation: does
    removing subtask i's subnetwork break subtask i only?

    Returns `baseline[metric]` (nothing ablated), `ablated[i][metric]`, `random_ablated[i]
    [metric]` (i's per-layer counts drawn at random, `sample_like` seeded with `seed`), the
    drops `drop[i][metric]` = baseline - ablated and `random_drop`, and `specificity[i]` =
    drop on metric i minus the mean drop on the other metrics (for subnetworks named like a
    metric; `random_specificity` likewise). Metrics must score higher-is-better.
    """
    names = _names(subs, "cross_ablation")
    if not metrics:
        raise ConfigError("cross_ablation needs at least one metric, got none")
    baseline = _evaluate(model, metrics)
    ablated, random_ablated = {}, {}
    for name in names:
        control = subs[name].sample_like(torch.Generator().manual_seed(seed))
        with apply_subnetwork(model, subs[name], "ablate"):
            ablated[name] = _evaluate(model, metrics)
        with apply_subnetwork(model, control, "ablate"):
            random_ablated[name] = _evaluate(model, metrics)
    drop = {i: {m: baseline[m] - ablated[i][m] for m in metrics} for i in names}
    random_drop = {i: {m: baseline[m] - random_ablated[i][m] for m in metrics} for i in names}
    return {"baseline": baseline, "ablated": ablated, "random_ablated": random_ablated,
            "drop": drop, "random_drop": random_drop, "specificity": _specificity(drop),
            "random_specificity": _specificity(random_drop), "seed": seed}


def frivolous(subs: Sequence[Subnetwork] | Mapping[str, Subnetwork],
              base: Subnetwork | None = None) -> Subnetwork:
    """The targeted weights in none of the subnetworks (nor in `base`): what the subtasks
    studied leave unused. Its fraction of the targeted weights is `.density()` (also in
    `metadata["fraction"]`)."""
    if isinstance(subs, Subnetwork):
        raise TypeError("frivolous takes a list or dict of subnetworks; wrap a single one: "
                        "frivolous([sub])")
    items = dict(subs) if isinstance(subs, Mapping) else {
        f"#{k}": sub for k, sub in enumerate(subs)}
    if base is not None:
        items = {**items, "<base>": base}
    if not items:
        raise ConfigError("frivolous needs at least one subnetwork (or a base), got none")
    check_same_model(items)
    first = next(iter(items.values()))
    used = reduce(lambda x, y: x | y, items.values())
    unused = (~used).masks
    fraction = sum(int(m.sum()) for m in unused.values()) / max(used.total(), 1)
    metadata = {"kind": "frivolous", "of": json.dumps(list(items)), "fraction": repr(fraction)}
    return Subnetwork(unused, dict(first.fingerprint), metadata)
