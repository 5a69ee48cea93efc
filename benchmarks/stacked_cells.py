"""Induction cells one model at a time against vmapped stacks, on the same pipelines.

Copies the pipelines (base models, subnetworks, verification) of a finished arithmetic run
into two fresh run directories and times only the cells phase there: once with
`induction_batch: 1` (each model trained on its own, two worker processes) and once with
`induction_batch: 256` (a grid point's cells as one stack; the pool runs stacks side by side),
everything else as the source run's config (its `--grid` may be cut to save time). Prints wall
and CPU seconds of each and their ratios, and checks that every model recorded the same best
epoch and accuracies within float rounding. This is the measurement behind the quick preset's
`induction_batch` (docs/performance.md).

    python benchmarks/stacked_cells.py SOURCE_RUN [--grid 25,250] [--workers 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

from instill.experiments.arithmetic import ArithmeticConfig, ArithmeticRun
from instill.experiments.executors import LocalExecutor
from instill.runio import from_dict, load_config_file, to_dict


def cells_phase(source: Path, out: Path, cfg: ArithmeticConfig, workers: int
                ) -> tuple[float, float]:
    """Wall and CPU seconds (this process and its workers) of the cells of a copy of source."""
    shutil.copytree(source / "pipelines", out / "pipelines")
    run = ArithmeticRun(cfg, out, log=lambda _: None, executor=LocalExecutor(workers))
    chosen = {u: run.pipeline(*u) for u in run.pipelines()}  # read back: nothing to train
    cells = run.cells(chosen)
    before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                  resource.RUSAGE_CHILDREN)]
    start = time.perf_counter()
    run.run_cells(cells)
    wall = time.perf_counter() - start
    after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime
              for a, b in zip(after, before, strict=True))
    rows = [row for c in cells for row in json.loads(
        (out / "cells" / f"{c.name}.json").read_text())["rows"]]
    with (out / "rows.csv").open("w") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--grid", default=None, help="comma-separated n (default: the run's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    values = load_config_file(args.source / "config.json")["config"]
    if args.grid:
        values["grid"] = [int(n) for n in args.grid.split(",")]
    root = Path(tempfile.mkdtemp(prefix="stacked-cells-"))
    results = {}
    for name, size in (("one at a time", 1), ("stacked", 256)):
        cfg = from_dict(ArithmeticConfig, {**values, "induction_batch": size})
        results[name] = cells_phase(args.source, root / str(size), cfg, args.workers)
        print(f"{name:14s} {results[name][0]:7.1f} s wall, {results[name][1]:7.1f} s CPU",
              flush=True)
    rows = [list(csv.DictReader((root / d / "rows.csv").open())) for d in ("1", "256")]
    same_epoch = sum(a["best_epoch"] == b["best_epoch"] for a, b in zip(*rows, strict=True))
    worst = max(abs(float(a["test_accuracy"]) - float(b["test_accuracy"]))
                for a, b in zip(*rows, strict=True))
    (one_wall, one_cpu), (st_wall, st_cpu) = results["one at a time"], results["stacked"]
    print(f"stacked / one at a time: {one_wall / st_wall:.2f}x faster in wall time, "
          f"{one_cpu / st_cpu:.2f}x in CPU time; {same_epoch}/{len(rows[0])} models with the "
          f"same best epoch, test accuracy within {worst:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"grid": values["grid"], "results": results,
                                         "same_best_epoch": same_epoch, "models": len(rows[0]),
                                         "max_test_diff": worst, "config": to_dict(
                                             from_dict(ArithmeticConfig, values))}, indent=2))


if __name__ == "__main__":
    main()
