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
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from workbench.data import Rows
from workbench.results import Cost, TestProbas
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


def fold_probas(models: Sequence[nn.Module], x: Rows | torch.Tensor) -> np.ndarray:
    """(folds, rows, classes): each fold model's class probabilities (rows sum to 1)."""
    return np.stack([predict_proba(m, x) for m in models])


def _viewed(model: nn.Module, x: Rows | torch.Tensor, views: Sequence[View]) -> np.ndarray:
    """(1 + views, rows, classes): the model's probabilities on the rows as they are, then on
    each view of them."""
    return np.stack([predict_proba(model, x, view=v) for v in (None, *views)])


def tta_oof(
    checkpoints: Sequence[Path],
    rows: Rows,
    folds: Sequence[np.ndarray],
    oof: np.ndarray,
    views: Sequence[View],
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """(rows, classes): a member's out-of-fold probabilities averaged over `views`. Fold model k
    predicts only its own validation rows `folds[k]` (positions in `rows`, the training split),
    in every view; the rows as they are keep their stored out-of-fold probabilities `oof`."""
    out = np.full_like(oof, np.nan)
    for ckpt, held in zip(checkpoints, folds, strict=True):
        viewed = _viewed(load_model(ckpt, device), rows.subset(held), views)[1:]
        out[held] = (oof[held] + viewed.sum(axis=0)) / (1 + len(views))
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
) -> TestProbas:
    """Every member's fold mean, then (given `views`) every member's TTA variant in the same
    order; member `best`'s fold models each alone, without views (the ladder's one network;
    (0, rows, classes) when `best` is None); each refit network's probabilities, and the
    distilled `student`'s."""
    means, tta, alone = [], [], None
    for i, checkpoints in enumerate(members):
        # (folds, 1 + views, rows, classes); one model in memory at a time
        each = np.stack([_viewed(load_model(p, device), x, views) for p in checkpoints])
        means.append(each[:, 0].mean(axis=0))
        if views:
            tta.append(each.mean(axis=(0, 1)))
        if i == best:
            alone = each[:, 0]
    stacked = np.stack(means + tta)
    refit = fold_probas([load_model(p, device) for p in refits], x) if refits else None
    taught = fold_probas([load_model(student, device)], x)[0] if student else None
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
