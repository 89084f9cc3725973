"""The final ensemble as one module (workbench/final.py), its ONNX graph (workbench/graph.py) and
its serving inputs (workbench/serving.py), against the combiners that were scored
(workbench/ensemble/combiners.py, rebuilt by ensemble/rule.py) and hand-computed values."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.special import softmax
from torch import nn

from workbench import graph
from workbench.ensemble.rule import fitted_rule
from workbench.errors import DataError
from workbench.final import FinalEnsemble
from workbench.models import Classifier, create_model
from workbench.serving import ServedModel, prediction_columns
from workbench.train import load_model, save_checkpoint

# 4 members x 6 rows x 3 classes. Member argmax votes per row:
#   row 0: 0 0 2 2  (2-2 tie; mean p of class 2 is higher -> 2)
#   row 1: 1 1 1 0  (majority 1)
#   row 2: 0 1 2 0  (majority 0)
#   row 3: 2 2 0 0  (2-2 tie; mean p of classes 0 and 2 equal -> lowest index 0)
#   row 4: 1 0 1 0  (2-2 tie; class 0 has the higher mean -> 0)
#   row 5: 2 1 1 2  (2-2 tie; class 1 has the higher mean -> 1)
T = 0.4 + 1e-3  # breaks a tie of 0.4 and 0.4 inside one member
P = np.array(
    [
        [[.5, .1, .4], [.2, .7, .1], [.6, .3, .1], [.4, .2, T], [.3, .5, .2], [.3, .3, .4]],
        [[.5, .1, .4], [.1, .8, .1], [.2, .5, .3], [.4, .2, T], [.6, .3, .1], [.1, .8, .1]],
        [[.1, .1, .8], [.3, .6, .1], [.2, .2, .6], [T, .2, .4], [.2, .5, .3], [.1, .8, .1]],
        [[.1, .1, .8], [.6, .3, .1], [.7, .2, .1], [T, .2, .4], [.8, .1, .1], [.3, .2, .5]],
    ]
)  # fmt: skip
P = P / P.sum(axis=2, keepdims=True)
HAND_LABELS = [2, 1, 0, 0, 0, 1]  # uniform hard vote with its tie rule, worked out above


class Fixed(nn.Module):
    """A member whose logits are log(p) of its rows of P, whatever the images."""

    def __init__(self, p: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("logits", torch.log(torch.tensor(p, dtype=torch.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)] + 0 * x.flatten(1)[:, :1]


def fixed_ensemble(state: dict[str, object]) -> tuple[FinalEnsemble, np.ndarray]:
    """The ensemble of the members above, and the P it really sees (its float32 logits, softmax
    in float64), computed here with scipy."""
    fixed = [Fixed(p) for p in P]
    members = [[Classifier(f, 3, [0.0], [1.0])] for f in fixed]
    seen = softmax(np.stack([f.logits.numpy() for f in fixed]).astype(np.float64), axis=2)
    return FinalEnsemble(members, ["a", "b", "c", "d"], state, ["x", "y", "z"], (1, 2, 2)), seen


@pytest.mark.parametrize(
    "state",
    [
        {"vote": "hard", "weights": [1, 1, 1, 1], "temperature": None},
        {"vote": "hard", "weights": [0.4, 0.2, 0.2, 0.2], "temperature": None},
        {"vote": "hard", "weights": [1, 1, 1, 1], "temperature": 0.5},
        {"vote": "soft", "weights": [0.1, 0.2, 0.3, 0.4], "temperature": None},
        {"vote": "soft", "weights": [1, 1, 1, 1], "temperature": 2.0},
    ],
)
def test_the_module_predicts_what_the_scored_combiner_does_ties_included(state) -> None:
    model, seen = fixed_ensemble(state)
    proba, labels = model.run(np.zeros((6, 1, 2, 2), np.float32))
    rule = fitted_rule(state, 3)
    np.testing.assert_array_equal(labels, rule.predict(seen))
    np.testing.assert_allclose(proba, rule.predict_proba(seen), rtol=0, atol=1e-12)
    if state["vote"] == "hard" and state["weights"] == [1, 1, 1, 1]:
        assert labels.tolist() == HAND_LABELS


def test_hard_vote_shares_by_hand() -> None:
    model, _ = fixed_ensemble(
        {"vote": "hard", "weights": [0.4, 0.2, 0.2, 0.2], "temperature": None}
    )
    proba = model.predict_proba(np.zeros((6, 1, 2, 2), np.float32))
    # row 0: classes 0, 0, 2, 2 with weights .4 .2 .2 .2 -> 0: 0.6, 2: 0.4
    np.testing.assert_allclose(proba[0], [0.6, 0.0, 0.4])
    # row 3: 2, 2, 0, 0 -> 2: 0.6, 0: 0.4; so the weighted vote breaks the uniform tie
    np.testing.assert_allclose(proba[3], [0.4, 0.0, 0.6])
    assert model.predict(np.zeros((6, 1, 2, 2), np.float32))[3] == 2


def small_ensemble(vote: str, temperature: float | None, width: int = 16) -> FinalEnsemble:
    """Two members of two seeded mlp fold models each, on 8x8 one-channel images."""
    members = []
    for seed in range(4):
        torch.manual_seed(seed)
        members.append(create_model("mlp", 10, (1, 8, 8), [0.3], [0.2], width=width).eval())
    state = {"vote": vote, "weights": [0.7, 0.3], "temperature": temperature}
    classes = [str(d) for d in range(10)]
    return FinalEnsemble([members[:2], members[2:]], ["m0", "m1"], state, classes, (1, 8, 8))


@pytest.mark.parametrize(("vote", "temperature"), [("hard", None), ("soft", 0.7)])
def test_onnx_graph_matches_the_scored_combiner_at_any_batch(
    tmp_path: Path, vote: str, temperature: float | None
) -> None:
    model = small_ensemble(vote, temperature)
    x = np.random.default_rng(0).random((300, 1, 8, 8), dtype=np.float32)
    checked = graph.export_onnx(model, tmp_path / "m.onnx", x)
    assert checked.labels_equal and checked.max_abs_diff <= 1e-5 and checked.rows == 300
    # the scored path: each fold's float64 softmax, the member's fold mean, the combiner
    with torch.no_grad():
        seen = np.stack(
            [
                np.mean([softmax(f(torch.tensor(x)).double().numpy(), axis=1) for f in folds], 0)
                for folds in model.members
            ]
        )
    rule = fitted_rule(model.state, 10)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for rows in (slice(0, 1), slice(0, 37), slice(0, 300)):
        p, labels = sess.run(None, {"images": x[rows]})
        np.testing.assert_array_equal(labels, rule.predict(seen[:, rows]))
        np.testing.assert_allclose(p, rule.predict_proba(seen[:, rows]), atol=1e-5)
    q = graph.quantize(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", x, rule.predict(seen))
    assert q["bytes"] < q["float_bytes"] and q["float_accuracy"] == 1.0
    assert q["accuracy_change"] == pytest.approx(q["accuracy"] - 1.0)


def digits_like() -> ServedModel:
    """A served 8x8 one-channel model whose training pixels ran 0..16 (scikit-learn's digits)."""
    model = small_ensemble("soft", None)
    model.preprocess = {"channels": 1, "scale": 16.0}
    return ServedModel(model)


def test_serving_takes_pixels_floats_and_files_alike() -> None:
    served = digits_like()
    pixels = np.random.default_rng(1).integers(0, 17, (20, 8, 8)).astype(np.uint8)
    expected = served.model.predict_proba(pixels[:, None] / 16.0)
    for given in (pixels, pixels[..., None], pixels.astype(np.int64), pixels[:, None] / 16.0):
        table = served.predict(given)
        np.testing.assert_allclose(table[[f"p_{d}" for d in range(10)]], expected, atol=1e-12)
    assert table["label"].tolist() == [str(d) for d in expected.argmax(1)]
    # PNG files, as a REST client sends them (base64 text or raw bytes); 8-bit, so 0..16 -> 0..255
    eight = np.rint(pixels * (255 / 16)).astype(np.uint8)
    files = []
    for im in eight:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        files.append(buf.getvalue())
    decoded = served.model.predict_proba(eight[:, None] / 255.0)
    for column in ([base64.b64encode(f).decode() for f in files], files):
        table = served.predict(pd.DataFrame({"image": column}))
        np.testing.assert_allclose(table[[f"p_{d}" for d in range(10)]], decoded, atol=1e-12)


@pytest.mark.parametrize(
    ("given", "says"),
    [
        (np.full((2, 8, 8), 17, np.uint8), "uint8 pixels must lie in [0, 16]; got values in "
         "[17, 17]"),
        (np.full((2, 1, 8, 8), 1.5), "float images must lie in [0, 1]; got values in [1.5, 1.5]; "
         "pass the pixels as uint8"),
        (np.zeros((2, 9, 9), np.uint8), "images must have shape (N, 8, 8, 1) or (N, 1, 8, 8) or "
         "(N, 8, 8); got (2, 9, 9)"),
        (np.zeros((0, 8, 8), np.uint8), "no images given"),
        (pd.DataFrame({"img": ["x"]}), "a DataFrame input needs an 'image' column"),
        (pd.DataFrame({"image": ["not base64!"]}), "image row 0 is text but not base64"),
        (pd.DataFrame({"image": [base64.b64encode(b"hello").decode()]}),
         "image row 0 is not an image file"),
        (pd.DataFrame({"image": [3]}), "image row 0 is int"),
    ],
)  # fmt: skip
def test_serving_errors_say_what_the_model_takes(given: object, says: str) -> None:
    with pytest.raises(DataError) as e:
        digits_like().predict(given)
    assert says in str(e.value)


def test_prediction_columns_by_hand() -> None:
    proba = np.array([[0.2, 0.8], [0.6, 0.4]])
    cols = prediction_columns(proba, np.array([1, 1]), ["cat", "dog"])
    assert cols == {
        "label": ["dog", "dog"],
        "probability": [0.8, 0.4],  # the label's probability, not the row's maximum
        "p_cat": [0.2, 0.6],
        "p_dog": [0.8, 0.4],
    }


def test_a_member_alone_is_its_fold_mean() -> None:
    model = small_ensemble("hard", 0.5)
    x = np.random.default_rng(2).random((10, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        folds = [softmax(f(torch.tensor(x)).double().numpy(), axis=1) for f in model.members[1]]
    np.testing.assert_allclose(model.member("m1").predict_proba(x), np.mean(folds, 0), atol=1e-12)
    with pytest.raises(
        Exception, match=r"'m9' is not a member of the study's ensemble; members: \['m0', 'm1'\]"
    ):
        model.member("m9")


def test_any_candidate_alone_from_its_checkpoints(tmp_path: Path) -> None:
    """A candidate the final rule left out (weight 0) predicts alone from its fold files."""
    model = small_ensemble("soft", None)
    meta = {"arch": "mlp", "num_classes": 10, "in_shape": [1, 8, 8], "hparams": {"width": 16}}
    paths = []
    for seed in (7, 8):
        torch.manual_seed(seed)
        fold = create_model("mlp", 10, (1, 8, 8), [0.3], [0.2], width=16).eval()
        paths.append(save_checkpoint(tmp_path / f"fold-{seed}.pt", fold, meta))
    x = np.random.default_rng(3).random((10, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        expected = np.mean(
            [softmax(load_model(p)(torch.tensor(x)).double().numpy(), axis=1) for p in paths], 0
        )
    alone = model.member("left-out", {"left-out": paths})
    np.testing.assert_allclose(alone.predict_proba(x), expected, atol=1e-12)
    assert alone.classes == model.classes and alone.names == ["left-out"]


def test_a_graph_over_the_size_limit_keeps_its_weights_beside_it(tmp_path: Path) -> None:
    """The external-data path, forced by a limit of 1 KB: the graph file holds no weights, the
    data file holds them all, onnxruntime runs the pair (also moved to another folder) with the
    module's labels, and the int8 copy is written the same way."""
    model = small_ensemble("soft", 0.7, width=512)  # 1.2 M parameters: 4.8 MB
    x = np.random.default_rng(1).random((64, 1, 8, 8), dtype=np.float32)
    weights = sum(p.numel() * 4 for p in model.parameters())  # float32 bytes
    path = tmp_path / "m.onnx"
    checked = graph.export_onnx(model, path, x, external_above=1000)
    data = tmp_path / "m.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert path.stat().st_size < 0.5 * weights <= data.stat().st_size
    assert checked.bytes == path.stat().st_size + data.stat().st_size
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for p in (path, data):
        p.rename(moved / p.name)
    sess = ort.InferenceSession(str(moved / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"images": x})[1], model.predict(x))
    q = graph.quantize(moved / "m.onnx", moved / "m.int8.onnx", x)
    assert (moved / "m.int8.onnx.data").exists() and q["changed"] <= 64
    # under the limit, a graph is one file again, and the stale data file goes
    graph.export_onnx(model, moved / "m.onnx", x)
    assert not (moved / "m.onnx.data").exists()
