"""The final model: every member's fold models, the combiner's weights and temperature, in a folder.

    final/ensemble.json          classes, input shape, members, vote (soft|hard), weights, T
    final/members/<i>/fold-k.pt  member i's k fold models (state dicts; normalisation included)

A fitted combiner predicts with its member weights alone: soft voting, OOF-fit weighted averaging
and ensemble selection are all a weighted mean of member probabilities; hard voting is weighted
vote shares; temperature scaling rescales either. So the file stores numbers, not a pickle, and
`FinalEnsemble.predict_proba` calls the very functions the combiners use.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import softmax

from workbench.ensemble.combiners import EPS, HardVoting, TemperatureScaling, weighted_mean
from workbench.ensemble.members import Member
from workbench.files import atomic_write
from workbench.models import Classifier
from workbench.train import load_model, predict_proba


def combiner_state(combiner: Any) -> dict[str, Any]:
    """What a fitted combiner needs to predict: vote kind, member weights, temperature."""
    inner = combiner.combiner_ if isinstance(combiner, TemperatureScaling) else combiner
    return {
        "vote": "hard" if isinstance(inner, HardVoting) else "soft",
        "weights": [float(w) for w in combiner.weights_],
        "temperature": getattr(combiner, "temperature_", None),
    }


def combine(P: np.ndarray, state: dict[str, Any]) -> np.ndarray:
    """(members, rows, classes) -> (rows, classes), exactly as the fitted combiner predicts."""
    w = np.asarray(state["weights"], dtype=np.float64)
    if state["vote"] == "hard":
        p = weighted_mean(np.eye(P.shape[2])[P.argmax(axis=2)], w)  # weighted vote shares
    else:
        p = weighted_mean(P, w)
    if state["temperature"] is not None:
        p = softmax(np.log(np.clip(p, EPS, None)) / state["temperature"], axis=1)
    return p


@dataclass
class FinalEnsemble:
    """Predicts images (N, C, H, W) with values in [0, 1]; preprocessing travels in the members."""

    members: list[list[Classifier]]  # per member, its k fold models
    names: list[str]
    state: dict[str, Any]  # combiner_state(...)
    classes: list[str]
    in_shape: tuple[int, int, int]

    def member_probas(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """(members, rows, classes): each member's mean over its fold models."""
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(
                f"images must have shape (N, {', '.join(map(str, self.in_shape))}) "
                f"with values in [0, 1]; got {tuple(x.shape)}"
            )
        return np.stack(
            [np.mean([predict_proba(m, x) for m in folds], axis=0) for folds in self.members]
        )

    def predict_proba(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        return combine(self.member_probas(x), self.state)

    def predict(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.predict_proba(x).argmax(axis=1)

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> FinalEnsemble:
        folder = Path(folder)
        meta = json.loads((folder / "ensemble.json").read_text())
        members = [
            [
                load_model(folder / "members" / str(i) / f"fold-{k}.pt", device)
                for k in range(meta["folds"])
            ]
            for i in range(len(meta["members"]))
        ]
        return cls(
            members, meta["members"], meta["combiner"], meta["classes"], tuple(meta["in_shape"])
        )


def save_final(
    folder: Path,
    members: list[Member],
    combiner: Any,
    method: str,
    classes: list[str],
    in_shape: tuple[int, int, int],
) -> Path:
    """Copy the members' checkpoints with the combiner state into `folder` (replaced whole)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    state = combiner_state(combiner)
    # members of weight 0 change no prediction: leave them out of the final model
    kept = [(m, w) for m, w in zip(members, state["weights"], strict=True) if w > 0]
    state["weights"] = [w for _, w in kept]
    for i, (m, _) in enumerate(kept):
        for k, ckpt in enumerate(m.checkpoints):
            dst = tmp / "members" / str(i) / f"fold-{k}.pt"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ckpt, dst)
    meta = {
        "method": method,
        "classes": classes,
        "in_shape": list(in_shape),
        "members": [m.name for m, _ in kept],
        "folds": len(members[0].checkpoints),
        "combiner": state,
        "input": "float32 images (N, C, H, W), values in [0, 1]",
    }
    atomic_write(tmp / "ensemble.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
