"""Tables, statistics, figures and report.md of a continual run (given its rows, not its config).

The unit of replication is the replicate: every method starts from the replicate's initial
model and sees the same data, so methods are compared as paired differences over replicates
(paired t-test, Holm-corrected) with 95% bootstrap intervals.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from instill import stats
from instill.experiments import reporting
from instill.experiments.reporting import gates_table, save_figure, table
from instill.storage import atomic_write_text, write_json

OURS = "subnetwork"
KEYS = ["replicate", "method", "after", "task", "task_name", "accuracy", "trained_accuracy",
        "density", "free_fraction", "initial_accuracy", "inferred_accuracy", "task_inferred"]
SEQUENTIAL_ONLY = ("joint", "independent")  # not a sequence of models: no BWT, FWT, forgetting


def is_packnet(method: str) -> bool:
    """`packnet`, `packnet-reinit` and every `packnet@f` of a kept-fraction sweep."""
    return method.startswith("packnet")

Matrix = list[list[float | None]]


def matrices(rows: list[dict], tasks: int) -> dict[str, dict[int, Matrix]]:
    """method -> replicate -> M[j][i], the accuracy of task i after training task j."""
    out: dict[str, dict[int, Matrix]] = defaultdict(dict)
    for row in rows:
        m = out[row["method"]].setdefault(row["replicate"], [[None] * tasks
                                                               for _ in range(tasks)])
        m[row["after"]][row["task"]] = row["accuracy"]
    return out


def transfer(m: Matrix, initial: list[float] | None) -> dict[str, float | None]:
    """The field's metrics of an accuracy matrix R (`m[j][i]`: task i after training task j),
    as GEM (Lopez-Paz & Ranzato 2017, eqs. 2-4) and Avalanche define them:
    ACC = mean_i R[T-1][i]; BWT = mean_{i<T-1} R[T-1][i] - R[i][i] (negative: forgetting);
    FWT = mean_{i>=1} R[i-1][i] - b[i], with b[i] a randomly initialised model's accuracy on
    task i (None without `initial`)."""
    t = len(m)
    return {"acc": statistics.fmean(m[t - 1]),
            "bwt": statistics.fmean(m[t - 1][i] - m[i][i] for i in range(t - 1)),
            "fwt": None if initial is None else statistics.fmean(
                m[i - 1][i] - initial[i] for i in range(1, t))}


def metrics(m: Matrix, method: str) -> dict[str, Any]:
    """Average final accuracy; forgetting (largest drop of each earlier task from any earlier
    point to the end, averaged); whether every earlier task kept exactly its accuracy.
    `independent` has one model per task: its final accuracy is that of each task's own."""
    t = len(m)
    final = [m[i][i] if method == "independent" else m[t - 1][i] for i in range(t)]
    out: dict[str, Any] = {"final": statistics.fmean(final), "final_per_task": final,
                           "learnt": [m[i][i] for i in range(t)]}
    if method not in ("joint", "independent"):
        drops = [max(m[j][i] for j in range(i, t - 1)) - m[t - 1][i] for i in range(t - 1)]
        out["forgetting_per_task"] = drops
        out["forgetting"] = statistics.fmean(drops)
        out["exact"] = all(m[j][i] == m[i][i] for i in range(t) for j in range(i, t))
    return out


def side_tables(rows: list[dict], tasks: int) -> tuple[dict, dict]:
    """method -> replicate -> each task's random-init accuracy (for FWT); and, for methods that
    infer the task (SupSup), method -> replicate -> (accuracy, right-task share) per task
    after the last task."""
    initial: dict[str, dict[int, list]] = defaultdict(dict)
    inferred: dict[str, dict[int, tuple[list, list]]] = defaultdict(dict)
    for row in rows:
        meth, rep, task = row["method"], row["replicate"], row["task"]
        if row.get("initial_accuracy") is not None:
            initial[meth].setdefault(rep, [None] * tasks)[task] = row["initial_accuracy"]
        if row.get("inferred_accuracy") is not None and row["after"] == tasks - 1:
            acc, right = inferred[meth].setdefault(rep, ([None] * tasks, [None] * tasks))
            acc[task], right[task] = row["inferred_accuracy"], row["task_inferred"]
    return initial, inferred


def summarize(rows: list[dict], sequence: list[str], methods: list[str], gates: dict,
              packnet_keep: float, kind: str = "tasks") -> dict[str, Any]:
    """summary.json: per method the metrics with intervals, capacity, forward transfer, and
    the paired comparisons of `subnetwork` against the other methods."""
    t = len(sequence)
    mats = matrices(rows, t)
    initial, inferred = side_tables(rows, t)
    density: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    free_left: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        if row["density"] is not None:
            density[row["method"]][row["replicate"]].append(row["density"])
            if row["after"] == t - 1:
                free_left[row["method"]][row["replicate"]] = row["free_fraction"]
    per: dict[str, dict[int, dict[str, Any]]] = {
        meth: {r: metrics(m, meth) for r, m in mats[meth].items()} for meth in methods}
    independent = per.get("independent", {})
    out: dict[str, Any] = {}
    for meth in methods:
        reps = sorted(per[meth])
        entry: dict[str, Any] = {
            "replicates": reps,
            "final_accuracy": stats.bootstrap_mean([per[meth][r]["final"] for r in reps]).to_dict(),
            "final_per_task": [stats.bootstrap_mean([per[meth][r]["final_per_task"][i]
                                                     for r in reps]).to_dict() for i in range(t)],
            "matrix_mean": [[_mean([mats[meth][r][j][i] for r in reps]) for i in range(t)]
                            for j in range(t)],
        }
        if meth not in ("joint", "independent"):
            entry["forgetting"] = stats.bootstrap_mean(
                [per[meth][r]["forgetting"] for r in reps]).to_dict()
            entry["forgetting_per_task"] = [max(per[meth][r]["forgetting_per_task"][i]
                                                for r in reps) for i in range(t - 1)]
            entry["bit_exact_replicates"] = sum(per[meth][r]["exact"] for r in reps)
        if meth not in SEQUENTIAL_ONLY:
            field = [transfer(mats[meth][r], initial[meth].get(r)) for r in reps]
            for key in ("acc", "bwt", "fwt"):
                values = [f[key] for f in field if f[key] is not None]
                entry[key] = stats.bootstrap_mean(values).to_dict() if values else None
        if independent and meth not in SEQUENTIAL_ONLY:
            gain = [statistics.fmean(per[meth][r]["learnt"][i] - independent[r]["learnt"][i]
                                     for i in range(1, t)) for r in reps if r in independent]
            entry["vs_independent"] = stats.bootstrap_mean(gain).to_dict() if gain else None
        if inferred[meth]:
            for key, column in (("acc_inferred", 0), ("task_inference", 1)):
                entry[key] = stats.bootstrap_mean([statistics.fmean(inferred[meth][r][column])
                                                   for r in reps]).to_dict()
        if density[meth]:
            entry["density_per_task"] = [stats.bootstrap_mean(
                [density[meth][r][i] for r in reps]).to_dict() for i in range(t)]
            entry["density_mean"] = stats.bootstrap_mean(
                [statistics.fmean(density[meth][r]) for r in reps]).to_dict()
            entry["free_left"] = stats.bootstrap_mean(
                [free_left[meth][r] for r in reps]).to_dict()
        out[meth] = entry
    versus = {}
    if OURS in per:
        for other in (m for m in methods if m not in (OURS, "independent")):
                reps = sorted(set(per[OURS]) & set(per[other]))
                versus[other] = stats.paired_difference([per[OURS][r]["final"] for r in reps],
                                                        [per[other][r]["final"] for r in reps])
    versus = stats.adjust(versus)
    capacity = {}
    for other in (m for m in methods if is_packnet(m) and OURS in density and m in density):
        reps = sorted(set(density[OURS]) & set(density[other]))
        capacity[other] = stats.paired_difference(
            [statistics.fmean(density[OURS][r]) for r in reps],
            [statistics.fmean(density[other][r]) for r in reps])
    summary = {
        "sequence": sequence, "kind": kind, "methods": out, "packnet_keep": packnet_keep,
        "subnetwork_vs": {k: {**p.to_dict(), "decision": stats.decide(p)}
                          for k, p in versus.items()},
        "density_vs": {k: {**p.to_dict(), "decision": stats.decide(p, higher_is_better=False)}
                       for k, p in capacity.items()},
        "gates": gates,
        "gates_overridden": sorted(u for u, g in gates.items() if g.get("overridden")),
    }
    summary["goals"] = goals(out, summary)
    summary["headline"] = headline(summary, versus, capacity)
    return summary


def goals(methods: dict, summary: dict) -> dict[str, Any]:
    """The issue's three goals, each with whether this run reached it. The capacity goal
    holds against every PackNet variant `subnetwork` is not less accurate than."""
    out: dict[str, Any] = {}
    for meth, e in methods.items():
        if meth.startswith("subnetwork") or is_packnet(meth) or meth == "supsup":
            out[f"zero forgetting ({meth})"] = e["bit_exact_replicates"] == len(e["replicates"])
    if "joint" in summary["subnetwork_vs"]:
        p = summary["subnetwork_vs"]["joint"]
        out["average final accuracy within 2 points of joint (interval above -0.02)"] = \
            p["low"] >= -0.02
    equal = [m for m, d in summary["density_vs"].items()
             if summary["subnetwork_vs"][m]["decision"] == "indistinguishable"]
    if summary["density_vs"]:
        name = "less capacity per task than packnet at equal accuracy"
        if len(summary["density_vs"]) > 1:
            name += f" (against {', '.join(equal) or 'no variant of equal accuracy'})"
        out[name] = bool(equal) and all(
            summary["density_vs"][m]["decision"] == "better" for m in equal)
    return out


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def headline(summary: dict, versus: dict[str, stats.Paired],
             capacity: dict[str, stats.Paired]) -> str:
    """One sentence that says only what the intervals support."""
    methods = summary["methods"]
    warn = summary["gates_overridden"]
    prefix = f"WARNING: gates were overridden for {', '.join(warn)}. " if warn else ""
    if OURS not in methods:
        return prefix + "No `subnetwork` method was run."
    ours = methods[OURS]
    n = len(ours["replicates"])
    parts = [f"Over {n} replicates of {len(summary['sequence'])} {summary['kind']}, "
             f"`subnetwork` forgets {stats.Interval(**ours['forgetting']):.3f} (bit-exact in "
             f"{ours['bit_exact_replicates']} of {n}) with average final accuracy "
             f"{stats.Interval(**ours['final_accuracy']):.3f}"]
    sweep = [m for m in methods if is_packnet(m) and m in versus]
    for other in ("joint", "supsup", *sweep, "replay", "finetune"):
        if other in versus:
            parts.append(stats.describe(versus[other], "it", f"`{other}`", "final accuracy"))
    for other in capacity:  # every PackNet variant of a kept-fraction sweep
        parts.append(stats.describe(capacity[other], "its capacity per task",
                                    f"`{other}`'s", "density", higher_is_better=False)
                     .replace("beats", "is below").replace("is worse than", "is above"))
    sup = methods.get("supsup", {})
    if sup.get("acc_inferred"):
        parts.append(f"`supsup` with the task inferred (one-shot) reaches ACC "
                     f"{stats.Interval(**sup['acc_inferred']):.3f}, the right task for "
                     f"{stats.Interval(**sup['task_inference']):.3f} of the test images")
    return prefix + "; ".join(parts) + " (paired over replicates, 95% intervals, Holm)."


def plot_matrices(path: Path, summary: dict) -> None:
    """accuracy_matrix.png: one heatmap of the mean accuracy matrix per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    t = len(summary["sequence"])
    cols = min(len(methods), 5)
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(methods):]:
        ax.set_axis_off()
    for ax, (meth, entry) in zip(axes.flat, methods.items(), strict=False):
        grid = [[float("nan") if v is None else v for v in row] for row in entry["matrix_mean"]]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for j in range(t):
            for i in range(t):
                if grid[j][i] == grid[j][i]:
                    ax.text(i, j, f"{grid[j][i]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if grid[j][i] < 0.6 else "black")
        ax.set(title=meth, xlabel="task evaluated", ylabel="after training task",
               xticks=range(t), yticks=range(t))
    fig.tight_layout()
    save_figure(fig, path)


def plot_capacity(path: Path, summary: dict) -> None:
    """capacity.png: mean density of each task's weights, and the free share left, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iso = {m: e for m, e in summary["methods"].items() if "density_per_task" in e}
    fig, ax = plt.subplots(figsize=(1.6 * max(len(iso), 2) + 2, 3.8))
    for x, entry in enumerate(iso.values()):
        bottom = 0.0
        for i, d in enumerate(entry["density_per_task"]):
            ax.bar(x, d["mean"], bottom=bottom, color=f"C{i}",
                   label=f"task {i}: {summary['sequence'][i]}" if x == 0 else None)
            bottom += d["mean"]
        ax.bar(x, entry["free_left"]["mean"], bottom=bottom, color="lightgrey",
               label="free" if x == 0 else None)
    ax.set_xticks(range(len(iso)), list(iso), fontsize=8)
    ax.set(ylabel="share of targeted weights", ylim=(0, 1.0), title="Capacity per task")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    save_figure(fig, path)


def _iv(entry: dict | None, key: str, spec: str = ".3f") -> str:
    value = None if entry is None else entry.get(key)
    return "n/a" if value is None else format(stats.Interval(**value), spec)


def supsup_lines(methods: dict) -> list[str]:
    """report.md's paragraph on SupSup's task inference, when it was measured."""
    e = methods.get("supsup", {})
    if not e.get("acc_inferred"):
        return []
    return [f"SupSup with the task inferred by one-shot entropy minimisation over all masks "
            f"(no task identity at test time): ACC {_iv(e, 'acc_inferred')}, task inferred "
            f"right for {_iv(e, 'task_inference')} of the test images (with the task given: "
            f"{_iv(e, 'final_accuracy')}).", ""]


def markdown(summary: dict, warnings: list[str]) -> str:
    """report.md: headline, method table, matrices, comparisons, capacity and gates."""
    seq, methods = summary["sequence"], summary["methods"]
    t = len(seq)
    lines = ["# Continual learning by parameter isolation", "", summary["headline"], "",
             "Tasks: " + ", ".join(f"{i}: `{e}`" for i, e in enumerate(seq)), "",
             "## Methods", "",
             table(["method", "ACC (average final accuracy)", "BWT", "FWT", "forgetting",
                    "bit-exact replicates", "gain over independent", "density per task (mean)",
                    "free left"],
                   [[m, _iv(e, "final_accuracy"), _iv(e, "bwt"), _iv(e, "fwt"),
                     _iv(e, "forgetting"), e.get("bit_exact_replicates", "n/a"),
                     _iv(e, "vs_independent"), _iv(e, "density_mean"), _iv(e, "free_left")]
                    for m, e in methods.items()]),
             "", "ACC, BWT and FWT as GEM (Lopez-Paz & Ranzato 2017) and Avalanche define them: "
             "ACC the mean accuracy over tasks after the last one; BWT the mean change of each "
             "earlier task's accuracy from right after learning it to the end (negative: "
             "forgetting); FWT the mean accuracy on task t just before learning it minus a "
             "randomly initialised model's (the replicate's initial model). Forgetting: per "
             "earlier task the largest drop from any point after it was learnt to the end, "
             "averaged. Gain over independent: accuracy on task t right after learning it "
             "minus `independent`'s (the same training from the initial model alone), averaged "
             "over t >= 1. Density: share of the targeted weights a task owns.", "",
             *supsup_lines(methods),
             "## Accuracy matrices (mean over replicates; row: after training task j, column: "
             "task i)", ""]
    for m, e in methods.items():
        lines += [f"**{m}**", "", table(["after \\ task", *map(str, range(t))], [
            [j, *("" if v is None else f"{v:.3f}" for v in row)]
            for j, row in enumerate(e["matrix_mean"]) if any(v is not None for v in row)]), ""]
    lines += ["![accuracy matrices](accuracy_matrix.png)", "", "## Paired comparisons", "",
              table(["comparison", "difference [95% CI]", "p", "p (Holm)", "pairs", "decision"],
                    [[f"subnetwork - {k} (final accuracy)", f"{v['mean_diff']:+.3f} "
                      f"[{v['low']:+.3f}, {v['high']:+.3f}]", f"{v['p_value']:.2g}",
                      f"{v['p_adjusted']:.2g}", v["n"], v["decision"]]
                     for k, v in summary["subnetwork_vs"].items()]
                    + [[f"subnetwork - {k} (mean density per task; lower is better)",
                        f"{v['mean_diff']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}]",
                        f"{v['p_value']:.2g}", "", v["n"], v["decision"]]
                       for k, v in summary["density_vs"].items()]), "",
              "## Goals", "", *(f"- {k}: {'reached' if v else '**not reached**'}"
                                 for k, v in summary["goals"].items()), "",
              "## Capacity", "",
              table(["method", *(f"task {i}" for i in range(t)), "free left"],
                    [[m, *(f"{d['mean']:.4f}" for d in e["density_per_task"]),
                      f"{e['free_left']['mean']:.4f}"]
                     for m, e in methods.items() if "density_per_task" in e]),
              "", "![capacity](capacity.png)", "", "## Gates", "", gates_table(summary["gates"])]
    if warnings:
        lines += ["", "## Warnings", "", *(f"- {w}" for w in warnings)]
    return "\n".join(lines) + "\n"


def write_report(root: Path, rows: list[dict], *, sequence: list[str], methods: list[str],
                 gates: dict, warnings: list[str], packnet_keep: float,
                 kind: str = "tasks") -> dict[str, Any]:
    """results.csv, summary.json, accuracy_matrix.png, capacity.png and report.md; the summary."""
    root = Path(root)
    order = {m: i for i, m in enumerate(methods)}
    rows = sorted(rows, key=lambda r: (r["replicate"], order[r["method"]], r["after"],
                                       r["task"]))
    reporting.write_csv(root / "results.csv", KEYS, rows)
    summary = summarize(rows, sequence, methods, gates, packnet_keep, kind)
    write_json(root / "summary.json", summary)
    plot_matrices(root / "accuracy_matrix.png", summary)
    plot_capacity(root / "capacity.png", summary)
    atomic_write_text(root / "report.md", markdown(summary, warnings))
    return summary


__all__ = ["metrics", "side_tables", "summarize", "transfer", "write_report"]
