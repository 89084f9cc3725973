"""Member inference: the one step that turns fold models and images into class probabilities.

A member is k fold models; its probabilities are the mean of their float64 softmax outputs
(cross-validation bagging), so nothing is retrained and weights fit on out-of-fold rows match how
the member predicts. A member's TTA variant (`[ensemble] tta`, workbench/views.py) also averages
over views of each image: on its out-of-fold rows each fold model predicts its own validation
rows as they are and in every view (`tta_oof`), on other rows every fold model does.
`member_proba` is that step on one batch, in torch ops: the final model's graph
(workbench/final.py, and so predict, the MLflow model and ONNX) runs it. The ensemble stage gets
arrays from `test_probas`, which runs each fold model over every row through the training loop's
one predict path (workbench/train.py) and takes the same mean.

`test_probas` and `tta_oof` split their work into networks (`_network`: one fold model, refit
or student over the rows) and give them to `workers` forked processes of one torch thread each
(runtime.forked_map), one network at a time, in order: the same step, so the same probabilities
bit for bit with one worker or many (tests/test_ensemble_stage.py). One worker is a forked
process too: it keeps the memory it frees between batches, which the caller (the study's main
process) should not.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from workbench.config import EnsembleConfig
from workbench.data import Rows
from workbench.results import Cost, TestProbas
from workbench.runtime import default_workers, forked_map
from workbench.train import load_model, predict_proba
from workbench.views import View

COST_BATCH = 256  # images per timed batch: the ladder's ms per image are at this batch size


def member_proba(
    folds: Sequence[nn.Module], x: torch.Tensor, views: Sequence[View] = ()
) -> torch.Tensor:
    """(N, classes) float64: the mean of the fold models' softmax on one batch `x`, and on each
    of its `views` (a TTA variant)."""
    inputs = [x, *(v(x) for v in views)]
    each = [torch.softmax(m(xi).double(), dim=1) for xi in inputs for m in folds]
    return torch.stack(each).mean(0)


def processes(cfg: EnsembleConfig) -> int:
    """The processes the ensemble stage predicts members on: `[ensemble] workers`, else one
    per core, as the search runs."""
    return cfg.workers or default_workers("cpu")


@dataclass(frozen=True)
class _Job:
    """One network's share of member inference: what `_network` predicts."""

    checkpoint: Path
    viewed: bool = True  # on the rows as they are and in each view (a member's fold model)
    rows: np.ndarray | None = None  # positions in the shared rows (a fold's); None: all of them


_Shared = tuple[Rows | torch.Tensor, Sequence[View], str | torch.device]  # rows, views, device


def _network(shared: _Shared, job: _Job) -> np.ndarray:
    """(1 + views, rows, classes), or (1, rows, classes) for a job not `viewed`: the network's
    probabilities on the rows as they are, then on each view of them. One model in memory."""
    x, views, device = shared
    if job.rows is not None:
        assert isinstance(x, Rows), "a job of some rows needs rows of the image store"
        x = x.subset(job.rows)
    model = load_model(job.checkpoint, device)
    passes = (None, *views) if job.viewed else (None,)
    return np.stack([predict_proba(model, x, view=v) for v in passes])


def _predicted(
    shared: _Shared, jobs: Sequence[_Job], workers: int
) -> Generator[np.ndarray, None, None]:
    """`_network` of each job, in order, on `workers` processes forked for it
    (runtime.forked_map); on a CUDA device, whose context a fork does not carry, here."""
    on_cpu = torch.device(shared[2]).type == "cpu"
    return forked_map(_network, shared, jobs, workers if on_cpu else 0)


def tta_oof(
    checkpoints: Sequence[Path],
    rows: Rows,
    folds: Sequence[np.ndarray],
    oof: np.ndarray,
    views: Sequence[View],
    device: str | torch.device = "cpu",
    workers: int = 1,
) -> np.ndarray:
    """(rows, classes): a member's out-of-fold probabilities averaged over `views`. Fold model k
    predicts only its own validation rows `folds[k]` (positions in `rows`, the training split),
    in every view; the rows as they are keep their stored out-of-fold probabilities `oof`.
    `workers`: processes predicting, a fold model each at a time (`processes`)."""
    out = np.full_like(oof, np.nan)
    jobs = [_Job(p, rows=held) for p, held in zip(checkpoints, folds, strict=True)]
    with contextlib.closing(_predicted((rows, views, device), jobs, workers)) as each:
        for held, viewed in zip(folds, each, strict=True):
            out[held] = (oof[held] + viewed[1:].sum(axis=0)) / (1 + len(views))
    return out


def member_probas(
    members: Sequence[Sequence[Path]], x: Rows | torch.Tensor, device: str | torch.device = "cpu"
) -> np.ndarray:
    """(members, rows, classes) for members given as their fold checkpoints, loaded one at a
    time (a member's k models are in memory together, never every member's)."""
    return test_probas(members, x, None, device).members


def test_probas(
    members: Sequence[Sequence[Path]],
    x: Rows | torch.Tensor,
    best: int | None,
    device: str | torch.device = "cpu",
    refits: Sequence[Path] = (),
    views: Sequence[View] = (),
    student: Path | None = None,
    workers: int = 1,
) -> TestProbas:
    """Every member's fold mean, then (given `views`) every member's TTA variant in the same
    order; member `best`'s fold models each alone, without views (the ladder's one network;
    (0, rows, classes) when `best` is None); each refit network's probabilities, and the
    distilled `student`'s. `workers`: processes predicting, one network each at a time
    (`processes`); every network's probabilities are the same whatever the count."""
    networks = [*refits, *([student] if student else [])]  # one network each, without views
    jobs = [_Job(p) for m in members for p in m] + [_Job(p, viewed=False) for p in networks]
    means, tta, alone = [], [], None
    with contextlib.closing(_predicted((x, views, device), jobs, workers)) as out:
        for i, checkpoints in enumerate(members):
            each = np.stack([next(out) for _ in checkpoints])  # (folds, 1 + views, rows, classes)
            means.append(each[:, 0].mean(axis=0))
            if views:
                tta.append(each.mean(axis=(0, 1)))
            if i == best:
                alone = each[:, 0]
        refit = np.stack([next(out)[0] for _ in refits]) if refits else None
        taught = next(out)[0] if student else None
    stacked = np.stack(means + tta)
    return TestProbas(stacked, alone if alone is not None else stacked[:0], refit, taught)


test_probas.__test__ = False  # type: ignore[attr-defined]  # not a pytest function


@torch.inference_mode()
def member_cost(
    checkpoints: Sequence[Path], x: torch.Tensor, repeats: int = 2, views: int = 0
) -> Cost:
    """What predicting with a member's k fold models costs on this machine, at the threads set
    (the stage sets 1): one fold model timed on a batch of COST_BATCH images made from `x`
    (float (N, C, H, W), repeated to fill the batch), the best of `repeats` after a small
    warm-up batch (one timing when a batch takes over a second, as a large backbone on large
    photos does), times k, times 1 + `views` for a TTA variant (a pass per view); parameters
    and the checkpoint files' bytes summed over the k."""
    model = load_model(checkpoints[0], "cpu").eval()
    batch = x[torch.arange(COST_BATCH) % len(x)].contiguous(memory_format=torch.channels_last)
    model(batch[:8])  # oneDNN makes its kernels for a shape on first use
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(batch)
        best = min(best, time.perf_counter() - t0)
        if best > 1.0:
            break
    k = len(checkpoints)
    return Cost(
        networks=k,
        ms_per_image=best * 1e3 / COST_BATCH * k * (1 + views),
        parameters=sum(p.numel() for p in model.parameters()) * k,
        bytes=sum(Path(p).stat().st_size for p in checkpoints),
    )
