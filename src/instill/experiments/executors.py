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


class Executor(Protocol):
    """Runs `fn(job)` for every job; results in job order."""

    shared_filesystem: bool

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any], desc: str,
            cost: Callable[[Any], float] | None = None) -> list[Any]: ...


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
            cost: Callable[[Any], float] | None = None) -> list[Any]:
        if self.workers <= 1 or len(jobs) <= 1:
            return [fn(job) for job in tqdm(jobs, desc=desc, disable=None)]
        results: list[Any] = [None] * len(jobs)
        order = largest_first(jobs, cost) if cost else range(len(jobs))
        pool = multiprocessing.get_context("spawn").Pool(min(self.workers, len(jobs)),
                                                         _ignore_sigint)
        try:
            tasks = [(fn, i, jobs[i]) for i in order]
            for index, result in tqdm(pool.imap_unordered(_indexed, tasks), total=len(jobs),
                                      desc=desc, disable=None):
                results[index] = result
            pool.close()
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()
        return results


__all__ = ["Executor", "LocalExecutor", "largest_first"]
