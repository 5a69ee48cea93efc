"""Can the quick preset's models learn shape at all? Train each on shape_only images.

The shape-bias experiment needs a base model that learns some shape from natural images. The
quick ViT learnt almost none (docs/shapebias.md). This asks the prior question: trained on
`shape_only` images, where the silhouette is the only cue, how well does each architecture
recognise held-out shape_only images, and how shape-biased is it on cue-conflict images? It
trains the quick preset's ResNet and ViT, and ViTs with smaller patches, with the preset's base
settings (same data sizes, optimizer and epochs), one process each, and prints a table.

    .venv/bin/python benchmarks/vit_shape.py [--seeds 2] [--variants resnet vit vit-p4]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from machine import machine_facts

#: name -> config overrides on the quick preset
VARIANTS = {
    "resnet": {"arch": "resnet"},
    "vit": {"arch": "vit"},
    "vit-p4": {"arch": "vit", "vit": {"patch_size": 4}},
}


def train_on_shapes(name: str, seed: int) -> dict[str, float]:
    """One model of `name` trained on shape_only images; its held-out scores."""
    from instill.experiments.shapebias import ShapeBiasRun, load_config
    from instill.tasks.shapes import make_split
    from instill.training import fit

    cfg = load_config("quick", None, {**VARIANTS[name], "seed": seed})
    with tempfile.TemporaryDirectory() as out:
        run = ShapeBiasRun(cfg, out, log=lambda *_: None)
        torch.manual_seed(seed)
        model = run.build()
        train = make_split(cfg.world, "shape_only", cfg.base_samples, 10_000 + seed)
        val = make_split(cfg.world, "shape_only", cfg.base_val, 20_000 + seed)
        start = time.perf_counter()
        fit(model, run.tensors(train), run.task.loss, cfg.base_fit, seed=seed,
            evaluate=lambda m: run.task.accuracy(m, val), desc=name)
        return {"shape_only_accuracy": run.task.accuracy(model, run.data.shape_eval),
                "natural_accuracy": run.task.accuracy(model, run.data.test),
                "shape_bias": run.task.shape_bias(model, run.data.cue_conflict)["shape_bias"],
                "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"vit_shape: {machine_facts()}", flush=True)
    print("| model | seed | shape_only acc. | natural acc. | shape bias | s |")
    print("|---|---|---|---|---|---|")
    for name in args.variants:
        for seed in range(args.seeds):
            r = train_on_shapes(name, seed)
            print(f"| {name} | {seed} | {r['shape_only_accuracy']:.3f} | "
                  f"{r['natural_accuracy']:.3f} | {r['shape_bias']:.3f} | {r['seconds']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
