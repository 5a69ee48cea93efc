"""Wall time of the experiments' quick presets, run exactly as a user runs them.

Each command runs in a fresh output directory as a subprocess of the installed `instill` entry
point (its defaults: one thread per worker, as many workers as CPUs). The script prints wall and
CPU time, the goal (arithmetic quick preset: at most 10 minutes on 2 CPU cores), the headline
results (so a speed change that moved the science shows up next to its timing), the machine and
the load average before and after.

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

GOALS_MIN = {"arithmetic": 10.0, "shapebias": None}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def headline(name: str, out: Path) -> dict[str, Any]:
    """The results a speed change must not move, read from the run's summary.json."""
    summary = json.loads((out / "summary.json").read_text())
    if name == "arithmetic":
        keys = ("samples_to_threshold", "ratio_random_to_subnet",
                "ratio_random_to_subnet_exceeds", "subnetwork_density")
        return {k: summary.get(k) for k in keys}
    return {"headline": summary.get("headline")}


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
    print(f"  results: {json.dumps(row['results'])}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(GOALS_MIN), help="run one experiment")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--keep", help="keep the run directories under this folder")
    args = parser.parse_args()
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
