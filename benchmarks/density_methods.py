"""Ways to get a subnetwork of a chosen density, compared on one base model of the quick preset.

Trains (or reuses) the quick preset's first base model into `--out`, then discovers the
subtask's subnetwork several ways and measures each on held-out pairs: its density, the
subtask accuracy with only it kept ("alone"), and the ablation margin (base-task accuracy with
as many random weights removed, minus with it removed). The ways:

* top-k of one discovery's logits at each density (the paper's discovery, then thresholds);
* the density budget (`discovery.target_density`) with L0 penalties 1e-7, 1e-5 and 1e-4;
* the L0 penalty alone, landing where it lands.

docs/arithmetic.md ("Subnetworks at chosen densities") quotes its output.

    python benchmarks/density_methods.py [--out DIR] [--replicate 0]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from instill.core import Subnetwork, apply_subnetwork, attach_masks
from instill.experiments.arithmetic import ArithmeticRun, load_config
from instill.training import FitConfig, discover, make_optimizer, run_epoch

DENSITIES = (0.02, 0.05, 0.1, 0.2)


def measure(run: ArithmeticRun, model, sub: Subnetwork) -> str:
    subtask, base = run.sequences("subtask", 2000, 11), run.sequences("base", 2000, 12)
    random = sub.sample_like(torch.Generator().manual_seed(5))
    with apply_subnetwork(model, sub, "keep"):
        alone = run.task.accuracy(model, subtask)
    with apply_subnetwork(model, sub, "ablate"):
        ablated = run.task.accuracy(model, base)
    with apply_subnetwork(model, random, "ablate"):
        random_ablated = run.task.accuracy(model, base)
    return (f"density {sub.density():.3f}  alone {alone:.3f}  ablation margin "
            f"{random_ablated - ablated:.3f}")


def top_k(run: ArithmeticRun, model, data, seed: int) -> dict[float, Subnetwork]:
    """The paper's discovery, then the top fraction of its logits at each density."""
    cfg = run.cfg.discovery
    masked = attach_masks(model, cfg.mask)
    optimizer = make_optimizer(masked.mask_parameters(), FitConfig(lr=cfg.lr, weight_decay=0))
    generator, growth = torch.Generator().manual_seed(seed), cfg.final_temperature ** (
        1 / cfg.epochs)

    def loss(m, batch):
        return run.task.loss(m, batch) + masked.l0_penalty()

    for epoch in range(cfg.epochs):
        run_epoch(masked, [data], loss, optimizer, cfg.batch_size, generator, epoch)
        masked.temperature *= growth
    logits = {name: mask.logits.detach() for name, mask in masked.masks.items()}
    flat = torch.cat([t.flatten() for t in logits.values()])
    out = {}
    for d in DENSITIES:
        cut = flat.kthvalue(flat.numel() - round(d * flat.numel()) + 1).values
        out[d] = Subnetwork({n: t >= cut for n, t in logits.items()},
                            dict(masked.source_fingerprint))
    masked.detach_masks()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--replicate", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="density-methods-"))
    run = ArithmeticRun(load_config("quick"), out, log=print)
    run.base_phase(2, args.replicate, 0)
    model = run.base_model(2, args.replicate, 0)
    seed = run.seed("discovery", 2, args.replicate, 0)
    data = run.sequences("subtask", run.cfg.subtask_samples, seed)
    for d, sub in top_k(run, model, data, seed).items():
        print(f"top-k of the native logits at {d:<4}: {measure(run, model, sub)}")
    for lam in (1e-7, 1e-5, 1e-4):
        mask = replace(run.cfg.discovery.mask, l0_lambda=lam)
        for d in DENSITIES:
            cfg = replace(run.cfg.discovery, mask=mask, target_density=d)
            sub, _ = discover(model, [data], run.task.loss, cfg, seed=seed)
            print(f"budget {d:<4} with L0 {lam:g}: {measure(run, model, sub)}")
    for lam in (1e-6, 1e-5, 1e-4):
        cfg = replace(run.cfg.discovery, mask=replace(run.cfg.discovery.mask, l0_lambda=lam))
        sub, _ = discover(model, [data], run.task.loss, cfg, seed=seed)
        print(f"L0 {lam:g} alone: {measure(run, model, sub)}")


if __name__ == "__main__":
    main()
