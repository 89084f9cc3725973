"""Datasets as they come: a table of files, labels and patients run end to end with a grouped
split; split folders (train/, val/, test/); groups from file names; Parquet tables.

Expectations are computed from the files the test writes (the CSV read with the csv module, the
folder names), never from workbench's own reading of them."""

from __future__ import annotations

import csv
import html
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from PIL import Image
from sklearn.datasets import load_digits

from workbench.config import StudyConfig, load_study, resume_key
from workbench.data import grouping, load_data, load_or_make_split, make_split
from workbench.errors import DataError
from workbench.files import load_npz
from workbench.store import RunStore

CLASSES = ("nevus", "melanoma", "keratosis")  # digits 0, 1, 2 drawn as "lesions"


def digit_png(path: Path, image: np.ndarray) -> None:
    """An 8x8 digit (values 0..16) as a 16x16 greyscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.clip(image * 16, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).resize((16, 16), Image.Resampling.NEAREST).save(path)


def patient_table(root: Path, patients: int = 60, seed: int = 0) -> list[dict[str, str]]:
    """~300 images of `patients` patients (1 to 9 images each, mostly of one class), written as
    root/images/<id>.png and root/labels.csv (image_id without extension, diagnosis, patient)."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    pools = {c: list(np.flatnonzero(digits.target == c)) for c in range(len(CLASSES))}
    rows = []
    for p in range(patients):
        main = p % len(CLASSES)
        for i in range(int(rng.integers(1, 10))):
            c = main if rng.random() < 0.8 else int(rng.integers(len(CLASSES)))
            image = digits.images[pools[c].pop()]
            name = f"ISIC_{p:03d}_{i}"
            digit_png(root / "images" / f"{name}.png", image)
            rows.append({"image_id": f"images/{name}", "diagnosis": CLASSES[c], "patient": f"P{p}"})
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["image_id", "diagnosis", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


TABLE_STUDY = """
name = "lesions"
output_dir = "{out}"
[data]
source = "table"
path = "{table}"
suffix = ".png"
columns = {{ path = "image_id", label = "diagnosis", group = "patient" }}
[cv]
folds = 3
[search]
trials = 2
startup_trials = 2
[train]
epochs = 3
[ensemble]
methods = ["soft_voting"]
[tracking]
enabled = false
[models.cnn]
params = {{ width = 8 }}
"""


@pytest.fixture(scope="module")
def table_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("table")
    rows = patient_table(tmp / "data")
    file = tmp / "lesions.toml"
    file.write_text(TABLE_STUDY.format(out=tmp / "runs", table=tmp / "data" / "labels.csv"))
    ran = run_cli("study", str(file), cwd=tmp, timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return file, rows


def test_a_grouped_table_study_keeps_every_patient_on_one_side(
    table_study: tuple[Path, list[dict[str, str]]],
) -> None:
    file, rows = table_study
    cfg = load_study(file)
    patient = np.array([r["patient"] for r in rows])  # table order is the store's row order
    saved = load_npz(RunStore(cfg.out).file("split.npz"))
    train, test = saved["train_idx"], saved["test_idx"]
    assert len(train) + len(test) == len(rows) == len(set(train) | set(test))
    assert not set(patient[train]) & set(patient[test])
    assert 0.1 < len(test) / len(rows) < 0.3  # one of round(1 / 0.2) = 5 group folds
    trials = sorted((cfg.out / "trials" / "cnn").iterdir())
    assert trials
    for run in trials:
        held = [RunStore(cfg.out).read_fold(run, k) for k in range(3)]
        assert all(h is not None for h in held)
        per_fold = [set(patient[train[h.rows]]) for h in held if h is not None]
        assert sum(len(h.rows) for h in held if h is not None) == len(train)
        for a in range(3):
            for b in range(a + 1, 3):
                assert not per_fold[a] & per_fold[b], (run, a, b)


def test_predict_labels_from_table_scores_the_tables_rows(
    table_study: tuple[Path, list[dict[str, str]]], tmp_path: Path
) -> None:
    file, rows = table_study
    cfg = load_study(file)
    out = tmp_path / "predicted.csv"
    table = cfg.data.path
    assert table is not None
    ran = run_cli(
        "predict", str(file), "--labels-from-table", table, "--out", str(out), cwd=tmp_path
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    predicted = pd.read_csv(out)
    folder = Path(table).parent
    expected = {str(folder / f"{r['image_id']}.png"): r["diagnosis"] for r in rows}
    assert dict(zip(predicted["path"], predicted["true_label"], strict=True)) == expected
    # the test rows' accuracy, from the table, is the final model's on the study's test split
    test = load_npz(RunStore(cfg.out).file("split.npz"))["test_idx"]
    test_paths = {str(folder / f"{rows[i]['image_id']}.png") for i in test}
    on_test = predicted[predicted["path"].isin(test_paths)]
    accuracy = float((on_test["label"] == on_test["true_label"]).mean())
    result = RunStore(cfg.out).ensemble_result()
    assert result is not None
    assert accuracy == pytest.approx(result.rung("final").test.accuracy, abs=1e-9)
    said = " ".join(ran.stdout.split())
    assert f"{len(test)} of the {len(rows)} labelled images are rows" in said
    assert f"accuracy {accuracy:.2%} on them" in said


def test_the_report_says_the_splits_are_grouped(
    table_study: tuple[Path, list[dict[str, str]]],
) -> None:
    file, rows = table_study
    page = html.unescape((file.parent / "reports" / "lesions.html").read_text())  # ran there
    n = len({r["patient"] for r in rows})
    assert f"grouped by 'patient' (cv.group_by): {n} groups" in " ".join(page.split())


def split_folders(root: Path, counts: dict[str, int]) -> dict[str, list[str]]:
    """root/<split>/<class>/<i>.png of two classes; {split: its files' names below root}."""
    digits = load_digits()
    names: dict[str, list[str]] = {}
    k = 0
    for split, n in counts.items():
        for c, cls in enumerate(("cat", "dog")):
            for i in range(n):
                image = digits.images[np.flatnonzero(digits.target == c)[k % 150]]
                k += 1
                digit_png(root / split / cls / f"{i}.png", image)
                names.setdefault(split, []).append(f"{split}/{cls}/{i}.png")
    return names


def folder_cfg(path: Path, **data: object) -> StudyConfig:
    return StudyConfig.model_validate(
        {
            "name": "f",
            "data": {"source": "folder", "path": str(path), **data},
            "models": {"cnn": {}},
        }
    )


@pytest.mark.parametrize("val", ["train", "test"])
def test_split_folders_hold_out_test_and_place_val_as_told(tmp_path: Path, val: str) -> None:
    names = split_folders(tmp_path / "pets", {"train": 10, "valid": 4, "test": 5})
    cfg = folder_cfg(tmp_path / "pets", **({"val": "test"} if val == "test" else {}))
    data = load_data(cfg.data)
    assert data.classes == ("cat", "dog")  # not ("test", "train", "valid")
    split = make_split(data, cfg.data, cfg.seed)
    held = set(names["test"]) | (set(names["valid"]) if val == "test" else set())
    assert split.kind == "source"
    assert {data.names[i] for i in split.test_idx} == held
    assert {data.names[i] for i in split.train_idx} == set(data.names) - held
    y = data.y.numpy()
    for i in range(len(y)):  # each row's label is its class folder's
        assert data.classes[y[i]] == data.names[i].split("/")[1]


def test_split_folders_without_test_draw_the_held_out_split(tmp_path: Path) -> None:
    split_folders(tmp_path / "pets", {"train": 10, "val": 5})
    cfg = folder_cfg(tmp_path / "pets")
    data = load_data(cfg.data)
    assert data.source_test is None
    assert make_split(data, cfg.data, cfg.seed).kind == "stratified"


def test_groups_from_file_names_stay_on_one_side(tmp_path: Path) -> None:
    digits = load_digits()
    for p in range(12):  # patient p: 2 to 4 images of class p % 2 and one of the other
        for i in range(2 + p % 3):
            c = p % 2 if i else 1 - p % 2
            image = digits.images[np.flatnonzero(digits.target == c)[p * 5 + i]]
            digit_png(tmp_path / "x" / ("ab"[c]) / f"P{p}_{i}.png", image)
    cfg = StudyConfig.model_validate(
        {
            "name": "g",
            "data": {"source": "folder", "path": str(tmp_path / "x")},
            "cv": {"folds": 3, "group_by": r"^(P\d+)_"},
            "models": {"cnn": {}},
        }
    )
    data = load_data(cfg.data)
    patient = np.array([re.match(r"P\d+", Path(n).name)[0] for n in data.names])  # type: ignore[index]
    split = load_or_make_split(
        data, cfg.data, cfg.seed, tmp_path / "split.npz", grouping(data, cfg)
    )
    assert split.groups is not None and list(split.groups) == list(patient)
    assert not set(patient[split.train_idx]) & set(patient[split.test_idx])
    y = data.y.numpy()[split.train_idx]
    folds = split.folds(y, 3, cfg.seed)
    seen = [set(patient[split.train_idx][va]) for _, va in folds]
    assert sum(len(va) for _, va in folds) == len(split.train_idx)
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    # the split file is checked on every run: other groups, or none, are refused
    with pytest.raises(DataError, match=re.escape(f"made grouped by {cfg.cv.group_by!r}")):
        load_or_make_split(data, cfg.data, cfg.seed, tmp_path / "split.npz", None)
    other = cfg.model_copy(update={"cv": cfg.cv.model_copy(update={"group_by": r"^(P\d)"})})
    with pytest.raises(DataError, match="made grouped by"):
        load_or_make_split(data, cfg.data, cfg.seed, tmp_path / "split.npz", grouping(data, other))


def test_a_parquet_table_orders_integer_labels_by_value(tmp_path: Path) -> None:
    digits = load_digits()
    frame = pd.DataFrame(
        {
            "file": [f"d{i}.png" for i in range(60)],
            "y": [int(digits.target[i]) + 3 for i in range(60)],  # labels 3..12: "10" after "9"
        }
    )
    for i in range(60):
        digit_png(tmp_path / f"d{i}.png", digits.images[i])
    frame.to_parquet(tmp_path / "t.parquet")
    cfg = StudyConfig.model_validate(
        {
            "name": "p",
            "data": {
                "source": "table",
                "path": str(tmp_path / "t.parquet"),
                "columns": {"path": "file", "label": "y"},
            },
            "models": {"cnn": {}},
        }
    )
    data = load_data(cfg.data)
    assert data.classes == tuple(str(v) for v in range(3, 13))
    assert [data.classes[i] for i in data.y.tolist()] == [str(v) for v in frame["y"]]


def test_a_study_stored_before_tables_resumes() -> None:
    """The new [data] and [cv] keys at their defaults leave the resume key as it was."""
    cfg = StudyConfig.model_validate({"name": "r", "models": {"cnn": {}}})
    key = resume_key(cfg)
    assert {"columns", "suffix", "val"}.isdisjoint(key["data"])
    assert "group_by" not in key["cv"]
    grouped = cfg.model_copy(update={"cv": cfg.cv.model_copy(update={"group_by": "x"})})
    assert resume_key(grouped)["cv"]["group_by"] == "x"
