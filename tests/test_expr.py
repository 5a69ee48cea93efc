"""Tests for the polynomial parser/evaluator in instill.tasks.expr."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instill.errors import ExpressionError
from instill.tasks import expr as expr_module
from instill.tasks.expr import MAX_DEPTH, MAX_LENGTH, Expression, parse

POINTS = [(0, 0, 7), (3, 5, 7), (6, 2, 7), (12, 345, 11), (999, 998, 7), (4, 4, 2), (5, 9, 1)]

# (text, reference written directly in Python, variables used)
VALID: list[tuple[str, Callable[[int, int], int], set[str]]] = [
    ("a", lambda a, b: a, {"a"}),
    ("b", lambda a, b: b, {"b"}),
    ("42", lambda a, b: 42, set()),
    ("a + a*b", lambda a, b: a + a * b, {"a", "b"}),
    ("a*b", lambda a, b: a * b, {"a", "b"}),
    ("a^2 + a*b", lambda a, b: a**2 + a * b, {"a", "b"}),
    ("a**2+a*b", lambda a, b: a**2 + a * b, {"a", "b"}),
    ("2*a^2", lambda a, b: 2 * a**2, {"a"}),
    ("2*b^2", lambda a, b: 2 * b**2, {"b"}),
    ("-a^2", lambda a, b: -(a**2), {"a"}),
    ("(-a)^2", lambda a, b: (-a) ** 2, {"a"}),
    ("-a^3", lambda a, b: -(a**3), {"a"}),
    ("--a", lambda a, b: a, {"a"}),
    ("a - b - 1", lambda a, b: (a - b) - 1, {"a", "b"}),
    ("a - (b - 1)", lambda a, b: a - (b - 1), {"a", "b"}),
    ("a - -b", lambda a, b: a + b, {"a", "b"}),
    ("2^3^2", lambda a, b: 2 ** (3**2), set()),
    ("a^2^3", lambda a, b: a**8, {"a"}),
    ("a**2**3", lambda a, b: a**8, {"a"}),
    ("(a+b)*(a-b)", lambda a, b: (a + b) * (a - b), {"a", "b"}),
    ("2*a + 3*b*b - 4", lambda a, b: 2 * a + 3 * b * b - 4, {"a", "b"}),
    ("a^0", lambda a, b: 1, {"a"}),
    ("0^0", lambda a, b: 1, set()),
    ("b ^ 1", lambda a, b: b, {"b"}),
    ("  ( ( a ) )\t*\n3 ", lambda a, b: 3 * a, {"a"}),
    ("a*b^2*a", lambda a, b: a * b * b * a, {"a", "b"}),
    ("0 * a + 7", lambda a, b: 7, {"a"}),
    ("a^10007", lambda a, b: a**10007, {"a"}),
]


@pytest.mark.parametrize(("text", "reference", "variables"), VALID)
def test_valid_expressions(
    text: str, reference: Callable[[int, int], int], variables: set[str]
) -> None:
    e = parse(text)
    assert isinstance(e, Expression)
    assert str(e) == text
    assert e.variables == frozenset(variables)
    for a, b, p in POINTS:
        got = e.evaluate(a, b, p)
        assert isinstance(got, int)
        assert got == reference(a, b) % p, (text, a, b, p)
        assert 0 <= got < p


# (text, words the message must contain, 0-based caret column)
MALFORMED: list[tuple[str, list[str], int]] = [
    ("", ["empty"], 0),
    ("   ", ["empty"], 0),
    ("a + $b", ["unexpected character '$'", "position 4"], 4),
    ("a + b;", ["unexpected character ';'"], 5),
    ("a / b", ["unexpected character '/'"], 2),
    ("a + 1.5", ["unexpected character '.'"], 5),
    ("c", ["unknown name 'c'"], 0),
    ("a + __import__", ["unknown name '__import__'"], 4),
    ("ab", ["unknown name 'ab'"], 0),
    ("a +", ["missing operand after '+'"], 3),
    ("a + * b", ["missing operand before '*'"], 4),
    ("* a", ["missing operand before '*'"], 0),
    ("-", ["missing operand after '-'"], 1),
    ("()", ["missing operand before ')'"], 1),
    ("(a + b", ["unbalanced parentheses", "unclosed '('"], 0),
    ("((a) + b", ["unbalanced parentheses", "unclosed '('"], 0),
    ("a + b)", ["unbalanced parentheses", "unmatched ')'"], 5),
    ("a b", ["trailing input", "'b'"], 2),
    ("2a", ["trailing input", "'a'"], 1),
    ("(a)(b)", ["trailing input", "'('"], 3),
    ("a^b", ["exponent must be a non-negative integer literal", "'b'"], 2),
    ("a^(2)", ["exponent must be a non-negative integer literal"], 2),
    ("a^-1", ["exponent must be a non-negative integer literal"], 2),
    ("a ** b", ["exponent must be a non-negative integer literal"], 5),
    ("a^", ["missing exponent after '^'"], 2),
    ("a **", ["missing exponent after '**'"], 4),
    ("a^2^", ["missing exponent"], 4),
    ("a^2.5", ["unexpected character '.'"], 3),
    ("9^9^9^9", ["exponent too large"], 2),
    ("(" * (MAX_DEPTH + 5) + "a" + ")" * (MAX_DEPTH + 5), ["nested too deeply"], MAX_DEPTH),
    ("-" * (MAX_DEPTH + 5) + "a", ["nested too deeply"], MAX_DEPTH),
    ("a\x00", ["unexpected character '\\x00'"], 1),
]


@pytest.mark.parametrize(("text", "words", "column"), MALFORMED)
def test_malformed_expressions(text: str, words: list[str], column: int) -> None:
    with pytest.raises(ExpressionError) as info:
        parse(text)
    message = str(info.value)
    for word in words:
        assert word in message, message
    lines = message.split("\n")
    assert lines[0].endswith(f"at position {column} in expression:"), message
    assert lines[1] == "  " + expr_module._display(text)
    assert lines[2] == "  " + " " * column + "^"
    assert "expressions use a, b, integers" in lines[3]


def test_message_format_example() -> None:
    with pytest.raises(ExpressionError) as info:
        parse("a + $b")
    assert str(info.value) == (
        "unexpected character '$' at position 4 in expression:\n"
        "  a + $b\n"
        "      ^\n"
        "expressions use a, b, integers, + - * ^ and parentheses"
    )


def test_too_long_is_rejected() -> None:
    ok = "+".join(["a"] * (MAX_LENGTH // 2))  # 999 characters
    assert parse(ok).evaluate(1, 0, 1_000_003) == MAX_LENGTH // 2
    with pytest.raises(ExpressionError, match=r"too long.*1001 characters.*limit is 1000"):
        parse("a" + "+a" * 500)


def test_non_string_is_rejected() -> None:
    with pytest.raises(ExpressionError, match="must be a string"):
        parse(3)  # type: ignore[arg-type]


def test_huge_exponent_literal() -> None:
    e = parse("a^" + "9" * 300)
    exponent = int("9" * 300)
    for a in range(7):
        assert e.evaluate(a, 0, 7) == pow(a, exponent, 7)
    got = e.evaluate(torch.arange(7), torch.zeros(7, dtype=torch.int64), 7)
    assert got.tolist() == [pow(a, exponent, 7) for a in range(7)]


def test_tensor_broadcasting_and_dtype() -> None:
    e = parse("a^2 + a*b")
    a = torch.arange(5, dtype=torch.int32)
    b = torch.arange(3).reshape(3, 1)
    got = e.evaluate(a, b, 7)
    assert got.shape == (3, 5) and got.dtype == torch.int64
    for i in range(3):
        for j in range(5):
            assert int(got[i, j]) == (j * j + j * i) % 7
    # an expression that ignores b, or a constant, still has the broadcast shape
    assert parse("a").evaluate(a, b, 7).shape == (3, 5)
    assert parse("3").evaluate(a, 1, 7).tolist() == [3] * 5
    assert parse("b").evaluate(2, b, 7).shape == (3, 1)
    # negative inputs reduce into [0, p)
    assert parse("a").evaluate(torch.tensor([-1, -8]), 0, 7).tolist() == [6, 6]
    assert parse("a").evaluate(-1, 0, 7) == 6


def test_no_int64_overflow_with_large_modulus() -> None:
    p = 3_037_000_493  # largest prime whose squared residues fit in int64
    e = parse("a*b*a*b + a^5 - b^7*a")
    xs = [p - 1, p - 2, 2**31 + 11, 123456789]
    a = torch.tensor(xs)
    b = torch.tensor(list(reversed(xs)))
    got = e.evaluate(a, b, p).tolist()
    want = [(x * y * x * y + x**5 - y**7 * x) % p for x, y in zip(xs, reversed(xs), strict=True)]
    assert got == want
    with pytest.raises(ValueError, match="too large for int64"):
        e.evaluate(a, b, 2**40)
    assert (
        e.evaluate(2**40 - 1, 5, 2**40)
        == ((2**40 - 1) ** 2 * 25 + (2**40 - 1) ** 5 - 5**7 * (2**40 - 1)) % 2**40
    )


def test_bad_evaluate_arguments() -> None:
    e = parse("a + b")
    with pytest.raises(ValueError, match="modulus"):
        e.evaluate(1, 2, 0)
    with pytest.raises(TypeError, match="integer tensor"):
        e.evaluate(torch.tensor([1.0]), 2, 7)
    with pytest.raises(TypeError):
        e.evaluate(1.5, 2, 7)  # type: ignore[arg-type]


def test_expression_is_frozen_and_hashable() -> None:
    e = parse("a + b")
    assert e == parse("a + b")
    assert hash(e) == hash(parse("a + b"))
    with pytest.raises(AttributeError):
        e.text = "a"  # type: ignore[misc]


def test_injection_attempt_is_rejected(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for text in (
        f"__import__('os').system('touch {marker}')",
        f"a + __import__('os').system('touch {marker}')",
        f"(lambda: __import__('os').system('touch {marker}'))()",
        "().__class__.__bases__[0].__subclasses__()",
    ):
        with pytest.raises(ExpressionError):
            parse(text)
    assert not marker.exists()


def test_parser_never_evaluates_text() -> None:
    tree = ast.parse(inspect.getsource(expr_module))
    forbidden = {"eval", "exec", "compile", "literal_eval", "__import__"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            assert name not in forbidden, f"expr.py calls {name}"


# --------------------------------------------------------------------------- properties

Poly = tuple[str, Callable[[int, int], int]]


def _leaf() -> st.SearchStrategy[Poly]:
    numbers = st.integers(0, 50).map(lambda n: (str(n), lambda a, b, n=n: n))
    variables = st.sampled_from([("a", lambda a, b: a), ("b", lambda a, b: b)])
    return numbers | variables


def _extend(children: st.SearchStrategy[Poly]) -> st.SearchStrategy[Poly]:
    spaces = st.sampled_from(["", " ", "  "])

    def binary(op: str, fn: Callable[[int, int], int]) -> st.SearchStrategy[Poly]:
        return st.builds(
            lambda x, y, s: (
                f"({x[0]}){s}{op}{s}({y[0]})",
                lambda a, b: fn(x[1](a, b), y[1](a, b)),
            ),
            children,
            children,
            spaces,
        )

    power = st.builds(
        lambda x, k, op: (f"({x[0]}){op}{k}", lambda a, b: x[1](a, b) ** k),
        children,
        st.integers(0, 4),
        st.sampled_from(["^", "**", " ^ "]),
    )
    negate = st.builds(lambda x: (f"-({x[0]})", lambda a, b: -x[1](a, b)), children)
    return (
        binary("+", lambda u, v: u + v)
        | binary("-", lambda u, v: u - v)
        | binary("*", lambda u, v: u * v)
        | power
        | negate
    )


polynomials = st.recursive(_leaf(), _extend, max_leaves=8)
operands = st.integers(0, 10**6)
moduli = st.sampled_from([1, 2, 3, 7, 11, 97, 1_000_003])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(polynomials, operands, operands, moduli)
def test_int_evaluation_matches_reference(poly: Poly, a: int, b: int, p: int) -> None:
    text, reference = poly
    assert parse(text).evaluate(a, b, p) == reference(a, b) % p


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    polynomials,
    st.lists(operands, min_size=1, max_size=6),
    st.lists(operands, min_size=1, max_size=6),
    moduli,
)
def test_tensor_evaluation_matches_int(poly: Poly, xs: list[int], ys: list[int], p: int) -> None:
    e = parse(poly[0])
    got = e.evaluate(torch.tensor(xs).reshape(-1, 1), torch.tensor(ys), p)
    assert got.shape == (len(xs), len(ys))
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            assert int(got[i, j]) == e.evaluate(x, y, p)


_GRAMMAR_CHARS = "ab0123456789+-*^() \t"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80) | st.text(alphabet=_GRAMMAR_CHARS, max_size=80))
def test_arbitrary_text_only_raises_expression_error(text: str) -> None:
    try:
        e = parse(text)
    except ExpressionError as err:
        assert "position" in str(err)
        return
    value = e.evaluate(3, 4, 7)
    assert 0 <= value < 7
