"""Stacked (vmapped) training against one model at a time, on a device: the same run twice.

Runs a small arithmetic experiment (the quick preset's model, 3 pipelines, grid 0 and 100, five
conditions; counter-based dropout everywhere) into `OUT/alone` with every model trained on its
own and into `OUT/stacked` with base models, discoveries and cells trained as vmapped stacks,
then compares what each model recorded: validation and test accuracy and best epoch of every
cell, the base models' histories, and the overlap (IoU) of the subnetworks; and reruns the
stacked run into `OUT/again` to check that a rerun is bit-identical (`results.csv`). Prints one
line per check and writes `OUT/agreement.json`.

    python benchmarks/device_agreement.py --device cuda --out DIR
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from instill.core import Subnetwork
from instill.experiments.arithmetic import load_config, run_arithmetic

SETTINGS = {
    "replicates": 3, "grid": [0, 100],
    "conditions": ["subnet", "sampled", "sampled-inverse", "full", "random"],
    "base_fit": {"dropout_rng": "counter"}, "induction_fit": {"dropout_rng": "counter"},
}
SMOKE = {  # to check the script on a CPU: a model this small learns nothing
    "numbers": 30, "n_embd": 32, "base_samples": 400, "base_val": 50, "subtask_samples": 300,
    "grid": [0, 10], "n_val": 50, "n_test": 50, "gates": {"enforce": False},
    "base_fit": {"epochs": 2, "dropout_rng": "counter"}, "discovery": {"epochs": 2},
    "induction_fit": {"epochs": 2, "dropout_rng": "counter"},
}


def run(out: Path, device: str, stacked: bool, smoke: bool) -> float:
    extra = {"induction_batch": 256, "pipeline_batch": 8} if stacked else {}
    cfg = load_config("quick", {**SETTINGS, **(SMOKE if smoke else {}), **extra})
    start = time.perf_counter()
    run_arithmetic(cfg, out, log=lambda _: None, device=device)
    return time.perf_counter() - start


def compare(alone: Path, stacked: Path) -> dict:
    rows = [list(csv.DictReader((d / "results.csv").open())) for d in (alone, stacked)]
    cells = {"rows": len(rows[0]), "best_epoch_equal": 0, "max_val_diff": 0.0,
             "max_test_diff": 0.0}
    for a, b in zip(*rows, strict=True):
        cells["best_epoch_equal"] += a["best_epoch"] == b["best_epoch"]
        cells["max_val_diff"] = max(cells["max_val_diff"],
                                    abs(float(a["val_accuracy"]) - float(b["val_accuracy"])))
        cells["max_test_diff"] = max(cells["max_test_diff"],
                                     abs(float(a["test_accuracy"]) - float(b["test_accuracy"])))
    bases, ious = [], []
    for where in sorted(p.relative_to(alone) for p in alone.glob("pipelines/*/a0")):
        a, b = (json.loads((d / where / "base.json").read_text()) for d in (alone, stacked))
        bases.append(max(abs(x["loss"] - y["loss"]) for x, y in zip(
            a["history"], b["history"], strict=False)))
        subs = [Subnetwork.load(d / where / "subnetwork.safetensors") for d in (alone, stacked)]
        ious.append(subs[0].iou(subs[1]))
    return {"cells": cells, "base_max_loss_diff": max(bases), "subnetwork_iou_min": min(ious)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny settings (a script check)")
    args = parser.parse_args()
    walls = {name: run(args.out / name, args.device, name != "alone", args.smoke)
             for name in ("alone", "stacked", "again")}
    result = {"device": args.device, "walls_s": walls, **compare(args.out / "alone",
                                                                 args.out / "stacked"),
              "rerun_identical": (args.out / "stacked/results.csv").read_bytes()
              == (args.out / "again/results.csv").read_bytes()}
    cells = result["cells"]
    print(f"agreement on {args.device}: {cells['best_epoch_equal']}/{cells['rows']} cells with "
          f"the same best epoch; max |val diff| {cells['max_val_diff']:.2e}, max |test diff| "
          f"{cells['max_test_diff']:.2e}; base loss histories within "
          f"{result['base_max_loss_diff']:.2e}; subnetwork IoU >= "
          f"{result['subnetwork_iou_min']:.4f}; stacked rerun bit-identical: "
          f"{result['rerun_identical']}; wall {walls['alone']:.0f} s one at a time, "
          f"{walls['stacked']:.0f} s stacked")
    (args.out / "agreement.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
