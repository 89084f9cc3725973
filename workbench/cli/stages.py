"""The ensemble and report stages, wired from the stored studies: what `study`, `ensemble` and
`report` run after (or without) the search."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from workbench import export, graph, infer, search, views
from workbench.cli import candidates
from workbench.cli.student import package as package_student
from workbench.cli.student import plan as plan_student
from workbench.config import StudyConfig, resolved
from workbench.console import console, ladder_notes, ladder_table, print_wide
from workbench.data import ImageData, Split
from workbench.errors import CheckpointError
from workbench.files import atomic_write
from workbench.final import FinalEnsemble
from workbench.report import ModelSection, ReportInputs, TrialRow, write_report
from workbench.results import TestProbas
from workbench.runtime import configure_threads, release_file_pages
from workbench.store import RunStore
from workbench.tracking import CHAMPION, Tracker

if TYPE_CHECKING:
    from workbench.data import Rows
    from workbench.views import View

REPORTS = Path("reports")  # reports/<study>.html, beside the study files


@contextmanager
def stage_timer(cfg: StudyConfig, stage: str) -> Iterator[None]:
    """Record the stage's wall time (seconds) in <out>/timings.json, for the report and bench."""
    t0 = time.time()
    yield
    path = RunStore(cfg.out).file("timings.json")
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[stage] = round(time.time() - t0, 2)
    atomic_write(path, lambda f: f.write(json.dumps(timings, indent=1).encode()))


def report_stage(cfg: StudyConfig, ds: ImageData, split: Split, tracker: Tracker) -> Path:
    with stage_timer(cfg, "report"):
        path = write_report(report_inputs(cfg, ds, split, tracker), REPORTS / f"{cfg.name}.html")
    console.print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


def report_inputs(cfg: StudyConfig, ds: ImageData, split: Split, tracker: Tracker) -> ReportInputs:
    """Gather what the report shows from the storage, the trial folders and results.json."""
    storage, store = search.open_storage(cfg), RunStore(cfg.out, tracker.remote())
    sections = []
    for model in cfg.models:
        rows = search.trial_rows(cfg, model, storage)
        curves = {}
        for r in search.completed_trials(cfg, model, storage)[:3]:
            with contextlib.suppress(CheckpointError):  # the report says which are missing
                folder = store.open_run(r.attrs.get("files"), r.dir, f"{model}/trial-{r.number}")
                curves[r.number] = json.loads(store.history(folder).read_text())
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
    results = store.ensemble_result()
    images = None
    if results and results.misclassified:
        rows_shown = split.test_idx[[m.row for m in results.misclassified]]
        images = ds.images(rows_shown).permute(0, 2, 3, 1).numpy()
        images = images[..., 0] if images.shape[-1] == 1 else images
    timings = store.file("timings.json")
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
            "groups": split.group_note(),
            "fingerprint": split.fingerprint,
            "folds": cfg.cv.folds,
        },
        stage_seconds=json.loads(timings.read_text()) if timings.exists() else {},
        tracking=tracking_links(cfg, tracker),
        models=sections,
        ensemble=results,
        test_looks=store.test_looks(),
        misclassified_images=images,
        created=datetime.now().isoformat(timespec="seconds"),
        skipped_files=list(ds.skipped),
        budget=search.budget.spending(cfg, storage),
    )


def tracking_links(cfg: StudyConfig, tracker: Tracker) -> dict[str, Any] | None:
    if not tracker.enabled:
        return None
    return {
        "uri": tracker.uri,
        "experiment_id": tracker.experiment_id(),
        "ui_url": tracker.uri if tracker.uri.startswith("http") else None,
        "study_runs": {m: tracker.study_run(m) for m in cfg.models},
        "final_model": _final_model_link(cfg),
    }


def _final_model_link(cfg: StudyConfig) -> dict[str, str] | None:
    """Where the final model is in MLflow (ensemble/mlflow.json), and its registered alias."""
    path = RunStore(cfg.out).mlflow_link
    if not path.exists():
        return None
    link = json.loads(path.read_text())
    name = cfg.tracking.register_as
    return {
        "model_uri": link["model_uri"],
        **({"registered": f"models:/{name}@{CHAMPION}", "name": name} if name else {}),
    }


def ensemble_stage(cfg: StudyConfig, ds: ImageData, split: Split, tracker: Tracker) -> None:
    if not cfg.ensemble.enabled:
        return
    with stage_timer(cfg, "ensemble"):
        _ensemble(cfg, ds, split, tracker)


def _ensemble(cfg: StudyConfig, ds: ImageData, split: Split, tracker: Tracker) -> None:
    # imported here: the combiners import scikit-learn and SciPy, ~100 MB that the workers forked
    # before this stage would otherwise each hold (tests/test_fork_parent.py)
    from workbench.ensemble.stage import HeldOut, run_ensemble

    configure_threads(1)
    release_file_pages()  # what loading the libraries touched (~250 MB): not this stage's pages
    store = RunStore(cfg.out, tracker.remote())
    members, refits = candidates.from_search(cfg, store, split)
    plain = len(members)
    members += candidates.tta_members(cfg, members, ds, split)
    test = HeldOut(ds.y[split.test_idx].numpy(), list(ds.classes), split.fingerprint)
    x_test = ds.rows(split.test_idx)
    checkpoints = [m.checkpoints for m in members[:plain]]  # a TTA variant's are its plain one's
    refit_ckpts = [r.checkpoint for r in refits]
    tta = views.resolve(cfg.ensemble.tta)
    student = plan_student(cfg, ds, split, members, store)
    taught = store.student_checkpoint if student else None
    workers = infer.processes(cfg.ensemble)
    results = run_ensemble(
        members,
        ds.y[split.train_idx].numpy(),
        test,
        cfg.ensemble,
        store,
        cfg.seed,
        lambda best: _test_probas(best, checkpoints, x_test, refit_ckpts, tta, taught, workers),
        cfg.cv.metric,
        cfg.cv.folds,
        lambda: candidates.costs(
            members, refits, ds.images(split.test_idx[: infer.COST_BATCH]), taught
        ),
        refits,
        student,
    )
    if results.reused and store.final.exists():
        console.print(
            f"ensemble inputs unchanged: reusing the stored test evaluation "
            f"({store.results}; test evaluations so far: {results.test_evaluations})"
        )
    else:
        kept = [(m.name, m.checkpoints) for m in members]
        export.save_final(
            store.final,
            kept,
            results.final.rule.to_json(),
            results.final.method,
            test.classes,
            ds.in_shape,
            ds.preprocess,
            {m.name: list(m.spec.views) for m in members if m.spec.views},
        )
        if student is not None:
            package_student(cfg, ds, store)
        final = FinalEnsemble.load(store.final)  # once: the ONNX check and the package use it
        onnx = _export_onnx(final, store, ds, split, cfg)
        run_id = ""
        if tracker.enabled:
            pixels = ds.pixels[split.test_idx[:2]].numpy()
            onnx_files = [str(p) for p in graph.files(onnx)]
            package = export.packaged(final, store.final, pixels, ds.scale, {"onnx": onnx_files})
            if student is not None:
                taught_model = FinalEnsemble.load(store.student)
                packed = export.packaged(taught_model, store.student, pixels, ds.scale, {})
                package = dataclasses.replace(package, student=packed)
            run_id = tracker.log_ensemble(results, package)
        if run_id:  # where the loadable model is: mlflow.pyfunc.load_model(model_uri)
            link = {"run_id": run_id, "model_uri": f"runs:/{run_id}/model", "uri": tracker.uri}
            if student is not None:
                link["student_uri"] = f"runs:/{run_id}/student"
            atomic_write(store.mlflow_link, lambda f: f.write(json.dumps(link).encode()))
            console.print(f"final model: {link['model_uri']} (MLflow store {tracker.uri})")
    print_wide(ladder_table(results))
    for line in ladder_notes(results):
        console.print(escape(line), highlight=False)


def _test_probas(
    best: int,
    members: Sequence[Sequence[Path]],
    x: Rows,
    refits: Sequence[Path],
    tta: Sequence[View],
    student: Path | None,
    workers: int,
) -> TestProbas:
    """infer.test_probas on `workers` processes, and a line saying what it ran and in what time
    (a fold model of a TTA member makes a pass over the rows per view, and one as they are)."""
    t0 = time.perf_counter()
    probas = infer.test_probas(
        members, x, best, refits=refits, views=tta, student=student, workers=workers
    )
    passes = sum(map(len, members)) * (1 + len(tta)) + len(refits) + (student is not None)
    console.print(
        f"test probabilities: {passes} network passes over {len(x):,} rows on {workers} "
        f"process{'es' if workers > 1 else ''}: {time.perf_counter() - t0:.1f} s"
    )
    return probas


def _external_note(path: Path) -> str:
    """What a user must know of a graph whose weights are in a file beside it."""
    data = graph.data_file(path)
    if not data.exists():
        return ""
    return (
        f"; its weights are in {data.name} beside it (over 2 GB as one file): keep the two together"
    )


def _export_onnx(
    final: FinalEnsemble, store: RunStore, ds: ImageData, split: Split, cfg: StudyConfig
) -> Path:
    """The final model as one ONNX graph, checked against the torch module on `[ensemble]
    check_rows` test rows (a seeded sample; all of them when 0). The check reads no labels: it
    is no look at the test split."""
    t0 = time.perf_counter()
    n = len(split.test_idx)
    rows = split.test_idx[graph.sample(n, cfg.ensemble.check_rows, cfg.seed)]
    checked = graph.export_onnx(final, store.onnx, ds.rows(rows))
    which = f"{checked.rows} test rows" if checked.rows == n else f"{checked.rows} of {n} test rows"
    console.print(
        f"ONNX graph: {store.onnx} ({checked.bytes / 1e6:.1f} MB; on {which} labels equal, "
        f"max |p - p_torch| {checked.max_abs_diff:.1e}; {time.perf_counter() - t0:.1f} s)"
        + _external_note(store.onnx)
    )
    return store.onnx
