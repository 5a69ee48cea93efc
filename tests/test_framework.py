"""The experiment seam: cached phases, gates, cells the driver persists, resume, and executors
without a shared filesystem giving the same results as the local pool."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from instill.experiments import framework
from instill.experiments.executors import LocalExecutor
from instill.experiments.framework import Cell, Experiment, Job, once, read_json, run_job
from instill.experiments.pipeline import Gate, GateError, GatePolicy
from instill.runio import to_dict
from instill.storage import write_json


@dataclass
class ToyGates(GatePolicy):
    minimum: float = 0.0


@dataclass
class ToyConfig:
    seed: int = 0
    replicates: int = 2
    grid: list[int] = field(default_factory=lambda: [1, 2, 3])
    gates: ToyGates = field(default_factory=ToyGates)


class Toy(Experiment):
    """Each pipeline "trains" a number from its seed; cells multiply it by n."""

    name = "toy"
    config_class = ToyConfig
    calls: list[str] = []  # noqa: RUF012  (a record of the work done, across instances)

    def pipelines(self) -> list[tuple]:
        return [(r,) for r in range(self.cfg.replicates)]

    def pipeline_dir(self, unit: tuple) -> str:
        return f"pipelines/r{unit[0]}"

    def attempt(self, unit: tuple, attempt: int) -> list[Gate]:
        name = f"{self.attempt_dir(unit, attempt)}/model.json"

        def train() -> None:
            Toy.calls.append(f"train {unit[0]} {attempt}")
            write_json(self.run.path(name), {"value": self.seed("model", *unit, attempt) % 100})

        once(self.run, [name], train)
        value = read_json(self.run, name)["value"] / 100
        return [Gate("value", value, self.cfg.gates.minimum, "lower gates.minimum")]

    def cells(self, chosen: dict[tuple, dict[str, Any]]) -> list[Cell]:
        return [Cell(f"r{r}-n{n}", (r, c["attempt"], n),
                     (f"{self.attempt_dir((r,), c['attempt'])}/model.json",), cost=n)
                for (r,), c in chosen.items() for n in self.cfg.grid]

    def cell(self, replicate: int, attempt: int, n: int) -> dict[str, Any]:
        Toy.calls.append(f"cell {replicate} {n}")
        value = read_json(self.run, f"{self.attempt_dir((replicate,), attempt)}/model.json")
        return {"rows": [{"replicate": replicate, "n": n, "y": value["value"] * n}]}

    def report(self, chosen, cells, records) -> dict[str, Any]:
        rows = [row for record in records for row in record["rows"]]
        write_json(self.run.path("summary.json"), {"rows": rows})
        return {"rows": rows}


def _run(out: Path, executor=None, **cfg) -> dict[str, Any]:
    return Toy(ToyConfig(**cfg), out, log=lambda _: None, executor=executor).execute()


def test_cells_are_written_by_the_driver_and_skipped_on_resume(tmp_path):
    Toy.calls = []
    first = _run(tmp_path)
    assert sorted(Toy.calls) == sorted([f"train {r} 0" for r in (0, 1)]
                                       + [f"cell {r} {n}" for r in (0, 1) for n in (1, 2, 3)])
    record = json.loads((tmp_path / "cells/r1-n3.json").read_text())
    assert record == {"rows": [first["rows"][5]]}
    manifest = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert {"cells/r0-n1.json", "pipelines/r0/attempts.json", "pipelines/r0/a0/model.json"} \
        <= set(manifest)
    (tmp_path / "cells/r0-n2.json").unlink()
    Toy.calls = []
    again = _run(tmp_path)
    assert Toy.calls == ["cell 0 2"] and again == first


def test_a_damaged_cell_file_names_itself_and_the_fix(tmp_path):
    _run(tmp_path)
    (tmp_path / "cells/r0-n1.json").write_text('{"no rows": 1}')
    with pytest.raises(Exception, match=r"r0-n1.json is not a finished cell.*recompute it"):
        _run(tmp_path)


def test_failed_gates_retry_then_stop_with_the_fix(tmp_path):
    Toy.calls = []
    with pytest.raises(GateError, match=r"lower gates\.minimum"):
        _run(tmp_path, gates=ToyGates(minimum=2.0, retries=1))
    assert sorted(Toy.calls) == ["train 0 0", "train 0 1"]  # stops at the first pipeline


def test_workers_without_the_run_directory_give_the_same_results(tmp_path):
    local = _run(tmp_path / "local", LocalExecutor(2))
    shipped = _run(tmp_path / "shipped", LocalExecutor(1, ship=True))
    assert shipped == local == _run(tmp_path / "shipped2", LocalExecutor(2, ship=True))
    for name in ("pipelines/r1/a0/model.json", "pipelines/r1/attempts.json", "cells/r1-n2.json"):
        assert (tmp_path / "shipped" / name).read_bytes() == (tmp_path / "local" / name
                                                               ).read_bytes()


def test_worker_processes_remove_their_private_copies(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # the spawned workers' temporary directory
    _run(tmp_path / "run", LocalExecutor(2, ship=True))
    assert (tmp_path / "run" / "cells" / "r1-n2.json").exists()
    assert list(scratch.iterdir()) == []


def test_a_job_runs_from_its_description_alone(tmp_path, monkeypatch):
    """What a fresh worker process gets: the experiment as `module:name`, config and unit."""
    _run(tmp_path)
    monkeypatch.setattr(framework, "_INSTANCES", {})  # as in a new process
    job = Job(f"{Toy.__module__}:Toy", to_dict(ToyConfig()), str(tmp_path), "cells",
              ((0, 0, 2), (0, 0, 3)))
    value = read_json(Toy(ToyConfig(), tmp_path).run, "pipelines/r0/a0/model.json")["value"]
    assert run_job(job) == [{"rows": [{"replicate": 0, "n": n, "y": value * n}]} for n in (2, 3)]


def test_each_cell_is_saved_as_it_finishes(tmp_path, monkeypatch):
    """A run that dies in a later cell keeps the cells that finished before it."""
    real = Toy.cell

    def cell(self, replicate, attempt, n):
        if (replicate, n) == (1, 2):
            raise KeyboardInterrupt
        return real(self, replicate, attempt, n)

    monkeypatch.setattr(Toy, "cell", cell)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == [
        "r0-n1.json", "r0-n2.json", "r0-n3.json", "r1-n1.json"]


class GroupedToy(Toy):
    """Toy whose cells of one replicate run as one job (as a batched stack would)."""

    def cell_groups(self, cells: list[Cell]) -> list[list[Cell]]:
        by: dict[int, list[Cell]] = {}
        for cell in cells:
            by.setdefault(cell.unit[0], []).append(cell)
        return list(by.values())

    def cell_batch(self, *units: tuple) -> list[dict[str, Any]]:
        Toy.calls.append(f"batch of {len(units)}")
        return super().cell_batch(*units)


def test_grouped_cells_run_as_one_job_per_group_with_the_same_records(tmp_path):
    plain = _run(tmp_path / "plain")
    Toy.calls.clear()
    grouped = GroupedToy(ToyConfig(), tmp_path / "grouped", log=lambda _: None).execute()
    assert grouped == plain
    assert sorted(c for c in Toy.calls if c.startswith("batch")) == ["batch of 3"] * 2
    for name in ("r0-n1", "r1-n3"):
        assert (tmp_path / "grouped/cells" / f"{name}.json").read_bytes() == \
            (tmp_path / "plain/cells" / f"{name}.json").read_bytes()
    (tmp_path / "grouped/cells/r1-n2.json").unlink()  # a resumed run groups what is left
    Toy.calls.clear()
    GroupedToy(ToyConfig(), tmp_path / "grouped", log=lambda _: None).execute()
    assert [c for c in Toy.calls if not c.startswith("train")] == ["batch of 1", "cell 1 2"]
