"""Do two `instill continual` runs (e.g. default kernels and `ATEN_CPU_CAPABILITY=avx2`) reach
the same decisions? Both runs are re-summarized over the methods they share (so the Holm
families are the same), from their cells' full-precision rows; the script prints each paired
comparison's decision and each goal in both runs, and exits 1 when any differ.

    .venv/bin/python benchmarks/continual_kernels.py runs/continual runs/continual-avx2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from instill.experiments.continual_report import summarize


def rows_of(run: Path, methods: set[str]) -> list[dict[str, Any]]:
    """Every cell's rows of the given methods."""
    rows = []
    for path in sorted((run / "cells").glob("*.json")):
        rows += [r for r in json.loads(path.read_text())["rows"] if r["method"] in methods]
    return rows


def decisions(run: Path, methods: list[str]) -> dict[str, str]:
    """comparison or goal -> decision, re-summarized over `methods`."""
    old = json.loads((run / "summary.json").read_text())
    summary = summarize(rows_of(run, set(methods)), old["sequence"], methods,
                        {u: g for u, g in old["gates"].items() if u.split("-", 1)[1] in methods},
                        old["packnet_keep"], old.get("kind", "tasks"))
    out = {f"accuracy vs {k}": v["decision"] for k, v in summary["subnetwork_vs"].items()}
    out |= {f"density vs {k}": v["decision"] for k, v in summary["density_vs"].items()}
    for name, reached in summary["goals"].items():  # "(against ...)" lists the variants of
        goal, _, against = name.partition(" (against ")  # equal accuracy: shown, not compared
        out[f"goal: {goal}"] = ("reached" if reached else "not reached") \
            + (f" (against {against}" if against else "")  # keeps its ")"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    methods = [m for m in json.loads((args.a / "summary.json").read_text())["methods"]
               if m in json.loads((args.b / "summary.json").read_text())["methods"]]
    da, db = decisions(args.a, methods), decisions(args.b, methods)
    print(f"methods in both: {', '.join(methods)}\n")
    print(f"| decision | {args.a.name} | {args.b.name} | same |\n|---|---|---|---|")
    same = {k: v.split(" (")[0] == str(db.get(k)).split(" (")[0] for k, v in da.items()}
    for key, value in da.items():
        print(f"| {key} | {value} | {db.get(key)} | {'yes' if same[key] else 'NO'} |")
    for key, label in METRICS:
        print(f"\n| method | {args.a.name} {label} | {args.b.name} {label} |\n|---|---|---|")
        for method in methods:
            print(f"| {method} | {final(args.a, method, key)} | {final(args.b, method, key)} |")
    return 0 if all(same.values()) else 1


METRICS = [("final_accuracy", "ACC (final accuracy)"), ("bwt", "BWT"), ("fwt", "FWT"),
           ("acc_inferred", "ACC, task inferred")]


def final(run: Path, method: str, key: str = "final_accuracy") -> str:
    """A metric of `method` in `run` as 'mean [low, high]' ('n/a' where it has none)."""
    e = json.loads((run / "summary.json").read_text())["methods"][method].get(key)
    return "n/a" if not e else f"{e['mean']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"


if __name__ == "__main__":
    sys.exit(main())
