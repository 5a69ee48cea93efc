"""Experiment A of the paper: modular arithmetic data efficiency with a GPT-2 decoder.

Phases (each skipped when its output exists, so an interrupted run resumes), for each depth and
each of `replicates` independent pipelines: train the base model on `base`, discover the
subnetwork for `subtask`, verify it, and check the gates (a failed gate retries the pipeline
with the next seed); then the induction sweep on `target` (cells of depth x replicate x n x
seed, all conditions on the same data), and the report with intervals over replicates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from instill.batched import discover_batched, fit_batched
from instill.checkpoint import load_model, save_model
from instill.core import Subnetwork
from instill.core.targets import select_parameters
from instill.errors import FileFormatError, SubnetworkMismatchError
from instill.experiments.arithmetic_config import (
    PRESETS,
    ArithmeticConfig,
    ArithmeticGates,
    load_config,
)
from instill.experiments.arithmetic_report import write_report
from instill.experiments.common import (
    CONDITIONS,
    at_density,
    density_tag,
    starting_model,
    verify_subnetwork,
)
from instill.experiments.executors import Executor, LocalExecutor
from instill.experiments.framework import Cell, Experiment, once, read_json, unusable
from instill.experiments.pipeline import Gate, failed
from instill.models import build_model
from instill.runio import to_dict
from instill.storage import write_json
from instill.tasks.arithmetic import (
    ArithmeticSpec,
    TargetSplits,
    base_splits,
    check_ambiguity,
    make_sequences,
    make_target_splits,
    sample_pairs,
)
from instill.tasks.expr import Expression, parse
from instill.tasks.sequences import SequenceTask
from instill.training import DiscoveryConfig, FitResult, discover, fit


@dataclass
class _Induction:
    """One induction model ready to train: its cell, result name, data, seed and validation."""

    unit: tuple
    name: str
    model: nn.Module
    train: Tensor
    val: Tensor
    test: Tensor
    seed: int
    evaluate: Callable[[nn.Module], float]
    desc: str


# -- phases -----------------------------------------------------------------------------------
class ArithmeticRun(Experiment):
    """One run directory of the experiment, on the shared seam (`framework.Experiment`).

    Layout: `pipelines/L{d}-r{r}/a{i}/` holds attempt i of replicate r at depth d (its base
    model, subnetwork and verification; `attempts.json` beside it records every attempt's
    gates), and `cells/L{d}-r{r}-a{i}-n{n}-s{s}.json` the induction cells of the chosen attempt.
    """

    name = "arithmetic"
    config_class = ArithmeticConfig

    def __init__(self, cfg: ArithmeticConfig, out: str | Path, log=print, **options: Any) -> None:
        super().__init__(cfg, out, log, **options)
        self.spec = cfg.spec
        self.task = SequenceTask(self.spec, cfg.loss)
        self.exprs: dict[str, Expression] = {
            "base": parse(cfg.base), "subtask": parse(cfg.subtask), "target": parse(cfg.target)}
        self.alternatives = [parse(a) for a in cfg.alternatives]
        self._sources: dict[tuple, tuple[nn.Module, Subnetwork]] = {}

    def build(self, layers: int) -> nn.Module:
        return build_model("gpt2", vocab_size=self.spec.vocab_size, n_positions=4,
                           n_embd=self.cfg.n_embd, n_layer=layers, n_head=self.cfg.n_head,
                           dropout=self.cfg.dropout, activation=self.cfg.activation
                           ).to(self.device)

    def sequences(self, expr: str, n: int, seed: int) -> Tensor:
        a, b = sample_pairs(n, self.spec, torch.Generator().manual_seed(seed))
        return make_sequences(a, b, self.exprs[expr], self.spec).to(self.device)

    def base_data(self, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        """Training, held-out validation and held-out test sequences of the base task."""
        return tuple(s.to(self.device) for s in base_splits(  # type: ignore[return-value]
            self.exprs["base"], self.spec, self.cfg.base_samples, self.cfg.base_val, seed))

    def prepare(self) -> list[str]:
        """Fail on targets that match nothing before training; warn of ambiguous targets."""
        mask = self.cfg.discovery.mask
        with torch.random.fork_rng(devices=[]):
            for layers in self.cfg.layers:
                select_parameters(self.build(layers), mask.targets, mask.exclude, mask.mask_bias)
        return check_ambiguity(self.exprs["target"], self.alternatives, self.spec)

    def pipelines(self) -> list[tuple[int, int]]:
        return [(d, r) for d in self.cfg.layers for r in range(self.cfg.replicates)]

    def pipeline_dir(self, unit: tuple) -> str:
        layers, replicate = unit
        return f"pipelines/L{layers}-r{replicate}"

    # -- one attempt of one pipeline: base model, subnetwork, verification, gates --------------
    def base_phase(self, layers: int, replicate: int, attempt: int = 0) -> dict[str, Any]:
        """Phase 1: train the base model of this attempt unless its files exist; its record."""
        where = self.attempt_dir((layers, replicate), attempt)
        once(self.run, [f"{where}/base.json", f"{where}/base.safetensors"],
             lambda: self._train_base(layers, replicate, attempt, where))
        return read_json(self.run, f"{where}/base.json", "retrain it")

    def _train_base(self, layers: int, replicate: int, attempt: int, where: str) -> None:
        model, seed, (train, val, test) = self._base_job(layers, replicate, attempt)
        result = fit(model, [train], self.task.loss, self.cfg.base_fit, seed=seed,
                     evaluate=lambda m: self.task.accuracy(m, val),
                     desc=f"base L{layers} r{replicate}")
        self._save_base(layers, replicate, attempt, model, seed, test, result)

    def _base_job(self, layers: int, replicate: int, attempt: int
                  ) -> tuple[nn.Module, int, tuple[Tensor, Tensor, Tensor]]:
        """A base model as initialized for this attempt, its seed and its data."""
        seed = self.seed("base", layers, replicate, attempt)
        torch.manual_seed(seed)
        return self.build(layers), seed, self.base_data(seed)

    def _save_base(self, layers: int, replicate: int, attempt: int, model: nn.Module,
                   seed: int, test: Tensor, result: FitResult) -> None:
        where = self.attempt_dir((layers, replicate), attempt)
        info = {"layers": layers, "replicate": replicate, "attempt": attempt, "seed": seed,
                "val_accuracy": result.best_score, "test_accuracy": self.task.accuracy(model, test),
                "best_epoch": result.best_epoch, "history": result.history}
        save_model(self.run.path(f"{where}/base.safetensors"), model, {"layers": str(layers)})
        write_json(self.run.path(f"{where}/base.json"), info)
        self.log(f"base L{layers} r{replicate} a{attempt}: `{self.cfg.base}` held-out test "
                 f"accuracy {info['test_accuracy']:.3f} (epoch {result.best_epoch})")

    def base_model(self, layers: int, replicate: int, attempt: int) -> nn.Module:
        path = self.run.path(f"{self.attempt_dir((layers, replicate), attempt)}/base.safetensors")
        model = self.build(layers)
        try:
            load_model(path, model)
        except FileFormatError as err:
            raise unusable(err, path, "retrain it") from None
        return model.eval()

    def subnetwork(self, layers: int, replicate: int, attempt: int, model: nn.Module,
                   target: float | None = None) -> Subnetwork:
        """Phase 2: discover (or load) the subnetwork for the subtask, at the `target` density
        (None: wherever discovery lands)."""
        name = f"{self.attempt_dir((layers, replicate), attempt)}/subnetwork{density_tag(target)}" \
            ".safetensors"
        once(self.run, [name],
             lambda: self._discover(layers, replicate, attempt, model, name, target))
        path = self.run.path(name)
        try:  # read back even when just written: a resumed run sees the same mask order
            sub = Subnetwork.load(path)
            sub.check_model(model)
        except (FileFormatError, SubnetworkMismatchError) as err:
            raise unusable(err, path, "rediscover it") from None
        return sub

    def _discover(self, layers: int, replicate: int, attempt: int, model: nn.Module,
                  name: str, target: float | None) -> None:
        cfg, data, evaluate, seed, desc = self._discovery_job(layers, replicate, attempt, target)
        sub, history = discover(model, [data], self.task.loss, cfg, evaluate=evaluate,
                                seed=seed, desc=desc)
        self._save_subnetwork(name, sub, history, layers, target)

    def _discovery_job(self, layers: int, replicate: int, attempt: int, target: float | None
                       ) -> tuple[DiscoveryConfig, Tensor, Callable | None, int, str]:
        """The discovery settings, subtask data, held-out scorer (with `keep_best`), seed and
        name of one discovery."""
        tag = () if target is None else (density_tag(target),)
        seed = self.seed("discovery", layers, replicate, attempt, *tag)
        torch.manual_seed(seed)  # anything drawn from the global generator is seeded too
        data = self.sequences("subtask", self.cfg.subtask_samples, seed)
        cfg = self.cfg.discovery
        if target is not None:
            mask = cfg.mask if self.cfg.density_l0_lambda is None else replace(
                cfg.mask, l0_lambda=self.cfg.density_l0_lambda)
            cfg = replace(cfg, target_density=target, mask=mask)
        evaluate = None
        if cfg.keep_best:  # held-out subtask pairs pick the epoch, as the reference does
            held_out = self.sequences("subtask", 2000, self.seed("discovery-val", layers,
                                                                 replicate, attempt, *tag))
            evaluate = lambda m: self.task.accuracy(m, held_out)  # noqa: E731
        return cfg, data, evaluate, seed, f"discover L{layers} r{replicate}{''.join(tag)}"

    def _save_subnetwork(self, name: str, sub: Subnetwork, history: list[dict], layers: int,
                         target: float | None) -> None:
        path = self.run.path(name)
        write_json(path.with_suffix(".json"), {"history": history})
        Subnetwork(sub.masks, sub.fingerprint,
                   {**sub.metadata, "subtask": self.cfg.subtask, "layers": str(layers),
                    **({"target_density": str(target)} if target is not None else {})}
                   ).save(path)

    def prefetch(self, units: list[tuple]) -> None:
        """With `pipeline_batch` > 1, the first attempt's base models of each depth train as
        vmapped stacks, then their discoveries (each density) do; the pipelines then find
        them done. Each model is what its one-at-a-time phase gives, within float rounding
        (exactly its dropout with `base_fit.dropout_rng: counter`)."""
        size = self.cfg.pipeline_batch
        if size <= 1:
            return
        for layers in self.cfg.layers:
            reps = [r for d, r in units if d == layers]
            for chunk in (reps[i:i + size] for i in range(0, len(reps), size)):
                self._prefetch_bases(layers, chunk)
                passed = [r for r in chunk if self.gates_allow_discovery(layers, r)]
                if len(passed) < 2:
                    continue
                for target in self.cfg.densities:
                    self._prefetch_discoveries(layers, passed, target)

    def _prefetch_bases(self, layers: int, reps: list[int]) -> None:
        todo = [r for r in reps if not self.run.exists(
            f"{self.attempt_dir((layers, r), 0)}/base.safetensors")]
        if len(todo) < 2:
            return
        jobs = [self._base_job(layers, r, 0) for r in todo]
        torch.manual_seed(jobs[0][1])  # torch dropout draws for the whole stack
        results = fit_batched([j[0] for j in jobs], [[j[2][0]] for j in jobs], self.task.loss,
                              self.cfg.base_fit, seeds=[j[1] for j in jobs],
                              score=(self.task.score, [[j[2][1]] for j in jobs]),
                              desc=f"{len(jobs)} base models, L{layers}")
        for r, (model, seed, data), result in zip(todo, jobs, results, strict=True):
            self._save_base(layers, r, 0, model, seed, data[2], result)

    def gates_allow_discovery(self, layers: int, replicate: int) -> bool:
        """Whether attempt 0's base model passed its gate (or gates are not enforced), so
        its pipeline goes on to discovery."""
        name = f"{self.attempt_dir((layers, replicate), 0)}/base.json"
        if not self.run.exists(name):  # left to its pipeline
            return False
        return not self.cfg.gates.enforce or \
            read_json(self.run, name)["test_accuracy"] >= self.cfg.gates.base_accuracy

    def _prefetch_discoveries(self, layers: int, reps: list[int], target: float | None) -> None:
        names = {r: f"{self.attempt_dir((layers, r), 0)}/subnetwork{density_tag(target)}"
                    ".safetensors" for r in reps}
        todo = [r for r in reps if not self.run.exists(names[r])]
        if len(todo) < 2:
            return
        jobs = [self._discovery_job(layers, r, 0, target) for r in todo]
        cfg = jobs[0][0]
        found = discover_batched([self.base_model(layers, r, 0) for r in todo],
                                 [[job[1]] for job in jobs], self.task.loss, cfg,
                                 seeds=[job[3] for job in jobs],
                                 evaluate=[job[2] for job in jobs] if cfg.keep_best else None,
                                 desc=f"{len(jobs)} discoveries, L{layers}")
        for r, (sub, history) in zip(todo, found, strict=True):
            self._save_subnetwork(names[r], sub, history, layers, target)

    def verify(self, layers: int, replicate: int, attempt: int, model: nn.Module,
               sub: Subnetwork, target: float | None = None) -> dict[str, Any]:
        """Phase 3: the subnetwork alone, ablated, and a same-size random ablation."""
        name = f"{self.attempt_dir((layers, replicate), attempt)}/verify{density_tag(target)}.json"

        def compute() -> None:
            seed = self.seed("verify", layers, replicate, attempt)
            sets = {kind: self.sequences(kind, 2000, seed + i)
                    for i, kind in enumerate(("subtask", "base"))}
            metrics = {k: (lambda m, s=s: self.task.accuracy(m, s)) for k, s in sets.items()}
            write_json(self.run.path(name), verify_subnetwork(model, sub, metrics, seed))

        once(self.run, [name], compute)
        return read_json(self.run, name)

    def attempt(self, unit: tuple, attempt: int) -> list[Gate]:
        """One attempt of a pipeline, up to the first gate it fails."""
        (layers, replicate), gates = unit, self.cfg.gates
        base = self.base_phase(layers, replicate, attempt)
        checks = [Gate("base accuracy", base["test_accuracy"], gates.base_accuracy,
                       "the base model did not learn its task on held-out pairs: train longer "
                       "(base_fit.epochs), with more data (base_samples) or another lr")]
        if failed(checks):
            return checks
        fix = ("discovery did not find a subnetwork for the subtask: train the masks longer "
               "(discovery.epochs) or with another lr or l0_lambda")
        for target, record in self.complete(unit, attempt).items():
            acc, where = record["accuracy"], "" if target is None else f" at {target:g}"
            hint = fix if target is None else fix + f", or a target density above {target:g}"
            margin = acc["random same-size ablated"]["base"] - acc["subnetwork ablated"]["base"]
            checks += [Gate(f"subnetwork alone on subtask{where}", acc["subnetwork only"]
                            ["subtask"], gates.subnetwork_accuracy, hint),
                       Gate(f"ablation specificity{where}", margin,
                            gates.ablation_threshold(target), hint)]
        return checks

    def complete(self, unit: tuple, attempt: int) -> dict[float | None, dict[str, Any]]:
        """The subnetworks and verifications of an attempt at every density (the cells need
        them even when gates are overridden after a failed base model)."""
        model = self.base_model(*unit, attempt)
        return {t: self.verify(*unit, attempt, model, self.subnetwork(*unit, attempt, model, t),
                               t) for t in self.cfg.densities}

    # -- induction ------------------------------------------------------------------------------
    def transfer_source(self, layers: int, replicate: int, attempt: int,
                        target: float | None) -> tuple[nn.Module, Subnetwork]:
        """The chosen attempt's base model and its subnetwork at `target`, read once per process
        (cells never change them: every condition copies what it keeps)."""
        key = (layers, replicate, attempt, target)
        if key not in self._sources:
            model = self.base_model(layers, replicate, attempt)
            self._sources[key] = model, self.subnetwork(layers, replicate, attempt, model, target)
        return self._sources[key]

    def splits(self, replicate: int, seed: int) -> TargetSplits:
        return make_target_splits(self.exprs["target"], self.spec, max(self.cfg.grid),
                                  self.cfg.n_val, self.cfg.n_test,
                                  seed=self.seed("target", replicate, seed))

    def cells(self, chosen: dict[tuple, dict[str, Any]]) -> list[Cell]:
        """Every (pipeline, seed, n, condition), a condition that uses the subnetwork once per
        density: one model trained on the target data (conditions of a (pipeline, seed, n)
        share that data)."""
        out = []
        for (d, r), record in chosen.items():
            where, i = self.attempt_dir((d, r), record["attempt"]), record["attempt"]
            for s in range(self.cfg.seeds):
                for n in self.cfg.grid:
                    for condition in self.cfg.conditions:
                        targets = self.cfg.densities if CONDITIONS[condition].uses_mask \
                            else self.cfg.densities[:1]
                        for t in targets:
                            name = at_density(condition, t) if CONDITIONS[condition].uses_mask \
                                else condition
                            out.append(Cell(
                                f"L{d}-r{r}-a{i}-n{n}-s{s}-{name}", (d, r, i, n, s, condition, t),
                                (f"{where}/base.safetensors",
                                 f"{where}/subnetwork{density_tag(t)}.safetensors"),
                                self.cfg.numbers + n))
        return out

    def cell(self, layers: int, replicate: int, attempt: int, n: int, seed: int,
             condition: str, target: float | None) -> dict[str, Any]:
        """Phase 4 unit of work: one condition trained on the target data of (pipeline, n,
        seed); its row. Seeds depend on (pipeline, n, seed) only, so every condition of that
        data starts from the same fresh weights and draws the same dropout."""
        job = self._induction((layers, replicate, attempt, n, seed, condition, target))
        torch.manual_seed(job.seed)  # dropout: the same draws in a fresh or resumed run
        result = fit(job.model, [job.train], self.task.loss, self.cfg.induction_fit,
                     seed=job.seed, evaluate=job.evaluate, desc=job.desc)
        return self._record(job, result)

    def cell_groups(self, cells: list[Cell]) -> list[list[Cell]]:
        """With `induction_batch` > 1, the cells of one depth and n (models of one shape on as
        many samples) in stacks of up to that many models; else one cell each."""
        size = self.cfg.induction_batch
        if size <= 1:
            return super().cell_groups(cells)
        by: dict[tuple[int, int], list[Cell]] = {}
        for cell in cells:
            by.setdefault((cell.unit[0], cell.unit[3]), []).append(cell)
        return [group[i:i + size] for group in by.values() for i in range(0, len(group), size)]

    def cell_batch(self, *units: tuple) -> list[dict[str, Any]]:
        """Cells of one depth and n trained as one vmapped stack (`fit_batched`): each model
        as its own `fit` would, within float rounding (exactly its dropout with
        `induction_fit.dropout_rng: counter`)."""
        if len(units) == 1:
            return [self.cell(*units[0])]
        jobs = [self._induction(unit) for unit in units]
        torch.manual_seed(jobs[0].seed)  # torch dropout draws for the whole stack
        results = fit_batched([j.model for j in jobs], [[j.train] for j in jobs],
                              self.task.loss, self.cfg.induction_fit,
                              seeds=[j.seed for j in jobs],
                              score=(self.task.score, [[j.val] for j in jobs]),
                              desc=f"{len(jobs)} models, L{units[0][0]} n={units[0][3]}")
        return [self._record(j, r) for j, r in zip(jobs, results, strict=True)]

    def _induction(self, unit: tuple) -> _Induction:
        """A cell's starting model, data and seed."""
        layers, replicate, attempt, n, seed, condition, target = unit
        trained, sub = self.transfer_source(layers, replicate, attempt, target)
        splits = self.splits(replicate, seed)
        train, val, test = (s.to(self.device) for s in (
            splits.train_sequences(n), splits.val_sequences(), splits.test_sequences()))
        run_seed = self.seed("cell", layers, replicate, n, seed)
        name = at_density(condition, target) if CONDITIONS[condition].uses_mask else condition
        model = starting_model(condition, trained, sub, run_seed, freeze=self.cfg.freeze)
        return _Induction(unit, name, model, train, val, test, run_seed,
                          lambda m: self.task.accuracy(m, val),
                          f"{name} L{layers} r{replicate} n={n} s{seed}")

    def _record(self, job: _Induction, result: FitResult) -> dict[str, Any]:
        """A trained cell's row: target and alternative accuracies on the test pairs."""
        layers, replicate, _, n, seed, _, _ = job.unit
        pred = self.task.predict(job.model, job.test)
        row = {"layers": layers, "replicate": replicate, "n": n, "seed": seed,
               "condition": job.name,
               "test_accuracy": _acc(pred, job.test, self.exprs["target"], self.spec),
               "val_accuracy": result.best_score, "best_epoch": result.best_epoch}
        for alt in self.alternatives:
            row[f"accuracy[{alt}]"] = _acc(pred, job.test, alt, self.spec)
        return {"rows": [row]}

    def report(self, chosen: dict[tuple, dict[str, Any]], cells: list[Cell],
               records: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [row for record in records for row in record["rows"]]
        verify = {f"L{d}-r{r}{density_tag(t)}": read_json(
            self.run, f"{self.attempt_dir((d, r), c['attempt'])}/verify{density_tag(t)}.json")
            for (d, r), c in chosen.items() for t in self.cfg.densities}
        write_json(self.run.path("verify.json"), verify)
        return write_report(self.run, self.cfg, rows, verify, self.warnings,
                            {f"L{d}-r{r}": c for (d, r), c in chosen.items()},
                            to_dict(ArithmeticConfig()), to_dict(self.cfg))


def _acc(pred: Tensor, seqs: Tensor, expr: Expression, spec: ArithmeticSpec) -> float:
    """Fraction of predictions equal to `expr` on the test pairs (target or an alternative)."""
    truth = expr.evaluate(seqs[:, 0], seqs[:, 1], spec.modulus)
    return (pred == truth).float().mean().item()


def run_arithmetic(cfg: ArithmeticConfig, out: str | Path, log=print, threads: int = 1,
                   workers: int = 1, device: str = "cpu",
                   executor: Executor | None = None) -> dict[str, Any]:
    """Run the whole experiment into `out`; returns the summary.

    `threads` sets torch's intra-op threads per process: these models are tiny, and one thread
    is fastest (more threads spin against each other on a busy machine). `workers` processes
    (or `executor`, e.g. a Ray cluster) run pipelines and induction cells side by side on
    `device`; results do not depend on either.
    """
    torch.set_num_threads(threads)
    return ArithmeticRun(cfg, out, log, threads=threads, device=device,
                         executor=executor or LocalExecutor(workers)).execute()


__all__ = ["PRESETS", "ArithmeticConfig", "ArithmeticGates", "ArithmeticRun", "load_config",
           "run_arithmetic"]
