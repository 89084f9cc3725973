"""What a training run tells the rest of workbench: events, emitted by cross-validation, heard by
whoever subscribes (tracking, a test). The emitter knows no listener: `cv` imports no tracking.

A run is one configuration trained on the study's k folds (an Optuna trial or a snapshot run),
named by `RunRef`. Per fold, in order: `FoldStarted`, one `EpochEnded` per epoch, then either
`CheckpointWritten` and `FoldEnded("COMPLETE")`, or `FoldEnded` with the state that stopped it
(PRUNED, KILLED, FAIL). A fold kept from an interrupted earlier try emits `FoldResumed` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


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
