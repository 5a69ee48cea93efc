"""Modular-arithmetic data (experiment A): sequences ``[a, b, SEP, y]`` with y = expr(a, b) mod p.

Numbers 0..numbers-1 are tokens 0..numbers-1, SEP is token ``numbers`` and the answer y < p reuses
the number tokens. The target task's training set is the ambiguous set (a == b) plus n
unambiguous pairs (a != b); validation and test sets are fresh unambiguous pairs, disjoint from
training. Everything is deterministic from a seed via ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from instill.errors import ConfigError
from instill.tasks.expr import Expression, parse

__all__ = [
    "ArithmeticSpec",
    "TargetSplits",
    "accuracy_under",
    "ambiguous_pairs",
    "base_splits",
    "check_ambiguity",
    "make_sequences",
    "make_target_splits",
    "sample_pairs",
]

Pairs = tuple[torch.Tensor, torch.Tensor]

_COVER_ROUNDS = 200
"""Repair rounds when building a cover that avoids excluded or diagonal pairs."""
MAX_NUMBERS = 10_000
"""Largest `numbers`: pairs are drawn from all numbers^2 combinations held in memory."""


@dataclass(frozen=True)
class ArithmeticSpec:
    """Sizes of the arithmetic task: how many number tokens, and the modulus of the answers."""

    numbers: int = 1000
    modulus: int = 7

    def __post_init__(self) -> None:
        for name in ("numbers", "modulus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(
                    f"ArithmeticSpec.{name} must be an integer, got {value!r}; "
                    f"set {name} to a whole number such as {getattr(type(self), name)}"
                )
            if value < 2:
                raise ConfigError(
                    f"ArithmeticSpec.{name} must be at least 2, got {value}; "
                    f"set {name} to 2 or more"
                )
        if self.numbers > MAX_NUMBERS:
            raise ConfigError(
                f"ArithmeticSpec.numbers must be at most {MAX_NUMBERS:,}, got {self.numbers:,}: "
                "pairs are drawn from all numbers^2 combinations held in memory (the paper uses "
                "1,000); lower numbers"
            )
        if self.modulus > self.numbers:
            raise ConfigError(
                f"ArithmeticSpec.modulus ({self.modulus}) must not exceed numbers "
                f"({self.numbers}): answers reuse the number tokens 0..numbers-1; "
                "lower modulus or raise numbers"
            )

    @property
    def sep_token(self) -> int:
        """The separator token between the operands and the answer."""
        return self.numbers

    @property
    def vocab_size(self) -> int:
        """Number tokens plus the separator."""
        return self.numbers + 1

    @property
    def num_pairs(self) -> int:
        """How many ordered pairs (a, b) exist."""
        return self.numbers * self.numbers


def _as_expression(expr: Expression | str) -> Expression:
    """Accept a parsed Expression or its text."""
    return expr if isinstance(expr, Expression) else parse(expr)


def _check_pairs(a: torch.Tensor, b: torch.Tensor, spec: ArithmeticSpec) -> None:
    """Operands must be equal-length 1-D integer tensors of numbers in [0, numbers)."""
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a and b must be 1-D tensors of one length, got {a.shape} and {b.shape}")
    for name, x in (("a", a), ("b", b)):
        if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
            raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= spec.numbers):
            raise ValueError(f"{name} has values outside [0, {spec.numbers})")


def make_sequences(
    a: torch.Tensor, b: torch.Tensor, expr: Expression | str, spec: ArithmeticSpec
) -> torch.Tensor:
    """Rows ``[a, b, SEP, expr(a, b) mod p]`` as an int64 tensor of shape [n, 4]."""
    _check_pairs(a, b, spec)
    a, b = a.to(torch.int64), b.to(torch.int64)
    y = _as_expression(expr).evaluate(a, b, spec.modulus)
    sep = torch.full_like(a, spec.sep_token)
    return torch.stack([a, b, sep, y], dim=1)


def pair_codes(a: torch.Tensor, b: torch.Tensor, spec: ArithmeticSpec) -> torch.Tensor:
    """One int64 code per pair, ``a * numbers + b``."""
    return a.to(torch.int64) * spec.numbers + b.to(torch.int64)


def _exclude_codes(exclude: Iterable[int] | torch.Tensor | None) -> torch.Tensor:
    """Excluded pair codes as a sorted unique int64 tensor."""
    if exclude is None:
        return torch.empty(0, dtype=torch.int64)
    if isinstance(exclude, torch.Tensor):
        return torch.unique(exclude.detach().cpu().to(torch.int64).flatten())
    return torch.unique(torch.tensor(sorted(exclude), dtype=torch.int64))


def _allowed_mask(spec: ArithmeticSpec, excluded: torch.Tensor, distinct: bool) -> torch.Tensor:
    """A bool per pair code: may it be drawn?"""
    keep = torch.ones(spec.num_pairs, dtype=torch.bool)
    if distinct:
        keep[torch.arange(spec.numbers) * (spec.numbers + 1)] = False
    in_range = excluded[(excluded >= 0) & (excluded < spec.num_pairs)]
    keep[in_range] = False
    return keep


def _cover(
    spec: ArithmeticSpec, generator: torch.Generator, excluded: torch.Tensor, distinct: bool
) -> torch.Tensor:
    """Codes of ``numbers`` pairs (i, sigma(i)), sigma a random permutation avoiding bad pairs.

    Every number then appears exactly once as a and once as b. Pairs that are excluded (or on the
    diagonal when ``distinct``) are repaired by random swaps of sigma.
    """
    n = spec.numbers
    sigma = torch.randperm(n, generator=generator).tolist()
    bad_codes = set(excluded.tolist())

    def ok(i: int, j: int) -> bool:
        return not (distinct and i == j) and i * n + j not in bad_codes

    for _ in range(_COVER_ROUNDS):
        bad = [i for i in range(n) if not ok(i, sigma[i])]
        if not bad:
            return torch.tensor([i * n + sigma[i] for i in range(n)], dtype=torch.int64)
        partners = torch.randint(n, (len(bad),), generator=generator).tolist()
        for i, k in zip(bad, partners, strict=True):
            if ok(i, sigma[k]) and ok(k, sigma[i]):
                sigma[i], sigma[k] = sigma[k], sigma[i]
    raise ConfigError(
        "could not draw pairs in which every number appears as both a and b: too many pairs "
        "are excluded; exclude fewer pairs or ask for fewer than `numbers` pairs"
    )


def sample_pairs(
    n: int,
    spec: ArithmeticSpec,
    generator: torch.Generator,
    exclude: Iterable[int] | torch.Tensor | None = None,
    distinct: bool = False,
    unique: bool = False,
    cover: bool = True,
) -> Pairs:
    """Draw ``n`` random pairs (a, b) as int64 tensors.

    With ``cover`` and ``n >= numbers`` every number appears at least once as a and once as b
    (the first ``numbers`` pairs form a random permutation, the rest are uniform; the order is
    then shuffled). ``distinct`` keeps only a != b; ``exclude`` holds pair codes a*numbers+b to
    avoid; ``unique`` samples without replacement (no pair twice).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"the number of pairs must be a non-negative integer, got {n!r}")
    excluded = _exclude_codes(exclude)
    keep = _allowed_mask(spec, excluded, distinct)
    allowed = torch.nonzero(keep).flatten()
    if unique and n > allowed.numel():
        raise ConfigError(
            f"asked for {n} unique pairs but only {allowed.numel()} exist "
            f"({spec.numbers}^2 pairs{', minus a == b' if distinct else ''}"
            f"{f', minus {excluded.numel()} excluded' if excluded.numel() else ''}); "
            "ask for fewer pairs or raise numbers"
        )
    if n > 0 and allowed.numel() == 0:
        raise ConfigError("every pair is excluded; exclude fewer pairs or raise numbers")

    parts = []
    rest = n
    if cover and n >= spec.numbers:
        covering = _cover(spec, generator, excluded, distinct)
        parts.append(covering)
        rest -= covering.numel()
        if unique:
            keep[covering] = False
            allowed = torch.nonzero(keep).flatten()
    if unique:
        parts.append(allowed[torch.randperm(allowed.numel(), generator=generator)[:rest]])
    else:
        parts.append(allowed[torch.randint(allowed.numel(), (rest,), generator=generator)])
    codes = torch.cat(parts)
    codes = codes[torch.randperm(codes.numel(), generator=generator)]
    return codes // spec.numbers, codes % spec.numbers


def ambiguous_pairs(spec: ArithmeticSpec) -> Pairs:
    """All pairs (i, i): the samples where a^2 + ab, 2a^2 and 2b^2 all agree."""
    ids = torch.arange(spec.numbers, dtype=torch.int64)
    return ids, ids.clone()


def check_ambiguity(
    target: Expression | str, alternatives: Sequence[Expression | str], spec: ArithmeticSpec
) -> list[str]:
    """Problems with an ambiguity setup, as sentences; empty when every alternative is sound.

    Each alternative must agree with the target on the ambiguous set (a == b) mod p, and must
    differ from it on some unambiguous pair, or no data could ever tell the two apart.
    """
    target = _as_expression(target)
    p = spec.modulus
    ids = torch.arange(spec.numbers, dtype=torch.int64)
    target_diag = target.evaluate(ids, ids, p)
    # Values depend only on (a mod p, b mod p), and p <= numbers, so the residue grid covers
    # every unambiguous pair: (r, s) with r != s, and (r, r) when a = r, b = r + p both exist.
    residues = torch.arange(p, dtype=torch.int64)
    grid_a = residues.repeat_interleave(p)
    grid_b = residues.repeat(p)
    unambiguous = (grid_a != grid_b) | (grid_a + p < spec.numbers)
    target_grid = target.evaluate(grid_a, grid_b, p)[unambiguous]
    problems = []
    for alt in map(_as_expression, alternatives):
        alt_diag = alt.evaluate(ids, ids, p)
        mismatch = torch.nonzero(alt_diag != target_diag).flatten()
        if mismatch.numel():
            i = int(mismatch[0])
            problems.append(
                f"the ambiguous set (a == b) does not fit alternative '{alt}': at a=b={i} "
                f"target '{target}' gives {int(target_diag[i])}, alternative gives "
                f"{int(alt_diag[i])} (mod {p})"
            )
        alt_grid = alt.evaluate(grid_a, grid_b, p)[unambiguous]
        if bool((alt_grid == target_grid).all()):
            problems.append(
                f"alternative '{alt}' equals target '{target}' (mod {p}) on every unambiguous "
                "pair (a != b), so no data can tell them apart; choose a different alternative"
            )
    return problems


@dataclass(frozen=True, eq=False)
class TargetSplits:
    """Disjoint target-task pairs: a nested pool of disambiguation pairs, validation and test."""

    target: Expression
    spec: ArithmeticSpec
    pool: Pairs
    val: Pairs
    test: Pairs

    @property
    def n_max(self) -> int:
        """Size of the disambiguation pool (the largest n that may be asked for)."""
        return int(self.pool[0].numel())

    def disambiguation(self, n: int) -> Pairs:
        """The first ``n`` pool pairs, so every smaller n's set is a prefix of a larger one's."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.n_max:
            raise ConfigError(
                f"asked for {n!r} disambiguation pairs but the pool holds {self.n_max}; "
                "use 0 <= n <= n_max or build the splits with a larger n_max"
            )
        return self.pool[0][:n], self.pool[1][:n]

    def train_sequences(self, n: int) -> torch.Tensor:
        """The ambiguous set plus the first ``n`` disambiguation pairs, labelled by the target."""
        amb_a, amb_b = ambiguous_pairs(self.spec)
        dis_a, dis_b = self.disambiguation(n)
        a = torch.cat([amb_a, dis_a])
        b = torch.cat([amb_b, dis_b])
        return make_sequences(a, b, self.target, self.spec)

    def val_sequences(self) -> torch.Tensor:
        """Validation pairs labelled by the target."""
        return make_sequences(*self.val, self.target, self.spec)

    def test_sequences(self) -> torch.Tensor:
        """Test pairs labelled by the target."""
        return make_sequences(*self.test, self.target, self.spec)


def make_target_splits(
    target: Expression | str,
    spec: ArithmeticSpec,
    n_max: int,
    n_val: int,
    n_test: int,
    seed: int,
) -> TargetSplits:
    """Draw disjoint unique unambiguous (a != b) pairs: test, then validation, then the pool.

    The test set depends only on (spec, n_test, seed), so it is shared by runs with other pool
    sizes. No cover is forced: the ambiguous set already holds every number as a and as b.
    """
    generator = torch.Generator().manual_seed(seed)
    needed = n_max + n_val + n_test
    available = spec.num_pairs - spec.numbers
    if needed > available:
        raise ConfigError(
            f"n_max + n_val + n_test = {needed} unique pairs with a != b are needed but only "
            f"{available} exist for numbers={spec.numbers}; lower them or raise numbers"
        )

    def draw(n: int, exclude: list[torch.Tensor]) -> Pairs:
        codes = torch.cat(exclude) if exclude else None
        return sample_pairs(
            n, spec, generator, exclude=codes, distinct=True, unique=True, cover=False
        )

    test = draw(n_test, [])
    val = draw(n_val, [pair_codes(*test, spec)])
    pool = draw(n_max, [pair_codes(*test, spec), pair_codes(*val, spec)])
    return TargetSplits(_as_expression(target), spec, pool, val, test)


def accuracy_under(
    predictions: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    expr: Expression | str,
    spec: ArithmeticSpec,
) -> float:
    """Fraction of predicted answers equal to expr(a, b) mod p (accuracy under one hypothesis)."""
    _check_pairs(a, b, spec)
    if predictions.shape != a.shape:
        raise ValueError(
            f"predictions must have the shape of a and b, got {predictions.shape} and {a.shape}"
        )
    if a.numel() == 0:
        raise ValueError("cannot compute accuracy on zero samples")
    expected = _as_expression(expr).evaluate(a, b, spec.modulus).to(predictions.device)
    return float((predictions.to(torch.int64) == expected).double().mean())


def base_splits(expr: Expression, spec: ArithmeticSpec, samples: int, val: int,
                seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training sequences of a base task, and validation and test sequences on pairs that
    training never shows (so the base gate measures the rule, not memory)."""
    gen = torch.Generator().manual_seed(seed)
    train = sample_pairs(samples, spec, gen)
    seen = torch.unique(pair_codes(*train, spec))
    held = spec.num_pairs - seen.numel()
    if held < 2 * val:
        raise ConfigError(
            f"base_samples={samples} leave {held} of {spec.num_pairs} "
            f"pairs unseen, fewer than the {2 * val} held-out validation and "
            "test pairs (2 x base_val) the base gate needs; lower base_samples or base_val, "
            "or raise numbers")
    val_test = sample_pairs(2 * val, spec, gen, exclude=seen, unique=True, cover=False)
    return tuple(make_sequences(a, b, expr, spec)  # type: ignore[return-value]
                 for a, b in (train, (val_test[0][:val], val_test[1][:val]),
                              (val_test[0][val:], val_test[1][val:])))
