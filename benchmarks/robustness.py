"""Does the arithmetic base model learn its task on every seed, under every CPU kernel set?

Trains only the base model of a preset (phase 1 of `instill arithmetic`) for many seeds, each in
a fresh process under the default kernels and under `ATEN_CPU_CAPABILITY=avx2` (CPUs round
differently, and a preset must not depend on it), for the preset's own (base, subtask, target)
triple and for other triples of the same shape. It prints a table of how many seeds reach the
base gate's threshold on held-out pairs, and the epochs the model took to get there.

    .venv/bin/python benchmarks/robustness.py                        # 20 seeds, 4 triples
    .venv/bin/python benchmarks/robustness.py --seeds 4 --triples 0  # a smoke run
    .venv/bin/python benchmarks/robustness.py --set base_fit.lr=1e-3 --json out.json
    .venv/bin/python benchmarks/robustness.py --table a.json b.json  # one table from runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from machine import machine_facts

#: (base, subtask, target, alternatives): the preset's triple first, then three of the same
#: shape (the base task is the subtask plus a term that the target's ambiguous set hides).
TRIPLES = [
    ("a + a*b", "a*b", "a^2 + a*b", "2*a^2, 2*b^2"),
    ("b + a*b", "a*b", "b^2 + a*b", "2*a^2, 2*b^2"),
    ("a*b + 1", "a*b", "a*b + a^2 + 1", "2*a^2 + 1, 2*b^2 + 1"),
    ("a + b + a*b", "a*b", "a^2 + a*b + 2*b", "2*a^2 + 2*a, 2*b^2 + 2*b"),
]
#: `avx2` switches ATen's own kernels; `avx2-isa` also caps MKL (GPT-2's matrix products) and
#: oneDNN (convolutions), which pick their instruction set themselves: the closer stand-in for
#: a CPU without AVX-512.
KERNELS = {"default": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
           "avx2-isa": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                        "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def one(args: argparse.Namespace) -> None:
    """Child process: train one base model and print its result as one JSON line."""
    import torch

    from instill.experiments.arithmetic import ArithmeticRun, load_config
    from instill.runio import parse_assignments

    base, subtask, target, alternatives = TRIPLES[args.triple]
    overrides = {"base": base, "subtask": subtask, "target": target,
                 "alternatives": [a.strip() for a in alternatives.split(",")],
                 "seed": args.seed}
    cfg = load_config(args.preset, None, parse_assignments(args.set, into=overrides))
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        run = ArithmeticRun(cfg, out, log=lambda *_: None)
        run.prepare()
        info = run.base_phase(cfg.layers[0], replicate=0)
    print(json.dumps({"test_accuracy": info["test_accuracy"], "best_epoch": info["best_epoch"],
                      "epochs_run": len(info["history"]),
                      "seconds": time.perf_counter() - start}))


def launch(job: tuple[int, int, str], args: argparse.Namespace) -> dict[str, Any]:
    """Run one (triple, seed, kernels) child and parse its line."""
    triple, seed, kernels = job
    command = [sys.executable, __file__, "--one", "--triple", str(triple), "--seed", str(seed),
               "--preset", args.preset, *[x for s in args.set for x in ("--set", s)]]
    env = {**os.environ, **KERNELS[kernels]}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"robustness.py: child {job} failed:\n{done.stderr[-3000:]}")
    return {"triple": triple, "seed": seed, "kernels": kernels,
            **json.loads(done.stdout.strip().splitlines()[-1])}


def table(rows: list[dict[str, Any]], threshold: float) -> str:
    """Markdown: per triple and kernel set, seeds reaching the threshold and the epochs."""
    lines = ["| base | subtask | target | kernels | seeds >= threshold | lowest test acc. | "
             "epochs to best (median, max) |", "|---|---|---|---|---|---|---|"]
    for t, (base, subtask, target, _) in enumerate(TRIPLES):
        for kernels in KERNELS:
            group = [r for r in rows if r["triple"] == t and r["kernels"] == kernels]
            if not group:
                continue
            ok = sum(r["test_accuracy"] >= threshold for r in group)
            epochs = sorted(r["best_epoch"] + 1 for r in group)
            failed = [r["seed"] for r in group if r["test_accuracy"] < threshold]
            lines.append(
                f"| `{base}` | `{subtask}` | `{target}` | {kernels} | **{ok}/{len(group)}**"
                f"{f' (fails: seeds {failed})' if failed else ''} | "
                f"{min(r['test_accuracy'] for r in group):.3f} | "
                f"{epochs[len(epochs) // 2]}, {epochs[-1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--triples", default=",".join(map(str, range(len(TRIPLES)))),
                        help="comma-separated indices of the built-in triples (0: the preset's)")
    parser.add_argument("--kernels", default="default,avx2")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. base_fit.lr=1e-3 (repeatable)")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                        help="print one table from the rows of earlier --json outputs")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--triple", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args)

    from instill.experiments.arithmetic import load_config
    from instill.runio import parse_assignments

    threshold = load_config(args.preset, None, parse_assignments(args.set)).gates.base_accuracy
    if args.table:
        rows = [row for path in args.table for row in json.loads(path.read_text())["rows"]]
        return print(table(rows, threshold))
    kernels = [k.strip() for k in args.kernels.split(",")]
    triples = [int(t) for t in args.triples.split(",")]
    jobs = [(t, s, k) for t in triples for s in range(args.seeds) for k in kernels]
    facts = machine_facts(jobs=args.jobs)
    print(f"robustness: {len(jobs)} base models ({facts})", flush=True)
    start, rows = time.perf_counter(), []
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda job: launch(job, args), jobs):
            rows.append(row)
            print(f"  triple {row['triple']} seed {row['seed']:2d} {row['kernels']:7s} "
                  f"test {row['test_accuracy']:.3f} best epoch {row['best_epoch']} "
                  f"({row['seconds']:.0f} s)", flush=True)
            if args.json:  # after every row, so a stopped run keeps what it measured
                args.json.write_text(json.dumps({"machine": facts, "set": args.set,
                                                 "rows": rows}, indent=1))
    print(f"\npreset {args.preset} {' '.join(args.set)}; threshold {threshold} on held-out "
          f"pairs; {time.perf_counter() - start:.0f} s wall\n")
    print(table(rows, threshold))


if __name__ == "__main__":
    main()
