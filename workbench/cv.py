"""Cross-validation of one configuration: k fold models, out-of-fold probabilities, checkpoints.

The search scores every trial with `CrossValidator.run`; snapshot ensembles run it too. The folds
are stratified and seeded once per study, so every trial trains on the same k tasks. Where the
files go is the run store's (workbench/store.py); what happens is told as events
(workbench/events.py), which tracking listens to: this module knows no tracker.

Resume inside a run: each completed fold is recorded beside its checkpoint. A run started again
in the same folder (the retry of a trial whose worker died or was stopped) keeps those folds and
trains only the missing ones; a fold's seed depends on the study seed, model, run and fold, so
the retry trains the missing folds exactly as the first try would have.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError

from workbench.config import AugmentConfig, StudyConfig, TrainConfig
from workbench.data import ImageData, Rows, Split
from workbench.errors import ConfigError
from workbench.evaluate import scores
from workbench.events import (
    CheckpointWritten,
    EpochEnded,
    Events,
    FoldEnded,
    FoldResumed,
    FoldStarted,
    RunRef,
)
from workbench.files import atomic_write, file_digest, save_npz
from workbench.models import Classifier, create_model, model_hparams
from workbench.runtime import (
    derive_seed,
    hold_point,
    seed_everything,
    select_device,
    trim_memory,
)
from workbench.store import FoldRecord, RunStore
from workbench.train import (
    Distill,
    FitResult,
    Interrupted,
    fit,
    predict_proba,
    save_checkpoint,
)

T = TypeVar("T")
# report(fold, epoch, metrics): the search's pruning hook; raising from it stops the run
Report = Callable[[int, int, dict[str, float]], None]


def _fits_on(device: Any, pixels: Any) -> bool:
    """The whole uint8 array fits in a quarter of the GPU's free memory: it moves there once."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return bool(pixels.numel() * pixels.element_size() < free / 4)


def split_hparams(
    cfg: StudyConfig, model: str, hp: dict[str, Any]
) -> tuple[dict[str, Any], TrainConfig, AugmentConfig]:
    """Hyperparameters of the model factory, then the [train] and [data.augment] configs with
    the rest applied, for the study file's model section `model`."""
    arch_keys = set(model_hparams(cfg.models[model].arch or model))
    model_hp = {k: v for k, v in hp.items() if k in arch_keys}
    aug = {k: v for k, v in hp.items() if k in AugmentConfig.model_fields}
    train = {k: v for k, v in hp.items() if k not in arch_keys and k not in aug}
    try:
        augment = AugmentConfig.model_validate({**cfg.data.augment.model_dump(), **aug})
        train_cfg = TrainConfig.model_validate({**cfg.train.model_dump(), **train})
    except ValidationError as e:  # a combination the study file's space allows
        raise ConfigError(
            f"models.{model}: the hyperparameters {train | aug} make an invalid "
            f"[train] config: {e.errors()[0]['msg']}"
        ) from None
    return model_hp, train_cfg, augment


class Pruned(Exception):
    """Raised by a `Report` hook: this configuration is hopeless, stop training it."""


def run_state(e: BaseException) -> str:
    """The state a run ends in when `e` stopped it: PRUNED, KILLED (Ctrl-C) or FAIL."""
    return "PRUNED" if isinstance(e, Pruned) else "KILLED" if isinstance(e, Interrupted) else "FAIL"


@dataclass
class CVResult:
    oof: np.ndarray  # (training rows, classes) out-of-fold probabilities
    accuracy: list[float]  # per fold
    log_loss: list[float]  # per fold, nats
    history: list[list[dict[str, float]]] = field(default_factory=list)
    snapshots: int = 0  # snapshot members written beside the run (snap-<m>/)
    resumed: list[int] = field(default_factory=list)  # folds kept from an earlier try
    best_epochs: list[int] = field(default_factory=list)  # per fold: the epoch its model holds

    def summary(self) -> dict[str, float]:
        return {
            "cv_accuracy": float(np.mean(self.accuracy)),
            "cv_accuracy_std": float(np.std(self.accuracy)),
            "cv_log_loss": float(np.mean(self.log_loss)),
            "cv_log_loss_std": float(np.std(self.log_loss)),
        }


@dataclass
class CrossValidator:
    """Train one model configuration on each of the study's k folds."""

    cfg: StudyConfig
    model: str  # the study file's model section
    data: ImageData
    split: Split
    events: Events = field(default_factory=Events)
    should_stop: Callable[[], bool] = lambda: False
    store: RunStore | None = None  # default: the study's local store
    worker: int = 0  # the worker's index: which GPU it trains on (i mod the number of GPUs)

    def __post_init__(self) -> None:
        self.run_store = self.store or RunStore(self.cfg.out)
        self.rows = self.data.rows(self.split.train_idx)  # a view: folds are index arrays
        self.y = self.rows.labels
        self.folds = self.split.folds(self.y.numpy(), self.cfg.cv.folds, self.cfg.seed)
        self.device = select_device(self.cfg.device, self.worker)
        if self.device.type == "cuda" and _fits_on(self.device, self.data.pixels):
            self.rows = self.rows.to(self.device)  # one copy: batches gathered on the GPU
        self.arch = self.cfg.models[self.model].arch or self.model

    def max_epochs(self) -> int:
        """The most epochs any configuration of this model can train (pruning step stride)."""
        spec = self.cfg.models[self.model]
        searched = spec.space.get("epochs")
        return int(getattr(searched, "high", spec.params.get("epochs", self.cfg.train.epochs)))

    def run(
        self,
        hp: dict[str, Any],
        out: Path,
        ref: RunRef,
        report: Report | None = None,
        seed_label: int | str | None = None,
    ) -> CVResult:
        """Train and score every fold not already complete in `out`; write the run's files there.

        `seed_label` names the run in fold seeds (default: `ref.label`); a retry passes its first
        try's, so the folds it trains are the ones the first try would have trained."""
        model_hp, train_cfg, augment = split_hparams(self.cfg, self.model, hp)
        seed_label = ref.label if seed_label is None else seed_label
        y = self.y.numpy()
        oof = np.full((len(y), self.data.num_classes), np.nan)
        snap_oof: list[np.ndarray] = []  # per snapshot m, (training rows, classes)
        result = CVResult(oof, [], [])
        for k, (tr, va) in enumerate(self.folds):
            fold = self.run_store.read_fold(out, k)
            if fold is not None and np.array_equal(fold.rows, va):
                result.resumed.append(k)
                self.events.emit(FoldResumed(ref, k, fold.history, fold.best_epoch))
            else:
                hold_point(ref.label, k)  # tests only (WORKBENCH_TEST_HOLD): wait here
                fold = self._fold(
                    k, tr, va, model_hp, (train_cfg, augment), out, ref, seed_label, report
                )
            oof[va] = fold.proba
            for m, p in enumerate(fold.snap_proba):
                if m == len(snap_oof):
                    snap_oof.append(np.full_like(oof, np.nan))
                snap_oof[m][va] = p
            fold_scores = scores(fold.proba, y[va])
            result.accuracy.append(fold_scores["accuracy"])
            result.log_loss.append(fold_scores["log_loss"])
            result.history.append(fold.history)
            result.best_epochs.append(fold.best_epoch)
        save_npz(self.run_store.oof(out), rows=self.split.train_idx, y=y, proba=oof)
        history = json.dumps(result.history).encode()
        atomic_write(self.run_store.history(out), lambda f: f.write(history))
        for m, p in enumerate(snap_oof):
            path = self.run_store.oof(self.run_store.snapshot(out, m))
            save_npz(path, rows=self.split.train_idx, y=y, proba=p)
        result.snapshots = len(snap_oof)
        return result

    def _fold(
        self,
        k: int,
        tr: np.ndarray,
        va: np.ndarray,
        model_hp: dict[str, Any],
        configs: tuple[TrainConfig, AugmentConfig],
        out: Path,
        ref: RunRef,
        seed_label: int | str,
        report: Report | None,
    ) -> FoldRecord:
        """Train fold k; write its checkpoint (and snapshot checkpoints), then its record."""
        val = self.rows.subset(va)

        def record(net: Classifier, result: FitResult, meta: dict[str, Any]) -> FoldRecord:
            proba = predict_proba(net, val, amp=configs[0].amp)
            snaps = []
            if len(result.snapshots) > 1:  # one cycle is the run itself: no snapshot ensemble
                for m, state in enumerate(result.snapshots):
                    net.load_state_dict(state)
                    path = self.run_store.checkpoint(self.run_store.snapshot(out, m), k)
                    save_checkpoint(path, net, {**meta, "snapshot": m})
                    snaps.append(predict_proba(net, val, amp=configs[0].amp))
            snap_proba = np.stack(snaps) if snaps else np.empty((0, *proba.shape))
            fold = FoldRecord(va, proba, snap_proba, result.history, result.best_epoch)
            self.run_store.write_fold(out, k, fold)
            return fold

        train = self.rows.subset(tr)  # this fold's training rows: their channel statistics
        ckpt = self.run_store.checkpoint(out, k)
        return self._train(
            k, train, val, (model_hp, *configs), ckpt, ref, seed_label, report, record
        )

    def _train(
        self,
        k: int,
        train: Rows,
        val: Rows | None,
        hparams: tuple[dict[str, Any], TrainConfig, AugmentConfig],
        ckpt: Path,
        ref: RunRef,
        seed_label: int | str,
        report: Report | None,
        finish: Callable[[Classifier, FitResult, dict[str, Any]], T],
        distill: Distill | None = None,
    ) -> T:
        """Train one network as fold `k` of run `ref`: seeded, normalised by `train`'s channel
        statistics, fit, its checkpoint written at `ckpt`; then `finish(net, fit result,
        checkpoint meta)` writes what else the run keeps. Told as events: FoldStarted, each
        epoch, CheckpointWritten, then FoldEnded (COMPLETE, or the state that stopped it)."""
        model_hp, train_cfg, augment = hparams
        gen = seed_everything(derive_seed(self.cfg.seed, self.model, seed_label, k))
        mean, std = train.channel_stats()
        trim_memory()  # its float chunks, and the last fold's inference: given back first
        net = create_model(
            self.arch, self.data.num_classes, self.data.in_shape, mean, std, **model_hp
        ).to(self.device)
        self.events.emit(FoldStarted(ref, k))

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            self.events.emit(EpochEnded(ref, k, epoch, metrics))
            if report is not None:
                report(k, epoch, metrics)

        try:
            result = fit(
                net,
                train,
                val,
                train_cfg,
                augment=augment,
                generator=gen,
                on_epoch=on_epoch,
                should_stop=self.should_stop,
                distill=distill,
            )
            meta = self._meta(model_hp, ref, k)
            path = save_checkpoint(ckpt, net, meta)
            digest, size = file_digest(path)
            self.events.emit(CheckpointWritten(ref, k, path.resolve().as_uri(), digest, size))
            done = finish(net, result, meta)
        except BaseException as e:
            self.events.emit(FoldEnded(ref, k, run_state(e)))
            raise
        self.events.emit(FoldEnded(ref, k, "COMPLETE", best_epoch=result.best_epoch))
        return done

    def _meta(self, model_hp: dict[str, Any], ref: RunRef, fold: int) -> dict[str, Any]:
        """What a checkpoint records beside its weights (what rebuilds the network)."""
        return {
            "arch": self.arch,
            "num_classes": self.data.num_classes,
            "in_shape": list(self.data.in_shape),
            "preprocess": self.data.preprocess,  # how image files became these inputs
            "hparams": model_hp,
            "study": f"{self.cfg.name}/{self.model}",
            "run": str(ref.label),
            "fold": fold,
        }

    def refit(
        self,
        hp: dict[str, Any],
        out: Path,
        ref: RunRef,
        seed_label: int | str,
        distill: Distill | None = None,
    ) -> list[dict[str, float]]:
        """Train the configuration once on every training row: no validation rows, no pruning,
        the last epoch's weights (search/followups.py sets its epochs). Writes `model.pt` and
        history.json in `out`; returns the per-epoch history. Told as one fold (fold 0), so
        tracking records it as it records a fold; a retry trains it again from the start.
        A distilled student is such a network, its batch loss made by `distill`."""

        def history(net: Classifier, result: FitResult, meta: dict[str, Any]) -> list[dict]:
            text = json.dumps([result.history]).encode()
            atomic_write(self.run_store.history(out), lambda f: f.write(text))
            return result.history

        hparams = split_hparams(self.cfg, self.model, hp)
        ckpt = self.run_store.refit_checkpoint(out)
        return self._train(
            0, self.rows, None, hparams, ckpt, ref, seed_label, None, history, distill
        )
