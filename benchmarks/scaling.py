"""Ray against the local pool on the same cells, and a projection of the paper preset's wall
time on N machines from measured per-step costs.

1. Overhead: one small arithmetic run's pipelines are trained once; then the same induction
   cells run on `LocalExecutor(workers)` and on `RayExecutor(cpus=workers)` (a local Ray
   instance, files shipped with each job as on a cluster), each into a fresh copy of the run
   directory. Prints wall seconds per cell and Ray's overhead per cell (goal: <= 5%), and Ray's
   start-up with its workers separately (paid once per run, not per cell; on a busy 2-core
   machine it is about a minute, as each worker imports torch and transformers).
2. Projection: seconds per training step of the paper preset's GPT-2 (n_embd 128, batch 50) at
   each of its depths, times the steps of its base training and induction cells, divided over
   N machines of C cores (one worker per core), for N in --machines.

    python benchmarks/scaling.py [--workers 2] [--machines 1,4,16,64] [--cores 16] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from instill.experiments.arithmetic import ArithmeticRun, load_config
from instill.experiments.executors import LocalExecutor, RayExecutor

SMALL = {  # cells of ~1-3 s each on one core, so per-cell overhead is measurable
    "numbers": 30, "layers": [1], "n_embd": 32, "n_head": 2, "loss": "answer",
    "replicates": 2, "seeds": 1, "base_samples": 600, "base_val": 60,
    "gates": {"base_accuracy": 0.0, "subnetwork_accuracy": 0.0, "ablation_margin": -1.0},
    "base_fit": {"epochs": 3, "batch_size": 64, "patience": None},
    "subtask_samples": 300, "discovery": {"epochs": 2, "batch_size": 100},
    "grid": [32, 64, 128, 256], "conditions": ["subnet", "sampled", "random"],
    "induction_fit": {"epochs": 20, "batch_size": 32}, "n_val": 60, "n_test": 60,
}


def overhead(workers: int, root: Path) -> dict:
    """Wall time of the same cells on the local pool and on Ray (fresh run directories)."""
    cfg = load_config("quick", SMALL)
    base = ArithmeticRun(cfg, root / "base", log=lambda _: None)
    base.execute()  # pipelines and cells once, so both executors start from the same files
    chosen = {u: {"attempt": 0} for u in base.pipelines()}
    cells = base.cells(chosen)
    start = time.perf_counter()
    ray = RayExecutor(cpus=workers)
    ray.map(_warm_up, list(range(4 * workers)), "ray workers")  # start them: once per run
    startup = time.perf_counter() - start
    walls = {}
    for name, executor in (("local", LocalExecutor(workers)), ("ray", ray),
                           ("local again", LocalExecutor(workers))):
        out = root / name.replace(" ", "-")
        shutil.copytree(root / "base", out, ignore=shutil.ignore_patterns("cells"))
        run = ArithmeticRun(cfg, out, log=lambda _: None, executor=executor)
        start = time.perf_counter()
        run.run_cells(cells)
        walls[name] = time.perf_counter() - start
        same = all((out / f"cells/{c.name}.json").read_bytes()
                   == (root / "base" / f"cells/{c.name}.json").read_bytes() for c in cells)
        print(f"{name:12s} {walls[name]:7.1f} s for {len(cells)} cells "
              f"({walls[name] / len(cells):.2f} s/cell); identical cells: {same}")
    local = (walls["local"] + walls["local again"]) / 2
    ratio = walls["ray"] / local
    print(f"Ray start-up with its workers {startup:.1f} s (once per run, not in the cell times; "
          "the local pool's start is in its times); Ray / local pool per cell: "
          f"{ratio:.3f} ({(ratio - 1) * 100:+.1f}%; local runs {walls['local']:.1f} and "
          f"{walls['local again']:.1f} s)")
    return {"cells": len(cells), "walls": walls, "ray_startup_s": startup, "ratio": ratio}


def _warm_up(_job: int) -> float:
    """A worker's first job: start-up and the imports every cell needs."""
    import instill.experiments.arithmetic  # noqa: F401

    return time.perf_counter()


def seconds_per_step(layers: int, steps: int = 20) -> float:
    """One AdamW step of the paper preset's GPT-2 at this depth, batch 50, one thread."""
    from instill.models import build_model
    from instill.tasks.arithmetic import ArithmeticSpec

    spec = ArithmeticSpec(numbers=1000, modulus=7)
    model = build_model("gpt2", vocab_size=spec.vocab_size, n_positions=4, n_embd=128,
                        n_layer=layers, n_head=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, spec.vocab_size, (50, 4))
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def projection(machines: list[int], cores: int) -> dict:
    """Core-seconds of the paper preset from measured step costs, spread over N machines."""
    cfg = load_config("paper")
    per_cell_steps = sum(math.ceil(n / cfg.induction_fit.batch_size) for n in cfg.grid) \
        * cfg.induction_fit.epochs * len(cfg.conditions)
    base_steps = math.ceil(cfg.base_samples / cfg.base_fit.batch_size) * cfg.base_fit.epochs
    total, rows = 0.0, []
    for layers in cfg.layers:
        step = seconds_per_step(layers)
        core_s = (per_cell_steps + base_steps) * step * cfg.replicates * cfg.seeds
        rows.append({"layers": layers, "s_per_step": step, "core_hours": core_s / 3600})
        total += core_s
        print(f"depth {layers:2d}: {step * 1e3:6.1f} ms/step; {core_s / 3600:7.1f} core-hours "
              "(base training at its 50-epoch budget + every induction cell)")
    out = {"core_hours": total / 3600, "depths": rows, "machines": {}}
    for n in machines:
        hours = total / (n * cores) / 3600
        out["machines"][n] = hours
        print(f"{n:3d} machines x {cores} cores: ~{hours:6.1f} h "
              "(perfect spread; pipelines come first, so add one base training)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--machines", default="1,4,16,64")
    ap.add_argument("--cores", type=int, default=16)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {}
    if not args.skip_overhead:
        with tempfile.TemporaryDirectory() as tmp:
            result["overhead"] = overhead(args.workers, Path(tmp))
    result["projection"] = projection([int(m) for m in args.machines.split(",")], args.cores)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print("done", file=sys.stderr)


if __name__ == "__main__":
    main()
