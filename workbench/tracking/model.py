"""The ensemble stage's MLflow record: the `ensemble` run, one child run per method, and the final
ensemble as one pyfunc model (an MLflow 3 logged model of the ensemble run: `runs:/<id>/model`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from workbench.tracking.runs import Tracker


def log_ensemble(
    tracker: Tracker, results: dict[str, Any], final_dir: Path, input_example: np.ndarray
) -> str:
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
        _log_ensemble(tracker, run_id, results, final_dir, input_example)
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
    tracker: Tracker,
    run_id: str,
    results: dict[str, Any],
    final_dir: Path,
    input_example: np.ndarray,
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
    _log_model(tracker, run_id, final_dir, input_example)


def _log_model(tracker: Tracker, run_id: str, final_dir: Path, input_example: np.ndarray) -> None:
    """The final ensemble as one pyfunc model: every member's weights, the combiner, the
    class names; the workbench package travels with it (code_paths), so a fresh process
    needs no install of ours. Requirements are given (inferring them costs 11-14 s)."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    import workbench
    from workbench.ensemble.final import FinalEnsemble

    output = FinalEnsemble.load(final_dir).predict_proba(input_example)
    mlflow.set_tracking_uri(tracker.uri)
    # mlflow warns that python_model is cloudpickled: it is, a small class, by design
    quiet = logging.getLogger("mlflow.pyfunc")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        with mlflow.start_run(run_id=run_id):
            mlflow.pyfunc.log_model(
                name="model",
                python_model=_pyfunc_model(),
                artifacts={"final": str(final_dir)},
                code_paths=[str(Path(workbench.__file__).parent)],
                signature=infer_signature(input_example, output),
                input_example=input_example,
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    "numpy",
                    "scipy",
                    "scikit-learn",
                    "pydantic",
                ],
                registered_model_name=tracker.cfg.tracking.register_as,
            )
    finally:
        quiet.setLevel(level)


def _scalars(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of a metrics dict (lists such as per-class recall are left out)."""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def _pyfunc_model() -> Any:
    """The pyfunc wrapper, built on first use so that importing workbench does not import
    mlflow.pyfunc (~1.7 s here). cloudpickle stores this class by value with the model."""
    from mlflow.pyfunc import PythonModel

    class EnsembleModel(PythonModel):  # type: ignore[misc]
        """`predict(images)`: float32 images (N, C, H, W) in [0, 1] -> class probabilities
        (N, classes), exactly workbench's FinalEnsemble.predict_proba."""

        def load_context(self, context):  # type: ignore[no-untyped-def]  # no hints: mlflow reads them
            from workbench.ensemble.final import FinalEnsemble

            self.model = FinalEnsemble.load(context.artifacts["final"])

        # The hint is read by mlflow when the class is made: np.ndarray gives no schema to check
        # (the signature does that) and silences "Add type hints to the `predict` method". Only
        # names the body uses may appear in hints: cloudpickle keeps just those globals.
        def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:  # type: ignore[no-untyped-def]
            return self.model.predict_proba(np.asarray(model_input, dtype=np.float32))

    return EnsembleModel()
