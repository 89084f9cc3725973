"""Item 12: the ladder (one network, its refit on all rows, the k-fold bag, the bag with TTA, each
combiner, what ships, the distilled student) on studies that are not saturated, each rung's test
accuracy and log loss with its 95 % paired-bootstrap CI against one network, and its ms per image;
and the share of what ships' gain over one network that the student keeps.

Two studies, both with `[ensemble] refit = true`, TTA candidates (`tta`: shifts by 1 px for
MNIST, whose training shifts by up to 2; `hflip` for the photos, whose recipe trains with flips)
and a student of the cnn's best configuration at the default `[distill]` keys, run as a user runs
them (`workbench study`):
- studies/mnist.toml on the first N of the shared MNIST t10k images (written as IDX files; the
  source splits them 80/20), at the file's settings;
- a photo study made from the same images: RGB tints, each image resized to a random size of
  24-48 px (the store's centre crop brings them to 32x32), the cnn and the small resnet of
  studies/photos.toml's recipe (two families; no pretrained weights can be fetched here).
Nothing is tuned to the result: where the ensemble gains nothing, the figures say so.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    MNIST_STUDY,
    MNIST_T10K,
    ROOT,
    BenchError,
    Figure,
    ItemResult,
    at_least,
    run_study,
    study_from,
    write_study,
)
from bench.images import TINTS, mnist
from workbench.results import EnsembleResult
from workbench.store import RunStore

ROWS = {False: 3000, True: 600}  # MNIST images per study (default, --quick)
PHOTO_SIZES = (24, 48)  # px: each photo's side is drawn from this range


def write_idx(folder: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """MNIST-style IDX files (gzipped) of uint8 images (N, 28, 28) and labels (N,)."""
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    with gzip.open(folder / "subset-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / "subset-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())
    return folder


def write_photos(root: Path, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> Path:
    """One PNG per image in class folders: an RGB tint, a random side in PHOTO_SIZES."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i, (im, y) in enumerate(zip(images, labels, strict=True)):
        side = int(rng.integers(PHOTO_SIZES[0], PHOTO_SIZES[1] + 1))
        grey = Image.fromarray(im).resize((side, side), Image.Resampling.BILINEAR)
        tint = TINTS[i % len(TINTS)]
        rgb = (np.asarray(grey, np.float32)[..., None] * tint).astype(np.uint8)
        folder = root / f"digit-{y}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / f"{i:05d}.png")
    return root


def photo_study(out: Path, quick: bool) -> dict[str, Any]:
    """The photo study: studies/photos.toml's data, CV, search and training recipe, with two
    families trained from scratch at 32x32 (cnn as in the file, and the small resnet)."""
    study = study_from(ROOT / "studies" / "photos.toml", out, name="photos-mnist")
    study["data"]["image_size"] = 32
    study["models"] = {
        "cnn": study["models"]["cnn"],
        "resnet": {
            "trials": 4,
            "params": {"depth": 10},
            "space": {
                "width": {"choices": [8, 16]},
                "lr": {"low": 1e-3, "high": 1e-2, "log": True},
            },
        },
    }
    study["models"]["cnn"]["trials"] = 4
    study["ensemble"] |= {"refit": True, "tta": ["hflip"]}
    study["distill"] = {"model": "cnn"}
    if quick:
        study["train"]["epochs"] = 2
        study["cv"]["folds"] = 2
    return study


def ladder_figures(label: str, result: EnsembleResult) -> list[Figure]:
    """Each rung's test accuracy and log loss, with its gain over one network (CI in the note),
    and its ms per image."""
    figs = []
    for r in result.ladder:
        name = f"{label}: {r.label if r.kind == 'final' else r.name}"
        net = r.vs_network
        note = ""
        if net is not None:
            a, ll = net.accuracy, net.log_loss
            note = (
                f"vs one network: {a.diff * 100:+.2f} pp ({a.ci_low * 100:+.2f}, "
                f"{a.ci_high * 100:+.2f}), log loss {ll.diff:+.4f} ({ll.ci_low:+.4f}, "
                f"{ll.ci_high:+.4f})"
            )
        if r.spread is not None:
            lo, hi = r.spread.accuracy
            note = f"fold models {lo * 100:.2f} to {hi * 100:.2f} %"
        cost = ""
        if r.cost:
            n = r.cost.networks
            cost = f"; {r.cost.ms_per_image:.3f} ms/img, {n} network{'s' if n != 1 else ''}"
        figs.append(Figure(f"{name} accuracy", 100 * r.test.accuracy, "%", note=note + cost))
        figs.append(Figure(f"{name} log loss", r.test.log_loss, "nats"))
    gain = result.rung("final").vs_network
    if gain is not None:
        a = gain.accuracy
        word = "gains" if a.ci_low > 0 else "gains nothing clear (CI includes 0)"
        if a.ci_high < 0:
            word = "loses"
        figs.append(
            Figure(
                f"{label}: final - one network", 100 * a.diff, "pp", note=f"the final model {word}"
            )
        )
    keeps, name = (
        result.student_keeps(),
        f"{label}: share of the final model's gain the student keeps",
    )
    if keeps is not None:  # the goal: at least half of it, at one network's cost
        figs.append(at_least(name, 100 * keeps, 50.0, "%", note="at one network's cost"))
    elif "student" in {r.name for r in result.ladder}:
        figs.append(Figure(name, float("nan"), "%", note="no gain to keep: final <= one network"))
    return figs


def run(tmp: Path, quick: bool, machine_tag: str) -> ItemResult:
    if not MNIST_T10K.exists():
        raise BenchError(f"item 12 needs the MNIST t10k images at {MNIST_T10K}")
    n = ROWS[quick]
    images, labels = mnist(n)
    result = ItemResult(
        12,
        "The ensemble ladder on MNIST and on photos made from it",
        machine_tag,
        [
            f"mnist: studies/mnist.toml with [ensemble] refit = true, tta = ['shift-1'] and "
            f"[distill] model = 'cnn' on the first {n} t10k "
            f"images (IDX, split 80/20 by the source){' with --trials 2' if quick else ''}",
            f"photos: {n} PNGs of the same images, RGB tints, sides {PHOTO_SIZES[0]}-"
            f"{PHOTO_SIZES[1]} px, centre-cropped to 32x32; studies/photos.toml's recipe with "
            "cnn and resnet (depth 10), 4 trials each, refit on, tta = ['hflip'], [distill] "
            "model = 'cnn'",
            "each rung scored on the study's one look at its test split; CIs are 95 % paired "
            "bootstrap; ms per image at batch 256 on 1 torch thread",
        ],
    )
    mnist_dir = tmp / "ladder-mnist"
    data = write_idx(mnist_dir / "data", images, labels)
    changes: dict[str, Any] = {
        "ensemble.refit": True,
        "ensemble.tta": ["shift-1"],
        "distill.model": "cnn",
    }
    if quick:
        changes |= {"train.epochs": 2, "cv.folds": 2}
    file = write_study(study_from(MNIST_STUDY, mnist_dir, **changes), mnist_dir / "mnist.toml")
    args = ["--data", str(data)] + (["--trials", "2"] if quick else [])
    runs = {"mnist": run_study(file, *args)}
    photos_dir = tmp / "ladder-photos"
    pics = write_photos(photos_dir / "data", images, labels)
    file = write_study(photo_study(photos_dir, quick), photos_dir / "photos.toml")
    runs["photos"] = run_study(file, "--data", str(pics))
    for label, study_run in runs.items():
        found = RunStore(study_run.out).ensemble_result()
        if found is None:
            raise BenchError(f"{label}: no ensemble result in {study_run.out}")
        result.figures += ladder_figures(label, found)
        result.setup.append(f"{label}: shipped {found.final.method}; {found.choice.reason}")
        result.details[label] = {
            "stages": study_run.stages,
            "wall_s": study_run.wall_s,
            "results": found.to_json(),
        }
    return result
