"""The ensemble and report stages, wired from the stored studies: what `study`, `ensemble` and
`report` run after (or without) the search."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from workbench import export, graph, infer, search
from workbench.config import StudyConfig, resolved
from workbench.console import console, ladder_notes, ladder_table, print_wide
from workbench.data import ImageData, Split
from workbench.errors import CheckpointError
from workbench.files import atomic_write
from workbench.final import FinalEnsemble
from workbench.report import ModelSection, ReportInputs, TrialRow, write_report
from workbench.results import Cost
from workbench.runtime import configure_threads, release_file_pages
from workbench.store import RunStore
from workbench.tracking import CHAMPION, Tracker

if TYPE_CHECKING:
    import torch

    from workbench.ensemble.members import Member, Refit

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
    members, refits = _candidates(cfg, store, split)
    test = HeldOut(ds.y[split.test_idx].numpy(), list(ds.classes), split.fingerprint)
    x_test = ds.rows(split.test_idx)
    checkpoints = [m.checkpoints for m in members]
    refit_ckpts = [r.checkpoint for r in refits]
    results = run_ensemble(
        members,
        ds.y[split.train_idx].numpy(),
        test,
        cfg.ensemble,
        store,
        cfg.seed,
        lambda best: infer.test_probas(checkpoints, x_test, best, refits=refit_ckpts),
        cfg.cv.metric,
        cfg.cv.folds,
        lambda: _costs(members, refits, ds.images(split.test_idx[: infer.COST_BATCH])),
        refits,
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
        )
        final = FinalEnsemble.load(store.final)  # once: the ONNX check and the package use it
        onnx = _export_onnx(final, store, ds, split)
        run_id = ""
        if tracker.enabled:
            pixels = ds.pixels[split.test_idx[:2]].numpy()
            package = export.packaged(final, store.final, pixels, ds.scale, {"onnx": str(onnx)})
            run_id = tracker.log_ensemble(results, package)
        if run_id:  # where the loadable model is: mlflow.pyfunc.load_model(model_uri)
            link = {"run_id": run_id, "model_uri": f"runs:/{run_id}/model", "uri": tracker.uri}
            atomic_write(store.mlflow_link, lambda f: f.write(json.dumps(link).encode()))
            console.print(f"final model: {link['model_uri']} (MLflow store {tracker.uri})")
    print_wide(ladder_table(results))
    for line in ladder_notes(results):
        console.print(escape(line), highlight=False)


def _costs(members: list[Member], refits: list[Refit], images: torch.Tensor) -> dict[str, Cost]:
    """Each member's and refit's inference cost, measured now on 1 thread (the stage's)."""
    costs = {m.name: infer.member_cost(m.checkpoints, images) for m in members}
    return costs | {r.name: infer.member_cost([r.checkpoint], images) for r in refits}


def _candidates(
    cfg: StudyConfig, store: RunStore, split: Split
) -> tuple[list[Member], list[Refit]]:
    """What the search completed, as the ensemble stage's members and refits (each run's files
    checked), with a warning line for each one missing; every candidate's checkpoints are
    listed in candidates.json, so that `predict --member` can run any one alone."""
    from workbench.ensemble.members import Found, discover, load_members

    storage, found = search.open_storage(cfg), []
    for model in cfg.models:
        trials = search.completed_trials(cfg, model, storage)[: cfg.ensemble.top_k]
        runs = {
            kind: search.followup_record(cfg, model, storage, trials[0], kind) if trials else None
            for kind in search.followup_kinds(cfg)
        }
        found.append(Found(model, trials, runs.get("snapshots"), runs.get("refit")))
    e = cfg.ensemble
    specs, refits, unopened = discover(found, store, cfg.cv.metric, e.snapshots, e.refit)
    members, skipped = load_members(specs, split.train_idx, cfg.cv.folds)
    for line in unopened + skipped:
        console.print(f"[yellow]warning:[/] {line}")
    listed = {m.name: [store.relative(p) for p in m.checkpoints] for m in members}
    listed |= {r.name: [store.relative(r.checkpoint)] for r in refits}
    atomic_write(store.candidates, lambda f: f.write(json.dumps(listed, indent=1).encode()))
    return members, refits


def _export_onnx(final: FinalEnsemble, store: RunStore, ds: ImageData, split: Split) -> Path:
    """The final model as one ONNX graph, checked on the test split against the torch module."""
    t0 = time.perf_counter()
    checked = graph.export_onnx(final, store.onnx, ds.rows(split.test_idx))
    console.print(
        f"ONNX graph: {store.onnx} ({checked.bytes / 1e6:.1f} MB; on {checked.rows} test rows "
        f"labels equal, max |p - p_torch| {checked.max_abs_diff:.1e}; "
        f"{time.perf_counter() - t0:.1f} s)"
    )
    return store.onnx
