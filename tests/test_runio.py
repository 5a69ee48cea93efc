"""Tests for instill.runio: atomic writes, safe loading, config building, run metadata, RunDir."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from instill import runio
from instill.errors import ConfigError, FileFormatError, InstillError
from instill.runio import (
    RunDir,
    file_sha256,
    from_dict,
    hash_files,
    load_config_file,
    run_metadata,
    to_dict,
)
from instill.storage import (
    atomic,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    load_tensors,
    save_tensors,
    write_json,
)

# --------------------------------------------------------------------------- atomic writes


def _enospc(*_args: object, **_kwargs: object) -> None:
    """Stand-in for a write step that fails because the disk is full."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _leftovers(directory: Path) -> list[str]:
    """Temp files left behind in a directory."""
    return [p.name for p in directory.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_failed_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch, step):
    target = tmp_path / "results.csv"
    target.write_text("old\n")
    monkeypatch.setattr(atomic.os, step, _enospc)
    with pytest.raises(InstillError) as info:
        atomic_write_text(target, "new\n")
    monkeypatch.undo()
    message = str(info.value)
    assert str(target) in message
    assert "No space left on device" in message
    assert "previous file, if any, is unchanged" in message
    assert target.read_text() == "old\n"
    assert _leftovers(tmp_path) == []


def test_atomic_write_bytes_replaces_content(tmp_path):
    target = tmp_path / "sub" / "blob.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert _leftovers(target.parent) == []


def test_atomic_path_keeps_suffix_and_commits(tmp_path):
    target = tmp_path / "plot.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".tmp-") and tmp.name.endswith(".png")
        tmp.write_bytes(b"png")
        assert not target.exists()
    assert target.read_bytes() == b"png"
    assert _leftovers(tmp_path) == []


def test_atomic_path_failure_removes_temp_and_reraises(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    with pytest.raises(ZeroDivisionError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        _ = 1 / 0
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_atomic_path_works_with_matplotlib(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    with atomic_path(tmp_path / "fig.pdf") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    assert (tmp_path / "fig.pdf").read_bytes().startswith(b"%PDF")


def test_write_json_numpy_torch_path_nan(tmp_path):
    target = tmp_path / "out.json"
    obj = {
        "b": np.float32(1.5),
        "a": np.int64(3),
        "t": torch.tensor(2.5),
        "v": torch.tensor([1, 2]),
        "arr": np.arange(3),
        "p": Path("x/y"),
        "nan": float("nan"),
        "npnan": np.float64("nan"),
        "tup": (1, (2, 3)),
        "flag": np.bool_(True),
    }
    write_json(target, obj)
    text = target.read_text()
    assert text.endswith("}\n")
    assert text.startswith('{\n  "a": 3,')  # sorted keys, indent 2
    data = json.loads(text)
    assert data == {
        "a": 3,
        "arr": [0, 1, 2],
        "b": 1.5,
        "flag": True,
        "nan": None,
        "npnan": None,
        "p": "x/y",
        "t": 2.5,
        "tup": [1, [2, 3]],
        "v": [1, 2],
    }


def test_write_json_rejects_unknown_objects(tmp_path):
    with pytest.raises(TypeError, match="object"):
        write_json(tmp_path / "x.json", {"x": object()})
    assert not (tmp_path / "x.json").exists()
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- tensors


def test_tensors_round_trip_with_metadata(tmp_path):
    path = tmp_path / "mask.safetensors"
    tensors = {"w": torch.randn(3, 4), "n": torch.arange(5), "t": torch.ones(4, 2).t()}
    save_tensors(path, tensors, {"method": "cs", "step": "10"})
    loaded, meta = load_tensors(path)
    assert meta == {"method": "cs", "step": "10"}
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value)
    assert load_tensors(path)[1] == {"method": "cs", "step": "10"}
    save_tensors(path, {"x": torch.zeros(1)})
    assert load_tensors(path)[1] == {}


def test_save_tensors_rejects_non_string_metadata(tmp_path):
    with pytest.raises(TypeError, match="metadata"):
        save_tensors(tmp_path / "m.safetensors", {"w": torch.ones(1)}, {"step": 3})  # type: ignore[dict-item]


def test_load_tensors_missing_file(tmp_path):
    with pytest.raises(FileFormatError, match="does not exist"):
        load_tensors(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("cut", [3, 8, 20, -5])
def test_load_tensors_truncated(tmp_path, cut):
    good = tmp_path / "good.safetensors"
    save_tensors(good, {"w": torch.randn(8, 8)})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:cut])
    with pytest.raises(FileFormatError, match="not a valid safetensors file") as info:
        load_tensors(bad)
    assert str(bad) in str(info.value)


def test_load_tensors_random_bytes(tmp_path):
    bad = tmp_path / "noise.safetensors"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(FileFormatError, match="not a valid safetensors file"):
        load_tensors(bad)


def _touch(path: str) -> int:
    """What a malicious pickle would run on load: create a marker file."""
    Path(path).write_text("unpickled!")
    return 0


class _Payload:
    """Pickles to a call of _touch(marker), so unpickling it leaves a visible trace."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def test_pickle_payload_is_live(tmp_path):
    """Control: the payload really does run code when unpickled."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("kind", ["torch_zip", "torch_legacy", "raw_pickle", "pickle_v0_pt"])
def test_load_tensors_never_unpickles(tmp_path, monkeypatch, kind):
    marker = tmp_path / "marker"
    payload = {"w": torch.ones(2), "evil": _Payload(marker)}
    path = tmp_path / ("model.pt" if kind == "pickle_v0_pt" else "model.safetensors")
    if kind == "torch_zip":
        torch.save(payload, path)
    elif kind == "torch_legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    elif kind == "raw_pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=0))

    def forbidden(*_args, **_kwargs):
        raise AssertionError("load_tensors tried to unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(FileFormatError) as info:
        load_tensors(path)
    message = str(info.value)
    assert str(path) in message
    assert "not a valid safetensors file" in message
    assert "never unpickles" in message
    assert "save_file" in message
    assert not marker.exists()


# --------------------------------------------------------------------------- config files


def test_load_yaml_and_json(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("name: x\ndiscovery:\n  lr: 1e-3\n  steps: 5\n")
    assert load_config_file(yml) == {"name": "x", "discovery": {"lr": "1e-3", "steps": 5}}
    js = tmp_path / "c.json"
    js.write_text('{"name": "x", "discovery": {"lr": 0.001}}')
    assert load_config_file(js) == {"name": "x", "discovery": {"lr": 0.001}}


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("name: x\nlayers: [1, 2\nseed: 3\n")
    with pytest.raises(FileFormatError, match=r"not valid YAML at line \d+, column \d+") as info:
        load_config_file(path)
    assert str(path) in str(info.value)


def test_json_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "a": 1,\n  "b": \n}\n')
    with pytest.raises(FileFormatError, match="not valid JSON at line 4"):
        load_config_file(path)


@pytest.mark.parametrize(
    ("name", "text"),
    [("list.yaml", "- 1\n- 2\n"), ("scalar.yaml", "3\n"), ("list.json", "[1, 2]")],
)
def test_config_top_level_must_be_mapping(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(FileFormatError, match="top level must be a mapping"):
        load_config_file(path)


@pytest.mark.parametrize(
    ("name", "text", "pattern"),
    [
        ("empty.yaml", "# nothing\n", "is empty"),
        ("dup.yaml", "a: 1\na: 2\n", "duplicate key 'a'"),
        ("dup.json", '{"a": 1, "a": 2}', "duplicate key 'a'"),
        ("c.toml", "a = 1", "use .yaml, .yml or .json"),
        ("obj.yaml", "a: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ],
)
def test_config_file_errors(tmp_path, name, text, pattern):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(FileFormatError, match=pattern):
        load_config_file(path)


def test_config_file_missing(tmp_path):
    with pytest.raises(FileFormatError, match="does not exist"):
        load_config_file(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- from_dict / to_dict


@dataclass
class Discovery:
    lr: float = 1e-3
    steps: int = 100
    method: Literal["continuous", "hard_concrete"] = "continuous"
    layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")


@dataclass
class Experiment:
    name: str = "run"
    seed: int | None = None
    verbose: bool = False
    tags: list[str] = field(default_factory=list)
    shape: tuple[int, int] = (2, 3)
    out: Path = Path("runs")
    discovery: Discovery = field(default_factory=Discovery)


@dataclass
class Required:
    size: int


def test_from_dict_builds_nested():
    cfg = from_dict(
        Experiment,
        {
            "name": "a",
            "seed": 3,
            "tags": ["x"],
            "shape": [4, 5],
            "out": "o/p",
            "discovery": {"lr": 1, "layers": [0, 2], "method": "hard_concrete"},
        },
    )
    assert cfg == Experiment(
        name="a",
        seed=3,
        tags=["x"],
        shape=(4, 5),
        out=Path("o/p"),
        discovery=Discovery(lr=1.0, layers=[0, 2], method="hard_concrete"),
    )
    assert isinstance(cfg.discovery.lr, float)
    assert from_dict(Experiment, {}) == Experiment()


def test_from_dict_accepts_yaml_string_float():
    assert from_dict(Discovery, {"lr": "1e-3"}).lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="lr must be float"):
        from_dict(Discovery, {"lr": "fast"})


def test_unknown_key_suggests_and_lists_valid():
    with pytest.raises(ConfigError) as info:
        from_dict(Experiment, {"discovery": {"lrr": 0.1}}, where="exp.yaml")
    message = str(info.value)
    assert message.startswith("exp.yaml: ")
    assert "discovery.lrr" in message
    assert "did you mean 'lr'?" in message
    assert "valid keys in discovery: lr, steps, method, layers" in message


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"unknown key\(s\): sed \(did you mean 'seed'\?\)"):
        from_dict(Experiment, {"sed": 1})


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"discovery": {"steps": "ten"}}, r"discovery\.steps must be int, got 'ten' \(str\)"),
        ({"discovery": {"steps": True}}, r"discovery\.steps must be int, got True \(bool\)"),
        ({"discovery": {"steps": 2.5}}, r"discovery\.steps must be int, got 2\.5"),
        ({"discovery": {"lr": True}}, r"discovery\.lr must be float, got True"),
        ({"verbose": 1}, r"verbose must be bool, got 1 \(int\)"),
        ({"seed": "x"}, r"seed must be int or null, got 'x'"),
        ({"seed": False}, r"seed must be int or null, got False"),
        ({"name": 3}, r"name must be str, got 3"),
        ({"tags": "x"}, r"tags must be list\[str\]"),
        ({"tags": ["a", 1]}, r"tags\[1\] must be str, got 1"),
        ({"discovery": {"layers": [0, "1"]}}, r"discovery\.layers\[1\] must be int"),
        ({"shape": [1, 2, 3]}, r"shape must be tuple\[int, int\].*exactly 2 items"),
        ({"discovery": 5}, r"discovery must be a mapping \(Discovery\), got 5"),
        (
            {"discovery": {"method": "hard_concret"}},
            r"discovery\.method must be one of 'continuous', 'hard_concrete', got 'hard_concret'"
            r" \(str\) \(did you mean 'hard_concrete'\?\)",
        ),
        ({"discovery": {"steps": -1}}, r"discovery: steps must be >= 0, got -1"),
    ],
)
def test_from_dict_type_errors(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(Experiment, data)


def test_from_dict_missing_required_and_non_mapping():
    with pytest.raises(ConfigError, match=r"missing required key\(s\): size"):
        from_dict(Required, {})
    with pytest.raises(ConfigError, match="expected a mapping"):
        from_dict(Required, [1, 2])  # type: ignore[arg-type]


def test_to_dict_is_plain_json():
    data = to_dict(Experiment(shape=(7, 8), out=Path("a/b")))
    assert data["shape"] == [7, 8]
    assert data["out"] == "a/b"
    assert data["discovery"] == {"lr": 1e-3, "steps": 100, "method": "continuous", "layers": []}
    assert json.loads(json.dumps(data)) == data
    with pytest.raises(TypeError):
        to_dict({"a": 1})


_finite = st.floats(allow_nan=False, allow_infinity=False)
_discoveries = st.builds(
    Discovery,
    lr=_finite,
    steps=st.integers(0, 2**40),
    method=st.sampled_from(["continuous", "hard_concrete"]),
    layers=st.lists(st.integers(-(2**40), 2**40), max_size=4),
)
_experiments = st.builds(
    Experiment,
    name=st.text(max_size=8),
    seed=st.none() | st.integers(),
    verbose=st.booleans(),
    tags=st.lists(st.text(max_size=4), max_size=3),
    shape=st.tuples(st.integers(), st.integers()),
    out=st.text(min_size=1, max_size=8).map(Path),
    discovery=_discoveries,
)


@settings(max_examples=150, deadline=None)
@given(_experiments)
def test_round_trip_property(exp):
    assert from_dict(Experiment, to_dict(exp)) == exp
    assert from_dict(Experiment, json.loads(json.dumps(to_dict(exp)))) == exp


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_discovery_keys = st.sampled_from(["lr", "steps", "method", "layers", "lrr"])
_experiment_keys = st.sampled_from(
    ["name", "seed", "verbose", "tags", "shape", "out", "discovery", "nmae"]
)
_random_discovery = st.dictionaries(_discovery_keys, _json_values, max_size=4)
_random_experiment = (
    st.dictionaries(_experiment_keys, _json_values | _random_discovery, max_size=6) | _json_values
)


@settings(max_examples=300, deadline=None)
@given(_random_experiment)
def test_random_dicts_build_or_raise_config_error(data):
    try:
        result = from_dict(Experiment, data)
    except ConfigError as err:
        assert str(err).startswith("config: ")
    else:
        assert isinstance(result, Experiment)


# --------------------------------------------------------------------------- metadata & hashes


def test_run_metadata_keys():
    meta = run_metadata(7, {"a": 1, "lr": np.float32(0.5)})
    expected = {
        "instill_version",
        "python",
        "platform",
        "packages",
        "git_revision",
        "git_dirty",
        "seed",
        "config",
        "created",
        "device",
    }
    assert expected <= meta.keys()
    assert meta["seed"] == 7
    assert meta["config"] == {"a": 1, "lr": 0.5}
    assert meta["packages"]["torch"] == torch.__version__
    assert "numpy" in meta["packages"] and "safetensors" in meta["packages"]
    assert meta["git_revision"] is None or re.fullmatch(r"[0-9a-f]{40}", meta["git_revision"])
    assert meta["git_dirty"] in (None, True, False)
    assert datetime.fromisoformat(meta["created"]).utcoffset().total_seconds() == 0
    assert set(meta["device"]) >= {"cuda_available", "torch_threads"}
    json.dumps(meta)


def test_file_hashes(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello")
    (tmp_path / "b.txt").write_bytes(b"")
    assert file_sha256(tmp_path / "a.txt") == hashlib.sha256(b"hello").hexdigest()
    assert hash_files(tmp_path, ["a.txt", "b.txt"]) == {
        "a.txt": hashlib.sha256(b"hello").hexdigest(),
        "b.txt": hashlib.sha256(b"").hexdigest(),
    }
    with pytest.raises(FileFormatError, match="does not exist"):
        file_sha256(tmp_path / "c.txt")


# --------------------------------------------------------------------------- RunDir


CONFIG = {"task": "parity", "discovery": {"lr": 0.001, "steps": 100}, "layers": [0, 1]}


def test_rundir_fresh_write_and_same_config(tmp_path):
    run = RunDir(tmp_path / "out" / "run1")
    assert run.root.is_dir()
    run.check_compatible(CONFIG)  # nothing recorded yet
    record = run.write_config(CONFIG, seed=3)
    on_disk = json.loads(run.path("config.json").read_text())
    assert on_disk["format_version"] == runio.RUN_FORMAT_VERSION == 1
    assert on_disk["config"] == CONFIG and on_disk["seed"] == 3
    assert record["config"] == CONFIG
    assert run.exists("config.json") and not run.exists("results.csv")
    RunDir(run.root).check_compatible({**CONFIG, "layers": (0, 1)})


def test_rundir_different_config_is_refused(tmp_path):
    run = RunDir(tmp_path)
    run.write_config(CONFIG, seed=0)
    changed = {**CONFIG, "discovery": {"lr": 0.01, "steps": 100}, "extra": True}
    with pytest.raises(ConfigError) as info:
        run.check_compatible(changed)
    message = str(info.value)
    assert "discovery.lr was 0.001, now 0.01" in message
    assert "extra was '<unset>', now True" in message
    assert "discovery.steps" not in message
    assert "use a new --out directory or delete" in message
    run.check_compatible(changed, version_key_fields=["task", "layers"])
    with pytest.raises(ConfigError, match=r"discovery\.lr"):
        run.check_compatible(changed, version_key_fields=["discovery"])


def test_rundir_new_key_at_its_default_resumes_an_older_run(tmp_path):
    """A run recorded before a config key existed resumes when the key holds its default
    (the older run behaved as the default does), and is refused at any other value."""
    run = RunDir(tmp_path)
    run.write_config(CONFIG, seed=0)
    defaults = {**CONFIG, "densities": [None], "discovery": {"lr": 1.0, "target": None}}
    newer = {**CONFIG, "densities": [None], "discovery": {**CONFIG["discovery"], "target": None}}
    assert run.check_compatible(newer, defaults=defaults) == ["densities", "discovery.target"]
    with pytest.raises(ConfigError, match=r"densities was '<unset>', now \[None, 0.05\]"):
        run.check_compatible({**newer, "densities": [None, 0.05]}, defaults=defaults)
    with pytest.raises(ConfigError, match=r"extra was '<unset>'"):  # no default: not compatible
        run.check_compatible({**newer, "extra": 1}, defaults=defaults)


def test_rundir_format_version_mismatch(tmp_path):
    run = RunDir(tmp_path)
    write_json(run.path("config.json"), {"format_version": 0, "config": CONFIG})
    with pytest.raises(ConfigError, match=r"run format version 0.*writes version 1.*--out"):
        run.check_compatible(CONFIG)


def test_rundir_corrupt_config(tmp_path):
    run = RunDir(tmp_path)
    run.path("config.json").write_text("{not json")
    with pytest.raises(FileFormatError, match="--out"):
        run.check_compatible(CONFIG)


def test_rundir_on_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        RunDir(tmp_path / "f")


def test_record_outputs_updates_manifest(tmp_path):
    run = RunDir(tmp_path)
    atomic_write_text(run.path("results.csv"), "a,b\n1,2\n")
    save_tensors(run.path("mask.safetensors"), {"m": torch.ones(3)})
    run.record_outputs(["results.csv"])
    run.record_outputs(["mask.safetensors"])
    manifest = json.loads(run.path("manifest.json").read_text())
    assert manifest["files"] == {
        "results.csv": file_sha256(run.path("results.csv")),
        "mask.safetensors": file_sha256(run.path("mask.safetensors")),
    }
    atomic_write_text(run.path("results.csv"), "a,b\n3,4\n")
    updated = run.record_outputs(["results.csv"])
    assert updated["files"]["results.csv"] == hashlib.sha256(b"a,b\n3,4\n").hexdigest()
    assert _leftovers(tmp_path) == []
