"""Tables, statistics, plot and report.md of an arithmetic run.

The unit of replication is the pipeline (one depth x one replicate: its own base model and
subnetwork); downstream seeds within a pipeline are averaged first. Per condition: the area
under the data-efficiency curve over log n (AUC) and the samples needed to reach the
threshold, with 95% bootstrap intervals over pipelines; Subtask Induction against every other
condition as paired differences (same pipeline, same data) with a paired t-test, Holm-corrected.
"""

from __future__ import annotations

import statistics
import textwrap
from collections import defaultdict
from typing import Any

from instill import stats
from instill.experiments import arithmetic_reference as reference
from instill.experiments import reporting
from instill.experiments.common import CONDITIONS, at_density, base_condition, density_tag
from instill.experiments.reporting import save_figure, table
from instill.runio import RunDir
from instill.storage import atomic_write_text, write_json

OURS = "subnet"
#: Where the transfer comes from: (with, without) pairs the report compares as well.
SOURCES = [("subnet", "subnet-fresh"), ("embeddings_only", "random"), ("subnet-fresh", "random"),
           ("subnet-fresh", "sampled-fresh")]


#: The controls a specificity curve compares Subtask Induction with at each density.
SPECIFICITY = ("sampled", "sampled-inverse", "complement", "complement-inverse")


def label(condition: str) -> str:
    """A result name's label: `subnet@0.05` -> 'Subtask Induction @ 0.05'."""
    name, target = base_condition(condition)
    return CONDITIONS[name].label + ("" if target is None else f" @ {target:g}")


def names(cfg) -> list[str]:
    """Every condition as it appears in results: mask conditions once per density."""
    return [at_density(c, t) if CONDITIONS[c].uses_mask else c for c in cfg.conditions
            for t in (cfg.densities if CONDITIONS[c].uses_mask else [None])]


def _compared(cfg, target: float | None) -> list[str]:
    """What Subtask Induction at `target` is compared with: the mask conditions at the same
    density and every condition that does not use the subnetwork."""
    return [n for n in names(cfg) if base_condition(n)[0] != OURS
            and (not CONDITIONS[base_condition(n)[0]].uses_mask
                 or base_condition(n)[1] == target)]


def curves(rows: list[dict], key: str = "test_accuracy") -> dict[str, dict[str, dict[int, float]]]:
    """condition -> pipeline ("L2-r0") -> n -> mean of `key` over downstream seeds."""
    groups: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for row in rows:
        unit = f"L{row['layers']}-r{row['replicate']}"
        groups[row["condition"], unit, row["n"]].append(row[key])
    out: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for (condition, unit, n), values in sorted(groups.items()):
        out[condition][unit][n] = statistics.fmean(values)
    return out


def _paired(per_unit: dict[str, dict[str, float]], a: str, b: str) -> stats.Paired:
    units = sorted(set(per_unit[a]) & set(per_unit[b]))
    return stats.paired_difference([per_unit[a][u] for u in units],
                                   [per_unit[b][u] for u in units])


def summarize(cfg, rows: list[dict], verify: dict, problems: list[str],
              gates: dict[str, Any]) -> dict[str, Any]:
    """summary.json: per-condition AUC and samples to threshold with intervals, paired
    comparisons of Subtask Induction against every control (one Holm family per density),
    the specificity curve over density, and the gates' record."""
    by = curves(rows)
    everything = names(cfg)
    auc = {c: {u: stats.auc_log(curve) for u, curve in by[c].items()} for c in everything}
    reach = {c: {u: stats.samples_to_threshold(curve, cfg.threshold)
                 for u, curve in by[c].items()} for c in everything}
    ns = sorted({n for c in by.values() for curve in c.values() for n in curve})
    conditions = {}
    for c in everything:
        reached = [v for v in reach[c].values() if v is not None]
        conditions[c] = {
            "label": label(c),
            "auc": stats.bootstrap_mean(list(auc[c].values())).to_dict(),
            "samples_to_threshold": reach[c],
            "never": stats.never_count(list(reach[c].values())),
            "median_samples_to_threshold": statistics.median(reached) if reached else None,
            # a mean needs every pipeline to get there ("never" has no value to average)
            "mean_samples_to_threshold": (stats.bootstrap_mean(reached).to_dict()
                                          if reached and len(reached) == len(reach[c]) else None),
            "mean_test_accuracy": {str(n): stats.bootstrap_mean(
                [by[c][u][n] for u in by[c] if n in by[c][u]]).to_dict() for n in ns},
            "accuracy_under_alternatives": {alt: statistics.fmean(
                r[f"accuracy[{alt}]"] for r in rows if r["condition"] == c)
                for alt in cfg.alternatives},
        }
    families = {t: stats.adjust({c: _paired(auc, at_density(OURS, t), c)
                                 for c in _compared(cfg, t)})
                for t in cfg.densities} if OURS in cfg.conditions else {}
    versus = {_versus_key(t, c): p for t, family in families.items() for c, p in family.items()}
    sources = stats.adjust({f"{a} - {b}": _paired(auc, a, b) for a, b in SOURCES
                            if a in everything and b in everything})
    return {
        "threshold": cfg.threshold,
        "units": sorted({u for c in by.values() for u in c}),
        "metric": "auc: area under test accuracy over log10(1 + n), divided by its range",
        "conditions": conditions,
        "subnet_vs": {c: {**p.to_dict(), "decision": stats.decide(p)} for c, p in versus.items()},
        "sources": {k: {**p.to_dict(), "decision": stats.decide(p)} for k, p in sources.items()},
        "specificity": specificity(families, verify),
        "reference": against_reference(cfg, rows),
        "gates": gates,
        "gates_overridden": sorted(u for u, g in gates.items() if g.get("overridden")),
        "subnetwork_density": {k: v["density"] for k, v in verify.items()},
        "ambiguity_problems": problems,
        "headline": headline(cfg, conditions, families, gates, verify),
    }


def measured_density(verify: dict, target: float | None) -> stats.Interval:
    """The kept fraction of the subnetworks at `target`, over pipelines."""
    tag = density_tag(target)
    return stats.bootstrap_mean([v["density"] for k, v in verify.items()
                                 if k.endswith(tag) and (tag or "-d" not in k)])


def _versus_key(target: float | None, other: str) -> str:
    """summary.json key of Subtask Induction at `target` against `other` (the other's name
    alone where discovery set the density, as before densities existed)."""
    return other if target is None else f"{at_density(OURS, target)} - {other}"


def specificity(families: dict[float | None, dict[str, stats.Paired]],
                verify: dict) -> list[dict[str, Any]]:
    """Per density: Subtask Induction minus each same-density random control (AUC)."""
    out = []
    for t, family in families.items():
        row: dict[str, Any] = {"target": t, "density": measured_density(verify, t).to_dict()}
        for control in SPECIFICITY:
            p = family.get(at_density(control, t))
            if p is not None:
                row[control] = {**p.to_dict(), "decision": stats.decide(p)}
        out.append(row)
    return out


def headline(cfg, conditions: dict, families: dict[float | None, dict[str, stats.Paired]],
             gates: dict, verify: dict) -> str:
    """One sentence (a clause per density) that says only what the intervals support."""
    units = len(gates)
    warn = [u for u, g in gates.items() if g.get("overridden")]
    prefix = (f"WARNING: gates failed and were overridden for {', '.join(warn)}; these "
              "results rest on a base model or subnetwork that did not pass. " if warn else "")
    if OURS not in cfg.conditions:
        return prefix + f"No Subtask Induction condition was run ({units} pipelines)."
    said = {"better": "higher than", "worse": "lower than",
            "indistinguishable": "indistinguishable at this power from"}
    clauses = []
    for t, family in families.items():
        ours = conditions[at_density(OURS, t)]
        groups: dict[str, list[str]] = defaultdict(list)
        for c, p in family.items():
            groups[stats.decide(p)].append(
                f"{label(c)} ({p.mean_diff:+.2f} [{p.low:+.2f}, {p.high:+.2f}])")
        reach = ours["median_samples_to_threshold"]
        where = "" if len(families) == 1 else (
            f"at density {measured_density(verify, t).mean:.2f} "
            + ("(where discovery lands), " if t is None else "(target), "))
        parts = [f"{where}Subtask Induction's data-efficiency AUC on `{cfg.target}` is "
                 f"{stats.Interval(**ours['auc'])}"
                 + (f" (median {reach:g} samples to {cfg.threshold})" if reach is not None
                    else f" (it never reaches {cfg.threshold} in {ours['never']} of {units})")]
        for decision in ("better", "worse", "indistinguishable"):
            if groups[decision]:
                parts.append(f"{said[decision]} {', '.join(groups[decision])}")
        clauses.append("; ".join(parts))
    return (prefix + f"Over {units} independent pipelines (depths {cfg.layers}), "
            + ". ".join([clauses[0], *(c[0].upper() + c[1:] for c in clauses[1:])])
            + " (paired AUC differences, 95% intervals, Holm-corrected"
            + (" within each density)." if len(families) > 1 else ")."))


def write_csv(run: RunDir, cfg, rows: list[dict]) -> None:
    keys = ["layers", "replicate", "n", "seed", "condition", "test_accuracy",
            *[f"accuracy[{a}]" for a in cfg.alternatives], "val_accuracy", "best_epoch"]
    order = {c: i for i, c in enumerate(names(cfg))}
    rows = sorted(rows, key=lambda r: (r["layers"], r["replicate"], r["n"], r["seed"],
                                       order[r["condition"]]))
    reporting.write_csv(run.path("results.csv"), keys, rows)


def plot(run: RunDir, cfg, summary: dict) -> None:
    """data_efficiency.png: accuracy against n with 95% bands over pipelines, and the
    hypotheses each condition adopted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8),
                                      gridspec_kw={"width_ratios": [3, 2]})
    conds, everything = summary["conditions"], names(cfg)
    for c in everything:
        points = sorted((int(n), v) for n, v in conds[c]["mean_test_accuracy"].items())
        ns = [n for n, _ in points]
        style = "--" if "fresh" in c else ":" if "@" in c else "-"
        left.plot(ns, [v["mean"] for _, v in points], style, marker="o", ms=3, label=label(c))
        left.fill_between(ns, [v["low"] for _, v in points], [v["high"] for _, v in points],
                          alpha=0.12)
    left.set_xscale("symlog", linthresh=10)
    left.axhline(cfg.threshold, color="grey", lw=0.8, ls="--")
    left.set(xlabel="disambiguation samples n", ylabel=f"test accuracy ({cfg.target})",
             ylim=(0, 1.02), title=f"Data efficiency (mean and 95% interval over "
                                   f"{len(summary['units'])} pipelines)")
    left.legend(fontsize=7)
    hypotheses = [("target", None), *[(a, a) for a in cfg.alternatives]]
    width = 0.8 / len(hypotheses)
    for i, (name, alt) in enumerate(hypotheses):
        values = [statistics.fmean(v["mean"] for v in conds[c]["mean_test_accuracy"].values())
                  if alt is None else conds[c]["accuracy_under_alternatives"][alt]
                  for c in everything]
        right.bar([j + i * width for j in range(len(everything))], values, width,
                  label=f"target {cfg.target}" if alt is None else name)
    right.set_xticks([j + width * (len(hypotheses) - 1) / 2 for j in range(len(everything))],
                     [textwrap.fill(label(c), 12) for c in everything], fontsize=6,
                     rotation=90 if len(everything) > 8 else 0)
    right.set(ylabel="test answers matching (mean over the grid)", ylim=(0, 1.02),
              title="Which hypothesis each condition adopted")
    right.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, run.path("data_efficiency.png"))


def plot_specificity(run: RunDir, summary: dict) -> None:
    """specificity.png: Subtask Induction minus each same-density control (AUC, 95% interval
    over pipelines) against the subnetworks' measured density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    rows = sorted(summary["specificity"], key=lambda r: r["density"]["mean"])
    for k, control in enumerate(SPECIFICITY):
        points = [(r["density"]["mean"], r[control]) for r in rows if control in r]
        if not points:
            continue
        xs = [x * (1 + 0.03 * (k - 1.5)) for x, _ in points]  # side by side, not on top
        ys = [p["mean_diff"] for _, p in points]
        err = [[y - p["low"] for y, (_, p) in zip(ys, points, strict=True)],
               [p["high"] - y for y, (_, p) in zip(ys, points, strict=True)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=3,
                    label=f"minus {CONDITIONS[control].label}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xticks([0.02, 0.05, 0.1, 0.2, 0.4], ["0.02", "0.05", "0.1", "0.2", "0.4"])
    ax.minorticks_off()
    ax.set(xlabel="subnetwork density (kept fraction of the masked weights)",
           ylabel="AUC difference (Subtask Induction minus control)",
           title=f"Specificity over density ({len(summary['units'])} pipelines, 95% intervals)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, run.path("specificity.png"))


WHY = ("Why: smaller problems (fewer numbers, depths, samples and epochs) make a run fit a CPU in "
       "minutes; higher learning rates make up for fewer epochs; `loss: answer` trains on the "
       "answer token only, which learns faster in few steps than the paper's whole-sequence "
       "`lm` loss (available as `--loss lm`); the fused GELU and AdamW kernels compute the same "
       "functions in fewer ops (results differ in the last bits, like another seed); the base "
       "model trains without patience until held-out validation holds 0.998, because it sits "
       "on a plateau for up to 60 epochs first (docs/arithmetic.md); induction stops the same "
       "way. "
       "`instill arithmetic --preset paper` restores every setting.")


def differences(ours: Any, paper: Any, key: str = "") -> list[str]:
    """Dotted keys whose values differ, down to the leaves of nested sections."""
    if isinstance(ours, dict) and isinstance(paper, dict):
        return [d for k in paper for d in differences(ours.get(k), paper[k],
                                                      f"{key}.{k}" if key else k)]
    return [] if ours == paper else [f"`{key}`: {ours} (paper: {paper})"]


def _samples(condition: dict) -> str:
    """Samples to the threshold: mean and interval when every pipeline got there."""
    mean, median = condition["mean_samples_to_threshold"], condition["median_samples_to_threshold"]
    if mean is not None:
        return f"{stats.Interval(**mean):.0f} ({median:g})"
    return "never" if median is None else f"median {median:g}"


def _paired_rows(results: dict[str, dict], name: Any) -> list[list[Any]]:
    return [[name(k), f"{p['mean_diff']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}]",
             f"{p['p_value']:.2g}", f"{p['p_adjusted']:.2g}", p["n"], p["decision"]]
            for k, p in results.items()]


def markdown(cfg, summary: dict, verify: dict, paper: dict[str, Any], ours: dict[str, Any]
             ) -> str:
    """report.md: headline, setup, gates, verification, statistics."""
    conds = summary["conditions"]
    ns = sorted({int(n) for c in conds.values() for n in c["mean_test_accuracy"]})
    verify_rows = [[unit, name, f"{acc['subtask']:.3f}", f"{acc['base']:.3f}"]
                   for unit, v in verify.items() for name, acc in v["accuracy"].items()]
    curve_rows = [[label(c), *[f"{conds[c]['mean_test_accuracy'][str(n)]['mean']:.2f}"
                               for n in ns]] for c in names(cfg)]
    auc_rows = [[label(c), f"{stats.Interval(**conds[c]['auc']):.3f}",
                 _samples(conds[c]), f"{conds[c]['never']} of {len(summary['units'])}"]
                for c in names(cfg)]
    header = ["comparison", "mean AUC difference [95%]", "p", "p (Holm)", "pairs", "decision"]
    differs = differences(ours, paper)
    density = ", ".join(f"{u} {v['density']:.4f}" for u, v in verify.items())
    return "\n\n".join([
        "# Subtask Induction: modular arithmetic",
        f"**{summary['headline']}**",
        "## Setup",
        f"Base task `{cfg.base}`, subtask `{cfg.subtask}`, target `{cfg.target}` (mod "
        f"{cfg.modulus}, numbers 0..{cfg.numbers - 1}); competing hypotheses on the ambiguous "
        f"set: {', '.join(f'`{a}`' for a in cfg.alternatives)}. GPT-2 decoder, {cfg.n_embd}-dim,"
        f" {cfg.n_head} heads, depths {cfg.layers}; {cfg.replicates} replicate pipeline(s) per "
        f"depth (each its own base model and subnetwork), {cfg.seeds} downstream seed(s) each; "
        f"loss `{cfg.loss}`.",
        "Settings that differ from the paper's:\n\n" + ("\n".join(f"- {d}" for d in differs)
                                                         or "- none"),
        WHY if differs else "",
        "## Gates",
        "Each pipeline's base model must reach the base-task threshold on held-out pairs, and "
        "its subnetwork must compute the subtask alone and be specific (ablating it must hurt "
        "the base task, which holds the subtask, far more than ablating as many random "
        "weights). A failed attempt is "
        "retried with the next seed; every attempt is listed."
        + (f" **Gates were overridden (`gates.enforce: false`) for "
           f"{', '.join(summary['gates_overridden'])}.**" if summary["gates_overridden"] else ""),
        reporting.gates_table(summary["gates"]),
        "## Verification of the subnetworks",
        f"Density (kept fraction of the masked weights): {density}.",
        table(["pipeline", "model", "subtask accuracy", "base accuracy"], verify_rows),
        "## Data efficiency",
        "![data efficiency](data_efficiency.png)",
        "Mean test accuracy over pipelines:",
        table(["condition", *[f"n={n}" for n in ns]], curve_rows),
        f"AUC ({summary['metric']}) with its 95% bootstrap interval over pipelines, and samples "
        f"to {cfg.threshold} per pipeline:",
        table(["condition", "AUC [95%]", f"samples to {cfg.threshold}: mean [95%] (median)",
               "never reached"], auc_rows),
        "### Subtask Induction against each control (paired by pipeline)",
        table(header, _paired_rows(summary["subnet_vs"], lambda k: " minus ".join(
            label(c) for c in k.split(" - ")))),
        *(specificity_section(summary) if len(cfg.densities) > 1 else []),
        *reference_section(summary, cfg),
        "### Where the transfer comes from",
        "`-fresh` conditions re-initialize the untargeted parameters (embeddings, norms, "
        "biases) too; `embeddings only` keeps them and re-initializes every targeted weight.",
        table(header, _paired_rows(summary["sources"], lambda k: " minus ".join(
            label(c) for c in k.split(" - ")))) if summary["sources"] else
        "(not run: add the `-fresh` and `embeddings_only` conditions)",
        ("Ambiguity problems: " + "; ".join(summary["ambiguity_problems"]))
        if summary["ambiguity_problems"] else "The ambiguous set fits every alternative.",
    ]) + "\n"


def against_reference(cfg, rows: list[dict]) -> dict[str, Any]:
    """Our test accuracy (95% interval over pipelines) at every (depth, condition, n) the
    reference's figures give, and whether its value falls inside; its AUC gaps beside ours."""
    if not reference.comparable(cfg):
        return {}
    points, gaps = [], []
    for d in cfg.layers:
        by = curves([r for r in rows if r["layers"] == d])
        for condition, values in reference.ACCURACY.get(d, {}).items():
            for n, theirs in values.items():
                ours = [curve[n] for curve in by.get(condition, {}).values() if n in curve]
                if len(ours) < 2:
                    continue
                got = stats.bootstrap_mean(ours)
                where = "inside" if got.low <= theirs <= got.high else \
                    "above ours" if theirs > got.high else "below ours"
                points.append({"layers": d, "condition": condition, "n": n,
                               "ours": got.to_dict(), "reference": theirs, "where": where})
        for control, by_depth in reference.AUC_GAP.items():
            if d in by_depth and OURS in by and control in by:
                auc = {c: {u: stats.auc_log(v) for u, v in by[c].items()} for c in (OURS, control)}
                gaps.append({"layers": d, "control": control, "reference": by_depth[d],
                             "ours": _paired(auc, OURS, control).to_dict()})
    return {"points": points, "auc_gaps": gaps}


def reference_section(summary: dict, cfg) -> list[str]:
    """report.md's comparison with the reference implementation's published curve."""
    ref = summary.get("reference") or {}
    if not ref.get("points"):
        return []
    inside = sum(p["where"] == "inside" for p in ref["points"])
    rows = [[p["layers"], label(p["condition"]), p["n"], f"{stats.Interval(**p['ours']):.2f}",
             f"{p['reference']:.2f}", p["where"]] for p in ref["points"]]
    gap_rows = [[g["layers"], f"minus {label(g['control'])}",
                 f"{g['ours']['mean_diff']:+.3f} [{g['ours']['low']:+.3f}, "
                 f"{g['ours']['high']:+.3f}]", f"{g['reference']:+.2f}"] for g in ref["auc_gaps"]]
    return ["## Against the reference implementation",
            f"Test accuracy where the reference's figures give it (one run per depth there, so "
            f"its values carry their own seed noise): {inside} of {len(ref['points'])} of its "
            f"points fall inside our 95% intervals over {len(summary['units'])} pipelines.",
            table(["depth", "condition", "n", "ours [95%]", "reference", "reference is"], rows),
            "Subtask Induction's AUC gap to a control, ours over this run's grid "
            f"({cfg.grid[0]}..{cfg.grid[-1]}) and the reference's over 0..6400 (so the two are "
            "comparable in sign and size only):",
            table(["depth", "gap", "ours [95%]", "reference"], gap_rows)]


def specificity_section(summary: dict) -> list[str]:
    """report.md's specificity curve: per density, Subtask Induction minus each random
    control of the same density (same-size and the reference's inverse controls)."""
    rows = []
    ran = [c for c in SPECIFICITY if any(c in r for r in summary["specificity"])]
    for r in sorted(summary["specificity"], key=lambda r: r["density"]["mean"]):
        target = "where discovery lands" if r["target"] is None else f"{r['target']:g}"
        rows.append([target, f"{stats.Interval(**r['density']):.3f}", *[
            f"{r[c]['mean_diff']:+.3f} [{r[c]['low']:+.3f}, {r[c]['high']:+.3f}] "
            f"{r[c]['decision']}" if c in r else "not run" for c in ran]])
    return ["## Specificity over density",
            "Subtask Induction minus a control at the same density (paired AUC differences, 95% "
            "intervals over pipelines, Holm-corrected within each density). The same-size "
            "controls keep as many random trained weights as the subnetwork has; the reference's "
            "inverse controls keep every trained weight but that many (docs/arithmetic.md).",
            table(["target density", "measured density [95%]",
                   *[f"minus {CONDITIONS[c].label}" for c in ran]], rows),
            "![specificity](specificity.png)"]


def write_report(run: RunDir, cfg, rows: list[dict], verify: dict, problems: list[str],
                 gates: dict[str, Any], paper: dict[str, Any], ours: dict[str, Any]
                 ) -> dict[str, Any]:
    """Write results.csv, summary.json, data_efficiency.png and report.md; return the summary.
    `paper` and `ours` are the paper's and this run's config as dicts (for the differences)."""
    write_csv(run, cfg, rows)
    summary = summarize(cfg, rows, verify, problems, gates)
    write_json(run.path("summary.json"), summary)
    plot(run, cfg, summary)
    outputs = ["results.csv", "summary.json", "data_efficiency.png", "report.md", "verify.json"]
    if len(cfg.densities) > 1:
        plot_specificity(run, summary)
        outputs.append("specificity.png")
    atomic_write_text(run.path("report.md"), markdown(cfg, summary, verify, paper, ours))
    run.record_outputs(outputs)
    return summary
