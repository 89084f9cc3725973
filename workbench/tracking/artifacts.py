"""The run store's remote on MLflow (`tracking.artifacts = "mlflow"`): the store's layout mirrored
as artifacts of each model's `study:<model>` run (trials/<model>/<nnnn>/fold-0.pt, ...), so that
every try of a trial, on any host, writes to and reads from the same folder. With a tracking
server that serves artifacts (`mlflow server --serve-artifacts`), workers and the ensemble stage
on many hosts share nothing but the server's URL and the storage's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from workbench.tracking.runs import WRITER, Tracker


@dataclass
class MlflowArtifacts:
    tracker: Tracker
    _roots: dict[str, str] = field(default_factory=dict)  # study run id -> its artifact URI

    def _place(self, key: str) -> tuple[str, str]:
        """(the study run that holds `key`, the artifact path): keys are <kind>/<model>/..."""
        model = PurePosixPath(key).parts[1]
        return self.tracker.study_run(model), key

    def put(self, key: str, path: Path) -> None:
        """Queued on the tracking thread: the upload runs beside training, in order (a fold's
        record after its checkpoints). The file is complete and never rewritten."""

        def upload() -> None:
            run, where = self._place(key)
            self.tracker.client.log_artifact(run, str(path), str(PurePosixPath(where).parent))

        WRITER.defer(upload)

    def uri(self, key: str) -> str:
        return WRITER.call(lambda: self._uri(key))

    def _uri(self, key: str) -> str:
        run, where = self._place(key)
        if run not in self._roots:
            self._roots[run] = self.tracker.client.get_run(run).info.artifact_uri.rstrip("/")
        return f"{self._roots[run]}/{where}"

    def get(self, uri: str, dest: Path) -> Path | None:
        from mlflow.artifacts import download_artifacts, list_artifacts

        WRITER.flush()  # this host's own uploads first
        if not list_artifacts(artifact_uri=uri, tracking_uri=self.tracker.uri):
            return None
        dest.mkdir(parents=True, exist_ok=True)
        return Path(
            download_artifacts(artifact_uri=uri, dst_path=str(dest), tracking_uri=self.tracker.uri)
        )
