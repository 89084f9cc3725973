"""The ensemble stage's MLflow record: the `ensemble` run, one child run per method, and the final
ensemble as one pyfunc model (an MLflow 3 logged model of the ensemble run: `runs:/<id>/model`).

The model comes packaged (workbench/export.py hands over a `ModelPackaged`: files, a loader name,
requirements, examples); nothing here imports the ensemble or export code."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from workbench.events import ModelPackaged
from workbench.tracking.runs import Tracker


def log_ensemble(tracker: Tracker, results: dict[str, Any], model: ModelPackaged) -> str:
    """Create the ensemble run, log into it, end it FINISHED (or FAILED with its children)."""
    exp = tracker.experiment_id()
    run_id = tracker.client.create_run(
        exp,
        run_name="ensemble",
        tags=tracker.tags(
            "ensemble",
            **{
                "workbench.chosen": results["chosen"],
                "workbench.test_evaluations": results["test_evaluations"],
            },
        ),
    ).info.run_id
    try:
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


def _log_ensemble(
    tracker: Tracker, run_id: str, results: dict[str, Any], model: ModelPackaged
) -> None:
    exp = tracker.experiment_id()
    best = next(m for m in results["members"] if m["name"] == results["best_single"])
    tracker.log_metrics(
        run_id,
        {
            **_scalars("test_", results["final"]["test"]),
            **_scalars("best_single_test_", best["test"]),
            "test_evaluations": results["test_evaluations"],
        },
    )
    tracker.client.log_dict(run_id, results, "ensemble/results.json")
    for name, method in results["methods"].items():
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
                **_scalars("test_", method["test"]),
                **_scalars("oof_", method["oof"]),
                **_scalars("oof_cv_", method["oof_cv"]),
            },
        )
        tracker.client.set_terminated(child, "FINISHED")
    _log_model(tracker, run_id, model)


def _log_model(tracker: Tracker, run_id: str, model: ModelPackaged) -> None:
    """The final ensemble as one pyfunc model. Its code (the workbench package) travels with it
    (code_paths), so a fresh process needs no install of ours. Requirements are given (inferring
    them costs 11-14 s)."""
    import mlflow
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracker.uri)
    # mlflow warns that python_model is cloudpickled: it is, a small class, by design
    quiet = logging.getLogger("mlflow.pyfunc")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        with mlflow.start_run(run_id=run_id):
            mlflow.pyfunc.log_model(
                name="model",
                python_model=_pyfunc_model(model.loader),
                artifacts=model.artifacts,
                code_paths=model.code_paths,
                signature=infer_signature(model.input_example, model.output_example),
                input_example=model.input_example,
                pip_requirements=model.requirements,
                registered_model_name=tracker.cfg.tracking.register_as,
            )
    finally:
        quiet.setLevel(level)


def _scalars(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of a metrics dict (lists such as per-class recall are left out)."""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def _pyfunc_model(loader: str) -> Any:
    """The pyfunc wrapper, built on first use so that importing workbench does not import
    mlflow.pyfunc (~1.7 s here). cloudpickle stores this class by value with the model; the
    packaged model object comes from `loader` ("module:attr") when the model is loaded."""
    from mlflow.pyfunc import PythonModel

    class EnsembleModel(PythonModel):  # type: ignore[misc]
        """`predict(images)`: float32 images (N, C, H, W) in [0, 1] -> class probabilities
        (N, classes), exactly the packaged model's predict_proba."""

        def __init__(self, loader: str) -> None:
            self.loader = loader

        def load_context(self, context):  # type: ignore[no-untyped-def]  # no hints: mlflow reads them
            import importlib

            module, _, name = self.loader.partition(":")
            target: Any = importlib.import_module(module)
            for part in name.split("."):
                target = getattr(target, part)
            self.model = target(context.artifacts["final"])

        # The hint is read by mlflow when the class is made: np.ndarray gives no schema to check
        # (the signature does that) and silences "Add type hints to the `predict` method". Only
        # names the body uses may appear in hints: cloudpickle keeps just those globals.
        def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:  # type: ignore[no-untyped-def]
            return self.model.predict_proba(np.asarray(model_input, dtype=np.float32))

    return EnsembleModel(loader)
