"""Where a study's MLflow record goes and what identifies it: the tracking URI, the artifact
root, the commit of workbench's own source, and the resolved config as flat params."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from workbench.config import StudyConfig


def tracking_uri(cfg: StudyConfig) -> str:
    """The study file's URI, else MLFLOW_TRACKING_URI, else SQLite under the output folder.

    Always explicit: MLflow's own default falls back to a `./mlruns` file store, which now raises.
    """
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(Path(cfg.output_dir) / 'mlflow' / 'mlflow.db').resolve()}"


def artifact_root(cfg: StudyConfig) -> str | None:
    """Artifacts of the default local store go beside it; a tracking server places its own
    (with `--serve-artifacts`, as mlflow-artifacts:/ URIs every host can reach)."""
    if tracking_uri(cfg).startswith(("http://", "https://")):
        return None
    return (Path(cfg.output_dir) / "mlflow" / "artifacts").resolve().as_uri()


def git_commit() -> str:
    """The commit of workbench's own source (not of the current folder: studies run anywhere)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.1}} -> {"train.lr": "0.1"}: the resolved config as MLflow params."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out
