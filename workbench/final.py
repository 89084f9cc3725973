"""The final ensemble as one `torch.nn.Module`: every kept member's fold models, the fitted
combiner's rule (member weights, soft or hard vote, temperature) and its tie rule, in one graph.

    images (N, C, H, W) float32 in [0, 1]  ->  probabilities (N, classes) float64, labels (N,)

It computes what the ensemble stage scored on the test split, in the same order and precision:
each fold model's logits to float64 softmax, the member's mean over its folds (and, for a TTA
member, over the image and its test-time views: workbench/views.py) by workbench/infer.py's
`member_proba`, then the combiner of workbench/ensemble/combiners.py
written in torch ops (`weighted_mean`, `_vote_shares`, HardVoting's tie rule,
TemperatureScaling). `workbench predict`, the MLflow model and the ONNX graph all run this module;
tests/test_final.py checks it against the combiners on ties and on a study's test split.

`inputs` turns what a user has (uint8 pixels, (N, H, W) or (N, H, W, C), or floats in [0, 1])
into the module's input, with errors that say what the model takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from workbench.errors import ConfigError, DataError
from workbench.infer import member_proba
from workbench.models import Classifier
from workbench.store import RunStore
from workbench.train import EVAL_BATCH, load_model
from workbench.views import TTA, resolve

ALONE = {"vote": "soft", "weights": [1.0], "temperature": None}  # one member's rule, as it is
EPS = 1e-15  # combiners.EPS: probabilities are clipped here before the temperature's log
TIE_TOL = 1e-9  # combiners.TIE_TOL: vote shares closer than this are tied
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")


class FinalEnsemble(nn.Module):
    """`forward(x)` -> (probabilities, labels); `predict_proba` / `predict` on numpy arrays."""

    weights: torch.Tensor  # (members,) float64 on the simplex

    def __init__(
        self,
        members: list[list[Classifier]],
        names: list[str],
        state: dict[str, Any],
        classes: list[str],
        in_shape: tuple[int, int, int],
        preprocess: dict[str, Any] | None = None,
        views: dict[str, list[str]] | None = None,
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList(nn.ModuleList(folds) for folds in members)
        self.names, self.state, self.classes = list(names), dict(state), list(classes)
        c, h, w = (int(v) for v in in_shape)
        self.in_shape: tuple[int, int, int] = (c, h, w)
        self.preprocess = dict(preprocess or {})  # how files became training inputs
        self.views = {n: list(v) for n, v in (views or {}).items() if n in self.names}
        self._views = [resolve(self.views.get(n, ())) for n in self.names]  # torch ops, no weights
        weights = torch.tensor(state["weights"], dtype=torch.float64)
        self.register_buffer("weights", weights / weights.sum())
        self.hard = state["vote"] == "hard"
        self.temperature: float | None = state.get("temperature")
        self.eval()

    def member_probas(self, x: torch.Tensor) -> torch.Tensor:
        """(members, N, classes) float64: each member's mean of its fold models' softmax, by
        member inference's one step (workbench/infer.py)."""
        return torch.stack(
            [
                member_proba(list(folds.children()), x, views)
                for folds, views in zip(self.members, self._views, strict=True)
            ]
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        P = self.member_probas(x)
        w = self.weights.view(-1, 1, 1)
        mean = (w * P).sum(0)  # weighted_mean: the soft vote
        if self.hard:  # _vote_shares, then HardVoting.predict's tie rule
            classes = torch.arange(P.shape[2], device=P.device)
            votes = (P.argmax(dim=2, keepdim=True) == classes).to(P.dtype)
            proba = (w * votes).sum(0)
            tied = proba >= proba.max(dim=1, keepdim=True).values - TIE_TOL
            labels = torch.where(tied, mean, torch.full_like(mean, -torch.inf)).argmax(dim=1)
        else:
            proba = mean
            labels = mean.argmax(dim=1)
        if self.temperature is not None:  # TemperatureScaling keeps the inner labels
            proba = torch.softmax(proba.clamp_min(EPS).log() / self.temperature, dim=1)
        return proba, labels

    @torch.inference_mode()
    def run(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (N, classes), labels (N,)) for float images (N, C, H, W) in [0, 1],
        in batches of EVAL_BATCH."""
        x = self.checked(x)
        device = self.weights.device
        out = [
            self(xb.to(device).contiguous(memory_format=torch.channels_last))
            for xb in x.split(EVAL_BATCH)
        ]
        return (
            torch.cat([p for p, _ in out]).cpu().numpy(),
            torch.cat([lab for _, lab in out]).cpu().numpy(),
        )

    def predict_proba(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.run(x)[0]

    def predict(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.run(x)[1]

    def checked(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """`x` as float32 (N, C, H, W) in [0, 1]; anything else is an error saying so."""
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        if x.ndim != 4 or tuple(x.shape[1:]) != self.in_shape:
            raise DataError(
                f"images must have shape (N, {', '.join(map(str, self.in_shape))}) "
                f"with values in [0, 1]; got {tuple(x.shape)}"
            )
        _check_range(x, 1.0, "float images")
        return x

    def inputs(self, images: np.ndarray, scale: float | None = None) -> np.ndarray:
        """User images as the module's input. uint8 pixels are divided by the training data's
        full intensity (255; 16 for scikit-learn's digits); (N, H, W) is one channel and
        (N, H, W, C) is channels last; floats must already be in [0, 1]. RGB pixels given to a
        one-channel model are turned grey as the training photos were. `scale`: the pixels'
        full intensity when known (255 for decoded files)."""
        a = np.asarray(images)
        c, h, w = self.in_shape
        if np.issubdtype(a.dtype, np.integer):
            scale = scale or float(self.preprocess.get("scale", 255.0))
            _check_range(a, scale, f"{a.dtype} pixels")
            a = a.astype(np.float32) / scale
        elif not np.issubdtype(a.dtype, np.floating):
            raise DataError(f"images must be uint8 pixels or floats in [0, 1]; got {a.dtype}")
        a = a.astype(np.float32, copy=False)
        if a.ndim == 3 and a.shape[1:] == (h, w) and c == 1:
            return a[:, None]
        if a.ndim == 4 and a.shape[1:] == (c, h, w):
            return a
        if a.ndim == 4 and a.shape[1:3] == (h, w) and a.shape[3] in (1, 3, c):
            a = a.transpose(0, 3, 1, 2)
            if a.shape[1] == 3 and c == 1:
                a = np.tensordot(np.asarray(_LUMA, np.float32), a, axes=([0], [1]))[:, None]
            return np.ascontiguousarray(a)
        raise DataError(
            f"images must have shape (N, {h}, {w}, {c}) or (N, {c}, {h}, {w})"
            + (f" or (N, {h}, {w})" if c == 1 else "")
            + f"; got {a.shape}"
        )

    def member(
        self,
        name: str,
        candidates: dict[str, list[Path]] | None = None,
        tta: list[str] | tuple[str, ...] = (),
    ) -> FinalEnsemble:
        """Member `name` alone, the mean of its fold models as the ensemble stage scored it: one
        of this model's members, or any candidate given as its fold checkpoints (a TTA
        candidate, named `<member>+tta`, over the study's views `tta`)."""
        views = {name: self.views[name]} if name in self.views else {}
        if name in self.names:
            folds = list(self.members[self.names.index(name)].children())
        elif candidates and name in candidates:
            if name.endswith(TTA):
                views = {name: list(tta)}
            device = self.weights.device
            folds = [load_model(p, device) for p in candidates[name]]
        else:
            known = sorted({*self.names, *(candidates or {})})
            raise ConfigError(
                f"--member {name!r} is not a member of the study's ensemble; members: {known}"
            )
        return FinalEnsemble(
            [folds],  # type: ignore[list-item]
            [name],
            ALONE,
            self.classes,
            self.in_shape,
            self.preprocess,
            views,
        )

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> FinalEnsemble:
        """The final model from its folder (workbench/export.py writes it)."""
        folder = Path(folder)
        meta = json.loads(RunStore.final_meta(folder).read_text())
        members = [
            [
                load_model(RunStore.final_checkpoint(folder, i, k), device)
                for k in range(meta["folds"])
            ]
            for i in range(len(meta["members"]))
        ]
        model = cls(
            members,
            meta["members"],
            meta["combiner"],
            meta["classes"],
            tuple(meta["in_shape"]),
            meta.get("preprocess", {}),
            meta.get("views", {}),
        )
        return model.to(device)


def _check_range(x: np.ndarray | torch.Tensor, top: float, what: str) -> None:
    if len(x) == 0:
        raise DataError(f"no images given: {what} of shape {tuple(x.shape)}")
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= 0.0 and hi <= top and np.isfinite(lo + hi)):
        raise DataError(
            f"{what} must lie in [0, {top:g}]; got values in [{lo:g}, {hi:g}]"
            + ("; pass the pixels as uint8" if top == 1.0 and hi > 1.0 else "")
        )
