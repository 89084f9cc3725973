"""What the terminal shows: the live search table and the final best-trial table (rich)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from workbench.errors import WorkbenchError
from workbench.results import EnsembleResult, Interval, student_sentence
from workbench.search import ModelProgress

console = Console()


def print_wide(renderable: Any, width: int = 112) -> None:
    """Print a wide table whole: a log file (no terminal) gets `width` columns, not rich's 80;
    a terminal keeps its own width."""
    if console.is_terminal:
        console.print(renderable)
        return
    before = console.width
    console.width = max(before, width)
    try:
        console.print(renderable)
    finally:
        console.width = before


def print_error(e: WorkbenchError) -> None:
    """One line for a bad input or a failed check (escaped: "[h, w]" in a message is no tag;
    soft-wrapped: the terminal folds a long line, rich does not break it into several)."""
    console.print("[bold red]error:[/]", escape(str(e)), highlight=False, soft_wrap=True)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _score(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.2%}" if metric == "accuracy" else f"{value:.4f}"


def progress_table(
    rows: Sequence[ModelProgress], metric: str, workers: int, started: float
) -> Table:
    """One row per model study: trials finished of target, pruned, best so far, time left."""
    table = Table(title=f"search - {workers} worker(s), elapsed {_duration(time.time() - started)}")
    for col in ("model", "trials", "pruned", "failed", "running", f"best CV {metric}", "remaining"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        done = r.complete + r.pruned
        left = max(r.target - done, 0)
        eta = left * r.mean_seconds / max(workers, 1) if r.mean_seconds is not None else None
        table.add_row(
            r.model,
            f"{done}/{r.target}",
            str(r.pruned),
            str(r.failed),
            str(r.running),
            _score(r.best_value, metric),
            "done" if not left else _duration(eta),
        )
    return table


def best_table(rows: Sequence[ModelProgress], metric: str) -> Table:
    table = Table(title="best trial per model")
    for col in ("model", "trial", f"CV {metric}", "complete", "pruned", "parameters"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.model,
            str(r.best_number) if r.best_number is not None else "-",
            _score(r.best_value, metric),
            str(r.complete),
            str(r.pruned),
            _params(r.best_params),
        )
    return table


def _params(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def _points(interval: Interval | None) -> str:
    """A gain in accuracy points with its 95 % CI: '+0.22 (+0.00,+0.44)'."""
    if interval is None:
        return ""
    i = interval
    return f"{i.diff * 100:+.2f} ({i.ci_low * 100:+.2f},{i.ci_high * 100:+.2f})"


def ladder_table(results: EnsembleResult) -> Table:
    """The ladder on the test split: one network, refits, the k-fold bag, each combiner, what
    ships (*); each with its gain in accuracy points (95 % CI) over the rung below and over one
    network, and its cost. Fits a 100-column terminal; the rungs' details follow it."""
    table = Table(
        title=f"the ladder: test split ({results.n_test} images), evaluated once "
        f"(test evaluations so far: {results.test_evaluations})",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in ("rung", "acc.", "log loss", "ECE", "Δ pts vs below", "Δ pts vs one net"):
        table.add_column(col, justify="left" if col == "rung" else "right", no_wrap=True)
    table.add_column("ms/img", justify="right")
    table.add_column("MB", justify="right")
    for r in results.ladder:
        c = r.cost
        table.add_row(
            "final *" if r.kind == "final" else r.name.replace("_", " "),
            f"{r.test.accuracy:.2%}",
            f"{r.test.log_loss:.4f}",
            f"{r.test.ece:.4f}",
            _points(r.vs_below.accuracy if r.vs_below else None),
            _points(r.vs_network.accuracy if r.vs_network else None),
            f"{c.ms_per_image:.3f}" if c else "-",
            f"{c.bytes / 1e6:.1f}" if c else "-",
        )
    return table


def ladder_notes(results: EnsembleResult) -> list[str]:
    """What the rungs are, under the table: one network's range, what ships and why."""
    lines = []
    for r in results.ladder:
        if r.spread is not None:
            lo, hi = r.spread.accuracy
            lines.append(f"{r.name}: {r.label}; fold models {lo:.2%} to {hi:.2%}")
        elif r.kind in ("refit", "bag", "final", "student"):
            lines.append(f"{'final *' if r.kind == 'final' else r.name}: {r.label}")
    lines.append(f"why: {results.choice.reason}")
    if (keeps := results.student_keeps()) is not None:
        lines.append(student_sentence(keeps))
    return lines


def labels_table(truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> Table:
    """Accuracy and the confusion matrix (rows: true class, columns: predicted) of predictions."""
    from sklearn.metrics import accuracy_score, confusion_matrix

    acc = accuracy_score(truth, predicted)
    matrix = confusion_matrix(truth, predicted, labels=list(classes))
    table = Table(title=f"accuracy {acc:.2%} on {len(truth)} labelled images (rows: true class)")
    table.add_column("true \\ predicted")
    for c in classes:
        table.add_column(escape(c), justify="right")
    for c, row in zip(classes, matrix, strict=True):
        table.add_row(escape(c), *(str(int(v)) for v in row))
    return table
