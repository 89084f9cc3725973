"""GPU throughput: a CIFAR-sized task on a resnet18, 1 and 4 workers sharing one GPU, bf16 vs fp32.

    python bench/gpu.py [--images 20000] [--epochs 2] [--workers 1,4] [--out reports/bench]

Each worker is its own process (as `workbench study` starts them on a GPU host), trains
torchvision's resnet18 (random weights, head for 10 classes) with workbench's `fit` on uint8
rows of a 3x32x32 array (gathered per batch, pinned, made float on the GPU), and reports its
images per second and its peak GPU memory (torch.cuda.max_memory_allocated). The figures:
images per second per worker and in total, and peak memory, for each amp setting and worker
count. Without a CUDA device it says so and exits with status 0: nothing is measured.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


def _worker(images: int, epochs: int, amp: str, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    from workbench.config import TrainConfig
    from workbench.data import Rows
    from workbench.models import create_model
    from workbench.runtime import configure_threads
    from workbench.train import fit

    configure_threads(1)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (images,), generator=g)
    n_val = images // 10
    train = Rows(pixels, y, torch.arange(n_val, images), 255.0)
    val = Rows(pixels, y, torch.arange(n_val), 255.0)
    model = create_model("resnet18", 10, (3, 32, 32)).to("cuda:0")
    torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig.model_validate(
        {"epochs": epochs, "batch_size": 256, "amp": amp, "schedule": "constant"}
    )
    t0 = time.perf_counter()
    result = fit(model, train, val, cfg)
    queue.put(
        {
            "images_per_second": result.images_per_second,
            "seconds": time.perf_counter() - t0,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
        }
    )


def run(images: int, epochs: int, workers: int, amp: str) -> dict[str, float]:
    ctx = mp.get_context("spawn")  # CUDA does not survive fork
    queue: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_worker, args=(images, epochs, amp, queue)) for _ in range(workers)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    per_worker = [r["images_per_second"] for r in results]
    return {
        "workers": workers,
        "amp": amp,
        "images_per_second_per_worker": sum(per_worker) / workers,
        "images_per_second_total": sum(per_worker),
        "peak_gpu_mb_per_worker": max(r["peak_gpu_mb"] for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu.py", description=__doc__)
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", default="1,4")
    p.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device visible here; nothing was measured")
        return 0
    rows = [
        run(args.images, args.epochs, int(w), amp)
        for w in args.workers.split(",")
        for amp in ("bf16", "off")
    ]
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("workers  amp   img/s per worker  img/s total  peak GPU MB per worker")
    for r in rows:
        print(
            f"{r['workers']:>7}  {r['amp']:<4}  {r['images_per_second_per_worker']:>16,.0f}  "
            f"{r['images_per_second_total']:>11,.0f}  {r['peak_gpu_mb_per_worker']:>22,.0f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
