"""Items 7-9: the image store's memory, its loading speed, and training from uint8 rows.

7 memory    a 50,000-image 32x32 RGB folder (MNIST t10k images, resized and tinted, 5 tints each)
            through a 2-worker `workbench study` (one cnn, 2 trials of 1 epoch, tracking off):
            the peak of the proportional set size (PSS: shared pages count once) summed over the
            parent, its workers and decoding processes, sampled every 0.2 s.     <= 1 GB
8 loading   10,000 JPEGs of mixed sizes (96 to 320 px a side) decoded into the store at 64x64,
            images per second on every core (>= 1,000), then the store opened again by a
            fresh process: seconds inside `load_data`, imports excluded (< 2 s).
9 training  `fit` on uint8 rows of a store (gathered per batch, made float per batch) vs on float
            tensors in memory (the path before the store), MNIST 28x28: img/s ratio >= 0.95x;
            and augmentation per batch of 128: the batched shift + flip vs the same per image
            through torchvision v2, ms (plain measurements).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import (
    MNIST_T10K,
    BenchError,
    Figure,
    ItemResult,
    at_least,
    at_most,
    median,
    spread,
    write_study,
)
from workbench.config import AugmentConfig, DataConfig, TrainConfig
from workbench.data import Rows, augment_batch, load_data, per_image
from workbench.models import create_model
from workbench.train import fit

MEMORY_TARGET_MB = 1000.0  # MB: 2-worker study on 50,000 32x32 RGB images, PSS summed
LOADING_TARGET = 1000.0  # images/s decoded into the store on 2 cores
REOPEN_TARGET_S = 2.0  # s: the next run opens the store
TRAINING_TARGET = 0.95  # x: uint8 store rows vs float tensors, img/s
TINTS = np.array(
    [[1.0, 1.0, 1.0], [1.0, 0.6, 0.3], [0.3, 0.8, 1.0], [0.9, 0.4, 0.9], [0.5, 1, 0.5]]
)


def mnist(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n MNIST t10k images (uint8 (n, 28, 28)) and labels; random ones if absent."""
    if MNIST_T10K.exists():
        d = load_data(DataConfig(source="idx"), str(MNIST_T10K))
        return d.pixels[:n, 0].numpy(), d.y[:n].numpy()
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


# --- 7: memory ---------------------------------------------------------------------------------


def make_folder(root: Path, n: int) -> Path:
    """n 32x32 RGB PNGs in class folders: MNIST images resized, each source image in 5 tints."""
    from PIL import Image

    images, labels = mnist(min(n, 10_000))
    for i in range(n):
        k = i % len(images)
        grey = Image.fromarray(images[k]).resize((32, 32), Image.Resampling.BILINEAR)
        rgb = (np.asarray(grey, np.float32)[..., None] * TINTS[(i // len(images)) % 5]).astype(
            np.uint8
        )
        folder = root / str(labels[k])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / f"{i:05d}.png", compress_level=1)
    return root


def pss_mb(pid: int) -> float:
    """PSS of one process in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def descendants(root: int) -> list[int]:
    """root and every process below it, from /proc/<pid>/stat's parent ids."""
    parent: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
                parent[int(p.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, pp in parent.items() if pp in frontier]
        tree += frontier
    return tree


def memory(tmp: Path, quick: bool, tag: str) -> ItemResult:
    n = 5_000 if quick else 50_000
    t0 = time.perf_counter()
    photos = make_folder(tmp / "photos32", n)
    made = time.perf_counter() - t0
    study = {
        "name": "bench-memory",
        "seed": 0,
        "output_dir": str(tmp / "memory-runs"),
        "data": {"source": "folder", "path": str(photos), "augment": {"shift": 2}},
        "cv": {"folds": 3},
        "search": {"trials": 2, "sampler": "random", "pruner": "none"},
        "train": {"epochs": 1, "batch_size": 128},
        "tracking": {"enabled": False},
        "models": {"cnn": {"params": {"width": 16, "depth": 2}}},
        "ensemble": {"methods": ["soft_voting"]},
    }
    file = write_study(study, tmp / "memory" / "study.toml")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "120"}
    log = file.with_suffix(".log")
    peak, samples, t0 = 0.0, 0, time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workbench", "study", str(file), "--workers", "2"],
            cwd=file.parent,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
        while proc.poll() is None:
            peak = max(peak, sum(pss_mb(p) for p in descendants(proc.pid)))
            samples += 1
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"the memory study failed: {log.read_text()[-2000:]}")
    store = sum(
        p.stat().st_size for p in (tmp / "memory-runs" / "bench-memory" / "images").glob("*.npy")
    )
    return ItemResult(
        7,
        "Image store: memory",
        tag,
        [
            f"{n:,} RGB 32x32 PNGs (MNIST t10k resized, 5 tints; made in {made:.0f} s)",
            "workbench study --workers 2: one cnn (width 16, depth 2), 2 trials of 1 epoch, "
            "3 folds, shift 2, tracking off, ensemble soft voting",
            f"PSS summed over the process tree every 0.2 s ({samples} samples, {wall:.0f} s)",
        ],
        [
            at_most("peak PSS, parent + workers", peak, MEMORY_TARGET_MB, "MB"),
            Figure("image store file", store / 1e6, "MB"),
        ],
        {"peak_pss_mb": peak, "wall_s": wall, "images": n, "store_bytes": store},
    )


# --- 8: loading --------------------------------------------------------------------------------


def make_jpegs(root: Path, n: int) -> Path:
    """n JPEGs of random sizes, 96 to 320 px a side, from MNIST images, tinted, in class folders."""
    from PIL import Image

    images, labels = mnist(min(n, 10_000))
    rng = np.random.default_rng(0)
    for i in range(n):
        k = i % len(images)
        w, h = (int(s) for s in rng.integers(96, 321, size=2))
        grey = Image.fromarray(images[k]).resize((w, h), Image.Resampling.BILINEAR)
        rgb = (np.asarray(grey, np.float32)[..., None] * TINTS[i % 5]).astype(np.uint8)
        folder = root / str(labels[k])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / f"{i:05d}.jpg", quality=90)
    return root


REOPEN = """
import json, sys, time
from pathlib import Path
from workbench.config import DataConfig
from workbench.data import load_data
cfg = DataConfig(source="folder", image_size=64)
t0 = time.perf_counter()
d = load_data(cfg, sys.argv[1], Path(sys.argv[2]))
print(json.dumps({"seconds": time.perf_counter() - t0, "n": len(d.y)}))
"""


def loading(tmp: Path, quick: bool, tag: str) -> ItemResult:
    n = 1_000 if quick else 10_000
    photos = make_jpegs(tmp / "jpegs", n)
    store = tmp / "jpeg-store"
    cfg = DataConfig(source="folder", image_size=64)
    t0 = time.perf_counter()
    data = load_data(cfg, str(photos), store)
    built = time.perf_counter() - t0
    opened = subprocess.run(
        [sys.executable, "-c", REOPEN, str(photos), str(store)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if opened.returncode != 0:
        raise BenchError(f"reopening the store failed: {opened.stderr[-2000:]}")
    reopen = json.loads(opened.stdout.strip().splitlines()[-1])["seconds"]
    rate = len(data.y) / built
    return ItemResult(
        8,
        "Image store: loading",
        tag,
        [
            f"{n:,} JPEGs (quality 90), random sizes 96-320 px a side, MNIST images tinted",
            "decoded into the store at 64x64 (center crop) on every core, then opened again "
            "by a fresh process (time inside load_data: listing, hashing stats, mapping)",
        ],
        [
            at_least("decoding into the store", rate, LOADING_TARGET, "img/s"),
            at_most("opening it again", reopen, REOPEN_TARGET_S, "s"),
        ],
        {"build_s": built, "reopen_s": reopen, "images": len(data.y)},
    )


# --- 9: training from the store ----------------------------------------------------------------


def training(quick: bool, tag: str) -> ItemResult:
    n_train, n_val = (1024, 256) if quick else (4000, 256)
    images, labels = mnist(n_train + n_val)
    pixels = torch.from_numpy(images[:, None].copy())
    y = torch.from_numpy(labels.astype(np.int64))
    floats = pixels.float() / 255.0  # the float32 copy every process held before the store
    train_idx, val_idx = torch.arange(n_train), torch.arange(n_train, n_train + n_val)
    store = (Rows(pixels, y, train_idx, 255.0), Rows(pixels, y, val_idx, 255.0))
    memory = (Rows(floats, y, train_idx, 1.0), Rows(floats, y, val_idx, 1.0))
    cfg = TrainConfig(epochs=1 if quick else 3, batch_size=128, schedule="constant")
    augment = AugmentConfig(shift=2)
    torch.manual_seed(0)
    init = create_model("cnn", 10, (1, 28, 28), [0.13], [0.31], width=16, depth=2).state_dict()

    def run(rows: tuple[Rows, Rows]) -> float:
        net = create_model("cnn", 10, (1, 28, 28), [0.13], [0.31], width=16, depth=2)
        net.load_state_dict(init)
        gen = torch.Generator().manual_seed(0)
        return fit(net, rows[0], rows[1], cfg, augment=augment, generator=gen).images_per_second

    run(store)  # warm-up: first-call allocations
    ratios, rates = [], []
    for _ in range(2 if quick else 4):  # alternating, so drift hits both alike
        a, b = run(store), run(memory)
        ratios.append(a / b)
        rates.append((a, b))
    x = floats[:128].expand(128, 1, 28, 28).contiguous()
    gen = torch.Generator().manual_seed(0)
    from torchvision.transforms import v2

    per_image_v2 = v2.Compose([v2.RandomCrop(28, padding=2), v2.RandomHorizontalFlip()])
    flip = AugmentConfig(shift=2, hflip=True)
    batched = _ms(lambda: augment_batch(x, flip, gen))
    looped = _ms(lambda: torch.stack([per_image_v2(img) for img in x]))
    heavy = per_image(
        AugmentConfig(crop_scale=0.35, auto_augment="trivial", erasing=0.25), (28, 28)
    )
    trivial = _ms(lambda: augment_batch(x, AugmentConfig(), gen, heavy), calls=20)
    return ItemResult(
        9,
        "Training from the store",
        tag,
        [
            f"MNIST t10k 28x28, {n_train} training and {n_val} validation rows, cnn (width 16, "
            f"depth 2), {cfg.epochs} epochs, batch 128, shift 2; {len(ratios)} alternating pairs",
            "augmentation: one batch of 128 1x28x28 images, mean over 200 calls (20 for v2 "
            "crop + TrivialAugment + erasing)",
        ],
        [
            at_least(
                "uint8 rows / float tensors", median(ratios), TRAINING_TARGET, note=spread(ratios)
            ),
            Figure("store rows", median([a for a, _ in rates]), "img/s"),
            Figure("float tensors", median([b for _, b in rates]), "img/s"),
            Figure("shift 2 + hflip, batched", batched, "ms"),
            Figure("the same through v2, per image", looped, "ms"),
            Figure("v2 crop + TrivialAugment + erasing, per image", trivial, "ms"),
        ],
        {"ratios": ratios, "rates": rates},
    )


def _ms(fn: Any, calls: int = 200) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1000
