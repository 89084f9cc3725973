"""Ensemble members: completed CV runs, each k fold models plus their out-of-fold probabilities.

A member's OOF probabilities cover every training row once; its test probabilities are the mean of
its k fold models (cross-validation bagging, as AutoGluon does; workbench/infer.py computes them),
so nothing is retrained and weights fit on OOF rows match how the member predicts. A member whose
files are missing or corrupt is skipped with a warning naming the file, instead of failing the
stage. No torch here: a member is arrays and the paths of its checkpoints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workbench import evaluate
from workbench.errors import CheckpointError
from workbench.files import load_npz
from workbench.store import RunStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberSpec:
    """Where a candidate member lives and how good its CV score was."""

    name: str  # "cnn/trial-12", or "cnn/snapshot-2" for a snapshot
    model: str  # the study file's model section
    trial: int  # the Optuna trial number (for snapshots: the trial whose configuration they use)
    kind: str  # "trial" | "snapshot"
    cv_score: float  # the study metric, mean over folds
    dir: Path  # holds fold-<k>.pt and oof.npz


@dataclass(frozen=True)
class Member:
    spec: MemberSpec
    oof: np.ndarray  # (training rows, classes)
    checkpoints: tuple[Path, ...]  # the k fold models

    @property
    def name(self) -> str:
        return self.spec.name


def load_member(spec: MemberSpec, train_rows: np.ndarray, folds: int) -> Member:
    """Read a member's OOF file and check it covers exactly the split's training rows."""
    oof = load_npz(RunStore.oof(spec.dir), what=f"out-of-fold file of {spec.name}")
    if not np.array_equal(oof["rows"], train_rows):
        raise CheckpointError(
            f"{spec.dir / 'oof.npz'} ({spec.name}) covers other rows than the study's training "
            f"split: was the split remade? Delete the output folder to start over."
        )
    if not np.isfinite(oof["proba"]).all():
        raise CheckpointError(f"{spec.dir / 'oof.npz'} ({spec.name}) has missing rows")
    ckpts = tuple(RunStore.checkpoint(spec.dir, k) for k in range(folds))
    missing = [p for p in ckpts if not p.exists()]
    if missing:
        raise CheckpointError(f"{spec.name}: fold checkpoint {missing[0]} is missing")
    return Member(spec, oof["proba"], ckpts)


def load_members(
    specs: list[MemberSpec], train_rows: np.ndarray, folds: int
) -> tuple[list[Member], list[str]]:
    """Every loadable member, and a warning line for each one skipped."""
    members, skipped = [], []
    for spec in specs:
        try:
            members.append(load_member(spec, train_rows, folds))
        except CheckpointError as e:
            skipped.append(f"skipped member {spec.name}: {e}")
            log.warning(skipped[-1])
    return members, skipped


def snapshot_specs(owner: MemberSpec, folder: Path, metric: str) -> list[MemberSpec]:
    """The snapshot members in `folder` (snap-0, snap-1, ...), in cycle order; each one's score
    is its own out-of-fold score in the study's metric."""
    specs = []
    for p in RunStore.snapshot_dirs(folder):
        oof = load_npz(RunStore.oof(p), what=f"snapshot {p}")
        score = evaluate.scores(oof["proba"], oof["y"])[metric]
        name = f"{owner.name}/snapshot-{p.name.split('-')[1]}"
        specs.append(MemberSpec(name, owner.model, owner.trial, "snapshot", score, p))
    return specs
