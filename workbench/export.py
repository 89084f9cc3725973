"""The final model, packaged: every kept member's fold models and the combiner's rule in a folder
that loads on its own, and what tracking needs to log it as a loadable MLflow model.

    final/ensemble.json          classes, input shape, members, the rule (ensemble/rule.py), the
                                 test-time views of TTA members (workbench/views.py)
    final/members/<i>/fold-k.pt  member i's k fold models (state dicts; normalisation included)

The folder stores numbers and state dicts, not a pickle. It loads as one `FinalEnsemble` module
(workbench/final.py), and the MLflow model serves it through workbench/serving.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import workbench
from workbench.events import ModelPackaged
from workbench.files import atomic_write
from workbench.final import FinalEnsemble
from workbench.serving import IMAGE_COLUMN, LOADER, ServedModel, encode_png, requirements
from workbench.store import RunStore


def save_final(
    folder: Path,
    members: Sequence[tuple[str, Sequence[Path]]],
    state: dict[str, Any],
    method: str,
    classes: list[str],
    in_shape: tuple[int, int, int],
    preprocess: dict[str, Any],
    views: dict[str, list[str]] | None = None,
) -> Path:
    """Copy the members' (name, fold checkpoints) with the rule into `folder` (replaced whole);
    `views`: the test-time views of the TTA members, by name."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # members of weight 0 change no prediction: leave them out of the final model
    kept = [(m, w) for m, w in zip(members, state["weights"], strict=True) if w > 0]
    state = {**state, "weights": [w for _, w in kept]}
    for i, ((_, checkpoints), _) in enumerate(kept):
        for k, ckpt in enumerate(checkpoints):
            dst = RunStore.final_checkpoint(tmp, i, k)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ckpt, dst)
    meta = {
        "method": method,
        "classes": classes,
        "in_shape": list(in_shape),
        "members": [name for (name, _), _ in kept],
        "views": {n: v for n, v in (views or {}).items() if n in {m for (m, _), _ in kept}},
        "folds": len(members[0][1]),
        "combiner": state,
        "input": "float32 images (N, C, H, W), values in [0, 1]",
        "preprocess": preprocess,  # how image files become inputs: size, resize policy, channels
    }
    atomic_write(RunStore.final_meta(tmp), lambda f: f.write(json.dumps(meta, indent=2).encode()))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def serving_example(pixels: np.ndarray, scale: float) -> Any:
    """A REST client's request body: a DataFrame of base64 PNG files of `pixels` (N, C, H, W)
    uint8 with full intensity `scale`."""
    import pandas as pd

    eight = np.rint(pixels.astype(np.float64) * (255.0 / scale)).astype(np.uint8)
    images = eight[:, 0] if eight.shape[1] == 1 else eight.transpose(0, 2, 3, 1)
    return pd.DataFrame({IMAGE_COLUMN: [encode_png(im) for im in images]})


def packaged(
    model: FinalEnsemble,
    final: Path,
    pixels: np.ndarray,
    scale: float,
    files: dict[str, list[str]],
) -> ModelPackaged:
    """The final folder (`model`, loaded from it) packaged for tracking: an example request (PNG
    files of `pixels`) and its answer, requirements found by loading the model in a fresh
    interpreter, and `files` (artifact folder -> local path) logged beside it (the ONNX graph)."""
    example = serving_example(pixels, scale)
    output = ServedModel(model).predict(example)
    return ModelPackaged(
        artifacts={RunStore.FINAL_ARTIFACT: str(final)},
        loader=LOADER,
        code_paths=[str(Path(workbench.__file__).parent)],
        requirements=requirements(final, [example, pixels]),
        input_example=example,
        output_example=output,
        files=files,
    )
