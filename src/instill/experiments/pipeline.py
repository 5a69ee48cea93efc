"""What every experiment shares around its own logic: one seeding scheme, quality gates between
phases with retries, and the record of every attempt.

A *pipeline* is one independent replicate of an experiment's upstream phases (a base model and
its subnetwork). Each attempt of a pipeline trains from its own seed; its gates say whether what
the next phase relies on holds (the base model learnt its task, the subnetwork computes the
subtask, ...). A failed attempt is retried with the next seed, up to `retries` times; every
attempt is recorded, and when none passes the run stops with an error that names the gate, the
measured value, the threshold and what to change. With `enforce: false` the first attempt is
used whatever its gates say, and the report must say so.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from instill.errors import ConfigError, InstillError
from instill.runio import RunDir, load_config_file
from instill.seeds import derive_seed
from instill.storage import write_json


@dataclass
class GatePolicy:
    """How gates act: retry a failed pipeline with the next seed `retries` times, then stop;
    `enforce: false` keeps the first attempt whatever its gates say (the report says so)."""

    retries: int = 2
    enforce: bool = True

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ConfigError(f"gates.retries must be >= 0, got {self.retries}")


@dataclass(frozen=True)
class Gate:
    """One check between phases: `value` must reach `threshold`; `fix` says what to change."""

    name: str
    value: float
    threshold: float
    fix: str

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold

    def __str__(self) -> str:
        return (f"{self.name} {self.value:.3f} {'>=' if self.passed else '<'} "
                f"{self.threshold:g}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


class GateError(InstillError):
    """Every attempt of a pipeline failed a gate."""


def failed(gates: Sequence[Gate]) -> list[Gate]:
    return [g for g in gates if not g.passed]


def run_attempts(run: RunDir, name: str, attempt: Callable[[int], list[Gate]],
                 policy: GatePolicy, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Call `attempt(0)`, `attempt(1)`, ... until every gate it returns passes, recording each in
    `{name}/attempts.json`. `attempt(i)` must cache its own outputs, so a resumed run re-reads
    finished attempts instead of retraining them. Returns the record of the chosen attempt."""
    attempts: list[dict[str, Any]] = []
    for i in range(policy.retries + 1):
        gates = attempt(i)
        bad = failed(gates)
        attempts.append({"attempt": i, "passed": not bad, "gates": [g.to_dict() for g in gates]})
        chosen = {"attempt": i, "overridden": bool(bad) and not policy.enforce,
                  "attempts": attempts}
        if recorded_attempt(run, name) != json.loads(json.dumps(chosen)):  # resumed: as it was
            write_json(run.path(f"{name}/attempts.json"), chosen)
        if not bad or not policy.enforce:
            if bad:
                log(f"warning: {name} attempt {i} failed {'; '.join(map(str, bad))}; "
                    "gates are not enforced, so it is used anyway")
            return chosen
        more = i < policy.retries
        log(f"{name} attempt {i}: gate failed ({'; '.join(map(str, bad))})"
            + ("; retrying with the next seed" if more else ""))
    worst = failed(gates)[0]
    raise GateError(
        f"{name}: gate '{worst.name}' failed on all {policy.retries + 1} attempts (last: "
        f"{worst.value:.3f}, threshold {worst.threshold:g}); {worst.fix}. Every attempt is "
        f"recorded in {run.path(f'{name}/attempts.json')}; set gates.retries higher to try more "
        "seeds, or gates.enforce=false to go on regardless (the report then says so)")


def recorded_attempt(run: RunDir, name: str) -> dict[str, Any] | None:
    """The attempts record `run_attempts` wrote for `name`, or None."""
    path = run.path(f"{name}/attempts.json")
    return load_config_file(path) if path.exists() else None


__all__ = ["Gate", "GateError", "GatePolicy", "derive_seed", "failed", "recorded_attempt",
           "run_attempts"]
