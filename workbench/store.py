"""The run store: the one module that knows where a study's files live, and checks what it reads.

Layout under the study's output folder (`<output_dir>/<name>/`):

    split.npz                     the held-out split (made once, checked on every run)
    trials/<model>/<nnnn>/        one cross-validated run of an Optuna trial; nnnn is the number
                                  of the trial's first try, so a retry resumes in the same folder
        fold-<k>.pt               fold k's model (state dict + what rebuilds it)
        fold-<k>.npz              fold k's result: its validation rows (`rows`), their class
                                  probabilities (`proba`) and, with snapshots, `snap_proba`;
                                  written last, so it marks the fold complete
        fold-<k>.json             fold k's per-epoch history and best epoch
        oof.npz                   the whole run: rows (data indices), y, proba, every row once
        history.json              per fold, per epoch: train_loss, val_loss, val_accuracy, lr
        snap-<m>/fold-<k>.pt      with cosine_restarts cycles > 1: weights at the end of cycle m,
        snap-<m>/oof.npz          and their own out-of-fold probabilities
    snapshots/<model>/<nnnn>/     the snapshot run of trial nnnn's configuration, the same layout
    refits/<model>/<nnnn>/        trial nnnn's configuration trained once on every training row:
        model.pt, history.json
    ensemble/                     results.json, test_evaluations.json, mlflow.json, final/,
                                  candidates.json, model.onnx; with [distill], student-run/
                                  (its training: model.pt, history.json) and student/ (final/'s
                                  layout, one network)
    logs/worker-<i>.log, timings.json, study.resolved.json, optuna.db (the default storage)

A completed run is sealed: its manifest (the folder's URI, and the sha256 and size of every
file) is recorded on its trial, and every later reader opens the run through `open_run`, which
checks each file against it. Files are written once, atomically, by the stage that makes them.

Many hosts: with a `Remote` (tracking's MLflow artifact store, `tracking.artifacts = "mlflow"`),
the remote mirrors this layout. Each file is uploaded once, when it is complete: a fold's files
when the fold ends (its record last), the run's own files when it is sealed; the manifest names
the remote folder. A retry on another host first pulls the folds its earlier tries finished
(`pull`). A host that does not have a sealed run downloads it once into `cache/<key>/`, checks
every file against the manifest, and reads it from there; a cached copy that still matches is
used as it is.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import numpy as np

from workbench.errors import CheckpointError
from workbench.files import atomic_write, file_digest, load_npz, save_npz
from workbench.results import EnsembleResult, ResultsFormatError, TestLook

Manifest = dict[str, Any]  # {"uri": folder URI, "files": {relative path: {"sha256", "bytes"}}}


@dataclass(frozen=True)
class FoldRecord:
    """A completed fold, as written beside its checkpoint."""

    rows: np.ndarray  # (n_val,) positions in the training rows
    proba: np.ndarray  # (n_val, classes)
    snap_proba: np.ndarray  # (snapshots, n_val, classes); (0, n_val, classes) without snapshots
    history: list[dict[str, float]]  # per epoch
    best_epoch: int


class Remote(Protocol):
    """A copy of the store's layout beyond this host; keys are paths relative to the store."""

    def put(self, key: str, path: Path) -> None:
        """Upload file `path` as `key` (e.g. trials/cnn/0003/fold-0.pt)."""
        ...

    def uri(self, key: str) -> str:
        """The URI of folder `key` on the remote."""
        ...

    def get(self, uri: str, dest: Path) -> Path | None:
        """Download the folder at `uri` into `dest`; the local folder, or None if it is empty."""
        ...


@dataclass(frozen=True)
class RunStore:
    """Paths of one study's files, and the only code that builds them."""

    root: Path  # the study's output folder
    remote: Remote | None = None  # None: every run stays on the host that made it

    # --- where things go ----------------------------------------------------------------------

    def trial(self, model: str, number: int) -> Path:
        return self.root / "trials" / model / f"{number:04d}"

    def followup(self, model: str, kind: str, of_trial: int) -> Path:
        """A follow-up run of trial `of_trial`'s configuration (search/followups.py): its
        snapshot run (kind "snapshots") or its refit on every training row ("refit")."""
        folder = {"snapshots": "snapshots", "refit": "refits"}[kind]
        return self.root / folder / model / f"{of_trial:04d}"

    @property
    def ensemble(self) -> Path:
        return self.root / "ensemble"

    @property
    def final(self) -> Path:
        return self.ensemble / "final"

    @property
    def results(self) -> Path:
        """The ensemble stage's one look at the test split (workbench/results.py)."""
        return self.ensemble / "results.json"

    def ensemble_result(self) -> EnsembleResult | None:
        """The stored result; None when there is none or it is of another workbench's layout
        (the ensemble stage then evaluates anew)."""
        if not self.results.exists():
            return None
        try:
            return EnsembleResult.loads(self.results.read_bytes())
        except ResultsFormatError:
            return None

    @property
    def test_log(self) -> Path:
        """Every look at the test split, by any command: a JSON list of `TestLook`s."""
        return self.ensemble / "test_evaluations.json"

    def count_test_look(self, look: TestLook) -> int:
        """Append `look` to the study's log of looks at the test split; how many there have been.
        Every command that scores the held-out rows calls this, and only this."""
        log = self.test_log
        entries = json.loads(log.read_text()) if log.exists() else []
        entries.append(look.to_json())
        atomic_write(log, lambda f: f.write(json.dumps(entries, indent=1).encode()))
        return len(entries)

    def test_looks(self) -> list[TestLook]:
        """The looks counted so far (entries of an older layout count, as bare looks)."""
        if not self.test_log.exists():
            return []
        return [
            TestLook.from_json(e)
            if "command" in e
            else TestLook(
                time=e.get("time", ""),
                command="ensemble",
                what="every member and method",
                rows=0,
                fingerprint=e.get("fingerprint", ""),
            )
            for e in json.loads(self.test_log.read_text())
        ]

    @property
    def mlflow_link(self) -> Path:
        """Where the logged final model is: {"run_id", "model_uri", "uri"} (tracking on)."""
        return self.ensemble / "mlflow.json"

    @property
    def candidates(self) -> Path:
        """Every candidate member's fold checkpoints, relative to the study's folder."""
        return self.ensemble / "candidates.json"

    @property
    def student_run(self) -> Path:
        """Where the distilled student trains: model.pt, history.json (a refit's layout)."""
        return self.ensemble / "student-run"

    @property
    def student_checkpoint(self) -> Path:
        """The trained student's network (a refit's checkpoint, in student_run)."""
        return self.refit_checkpoint(self.student_run)

    @property
    def student(self) -> Path:
        """The distilled student packaged as a final model (final/'s layout, one network)."""
        return self.ensemble / "student"

    @property
    def onnx(self) -> Path:
        """The final model as one ONNX graph (workbench/graph.py)."""
        return self.ensemble / "model.onnx"

    @property
    def images(self) -> Path:
        """The image store: the dataset decoded once (workbench/data/imagestore.py)."""
        return self.root / "images"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def file(self, name: str) -> Path:
        """A study-level file: split.npz, timings.json, study.resolved.json, optuna.db."""
        return self.root / name

    def relative(self, folder: Path) -> str:
        """A folder as the trial records it: relative to the study's folder (portable)."""
        return folder.relative_to(self.root).as_posix()

    # --- the final model's folder (workbench/export.py writes it, workbench/final.py loads it) --

    FINAL_ARTIFACT = "final"  # the folder's name inside a logged MLflow model's artifacts/

    @staticmethod
    def final_meta(folder: Path) -> Path:
        """classes, input shape, members, the rule, the preprocessing (JSON)."""
        return folder / "ensemble.json"

    @staticmethod
    def final_checkpoint(folder: Path, member: int, fold: int) -> Path:
        """Member `member`'s fold model `fold` (a state dict with what rebuilds it)."""
        return folder / "members" / str(member) / f"fold-{fold}.pt"

    @staticmethod
    def is_final(folder: Path) -> bool:
        return RunStore.final_meta(folder).is_file()

    # --- inside a run folder ------------------------------------------------------------------

    @staticmethod
    def checkpoint(run: Path, fold: int) -> Path:
        return run / f"fold-{fold}.pt"

    @staticmethod
    def snapshot(run: Path, m: int) -> Path:
        return run / f"snap-{m}"

    @staticmethod
    def snapshot_dirs(run: Path) -> list[Path]:
        """snap-0, snap-1, ... in cycle order."""
        return sorted(run.glob("snap-*"), key=lambda p: int(p.name.split("-")[1]))

    @staticmethod
    def refit_checkpoint(run: Path) -> Path:
        """A refit's one model, trained on every training row."""
        return run / "model.pt"

    @staticmethod
    def oof(run: Path) -> Path:
        return run / "oof.npz"

    @staticmethod
    def history(run: Path) -> Path:
        return run / "history.json"

    def write_fold(self, run: Path, fold: int, record: FoldRecord) -> None:
        """Record a completed fold (its checkpoints are already written): history, then the
        probabilities, whose file marks the fold complete; with a remote, upload the fold's
        files in that order."""
        meta = {"history": record.history, "best_epoch": record.best_epoch}
        atomic_write(run / f"fold-{fold}.json", lambda f: f.write(json.dumps(meta).encode()))
        save_npz(
            run / f"fold-{fold}.npz",
            rows=record.rows,
            proba=record.proba,
            snap_proba=record.snap_proba,
        )
        snaps = [
            self.checkpoint(self.snapshot(run, m), fold) for m in range(len(record.snap_proba))
        ]
        self._push([self.checkpoint(run, fold), *snaps, run / f"fold-{fold}.json"])
        self._push([run / f"fold-{fold}.npz"])

    def pull(self, run: Path) -> list[str]:
        """Fetch from the remote the files of `run` that this host lacks (the folds an earlier
        try finished elsewhere); returns their names. Local files are kept as they are."""
        if self.remote is None:
            return []
        tmp = run.with_name(run.name + ".pull")
        shutil.rmtree(tmp, ignore_errors=True)
        got = self.remote.get(self.remote.uri(self.relative(run)), tmp)
        fetched = []
        if got is not None:
            for path in sorted(p for p in got.rglob("*") if p.is_file()):
                dst = run / path.relative_to(got)
                if not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(path, dst)
                    fetched.append(dst.relative_to(run).as_posix())
        shutil.rmtree(tmp, ignore_errors=True)
        return fetched

    def _push(self, paths: list[Path]) -> None:
        if self.remote is not None:
            for path in paths:
                self.remote.put(self.relative(path), path)

    def read_fold(self, run: Path, fold: int) -> FoldRecord | None:
        """A fold an earlier try completed, or None when it must be (re)trained: any of its
        files missing or unreadable, or fewer snapshot checkpoints than its probabilities say."""
        marker, meta = run / f"fold-{fold}.npz", run / f"fold-{fold}.json"
        if not (marker.exists() and meta.exists() and self.checkpoint(run, fold).exists()):
            return None
        try:
            arrays = load_npz(marker, what=f"fold {fold} result")
            info = json.loads(meta.read_text())
        except (CheckpointError, ValueError):
            return None
        snaps = arrays["snap_proba"]
        if not all(
            self.checkpoint(self.snapshot(run, m), fold).exists() for m in range(len(snaps))
        ):
            return None
        return FoldRecord(
            arrays["rows"], arrays["proba"], snaps, info["history"], info["best_epoch"]
        )

    def discard(self, run: Path) -> None:
        """Remove a run that will not complete (pruned, failed, out of retries)."""
        shutil.rmtree(run, ignore_errors=True)

    # --- sealed runs --------------------------------------------------------------------------

    def seal(self, run: Path) -> Manifest:
        """The manifest of a completed run: every file under it with its sha256 and size. With
        a remote, the run's own files are uploaded now (its folds' were, as each ended) and the
        URI is the remote folder's."""
        paths = sorted(p for p in run.rglob("*") if p.is_file() and not p.name.startswith("."))
        files = {}
        for path in paths:
            digest, size = file_digest(path)
            files[path.relative_to(run).as_posix()] = {"sha256": digest, "bytes": size}
        if self.remote is None:
            return {"uri": run.resolve().as_uri(), "files": files}
        self._push([p for p in paths if not p.name.startswith("fold-")])
        return {"uri": self.remote.uri(self.relative(run)), "files": files}

    def open_run(self, manifest: Manifest | None, run: Path, what: str) -> Path:
        """The folder of a sealed run, each file checked against its manifest (size, sha256).

        `run` is where this store keeps it; where that folder is absent (the run was made on
        another host), a remote run is fetched into the cache, and a local one is an error
        saying where it is. Runs sealed before manifests existed (`manifest` None) are opened
        unchecked.
        """
        if manifest is None:
            return run
        if run.exists():
            return self._checked(manifest, run, what)
        if manifest["uri"].startswith("file:"):
            where = unquote(urlparse(manifest["uri"]).path)
            raise CheckpointError(
                f"{what}: its files are at {manifest['uri']}, which is not on this host "
                f"(looked in {run}; recorded as {where}); set tracking.artifacts = 'mlflow' so "
                f"that workers on many hosts share their files, or run the stage where they ran"
            )
        if self.remote is None:
            raise CheckpointError(
                f"{what}: its files are in MLflow ({manifest['uri']}); set tracking.artifacts = "
                f"'mlflow' (and the tracking URI) to fetch them"
            )
        cache = self.root / "cache" / hashlib.sha256(manifest["uri"].encode()).hexdigest()[:16]
        if cache.exists():
            try:
                return self._checked(manifest, cache, what)
            except CheckpointError:  # a stale or torn copy: fetch it again
                shutil.rmtree(cache)
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        got = self.remote.get(manifest["uri"], tmp)
        if got is None:
            raise CheckpointError(f"{what}: nothing at {manifest['uri']}")
        self._checked(manifest, got, what)
        got.rename(cache)
        shutil.rmtree(tmp, ignore_errors=True)
        return cache

    @staticmethod
    def _checked(manifest: Manifest, run: Path, what: str) -> Path:
        for name, want in manifest["files"].items():
            path = run / name
            if not path.exists():
                raise CheckpointError(f"{what}: {path} is missing (recorded in its manifest)")
            digest, size = file_digest(path)
            if (digest, size) != (want["sha256"], want["bytes"]):
                raise CheckpointError(
                    f"{what}: {path} does not match its manifest (sha256 {digest[:12]}..., "
                    f"{size} bytes; recorded {want['sha256'][:12]}..., {want['bytes']} bytes): "
                    f"it changed after the run completed"
                )
        return run
