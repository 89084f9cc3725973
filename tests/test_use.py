"""Using a study's final model, end to end: `workbench predict`, the registered MLflow model (in a
fresh process and over REST from `mlflow models serve`) and the ONNX graph give the labels the
ensemble stage scored, on every test row.

The study is the digits template with a hard vote, temperature-scaled: the final rule with a tie
rule. The scored labels are recomputed here from the stored fold checkpoints through member
inference and the fitted combiner (ensemble/rule.py), not through workbench/final.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import urllib.request
import venv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from conftest import CLI_ENV, TINY, free_port, run_cli, wait_until_up
from PIL import Image

from workbench.ensemble.rule import fitted_rule
from workbench.infer import member_probas

NAME = "tiny-final"


@dataclass
class Done:
    tmp: Path
    study: Path
    out: Path
    store: str
    pixels: np.ndarray  # the test rows' stored pixels, uint8 (N, 8, 8), 0..16
    scored: np.ndarray  # the labels the ensemble stage scored on them
    classes: list[str]
    pngs: list[Path]  # the test rows as 8-bit PNG files, in class folders

    def env(self) -> dict[str, str]:
        return {**CLI_ENV, "MLFLOW_TRACKING_URI": self.store}


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Done:
    from workbench.cli import prepare

    tmp = tmp_path_factory.mktemp("use")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    text = TINY.format(out=tmp / "runs").replace(
        "[tracking]\nenabled = false",
        f'[tracking]\nenabled = true\nuri = "{store}"\nregister_as = "{NAME}"\n'
        '[ensemble]\nmethods = ["hard_voting"]\ntemperature = true\nship = "ensemble"\n'
        '[distill]\nmodel = "mlp"\nparams = { epochs = 1 }',
    )
    study = tmp / "tiny.toml"
    study.write_text(text)
    ran = run_cli("study", str(study), "--workers", "2", cwd=tmp, timeout=400)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "ONNX graph:" in ran.stdout
    out = tmp / "runs" / "tiny"
    final = json.loads((out / "ensemble" / "final" / "ensemble.json").read_text())
    assert final["combiner"]["vote"] == "hard" and final["combiner"]["temperature"] > 0
    _, data, split = prepare(study, None, None)
    members = [
        sorted((out / "ensemble" / "final" / "members" / str(i)).glob("fold-*.pt"))
        for i in range(len(final["members"]))
    ]
    P = member_probas(members, data.rows(split.test_idx))
    scored = fitted_rule(final["combiner"], 10).predict(P)
    pixels = data.pixels[split.test_idx].numpy()[:, 0]
    pngs = []
    for i, (im, y) in enumerate(zip(pixels, data.y[split.test_idx].numpy(), strict=True)):
        path = tmp / "pngs" / str(int(y)) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(im * (255 / 16)).astype(np.uint8)).save(path)
        pngs.append(path)
    return Done(tmp, study, out, store, pixels, scored, final["classes"], pngs)


def labels(done: Done, names: list[str]) -> np.ndarray:
    return np.array([done.classes.index(str(n)) for n in names])


def test_the_onnx_graph_of_the_stage_gives_the_scored_labels(done: Done) -> None:
    sess = ort.InferenceSession(str(done.out / "ensemble" / "model.onnx"))
    proba, got = sess.run(None, {"images": (done.pixels[:, None] / 16.0).astype(np.float32)})
    np.testing.assert_array_equal(got, done.scored)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)


def test_predict_on_files_gives_the_scored_labels(done: Done) -> None:
    table = done.tmp / "pred.csv"
    ran = run_cli(
        "predict", str(done.study), str(done.tmp / "pngs"), "--out", str(table),
        "--labels-from-folders", cwd=done.tmp,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    df = pd.read_csv(table, dtype={"label": str, "true_label": str})
    assert df["path"].tolist() == [str(p) for p in sorted(done.pngs)]
    order = np.argsort([str(p) for p in done.pngs])
    np.testing.assert_array_equal(labels(done, df["label"].tolist()), done.scored[order])
    accuracy = np.mean(df["label"] == df["true_label"])
    assert f"{accuracy:.1%}" in ran.stdout or f"{accuracy:.2%}" in ran.stdout
    # the registered model, fetched by its alias, and a member alone
    by_alias = done.tmp / "alias.csv"
    ran = run_cli(
        "predict", str(done.study), str(done.tmp / "pngs"), "--out", str(by_alias),
        "--model", f"models:/{NAME}@champion", cwd=done.tmp, env=done.env(),
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert pd.read_csv(by_alias, dtype={"label": str})["label"].tolist() == df["label"].tolist()
    member = json.loads((done.out / "ensemble" / "final" / "ensemble.json").read_text())
    name = member["members"][0]
    candidates = json.loads((done.out / "ensemble" / "candidates.json").read_text())
    assert set(member["members"]) <= set(candidates)  # every candidate, kept or not
    assert [Path(p).name for p in candidates[name]] == ["fold-0.pt", "fold-1.pt", "fold-2.pt"]
    alone = done.tmp / "member.csv"
    ran = run_cli(
        "predict", str(done.study), str(done.tmp / "pngs"), "--out", str(alone),
        "--member", name, cwd=done.tmp,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    folds = sorted((done.out / "ensemble" / "final" / "members" / "0").glob("fold-*.pt"))
    x = np.stack([np.asarray(Image.open(p), np.float32)[None] / 255.0 for p in sorted(done.pngs)])
    import torch

    expected = member_probas([folds], torch.as_tensor(x))[0]
    np.testing.assert_allclose(
        pd.read_csv(alone)[[f"p_{d}" for d in range(10)]], expected, rtol=1e-5, atol=1e-7
    )


FETCH = """
import mlflow, sys
print(mlflow.artifacts.download_artifacts(artifact_uri=sys.argv[1], dst_path=sys.argv[2]))
"""
LOAD = """
import sys, numpy as np, mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
model.predict(np.load(sys.argv[2])).to_csv(sys.argv[3], index=False)
"""


def test_the_registered_model_in_a_fresh_process_gives_the_scored_labels(done: Done) -> None:
    np.save(done.tmp / "pixels.npy", done.pixels)  # uint8 0..16, as scikit-learn gives them
    ran = subprocess.run(
        [sys.executable, "-c", LOAD, f"models:/{NAME}@champion", "pixels.npy", "py.csv"],
        cwd=done.tmp, env=done.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    df = pd.read_csv(done.tmp / "py.csv", dtype={"label": str})
    np.testing.assert_array_equal(labels(done, df["label"].tolist()), done.scored)
    reqs = _requirements(done)
    # what loading and predicting imports: an mlp-only ensemble needs no torchvision
    for needed in ("torch", "numpy", "pillow", "mlflow", "pandas", "pydantic"):
        assert needed in reqs, reqs
    assert "optuna" not in reqs and "torchvision" not in reqs, reqs


def test_the_student_is_registered_beside_the_ensemble_and_predicts_alone(done: Done) -> None:
    """`[distill]`: the student is its own MLflow model, registered with alias `student`; in a
    fresh process it gives the labels of its one network (run here by torch from its file)."""
    import torch

    from workbench.train import load_model

    np.save(done.tmp / "pixels.npy", done.pixels)
    ran = subprocess.run(
        [sys.executable, "-c", LOAD, f"models:/{NAME}@student", "pixels.npy", "student.csv"],
        cwd=done.tmp, env=done.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    got = labels(done, pd.read_csv(done.tmp / "student.csv", dtype={"label": str})["label"])
    net = load_model(done.out / "ensemble" / "student" / "members" / "0" / "fold-0.pt", "cpu")
    with torch.inference_mode():
        x = torch.as_tensor(done.pixels[:, None] / 16.0, dtype=torch.float32)
        np.testing.assert_array_equal(got, net.eval()(x).argmax(1).numpy())
    link = json.loads((done.out / "ensemble" / "mlflow.json").read_text())
    assert link["student_uri"] == f"runs:/{link['run_id']}/student"


def _requirements(done: Done) -> dict[str, str]:
    ran = subprocess.run(
        [sys.executable, "-c", FETCH, f"models:/{NAME}@champion/requirements.txt", "reqs"],
        cwd=done.tmp, env=done.env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    lines = Path(ran.stdout.strip().splitlines()[-1]).read_text().split()
    return dict(line.lower().split("==") for line in lines if "==" in line)


@pytest.fixture(scope="module")
def served(done: Done) -> Iterator[str]:
    """`mlflow models serve` of the champion on a loopback port."""
    port, log = free_port(), done.tmp / "serve.log"
    argv = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m"]
    argv += [f"models:/{NAME}@champion", "--env-manager", "local", "-h", "127.0.0.1"]
    argv += ["-p", str(port), "--workers", "1"]
    bin_dir = str(Path(sys.executable).parent)  # it execs `uvicorn` from PATH
    env = {**done.env(), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    with log.open("w") as sink:
        proc = subprocess.Popen(
            argv, cwd=done.tmp, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/ping", proc, log, "mlflow models serve")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_served_model_answers_with_class_names(done: Done, served: str) -> None:
    # the serving example logged with the model, as a client would send it
    example = done.tmp / "example"
    subprocess.run(
        [sys.executable, "-c", FETCH, f"models:/{NAME}@champion/serving_input_example.json",
         str(example)],
        env=done.env(), check=True, timeout=60, capture_output=True,
    )  # fmt: skip
    status, got = post(served, json.loads((example / "serving_input_example.json").read_text()))
    assert status == 200, got
    rows = got["predictions"]
    assert set(rows[0]) == {"label", "probability", *[f"p_{d}" for d in range(10)]}
    assert rows[0]["label"] in done.classes
    # every test row: raw pixels as JSON, then the PNG files base64-encoded
    status, got = post(served, {"inputs": done.pixels.tolist()})
    assert status == 200, got
    got_labels = labels(done, [r["label"] for r in got["predictions"]])
    np.testing.assert_array_equal(got_labels, done.scored)
    files = [base64.b64encode(p.read_bytes()).decode() for p in done.pngs]
    status, got = post(
        served, {"dataframe_split": {"columns": ["image"], "data": [[f] for f in files]}}
    )
    assert status == 200, got
    np.testing.assert_array_equal(
        labels(done, [r["label"] for r in got["predictions"]]), done.scored
    )
    # a wrong shape is refused with what the model takes
    status, got = post(served, {"inputs": np.zeros((2, 9, 9), int).tolist()})
    assert status == 400 and "(N, 8, 8, 1) or (N, 1, 8, 8) or (N, 8, 8)" in got["message"]


def test_export_writes_a_checked_and_a_quantized_graph(done: Done) -> None:
    path = done.tmp / "exported.onnx"
    # the label-change gate has its own tests (tests/test_test_looks.py): here any change passes,
    # since which trials two workers sample, and so the int8 graph's changes, vary run to run
    ran = run_cli(
        "export", str(done.study), "--onnx", str(path), "--quantize", "--max-label-change", "1",
        cwd=done.tmp,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "every label equals the torch model's" in ran.stdout
    assert "exported.int8.onnx" in ran.stdout and "points)" in ran.stdout
    sess = ort.InferenceSession(str(path))
    _, got = sess.run(None, {"images": (done.pixels[:, None] / 16.0).astype(np.float32)})
    np.testing.assert_array_equal(got, done.scored)
    assert (done.tmp / "exported.int8.onnx").stat().st_size < path.stat().st_size


@pytest.mark.slow
def test_the_model_loads_in_a_fresh_venv_from_its_own_requirements(done: Done) -> None:
    """A virtual environment with nothing but the model's requirements.txt loads and predicts."""
    env_dir = done.tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    reqs = done.tmp / "reqs" / "requirements.txt"
    _requirements(done)
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "-r", str(reqs)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    np.save(done.tmp / "pixels.npy", done.pixels)
    env = {k: v for k, v in done.env().items() if k != "PYTHONPATH"}
    ran = subprocess.run(
        [str(py), "-c", LOAD, f"models:/{NAME}@champion", "pixels.npy", "venv.csv"],
        cwd=done.tmp, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    df = pd.read_csv(done.tmp / "venv.csv", dtype={"label": str})
    np.testing.assert_array_equal(labels(done, df["label"].tolist()), done.scored)


def test_the_report_names_the_registered_model(done: Done) -> None:
    page = (done.tmp / "reports" / "tiny.html").read_text()
    assert f"registered as <code>models:/{NAME}@champion</code>" in page  # no UI URL: SQLite
    link = json.loads((done.out / "ensemble" / "mlflow.json").read_text())
    assert f"final model: <code>{link['model_uri']}</code>" in page
