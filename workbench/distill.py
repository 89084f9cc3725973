"""The distilled student: one network of a model section's best configuration, trained on every
training row against the shipped model's out-of-fold probabilities (`[distill]`).

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(labels)

(Hinton et al. 2015: both sides softened by temperature T; T^2 keeps the term's gradients at the
scale of the label term's.)

The teacher never saw the row it speaks on. Training row i was held out by fold k when every
member was cross-validated; its teacher is the shipped rule (the members' weights, vote and
temperature, as workbench/final.py computes it) over each kept member's fold-k model alone. On
the row as it is, that is the rule applied to the members' stored out-of-fold probabilities. On
the augmented views the student's batches make of the row (the configuration's augmentation,
drawn afresh each epoch) the same fold models speak: targets fixed per row would leave the
student imitating 2,000 points only. A probe on 2,000 MNIST rows (issue 29) scored 97.92 % with
OOF targets on the plain rows against 98.07 % on labels alone: the views are why this exists.

It trains in the ensemble stage, after the rule is fit on out-of-fold rows and before the
stage's one look at the test split, where it is scored as the ladder's last rung.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from workbench.config import StudyConfig
from workbench.cv import CrossValidator
from workbench.data import ImageData, Split
from workbench.events import RunRef
from workbench.final import FinalEnsemble
from workbench.store import RunStore
from workbench.train import load_model

EPS = 1e-15  # probabilities are clipped here before their log


@dataclass(frozen=True)
class Teacher:
    """A candidate the shipped rule may weigh: its name, fold checkpoints and test-time views."""

    name: str
    checkpoints: Sequence[Path]
    views: Sequence[str] = ()


@dataclass
class Distiller:
    """The training loop's batch loss for a student (workbench/train.py `Distill`)."""

    teachers: list[FinalEnsemble]  # teacher k: the shipped rule over every fold-k model
    fold_of: torch.Tensor  # (training rows,) int64: the fold that held each row out
    alpha: float
    temperature: float

    @torch.no_grad()
    def targets(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(B, classes) float64: each row's teacher probabilities on the images `x` (as the
        student sees them), from the fold models that held the row out."""
        folds = self.fold_of[rows.cpu()].to(x.device)
        out: torch.Tensor | None = None
        for k, teacher in enumerate(self.teachers):
            mask = folds == k
            if bool(mask.any()):
                p = teacher(x[mask].float())[0]
                if out is None:
                    out = torch.empty((len(x), p.shape[1]), dtype=p.dtype, device=x.device)
                out[mask] = p
        assert out is not None, "a batch without rows"
        return out

    def __call__(
        self, logits: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, label_loss: torch.Tensor
    ) -> torch.Tensor:
        if self.alpha == 0:
            return label_loss
        t = self.temperature
        soft = torch.softmax(self.targets(x, rows).clamp_min(EPS).log() / t, dim=1)
        log_student = F.log_softmax(logits.float() / t, dim=1)
        kl = F.kl_div(log_student, soft.float(), reduction="batchmean")
        return self.alpha * t * t * kl + (1 - self.alpha) * label_loss


def fold_of(y: np.ndarray, split: Split, cfg: StudyConfig) -> np.ndarray:
    """(training rows,) the fold that held each row out, as every member's folds were made."""
    out = np.full(len(y), -1, np.int64)
    for k, (_, held) in enumerate(split.folds(y, cfg.cv.folds, cfg.seed)):
        out[held] = k
    return out


def distiller(
    cfg: StudyConfig,
    ds: ImageData,
    split: Split,
    teachers: Sequence[Teacher],
    state: dict[str, Any],
    device: torch.device,
) -> Distiller:
    """The shipped rule `state` (its weights over `teachers`) as one teacher per fold."""
    assert cfg.distill is not None
    kept = [(t, w) for t, w in zip(teachers, state["weights"], strict=True) if w > 0]
    rule = {**state, "weights": [w for _, w in kept]}
    views = {t.name: list(t.views) for t, _ in kept if t.views}
    per_fold = [
        FinalEnsemble(
            [[load_model(t.checkpoints[k], device)] for t, _ in kept],  # type: ignore[list-item]
            [t.name for t, _ in kept],
            rule,
            list(ds.classes),
            ds.in_shape,
            ds.preprocess,
            views,
        ).to(device)
        for k in range(cfg.cv.folds)
    ]
    folds = torch.as_tensor(fold_of(ds.y[split.train_idx].numpy(), split, cfg))
    return Distiller(per_fold, folds, cfg.distill.alpha, cfg.distill.temperature)


def train_student(
    cfg: StudyConfig,
    ds: ImageData,
    split: Split,
    teachers: Sequence[Teacher],
    state: dict[str, Any],
    hp: dict[str, Any],
    out: Path,
) -> None:
    """Train the student of `cfg.distill.model` with configuration `hp` (its best trial's, as a
    refit trains it, with `[distill] params` over it) against the shipped rule `state`; its
    checkpoint (RunStore.refit_checkpoint) and history are written in `out`."""
    assert cfg.distill is not None
    cv = CrossValidator(cfg, cfg.distill.model, ds, split, store=RunStore(cfg.out))
    teach = distiller(cfg, ds, split, teachers, state, cv.device)
    cv.refit(hp, out, RunRef(cfg.distill.model, "student"), "student", distill=teach)
