"""Throughput of the arithmetic induction sweep: trained models per minute.

Every variant trains the SAME models: the same cells (n values x seeds), the paper's five
conditions (`PAPER_CONDITIONS`, passed explicitly: the experiment's default list has grown to
nine, and the figures stay comparable with the earlier ones), the same starting models
(instill's `starting_model` / `transplant` from one cached base model and subnetwork: replicate
0, attempt 0 of the quick preset's pipeline at depth 2), the same target splits and seeds
(`ArithmeticRun.splits` / `ArithmeticRun.seed`), epochs, learning rate and weight decay. They
differ only in how the training runs:

* ``reference``: the paper's way, written plainly: one run at a time in one process with
  torch's default thread count, a `DataLoader` over a `TensorDataset` (batch 50, shuffled), the
  HF causal-LM loss over the whole sequence (`labels=input_ids`), per-step bookkeeping
  (`loss.item()`, running train accuracy), and after every epoch a validation pass through a
  batch-50 `DataLoader` under `torch.no_grad()`, keeping a deep copy of the best state. On a
  busy machine torch's default threads oversubscribe the CPUs and this crawls, so it stops
  after `--reference-budget` seconds (its models then run in a fixed shuffled order, and the
  rate is measured on those it finished);
* ``reference-1t``: the same loop with 1 thread, every model (its accuracies are the
  reference's: results do not depend on the thread count);
* ``pipeline``: instill's path, `ArithmeticRun.run_cells` on a `LocalExecutor` of 2 worker
  processes of 1 thread each, with the quick preset's settings (answer-token loss, batch 64);
  each cell loads the base model and subnetwork itself, as in `instill arithmetic`;
* ``pipeline-lm``: the same with the paper's LM loss (does the loss choice change results?);
* ``single``: instill's `ArithmeticRun.cell` in this process, 1 thread, no workers (separates
  the effect of the workers from per-step efficiency);
* idea rows (not with --quick): ``pipeline-b256`` (the pipeline with batch 256),
  ``single-faithful`` (as single, with the settings instill used before its speed work: HF's
  8-op `gelu_new` and unfused AdamW; results should match `single`) and ``single-eval3`` (as
  single with `induction_fit.eval_every: 3`: validation every 3rd epoch and the last).

Variants run one after another in a rotating order, `--rounds` times; the table gives the
median models/minute (wall clock, worker start-up included), each round's rate, CPU seconds per
model (this process plus its workers), and the mean test accuracy per condition of the last
round's models. `--profile` adds torch.profiler summaries of 20 training steps of each loop.

    .venv/bin/python benchmarks/sweep_throughput.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

import torch
from machine import load_average, machine_facts
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from instill.experiments.arithmetic import (
    ArithmeticConfig,
    ArithmeticRun,
    load_config,
)
from instill.experiments.common import PAPER_CONDITIONS, merge, starting_model
from instill.experiments.executors import LocalExecutor
from instill.models import set_activation
from instill.runio import to_dict

DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before anything changes it
LAYERS = 2
REPLICATE, ATTEMPT = 0, 0  # the one pipeline whose base model and subnetwork every variant uses
CONDITIONS = list(PAPER_CONDITIONS)  # the paper's five, as before the registry grew


def cpu_seconds() -> float:
    """CPU seconds of this process plus its finished (joined) child processes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# -- the shared base model and subnetwork -------------------------------------------------------
def prepared_run(cache_dir: str) -> ArithmeticRun:
    """The quick preset's base model and subnetwork of replicate 0, attempt 0 (trained /
    discovered once, then cached)."""
    cfg = load_config("quick", overrides={"layers": [LAYERS]})
    key = hashlib.sha1(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:10]
    run = ArithmeticRun(cfg, os.path.join(cache_dir, f"arith-base-{key}"),
                        log=lambda msg: print(msg, file=sys.stderr))
    info = run.base_phase(LAYERS, REPLICATE, ATTEMPT)
    gate = cfg.gates.base_accuracy
    print(f"base model L{LAYERS} r{REPLICATE} a{ATTEMPT}: held-out test accuracy "
          f"{info['test_accuracy']:.3f} (base gate {gate}: "
          f"{'pass' if info['test_accuracy'] >= gate else 'FAIL'})", file=sys.stderr)
    model = run.base_model(LAYERS, REPLICATE, ATTEMPT)
    run.subnetwork(LAYERS, REPLICATE, ATTEMPT, model)
    return run


def sweep_config(args: argparse.Namespace, spec: dict[str, Any]) -> ArithmeticConfig:
    """The quick preset cut to the benchmark's cells and epochs, plus a variant's settings."""
    fit = {"epochs": args.epochs, "batch_size": spec["batch"], "lr": args.lr}
    overrides = merge({"layers": [LAYERS], "replicates": 1, "grid": args.n, "seeds": args.seeds,
                       "conditions": CONDITIONS, "loss": spec["loss"], "induction_fit": fit},
                      spec.get("config", {}))
    return load_config("quick", overrides=overrides)


def fresh_run_dir(base: ArithmeticRun, parent: str) -> str:
    """A new run directory holding only the cached base model and subnetwork (no cells)."""
    out = tempfile.mkdtemp(prefix="sweep-", dir=parent)
    where = base.attempt_dir((LAYERS, REPLICATE), ATTEMPT)
    for name in (f"{where}/base.safetensors", f"{where}/subnetwork.safetensors"):
        os.makedirs(os.path.join(out, os.path.dirname(name)), exist_ok=True)
        shutil.copy(base.run.path(name), os.path.join(out, name))
    return out


# -- (a) the reference loop ---------------------------------------------------------------------
def reference_train(model: nn.Module, train: Tensor, val: Tensor, epochs: int, lr: float,
                    weight_decay: float, batch_size: int, seed: int) -> float:
    """Paper-style training of one model; returns the best validation accuracy."""
    loader = DataLoader(TensorDataset(train), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(TensorDataset(val), batch_size=batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state = -1.0, None
    for _epoch in range(epochs):
        model.train()
        total_loss, correct, seen = 0.0, 0, 0
        for (x,) in loader:
            out = model(input_ids=x, labels=x)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            total_loss += out.loss.item() * len(x)
            correct += (out.logits[:, 2].argmax(-1) == x[:, 3]).sum().item()
            seen += len(x)
        model.eval()
        hits = 0
        with torch.no_grad():
            for (x,) in val_loader:
                logits = model(input_ids=x[:, :3]).logits[:, -1]
                hits += (logits.argmax(-1) == x[:, 3]).sum().item()
        acc = hits / len(val)
        if acc > best:
            best, best_state = acc, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return best


@torch.no_grad()
def reference_test(model: nn.Module, test: Tensor, batch_size: int) -> float:
    hits = 0
    for (x,) in DataLoader(TensorDataset(test), batch_size=batch_size):
        hits += (model(input_ids=x[:, :3]).logits[:, -1].argmax(-1) == x[:, 3]).sum().item()
    return hits / len(test)


def reference_sweep(base: ArithmeticRun, cfg: ArithmeticConfig, batch_size: int,
                    budget_s: float | None = None) -> tuple[list[dict[str, Any]], int]:
    """The same models `cell` trains, one at a time. With a time budget, stops once it is
    spent; the models then run in a fixed shuffled order so the finished ones are a fair
    sample (small and large n alike). Returns the rows and the number of models asked for."""
    trained = base.base_model(LAYERS, REPLICATE, ATTEMPT)
    sub = base.subnetwork(LAYERS, REPLICATE, ATTEMPT, trained)
    sweep = ArithmeticRun(cfg, base.run.root, log=lambda _: None)  # splits, seeds; no files
    fit = cfg.induction_fit
    splits = {seed: sweep.splits(REPLICATE, seed) for seed in range(cfg.seeds)}
    models = [(seed, n, c) for seed in range(cfg.seeds) for n in cfg.grid
              for c in cfg.conditions]
    if budget_s is not None:
        order = torch.randperm(len(models), generator=torch.Generator().manual_seed(0))
        models = [models[i] for i in order.tolist()]
    start, rows = time.perf_counter(), []
    for seed, n, condition in models:
        if budget_s is not None and rows and time.perf_counter() - start > budget_s:
            break
        train = splits[seed].train_sequences(n)
        val, test = splits[seed].val_sequences(), splits[seed].test_sequences()
        run_seed = sweep.seed("cell", LAYERS, REPLICATE, n, seed)  # as `ArithmeticRun.cell`
        torch.manual_seed(run_seed)
        model = starting_model(condition, trained, sub, run_seed, freeze=cfg.freeze)
        set_activation(model, "gelu_new")  # HF GPT-2's default, as the paper ran it
        val_acc = reference_train(model, train, val, fit.epochs, fit.lr, fit.weight_decay,
                                  batch_size, run_seed)
        rows.append({"n": n, "seed": seed, "condition": condition, "val_accuracy": val_acc,
                     "test_accuracy": reference_test(model, test, batch_size)})
    return rows, len(models)


# -- (b), (c) instill's pipeline ------------------------------------------------------------------
def pipeline_sweep(base: ArithmeticRun, cfg: ArithmeticConfig, workers: int, parent: str
                   ) -> list[dict[str, Any]]:
    """`ArithmeticRun.cell` for every cell, exactly as `ArithmeticRun.execute` runs them."""
    out = fresh_run_dir(base, parent)
    try:
        run = ArithmeticRun(cfg, out, log=lambda _: None, executor=LocalExecutor(workers))
        cells = run.cells({(LAYERS, REPLICATE): {"attempt": ATTEMPT}})
        return [row for record in run.run_cells(cells) for row in record["rows"]]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _startup_probe(_job: Any) -> float:
    """A worker's first job: what it costs before any cell (spawn, imports, GPT-2 module)."""
    from transformers import GPT2LMHeadModel  # noqa: F401  (build_model imports it lazily)

    return time.perf_counter()


def worker_startup_s(workers: int) -> float:
    """Wall seconds from creating a worker pool to its workers finishing a trivial job."""
    start = time.perf_counter()
    LocalExecutor(workers).map(_startup_probe, list(range(workers)), "startup")
    return time.perf_counter() - start


VARIANTS: dict[str, dict[str, Any]] = {
    "reference": {"kind": "reference", "loss": "lm", "batch": 50, "workers": 1,
                  "threads": None, "what": "paper-style loop: batch 50, LM loss, DataLoader, "
                  "per-step bookkeeping, per-epoch val pass, torch default threads, 1 process"},
    "reference-1t": {"kind": "reference", "loss": "lm", "batch": 50, "workers": 1,
                     "threads": 1, "what": "the same loop with 1 thread (separates thread "
                     "oversubscription from the loop itself)"},
    "pipeline": {"kind": "pipeline", "loss": "answer", "batch": 64, "workers": 2,
                 "threads": 1, "what": "ArithmeticRun.run_cells, 2 workers x 1 thread, "
                 "quick preset (answer loss, batch 64)"},
    "pipeline-lm": {"kind": "pipeline", "loss": "lm", "batch": 64, "workers": 2, "threads": 1,
                    "what": "as pipeline, with the paper's LM loss"},
    "single": {"kind": "pipeline", "loss": "answer", "batch": 64, "workers": 1, "threads": 1,
               "what": "ArithmeticRun.cell in one process, 1 thread (answer loss, batch 64)"},
    "pipeline-b256": {"kind": "pipeline", "loss": "answer", "batch": 256, "workers": 2,
                      "threads": 1, "what": "idea: as pipeline, batch 256"},
    "single-faithful": {"kind": "pipeline", "loss": "answer", "batch": 64, "workers": 1,
                        "threads": 1, "config": {"activation": "gelu_new",
                                                 "induction_fit": {"fused": False}},
                        "what": "idea: as single, with HF's 8-op gelu_new and unfused AdamW "
                        "(the defaults before the speed work)"},
    "single-eval3": {"kind": "pipeline", "loss": "answer", "batch": 64, "workers": 1,
                     "threads": 1, "config": {"induction_fit": {"eval_every": 3}},
                     "what": "idea: as single, `induction_fit.eval_every: 3` (validation every "
                     "3rd epoch and the last)"},
}


def run_variant(name: str, base: ArithmeticRun, args: argparse.Namespace, parent: str
                ) -> dict[str, Any]:
    spec = VARIANTS[name]
    cfg = sweep_config(args, spec)
    torch.set_num_threads(spec["threads"] or DEFAULT_THREADS)
    load_before = os.getloadavg()[0]
    cpu, start = cpu_seconds(), time.perf_counter()
    if spec["kind"] == "reference":
        budget = args.reference_budget if spec["threads"] is None else None
        rows, asked = reference_sweep(base, cfg, spec["batch"], budget)
    else:
        rows = pipeline_sweep(base, cfg, spec["workers"], parent)
        asked = len(rows)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return {"wall_s": wall, "cpu_s": cpu, "models": len(rows), "models_asked": asked,
            "threads": threads, "models_per_min": 60 * len(rows) / wall,
            "cpu_s_per_model": cpu / len(rows),
            "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)], "rows": rows}


# -- profiling ------------------------------------------------------------------------------------
def profile_steps(base: ArithmeticRun, args: argparse.Namespace, steps: int = 20
                  ) -> dict[str, str]:
    """torch.profiler tables (1 thread) of `steps` training steps of one `subnet` model (n=400):
    instill's `run_epoch` step (answer loss, batch 64) and the reference's (LM loss, batch 50,
    DataLoader), plus one evaluation pass of each."""
    from torch.profiler import ProfilerActivity, profile

    from instill.tasks.sequences import SequenceTask
    from instill.training import make_optimizer, run_epoch

    torch.set_num_threads(1)
    trained = base.base_model(LAYERS, REPLICATE, ATTEMPT)
    sub = base.subnetwork(LAYERS, REPLICATE, ATTEMPT, trained)
    cfg = sweep_config(args, VARIANTS["single"])
    splits = ArithmeticRun(cfg, base.run.root, log=lambda _: None).splits(REPLICATE, 0)
    train, val = splits.train_sequences(400), splits.val_sequences()
    task = SequenceTask(base.spec, "answer")
    tables = {}

    model = starting_model("subnet", trained, sub, 0)
    opt = make_optimizer(list(model.parameters()), cfg.induction_fit)
    gen = torch.Generator().manual_seed(0)
    per_epoch = -(-len(train) // 64)

    def instill_steps() -> None:
        for epoch in range(-(-steps // per_epoch)):
            run_epoch(model, [train], task.loss, opt, 64, gen, epoch)
        task.accuracy(model, val)

    ref = set_activation(starting_model("subnet", trained, sub, 0), "gelu_new")
    ref_epochs = -(-steps // -(-len(train) // 50))

    def reference_steps() -> None:
        reference_train(ref, train, val, ref_epochs, args.lr, 0.01, 50, 0)

    for name, fn, n_steps in (("instill run_epoch (answer, batch 64)", instill_steps,
                               -(-steps // per_epoch) * per_epoch),
                              ("reference (LM, batch 50, DataLoader)", reference_steps,
                               ref_epochs * -(-len(train) // 50))):
        fn()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
        tables[f"{name}: {n_steps} steps + 1 validation pass, {total:.0f} ms CPU, "
               f"{total / n_steps:.1f} ms/step"] = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=14)
    return tables


# -- report ---------------------------------------------------------------------------------------
def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians over rounds; accuracies of the last round."""
    out = {}
    for name, runs in results.items():
        acc: dict[str, list[float]] = defaultdict(list)
        for row in runs[-1]["rows"]:
            acc[row["condition"]].append(row["test_accuracy"])
        out[name] = {
            "models": [r["models"] for r in runs],
            "models_asked": runs[-1]["models_asked"],
            "threads": runs[-1]["threads"],
            "models_per_min": statistics.median(r["models_per_min"] for r in runs),
            "runs_models_per_min": [round(r["models_per_min"], 2) for r in runs],
            "cpu_s_per_model": statistics.median(r["cpu_s_per_model"] for r in runs),
            "wall_s": [round(r["wall_s"], 1) for r in runs],
            "load_1min": [r["load_1min"] for r in runs],
            "mean_test_accuracy": {c: statistics.fmean(v) for c, v in acc.items()},
        }
    return out


def print_report(facts: dict[str, Any], args: argparse.Namespace,
                 summary: dict[str, dict[str, Any]]) -> None:
    print("machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    asked = max(row["models_asked"] for row in summary.values())
    print(f"sweep: n in {args.n}, {args.seeds} seed(s), {len(CONDITIONS)} conditions "
          f"({', '.join(CONDITIONS)}) = {asked} models per variant, {args.epochs} epochs "
          f"each, lr {args.lr}, weight decay 0.01, GPT-2 2 layers x 64 dim, 200 numbers mod 7, "
          f"base model and subnetwork of pipeline L{LAYERS}-r{REPLICATE} attempt {ATTEMPT}; "
          f"{args.rounds} round(s), rotating order")
    for name in summary:
        print(f"  {name:<14} {VARIANTS[name]['what']}")
    ref = summary.get("reference", {}).get("models_per_min")
    header = (f"{'variant':<14} {'threads':>7} {'models':>9} {'models/min':>10} "
              f"{'x reference':>11} {'per round':>15} {'CPU s/model':>11} "
              f"{'wall s per round':>17} {'load 1min before->after':>24}")
    print(header)
    print("-" * len(header))
    for name, row in summary.items():
        ratio = f"{row['models_per_min'] / ref:.2f}" if ref else "-"
        loads = " ".join(f"{a:.1f}->{b:.1f}" for a, b in row["load_1min"])
        walls = " ".join(f"{w:.0f}" for w in row["wall_s"])
        done = "/".join(str(m) for m in row["models"])
        rounds = " ".join(f"{x:.1f}" for x in row["runs_models_per_min"])
        print(f"{name:<14} {row['threads']:>7} {done:>9} {row['models_per_min']:>10.2f} "
              f"{ratio:>11} {rounds:>15} {row['cpu_s_per_model']:>11.2f} {walls:>17} "
              f"{loads:>24}")
    if "worker_startup_s" in facts:
        print(f"(worker start-up: 2 spawned workers took {facts['worker_startup_s']} s to "
              "import torch/transformers/instill before any cell, measured once; every "
              "pipeline round pays it, a longer sweep amortizes it)")
    if any(min(row["models"]) < row["models_asked"] for row in summary.values()):
        print(f"(models below {asked}: the default-threads reference stopped after its "
              f"--reference-budget of {args.reference_budget:.0f} s; its rate is measured on the "
              "models it finished, drawn in a fixed shuffled order)")
    ratios = []
    if ref and "pipeline" in summary:
        speed = summary["pipeline"]["models_per_min"] / ref
        ratios.append(f"pipeline / reference: {speed:.2f}x (goal >= {args.goal:.0f}x: "
                      f"{'met' if speed >= args.goal else 'NOT met'})")
    ref1 = summary.get("reference-1t", {}).get("models_per_min")
    if ref1 and "pipeline" in summary:
        ratios.append(f"pipeline / reference-1t: "
                      f"{summary['pipeline']['models_per_min'] / ref1:.2f}x")
    if ref1 and ref:
        ratios.append(f"threads effect (reference-1t / reference): {ref1 / ref:.2f}x")
    single = summary.get("single", {}).get("models_per_min")
    if single and "pipeline" in summary:
        ratios.append("workers effect (pipeline / single): "
                      f"{summary['pipeline']['models_per_min'] / single:.2f}x")
    if single and ref1:
        ratios.append(f"per-step effect (single / reference-1t): {single / ref1:.2f}x")
    print()
    for line in ratios:
        print(line)
    print("\nmean test accuracy on the target (last round), per condition:")
    # every condition any variant trained (a budget-stopped reference may have only a few)
    conds = [c for c in CONDITIONS
             if any(c in row["mean_test_accuracy"] for row in summary.values())]
    print(f"{'variant':<14} {'models':>6} " + " ".join(f"{c:>10}" for c in conds))
    for name, row in summary.items():
        print(f"{name:<14} {row['models'][-1]:>6} "
              + " ".join(f"{row['mean_test_accuracy'].get(c, float('nan')):>10.3f}"
                         for c in conds))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer cells and epochs, one round, no idea rows")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    parser.add_argument("--n", type=int, nargs="+", help="disambiguation counts (default "
                        "0 100 400 1000; quick 0 400)")
    parser.add_argument("--seeds", type=int, help="seeds per n (default 1)")
    parser.add_argument("--epochs", type=int, help="epochs per model (default 6, quick 4)")
    parser.add_argument("--lr", type=float, default=1e-3, help="the quick preset's 1e-3")
    parser.add_argument("--rounds", type=int, help="rounds (default 2, quick 1)")
    parser.add_argument("--cache-dir", default=os.path.join(
        os.environ.get("TMPDIR", "/tmp"), "instill-bench"))
    parser.add_argument("--goal", type=float, default=5.0)
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler "
                        "summaries of 20 training steps of the pipeline and of the reference")
    parser.add_argument("--reference-budget", type=float, help="seconds the default-threads "
                        "reference may run before it stops (default 120, quick 60); on a busy "
                        "machine torch's threads oversubscribe the CPUs and it crawls")
    args = parser.parse_args(argv)
    core = [v for v in VARIANTS if not VARIANTS[v]["what"].startswith("idea")]
    defaults = {"n": ([0, 100, 400, 1000], [0, 400]), "seeds": (1, 1), "epochs": (6, 4),
                "rounds": (2, 1), "reference_budget": (120.0, 60.0),
                "variants": (list(VARIANTS), core)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    facts = machine_facts(torch_default_threads=DEFAULT_THREADS)
    started = time.perf_counter()
    os.makedirs(args.cache_dir, exist_ok=True)
    base = prepared_run(args.cache_dir)
    print(f"base model and subnetwork: {base.run.root} (cached)", file=sys.stderr)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in args.variants}
    if any(VARIANTS[name]["workers"] > 1 for name in args.variants):
        facts["worker_startup_s"] = round(worker_startup_s(2), 1)
    with tempfile.TemporaryDirectory(prefix="instill-sweep-", dir=args.cache_dir) as parent:
        for r in range(args.rounds):
            shift = r % len(args.variants)
            for name in args.variants[shift:] + args.variants[:shift]:
                print(f"[{time.perf_counter() - started:6.1f}s] round {r + 1}/{args.rounds}: "
                      f"{name}", file=sys.stderr, flush=True)
                results[name].append(run_variant(name, base, args, parent))
    summary = summarize(results)
    facts["load_average_end"] = load_average()
    facts["wall_s"] = round(time.perf_counter() - started, 1)
    print_report(facts, args, summary)
    if args.profile:
        for title, table in profile_steps(base, args).items():
            print(f"\ntorch.profiler, 1 thread, {title}:")
            print(table)
    if args.json:
        settings = {k: getattr(args, k) for k in ("quick", "n", "seeds", "epochs", "lr",
                                                  "rounds", "variants")}
        settings["conditions"] = CONDITIONS
        with open(args.json, "w") as fh:
            json.dump({"machine": facts, "settings": settings, "summary": summary,
                       "runs": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
