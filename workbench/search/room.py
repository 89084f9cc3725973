"""Room on disk before a trial: what its files will take, against the free space where they go.

A trial writes, in its folder (workbench/store.py): a checkpoint per fold (the state dict: every
parameter and buffer, plus torch.save's zip records), one per snapshot cycle too, and the
out-of-fold probabilities twice (per fold, then the whole run: float64 per row and class, with
int64 row numbers). The state dict's bytes come from the model built on the meta device (shapes
only, no memory), so the check costs no training and no weights. A disk that cannot hold them,
with DISK_RESERVE left free, stops the worker before the trial starts (workbench/search/trials.py
queues the trial again: the study resumes with it once there is room).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from optuna.trial import Trial

from workbench.cv import CrossValidator, split_hparams
from workbench.errors import SpaceError
from workbench.files import DISK_RESERVE, free_space, size_text
from workbench.models import create_model, state_bytes
from workbench.search.storage import FINISHED, requeue

FILE_OVERHEAD = 8192  # bytes per file beyond its arrays: zip and npy headers, the pickled meta
TENSOR_OVERHEAD = 1024  # bytes per tensor of a checkpoint: its zip record, pickled key, padding


def trial_bytes(cv: CrossValidator, hp: dict[str, Any], follow_up: str = "") -> tuple[int, int]:
    """(bytes the run's files will take, parameters of its network) for hyperparameters `hp`."""
    model_hp, train_cfg, _ = split_hparams(cv.cfg, cv.model, hp)
    weights, tensors, params = _state(cv, model_hp)
    checkpoint = weights + TENSOR_OVERHEAD * tensors + FILE_OVERHEAD
    if follow_up == "refit":  # one network on every training row, and its history
        return checkpoint + FILE_OVERHEAD, params
    cycles = train_cfg.cycles if train_cfg.schedule == "cosine_restarts" else 1
    copies = 1 + (cycles if cycles > 1 else 0)  # the fold model, and one per snapshot cycle
    rows, classes, folds = len(cv.y), cv.data.num_classes, len(cv.folds)
    probas = rows * copies * (8 * classes + 16)  # float64 per class, int64 row (and label)
    files = folds * 3 + 2 + copies  # fold-k .pt/.npz/.json, oof and history, snapshot oofs
    return folds * copies * checkpoint + 2 * probas + files * FILE_OVERHEAD, params


def check(
    trial: Trial, cv: CrossValidator, hp: dict[str, Any], out: Path, first: int, follow_up: str
) -> None:
    """Before any file of the run: the disk takes its files, or the worker stops (SpaceError)
    and the trial is queued again as it is (its first try `first`: the retry's folder and
    seeds), to run first when the study resumes."""
    done = len(trial.study.get_trials(deepcopy=False, states=FINISHED))
    left = 1 if follow_up else max(cv.cfg.trials_for(cv.model) - done, 1)
    label = f"{follow_up} run" if follow_up else f"trial {trial.number}"
    short = shortage(cv, hp, out, label, left, follow_up)
    if short is None:
        return
    trial.set_user_attr("first_try", first)
    requeue(trial.study, trial.number)
    trial.set_user_attr("disk_short", True)  # after the copy: the retry is not
    trial.set_user_attr("error", str(short))
    raise short


def shortage(
    cv: CrossValidator, hp: dict[str, Any], out: Path, label: str, left: int, follow_up: str = ""
) -> SpaceError | None:
    """The error to stop on when the disk of `out` cannot take this run's files (DISK_RESERVE
    left free); `left`: the runs of this model still to come, this one included."""
    need, params = trial_bytes(cv, hp, follow_up)
    free = free_space(out)
    if need + DISK_RESERVE <= free:
        return None
    what = "its checkpoint" if follow_up == "refit" else f"{len(cv.folds)} fold checkpoints"
    study = f"; the {left} runs of '{cv.model}' still to come need about " if left > 1 else ""
    return SpaceError(
        f"models.{cv.model} {label} needs {size_text(need)} on disk ({params} parameters in "
        f"{what}, and its out-of-fold probabilities), but the disk of {out} has "
        f"{size_text(free)} free, and workbench leaves {size_text(DISK_RESERVE)} of a disk free"
        f"{study}{size_text(need * left) if left > 1 else ''}. Free space there, or set "
        f"output_dir to a folder on a disk with more room, then run the same command again: "
        f"the study resumes with this run"
    )


def _state(cv: CrossValidator, model_hp: dict[str, Any]) -> tuple[int, int, int]:
    """(bytes of the state dict, its tensors, the parameters) of the network `model_hp` makes:
    built on the meta device (shapes only); on the CPU where a factory needs real tensors."""
    shape, classes = cv.data.in_shape, cv.data.num_classes
    try:
        with torch.device("meta"):
            net = create_model(cv.arch, classes, shape, **model_hp)
    except Exception:  # e.g. a backbone that loads pretrained weights into its tensors
        net = create_model(cv.arch, classes, shape, **model_hp)
    return state_bytes(net), len(net.state_dict()), sum(p.numel() for p in net.parameters())
