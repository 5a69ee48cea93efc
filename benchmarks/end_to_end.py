"""Wall time of the experiments' quick presets, run exactly as a user runs them.

Each command runs in a fresh output directory as a subprocess of the installed `instill` entry
point (its defaults: one thread per worker, as many workers as CPUs). The script prints wall and
CPU time, the goal (each quick preset, now replicated pipelines: at most 15 minutes on 2 CPU
cores), the results (so a speed change that moved the science shows up next to its timing: the
summary's `headline`, and for arithmetic each condition's AUC with its 95% interval over
pipelines and the median samples to the threshold), the machine and the load average before and
after.

    .venv/bin/python benchmarks/end_to_end.py [--only arithmetic|shapebias] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import cpu_model, load_average

GOALS_MIN = {"arithmetic": 15.0, "shapebias": 15.0}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def results_of(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """The results a speed change must not move, from a run's summary: the headline; for
    arithmetic also, per condition, the AUC interval and the median samples to threshold (and
    in how many pipelines it never got there), which gates were overridden, the densities."""
    results: dict[str, Any] = {"headline": summary.get("headline")}
    if name == "arithmetic":
        results["threshold"] = summary.get("threshold")
        results["conditions"] = {
            c: {"auc": v.get("auc"),
                "median_samples_to_threshold": v.get("median_samples_to_threshold"),
                "never": v.get("never")}
            for c, v in summary.get("conditions", {}).items()}
        results["gates_overridden"] = summary.get("gates_overridden", [])
        results["subnetwork_density"] = summary.get("subnetwork_density")
    return results


def headline(name: str, out: Path) -> dict[str, Any]:
    """`results_of` the run's summary.json."""
    return results_of(name, json.loads((out / "summary.json").read_text()))


def describe(results: dict[str, Any]) -> list[str]:
    """The results as printed lines: the headline, then one line per arithmetic condition."""
    lines = [f"  headline: {results.get('headline')}"]
    conditions = results.get("conditions") or {}
    if conditions:
        width = max(len(c) for c in ["condition", *conditions])
        to = results.get("threshold")
        lines.append(f"  {'condition':<{width}}  {'AUC mean [95% interval]':<24}  median samples "
                     f"to {to if to is not None else 'threshold'} (never reached)")
    for c in sorted(conditions, key=lambda c: c != "subnet"):  # Subtask Induction first
        v = conditions[c]
        auc = v.get("auc") or {}
        interval = (f"{auc['mean']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]"
                    if {"mean", "low", "high"} <= set(auc) else "n/a")
        median = v.get("median_samples_to_threshold")
        lines.append(f"  {c:<{width}}  {interval:<24}  "
                     f"{'never' if median is None else f'{median:g}'} "
                     f"({v.get('never')} of {auc.get('n', '?')} pipelines)")
    if results.get("gates_overridden"):
        lines.append(f"  WARNING: gates overridden for {', '.join(results['gates_overridden'])}")
    if results.get("subnetwork_density"):
        lines.append("  subnetwork density: " + ", ".join(
            f"{u} {d:.4f}" for u, d in results["subnetwork_density"].items()))
    return lines


def run(name: str, instill: str, workdir: Path) -> dict[str, Any]:
    out = workdir / name
    command = [instill, name, "--preset", "quick", "--out", str(out)]
    print(f"--- {' '.join(command)}  (load average {load_average()})", flush=True)
    before_load, cpu, start = load_average(), children_cpu(), time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall, cpu = time.perf_counter() - start, children_cpu() - cpu
    if done.returncode:
        sys.stdout.write(done.stdout[-4000:])
        raise SystemExit(f"end_to_end.py: `{' '.join(command)}` failed ({done.returncode})")
    goal = GOALS_MIN[name]
    met = None if goal is None else wall <= goal * 60
    row = {"command": f"instill {name} --preset quick", "wall_min": wall / 60,
           "cpu_min": cpu / 60, "goal_min": goal, "met": met, "load_before": before_load,
           "load_after": load_average(), "results": headline(name, out)}
    verdict = "" if goal is None else f"  goal <= {goal:.0f} min: {'met' if met else 'NOT met'}"
    print(f"{name}: {row['wall_min']:.2f} min wall, {row['cpu_min']:.2f} min CPU{verdict}")
    print("\n".join(describe(row["results"])), flush=True)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(GOALS_MIN), help="run one experiment")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--keep", help="keep the run directories under this folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    instill = shutil.which("instill", path=os.path.dirname(sys.executable)) or "instill"
    print(f"machine: {os.cpu_count()} CPUs, {cpu_model()}, python {sys.version.split()[0]}")
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="instill-e2e-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        rows = {name: run(name, instill, workdir) for name in GOALS_MIN
                if args.only in (None, name)}
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpus": os.cpu_count(), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
