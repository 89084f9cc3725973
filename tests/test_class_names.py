"""Class names in any script, end to end: the image store, the report, `workbench predict`'s table
and the MLflow model's answer carry them as given, and the report's charts hold them as text.

The study: scikit-learn's digits as PNG files in one folder per class (the `folder` source), the
classes named 零号 ... 八号 and, for digit 9, a name with a space, markup, `&`, a quote and a colon.
Expected labels are recomputed here from the final model's stored fold checkpoints through member
inference and its fitted rule (as tests/test_use.py does), not through workbench/final.py.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import CLI_ENV, run_cli
from PIL import Image
from sklearn.datasets import load_digits

NINE = '九号 <b>&"x:y"'  # one name that is markup, with a space, `&`, quotes and a colon
NAMES = [f"{c}号" for c in "零一二三四五六七八"] + [NINE]  # digit d -> NAMES[d]
PER_CLASS = 50  # PNG files per class

STUDY = """
name = "hanzi"
seed = 0
output_dir = "{out}"
[data]
source = "folder"
path = "{photos}"
[cv]
folds = 2
[search]
trials = 2
startup_trials = 2
pruner = "none"
[train]
epochs = 2
batch_size = 32
[tracking]
uri = "{store}"
[models.mlp]
params = {{ width = 32 }}
[models.mlp.space]
lr = {{ low = 3e-3, high = 1e-2, log = true }}
[ensemble]
top_k = 2
methods = ["soft_voting"]
"""


def cdata(text: str) -> str:
    """`text` as XML character data: the three characters that must be escaped, escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@dataclass
class Done:
    tmp: Path
    study: Path
    out: Path
    store: str
    ran: subprocess.CompletedProcess[str]  # the `workbench study` run
    pngs: list[Path]  # every image file, sorted by path (as `predict` lists them)
    classes: list[str]  # the class names, sorted: label index -> name, as the folder source says
    expected: np.ndarray  # the final model's labels on `pngs`, computed here


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Done:
    import torch

    from workbench.ensemble.rule import fitted_rule
    from workbench.infer import member_probas

    tmp = tmp_path_factory.mktemp("names")
    photos = tmp / "photos"
    digits = load_digits()
    for d, name in enumerate(NAMES):
        (photos / name).mkdir(parents=True)
        for i, img in enumerate(digits.images[digits.target == d][:PER_CLASS]):
            grey = np.rint(img * (255 / 16)).astype(np.uint8)
            Image.fromarray(grey).save(photos / name / f"{i:03d}.png")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    study = tmp / "hanzi.toml"
    study.write_text(STUDY.format(out=tmp / "runs", photos=photos, store=store))
    ran = run_cli("study", str(study), "--workers", "2", cwd=tmp, timeout=400)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    out = tmp / "runs" / "hanzi"
    final = json.loads((out / "ensemble" / "final" / "ensemble.json").read_text())
    members = [
        sorted((out / "ensemble" / "final" / "members" / str(i)).glob("fold-*.pt"))
        for i in range(len(final["members"]))
    ]
    pngs = sorted(photos.rglob("*.png"))
    x = np.stack([np.asarray(Image.open(p), np.float32)[None] / 255.0 for p in pngs])
    P = member_probas(members, torch.as_tensor(x))
    expected = fitted_rule(final["combiner"], len(NAMES)).predict(P)
    return Done(tmp, study, out, store, ran, pngs, sorted(NAMES), np.asarray(expected))


def test_the_store_and_the_final_model_keep_the_names(done: Done) -> None:
    (meta,) = (done.out / "images").glob("*.json")
    assert json.loads(meta.read_text())["classes"] == done.classes  # the image store's record
    final = json.loads((done.out / "ensemble" / "final" / "ensemble.json").read_text())
    assert final["classes"] == done.classes
    results = json.loads((done.out / "ensemble" / "results.json").read_text())
    assert results["final"]["test"]["accuracy"] > 0.5  # it learnt the digits, not just names
    assert "Glyph" not in done.ran.stdout + done.ran.stderr  # no font warning on the console


def test_predict_writes_the_names_and_the_final_models_labels(done: Done) -> None:
    table = done.tmp / "pred.csv"
    ran = run_cli(
        "predict", str(done.study), str(done.tmp / "photos"), "--out", str(table),
        "--labels-from-folders", cwd=done.tmp,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    with table.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    head = ["path", "label", "probability", "true_label"]
    assert rows[0] == head + [f"p_{c}" for c in done.classes]
    body = rows[1:]
    assert [r[0] for r in body] == [str(p) for p in done.pngs]
    assert [r[1] for r in body] == [done.classes[i] for i in done.expected]
    assert [r[3] for r in body] == [p.parent.name for p in done.pngs]
    proba = np.array([[float(v) for v in r[4:]] for r in body])
    np.testing.assert_array_equal(proba.argmax(1), done.expected)  # p_<class> in class order
    # the console's confusion table names the classes too, and no font warning is printed
    assert "零号" in ran.stdout and "Glyph" not in ran.stdout + ran.stderr


SERVE = """
import json, sys, mlflow
from mlflow.pyfunc import scoring_server
model = mlflow.pyfunc.load_model(sys.argv[1])
body = json.dumps({"inputs": json.load(open(sys.argv[2]))})
answer = scoring_server.invocations(body, "application/json", model, None)
print(json.dumps({"status": answer.status, "body": answer.response}))
"""


def test_the_mlflow_model_answers_with_the_names(done: Done) -> None:
    """The logged model in a fresh process, through the scoring server's own request handler
    (what `mlflow models serve` runs for POST /invocations): a JSON answer with the names."""
    link = json.loads((done.out / "ensemble" / "mlflow.json").read_text())
    pixels = [np.asarray(Image.open(p)).tolist() for p in done.pngs]  # uint8 (N, 8, 8), 0..255
    (done.tmp / "pixels.json").write_text(json.dumps(pixels))
    ran = subprocess.run(
        [sys.executable, "-c", SERVE, link["model_uri"], "pixels.json"],
        cwd=done.tmp, env={**CLI_ENV, "MLFLOW_TRACKING_URI": done.store},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    answer = json.loads(ran.stdout.strip().splitlines()[-1])
    assert answer["status"] == 200, answer["body"][:2000]
    rows = json.loads(answer["body"])["predictions"]
    assert list(rows[0]) == ["label", "probability", *[f"p_{c}" for c in done.classes]]
    assert [r["label"] for r in rows] == [done.classes[i] for i in done.expected]
    # the model's signature names the same columns
    mlmodel = subprocess.run(
        [sys.executable, "-c", "import mlflow, sys; "
         "print(mlflow.models.get_model_info(sys.argv[1]).signature.outputs.input_names())",
         link["model_uri"]],
        cwd=done.tmp, env={**CLI_ENV, "MLFLOW_TRACKING_URI": done.store},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert mlmodel.returncode == 0, mlmodel.stderr[-3000:]
    assert f"p_{NINE}" in mlmodel.stdout and "p_零号" in mlmodel.stdout


def test_the_report_holds_the_names_as_escaped_text(done: Done) -> None:
    page = (done.tmp / "reports" / "hanzi.html").read_text("utf-8")
    charts = re.findall(r"<svg\b.*?</svg>", page, flags=re.DOTALL)
    confusion = next(s for s in charts if 'aria-label="Final model, test split"' in s)
    texts = re.findall(r"<text\b[^>]*>([^<]*)</text>", confusion)
    for name in NAMES:  # each class names a row and a column of the confusion matrix
        assert texts.count(cdata(name)) == 2, (name, texts)
    assert "<b>" not in page  # the markup in a name is text everywhere on the page
    assert page.count("<script") == 1  # the report's one sorting script, nothing else


# -- the same checks without a study: names a folder cannot hold ---------------------------------

ODD = ["a/b", "x:y", "<script>alert(1)</script>", "fish & chips", 'say "hi"', "x onload=alert(1)"]
ODD += ["javascript:x", "cost $5 or $6"]  # a URL scheme as text; dollars that are no mathtext


def test_charts_keep_odd_names_as_escaped_text_and_still_refuse_code() -> None:
    from workbench.report import plots

    n = len(ODD)
    matrix = np.eye(n) * 5 + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (a missing glyph's too) fails the test
        chart = plots.heatmap(matrix, ODD, ODD, "names", "predicted class", "true class")
        again = plots.heatmap(matrix, ODD, ODD, "names", "predicted class", "true class")
        zh = plots.heatmap(matrix[:2, :2], NAMES[:2], NAMES[:2], "二号", "predicted", "true")
    assert chart is not None and zh is not None
    assert str(chart) == str(again)  # deterministic: the same inputs give the same SVG
    texts = re.findall(r"<text\b[^>]*>([^<]*)</text>", chart)
    for name in ODD:  # shortened to 16 characters, as the charts do
        shown = name if len(name) <= 16 else name[:15] + "…"
        assert texts.count(cdata(shown)) == 2, (shown, texts)
    assert "<script" not in chart and "&lt;script&gt;alert(1…" in chart
    assert re.findall(r"<text\b[^>]*>([^<]*)</text>", zh).count("零号") == 2
    # text content is exempt from the check, markup is not: a link that runs code is refused
    fig = plots.figure(2, 2)
    fig.text(0.5, 0.5, "x", url="javascript:alert(1)")
    with pytest.raises(ValueError, match="could run code"):
        plots.svg(fig, "a link")


def test_prediction_tables_round_trip_odd_names(tmp_path: Path) -> None:
    import pandas as pd

    from workbench.predict import Predictions, write_table

    names = [*NAMES, *ODD, "a,b", " lead and trail ", "tab\there"]
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(len(names)), size=5)
    labels = proba.argmax(1)
    result = Predictions([f"img{i}.png" for i in range(5)], proba, labels, names)
    truth = [names[i] for i in rng.integers(0, len(names), 5)]
    header = ["path", "label", "probability", "true_label", *[f"p_{c}" for c in names]]
    for suffix in (".csv", ".parquet"):
        path = write_table(tmp_path / f"t{suffix}", result.table(truth))
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
            head, cells = rows[0], [r[1] for r in rows[1:]]
        else:
            df = pd.read_parquet(path)
            head, cells = list(df.columns), df["label"].tolist()
        assert head == header
        assert cells == [names[i] for i in labels]


def test_the_console_table_prints_names_as_given() -> None:
    from rich.console import Console

    from workbench.console import labels_table

    names = ["零号", "[bold]x[/bold]", "a\\", "<b>&"]
    predicted = [names[0], names[1], names[3], names[3]]  # truth: `names`, one each
    con = Console(width=200, record=True, color_system=None)
    con.print(labels_table(names, predicted, names))
    text = con.export_text()
    assert "accuracy 75.00% on 4 labelled images" in text
    for name in names:
        assert name in text, (name, text)
