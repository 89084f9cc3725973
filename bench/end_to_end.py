"""Item 4: wall time per stage (search, ensemble, report) of the default digits study.

By default the digits study runs with `--trials 3` (the file's other settings as they are) into a
temp folder; `--full` runs studies/digits.toml and studies/mnist.toml in full (MNIST on the 10k
t10k images). The stage times of the last full runs in runs/ (timings.json), if any, are shown
beside them with the file's date. Items 5 and 6 use this item's digits study.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import (
    DIGITS_STUDY,
    MNIST_STUDY,
    MNIST_T10K,
    ROOT,
    BenchError,
    Figure,
    ItemResult,
    StudyRun,
    run_study,
    study_from,
    write_study,
)

STAGES = ("search", "ensemble", "report")
QUICK = {"train.epochs": 1, "cv.folds": 2, "ensemble.snapshots": 0}  # --quick: seconds, not minutes


def digits_study(tmp: Path, quick: bool, full: bool) -> tuple[StudyRun, str, str]:
    """Run the digits study (reduced unless `full`); returns the run, a short label for its
    figures and a line saying how it differs from studies/digits.toml."""
    changes = QUICK if quick and not full else {}
    folder = tmp / "e2e-digits"
    file = write_study(study_from(DIGITS_STUDY, folder, **changes), folder / "digits.toml")
    if full:
        return run_study(file), "digits (full)", "studies/digits.toml as it is"
    trials = 1 if quick else 3
    how = f"studies/digits.toml with --trials {trials}"
    how += "".join(f", {k} = {v}" for k, v in changes.items())
    label = f"digits --trials {trials}" + (" (quick)" if quick else "")
    return run_study(file, "--trials", str(trials)), label, how


def mnist_study(tmp: Path) -> StudyRun:
    if not MNIST_T10K.exists():
        raise BenchError(f"--full needs the MNIST t10k images at {MNIST_T10K}")
    folder = tmp / "e2e-mnist"
    file = write_study(study_from(MNIST_STUDY, folder), folder / "mnist.toml")
    return run_study(file, "--data", str(MNIST_T10K))


def stage_figures(label: str, stages: dict[str, float], wall_s: float | None) -> list[Figure]:
    figs = [Figure(f"{label}: {s}", stages[s], "s") for s in STAGES if s in stages]
    if wall_s is not None:
        figs.append(Figure(f"{label}: whole command", wall_s, "s", note="incl. start-up"))
    return figs


def last_full_runs() -> list[tuple[str, dict[str, float], str]]:
    """(name, stage seconds, file date) of runs/<study>/timings.json where they exist."""
    found = []
    for name in ("digits", "mnist"):
        path = ROOT / "runs" / name / "timings.json"
        if path.exists():
            date = datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")
            found.append((name, json.loads(path.read_text()), date))
    return found


def run(tmp: Path, quick: bool, full: bool, machine_tag: str) -> tuple[ItemResult, StudyRun]:
    digits, label, how = digits_study(tmp, quick, full)
    result = ItemResult(
        4,
        "End to end: wall time per stage",
        machine_tag,
        [
            f"{label}: {how}; python -m workbench study FILE, default workers (one per core), "
            "tracking to SQLite in a temp folder; stage times from <out>/timings.json. With 2 "
            "workers the sampled configurations depend on timing: stage times vary run to run",
        ],
        stage_figures(label, digits.stages, digits.wall_s),
    )
    details: dict[str, Any] = {
        "digits": {"label": label, "how": how, "stages": digits.stages, "wall_s": digits.wall_s}
    }
    if full:
        mnist = mnist_study(tmp)
        result.figures += stage_figures("mnist t10k (full)", mnist.stages, mnist.wall_s)
        result.setup.append(f"mnist t10k (full): studies/mnist.toml, --data {MNIST_T10K}")
        details["mnist"] = {"stages": mnist.stages, "wall_s": mnist.wall_s}
    for name, stages, date in last_full_runs():
        where = f"runs/{name} (last full run)"
        result.figures += stage_figures(where, stages, None)
        result.setup.append(f"{where}: timings.json of {date}")
        details[f"runs/{name}"] = {"stages": stages, "date": date}
    if not last_full_runs():
        result.setup.append("no runs/<study>/timings.json found: no earlier full run to show")
    result.details = details
    return result, digits
