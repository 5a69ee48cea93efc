"""Several subtasks in one model: modularity, overlap, union induction and compression.

For each of `replicates` pipelines: train (or reuse, `from_run`) a base model on `base`,
discover one subnetwork per subtask and one for the base task itself (same settings each),
then measure their overlap against chance, cross-ablation against same-size random ablation
and the weights no subnetwork uses ("frivolous"); gates check the base model and that every
subtask's subnetwork computes its subtask alone. Cells: union induction (the union of two
subnetworks transplanted, against each alone, on one target per subnetwork) and compression
points (magnitude and torch's pruning, a continuous-sparsification lambda sweep, hard concrete
and top-k on the base task). The config and presets are in `modules_config`, the report (with
intervals over pipelines) in `modules_report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from instill.analysis import pruned
from instill.checkpoint import save_model
from instill.core import Subnetwork
from instill.errors import ConfigError, FileFormatError, SubnetworkMismatchError
from instill.experiments.common import starting_model
from instill.experiments.executors import Executor, LocalExecutor
from instill.experiments.framework import Cell, once, read_json, unusable
from instill.experiments.modules_common import (
    ModulesExperiment,
    compression_points,
    compression_rows,
    modularity,
    union_model,
)
from instill.experiments.modules_config import (
    MODEL_KEYS,
    PRESETS,
    UNION_CONDITIONS,
    CompressionConfig,
    ModulesConfig,
    ModulesGates,
    UnionConfig,
    load_config,
)
from instill.experiments.modules_report import write_report
from instill.experiments.pipeline import Gate, failed
from instill.models import build_model
from instill.runio import load_config_file, to_dict
from instill.storage import atomic_write_bytes, write_json
from instill.tasks.arithmetic import (
    ArithmeticSpec,
    base_splits,
    make_sequences,
    make_target_splits,
    sample_pairs,
)
from instill.tasks.expr import parse
from instill.tasks.sequences import SequenceTask
from instill.training import DiscoveryConfig, discover, fit


class ModulesRun(ModulesExperiment):
    """One run directory: `pipelines/r{r}/a{i}/` holds a base model, `sub-{k}.safetensors` per
    subtask k (index in `subtasks`), `sub-base.safetensors` and `analysis.json`; `cells/` the
    union-induction and compression records."""

    name = "modules"
    config_class = ModulesConfig

    def __init__(self, cfg: ModulesConfig, out: str | Path, log=print, **options: Any) -> None:
        super().__init__(cfg, out, log, **options)
        if self.device.type != "cpu":
            raise ConfigError(f"instill modules runs on the CPU only so far (got --device "
                              f"{self.device}); drop --device")
        self.spec = ArithmeticSpec(numbers=cfg.numbers, modulus=cfg.modulus)
        self.task = SequenceTask(self.spec, cfg.loss)
        self.names = [*cfg.subtasks, "base"]
        self.exprs = {"base": parse(cfg.base), **{s: parse(s) for s in cfg.subtasks}}
        self._sources: dict[tuple[int, int], tuple[nn.Module, dict[str, Subnetwork]]] = {}

    def build(self) -> nn.Module:
        c = self.cfg
        return build_model("gpt2", vocab_size=self.spec.vocab_size, n_positions=4,
                           n_embd=c.n_embd, n_layer=c.layers, n_head=c.n_head,
                           dropout=c.dropout, activation=c.activation)

    def sequences(self, expr: str, n: int, seed: int) -> Tensor:
        a, b = sample_pairs(n, self.spec, torch.Generator().manual_seed(seed))
        return make_sequences(a, b, self.exprs[expr] if expr in self.exprs else parse(expr),
                              self.spec)

    def sub_file(self, where: str, name: str) -> str:
        tag = "base" if name == "base" else str(self.cfg.subtasks.index(name))
        return f"{where}/sub-{tag}.safetensors"

    # -- base model: trained here or reused -------------------------------------------------
    def source_units(self) -> list[Path]:
        """The reused run's chosen base attempt per replicate; a clear error unless it trained
        the same base task and model at this depth, with enough replicates."""
        root = Path(self.cfg.from_run or "")
        if not (root / "config.json").is_file():
            raise ConfigError(f"--from {root}: no config.json there; pass the directory of an "
                              "`instill arithmetic` run (the --out it was given)")
        recorded = load_config_file(root / "config.json").get("config", {})
        mine = to_dict(self.cfg)
        for key in MODEL_KEYS:
            theirs = recorded.get(key)
            if (str(theirs).replace(" ", "") if key == "base" else theirs) != \
                    (str(mine[key]).replace(" ", "") if key == "base" else mine[key]):
                raise ConfigError(f"--from {root}: its {key} is {theirs!r} but this run needs "
                                  f"{mine[key]!r}; pass --set {key}=... to match that run, or "
                                  "train the base here (no --from)")
        if self.cfg.layers not in recorded.get("layers", []):
            raise ConfigError(f"--from {root}: it trained depths {recorded.get('layers')}, not "
                              f"layers={self.cfg.layers}; pass --set layers=<one of them>")
        paths = []
        for r in range(self.cfg.replicates):
            unit = root / f"pipelines/L{self.cfg.layers}-r{r}"
            if not (unit / "attempts.json").is_file():
                raise ConfigError(f"--from {root}: no finished pipeline {unit.name} (it has "
                                  "fewer replicates); lower --replicates")
            attempt = load_config_file(unit / "attempts.json")["attempt"]
            paths.append(unit / f"a{attempt}")
        return paths

    def _base(self, replicate: int, attempt: int, where: str) -> None:
        if self.cfg.from_run:
            source = self.source_units()[replicate]
            info = {**load_config_file(source / "base.json"), "source": str(source)}
            atomic_write_bytes(self.run.path(f"{where}/base.safetensors"),
                               (source / "base.safetensors").read_bytes())
            write_json(self.run.path(f"{where}/base.json"), info)
            return
        seed = self.seed("base", replicate, attempt)
        torch.manual_seed(seed)
        model = self.build()
        train, val, test = base_splits(self.exprs["base"], self.spec, self.cfg.base_samples,
                                       self.cfg.base_val, seed)
        result = fit(model, [train], self.task.loss, self.cfg.base_fit, seed=seed,
                     evaluate=lambda m: self.task.accuracy(m, val), desc=f"base r{replicate}")
        info = {"replicate": replicate, "attempt": attempt, "seed": seed,
                "val_accuracy": result.best_score, "test_accuracy": self.task.accuracy(model, test),
                "best_epoch": result.best_epoch}
        save_model(self.run.path(f"{where}/base.safetensors"), model)
        write_json(self.run.path(f"{where}/base.json"), info)
        self.log(f"base r{replicate} a{attempt}: `{self.cfg.base}` held-out accuracy "
                 f"{info['test_accuracy']:.3f}")

    # -- subnetworks and their analyses -----------------------------------------------------
    def subnetworks(self, replicate: int, attempt: int, model: nn.Module
                    ) -> dict[str, Subnetwork]:
        """One subnetwork per subtask and one for the base task, same discovery settings."""
        where, out = self.attempt_dir((replicate,), attempt), {}
        for k, name in enumerate(self.names):
            file = self.sub_file(where, name)

            def compute(name: str = name, k: int = k, file: str = file) -> None:
                seed = self.seed("discovery", replicate, attempt, k)
                torch.manual_seed(seed)
                data = self.sequences(name, self.cfg.subtask_samples, seed)
                sub, _ = discover(model, [data], self.task.loss, self.cfg.discovery, seed=seed,
                                  desc=f"discover {name} r{replicate}")
                Subnetwork(sub.masks, sub.fingerprint, {**sub.metadata, "subtask": name}
                           ).save(self.run.path(file))

            once(self.run, [file], compute)
            try:
                out[name] = Subnetwork.load(self.run.path(file))
                out[name].check_model(model)
            except (FileFormatError, SubnetworkMismatchError) as err:
                raise unusable(err, self.run.path(file), "rediscover it") from None
        return out

    def metrics(self, replicate: int) -> dict[str, Any]:
        """Accuracy on each task's own evaluation pairs (one draw per replicate)."""
        seed = self.seed("eval", replicate)
        sets = {n: self.sequences(n, self.cfg.eval_samples, seed + k)
                for k, n in enumerate(self.names)}
        return {n: (lambda m, s=s: self.task.accuracy(m, s)) for n, s in sets.items()}

    def analysis(self, replicate: int, attempt: int) -> dict[str, Any]:
        """Overlap (and chance), cross-ablation (and random control), frivolous weights."""
        name = f"{self.attempt_dir((replicate,), attempt)}/analysis.json"

        def compute() -> None:
            model = self.base_model(replicate, attempt)
            subs = self.subnetworks(replicate, attempt, model)
            write_json(self.run.path(name), modularity(
                model, subs, self.cfg.subtasks, self.metrics(replicate),
                self.seed("ablation", replicate)))

        once(self.run, [name], compute)
        return read_json(self.run, name, "recompute it")

    def attempt(self, unit: tuple, attempt: int) -> list[Gate]:
        (replicate,), gates = unit, self.cfg.gates
        base = self.base_phase(replicate, attempt)
        checks = [Gate("base accuracy", base["test_accuracy"], gates.base_accuracy,
                       "the base model did not learn its task: train longer (base_fit.epochs), "
                       "with more data (base_samples) or another lr")]
        if failed(checks):
            return checks
        alone = self.complete(unit, attempt)["alone"]
        return [*checks, *(Gate(f"`{n}` subnetwork alone", alone[n], gates.subnetwork_accuracy,
                                "discovery did not find this subtask's subnetwork: train the "
                                "masks longer (discovery.epochs) or with another lr")
                           for n in self.cfg.subtasks)]

    # -- cells ------------------------------------------------------------------------------
    def cells(self, chosen: dict[tuple, dict[str, Any]]) -> list[Cell]:
        out, c = [], self.cfg
        for (r,), record in chosen.items():
            i = record["attempt"]
            where = self.attempt_dir((r,), i)
            inputs = (f"{where}/base.safetensors",
                      *(self.sub_file(where, n) for n in self.names))
            if c.union.enabled:
                out += [Cell(f"r{r}-a{i}-union-t{t}-n{n}", ("union", r, i, float(t), n), inputs,
                             cost=4 * (n + 300)) for t in range(2) for n in c.union.grid]
            out += [Cell(f"r{r}-a{i}-{m}-{p:g}", (m, r, i, p, 0), inputs, cost=2000)
                    for m, p in compression_points(c.compression)]
        return out

    def cell(self, kind: str, replicate: int, attempt: int, param: float, n: int
             ) -> dict[str, Any]:
        if kind == "union":
            return {"rows": self._union(replicate, attempt, int(param), n)}
        return {"rows": self._compress(kind, replicate, attempt, param)}

    def _union(self, replicate: int, attempt: int, t: int, n: int) -> list[dict[str, Any]]:
        trained, subs = self.source(replicate, attempt)
        u = self.cfg.union
        first, second = (subs[p] for p in u.pair)
        splits = make_target_splits(parse(u.targets[t]), self.spec, max(u.grid), u.n_val,
                                    u.n_test, seed=self.seed("target", replicate, t))
        train, val, test = splits.train_sequences(n), splits.val_sequences(), \
            splits.test_sequences()
        seed, rows = self.seed("union", replicate, t, n), []
        for condition in UNION_CONDITIONS:
            torch.manual_seed(seed)
            model = {"union": lambda: union_model(trained, first, second, seed),
                     "first": lambda: starting_model("subnet", trained, first, seed),
                     "second": lambda: starting_model("subnet", trained, second, seed),
                     "random": lambda: starting_model("random", trained, first, seed)
                     }[condition]()
            result = fit(model, [train], self.task.loss, u.induction_fit, seed=seed,
                         evaluate=lambda m: self.task.accuracy(m, val),
                         desc=f"{condition} r{replicate} t{t} n={n}")
            rows.append({"kind": "union", "replicate": replicate, "target": u.targets[t],
                         "condition": condition, "n": n,
                         "accuracy": self.task.accuracy(model, test),
                         "val_accuracy": result.best_score})
        return rows

    def _compress(self, method: str, replicate: int, attempt: int, param: float
                  ) -> list[dict[str, Any]]:
        model, _ = self.source(replicate, attempt)

        def train_mask(cfg: DiscoveryConfig) -> Subnetwork:
            seed = self.seed("compress", replicate, method, repr(param))
            torch.manual_seed(seed)
            data = self.sequences("base", self.cfg.compression.samples, seed)
            return discover(model, [data], self.task.loss, cfg, seed=seed,
                            desc=f"{method} {param:g} r{replicate}")[0]

        rows = compression_rows(model, method, param, self.metrics(replicate)["base"],
                                self.cfg.discovery, self.cfg.compression, train_mask)
        return [{**row, "replicate": replicate} for row in rows]

    def report(self, chosen: dict[tuple, dict[str, Any]], cells: list[Cell],
               records: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [row for record in records for row in record["rows"]]
        analyses = {f"r{r}": read_json(self.run, f"{self.attempt_dir((r,), c['attempt'])}"
                                       "/analysis.json") for (r,), c in chosen.items()}
        return write_report(self.run, to_dict(self.cfg), to_dict(ModulesConfig()), rows,
                            analyses, {f"r{r}": c for (r,), c in chosen.items()},
                            self.warnings)



def run_modules(cfg: ModulesConfig, out: str | Path, log=print, threads: int = 1,
                workers: int = 1, device: str = "cpu",
                executor: Executor | None = None) -> dict[str, Any]:
    """Run the whole experiment into `out`; returns the summary."""
    torch.set_num_threads(threads)
    return ModulesRun(cfg, out, log, threads=threads, device=device,
                      executor=executor or LocalExecutor(workers)).execute()


__all__ = ["PRESETS", "CompressionConfig", "ModulesConfig", "ModulesGates", "ModulesRun",
           "UnionConfig", "load_config", "pruned", "run_modules", "union_model"]
