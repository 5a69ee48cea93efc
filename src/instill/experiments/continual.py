"""Continual learning by parameter isolation with discovered subnetworks (`instill continual`).

A task sequence (`tasks.task_sequences.TaskSequence`: arithmetic expressions with a task token,
or the shape world split into class groups with a head per task) is learnt task after task by
every method on the same data, the same initial model and the same training budget:

- `subnetwork` (ours): train task t on the free weights (`isolate`), discover its subnetwork
  among them by continuous sparsification (earlier tasks' weights held on), claim and freeze it,
  retrain only its weights, and go on; `-reinit` re-initializes the free weights before each
  task instead of keeping their trained values. Task t is evaluated with exactly the weights of
  tasks <= t (`task_view`) and its own head.
- `packnet`: the same loop with magnitude pruning to `packnet_keep` (or `packnet@f`: f) of
  the free weights.
- `finetune`: plain sequential fine-tuning (the forgetting baseline); `replay`: fine-tuning on
  the task's data plus a small buffer of earlier tasks' examples; `joint`: all tasks at once
  (the upper bound); `independent`: each task from the initial model alone (the reference of
  forward transfer).
- `supsup` (Wortsman et al. 2020): the initial model stays fixed and each task learns a top-k
  supermask over it; evaluated with the task given, and with the task inferred from the
  output entropy of the masks' superposition (`continual_supsup`).

Pipelines are (replicate, method); each (method, task) step is cached in the run directory, so
an interrupted run resumes per step. Cells read the steps' records back as rows for the report.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instill.checkpoint import load_model, save_model
from instill.core import Subnetwork, bake
from instill.core.isolation import Allocation, CapacityError, isolate, packnet_prune, task_view
from instill.errors import FileFormatError
from instill.experiments.continual_config import (
    ISOLATION,
    ContinualConfig,
    load_config,
    parse_method,
)
from instill.experiments.continual_report import write_report
from instill.experiments.continual_steps import (
    allocation_mask,
    discover_free,
    keep_free_values,
    replay_data,
    train_heads,
)
from instill.experiments.continual_supsup import (
    inferred_accuracy,
    masked_accuracy,
    train_supermask,
    untrained_mask,
)
from instill.experiments.executors import Executor, LocalExecutor
from instill.experiments.framework import Cell, Experiment, once, read_json, unusable
from instill.experiments.pipeline import Gate
from instill.storage import write_json
from instill.training import fit


class ContinualRun(Experiment):
    """One run directory: `pipelines/r{r}-{method}/a{i}/task{t}.{json,safetensors}` (the model
    after task t, and for isolation methods `alloc{t}.safetensors`, the owner map), and
    `cells/r{r}-{method}.json` with the accuracy matrix rows of the chosen attempt."""

    name = "continual"
    config_class = ContinualConfig

    def __init__(self, cfg: ContinualConfig, out: str | Path, log=print, **options: Any) -> None:
        self.seq = cfg.task_sequence(options.get("device", "cpu"))  # bad data or an image
        super().__init__(cfg, out, log, **options)  # folder fails before the run dir is made
        mask = allocation_mask(cfg.discovery.mask, self.seq)
        self.discovery = replace(cfg.discovery, mask=mask)
        self.targets = (mask.targets, mask.exclude, mask.mask_bias)

    # -- pieces ----------------------------------------------------------------------------
    def initial(self, replicate: int, attempt: int) -> nn.Module:
        """The replicate's initial model: the same for every method (paired comparisons)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed("init", replicate, attempt))
            return self.seq.build()

    def load(self, where: str, name: str) -> nn.Module:
        model, path = self.seq.build(), self.run.path(f"{where}/{name}.safetensors")
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

    def accuracy(self, model: nn.Module, task: int, alloc: Allocation | None = None,
                 split: str = "test") -> float:
        """Accuracy on task `task`'s `split` (test or select); with `alloc`, through its task
        view (exactly the weights of tasks <= task; every head is its task's own)."""
        data = self.seq.test(task) if split == "test" else self.seq.select(task)
        if alloc is None:
            return self.seq.accuracy(model, data)
        with task_view(model, alloc, task) as view:
            return self.seq.accuracy(view, data)

    @property
    def n_tasks(self) -> int:
        return len(self.seq.names)

    # -- pipelines -------------------------------------------------------------------------
    def pipelines(self) -> list[tuple[int, str]]:
        return [(r, m) for r in range(self.cfg.replicates) for m in self.cfg.methods]

    def pipeline_dir(self, unit: tuple) -> str:
        return f"pipelines/r{unit[0]}-{unit[1]}"

    def steps(self, method: str) -> list[int]:
        return [self.n_tasks - 1] if method == "joint" else list(range(self.n_tasks))

    def attempt(self, unit: tuple, attempt: int) -> list[Gate]:
        """Every step of one method's sequence, up to the first task not learnt."""
        replicate, method = unit
        where, gates = self.attempt_dir(unit, attempt), []
        for t in self.steps(method):
            names = [f"{where}/task{t}.json", f"{where}/task{t}.safetensors"]
            if parse_method(method).base in ISOLATION:
                names.append(f"{where}/alloc{t}.safetensors")
            elif method == "supsup":
                names.append(f"{where}/mask{t}.safetensors")
            once(self.run, names, lambda t=t: self.step(replicate, method, attempt, t, where))
            record = read_json(self.run, f"{where}/task{t}.json", "retrain it")
            if method == "independent":  # a reference, not gated: a task it cannot learn
                continue  # alone in the budget is what forward transfer measures
            for i in ([t] if method != "joint" else range(self.n_tasks)):
                gates.append(Gate(f"task {i} learnt", record["trained"][i],
                                  self.cfg.gates.task_accuracy,
                                  "the task was not learnt: raise fit.epochs or repeat, or "
                                  "try another fit.lr"))
            if self.cfg.gates.enforce and not all(g.passed for g in gates):
                break  # a retry redoes the sequence; with gates off, it goes on regardless
        return gates

    def step(self, replicate: int, method: str, attempt: int, t: int, where: str) -> None:
        """Train task t of `method` after tasks < t; write its model, owner map and record."""
        seed = self.seed("task", replicate, attempt, t)
        torch.manual_seed(seed)
        record: dict[str, Any] = {"method": method, "replicate": replicate, "task": t,
                                  "seed": seed}
        if t == self.steps(method)[0]:  # the random-init reference of forward transfer (FWT)
            initial = self.initial(replicate, attempt)
            record["initial"] = [self.accuracy(initial, i) for i in range(self.n_tasks)]
        if method == "supsup":
            final = self.supsup_step(replicate, attempt, t, where, record)
        elif parse_method(method).base in ISOLATION:
            final, alloc = self.isolation_step(replicate, method, attempt, t, where, record)
            record["accuracy"] = [self.accuracy(final, i, alloc) for i in range(self.n_tasks)]
        else:
            final = self.plain_step(replicate, method, attempt, t, where, record)
            record["accuracy"] = [self.accuracy(final, i) for i in range(self.n_tasks)]
        save_model(self.run.path(f"{where}/task{t}.safetensors"), final,
                   {"method": method, "task": str(t)})
        write_json(self.run.path(f"{where}/task{t}.json"), record)
        self.log(f"{method} r{replicate} task {t} ({self.seq.names[t]}): accuracy "
                 + " ".join(f"{a:.3f}" for a in record["accuracy"]))

    def plain_step(self, replicate: int, method: str, attempt: int, t: int, where: str,
                   record: dict[str, Any]) -> nn.Module:
        """finetune, replay, independent and joint: every shared weight trains; the heads of
        the tasks whose data is seen train, the others stay as they are."""
        base, tasks, seed = parse_method(method).base, range(self.n_tasks), record["seed"]
        sequential = base in ("finetune", "replay") and t > 0
        model = self.load(where, f"task{t - 1}") if sequential else self.initial(replicate,
                                                                                 attempt)
        if base == "joint":
            data = tuple(torch.cat(c) for c in zip(*map(self.seq.train, tasks), strict=True))
            seen = list(tasks)
        elif base == "replay":
            data, seen = replay_data(self.seq, t, self.cfg.replay, seed), list(range(t + 1))
        else:
            data, seen = self.seq.train(t), [t]
        scored = list(tasks) if base == "joint" else [t]  # replay selects on task t alone
        result = fit(train_heads(model, self.seq, seen), list(data), self.seq.loss,
                     self.cfg.fit, seed=seed, evaluate=lambda m: sum(
                         self.accuracy(m, i, split="select") for i in scored) / len(scored),
                     desc=f"{method} r{replicate} task {t}")
        record["trained"] = [self.accuracy(model, i, split="select") for i in tasks]
        record["best_epoch"] = result.best_epoch
        return model.requires_grad_(True)

    def isolation_step(self, replicate: int, method: str, attempt: int, t: int, where: str,
                       record: dict[str, Any]) -> tuple[nn.Module, Allocation]:
        """subnetwork and packnet: train the free weights and task t's head, select task t's
        weights among them, claim them, retrain only them, and keep the free ones' values."""
        spec, seed, heads = parse_method(method), record["seed"], self.seq.heads(t)
        prev = self.initial(replicate, attempt) if t == 0 else self.load(where, f"task{t - 1}")
        alloc = Allocation.from_model(prev, *self.targets) if t == 0 \
            else self.allocation(where, t - 1)
        alloc.check_capacity(self.cfg.min_free)
        # at t = 0 nothing is trained yet: the replicate's initial model is the fresh one
        iso = train_heads(isolate(prev, alloc, t, reinit_free=spec.reinit and t > 0, seed=seed,
                                  per_task=heads), self.seq, [t])
        score = lambda m: self.accuracy(m, t, split="select")  # noqa: E731
        result = fit(iso, list(self.seq.train(t)), self.seq.loss, self.cfg.fit, seed=seed,
                     evaluate=score, desc=f"{method} r{replicate} task {t}")
        trained = bake(iso)
        record["trained"] = [self.accuracy(trained, i, split="select")
                             for i in range(self.n_tasks)]
        record["best_epoch"] = result.best_epoch
        if spec.base == "subnetwork":
            sub = discover_free(trained, alloc, self.seq.train(t), self.seq.loss,
                                self.discovery, seed)
        else:
            sub = packnet_prune(trained, alloc, t, spec.keep or self.cfg.packnet_keep)
        if sub.kept() == 0:
            raise CapacityError(f"{method} r{replicate}: task {t} selected no free weight; "
                                "lower discovery.mask.l0_lambda or raise packnet_keep")
        alloc = alloc.claim(t, sub)
        record["selected"] = self.accuracy(trained, t, alloc, split="select")
        again = train_heads(isolate(trained, alloc, t, reinit_free=False, train_free=False,
                                    per_task=heads), self.seq, [t])
        fit(again, list(self.seq.train(t)), self.seq.loss, self.cfg.retrain, seed=seed + 1,
            evaluate=score, desc=f"{method} r{replicate} retrain {t}")
        final = bake(again)
        keep_free_values(final, trained, alloc)
        cap = alloc.capacity()
        record["capacity"] = {"total": cap["total"], "free": cap["free"],
                              "free_fraction": cap["free_fraction"],
                              "kept": cap["tasks"].get(t, {"kept": 0})["kept"],
                              "density": cap["tasks"].get(t, {"fraction": 0.0})["fraction"]}
        alloc.save(self.run.path(f"{where}/alloc{t}.safetensors"))
        return final, alloc

    def supsup_step(self, replicate: int, attempt: int, t: int, where: str,
                    record: dict[str, Any]) -> nn.Module:
        """Learn task t's supermask over the fixed initial model; evaluate every task with its
        own mask (an untrained one for tasks not learnt yet), and tasks <= t with the task
        inferred among the t + 1 masks."""
        model, cfg, tasks = self.initial(replicate, attempt), self.cfg.supsup, range(self.n_tasks)
        masks = [self.mask(where, i) for i in range(t)]
        masks.append(train_supermask(model, self.seq, t, cfg.keep, cfg.fit, record["seed"],
                                     f"supsup r{replicate} task {t}"))
        masks[t].save(self.run.path(f"{where}/mask{t}.safetensors"))
        views = masks + [untrained_mask(model, cfg.keep)] * (self.n_tasks - t - 1)
        record["trained"] = [masked_accuracy(model, self.seq, views[i], self.seq.select(i))
                             for i in tasks]
        record["accuracy"] = [masked_accuracy(model, self.seq, views[i], self.seq.test(i))
                              for i in tasks]
        record["best_epoch"] = None
        probe = tuple(d[:1] for d in self.seq.test(0))
        if self.seq.outputs(model, probe) is not None:  # the sequence's tasks can be inferred
            found = [inferred_accuracy(model, self.seq, masks, self.seq.test(i), i,
                                       cfg.infer_batch) for i in range(t + 1)]
            record["inferred"] = [a for a, _ in found]
            record["task_inferred"] = [r for _, r in found]
        return model

    def mask(self, where: str, task: int) -> Subnetwork:
        path = self.run.path(f"{where}/mask{task}.safetensors")
        try:
            return Subnetwork.load(path)
        except FileFormatError as err:
            raise unusable(err, path, "retrain it") from None

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
        first = read_json(self.run, f"{where}/task{self.steps(method)[0]}.json", "retrain it")
        initial = first.get("initial")  # absent in runs recorded before FWT was measured
        for j in self.steps(method):
            record = read_json(self.run, f"{where}/task{j}.json", "retrain it")
            cap = record.get("capacity", {})
            inferred, right = record.get("inferred", []), record.get("task_inferred", [])
            for i, acc in enumerate(record["accuracy"]):
                rows.append({"replicate": replicate, "method": method, "after": j, "task": i,
                             "task_name": self.seq.names[i], "accuracy": acc,
                             "trained_accuracy": record["trained"][i] if i == j else None,
                             "density": cap.get("density") if i == j else None,
                             "free_fraction": cap.get("free_fraction"),
                             "initial_accuracy": initial[i] if initial else None,
                             "inferred_accuracy": inferred[i] if i < len(inferred) else None,
                             "task_inferred": right[i] if i < len(right) else None})
        return {"rows": rows}

    def report(self, chosen: dict[tuple, dict[str, Any]], cells: list[Cell],
               records: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [row for record in records for row in record["rows"]]
        gates = {f"r{r}-{m}": c for (r, m), c in chosen.items()}
        return write_report(self.run.root, rows, sequence=list(self.seq.names),
                            methods=list(self.cfg.methods), gates=gates,
                            warnings=list(self.warnings), packnet_keep=self.cfg.packnet_keep,
                            kind=f"{self.cfg.task} tasks")


def run_continual(cfg: ContinualConfig, out: str | Path, log=print, threads: int = 1,
                  workers: int = 1, device: str = "cpu",
                  executor: Executor | None = None) -> dict[str, Any]:
    """Run the whole experiment into `out`; returns the summary. Pipelines (replicate x
    method) run side by side in `workers` processes; results do not depend on it."""
    torch.set_num_threads(threads)
    return ContinualRun(cfg, out, log, threads=threads, device=device,
                        executor=executor or LocalExecutor(workers)).execute()


__all__ = ["ContinualConfig", "ContinualRun", "load_config", "run_continual"]
