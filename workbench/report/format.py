"""How the report writes numbers, sizes and words: one place, used by the template and the tests."""

from __future__ import annotations

import json
import math
import re
from typing import Any

DASH = "–"  # shown for a missing number


def num(x: Any, digits: int = 4) -> str:
    """A metric value: fixed `digits` decimals; an int (a count) as is; None shows as a dash."""
    if x is None:
        return DASH
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    return f"{float(x):.{digits}f}"


def signed(x: Any, digits: int = 4) -> str:
    """A difference, always with its sign ('+0.0000' for anything that rounds to zero)."""
    return DASH if x is None else f"{round(float(x), digits) + 0.0:+.{digits}f}"


def pvalue(p: Any) -> str:
    if p is None:
        return DASH
    return "< 0.0001" if float(p) < 1e-4 else f"{float(p):.4f}"


def count(n: Any) -> str:
    """A large count with thousands separators: '1,234,567'."""
    return DASH if n is None else f"{int(n):,}"


def megabytes(b: Any) -> str:
    """Bytes as decimal megabytes, 2 decimals: '4.73'."""
    return DASH if b is None else f"{float(b) / 1e6:.2f}"


def ms(x: Any) -> str:
    """Milliseconds per image: 3 decimals below 10 ms, 1 above ('0.412', '37.5')."""
    if x is None:
        return DASH
    return f"{float(x):.3f}" if float(x) < 10 else f"{float(x):.1f}"


def sentence(text: Any) -> str:
    """A stored sentence ended with a full stop (the record keeps it bare)."""
    t = str(text).strip()
    return t if not t or t.endswith((".", "!", "?")) else t + "."


def seconds(s: Any) -> str:
    """Wall time: '8.2 s', '5 min 03 s', '2 h 07 min'."""
    if s is None or not math.isfinite(float(s)):
        return DASH
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def param(v: Any) -> str:
    """A hyperparameter value: floats to 4 significant digits, booleans as in TOML."""
    if v is None:
        return DASH
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def sort_key(v: Any) -> str:
    """The data-sort attribute of a cell: the raw number, or '' for missing (sorts last)."""
    if v is None or isinstance(v, bool):
        return "" if v is None else str(int(v))
    return repr(float(v)) if isinstance(v, int | float) else str(v)


def to_toml(d: dict[str, Any], path: tuple[str, ...] = ()) -> str:
    """The resolved study file, TOML-ish: scalars and inline tables first, then sub-tables."""

    def key(k: Any) -> str:
        return str(k) if re.fullmatch(r"[A-Za-z0-9_-]+", str(k)) else json.dumps(str(k))

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)  # TOML spells inf and nan as Python does
        if isinstance(v, dict):  # TOML has no null: an unset key is left out of an inline table
            inner = ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items() if x is not None)
            return "{ " + inner + " }" if inner else "{}"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v), ensure_ascii=False)

    lines, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict) and (any(isinstance(x, dict) for x in v.values()) or len(v) > 3):
            tables.append((k, v))  # nested, or too long for one line: a [section]
        elif v is None:
            lines.append(f"# {key(k)} is unset")
        else:
            lines.append(f"{key(k)} = {value(v)}")
    out = "\n".join(lines)
    for k, v in tables:
        sub = (*path, key(k))
        body = to_toml(v, sub)
        head = "" if body.startswith("[") else f"[{'.'.join(sub)}]\n"  # only sub-tables: implied
        out += ("\n\n" if out else "") + head + body
    return out
