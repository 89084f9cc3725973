"""Search spaces (`[models.<name>.space.<param>]`) and the values a study file can give a key.

A space is checked once, when the study file is loaded, at the values it can produce: both ends of
a range and every choice (`ends`); rules across keys are checked at the corners, the combinations
of those values (`corners`). Model factories' constraints (workbench/models/constraints.py) and the
[train] and [data.augment] fields are both checked this way.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

Scalar = bool | int | float | str
CORNERS = 4096  # most combinations checked per model and section; beyond it, one key at a time


class _Frozen(BaseModel):
    # a range to inf or a nan choice is refused at load (Optuna would fail every trial on it)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class IntRange(_Frozen):
    """An integer hyperparameter drawn from [low, high] (both TOML integers)."""

    low: int
    high: int
    step: int = 1  # grid spacing; must be 1 when log = true
    log: bool = False  # sample log-uniformly; needs low >= 1

    @model_validator(mode="after")
    def _check(self) -> IntRange:
        _check_range(self.low, self.high, self.log, self.step if self.step != 1 else None)
        if self.step < 1:
            raise ValueError(
                f"`step >= 1` must hold for an integer range, but got step={self.step}"
            )
        return self


class FloatRange(_Frozen):
    """A float hyperparameter drawn from [low, high]."""

    low: float
    high: float
    step: float | None = None  # optional grid spacing; not allowed with log = true
    log: bool = False  # sample log-uniformly; needs low > 0

    @model_validator(mode="after")
    def _check(self) -> FloatRange:
        _check_range(self.low, self.high, self.log, self.step)
        return self


class Choice(_Frozen):
    """A categorical hyperparameter: one of `choices`."""

    choices: tuple[Scalar, ...] = Field(min_length=1, strict=False)  # TOML arrays are lists


def _check_range(low: float, high: float, log: bool, step: float | None) -> None:
    if low > high:
        raise ValueError(f"`low <= high` must hold, but got low={low}, high={high}")
    if log and low <= 0:
        raise ValueError(f"a log range needs `low > 0`, but got low={low}")
    if log and step is not None:
        raise ValueError("`step` and `log = true` cannot be combined; drop one of them")


def _param_kind(v: Any) -> str:
    """The union tag of a search-space entry: from a TOML table, or from a model when dumping."""
    tags: dict[type, str] = {
        IntRange: "<int range>",
        FloatRange: "<float range>",
        Choice: "<choices>",
    }
    if type(v) in tags:
        return tags[type(v)]
    if isinstance(v, dict):
        if "choices" in v:
            return "<choices>"
        ends = [v.get("low"), v.get("high")]
        if all(isinstance(x, int) and not isinstance(x, bool) for x in ends):
            return "<int range>"
    return "<float range>"


Param = Annotated[
    Annotated[IntRange, Tag("<int range>")]
    | Annotated[FloatRange, Tag("<float range>")]
    | Annotated[Choice, Tag("<choices>")],
    Discriminator(_param_kind),
]
SPACE_TAGS = {"<int range>": IntRange, "<float range>": FloatRange, "<choices>": Choice}


# --- the values a key can take -----------------------------------------------------------------


@dataclass(frozen=True)
class Value:
    """One value a study file gives a key: its fixed value (`params`), a range's end, a choice."""

    value: Scalar
    kind: str = "fixed"  # "fixed", "low end", "high end", "choice", "value" (inside a range)

    def __str__(self) -> str:  # "the range's high end 1.5", "choice 50", "0"
        if self.kind == "fixed":
            return repr(self.value)
        return f"choice {self.value!r}" if self.kind == "choice" else f"the range's {self.short}"

    @property
    def short(self) -> str:  # "low end 3", "choice 'sgd'", "= 5"
        return f"= {self.value!r}" if self.kind == "fixed" else f"{self.kind} {self.value!r}"


def ends(p: Param) -> list[Value]:
    """The values a space produces at its extremes: every choice, or both ends of a range (a float
    range's as floats, as Optuna draws them)."""
    if isinstance(p, Choice):
        return [Value(c, "choice") for c in p.choices]
    if isinstance(p, IntRange):
        high = p.low + (p.high - p.low) // p.step * p.step  # Optuna's last grid point
        return [Value(p.low, "low end"), Value(high, "high end")]
    return [Value(float(p.low), "low end"), Value(float(p.high), "high end")]


def inside(p: Param) -> Iterator[Value]:
    """Values a range produces between its ends: every grid point of an int range, the midpoint
    of a float range (for a key whose valid values are not an interval)."""
    if isinstance(p, IntRange):
        # a log range draws every integer in [low, high]; a stepped one its grid
        yield from (Value(v, "value") for v in range(p.low + p.step, p.high, p.step))
    elif isinstance(p, FloatRange) and p.low < p.high:
        yield Value((p.low + p.high) / 2, "value")


def corners(values: dict[str, list[Value]], limit: int = CORNERS) -> Iterator[dict[str, Value]]:
    """Combinations of the keys' values: all of them when there are at most `limit`; otherwise each
    key's values in turn, every other key at its first value."""
    keys = list(values)
    if math.prod(len(v) for v in values.values()) <= limit:
        for combo in itertools.product(*(values[k] for k in keys)):
            yield dict(zip(keys, combo, strict=True))
        return
    first = {k: v[0] for k, v in values.items()}
    for k in keys:
        for v in values[k]:
            yield first | {k: v}


# --- a config section at every value and corner ------------------------------------------------


def section_error(
    base: BaseModel, section: str, given: dict[str, list[Value]], where: str
) -> str | None:
    """What breaks `base`'s rules when a model's `params` and `space` (`given`, keyed by their
    paths under `where`: "space.epochs") set its keys: each value alone (its field's rule), then
    the corners (rules across fields, named by the fewest keys that break them); None if nothing.
    """
    defaults = base.model_dump()
    for path, values in given.items():
        key = path.split(".", 1)[1]
        for v in values:
            errs = [e for e in _errors(base, defaults | {key: v.value}) if e["loc"][:1] == (key,)]
            if errs:
                return f"{where}.{path}: {v} is not a valid `{section}.{key}`: {_msg(errs)}"
    for combo in corners(given):
        if _errors(base, defaults | _keys(combo)):
            culprits = dict(combo)
            for path in list(culprits):  # drop each key whose model value the rule does not need
                rest = {p: v for p, v in culprits.items() if p != path}
                if _errors(base, defaults | _keys(rest)):
                    culprits = rest
            parts = [f"{p} {v.short}" for p, v in culprits.items()]
            which = f"{parts[0]} with {' and '.join(parts[1:])}" if parts[1:] else parts[0]
            msg = _msg(_errors(base, defaults | _keys(culprits)))
            return f"{where}: {which} breaks a [{section}] rule: {msg}"
    return None


def _keys(combo: dict[str, Value]) -> dict[str, Scalar]:
    return {path.split(".", 1)[1]: v.value for path, v in combo.items()}


def _errors(base: BaseModel, data: dict[str, Any]) -> list[Any]:
    try:
        type(base).model_validate(data)
    except ValidationError as e:
        return list(e.errors())
    return []


def _msg(errors: list[Any]) -> str:
    return "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in errors)
