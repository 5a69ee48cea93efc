"""Subnetwork discovery with instill's `discover` versus NeuroSurgeon 0.1.0 (the paper's code).

Both run the SAME continuous-sparsification mask discovery on the SAME trained arithmetic GPT-2
(a base model trained on `a + a*b` mod 7 with instill's `fit`: replicate 0, attempt 0 of the
quick preset's pipeline at depth 2, `ArithmeticRun.base_phase`, cached under --cache-dir):

* targets: every `c_attn` / `c_proj` / `c_fc` weight (attention and MLP matrices, HF Conv1D),
  weights only (no bias masks), one logit per weight, initialised to -0.1;
* soft mask `sigmoid(T * s)` while training, hard mask `s > 0` for evaluation;
* penalty `l0_lambda * sum(sigmoid(T * s))` added to the task loss;
* temperature 1 at the start, multiplied by `final_temp ** (1 / epochs)` after every epoch;
* AdamW over the mask logits only, lr 1e-3, weight decay 0 (the default of `discover`; torch's
  AdamW default of 0.01 is passed explicitly as 0 to NeuroSurgeon's optimizer);
* data: the subtask `a*b` mod 7, the same tensors and the same shuffled batch order (index
  permutations from one seeded generator, batch 500), the same loss: the causal LM loss over the
  whole sequence (the paper's; NeuroSurgeon adds its penalty to the HF `labels` loss as designed)
  or, with `--loss answer`, cross-entropy on the answer token only.

Each side is timed end to end (wrapping the model, every epoch, unwrapping / reading the hard
mask), in the same process, alternating which goes first, `--rounds` times; the table gives the
median wall and CPU seconds. Then the subtask accuracy of the hard subnetwork (eval mode) on
held-out pairs, its density, and the agreement of the two masks.

    .venv/bin/python benchmarks/vs_neurosurgeon.py [--quick] [--json OUT] [--profile]

NeuroSurgeon is an optional benchmark extra: `pip install -e .[bench]`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from machine import load_average, machine_facts
from torch import Tensor, nn

from instill.core import MaskConfig, Subnetwork, apply_subnetwork
from instill.experiments.arithmetic import ArithmeticRun, load_config
from instill.models import logits_of, set_activation
from instill.runio import to_dict
from instill.tasks.sequences import SequenceTask
from instill.training import DiscoveryConfig, discover

TARGET_RE = r".*\.(c_attn|c_proj|c_fc)"
LAYERS = 2
REPLICATE, ATTEMPT = 0, 0  # the pipeline whose base model both implementations mask


# -- the base model -------------------------------------------------------------------------------
def base_run(cache_dir: str, base_loss: str) -> ArithmeticRun:
    """The quick preset's arithmetic setup (200 numbers, 2 layers, 64 dim); its base model
    (replicate 0, attempt 0) is trained once with instill's `fit` and cached in a run directory
    keyed by the config."""
    cfg = load_config("quick", overrides={"loss": base_loss, "layers": [LAYERS]})
    key = hashlib.sha1(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:10]
    return ArithmeticRun(cfg, os.path.join(cache_dir, f"arith-base-{key}"),
                         log=lambda msg: print(msg, file=sys.stderr))


# -- the two implementations ----------------------------------------------------------------------
def run_instill(model: nn.Module, data: Tensor, task: SequenceTask, dcfg: DiscoveryConfig,
                seed: int) -> tuple[Subnetwork, float, float]:
    cpu, start = time.process_time(), time.perf_counter()
    sub, _ = discover(model, [data], task.loss, dcfg, seed=seed, desc="instill discover")
    return sub, time.perf_counter() - start, time.process_time() - cpu


def run_neurosurgeon(model: nn.Module, data: Tensor, loss: str, dcfg: DiscoveryConfig,
                     seed: int) -> tuple[nn.Module, float, float]:
    """The paper's way: wrap with CircuitModel, train the mask parameters, anneal temperature
    once per epoch. `model` is modified in place (NeuroSurgeon swaps the layers)."""
    from NeuroSurgeon.Models.circuit_model import CircuitModel
    from NeuroSurgeon.Models.model_configs import CircuitConfig

    cpu, start = time.process_time(), time.perf_counter()
    targets = [name for name, _ in model.named_modules()
               if name.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc")]
    config = CircuitConfig(
        mask_method="continuous_sparsification",
        mask_hparams={"ablation": "none", "mask_unit": "weight", "mask_bias": False,
                      "mask_init_value": dcfg.mask.init},
        target_layers=targets, freeze_base=True, add_l0=True, l0_lambda=dcfg.mask.l0_lambda)
    circuit = CircuitModel(config, model)
    params = [p for name, p in circuit.named_parameters() if "mask_params" in name]
    optimizer = torch.optim.AdamW(params, lr=dcfg.lr, weight_decay=dcfg.mask.weight_decay)
    growth = dcfg.final_temperature ** (1.0 / dcfg.epochs)
    generator = torch.Generator().manual_seed(seed)
    for _epoch in range(dcfg.epochs):
        circuit.train()
        for idx in torch.randperm(len(data), generator=generator).split(dcfg.batch_size):
            batch = data[idx]
            if loss == "lm":  # HF causal LM loss; CircuitModel adds lambda * L0 to it
                out = circuit(input_ids=batch, labels=batch).loss
            else:
                logits = circuit(input_ids=batch[:, :3]).logits[:, -1]
                out = (F.cross_entropy(logits.float(), batch[:, 3])
                       + config.l0_lambda * circuit._compute_l0_loss())
            optimizer.zero_grad(set_to_none=True)
            out.backward()
            optimizer.step()
        circuit.temperature = circuit.temperature * growth
    circuit.eval()
    return circuit, time.perf_counter() - start, time.process_time() - cpu


def paper_model(model: nn.Module, activation: str) -> nn.Module:
    """A copy of `model` for NeuroSurgeon, with GPT-2's MLP activation set to `activation`:
    HF's default `gelu_new` (8 ops) as the paper ran it, or the same fused kernel as instill."""
    return set_activation(copy.deepcopy(model), activation)


def neurosurgeon_masks(circuit: nn.Module) -> dict[str, Tensor]:
    """NeuroSurgeon's hard masks, named like instill's (`...c_attn.weight`)."""
    return {name.removeprefix("wrapped_model.").replace("weight_mask_params", "weight"):
            (p.detach() > 0) for name, p in circuit.named_parameters()
            if name.endswith("weight_mask_params")}


class _Logits(nn.Module):
    """Calls a CircuitModel the way instill's task calls a model (keyword arguments only)."""

    def __init__(self, circuit: nn.Module) -> None:
        super().__init__()
        self.circuit = circuit

    def forward(self, **kwargs: Any) -> Tensor:
        return logits_of(self.circuit(**kwargs))


# -- profiling -----------------------------------------------------------------------------------
def profile_steps(model: nn.Module, data: Tensor, task: SequenceTask, dcfg: DiscoveryConfig,
                  activation: str, steps: int = 10) -> dict[str, str]:
    """torch.profiler tables (top ops by self CPU time) for `steps` training steps of each."""
    from torch.profiler import ProfilerActivity, profile

    from instill.core import attach_masks

    batch = data[: dcfg.batch_size]
    out = {}
    masked = attach_masks(copy.deepcopy(model), dcfg.mask)
    masked.temperature = 5.0
    opt = torch.optim.AdamW(masked.mask_parameters(), lr=dcfg.lr, fused=dcfg.fused)

    def instill_step() -> None:
        loss = task.loss(masked, [batch]) + masked.l0_penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    circuit, _, _ = run_neurosurgeon(paper_model(model, activation), data[: dcfg.batch_size],
                                     task.loss_kind,
                                     DiscoveryConfig(epochs=1, batch_size=dcfg.batch_size,
                                                     lr=dcfg.lr, mask=dcfg.mask), seed=0)
    circuit.train()
    params = [p for name, p in circuit.named_parameters() if "mask_params" in name]
    ns_opt = torch.optim.AdamW(params, lr=dcfg.lr, weight_decay=0.0)

    def ns_step() -> None:
        loss = circuit(input_ids=batch, labels=batch).loss
        ns_opt.zero_grad(set_to_none=True)
        loss.backward()
        ns_opt.step()

    for name, step in (("instill", instill_step), ("neurosurgeon", ns_step)):
        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        out[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return out


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs, samples, rounds")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1)")
    parser.add_argument("--rounds", type=int, help="timed runs of each (default 3, quick 2)")
    parser.add_argument("--epochs", type=int, help="discovery epochs (default 20, quick 10)")
    parser.add_argument("--samples", type=int, help="subtask training pairs (default 10000)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--l0-lambda", type=float, default=1e-7)
    parser.add_argument("--init", type=float, default=-0.1)
    parser.add_argument("--final-temp", type=float, default=100.0)
    parser.add_argument("--loss", choices=["lm", "answer"], default="lm",
                        help="discovery loss: lm (the paper's, default) or answer")
    parser.add_argument("--base-loss", choices=["lm", "answer"], default="answer",
                        help="loss the cached base model is trained with (default: the quick "
                        "preset's answer loss, which learns a + a*b mod 7 quickly)")
    parser.add_argument("--cache-dir", default=os.path.join(
        os.environ.get("TMPDIR", "/tmp"), "instill-bench"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler summaries of 10 steps of each")
    parser.add_argument("--goal", type=float, default=3.0, help="target speed-up")
    parser.add_argument("--ns-activation", choices=["gelu_new", "gelu_pytorch_tanh"],
                        default="gelu_new", help="NeuroSurgeon's GPT-2 MLP activation: HF's "
                        "default gelu_new as the paper ran it (default), or instill's fused "
                        "kernel of the same function (isolates the mask implementations)")
    args = parser.parse_args(argv)
    for key, full, quick in (("rounds", 3, 2), ("epochs", 20, 10), ("samples", 10_000, 10_000)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import NeuroSurgeon
    except ImportError:
        print("NeuroSurgeon is not installed; `pip install -e .[bench]` (NeuroSurgeon==0.1.0)")
        return 2
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    run = base_run(args.cache_dir, args.base_loss)
    info = run.base_phase(LAYERS, REPLICATE, ATTEMPT)
    print(f"base model: {run.run.root} (trained once, then cached; held-out test accuracy "
          f"{info['test_accuracy']:.3f})", file=sys.stderr)
    model = run.base_model(LAYERS, REPLICATE, ATTEMPT).eval()
    task = SequenceTask(run.spec, args.loss)
    data = run.sequences("subtask", args.samples, args.seed + 11)
    test = run.sequences("subtask", 2000, args.seed + 12)
    base_acc = {"subtask": run.task.accuracy(model, test),
                "base": run.task.accuracy(model, run.sequences("base", 2000, args.seed + 13))}
    dcfg = DiscoveryConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           final_temperature=args.final_temp,
                           mask=MaskConfig(targets=TARGET_RE, init=args.init,
                                           l0_lambda=args.l0_lambda), fused=True)
    facts = machine_facts(torch_threads=torch.get_num_threads())
    facts["neurosurgeon"] = NeuroSurgeon.__version__
    facts["activations"] = {"instill": run.cfg.activation, "neurosurgeon": args.ns_activation}

    # one untimed warm-up step of each (first-call allocations, lazy imports)
    warm = DiscoveryConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, mask=dcfg.mask,
                           fused=dcfg.fused)
    run_instill(model, data[: args.batch_size], task, warm, args.seed)
    run_neurosurgeon(paper_model(model, args.ns_activation), data[: args.batch_size], args.loss,
                     warm, args.seed)

    times: dict[str, list[float]] = {"instill": [], "neurosurgeon": []}
    cpu: dict[str, list[float]] = {"instill": [], "neurosurgeon": []}
    loads = []
    sub = circuit = None
    for r in range(args.rounds):
        order = ("instill", "neurosurgeon") if r % 2 == 0 else ("neurosurgeon", "instill")
        for name in order:
            print(f"[{time.perf_counter() - started:6.1f}s] round {r + 1}/{args.rounds}: {name}",
                  file=sys.stderr, flush=True)
            if name == "instill":
                sub, wall, proc = run_instill(model, data, task, dcfg, args.seed)
            else:
                ns_model = paper_model(model, args.ns_activation)
                circuit, wall, proc = run_neurosurgeon(ns_model, data, args.loss, dcfg,
                                                       args.seed)
            times[name].append(wall)
            cpu[name].append(proc)
            loads.append(os.getloadavg()[0])

    assert sub is not None and circuit is not None
    with apply_subnetwork(model, sub, "keep"):
        inst_acc = run.task.accuracy(model, test)
    ns_acc = run.task.accuracy(_Logits(circuit), test)
    ns_masks = neurosurgeon_masks(circuit)
    if sorted(ns_masks) != sorted(sub.masks):
        raise RuntimeError(f"mask sets differ: {sorted(ns_masks)} vs {sorted(sub.masks)}")
    ns_sub = Subnetwork({n: ns_masks[n].expand(sub.masks[n].shape).clone() for n in sub.masks},
                        sub.fingerprint)
    result = {
        "settings": {k: getattr(args, k) for k in (
            "quick", "threads", "rounds", "epochs", "samples", "batch_size", "lr", "l0_lambda",
            "init", "final_temp", "loss", "base_loss", "seed")},
        "steps_per_run": args.epochs * -(-args.samples // args.batch_size),
        "masked_tensors": len(sub.masks),
        "masked_entries": sub.total(),
        "base_model_accuracy": base_acc,
        "instill": {"wall_s": times["instill"], "cpu_s": cpu["instill"],
                    "median_wall_s": statistics.median(times["instill"]),
                    "median_cpu_s": statistics.median(cpu["instill"]),
                    "subtask_accuracy": inst_acc, "density": sub.density()},
        "neurosurgeon": {"wall_s": times["neurosurgeon"], "cpu_s": cpu["neurosurgeon"],
                         "median_wall_s": statistics.median(times["neurosurgeon"]),
                         "median_cpu_s": statistics.median(cpu["neurosurgeon"]),
                         "subtask_accuracy": ns_acc, "density": ns_sub.density()},
        "mask_iou": sub.iou(ns_sub),
        "masks_identical": sub == ns_sub,
        "load_average_during": [round(x, 2) for x in loads],
    }
    i, n = result["instill"], result["neurosurgeon"]
    result["speedup_wall"] = n["median_wall_s"] / i["median_wall_s"]
    result["speedup_cpu"] = n["median_cpu_s"] / i["median_cpu_s"]
    result["accuracy_diff_points"] = 100 * (i["subtask_accuracy"] - n["subtask_accuracy"])
    result["density_rel_diff"] = (i["density"] - n["density"]) / max(n["density"], 1e-12)
    facts["load_average_end"] = load_average()
    facts["wall_s"] = round(time.perf_counter() - started, 1)
    print_report(facts, result, args.goal)
    if args.profile:
        for name, table in profile_steps(model, data, task, dcfg, args.ns_activation).items():
            print(f"\ntorch.profiler, 10 discovery steps, {name} (batch {args.batch_size}):")
            print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": facts, **result}, fh, indent=2)
    return 0


DIFFERENCES = [
    "same: targets (c_attn/c_proj/c_fc weights, no bias), init, sigmoid(T*s) soft / s>0 hard "
    "mask, penalty lambda*sum(sigmoid(T*s)), temperature schedule, AdamW(lr, wd=0) on the "
    "logits, data, batch order, loss",
    "NeuroSurgeon replaces each Conv1D by a ContSparseGPTConv1D module (weight*mask, then "
    "addmm); instill registers a torch.nn.utils.parametrize parametrization on the unchanged "
    "module (no layer is replaced, the model is returned untouched)",
    "NeuroSurgeon adds its penalty only to an HF `labels` loss (output.loss); with --loss "
    "answer the benchmark adds lambda * CircuitModel._compute_l0_loss() itself",
    "instill's discover also records per-epoch density/loss history (included in its time)",
    "GPT-2's MLP activation: instill builds GPT-2 with torch's fused tanh-GELU kernel; "
    "NeuroSurgeon gets the same weights with HF's default gelu_new (the same function in 8 "
    "ops, as the paper ran it) unless --ns-activation gelu_pytorch_tanh; instill's AdamW is "
    "fused, NeuroSurgeon's is torch's default",
]


def print_report(facts: dict[str, Any], res: dict[str, Any], goal: float) -> None:
    s = res["settings"]
    print("machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    print(f"discovery: {res['masked_tensors']} masked tensors ({res['masked_entries']:,} "
          f"entries), {s['samples']} subtask pairs, batch {s['batch_size']}, {s['epochs']} "
          f"epochs ({res['steps_per_run']} steps), lr {s['lr']}, lambda {s['l0_lambda']}, init "
          f"{s['init']}, final temperature {s['final_temp']}, loss {s['loss']}, "
          f"{s['threads']} thread(s), {s['rounds']} alternating rounds")
    base = res["base_model_accuracy"]
    print(f"base model (no mask): accuracy on a+a*b {base['base']:.3f}, on a*b "
          f"{base['subtask']:.3f}")
    header = (f"{'implementation':<14} {'median wall s':>13} {'median CPU s':>12} "
              f"{'runs (wall s)':>24} {'subtask acc':>11} {'density':>8}")
    print(header)
    print("-" * len(header))
    for name in ("instill", "neurosurgeon"):
        row = res[name]
        runs = " ".join(f"{t:.1f}" for t in row["wall_s"])
        print(f"{name:<14} {row['median_wall_s']:>13.2f} {row['median_cpu_s']:>12.2f} "
              f"{runs:>24} {row['subtask_accuracy']:>11.4f} {row['density']:>8.4f}")
    print()
    speed_ok = res["speedup_wall"] >= goal
    acc_ok = abs(res["accuracy_diff_points"]) <= 0.5
    dens_ok = abs(res["density_rel_diff"]) <= 0.10
    print(f"speed-up (NeuroSurgeon / instill): wall {res['speedup_wall']:.2f}x, CPU "
          f"{res['speedup_cpu']:.2f}x   goal >= {goal:.1f}x: {'met' if speed_ok else 'NOT met'}")
    print(f"subtask accuracy difference: {res['accuracy_diff_points']:+.2f} points   goal "
          f"within 0.5: {'met' if acc_ok else 'NOT met'}")
    print(f"density relative difference: {100 * res['density_rel_diff']:+.2f}%   goal within "
          f"10%: {'met' if dens_ok else 'NOT met'}")
    print(f"mask agreement: IoU {res['mask_iou']:.4f}, identical: {res['masks_identical']}")
    if res["instill"]["density"] == 0 or res["neurosurgeon"]["density"] == 0:
        print("WARNING: an empty subnetwork: with init -0.1 and lr 1e-3 a logit needs about 100 "
              "AdamW steps to turn positive; run more epochs or samples")
    print(f"load average (1 min) after each run: {res['load_average_during']}")
    print("what matches / differs:")
    for line in DIFFERENCES:
        print(f"  - {line}")


if __name__ == "__main__":
    sys.exit(main())
