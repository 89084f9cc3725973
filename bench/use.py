"""Items 10 and 11: the final model in use.

10  onnxruntime images/s over torch eager images/s, the final model of item 4's digits study
    (ensemble/model.onnx, written and checked by the ensemble stage), same test images, same
    batch (all test rows), 1 thread and all cores; passes alternate, median taken.
11  `workbench predict` on 10,000 PNG files (the digits at 8x8, 0..16 scaled to 0..255, so the
    files are the model's own input size): images/s through `predict_files`, and the share of
    its time spent decoding (workbench/serving.decode_file, timed around each call).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import Figure, ItemResult, StudyRun, median, spread, timed
from bench.inference import test_images
from workbench import graph, predict, serving
from workbench.final import FinalEnsemble


def onnx_vs_torch(study: StudyRun, quick: bool, machine_tag: str) -> ItemResult:
    x = test_images(study.out)
    final = FinalEnsemble.load(study.out / "ensemble" / "final")
    path = study.out / "ensemble" / "model.onnx"
    cores = os.cpu_count() or 1
    reps = 2 if quick else 7
    figures: list[Figure] = []
    details: dict[str, object] = {"rows": len(x)}
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        sess = graph.session(path, threads)

        def eager() -> None:
            final.run(x)

        def ort_run(sess: object = sess) -> None:
            sess.run(None, {"images": x})  # type: ignore[attr-defined]

        eager()
        ort_run()
        t_s: list[float] = []
        o_s: list[float] = []
        for rep in range(reps):
            for which in ("torch", "ort") if rep % 2 == 0 else ("ort", "torch"):
                (t_s if which == "torch" else o_s).append(
                    timed(eager if which == "torch" else ort_run)[0]
                )
        ratios = [t / o for t, o in zip(t_s, o_s, strict=True)]
        figures += [
            Figure(f"torch eager, {threads} thread(s)", len(x) / median(t_s), "img/s"),
            Figure(f"onnxruntime, {threads} thread(s)", len(x) / median(o_s), "img/s"),
            Figure(
                f"onnxruntime / torch, {threads} thread(s)",
                median(ratios),
                "x",
                note=f"pairs: {spread(ratios)}",
            ),
        ]
        details[f"threads_{threads}"] = {"torch_s": t_s, "ort_s": o_s}
    torch.set_num_threads(1)
    return ItemResult(
        10,
        "The final model: onnxruntime vs torch eager",
        machine_tag,
        [
            f"{len(x)} held-out digits images per pass, one batch; {len(final.members)} members",
            f"torch: FinalEnsemble.run; onnxruntime: CPUExecutionProvider on {path.name}",
            f"{reps} alternating pairs of passes per thread count; median ratio",
        ],
        figures,
        details,
    )


def predict_pngs(study: StudyRun, tmp: Path, quick: bool, machine_tag: str) -> ItemResult:
    n = 1_000 if quick else 10_000
    folder = tmp / "predict-pngs"
    x = test_images(study.out)  # (N, 1, 8, 8) in [0, 1]
    eight = np.rint(x[:, 0] * 255).astype(np.uint8)
    for i in range(n):
        path = folder / f"{i // 1000:02d}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(eight[i % len(eight)]).save(path)
    final = FinalEnsemble.load(study.out / "ensemble" / "final")
    torch.set_num_threads(1)
    decoding = [0.0]
    real = serving.decode_file

    def timed_decode(*args: object) -> np.ndarray:
        t0 = time.perf_counter()
        out = real(*args)  # type: ignore[arg-type]
        decoding[0] += time.perf_counter() - t0
        return out

    predict.decode_file = timed_decode  # type: ignore[assignment]
    try:
        files = predict.image_files([str(folder)])
        seconds, result = timed(lambda: predict.predict_files(final, files))
    finally:
        predict.decode_file = real  # type: ignore[assignment]
    return ItemResult(
        11,
        "workbench predict on PNG files",
        machine_tag,
        [
            f"{n:,} 8x8 PNG files of the held-out digits, in {n // 1000} folders; "
            "predict_files (decode, batches of 256, the final module), 1 torch thread",
        ],
        [
            Figure("images per second", len(result.paths) / seconds, "img/s"),
            Figure("share of the time decoding", 100 * decoding[0] / seconds, "%"),
        ],
        {"files": n, "seconds": seconds, "decode_seconds": decoding[0]},
    )
