"""The report's charts: matplotlib figures rendered (Agg canvas, no pyplot state) to inline SVG.

Text stays text (`<text>` elements, svg.fonttype "none"), so the browser draws it with the fonts
it has: class names in any script it can show appear as such, not as boxes for glyphs matplotlib's
DejaVu Sans lacks. Matplotlib escapes the text (`<` as `&lt;`, `&` as `&amp;`), places it by
DejaVu Sans's metrics (a missing glyph measures as its 1.1 em box, wider than a CJK character) and
anchors it where it can (`text-anchor`), so another font shifts no label off its tick.
Each chart labels its lines directly (no legend to hunt) and has a title and axis labels.
`svg()` drops everything but the drawing, prefixes ids so figures never clash in one page, and
refuses SVG that could run code. Every function returns None when it has nothing to draw.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import math
import re
import textwrap
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib
import numpy as np
from markupsafe import Markup, escape
from matplotlib import image as mpimg
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, FuncFormatter, MaxNLocator

from workbench.report.inputs import ModelSection
from workbench.results import Reliability, Rung

STYLE = {
    "svg.fonttype": "none",  # text as <text>: the reader's fonts draw any script
    "svg.hashsalt": "workbench",  # deterministic ids: the same inputs give the same file
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e5e5e5",
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
}
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
BEST = "#d62728"  # best-so-far line, final model
MUTED = "#7f7f7f"  # pruned trials, the k-fold bag
METRIC_KEYS = ("train_loss", "val_loss", "val_accuracy", "lr")  # per-epoch keys of a curve
ANNOTATE_MAX = 25  # heatmaps with more rows than this get no per-cell numbers
UNSAFE = re.compile(r"<script|<foreignObject|\son[a-z]+\s*=|javascript:", re.IGNORECASE)
TEXT = re.compile(r"(<text\b[^>]*>)[^<]*(</text>)")  # a <text> element holding characters only
# matplotlib measures text with DejaVu Sans, and warns once per glyph it lacks (every CJK one)
MISSING_GLYPH = r"Glyph \d+ \(.*\) missing from font\(s\)"


def label(text: object, width: int = 24) -> str:
    """User text for a chart: shortened to `width` characters, `$` kept literal (no mathtext)."""
    s = str(text)
    s = s if len(s) <= width else s[: width - 1] + "…"
    return s.replace("$", r"\$")


def note(ax: Any, text: str, xy: tuple[float, float], dx: float, dy: float, **kw: Any) -> None:
    """Text at data point `xy`, shifted by (dx, dy) points: a direct label."""
    ax.annotate(text, xy, xytext=(dx, dy), textcoords="offset points", **kw)


def styled(draw: Callable[..., Markup | None]) -> Callable[..., Markup | None]:
    """Run a chart function under the house style (rcParams are read as artists are made)."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kw: Any) -> Markup | None:
        with warnings.catch_warnings():
            # The SVG holds text, not glyphs: the browser draws it with its own fonts, so a glyph
            # that DejaVu Sans (which only measures the text here) lacks is no fault of the chart.
            warnings.filterwarnings("ignore", MISSING_GLYPH, UserWarning)
            with matplotlib.rc_context(STYLE):  # type: ignore[arg-type]  # keys typed as Literal
                return draw(*args, **kw)

    return wrapper


def figure(width: float, height: float, **kw: Any) -> Figure:
    """A figure on an Agg canvas, width and height in inches."""
    fig = Figure(figsize=(width, height), layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def svg(fig: Figure, title: str) -> Markup:
    """The figure as an inline <svg> element, scaled to its container, named `title` for readers."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]  # no XML prolog or DOCTYPE inside HTML
    for pattern in (r"<metadata>.*?</metadata>", r"<!--.*?-->", r"<style[^>]*>.*?</style>"):
        text = re.sub(pattern, "", text, flags=re.DOTALL)
    prefix = "f" + hashlib.sha1(text.encode()).hexdigest()[:8] + "-"
    ids = set(re.findall(r'\bid="([^"]+)"', text))
    text = re.sub(
        r'(\bid="|#)([^"\s)]+)',
        lambda m: m[1] + prefix + m[2] if m[2] in ids else m[0],
        text,
    )
    head = re.match(r'<svg[^>]*?\swidth="([\d.]+)pt"\s+height="([\d.]+)pt"', text)
    if head is None:
        raise ValueError(f"matplotlib wrote an SVG header this module cannot read: {text[:200]!r}")
    root = (
        f'<svg width="100%" style="max-width:{float(head[1]):.0f}pt" role="img" '
        f'aria-label="{escape(title)}"'
    )
    text = root + text[head.end() :]
    # text content is escaped character data (a name such as "x onload=1" is words, not markup);
    # every tag and attribute is checked
    if UNSAFE.search(TEXT.sub(r"\1\2", text)):
        raise ValueError(f"refusing to inline an SVG that could run code (figure {title!r})")
    return Markup(text)


def image_uri(image: Any) -> str:
    """A (H, W) or (H, W, C) float image in [0, 1] as a data: URI of a PNG, at its own size."""
    a = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float64)), 0.0, 1.0)
    if a.ndim == 3 and a.shape[-1] not in (3, 4):
        a = a[..., 0]  # one channel (or an odd count): show the first as grey
    buf = io.BytesIO()
    mpimg.imsave(buf, a, format="png", cmap="gray", vmin=0.0, vmax=1.0)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@styled
def history(section: ModelSection) -> Markup | None:
    """CV value per trial (pruned trials as x at their last report) and the best-so-far line."""

    def points(state: str) -> list[tuple[int, float]]:
        return [
            (t.number, t.value)
            for t in section.trials
            if t.state == state and t.value is not None and math.isfinite(t.value)
        ]

    done, pruned = points("COMPLETE"), points("PRUNED")
    if not done and not pruned:
        return None
    fig = figure(6.4, 3.0)
    ax = fig.add_subplot()
    if done:
        ax.scatter([n for n, _ in done], [v for _, v in done], s=22, color=COLORS[0], zorder=3)
    if pruned:
        ax.scatter([n for n, _ in pruned], [v for _, v in pruned], marker="x", s=26, color=MUTED)
        note(ax, "pruned", pruned[0], 5, -11, color=MUTED)
    maximize = section.direction == "maximize"
    if done:
        xs, ys = [n for n, _ in done], list[float]()
        for _, v in done:
            ys.append(v if not ys else (max if maximize else min)(ys[-1], v))
        last = section.trials[-1].number
        ax.step([*xs, last], [*ys, ys[-1]], where="post", color=BEST, linewidth=1.6)
        dy = 6 if maximize else -12  # on the side away from the points
        note(ax, f"best so far {ys[-1]:.4f}", (last, ys[-1]), -4, dy, ha="right", color=BEST)
    ax.margins(y=0.12)
    better = "higher" if maximize else "lower"
    ax.set(xlabel="trial number", ylabel=f"CV {label(section.metric)} ({better} is better)")
    ax.set_title(f"Optimization history: {label(section.model)}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return svg(fig, f"optimization history of {section.model}")


@styled
def importances(section: ModelSection) -> Markup | None:
    """Horizontal bars of fANOVA importance, most important on top, values at the bar ends."""
    if not section.importances:
        return None
    items = sorted(section.importances.items(), key=lambda kv: kv[1])
    fig = figure(6.4, 0.9 + 0.32 * len(items))
    ax = fig.add_subplot()
    names, values = [label(k, 32) for k, _ in items], [v for _, v in items]
    ax.barh(range(len(items)), values, color=COLORS[0], height=0.6)
    ax.set_yticks(range(len(items)), names)
    for i, v in enumerate(values):
        note(ax, f"{v:.3f}", (v, i), 3, 0, va="center")
    ax.set_xlim(0, max(max(values), 1e-9) * 1.18)
    ax.grid(axis="y", visible=False)
    ax.set(xlabel="importance (fANOVA; sums to 1)")
    ax.set_title(f"Hyperparameter importance: {label(section.model)}")
    return svg(fig, f"hyperparameter importance of {section.model}")


def end_labels(ax: Any, ends: Sequence[tuple[float, float, str, str]]) -> None:
    """Label line ends (x, y, text, colour) beside the last point, nudged apart to never overlap."""
    ends = sorted((e for e in ends if math.isfinite(e[1])), key=lambda e: e[1])
    if not ends:
        return
    lo, hi = ax.get_ylim()
    gap, ys = 0.075 * (hi - lo), list[float]()
    for e in ends:
        ys.append(max(e[1], ys[-1] + gap) if ys else e[1])
    shift = sum(e[1] for e in ends) / len(ends) - sum(ys) / len(ys)  # keep the stack centred
    shift = min(max(shift, lo - ys[0]), hi - ys[-1])  # and inside the axes
    for (x, _, text, color), y in zip(ends, ys, strict=True):
        note(ax, text, (x, y + shift), 5, 0, va="center", color=color, annotation_clip=False)


@styled
def curves(model: str, number: int, folds: list[list[dict[str, float]]]) -> Markup | None:
    """Per fold and epoch: val accuracy, train (dashed) and val (solid) loss, learning rate."""
    if not any(folds):
        return None
    has_lr = any("lr" in e for epochs in folds for e in epochs)
    fig = figure(10.4 if has_lr else 7.6, 2.8)
    axes = fig.subplots(1, 3 if has_lr else 2, width_ratios=[1, 1, 0.75] if has_lr else None)
    acc, loss = axes[0], axes[1]
    acc_ends, loss_ends = [], []
    for k, epochs in enumerate(folds):
        if not epochs:
            continue
        color, x, name = COLORS[k % len(COLORS)], list(range(1, len(epochs) + 1)), f"fold {k + 1}"
        series = {key: [e.get(key, math.nan) for e in epochs] for key in METRIC_KEYS}
        acc.plot(x, series["val_accuracy"], color=color, marker="o", markersize=3)
        loss.plot(x, series["train_loss"], color=color, linestyle="--", linewidth=1)
        loss.plot(x, series["val_loss"], color=color)
        acc_ends.append((x[-1], series["val_accuracy"][-1], name, color))
        loss_ends.append((x[-1], series["val_loss"][-1], name, color))
        if has_lr:
            axes[2].plot(x, series["lr"], color=color)
    for ax in axes:
        ax.margins(x=0.14)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    end_labels(acc, acc_ends)
    end_labels(loss, loss_ends)
    acc.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy")
    loss.set(xlabel="epoch", ylabel="loss", title="Loss: train dashed, val solid")
    if has_lr:
        axes[2].set(xlabel="epoch", ylabel="learning rate", title="Learning rate")
        axes[2].set_ylim(0, axes[2].get_ylim()[1] * 1.05)  # from 0: warm-up and decay show as such
        axes[2].yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    fig.suptitle(f"{label(model)} trial {number}: learning curves per CV fold", fontsize=10)
    return svg(fig, f"learning curves of {model} trial {number}")


@styled
def heatmap(
    matrix: Sequence[Sequence[float]],
    rows: Sequence[str],
    cols: Sequence[str],
    title: str,
    xlabel: str,
    ylabel: str,
    fmt: str = "{:.2f}",
    shade: Any = None,
    cmap: str = "Blues",
) -> Markup | None:
    """An annotated heatmap: cells coloured by `shade` (default the values), numbered with `fmt`."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.size == 0:
        return None
    color = m if shade is None else np.asarray(shade, dtype=np.float64)
    if len(rows) != m.shape[0] or len(cols) != m.shape[1]:  # names that do not fit: show indices
        rows, cols = [str(i) for i in range(m.shape[0])], [str(j) for j in range(m.shape[1])]
    tick_size = max(4.0, min(9.0, 360.0 / max(m.shape)))  # 100 classes still get legible ticks
    side = min(max(3.2, 0.42 * max(m.shape) + 1.8), 9.5)
    fig = figure(side + 1.2, side)
    ax = fig.add_subplot()
    ax.imshow(color, cmap=cmap, vmin=0.0, vmax=max(float(np.nanmax(color)), 1e-9), aspect="auto")
    ax.set_xticks(  # anchored: the label's end sits on its tick whatever font draws it
        range(m.shape[1]),
        [label(c, 16) for c in cols],
        rotation=45,
        ha="right",
        rotation_mode="anchor",
        fontsize=tick_size,
    )
    ax.set_yticks(range(m.shape[0]), [label(r, 16) for r in rows], fontsize=tick_size)
    ax.grid(False)
    if max(m.shape) <= ANNOTATE_MAX:
        top = float(np.nanmax(color)) or 1.0
        for (i, j), v in np.ndenumerate(m):
            dark = color[i, j] > 0.55 * top
            ink = "white" if dark else "#222222"
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8, color=ink)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    fig.suptitle(
        "\n".join(textwrap.wrap(label(title, 120), int(11 * side))), fontsize=10, fontweight="bold"
    )
    return svg(fig, title)


@styled
def reliability(
    final: Reliability | None,
    bag: Reliability | None,
    names: tuple[str, str] = ("final model", "k-fold bag"),
) -> Markup | None:
    """Accuracy against mean confidence per bin for two models, the diagonal, and the bin counts."""
    shown = [(r, n, c) for r, n, c in zip((final, bag), names, (BEST, MUTED), strict=True) if r]
    if not shown:
        return None
    fig = figure(6.4, 4.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="#bbbbbb", linestyle=":", linewidth=1)
    note(top, "perfect calibration", (0.2, 0.2), 0, 6, rotation=37, color="#999999", ha="center")
    edges = np.asarray(shown[0][0].edges, dtype=np.float64)
    width = (edges[1] - edges[0]) / (len(shown) + 1)
    for k, (rel, name, color) in enumerate(shown):
        pts = [
            (c, a)
            for c, a in zip(rel.confidence, rel.accuracy, strict=True)
            if c is not None and a is not None
        ]
        if pts:
            xs, ys = zip(*pts, strict=True)
            top.plot(xs, ys, color=color, marker="o", markersize=4)
        # names in the top-left corner, in their line's colour: over-confident models never go there
        top.text(0.03, 0.93 - 0.09 * k, name, transform=top.transAxes, color=color, weight="bold")
        bottom.bar(
            edges[:-1] + width * (k + 0.5), rel.count, width=width, color=color, align="edge"
        )
    top.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy in bin")
    top.set_title("Reliability on the test split")
    bottom.set(xlabel="confidence (top-class probability)", ylabel="rows")
    bottom.grid(axis="x", visible=False)
    return svg(fig, "reliability diagram")


@styled
def tradeoff(rungs: Sequence[Rung]) -> Markup | None:
    """Test accuracy against inference ms per image, one labelled point per ladder rung with a
    measured cost (log x: one network and a 100-network vote on one chart); what ships in red."""
    shown = [r for r in rungs if r.cost is not None and r.cost.ms_per_image > 0]
    if len(shown) < 2:
        return None
    fig = figure(6.4, 4.2)
    ax = fig.subplots()
    at: dict[tuple[float, float], list[Rung]] = {}  # rungs on one point share one label
    for r in shown:
        assert r.cost is not None
        at.setdefault((round(r.cost.ms_per_image, 6), round(100 * r.test.accuracy, 4)), []).append(
            r
        )
    for xy, group in at.items():
        kinds = {r.kind for r in group}
        color = BEST if "final" in kinds else COLORS[0] if "student" in kinds else MUTED
        ax.plot(*xy, marker="D" if "student" in kinds else "o", color=color, markersize=6)
        text = " = ".join(label(r.name.replace("_", " "), 20) for r in group)
        note(ax, text, xy, 6, 3, color=color, fontsize=8)
    ax.margins(x=0.15, y=0.12)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set(xlabel="inference ms per image (batch 256, 1 CPU thread; log scale)")
    ax.set(ylabel="test accuracy (%)")
    ax.set_title("What each rung buys, against what it costs")
    return svg(fig, "accuracy against inference cost per rung")
