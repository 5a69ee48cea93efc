"""Experiment A of the paper: modular arithmetic data efficiency with a GPT-2 decoder.

Phases (each skipped when its output exists, so an interrupted run resumes), for each depth and
each of `replicates` independent pipelines: train the base model on `base`, discover the
subnetwork for `subtask`, verify it, and check the gates (a failed gate retries the pipeline
with the next seed); then the induction sweep on `target` (cells of depth x replicate x n x
seed, all conditions on the same data), and the report with intervals over replicates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from instill.checkpoint import load_model, save_model
from instill.core import MaskConfig, Subnetwork
from instill.core.targets import select_parameters
from instill.errors import ConfigError, ExpressionError, FileFormatError, SubnetworkMismatchError
from instill.experiments.arithmetic_report import write_report
from instill.experiments.common import (
    CONDITIONS,
    check_conditions,
    layered_config,
    map_cells,
    starting_model,
    verify_subnetwork,
)
from instill.experiments.pipeline import Gate, GatePolicy, derive_seed, failed, run_attempts
from instill.models import build_model, check_activation
from instill.runio import RunDir, from_dict, to_dict, write_json
from instill.tasks.arithmetic import (
    ArithmeticSpec,
    TargetSplits,
    check_ambiguity,
    make_sequences,
    make_target_splits,
    pair_codes,
    sample_pairs,
)
from instill.tasks.expr import Expression, parse
from instill.tasks.sequences import SequenceTask
from instill.training import DiscoveryConfig, FitConfig, discover, fit

#: Subtask Induction, the paper's controls, and the controls on where the transfer comes from
#: (the subnetwork or the trained embeddings, norms and biases around it).
ARITHMETIC_CONDITIONS = ("subnet", "sampled", "complement", "full", "random", "embeddings_only",
                         "subnet-fresh", "sampled-fresh", "complement-fresh")

PAPER_GRID = [0, 10, 16, 25, 40, 64, 100, 160, 250, 400, 640, 1000, 1600, 2500, 4000, 6400,
              10000]


@dataclass
class ArithmeticGates(GatePolicy):
    """What the induction sweep relies on, checked for every pipeline before it runs."""

    base_accuracy: float = 0.99  # base-task accuracy on held-out pairs
    subnetwork_accuracy: float = 0.9  # subtask accuracy with only the subnetwork kept
    # Base-task accuracy with a random same-size ablation minus with the subnetwork ablated:
    # removing the subnetwork must hurt far more than removing as many random weights. (The
    # base task, since the trained model computes the subtask only inside it: its accuracy on
    # the subtask alone is near chance before and after any ablation.)
    ablation_margin: float = 0.5


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
    replicates: int = 3  # independent pipelines (base model, subnetwork, cells) per depth
    seeds: int = 1  # downstream seeds per replicate and grid point
    gates: ArithmeticGates = field(default_factory=ArithmeticGates)
    base_samples: int = 200_000
    base_val: int = 2000
    base_fit: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=50, batch_size=50, lr=5e-4, weight_decay=0.01, patience=5))
    subtask_samples: int = 50_000
    discovery: DiscoveryConfig = field(default_factory=lambda: DiscoveryConfig(
        epochs=50, batch_size=500, lr=1e-3, final_temperature=100.0,
        mask=MaskConfig(l0_lambda=1e-7, init=-0.1)))
    grid: list[int] = field(default_factory=lambda: list(PAPER_GRID))
    conditions: list[str] = field(default_factory=lambda: list(ARITHMETIC_CONDITIONS))
    induction_fit: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=100, batch_size=50, lr=2e-4, weight_decay=0.01))
    n_val: int = 1000
    n_test: int = 1000
    freeze: bool = True
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
        if self.seeds < 1 or self.replicates < 1:
            raise ConfigError(f"seeds and replicates must be >= 1, got {self.seeds} and "
                              f"{self.replicates}")
        if not self.grid or min(self.grid) < 0:
            raise ConfigError(f"grid must be a non-empty list of counts >= 0, got {self.grid}")
        check_conditions(self.conditions, list(CONDITIONS))
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
        "replicates": 5,
        "seeds": 1,
        "base_samples": 20_000,
        "base_val": 500,
        # No patience: the base model sits on a plateau for 5-60 epochs before it learns the
        # residues (docs/arithmetic.md); it stops once validation holds 0.998 twice, and 80
        # epochs is the budget for the slowest seeds (1 in 20 needed 59). lr 1e-3 leaves the
        # plateau soonest (5e-4, 2e-3 and 4e-3 were slower on the same seeds).
        "base_fit": {"epochs": 80, "batch_size": 128, "lr": 1e-3, "patience": None,
                     "stop_at": 0.998, "stop_after": 2, "fused": True},
        "subtask_samples": 10_000,
        "discovery": {"epochs": 10, "batch_size": 250, "lr": 1e-2, "fused": True},
        "grid": [0, 25, 100, 250, 640, 1600],
        "induction_fit": {"epochs": 60, "batch_size": 64, "lr": 1e-3, "stop_at": 0.998,
                          "stop_after": 2, "fused": True},
        "n_val": 500,
        "n_test": 1000,
    },
}


def load_config(preset: str | None = "paper", file_values: dict | None = None,
                overrides: dict | None = None) -> ArithmeticConfig:
    """Defaults, then the preset, then a config file's values, then command-line overrides."""
    return layered_config(ArithmeticConfig, PRESETS, preset, file_values, overrides,
                          "arithmetic config")


# -- phases -----------------------------------------------------------------------------------
class ArithmeticRun:
    """One run directory: each phase reads what earlier phases wrote, and skips finished work.

    Layout: `pipelines/L{d}-r{r}/a{i}/` holds attempt i of replicate r at depth d (its base
    model, subnetwork and verification; `attempts.json` beside it records every attempt's
    gates), and `cells/L{d}-r{r}-a{i}-n{n}-s{s}.json` the induction cells of the chosen attempt.
    """

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
        self._sources: dict[tuple[int, int, int], tuple[nn.Module, Subnetwork]] = {}

    def seed(self, *parts: str | int) -> int:
        return derive_seed(self.cfg.seed, *parts)

    def build(self, layers: int) -> nn.Module:
        return build_model("gpt2", vocab_size=self.spec.vocab_size, n_positions=4,
                           n_embd=self.cfg.n_embd, n_layer=layers, n_head=self.cfg.n_head,
                           dropout=self.cfg.dropout, activation=self.cfg.activation)

    def sequences(self, expr: str, n: int, seed: int) -> Tensor:
        a, b = sample_pairs(n, self.spec, torch.Generator().manual_seed(seed))
        return make_sequences(a, b, self.exprs[expr], self.spec)

    def base_data(self, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        """Training sequences of the base task, and validation and test sequences on pairs
        that training never shows (so the base gate measures the rule, not memory)."""
        gen = torch.Generator().manual_seed(seed)
        train = sample_pairs(self.cfg.base_samples, self.spec, gen)
        seen = torch.unique(pair_codes(*train, self.spec))
        held = self.spec.num_pairs - seen.numel()
        if held < 2 * self.cfg.base_val:
            raise ConfigError(
                f"base_samples={self.cfg.base_samples} leave {held} of {self.spec.num_pairs} "
                f"pairs unseen, fewer than the {2 * self.cfg.base_val} held-out validation and "
                "test pairs (2 x base_val) the base gate needs; lower base_samples or base_val, "
                "or raise numbers")
        val_test = sample_pairs(2 * self.cfg.base_val, self.spec, gen, exclude=seen,
                                unique=True, cover=False)
        k = self.cfg.base_val
        return tuple(make_sequences(a, b, self.exprs["base"], self.spec)  # type: ignore[return-value]
                     for a, b in (train, (val_test[0][:k], val_test[1][:k]),
                                  (val_test[0][k:], val_test[1][k:])))

    def prepare(self) -> list[str]:
        """Check the config against an earlier run in the same directory; record it."""
        problems = check_ambiguity(self.exprs["target"], self.alternatives, self.spec)
        mask = self.cfg.discovery.mask
        with torch.random.fork_rng(devices=[]):  # fail before training, not after it
            for layers in self.cfg.layers:
                select_parameters(self.build(layers), mask.targets, mask.exclude, mask.mask_bias)
        self.run.begin(to_dict(self.cfg), self.cfg.seed, self.log, mutable=["gates"])
        return problems

    # -- one attempt of one pipeline: base model, subnetwork, verification, gates --------------
    def base_phase(self, layers: int, replicate: int, attempt: int = 0) -> dict[str, Any]:
        """Phase 1: train the base model of this attempt unless its files exist; its record."""
        where = _attempt_dir(layers, replicate, attempt)
        if self.run.exists(f"{where}/base.json") and self.run.exists(f"{where}/base.safetensors"):
            return json.loads(self.run.path(f"{where}/base.json").read_text())
        seed = self.seed("base", layers, replicate, attempt)
        torch.manual_seed(seed)
        model = self.build(layers)
        train, val, test = self.base_data(seed)
        result = fit(model, [train], self.task.loss, self.cfg.base_fit, seed=seed,
                     evaluate=lambda m: self.task.accuracy(m, val),
                     desc=f"base L{layers} r{replicate}")
        info = {"layers": layers, "replicate": replicate, "attempt": attempt, "seed": seed,
                "val_accuracy": result.best_score, "test_accuracy": self.task.accuracy(model, test),
                "best_epoch": result.best_epoch, "history": result.history}
        save_model(self.run.path(f"{where}/base.safetensors"), model, {"layers": str(layers)})
        write_json(self.run.path(f"{where}/base.json"), info)
        self.log(f"base L{layers} r{replicate} a{attempt}: `{self.cfg.base}` held-out test "
                 f"accuracy {info['test_accuracy']:.3f} (epoch {result.best_epoch})")
        return info

    def base_model(self, layers: int, replicate: int, attempt: int) -> nn.Module:
        path = self.run.path(f"{_attempt_dir(layers, replicate, attempt)}/base.safetensors")
        model = self.build(layers)
        try:
            load_model(path, model)
        except FileFormatError as err:
            raise _unusable(err, path, "retrain it") from None
        return model.eval()

    def subnetwork(self, layers: int, replicate: int, attempt: int,
                   model: nn.Module) -> Subnetwork:
        """Phase 2: discover (or load) the subnetwork for the subtask."""
        path = self.run.path(f"{_attempt_dir(layers, replicate, attempt)}/subnetwork.safetensors")
        if not path.exists():
            seed = self.seed("discovery", layers, replicate, attempt)
            torch.manual_seed(seed)  # anything drawn from the global generator is seeded too
            data = self.sequences("subtask", self.cfg.subtask_samples, seed)
            sub, history = discover(model, [data], self.task.loss, self.cfg.discovery, seed=seed,
                                    desc=f"discover L{layers} r{replicate}")
            write_json(path.with_suffix(".json"), {"history": history})
            Subnetwork(sub.masks, sub.fingerprint,
                       {**sub.metadata, "subtask": self.cfg.subtask, "layers": str(layers)}
                       ).save(path)
        try:  # read back even when just written: a resumed run sees the same mask order
            sub = Subnetwork.load(path)
            sub.check_model(model)
        except (FileFormatError, SubnetworkMismatchError) as err:
            raise _unusable(err, path, "rediscover it") from None
        return sub

    def verify(self, layers: int, replicate: int, attempt: int, model: nn.Module,
               sub: Subnetwork) -> dict[str, Any]:
        """Phase 3: the subnetwork alone, ablated, and a same-size random ablation."""
        name = f"{_attempt_dir(layers, replicate, attempt)}/verify.json"
        if self.run.exists(name):
            return json.loads(self.run.path(name).read_text())
        seed = self.seed("verify", layers, replicate, attempt)
        sets = {kind: self.sequences(kind, 2000, seed + i)
                for i, kind in enumerate(("subtask", "base"))}
        metrics = {k: (lambda m, s=s: self.task.accuracy(m, s)) for k, s in sets.items()}
        result = verify_subnetwork(model, sub, metrics, seed)
        write_json(self.run.path(name), result)
        return result

    def attempt(self, layers: int, replicate: int, attempt: int) -> list[Gate]:
        """One attempt of a pipeline, up to the first gate it fails."""
        gates = self.cfg.gates
        base = self.base_phase(layers, replicate, attempt)
        checks = [Gate("base accuracy", base["test_accuracy"], gates.base_accuracy,
                       "the base model did not learn its task on held-out pairs: train longer "
                       "(base_fit.epochs), with more data (base_samples) or another lr")]
        if failed(checks) and gates.enforce:  # overridden gates still need every phase
            return checks
        model = self.base_model(layers, replicate, attempt)
        sub = self.subnetwork(layers, replicate, attempt, model)
        acc = self.verify(layers, replicate, attempt, model, sub)["accuracy"]
        alone = acc["subnetwork only"]["subtask"]
        margin = acc["random same-size ablated"]["base"] - acc["subnetwork ablated"]["base"]
        fix = ("discovery did not find a subnetwork for the subtask: train the masks longer "
               "(discovery.epochs) or with another lr or l0_lambda")
        return [*checks,
                Gate("subnetwork alone on subtask", alone, gates.subnetwork_accuracy, fix),
                Gate("ablation specificity", margin, gates.ablation_margin, fix)]

    def pipeline(self, layers: int, replicate: int) -> dict[str, Any]:
        """Attempts of one replicate until its gates pass (`pipeline.run_attempts`)."""
        return run_attempts(self.run, _pipeline_dir(layers, replicate),
                            lambda i: self.attempt(layers, replicate, i), self.cfg.gates,
                            self.log)

    # -- induction ------------------------------------------------------------------------------
    def transfer_source(self, layers: int, replicate: int, attempt: int
                        ) -> tuple[nn.Module, Subnetwork]:
        """The chosen attempt's base model and subnetwork, read once per process (cells never
        change them: every condition copies what it keeps)."""
        key = (layers, replicate, attempt)
        if key not in self._sources:
            model = self.base_model(layers, replicate, attempt)
            self._sources[key] = model, self.subnetwork(layers, replicate, attempt, model)
        return self._sources[key]

    def splits(self, replicate: int, seed: int) -> TargetSplits:
        return make_target_splits(self.exprs["target"], self.spec, max(self.cfg.grid),
                                  self.cfg.n_val, self.cfg.n_test,
                                  seed=self.seed("target", replicate, seed))

    def cell(self, layers: int, replicate: int, attempt: int, n: int, seed: int
             ) -> list[dict[str, Any]]:
        """Phase 4 unit of work: every condition trained on the same target data."""
        path = self.run.path(f"cells/L{layers}-r{replicate}-a{attempt}-n{n}-s{seed}.json")
        if path.exists():
            try:
                return json.loads(path.read_text())["rows"]
            except (ValueError, KeyError, TypeError) as err:
                raise _unusable(FileFormatError(f"{path} is not a finished cell ({err})"), path,
                                "recompute it") from None
        trained, sub = self.transfer_source(layers, replicate, attempt)
        splits = self.splits(replicate, seed)
        train, val, test = splits.train_sequences(n), splits.val_sequences(), \
            splits.test_sequences()
        run_seed = self.seed("cell", layers, replicate, n, seed)
        rows = []
        for condition in self.cfg.conditions:
            torch.manual_seed(run_seed)  # dropout: the same draws in a fresh or resumed run
            model = starting_model(condition, trained, sub, run_seed, freeze=self.cfg.freeze)
            result = fit(model, [train], self.task.loss, self.cfg.induction_fit, seed=run_seed,
                         evaluate=lambda m, v=val: self.task.accuracy(m, v),
                         desc=f"{condition} L{layers} r{replicate} n={n} s{seed}")
            pred = self.task.predict(model, test)
            row = {"layers": layers, "replicate": replicate, "n": n, "seed": seed,
                   "condition": condition,
                   "test_accuracy": _acc(pred, test, self.exprs["target"], self.spec),
                   "val_accuracy": result.best_score, "best_epoch": result.best_epoch}
            for alt in self.alternatives:
                row[f"accuracy[{alt}]"] = _acc(pred, test, alt, self.spec)
            rows.append(row)
        write_json(path, {"rows": rows})
        return rows

    def execute(self) -> dict[str, Any]:
        """Run every phase (resuming finished work) and write the report."""
        problems = self.prepare()
        for problem in problems:
            self.log(f"warning: {problem}")
        cfg = self.cfg
        units = [(d, r) for d in cfg.layers for r in range(cfg.replicates)]
        jobs = [(to_dict(cfg), str(self.run.root), self.threads, "pipeline", unit)
                for unit in units]
        chosen = dict(zip(units, self._map(jobs, "pipelines"), strict=True))
        for (d, r), record in chosen.items():
            gates = record["attempts"][record["attempt"]]["gates"]
            self.log(f"pipeline L{d}-r{r}: attempt {record['attempt']} of "
                     f"{len(record['attempts'])}; " + ", ".join(
                         f"{g['name']} {g['value']:.3f}" for g in gates))
        cells = [(d, r, chosen[d, r]["attempt"], n, s) for d, r in units
                 for s in range(cfg.seeds) for n in cfg.grid]
        jobs = [(to_dict(cfg), str(self.run.root), self.threads, "cell", c) for c in cells]
        rows = [row for cell_rows in self._map(jobs, "induction", cost=lambda j: j[4][3])
                for row in cell_rows]
        verify = {f"L{d}-r{r}": json.loads(self.run.path(
            f"{_attempt_dir(d, r, chosen[d, r]['attempt'])}/verify.json").read_text())
            for d, r in units}
        write_json(self.run.path("verify.json"), verify)
        outputs = [f"{_attempt_dir(d, r, c['attempt'])}/{name}" for (d, r), c in chosen.items()
                   for name in ("base.safetensors", "base.json", "subnetwork.safetensors",
                                "subnetwork.json", "verify.json")]
        outputs += [f"{_pipeline_dir(d, r)}/attempts.json" for d, r in units]
        outputs += [f"cells/L{d}-r{r}-a{i}-n{n}-s{s}.json" for d, r, i, n, s in cells]
        self.run.record_outputs(outputs)
        return write_report(self.run, cfg, rows, verify, problems,
                            {f"L{d}-r{r}": c for (d, r), c in chosen.items()},
                            to_dict(ArithmeticConfig()), to_dict(cfg))

    def _map(self, jobs: list[tuple], desc: str, cost=None) -> list[Any]:
        """Run pipeline or cell jobs here (one worker) or in worker processes."""
        if self.workers > 1:
            return map_cells(_worker, jobs, self.workers, desc, cost=cost)
        return map_cells(lambda job: _do(self, job[3], job[4]), jobs, 1, desc)


def _pipeline_dir(layers: int, replicate: int) -> str:
    return f"pipelines/L{layers}-r{replicate}"


def _attempt_dir(layers: int, replicate: int, attempt: int) -> str:
    return f"{_pipeline_dir(layers, replicate)}/a{attempt}"


def _unusable(err: Exception, path: Path, redo: str) -> FileFormatError:
    """A damaged or foreign file in the run directory: say which, and how to redo it."""
    return FileFormatError(f"{err}; delete {path} and rerun the same command to {redo}")


def _acc(pred: Tensor, seqs: Tensor, expr: Expression, spec: ArithmeticSpec) -> float:
    """Fraction of predictions equal to `expr` on the test pairs (target or an alternative)."""
    truth = expr.evaluate(seqs[:, 0], seqs[:, 1], spec.modulus)
    return (pred == truth).float().mean().item()


def _do(run: ArithmeticRun, kind: str, unit: tuple) -> Any:
    return run.pipeline(*unit) if kind == "pipeline" else run.cell(*unit)


def _worker(job: tuple) -> Any:
    """A pipeline or an induction cell in a worker process (it reads what earlier phases
    wrote to the run directory)."""
    config, out, threads, kind, unit = job
    torch.set_num_threads(threads)
    run = ArithmeticRun(from_dict(ArithmeticConfig, config), out, log=lambda _: None)
    return _do(run, kind, unit)


def run_arithmetic(cfg: ArithmeticConfig, out: str | Path, log=print, threads: int = 1,
                   workers: int = 1) -> dict[str, Any]:
    """Run the whole experiment into `out`; returns the summary.

    `threads` sets torch's intra-op threads per process: these models are tiny, and one thread
    is fastest (more threads spin against each other on a busy machine). `workers` processes
    run pipelines and induction cells side by side; results do not depend on either.
    """
    torch.set_num_threads(threads)
    return ArithmeticRun(cfg, out, log, threads, workers).execute()


__all__ = ["PRESETS", "ArithmeticConfig", "ArithmeticGates", "ArithmeticRun", "load_config",
           "run_arithmetic"]
