"""Smoke test of the benchmark: `bench/run.py --quick --only 1` (training-loop ratio) writes its
JSON with the fields the Makefile's `make bench` readers rely on. The numbers are not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_training_loop(tmp_path: Path) -> None:
    argv = [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--only", "1"]
    proc = subprocess.run(
        [*argv, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["mode"] == "quick"
    assert {"cores", "torch", "torch_threads", "date"} <= set(doc["machine"])
    (item,) = doc["items"]
    assert item["item"] == 1 and item["seconds"] > 0
    ratios = [f for f in item["figures"] if f["target"]]
    assert len(ratios) == 2, item["figures"]  # 28x28 and 8x8 digits
    for f in ratios:
        assert f["value"] > 0 and f["verdict"] in ("PASS", "MISS"), f
    assert (tmp_path / "bench.md").read_text().startswith("# workbench bench (quick)")


def test_gpu_bench_runs_where_there_is_a_gpu_and_says_so_where_not(tmp_path: Path) -> None:
    import torch

    argv = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--out", str(tmp_path)]
    argv += ["--images", "512", "--epochs", "1", "--workers", "1"]  # small: a smoke run
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    if torch.cuda.is_available():
        rows = json.loads((tmp_path / "gpu.json").read_text())
        assert [(r["workers"], r["amp"]) for r in rows] == [(1, "bf16"), (1, "off")]
        assert all(r["images_per_second_total"] > 0 for r in rows)
    else:
        assert "no CUDA device visible here; nothing was measured" in proc.stdout
        assert not (tmp_path / "gpu.json").exists()
