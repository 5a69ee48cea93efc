"""Statistics for replicated runs: bootstrap intervals, paired tests, Holm correction, curves.

Experiments run each arm over a few seeds (typically 5-10) and need a decision with an interval,
not a single number. Everything here is pure numpy + scipy and deterministic given a seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class Interval:
    """A mean with a confidence interval over n values."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        """Plain JSON-able fields, for run summaries."""
        return {"mean": float(self.mean), "low": float(self.low), "high": float(self.high),
                "n": int(self.n)}

    def __format__(self, spec: str) -> str:
        spec = spec or ".2f"
        return f"{self.mean:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"

    def __str__(self) -> str:
        return format(self)


@dataclass(frozen=True)
class Paired:
    """A paired comparison of arm a against arm b: mean of a_i - b_i, its interval and p."""

    mean_diff: float
    low: float
    high: float
    p_value: float
    n: int
    test: str
    p_adjusted: float | None = None

    def to_dict(self) -> dict[str, float | int | str | None]:
        """Plain JSON-able fields, for run summaries; p_adjusted is None until adjusted."""
        return {"mean_diff": float(self.mean_diff), "low": float(self.low),
                "high": float(self.high), "p_value": float(self.p_value), "n": int(self.n),
                "test": self.test,
                "p_adjusted": None if self.p_adjusted is None else float(self.p_adjusted)}


def _as_array(values: Sequence[float], name: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of numbers, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty: need at least one value")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} has non-finite values (nan or inf): {x.tolist()}")
    return x


def bootstrap_mean(values: Sequence[float], *, level: float = 0.95, resamples: int = 10_000,
                   seed: int = 0) -> Interval:
    """Percentile-bootstrap interval of the mean, deterministic given seed, to show seed spread."""
    x = _as_array(values, "values")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    mean = float(x.mean())
    if np.ptp(x) == 0:
        return Interval(mean, mean, mean, x.size)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(mean, float(low), float(high), x.size)


def paired_difference(a: Sequence[float], b: Sequence[float], *, level: float = 0.95,
                      resamples: int = 10_000, seed: int = 0) -> Paired:
    """Compare arm a with arm b run on the same replicates: bootstrap interval of a_i - b_i, and
    a two-sided paired t-test p-value.

    The t-test, not an exact Wilcoxon or sign-flip test: with 5-10 replicates those tests have a
    minimum p of 2/2^n (0.0625 at n=5), so after Holm correction they can never reach 0.05.
    Differences that are all equal (to rounding) give p 0.0 ("constant difference"), or p 1.0
    when they are all zero ("no difference"); a single pair gives p 1.0 ("single pair").
    """
    x, y = _as_array(a, "a"), _as_array(b, "b")
    if x.size != y.size:
        raise ValueError(f"a and b must pair up replicate by replicate: {x.size} vs {y.size}")
    d = x - y
    mean = float(d.mean())
    if d.size == 1:
        return Paired(mean, mean, mean, 1.0, 1, "single pair")
    # Differences within rounding of the inputs count as equal: t would be 0/0 or inf.
    tol = 1e-12 * max(1.0, float(np.abs(x).max()), float(np.abs(y).max()))
    if np.ptp(d) <= tol:
        if abs(mean) <= tol:
            return Paired(mean, mean, mean, 1.0, d.size, "no difference")
        return Paired(mean, mean, mean, 0.0, d.size, "constant difference")
    ci = bootstrap_mean(d, level=level, resamples=resamples, seed=seed)
    p = float(sps.ttest_rel(x, y).pvalue)
    return Paired(mean, ci.low, ci.high, p, d.size, "paired t-test")


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values in input order, to control error over many comparisons."""
    p = np.asarray(p_values, dtype=float)
    if p.size and not ((p >= 0) & (p <= 1)).all():
        raise ValueError(f"p-values must be in [0, 1], got {p.tolist()}")
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (p.size - np.arange(p.size))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return [float(v) for v in adjusted]


def adjust(results: dict[str, Paired]) -> dict[str, Paired]:
    """Fill p_adjusted by Holm over all the given comparisons, keeping their keys."""
    adjusted = holm([r.p_value for r in results.values()])
    return {k: dataclasses.replace(r, p_adjusted=p)
            for (k, r), p in zip(results.items(), adjusted, strict=True)}


def _sorted_curve(curve: Mapping[int, float]) -> tuple[np.ndarray, np.ndarray]:
    if not curve:
        raise ValueError("curve is empty: need at least one (n, accuracy) point")
    ns, ys = zip(*sorted(curve.items()), strict=True)
    return np.asarray(ns, dtype=float), _as_array(ys, "curve accuracies")


def samples_to_threshold(curve: Mapping[int, float], threshold: float) -> float | None:
    """Smallest n whose accuracy reaches threshold (no interpolation), None when none does."""
    ns, ys = _sorted_curve(curve)
    hits = np.flatnonzero(ys >= threshold)
    return float(ns[hits[0]]) if hits.size else None


def auc_log(curve: Mapping[int, float]) -> float:
    """Mean accuracy over x = log10(1 + n) by trapezoids, so a flat curve at c scores c."""
    ns, ys = _sorted_curve(curve)
    if (ns < 0).any():
        raise ValueError(f"sample counts must be >= 0, got {ns.tolist()}")
    if ns.size == 1:
        return float(ys[0])
    x = np.log10(1 + ns)
    area = float(np.sum(np.diff(x) * (ys[1:] + ys[:-1]) / 2))
    return area / float(x[-1] - x[0])


def never_count(values: Sequence[float | None]) -> int:
    """How many runs never reached a threshold (None from samples_to_threshold)."""
    return sum(v is None for v in values)


def _effect(result: Paired, alpha: float, higher_is_better: bool) -> tuple[str, float]:
    p = result.p_value if result.p_adjusted is None else result.p_adjusted
    sign = 1.0 if higher_is_better else -1.0
    low, high = sorted((sign * result.low, sign * result.high))
    if p < alpha and sign * result.mean_diff > 0 and low > 0:
        return "better", p
    if p < alpha and sign * result.mean_diff < 0 and high < 0:
        return "worse", p
    return "indistinguishable", p


def decide(result: Paired, *, alpha: float = 0.05, higher_is_better: bool = True) -> str:
    """"better", "worse" or "indistinguishable": significant (p_adjusted if set) and the interval
    excludes 0 on the same side as the mean difference."""
    return _effect(result, alpha, higher_is_better)[0]


def describe(result: Paired, a: str, b: str, metric: str, *, alpha: float = 0.05,
             higher_is_better: bool = True) -> str:
    """One headline phrase for a report, e.g. "A beats B on AUC (+0.21 [0.15, 0.27], ...)"."""
    verdict, p = _effect(result, alpha, higher_is_better)
    verb = {"better": f"beats {b}", "worse": f"is worse than {b}",
            "indistinguishable": f"is indistinguishable from {b}"}[verdict]
    power = " at this power" if verdict == "indistinguishable" else ""
    label = "p" if result.p_adjusted is None else "p_adj"
    pairs = "pair" if result.n == 1 else "pairs"
    detail = (f"{result.mean_diff:+.2f} [{result.low:.2f}, {result.high:.2f}], "
              f"{label} {p:.2g}, {result.n} {pairs}")
    return f"{a} {verb} on {metric}{power} ({detail})"


__all__ = ["Interval", "Paired", "adjust", "auc_log", "bootstrap_mean", "decide", "describe",
           "holm", "never_count", "paired_difference", "samples_to_threshold"]
