"""Continual learning by parameter isolation with discovered subnetworks (`instill continual`).

A sequence of arithmetic tasks `[TASK_t, a, b, SEP, y]` (one GPT-2, one vocabulary; the task
token says which expression) is learnt task after task by every method on the same data, the
same initial model and the same training budget:

- `subnetwork` (ours): train task t on the free weights (`isolate`), discover its subnetwork
  among them by continuous sparsification (earlier tasks' weights held on), claim and freeze it,
  retrain only its weights, and go on; `-reinit` re-initializes the free weights before each
  task instead of keeping their trained values. Task t is evaluated with exactly the weights of
  tasks <= t (`task_view`).
- `packnet`: the same loop with magnitude pruning to `packnet_keep` of the free weights.
- `finetune`: plain sequential fine-tuning (the forgetting baseline); `joint`: all tasks at once
  (the upper bound); `independent`: each task from the initial model alone (the reference of
  forward transfer).

Pipelines are (replicate, method); each (method, task) step is cached in the run directory, so
an interrupted run resumes per step. Cells read the steps' records back as rows for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from instill.checkpoint import load_model, save_model
from instill.core import MaskConfig, Subnetwork, attach_masks, bake
from instill.core.isolation import Allocation, CapacityError, isolate, packnet_prune, task_view
from instill.errors import ConfigError, ExpressionError, FileFormatError
from instill.experiments.common import layered_config
from instill.experiments.continual_report import write_report
from instill.experiments.executors import Executor, LocalExecutor
from instill.experiments.framework import Cell, Experiment, once, read_json, unusable
from instill.experiments.pipeline import Gate, GatePolicy
from instill.models import build_model, check_activation, check_heads
from instill.storage import write_json
from instill.tasks.expr import parse
from instill.tasks.task_sequences import TaskTokenSpec, TaskTokenTask, all_pairs, task_sequences
from instill.training import DiscoveryConfig, FitConfig, fit, make_optimizer, run_epoch

METHODS = ("subnetwork", "subnetwork-reinit", "packnet", "packnet-reinit", "finetune", "joint",
           "independent")
ISOLATION = ("subnetwork", "packnet")
HELD_ON = 10.0  # mask logit of weights earlier tasks own: sigmoid(10 * beta) ~ 1, never trained


@dataclass
class ContinualGates(GatePolicy):
    """Each task must be learnt by its own training before the sequence goes on."""

    task_accuracy: float = 0.9  # accuracy of the trained model on task t right after training


@dataclass
class ContinualConfig:
    """Everything that defines a continual run; the defaults are the `paper` preset."""

    task: str = "arithmetic"
    sequence: list[str] = field(default_factory=lambda: ["a + b", "a*b", "a^2 + b", "a - b"])
    numbers: int = 11
    modulus: int = 11
    repeat: int = 16  # copies of the numbers^2 pairs in one training epoch
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    packnet_keep: float = 0.25  # PackNet: fraction of the free weights each task keeps
    min_free: float = 0.01  # stop with CapacityError when less is free before a task
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    dropout: float = 0.0
    activation: str = "gelu_pytorch_tanh"
    seed: int = 0
    replicates: int = 8
    gates: ContinualGates = field(default_factory=ContinualGates)
    fit: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=60, batch_size=64, lr=3e-3, weight_decay=0.01, stop_at=1.0, fused=True))
    retrain: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=10, batch_size=64, lr=1e-3, weight_decay=0.0, stop_at=1.0, fused=True))
    discovery: DiscoveryConfig = field(default_factory=lambda: DiscoveryConfig(
        epochs=15, batch_size=128, lr=1e-2, final_temperature=100.0, fused=True,
        mask=MaskConfig(l0_lambda=1e-5, init=-0.1)))

    def __post_init__(self) -> None:
        if self.task != "arithmetic":
            raise ConfigError(f"task {self.task!r} is not available yet; use task=arithmetic "
                              "(the shapes sequence is not implemented)")
        if len(self.sequence) < 2:
            raise ConfigError(f"sequence needs at least two tasks, got {self.sequence}")
        for i, text in enumerate(self.sequence):
            try:
                parse(text)
            except ExpressionError as err:
                raise ConfigError(f"sequence[{i}]: {err}") from None
        self.spec  # noqa: B018  (validates numbers and modulus)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods must be distinct names from {list(METHODS)}, got "
                              f"{self.methods}")
        if not 0 < self.packnet_keep < 1:
            raise ConfigError(f"packnet_keep must be in (0, 1), got {self.packnet_keep}")
        if not 0 <= self.min_free < 1:
            raise ConfigError(f"min_free must be in [0, 1), got {self.min_free}")
        left = (1 - self.packnet_keep) ** (len(self.sequence) - 1)
        if any(m.startswith("packnet") for m in self.methods) and left < self.min_free:
            raise CapacityError(
                f"packnet keeps {self.packnet_keep:.0%} of the free weights per task, so only "
                f"{left:.2%} are free before task {len(self.sequence) - 1} (min_free "
                f"{self.min_free:.0%}); lower packnet_keep, use fewer tasks or lower min_free")
        mask = self.discovery.mask
        if mask.method != "continuous_sparsification" or mask.granularity != "weight":
            raise ConfigError("discovery.mask must use method continuous_sparsification at "
                              "granularity weight (earlier tasks' weights are held on per weight)")
        check_activation(self.activation)
        check_heads(self.n_embd, self.n_head)
        if self.replicates < 1 or self.repeat < 1:
            raise ConfigError(f"replicates and repeat must be >= 1, got {self.replicates}, "
                              f"{self.repeat}")

    @property
    def spec(self) -> TaskTokenSpec:
        return TaskTokenSpec(self.numbers, self.modulus, len(self.sequence))


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "quick": {
        "replicates": 5,
        "methods": ["subnetwork", "subnetwork-reinit", "packnet", "finetune", "joint",
                    "independent"],
        "fit": {"epochs": 40},
    },
}


def load_config(preset: str | None = "paper", file_values: dict | None = None,
                overrides: dict | None = None) -> ContinualConfig:
    """Defaults, then the preset, then a config file's values, then command-line overrides."""
    return layered_config(ContinualConfig, PRESETS, preset, file_values, overrides,
                          "continual config")


def method_parts(method: str) -> tuple[str, bool]:
    """('subnetwork', True) for 'subnetwork-reinit': the base method and whether free weights
    are re-initialized before each task."""
    base, _, suffix = method.partition("-")
    return base, suffix == "reinit"


def discover_free(model: nn.Module, alloc: Allocation, data: Tensor, loss_fn, cfg:
                  DiscoveryConfig, seed: int) -> Subnetwork:
    """Continuous sparsification over the free weights of `model`; weights earlier tasks own
    are held on (logit HELD_ON, gradient zeroed), so the mask is learnt for task t's view."""
    masked = attach_masks(model, cfg.mask)
    free = alloc.free().masks
    try:
        for name, mask in masked.masks.items():
            keep = free[name].to(mask.logits.device)
            with torch.no_grad():
                mask.logits.masked_fill_(~keep, HELD_ON)
            mask.logits.register_hook(lambda g, k=keep: g * k)
        growth = cfg.final_temperature ** (1 / cfg.epochs)
        opt = make_optimizer(masked.mask_parameters(), FitConfig(
            lr=cfg.lr, weight_decay=cfg.mask.weight_decay, fused=cfg.fused))
        gen = torch.Generator().manual_seed(seed)

        def penalized(m: nn.Module, batch) -> Tensor:
            return loss_fn(m, batch) + masked.l0_penalty()

        for epoch in range(cfg.epochs):
            run_epoch(masked, [data], penalized, opt, cfg.batch_size, gen, epoch)
            masked.temperature *= growth
        return masked.subnetwork() & alloc.free()
    finally:
        masked.detach_masks()


class ContinualRun(Experiment):
    """One run directory: `pipelines/r{r}-{method}/a{i}/task{t}.{json,safetensors}` (the model
    after task t, and for isolation methods `alloc{t}.safetensors`, the owner map), and
    `cells/r{r}-{method}.json` with the accuracy matrix rows of the chosen attempt."""

    name = "continual"
    config_class = ContinualConfig

    def __init__(self, cfg: ContinualConfig, out: str | Path, log=print, **options: Any) -> None:
        super().__init__(cfg, out, log, **options)
        self.spec, self.task = cfg.spec, TaskTokenTask()
        self.exprs = [parse(e) for e in cfg.sequence]
        a, b = all_pairs(cfg.numbers)
        self.evals = [task_sequences(a, b, e, t, self.spec).to(self.device)
                      for t, e in enumerate(self.exprs)]
        self.trains = [s.repeat(cfg.repeat, 1) for s in self.evals]
        mask = cfg.discovery.mask
        self.targets = (mask.targets, mask.exclude, mask.mask_bias)

    # -- pieces ----------------------------------------------------------------------------
    def build(self) -> nn.Module:
        return build_model("gpt2", vocab_size=self.spec.vocab_size, n_positions=5,
                           n_embd=self.cfg.n_embd, n_layer=self.cfg.n_layer,
                           n_head=self.cfg.n_head, dropout=self.cfg.dropout,
                           activation=self.cfg.activation).to(self.device)

    def initial(self, replicate: int, attempt: int) -> nn.Module:
        """The replicate's initial model: the same for every method (paired comparisons)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed("init", replicate, attempt))
            return self.build()

    def load(self, where: str, name: str) -> nn.Module:
        model, path = self.build(), self.run.path(f"{where}/{name}.safetensors")
        try:
            load_model(path, model)
        except FileFormatError as err:
            raise unusable(err, path, "retrain it") from None
        return model.eval()

    def allocation(self, where: str, task: int) -> Allocation:
        path = self.run.path(f"{where}/alloc{task}.safetensors")
        try:
            return Allocation.load(path)
        except FileFormatError as err:
            raise unusable(err, path, "retrain it") from None

    def accuracy(self, model: nn.Module, task: int, alloc: Allocation | None = None) -> float:
        """Accuracy on every pair of task `task`; with `alloc`, through its task view."""
        if alloc is None:
            return self.task.accuracy(model, self.evals[task])
        with task_view(model, alloc, task) as view:
            return self.task.accuracy(view, self.evals[task])

    # -- pipelines -------------------------------------------------------------------------
    def pipelines(self) -> list[tuple[int, str]]:
        return [(r, m) for r in range(self.cfg.replicates) for m in self.cfg.methods]

    def pipeline_dir(self, unit: tuple) -> str:
        return f"pipelines/r{unit[0]}-{unit[1]}"

    def steps(self, method: str) -> list[int]:
        return [len(self.exprs) - 1] if method == "joint" else list(range(len(self.exprs)))

    def attempt(self, unit: tuple, attempt: int) -> list[Gate]:
        """Every step of one method's sequence, up to the first task not learnt."""
        replicate, method = unit
        where, gates = self.attempt_dir(unit, attempt), []
        for t in self.steps(method):
            names = [f"{where}/task{t}.json", f"{where}/task{t}.safetensors"]
            if method_parts(method)[0] in ISOLATION:
                names.append(f"{where}/alloc{t}.safetensors")
            once(self.run, names, lambda t=t: self.step(replicate, method, attempt, t, where))
            record = read_json(self.run, f"{where}/task{t}.json", "retrain it")
            if method == "independent":  # a reference, not gated: a task it cannot learn
                continue  # alone in the budget is what forward transfer measures
            for i in ([t] if method != "joint" else range(len(self.exprs))):
                gates.append(Gate(f"task {i} learnt", record["trained"][i],
                                  self.cfg.gates.task_accuracy,
                                  "the task was not learnt: raise fit.epochs or repeat, or "
                                  "try another fit.lr"))
            if self.cfg.gates.enforce and not all(g.passed for g in gates):
                break  # a retry redoes the sequence; with gates off, it goes on regardless
        return gates

    def step(self, replicate: int, method: str, attempt: int, t: int, where: str) -> None:
        """Train task t of `method` after tasks < t; write its model, owner map and record."""
        base, reinit = method_parts(method)
        seed = self.seed("task", replicate, attempt, t)
        torch.manual_seed(seed)
        tasks = range(len(self.exprs))
        record: dict[str, Any] = {"method": method, "replicate": replicate, "task": t,
                                  "seed": seed}
        if base in ("finetune", "independent", "joint"):
            start = self.initial(replicate, attempt) if base != "finetune" or t == 0 \
                else self.load(where, f"task{t - 1}")
            data = torch.cat(self.trains) if base == "joint" else self.trains[t]
            score = (lambda m: sum(self.accuracy(m, i) for i in tasks) / len(tasks)) \
                if base == "joint" else (lambda m: self.accuracy(m, t))
            result = fit(start, [data], self.task.loss, self.cfg.fit, seed=seed,
                         evaluate=score, desc=f"{method} r{replicate} task {t}")
            final, alloc = start, None
            record["trained"] = [self.accuracy(final, i) for i in tasks]
            record["best_epoch"] = result.best_epoch
        else:
            prev = self.initial(replicate, attempt) if t == 0 else self.load(where, f"task{t - 1}")
            alloc = Allocation.from_model(prev, *self.targets) if t == 0 \
                else self.allocation(where, t - 1)
            alloc.check_capacity(self.cfg.min_free)
            # at t = 0 nothing is trained yet: the replicate's initial model is the fresh one
            iso = isolate(prev, alloc, t, reinit_free=reinit and t > 0, seed=seed)
            result = fit(iso, [self.trains[t]], self.task.loss, self.cfg.fit, seed=seed,
                         evaluate=lambda m: self.accuracy(m, t),
                         desc=f"{method} r{replicate} task {t}")
            trained = bake(iso)
            record["trained"] = [self.accuracy(trained, i) for i in tasks]
            record["best_epoch"] = result.best_epoch
            if base == "subnetwork":
                sub = discover_free(trained, alloc, self.trains[t], self.task.loss,
                                    self.cfg.discovery, seed)
            else:
                sub = packnet_prune(trained, alloc, t, self.cfg.packnet_keep)
            if sub.kept() == 0:
                raise CapacityError(f"{method} r{replicate}: task {t} selected no free weight; "
                                    "lower discovery.mask.l0_lambda or raise packnet_keep")
            alloc = alloc.claim(t, sub)
            record["selected"] = self.accuracy(trained, t, alloc)
            again = isolate(trained, alloc, t, reinit_free=False, train_free=False)
            fit(again, [self.trains[t]], self.task.loss, self.cfg.retrain, seed=seed + 1,
                evaluate=lambda m: self.accuracy(m, t), desc=f"{method} r{replicate} retrain {t}")
            final = bake(again)
            free = alloc.free().masks
            with torch.no_grad():  # free weights keep their trained values (used unless -reinit)
                for name, mask in free.items():
                    final.get_parameter(name).copy_(torch.where(
                        mask, trained.get_parameter(name), final.get_parameter(name)))
            cap = alloc.capacity()
            record["capacity"] = {"total": cap["total"], "free": cap["free"],
                                  "free_fraction": cap["free_fraction"],
                                  "kept": cap["tasks"].get(t, {"kept": 0})["kept"],
                                  "density": cap["tasks"].get(t, {"fraction": 0.0})["fraction"]}
            alloc.save(self.run.path(f"{where}/alloc{t}.safetensors"))
        record["accuracy"] = [self.accuracy(final, i, alloc) for i in tasks]
        save_model(self.run.path(f"{where}/task{t}.safetensors"), final,
                   {"method": method, "task": str(t)})
        write_json(self.run.path(f"{where}/task{t}.json"), record)
        self.log(f"{method} r{replicate} task {t} ({self.cfg.sequence[t]}): accuracy "
                 + " ".join(f"{a:.3f}" for a in record["accuracy"]))

    # -- cells and report --------------------------------------------------------------------
    def cells(self, chosen: dict[tuple, dict[str, Any]]) -> list[Cell]:
        out = []
        for (r, m), record in chosen.items():
            where = self.attempt_dir((r, m), record["attempt"])
            out.append(Cell(f"r{r}-{m}", (r, m, record["attempt"]),
                            tuple(f"{where}/task{t}.json" for t in self.steps(m)), 0.1))
        return out

    def cell(self, replicate: int, method: str, attempt: int) -> dict[str, Any]:
        """The accuracy matrix rows of one (replicate, method): task i after training task j."""
        where, rows = self.attempt_dir((replicate, method), attempt), []
        for j in self.steps(method):
            record = read_json(self.run, f"{where}/task{j}.json", "retrain it")
            cap = record.get("capacity", {})
            for i, acc in enumerate(record["accuracy"]):
                rows.append({"replicate": replicate, "method": method, "after": j, "task": i,
                             "expression": self.cfg.sequence[i], "accuracy": acc,
                             "trained_accuracy": record["trained"][i] if i == j else None,
                             "density": cap.get("density") if i == j else None,
                             "free_fraction": cap.get("free_fraction")})
        return {"rows": rows}

    def report(self, chosen: dict[tuple, dict[str, Any]], cells: list[Cell],
               records: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [row for record in records for row in record["rows"]]
        gates = {f"r{r}-{m}": c for (r, m), c in chosen.items()}
        return write_report(self.run.root, rows, sequence=list(self.cfg.sequence),
                            methods=list(self.cfg.methods), gates=gates,
                            warnings=list(self.warnings), packnet_keep=self.cfg.packnet_keep)


def run_continual(cfg: ContinualConfig, out: str | Path, log=print, threads: int = 1,
                  workers: int = 1, device: str = "cpu",
                  executor: Executor | None = None) -> dict[str, Any]:
    """Run the whole experiment into `out`; returns the summary. Pipelines (replicate x
    method) run side by side in `workers` processes; results do not depend on it."""
    torch.set_num_threads(threads)
    return ContinualRun(cfg, out, log, threads=threads, device=device,
                        executor=executor or LocalExecutor(workers)).execute()


__all__ = ["METHODS", "PRESETS", "ContinualConfig", "ContinualGates", "ContinualRun",
           "discover_free", "load_config", "method_parts", "run_continual"]
