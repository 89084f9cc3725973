"""The ensemble stage's candidates, wired from the stored studies: each model's best trials and
follow-up runs (checked), their TTA variants, and what each costs to run."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from workbench import infer, search, views
from workbench.config import StudyConfig
from workbench.console import console
from workbench.data import ImageData, Split
from workbench.files import atomic_write
from workbench.results import Cost
from workbench.store import RunStore

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from workbench.ensemble.members import Member, Refit


def costs(
    members: list[Member], refits: list[Refit], images: torch.Tensor, student: Path | None
) -> dict[str, Cost]:
    """Each member's and refit's inference cost, measured now on 1 thread (the stage's); a TTA
    variant's is its plain member's times 1 + its views (a forward pass per view)."""
    costs = {m.name: infer.member_cost(m.checkpoints, images) for m in members if not m.spec.views}
    for m in members:
        if m.spec.views:
            plain, n = costs[m.base], views.count(m.spec.views)
            costs[m.name] = plain.model_copy(update={"ms_per_image": plain.ms_per_image * (1 + n)})
    costs |= {r.name: infer.member_cost([r.checkpoint], images) for r in refits}
    return costs | ({"student": infer.member_cost([student], images)} if student else {})


def tta_members(
    cfg: StudyConfig, members: list[Member], ds: ImageData, split: Split
) -> list[Member]:
    """Each candidate's TTA variant over the study's `[ensemble] tta` views (none when it
    declares none): each fold model predicts its own validation rows in every view."""
    from workbench.ensemble.members import tta_member

    if not cfg.ensemble.tta or not members:
        return []
    t0 = time.perf_counter()
    rows, y = ds.rows(split.train_idx), ds.y[split.train_idx].numpy()
    held = [va for _, va in split.folds(y, cfg.cv.folds, cfg.seed)]  # the members' folds
    tta, names = views.resolve(cfg.ensemble.tta), cfg.ensemble.tta
    workers = infer.processes(cfg.ensemble)
    out = [
        tta_member(
            m,
            infer.tta_oof(m.checkpoints, rows, held, m.oof, tta, workers=workers),
            y,
            held,
            cfg.cv.metric,
            names,
        )
        for m in members
    ]
    console.print(
        f"TTA: {len(out)} candidates over {1 + len(tta)} views of {len(y)} out-of-fold rows "
        f"({', '.join(names)}; {time.perf_counter() - t0:.1f} s)"
    )
    return out


def from_search(
    cfg: StudyConfig, store: RunStore, split: Split
) -> tuple[list[Member], list[Refit]]:
    """What the search completed, as the ensemble stage's members and refits (each run's files
    checked), with a warning line for each one missing; every candidate's checkpoints are
    listed in candidates.json, so that `predict --member` can run any one alone."""
    from workbench.ensemble.members import Found, discover, load_members

    storage, found = search.open_storage(cfg), []
    for model in cfg.models:
        trials = search.completed_trials(cfg, model, storage)[: cfg.ensemble.top_k]
        runs = {
            kind: search.followup_record(cfg, model, storage, trials[0], kind) if trials else None
            for kind in search.followup_kinds(cfg)
        }
        found.append(Found(model, trials, runs.get("snapshots"), runs.get("refit")))
    e = cfg.ensemble
    specs, refits, unopened = discover(found, store, cfg.cv.metric, e.snapshots, e.refit)
    members, skipped = load_members(specs, split.train_idx, cfg.cv.folds)
    for line in unopened + skipped:
        console.print(f"[yellow]warning:[/] {line}")
    listed = {m.name: [store.relative(p) for p in m.checkpoints] for m in members}
    if cfg.ensemble.tta:  # `predict --member cnn/trial-6+tta`: the same checkpoints, and views
        listed |= {n + views.TTA: paths for n, paths in list(listed.items())}
    listed |= {r.name: [store.relative(r.checkpoint)] for r in refits}
    atomic_write(store.candidates, lambda f: f.write(json.dumps(listed, indent=1).encode()))
    return members, refits
