"""Photo folders through the command line: search, ensemble, report and the MLflow model, then
every bad input the folder can bring (exit code 2, one message, nothing computed changed).

The photos are scikit-learn's digits drawn large, tinted and saved as PNG and JPEG files of mixed
sizes, aspect ratios and modes, so the study has real, learnable images without any download.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from conftest import run_cli
from PIL import Image
from sklearn.datasets import load_digits

CLASSES = ("zero", "one", "two")


def write_photos(root: Path, per_class: int, fixed: int | None = None, seed: int = 0) -> None:
    """Digits 0-2 as photos: random size 20-48 px and aspect (or `fixed` x `fixed`), a random
    tint, saved as RGB JPEG, RGB PNG, greyscale PNG or RGBA PNG in turn."""
    rng = np.random.default_rng(seed)
    digits = load_digits()
    for label, name in enumerate(CLASSES):
        images = digits.images[digits.target == label][:per_class]
        for i, img in enumerate(images):
            h, w = (fixed, fixed) if fixed else rng.integers(20, 49, size=2)
            grey = Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((int(w), int(h)))
            tint = rng.uniform(0.5, 1.0, size=3)
            rgb = (np.asarray(grey, np.float64)[..., None] * tint).astype(np.uint8)
            photo = Image.fromarray(rgb)
            kind = i % 4 if not fixed else 1
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            if kind == 0:
                photo.save(folder / f"{i:03d}.jpg", quality=90)
            elif kind == 1:
                photo.save(folder / f"{i:03d}.png")
            elif kind == 2:
                grey.save(folder / f"{i:03d}.png")
            else:
                photo.convert("RGBA").save(folder / f"{i:03d}.png")


STUDY = """
name = "{name}"
seed = 0
output_dir = "{out}"
[data]
source = "folder"
path = "{photos}"
{data}
[data.augment]
{augment}
[cv]
folds = 3
[search]
trials = 2
startup_trials = 2
pruner = "none"
[train]
epochs = 8
batch_size = 16
[tracking]
uri = "sqlite:///{out}/mlflow.db"
{models}
[ensemble]
top_k = 2
methods = ["soft_voting", "weighted"]
"""


CNN = """[models.cnn]
params = { width = 8, depth = 1 }
[models.cnn.space]
lr = { low = 3e-3, high = 1e-2, log = true }"""


def study_file(
    tmp_path: Path, name: str, photos: Path, data: str, augment: str, models: str = CNN
) -> Path:
    path = tmp_path / f"{name}.toml"
    text = STUDY.format(
        name=name, out=tmp_path / "runs", photos=photos, data=data, augment=augment, models=models
    )
    path.write_text(text)
    return path


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` except the logs (which a failed start may append)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "logs" not in p.parts
    }


def check_ran_end_to_end(tmp_path: Path, name: str, classes: tuple[str, ...]) -> dict:
    out = tmp_path / "runs" / name
    results = json.loads((out / "ensemble" / "results.json").read_text())
    assert results["final"]["test"]["accuracy"] > 1 / len(classes)  # learnt something
    final = json.loads((out / "ensemble" / "final" / "ensemble.json").read_text())
    assert final["classes"] == list(classes)
    assert (tmp_path / "reports" / f"{name}.html").exists()
    link = json.loads((out / "ensemble" / "mlflow.json").read_text())
    assert link["model_uri"].startswith("runs:/")
    return final


def check_predict_matches_the_training_inputs(
    tmp_path: Path, file: Path, photos: Path, out: Path
) -> None:
    """`workbench predict` on the training photos: each file prepared as the store prepared it,
    so the probabilities are the final model's on the store's own pixels."""
    import csv

    from workbench.final import FinalEnsemble

    (photos / "zero" / "notes.txt").write_text("not an image")
    table = tmp_path / "predictions.csv"
    result = run_cli(
        "predict",
        str(file),
        str(photos),
        "--out",
        str(table),
        "--labels-from-folders",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped" in result.stdout and "notes.txt" in result.stdout
    rows = list(csv.DictReader(table.open()))
    classes = sorted(CLASSES)
    assert list(rows[0]) == ["path", "label", "probability", "true_label"] + [
        f"p_{c}" for c in classes
    ]
    (npy,) = (out / "images").glob("*.npy")
    pixels = np.load(npy)
    assert len(rows) == len(pixels)  # every image, in the store's order, the text file left out
    expected = FinalEnsemble.load(out / "ensemble" / "final").predict_proba(pixels / 255.0)
    got = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    assert [r["true_label"] for r in rows] == [Path(r["path"]).parent.name for r in rows]
    accuracy = np.mean([r["label"] == r["true_label"] for r in rows])
    assert f"accuracy {accuracy:.2%} on {len(rows)} labelled images" in result.stdout
    (photos / "zero" / "notes.txt").unlink()
    empty = run_cli("predict", str(file), str(tmp_path / "nothing*.png"), cwd=tmp_path)
    assert empty.returncode == 2 and "no files to predict" in empty.stdout


def test_a_folder_of_mixed_photos_runs_end_to_end_and_bad_input_changes_nothing(
    tmp_path: Path,
) -> None:
    photos = tmp_path / "photos"
    write_photos(photos, per_class=60)
    sizes = {Image.open(f).size for f in photos.rglob("*.*")}
    modes = {Image.open(f).mode for f in photos.rglob("*.*")}
    assert len(sizes) > 10 and {"RGB", "L", "RGBA"} <= modes
    file = study_file(tmp_path, "photos", photos, "image_size = 16", "hflip = false")
    first = run_cli("study", str(file), "--workers", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    final = check_ran_end_to_end(tmp_path, "photos", tuple(sorted(CLASSES)))
    assert final["in_shape"] == [3, 16, 16]
    assert final["preprocess"] == {
        "image_size": [16, 16],
        "resize_policy": "center_crop",
        "channels": 3,
        "scale": 255.0,
    }
    out = tmp_path / "runs" / "photos"
    assert len(list((out / "images").glob("*.npy"))) == 1  # decoded once, by the parent
    check_predict_matches_the_training_inputs(tmp_path, file, photos, out)
    before = tree_digest(out)

    # 1) a file that cannot be decoded: named, with the fix
    bad = photos / "one" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    result = run_cli("study", str(file), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(bad) in result.stdout and 'on_bad_file = "skip"' in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert tree_digest(out) == before
    bad.unlink()

    # 2) an empty class folder
    (photos / "three").mkdir()
    result = run_cli("study", str(file), cwd=tmp_path)
    assert result.returncode == 2
    assert f"class folder {photos / 'three'} holds no image files" in result.stdout
    assert tree_digest(out) == before
    (photos / "three").rmdir()

    # 3) bad keys in the study file: an image_size of 0, an unknown augmentation and parameter
    for data, augment, message in [
        ("image_size = 0", "", "data.image_size: an int (a square) or [height, width], each >= 1"),
        ("image_size = 16", 'auto_augment = "auto"', "'none', 'trivial' or 'rand'"),
        ("image_size = 16", "rotate = 10", "did you mean 'rotation'?"),
    ]:
        bad_file = study_file(tmp_path, "photos", photos, data, augment)
        result = run_cli("study", str(bad_file), cwd=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert message in result.stdout and str(bad_file) in result.stdout
        assert "Traceback" not in result.stdout + result.stderr
        assert tree_digest(out) == before


def test_a_32px_colour_study_with_mixup_and_v2_augmentation_runs_end_to_end(
    tmp_path: Path,
) -> None:
    photos = tmp_path / "photos32"
    write_photos(photos, per_class=60, fixed=32, seed=1)
    augment = "mixup = 0.2\ncrop_scale = 0.7\nhflip = true"
    file = study_file(tmp_path, "mix", photos, "", augment)
    result = run_cli("study", str(file), "--workers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    final = check_ran_end_to_end(tmp_path, "mix", tuple(sorted(CLASSES)))
    assert final["in_shape"] == [3, 32, 32]
