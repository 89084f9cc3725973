"""What every benchmark item shares: the machine, figures with targets, study files, the CLI."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import tomllib
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in the output

ROOT = Path(__file__).resolve().parents[1]  # the workbench checkout
MNIST_T10K = Path(__file__).resolve().parents[2] / "shared/data/mnist-t10k"
DIGITS_STUDY = ROOT / "studies" / "digits.toml"
MNIST_STUDY = ROOT / "studies" / "mnist.toml"


class BenchError(RuntimeError):
    """A benchmark could not run (a study failed, an output is missing)."""


# --- the machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    """Cores, CPU, torch and its thread count, load (a noise warning), date: stamped on results."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cores": cores,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2),
    }


def machine_tag(m: dict[str, Any], threads: str) -> str:
    """One line naming the machine, e.g. '2 cores, torch 2.14.1, 1 thread, 2025-11-22'."""
    return f"{m['cores']} cores, torch {m['torch']}, {threads}, {m['date'][:10]}"


# --- figures -----------------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured number; a ratio carries its target and whether it met it."""

    name: str
    value: float
    unit: str  # "x" (ratio), "%", "img/s", "s", "trials/h"
    target: str = ""  # e.g. ">= 0.9x"; empty: a plain measurement
    passed: bool | None = None  # None: no target
    note: str = ""

    @property
    def verdict(self) -> str:
        return "" if self.passed is None else ("PASS" if self.passed else "MISS")

    def shown(self) -> str:
        if self.unit == "x":
            return f"{self.value:.3f}x"
        if self.unit == "%":
            return f"{self.value:.2f} %"
        if self.unit == "pp":  # percentage points: a difference of two percentages
            return f"{self.value:+.2f} pp"
        if self.unit == "nats":
            return f"{self.value:.4f} nats"
        if self.unit == "s":
            return f"{self.value:.1f} s"
        if self.unit == "ms":
            return f"{self.value:.2f} ms"
        return f"{self.value:,.0f} {self.unit}"


def _target(op: str, threshold: float, unit: str) -> str:
    return f"{op} {threshold:g}x" if unit == "x" else f"{op} {threshold:g} {unit}"


def at_least(name: str, value: float, floor: float, unit: str = "x", note: str = "") -> Figure:
    return Figure(name, value, unit, _target(">=", floor, unit), value >= floor, note)


def at_most(name: str, value: float, ceiling: float, unit: str = "%", note: str = "") -> Figure:
    return Figure(name, value, unit, _target("<=", ceiling, unit), value <= ceiling, note)


@dataclass
class ItemResult:
    item: int
    title: str
    machine: str  # machine_tag(...): cores, torch, threads, date
    setup: list[str]  # how it was measured, one line each
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # raw samples, paths
    seconds: float = 0.0  # wall time of the item itself

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for f, d in zip(self.figures, out["figures"], strict=True):
            d["verdict"] = f.verdict
        return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def spread(ratios: list[float]) -> str:
    """'0.93 to 1.51x': the range of repeated ratios, a noise gauge beside their median."""
    return f"{min(ratios):.2f} to {max(ratios):.2f}x"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# --- study files -------------------------------------------------------------------------------


def _key(k: str) -> str:
    bare = k.replace("_", "").replace("-", "").isalnum() and k.isascii()
    return k if bare else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic strings
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def dump_toml(d: dict[str, Any], prefix: str = "") -> str:
    """A dict as TOML: scalars first, then every sub-dict as a [dotted.table]."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            name = f"{prefix}{_key(k)}"
            lines += ["", f"[{name}]", dump_toml(v, name + ".").strip()]
    return "\n".join(lines).strip() + "\n"


def study_from(source: Path, out_dir: Path, **changes: Any) -> dict[str, Any]:
    """A study file's dict with output_dir and an MLflow store inside `out_dir`, plus `changes`
    given as dotted keys ("train.epochs": 2)."""
    study = tomllib.loads(source.read_text())
    study["output_dir"] = str(out_dir)
    changes.setdefault("tracking.uri", f"sqlite:///{out_dir / 'mlflow' / 'mlflow.db'}")
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = study
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return study


def write_study(study: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Path(study["output_dir"]) / "mlflow").mkdir(parents=True, exist_ok=True)
    path.write_text(dump_toml(study))
    return path


# --- the CLI -----------------------------------------------------------------------------------


@dataclass
class StudyRun:
    """One `workbench study` command: its output folder, wall time and stage times."""

    file: Path  # the study file
    out: Path  # <output_dir>/<name>
    wall_s: float  # the whole command, seconds
    stages: dict[str, float]  # timings.json: search, ensemble, report (seconds)
    log: Path


def run_study(file: Path, *args: str, timeout_s: float = 3600, command: str = "study") -> StudyRun:
    """`python -m workbench COMMAND FILE ARGS` (`study`, or a later stage's command) in the study
    file's folder (its reports/ lands there); stdout goes to a log beside the file, one per
    command. Raises BenchError with the log's tail on failure."""
    study = tomllib.loads(file.read_text())
    out = Path(study["output_dir"]) / study["name"]
    log = file.with_suffix(".log" if command == "study" else f".{command}.log")
    env = {k: v for k, v in os.environ.items() if k not in ("WORKBENCH_STORAGE",)}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "120"}
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "workbench", command, str(file), *args],
            cwd=file.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
        )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise BenchError(
            f"workbench {command} {file} {' '.join(args)} exited {proc.returncode}:\n{tail}"
        )
    timings = out / "timings.json"
    stages = json.loads(timings.read_text()) if timings.exists() else {}
    return StudyRun(file, out, wall, {k: float(v) for k, v in stages.items()}, log)
