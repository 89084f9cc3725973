"""The final model as a service: what MLflow's pyfunc model (and so `mlflow models serve`) hands
it, turned into the module's input, and one table back.

Accepted inputs, each checked with an error that says what the model takes:
- uint8 pixels (N, H, W) or (N, H, W, C), as PIL, OpenCV or scikit-learn give them (digits:
  0..16), or floats in [0, 1] shaped (N, C, H, W) or (N, H, W, C): `FinalEnsemble.inputs`;
- a DataFrame with an `image` column of encoded PNG/JPEG files, as bytes or base64 text (what a
  REST client sends), decoded as the training photos were (workbench/data/photos.py).

Output: a DataFrame with `label` (the class name), `probability` (its probability) and one
`p_<class>` column per class: `prediction_columns`, the same table `workbench predict` writes.

`requirements(folder)` lists the distributions the packaged code imports when it loads and
predicts, found by doing it in a fresh interpreter (so they are what the code uses, not a list
kept by hand).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from workbench.data.photos import BadImage, Policy, decode
from workbench.errors import DataError
from workbench.final import FinalEnsemble

IMAGE_COLUMN = "image"  # the DataFrame column of encoded image files
LOADER = "workbench.serving:ServedModel.load"  # what the pyfunc model calls on its folder


def policy_of(model: FinalEnsemble) -> Policy:
    """How an image file becomes an input of `model`: the size and crop of its training data."""
    pre = model.preprocess
    size = tuple(pre["image_size"]) if pre.get("image_size") else None
    return Policy(size, pre.get("resize_policy", "center_crop"))  # type: ignore[arg-type]


def decode_file(model: FinalEnsemble, file: Path | io.BytesIO, name: str) -> np.ndarray:
    """One encoded image -> uint8 (H, W, 3) at the model's size; BadImage if it is not one."""
    rgb, _ = decode(file, policy_of(model))  # type: ignore[arg-type]  # PIL opens either
    h, w = model.in_shape[1:]
    if rgb.shape[:2] != (h, w):
        raise DataError(
            f"{name} is {rgb.shape[0]}x{rgb.shape[1]}, but the model takes {h}x{w} images and "
            f"its training data had no image_size to resize to; resize the image to {h}x{w}"
        )
    return rgb


def prediction_columns(
    proba: np.ndarray, labels: np.ndarray, classes: list[str]
) -> dict[str, list[Any]]:
    """label, probability (of that label), then p_<class> for every class."""
    rows = np.arange(len(labels))
    cols: dict[str, list[Any]] = {
        "label": [classes[i] for i in labels],
        "probability": proba[rows, labels].astype(float).tolist(),
    }
    for k, c in enumerate(classes):
        cols[f"p_{c}"] = proba[:, k].astype(float).tolist()
    return cols


class ServedModel:
    """`predict(model_input)` -> DataFrame; what the logged pyfunc model delegates to."""

    def __init__(self, model: FinalEnsemble) -> None:
        self.model = model

    @classmethod
    def load(cls, folder: str | Path) -> ServedModel:
        return cls(FinalEnsemble.load(folder))

    def predict(self, model_input: Any) -> Any:
        import pandas as pd

        proba, labels = self.model.run(self.images(model_input))
        return pd.DataFrame(prediction_columns(proba, labels, self.model.classes))

    def images(self, model_input: Any) -> np.ndarray:
        """The module's input (N, C, H, W) float32 in [0, 1] from any accepted input."""
        import pandas as pd

        if isinstance(model_input, dict) and IMAGE_COLUMN in model_input:
            model_input = pd.DataFrame({IMAGE_COLUMN: list(model_input[IMAGE_COLUMN])})
        if isinstance(model_input, pd.DataFrame):
            if IMAGE_COLUMN not in model_input.columns:
                raise DataError(
                    f"a DataFrame input needs an '{IMAGE_COLUMN}' column of encoded PNG/JPEG "
                    f"files (bytes or base64); got columns {list(model_input.columns)[:5]}; "
                    f"or pass pixels as an array (N, {', '.join(map(str, self.model.in_shape))})"
                )
            rgb = [self._decoded(v, i) for i, v in enumerate(model_input[IMAGE_COLUMN])]
            return self.model.inputs(np.stack(rgb), scale=255.0)
        return self.model.inputs(np.asarray(model_input))

    def _decoded(self, value: Any, row: int) -> np.ndarray:
        """One cell (bytes, or base64 text) decoded as the training photos were."""
        data = value
        if isinstance(value, str):
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise DataError(
                    f"{IMAGE_COLUMN} row {row} is text but not base64; send each image file's "
                    "bytes base64-encoded"
                ) from None
        if not isinstance(data, bytes | bytearray):
            raise DataError(
                f"{IMAGE_COLUMN} row {row} is {type(value).__name__}; send encoded PNG/JPEG "
                "files as bytes or base64 text"
            )
        try:
            return decode_file(self.model, io.BytesIO(data), f"{IMAGE_COLUMN} row {row}")
        except BadImage as e:
            raise DataError(f"{IMAGE_COLUMN} row {row} is not an image file: it {e}") from None


def encode_png(pixels: np.ndarray) -> str:
    """uint8 (H, W) or (H, W, 3) pixels as base64 PNG text, as a REST client sends a file."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def requirements(folder: Path, example: Any) -> list[str]:
    """Pinned distributions a fresh interpreter imports to load the model in `folder` and
    predict `example` (each input kind the model takes): name==version, workbench left out
    (its code travels with the model)."""
    probe = (
        "import json, sys, pickle\n"
        "from importlib.metadata import packages_distributions, version\n"
        "from workbench.serving import ServedModel\n"
        "model = ServedModel.load(sys.argv[1])\n"
        "for example in pickle.loads(sys.stdin.buffer.read()):\n"
        "    model.predict(example)\n"
        "dists = packages_distributions()\n"
        "top = {m.split('.')[0] for m in list(sys.modules)}\n"
        "names = {d for t in top for d in dists.get(t, [])} - {'workbench'}\n"
        "print(json.dumps(sorted(f'{d}=={version(d)}' for d in names)))\n"
    )
    import pickle

    done = subprocess.run(
        [sys.executable, "-c", probe, str(folder)],
        input=pickle.dumps(example),
        capture_output=True,
        check=False,
        env=_probe_env(),
    )
    if done.returncode != 0:
        raise RuntimeError(f"the packaged model does not load: {done.stderr.decode()[-2000:]}")
    pins: list[str] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return [p.split("+")[0] for p in pins]  # 2.14.1+cu130 -> 2.14.1: PyPI's build


def _probe_env() -> dict[str, str]:
    import os

    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


__all__ = ["LOADER", "BadImage", "ServedModel", "encode_png", "prediction_columns"]
