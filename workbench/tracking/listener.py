"""Tracking's ear on cross-validation: the events of workbench/events.py become fold runs.

`FoldRuns(tracker)` is subscribed to a run's `Events` by whoever wires the stages. Per fold it
creates the `<model>/trial-<n>/fold-<k>` run under the trial run named by `RunRef.record`,
buffers each epoch's metrics, tags the checkpoint's URI and sha256 (the run store holds the file;
it is not copied into MLflow), and ends the run in one batch with the fold's state. A fold kept
from an earlier try of the trial gets a fold run too, holding the kept history, tagged as resumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workbench.events import (
    CheckpointWritten,
    EpochEnded,
    Event,
    FoldEnded,
    FoldResumed,
    FoldStarted,
)
from workbench.tracking.runs import WRITER, Tracker


@dataclass
class FoldRuns:
    tracker: Tracker
    _runs: dict[tuple[str, int], str] = field(default_factory=dict)  # (trial run, fold) -> run
    _tags: dict[str, dict[str, str]] = field(default_factory=dict)  # fold run -> tags at its end

    def __call__(self, event: Event) -> None:
        """Queue the event's MLflow calls on the tracking thread (writer.py): off the training
        path, in order, and every fold-run id used only on that thread."""
        if self.tracker.enabled and event.run.record:
            WRITER.defer(lambda: self._handle(event))

    def _handle(self, event: Event) -> None:
        key = (event.run.record, event.fold)
        if isinstance(event, FoldStarted | FoldResumed):
            run = event.run
            self._runs[key] = self.tracker.start_fold(run.record, run.model, run.label, event.fold)
        fold_run = self._runs.get(key)
        if fold_run is None:  # an event of a fold we did not see start: nothing to attach it to
            return
        if isinstance(event, EpochEnded):
            self.tracker.log_epoch(fold_run, event.epoch, event.metrics)
        elif isinstance(event, CheckpointWritten):
            self._tags[fold_run] = {
                "workbench.checkpoint": event.uri,
                "workbench.checkpoint_sha256": event.sha256,
            }
        elif isinstance(event, FoldResumed):
            for epoch, metrics in enumerate(event.history):
                self.tracker.log_epoch(fold_run, epoch, metrics)
            tags = {"workbench.note": "completed by an earlier try of this trial; not retrained"}
            self._end(key, "COMPLETE", event.best_epoch, tags)
        elif isinstance(event, FoldEnded):
            self._end(key, event.state, event.best_epoch, self._tags.pop(fold_run, {}))

    def _end(
        self, key: tuple[str, int], state: str, best_epoch: int | None, tags: dict[str, str]
    ) -> None:
        self.tracker.end_fold(self._runs.pop(key), state, best_epoch=best_epoch, tags=tags)
