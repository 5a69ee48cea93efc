"""Models trained per minute: K same-shape models in one `fit_batched` vs one `fit` at a time.

Two workloads at the quick presets' sizes, each model a transplant (a random mask of density
0.4 over the default mask targets of one base model, fresh weights seeded per model: an
induction sweep's `sampled` condition; `--plain` trains fresh plain models instead), with its
own data, data order and seed, fused AdamW and a validation pass after every epoch:

* ``gpt2``: the arithmetic quick preset's GPT-2 (2 layers, 64 dim, 4 heads, vocabulary
  `ArithmeticSpec(200, 7).vocab_size`, dropout 0.1, `gelu_pytorch_tanh`, answer loss) on
  640 `a^2 + a*b` sequences, batch 64, lr 1e-3, validation accuracy on 500;
* ``resnet``: the shape-bias quick preset's ResNet (16, [16, 32, 64], [1, 1, 1]) on 256 random
  3x32x32 images of 8 classes, batch 32, lr 2e-3, validation accuracy on 200;
* ``paper-L2`` and ``paper-L12``: the paper preset's GPT-2 (1000 numbers, 128 dim, 4 heads,
  dropout 0.1, whole-sequence `lm` loss) at depths 2 and 12 on 1100 sequences (the 1000
  ambiguous pairs plus n = 100), batch 50, lr 2e-4, counter-based dropout (so both ways draw
  the same masks), validation on 1000: an induction cell of the paper preset.

`--device cuda` builds models and data on the GPU and synchronizes before reading the clock.

Per round and workload, `--baseline` models train one at a time with `fit`, then K models with
`fit_batched` for each `--k`, the order alternating between rounds. Only training is timed
(models are built before). Rates are medians over rounds, in wall clock and in this process's
CPU time (steadier on a shared machine); ratios are against the one-at-a-time rate measured in
the same run. Default: about a minute on 2 CPUs.

    .venv/bin/python benchmarks/batched.py [--archs gpt2 resnet] [--k 1 4 16] [--rounds 2]
        [--epochs 3] [--threads 1] [--plain] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from machine import load_average, machine_facts
from torch import Tensor, nn

from instill.batched import fit_batched
from instill.core import Subnetwork, transplant
from instill.core.targets import select_parameters
from instill.models import build_model
from instill.tasks.arithmetic import ArithmeticSpec, make_sequences, sample_pairs
from instill.tasks.expr import parse
from instill.tasks.sequences import SequenceTask
from instill.training import FitConfig, fit


@dataclass
class Workload:
    """How to build one model and its data, the loss, the score and the schedule."""

    build: Callable[[], nn.Module]
    data: Callable[..., list[Tensor]]
    loss: Callable[[nn.Module, Any], Tensor]
    score: Callable[[nn.Module], float]
    cfg: FitConfig


def gpt2_workload(epochs: int) -> Workload:
    spec = ArithmeticSpec(numbers=200, modulus=7)
    task, target = SequenceTask(spec, "answer"), parse("a^2 + a*b")

    def data(seed: int, n: int = 640) -> list[Tensor]:
        a, b = sample_pairs(n, spec, torch.Generator().manual_seed(seed))
        return [make_sequences(a, b, target, spec)]

    val = data(10_000, 500)[0]
    return Workload(
        lambda: build_model("gpt2", vocab_size=spec.vocab_size, n_positions=4, n_embd=64,
                            n_layer=2, n_head=4, dropout=0.1, activation="gelu_pytorch_tanh"),
        data, task.loss, lambda m: task.accuracy(m, val),
        FitConfig(epochs=epochs, batch_size=64, lr=1e-3, weight_decay=0.01, fused=True))


def paper_workload(epochs: int, layers: int, device: str) -> Workload:
    spec = ArithmeticSpec(numbers=1000, modulus=7)
    task, target = SequenceTask(spec, "lm"), parse("a^2 + a*b")

    def data(seed: int, n: int = 1100) -> list[Tensor]:
        a, b = sample_pairs(n, spec, torch.Generator().manual_seed(seed))
        return [make_sequences(a, b, target, spec).to(device)]

    val = data(10_000, 1000)[0]
    return Workload(
        lambda: build_model("gpt2", vocab_size=spec.vocab_size, n_positions=4, n_embd=128,
                            n_layer=layers, n_head=4, dropout=0.1,
                            activation="gelu_pytorch_tanh").to(device),
        data, task.loss, lambda m: task.accuracy(m, val),
        FitConfig(epochs=epochs, batch_size=50, lr=2e-4, weight_decay=0.01, fused=True,
                  dropout_rng="counter"))


def resnet_workload(epochs: int) -> Workload:
    def data(seed: int, n: int = 256) -> list[Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return [torch.rand(n, 3, 32, 32, generator=gen), torch.randint(0, 8, (n,), generator=gen)]

    def loss(model: nn.Module, batch) -> Tensor:
        return F.cross_entropy(model(pixel_values=batch[0]).logits, batch[1])

    val = data(10_000, 200)

    @torch.no_grad()
    def score(model: nn.Module) -> float:
        return (model(pixel_values=val[0]).logits.argmax(-1) == val[1]).float().mean().item()

    return Workload(
        lambda: build_model("resnet", num_labels=8, embedding_size=16, hidden_sizes=(16, 32, 64),
                            depths=(1, 1, 1)),
        data, loss, score,
        FitConfig(epochs=epochs, batch_size=32, lr=2e-3, weight_decay=0.01, fused=True))


def starting_models(work: Workload, count: int, first_seed: int, plain: bool
                    ) -> list[nn.Module]:
    """`count` models: transplants of one base model under random masks, or fresh ones."""
    torch.manual_seed(0)
    base = work.build()
    sites = select_parameters(base, None, None, False)
    params, shapes = dict(base.named_parameters()), {n: tuple(p.shape) for n, p in
                                                     base.named_parameters()}
    models = []
    for seed in range(first_seed, first_seed + count):
        torch.manual_seed(seed)
        if plain:
            models.append(work.build())
            continue
        gen = torch.Generator().manual_seed(seed)
        sub = Subnetwork({n: torch.rand(params[n].shape, generator=gen) < 0.4 for n in sites},
                         shapes)
        models.append(transplant(base, sub, seed=seed))
    return models


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds of `fn()` (after the GPU, if any, has finished its work)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def one_at_a_time(work: Workload, count: int, plain: bool) -> tuple[float, float]:
    models = starting_models(work, count, 100, plain)
    datas = [work.data(100 + k) for k in range(count)]

    def run() -> None:
        for k, model in enumerate(models):
            torch.manual_seed(k)
            fit(model, datas[k], work.loss, work.cfg, evaluate=work.score, seed=k)

    return timed(run)


def batched(work: Workload, k: int, plain: bool) -> tuple[float, float]:
    models = starting_models(work, k, 100, plain)
    datas = [work.data(100 + i) for i in range(k)]
    torch.manual_seed(0)
    return timed(lambda: fit_batched(models, datas, work.loss, work.cfg, seeds=list(range(k)),
                                     evaluate=[work.score] * k))


def measure(arch: str, work: Workload, ks: list[int], baseline: int, rounds: int,
            plain: bool) -> list[dict[str, Any]]:
    runs: dict[str, list[tuple[float, float, int]]] = {"one at a time": []}
    runs.update({f"batched K={k}": [] for k in ks})
    jobs: list[tuple[str, Callable[[], tuple[float, float]], int]] = [
        ("one at a time", lambda: one_at_a_time(work, baseline, plain), baseline)]
    jobs += [(f"batched K={k}", lambda k=k: batched(work, k, plain), k) for k in ks]
    for r in range(rounds):
        for name, job, count in jobs if r % 2 == 0 else jobs[::-1]:
            wall, cpu = job()
            runs[name].append((wall, cpu, count))
            print(f"  [{arch} round {r}] {name:<14} {count} models in {wall:6.2f} s wall, "
                  f"{cpu:6.2f} s CPU", flush=True)
    rows = []
    for name, got in runs.items():
        wall_rate = statistics.median(60 * c / w for w, _, c in got)
        cpu_rate = statistics.median(60 * c / u for _, u, c in got)
        rows.append({"arch": arch, "mode": name, "models": got[0][2],
                     "models_per_min": round(wall_rate, 2),
                     "models_per_cpu_min": round(cpu_rate, 2),
                     "runs_wall_s": [round(w, 3) for w, _, _ in got],
                     "runs_cpu_s": [round(u, 3) for _, u, _ in got]})
    base = rows[0]
    for row in rows:
        row["x_wall"] = round(row["models_per_min"] / base["models_per_min"], 3)
        row["x_cpu"] = round(row["models_per_cpu_min"] / base["models_per_cpu_min"], 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["gpt2", "resnet"],
                        choices=["gpt2", "resnet", "paper-L2", "paper-L12"])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--baseline", type=int, default=8,
                        help="models trained one at a time per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plain", action="store_true", help="fresh plain models, no masks")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (paper workloads only)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    facts = machine_facts(threads=args.threads)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()))
    builders = {"gpt2": gpt2_workload, "resnet": resnet_workload,
                "paper-L2": lambda e: paper_workload(e, 2, args.device),
                "paper-L12": lambda e: paper_workload(e, 12, args.device)}
    rows = []
    for arch in args.archs:
        rows += measure(arch, builders[arch](args.epochs), args.k, args.baseline, args.rounds,
                        args.plain)
    kind = "plain models" if args.plain else "transplants"
    print(f"\n{kind}, {args.epochs} epochs, {args.threads} thread(s); median of {args.rounds} "
          "rounds; x = rate / one-at-a-time rate")
    print(f"{'arch':<9} {'mode':<14} {'models/min':>10} {'x wall':>7} {'models/CPU min':>15} "
          f"{'x CPU':>6}")
    for row in rows:
        print(f"{row['arch']:<9} {row['mode']:<14} {row['models_per_min']:>10.1f} "
              f"{row['x_wall']:>7.2f} {row['models_per_cpu_min']:>15.1f} {row['x_cpu']:>6.2f}")
    print(f"load average at the end {load_average()}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": facts, "args": vars(args), "rows": rows,
             "load_average_end": load_average()}, indent=2))


if __name__ == "__main__":
    main()
