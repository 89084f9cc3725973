"""Shared fixtures: a tiny study (digits, 2-3 folds, 2 epochs, tracking off, output in tmp_path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.config import StudyConfig, load_study
from workbench.runtime import configure_threads

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MNIST_T10K = SHARED / "data" / "mnist-t10k"

TINY = """
name = "tiny"
seed = 0
output_dir = "{out}"
[cv]
folds = 3
[search]
trials = 3
startup_trials = 2
pruner_startup_trials = 2
pruner_warmup_epochs = 1
[train]
epochs = 2
batch_size = 64
[tracking]
enabled = false
[models.mlp]
params = {{ width = 64 }}
[models.mlp.space]
lr = {{ low = 1e-3, high = 3e-2, log = true }}
dropout = {{ low = 0.0, high = 0.3 }}
"""

configure_threads(1)

CLI_ENV = {**os.environ, "COLUMNS": "160", "MLFLOW_DISABLE_TELEMETRY": "true"}


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    """`python -m workbench ARGS` as a user runs it, in `cwd`, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "workbench", *args],
        cwd=cwd,
        env=env or CLI_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def tiny_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(out=tmp_path / "runs"))
    return path


@pytest.fixture
def tiny_cfg(tiny_file: Path) -> StudyConfig:
    return load_study(tiny_file)
