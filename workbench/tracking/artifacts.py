"""The run store's remote on MLflow (`tracking.artifacts = "mlflow"`): a sealed run's folder is
uploaded once, as the `files/` artifacts of its own MLflow run, and fetched back by URI on any
host. With a tracking server that serves artifacts (`mlflow server --serve-artifacts`), workers
and the ensemble stage on many hosts share nothing but the server's URL and the storage's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workbench.tracking.runs import Tracker

FOLDER = "files"  # the artifact path of a run's files inside its MLflow run


@dataclass(frozen=True)
class MlflowArtifacts:
    tracker: Tracker

    def upload(self, run: Path, record: str) -> str:
        client = self.tracker.client
        client.log_artifacts(record, str(run), FOLDER)
        return f"{client.get_run(record).info.artifact_uri.rstrip('/')}/{FOLDER}"

    def download(self, uri: str, dest: Path) -> Path:
        from mlflow.artifacts import download_artifacts

        dest.mkdir(parents=True, exist_ok=True)
        got = download_artifacts(
            artifact_uri=uri, dst_path=str(dest), tracking_uri=self.tracker.uri
        )
        return Path(got)
