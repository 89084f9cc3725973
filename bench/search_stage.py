"""Items 2 and 3: tracking overhead and parallel efficiency of the search stage, through the CLI.

One small digits study (mlp and cnn, 3 folds, pruner none, random sampler, fixed widths, only lr
and dropout searched: every trial costs the same whatever is sampled), run as
`python -m workbench study FILE --workers N` in a temp folder, each run in its own output folder
with its own Optuna and MLflow stores. The search stage's wall time comes from the CLI's
timings.json; it includes starting the worker processes (imports), as a real study does. Beside
it, from Optuna's trial timestamps: the mean trial duration and the trial span (first start to
last end), which leave the start-up out.

2: tracking on vs off, 1 worker, in pairs (on, off), (off, on), ...: median over pairs.
3: 2 workers vs 1, tracking off; the 1-worker runs are item 2's "off" runs when it ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from bench.common import (
    Figure,
    ItemResult,
    StudyRun,
    at_least,
    at_most,
    median,
    run_study,
    write_study,
)
from workbench import search
from workbench.config import load_study

TRACKING_TARGET = 5.0  # %: tracking may add at most 5 % to the search stage's wall time
PARALLEL_TARGET = 1.8  # x: 2 workers on 2 cores give >= 1.8x the trials per hour of 1 (issue 11)


@dataclass(frozen=True)
class Size:
    folds: int
    epochs: int  # per fold
    trials: int  # per model
    mlp_width: int
    cnn_width: int
    pairs: int  # item 2's (on, off) pairs

    def describe(self) -> str:
        return (
            f"digits, mlp (width {self.mlp_width}, depth 2) and cnn (width {self.cnn_width}, "
            f"depth 2), {self.trials} trials each, {self.folds} folds, {self.epochs} epochs, "
            "random sampler, pruner none, ensemble off, augment shift 1"
        )


# FULL: a 1-worker search stage of ~40 s on a quiet 2-core machine (trials of ~1.2 s mlp, ~3 s
# cnn, + ~8 s worker start-up): 5 such runs (2 pairs for item 2, one 2-worker run) take ~4 min
FULL = Size(folds=3, epochs=6, trials=6, mlp_width=512, cnn_width=32, pairs=2)
QUICK = Size(folds=2, epochs=1, trials=2, mlp_width=64, cnn_width=8, pairs=1)
QUICK_NOTE = "--quick: trials of a fraction of a second, start-up dominates: ratios mean little"


def small_study(out: Path, size: Size, tracking: bool) -> dict[str, Any]:
    space = {
        "lr": {"low": 1e-3, "high": 1e-2, "log": True},
        "dropout": {"low": 0.0, "high": 0.3},
    }
    return {
        "name": "bench-small",
        "seed": 0,
        "output_dir": str(out),
        "data": {"source": "digits", "augment": {"shift": 1}},
        "cv": {"folds": size.folds},
        "search": {"trials": size.trials, "sampler": "random", "pruner": "none"},
        "train": {"epochs": size.epochs, "batch_size": 64},
        "models": {
            "mlp": {"params": {"width": size.mlp_width, "depth": 2}, "space": space},
            "cnn": {"params": {"width": size.cnn_width, "depth": 2}, "space": space},
        },
        "ensemble": {"enabled": False},
        "tracking": {"enabled": tracking, "uri": f"sqlite:///{out / 'mlflow' / 'mlflow.db'}"},
    }


@dataclass
class SearchRun:
    label: str
    run: StudyRun
    finished: int  # complete + pruned trials, all models
    mean_trial_s: float  # mean wall time of one finished trial
    span_s: float  # first trial's start to last trial's end: the search without start-up

    @property
    def search_s(self) -> float:
        return self.run.stages["search"]

    @property
    def trials_per_hour(self) -> float:
        return self.finished / self.search_s * 3600

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "search_s": self.search_s,
            "wall_s": round(self.run.wall_s, 2),
            "stages": self.run.stages,
            "finished_trials": self.finished,
            "trials_per_hour": self.trials_per_hour,
            "mean_trial_s": self.mean_trial_s,
            "trial_span_s": self.span_s,
            "out": str(self.run.out),
        }


def _finished_trials(file: Path) -> list[optuna.trial.FrozenTrial]:
    cfg = load_study(file)
    storage = search.open_storage(cfg)
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    return [
        t
        for model in cfg.models
        for t in optuna.load_study(
            study_name=search.study_name(cfg, model), storage=storage
        ).get_trials(deepcopy=False, states=states)
    ]


class SearchRuns:
    """Runs the small study per (tracking, workers, repeat) once and keeps it for both items."""

    def __init__(self, tmp: Path, quick: bool) -> None:
        self.tmp, self.size, self.quick = tmp / "search", QUICK if quick else FULL, quick
        self.done: dict[tuple[bool, int, int], SearchRun] = {}

    def get(self, tracking: bool, workers: int, repeat: int = 0) -> SearchRun:
        key = (tracking, workers, repeat)
        if key not in self.done:
            label = f"tracking-{'on' if tracking else 'off'}-{workers}w-{repeat}"
            folder = self.tmp / label
            file = write_study(small_study(folder, self.size, tracking), folder / "study.toml")
            run = run_study(file, "--workers", str(workers))
            trials = _finished_trials(file)
            starts = [t.datetime_start for t in trials if t.datetime_start]
            ends = [t.datetime_complete for t in trials if t.datetime_complete]
            durations = [t.duration.total_seconds() for t in trials if t.duration]
            self.done[key] = SearchRun(
                label,
                run,
                len(trials),
                sum(durations) / max(len(durations), 1),
                (max(ends) - min(starts)).total_seconds(),
            )
        return self.done[key]

    def runs(self, tracking: bool, workers: int) -> list[SearchRun]:
        return [r for (t, w, _), r in self.done.items() if (t, w) == (tracking, workers)]

    def setup(self, *lines: str) -> list[str]:
        return [self.size.describe(), *lines, *([QUICK_NOTE] if self.quick else [])]


def tracking_overhead(runs: SearchRuns, machine_tag: str) -> ItemResult:
    for rep in range(runs.size.pairs):
        for tracking in (True, False) if rep % 2 == 0 else (False, True):
            runs.get(tracking, 1, rep)
    on, off = runs.runs(True, 1), runs.runs(False, 1)
    pairs = list(zip(on, off, strict=True))
    pcts = [(a.search_s / b.search_s - 1) * 100 for a, b in pairs]  # one per pair
    pct = median(pcts)
    pct_wall = median([(a.run.wall_s / b.run.wall_s - 1) * 100 for a, b in pairs])
    pct_trial = median([(a.mean_trial_s / b.mean_trial_s - 1) * 100 for a, b in pairs])
    return ItemResult(
        2,
        "Tracking overhead: MLflow on vs off, same small study",
        machine_tag,
        runs.setup(
            "driven through the CLI: python -m workbench study FILE --workers 1, tracking to "
            f"SQLite in the temp folder; {len(pairs)} pair(s) of runs, alternating order, median",
            "overhead = search-stage wall time (timings.json) with tracking / without - 1. "
            "Beside it, no target: per trial (Optuna's durations: start-up left out) and the "
            "whole command (+ MLflow store creation, study runs, report)",
        ),
        [
            Figure("search stage, tracking on", median([r.search_s for r in on]), "s"),
            Figure("search stage, tracking off", median([r.search_s for r in off]), "s"),
            at_most(
                "tracking overhead, search stage",
                pct,
                TRACKING_TARGET,
                note="pairs: " + ", ".join(f"{p:+.1f} %" for p in pcts),
            ),
            Figure(
                "tracking overhead per trial",
                pct_trial,
                "%",
                note=f"mean trial {median([r.mean_trial_s for r in on]):.2f} s vs "
                f"{median([r.mean_trial_s for r in off]):.2f} s",
            ),
            Figure(
                "tracking overhead, whole command",
                pct_wall,
                "%",
                note=f"{median([r.run.wall_s for r in on]):.1f} s vs "
                f"{median([r.run.wall_s for r in off]):.1f} s",
            ),
        ],
        {"on": [r.to_json() for r in on], "off": [r.to_json() for r in off]},
    )


def parallel_efficiency(runs: SearchRuns, machine_tag: str) -> ItemResult:
    if not runs.runs(False, 1):  # item 2 did not run
        runs.get(False, 1)
    two = runs.get(False, 2)
    one = runs.runs(False, 1)
    tph_one = median([r.trials_per_hour for r in one])
    span_one = median([r.finished / r.span_s * 3600 for r in one])
    span_two = two.finished / two.span_s * 3600
    return ItemResult(
        3,
        "Parallel efficiency: trials per hour, 2 workers vs 1",
        machine_tag,
        runs.setup(
            "driven through the CLI: --workers 1 and --workers 2, tracking off, separate output "
            "folders; trials/hour = finished trials / search-stage wall time (worker start-up "
            f"included); 1 worker: median of {len(one)} run(s), 2 workers: 1 run",
            "beside it, no target: trials/hour over the trial span (first trial's start to last "
            "trial's end, start-up left out)",
        ),
        [
            Figure("1 worker", tph_one, "trials/h", note=f"{one[0].finished} trials"),
            Figure("2 workers", two.trials_per_hour, "trials/h", note=f"{two.finished} trials"),
            at_least("2 workers / 1 worker", two.trials_per_hour / tph_one, PARALLEL_TARGET),
            Figure(
                "2 workers / 1 worker, trial span",
                span_two / span_one,
                "x",
                note=f"{span_two:,.0f} vs {span_one:,.0f} trials/h",
            ),
            Figure(
                "search stage outside trials, 2 workers",
                two.search_s - two.span_s,
                "s",
                note=f"1 worker: {median([r.search_s - r.span_s for r in one]):.1f} s "
                "(worker start-up before the first trial, waiting and exit after the last)",
            ),
        ],
        {"1 worker": [r.to_json() for r in one], "2 workers": two.to_json()},
    )
