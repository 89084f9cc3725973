"""The command line, and the only place where the stages are wired together.

workbench study FILE [--data PATH] [--trials N] [--workers N]   search, then ensemble and report
workbench worker FILE [--data PATH] [--index I]                 join a running search
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.live import Live

from workbench import search
from workbench.config import StudyConfig, load_study, resolved
from workbench.console import best_table, console, ensemble_table, progress_table
from workbench.cv import CrossValidator
from workbench.data import ImageData, Split, cv_folds, load_data, load_or_make_split
from workbench.ensemble.members import MemberSpec, load_members, snapshot_specs
from workbench.ensemble.stage import HeldOut, run_ensemble
from workbench.errors import ConfigError, WorkbenchError
from workbench.files import atomic_write
from workbench.models import check_models
from workbench.report import ModelSection, ReportInputs, TrialRow, write_report
from workbench.runtime import configure_threads, default_workers
from workbench.tracking import Tracker
from workbench.train import Interrupted

REPORTS = Path("reports")  # reports/<study>.html, beside the study files
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

StudyFile = Annotated[Path, typer.Argument(help="study file (TOML), e.g. studies/digits.toml")]
DataOpt = Annotated[str | None, typer.Option("--data", help="data path; overrides data.path")]
TrialsOpt = Annotated[int | None, typer.Option("--trials", min=1, help="trials per model")]


def _fail(e: WorkbenchError) -> typer.Exit:
    console.print("[bold red]error:[/]", str(e), highlight=False)
    return typer.Exit(2)


def prepare(
    file: Path, data_path: str | None, trials: int | None
) -> tuple[StudyConfig, ImageData, Split]:
    """Load and check the study file, the data and the held-out split (made once, persisted)."""
    cfg = load_study(file, trials=trials)
    try:
        check_models(cfg)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    data = load_data(cfg.data, data_path)
    split = load_or_make_split(data, cfg.data, cfg.seed, cfg.out / "split.npz")
    cv_folds(data.y[split.train_idx].numpy(), cfg.cv.folds, cfg.seed)  # folds <= smallest class
    return cfg, data, split


@app.command()
def study(
    file: StudyFile,
    data: DataOpt = None,
    trials: TrialsOpt = None,
    workers: Annotated[
        int | None, typer.Option(help="worker processes; default: one per core")
    ] = None,
) -> None:
    """Run the study: one Optuna search per model, each trial scored by k-fold CV."""
    try:
        cfg, ds, split = prepare(file, data, trials)
        console.print(
            f"[bold]{cfg.name}[/]: {ds.source}, {len(split.train_idx)} training rows "
            f"({cfg.cv.folds} folds), {len(split.test_idx)} held-out test rows ({split.kind} "
            f"split, data {split.fingerprint}); results in {cfg.out}"
        )
        atomic_write(
            cfg.out / "study.resolved.json",
            lambda f: f.write(json.dumps(resolved(cfg), indent=2).encode()),
        )
        storage = search.open_storage(cfg)
        search.create_studies(cfg, storage)
        tracker = Tracker(cfg)
        for model in cfg.models:
            tracker.study_run(model, create=True)
        n = workers or cfg.search.workers or default_workers()
        status = "FAILED"
        try:
            with stage_timer(cfg, "search"):
                interrupted = _run_workers(cfg, file, data, trials, n, storage)
            status = "KILLED" if interrupted else "FINISHED"
        finally:  # the study runs end whatever happened: none is left RUNNING
            rows = search.progress(cfg, storage)
            for r in rows:
                best = r.best_value if r.best_value is not None else float("nan")
                summary = {
                    "best_value": best,
                    "trials_complete": r.complete,
                    "trials_pruned": r.pruned,
                }
                tracker.end_study(model=r.model, summary=summary, status=status)
        console.print()
        console.print(best_table(rows, cfg.cv.metric))
        if interrupted:
            console.print(
                "[yellow]interrupted:[/] every completed trial is kept; "
                "run the same command again to resume."
            )
            raise typer.Exit(130)
        _ensemble_stage(cfg, ds, split, tracker)
        _report_stage(cfg, ds, split, tracker)
    except WorkbenchError as e:
        raise _fail(e) from None


@app.command()
def ensemble(file: StudyFile, data: DataOpt = None) -> None:
    """Ensemble the stored studies' best trials and evaluate them once on the test split."""
    try:
        cfg, ds, split = prepare(file, data, None)
        _ensemble_stage(cfg, ds, split, Tracker(cfg))
    except WorkbenchError as e:
        raise _fail(e) from None


@contextmanager
def stage_timer(cfg: StudyConfig, stage: str) -> Iterator[None]:
    """Record the stage's wall time (seconds) in <out>/timings.json, for the report and bench."""
    t0 = time.time()
    yield
    path = cfg.out / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[stage] = round(time.time() - t0, 2)
    atomic_write(path, lambda f: f.write(json.dumps(timings, indent=1).encode()))


@app.command()
def report(file: StudyFile, data: DataOpt = None) -> None:
    """Write reports/<study>.html from the stored studies and results (no training, no test)."""
    try:
        cfg, ds, split = prepare(file, data, None)
        _report_stage(cfg, ds, split, Tracker(cfg))
    except WorkbenchError as e:
        raise _fail(e) from None


def _report_stage(cfg: StudyConfig, ds: ImageData, split: Split, tracker: Tracker) -> Path:
    with stage_timer(cfg, "report"):
        path = write_report(_report_inputs(cfg, ds, split, tracker), REPORTS / f"{cfg.name}.html")
    console.print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


def _report_inputs(cfg: StudyConfig, ds: ImageData, split: Split, tracker: Tracker) -> ReportInputs:
    """Gather what the report shows from the storage, the trial folders and results.json."""
    storage = search.open_storage(cfg)
    sections = []
    for model in cfg.models:
        rows = search.trial_rows(cfg, model, storage)
        best = search.completed_trials(cfg, model, storage)[:3]
        curves = {
            r.number: json.loads((r.dir / "history.json").read_text())
            for r in best
            if (r.dir / "history.json").exists()
        }
        sections.append(
            ModelSection(
                model,
                cfg.cv.metric,
                search.DIRECTIONS[cfg.cv.metric],
                [TrialRow(model=model, **row) for row in rows],
                search.importances(cfg, model, storage),
                curves,
            )
        )
    results_path = cfg.out / "ensemble" / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else None
    images = None
    if results and results["misclassified"]:
        rows_shown = split.test_idx[[m["row"] for m in results["misclassified"]]]
        images = ds.x[rows_shown].permute(0, 2, 3, 1).numpy()
        images = images[..., 0] if images.shape[-1] == 1 else images
    timings = cfg.out / "timings.json"
    return ReportInputs(
        study=cfg.name,
        config=resolved(cfg),
        data_source=ds.source,
        in_shape=ds.in_shape,
        classes=list(ds.classes),
        split={
            "train": len(split.train_idx),
            "test": len(split.test_idx),
            "kind": split.kind,
            "fingerprint": split.fingerprint,
            "folds": cfg.cv.folds,
        },
        stage_seconds=json.loads(timings.read_text()) if timings.exists() else {},
        tracking=_tracking_links(cfg, tracker),
        models=sections,
        ensemble=results,
        misclassified_images=images,
        created=datetime.now().isoformat(timespec="seconds"),
    )


def _tracking_links(cfg: StudyConfig, tracker: Tracker) -> dict[str, Any] | None:
    if not tracker.enabled:
        return None
    return {
        "uri": tracker.uri,
        "experiment_id": tracker.experiment_id(),
        "ui_url": tracker.uri if tracker.uri.startswith("http") else None,
        "study_runs": {m: tracker.study_run(m) for m in cfg.models},
    }


def _ensemble_stage(cfg: StudyConfig, ds: ImageData, split: Split, tracker: Tracker) -> None:
    if not cfg.ensemble.enabled:
        return
    with stage_timer(cfg, "ensemble"):
        _ensemble(cfg, ds, split, tracker)


def _ensemble(cfg: StudyConfig, ds: ImageData, split: Split, tracker: Tracker) -> None:
    configure_threads(1)
    storage = search.open_storage(cfg)
    specs: list[MemberSpec] = []
    for model in cfg.models:
        records = search.completed_trials(cfg, model, storage)[: cfg.ensemble.top_k]
        for r in records:
            spec = MemberSpec(f"{model}/trial-{r.number}", model, r.number, "trial", r.value, r.dir)
            specs += [spec, *snapshot_specs(spec, r.dir, cfg.cv.metric)]  # searched snapshots
        if records and cfg.ensemble.snapshots > 1:  # the best configuration's snapshot run
            cv = CrossValidator(cfg, model, ds, split, tracker)
            folder = search.run_snapshots(cv, cfg.ensemble.snapshots)
            best = records[0]
            owner = MemberSpec(
                f"{model}/snapshots-of-{best.number}",
                model,
                best.number,
                "snapshot",
                best.value,
                folder or best.dir,
            )
            specs += snapshot_specs(owner, owner.dir, cfg.cv.metric) if folder else []
    members, skipped = load_members(specs, split.train_idx, cfg.cv.folds)
    for line in skipped:
        console.print(f"[yellow]warning:[/] {line}")
    test = HeldOut(
        ds.x[split.test_idx], ds.y[split.test_idx].numpy(), list(ds.classes), split.fingerprint
    )
    out = cfg.out / "ensemble"
    results = run_ensemble(
        members,
        ds.y[split.train_idx].numpy(),
        test,
        cfg.ensemble,
        out,
        cfg.seed,
        ds.in_shape,
        cfg.cv.metric,
    )
    if results["reused"]:
        console.print(
            f"ensemble inputs unchanged: reusing the stored test evaluation "
            f"({out / 'results.json'}; test evaluations so far: "
            f"{results['test_evaluations']})"
        )
    else:
        tracker.log_ensemble(results, out / "final", test.x[:4].numpy())
    console.print(ensemble_table(results))


def _run_workers(
    cfg: StudyConfig,
    file: Path,
    data: str | None,
    trials: int | None,
    n: int,
    storage: search.RDBStorage,
) -> bool:
    """Start n `workbench worker` processes and show progress until they end; True if Ctrl-C."""
    rows = search.progress(cfg, storage)
    if all(r.complete + r.pruned >= r.target for r in rows):
        console.print(
            "every model study is complete: nothing to run "
            "(raise `trials` in the study file, or pass --trials, to search further)"
        )
        return False
    logs = cfg.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "workbench", "worker", str(file)]
    argv += ["--data", data] if data else []
    argv += ["--trials", str(trials)] if trials else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [*argv, "--index", str(i)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=(logs / f"worker-{i}.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        for i in range(n)
    ]
    stopping: list[bool] = []

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        if stopping:  # a second Ctrl-C: stop now
            for p in procs:
                p.kill()
        stopping.append(True)
        for p in procs:  # a Ctrl-C in the terminal reaches them too; this covers `kill -INT`
            if p.poll() is None:
                p.send_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGINT, on_sigint)
    started = time.time()
    try:
        with Live(console=console, refresh_per_second=1, transient=False) as live:
            while any(p.poll() is None for p in procs):
                live.update(
                    progress_table(search.progress(cfg, storage), cfg.cv.metric, n, started)
                )
                time.sleep(1.0)
            live.update(progress_table(search.progress(cfg, storage), cfg.cv.metric, n, started))
    finally:
        signal.signal(signal.SIGINT, previous)
    bad = [i for i, p in enumerate(procs) if p.returncode not in (0, 130)]
    for i in bad:
        tail = (logs / f"worker-{i}.log").read_text().strip().splitlines()[-15:]
        console.print(
            f"[red]worker {i} exited with {procs[i].returncode}[/]; "
            f"last lines of {logs / f'worker-{i}.log'}:\n" + "\n".join(tail)
        )
    if bad and not stopping:
        raise typer.Exit(1)
    return bool(stopping)


@app.command()
def worker(
    file: StudyFile,
    data: DataOpt = None,
    trials: TrialsOpt = None,
    index: Annotated[int, typer.Option(help="worker number: seeds its sampler")] = 0,
) -> None:
    """Join the search of a study whose storage exists (from another shell or machine)."""
    configure_threads(1)
    stop: list[bool] = []
    signal.signal(signal.SIGINT, lambda s, f: stop.append(True))  # finish the epoch, then stop
    try:
        cfg, ds, split = prepare(file, data, trials)
        search.run_worker(
            cfg, ds, split, Tracker(cfg), worker=index, should_stop=lambda: bool(stop)
        )
    except Interrupted as e:
        print(f"worker {index}: {e}", flush=True)
        raise typer.Exit(130) from None
    except WorkbenchError as e:
        raise _fail(e) from None


def main() -> None:
    app()
