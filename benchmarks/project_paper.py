"""The paper preset's wall time on one device, projected from a measured slice and throughputs.

Inputs, both measured on the same device in the same session (`benchmarks/device_check.sh`):

* a slice of the paper preset run with stacks (`--layers 2 --replicates 1`, the full grid,
  `induction_batch` covering a grid point's conditions), finished or stopped by a time limit:
  when its base model, subnetwork and each grid point's stack of cells finished, read from the
  files' modification times. Induction trains a fixed number of epochs (no early stop in the
  paper's schedule), so each finished stack gives seconds per stacked step;
* `benchmarks/batched.py --archs paper-L2 paper-L12 --k 1 16 64 256 --json` throughputs.

A stack of K models at depth d costs time proportional to T(d, K) = K / rate(d, K), with rate
interpolated log-linearly in K between the measured K and linearly in depth between 2 and 12.
The paper preset (depths 2-12, 3 replicates, 17 grid points, 9 conditions) then costs, per
depth: the slice's base training and discovery scaled by T(d, 3) / T(2, 1) (one stack of the
three replicates), and every grid point's stacked steps (epochs x batches of its data) at the
slice's seconds per step scaled by T(d, 27) / T(2, K_slice) (one stack of 3 replicates x 9
conditions). It is an estimate: base training's length depends on the seed (patience), and
discovery's steps (batch 500) are scaled like training steps.

    python benchmarks/project_paper.py SLICE_DIR THROUGHPUT_JSON [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

DEPTHS, REPLICATES, CONDITIONS = (2, 4, 6, 8, 10, 12), 3, 9


def phase_times(run: Path) -> dict:
    """Seconds of base training and discovery, and seconds per stacked induction step, of a
    slice (finished or stopped part-way through its cells)."""
    cfg = json.loads((run / "config.json").read_text())["config"]
    start = (run / "config.json").stat().st_mtime
    where = next(run.glob("pipelines/*/a0"), None)
    if where is None or not (where / "verify.json").exists():
        raise SystemExit(f"{run} has no finished pipeline: the slice needs more time")
    base = (where / "base.json").stat().st_mtime
    found = (where / "subnetwork.safetensors").stat().st_mtime
    last = (where / "verify.json").stat().st_mtime
    done: dict[int, float] = {}
    models: dict[int, int] = {}
    for cell in run.glob("cells/*.json"):
        n = int(cell.name.split("-n")[1].split("-")[0])
        done[n] = max(done.get(n, 0.0), cell.stat().st_mtime)
        models[n] = models.get(n, 0) + 1
    seconds = steps = 0.0
    for n in sorted(done, key=done.get):  # one worker: stacks ran one after another
        seconds += done[n] - last
        steps += grid_steps(cfg, [n])
        last = done[n]
    return {"base_s": base - start, "discovery_s": found - base,
            "stacks": len(done), "step_s": seconds / steps if steps else None,
            "models_per_stack": max(models.values()) if models else 0,
            "grid_steps": grid_steps(cfg, cfg["grid"])}


def grid_steps(cfg: dict, grid: list[int]) -> int:
    """Stacked steps of induction over `grid`: epochs x batches of each point's data."""
    fit = cfg["induction_fit"]
    return sum(fit["epochs"] * math.ceil((cfg["numbers"] + n) / fit["batch_size"])
               for n in grid)


def stack_time(rates: dict[tuple[int, int], float], depth: int, k: int) -> float:
    """T(d, K) = K / rate(d, K), interpolated from the measured (depth, K) rates."""
    def at(d: int) -> float:
        ks = sorted(kk for dd, kk in rates if dd == d)
        if k <= ks[0]:
            return k / rates[d, ks[0]]
        for lo, hi in itertools.pairwise(ks):
            if k <= hi:
                w = (math.log(k) - math.log(lo)) / (math.log(hi) - math.log(lo))
                rate = math.exp((1 - w) * math.log(rates[d, lo]) + w * math.log(rates[d, hi]))
                return k / rate
        return k / rates[d, ks[-1]]

    w = (depth - 2) / 10
    return (1 - w) * at(2) + w * at(12)


def read_rates(path: Path) -> dict[tuple[int, int], float]:
    """(depth, K) -> models per minute of the batched mode (K = 1: batched K=1)."""
    rows = json.loads(path.read_text())["rows"]
    out = {}
    for row in rows:
        if row["mode"].startswith("batched K="):
            depth = int(row["arch"].removeprefix("paper-L"))
            out[depth, int(row["mode"].split("=")[1])] = row["models_per_min"]
    return out


def project(times: dict, rates: dict[tuple[int, int], float]) -> list[dict]:
    k_slice = times["models_per_stack"]
    rows = []
    for d in DEPTHS:
        pipe = stack_time(rates, d, REPLICATES) / stack_time(rates, 2, 1)
        cell = stack_time(rates, d, REPLICATES * CONDITIONS) / stack_time(rates, 2, k_slice)
        base, disc = times["base_s"] * pipe, times["discovery_s"] * pipe
        cells = times["grid_steps"] * times["step_s"] * cell
        rows.append({"depth": d, "base_s": base, "discovery_s": disc, "cells_s": cells,
                     "total_s": base + disc + cells})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("slice", type=Path)
    parser.add_argument("throughput", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    times, rates = phase_times(args.slice), read_rates(args.throughput)
    rows = project(times, rates)
    if times["step_s"] is None:
        raise SystemExit("the slice finished no stack of cells: give it more time")
    print(f"slice (depth 2, 1 pipeline, {times['stacks']} stacks of "
          f"{times['models_per_stack']} models done): base {times['base_s']:.0f} s, discovery "
          f"{times['discovery_s']:.0f} s, {times['step_s'] * 1000:.1f} ms per stacked step")
    print("projected paper preset (3 replicates, 9 conditions, stacks per depth and n):")
    for row in rows:
        print(f"  depth {row['depth']:2d}: base {row['base_s'] / 60:5.1f} min, discovery "
              f"{row['discovery_s'] / 60:5.1f} min, cells {row['cells_s'] / 60:6.1f} min")
    total = sum(r["total_s"] for r in rows) / 60
    print(f"  all six depths, one after another on one device: {total:.0f} min")
    if args.json:
        args.json.write_text(json.dumps({"slice": times, "rates": {f"{d}:{k}": v for (d, k), v
                                                                   in rates.items()},
                                         "depths": rows, "total_min": total}, indent=2))


if __name__ == "__main__":
    main()
