"""The seam every experiment runs on: phases, replicate pipelines, gates, cells and the report.

An experiment is a subclass of `Experiment` that declares its own logic only:

- `pipelines()`: its independent replicates (units such as `(layers, replicate)`);
- `attempt(unit, i)`: the upstream phases of attempt i of a pipeline, each cached in the run
  directory (`once`), returning the gates that decide whether the attempt is used;
- `complete(unit, i)`: phases the chosen attempt still needs (when gates are overridden);
- `cells(chosen)`: the units of parallel work, each with the files it reads and its cost;
- `cell(unit)`: one cell, a function of its inputs that returns its record (the driver writes
  `cells/{name}.json`, so a cluster worker needs no shared filesystem);
- optionally `cell_groups(cells)` and `cell_batch(*units)`: cells that run as one job (e.g.
  models of one shape trained as one vmapped stack), and their records;
- `report(chosen, cells, records)`: tables, plots and the summary.

`Experiment.execute` does the rest: it checks and records the config (`RunDir.begin`), runs
the pipelines through `run_attempts` (retries, `GateError`), the cells through an executor
(`executors`), skips what a resumed run has already finished, and writes the manifest.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing.util
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from instill import devices
from instill.errors import FileFormatError
from instill.experiments.executors import Executor, LocalExecutor
from instill.experiments.pipeline import Gate, run_attempts
from instill.runio import RunDir, from_dict, to_dict
from instill.seeds import derive_seed
from instill.storage import atomic_write_bytes, write_json

Unit = tuple[Any, ...]

@dataclass(frozen=True)
class Cell:
    """One unit of parallel work: its file name under `cells/`, the arguments of
    `Experiment.cell`, the run-directory files it reads, and its relative cost."""

    name: str
    unit: Unit
    inputs: tuple[str, ...] = ()
    cost: float = 1.0


@dataclass(frozen=True)
class Job:
    """What a worker needs to run one pipeline or cell: the experiment class (`module:name`, so
    a fresh process can import it), its config and run directory, and (without a shared
    filesystem) the bytes of the files the work reads."""

    experiment: str
    config: dict[str, Any]
    root: str
    kind: str
    unit: Unit
    options: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] | None = None


def once(run: RunDir, names: Sequence[str], compute: Callable[[], Any]) -> bool:
    """Call `compute` (which writes every file in `names`) unless they all exist already; True
    when it ran. The one way a phase is cached, so a resumed run skips finished work."""
    if all(run.exists(name) for name in names):
        return False
    compute()
    return True


def read_json(run: RunDir, name: str, redo: str = "recompute it") -> Any:
    """A JSON file of the run directory; a damaged one is a clear error saying how to redo it."""
    path = run.path(name)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise unusable(FileFormatError(f"{path} is unreadable ({err})"), path, redo) from None


def unusable(err: Exception, path: Path, redo: str) -> FileFormatError:
    """A damaged or foreign file in the run directory: say which, and how to redo it."""
    return FileFormatError(f"{err}; delete {path} and rerun the same command to {redo}")


class Experiment:
    """Base class of an experiment run into one directory (see the module docstring)."""

    name: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, cfg: Any, out: str | Path, log: Callable[[str], Any] = print, *,
                 threads: int = 1, device: str = "cpu",
                 executor: Executor | None = None) -> None:
        self.cfg, self.log, self.threads = cfg, log, threads
        self.device = torch.device(device)
        devices.configure(self.device, getattr(cfg, "tf32", False))
        self.executor = executor or LocalExecutor(1)
        self.run = RunDir(out)

    # -- what an experiment declares -----------------------------------------------------------
    def prepare(self) -> list[str]:
        """Checks before anything is written; returns warnings for the report."""
        return []

    def pipelines(self) -> list[Unit]:
        raise NotImplementedError

    def pipeline_dir(self, unit: Unit) -> str:
        raise NotImplementedError

    def attempt(self, unit: Unit, attempt: int) -> list[Gate]:
        raise NotImplementedError

    def prefetch(self, units: list[Unit]) -> None:
        """Run the first attempt's phases of many pipelines together where that pays (e.g. as
        vmapped stacks on a GPU), writing the files the pipelines would; nothing by default."""

    def complete(self, unit: Unit, attempt: int) -> None:
        """Phases the chosen attempt needs beyond its gates (none by default)."""

    def cells(self, chosen: dict[Unit, dict[str, Any]]) -> list[Cell]:
        raise NotImplementedError

    def cell(self, *unit: Any) -> dict[str, Any]:
        raise NotImplementedError

    def cell_groups(self, cells: list[Cell]) -> list[list[Cell]]:
        """Cells that run together as one job; each on its own by default."""
        return [[cell] for cell in cells]

    def cell_batch(self, *units: Unit) -> list[dict[str, Any]]:
        """The records of the cells of one group, in order; one at a time by default."""
        return [self.cell(*unit) for unit in units]

    def report(self, chosen: dict[Unit, dict[str, Any]], cells: list[Cell],
               records: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    # -- what the framework does ---------------------------------------------------------------
    def seed(self, *parts: str | int) -> int:
        return derive_seed(self.cfg.seed, *parts)

    def attempt_dir(self, unit: Unit, attempt: int) -> str:
        return f"{self.pipeline_dir(unit)}/a{attempt}"

    def pipeline(self, *unit: Any) -> dict[str, Any]:
        """Attempts of one pipeline until its gates pass (`run_attempts`), then `complete`."""
        chosen = run_attempts(self.run, self.pipeline_dir(unit),
                              lambda i: self.attempt(unit, i), self.cfg.gates, self.log)
        self.complete(unit, chosen["attempt"])
        return chosen

    def execute(self) -> dict[str, Any]:
        """Every phase (resuming finished work), the manifest and the report."""
        self.warnings = self.prepare()
        for warning in self.warnings:
            self.log(f"warning: {warning}")
        self.run.begin(to_dict(self.cfg), self.cfg.seed, self.log, mutable=["gates"],
                       defaults=to_dict(self.config_class()))
        units = self.pipelines()
        self.prefetch(units)
        work = [(u, self._files_under(self.pipeline_dir(u))) for u in units]
        chosen = dict(zip(units, self._map("pipeline", work, "pipelines"), strict=True))
        for unit, record in chosen.items():
            gates = record["attempts"][record["attempt"]]["gates"]
            self.log(f"pipeline {self.pipeline_dir(unit).rsplit('/', 1)[-1]}: attempt "
                     f"{record['attempt']} of {len(record['attempts'])}; " + ", ".join(
                         f"{g['name']} {g['value']:.3f}" for g in gates))
        cells = self.cells(chosen)
        records = self.run_cells(cells)
        outputs = [f"{self.attempt_dir(u, c['attempt'])}/{p.name}" for u, c in chosen.items()
                   for p in sorted(self.run.path(self.attempt_dir(u, c["attempt"])).iterdir())
                   if p.is_file()]
        outputs += [f"{self.pipeline_dir(u)}/attempts.json" for u in units]
        outputs += [f"cells/{c.name}.json" for c in cells]
        self.run.record_outputs(outputs)
        return self.report(chosen, cells, records)

    def run_cells(self, cells: list[Cell]) -> list[dict[str, Any]]:
        """Each cell's record: read back when finished, else computed (alone or in its group,
        `cell_groups`) and written here as its job finishes."""
        records = [self._finished(c) for c in cells]
        index = {c.name: i for i, c in enumerate(cells)}
        groups = self.cell_groups([c for c, r in zip(cells, records, strict=True) if r is None])

        def persist(k: int, batch: list[dict[str, Any]]) -> None:
            for cell, record in zip(groups[k], batch, strict=True):
                write_json(self.run.path(f"cells/{cell.name}.json"), record)
                records[index[cell.name]] = record

        work = [(tuple(c.unit for c in group),
                 tuple(dict.fromkeys(name for c in group for name in c.inputs)))
                for group in groups]
        self._map("cells", work, "cells", cost=[sum(c.cost for c in g) for g in groups],
                  done=persist)
        return records  # type: ignore[return-value]

    def _finished(self, cell: Cell) -> dict[str, Any] | None:
        """The record a finished cell wrote (`{"rows": [...], ...}`), or None."""
        name = f"cells/{cell.name}.json"
        if not self.run.exists(name):
            return None
        path = self.run.path(name)
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or not isinstance(record["rows"], list):
                raise TypeError("no list of rows")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise unusable(FileFormatError(f"{path} is not a finished cell ({err})"), path,
                           "recompute it") from None
        return record

    def _map(self, kind: str, work: list[tuple[Unit, tuple[str, ...]]], desc: str,
             cost: list[float] | None = None,
             done: Callable[[int, Any], None] | None = None) -> list[Any]:
        """Run jobs on the executor; `done(i, result)` runs here as job i finishes (after the
        files a worker without the run directory wrote are in place)."""
        options = {"threads": self.threads, "device": str(self.device)}
        config = to_dict(self.cfg)
        where = f"{type(self).__module__}:{type(self).__qualname__}"
        _INSTANCES[_instance_key(where, str(self.run.root), config)] = self
        ship = not self.executor.shared_filesystem
        jobs = [Job(where, config, str(self.run.root), kind, unit, options,
                    {name: self.run.path(name).read_bytes() for name in inputs} if ship else None)
                for unit, inputs in work]
        costs = dict(zip(map(id, jobs), cost or [], strict=False))

        def finished(i: int, result: Any) -> None:
            if ship:  # what a worker without the run directory wrote
                for name, data in result.files.items():
                    atomic_write_bytes(self.run.path(name), data)
            if done is not None:
                done(i, result.result if ship else result)

        results = self.executor.map(run_job, jobs, desc,
                                    cost=(lambda job: costs[id(job)]) if cost else None,
                                    done=finished)
        return [r.result for r in results] if ship else results

    def _files_under(self, folder: str) -> tuple[str, ...]:
        """Run-directory names of the files under `folder` (what a resumed pipeline reads)."""
        root = self.run.path(folder)
        return tuple(sorted(str(p.relative_to(self.run.root)) for p in root.rglob("*")
                            if p.is_file() and not p.name.startswith(".tmp-"))) \
            if root.exists() else ()


@dataclass(frozen=True)
class Shipped:
    """A job's result from a worker without the run directory, with the files it wrote."""

    result: Any
    files: dict[str, bytes]


_INSTANCES: dict[tuple[str, str, str], Experiment] = {}


def _instance_key(name: str, root: str, config: dict[str, Any]) -> tuple[str, str, str]:
    return name, root, json.dumps(config, sort_keys=True)


def run_job(job: Job) -> Any:
    """Run one pipeline or cell, in this process or a worker. The experiment is built once per
    process and run directory, so what it reads (models, data) is read once; shipped files are
    written to a private copy of the run directory first."""
    root, before = job.root, {}
    if job.files is not None:
        root = _private_root(job.root)
        for name, data in job.files.items():
            target = Path(root) / name
            if not target.exists() or target.read_bytes() != data:
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(target, data)
        before = _snapshot(Path(root))
    key = _instance_key(job.experiment, root, job.config)
    if key not in _INSTANCES:
        torch.set_num_threads(job.options.get("threads", 1))
        module, name = job.experiment.split(":")
        cls = getattr(importlib.import_module(module), name)
        _INSTANCES[key] = cls(from_dict(cls.config_class, job.config), root, lambda _: None,
                              threads=job.options.get("threads", 1),
                              device=job.options.get("device", "cpu"))
    experiment = _INSTANCES[key]
    result = experiment.pipeline(*job.unit) if job.kind == "pipeline" \
        else experiment.cell_batch(*job.unit)
    if job.files is None:
        return result
    after = _snapshot(Path(root))
    return Shipped(result, {name: (Path(root) / name).read_bytes() for name, stamp in
                            after.items() if before.get(name) != stamp})


def _private_root(run_root: str) -> str:
    """This worker's private copy of a run directory, removed when the process exits (a
    worker reuses it for every job of the run, so files read once stay read)."""
    root = Path(tempfile.gettempdir()) / (f"instill-{Path(run_root).name}-"
                                          f"{derive_seed(0, run_root)}-{os.getpid()}")
    if not root.exists():
        root.mkdir(parents=True)
        # multiprocessing's finalizers run at a pool worker's exit (atexit handlers do not)
        # and, through its own atexit hook, at the exit of the driver's process.
        multiprocessing.util.Finalize(None, shutil.rmtree, args=(str(root),),
                                      kwargs={"ignore_errors": True}, exitpriority=1)
    return str(root)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under root, to find what a job wrote."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")} \
        if root.exists() else {}


__all__ = ["Cell", "Experiment", "Job", "Shipped", "once", "read_json",
           "run_job", "unusable"]
