"""Every look at the held-out test split is counted in one place (issue 24): `workbench export`
(the graph's check, and both graphs' scores under --quantize) and `workbench predict
--labels-from-folders` on files that are test rows append to runs/<study>/ensemble/
test_evaluations.json. Predict finds test rows by their pixels, so files of training rows, or
test rows predicted without labels, add no look.

Expected rows and accuracies are computed here from the split file and the image store's arrays
(numpy and onnxruntime), not through workbench's code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from conftest import TINY, run_cli
from PIL import Image

from workbench import graph
from workbench.train import EVAL_BATCH


@dataclass
class Study:
    tmp: Path
    file: Path
    out: Path
    pixels: np.ndarray  # every row's stored pixels, uint8 (N, 8, 8), 0..16 (scikit-learn's digits)
    y: np.ndarray  # (N,) labels
    classes: list[str]
    test_idx: np.ndarray
    train_idx: np.ndarray

    def looks(self) -> list[dict[str, Any]]:
        log = self.out / "ensemble" / "test_evaluations.json"
        return json.loads(log.read_text()) if log.exists() else []

    def pngs(self, folder: str, rows: np.ndarray) -> Path:
        """`rows` as 8-bit PNG files in class folders, 0..16 scaled to 0..255 and rounded."""
        root = self.tmp / folder
        for i in rows:
            path = root / self.classes[self.y[i]] / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.rint(self.pixels[i] * (255 / 16)).astype(np.uint8)).save(path)
        return root


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    tmp = tmp_path_factory.mktemp("looks")
    file = tmp / "tiny.toml"
    file.write_text(TINY.format(out=tmp / "runs"))
    ran = run_cli("study", str(file), "--workers", "2", cwd=tmp, timeout=400)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    out = tmp / "runs" / "tiny"
    split = np.load(out / "split.npz")
    (meta_file,) = (out / "images").glob("*.json")
    meta = json.loads(meta_file.read_text())
    pixels = np.load(meta_file.with_suffix(".npy"))[:, 0]
    y = np.array(meta["labels"])
    return Study(tmp, file, out, pixels, y, meta["classes"], split["test_idx"], split["train_idx"])


def onnx_labels(path: Path, pixels: np.ndarray) -> np.ndarray:
    """The graph's labels in batches of EVAL_BATCH rows on one thread, as export scores them:
    a dynamically quantized graph scales its activations per batch, so its labels depend on
    which rows share a batch (in one CI run, all 360 rows in one batch changed no label against
    the float graph, and export's batches of 128 changed one)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = (pixels[:, None] / 16.0).astype(np.float32)
    return np.concatenate(
        [sess.run(None, {"images": x[i : i + EVAL_BATCH]})[1] for i in range(0, len(x), EVAL_BATCH)]
    )


def test_export_and_quantize_count_each_look(study: Study) -> None:
    n_test, before = len(study.test_idx), len(study.looks())
    assert before >= 1  # the ensemble stage's own look
    path = study.tmp / "e.onnx"
    ran = run_cli(
        "export", str(study.file), "--onnx", str(path), "--quantize", "--max-label-change", "1",
        cwd=study.tmp,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    x, y = study.pixels[study.test_idx], study.y[study.test_idx]
    float_labels = onnx_labels(path, x)
    int8_labels = onnx_labels(study.tmp / "e.int8.onnx", x)
    new = study.looks()[before:]
    assert [(e["command"], e["what"], e["rows"]) for e in new] == [
        ("export", "the final model", n_test),
        ("export --quantize", "the int8 graph", n_test),
    ]
    acc_float, acc_int8 = np.mean(float_labels == y), np.mean(int8_labels == y)
    assert [e["accuracy"] for e in new] == pytest.approx([acc_float, acc_int8])
    said = " ".join(ran.stdout.split())  # rich folds long lines
    assert f"test evaluations so far: {before + 1}" in said
    assert f"test evaluations so far: {before + 2}" in said

    # the gate at 0 changed labels allowed: fails exactly when some label changed
    changed = int((int8_labels != float_labels).sum())
    again = study.tmp / "again.onnx"
    ran = run_cli(
        "export", str(study.file), "--onnx", str(again), "--quantize", "--max-label-change", "0",
        cwd=study.tmp,
    )  # fmt: skip
    assert again.read_bytes() == path.read_bytes()  # the same graph, so the same int8 labels
    assert len(study.looks()) == before + 4  # failed or not, both graphs were scored
    if changed:
        assert ran.returncode == 2, ran.stdout + ran.stderr
        text = " ".join(ran.stdout.split())
        assert f"on {changed} of {n_test} test rows" in text and "--max-label-change 0" in text
        assert not (study.tmp / "again.int8.onnx").exists()
    else:
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert (study.tmp / "again.int8.onnx").exists()


def test_predict_counts_a_look_only_on_test_rows(study: Study) -> None:
    held = {study.pixels[i].tobytes() for i in study.test_idx}
    train = [i for i in study.train_idx if study.pixels[i].tobytes() not in held][:40]
    tests, trains = study.pngs("test-pngs", study.test_idx), study.pngs("train-pngs", train)
    before = len(study.looks())

    def predict(*args: str) -> str:
        ran = run_cli("predict", str(study.file), *args, cwd=study.tmp)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        return " ".join(ran.stdout.split())  # rich folds long lines

    # training rows scored, and test rows not scored: no look
    assert "test evaluations" not in predict(str(trains), "--labels-from-folders")
    assert "test evaluations" not in predict(str(tests), "--out", str(study.tmp / "a.csv"))
    assert len(study.looks()) == before

    # test rows among others, scored: one look of the test rows alone
    table = study.tmp / "mixed.csv"
    said = predict(str(tests), str(trains), "--labels-from-folders", "--out", str(table))
    df = pd.read_csv(table, dtype={"label": str, "true_label": str})
    on_test = df[df["path"].str.startswith(str(tests))]
    assert len(on_test) == len(study.test_idx) and len(df) == len(study.test_idx) + len(train)
    (look,) = study.looks()[before:]
    assert (look["command"], look["what"], look["rows"]) == (
        "predict",
        "the final model",
        len(study.test_idx),
    )
    assert look["accuracy"] == pytest.approx(np.mean(on_test["label"] == on_test["true_label"]))
    assert f"test evaluations so far: {before + 1}" in said

    # a member alone on five test rows and three training rows: a look of five rows
    member = sorted(json.loads((study.out / "ensemble" / "candidates.json").read_text()))[0]
    five = sorted(tests.rglob("*.png"))[:5]
    three = sorted(trains.rglob("*.png"))[:3]
    predict(*map(str, five + three), "--labels-from-folders", "--member", member)
    (look,) = study.looks()[before + 1 :]
    assert (look["command"], look["what"], look["rows"]) == ("predict", f"member {member}", 5)


def test_the_gate_fails_export_with_exit_2_and_keeps_only_the_float_graph(
    study: Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real quantizer changes no label of this study, so 5 changed labels are reported on
    top of its result: the CLI's handling of the gate (the decision is tested below)."""
    from typer.testing import CliRunner

    from workbench.cli import app

    n_test, before = len(study.test_idx), len(study.looks())
    assert 5 / n_test > 0.01  # more than the default allows
    real = graph.quantize
    monkeypatch.setattr(graph, "quantize", lambda *a: {**real(*a), "changed": 5})
    path = study.tmp / "gated.onnx"
    ran = CliRunner().invoke(app, ["export", str(study.file), "--onnx", str(path), "--quantize"])
    said = " ".join(ran.output.split())
    assert ran.exit_code == 2, said
    acc_float = np.mean(onnx_labels(path, study.pixels[study.test_idx]) == study.y[study.test_idx])
    assert (
        f"on 5 of {n_test} test rows ({5 / n_test:.2%}), more than --max-label-change 0.01" in said
    )
    assert f"{acc_float:.2%} (float)" in said and "raise --max-label-change" in said
    assert path.exists() and not (study.tmp / "gated.int8.onnx").exists()
    assert "gated.int8.onnx was removed" in said
    looks = study.looks()[before:]  # both graphs were scored before the gate
    assert [e["what"] for e in looks] == ["the final model", "the int8 graph"]
    assert f"test evaluations so far: {before + 2}" in said


def quantized(rows: int, changed: int) -> graph.Quantized:
    return graph.Quantized(
        path="m.int8.onnx", bytes=1, float_bytes=4, rows=rows, changed=changed,
        accuracy=0.5, float_accuracy=0.75, accuracy_change=-0.25,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("float_labels", "int8_labels", "limit", "fails"),
    [
        ([0, 1, 2, 3], [0, 1, 2, 0], 0.25, False),  # 1 of 4 changed = 0.25: not more than 0.25
        ([0, 1, 2, 3], [0, 1, 2, 0], 0.24, True),
        ([0, 1, 2, 3], [0, 1, 2, 0], 0.0, True),
        ([0, 1, 2, 3], [0, 1, 2, 3], 0.0, False),  # nothing changed: passes even at 0
        ([0, 1, 2, 3], [1, 2, 3, 0], 1.0, False),  # every label changed, all allowed
    ],
)
def test_the_label_change_gate(
    float_labels: list[int], int8_labels: list[int], limit: float, fails: bool
) -> None:
    changed = int((np.array(float_labels) != np.array(int8_labels)).sum())
    error = graph.label_change_error(quantized(len(float_labels), changed), limit)
    assert (error is not None) == fails
    if error:
        share = changed / len(float_labels)
        assert f"on {changed} of 4 test rows ({share:.2%})" in error
        assert "50.00% (int8) against 75.00% (float)" in error and f"{limit:g}" in error


@pytest.mark.parametrize("value", ["1.5", "-0.01", "nan"])
def test_max_label_change_outside_0_1_is_refused(tiny_file: Path, value: str) -> None:
    ran = run_cli(
        "export", str(tiny_file), "--onnx", "m.onnx", "--quantize", "--max-label-change", value,
        cwd=tiny_file.parent,
    )  # fmt: skip
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "--max-label-change must lie in [0, 1]" in ran.stdout and value in ran.stdout
    assert not (tiny_file.parent / "runs").exists()  # refused before anything was read
