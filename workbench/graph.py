"""The final ensemble as one ONNX graph: `FinalEnsemble` (workbench/final.py) exported whole, with
a dynamic batch dimension, and checked with onnxruntime against the torch module.

    images float32 (batch, C, H, W) in [0, 1] -> probabilities float64 (batch, classes),
                                                 labels int64 (batch,)

A graph whose weights pass EXTERNAL_ABOVE bytes keeps them in `<name>.data` beside it (ONNX
external data): one protobuf message cannot pass 2 GiB, and six fine-tuned resnet18 members made
a 287 MB graph, so resnet50 members over 5 folds would not fit. onnxruntime loads the pair from
the graph's path; move both files together.

`export_onnx` writes the graph and returns the check: on the rows given (the test split), every
label equal and max |p_onnx - p_torch| <= 1e-5, else ExportError. The check needs no labels;
given labels, it also scores the graph (a look at the test split, which the caller counts).
`quantize` adds a dynamically int8-quantized copy (weights int8, activations quantized per batch
at run time) and reports its size, how many of its labels differ from the float graph's, and,
given labels, both graphs' accuracy; `label_change_error` is the gate on those differences.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from workbench.data import Rows
from workbench.errors import ExportError
from workbench.final import FinalEnsemble
from workbench.models import state_bytes
from workbench.train import EVAL_BATCH

TOLERANCE = 1e-5  # max |p_onnx - p_torch| allowed; measured on digits: ~1.4e-7
INPUTS, OUTPUTS = ["images"], ["probabilities", "labels"]
Images = np.ndarray | Rows  # float images in [0, 1] (N, C, H, W), or rows of the image store
# bytes of weights above which they go to the external data file: protobuf's limit is 2 GiB for
# the whole message, and the graph's own nodes and constants need room beside the weights
EXTERNAL_ABOVE = 1_500_000_000


def data_file(path: Path) -> Path:
    """Where the graph at `path` keeps its weights when they are external data."""
    return path.with_name(path.name + ".data")


def files(path: Path) -> list[Path]:
    """The graph's files: itself, and its external data file when it has one."""
    return [path] + ([data_file(path)] if data_file(path).exists() else [])


@dataclass(frozen=True)
class GraphCheck:
    path: Path
    bytes: int  # the graph's files together
    rows: int  # rows compared
    max_abs_diff: float  # max |p_onnx - p_torch| over them
    labels_equal: bool
    accuracy: float | None  # on the rows, when their labels were given


def export_onnx(
    model: FinalEnsemble,
    path: Path,
    x: Images,
    y: np.ndarray | None = None,
    external_above: int = EXTERNAL_ABOVE,
) -> GraphCheck:
    """Write `model` as one ONNX graph at `path` (its weights in `data_file(path)` when they
    pass `external_above` bytes) and check it on `x` (N, C, H, W): float images in [0, 1], or
    rows of the image store, made float a batch at a time."""
    example = torch.as_tensor(model.checked(next(_batches(x))[:2]))
    external = state_bytes(model) > external_above
    with _work_folder(path) as work, _quiet():
        try:
            torch.onnx.export(
                model.cpu(),
                (example,),
                str(work / path.name),
                input_names=INPUTS,
                output_names=OUTPUTS,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                dynamo=True,
                verbose=False,
                external_data=external,
            )
        except Exception as e:  # the exporter raises many types; say which model failed
            raise ExportError(f"the final model cannot be exported to ONNX: {e}") from None
        _place(work / path.name, path)
    return check(model, path, x, y)


@contextlib.contextmanager
def _work_folder(path: Path) -> Iterator[Path]:
    """A fresh folder beside `path` where a graph is written under its final name (an external
    data file is found by the name the graph records), removed afterwards."""
    work = path.with_name(path.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _place(written: Path, path: Path) -> None:
    """Move a graph (and its data file, if any) to `path`, the data first: a reader never finds
    a graph whose weights are not yet there. A stale data file of an earlier graph goes."""
    if data_file(written).exists():
        os.replace(data_file(written), data_file(path))
    else:
        data_file(path).unlink(missing_ok=True)
    os.replace(written, path)


def sample(rows: int, size: int, seed: int) -> np.ndarray:
    """Sorted positions of `size` of `rows` rows drawn without replacement with `seed`, the rows
    a graph is checked on (every row when `size` is 0 or not under `rows`)."""
    if size == 0 or size >= rows:
        return np.arange(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, size, replace=False))


def check(model: FinalEnsemble, path: Path, x: Images, y: np.ndarray | None = None) -> GraphCheck:
    """Compare the graph at `path` with `model` on `x`, batch by batch (the test split of 224 px
    photos is GBs as float); ExportError when they disagree. Labels `y` only score the graph:
    the parity check itself needs none."""
    sess = session(path)
    diff, differ, labels = 0.0, 0, []
    for xb in _batches(x):
        p_torch, l_torch = model.run(xb)
        p_onnx, l_onnx = sess.run(None, {INPUTS[0]: xb})
        diff = max(diff, float(np.abs(p_onnx - p_torch).max()))
        differ += int((l_onnx != l_torch).sum())
        labels.append(l_onnx)
    if diff > TOLERANCE or differ:
        raise ExportError(
            f"{path}: the ONNX graph disagrees with the torch model on {len(x)} rows: max "
            f"|p_onnx - p_torch| = {diff:.2e} (allowed {TOLERANCE:g}), {differ} label(s) differ"
        )
    acc = _accuracy(np.concatenate(labels), y)
    size = sum(p.stat().st_size for p in files(path))
    return GraphCheck(path, size, len(x), diff, True, acc)


def _batches(x: Images, batch: int = EVAL_BATCH) -> Iterator[np.ndarray]:
    """Float32 (B, C, H, W) numpy batches of an image array or of store rows."""
    if isinstance(x, Rows):
        for xb in x.chunks(batch):
            yield xb.numpy()
    else:
        for i in range(0, len(x), batch):
            yield np.ascontiguousarray(x[i : i + batch], dtype=np.float32)


def session(path: Path, threads: int = 1) -> Any:
    """An onnxruntime CPU session on `threads` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, x: Images, threads: int = 1, batch: int = EVAL_BATCH) -> tuple[Any, Any]:
    """(probabilities, labels) from the graph at `path`, in batches of `batch` rows."""
    sess = session(path, threads)
    out = [sess.run(None, {INPUTS[0]: xb}) for xb in _batches(x, batch)]
    return np.concatenate([p for p, _ in out]), np.concatenate([lab for _, lab in out])


class Quantized(TypedDict):
    """What `quantize` found on the rows given: the int8 graph beside the float graph."""

    path: str  # the int8 graph
    bytes: int  # its size
    float_bytes: int  # the float graph's size
    rows: int  # rows compared
    changed: int  # rows whose int8 label differs from the float graph's
    accuracy: float | None  # the int8 graph's, when labels were given
    float_accuracy: float | None
    accuracy_change: float | None  # int8 - float, as a fraction (0.01 = 1 point)


def quantize(path: Path, out: Path, x: Images, y: np.ndarray | None = None) -> Quantized:
    """A dynamically int8-quantized copy of the graph at `path`, written at `out`; its size and
    labels on `x` beside the float graph's, and both accuracies when `y` is given."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = data_file(path).exists()
    with _work_folder(out) as work, _quiet():
        quantize_dynamic(
            str(path), str(work / out.name), weight_type=QuantType.QInt8,
            use_external_data_format=external,
        )  # fmt: skip
        _place(work / out.name, out)
    float_labels, int8_labels = run_onnx(path, x)[1], run_onnx(out, x)[1]
    acc_float, acc_int8 = _accuracy(float_labels, y), _accuracy(int8_labels, y)
    return Quantized(
        path=str(out),
        bytes=sum(p.stat().st_size for p in files(out)),
        float_bytes=sum(p.stat().st_size for p in files(path)),
        rows=len(float_labels),
        changed=int((int8_labels != float_labels).sum()),
        accuracy=acc_int8,
        float_accuracy=acc_float,
        accuracy_change=None if acc_int8 is None or acc_float is None else acc_int8 - acc_float,
    )


def label_change_error(q: Quantized, limit: float) -> str | None:
    """Why the int8 graph must not ship, or None: its labels differ from the float graph's on
    more than `limit` (a share in [0, 1]) of the rows compared."""
    share = q["changed"] / max(q["rows"], 1)
    if share <= limit:
        return None
    scores = (
        f"; test accuracy {q['accuracy']:.2%} (int8) against {q['float_accuracy']:.2%} (float)"
        if q["accuracy"] is not None and q["float_accuracy"] is not None
        else ""
    )
    return (
        f"{q['path']}: the int8 graph's label differs from the float graph's on {q['changed']} "
        f"of {q['rows']} test rows ({share:.2%}), more than --max-label-change {limit:g} "
        f"({limit:.2%}) allows{scores}; ship the float graph, or raise --max-label-change to "
        "accept the change"
    )


def _accuracy(labels: np.ndarray, y: np.ndarray | None) -> float | None:
    return None if y is None else float(np.mean(labels == y))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter and the quantizer print progress and warnings; keep the terminal ours."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
