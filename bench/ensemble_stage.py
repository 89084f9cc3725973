"""Item 13: the ensemble stage on every core: its wall time with 1 and with 2 worker processes,
and what it costs per member and per test row (issue 27, part 4).

The study has the issue's shape: studies/mnist.toml's three families and training recipe on the
first ROWS MNIST t10k images (IDX files), 80 % of them held out (`data.test_size = 0.8`: 2,000
training rows and 8,000 test rows), 4 folds and `top_k = 6`: 18 members of 4 fold models, with
the file's refit of each family's best configuration (3 more networks to predict). Every trial
completes (6 per family, pruner none) after 2 epochs: what the stage costs depends on how many
networks predict how many rows, not on how well they learned (what ships does: its graph is
exported and checked; the setup names it).

It is searched once (`workbench study`: the search, the refits, a first ensemble stage on 2
workers, not measured), then `workbench ensemble` runs twice, with `[ensemble] workers = 1` and
then `= 2`, the stored result removed before each so that the stage runs whole: member
inference, the combiners, the one look at the test split, each member's timed cost, the final
folder, its ONNX graph checked on `check_rows` test rows, the MLflow model. The wall time is the
stage's own (timings.json); the member inference part is the stage's line "test probabilities:
... s".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    MNIST_STUDY,
    MNIST_T10K,
    BenchError,
    Figure,
    ItemResult,
    at_least,
    run_study,
    study_from,
    write_study,
)
from bench.images import mnist
from bench.ladder import write_idx
from workbench.store import RunStore

TARGET = 1.7  # x: the stage on 2 workers against 1, on 2 cores (issue 27)
ROWS = {False: 10_000, True: 1_000}  # MNIST images (default, --quick)
STUDY: dict[bool, dict[str, Any]] = {  # the changes to studies/mnist.toml (default, --quick)
    False: {"cv.folds": 4, "ensemble.top_k": 6, "train.epochs": 2, "search.trials": 6},
    True: {"cv.folds": 2, "ensemble.top_k": 2, "train.epochs": 1, "search.trials": 2},
}
FAMILIES = ("mlp", "cnn", "resnet")  # studies/mnist.toml's models
INFERENCE = re.compile(
    r"test probabilities: (\d+) network passes over ([\d,]+) rows on \d+ process(?:es)?: "
    r"([\d.]+) s"
)


@dataclass(frozen=True)
class StageRun:
    """One `workbench ensemble` run of the study."""

    workers: int
    wall_s: float  # the stage (timings.json), seconds
    inference_s: float  # of which the members' test probabilities
    passes: int  # network passes over the test rows
    members: int
    test_rows: int
    shipped: str  # what ships: the final model's method


def study_file(folder: Path, quick: bool, workers: int) -> Path:
    changes: dict[str, Any] = {
        "data.test_size": 0.8,
        "search.pruner": "none",
        "ensemble.workers": workers,
        **{f"models.{m}.trials": STUDY[quick]["search.trials"] for m in FAMILIES},
        **STUDY[quick],
    }
    return write_study(study_from(MNIST_STUDY, folder, **changes), folder / "mnist.toml")


def stage_run(folder: Path, data: Path, quick: bool, workers: int) -> StageRun:
    """`workbench ensemble` with `workers`, the stored result removed first: the stage whole."""
    file = study_file(folder, quick, workers)
    store = RunStore(folder / "mnist")
    store.results.unlink(missing_ok=True)
    run = run_study(file, "--data", str(data), command="ensemble")
    said = " ".join(run.log.read_text().split())
    found, result = INFERENCE.search(said), store.ensemble_result()
    if found is None or result is None or "ensemble" not in run.stages:
        raise BenchError(f"workbench ensemble ({workers} workers) left no timing: see {run.log}")
    return StageRun(
        workers,
        run.stages["ensemble"],
        float(found[3]),
        int(found[1]),
        len(result.members),
        result.n_test,
        result.final.method,
    )


def figures(runs: list[StageRun]) -> list[Figure]:
    """Each run's wall time, per member and per test row; the 2-worker run against the 1."""
    figs = []
    for r in runs:
        s = "s" if r.workers > 1 else ""
        note = (
            f"test probabilities {r.inference_s:.1f} s ({r.passes} network passes over "
            f"{r.test_rows:,} rows)"
        )
        figs += [
            Figure(f"ensemble stage, {r.workers} worker{s}", r.wall_s, "s", note=note),
            Figure(
                f"{r.workers} worker{s}: per member",
                r.wall_s / r.members,
                "s",
                note=f"the stage's wall time / {r.members} members",
            ),
            Figure(
                f"{r.workers} worker{s}: per test row",
                r.wall_s / r.test_rows * 1e3,
                "ms",
                note=f"the stage's wall time / {r.test_rows:,} test rows",
            ),
        ]
    one, two = (next(r for r in runs if r.workers == w) for w in (1, 2))
    inference = one.inference_s / two.inference_s
    figs.append(
        at_least(
            "ensemble stage: 2 workers vs 1",
            one.wall_s / two.wall_s,
            TARGET,
            note=f"member inference alone {inference:.2f}x",
        )
    )
    return figs


def run(tmp: Path, quick: bool, machine_tag: str) -> ItemResult:
    if not MNIST_T10K.exists():
        raise BenchError(f"item 13 needs the MNIST t10k images at {MNIST_T10K}")
    folder = tmp / "ensemble-stage"
    images, labels = mnist(ROWS[quick])
    data = write_idx(folder / "data", images, labels)
    search = run_study(study_file(folder, quick, 2), "--data", str(data), "--workers", "2")
    runs = [stage_run(folder, data, quick, w) for w in (1, 2)]
    size = STUDY[quick]
    return ItemResult(
        13,
        "The ensemble stage on 1 and on 2 workers",
        machine_tag,
        [
            f"studies/mnist.toml on the first {ROWS[quick]:,} t10k images, data.test_size = 0.8 "
            f"({runs[0].test_rows:,} test rows), {size['cv.folds']} folds, "
            f"{size['search.trials']} trials per family (pruner none), "
            f"{size['train.epochs']} epochs, top_k = {size['ensemble.top_k']}: "
            f"{runs[0].members} members, and the file's refits; searched in "
            f"{search.stages.get('search', float('nan')):.0f} s by 2 workers",
            "then `workbench ensemble` with [ensemble] workers = 1, then 2, the stored result "
            "removed before each: the stage whole, its ONNX graph checked on 512 test rows "
            f"(check_rows' default); shipped: {runs[0].shipped}",
        ],
        figures(runs),
        details={"runs": [vars(r) for r in runs], "search_s": search.stages.get("search")},
    )
