"""Experiment A of the paper: modular arithmetic data efficiency with a GPT-2 decoder.

Phases (each skipped when its output exists, so an interrupted run resumes): train the base
model on `base`, discover the subnetwork for `subtask`, verify it, run the induction sweep on
`target` (cells of depth x n x seed, all conditions on the same data), and report.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instill.checkpoint import load_model, save_model
from instill.core import MaskConfig, Subnetwork
from instill.core.targets import select_parameters
from instill.errors import ConfigError, ExpressionError, FileFormatError, SubnetworkMismatchError
from instill.experiments.common import (
    CONDITIONS,
    layered_config,
    map_cells,
    starting_model,
    verify_subnetwork,
)
from instill.models import build_model, check_activation, logits_of
from instill.runio import RunDir, from_dict, to_dict, write_json
from instill.tasks.arithmetic import (
    ArithmeticSpec,
    TargetSplits,
    check_ambiguity,
    make_sequences,
    make_target_splits,
    sample_pairs,
)
from instill.tasks.expr import Expression, parse
from instill.training import DiscoveryConfig, FitConfig, discover, fit

PAPER_GRID = [0, 10, 16, 25, 40, 64, 100, 160, 250, 400, 640, 1000, 1600, 2500, 4000, 6400,
              10000]


@dataclass
class ArithmeticConfig:
    """Everything that defines an arithmetic run; the defaults are the paper's settings."""

    base: str = "a + a*b"
    subtask: str = "a*b"
    target: str = "a^2 + a*b"
    alternatives: list[str] = field(default_factory=lambda: ["2*a^2", "2*b^2"])
    modulus: int = 7
    numbers: int = 1000
    layers: list[int] = field(default_factory=lambda: [2, 4, 6, 8, 10, 12])
    n_embd: int = 128
    n_head: int = 4
    dropout: float = 0.1
    activation: str = "gelu_new"  # HF GPT-2's; "gelu_pytorch_tanh": same function, one kernel
    loss: Literal["lm", "answer"] = "lm"
    seed: int = 0
    seeds: int = 1
    base_samples: int = 200_000
    base_val: int = 2000
    base_fit: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=50, batch_size=50, lr=5e-4, weight_decay=0.01, patience=5))
    subtask_samples: int = 50_000
    discovery: DiscoveryConfig = field(default_factory=lambda: DiscoveryConfig(
        epochs=50, batch_size=500, lr=1e-3, final_temperature=100.0,
        mask=MaskConfig(l0_lambda=1e-7, init=-0.1)))
    grid: list[int] = field(default_factory=lambda: list(PAPER_GRID))
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    induction_fit: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=100, batch_size=50, lr=2e-4, weight_decay=0.01))
    n_val: int = 1000
    n_test: int = 1000
    freeze: bool = True
    keep_unmasked: bool = True
    threshold: float = 0.95

    def __post_init__(self) -> None:
        self.spec  # noqa: B018  (validates numbers and modulus)
        named = [("base", self.base), ("subtask", self.subtask), ("target", self.target),
                 *((f"alternatives[{i}]", alt) for i, alt in enumerate(self.alternatives))]
        for name, text in named:
            try:
                parse(text)
            except ExpressionError as err:
                raise ConfigError(f"{name}: {err}") from None
        if not self.layers or min(self.layers) < 1:
            raise ConfigError(f"layers must be a non-empty list of depths >= 1, got {self.layers}")
        check_activation(self.activation)
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head "
                              f"({self.n_head})")
        if self.seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {self.seeds}")
        if not self.grid or min(self.grid) < 0:
            raise ConfigError(f"grid must be a non-empty list of counts >= 0, got {self.grid}")
        unknown = sorted(set(self.conditions) - set(CONDITIONS))
        if unknown or not self.conditions:
            raise ConfigError(f"unknown conditions {unknown}; choose from {list(CONDITIONS)}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold}")

    @property
    def spec(self) -> ArithmeticSpec:
        return ArithmeticSpec(numbers=self.numbers, modulus=self.modulus)


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "quick": {
        "numbers": 200,
        "layers": [2],
        "n_embd": 64,
        "loss": "answer",
        "activation": "gelu_pytorch_tanh",
        "seeds": 2,
        "base_samples": 20_000,
        "base_fit": {"epochs": 30, "batch_size": 128, "lr": 2e-3, "patience": 4, "fused": True},
        "subtask_samples": 10_000,
        "discovery": {"epochs": 10, "batch_size": 250, "lr": 1e-2, "fused": True},
        "grid": [0, 25, 100, 250, 400, 640, 1000, 1600],
        "induction_fit": {"epochs": 60, "batch_size": 64, "lr": 1e-3, "fused": True},
        "n_val": 500,
        "n_test": 1000,
    },
}


def load_config(preset: str | None = "paper", file_values: dict | None = None,
                overrides: dict | None = None) -> ArithmeticConfig:
    """Defaults, then the preset, then a config file's values, then command-line overrides."""
    return layered_config(ArithmeticConfig, PRESETS, preset, file_values, overrides,
                          "arithmetic config")


# -- the task -------------------------------------------------------------------------------
class SequenceTask:
    """Loss and accuracy for `[a, b, SEP, y]` sequences (answer read at the SEP position)."""

    def __init__(self, spec: ArithmeticSpec, loss: str) -> None:
        self.spec, self.loss_kind = spec, loss

    def loss(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        """Causal LM loss on the whole sequence (`lm`, the paper's), or on the answer only
        (the output head then runs only at the SEP position)."""
        (seqs,) = batch
        if self.loss_kind == "answer":
            logits = logits_of(model(input_ids=seqs[:, :3], logits_to_keep=1))[:, -1]
            return F.cross_entropy(logits.float(), seqs[:, 3])
        logits = logits_of(model(input_ids=seqs))[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                               seqs[:, 1:].reshape(-1))

    @torch.no_grad()
    def predict(self, model: nn.Module, seqs: Tensor, batch_size: int = 4096) -> Tensor:
        """Argmax over the vocabulary at the SEP position."""
        model.eval()
        outs = [logits_of(model(input_ids=chunk[:, :3], logits_to_keep=1))[:, -1].argmax(-1)
                for chunk in seqs.split(batch_size)]
        return torch.cat(outs)

    def accuracy(self, model: nn.Module, seqs: Tensor) -> float:
        return (self.predict(model, seqs) == seqs[:, 3]).float().mean().item()


# -- phases -----------------------------------------------------------------------------------
class ArithmeticRun:
    """One run directory: each phase reads what earlier phases wrote, and skips finished work."""

    def __init__(self, cfg: ArithmeticConfig, out: str | Path, log=print,
                 threads: int = 1, workers: int = 1) -> None:
        self.cfg, self.log = cfg, log
        self.threads, self.workers = threads, workers
        self.run = RunDir(out)
        self.spec = cfg.spec
        self.task = SequenceTask(self.spec, cfg.loss)
        self.exprs: dict[str, Expression] = {
            "base": parse(cfg.base), "subtask": parse(cfg.subtask), "target": parse(cfg.target)}
        self.alternatives = [parse(a) for a in cfg.alternatives]

    def build(self, layers: int) -> nn.Module:
        return build_model("gpt2", vocab_size=self.spec.vocab_size, n_positions=4,
                           n_embd=self.cfg.n_embd, n_layer=layers, n_head=self.cfg.n_head,
                           dropout=self.cfg.dropout, activation=self.cfg.activation)

    def sequences(self, expr: str, n: int, seed: int) -> Tensor:
        a, b = sample_pairs(n, self.spec, torch.Generator().manual_seed(seed))
        return make_sequences(a, b, self.exprs[expr], self.spec)

    def prepare(self) -> list[str]:
        """Check the config against an earlier run in the same directory; record it."""
        problems = check_ambiguity(self.exprs["target"], self.alternatives, self.spec)
        mask = self.cfg.discovery.mask
        with torch.random.fork_rng(devices=[]):  # fail before training, not after it
            for layers in self.cfg.layers:
                select_parameters(self.build(layers), mask.targets, mask.exclude, mask.mask_bias)
        self.run.begin(to_dict(self.cfg), self.cfg.seed, self.log)
        return problems

    def base_model(self, layers: int) -> nn.Module:
        """Phase 1: train (or load) the base model of this depth."""
        path = self.run.path(f"base/L{layers}.safetensors")
        model = self.build(layers)
        if path.exists():
            try:
                load_model(path, model)
            except FileFormatError as err:
                raise _unusable(err, path, "retrain it") from None
            return model.eval()
        seed = self.cfg.seed * 1000 + layers
        torch.manual_seed(seed)
        model = self.build(layers)
        train = self.sequences("base", self.cfg.base_samples, seed)
        val = self.sequences("base", self.cfg.base_val, seed + 1)
        result = fit(model, [train], self.task.loss, self.cfg.base_fit, seed=seed,
                     evaluate=lambda m: self.task.accuracy(m, val), desc=f"base L{layers}")
        test = self.sequences("base", self.cfg.base_val, seed + 2)
        info = {"layers": layers, "val_accuracy": result.best_score,
                "test_accuracy": self.task.accuracy(model, test),
                "best_epoch": result.best_epoch, "history": result.history}
        write_json(self.run.path(f"base/L{layers}.json"), info)
        save_model(path, model, {"layers": str(layers)})
        self.log(f"base L{layers}: {self.cfg.base} test accuracy {info['test_accuracy']:.3f} "
                 f"(epoch {result.best_epoch})")
        return model

    def subnetwork(self, layers: int, model: nn.Module) -> Subnetwork:
        """Phase 2: discover (or load) the subnetwork for the subtask."""
        path = self.run.path(f"subnetworks/L{layers}.safetensors")
        if path.exists():
            try:
                sub = Subnetwork.load(path)
                sub.check_model(model)
            except (FileFormatError, SubnetworkMismatchError) as err:
                raise _unusable(err, path, "rediscover it") from None
            return sub
        seed = self.cfg.seed * 1000 + layers + 500
        torch.manual_seed(seed)  # anything drawn from the global generator is seeded too
        data = self.sequences("subtask", self.cfg.subtask_samples, seed)
        sub, history = discover(model, [data], self.task.loss, self.cfg.discovery, seed=seed,
                                desc=f"discover L{layers}")
        write_json(self.run.path(f"subnetworks/L{layers}.json"), {"history": history})
        sub = Subnetwork(sub.masks, sub.fingerprint,
                         {**sub.metadata, "subtask": self.cfg.subtask, "layers": str(layers)})
        sub.save(path)
        self.log(f"subnetwork L{layers}: density {sub.density():.4f} ({sub.kept()} weights)")
        return sub

    def verify(self, layers: int, model: nn.Module, sub: Subnetwork) -> dict[str, Any]:
        """Phase 3: the subnetwork alone, ablated, and a same-size random ablation."""
        seed = self.cfg.seed * 1000 + layers + 700
        sets = {name: self.sequences(name, 2000, seed + i)
                for i, name in enumerate(("subtask", "base"))}
        metrics = {k: (lambda m, s=s: self.task.accuracy(m, s)) for k, s in sets.items()}
        return verify_subnetwork(model, sub, metrics, seed)

    def splits(self, seed: int) -> TargetSplits:
        return make_target_splits(self.exprs["target"], self.spec, max(self.cfg.grid),
                                  self.cfg.n_val, self.cfg.n_test, seed=seed)

    def cell(self, layers: int, n: int, seed: int, trained: nn.Module,
             sub: Subnetwork) -> list[dict[str, Any]]:
        """Phase 4 unit of work: every condition trained on the same target data."""
        path = self.run.path(f"cells/L{layers}-n{n}-s{seed}.json")
        if path.exists():
            try:
                return json.loads(path.read_text())["rows"]
            except (ValueError, KeyError, TypeError) as err:
                raise _unusable(FileFormatError(f"{path} is not a finished cell ({err})"), path,
                                "recompute it") from None
        splits = self.splits(self.cfg.seed + seed)
        train, val, test = splits.train_sequences(n), splits.val_sequences(), \
            splits.test_sequences()
        run_seed = (self.cfg.seed + seed) * 100_003 + layers * 1009 + n
        rows = []
        for condition in self.cfg.conditions:
            torch.manual_seed(run_seed)  # dropout: the same draws in a fresh or resumed run
            model = starting_model(condition, trained, sub, run_seed, freeze=self.cfg.freeze,
                                   keep_unmasked=self.cfg.keep_unmasked)
            result = fit(model, [train], self.task.loss, self.cfg.induction_fit, seed=run_seed,
                         evaluate=lambda m, v=val: self.task.accuracy(m, v),
                         desc=f"{condition} L{layers} n={n} s{seed}")
            pred = self.task.predict(model, test)
            row = {"layers": layers, "n": n, "seed": seed, "condition": condition,
                   "test_accuracy": _acc(pred, test, self.exprs["target"], self.spec),
                   "val_accuracy": result.best_score, "best_epoch": result.best_epoch}
            for alt in self.alternatives:
                row[f"accuracy[{alt}]"] = _acc(pred, test, alt, self.spec)
            rows.append(row)
        write_json(path, {"rows": rows})
        return rows

    def execute(self) -> dict[str, Any]:
        """Run every phase (resuming finished work) and write the report."""
        from instill.experiments.arithmetic_report import write_report

        problems = self.prepare()
        for problem in problems:
            self.log(f"warning: {problem}")
        verify, rows = {}, []
        cells = [(n, s) for s in range(self.cfg.seeds) for n in self.cfg.grid]
        for layers in self.cfg.layers:
            model = self.base_model(layers)
            sub = self.subnetwork(layers, model)
            verify[f"L{layers}"] = self.verify(layers, model, sub)
            if self.workers > 1:
                jobs = [(to_dict(self.cfg), str(self.run.root), layers, n, seed, self.threads)
                        for n, seed in cells]
                done = map_cells(_cell_worker, jobs, self.workers, f"induction L{layers}",
                                 cost=lambda job: job[3])  # training steps grow with n
            else:
                done = map_cells(lambda job, d=layers, m=model, s=sub: self.cell(d, *job, m, s),
                                 cells, 1, f"induction L{layers}")
            rows += [row for cell_rows in done for row in cell_rows]
        write_json(self.run.path("verify.json"), verify)
        phases = [name for d in self.cfg.layers for name in (
            f"base/L{d}.safetensors", f"base/L{d}.json", f"subnetworks/L{d}.safetensors",
            f"subnetworks/L{d}.json", *(f"cells/L{d}-n{n}-s{s}.json" for n, s in cells))]
        self.run.record_outputs([name for name in phases if self.run.exists(name)])
        return write_report(self.run, self.cfg, rows, verify, problems)


def _unusable(err: Exception, path: Path, redo: str) -> FileFormatError:
    """A damaged or foreign file in the run directory: say which, and how to redo it."""
    return FileFormatError(f"{err}; delete {path} and rerun the same command to {redo}")


def _acc(pred: Tensor, seqs: Tensor, expr: Expression, spec: ArithmeticSpec) -> float:
    """Fraction of predictions equal to `expr` on the test pairs (target or an alternative)."""
    truth = expr.evaluate(seqs[:, 0], seqs[:, 1], spec.modulus)
    return (pred == truth).float().mean().item()


def _cell_worker(job: tuple) -> list[dict[str, Any]]:
    """One induction cell in a worker process: reload the run's base model and subnetwork."""
    config, out, layers, n, seed, threads = job
    torch.set_num_threads(threads)
    run = ArithmeticRun(from_dict(ArithmeticConfig, config), out, log=lambda _: None)
    model = run.base_model(layers)
    return run.cell(layers, n, seed, model, run.subnetwork(layers, model))


def run_arithmetic(cfg: ArithmeticConfig, out: str | Path, log=print, threads: int = 1,
                   workers: int = 1) -> dict[str, Any]:
    """Run the whole experiment into `out`; returns the summary.

    `threads` sets torch's intra-op threads per process: these models are tiny, and one thread
    is fastest (more threads spin against each other on a busy machine). `workers` processes
    run induction cells side by side; results do not depend on either.
    """
    torch.set_num_threads(threads)
    return ArithmeticRun(cfg, out, log, threads, workers).execute()


__all__ = ["PRESETS", "ArithmeticConfig", "ArithmeticRun", "load_config", "run_arithmetic"]
