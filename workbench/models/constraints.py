"""What each model factory builds, declared with it: one constraint per hyperparameter, in the
style of scikit-learn's `_parameter_constraints` (`@register_model(width=Interval(int, 1, None))`).

`check_models` checks every value a study file's `params` and `space` can give a factory keyword
against them when the file is loaded (workbench/spaces.py: a range's ends, every choice, and the
points inside a range for a keyword that takes only some values); `create_model` checks them again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from workbench.spaces import Param, Scalar, Value, ends, inside

Closed = Literal["both", "left", "right", "neither"]


def _kind(kind: type) -> str:
    return {int: "an int", float: "a float", str: "a string", bool: "a bool"}[kind]


def _is(v: Scalar, kind: type) -> bool:
    """Whether `v` is a `kind` (an int is a float here, as in TOML; a bool is never a number)."""
    if isinstance(v, bool):
        return kind is bool
    return isinstance(v, (int, float)) if kind is float else isinstance(v, kind)


@dataclass(frozen=True)
class Interval:
    """A number in [low, high], either end open (`closed`) or unbounded (None)."""

    kind: type  # int or float
    low: float | None
    high: float | None
    closed: Closed = "both"

    def problem(self, v: Scalar) -> str | None:
        if not _is(v, self.kind):
            return f"is not {_kind(self.kind)}"
        x = float(v)
        low_in = self.closed in ("both", "left")
        high_in = self.closed in ("both", "right")
        if self.low is not None and (x < self.low or (x == self.low and not low_in)):
            return "is out of range"
        if self.high is not None and (x > self.high or (x == self.high and not high_in)):
            return "is out of range"
        return None

    def values(self, p: Param) -> Iterator[Value]:
        yield from ends(p)  # an interval holds everything between two values it holds

    def __str__(self) -> str:  # "an int >= 1", "a float in [0, 1)"
        lo, hi = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.high is None:
            bound = "no bound" if self.low is None else f"{'>=' if lo else '>'} {self.low:g}"
        elif self.low is None:
            bound = f"{'<=' if hi else '<'} {self.high:g}"
        else:
            bound = f"in {'[' if lo else '('}{self.low:g}, {self.high:g}{']' if hi else ')'}"
        return f"{_kind(self.kind)} {bound}"


@dataclass(frozen=True)
class Options:
    """One of a few values (a ResNet's depths): a range must produce only these."""

    options: tuple[Scalar, ...]

    def problem(self, v: Scalar) -> str | None:
        ok = any(type(v) is type(o) and v == o for o in self.options)
        return None if ok else "is not valid"

    def values(self, p: Param) -> Iterator[Value]:
        yield from ends(p)
        yield from inside(p)

    def __str__(self) -> str:
        return f"one of {list(self.options)}"


@dataclass(frozen=True)
class OfType:
    """Any value of one type (a weights name or path)."""

    kind: type

    def problem(self, v: Scalar) -> str | None:
        return None if _is(v, self.kind) else f"is not {_kind(self.kind)}"

    def values(self, p: Param) -> Iterator[Value]:
        yield from ends(p)

    def __str__(self) -> str:
        return _kind(self.kind)


Constraint = Interval | Options | OfType


def violation(constraint: Constraint, values: Iterable[Value]) -> tuple[Value, str] | None:
    """The first of `values` the constraint rejects, with why; None if it takes them all."""
    for v in values:
        problem = constraint.problem(v.value)
        if problem:
            return v, problem
    return None
