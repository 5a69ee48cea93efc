"""Cost of one training step with masks versus training the targeted weights directly.

For each model (the arithmetic GPT-2, a small ResNet, a small ViT) three variants run one full
training step (zero_grad, forward, loss, backward, AdamW step) on the same batch, in the same
process, with the same thread count:

* ``direct``: the plain model training exactly the weights that get masks (the default
  targets); only those require grad and AdamW holds only those;
* ``masked``: ``attach_masks`` with continuous sparsification, training only the mask logits
  on ``loss + l0_penalty()`` (AdamW over ``mask_parameters()``);
* ``all``: the plain model training every parameter (a reference row).

Every variant runs its base model in eval mode (dropout off, batch-norm statistics frozen), as
``MaskedModel`` does, so the three compute the same network. Timings are interleaved: each round
runs a block of steps of every variant, the order rotating from round to round, so background
load hits all of them alike; the table gives the median over all timed steps.

Memory: on CUDA the peak allocated during one step, above what is allocated before it; on the
CPU the bytes of the tensors autograd saves for backward during one forward (unique storages,
leaving out parameters and buffers), reported as the "activation memory ratio".

    .venv/bin/python benchmarks/mask_overhead.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from machine import load_average
from torch import Tensor, nn

import instill
from instill.core.targets import select_parameters
from instill.models import build_model, logits_of

Batch = dict[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]


@dataclass
class Spec:
    """One model of the benchmark: how to build it, a batch, and its task loss."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device], Batch]
    loss: LossFn
    shape: str


def _gpt2_batch(device: torch.device) -> Batch:
    return {"input_ids": torch.randint(0, 1001, (500, 4), device=device)}


def _lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Causal LM loss from the logits (never the model's own `.loss`)."""
    ids = batch["input_ids"]
    logits = logits_of(model(input_ids=ids))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _image_batch(device: torch.device) -> Batch:
    return {"pixel_values": torch.randn(64, 3, 32, 32, device=device),
            "labels": torch.randint(0, 8, (64,), device=device)}


def _cls_loss(model: nn.Module, batch: Batch) -> Tensor:
    logits = logits_of(model(pixel_values=batch["pixel_values"]))
    return F.cross_entropy(logits, batch["labels"])


SPECS = [
    Spec("gpt2", lambda: build_model("gpt2", vocab_size=1001, n_positions=8, n_embd=128,
                                     n_layer=2, n_head=4),
         _gpt2_batch, _lm_loss, "batch 500 x 4 tokens, vocab 1001, 2 layers, 128 dim"),
    Spec("resnet", lambda: build_model("resnet", num_labels=8),
         _image_batch, _cls_loss, "batch 64 x 3x32x32, 8 classes, hidden (16, 32, 64)"),
    Spec("vit", lambda: build_model("vit", num_labels=8, image_size=32, patch_size=4,
                                    hidden_size=64, num_hidden_layers=4),
         _image_batch, _cls_loss, "batch 64 x 3x32x32, patch 4, hidden 64, 4 layers"),
]

@dataclass
class Variant:
    """A model, its optimizer and its loss; `step()` is one full training step."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    loss: Callable[[Batch], Tensor]
    trainable: int
    owned: set[int] = field(default_factory=set)  # storages of parameters and buffers
    times: list[float] = field(default_factory=list)  # wall-clock seconds per step
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds per step

    def step(self, batch: Batch) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss(batch).backward()
        self.opt.step()


def _storages(module: nn.Module) -> set[int]:
    tensors = [*module.parameters(), *module.buffers()]
    return {t.untyped_storage().data_ptr() for t in tensors}


def make_variants(spec: Spec, device: torch.device, lr: float) -> dict[str, Variant]:
    torch.manual_seed(0)
    base = spec.build().to(device).eval()
    cfg = instill.MaskConfig()  # default targets, continuous sparsification
    sites = select_parameters(base, cfg.targets, cfg.exclude, cfg.mask_bias)
    variants = {}

    direct = copy.deepcopy(base)
    targeted = []
    for param in direct.parameters():
        param.requires_grad_(False)
    for where in sites.values():
        param = getattr(direct.get_submodule(where[0].module_name), where[0].attr)
        param.requires_grad_(True)
        targeted.append(param)
    variants["direct"] = Variant(
        "direct", direct, torch.optim.AdamW(targeted, lr=lr, weight_decay=0.0),
        lambda b, m=direct: spec.loss(m, b), sum(p.numel() for p in targeted), _storages(direct))

    masked = instill.attach_masks(copy.deepcopy(base), cfg)
    mask_groups = masked.mask_parameters()
    n_mask = sum(p.numel() for g in mask_groups for p in g["params"])
    if sorted(masked.sites) != sorted(sites) or n_mask != variants["direct"].trainable:
        raise RuntimeError(f"{spec.name}: masked and direct variants train different tensors")
    variants["masked"] = Variant(
        "masked", masked, torch.optim.AdamW(mask_groups, lr=lr),
        lambda b, m=masked: spec.loss(m, b) + m.l0_penalty(), n_mask, _storages(masked))

    full = copy.deepcopy(base)
    for param in full.parameters():
        param.requires_grad_(True)
    variants["all"] = Variant(
        "all", full, torch.optim.AdamW(full.parameters(), lr=lr, weight_decay=0.0),
        lambda b, m=full: spec.loss(m, b), sum(p.numel() for p in full.parameters()),
        _storages(full))
    return variants


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_bytes(variant: Variant, batch: Batch) -> int:
    """Bytes of the unique storages autograd saves for backward in one forward (+ penalty),
    parameters and buffers left out (they exist whether or not anything is saved)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in variant.owned and storage.nbytes() > 0:
            seen[ptr] = storage.nbytes()
        return t

    variant.opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = variant.loss(batch)
    loss.backward()
    variant.opt.zero_grad(set_to_none=True)
    return sum(seen.values())


def peak_step_bytes(variant: Variant, batch: Batch, device: torch.device) -> int | None:
    """CUDA only: peak memory allocated during one step, above what was allocated before."""
    if device.type != "cuda":
        return None
    variant.opt.zero_grad(set_to_none=True)
    gc.collect()
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    variant.step(batch)
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def time_variants(variants: dict[str, Variant], batch: Batch, device: torch.device,
                  warmup: int, rounds: int, block: int) -> None:
    for variant in variants.values():  # warm-up, also creates AdamW state
        for _ in range(warmup):
            variant.step(batch)
        _sync(device)
    order = list(variants.values())
    for r in range(rounds):
        rotated = order[r % len(order):] + order[:r % len(order)]
        for variant in rotated:
            gc.collect()
            for _ in range(block):
                _sync(device)
                cpu, start = time.process_time(), time.perf_counter()
                variant.step(batch)
                _sync(device)
                variant.times.append(time.perf_counter() - start)
                variant.cpu_times.append(time.process_time() - cpu)


def cpu_snapshot() -> tuple[float, float, float, float]:
    """(wall, CPU seconds busy on the whole machine, of which steal, this process's CPU seconds);
    the machine-wide numbers are NaN where /proc/stat is unavailable."""
    busy = steal = float("nan")
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        # user nice system idle iowait irq softirq steal ...
        busy = (sum(fields[:3]) + sum(fields[5:8])) / hz
        steal = fields[7] / hz if len(fields) > 7 else 0.0
    except (OSError, ValueError, IndexError):
        pass
    own = sum(os.times()[:2])  # user + system CPU of this process, all threads
    return time.perf_counter(), busy, steal, own


def other_load(before: tuple[float, ...], after: tuple[float, ...]) -> dict[str, float | None]:
    """Average number of CPUs that other processes (and the hypervisor's steal) kept busy;
    None where the machine-wide counters are unavailable."""
    wall = after[0] - before[0]
    others = ((after[1] - before[1]) - (after[3] - before[3])) / wall
    steal = (after[2] - before[2]) / wall
    if others != others:  # NaN: no /proc/stat
        return {"other_cpus_busy": None, "steal_cpus": None}
    return {"other_cpus_busy": round(max(others, 0.0), 2), "steal_cpus": round(steal, 2)}


def quantile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[round(q * 100) - 1]


def bench_model(spec: Spec, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    variants = make_variants(spec, device, lr=1e-3)
    torch.manual_seed(1)
    batch = spec.batch(device)
    mem = {name: saved_bytes(v, batch) for name, v in variants.items()}
    peak = {name: peak_step_bytes(v, batch, device) for name, v in variants.items()}
    before = cpu_snapshot()
    time_variants(variants, batch, device, args.warmup, args.rounds, args.block)
    load = other_load(before, cpu_snapshot())
    rows = {}
    for name, v in variants.items():
        rows[name] = {
            "trainable_params": v.trainable,
            "median_ms": statistics.median(v.times) * 1e3,
            "p25_ms": quantile(v.times, 0.25) * 1e3,
            "p75_ms": quantile(v.times, 0.75) * 1e3,
            "cpu_median_ms": statistics.median(v.cpu_times) * 1e3,
            "steps_timed": len(v.times),
            "saved_activation_bytes": mem[name],
            "peak_step_bytes": peak[name],
        }
    ms = {name: row["median_ms"] for name, row in rows.items()}
    cpu = {name: row["cpu_median_ms"] for name, row in rows.items()}
    result = {
        "model": spec.name,
        "shape": spec.shape,
        "masks": len(variants["masked"].model.masks),
        "variants": rows,
        "masked_over_direct": ms["masked"] / ms["direct"],
        "masked_over_all": ms["masked"] / ms["all"],
        "cpu_masked_over_direct": cpu["masked"] / cpu["direct"],
        "activation_memory_ratio": mem["masked"] / mem["direct"],
        **load,
    }
    if device.type == "cuda":
        result["peak_memory_ratio"] = peak["masked"] / peak["direct"]
    return result


def machine_facts(device: torch.device) -> dict[str, Any]:
    facts = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        facts["load_average"] = load_average()
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def print_report(facts: dict[str, Any], results: list[dict[str, Any]], goal: float) -> None:
    print("machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    header = (f"{'model':<7} {'variant':<7} {'trainable':>10} {'ms/step':>9} {'p25-p75 ms':>15}"
              f" {'x direct':>9} {'cpu ms':>8} {'saved MB':>9}")
    peak = any(r.get("peak_memory_ratio") is not None for r in results)
    if peak:
        header += f" {'peak MB':>9}"
    print(header)
    print("-" * len(header))
    for res in results:
        direct = res["variants"]["direct"]["median_ms"]
        for name, row in res["variants"].items():
            line = (f"{res['model']:<7} {name:<7} {row['trainable_params']:>10,} "
                    f"{row['median_ms']:>9.2f} {row['p25_ms']:>7.2f}-{row['p75_ms']:<7.2f}"
                    f" {row['median_ms'] / direct:>9.3f} {row['cpu_median_ms']:>8.2f}"
                    f" {row['saved_activation_bytes'] / 2**20:>9.2f}")
            if peak:
                line += f" {row['peak_step_bytes'] / 2**20:>9.2f}"
            print(line)
    print()
    print(f"{'model':<7} {'masks':>5} {'masked/direct':>14} {'(cpu time)':>11} "
          f"{'masked/all':>11} {'activation mem ratio':>21}"
          + (f" {'peak mem ratio':>15}" if peak else "") + f" {'busy CPUs (others)':>19}")
    for res in results:
        verdict = "ok" if res["masked_over_direct"] <= goal else f"ABOVE {goal:.2f}"
        line = (f"{res['model']:<7} {res['masks']:>5} {res['masked_over_direct']:>14.3f} "
                f"{res['cpu_masked_over_direct']:>11.3f} {res['masked_over_all']:>11.3f} "
                f"{res['activation_memory_ratio']:>21.3f}")
        if peak:
            line += f" {res['peak_memory_ratio']:>15.3f}"
        busy = res["other_cpus_busy"]
        line += f" {busy:>19.2f}" if busy is not None else f" {'n/a':>19}"
        print(f"{line}  {verdict}")
    busy = max((res["other_cpus_busy"] or 0.0) for res in results)
    if busy > 0.25:
        hint = "" if facts["torch_threads"] == 1 else (
            f" With {facts['torch_threads']} torch threads on {facts['cpu_count']} CPUs the "
            "threads get preempted (a step can become many times slower); --threads 1 suffers "
            "less.")
        print(f"\nWARNING: other processes kept {busy:.2f} CPUs busy on average while timing; "
              f"wall-clock times are inflated and the ratios noisy; rerun on an idle machine."
              f"{hint}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (< 1 minute)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    parser.add_argument("--models", nargs="+", choices=[s.name for s in SPECS],
                        default=[s.name for s in SPECS])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 20, quick 4)")
    parser.add_argument("--block", type=int, help="steps per variant per round (default 4, "
                        "quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant (default 5, "
                        "quick 2)")
    parser.add_argument("--goal", type=float, default=1.10, help="target masked/direct ratio")
    args = parser.parse_args(argv)
    quick = {"rounds": 4, "block": 2, "warmup": 2}
    full = {"rounds": 20, "block": 4, "warmup": 5}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    facts = machine_facts(device)
    results = []
    started = time.perf_counter()
    for spec in SPECS:
        if spec.name in args.models:
            print(f"[{time.perf_counter() - started:6.1f}s] {spec.name}: {spec.shape}",
                  file=sys.stderr, flush=True)
            results.append(bench_model(spec, device, args))
    facts["wall_s"] = round(time.perf_counter() - started, 1)
    print_report(facts, results, args.goal)
    if args.json:
        settings = {k: getattr(args, k) for k in ("quick", "rounds", "block", "warmup")}
        with open(args.json, "w") as fh:
            json.dump({"machine": facts, "settings": settings, "results": results}, fh,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
