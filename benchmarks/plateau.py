"""What the arithmetic base model knows on its plateau (validation accuracy near 0.4).

Trains the quick preset's base model for a few epochs (the plateau), then prints its accuracy on
every pair (a, b) broken down by (a mod p, b mod p), and the distribution of its predictions.
On `a + a*b = a * (1 + b)` mod 7 the plateau model answers every pair whose answer is 0
(a = 0 or b = 6 mod 7) correctly and mostly a constant otherwise: it has learnt a one-bit feature
per number ("is 0" / "is 6 mod 7") but not yet the residues, whose six non-zero classes are
symmetric for it. See docs/arithmetic.md.

    .venv/bin/python benchmarks/plateau.py [--epochs 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from instill.experiments.arithmetic import ArithmeticRun, load_config
    from instill.tasks.arithmetic import make_sequences

    torch.set_num_threads(1)
    cfg = load_config("quick", None, {"seed": args.seed, "base_fit": {
        "epochs": args.epochs, "stop_at": None}})
    with tempfile.TemporaryDirectory() as out:
        run = ArithmeticRun(cfg, out, log=lambda *_: None)
        run.prepare()
        layers = cfg.layers[0]
        info = run.base_phase(layers, 0)
        model = run.base_model(layers, 0, 0)
    n, p = cfg.numbers, cfg.modulus
    a, b = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
    seqs = make_sequences(a, b, run.exprs["base"], run.spec)
    pred = run.task.predict(model, seqs)
    right = (pred == seqs[:, 3]).float()
    print(f"`{cfg.base}` mod {p} after {args.epochs} epochs: validation "
          f"{[round(h['val'], 3) for h in info['history']]}, all pairs {right.mean():.3f}")
    print(f"accuracy (%) by a mod {p} (rows) and b mod {p} (columns):")
    for r in range(p):
        cells = [right[(a % p == r) & (b % p == s)].mean().item() for s in range(p)]
        print(f"  a={r}: " + " ".join(f"{100 * c:4.0f}" for c in cells))
    print(f"predicted answers: {torch.bincount(pred, minlength=p)[:p].tolist()}")
    print(f"true answers:      {torch.bincount(seqs[:, 3], minlength=p)[:p].tolist()}")


if __name__ == "__main__":
    main()
