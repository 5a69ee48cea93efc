"""Tables, summary, plot and report.md of an arithmetic run."""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from typing import Any

from instill.runio import RunDir, atomic_path, atomic_write_text, to_dict, write_json

LABELS = {"subnet": "Subtask Induction", "sampled": "sampled subnetwork",
          "complement": "complement subnetwork", "full": "full model transfer",
          "random": "random init"}


def _mean_by(rows: list[dict], key: str) -> dict[str, dict[int, float]]:
    """condition -> n -> mean of `key` over seeds and depths."""
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for row in rows:
        groups[row["condition"], row["n"]].append(row[key])
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for (condition, n), values in sorted(groups.items(), key=lambda kv: kv[0][1]):
        out[condition][n] = statistics.fmean(values)
    return out


def samples_to_threshold(curve: dict[int, float], threshold: float) -> int | None:
    """Smallest n whose mean accuracy reaches the threshold, or None if none does."""
    return next((n for n, acc in sorted(curve.items()) if acc >= threshold), None)


def summarize(cfg, rows: list[dict], verify: dict, problems: list[str]) -> dict[str, Any]:
    """summary.json: curves per condition, samples to threshold and the random/subnet ratio."""
    curves = _mean_by(rows, "test_accuracy")
    alts = {alt: _mean_by(rows, f"accuracy[{alt}]") for alt in cfg.alternatives}
    reach = {c: samples_to_threshold(curves[c], cfg.threshold) for c in cfg.conditions}
    ratio = bound = None
    if reach.get("subnet") and "random" in reach:
        if reach["random"] is not None:
            ratio = reach["random"] / reach["subnet"]
        else:  # random init never got there: the ratio exceeds the grid's end over subnet
            bound = max(cfg.grid) / reach["subnet"]
    return {
        "threshold": cfg.threshold,
        "samples_to_threshold": reach,
        "ratio_random_to_subnet": ratio,
        "ratio_random_to_subnet_exceeds": bound,
        "mean_test_accuracy": {c: {str(n): a for n, a in curves[c].items()}
                               for c in cfg.conditions},
        "mean_accuracy_under_alternatives": {
            alt: {c: {str(n): a for n, a in by[c].items()} for c in cfg.conditions}
            for alt, by in alts.items()},
        "subnetwork_density": {k: v["density"] for k, v in verify.items()},
        "ambiguity_problems": problems,
    }


def headline(cfg, summary: dict) -> str:
    """The result in one sentence: samples each condition needed to reach the threshold."""
    reach, curves = summary["samples_to_threshold"], summary["mean_test_accuracy"]

    def said(c: str) -> str:
        if reach[c] is None:
            best = max(curves[c].values())
            return f"{LABELS[c]} never within n <= {max(cfg.grid)} (best {best:.2f})"
        return f"{LABELS[c]} {reach[c]}"

    return (f"Disambiguation samples needed to reach {cfg.threshold:.2f} test accuracy on "
            f"`{cfg.target}` (mean over {cfg.seeds} seed(s), depths {cfg.layers}): "
            + "; ".join(said(c) for c in cfg.conditions) + ".")


def write_csv(run: RunDir, cfg, rows: list[dict]) -> None:
    keys = ["layers", "n", "seed", "condition", "test_accuracy",
            *[f"accuracy[{a}]" for a in cfg.alternatives], "val_accuracy", "best_epoch"]
    order = {c: i for i, c in enumerate(cfg.conditions)}
    rows = sorted(rows, key=lambda r: (r["layers"], r["n"], r["seed"], order[r["condition"]]))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.6f}" if isinstance(row[k], float) else row[k])
                         for k in keys})
    atomic_write_text(run.path("results.csv"), buffer.getvalue())


def plot(run: RunDir, cfg, rows: list[dict]) -> None:
    """data_efficiency.png: accuracy against n (band over seeds), and hypotheses adopted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5),
                                      gridspec_kw={"width_ratios": [3, 2]})
    for condition in cfg.conditions:
        per_seed: dict[int, list[float]] = defaultdict(list)
        for row in rows:
            if row["condition"] == condition:
                per_seed[row["n"]].append(row["test_accuracy"])
        ns = sorted(per_seed)
        mean = [statistics.fmean(per_seed[n]) for n in ns]
        left.plot(ns, mean, marker="o", label=LABELS[condition])
        left.fill_between(ns, [min(per_seed[n]) for n in ns], [max(per_seed[n]) for n in ns],
                          alpha=0.15)
    left.set_xscale("symlog", linthresh=10)
    left.axhline(cfg.threshold, color="grey", lw=0.8, ls="--")
    left.set(xlabel="disambiguation samples n", ylabel=f"test accuracy ({cfg.target})",
             ylim=(0, 1.02), title="Data efficiency (mean over seeds and depths; band: range)")
    left.legend(fontsize=8)
    hypotheses = [("target", "test_accuracy"), *[(a, f"accuracy[{a}]") for a in
                                                  cfg.alternatives]]
    width = 0.8 / len(hypotheses)
    for i, (label, key) in enumerate(hypotheses):
        values = [statistics.fmean(r[key] for r in rows if r["condition"] == c)
                  for c in cfg.conditions]
        right.bar([j + i * width for j in range(len(cfg.conditions))], values, width,
                  label=label if label != "target" else f"target {cfg.target}")
    right.set_xticks([j + width * (len(hypotheses) - 1) / 2 for j in range(len(cfg.conditions))],
                     [LABELS[c].replace(" ", "\n", 1) for c in cfg.conditions], fontsize=8)
    right.set(ylabel="test answers matching", ylim=(0, 1.02),
              title="Which hypothesis each condition adopted\n(mean over the grid)")
    right.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(run.path("data_efficiency.png")) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


WHY = ("Why: smaller problems (fewer numbers, depths, samples and epochs) make a run fit a CPU in "
       "minutes; higher learning rates make up for fewer epochs; `loss: answer` trains on the "
       "answer token only, which learns faster in few steps than the paper's whole-sequence "
       "`lm` loss (available as `--loss lm`); the fused GELU and AdamW kernels compute the same "
       "functions in fewer ops (results differ in the last bits, like another seed). "
       "`instill arithmetic --preset paper` restores every setting.")


def _ratio_line(summary: dict, cfg) -> str:
    if summary["ratio_random_to_subnet"] is not None:
        return f"Ratio random / subnet: {summary['ratio_random_to_subnet']:.2f}."
    if summary["ratio_random_to_subnet_exceeds"] is not None:
        return (f"Ratio random / subnet: more than {summary['ratio_random_to_subnet_exceeds']:.1f}"
                f" (random init never reached {cfg.threshold} within n <= {max(cfg.grid)}).")
    return "Ratio random / subnet: undefined (Subtask Induction did not reach the threshold)."


def _differences(ours: Any, paper: Any, key: str = "") -> list[str]:
    """Dotted keys whose values differ, down to the leaves of nested sections."""
    if isinstance(ours, dict) and isinstance(paper, dict):
        return [d for k in paper for d in _differences(ours.get(k), paper[k],
                                                       f"{key}.{k}" if key else k)]
    return [] if ours == paper else [f"`{key}`: {ours} (paper: {paper})"]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(cfg, summary: dict, verify: dict) -> str:
    """report.md: setup, verification, curve, headline."""
    from instill.experiments.arithmetic import ArithmeticConfig

    paper = to_dict(ArithmeticConfig())
    ours = to_dict(cfg)
    differs = _differences(ours, paper)
    verify_rows = []
    for depth, v in verify.items():
        for label, acc in v["accuracy"].items():
            verify_rows.append([depth, label, f"{acc['subtask']:.3f}", f"{acc['base']:.3f}"])
    curves = summary["mean_test_accuracy"]
    ns = sorted({int(n) for c in curves.values() for n in c})
    curve_rows = [[LABELS[c], *[f"{curves[c].get(str(n), float('nan')):.2f}" for n in ns]]
                  for c in cfg.conditions]
    reach = summary["samples_to_threshold"]
    density = ", ".join(f"{d} {v['density']:.4f}" for d, v in verify.items())
    return "\n\n".join([
        "# Subtask Induction: modular arithmetic",
        f"**{headline(cfg, summary)}**",
        "## Setup",
        f"Base task `{cfg.base}`, subtask `{cfg.subtask}`, target `{cfg.target}` (mod "
        f"{cfg.modulus}, numbers 0..{cfg.numbers - 1}); competing hypotheses on the ambiguous "
        f"set: {', '.join(f'`{a}`' for a in cfg.alternatives)}. GPT-2 decoder, {cfg.n_embd}-dim,"
        f" {cfg.n_head} heads, depths {cfg.layers}; {cfg.seeds} seed(s); loss `{cfg.loss}`.",
        "Settings that differ from the paper's:\n\n" + ("\n".join(f"- {d}" for d in differs)
                                                         or "- none"),
        WHY if differs else "",
        "## Verification of the subnetwork",
        f"Density (kept fraction of the masked weights): {density}.",
        _table(["depth", "model", "subtask accuracy", "base accuracy"], verify_rows),
        "## Data efficiency",
        "![data efficiency](data_efficiency.png)",
        _table(["condition", *[f"n={n}" for n in ns]], curve_rows),
        _table(["condition", f"samples to {cfg.threshold}"],
               [[LABELS[c], reach[c] if reach[c] is not None else "never"]
                for c in cfg.conditions]),
        _ratio_line(summary, cfg),
        ("Ambiguity problems: " + "; ".join(summary["ambiguity_problems"]))
        if summary["ambiguity_problems"] else "The ambiguous set fits every alternative.",
    ]) + "\n"


def write_report(run: RunDir, cfg, rows: list[dict], verify: dict,
                 problems: list[str]) -> dict[str, Any]:
    """Write results.csv, summary.json, data_efficiency.png and report.md; return the summary."""
    write_csv(run, cfg, rows)
    summary = summarize(cfg, rows, verify, problems)
    write_json(run.path("summary.json"), summary)
    plot(run, cfg, rows)
    atomic_write_text(run.path("report.md"), markdown(cfg, summary, verify))
    run.record_outputs(["results.csv", "summary.json", "data_efficiency.png", "report.md",
                        "verify.json"])
    return summary
