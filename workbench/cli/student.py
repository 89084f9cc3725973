"""The distilled student, wired for the ensemble stage (`[distill]`): which configuration it
trains, what trains it when the stage asks, and its package beside the final model."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from workbench import export, search
from workbench.config import StudyConfig
from workbench.console import console
from workbench.data import ImageData, Split
from workbench.final import ALONE
from workbench.runtime import all_cores
from workbench.store import RunStore

if TYPE_CHECKING:
    from workbench.ensemble.members import Member
    from workbench.ensemble.stage import Student


def plan(
    cfg: StudyConfig, ds: ImageData, split: Split, members: list[Member], store: RunStore
) -> Student | None:
    """The student the stage trains and scores, or None (no `[distill]`, or its model section
    has no completed trial yet: a warning says so)."""
    if cfg.distill is None:
        return None
    from workbench import distill
    from workbench.ensemble.stage import Student

    model, d = cfg.distill.model, cfg.distill
    trials = search.completed_trials(cfg, model, search.open_storage(cfg))
    if not trials:
        console.print(f"[yellow]warning:[/] no completed trial of {model}: no student")
        return None
    best = trials[0]
    hp = {**search.refit_hp(cfg, model, best.params, best.attrs), **cfg.distill.params}
    teachers = [distill.Teacher(m.name, m.checkpoints, m.spec.views) for m in members]

    def train(state: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        with all_cores() as cores:
            distill.train_student(cfg, ds, split, teachers, state, hp, store.student_run)
        console.print(
            f"student: {model}/trial-{best.number}'s configuration trained on "
            f"{len(split.train_idx)} rows against the shipped model's out-of-fold "
            f"probabilities (alpha {d.alpha:g}, T = {d.temperature:g}; "
            f"{hp.get('epochs', cfg.train.epochs)} epochs, {cores} threads, "
            f"{time.perf_counter() - t0:.0f} s)"
        )

    key = json.dumps({"distill": cfg.distill.model_dump(), "hp": hp}, sort_keys=True)
    label = f"{model}/trial-{best.number}'s configuration, distilled from what ships"
    return Student(key, label, train)


def package(cfg: StudyConfig, ds: ImageData, store: RunStore) -> None:
    """The trained student as a final model of one network (store.student): what `predict
    --model student`, `export --student` and the MLflow model load."""
    export.save_final(
        store.student,
        [("student", [store.student_checkpoint])],
        ALONE,
        "student",
        list(ds.classes),
        ds.in_shape,
        ds.preprocess,
    )
