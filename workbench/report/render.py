"""ReportInputs -> one self-contained HTML file: jinja2 (autoescaped), inline SVG charts, inline JS.

The page loads nothing: a Content-Security-Policy allows only data: images, inline styles and the
one sorting script (by its sha256), so even a value that slipped past escaping could not run code.
Numbers are formatted here, once (`num`, `signed`, ...), and the tests use the same functions.
The charts' module (matplotlib) is imported by the views that draw: a `workbench study` parent
imports this module before it forks its workers, and matplotlib there was 24 MB of proportional
set size in the search's process tree, for a report drawn after the search.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from markupsafe import Markup

from workbench.files import atomic_write
from workbench.report.inputs import ModelSection, ReportInputs

DASH = "–"  # shown for a missing number
METRICS = [  # (key, label, higher is better) of the ensemble tables
    ("accuracy", "accuracy", True),
    ("log_loss", "log loss", False),
    ("ece", "ECE", False),
    ("brier", "Brier", False),
    ("macro_f1", "macro-F1", True),
]


# -- formatting: one place, used by the template and the tests --------------------------------


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
        if isinstance(v, dict):
            inner = ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items())
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


# -- view: what the template iterates over ------------------------------------------------------


def _link_base(tracking: dict[str, Any] | None) -> str | None:
    """The MLflow UI address, only when it is an http(s) URL (never a javascript: link)."""
    url = (tracking or {}).get("ui_url")
    if isinstance(url, str) and re.match(r"https?://[^\s\"'<>]+$", url):
        return url.rstrip("/")
    return None


def run_url(tracking: dict[str, Any] | None, run_id: str | None) -> str | None:
    base = _link_base(tracking)
    if base is None or not run_id or tracking is None:
        return None
    exp = quote(str(tracking.get("experiment_id", "")), safe="")
    return f"{base}/#/experiments/{exp}/runs/{quote(str(run_id), safe='')}"


def model_url(tracking: dict[str, Any] | None, name: str | None) -> str | None:
    """The MLflow UI page of a registered model (its versions and aliases)."""
    base = _link_base(tracking)
    return f"{base}/#/models/{quote(name, safe='')}" if base and name else None


def _model_view(section: ModelSection) -> dict[str, Any]:
    from workbench.report import plots

    trials = section.trials
    done = [t for t in trials if t.state == "COMPLETE" and t.value is not None]
    pick = max if section.direction == "maximize" else min
    best = pick(done, key=lambda t: t.value) if done else None  # type: ignore[arg-type, return-value]
    names: list[str] = []
    for t in trials:
        names += [k for k in t.params if k not in names]
    counts = {
        s: sum(t.state == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
    }
    curve_figs = []
    for number in sorted(section.curves):
        fig = plots.curves(section.model, number, section.curves[number])
        if fig is not None:
            curve_figs.append((number, fig))
    return {
        "s": section,
        "best": best,
        "param_names": names,
        "counts": counts,
        "history": plots.history(section),
        "importances": plots.importances(section),
        "curves": curve_figs,
        "seconds": sum(t.seconds or 0.0 for t in trials),
    }


def _verdict(ci: dict[str, Any] | None, higher_is_better: bool) -> str:
    """Plain words for a bootstrap CI of (ensemble - best single)."""
    if not ci or ci.get("ci_low") is None or ci.get("ci_high") is None:
        return ""
    lo, hi = float(ci["ci_low"]), float(ci["ci_high"])
    if lo <= 0.0 <= hi:
        return "no clear difference (CI includes 0)"
    return "better (CI excludes 0)" if (lo > 0) == higher_is_better else "worse (CI excludes 0)"


def _ensemble_view(inputs: ReportInputs) -> dict[str, Any] | None:
    from workbench.report import plots

    ens = inputs.ensemble
    if ens is None:
        return None
    classes = [str(c) for c in ens.get("classes") or inputs.classes]
    members = ens.get("members", [])
    single = next((m for m in members if m.get("name") == ens.get("best_single")), None)
    final = ens.get("final") or {}
    methods = ens.get("methods", {})
    chosen = methods.get(ens.get("chosen"), {})
    weights = {
        name: dict(zip(m.get("members", []), m.get("weights", []), strict=False))
        for name, m in methods.items()
    }
    final_test = final.get("test") or {}
    single_test = (single or {}).get("test") or {}
    confusion = final_test.get("confusion")
    support = [sum(row) for row in confusion] if confusion else []
    recall = final_test.get("per_class_recall") or []
    single_recall = single_test.get("per_class_recall") or []
    recall_rows = [
        (i, name, at(recall, i), at(single_recall, i), at(support, i))
        for i, name in enumerate(classes)
    ]
    dis = ens.get("disagreement") or {}
    images = inputs.misclassified_images
    wrong = []
    for k, m in enumerate(ens.get("misclassified") or []):
        uri = plots.image_uri(images[k]) if images is not None and k < len(images) else None
        true, pred = at(classes, m.get("true")), at(classes, m.get("pred"))
        wrong.append({**m, "uri": uri, "true_name": true, "pred_name": pred})
    shares = None
    if confusion:
        shares = [[v / max(sum(row), 1) for v in row] for row in confusion]
    vs = chosen.get("vs_best_single") or {}
    return {
        "e": ens,
        "classes": classes,
        "single": single,
        "final": final,
        "chosen": chosen,
        "weights": weights,
        "recall": recall_rows,
        "wrong": wrong,
        "images_missing": bool(wrong) and images is None,
        "split_mismatch": ens.get("split_fingerprint") != inputs.split.get("fingerprint"),
        "verdict": {
            "accuracy": _verdict(vs.get("accuracy"), True),
            "log_loss": _verdict(vs.get("log_loss"), False),
        },
        "disagreement": plots.heatmap(
            dis.get("matrix") or [],
            *[dis.get("members", [])] * 2,
            "Member disagreement, test split",
            "member",
            "member",
            cmap="Oranges",
        ),
        "reliability": plots.reliability(
            final.get("reliability"),
            final.get("best_single_reliability"),
            (
                f"final, ECE {num(final_test.get('ece'))}",
                f"best single, ECE {num(single_test.get('ece'))}",
            ),
        ),
        "confusion": plots.heatmap(
            confusion or [],
            classes,
            classes,
            "Final ensemble, test split",
            "predicted class",
            "true class",
            fmt="{:.0f}",
            shade=shares,
        ),
    }


def at(seq: Any, i: Any) -> Any:
    """seq[i], or None when i is missing or out of range."""
    if seq is None or i is None or not 0 <= int(i) < len(seq):
        return None
    return seq[int(i)]


# -- rendering ----------------------------------------------------------------------------------

_ENV: jinja2.Environment | None = None


def environment() -> jinja2.Environment:
    """Templates from the package, HTML autoescaped, an undefined name is an error."""
    global _ENV
    if _ENV is None:
        _ENV = jinja2.Environment(
            loader=jinja2.PackageLoader("workbench.report", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        funcs = {"num": num, "signed": signed, "pvalue": pvalue, "seconds": seconds}
        _ENV.filters.update({**funcs, "param": param, "sort_key": sort_key})
        links = {"run_url": run_url, "model_url": model_url}
        _ENV.globals.update({"METRICS": METRICS, "DASH": DASH, **links, "at": at})
    return _ENV


def render_report(inputs: ReportInputs) -> str:
    """The report as one HTML string."""
    script = (files("workbench.report") / "templates" / "sortable.js").read_text("utf-8")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (
        environment()
        .get_template("report.html.j2")
        .render(
            r=inputs,
            config_text=to_toml(inputs.config),
            models=[_model_view(s) for s in inputs.models],
            ens=_ensemble_view(inputs),
            total_seconds=sum(inputs.stage_seconds.values()),
            mlflow_base=_link_base(inputs.tracking),
            script=Markup(script),
            script_hash=f"sha256-{digest}",
        )
    )


def write_report(inputs: ReportInputs, path: str | Path) -> Path:
    """Render and write atomically (temp file in the same folder, then rename); returns the path."""
    html = render_report(inputs).encode("utf-8")
    return atomic_write(path, lambda f: f.write(html))
