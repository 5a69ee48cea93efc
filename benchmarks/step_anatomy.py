"""Why an arithmetic induction step costs what it does, and whether batching models helps.

Two measurements behind docs/performance.md's "what stands in the way":

1. **Kernel costs** on this CPU, 1 thread, for tensors the size of the quick preset's GPT-2
   activations (batch 64 x 3 tokens x 256): the tanh-GELU (fused and HF's 8-op `gelu_new`),
   exact GELU, dropout's Bernoulli draw, a multiply, and a 192x64 @ 64x192 matmul.
2. **K models at once** (the issue's `torch.func` idea): K independently initialised copies of
   the quick preset's GPT-2 (2 layers, 64 dim), one training step each on the same batch 64 of
   3-token inputs with the answer-token loss, run (a) one after another, each with its own fused
   AdamW, and (b) as one `vmap(grad(functional_call))` step over stacked parameters with one fused
   AdamW, in CPU ms per step of all K, interleaved in rounds.

    .venv/bin/python benchmarks/step_anatomy.py [--models 5 10] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from machine import cpu_model, load_average
from torch.func import functional_call, grad, stack_module_state, vmap
from transformers.activations import ACT2FN

from instill.models import build_model


def cpu_us(fn: Callable[[], object], repeat: int) -> float:
    """Median CPU microseconds of `fn` over 5 blocks of `repeat` calls, after a warm-up."""
    for _ in range(3):
        fn()
    blocks = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(repeat):
            fn()
        blocks.append((time.process_time() - start) / repeat * 1e6)
    return statistics.median(blocks)


def kernel_costs() -> None:
    x = torch.randn(64, 3, 256)
    a, b = torch.randn(192, 64), torch.randn(64, 192)
    rows = {
        "gelu tanh, fused (gelu_pytorch_tanh)": lambda: F.gelu(x, approximate="tanh"),
        "gelu tanh, HF gelu_new (8 ops)": lambda: ACT2FN["gelu_new"](x),
        "gelu exact (erf)": lambda: F.gelu(x),
        "dropout p=0.1 (Bernoulli draw + scale)": lambda: F.dropout(x, 0.1, True),
        "multiply": lambda: x * x,
        "matmul 192x64 @ 64x192": lambda: a @ b,
    }
    print(f"kernel costs, 1 thread, activation {tuple(x.shape)} ({x.numel():,} floats):")
    for name, fn in rows.items():
        us = cpu_us(fn, 200)
        per = f"{1000 * us / x.numel():6.2f} ns/element" if "matmul" not in name else ""
        print(f"  {name:<40} {us:8.1f} us  {per}")


def gpt2_copies(k: int) -> list[torch.nn.Module]:
    """K differently initialised copies of the quick preset's GPT-2, in training mode."""
    models = []
    for i in range(k):
        torch.manual_seed(i)
        models.append(build_model("gpt2", vocab_size=210, n_positions=4, n_embd=64, n_layer=2,
                                  n_head=4, activation="gelu_pytorch_tanh").train())
    return models


def batched_models(k: int, rounds: int) -> tuple[float, float]:
    x = torch.randint(0, 200, (64, 4))
    models = gpt2_copies(k)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in models]

    def one_by_one() -> None:
        for model, opt in zip(models, optimizers, strict=True):
            logits = model(input_ids=x[:, :3], logits_to_keep=1).logits[:, -1]
            loss = F.cross_entropy(logits, x[:, 3])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    template = gpt2_copies(1)[0]
    params, buffers = stack_module_state(gpt2_copies(k))
    params.pop("lm_head.weight", None)  # tied to wte: functional_call re-ties it
    stacked = torch.optim.AdamW(list(params.values()), lr=1e-3, fused=True)

    def loss_of(p: dict, bufs: dict) -> torch.Tensor:
        out = functional_call(template, (p, bufs), args=(), kwargs={
            "input_ids": x[:, :3], "logits_to_keep": 1}, tie_weights=True, strict=False)
        return F.cross_entropy(out.logits[:, -1], x[:, 3])

    step = vmap(grad(loss_of), randomness="different")

    def all_at_once() -> None:
        grads = step(params, buffers)
        for name, value in params.items():
            value.grad = grads[name]
        stacked.step()

    timings: dict[str, list[float]] = {"one by one": [], "vmap": []}
    for r in range(rounds):
        order = (("one by one", one_by_one), ("vmap", all_at_once))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            timings[name].append(cpu_us(fn, 5) / 1000)
    return statistics.median(timings["one by one"]), statistics.median(timings["vmap"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {cpu_model()}, torch {torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {load_average()}")
    kernel_costs()
    print("K GPT-2 models, one training step each (CPU ms for all K, median of rounds):")
    for k in args.models:
        seq, vm = batched_models(k, args.rounds)
        print(f"  K={k:<3} one by one {seq:7.1f} ms   vmap {vm:7.1f} ms   "
              f"one-by-one / vmap {seq / vm:.2f}x")
    print(f"load average at the end {load_average()}")


if __name__ == "__main__":
    main()
