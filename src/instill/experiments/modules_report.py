"""Tables, statistics, figures and report.md of a modules run (`instill modules`).

The unit of replication is the pipeline (one base model and its subnetworks). Every number is
a mean with a 95% bootstrap interval over pipelines; observed-against-chance, specific-against-
random and union-against-alone are paired differences (same pipeline) with a paired t-test,
Holm-corrected within each family.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from instill import stats
from instill.experiments import reporting
from instill.experiments.reporting import save_figure, table
from instill.runio import RunDir
from instill.storage import atomic_write_text, write_json

KEYS = ["kind", "replicate", "target", "condition", "n", "accuracy", "val_accuracy", "method",
        "param", "density", "kept", "dense_bytes", "sparse_bytes"]


def ci(values: list[float | None]) -> dict[str, Any]:
    """Mean and interval of the defined values (None: undefined, e.g. the shared fraction of
    an empty subnetwork); all None gives None fields and n 0."""
    kept = [v for v in values if v is not None and math.isfinite(v)]
    if not kept:
        return {"mean": None, "low": None, "high": None, "n": 0}
    return stats.bootstrap_mean(kept).to_dict()


def fmt(d: dict[str, Any], spec: str = ".3f") -> str:
    if d["mean"] is None:
        return "undefined"
    return f"{d['mean']:{spec}} [{d['low']:{spec}}, {d['high']:{spec}}]"


def _paired(a: list[float], b: list[float]) -> stats.Paired:
    return stats.paired_difference(a, b)


def decided(family: dict[str, stats.Paired]) -> dict[str, dict[str, Any]]:
    return {k: {**p.to_dict(), "decision": stats.decide(p)}
            for k, p in stats.adjust(family).items()}


def overlap_summary(analyses: dict[str, dict], names: list[str]) -> dict[str, Any]:
    """Observed IoU and shared fraction per ordered pair against chance, overall and per layer."""
    units = sorted(analyses)
    pairs, family = {}, {}
    for i in names:
        for j in names:
            if i == j:
                continue
            iou = [analyses[u]["overlap"]["iou"][i][j] for u in units]
            chance = [analyses[u]["chance"][i][j]["iou"] for u in units]
            shared = [analyses[u]["overlap"]["shared_fraction"][i][j] for u in units]
            shared_chance = [analyses[u]["chance"][i][j]["shared_a_in_b"] for u in units]
            pairs[f"({i}, {j})"] = {"iou": ci(iou), "chance_iou": ci(chance),
                                   "shared_fraction": ci(shared),
                                   "chance_shared_fraction": ci(shared_chance)}
            if names.index(i) < names.index(j):
                family[f"({i}, {j})"] = _paired(iou, chance)
    layers = list(analyses[units[0]]["overlap"]["per_layer"])
    per_layer = {layer: {f"({i}, {j})": {
        "iou": statistics.fmean(analyses[u]["overlap"]["per_layer"][layer]["iou"][i][j]
                                for u in units),
        "chance_iou": statistics.fmean(analyses[u]["chance"][i][j]["per_layer"][layer]["iou"]
                                       for u in units)}
        for a, i in enumerate(names) for j in names[a + 1:]} for layer in layers}
    density = {n: {layer: statistics.fmean(analyses[u]["per_layer_density"][n][layer]
                                           for u in units) for layer in layers} for n in names}
    return {"pairs": pairs, "iou_vs_chance": decided(family), "per_layer": per_layer,
            "per_layer_density": density,
            "density": {n: ci([analyses[u]["density"][n] for u in units]) for n in names},
            "alone": {n: ci([analyses[u]["alone"][n] for u in units]) for n in names}}


def ablation_summary(analyses: dict[str, dict], subtasks: list[str]) -> dict[str, Any]:
    """Cross-ablation matrix (subnetwork i removed, read j) against same-size random removal."""
    units = sorted(analyses)
    reads = [*subtasks, "base"]
    cross = {u: analyses[u]["cross_ablation"] for u in units}
    matrix = {i: {j: {"ablated": ci([cross[u]["ablated"][i][j] for u in units]),
                      "random": ci([cross[u]["random_ablated"][i][j] for u in units])}
                  for j in reads} for i in subtasks}
    spec = {i: _paired([cross[u]["specificity"][i] for u in units],
                       [cross[u]["random_specificity"][i] for u in units]) for i in subtasks}
    return {"reads": reads, "baseline": {j: ci([cross[u]["baseline"][j] for u in units])
                                         for j in reads},
            "matrix": matrix,
            "specificity": {i: ci([cross[u]["specificity"][i] for u in units])
                            for i in subtasks},
            "random_specificity": {i: ci([cross[u]["random_specificity"][i] for u in units])
                                   for i in subtasks},
            "specificity_vs_random": decided(spec)}


def compression_summary(rows: list[dict]) -> list[dict[str, Any]]:
    """Per method and setting: actual kept fraction, base accuracy and file sizes."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["method"], row["param"]].append(row)
    out = []
    for (method, param), group in sorted(groups.items(), key=lambda g: (g[0][0], -g[0][1])):
        out.append({"method": method, "param": param,
                    "density": ci([r["density"] for r in group]),
                    "accuracy": ci([r["accuracy"] for r in group]),
                    "dense_bytes": statistics.fmean(r["dense_bytes"] for r in group),
                    "sparse_bytes": statistics.fmean(r["sparse_bytes"] for r in group)})
    return out


def union_summary(rows: list[dict], pair: list[str], targets: list[str]) -> dict[str, Any]:
    """AUC over log n per target and condition; union against each alone and against random.
    `targets[k]` is the target meant to need `pair[k]` (its matching subnetwork)."""
    curves: dict[tuple[str, str, int], dict[int, float]] = defaultdict(dict)
    for row in rows:
        curves[row["target"], row["condition"], row["replicate"]][row["n"]] = row["accuracy"]
    units = sorted({r for _, _, r in curves})
    conditions = ("union", "first", "second", "random")
    auc = {(t, c): [stats.auc_log(curves[t, c, r]) for r in units]
           for t in targets for c in conditions}
    family = {f"{t}: union vs {c}": _paired(auc[t, "union"], auc[t, c])
              for t in targets for c in ("first", "second", "random")}
    return {"pair": pair, "targets": targets,
            "matching": {targets[0]: "first", targets[1]: "second"},
            "auc": {t: {c: ci(auc[t, c]) for c in conditions} for t in targets},
            "versus": decided(family)}


def headline(over: dict, ablation: dict, union: dict | None, n: int) -> str:
    """One sentence the intervals support (decisions: paired t-test, Holm, interval sign)."""
    verdicts = over["iou_vs_chance"]
    task_pairs = [k for k in verdicts if ", base)" not in k]
    above = [k for k in task_pairs if verdicts[k]["decision"] == "better"]
    ious = ", ".join(f"{k} {fmt(over['pairs'][k]['iou'], '.2f')} vs chance "
                     f"{over['pairs'][k]['chance_iou']['mean']:.2f}" for k in task_pairs)
    specific = [i for i, v in ablation["specificity_vs_random"].items()
                if v["decision"] == "better"]
    text = (f"Over {n} pipelines, {len(above)} of {len(task_pairs)} subtask pairs overlap above "
            f"chance (IoU {ious}) and {len(specific)} of "
            f"{len(ablation['specificity_vs_random'])} subnetworks are more specific than a "
            "same-size random ablation")
    if union:
        parts = []
        for t in union["targets"]:
            match = union["matching"][t]
            other = "second" if match == "first" else "first"
            name = union["pair"][0 if other == "first" else 1]
            gain = union["versus"][f"{t}: union vs {other}"]
            same = union["versus"][f"{t}: union vs {match}"]
            parts.append(f"on `{t}` it {verdict(gain)} `{name}` alone (AUC "
                         f"{gain['mean_diff']:+.2f} [{gain['low']:.2f}, {gain['high']:.2f}]) "
                         f"and {verdict(same)} its matching subnetwork alone "
                         f"({same['mean_diff']:+.2f} [{same['low']:.2f}, {same['high']:.2f}])")
        text += (f"; the union of `{union['pair'][0]}` and `{union['pair'][1]}`: "
                 + "; ".join(parts))
    return text + "."


def verdict(result: dict) -> str:
    return {"better": "beats", "worse": "is worse than",
            "indistinguishable": "is not distinguishable at this power from"}[
        result["decision"]]


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config sections as dotted keys, so the report lists only the values changed."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(layer: str) -> str:
    """A parameter name short enough for an axis label."""
    for long, short in (("transformer.", ""), ("resnet.encoder.stages.", "s"), ("resnet.", ""),
                        (".layers.", ".l"), (".layer.", "."), (".convolution", ".conv"),
                        (".weight", "")):
        layer = layer.replace(long, short)
    return layer


def _figures(run: RunDir, over: dict, ablation: dict, comp: list[dict], names: list[str],
             subtasks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    grid = np.array([[1.0 if i == j else over["pairs"][f"({i}, {j})"]["iou"]["mean"]
                      for j in names] for i in names])
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for (a, b), v in np.ndenumerate(grid):
        ax.text(b, a, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_title("IoU of subnetworks (mean over pipelines)")
    fig.colorbar(im, ax=ax)
    layers = list(over["per_layer_density"][names[0]])
    x = np.arange(len(layers))
    for k, n in enumerate(names):
        bx.bar(x + k * 0.8 / len(names), [over["per_layer_density"][n][la] for la in layers],
               0.8 / len(names), label=n)
    bx.set_xticks(x + 0.4, [_short(la) for la in layers], rotation=60, ha="right", fontsize=7)
    bx.set_ylabel("kept fraction")
    bx.set_title("per-layer density")
    bx.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, run.path("overlap.png"))

    reads = ablation["reads"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "ablated", "subnetwork i ablated"),
                           (axes[1], "random", "same-size random ablation")):
        m = np.array([[ablation["matrix"][i][j][key]["mean"] for j in reads] for i in subtasks])
        ax.imshow(m, vmin=0, vmax=1, cmap="magma")
        for (a, b), v in np.ndenumerate(m):
            ax.text(b, a, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
        ax.set_xticks(range(len(reads)), [f"read {j}" for j in reads], fontsize=8)
        ax.set_yticks(range(len(subtasks)), [f"ablate {i}" for i in subtasks], fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, run.path("ablation.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    methods = sorted({r["method"] for r in comp})
    for method in methods:
        pts = sorted((r["density"]["mean"], r["accuracy"]) for r in comp if r["method"] == method)
        ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                    yerr=[[p[1]["mean"] - p[1]["low"] for p in pts],
                          [p[1]["high"] - p[1]["mean"] for p in pts]],
                    capsize=3, label=method, **{
                        "magnitude": {"marker": "s", "linestyle": "-", "linewidth": 3},
                        "torch_prune": {"marker": "x", "linestyle": ":", "color": "k"},
                    }.get(method, {"marker": "o", "linestyle": "none"}))
    ax.set_xscale("log")
    ax.set_xlabel("kept fraction of the masked weights")
    ax.set_ylabel("base-task accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, run.path("compression.png"))


def write_report(run: RunDir, cfg: dict[str, Any], defaults: dict[str, Any], rows: list[dict],
                 analyses: dict[str, dict], gates: dict[str, Any],
                 warnings: list[str]) -> dict[str, Any]:
    """The arithmetic run's results.csv, summary.json, figures and report.md; the summary."""
    subtasks = list(cfg["subtasks"])
    union_rows = [r for r in rows if r["kind"] == "union"]
    union = union_summary(union_rows, cfg["union"]["pair"], cfg["union"]["targets"]) \
        if union_rows else None
    title = f"# Modules: `{cfg['base']}` with subtasks " + ", ".join(f"`{t}`" for t in subtasks)
    return write_modules_report(
        run, cfg, defaults, rows, analyses, gates, warnings, subtasks=subtasks, keys=KEYS,
        title=title, union=union, own_lines=_union_lines(union) if union else [],
        headline_of=lambda over, ablation, n: headline(over, ablation, union, n))


def write_modules_report(run: RunDir, cfg: dict[str, Any], defaults: dict[str, Any],
                         rows: list[dict], analyses: dict[str, dict], gates: dict[str, Any],
                         warnings: list[str], *, subtasks: list[str], keys: list[str],
                         title: str, union: dict | None, own_lines: list[str],
                         headline_of: Callable[[dict, dict, int], str],
                         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every modules variant writes: results.csv (`keys`), summary.json, overlap.png,
    ablation.png, compression.png and report.md, with the variant's own sections
    (`own_lines`, after the shared ones), headline and `extra` summary entries."""
    names = [*subtasks, "base"]
    reporting.write_csv(run.path("results.csv"), keys,
                        [{k: row.get(k) for k in keys} for row in rows])
    over = overlap_summary(analyses, names)
    ablation = ablation_summary(analyses, subtasks)
    comp = compression_summary([r for r in rows if r["kind"] == "compression"])
    units = sorted(analyses)
    friv = {k: ci([analyses[u]["frivolous"][k] for u in units]) for k in
            ("fraction", "base_accuracy_full", "base_accuracy_removed",
             "base_accuracy_random_removed")}
    summary = {"units": units, "headline": headline_of(over, ablation, len(units)),
               "overlap": over, "cross_ablation": ablation, "frivolous": friv,
               "compression": comp, "union": union, "gates": gates,
               "gates_overridden": [u for u, g in gates.items() if g.get("overridden")],
               "warnings": warnings, **(extra or {})}
    write_json(run.path("summary.json"), summary)
    _figures(run, over, ablation, comp, names, subtasks)
    lines = [title, "", f"**{summary['headline']}**", "",
             "Every value: mean [95% bootstrap interval] over pipelines; comparisons are paired "
             "(same pipeline), t-test, Holm-corrected per table.", "",
             *_sections(summary, names, subtasks), *own_lines,
             *_closing(summary, cfg, defaults)]
    atomic_write_text(run.path("report.md"), "\n".join(lines))
    return summary


def _sections(s: dict, names: list[str], subtasks: list[str]) -> list[str]:
    """The report's subnetwork, overlap, cross-ablation, frivolous and compression sections."""
    over, abl = s["overlap"], s["cross_ablation"]
    return ["## Subnetworks", "",
             table(["subnetwork", "density", "accuracy alone on its task"],
                   [[n, fmt(over["density"][n], ".4f"), fmt(over["alone"][n])]
                    for n in names]), "",
             "## Overlap against chance (overlap.png)", "",
             "IoU = |i∩j|/|i∪j|; shared = |i∩j|/|i| (fraction of i also in j); chance: two "
             "random masks with the same per-layer counts.", "",
             table(["(i, j)", "IoU", "chance IoU", "shared of i in j", "chance shared"],
                   [[k, fmt(v["iou"]), fmt(v["chance_iou"]), fmt(v["shared_fraction"]),
                     fmt(v["chance_shared_fraction"])] for k, v in over["pairs"].items()]), "",
             table(["pair", "IoU - chance", "p_adj", "decision"],
                   [[k, f"{v['mean_diff']:+.3f} [{v['low']:.3f}, {v['high']:.3f}]",
                     f"{v['p_adjusted']:.2g}", v["decision"]]
                    for k, v in over["iou_vs_chance"].items()]), "",
             "Per layer (mean IoU, chance in parentheses):", "",
             table(["layer", *over["per_layer"][next(iter(over["per_layer"]))]],
                   [[layer, *(f"{v['iou']:.3f} ({v['chance_iou']:.3f})" for v in row.values())]
                    for layer, row in over["per_layer"].items()]), "",
             "## Cross-ablation (ablation.png)", "",
             "Row i: subnetwork i's weights removed; column j: subtask j read from subnetwork j "
             "alone (so the read does not need the base model's head to compute subtask j), "
             "`base`: the full model on the base task. Random: the same per-layer counts "
             "removed at random.", "",
             table(["ablated \\ read", *abl["reads"]],
                   [["(none)", *(fmt(abl["baseline"][j]) for j in abl["reads"])]]
                   + [[i, *(f"{fmt(abl['matrix'][i][j]['ablated'])} / random "
                            f"{abl['matrix'][i][j]['random']['mean']:.3f}" for j in abl["reads"])]
                      for i in subtasks]), "",
             table(["subnetwork", "specificity", "random specificity", "difference", "decision"],
                   [[i, fmt(abl["specificity"][i]), fmt(abl["random_specificity"][i]),
                     f"{v['mean_diff']:+.3f} [{v['low']:.3f}, {v['high']:.3f}]", v["decision"]]
                    for i, v in abl["specificity_vs_random"].items()]), "",
             "Specificity: drop on its own subtask minus the mean drop on the other reads.", "",
             "## Frivolous weights", "",
             table(["fraction unused by every subnetwork and the base", "base accuracy",
                    "with them removed", "with as many random weights removed"],
                   [[fmt(s["frivolous"][k]) for k in ("fraction", "base_accuracy_full",
                                                       "base_accuracy_removed",
                                                       "base_accuracy_random_removed")]]), "",
             "## Compression (compression.png)", "",
             "Base-task accuracy with only the kept weights; `param`: kept fraction (magnitude, "
             "torch_prune, top_k) or lambda (continuous, hard_concrete). Sizes: safetensors of "
             "the dense model and of the pruned model in instill's sparse format.", "",
             table(["method", "param", "kept fraction", "accuracy", "dense KiB", "sparse KiB"],
                   [[r["method"], f"{r['param']:g}", fmt(r["density"], ".4f"),
                     fmt(r["accuracy"]), f"{r['dense_bytes'] / 1024:.0f}",
                     f"{r['sparse_bytes'] / 1024:.0f}"] for r in s["compression"]]), ""]


def _union_lines(u: dict) -> list[str]:
    """The arithmetic union-induction section: AUC per target and condition, comparisons."""
    return ["## Union induction", "",
            f"Transplanted (frozen) into a fresh model: the union of `{u['pair'][0]}` "
            f"(first) and `{u['pair'][1]}` (second), each alone, or nothing (random); "
            "AUC of test accuracy over log(1+n).", "",
            table(["target", *u["auc"][u["targets"][0]]],
                  [[t, *(fmt(v) for v in row.values())] for t, row in u["auc"].items()]),
            "", versus_table(u["versus"], "AUC difference"), ""]


def versus_table(versus: dict[str, dict], what: str) -> str:
    """A table of decided paired comparisons: difference, interval, p_adj, decision."""
    return table(["comparison", what, "p_adj", "decision"],
                 [[k, f"{v['mean_diff']:+.3f} [{v['low']:.3f}, {v['high']:.3f}]",
                   f"{v['p_adjusted']:.2g}", v["decision"]] for k, v in versus.items()])


def _closing(s: dict, cfg: dict, defaults: dict) -> list[str]:
    """Gates, warnings and the settings that differ from the paper-sized defaults."""
    lines = ["## Gates", "", reporting.gates_table(s["gates"]), ""]
    if s["gates_overridden"]:
        lines += [f"Gates overridden (enforce: false) for {s['gates_overridden']}.", ""]
    lines += [f"Warning: {w}" for w in s["warnings"]]
    mine, paper = _flat(cfg), _flat(defaults)
    changed = [f"- `{k}`: {v} (paper: {paper.get(k)})" for k, v in mine.items()
               if v != paper.get(k)]
    return [*lines, "## Settings that differ from the paper-sized defaults", "", *changed, ""]
