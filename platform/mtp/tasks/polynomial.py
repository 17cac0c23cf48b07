"""Polynomial arithmetic over F7[X]/(X^5) (paper §4.2): expressions in, reduced polynomials out.

An expression is written in prefix notation without brackets, one byte per symbol:
leaves are ``x`` or a constant ``0``..``6`` (drawn: ``x`` half the time, else 1..6); ``~`` is unary negation, ``+``
addition, ``*`` multiplication and ``o`` composition (``o p q`` = p(q(X))). The
answer is the reduced polynomial as its 5 coefficients c0..c4, e.g.
``*+x3~x=04600`` ((X+3)(-X) = 4X + 6X^2). Operations are counted in the tree, so
"up to 5 operations" (in-domain) and "6 to 10" (out-of-domain) are exact.
"""

from __future__ import annotations

import random

from mtp.tasks.problem import Problem

P = 7  # the field
DEGREE = 5  # the ring is F7[X]/(X^DEGREE)
UNARY = "~"
BINARY = "+*o"
LEAVES = "x0123456"
CONSTANTS = "123456"  # drawn leaves; 0 would zero whole products

Poly = tuple[int, ...]  # DEGREE coefficients, constant first


def add(p: Poly, q: Poly) -> Poly:
    return tuple((a + b) % P for a, b in zip(p, q))


def neg(p: Poly) -> Poly:
    return tuple(-a % P for a in p)


def mul(p: Poly, q: Poly) -> Poly:
    out = [0] * DEGREE
    for i, a in enumerate(p):
        for j, b in enumerate(q[: DEGREE - i]):
            out[i + j] = (out[i + j] + a * b) % P
    return tuple(out)


def compose(p: Poly, q: Poly) -> Poly:
    """p(q(X)) mod X^DEGREE, by Horner's rule."""
    out: Poly = (0,) * DEGREE
    for a in reversed(p):
        out = add(mul(out, q), (a,) + (0,) * (DEGREE - 1))
    return out


def leaf(symbol: str) -> Poly:
    if symbol == "x":
        return (0, 1) + (0,) * (DEGREE - 2)
    return (int(symbol),) + (0,) * (DEGREE - 1)


def evaluate(expression: str) -> Poly:
    """The reduced polynomial of a prefix expression; a malformed one raises ValueError."""
    pos = 0

    def parse() -> Poly:
        nonlocal pos
        if pos >= len(expression):
            raise ValueError(f"expression {expression!r} ends early")
        symbol = expression[pos]
        pos += 1
        if symbol in LEAVES:
            return leaf(symbol)
        if symbol == UNARY:
            return neg(parse())
        if symbol in BINARY:
            left, right = parse(), parse()
            return {"+": add, "*": mul, "o": compose}[symbol](left, right)
        raise ValueError(f"unknown symbol {symbol!r} in {expression!r}")

    value = parse()
    if pos != len(expression):
        raise ValueError(f"expression {expression!r} has trailing symbols")
    return value


def random_expression(rng: random.Random, n_ops: int) -> str:
    """A uniformly shaped random prefix expression with exactly ``n_ops`` operations."""
    if n_ops == 0:  # X half the time: constant-only trees would make most answers trivial
        return "x" if rng.random() < 0.5 else rng.choice(CONSTANTS)
    op = rng.choice(UNARY + BINARY)
    if op == UNARY:
        return op + random_expression(rng, n_ops - 1)
    left = rng.randint(0, n_ops - 1)
    return op + random_expression(rng, left) + random_expression(rng, n_ops - 1 - left)


def format_poly(p: Poly) -> str:
    return "".join(str(c) for c in p)


def problem(expression: str) -> Problem:
    return Problem(expression + "=", format_poly(evaluate(expression)))


def sampler(min_ops: int, max_ops: int):
    """``rng -> Problem`` with a uniform number of operations in [min_ops, max_ops]."""
    def sample(rng: random.Random) -> Problem:
        return problem(random_expression(rng, rng.randint(min_ops, max_ops)))
    return sample
