"""Report of a vision modules run (`instill modules --task shapes`): the shared modules tables and
figures (`modules_report`), the base models, and union induction measured by shape bias.

The unit of replication is the pipeline. Union induction: each metric is averaged over the
grid within a pipeline; the union is compared with the shape subnetwork alone, the texture
subnetwork alone and random init by paired differences (same pipeline, same images), t-test,
Holm-corrected within each metric.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from instill import stats
from instill.experiments.modules_report import (
    ci,
    decided,
    fmt,
    verdict,
    versus_table,
    write_modules_report,
)
from instill.experiments.reporting import table
from instill.runio import RunDir

KEYS = ["kind", "replicate", "condition", "n", "natural_accuracy", "shape_only_accuracy",
        "texture_only_accuracy", "shape_bias", "shape_hits", "texture_hits", "val_accuracy",
        "epochs", "method", "param", "density", "kept", "accuracy", "dense_bytes",
        "sparse_bytes"]
SUBTASKS = ["shape", "texture"]
CONDITIONS = ("union", "shape", "texture", "random")
LABELS = {"union": "the union of shape + texture", "shape": "the shape subnetwork alone",
          "texture": "the texture subnetwork alone", "random": "random init"}
METRICS = ("shape_bias", "natural_accuracy", "shape_only_accuracy", "texture_only_accuracy")
COMPARED = ("shape_bias", "natural_accuracy")  # the metrics the union is tested on


def union_summary(rows: list[dict]) -> dict[str, Any]:
    """Per condition and metric: the mean over the grid within each pipeline, its interval over
    pipelines, and the union against each other condition (decided per metric)."""
    values: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for row in rows:
        for metric in METRICS:
            if row.get(metric) is not None:
                values[row["condition"], metric, row["replicate"]].append(row[metric])
    units = sorted({row["replicate"] for row in rows})

    def per_unit(condition: str, metric: str) -> list[float]:
        return [statistics.fmean(values[condition, metric, u]) for u in units]

    versus = {metric: decided({f"union vs {c}": stats.paired_difference(
        per_unit("union", metric), per_unit(c, metric)) for c in CONDITIONS[1:]})
        for metric in COMPARED}
    return {"grid": sorted({row["n"] for row in rows}),
            "by_condition": {c: {m: ci(per_unit(c, m)) for m in METRICS} for c in CONDITIONS},
            "versus": versus}


def headline(over: dict, ablation: dict, union: dict | None, n: int) -> str:
    """One sentence the intervals support (decisions: paired t-test, Holm, interval sign)."""
    pair = over["iou_vs_chance"]["(shape, texture)"]
    iou = over["pairs"]["(shape, texture)"]
    overlap = {"better": "overlap more than chance", "worse": "overlap less than chance",
               "indistinguishable": "overlap no more than chance explains at this power"}[
        pair["decision"]]
    specific = [i for i, v in ablation["specificity_vs_random"].items()
                if v["decision"] == "better"]
    text = (f"Over {n} pipelines, the shape and texture subnetworks {overlap} (IoU "
            f"{fmt(iou['iou'], '.2f')} vs chance {iou['chance_iou']['mean']:.2f}) and "
            f"{len(specific)} of 2 are more specific than a same-size random ablation"
            + (f" ({', '.join(specific)})" if specific else ""))
    if union:
        bias = union["by_condition"]["union"]["shape_bias"]
        parts = []
        for c in CONDITIONS[1:]:
            v = union["versus"]["shape_bias"][f"union vs {c}"]
            parts.append(f"{verdict(v)} {LABELS[c]} ({v['mean_diff']:+.2f} [{v['low']:+.2f}, "
                         f"{v['high']:+.2f}])")
        text += (f"; transplanted together, their union gives a shape bias of "
                 f"{fmt(bias, '.2f')}, which " + ", ".join(parts[:-1]) + f" and {parts[-1]}")
    return text + "."


BASE_KEYS = ("natural_accuracy", "shape_only_accuracy", "texture_only_accuracy", "shape_bias")


def _base_lines(base: dict[str, dict]) -> list[str]:
    """The base models: accuracy on every split and shape bias (what the gates read)."""
    return ["## Base models", "",
            "The ResNet trained on natural images, on held-out images of each split; shape bias "
            "= shape / (shape + texture) decisions on cue-conflict images.", "",
            table(["", *BASE_KEYS], [["mean [95%]", *(fmt(base[k]) for k in BASE_KEYS)]]), ""]


def _union_lines(u: dict) -> list[str]:
    """The union-induction section: every condition's metrics and the decided comparisons."""
    return ["## Union induction", "",
            "Transplanted (frozen) into a fresh ResNet, the rest re-initialized and trained on "
            f"natural images (n in {u['grid']}, mean over the grid per pipeline): the union of "
            "the shape and texture subnetworks, each alone, or nothing (random init).", "",
            table(["condition", *METRICS],
                  [[LABELS[c], *(fmt(u["by_condition"][c][m]) for m in METRICS)]
                   for c in CONDITIONS]), "",
            "Shape bias:", "", versus_table(u["versus"]["shape_bias"], "difference"), "",
            "Natural accuracy:", "", versus_table(u["versus"]["natural_accuracy"],
                                                  "difference"), ""]


def write_report(run: RunDir, cfg: dict[str, Any], defaults: dict[str, Any], rows: list[dict],
                 analyses: dict[str, dict], bases: dict[str, dict], gates: dict[str, Any],
                 warnings: list[str]) -> dict[str, Any]:
    """results.csv, summary.json, overlap/ablation/compression.png and report.md; the summary."""
    union_rows = [r for r in rows if r["kind"] == "union"]
    union = union_summary(union_rows) if union_rows else None
    base = {k: ci([b[k] for b in bases.values()]) for k in BASE_KEYS}
    own = _base_lines(base) + (_union_lines(union) if union else [])
    title = (f"# Modules in vision: shape and texture subnetworks of a ResNet ({cfg['classes']} "
             f"classes, {cfg['size']} px, rho {cfg['rho']})")
    return write_modules_report(
        run, cfg, defaults, rows, analyses, gates, warnings, subtasks=SUBTASKS, keys=KEYS,
        title=title, union=union, own_lines=own, extra={"base_models": base},
        headline_of=lambda over, ablation, n: headline(over, ablation, union, n))
