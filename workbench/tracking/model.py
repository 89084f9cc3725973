"""The ensemble stage's MLflow record: the `ensemble` run, one child run per method, and the final
ensemble as one pyfunc model (an MLflow 3 logged model of the ensemble run: `runs:/<id>/model`).

The model comes packaged (workbench/export.py hands over a `ModelPackaged`: files, a loader name,
requirements, examples); nothing here imports the ensemble or export code."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from workbench.config import StudyConfig
from workbench.errors import ConfigError
from workbench.events import ModelPackaged
from workbench.results import EnsembleResult
from workbench.store import RunStore
from workbench.tracking.runs import Tracker
from workbench.tracking.settings import tracking_uri

CHAMPION = "champion"  # the alias the newest registered final model gets
STUDENT = "student"  # the alias (and the logged model's name) of the distilled student


def log_ensemble(tracker: Tracker, results: EnsembleResult, model: ModelPackaged) -> str:
    """Create the ensemble run, log into it, end it FINISHED (or FAILED with its children)."""
    exp = tracker.experiment_id()
    run_id = tracker.client.create_run(
        exp,
        run_name="ensemble",
        tags=tracker.tags(
            "ensemble",
            **{
                "workbench.shipped": results.final.method,
                "workbench.member_alone": str(results.choice.alone).lower(),
                "workbench.test_evaluations": str(results.test_evaluations),
                "mlflow.note.content": ladder_note(results),  # the run's description in the UI
            },
        ),
    ).info.run_id
    try:
        tracker.log_data(run_id, "test")  # the data it was evaluated on, as a dataset input
        _log_ensemble(tracker, run_id, results, model)
    except BaseException:
        children = tracker.find_runs(
            f"tags.`mlflow.parentRunId` = '{run_id}' and attributes.status = 'RUNNING'"
        )
        for run in [*children, tracker.client.get_run(run_id)]:
            tracker.client.set_terminated(run.info.run_id, "FAILED")
        raise
    tracker.client.set_terminated(run_id, "FINISHED")
    return run_id


def ladder_metrics(results: EnsembleResult) -> dict[str, float]:
    """The final model's test metrics (test_*), and per rung `rung/<name>/test_*`, the gains over
    the rung below and one network (`.../gain_*`, with CI ends) and the cost."""
    out = {**_scalars("test_", results.final.test), "test_evaluations": results.test_evaluations}
    for r in results.ladder:
        key = f"rung/{r.name}/"
        out.update(_scalars(f"{key}test_", r.test))
        for tag, paired in (("below", r.vs_below), ("network", r.vs_network)):
            if paired is not None:
                for metric in ("accuracy", "log_loss"):
                    i = getattr(paired, metric)
                    out[f"{key}gain_vs_{tag}_{metric}"] = i.diff
                    out[f"{key}gain_vs_{tag}_{metric}_ci_low"] = i.ci_low
                    out[f"{key}gain_vs_{tag}_{metric}_ci_high"] = i.ci_high
        if r.cost is not None:
            out[f"{key}ms_per_image"] = r.cost.ms_per_image
            out[f"{key}parameters"] = r.cost.parameters
            out[f"{key}weight_bytes"] = r.cost.bytes
    return out


def ladder_note(results: EnsembleResult) -> str:
    """The ladder as a Markdown table: the ensemble run's description on its MLflow page."""
    lines = [
        f"**Shipped: {results.final.method}.** {results.choice.reason}",
        "",
        f"Test split: {results.n_test} rows, looked at {results.test_evaluations} time(s).",
        "",
        "| rung | accuracy | log loss | Δ acc vs below (95% CI) | Δ acc vs one network | ms/img |",
        "|---|---|---|---|---|---|",
    ]
    for r in results.ladder:
        cells = [r.label if r.kind == "final" else r.name, f"{r.test.accuracy:.2%}"]
        cells.append(f"{r.test.log_loss:.4f}")
        for paired in (r.vs_below, r.vs_network):
            i = paired.accuracy if paired else None
            cells.append(f"{i.diff:+.2%} ({i.ci_low:+.2%}, {i.ci_high:+.2%})" if i else "")
        cells.append(f"{r.cost.ms_per_image:.3f}" if r.cost else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _log_ensemble(
    tracker: Tracker, run_id: str, results: EnsembleResult, model: ModelPackaged
) -> None:
    exp = tracker.experiment_id()
    tracker.log_metrics(run_id, ladder_metrics(results))
    tracker.client.log_dict(run_id, results.to_json(), "ensemble/results.json")
    for name, method in results.methods.items():
        child = tracker.client.create_run(
            exp,
            run_name=f"ensemble/{name}",
            tags=tracker.tags(
                "ensemble", **{"mlflow.parentRunId": run_id, "workbench.method": name}
            ),
        ).info.run_id
        tracker.log_metrics(
            child,
            {
                **_scalars("test_", method.test),
                **_scalars("oof_", method.oof),
                **_scalars("oof_cv_", method.oof_cv),
            },
        )
        tracker.client.set_terminated(child, "FINISHED")
    _log_model(tracker, run_id, model)
    if model.student is not None:
        _log_model(tracker, run_id, model.student, STUDENT, STUDENT)


def _log_model(
    tracker: Tracker, run_id: str, model: ModelPackaged, name: str = "model", alias: str = CHAMPION
) -> None:
    """The final ensemble (or the distilled student, `name` "student") as one pyfunc model,
    with the files handed over (the ONNX graph) beside it. Its code (the workbench package)
    travels with it (code_paths), so a fresh process needs no install of ours; its
    requirements come packaged. With `tracking.register_as`, the new version gets `alias`."""
    import mlflow
    from mlflow.models import ModelSignature, infer_signature

    mlflow.set_tracking_uri(tracker.uri)
    # no input schema: the model takes pixels or encoded files and checks them itself, with
    # errors that say what it takes (a schema would reject every form but one)
    outputs = infer_signature(model.input_example, model.output_example).outputs
    # mlflow warns that python_model is cloudpickled: it is, a small class, by design
    quiet = logging.getLogger("mlflow.pyfunc")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=_pyfunc_model(model.loader),
                artifacts=model.artifacts,
                code_paths=model.code_paths,
                signature=ModelSignature(inputs=None, outputs=outputs),
                input_example=model.input_example,
                pip_requirements=[*model.requirements, f"mlflow=={mlflow.__version__}"],
                registered_model_name=tracker.cfg.tracking.register_as,
            )
    finally:
        quiet.setLevel(level)
    for folder, paths in model.files.items():
        for path in paths:
            tracker.client.log_artifact(run_id, path, folder)
    registered = tracker.cfg.tracking.register_as
    if registered and info.registered_model_version is not None:
        version = info.registered_model_version
        tracker.client.set_registered_model_alias(registered, alias, version)


def _scalars(prefix: str, record: BaseModel) -> dict[str, float]:
    """The scalar fields of a record (lists such as per-class recall are left out)."""
    return {
        f"{prefix}{k}": float(v)
        for k, v in record.model_dump().items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _pyfunc_model(loader: str) -> Any:
    """The pyfunc wrapper, built on first use so that importing workbench does not import
    mlflow.pyfunc (~1.7 s here). cloudpickle stores this class by value with the model; the
    packaged model object comes from `loader` ("module:attr") when the model is loaded."""
    from mlflow.pyfunc import PythonModel

    class EnsembleModel(PythonModel):  # type: ignore[misc]
        """`predict(images)` -> DataFrame (label, probability, p_<class>...): images as uint8
        pixels, floats in [0, 1], or a DataFrame `image` column of base64 PNG/JPEG files."""

        def __init__(self, loader: str, artifact: str) -> None:
            self.loader = loader
            self.artifact = artifact  # the final model folder's name among the artifacts

        def load_context(self, context):  # type: ignore[no-untyped-def]  # no hints: mlflow reads them
            import importlib

            module, _, name = self.loader.partition(":")
            target: Any = importlib.import_module(module)
            for part in name.split("."):
                target = getattr(target, part)
            self.model = target(context.artifacts[self.artifact])

        # The hint: mlflow infers no schema from np.ndarray and passes any input through (a
        # DataFrame too), and it silences "Add type hints to the `predict` method"; the model
        # checks its inputs itself. Only names the body uses may appear in hints: cloudpickle
        # keeps just those globals. Its errors (ValueError: not an input it takes) become
        # MlflowException, which the scoring server answers with the message and 400.
        def predict(self, context, model_input: np.ndarray, params=None):  # type: ignore[no-untyped-def]
            from mlflow.exceptions import MlflowException

            try:
                return self.model.predict(model_input)
            except ValueError as e:
                raise MlflowException.invalid_parameter_value(str(e)) from None

    return EnsembleModel(loader, RunStore.FINAL_ARTIFACT)


MODEL_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:", "file:", "s3:", "gs:", "http")


def download_model(cfg: StudyConfig, uri: str, dest: Path) -> Path:
    """The final model folder inside the logged model at `uri` (`runs:/<id>/model`,
    `models:/<name>@champion`, `models:/<name>/<version>`), fetched from the study's MLflow
    store into `dest`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri(cfg))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except (MlflowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"--model {uri}: no model there in the MLflow store {tracking_uri(cfg)} ({first}); "
            "pass runs:/<run id>/model, models:/<name>@<alias>, models:/<name>/<version> "
            "or a final model folder"
        ) from None
    final = local / "artifacts" / RunStore.FINAL_ARTIFACT
    if not RunStore.is_final(final):
        raise ConfigError(f"--model {uri}: not a workbench final model (no artifacts/final)")
    return final
