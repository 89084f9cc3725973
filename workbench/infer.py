"""Member inference: the one step that turns fold models and images into class probabilities.

A member is k fold models; its probabilities are their mean (cross-validation bagging), so
nothing is retrained and weights fit on out-of-fold rows match how the member predicts. The
ensemble stage gets arrays from here, (members, rows, classes), and the final model and the
bench predict through the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from workbench.data import Rows
from workbench.train import load_model, predict_proba


def fold_mean(models: Sequence[nn.Module], x: Rows | torch.Tensor) -> np.ndarray:
    """(rows, classes): the mean of the fold models' class probabilities (rows sum to 1)."""
    return np.mean([predict_proba(m, x) for m in models], axis=0)


def member_probas(
    members: Sequence[Sequence[Path]], x: Rows | torch.Tensor, device: str | torch.device = "cpu"
) -> np.ndarray:
    """(members, rows, classes) for members given as their fold checkpoints, loaded one at a
    time (a member's k models are in memory together, never every member's)."""
    return np.stack(
        [fold_mean([load_model(p, device) for p in checkpoints], x) for checkpoints in members]
    )
