"""What a training run tells the rest of workbench: events, emitted by cross-validation, heard by
whoever subscribes (tracking, a test). The emitter knows no listener: `cv` imports no tracking.

The export stage tells tracking what to log as the final model with `ModelPackaged`: files and
facts, no workbench objects, so tracking imports no ensemble or export code.

A run is one configuration trained on the study's k folds (an Optuna trial or a snapshot run),
named by `RunRef`. Per fold, in order: `FoldStarted`, one `EpochEnded` per epoch, then either
`CheckpointWritten` and `FoldEnded("COMPLETE")`, or `FoldEnded` with the state that stopped it
(PRUNED, KILLED, FAIL). A fold kept from an interrupted earlier try emits `FoldResumed` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunRef:
    """One cross-validated run: the study file's model section and the run's label."""

    model: str
    label: int | str  # the Optuna trial number, or e.g. "snapshots-of-3"
    record: str = ""  # the listener's own id for the run (an MLflow run id), opaque here


@dataclass(frozen=True)
class FoldStarted:
    run: RunRef
    fold: int


@dataclass(frozen=True)
class EpochEnded:
    run: RunRef
    fold: int
    epoch: int
    metrics: dict[str, float]  # train_loss, val_loss (nats), val_accuracy (0-1), lr


@dataclass(frozen=True)
class CheckpointWritten:
    run: RunRef
    fold: int
    uri: str  # where the run store keeps it
    sha256: str
    bytes: int


@dataclass(frozen=True)
class FoldEnded:
    run: RunRef
    fold: int
    state: str  # COMPLETE | PRUNED | KILLED | FAIL
    best_epoch: int | None = None  # the epoch whose weights were kept (COMPLETE only)


@dataclass(frozen=True)
class FoldResumed:
    """Fold `fold` was completed by an earlier try of this configuration and is not retrained."""

    run: RunRef
    fold: int
    history: list[dict[str, float]]  # the kept fold's per-epoch metrics, as EpochEnded had them
    best_epoch: int


@dataclass(frozen=True)
class ModelPackaged:
    """The final model, ready to log as a pyfunc model."""

    artifacts: dict[str, str]  # name -> local path ("final": the final model's folder)
    loader: str  # "module:attr", called with the "final" artifact's local path once loaded
    code_paths: list[str]  # the workbench package travels with the model
    requirements: list[str]  # pip requirements of the packaged code
    input_example: Any  # a request: DataFrame with an "image" column of base64 PNG files
    output_example: Any  # DataFrame: what the model returns for it (label, p_<class>, ...)
    # artifact folder -> local files beside (the ONNX graph, and its external data file if any)
    files: dict[str, list[str]] = field(default_factory=dict)
    student: ModelPackaged | None = None  # the distilled student, logged beside as "student"


Event = FoldStarted | EpochEnded | CheckpointWritten | FoldEnded | FoldResumed
Listener = Callable[[Event], None]


@dataclass
class Events:
    """A synchronous fan-out: `emit` calls every listener in subscription order. A listener that
    raises stops the emitter (so a failing record fails the fold, as before the seam existed)."""

    listeners: list[Listener] = field(default_factory=list)

    def subscribe(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def emit(self, event: Event) -> None:
        for listener in self.listeners:
            listener(event)
