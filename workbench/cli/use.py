"""The commands that use a study's final model: `predict` and `export`.

workbench predict FILE IMAGES... [--out table.csv] [--model M] [--member NAME]   new images
workbench export FILE --onnx PATH [--quantize]                                  one ONNX graph

M is the final model folder (default: the study's own), an MLflow model URI (`runs:/<id>/model`)
or a registered model's alias or version (`models:/<name>@champion`, `models:/<name>/3`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from workbench.cli.commands import DataOpt, StudyFile, _fail, app, prepare
from workbench.config import StudyConfig, load_study
from workbench.console import console, labels_table
from workbench.errors import ConfigError, WorkbenchError
from workbench.final import FinalEnsemble
from workbench.runtime import configure_threads
from workbench.store import RunStore
from workbench.tracking import MODEL_SCHEMES, download_model

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="final model folder, runs:/<id>/model or models:/<name>@<alias>; "
        "default: the study's own",
    ),
]
MemberOpt = Annotated[
    str | None,
    typer.Option("--member", help="one member (any candidate of the ensemble) alone: cnn/trial-3"),
]


def final_model(
    cfg: StudyConfig, file: Path, model: str | None, member: str | None
) -> FinalEnsemble:
    """The final model a command names, loaded (and, for a URI, fetched from MLflow)."""
    if model and model.startswith(MODEL_SCHEMES):
        with tempfile.TemporaryDirectory(prefix="workbench-model-") as tmp:
            final = FinalEnsemble.load(download_model(cfg, model, Path(tmp)))
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
    return final.member(member, candidates)


@app.command()
def predict(
    file: StudyFile,
    images: Annotated[list[str], typer.Argument(help="image files, folders or glob patterns")],
    out: Annotated[Path, typer.Option("--out", help="the table: .csv, or .parquet")] = Path(
        "predictions.csv"
    ),
    model: ModelOpt = None,
    member: MemberOpt = None,
    labels_from_folders: Annotated[
        bool, typer.Option(help="each image's class is its folder's name: report accuracy")
    ] = False,
    strict: Annotated[bool, typer.Option(help="a file that is not an image is an error")] = False,
) -> None:
    """Predict new images with the study's final model; prepared as its training images were."""
    from rich.progress import Progress

    from workbench import predict as predicting

    configure_threads(1)
    try:
        final = final_model(load_study(file), file, model, member)
        files = predicting.image_files(images)
        with Progress(transient=True, console=console) as bar:
            task = bar.add_task(f"predicting {len(files)} files", total=len(files))
            result = predicting.predict_files(final, files, strict, lambda n: bar.advance(task, n))
        for line in result.skipped:
            console.print(f"[yellow]warning:[/] skipped {escape(line)}", highlight=False)
        truth = (
            predicting.folder_labels(result.paths, result.classes) if labels_from_folders else None
        )
        predicting.write_table(out, result.table(truth))
        console.print(f"{len(result.paths)} image(s) predicted: {out}")
        if truth is not None:
            console.print(labels_table(truth, result.labels, result.classes))
    except WorkbenchError as e:
        raise _fail(e) from None


@app.command()
def export(
    file: StudyFile,
    onnx: Annotated[Path, typer.Option("--onnx", help="where to write the ONNX graph")],
    quantize: Annotated[
        bool, typer.Option(help="also write a dynamically int8-quantized graph (<name>.int8.onnx)")
    ] = False,
    data: DataOpt = None,
    model: ModelOpt = None,
    member: MemberOpt = None,
) -> None:
    """Write the final model as one ONNX graph, checked with onnxruntime on the test split."""
    from workbench import graph

    configure_threads(1)
    try:
        cfg, ds, split = prepare(file, data, None, "ensemble")  # the ensemble stage's checks
        final = final_model(cfg, file, model, member)
        x, y = ds.rows(split.test_idx), ds.y[split.test_idx].numpy()
        checked = graph.export_onnx(final, onnx, x, y)
        console.print(
            f"{onnx}: {checked.bytes / 1e6:.2f} MB; on the {checked.rows} test rows every label "
            f"equals the torch model's, max |p_onnx - p_torch| = {checked.max_abs_diff:.1e}, "
            f"accuracy {checked.accuracy:.2%}",
            highlight=False,
        )
        if quantize:
            q = graph.quantize(onnx, onnx.with_suffix(".int8.onnx"), x, y)
            console.print(
                f"{q['path']}: {q['bytes'] / 1e6:.2f} MB ({q['bytes'] / q['float_bytes']:.0%} of "
                f"the float graph); test accuracy {q['accuracy']:.2%} "
                f"({q['accuracy_change'] * 100:+.2f} points)",
                highlight=False,
            )
    except WorkbenchError as e:
        raise _fail(e) from None
