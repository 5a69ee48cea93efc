"""Trustworthy runs: reproducible, resumable after a kill or Ctrl-C, and safe with untrusted files.

The run tests drive the real command line in subprocesses (`python -m instill arithmetic`), so
they see what a user sees: exit codes, messages, and the files a killed process leaves behind.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from test_arithmetic_experiment import TINY

import instill
from instill.checkpoint import load_model
from instill.cli import main
from instill.core import Subnetwork
from instill.errors import FileFormatError
from instill.experiments.arithmetic import load_config
from instill.runio import RUN_FORMAT_VERSION, configfiles, load_config_file, to_dict

torch.set_num_threads(1)

# TINY with a longer grid and slower cells, so a run can be caught between its cells.
# Cells must outlast a Ctrl-C's delivery (tens of ms) on an idle machine.
CONFIG = {**TINY, "replicates": 1, "grid": [0, 8, 16, 24, 32],
          "induction_fit": {"epochs": 40, "batch_size": 8}}
CELLS = {f"L1-r0-a0-n{n}-s0-{c}.json" for n in CONFIG["grid"] for c in CONFIG["conditions"]}
BASE, SUB = "pipelines/L1-r0/a0/base.safetensors", "pipelines/L1-r0/a0/subnetwork.safetensors"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SRC = Path(instill.__file__).resolve().parent


def _config_file(directory: Path) -> Path:
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def _start(out: Path, config: Path) -> subprocess.Popen:
    """`python -m instill arithmetic --config tiny.yaml --out OUT --workers 1`, in background."""
    with open(out.parent / f"{out.name}.log", "wb") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "instill", "arithmetic", "--config", str(config), "--out",
             str(out), "--workers", "1"], cwd=out.parent, env=ENV, stdout=log,
            stderr=subprocess.STDOUT, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """The child takes Ctrl-C even when the suite runs as a background job of a
    non-interactive shell, which starts with SIGINT ignored (and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _finish(proc: subprocess.Popen, out: Path, timeout: float = 240) -> tuple[int, str]:
    """Wait for the process; its exit code and its output (stdout and stderr)."""
    code = proc.wait(timeout=timeout)
    return code, (out.parent / f"{out.name}.log").read_text()


def _finished_cells(out: Path) -> list[Path]:
    """Cells written under their final name (temp files are named `.tmp-*`)."""
    return sorted((out / "cells").glob("L*.json"))


def _wait_for_cells(proc: subprocess.Popen, out: Path, more_than: int,
                    timeout: float = 240) -> None:
    """Poll until more than `more_than` cells are finished but the run is not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before it could be interrupted")
        if len(_finished_cells(out)) > more_than and not (out / "results.csv").exists():
            return
        time.sleep(0.01)
    proc.kill()
    pytest.fail("no new cell was finished in time")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _state(paths: list[Path]) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The same command line (same config and seed) run three times:

    - `resumed`: in a subprocess, interrupted with Ctrl-C after its first cell; rerun in
      another and killed (SIGKILL) after a further cell; then rerun to completion. What each
      interruption left is recorded;
    - `first`, `second`: uninterrupted.

    The completing runs go through click's runner in this process, whose torch random state
    differs from a fresh process's: results only match if the seeding is complete.
    """
    root = tmp_path_factory.mktemp("runs")
    config = _config_file(root)
    out, record = root / "resumed", {"root": root}

    proc = _start(out, config)
    _wait_for_cells(proc, out, 0)
    proc.send_signal(signal.SIGINT)
    record["sigint"] = _finish(proc, out, timeout=60)
    record["after_sigint"] = {p.name: p.read_bytes() for p in (out / "cells").iterdir()}
    done = _finished_cells(out)

    proc = _start(out, config)
    _wait_for_cells(proc, out, len(done))
    proc.send_signal(signal.SIGKILL)
    record["sigkill"] = _finish(proc, out)
    record["after_sigkill"] = {p.name: p.read_bytes() for p in (out / "cells").iterdir()}
    record["results_after_sigkill"] = (out / "results.csv").exists()
    kept = [*_finished_cells(out), out / BASE, out / SUB]
    record["kept"] = _state(kept)

    for name in ("resumed", "first", "second"):
        result = CliRunner().invoke(main, ["arithmetic", "--config", str(config), "--out",
                                           str(root / name), "--workers", "1"])
        record["resume" if name == "resumed" else name] = result.exit_code, result.output
    return record


# --------------------------------------------------------------------------- reproducible


def test_same_command_twice_gives_bit_identical_outputs(runs):
    first, second = runs["root"] / "first", runs["root"] / "second"
    assert runs["first"][0] == runs["second"][0] == 0, runs["first"][1] + runs["second"][1]
    assert (first / "results.csv").read_bytes() == (second / "results.csv").read_bytes()
    for name in (SUB, BASE, *(f"cells/{c}" for c in CELLS)):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # Every hashed output, the plot and report included, is the same file.
    manifests = [json.loads((out / "manifest.json").read_text()) for out in (first, second)]
    assert manifests[0] == manifests[1]


def test_run_records_config_seed_versions_git_revision_and_hashes(runs):
    out = runs["root"] / "first"
    assert runs["first"][0] == 0, runs["first"][1]
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["format_version"] == RUN_FORMAT_VERSION
    expected = json.loads(json.dumps(to_dict(load_config("paper", CONFIG))))
    assert recorded["config"] == expected and recorded["seed"] == expected["seed"] == 0
    for package in ("torch", "numpy", "safetensors", "transformers"):
        assert recorded["packages"][package] == importlib.metadata.version(package)
    assert recorded["instill_version"] == importlib.metadata.version("instill")
    assert recorded["python"] and recorded["device"]["torch_threads"] == 1
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=SRC, capture_output=True, text=True,
                          env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}, check=False)
    revision = head.stdout.strip() if head.returncode == 0 else None
    assert recorded["git_revision"] == revision
    assert recorded["git_dirty"] in (True, False, None)

    # manifest.json hashes every output (checkpoints, subnetworks, cells, tables, plot, report).
    manifest = json.loads((out / "manifest.json").read_text())
    outputs = set(_files(out)) - {"config.json", "manifest.json"}
    assert set(manifest["files"]) == outputs
    assert {BASE, SUB, "results.csv", *(f"cells/{c}" for c in CELLS)} <= outputs
    for name, digest in manifest["files"].items():
        assert _sha(out / name) == digest, name
    # The subnetwork file says what it holds.
    sub = Subnetwork.load(out / SUB)
    assert sub.metadata["layers"] == "1" and sub.metadata["subtask"] == expected["subtask"]


# --------------------------------------------------------------------------- resumable


def test_ctrl_c_exits_130_and_says_how_to_resume(runs):
    code, log = runs["sigint"]
    out = runs["root"] / "resumed"
    assert code == 130, log
    assert f"rerun the same command to resume from {out}" in log
    assert "Traceback" not in log
    finished = {n: b for n, b in runs["after_sigint"].items() if not n.startswith(".tmp-")}
    assert finished and all(json.loads(b)["rows"] for b in finished.values())


def test_killed_run_resumes_to_the_same_results_without_redoing_finished_cells(runs):
    reference, out = runs["root"] / "first", runs["root"] / "resumed"
    assert runs["sigkill"][0] == -signal.SIGKILL
    assert not runs["results_after_sigkill"]
    left = runs["after_sigkill"]
    finished = {n: b for n, b in left.items() if not n.startswith(".tmp-")}
    before = {n: b for n, b in runs["after_sigint"].items() if not n.startswith(".tmp-")}
    assert len(before) < len(finished) < len(CELLS)  # killed between cells, after new ones
    assert all(finished[n] == b for n, b in before.items())
    assert set(finished) <= CELLS  # anything else is a temp file, never read back
    for name, data in finished.items():  # nothing half-written under a final name
        rows = json.loads(data)["rows"]
        assert [f"-{r['condition']}.json" for r in rows] == [name[name.rindex("-"):]]

    code, log = runs["resume"]
    assert code == 0, log
    assert _state(list(runs["kept"])) == runs["kept"]  # finished work was not redone
    assert (out / "results.csv").read_bytes() == (reference / "results.csv").read_bytes()
    assert {p.name for p in _finished_cells(out)} == CELLS
    for name in (BASE, SUB, *(f"cells/{c}" for c in CELLS)):  # the same bytes elsewhere
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert not any(".tmp-" in name for name in manifest)  # a temp file is never trusted


# --------------------------------------------------------------------------- untrusted files


class _Payload:
    """Unpickling this creates the marker file: stands in for any code a pickle could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_files(tmp_path: Path, marker: Path) -> list[Path]:
    """torch.save output (zip and legacy) and a raw protocol-0 pickle, under various names."""
    payload = {"weight": _Payload(marker)}
    files = []
    for name, kwargs in (("zip.safetensors", {}), ("zip.pt", {}),
                         ("legacy.safetensors", {"_use_new_zipfile_serialization": False})):
        torch.save(payload, tmp_path / name, **kwargs)
        files.append(tmp_path / name)
    (tmp_path / "raw.safetensors").write_bytes(pickle.dumps(payload, protocol=0))
    files.append(tmp_path / "raw.safetensors")
    return files


def test_the_malicious_payload_is_live(tmp_path):
    """Control: unpickling these files really does run code (so the next test means something)."""
    marker = tmp_path / "MARKER"
    zipped, _, legacy, raw = _malicious_files(tmp_path, marker)
    for path in (zipped, legacy):
        pt = path.with_suffix(".pt")  # torch.load reads a .safetensors name as safetensors
        pt.write_bytes(path.read_bytes())
        torch.load(pt, weights_only=False)
        assert marker.exists()
        marker.unlink()
    with open(raw, "rb") as handle:
        pickle.load(handle)
    assert marker.exists()


@pytest.mark.parametrize("loader", ["subnetwork", "model"])
def test_pickles_are_refused_without_running_code(tmp_path, loader):
    marker = tmp_path / "MARKER"
    model = torch.nn.Linear(4, 4)
    for path in _malicious_files(tmp_path, marker):
        with pytest.raises(FileFormatError) as err:
            if loader == "subnetwork":
                Subnetwork.load(path)
            else:
                load_model(path, model)
        message = str(err.value)
        assert str(path) in message and "not a valid safetensors file" in message
        if not path.name.startswith("raw"):
            assert "never unpickles" in message  # names the problem and what to do instead
        assert not marker.exists(), f"loading {path.name} ran code"


@pytest.mark.parametrize("where", ["flag", "config"])
def test_code_in_an_expression_is_an_error_not_executed(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    code = f"__import__('os').system('touch {marker}')"
    args = ["arithmetic", "--out", str(tmp_path / "run"), "--workers", "1"]
    if where == "flag":
        args += ["--target", code]
    else:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({"alternatives": [code]}))
        args += ["--config", str(tmp_path / "c.yaml")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "unknown name '__import__'" in result.output and "Traceback" not in result.output
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_yaml_config_cannot_build_python_objects(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "c.yaml"
    path.write_text(f"target: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(FileFormatError, match="not valid YAML at line 1"):
        load_config_file(path)
    assert not marker.exists()


_UNSAFE_CALLS = {"torch.load", "pickle.load", "pickle.loads", "pickle.Unpickler",
                 "marshal.loads", "yaml.unsafe_load", "yaml.full_load", "eval", "exec",
                 "__import__"}
_UNSAFE_TEXT = re.compile(r"\btorch\.load\s*\(|\bpickle\.load|(?<![\w.])(eval|exec)\s*\(")


_SAFE_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "_UniqueKeyLoader"}


def _dotted(node: ast.AST | None) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_source_never_unpickles_or_evaluates():
    sources = sorted(SRC.rglob("*.py"))
    assert len(sources) > 10
    found = []
    for path in sources:
        text = path.read_text()
        found += [f"{path.name}:{m.group(0)}" for m in _UNSAFE_TEXT.finditer(text)]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and _dotted(node.func) in _UNSAFE_CALLS:
                found.append(f"{path.name}:{node.lineno} {_dotted(node.func)}()")
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                found += [f"{path.name}:{node.lineno} import {n}" for n in names
                          if n.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal")]
            if isinstance(node, ast.Call) and _dotted(node.func) == "yaml.load":
                loader = next((k.value for k in node.keywords if k.arg == "Loader"), None)
                if _dotted(loader) not in _SAFE_LOADERS:
                    found.append(f"{path.name}:{node.lineno} yaml.load({_dotted(loader)})")
    assert found == []
    assert issubclass(configfiles._UniqueKeyLoader, yaml.SafeLoader)
