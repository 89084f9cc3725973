"""ReportInputs -> one self-contained HTML file: jinja2 (autoescaped), inline SVG charts, inline JS.

The page loads nothing: a Content-Security-Policy allows only data: images, inline styles and the
one sorting script (by its sha256), so even a value that slipped past escaping could not run code.
Numbers are formatted once, in report/format.py (`num`, `signed`, ...), which the tests use too.
The charts' module (matplotlib) is imported by the views that draw: a `workbench study` parent
imports this module before it forks its workers, and matplotlib there was 24 MB of proportional
set size in the search's process tree, for a report drawn after the search.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from markupsafe import Markup

from workbench.files import atomic_write
from workbench.report.format import (
    DASH,
    count,
    megabytes,
    ms,
    num,
    param,
    pvalue,
    seconds,
    sentence,
    signed,
    sort_key,
    to_toml,
)
from workbench.report.inputs import ModelSection, ReportInputs
from workbench.results import EnsembleResult, Interval, Misclassified, Paired, student_sentence

METRICS = [  # (key, label, higher is better) of the ensemble tables
    ("accuracy", "accuracy", True),
    ("log_loss", "log loss", False),
    ("ece", "ECE", False),
    ("brier", "Brier", False),
    ("macro_f1", "macro-F1", True),
]


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


def interval_verdict(i: Interval | None, higher_is_better: bool) -> str:
    """Plain words for a bootstrap CI of a difference A - B of one metric."""
    if i is None:
        return ""
    if not i.excludes_zero:
        return "no clear difference (CI includes 0)"
    return (
        "better (CI excludes 0)" if (i.ci_low > 0) == higher_is_better else "worse (CI excludes 0)"
    )


def verdict(p: Paired | None) -> str:
    """Plain words for A against B on accuracy and log loss: what A wins or loses beyond the noise
    (the 95 % CI excludes 0), e.g. 'better log loss; accuracy within the noise'."""
    if p is None:
        return ""
    clear, noise = [], []
    for name, i, higher in (("accuracy", p.accuracy, True), ("log loss", p.log_loss, False)):
        if not i.excludes_zero:
            noise.append(name)
        else:
            clear.append(f"{'better' if (i.ci_low > 0) == higher else 'worse'} {name}")
    if not clear:
        return "no clear difference (CIs include 0)"
    return ", ".join(clear) + (f"; {' and '.join(noise)} within the noise" if noise else "")


@dataclass(frozen=True)
class WrongRow:
    """A misclassified test row as the grid shows it."""

    m: Misclassified
    true_name: str | None  # None: the class index is not in the result's classes
    pred_name: str | None
    uri: str | None  # the image as a data: URI, None when the images were not passed


def _vs_bag(e: EnsembleResult, method: str) -> Paired | None:
    """A combiner against the k-fold bag: its ladder rung's comparison with the rung below."""
    rung = next((r for r in e.ladder if r.name == method), None)
    vs = rung.vs_below if rung else None
    return vs if vs is not None and vs.against == "k-fold bag" else None


def _weights(e: EnsembleResult) -> dict[str, dict[str, float]]:
    """Member weights per method, and the shipped rule's as "final" (members in result order)."""
    out = {name: dict(zip(m.members, m.weights, strict=False)) for name, m in e.methods.items()}
    out["final"] = dict(zip([m.name for m in e.members], e.final.rule.weights, strict=False))
    return out


def _wrong(e: EnsembleResult, classes: list[str], images: Any | None) -> list[WrongRow]:
    from workbench.report import plots

    return [
        WrongRow(
            m,
            at(classes, m.true),
            at(classes, m.pred),
            plots.image_uri(images[k]) if images is not None and k < len(images) else None,
        )
        for k, m in enumerate(e.misclassified)
    ]


def _ensemble_view(inputs: ReportInputs) -> dict[str, Any] | None:
    from workbench.report import plots

    e = inputs.ensemble
    if e is None:
        return None
    classes = [str(c) for c in e.classes or inputs.classes]
    rungs = {r.name: r for r in e.ladder}
    best = next((m for m in e.members if m.name == e.best_single), None)
    bag = rungs["k-fold bag"].test if "k-fold bag" in rungs else (best.test if best else None)
    final = e.final
    confusion = final.test.confusion
    support = [sum(row) for row in confusion] if confusion else []
    bag_recall = bag.per_class_recall if bag else []
    recall_rows = [
        (i, name, at(final.test.per_class_recall, i), at(bag_recall, i), at(support, i))
        for i, name in enumerate(classes)
    ]
    shares = [[v / max(sum(row), 1) for v in row] for row in confusion] if confusion else None
    wrong = _wrong(e, classes, inputs.misclassified_images)
    return {
        "e": e,
        "classes": classes,
        "best": best,
        "bag": bag,
        "vs_bag": {name: _vs_bag(e, name) for name in e.methods},
        "weights": _weights(e),
        "networks": sum(w > 0 for w in final.rule.weights),  # members the final rule runs
        "looks": len(inputs.test_looks) if inputs.test_looks else e.test_evaluations,
        "recall": recall_rows,
        "wrong": wrong,
        "images_missing": bool(wrong) and inputs.misclassified_images is None,
        "split_mismatch": e.split_fingerprint != inputs.split.get("fingerprint"),
        "card_deltas": {"accuracy": final.vs_bag.accuracy, "log_loss": final.vs_bag.log_loss},
        "disagreement": plots.heatmap(
            e.disagreement.matrix,
            *[e.disagreement.members] * 2,
            "Member disagreement, test split",
            "member",
            "member",
            cmap="Oranges",
        ),
        "tradeoff": plots.tradeoff(e.ladder),
        "student_keeps": student_sentence(k) if (k := e.student_keeps()) is not None else None,
        "reliability": plots.reliability(
            final.reliability,
            final.bag_reliability,
            (
                f"final, ECE {num(final.test.ece)}",
                f"k-fold bag, ECE {num(bag.ece if bag else None)}",
            ),
        ),
        "confusion": plots.heatmap(
            confusion or [],
            classes,
            classes,
            "Final model, test split",
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
        sizes = {"count": count, "megabytes": megabytes, "ms": ms, "sentence": sentence}
        _ENV.filters.update({**funcs, **sizes, "param": param, "sort_key": sort_key})
        links = {"run_url": run_url, "model_url": model_url}
        words = {"verdict": verdict, "interval_verdict": interval_verdict}
        _ENV.globals.update({"METRICS": METRICS, "DASH": DASH, **links, **words, "at": at})
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
