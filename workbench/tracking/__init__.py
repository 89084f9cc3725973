"""The MLflow record of a study: only this package imports mlflow (see runs.py for its shape)."""

from workbench.tracking.experiment import DataRef, TrialScore
from workbench.tracking.listener import FoldRuns
from workbench.tracking.model import CHAMPION, MODEL_SCHEMES, download_model
from workbench.tracking.runs import STATUS, Tracker, artifact_root, flatten, preload, tracking_uri
from workbench.tracking.settings import check_server

__all__ = [
    "CHAMPION",
    "MODEL_SCHEMES",
    "STATUS",
    "DataRef",
    "FoldRuns",
    "Tracker",
    "TrialScore",
    "artifact_root",
    "check_server",
    "download_model",
    "flatten",
    "preload",
    "tracking_uri",
]
