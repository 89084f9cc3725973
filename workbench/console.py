"""What the terminal shows: the live search table and the final best-trial table (rich)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from workbench.errors import WorkbenchError
from workbench.search import ModelProgress

console = Console()


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


def ensemble_table(results: dict[str, Any]) -> Table:
    """Every method and the best single member on the test split, the chosen one marked."""
    table = Table(
        title=f"test split ({results['n_test']} images), evaluated once "
        f"(test evaluations so far: {results['test_evaluations']})"
    )
    for col in ("", "accuracy", "log loss", "ECE", "Δ acc vs best single (95% CI)"):
        table.add_column(col, justify="left" if not col else "right")
    best = next(m for m in results["members"] if m["name"] == results["best_single"])
    rows = [(f"best single: {best['name']}", best["test"], None)]
    rows += [(name, m["test"], m["vs_best_single"]) for name, m in results["methods"].items()]
    final = results["final"]
    t = final["temperature"]
    rows.append(
        (
            f"final: {final['method']}" + (f" + T={t:.2f}" if t else ""),
            final["test"],
            final["vs_best_single"],
        )
    )
    for name, test, vs in rows:
        ci = vs["accuracy"] if vs else None
        delta = f"{ci['diff']:+.2%} ({ci['ci_low']:+.2%}, {ci['ci_high']:+.2%})" if ci else ""
        mark = " *" if name == results["chosen"] else ""
        table.add_row(
            name + mark,
            f"{test['accuracy']:.2%}",
            f"{test['log_loss']:.4f}",
            f"{test['ece']:.4f}",
            delta,
        )
    return table


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
