"""Tests for the modular-arithmetic data of experiment A (instill.tasks.arithmetic)."""

from __future__ import annotations

import pytest
import torch

from instill.errors import ConfigError, ExpressionError
from instill.tasks.arithmetic import (
    ArithmeticSpec,
    TargetSplits,
    accuracy_under,
    ambiguous_pairs,
    check_ambiguity,
    make_sequences,
    make_target_splits,
    pair_codes,
    sample_pairs,
)
from instill.tasks.expr import parse

BASE = "a + a*b"
SUBTASK = "a*b"
TARGET = "a^2 + a*b"
ALTERNATIVES = ["2*a^2", "2*b^2"]
SMALL = ArithmeticSpec(numbers=60, modulus=7)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def codes_of(pairs: tuple[torch.Tensor, torch.Tensor], spec: ArithmeticSpec = SMALL) -> set[int]:
    return set(pair_codes(*pairs, spec).tolist())


# --------------------------------------------------------------------------- spec


def test_spec_defaults_and_tokens() -> None:
    spec = ArithmeticSpec()
    assert (spec.numbers, spec.modulus) == (1000, 7)
    assert spec.sep_token == 1000
    assert spec.vocab_size == 1001


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"numbers": 1}, ["numbers", "at least 2"]),
        ({"modulus": 1}, ["modulus", "at least 2"]),
        ({"numbers": 5, "modulus": 7}, ["modulus (7)", "numbers (5)", "lower modulus"]),
        ({"numbers": "10"}, ["numbers", "integer"]),
        ({"modulus": True}, ["modulus", "integer"]),
    ],
)
def test_spec_validation(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        ArithmeticSpec(**kwargs)
    for word in words:
        assert word in str(info.value)


# --------------------------------------------------------------------------- sequences


def test_sequences_layout_and_token_range() -> None:
    a, b = sample_pairs(500, SMALL, gen())
    for text in (BASE, SUBTASK, TARGET):
        seqs = make_sequences(a, b, text, SMALL)
        assert seqs.shape == (500, 4) and seqs.dtype == torch.int64
        assert torch.equal(seqs[:, 0], a) and torch.equal(seqs[:, 1], b)
        assert (seqs[:, 2] == SMALL.sep_token).all()
        assert int(seqs.min()) >= 0 and int(seqs.max()) < SMALL.vocab_size
        assert int(seqs[:, 3].max()) < SMALL.modulus
        e = parse(text)
        for row in seqs[:20].tolist():
            assert row[3] == e.evaluate(row[0], row[1], SMALL.modulus)


def test_sequences_check_inputs() -> None:
    with pytest.raises(ValueError, match="outside"):
        make_sequences(torch.tensor([60]), torch.tensor([0]), BASE, SMALL)
    with pytest.raises(ValueError, match="one length"):
        make_sequences(torch.tensor([1, 2]), torch.tensor([0]), BASE, SMALL)
    with pytest.raises(ExpressionError):
        make_sequences(torch.tensor([1]), torch.tensor([0]), "a +", SMALL)


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"distinct": True}, {"unique": True}, {"distinct": True, "unique": True}],
)
@pytest.mark.parametrize("n", [60, 61, 150])
def test_every_number_appears_as_a_and_b(kwargs: dict, n: int) -> None:
    a, b = sample_pairs(n, SMALL, gen(n), **kwargs)
    assert a.shape == b.shape == (n,) and a.dtype == b.dtype == torch.int64
    everything = set(range(SMALL.numbers))
    assert set(a.tolist()) == everything
    assert set(b.tolist()) == everything
    if kwargs.get("distinct"):
        assert not (a == b).any()
    if kwargs.get("unique"):
        assert len(codes_of((a, b))) == n


def test_cover_with_the_default_spec_and_many_samples() -> None:
    spec = ArithmeticSpec()
    a, b = sample_pairs(200_000, spec, gen())
    assert a.numel() == 200_000
    assert torch.unique(a).numel() == spec.numbers and torch.unique(b).numel() == spec.numbers
    assert int(a.max()) < spec.numbers and int(b.min()) >= 0


def test_cover_avoids_excluded_pairs() -> None:
    excluded = set(torch.randperm(SMALL.numbers**2, generator=gen(5))[:1800].tolist())
    for unique in (False, True):
        a, b = sample_pairs(60, SMALL, gen(), exclude=excluded, distinct=True, unique=unique)
        assert set(a.tolist()) == set(b.tolist()) == set(range(SMALL.numbers))
        assert not codes_of((a, b)) & excluded
        assert not (a == b).any()


def test_cover_impossible_raises() -> None:
    excluded = {a * SMALL.numbers + 0 for a in range(SMALL.numbers)}  # b == 0 never allowed
    with pytest.raises(ConfigError, match="every number appears"):
        sample_pairs(60, SMALL, gen(), exclude=excluded)
    _, b = sample_pairs(59, SMALL, gen(), exclude=excluded)  # below numbers: no cover needed
    assert not (b == 0).any()


def test_exclude_and_distinct_are_respected() -> None:
    excluded = torch.arange(0, SMALL.numbers**2, 7)
    a, b = sample_pairs(2000, SMALL, gen(), exclude=excluded, distinct=True)
    assert not (a == b).any()
    assert not (pair_codes(a, b, SMALL) % 7 == 0).any()
    a2, b2 = sample_pairs(2000, SMALL, gen(), exclude=set(excluded.tolist()), distinct=True)
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_unique_sampling_has_no_repeats() -> None:
    a, b = sample_pairs(SMALL.numbers**2 - SMALL.numbers, SMALL, gen(), distinct=True, unique=True)
    assert len(codes_of((a, b))) == a.numel()
    assert not (a == b).any()


def test_too_many_unique_pairs_raises() -> None:
    with pytest.raises(ConfigError, match=r"asked for 3541 unique pairs but only 3540 exist"):
        sample_pairs(3541, SMALL, gen(), distinct=True, unique=True)
    with pytest.raises(ConfigError, match="3600 exist"):
        sample_pairs(3601, SMALL, gen(), unique=True)
    with pytest.raises(ConfigError, match="non-negative"):
        sample_pairs(-1, SMALL, gen())


def test_sampling_is_deterministic_from_the_seed() -> None:
    for kwargs in ({}, {"distinct": True, "unique": True}):
        first = sample_pairs(300, SMALL, gen(7), **kwargs)
        again = sample_pairs(300, SMALL, gen(7), **kwargs)
        other = sample_pairs(300, SMALL, gen(8), **kwargs)
        assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
        assert not all(torch.equal(x, y) for x, y in zip(first, other, strict=True))


def test_ambiguous_pairs() -> None:
    a, b = ambiguous_pairs(SMALL)
    assert torch.equal(a, torch.arange(60)) and torch.equal(a, b)


# --------------------------------------------------------------------------- ambiguity


def test_paper_target_is_ambiguous_with_its_alternatives() -> None:
    assert check_ambiguity(TARGET, ALTERNATIVES, ArithmeticSpec()) == []
    assert check_ambiguity(parse(TARGET), [parse(x) for x in ALTERNATIVES], SMALL) == []


def test_wrong_alternative_is_reported_clearly() -> None:
    problems = check_ambiguity(TARGET, ["2*a^2", "a*b"], SMALL)
    assert len(problems) == 1
    assert problems[0].startswith(
        "the ambiguous set (a == b) does not fit alternative 'a*b': at a=b=1 "
        "target 'a^2 + a*b' gives 2, alternative gives 1"
    )


def test_indistinguishable_alternative_is_reported() -> None:
    problems = check_ambiguity(TARGET, ["a*(a+b) + 7*b", "a^8 + a*b"], SMALL)
    # a^8 == a^2 mod 7 (Fermat), so both alternatives equal the target everywhere
    assert len(problems) == 2
    assert all("can tell them apart" in p for p in problems)
    assert "'a*(a+b) + 7*b'" in problems[0]


# --------------------------------------------------------------------------- target splits


@pytest.fixture(scope="module")
def splits() -> TargetSplits:
    return make_target_splits(TARGET, SMALL, n_max=400, n_val=200, n_test=300, seed=3)


def test_splits_are_disjoint_unique_and_unambiguous(splits: TargetSplits) -> None:
    pool, val, test = codes_of(splits.pool), codes_of(splits.val), codes_of(splits.test)
    assert (len(pool), len(val), len(test)) == (400, 200, 300)  # no repeats inside a split
    assert not pool & val and not pool & test and not val & test
    ambiguous = codes_of(ambiguous_pairs(SMALL))
    assert not ambiguous & (pool | val | test)
    for a, b in (splits.pool, splits.val, splits.test):
        assert not (a == b).any()


def test_disambiguation_sets_are_nested_prefixes(splits: TargetSplits) -> None:
    previous = set()
    for n in (0, 1, 10, 50, 400):
        a, b = splits.disambiguation(n)
        assert a.numel() == n
        current = codes_of((a, b))
        assert previous <= current
        previous = current
    small, large = splits.train_sequences(10), splits.train_sequences(50)
    assert torch.equal(large[: small.shape[0]], small)


def test_train_sequences_are_ambiguous_set_plus_prefix(splits: TargetSplits) -> None:
    seqs = splits.train_sequences(25)
    assert seqs.shape == (SMALL.numbers + 25, 4)
    amb = seqs[: SMALL.numbers]
    assert torch.equal(amb[:, 0], torch.arange(60)) and torch.equal(amb[:, 1], torch.arange(60))
    dis_a, dis_b = splits.disambiguation(25)
    assert torch.equal(seqs[SMALL.numbers :, 0], dis_a)
    assert torch.equal(seqs[SMALL.numbers :, 1], dis_b)
    assert torch.equal(seqs, make_sequences(seqs[:, 0], seqs[:, 1], TARGET, SMALL))
    assert splits.val_sequences().shape == (200, 4)
    assert splits.test_sequences().shape == (300, 4)


def test_disambiguation_bounds(splits: TargetSplits) -> None:
    with pytest.raises(ConfigError, match="pool holds 400"):
        splits.disambiguation(401)
    with pytest.raises(ConfigError):
        splits.disambiguation(-1)


def test_splits_are_deterministic_from_the_seed(splits: TargetSplits) -> None:
    again = make_target_splits(TARGET, SMALL, n_max=400, n_val=200, n_test=300, seed=3)
    other = make_target_splits(TARGET, SMALL, n_max=400, n_val=200, n_test=300, seed=4)
    for name in ("pool", "val", "test"):
        assert all(
            torch.equal(x, y)
            for x, y in zip(getattr(splits, name), getattr(again, name), strict=True)
        )
        assert not torch.equal(getattr(splits, name)[0], getattr(other, name)[0])
    # the test set does not depend on the pool size
    bigger = make_target_splits(TARGET, SMALL, n_max=1000, n_val=200, n_test=300, seed=3)
    assert torch.equal(bigger.test[0], splits.test[0])
    assert torch.equal(bigger.test[1], splits.test[1])


def test_too_many_target_pairs_raises() -> None:
    with pytest.raises(ConfigError, match="only 3540 exist"):
        make_target_splits(TARGET, SMALL, n_max=3000, n_val=300, n_test=300, seed=0)


def test_default_spec_splits_with_test_of_1000() -> None:
    spec = ArithmeticSpec()
    s = make_target_splits(TARGET, spec, n_max=200, n_val=200, n_test=1000, seed=0)
    assert s.test_sequences().shape == (1000, 4)
    assert s.train_sequences(200).shape == (1200, 4)
    assert not codes_of(s.test, spec) & codes_of(s.pool, spec)


# --------------------------------------------------------------------------- accuracy


def test_accuracy_under_hypotheses(splits: TargetSplits) -> None:
    a, b = splits.test
    predictions = make_sequences(a, b, TARGET, SMALL)[:, 3]
    assert accuracy_under(predictions, a, b, TARGET, SMALL) == 1.0
    for alt in ALTERNATIVES:
        # on unambiguous pairs the alternatives mostly disagree with the target
        assert accuracy_under(predictions, a, b, alt, SMALL) < 0.5
    amb_a, amb_b = ambiguous_pairs(SMALL)
    amb_pred = make_sequences(amb_a, amb_b, TARGET, SMALL)[:, 3]
    for alt in ALTERNATIVES:
        assert accuracy_under(amb_pred, amb_a, amb_b, parse(alt), SMALL) == 1.0
    wrong = (predictions + 1) % SMALL.modulus
    assert accuracy_under(wrong, a, b, TARGET, SMALL) == 0.0
    half = predictions.clone()
    half[:150] = wrong[:150]
    assert accuracy_under(half, a, b, TARGET, SMALL) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        accuracy_under(predictions[:5], a, b, TARGET, SMALL)
