"""Cross-validation of one configuration: k fold models, out-of-fold probabilities, checkpoints.

The search scores every trial with `CrossValidator.run`; snapshot ensembles run it too. The folds
are stratified and seeded once per study, so every trial trains on the same k tasks. Folder layout
of one run (a trial or a snapshot run):

    fold-<k>.pt            the k fold models (state dict + what rebuilds the model)
    oof.npz                rows (data indices), y, proba: every training row exactly once
    history.json           per fold, per epoch: train_loss, val_loss, val_accuracy, lr
    snap-<m>/fold-<k>.pt   with schedule = cosine_restarts and cycles > 1: the weights at the end
    snap-<m>/oof.npz       of each cycle m, and their own out-of-fold probabilities
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from workbench.config import StudyConfig, TrainConfig
from workbench.data import ImageData, Split, channel_stats, cv_folds
from workbench.errors import ConfigError
from workbench.evaluate import scores
from workbench.files import atomic_write, save_npz
from workbench.models import create_model, model_hparams
from workbench.runtime import derive_seed, seed_everything, select_device
from workbench.tracking import Tracker
from workbench.train import Interrupted, fit, predict_proba, save_checkpoint

# report(fold, epoch, metrics): the search's pruning hook; raising from it stops the run
Report = Callable[[int, int, dict[str, float]], None]


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
    tracker: Tracker
    should_stop: Callable[[], bool] = lambda: False

    def __post_init__(self) -> None:
        rows = self.split.train_idx
        self.x, self.y = self.data.x[rows], self.data.y[rows]
        self.folds = cv_folds(self.y.numpy(), self.cfg.cv.folds, self.cfg.seed)
        self.device = select_device(self.cfg.device)
        self.arch = self.cfg.models[self.model].arch or self.model

    def max_epochs(self) -> int:
        """The most epochs any configuration of this model can train (pruning step stride)."""
        spec = self.cfg.models[self.model]
        searched = spec.space.get("epochs")
        return int(getattr(searched, "high", spec.params.get("epochs", self.cfg.train.epochs)))

    def split_hparams(self, hp: dict[str, Any]) -> tuple[dict[str, Any], TrainConfig]:
        """Hyperparameters of the model factory, and the [train] config with the rest applied."""
        arch_keys = set(model_hparams(self.arch))
        model_hp = {k: v for k, v in hp.items() if k in arch_keys}
        train = {k: v for k, v in hp.items() if k not in arch_keys}
        try:
            return model_hp, TrainConfig.model_validate({**self.cfg.train.model_dump(), **train})
        except ValidationError as e:  # a combination the study file's space allows
            raise ConfigError(
                f"models.{self.model}: the hyperparameters {train} make an invalid "
                f"[train] config: {e.errors()[0]['msg']}"
            ) from None

    def run(
        self,
        hp: dict[str, Any],
        out: Path,
        run_id: str,
        label: int | str,
        report: Report | None = None,
    ) -> CVResult:
        """Train and score every fold; write checkpoints, OOF and history under `out`."""
        model_hp, train_cfg = self.split_hparams(hp)
        y = self.y.numpy()
        oof = np.full((len(y), self.data.num_classes), np.nan)
        snap_oof: list[np.ndarray] = []
        result = CVResult(oof, [], [])
        for k, (tr, va) in enumerate(self.folds):
            proba, history, snaps = self._fold(
                k, tr, va, model_hp, train_cfg, out, run_id, label, report
            )
            oof[va] = proba
            fold = scores(proba, y[va])
            result.accuracy.append(fold["accuracy"])
            result.log_loss.append(fold["log_loss"])
            result.history.append(history)
            for m, p in enumerate(snaps):
                if m == len(snap_oof):
                    snap_oof.append(np.full_like(oof, np.nan))
                snap_oof[m][va] = p
        save_npz(out / "oof.npz", rows=self.split.train_idx, y=y, proba=oof)
        atomic_write(out / "history.json", lambda f: f.write(json.dumps(result.history).encode()))
        for m, p in enumerate(snap_oof):
            save_npz(out / f"snap-{m}" / "oof.npz", rows=self.split.train_idx, y=y, proba=p)
        result.snapshots = len(snap_oof)
        return result

    def _fold(
        self,
        k: int,
        tr: np.ndarray,
        va: np.ndarray,
        model_hp: dict[str, Any],
        train_cfg: TrainConfig,
        out: Path,
        run_id: str,
        label: int | str,
        report: Report | None,
    ) -> tuple[np.ndarray, list[dict[str, float]], list[np.ndarray]]:
        gen = seed_everything(derive_seed(self.cfg.seed, self.model, label, k))
        xt, yt, xv, yv = self.x[tr], self.y[tr], self.x[va], self.y[va]
        mean, std = channel_stats(xt)  # this fold's training rows only
        net = create_model(
            self.arch, self.data.num_classes, self.data.in_shape, mean, std, **model_hp
        ).to(self.device)
        fold_run = self.tracker.start_fold(run_id, self.model, label, k)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            self.tracker.log_epoch(fold_run, epoch, metrics)
            if report is not None:
                report(k, epoch, metrics)

        try:
            result = fit(
                net,
                (xt, yt),
                (xv, yv),
                train_cfg,
                augment=self.cfg.data.augment,
                generator=gen,
                on_epoch=on_epoch,
                should_stop=self.should_stop,
            )
        except BaseException as e:
            self.tracker.end_fold(fold_run, run_state(e))
            raise
        meta = {
            "arch": self.arch,
            "num_classes": self.data.num_classes,
            "in_shape": list(self.data.in_shape),
            "hparams": model_hp,
            "study": f"{self.cfg.name}/{self.model}",
            "run": str(label),
            "fold": k,
        }
        ckpt = save_checkpoint(out / f"fold-{k}.pt", net, meta)
        proba = predict_proba(net, xv)
        snaps = []
        if len(result.snapshots) > 1:  # one cycle is the run itself: no snapshot ensemble
            for m, state in enumerate(result.snapshots):
                net.load_state_dict(state)
                save_checkpoint(out / f"snap-{m}" / f"fold-{k}.pt", net, {**meta, "snapshot": m})
                snaps.append(predict_proba(net, xv))
        self.tracker.end_fold(fold_run, "COMPLETE", best_epoch=result.best_epoch, checkpoint=ckpt)
        return proba, result.history, snaps
