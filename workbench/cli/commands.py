"""The commands: `study`, `check`, `ensemble`, `report`, `worker` and `predict`.

workbench study FILE [--data PATH] [--trials N] [--workers N]   search, then ensemble and report
workbench check FILE [--data PATH] [--trials N] [--workers N]   preflight checks and the plan
workbench worker FILE [--data PATH] [--index I]                 join a running search

Every command but `predict` runs the preflight checks (cli/preflight.py) in `prepare`, before it
writes a file or forks a worker.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from workbench import search
from workbench.cli import plan
from workbench.cli.preflight import Command, run_checks
from workbench.cli.processes import FORK, fork_workers, spawn_workers, work
from workbench.cli.stages import ensemble_stage, report_stage, stage_timer
from workbench.cli.workers import Worker, run_workers
from workbench.config import StudyConfig, load_study, resolved
from workbench.console import best_table, console, print_error
from workbench.data import (
    ImageData,
    Split,
    grouping,
    load_data,
    load_or_make_split,
    make_split,
)
from workbench.errors import ConfigError, WorkbenchError
from workbench.files import atomic_write, undone_on_error
from workbench.models import check_models
from workbench.runtime import configure_threads, default_workers, gpu_count
from workbench.store import RunStore
from workbench.tracking import DataRef, Tracker

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

StudyFile = Annotated[Path, typer.Argument(help="study file (TOML), e.g. studies/digits.toml")]
DataOpt = Annotated[str | None, typer.Option("--data", help="data path; overrides data.path")]
TrialsOpt = Annotated[int | None, typer.Option("--trials", min=1, help="trials per model")]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", help="worker processes; default: one per core")
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--budget",
        help="wall-clock time for the whole command, e.g. 30m, 2h, 1h30m: trials start only "
        "while they can finish; sets search.budget",
    ),
]


def _fail(e: WorkbenchError) -> typer.Exit:
    print_error(e)
    return typer.Exit(2)


def prepare(
    file: Path,
    data_path: str | None,
    trials: int | None,
    command: Command = "study",
    budget: str | None = None,
) -> tuple[StudyConfig, ImageData, Split]:
    """Load and check the study file, run `command`'s preflight checks, then read the data and
    the held-out split (made once, persisted; `check` makes it in memory if there is none)."""
    cfg = load_study(file, trials=trials, budget=budget)
    try:
        check_models(cfg)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    run_checks(cfg, file, data_path, command)  # before anything is written
    # the fold rule needs the labels: what reading them wrote is removed if it fails
    with undone_on_error(Path(cfg.out)):
        data = load_data(cfg.data, data_path, RunStore(cfg.out).images)
        if data.skipped:  # data.on_bad_file = "skip": say which, here and in the report
            shown = "\n  ".join(data.skipped[:10])
            more = f"\n  ... and {len(data.skipped) - 10} more" if len(data.skipped) > 10 else ""
            console.print(
                f"[yellow]warning:[/] {len(data.skipped)} file(s) left out "
                + escape(f'(data.on_bad_file = "skip"):\n  {shown}{more}'),
                highlight=False,
            )
        path = RunStore(cfg.out).file("split.npz")
        groups = grouping(data, cfg)  # cv.group_by: rows that stay on one side
        split = (
            make_split(data, cfg.data, cfg.seed, groups)
            if command == "check" and not path.exists()
            else load_or_make_split(data, cfg.data, cfg.seed, path, groups)
        )
        try:  # folds <= smallest class
            split.folds(data.y[split.train_idx].numpy(), cfg.cv.folds, cfg.seed, data.classes)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None
    return cfg, data, split


@app.command()
def study(
    file: StudyFile,
    data: DataOpt = None,
    trials: TrialsOpt = None,
    workers: WorkersOpt = None,
    budget: BudgetOpt = None,
) -> None:
    """Run the study: one Optuna search per model, each trial scored by k-fold CV."""
    started = time.time()  # a budget counts from here: the whole command
    configure_threads(1)  # before any torch work: the forked workers inherit one thread
    try:
        cfg, ds, split = prepare(file, data, trials, budget=budget)
        console.print(
            f"[bold]{cfg.name}[/]: {ds.source}, {len(split.train_idx)} training rows "
            f"({cfg.cv.folds} folds), {len(split.test_idx)} held-out test rows ({split.kind} "
            f"split, data {split.fingerprint}); results in {cfg.out}"
        )
        atomic_write(
            RunStore(cfg.out).file("study.resolved.json"),
            lambda f: f.write(json.dumps(resolved(cfg), indent=2).encode()),
        )
        n = worker_count(cfg, workers)
        logs = RunStore(cfg.out).logs
        procs: list[Worker] = (
            list(fork_workers(cfg, ds, split, n, logs))  # now: no connection, thread or CUDA yet
            if FORK and (cfg.device == "cpu" or gpu_count() == 0)  # CUDA: fresh processes
            else list(spawn_workers(file, data, trials, n, logs))
        )
        try:
            rows, interrupted, tracker = _search(
                cfg, procs, file, _tracker(cfg, ds, split), started
            )
        finally:
            for p in procs:
                p.close()
        console.print()
        console.print(best_table(rows, cfg.cv.metric))
        if interrupted:
            console.print(
                "[yellow]interrupted:[/] every completed trial is kept; "
                "run the same command again to resume."
            )
            raise typer.Exit(130)
        ensemble_stage(cfg, ds, split, tracker)
        report_stage(cfg, ds, split, tracker)
    except WorkbenchError as e:
        raise _fail(e) from None


def worker_count(cfg: StudyConfig, workers: int | None) -> int:
    """--workers, else search.workers, else one per core (or workers_per_gpu per GPU)."""
    n = workers or cfg.search.workers
    return n or default_workers(cfg.device, cfg.search.workers_per_gpu)


@app.command()
def check(
    file: StudyFile, data: DataOpt = None, trials: TrialsOpt = None, workers: WorkersOpt = None
) -> None:
    """Check the machine, storage, tracking server and data, and print the plan; train nothing.

    Exit 0 when `workbench study` could start, 2 with the one-line error otherwise. It may
    decode the data into the image store (the study's first step); it creates no Optuna study,
    no MLflow run and no split file."""
    try:
        cfg, ds, split = prepare(file, data, trials, "check")
        plan.show(cfg, ds, split, worker_count(cfg, workers))
    except WorkbenchError as e:
        raise _fail(e) from None


def _tracker(cfg: StudyConfig, ds: ImageData, split: Split) -> Tracker:
    """The MLflow record of this study's runs, which name `ds` as their dataset input."""
    return Tracker(cfg, data=DataRef.of(ds, split))


def _search(
    cfg: StudyConfig, procs: list[Worker], file: Path, tracker: Tracker, started: float
) -> tuple[list[search.ModelProgress], bool, Tracker]:
    """Create the studies and their MLflow runs, run the workers, end the runs."""
    storage = search.open_storage(cfg)
    studies = search.create_studies(cfg, storage)
    deadline = search.budget.start(cfg, studies, started, RunStore(cfg.out).file("timings.json"))
    if deadline is not None:
        console.print(deadline.describe(), highlight=False)
    for model in cfg.models:
        tracker.study_run(model, create=True)
    tracker.describe(file)
    console.print(escape(tracker.where()), highlight=False)
    status, interrupted = "FAILED", False
    try:
        with stage_timer(cfg, "search"):
            interrupted = run_workers(cfg, procs, storage)
        status = "KILLED" if interrupted else "FINISHED"
    finally:  # the study runs end whatever happened: none is left RUNNING
        rows = search.progress(cfg, storage)
        for r in rows:
            best = r.best_value if r.best_value is not None else float("nan")
            summary = {"best_value": best, "trials_complete": r.complete, "trials_pruned": r.pruned}
            history = search.scores(cfg, r.model, storage)
            tracker.end_study(model=r.model, summary=summary, status=status, history=history)
        tracker.flush()
    return rows, interrupted, tracker


@app.command()
def ensemble(file: StudyFile, data: DataOpt = None) -> None:
    """Ensemble the stored studies' best trials and evaluate them once on the test split."""
    try:
        cfg, ds, split = prepare(file, data, None, "ensemble")
        ensemble_stage(cfg, ds, split, _tracker(cfg, ds, split))
    except WorkbenchError as e:
        raise _fail(e) from None


@app.command()
def report(file: StudyFile, data: DataOpt = None) -> None:
    """Write reports/<study>.html from the stored studies and results (no training, no test)."""
    try:
        cfg, ds, split = prepare(file, data, None, "report")
        report_stage(cfg, ds, split, Tracker(cfg))
    except WorkbenchError as e:
        raise _fail(e) from None


@app.command()
def worker(
    file: StudyFile,
    data: DataOpt = None,
    trials: TrialsOpt = None,
    index: Annotated[int, typer.Option(help="worker number: seeds its sampler")] = 0,
) -> None:
    """Join the search of a study whose storage exists (from another shell or machine)."""
    configure_threads(1)
    try:
        cfg, ds, split = prepare(file, data, trials, "worker")
    except WorkbenchError as e:
        raise _fail(e) from None
    raise typer.Exit(work(cfg, ds, split, index))


def main() -> None:
    app()
