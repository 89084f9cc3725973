"""Ensemble members: completed CV runs, each k fold models plus their out-of-fold probabilities.

A member's OOF probabilities cover every training row once; its test probabilities are the mean of
its k fold models (cross-validation bagging, as AutoGluon does; workbench/infer.py computes them),
so nothing is retrained and weights fit on OOF rows match how the member predicts. A member whose
files are missing or corrupt is skipped with a warning naming the file, instead of failing the
stage. No torch here: a member is arrays and the paths of its checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from workbench import evaluate
from workbench.errors import CheckpointError
from workbench.files import load_npz
from workbench.store import RunStore
from workbench.views import TTA

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
    views: tuple[str, ...] = ()  # a TTA variant's test-time views (workbench/views.py)


@dataclass(frozen=True)
class Member:
    spec: MemberSpec
    oof: np.ndarray  # (training rows, classes)
    checkpoints: tuple[Path, ...]  # the k fold models

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def base(self) -> str:
        """The plain member a TTA variant averages views of (itself when plain)."""
        return self.name.removesuffix(TTA) if self.spec.views else self.name


def tta_member(
    member: Member,
    oof: np.ndarray,
    y: np.ndarray,
    folds: Sequence[np.ndarray],
    metric: str,
    views: Sequence[str],
) -> Member:
    """`member`'s TTA variant as one more candidate, from its out-of-fold probabilities over
    `views` (workbench/infer.py `tta_oof`). Its CV score is the mean over `folds` (validation
    positions) of the metric on each fold's rows, as a trial's is, so that "the best member"
    compares the two alike."""
    score = float(np.mean([evaluate.scores(oof[va], y[va])[metric] for va in folds]))
    spec = replace(member.spec, name=member.name + TTA, cv_score=score, views=tuple(views))
    return Member(spec, oof, member.checkpoints)


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


class RunRecord(Protocol):
    """A completed run as the search recorded it (search.TrialRecord)."""

    @property
    def number(self) -> int: ...  # the Optuna trial number (of the configuration)
    @property
    def value(self) -> float: ...  # its CV score in the study metric
    @property
    def attrs(self) -> dict[str, Any]: ...  # user attrs: "files", the run's manifest
    @property
    def dir(self) -> Path: ...  # where this host's store keeps it


@dataclass(frozen=True)
class Found:
    """What the search completed for one model section: its best trials, best first (at most
    `[ensemble] top_k`), and the follow-up runs of the best one's configuration, if any."""

    model: str
    trials: Sequence[RunRecord]
    snapshot_run: RunRecord | None = None
    refit_run: RunRecord | None = None


@dataclass(frozen=True)
class Refit:
    """A configuration retrained once on every training row: no OOF rows, so no candidate
    member; the ladder scores it beside the fold models it is compared with."""

    name: str  # "cnn/refit-of-6"
    model: str
    trial: int  # the trial whose configuration it retrains
    checkpoint: Path


def discover(
    found: Sequence[Found], store: RunStore, metric: str, snapshots: int, refit: bool = False
) -> tuple[list[MemberSpec], list[Refit], list[str]]:
    """Every candidate member's spec and every refit, each run's files checked against its
    manifest (fetched from the remote where they are not on this host), and a warning line for
    each run that could not be opened or is still missing. `snapshots`, `refit`: the study's
    `[ensemble]` keys."""
    specs: list[MemberSpec] = []
    refits: list[Refit] = []
    warnings: list[str] = []
    for f in found:
        if f.trials and refit:
            best = f.trials[0]
            name = f"{f.model}/refit-of-{best.number}"
            what = f"refit of {f.model}/trial-{best.number}"
            folder = _followup(f.refit_run, name, what, store, warnings)
            if folder is not None:
                ckpt = RunStore.refit_checkpoint(folder)
                refits.append(Refit(name, f.model, best.number, ckpt))
        for r in f.trials:
            name = f"{f.model}/trial-{r.number}"
            try:  # each file checked against the manifest the trial recorded
                folder = store.open_run(r.attrs.get("files"), r.dir, name)
            except CheckpointError as e:
                warnings.append(f"skipped member {name}: {e}")
                continue
            spec = MemberSpec(name, f.model, r.number, "trial", r.value, folder)
            specs += [spec, *snapshot_specs(spec, folder, metric)]  # searched snapshots
        if f.trials and snapshots > 1:  # the best configuration's snapshot run
            best = f.trials[0]
            name = f"{f.model}/snapshots-of-{best.number}"
            what = f"snapshot run of {f.model}/trial-{best.number} ({snapshots} cycles)"
            folder = _followup(f.snapshot_run, name, what, store, warnings)
            if folder is not None:
                owner = MemberSpec(name, f.model, best.number, "snapshot", best.value, folder)
                specs += snapshot_specs(owner, folder, metric)
    return specs, refits, warnings


def _followup(
    run: RunRecord | None, name: str, what: str, store: RunStore, warnings: list[str]
) -> Path | None:
    """The folder of a follow-up run, checked; None (and a warning) when it is missing."""
    if run is None:
        warnings.append(
            f"no {what} yet: `workbench worker` on the study file runs it; ensembling without it"
        )
        return None
    try:
        return store.open_run(run.attrs["files"], run.dir, name)
    except CheckpointError as e:
        warnings.append(f"skipped {name}: {e}")
        return None
