"""Where a study's MLflow record goes and what identifies it: the tracking URI, the artifact
root, the commit of workbench's own source, and the resolved config as flat params."""

from __future__ import annotations

import base64
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from workbench.config import StudyConfig
from workbench.errors import StorageError

REACH_TIMEOUT_S = 3.0  # a tracking server that has not answered in this long is unreachable


def tracking_uri(cfg: StudyConfig) -> str:
    """The study file's URI, else MLFLOW_TRACKING_URI, else SQLite under the output folder.

    Always explicit: MLflow's own default falls back to a `./mlruns` file store, which now raises.
    """
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(Path(cfg.output_dir) / 'mlflow' / 'mlflow.db').resolve()}"


def check_server(cfg: StudyConfig, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """An HTTP tracking URI must answer MLflow's REST API: one GET of its experiment search,
    `timeout_s` seconds at most, with the credentials MLflow would send. A StorageError naming
    where the URI came from otherwise. Other URIs (a SQLite store) need no server."""
    uri = tracking_uri(cfg)
    if not cfg.tracking.enabled or not uri.startswith(("http://", "https://")):
        return
    where = "tracking.uri" if cfg.tracking.uri else "MLFLOW_TRACKING_URI"
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=_auth_headers()), timeout=timeout_s
        ):
            return
    except urllib.error.HTTPError as e:  # it answered, but not as a tracking server we may use
        if e.code in (401, 403):
            hint = "set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and _PASSWORD"
        else:
            hint = "is it an MLflow tracking server (`mlflow server`), at the right path?"
        raise StorageError(
            f"the MLflow tracking server {where} = {uri!r} answered HTTP {e.code} "
            f"({e.reason}) to GET /api/2.0/mlflow/experiments/search; {hint}"
        ) from None
    except (OSError, ValueError) as e:  # refused, unknown host, timed out, malformed URL
        reason = getattr(e, "reason", None) or e
        raise StorageError(
            f"cannot reach the MLflow tracking server {where} = {uri!r} ({reason}; waited "
            f"{timeout_s:g} s at most); start the server (`make ui` serves runs/mlflow), fix the "
            f"URI, or set tracking.enabled = false"
        ) from None


def _auth_headers() -> dict[str, str]:
    """The Authorization header MLflow's client sends for these environment variables."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    user, password = (os.environ.get(f"MLFLOW_TRACKING_{k}") for k in ("USERNAME", "PASSWORD"))
    if token:
        return {"Authorization": f"Bearer {token}"}
    if user and password:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {}


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
