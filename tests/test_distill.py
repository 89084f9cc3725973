"""The distilled student (issue 29): trained in the ensemble stage against the shipped model's
out-of-fold probabilities, never in-sample ones, and scored in the stage's one look at the test
split as the ladder's last rung.

A tiny digits study is searched once; its ensemble stage runs in-process with a spy on the
teacher's targets. Expected targets are computed here from the members' stored out-of-fold
files and the shipped rule's numbers in ensemble.json, with numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, searched_tiny

from workbench import distill
from workbench.train import load_model

ENSEMBLE = """
[ensemble]
methods = ["soft_voting"]
ship = "ensemble"
[distill]
model = "mlp"
params = { epochs = 2 }
alpha = 0.8
temperature = 3.0
"""


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("distill")
    file = searched_tiny(tmp)
    file.write_text(TINY.format(out=tmp / "runs") + ENSEMBLE)
    return tmp


def test_the_student_learns_from_out_of_fold_targets_and_is_scored_once(
    searched: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from workbench.cli import app

    seen: list[tuple[np.ndarray, np.ndarray]] = []  # (row positions, teacher probabilities)
    original = distill.Distiller.targets

    def spy(self: distill.Distiller, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = original(self, x, rows)
        seen.append((rows.numpy().copy(), out.numpy().copy()))
        return out

    monkeypatch.setattr(distill.Distiller, "targets", spy)
    ran = CliRunner().invoke(app, ["ensemble", str(searched / "tiny.toml")])
    assert ran.exit_code == 0, ran.output
    out = searched / "runs" / "tiny"

    # expected teacher: the soft vote's weights over the members' stored OOF probabilities,
    # then the shipped temperature, by hand
    meta = json.loads((out / "ensemble" / "final" / "ensemble.json").read_text())
    rule = meta["combiner"]
    oof = []
    for name in meta["members"]:
        trial = int(name.split("trial-")[1])
        oof.append(np.load(out / "trials" / "mlp" / f"{trial:04d}" / "oof.npz")["proba"])
    w = np.asarray(rule["weights"]) / np.sum(rule["weights"])
    mean = np.tensordot(w, np.stack(oof), axes=1)
    logits = np.log(np.clip(mean, 1e-15, None)) / rule["temperature"]
    teacher = np.exp(logits - logits.max(1, keepdims=True))
    teacher /= teacher.sum(1, keepdims=True)

    split = np.load(out / "split.npz")
    n, batch = len(split["train_idx"]), 64  # TINY's batch size
    assert len(seen) == 2 * (n // batch)  # every step of both epochs asked the teacher
    for rows, targets in seen:
        np.testing.assert_allclose(targets, teacher[rows], atol=1e-6)

    # scored in the one look, as the ladder's last rung, from its own checkpoint
    looks = json.loads((out / "ensemble" / "test_evaluations.json").read_text())
    assert len(looks) == 1 and looks[0]["command"] == "ensemble"
    results = json.loads((out / "ensemble" / "results.json").read_text())
    rung = results["ladder"][-1]
    assert rung["name"] == "student" and rung["vs_below"]["against"] == "final"
    (store_meta,) = (out / "images").glob("*.json")
    x = np.load(store_meta.with_suffix(".npy")).astype(np.float32) / 16.0
    y = np.array(json.loads(store_meta.read_text())["labels"])
    student = load_model(out / "ensemble" / "student" / "members" / "0" / "fold-0.pt", "cpu")
    with torch.inference_mode():
        labels = student.eval()(torch.as_tensor(x[split["test_idx"]])).argmax(1).numpy()
    assert rung["test"]["accuracy"] == pytest.approx(np.mean(labels == y[split["test_idx"]]))
    assert rung["cost"]["networks"] == 1

    # `predict --model student` runs that network
    pngs = searched / "one"
    pngs.mkdir()
    from PIL import Image

    row = split["test_idx"][0]
    Image.fromarray(np.rint(x[row, 0] * 255).astype(np.uint8)).save(pngs / "a.png")
    csv = searched / "student.csv"
    ran = CliRunner().invoke(
        app, ["predict", str(searched / "tiny.toml"), str(pngs), "--model", "student",
              "--out", str(csv)],
    )  # fmt: skip
    assert ran.exit_code == 0, ran.output
    decoded = np.asarray(Image.open(pngs / "a.png"), np.float32)[None, None] / 255
    with torch.inference_mode():
        want = int(student(torch.as_tensor(decoded)).argmax(1))
    assert csv.read_text().splitlines()[1].split(",")[1] == str(want)
