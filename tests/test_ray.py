"""The Ray executor on a local Ray instance: the same results as the local pool, workers that
get only the files each job declares, and progress saved as each cell finishes."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="the cluster extra: pip install 'instill[cluster]'")

from test_arithmetic_experiment import TINY  # noqa: E402

from instill.errors import ConfigError  # noqa: E402
from instill.experiments.arithmetic import ArithmeticRun, load_config, run_arithmetic  # noqa: E402
from instill.experiments.executors import RayExecutor, make_executor  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    executor = RayExecutor(cpus=2)
    yield executor
    ray.shutdown()


def test_a_run_on_ray_gives_the_local_results_and_resumes(local_ray, tmp_path):
    cfg = load_config("quick", TINY)
    run_arithmetic(cfg, tmp_path / "local", log=lambda _: None)
    summary = ArithmeticRun(cfg, tmp_path / "ray", log=lambda _: None,
                            executor=local_ray).execute()
    local = (tmp_path / "local" / "results.csv").read_text()
    assert (tmp_path / "ray" / "results.csv").read_text() == local
    for cell in ("L1-r0-a0-n0-s0-subnet", "L1-r1-a0-n8-s0-random"):
        name = f"cells/{cell}.json"
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    (tmp_path / "ray" / "cells" / "L1-r1-a0-n8-s0-random.json").unlink()  # lost with a worker
    again = ArithmeticRun(cfg, tmp_path / "ray", log=lambda _: None, executor=local_ray).execute()
    assert again["headline"] == summary["headline"]
    assert (tmp_path / "ray" / "results.csv").read_text() == local


def test_executor_choices_are_checked():
    with pytest.raises(ConfigError, match="choose 'local' or 'ray'"):
        make_executor("dask")
    with pytest.raises(ConfigError, match="--address is for --executor ray"):
        make_executor("local", address="10.0.0.1:6379")
