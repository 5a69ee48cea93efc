"""Where an experiment's units of work run: here, or in a pool of local worker processes.

An executor maps a module-level function over jobs and returns the results in job order. Jobs
are independent and seeded, so results do not depend on the executor or on the number of
workers. `shared_filesystem` says whether a worker can read the run directory itself; when it
cannot (a cluster), the driver ships each job the files it reads (`framework.Job.files`).
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tqdm.auto import tqdm

from instill.errors import ConfigError


class Executor(Protocol):
    """Runs `fn(job)` for every job; results in job order. `done(i, result)` is called in this
    process as each job finishes, so the caller can save it at once (a run killed later keeps
    it)."""

    shared_filesystem: bool

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any], desc: str,
            cost: Callable[[Any], float] | None = None,
            done: Callable[[int, Any], None] | None = None) -> list[Any]: ...


def largest_first(jobs: Sequence[Any], cost: Callable[[Any], float]) -> list[int]:
    """Job indices by decreasing cost (ties keep their order)."""
    return sorted(range(len(jobs)), key=lambda i: -cost(jobs[i]))


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent, which stops them all and prints how to resume."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _indexed(job: tuple[Callable[[Any], Any], int, Any]) -> tuple[int, Any]:
    fn, index, args = job
    return index, fn(args)


class LocalExecutor:
    """This process (`workers=1`) or a pool of `spawn`ed processes on this machine.

    With `cost`, workers take the most expensive jobs first, so no worker is left alone with a
    big one at the end. `fn` must be a module-level function (it is sent to fresh processes).
    `ship=True` runs jobs as on a cluster without a shared filesystem (each worker gets the
    files a job declares, in a private directory): a check that an experiment declares them.
    """

    def __init__(self, workers: int = 1, *, ship: bool = False) -> None:
        self.workers = max(1, workers)
        self.shared_filesystem = not ship

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any], desc: str,
            cost: Callable[[Any], float] | None = None,
            done: Callable[[int, Any], None] | None = None) -> list[Any]:
        results: list[Any] = [None] * len(jobs)
        report = done or (lambda i, result: None)
        if self.workers <= 1 or len(jobs) <= 1:
            for i, job in enumerate(tqdm(jobs, desc=desc, disable=None)):
                results[i] = fn(job)
                report(i, results[i])
            return results
        order = largest_first(jobs, cost) if cost else range(len(jobs))
        pool = multiprocessing.get_context("spawn").Pool(min(self.workers, len(jobs)),
                                                         _ignore_sigint)
        try:
            tasks = [(fn, i, jobs[i]) for i in order]
            for index, result in tqdm(pool.imap_unordered(_indexed, tasks), total=len(jobs),
                                      desc=desc, disable=None):
                results[index] = result
                report(index, result)
            pool.close()
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()
        return results


class RayExecutor:
    """Jobs as Ray tasks, on a local Ray instance (started here) or a running cluster.

    Workers get the files each job declares with the job (`shared_filesystem = False`), so the
    machines of a cluster need no shared disk; the driver writes what comes back as each job
    finishes. A task lost with a dead worker or node is retried `retries` times by Ray; a run
    killed outright resumes from the files already written, like a local run.
    """

    shared_filesystem = False

    def __init__(self, address: str | None = None, *, cpus: int | None = None,
                 retries: int = 3) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'instill[cluster]' (or "
                              "pip install ray) on this machine and on every cluster node"
                              ) from None
        self.ray, self.retries = ray, retries
        if not ray.is_initialized():
            try:
                ray.init(address=address, num_cpus=None if address else cpus,
                         include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise ConfigError(f"cannot reach the Ray cluster at {address!r} ({err}); start "
                                  "it with `ray start --head` and pass the address it prints "
                                  "(HOST:PORT), or leave --address out for a local instance"
                                  ) from None

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any], desc: str,
            cost: Callable[[Any], float] | None = None,
            done: Callable[[int, Any], None] | None = None) -> list[Any]:
        ray = self.ray
        remote = ray.remote(num_cpus=1, max_retries=self.retries)(fn)
        order = largest_first(jobs, cost) if cost else range(len(jobs))
        index = {remote.remote(jobs[i]): i for i in order}
        results: list[Any] = [None] * len(jobs)
        pending = list(index)
        with tqdm(total=len(jobs), desc=desc, disable=None) as bar:
            while pending:
                finished, pending = ray.wait(pending, num_returns=1)
                for ref in finished:
                    i = index[ref]
                    results[i] = ray.get(ref)
                    if done is not None:
                        done(i, results[i])
                    bar.update()
        return results


def make_executor(kind: str = "local", *, workers: int = 1,
                  address: str | None = None) -> Executor:
    """The executor a command asked for: `local` (a process pool of `workers`) or `ray` (a
    local Ray instance of `workers` CPUs, or the cluster at `address`)."""
    if kind == "local":
        if address:
            raise ConfigError("--address is for --executor ray; drop it or add --executor ray")
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(address, cpus=workers)
    raise ConfigError(f"unknown executor {kind!r}; choose 'local' or 'ray'")


__all__ = ["Executor", "LocalExecutor", "RayExecutor", "largest_first", "make_executor"]
