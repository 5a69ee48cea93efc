"""Tables, statistics, plots, example grids and report.md of a shape-bias run.

The unit of replication is the replicate pipeline (its own base model and subnetworks): within
a pipeline each metric is averaged over the downstream seeds, then over the grid. Per
condition: 95% bootstrap intervals over pipelines; Subtask Induction against every other
condition as paired differences (same pipeline, same images) with a paired t-test,
Holm-corrected within each metric (shape bias, natural accuracy).
"""

from __future__ import annotations

import statistics
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from instill import stats
from instill.experiments import reporting
from instill.experiments.common import CONDITIONS
from instill.experiments.reporting import save_figure, table
from instill.runio import RunDir
from instill.storage import atomic_write_text, write_json
from instill.tasks.shape_task import shape_preserving_augment
from instill.tasks.shapes import preview_grid

OURS = "subnet"
LABELS = {**{name: c.label for name, c in CONDITIONS.items()},
          "random_aug": "random init + shape-preserving aug",
          "random_subnet": "subnetwork of a random-init model"}
SHORT = {"random_aug": "random init + shape aug", "random_subnet": "random-init subnetwork"}

#: Shape-bias anchors of Geirhos et al. (2019), drawn as reference lines.
ANCHORS = {"ImageNet ResNet-50": 0.22, "Stylized-ImageNet ResNet-50": 0.81, "humans": 0.96}

METRICS = ("shape_bias", "natural_accuracy", "shape_only_accuracy")
COMPARED = ("shape_bias", "natural_accuracy")  # each its own family of paired comparisons
VERIFIED = ("full model", "subnetwork only", "subnetwork ablated", "random same-size ablated")
SAID = {"better": "higher than", "worse": "lower than",
        "indistinguishable": "indistinguishable at this power from"}
CSV_KEYS = ["arch", "replicate", "n", "seed", "condition", "shape_bias", "natural_accuracy",
            "shape_only_accuracy", "shape_hits", "texture_hits", "other", "cue_conflict_n",
            "val_accuracy", "best_epoch", "epochs"]  # wall times stay in cells/*.json


def _conditions(cfg, rows: list[dict]) -> list[str]:
    """The configured conditions that have results (a condition may have been skipped)."""
    present = {r["condition"] for r in rows}
    return [c for c in cfg.conditions if c in present]


def unit_means(rows: list[dict], metric: str) -> dict[str, dict[str, dict[int, float]]]:
    """condition -> pipeline ("r0") -> n -> mean of `metric` over the downstream seeds; a None
    (no cue-conflict prediction matched either cue) is left out."""
    groups: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for row in rows:
        if row[metric] is not None:
            groups[row["condition"], f"r{row['replicate']}", row["n"]].append(row[metric])
    out: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for (condition, unit, n), values in sorted(groups.items()):
        out[condition][unit][n] = statistics.fmean(values)
    return out


def _interval(values: list[float]) -> dict[str, Any] | None:
    return stats.bootstrap_mean(values).to_dict() if values else None


def versus(per_unit: dict[str, dict[str, float]], conditions: list[str]
           ) -> dict[str, stats.Paired]:
    """Subtask Induction minus each other condition, paired by pipeline, Holm-adjusted."""
    ours, out = per_unit.get(OURS, {}), {}
    for c in conditions:
        units = sorted(set(ours) & set(per_unit.get(c, {})))
        if c != OURS and units:
            out[c] = stats.paired_difference([ours[u] for u in units],
                                             [per_unit[c][u] for u in units])
    return stats.adjust(out)


def summarize(cfg, rows: list[dict], verify: dict, bases: dict[str, dict], gates: dict,
              data_info: dict, notes: dict[str, str]) -> dict[str, Any]:
    """summary.json: each metric per condition with its interval over pipelines (over the grid
    and per n), paired comparisons of Subtask Induction against every other condition, the
    base models, and the gates' record."""
    conditions, units = _conditions(cfg, rows), list(gates)
    curves = {m: unit_means(rows, m) for m in METRICS}
    overall = {m: {c: {u: statistics.fmean(curve.values()) for u, curve in curves[m][c].items()}
                   for c in conditions} for m in METRICS}
    ns = sorted({r["n"] for r in rows})
    by_condition = {c: {
        "label": LABELS[c],
        **{m: _interval(list(overall[m][c].values())) for m in METRICS},
        "per_replicate": {u: {m: overall[m][c].get(u) for m in METRICS} for u in units},
        "per_n": {str(n): {m: _interval([curve[n] for curve in curves[m][c].values()
                                         if n in curve]) for m in METRICS} for n in ns},
    } for c in conditions}
    summary = {
        "arch": cfg.arch,
        "grid": list(cfg.grid),
        "seeds": cfg.seeds,
        "units": units,
        "conditions": conditions,
        "base_model": {m: _interval([b[m] for b in bases.values() if b[m] is not None])
                       for m in METRICS},
        "base_models": {u: {k: b.get(k) for k in (*METRICS, "best_epoch", "parameters")}
                        for u, b in bases.items()},
        "subnetwork_density": {u: {k: v["density"] for k, v in kinds.items()}
                               for u, kinds in verify.items()},
        "by_condition": by_condition,
        "subnet_vs": {m: {c: {**p.to_dict(), "decision": stats.decide(p)}
                          for c, p in versus(overall[m], conditions).items()} for m in COMPARED},
        "gates": gates,
        "gates_overridden": sorted(u for u, g in gates.items() if g.get("overridden")),
        "anchors": ANCHORS,
        "data": data_info,
        "notes": notes,
    }
    summary["headline"] = headline(cfg, summary)
    return summary


def headline(cfg, summary: dict) -> str:
    """One sentence that says only what the intervals support."""
    by, units, warn = summary["by_condition"], len(summary["units"]), summary["gates_overridden"]
    prefix = (f"WARNING: gates failed and were overridden for {', '.join(warn)}; these results "
              "rest on a base model or subnetwork that did not pass. " if warn else "")
    over = (f"over {units} replicate pipeline{'s' * (units != 1)} ({cfg.arch}; mean over n in "
            f"{list(cfg.grid)} and {cfg.seeds} downstream seed(s) each)")
    if OURS not in by:
        return prefix + f"Shape bias on cue-conflict images {over}: " + ", ".join(
            f"{LABELS[c]} {_i(v['shape_bias'])}" for c, v in by.items()) + "."
    text = (f"Subtask Induction's shape bias on cue-conflict images is "
            f"{_i(by[OURS]['shape_bias'])} {over}")
    if "random" in by:
        text += f", against {_i(by['random']['shape_bias'])} for random init"
    shape = summary["subnet_vs"]["shape_bias"]
    parts = [f"{said} " + ", ".join(f"{LABELS[c]} ({_diff(p)})" for c, p in shape.items()
                                    if p["decision"] == decision)
             for decision, said in SAID.items()
             if any(p["decision"] == decision for p in shape.values())]
    if parts:
        text += (": " + "; ".join(parts)
                 + " (paired differences over pipelines, 95% intervals, Holm-corrected)")
    natural = summary["subnet_vs"]["natural_accuracy"].get("random")
    if natural:
        text += (f". Its natural accuracy {_i(by[OURS]['natural_accuracy'])} is "
                 f"{SAID[natural['decision']]} random init's "
                 f"{_i(by['random']['natural_accuracy'])} ({_diff(natural)})")
    return prefix + text + "."


def _i(interval: dict | None) -> str:
    return "n/a" if interval is None else f"{stats.Interval(**interval):.2f}"


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _diff(p: dict) -> str:
    return f"{p['mean_diff']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}]"


def _tick(condition: str) -> str:
    return textwrap.fill(SHORT.get(condition, LABELS[condition]), 12)


def write_csv(run: RunDir, cfg, rows: list[dict]) -> None:
    order = {c: i for i, c in enumerate(cfg.conditions)}
    rows = sorted(rows, key=lambda r: (r["replicate"], r["n"], r["seed"], order[r["condition"]]))
    reporting.write_csv(run.path("results.csv"), CSV_KEYS, rows)


def plot(run: RunDir, cfg, summary: dict) -> None:
    """shape_bias.png: shape bias per condition (bars per n: mean over pipelines, whiskers: 95%
    interval) with Geirhos et al.'s anchors and the base models; accuracy on held-out natural
    (solid) and shape_only (dashed) images against n, with 95% bands over pipelines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions, by = summary["conditions"], summary["by_condition"]
    ns = sorted({int(n) for c in by.values() for n in c["per_n"]})
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(len(ns), 1)
    for i, n in enumerate(ns):
        xs, heights, lows, highs = [], [], [], []
        for j, c in enumerate(conditions):
            bias = by[c]["per_n"][str(n)]["shape_bias"]
            if bias is None:
                continue
            xs.append(j + (i - (len(ns) - 1) / 2) * width)
            heights.append(bias["mean"])
            lows.append(bias["mean"] - bias["low"])
            highs.append(bias["high"] - bias["mean"])
        left.bar(xs, heights, width, yerr=[lows, highs], capsize=2, label=f"n={n}")
    styles = iter(["-.", "--", ":"])
    for name, value in ANCHORS.items():
        left.axhline(value, color="grey", lw=0.9, ls=next(styles))
        left.text(len(conditions) - 0.45, value + 0.01, f"{name} {value}", fontsize=7,
                  ha="right", color="dimgrey")
    base = summary["base_model"]["shape_bias"]
    if base is not None:
        left.axhline(base["mean"], color="black", lw=1.2)
        left.axhspan(base["low"], base["high"], color="black", alpha=0.08)
        left.text(-0.45, base["high"] + 0.01, f"base models {_i(base)}", fontsize=7)
    left.set_xticks(range(len(conditions)), [_tick(c) for c in conditions], fontsize=8)
    left.set(ylabel="shape bias  shape / (shape + texture)", ylim=(0, 1.05),
             title=f"Shape bias on cue-conflict images ({cfg.arch})\nbars: mean over "
                   f"{len(summary['units'])} pipelines, whiskers: 95% interval")
    left.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, 0.93))
    for c in conditions:
        per_n, color = by[c]["per_n"], None
        for metric, style, alpha in (("natural_accuracy", "-", 0.12),
                                     ("shape_only_accuracy", "--", 0.06)):
            points = [(n, per_n[str(n)][metric]) for n in ns if per_n[str(n)][metric]]
            xs = [n for n, _ in points]
            line = right.plot(xs, [v["mean"] for _, v in points], marker=".", ls=style,
                              color=color, label=None if color else LABELS[c])[0]
            color = line.get_color()
            right.fill_between(xs, [v["low"] for _, v in points], [v["high"] for _, v in points],
                               color=color, alpha=alpha)
    right.set_xscale("log")
    right.set_xticks(ns, [str(n) for n in ns])
    right.minorticks_off()
    right.set(xlabel="downstream natural images n", ylabel="accuracy", ylim=(0, 1.02),
              title="Accuracy: held-out natural (solid), shape_only (dashed)\n"
                    "95% bands over pipelines")
    right.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    save_figure(fig, run.path("shape_bias.png"))


def _image_grid(path: Path, rows: list[tuple[str, torch.Tensor, list[str]]],
                title: str) -> None:
    """A PNG with one row of images per (label, images [k, 3, S, S], titles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(images) for _, images, _ in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.25 * cols + 0.6, 1.45 * len(rows)),
                             squeeze=False)
    for r, (label, images, titles) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy(),
                          interpolation="nearest")
                ax.set_title(titles[c], fontsize=7)
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def write_examples(run: RunDir, cfg, data) -> list[str]:
    """examples.png (preview_grid for the generated world, else the real sets) and
    augmentation.png (natural images and their `random_aug` augmentations)."""
    k = 8
    if all(v is None for v in (cfg.train_dir, cfg.shape_dir, cfg.cue_conflict_dir)):
        preview_grid(cfg.world, cfg.seed, run.path("examples.png"), per_split=k)
    else:
        def row(label: str, s) -> tuple[str, torch.Tensor, list[str]]:
            idx = list(range(min(k, len(s))))
            names = s.class_names
            titles = [names[int(s.shapes[i])] if int(s.shapes[i]) == int(s.textures[i]) else
                      f"{names[int(s.shapes[i])]}/{names[int(s.textures[i])]}" for i in idx]
            return label, s.images[idx], titles

        _image_grid(run.path("examples.png"),
                    [row("natural", data.test), row("shape_only", data.shape_eval),
                     row("cue_conflict", data.cue_conflict)],
                    "Evaluation images (shape/texture where they differ)")
    images = data.test.images[:k]
    augmented = [shape_preserving_augment(images, torch.Generator().manual_seed(i), cfg.augment)
                 for i in range(2)]
    names = [data.class_names[int(i)] for i in data.test.labels[:k]]
    _image_grid(run.path("augmentation.png"),
                [("natural", images, names), *[(f"augmented {i + 1}", a, names)
                                               for i, a in enumerate(augmented)]],
                "random_aug: shape-preserving augmentation (colour permutation/inversion, "
                "grayscale, blur, noise)")
    return ["examples.png", "augmentation.png"]


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _paired_rows(results: dict[str, dict]) -> list[list[Any]]:
    return [[f"Subtask Induction - {LABELS[c]}", _diff(p), f"{p['p_value']:.2g}",
             f"{p['p_adjusted']:.2g}", p["n"], SAID[p["decision"]].split(" at ")[0]]
            for c, p in results.items()]


def markdown(cfg, summary: dict, verify: dict, paper: dict[str, Any], ours: dict[str, Any]
             ) -> str:
    """report.md: headline, setup, gates, base models, verification, results."""
    flat_paper, flat_ours = _flatten(paper), _flatten(ours)
    unused = "vit." if cfg.arch == "resnet" else "resnet."
    differs = [f"`{k}`: {flat_ours[k]} (paper preset: {v})" for k, v in flat_paper.items()
               if flat_ours[k] != v and k != "seed" and not k.startswith(unused)]
    data, by, units = summary["data"], summary["by_condition"], len(summary["units"])
    bases = summary["base_models"]
    base_rows = [[u, summary["gates"][u]["attempt"], _f(b["natural_accuracy"]),
                  _f(b["shape_only_accuracy"]), _f(b["shape_bias"]), b["best_epoch"]]
                 for u, b in bases.items()]
    base_rows.append(["mean [95%]", "", *[_i(summary["base_model"][m]) for m in (
        "natural_accuracy", "shape_only_accuracy", "shape_bias")], ""])
    verify_rows = [[unit, source, name, *[_f(v["accuracy"][name][k]) for k in (
        "shape_only", "natural", "shape_bias")]] for unit, kinds in verify.items()
        for source, v in kinds.items() for name in VERIFIED]
    ns = [str(n) for n in summary["grid"]]
    interval_rows = [[LABELS[c], *[_i(by[c][m]) for m in METRICS]] for c in summary["conditions"]]
    per_n_rows = [[LABELS[c], *[" / ".join(_f(None if by[c]["per_n"][n][m] is None else
                                                by[c]["per_n"][n][m]["mean"]) for m in METRICS)
                                for n in ns]] for c in summary["conditions"]]
    density = "; ".join(f"{u} " + ", ".join(f"{k} {v:.4f}" for k, v in kinds.items())
                        for u, kinds in summary["subnetwork_density"].items())
    header = ["comparison", "mean difference [95%]", "p", "p (Holm)", "pipelines", "decision"]
    notes, overridden = summary["notes"], summary["gates_overridden"]
    return "\n\n".join([
        f"# Subtask Induction: shape bias ({cfg.arch})",
        f"**{summary['headline']}**",
        "## Setup",
        f"Data: {data['sources']['natural']} for natural images (label = shape; texture agrees "
        f"with probability rho = {cfg.rho} in the generated world); shape-only images: "
        f"{data['sources']['shape_only']}; cue-conflict images: "
        f"{data['sources']['cue_conflict']}. Classes ({len(data['classes'])}): "
        f"{', '.join(data['classes'])}. Set sizes: "
        + ", ".join(f"{k} {v}" for k, v in data["sizes"].items()) + ".",
        f"Model: HF {cfg.arch} {ours[cfg.arch]}, "
        f"{next(iter(bases.values()))['parameters']} parameters, {cfg.size}x{cfg.size} images. "
        f"{units} replicate pipeline(s), each with its own base model, subnetworks and "
        f"downstream images. Conditions: {', '.join(cfg.conditions)}; downstream sizes n = "
        f"{list(cfg.grid)}, {cfg.seeds} seed(s) per pipeline; each cell trains every condition "
        f"on the same images for max({cfg.induction_fit.epochs}, "
        f"ceil({cfg.induction_min_examples} / n)) epochs and keeps the epoch with the best "
        "natural validation accuracy.",
        "Settings that differ from the paper preset:\n\n"
        + ("\n".join(f"- {d}" for d in differs) or "- none"),
        "## Gates",
        "Each pipeline's base model must reach the natural-accuracy threshold on held-out images "
        "and be texture-biased (1 - shape bias) on cue-conflict images; its subnetwork must "
        "classify shape_only images alone and be specific (ablating it must hurt shape_only "
        "accuracy at least as much, up to the margin, as ablating as many random weights). A "
        "failed attempt is retried with the next seed; every attempt is listed."
        + (f" **WARNING: gates were overridden (`gates.enforce: false`) for "
           f"{', '.join(overridden)}: these results rest on a base model or subnetwork that "
           "did not pass.**" if overridden else ""),
        reporting.gates_table(summary["gates"]),
        "## Base models",
        table(["pipeline", "attempt", "natural accuracy", "shape_only accuracy", "shape bias",
                "best epoch"], base_rows),
        "## Verification of the shape subnetwork",
        f"Density (kept fraction of the masked weights): {density}. `trained` is the subnetwork "
        "of the base model; `random_init` the one found with the same settings in a randomly "
        "initialized model.",
        table(["pipeline", "source", "model", "shape_only accuracy", "natural accuracy",
                "shape bias"], verify_rows),
        "## Induction results",
        "![shape bias](shape_bias.png)",
        f"Mean over the grid and seeds of each pipeline, then over the {units} pipelines, with "
        "95% bootstrap intervals:",
        table(["condition", "shape bias [95%]", "natural accuracy [95%]",
                "shape_only accuracy [95%]"], interval_rows),
        "Per n (shape bias / natural accuracy / shape_only accuracy, mean over pipelines):",
        table(["condition", *[f"n={n}" for n in ns]], per_n_rows),
        "### Subtask Induction against each condition (paired by pipeline)",
        "Shape bias (Holm-corrected over this table):",
        table(header, _paired_rows(summary["subnet_vs"]["shape_bias"])),
        "Natural accuracy (Holm-corrected over this table):",
        table(header, _paired_rows(summary["subnet_vs"]["natural_accuracy"])),
        "A model at chance level scores a shape bias near 0.5 (it hits shape and texture "
        "equally rarely), so read shape bias together with accuracy. Reference shape biases "
        "(Geirhos et al. 2019): "
        + ", ".join(f"{k} {v}" for k, v in ANCHORS.items()) + ".",
        ("Notes: " + "; ".join(f"{k}: {v}" for k, v in notes.items())) if notes else "",
        "## Examples",
        "![examples](examples.png)\n\n![augmentation](augmentation.png)",
    ]).replace("\n\n\n\n", "\n\n") + "\n"


def write_report(run: RunDir, cfg, rows: list[dict], verify: dict, bases: dict[str, dict],
                 gates: dict[str, Any], data, notes: dict[str, str], paper: dict[str, Any],
                 ours: dict[str, Any]) -> dict[str, Any]:
    """Write results.csv, summary.json, shape_bias.png, examples, report.md; return the
    summary. `paper` and `ours` are the paper preset's and this run's config as dicts (for the
    differences), so this module needs no experiment class."""
    write_csv(run, cfg, rows)
    summary = summarize(cfg, rows, verify, bases, gates, data.describe(), notes)
    write_json(run.path("summary.json"), summary)
    plot(run, cfg, summary)
    examples = write_examples(run, cfg, data)
    atomic_write_text(run.path("report.md"), markdown(cfg, summary, verify, paper, ours))
    run.record_outputs(["results.csv", "summary.json", "shape_bias.png", "report.md",
                        "verify.json", *examples])
    return summary
