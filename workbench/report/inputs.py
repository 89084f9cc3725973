"""What the report is made of: plain data gathered by the CLI from the study, tracking and results.

No torch, optuna or mlflow here: the report renders whatever these dataclasses and the ensemble
stage's typed record (workbench/results.py) hold, and a section whose input is missing (`None`,
empty) says so in one line instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workbench.results import EnsembleResult, Spending, TestLook


@dataclass(frozen=True)
class TrialRow:
    """One Optuna trial."""

    model: str
    number: int
    state: str  # "COMPLETE" | "PRUNED" | "FAIL" | "RUNNING"
    # CV mean of the study metric: None unless COMPLETE (a PRUNED trial may carry its last report)
    value: float | None
    cv_std: float | None  # std of the study metric over folds
    params: dict[str, Any]  # hyperparameters, names as in the study file
    seconds: float | None  # wall time
    mlflow_run_id: str | None
    # what it trained: epochs summed over folds x folds started, e.g. "7 ep x 1 fold" (None for
    # trials from before it was recorded); epochs_trained is that sum (the column's sort key)
    used: str | None = None
    epochs_trained: int | None = None


@dataclass(frozen=True)
class ModelSection:
    """One base model's Optuna study."""

    model: str
    metric: str  # "accuracy" | "log_loss"
    direction: str  # "maximize" | "minimize"
    trials: list[TrialRow]  # every trial, any state, in number order
    importances: dict[str, float]  # hyperparameter -> importance (Optuna's fANOVA), may be empty
    # trial number -> per fold -> per epoch {train_loss, val_loss, val_accuracy, lr}: best trials
    curves: dict[int, list[list[dict[str, float]]]]


@dataclass(frozen=True)
class ReportInputs:
    """Everything one report shows."""

    study: str  # study name
    config: dict[str, Any]  # the resolved study file (nested dict)
    data_source: str  # e.g. "digits (1797 images)"
    in_shape: tuple[int, int, int]  # (C, H, W)
    classes: list[str]  # class names (from user folders: escaped on output)
    split: dict[str, Any]  # {"train", "test", "kind", "groups", "fingerprint", "folds"}
    stage_seconds: dict[str, float]  # e.g. {"search": 300.0, "ensemble": 20.0, "report": 2.0}
    tracking: dict[str, Any] | None  # {"uri", "experiment_id", "ui_url" | None, "study_runs"}
    models: list[ModelSection]
    ensemble: EnsembleResult | None  # the ensemble stage's result, None if not run yet
    misclassified_images: Any | None  # float array (n, H, W) or (n, H, W, C) in [0, 1]
    created: str  # ISO timestamp
    skipped_files: list[str] = field(default_factory=list)  # "path: reason" (on_bad_file = skip)
    budget: Spending | None = None  # search.budget of the last `workbench study`, and its use
    # every look at the test split so far, by any command, oldest first (the store's log)
    test_looks: list[TestLook] = field(default_factory=list)
