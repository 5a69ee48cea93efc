"""Polynomials in ``a`` and ``b`` modulo p: a small recursive-descent parser and evaluator.

Grammar (``^`` and ``**`` are the same operator; the exponent must be an integer literal)::

    expr     := term (('+' | '-') term)*
    term     := unary ('*' unary)*
    unary    := '-' unary | power            # -a^2 == -(a^2)
    power    := atom ('^' exponent)?
    exponent := INT ('^' exponent)?          # right-associative: a^2^3 == a^8
    atom     := INT | 'a' | 'b' | '(' expr ')'

User text is only ever tokenised and parsed here; it is never handed to eval/exec/compile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

import torch

from instill.errors import ExpressionError

__all__ = ["MAX_DEPTH", "MAX_LENGTH", "Expression", "parse"]

MAX_LENGTH = 1000
"""Longest accepted expression text, in characters."""

MAX_DEPTH = 64
"""Deepest accepted nesting of parentheses and unary minus (keeps recursion bounded)."""

_MAX_EXPONENT_BITS = 4096
"""Largest exponent (in bits) a chain like ``a^2^3`` may evaluate to."""

_HINT = "expressions use a, b, integers, + - * ^ and parentheses"
_VARIABLES = ("a", "b")
_DIGITS = "0123456789"
_WHITESPACE = " \t\r\n"
_IDENT_START = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
_IDENT_REST = _IDENT_START + _DIGITS
_INT64_MAX = 2**63 - 1

Value: TypeAlias = int | torch.Tensor


# --------------------------------------------------------------------------- AST


@dataclass(frozen=True)
class Num:
    """An integer literal."""

    value: int


@dataclass(frozen=True)
class Var:
    """A variable, ``a`` or ``b``."""

    name: str


@dataclass(frozen=True)
class Neg:
    """Unary minus."""

    operand: Node


@dataclass(frozen=True)
class Sum:
    """``t0 ± t1 ± ...``; n-ary so long chains do not deepen the tree."""

    terms: tuple[Node, ...]
    signs: tuple[int, ...]  # +1 or -1 per term; the first is always +1


@dataclass(frozen=True)
class Product:
    """``f0 * f1 * ...``; n-ary so long chains do not deepen the tree."""

    factors: tuple[Node, ...]


@dataclass(frozen=True)
class Pow:
    """``base ^ exponent`` with a non-negative integer exponent."""

    base: Node
    exponent: int


Node: TypeAlias = Num | Var | Neg | Sum | Product | Pow


# --------------------------------------------------------------------------- errors


def _display(text: str) -> str:
    """The text with each character shown as one printable column, so the caret lines up."""
    out = []
    for ch in text:
        if ch in _WHITESPACE:
            out.append(" ")
        elif ch.isascii() and ch.isprintable():
            out.append(ch)
        else:
            out.append("?")
    return "".join(out)


def _error(text: str, problem: str, pos: int) -> ExpressionError:
    """An ExpressionError that names the problem, quotes the text and puts a caret at ``pos``."""
    return ExpressionError(
        f"{problem} at position {pos} in expression:\n  {_display(text)}\n  {' ' * pos}^\n{_HINT}"
    )


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class _Token:
    kind: str  # "int", "var", "op" ('+', '-', '*', '^', '**', '(', ')') or "end"
    text: str
    pos: int


def _tokenize(text: str) -> list[_Token]:
    """Split the text into tokens; unknown characters and names are errors here."""
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in _WHITESPACE:
            i += 1
        elif ch in _DIGITS:
            j = i
            while j < n and text[j] in _DIGITS:
                j += 1
            tokens.append(_Token("int", text[i:j], i))
            i = j
        elif ch in _IDENT_START:
            j = i
            while j < n and text[j] in _IDENT_REST:
                j += 1
            name = text[i:j]
            if name not in _VARIABLES:
                raise _error(text, f"unknown name {name!r} (the only variables are a and b)", i)
            tokens.append(_Token("var", name, i))
            i = j
        elif text.startswith("**", i):
            tokens.append(_Token("op", "**", i))
            i += 2
        elif ch in "+-*^()":
            tokens.append(_Token("op", ch, i))
            i += 1
        else:
            raise _error(text, f"unexpected character {ch!r}", i)
    tokens.append(_Token("end", "", n))
    return tokens


# --------------------------------------------------------------------------- parser


class _Parser:
    """Recursive-descent parser over the token list; depth is capped at MAX_DEPTH."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def at_op(self, *ops: str) -> bool:
        tok = self.peek()
        return tok.kind == "op" and tok.text in ops

    def enter(self, pos: int) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _error(
                self.text, f"expression is nested too deeply (more than {MAX_DEPTH} levels)", pos
            )

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise _error(self.text, "empty expression", 0)
        node = self.expr()
        tok = self.peek()
        if tok.kind != "end":
            if tok.text == ")":
                raise _error(self.text, "unbalanced parentheses: unmatched ')'", tok.pos)
            raise _error(
                self.text,
                f"trailing input: unexpected {tok.text!r} after a complete expression "
                "(missing operator?)",
                tok.pos,
            )
        return node

    def expr(self) -> Node:
        terms = [self.term()]
        signs = [1]
        while self.at_op("+", "-"):
            signs.append(1 if self.take().text == "+" else -1)
            terms.append(self.term())
        return terms[0] if len(terms) == 1 else Sum(tuple(terms), tuple(signs))

    def term(self) -> Node:
        factors = [self.unary()]
        while self.at_op("*"):
            self.take()
            factors.append(self.unary())
        return factors[0] if len(factors) == 1 else Product(tuple(factors))

    def unary(self) -> Node:
        if self.at_op("-"):
            tok = self.take()
            self.enter(tok.pos)
            node = Neg(self.unary())
            self.depth -= 1
            return node
        return self.power()

    def power(self) -> Node:
        base = self.atom()
        if not self.at_op("^", "**"):
            return base
        return Pow(base, self.exponent(self.take()))

    def exponent(self, caret: _Token) -> int:
        tok = self.peek()
        if tok.kind == "end":
            raise _error(self.text, f"missing exponent after {caret.text!r}", tok.pos)
        if tok.kind != "int":
            raise _error(
                self.text,
                f"exponent must be a non-negative integer literal, not {tok.text!r} "
                "(exponents written as expressions are not supported)",
                tok.pos,
            )
        self.take()
        value = int(tok.text)
        if not self.at_op("^", "**"):
            return value
        inner = self.exponent(self.take())
        if inner and value > 1 and inner * value.bit_length() > _MAX_EXPONENT_BITS:
            raise _error(
                self.text,
                f"exponent too large (more than {_MAX_EXPONENT_BITS} bits); "
                "write the exponent as a single integer",
                tok.pos,
            )
        return value**inner

    def atom(self) -> Node:
        tok = self.peek()
        if tok.kind == "int":
            self.take()
            return Num(int(tok.text))
        if tok.kind == "var":
            self.take()
            return Var(tok.text)
        if tok.text == "(":
            self.take()
            self.enter(tok.pos)
            node = self.expr()
            self.depth -= 1
            if not self.at_op(")"):
                raise _error(self.text, "unbalanced parentheses: unclosed '('", tok.pos)
            self.take()
            return node
        # A missing operand: say what came before, or what stands where the operand should be.
        prev = self.tokens[self.i - 1] if self.i > 0 else None
        if tok.kind == "end":
            after = f" after {prev.text!r}" if prev is not None else ""
            raise _error(self.text, f"missing operand{after}", tok.pos)
        raise _error(self.text, f"missing operand before {tok.text!r}", tok.pos)


# --------------------------------------------------------------------------- evaluation


def _pow_mod(x: Value, exponent: int, modulus: int) -> Value:
    """``x ** exponent mod modulus`` by repeated squaring; x is already reduced."""
    if isinstance(x, int):
        return pow(x, exponent, modulus)
    result: Value = torch.ones_like(x) % modulus
    base = x
    while exponent:
        if exponent & 1:
            result = (result * base) % modulus
        exponent >>= 1
        if exponent:
            base = (base * base) % modulus
    return result


def _eval(node: Node, a: Value, b: Value, p: int) -> Value:
    """Evaluate a node with every intermediate value reduced into [0, p)."""
    if isinstance(node, Num):
        return node.value % p
    if isinstance(node, Var):
        return a if node.name == "a" else b
    if isinstance(node, Neg):
        return (-_eval(node.operand, a, b, p)) % p
    if isinstance(node, Sum):
        total: Value = 0
        for sign, term in zip(node.signs, node.terms, strict=True):
            value = _eval(term, a, b, p)
            total = (total + value) % p if sign > 0 else (total - value) % p
        return total
    if isinstance(node, Product):
        prod: Value = 1 % p
        for factor in node.factors:
            prod = (prod * _eval(factor, a, b, p)) % p
        return prod
    if isinstance(node, Pow):
        return _pow_mod(_eval(node.base, a, b, p), node.exponent, p)
    raise TypeError(f"unknown expression node {node!r}")  # pragma: no cover


def _variables(node: Node) -> frozenset[str]:
    """Names of the variables used under a node."""
    if isinstance(node, Var):
        return frozenset({node.name})
    if isinstance(node, Neg):
        return _variables(node.operand)
    if isinstance(node, Pow):
        return _variables(node.base)
    if isinstance(node, Sum):
        return frozenset().union(*(_variables(t) for t in node.terms))
    if isinstance(node, Product):
        return frozenset().union(*(_variables(f) for f in node.factors))
    return frozenset()


def _as_operand(x: int | torch.Tensor, name: str, modulus: int) -> Value:
    """Check one input and reduce it into [0, modulus)."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
            raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
        return x.to(torch.int64) % modulus
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(x).__name__}")
    return x % modulus


@dataclass(frozen=True)
class Expression:
    """A parsed polynomial in a and b; evaluate it modulo p on ints or integer tensors."""

    text: str
    tree: Node = field(repr=False)

    def __str__(self) -> str:
        return self.text

    @property
    def variables(self) -> frozenset[str]:
        """The variable names the expression uses (a subset of {'a', 'b'})."""
        return _variables(self.tree)

    def evaluate(
        self, a: int | torch.Tensor, b: int | torch.Tensor, modulus: int
    ) -> int | torch.Tensor:
        """Value mod ``modulus`` in [0, modulus); elementwise with broadcasting on tensors."""
        if isinstance(modulus, bool) or not isinstance(modulus, int) or modulus < 1:
            raise ValueError(f"modulus must be a positive int, got {modulus!r}")
        tensors = [x for x in (a, b) if isinstance(x, torch.Tensor)]
        if tensors and (modulus - 1) ** 2 > _INT64_MAX:
            raise ValueError(
                f"modulus {modulus} is too large for int64 tensors: products of two residues "
                "would overflow; use a modulus below 3037000500"
            )
        av = _as_operand(a, "a", modulus)
        bv = _as_operand(b, "b", modulus)
        result = _eval(self.tree, av, bv, modulus)
        if not tensors:
            return result
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        device = tensors[0].device
        result_t = torch.as_tensor(result, dtype=torch.int64, device=device)
        return result_t.expand(shape).clone()


def parse(text: str) -> Expression:
    """Parse a polynomial in a and b; raise ExpressionError pointing at the bad position."""
    if not isinstance(text, str):
        raise ExpressionError(f"an expression must be a string, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(
            f"expression is too long: {len(text)} characters (the limit is {MAX_LENGTH}); {_HINT}"
        )
    return Expression(text, _Parser(text).parse())
