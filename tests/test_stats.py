"""Statistics for replicated runs: known answers on hand-made data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from instill.stats import (
    Interval,
    Paired,
    adjust,
    auc_log,
    bootstrap_mean,
    decide,
    describe,
    holm,
    never_count,
    paired_difference,
    samples_to_threshold,
)

B = [0.50, 0.60, 0.55, 0.62, 0.58]
CLEAR = [0.18, 0.22, 0.25, 0.15, 0.20]
NULL = [0.1, -0.1, 0.05, -0.05, 0.0]


def plus(base: list[float], diffs: list[float]) -> list[float]:
    return [x + d for x, d in zip(base, diffs, strict=True)]


# --- bootstrap_mean -------------------------------------------------------------------------

def test_bootstrap_constant_sample_is_a_point():
    assert bootstrap_mean([1, 1, 1]) == Interval(1.0, 1.0, 1.0, 3)


def test_bootstrap_single_value_is_a_point():
    assert bootstrap_mean([0.7]) == Interval(0.7, 0.7, 0.7, 1)


def test_bootstrap_two_values_known_distribution():
    # Resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4.
    assert bootstrap_mean([0, 1], level=0.95) == Interval(0.5, 0.0, 1.0, 2)
    assert bootstrap_mean([0, 1], level=0.4) == Interval(0.5, 0.5, 0.5, 2)


def test_bootstrap_matches_normal_approximation_on_a_large_sample():
    x = np.linspace(0, 1, 101)
    half = 1.959964 * x.std(ddof=0) / math.sqrt(x.size)  # about 0.057
    ci = bootstrap_mean(x)
    assert ci.mean == pytest.approx(0.5)
    assert ci.low == pytest.approx(0.5 - half, abs=0.006)
    assert ci.high == pytest.approx(0.5 + half, abs=0.006)


def test_bootstrap_contains_mean_and_narrows_with_level():
    x = [0.13, 0.91, 0.42, 0.77, 0.24, 0.86]
    wide, narrow = bootstrap_mean(x, level=0.95), bootstrap_mean(x, level=0.5)
    assert wide.low < wide.mean < wide.high
    assert wide.mean == pytest.approx(0.555)
    assert wide.low < narrow.low < narrow.high < wide.high


def test_bootstrap_is_deterministic_given_seed():
    x = [0.13, 0.91, 0.42, 0.77, 0.24, 0.86]
    assert bootstrap_mean(x, seed=3) == bootstrap_mean(x, seed=3)
    assert bootstrap_mean(x, seed=3) != bootstrap_mean(x, seed=4)


@pytest.mark.parametrize(("values", "kwargs", "match"), [
    ([], {}, "empty"),
    ([0.1, float("nan")], {}, "non-finite"),
    ([0.1, float("inf")], {}, "non-finite"),
    ([0.1, 0.2], {"level": 1.0}, "level"),
    ([0.1, 0.2], {"resamples": 0}, "resamples"),
])
def test_bootstrap_rejects_bad_input(values, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_mean(values, **kwargs)


def test_interval_str_format_and_dict():
    ci = Interval(0.8213, 0.7468, 0.8849, 5)
    assert str(ci) == "0.82 [0.75, 0.88]"
    assert f"{ci:.3f}" == "0.821 [0.747, 0.885]"
    d = bootstrap_mean([0.1, 0.3, 0.2]).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {"mean", "low", "high", "n"}
    assert all(type(d[k]) is float for k in ("mean", "low", "high")) and type(d["n"]) is int


# --- paired_difference ----------------------------------------------------------------------

def test_paired_constant_difference():
    r = paired_difference([b + 0.2 for b in B], B)
    assert (r.p_value, r.test, r.n) == (0.0, "constant difference", 5)
    assert (r.mean_diff, r.low, r.high) == pytest.approx((0.2, 0.2, 0.2))
    assert decide(r) == "better"


def test_paired_no_difference():
    r = paired_difference(B, B)
    assert (r.mean_diff, r.low, r.high, r.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert decide(r) == "indistinguishable"


def test_paired_single_pair():
    r = paired_difference([0.9], [0.5])
    assert (r.p_value, r.test, r.n) == (1.0, "single pair", 1)
    assert r.mean_diff == pytest.approx(0.4)
    assert decide(r) == "indistinguishable"


def test_paired_clear_effect_is_better_and_flipped_is_worse():
    a = plus(B, CLEAR)
    r = paired_difference(a, B)
    assert r.test == "paired t-test"
    assert r.p_value < 0.01
    assert r.mean_diff == pytest.approx(0.2)
    assert 0.15 <= r.low < 0.2 < r.high <= 0.25
    assert decide(r) == "better"
    flipped = paired_difference(B, a)
    assert flipped.mean_diff == pytest.approx(-0.2)
    assert flipped.p_value == pytest.approx(r.p_value)
    assert decide(flipped) == "worse"
    assert decide(flipped, higher_is_better=False) == "better"
    assert decide(r, higher_is_better=False) == "worse"


def test_paired_p_value_matches_t_formula():
    d = np.array(CLEAR)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))  # about 11.55 on 4 degrees of freedom
    expected = 2 * sps.t.sf(abs(t), df=d.size - 1)
    assert paired_difference(plus(B, CLEAR), B).p_value == pytest.approx(expected, rel=1e-6)
    assert 1e-4 < expected < 1e-3


def test_paired_null_effect_is_indistinguishable():
    r = paired_difference(plus(B, NULL), B)
    assert r.mean_diff == pytest.approx(0.0, abs=1e-12)
    assert r.p_value == pytest.approx(1.0)
    assert r.low < 0 < r.high
    assert decide(r) == "indistinguishable"


def test_paired_rejects_bad_input():
    with pytest.raises(ValueError, match="pair up"):
        paired_difference([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="empty"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="non-finite"):
        paired_difference([0.1, float("nan")], [0.1, 0.2])


def test_paired_to_dict_is_plain_json():
    d = paired_difference(plus(B, CLEAR), B).to_dict()
    assert d["p_adjusted"] is None and d["test"] == "paired t-test" and d["n"] == 5
    assert json.loads(json.dumps(d)) == d


# --- holm / adjust --------------------------------------------------------------------------

def test_holm_known_values():
    # Sorted 0.01, 0.03, 0.04 -> 3*0.01, 2*0.03, max(1*0.04, 0.06); back in input order.
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert holm([]) == []


def test_holm_is_monotone_and_capped():
    # Sorted: 0.001*6, 0.04*5, 0.04*4 -> 0.2, 0.2*3, 0.6*2 -> 1, 0.9*1 -> 1 (running max, cap 1).
    p = [0.2, 0.001, 0.6, 0.04, 0.04, 0.9]
    adj = holm(p)
    assert adj == pytest.approx([0.6, 0.006, 1.0, 0.2, 0.2, 1.0])
    order = np.argsort(p, kind="stable")
    assert all(np.diff(np.array(adj)[order]) >= 0)
    assert all(q >= r for q, r in zip(adj, p, strict=True))


def test_holm_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, 1.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([float("nan")])


def test_adjust_fills_p_adjusted_and_keeps_keys():
    results = {"x": Paired(0.2, 0.1, 0.3, 0.01, 5, "paired t-test"),
               "y": Paired(0.1, 0.0, 0.2, 0.04, 5, "paired t-test"),
               "z": Paired(0.1, 0.0, 0.2, 0.03, 5, "paired t-test")}
    out = adjust(results)
    assert list(out) == ["x", "y", "z"]
    assert [out[k].p_adjusted for k in out] == pytest.approx([0.03, 0.06, 0.06])
    assert out["x"].p_value == 0.01 and results["x"].p_adjusted is None
    assert decide(out["x"]) == "better" and decide(out["z"]) == "indistinguishable"


# --- decide / describe ----------------------------------------------------------------------

def test_decide_uses_adjusted_p_and_interval():
    sig = Paired(0.2, 0.1, 0.3, 0.01, 5, "paired t-test")
    assert decide(sig) == "better"
    assert decide(Paired(0.2, 0.1, 0.3, 0.01, 5, "paired t-test", p_adjusted=0.2)) == (
        "indistinguishable")
    assert decide(Paired(0.1, -0.01, 0.2, 0.01, 5, "paired t-test")) == "indistinguishable"
    assert decide(sig, alpha=0.005) == "indistinguishable"
    lower = Paired(-0.2, -0.3, -0.1, 0.01, 5, "paired t-test")
    assert decide(lower) == "worse"
    assert decide(lower, higher_is_better=False) == "better"


def test_describe_phrases():
    better = Paired(0.2113, 0.1489, 0.2702, 0.001, 5, "paired t-test", p_adjusted=0.0031)
    assert describe(better, "Subtask Induction", "random init", "AUC") == (
        "Subtask Induction beats random init on AUC (+0.21 [0.15, 0.27], p_adj 0.0031, 5 pairs)")
    null = Paired(0.01, -0.03, 0.05, 0.31, 5, "paired t-test", p_adjusted=0.62)
    assert describe(null, "Subtask Induction", "sampled subnetwork", "AUC") == (
        "Subtask Induction is indistinguishable from sampled subnetwork on AUC at this power "
        "(+0.01 [-0.03, 0.05], p_adj 0.62, 5 pairs)")
    worse = Paired(-0.2, -0.3, -0.1, 0.0123, 6, "paired t-test")
    assert describe(worse, "A", "B", "accuracy") == (
        "A is worse than B on accuracy (-0.20 [-0.30, -0.10], p 0.012, 6 pairs)")
    assert describe(worse, "A", "B", "loss", higher_is_better=False).startswith("A beats B")


# --- curves ---------------------------------------------------------------------------------

def test_samples_to_threshold():
    curve = {250: 0.99, 0: 0.3, 100: 0.96}
    assert samples_to_threshold(curve, 0.95) == 100.0
    assert samples_to_threshold(curve, 0.99) == 250.0
    assert samples_to_threshold(curve, 0.2) == 0.0
    assert samples_to_threshold(curve, 0.999) is None
    # The first n to reach it, not the best: a later dip does not move it.
    assert samples_to_threshold({10: 0.9, 20: 0.5, 30: 0.95}, 0.9) == 10.0
    with pytest.raises(ValueError, match="empty"):
        samples_to_threshold({}, 0.5)


def test_never_count():
    assert never_count([100.0, None, 0.0, None]) == 2
    assert never_count([]) == 0


def test_auc_log_known_values():
    assert auc_log({0: 0.7, 10: 0.7, 1000: 0.7}) == pytest.approx(0.7)
    assert auc_log({9: 1.0, 0: 0.0}) == pytest.approx(0.5)
    assert auc_log({5: 0.42}) == 0.42
    # x = 0, 1, 2: trapezoids (0 + 0.5)/2 + (0.5 + 1)/2 = 1.0 over a range of 2.
    assert auc_log({0: 0.0, 9: 0.5, 99: 1.0}) == pytest.approx(0.5)
    # x = 0, 1, 2 with the jump late: (0 + 0)/2 + (0 + 1)/2 = 0.5 over 2.
    assert auc_log({0: 0.0, 9: 0.0, 99: 1.0}) == pytest.approx(0.25)


def test_auc_log_rejects_bad_curves():
    with pytest.raises(ValueError, match="empty"):
        auc_log({})
    with pytest.raises(ValueError, match=">= 0"):
        auc_log({-5: 0.1, 10: 0.2})
    with pytest.raises(ValueError, match="non-finite"):
        auc_log({0: 0.1, 10: float("nan")})
