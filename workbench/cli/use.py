"""The commands that use a study's final model: `predict` and `export`.

workbench predict FILE IMAGES... [--out table.csv] [--model M] [--member NAME]   new images
workbench export FILE --onnx PATH [--quantize [--max-label-change 0.01]]         one ONNX graph

M is the final model folder (default: the study's own), an MLflow model URI (`runs:/<id>/model`)
or a registered model's alias or version (`models:/<name>@champion`, `models:/<name>/3`).

Every score these commands compute on rows of the held-out test split is a look at it, counted
in the study's one log (`RunStore.count_test_look`) and said with the count so far: export's
score of the graph, the int8 graph's under --quantize, and predict's accuracy where the
labelled files include test rows (found by their pixels: workbench/predict.py).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer
from rich.markup import escape

from workbench.cli.commands import DataOpt, StudyFile, _fail, app, prepare
from workbench.cli.preflight import check_out_file
from workbench.config import StudyConfig, load_study
from workbench.console import console, labels_table
from workbench.errors import ConfigError, ExportError, WorkbenchError
from workbench.final import FinalEnsemble
from workbench.results import TestLook
from workbench.runtime import configure_threads
from workbench.store import RunStore
from workbench.tracking import MODEL_SCHEMES, download_model

if TYPE_CHECKING:
    from workbench.data import Rows
    from workbench.data.table import Manifest
    from workbench.predict import Predictions

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="final model folder, runs:/<id>/model or models:/<name>@<alias>, or `student` "
        "(the study's distilled student); default: the study's own",
    ),
]
MemberOpt = Annotated[
    str | None,
    typer.Option("--member", help="one member (any candidate of the ensemble) alone: cnn/trial-3"),
]
MaxChangeOpt = Annotated[
    float,
    typer.Option(
        "--max-label-change",
        help="--quantize fails (and removes the int8 graph) when its labels differ from the "
        "float graph's on more than this share of the test rows",
    ),
]


STUDENT = "student"  # --model student: the study's distilled student (store.student)


def final_model(
    cfg: StudyConfig, file: Path, model: str | None, member: str | None
) -> FinalEnsemble:
    """The final model a command names, loaded (and, for a URI, fetched from MLflow)."""
    if model and model.startswith(MODEL_SCHEMES):
        with tempfile.TemporaryDirectory(prefix="workbench-model-") as tmp:
            final = FinalEnsemble.load(download_model(cfg, model, Path(tmp)))
    elif model == STUDENT:
        folder = RunStore(cfg.out).student
        if not RunStore.is_final(folder):
            raise ConfigError(
                f"no distilled student in {folder}: add a [distill] section to {file} "
                f"(model = one of {sorted(cfg.models)}) and run `workbench ensemble {file}`"
            )
        final = FinalEnsemble.load(folder)
    else:
        folder = Path(model) if model else RunStore(cfg.out).final
        if not (folder / "ensemble.json").is_file():
            raise ConfigError(
                f"no final model in {folder}: run `workbench study {file}` first, or pass "
                "--model with a final/ folder (holding ensemble.json) or an MLflow model URI"
            )
        final = FinalEnsemble.load(folder)
    if not member:
        return final
    store = RunStore(cfg.out)
    listed, root = store.candidates, store.root  # every candidate, listed by the stage
    candidates = {
        name: [root / p for p in paths]
        for name, paths in (json.loads(listed.read_text()) if listed.exists() else {}).items()
    }
    return final.member(member, candidates, cfg.ensemble.tta)


def scored(model: str | None, member: str | None) -> str:
    """What a command scores, as its look at the test split names it."""
    if member:
        return f"member {member}"
    if model == STUDENT:
        return "the distilled student"
    return f"the model {model}" if model else "the final model"


def count_look(cfg: StudyConfig, command: str, what: str, rows: int, accuracy: float | None) -> int:
    """Count one look at the test split in the study's log; how many there have been."""
    look = TestLook(
        command=command,
        what=what,
        rows=rows,
        accuracy=accuracy,
    )
    return RunStore(cfg.out).count_test_look(look)


@app.command()
def predict(
    file: StudyFile,
    images: Annotated[
        list[str] | None, typer.Argument(help="image files, folders or glob patterns")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="the table: .csv, or .parquet")] = Path(
        "predictions.csv"
    ),
    model: ModelOpt = None,
    member: MemberOpt = None,
    labels_from_folders: Annotated[
        bool, typer.Option(help="each image's class is its folder's name: report accuracy")
    ] = False,
    labels_from_table: Annotated[
        Path | None,
        typer.Option(
            help="predict the images a table lists (CSV or Parquet, the study's data.columns and "
            "data.suffix), its labels the truth: report accuracy"
        ),
    ] = None,
    strict: Annotated[bool, typer.Option(help="a file that is not an image is an error")] = False,
) -> None:
    """Predict new images with the study's final model; prepared as its training images were."""
    from rich.progress import Progress

    from workbench import predict as predicting

    configure_threads(1)
    try:
        check_out_file(out, "--out", (".csv", ".parquet"))  # before any work
        cfg = load_study(file)
        final = final_model(cfg, file, model, member)
        listed = _listed(cfg, images or [], labels_from_table, labels_from_folders)
        files = predicting.image_files(images or []) if listed is None else list(listed.files)
        with Progress(transient=True, console=console) as bar:
            task = bar.add_task(f"predicting {len(files)} files", total=len(files))
            result = predicting.predict_files(final, files, strict, lambda n: bar.advance(task, n))
        for line in result.skipped:
            console.print(f"[yellow]warning:[/] skipped {escape(line)}", highlight=False)
        truth = (
            predicting.folder_labels(result.paths, result.classes) if labels_from_folders else None
        )
        if listed is not None:
            truth = predicting.table_labels(result.paths, listed, result.classes)
        predicting.write_table(out, result.table(truth))
        console.print(f"{len(result.paths)} image(s) predicted: {out}")
        if truth is not None:
            console.print(labels_table(truth, result.labels, result.classes))
            _predict_look(cfg, result, truth, scored(model, member))
    except WorkbenchError as e:
        raise _fail(e) from None


def _listed(
    cfg: StudyConfig, images: list[str], table: Path | None, from_folders: bool
) -> Manifest | None:
    """The table --labels-from-table names, read; the images come from it or from arguments."""
    from workbench.data.table import read_manifest

    if table is None:
        if not images:
            raise ConfigError(
                "predict needs image files, folders or patterns, or a --labels-from-table"
            )
        return None
    if images or from_folders:
        raise ConfigError(
            "--labels-from-table lists the images and their labels: give no image arguments and "
            "no --labels-from-folders with it"
        )
    return read_manifest(table, cfg.data.columns, cfg.data.suffix)


def _predict_look(cfg: StudyConfig, result: Predictions, truth: list[str], what: str) -> None:
    """Count a look when the scored files include rows of the study's test split (by their
    pixels), with the accuracy on those rows; nothing where the study has no store or split."""
    from workbench import predict as predicting

    found = predicting.held_out(cfg)
    if found is None:
        return
    held = predicting.are_test_rows(result.digests, *found)
    rows = int(held.sum())
    if not rows:
        return
    right = np.array(result.labels)[held] == np.array(truth)[held]
    accuracy = float(right.mean())
    n = count_look(cfg, "predict", what, rows, accuracy)
    console.print(
        f"{rows} of the {len(held)} labelled images are rows of the study's held-out test "
        f"split: accuracy {accuracy:.2%} on them; test evaluations so far: {n}",
        highlight=False,
    )


@app.command()
def export(
    file: StudyFile,
    onnx: Annotated[Path, typer.Option("--onnx", help="where to write the ONNX graph")],
    quantize: Annotated[
        bool, typer.Option(help="also write a dynamically int8-quantized graph (<name>.int8.onnx)")
    ] = False,
    max_label_change: MaxChangeOpt = 0.01,
    data: DataOpt = None,
    model: ModelOpt = None,
    member: MemberOpt = None,
    student: Annotated[
        bool, typer.Option("--student", help="the distilled student, as --model student")
    ] = False,
) -> None:
    """Write the final model as one ONNX graph, checked with onnxruntime on the test split."""
    from workbench import graph

    configure_threads(1)
    try:
        if not 0.0 <= max_label_change <= 1.0:  # also refuses NaN
            raise ConfigError(
                f"--max-label-change must lie in [0, 1] (a share of the test rows: 0.01 is 1 %), "
                f"got {max_label_change:g}"
            )
        check_out_file(onnx, "--onnx")
        cfg, ds, split = prepare(file, data, None, "ensemble")  # the ensemble stage's checks
        model = STUDENT if student else model
        final = final_model(cfg, file, model, member)
        x, y = ds.rows(split.test_idx), ds.y[split.test_idx].numpy()
        checked = graph.export_onnx(final, onnx, x, y)
        if graph.data_file(onnx).exists():
            console.print(
                f"{onnx}: the weights pass one ONNX file's 2 GB limit, so they are in "
                f"{graph.data_file(onnx)} beside it: keep the two together"
            )
        what = scored(model, member)
        n = count_look(cfg, "export", what, checked.rows, checked.accuracy)
        console.print(
            f"{onnx}: {checked.bytes / 1e6:.2f} MB; on the {checked.rows} test rows every label "
            f"equals the torch model's, max |p_onnx - p_torch| = {checked.max_abs_diff:.1e}, "
            f"accuracy {checked.accuracy:.2%}; test evaluations so far: {n}",
            highlight=False,
        )
        if quantize:
            _quantize(cfg, onnx, x, y, what, max_label_change)
    except WorkbenchError as e:
        raise _fail(e) from None


def _quantize(
    cfg: StudyConfig, onnx: Path, x: Rows, y: np.ndarray, what: str, limit: float
) -> None:
    """The int8 graph beside `onnx`, scored on the test split (one more look); an
    ExportError, with the int8 file removed, when more than `limit` of the labels changed."""
    from workbench import graph

    int8 = onnx.with_suffix(".int8.onnx")
    q = graph.quantize(onnx, int8, x, y)
    float_acc, int8_acc = q["float_accuracy"], q["accuracy"]
    assert float_acc is not None and int8_acc is not None, "scored with the test labels"
    of = "" if what == "the final model" else f" of {what}"
    # the float graph's accuracy is the one export just printed and counted: one look, not two
    n = count_look(cfg, "export --quantize", f"the int8 graph{of}", q["rows"], int8_acc)
    problem = graph.label_change_error(q, limit)
    if problem:
        int8.unlink(missing_ok=True)  # so that no one ships it by mistake; the float graph stays
        raise ExportError(
            f"{problem}. {int8} was removed, {onnx} is kept; test evaluations so far: {n}"
        )
    console.print(
        f"{int8}: {q['bytes'] / 1e6:.2f} MB ({q['bytes'] / q['float_bytes']:.0%} of the float "
        f"graph); labels differ from the float graph's on {q['changed']} of {q['rows']} test "
        f"rows; test accuracy {int8_acc:.2%} ({(int8_acc - float_acc) * 100:+.2f} points); "
        f"test evaluations so far: {n}",
        highlight=False,
    )
