"""The final model, packaged: every kept member's fold models and the combiner's rule in a folder
that loads on its own, and what tracking needs to log it as a loadable MLflow model.

    final/ensemble.json          classes, input shape, members, the rule (ensemble/rule.py)
    final/members/<i>/fold-k.pt  member i's k fold models (state dicts; normalisation included)

The folder stores numbers and state dicts, not a pickle. `FinalEnsemble.predict_proba` runs the
members through workbench/infer.py and combines them with the fitted combiner rebuilt from the
rule, so what is served is what was scored on the test split, ties included.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import workbench
from workbench.ensemble.rule import fitted_rule
from workbench.events import ModelPackaged
from workbench.files import atomic_write
from workbench.infer import fold_mean
from workbench.models import Classifier
from workbench.train import load_model

LOADER = "workbench.export:FinalEnsemble.load"  # what a packaged model calls on its folder


@dataclass
class FinalEnsemble:
    """Predicts images (N, C, H, W) with values in [0, 1]; preprocessing travels in the members."""

    members: list[list[Classifier]]  # per member, its k fold models
    names: list[str]
    state: dict[str, Any]  # the combiner's rule (workbench/ensemble/rule.py)
    classes: list[str]
    in_shape: tuple[int, int, int]
    preprocess: dict[str, Any] = field(default_factory=dict)  # how files became training inputs

    def __post_init__(self) -> None:
        self.rule = fitted_rule(self.state, len(self.classes))

    def member_probas(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """(members, rows, classes): each member's mean over its fold models."""
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(
                f"images must have shape (N, {', '.join(map(str, self.in_shape))}) "
                f"with values in [0, 1]; got {tuple(x.shape)}"
            )
        return np.stack([fold_mean(folds, x) for folds in self.members])

    def predict_proba(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        return np.asarray(self.rule.predict_proba(self.member_probas(x)))

    def predict(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        return np.asarray(self.rule.predict(self.member_probas(x)))

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
            members,
            meta["members"],
            meta["combiner"],
            meta["classes"],
            tuple(meta["in_shape"]),
            meta.get("preprocess", {}),
        )


def save_final(
    folder: Path,
    members: Sequence[tuple[str, Sequence[Path]]],
    state: dict[str, Any],
    method: str,
    classes: list[str],
    in_shape: tuple[int, int, int],
    preprocess: dict[str, Any],
) -> Path:
    """Copy the members' (name, fold checkpoints) with the rule into `folder` (replaced whole)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # members of weight 0 change no prediction: leave them out of the final model
    kept = [(m, w) for m, w in zip(members, state["weights"], strict=True) if w > 0]
    state = {**state, "weights": [w for _, w in kept]}
    for i, ((_, checkpoints), _) in enumerate(kept):
        for k, ckpt in enumerate(checkpoints):
            dst = tmp / "members" / str(i) / f"fold-{k}.pt"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ckpt, dst)
    meta = {
        "method": method,
        "classes": classes,
        "in_shape": list(in_shape),
        "members": [name for (name, _), _ in kept],
        "folds": len(members[0][1]),
        "combiner": state,
        "input": "float32 images (N, C, H, W), values in [0, 1]",
        "preprocess": preprocess,  # how image files become inputs: size, resize policy, channels
    }
    atomic_write(tmp / "ensemble.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def packaged(final: Path, input_example: np.ndarray) -> ModelPackaged:
    """The final folder packaged for tracking, with an input example and its output."""
    import torchvision

    output = FinalEnsemble.load(final).predict_proba(input_example)
    return ModelPackaged(
        artifacts={"final": str(final)},
        loader=LOADER,
        code_paths=[str(Path(workbench.__file__).parent)],
        requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"torchvision=={torchvision.__version__.split('+')[0]}",  # models.py imports it
            "numpy",
            "scipy",
            "scikit-learn",
            "pydantic",
        ],
        input_example=input_example,
        output_example=output,
    )
