"""Bad input through the command line: each gives one clear line naming the problem and its fix,
exit code 2 and no traceback, and leaves finished work alone.

Cases that need an existing run directory copy one finished tiny run, damage it, and rerun the
same command on it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_arithmetic_experiment import TINY

from instill.checkpoint import save_model
from instill.cli import main
from instill.core import MaskConfig, attach_masks
from instill.errors import ConfigError
from instill.experiments import arithmetic as arith
from instill.experiments.arithmetic import ArithmeticConfig, load_config, run_arithmetic
from instill.models import build_model
from instill.runio import to_dict

torch.set_num_threads(1)


def _invoke(out: Path, args: list[str], config: Path | None = None):
    """`instill arithmetic --out OUT --workers 1 [--config FILE] ARGS` in this process."""
    extra = ["--config", str(config)] if config else []
    return CliRunner().invoke(main, ["arithmetic", "--out", str(out), "--workers", "1", *extra,
                                     *args])


def _assert_user_error(result, *fragments: str) -> None:
    """Exit 2, every fragment in the output, and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


def _state(root: Path) -> dict[str, tuple[int, str]]:
    """mtime and hash of every file under `root`."""
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns,
                                             hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- config and flags

# (config file: None, a dict written as YAML, or (file name, raw text); flags; fragments)
INPUTS = [
    pytest.param({"numbrs": 10}, [], ["unknown key(s): numbrs", "did you mean 'numbers'?"],
                 id="unknown-key"),
    pytest.param({"base_fit": {"epoch": 3}}, [],
                 ["base_fit.epoch", "did you mean 'epochs'?", "valid keys in base_fit"],
                 id="unknown-nested-key"),
    pytest.param({"numbers": "ten"}, [], ["numbers must be int, got 'ten' (str)",
                                          "write a whole number"], id="string-for-int"),
    pytest.param({"seeds": True}, [], ["seeds must be int, got True (bool)", "not true/false"],
                 id="bool-for-int"),
    pytest.param({"layers": 2}, [], ["layers must be list[int], got 2 (int)",
                                     "write a list like [1, 2]"], id="scalar-for-list"),
    pytest.param({"loss": "lmm"}, [], ["loss must be one of 'lm', 'answer'",
                                       "did you mean 'lm'?"], id="literal-typo"),
    pytest.param({"layers": [0, 2]}, [], ["layers must be a non-empty list of depths >= 1",
                                          "got [0, 2]"], id="depth-0"),
    pytest.param({"base_fit": {"lr": -1}}, [], ["base_fit: lr must be > 0, got -1.0"],
                 id="negative-lr"),
    pytest.param({"threshold": 1.5}, [], ["threshold must be in (0, 1], got 1.5"],
                 id="threshold-range"),
    pytest.param({"n_embd": 16, "n_head": 3}, [],
                 ["n_embd (16) must be divisible by n_head (3)"], id="heads"),
    pytest.param(None, ["--modulus", "1"], ["modulus must be at least 2, got 1",
                                            "set modulus to 2 or more"], id="modulus-1"),
    pytest.param({"modulus": 0}, [], ["modulus must be at least 2, got 0"], id="modulus-0"),
    pytest.param(None, ["--numbers", "5"], ["modulus (7) must not exceed numbers (5)",
                                            "lower modulus or raise numbers"],
                 id="modulus-above-numbers"),
    pytest.param(None, ["--numbers", "100000"], ["numbers must be at most 10,000, got 100,000",
                                                 "lower numbers"], id="numbers-too-many"),
    pytest.param(None, ["--target", "a^2 + $b"],
                 ["target: unexpected character '$' at position 6", "  a^2 + $b\n        ^\n",
                  "expressions use a, b, integers"], id="expression-bad-char"),
    pytest.param({"base": "(a + b"}, [],
                 ["base: unbalanced parentheses: unclosed '(' at position 0"],
                 id="expression-unclosed"),
    pytest.param({"alternatives": ["2*a^2", "a +"]}, [],
                 ["alternatives[1]: missing operand after '+' at position 3"],
                 id="expression-missing-operand"),
    pytest.param({"alternatives": ["seed"]}, [],
                 ["alternatives[0]: unknown name 'seed' (the only variables are a and b)"],
                 id="expression-names-a-config-key"),
    pytest.param(None, ["--subtask", "a ** b"], ["subtask:", "position", "exponent"],
                 id="expression-variable-exponent"),
    pytest.param({"discovery": {"mask": {"method": "magic"}}}, [],
                 ["unknown mask method 'magic'; choose one of"], id="mask-method"),
    pytest.param({"discovery": {"mask": {"targets": "(["}}}, [],
                 ["targets '([' is not a valid regular expression",
                  "pass a list of module names"], id="mask-regex"),
    pytest.param(None, ["--conditions", "subnet,magic"], ["unknown conditions ['magic']",
                                                          "choose from"], id="condition"),
    pytest.param(None, ["--layers", "2,x"], ["--layers takes comma-separated integers"],
                 id="layers-flag"),
    pytest.param(None, ["--threads", "0"], ["Invalid value for '--threads'", "x>=1"],
                 id="threads-0"),
    pytest.param(None, ["--workers", "0"], ["Invalid value for '--workers'", "x>=1"],
                 id="workers-0"),
    pytest.param(("c.yaml", "numbers: [1, 2\n"), [],
                 ["is not valid YAML at line", "fix the syntax there"], id="yaml-syntax"),
    pytest.param(("c.yaml", "numbers: 10\nnumbers: 20\n"), [],
                 ["duplicate key 'numbers'", "line 2"], id="yaml-duplicate-key"),
    pytest.param(("c.yaml", "- numbers\n"), [],
                 ["the top level must be a mapping", "write `key: value` lines"],
                 id="yaml-not-a-mapping"),
    pytest.param(("c.yaml", ""), [], ["is empty", "{} for defaults"], id="yaml-empty"),
    pytest.param(("c.json", '{"numbers": 10,}'), [], ["is not valid JSON at line 1",
                                                      "fix the syntax there"], id="json-syntax"),
    pytest.param(("c.txt", "numbers: 10\n"), [], ["unknown config file type '.txt'",
                                                  "use .yaml, .yml or .json"], id="suffix"),
    pytest.param(("missing.yaml", None), [], ["does not exist; check the path"],
                 id="missing-config-file"),
]


@pytest.mark.parametrize(("config", "flags", "fragments"), INPUTS)
def test_bad_config_or_flag_is_one_clear_line(tmp_path, config, flags, fragments):
    path = None
    if isinstance(config, dict):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(config))
    elif config is not None:
        name, text = config
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
    out = tmp_path / "run"
    _assert_user_error(_invoke(out, flags, path), *fragments)
    assert not out.exists()  # nothing is created for input that cannot run


def test_out_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "run"
    out.write_text("not a directory")
    _assert_user_error(_invoke(out, []), "Invalid value for '--out'", "is a file")
    assert out.read_text() == "not a directory"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_load_config_builds_or_raises_config_error(data):
    """Random nested overrides (real keys, typos, any JSON-like values) never crash otherwise."""
    names = sorted({key.split(".")[-1] for key in _dotted_keys(to_dict(ArithmeticConfig()))})
    keys = st.sampled_from(names) | st.text(max_size=8)
    leaves = (st.none() | st.booleans() | st.integers(-3, 3000) | st.floats()
              | st.text(max_size=10)
              | st.sampled_from(["a*b", "a^2 + a*b", "a +", "seed", "lm", "answer", "subnet",
                                 "random", ".*c_fc", "adamw", "sgd", "1e-3"]))
    values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(keys, inner, max_size=4), max_leaves=12)
    overrides = data.draw(st.dictionaries(keys, values, max_size=5))
    preset = data.draw(st.sampled_from(["quick", "paper"]))
    try:
        cfg = load_config(preset, overrides)
    except ConfigError:
        return
    assert isinstance(cfg, ArithmeticConfig)


def _dotted_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _dotted_keys(value, f"{prefix}{key}.")
    return keys


# --------------------------------------------------------------------------- run directories


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, config file): one finished tiny run, made as the CLI would make it."""
    root = tmp_path_factory.mktemp("finished")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run_arithmetic(load_config("paper", TINY), root / "run", log=lambda _: None)
    return root / "run", config


@pytest.fixture
def run_copy(finished, tmp_path) -> tuple[Path, Path]:
    run, config = finished
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", config


def _other_size_model():
    return build_model("gpt2", vocab_size=TINY["numbers"] + 1, n_positions=4, n_embd=32,
                       n_layer=1, n_head=2)


def _other_size_subnetwork(path: Path) -> None:
    masked = attach_masks(_other_size_model(), MaskConfig())
    sub = masked.subnetwork()
    masked.detach_masks()
    sub.save(path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


BASE, SUB = "pipelines/L1-r0/a0/base.safetensors", "pipelines/L1-r0/a0/subnetwork.safetensors"
DAMAGE = [
    pytest.param(SUB, _other_size_subnetwork, [],
                 ["the subnetwork's mask for 'transformer.h.0.attn.c_attn.weight' has shape "
                  "(32, 96), the model's parameter has (16, 48)", "another size",
                  f"{SUB} and rerun the same command to rediscover it"],
                 id="subnetwork-of-another-size"),
    pytest.param(BASE, lambda p: save_model(p, _other_size_model()), [],
                 [f"{BASE} holds weights for another architecture",
                  "other shapes: transformer.", "rerun the same command to retrain it"],
                 id="base-of-another-size"),
    pytest.param(BASE, _truncate, [],
                 [f"{BASE} is not a valid safetensors file", "truncated",
                  "delete", "rerun the same command to retrain it"], id="base-truncated"),
    pytest.param(SUB, lambda p: p.write_bytes(os.urandom(4000)), [],
                 [f"{SUB} is not a valid safetensors file",
                  "rerun the same command to rediscover it"], id="subnetwork-garbage"),
    pytest.param("cells/L1-r0-a0-n8-s0-subnet.json", lambda p: p.write_text('{"rows": ['), [],
                 ["cells/L1-r0-a0-n8-s0-subnet.json is not a finished cell",
                  "rerun the same command to recompute it"], id="cell-corrupt"),
    pytest.param("config.json", lambda p: None, ["--modulus", "5"],
                 ["holds results from a different config (modulus was 7, now 5)",
                  "use a new --out directory or delete"], id="config-changed-flag"),
    pytest.param("config.json", lambda p: None, ["--seed", "3"],
                 ["seed was 0, now 3", "use a new --out directory or delete"],
                 id="config-changed-seed"),
    pytest.param("config.json", lambda p: _edit_json(p, format_version=99), [],
                 ["written with run format version 99", "writes version 1",
                  "use a new --out directory or delete"], id="format-version"),
    pytest.param("config.json", _truncate, [],
                 ["config.json is not valid JSON", "use a new --out directory or delete"],
                 id="config-json-truncated"),
]


@pytest.mark.parametrize(("name", "damage", "flags", "fragments"), DAMAGE)
def test_damaged_or_foreign_run_directory_is_one_clear_line(run_copy, name, damage, flags,
                                                           fragments):
    run, config = run_copy
    damage(run / name)
    before = _state(run)
    _assert_user_error(_invoke(run, flags, config), *fragments)
    assert _state(run) == before  # the damaged file is named, not silently replaced


def test_changed_nested_config_key_is_named(run_copy, tmp_path):
    run, _ = run_copy
    config = tmp_path / "changed.yaml"
    config.write_text(yaml.safe_dump({**TINY, "base_fit": {**TINY["base_fit"], "lr": 1e-3}}))
    _assert_user_error(_invoke(run, [], config), "base_fit.lr was 0.003, now 0.001")


def test_mask_targets_matching_nothing_fail_before_any_training(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**TINY, "discovery": {"mask": {"targets": "nomatch.*"}}}))
    out = tmp_path / "run"
    _assert_user_error(_invoke(out, [], config),
                       "targets regex 'nomatch.*' matches no module with a weight",
                       "transformer.h.0.attn.c_attn", "the regex must match the whole module")
    assert list(out.iterdir()) == []  # no config recorded, so the fixed command can reuse it


def test_diverging_base_fit_stops_with_the_step_and_a_hint(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**TINY, "base_fit": {**TINY["base_fit"], "lr": 1e6}}))
    out = tmp_path / "run"
    result = _invoke(out, [], config)
    _assert_user_error(result, "base L1 r0: the loss became", "lower the learning rate")
    assert re.search(r"the loss became (nan|inf|-inf) at epoch \d+, step \d+", result.output)
    assert not (out / "pipelines/L1-r0/a0/base.safetensors").exists()  # a diverged model: never


def test_nan_in_a_resumed_cell_keeps_every_earlier_output(run_copy, monkeypatch):
    run, config = run_copy
    (run / "cells/L1-r0-a0-n8-s0-subnet.json").unlink()
    before = _state(run)
    real = arith.SequenceTask.loss
    monkeypatch.setattr(arith.SequenceTask, "loss",
                        lambda self, model, batch: real(self, model, batch) * float("nan"))
    result = _invoke(run, [], config)
    _assert_user_error(result, "subnet L1 r0 n=8 s0: the loss became nan at epoch 0, step 0",
                       "lower the learning rate")
    assert _state(run) == before  # checkpoints, finished cells and the old report are kept


def test_full_disk_is_a_clear_error_and_keeps_the_previous_files(run_copy, monkeypatch):
    run, config = run_copy
    (run / "cells/L1-r0-a0-n8-s0-subnet.json").unlink()  # so the rerun has a cell to write
    before = _state(run)
    real_replace = os.replace

    def full_disk(src, dst, *args, **kwargs):
        if Path(dst).resolve().is_relative_to(run.resolve()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    result = _invoke(run, [], config)
    _assert_user_error(result, "could not write", "No space left on device",
                       "is the disk full", "the previous file, if any, is unchanged")
    assert _state(run) == before  # every file as it was, and no temp file left behind
