"""TTA members (issue 29): each candidate also competes as its variant averaged over test-time
views, chosen on out-of-fold rows, and the final model applies the views of the members that carry
them through the torch module, ONNX, the served model and `predict`.

One tiny digits study is searched once; its ensemble stage is run in-process with two study files:
a view that scrambles the pixels (registered by the test: useless, so its variants must get no
weight), and `hflip` forced into the shipped soft vote (so the final model must apply it).
Expected probabilities are computed here from the fold checkpoints, with numpy's flips and
permutations, not through workbench's views, member inference or final model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from conftest import TINY, run_cli, searched_tiny
from PIL import Image

from workbench import views
from workbench.final import FinalEnsemble
from workbench.serving import ServedModel
from workbench.train import load_model

PERM = np.random.default_rng(0).permutation(64)  # the scramble: a fixed shuffle of 8x8 pixels


def scramble(x: np.ndarray) -> np.ndarray:
    """(N, 1, 8, 8) with its 64 pixels shuffled by PERM."""
    return x.reshape(len(x), 1, 64)[:, :, PERM].reshape(x.shape)


def _scramble_views() -> list[views.View]:
    perm = torch.as_tensor(PERM)
    return [lambda x: x.flatten(2)[:, :, perm].reshape(x.shape)]


@dataclass
class Study:
    tmp: Path
    out: Path
    x: np.ndarray  # every row's image, float32 (N, 1, 8, 8) in [0, 1]
    y: np.ndarray
    train_idx: np.ndarray
    test_idx: np.ndarray

    def ensemble(self, section: str) -> dict:
        """Run `workbench ensemble` in-process (the registered scramble view lives here) with
        the tiny study's file plus `section`; the stored results."""
        from typer.testing import CliRunner

        from workbench.cli import app

        file = self.tmp / "tiny.toml"
        file.write_text(TINY.format(out=self.tmp / "runs") + section)
        ran = CliRunner().invoke(app, ["ensemble", str(file)])
        assert ran.exit_code == 0, ran.output
        return json.loads((self.out / "ensemble" / "results.json").read_text())


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    tmp = tmp_path_factory.mktemp("tta")
    searched_tiny(tmp)
    out = tmp / "runs" / "tiny"
    split = np.load(out / "split.npz")
    (meta,) = (out / "images").glob("*.json")
    x = np.load(meta.with_suffix(".npy")).astype(np.float32) / 16.0  # digits: 0..16
    y = np.array(json.loads(meta.read_text())["labels"])
    return Study(tmp, out, x, y, split["train_idx"], split["test_idx"])


def softmax64(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(model(torch.as_tensor(x)).double(), dim=1).numpy()


def tta_oof_log_loss(s: Study, run: Path, view: Callable[[np.ndarray], np.ndarray]) -> float:
    """A trial's OOF log loss over the image and one view: fold k's model predicts the
    validation rows its fold file lists, as they are and in the view."""
    x = s.x[s.train_idx]
    y = s.y[s.train_idx]
    proba = np.full((len(x), 10), np.nan)
    for k in range(3):
        held = np.load(run / f"fold-{k}.npz")["rows"]
        model = load_model(run / f"fold-{k}.pt", "cpu").eval()
        proba[held] = (softmax64(model, x[held]) + softmax64(model, view(x[held]))) / 2
    assert not np.isnan(proba).any()  # the folds cover every training row once
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, 1))))


def test_a_useless_view_gets_no_weight(study: Study, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(views._REGISTRY, "scramble", _scramble_views)
    results = study.ensemble(
        '[ensemble]\ntta = ["scramble"]\nmethods = ["weighted", "selection"]\nselection_init = 1\n'
    )
    names = results["methods"]["weighted"]["members"]
    tta = [n for n in names if n.endswith("+tta")]
    assert tta and len(tta) == len(names) // 2  # every candidate has its variant
    for method in ("weighted", "selection"):
        weights = dict(zip(names, results["methods"][method]["weights"], strict=True))
        assert all(weights[n] == 0 for n in tta), (method, weights)
    meta = json.loads((study.out / "ensemble" / "final" / "ensemble.json").read_text())
    assert not any(n.endswith("+tta") for n in meta["members"]) and meta["views"] == {}
    # each variant's OOF rows were predicted by the fold model that held them out, in the view
    for m in results["members"]:
        if m["name"].endswith("+tta"):
            run = study.out / "trials" / "mlp" / f"{m['trial']:04d}"
            expected = tta_oof_log_loss(study, run, scramble)
            assert m["oof"]["log_loss"] == pytest.approx(expected, rel=1e-6)
    acc = {r["name"]: r["test"]["accuracy"] for r in results["ladder"]}
    assert acc["k-fold bag with TTA"] < acc["k-fold bag"]


def test_the_final_model_applies_the_views_it_was_scored_with(study: Study) -> None:
    results = study.ensemble(
        '[ensemble]\ntta = ["hflip"]\nmethods = ["soft_voting"]\nship = "ensemble"\n'
    )
    final = study.out / "ensemble" / "final"
    meta = json.loads((final / "ensemble.json").read_text())
    tta = [n for n in meta["members"] if n.endswith("+tta")]
    assert tta and meta["views"] == {n: ["hflip"] for n in tta}
    x, y = study.x[study.test_idx], study.y[study.test_idx]
    expected = soft_vote(final, meta, x)
    assert results["final"]["test"]["accuracy"] == pytest.approx(np.mean(expected == y))

    module = FinalEnsemble.load(final)
    np.testing.assert_array_equal(module.predict(x), expected)
    sess = ort.InferenceSession(str(study.out / "ensemble" / "model.onnx"))
    np.testing.assert_array_equal(sess.run(None, {"images": x})[1], expected)
    pixels = np.rint(x[:, 0] * 16).astype(np.uint8)  # as scikit-learn gives digits
    served = ServedModel(module).predict(pixels)  # what the MLflow model's pyfunc runs
    np.testing.assert_array_equal(served["label"].astype(int), expected)
    # `workbench predict` on 8-bit PNG files of 40 test rows: their decoded pixels are the input
    eight = np.rint(x[:40, 0] * 255).astype(np.uint8)
    pngs = study.tmp / "pngs"
    for i, image in enumerate(eight):
        (pngs / "any").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(pngs / "any" / f"{i:03d}.png")
    csv = study.tmp / "predictions.csv"
    ran = run_cli("predict", str(study.tmp / "tiny.toml"), str(pngs), "--out", str(csv),
                  cwd=study.tmp)  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    got = pd.read_csv(csv, dtype={"label": str})
    rows = [int(Path(p).stem) for p in got["path"]]
    decoded = (eight[:, None] / np.float32(255)).astype(np.float32)
    np.testing.assert_array_equal(got["label"].astype(int), soft_vote(final, meta, decoded)[rows])


def soft_vote(final: Path, meta: dict, x: np.ndarray) -> np.ndarray:
    """The final soft vote's labels on float images `x`: each member's fold models on the image
    (and its mirror, for a member the meta gives views), float64 softmax, their mean, the
    vote's weights, argmax (the temperature keeps the labels)."""
    members = []
    for i, name in enumerate(meta["members"]):
        each = []
        for k in range(meta["folds"]):
            model = load_model(final / "members" / str(i) / f"fold-{k}.pt", "cpu").eval()
            each.append(softmax64(model, x))
            if name in meta["views"]:
                each.append(softmax64(model, x[..., ::-1].copy()))
        members.append(np.mean(each, axis=0))
    w = np.asarray(meta["combiner"]["weights"]) / np.sum(meta["combiner"]["weights"])
    return np.argmax(np.tensordot(w, np.stack(members), axes=1), axis=1)


def test_views_are_the_transforms_they_name() -> None:
    """Hand-made 4x4 images: the flip mirrors, each shift moves by N and zero-fills, and a
    corner crop holds only its corner."""
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    (flip,) = views.resolve(["hflip"])
    assert flip(x)[0, 0, 0].tolist() == [3, 2, 1, 0]
    up, down, left, right = views.resolve(["shift-1"])
    assert up(x)[0, 0].tolist() == [[4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [0, 0, 0, 0]]
    assert right(x)[0, 0, 0].tolist() == [0, 0, 1, 2]
    assert down(x)[0, 0, 0].tolist() == [0, 0, 0, 0] and left(x)[0, 0, 0].tolist() == [1, 2, 3, 0]
    corner = torch.zeros(1, 1, 16, 16)
    corner[..., 15, 15] = 1.0  # one bright pixel, bottom right
    crops = views.resolve(["crops"])
    assert len(crops) == 5 and all(c(corner).shape == corner.shape for c in crops)
    top_left, bottom_right = crops[1](corner), crops[4](corner)
    assert top_left.max() == 0 and bottom_right.max() > 0
    assert views.count(["hflip", "crops", "shift-2"]) == 10
    assert "is not a test-time view" in (views.problem("shift-0") or "")


def test_crops_resize_as_torch_interpolates_and_every_view_exports_to_onnx(tmp_path: Path) -> None:
    """The crops' matrix products against torch's bilinear `interpolate` at 8 to 224 px; and a
    final model whose member carries every built-in view exports to ONNX with equal labels
    (export_onnx's own parity check) and the views applied (its probabilities differ from the
    plain member's)."""
    import torch.nn.functional as F

    from workbench import graph
    from workbench.models import create_model

    for side in (8, 28, 224):
        x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(side))
        ch = round(side * 7 / 8)
        for view, (top, left) in zip(
            views.resolve(["crops"]), [(0.5, 0.5), (0, 0), (0, 1), (1, 0), (1, 1)], strict=True
        ):
            y0, x0 = round((side - ch) * top), round((side - ch) * left)
            part = x[..., y0 : y0 + ch, x0 : x0 + ch]
            want = F.interpolate(part, size=(side, side), mode="bilinear", align_corners=False)
            torch.testing.assert_close(view(x), want, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    folds = [create_model("cnn", 10, (1, 16, 16), [0.3], [0.2], width=8).eval() for _ in range(2)]
    rule = {"vote": "soft", "weights": [1.0], "temperature": None}
    every = ["hflip", "vflip", "shift-2", "crops"]
    classes = [str(d) for d in range(10)]
    model = FinalEnsemble([folds], ["m+tta"], rule, classes, (1, 16, 16), None, {"m+tta": every})
    x = np.random.default_rng(0).random((40, 1, 16, 16), dtype=np.float32)
    checked = graph.export_onnx(model, tmp_path / "tta.onnx", x)
    assert checked.labels_equal and checked.max_abs_diff <= 1e-5
    plain = FinalEnsemble([folds], ["m"], rule, classes, (1, 16, 16))
    assert np.abs(model.predict_proba(x) - plain.predict_proba(x)).max() > 1e-3
