"""Items 14 and 15: time to quality under multi-fidelity pruning, and the time budget as a contract.

14. The same study twice, same seeds, one after the other on this machine: `pruner = "median"`
    (the study file's) and `pruner = "hyperband"`. The target is the best CV score any trial of
    the median search reaches by its end; each search's time to quality is the wall time from its
    first trial's start to the end of the first trial at or past the target (from the Optuna
    storage's trial times). The goal: hyperband at least 2x faster, and its final model's test
    log loss no worse than the median run's within the 95 % paired-bootstrap CI of their
    difference (both final models scored here on the same test rows). A second figure, without a
    goal, for accuracy studies: both searches' time to within one standard error of that target,
    sqrt(p (1 - p) / n) over the n training rows the CV scores; the same parameters retrained
    under another trial number move the CV score by about that much.
15. `workbench study studies/digits.toml --budget B` for several B: the whole command's wall time
    over B (the goal: within 10 %), and the final model's test accuracy and log loss at each B.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from bench.common import (
    DIGITS_STUDY,
    MNIST_STUDY,
    MNIST_T10K,
    BenchError,
    Figure,
    ItemResult,
    at_least,
    at_most,
    run_study,
    study_from,
    write_study,
)
from bench.images import mnist
from bench.ladder import write_idx
from workbench.config import load_study
from workbench.data import load_data
from workbench.evaluate import paired_bootstrap
from workbench.files import load_npz
from workbench.final import FinalEnsemble
from workbench.store import RunStore

MNIST_ROWS = {False: 3000, True: 600}  # MNIST t10k images of item 14's second study
BUDGETS = {False: (5, 10, 20), True: (2,)}  # minutes, item 15
QUICK = {"train.epochs": 3, "cv.folds": 3}  # --quick: both items shrink every study


def time_to_target(storage: Path, target: float, maximize: bool) -> tuple[float | None, float]:
    """(seconds from the first trial's start to the first COMPLETE trial at or past `target`,
    or None if none reached it; the best value the search reached), over every model study."""
    url = f"sqlite:///{storage}"
    trials = [
        t
        for s in optuna.get_all_study_summaries(url)
        for t in optuna.load_study(study_name=s.study_name, storage=url).trials
        if "/" in s.study_name and s.study_name.count("/") == 1  # the model studies only
    ]
    start = min(t.datetime_start.timestamp() for t in trials if t.datetime_start)
    done = [t for t in trials if t.state.name == "COMPLETE" and t.datetime_complete]
    values = [float(t.value) for t in done if t.value is not None]
    best = max(values) if maximize else min(values)
    reached = [
        t.datetime_complete.timestamp() - start
        for t in done
        if t.datetime_complete
        and t.value is not None
        and (t.value >= target - 1e-12 if maximize else t.value <= target + 1e-12)
    ]
    return (min(reached) if reached else None), best


def best_value(storage: Path, maximize: bool) -> float:
    return time_to_target(storage, math.inf if maximize else -math.inf, maximize)[1]


def near_target(label: str, storages: dict[str, Path], target: float, rows: int) -> Figure:
    """Median / hyperband time to within one standard error of the accuracy `target`."""
    se = math.sqrt(target * (1.0 - target) / rows)
    t = {p: time_to_target(s, target - se, True)[0] for p, s in storages.items()}
    note = f"to {target - se:.4f} ({target:.4f} - 1 SE of {se:.4f} over {rows} rows): " + ", ".join(
        f"{p} at {'-' if v is None else f'{v:.0f} s'}" for p, v in t.items()
    )
    ratio = (t["median"] or math.nan) / t["hyperband"] if t["hyperband"] else math.nan
    name = f"{label}: time to within 1 SE of the median's best, median / hyperband"
    return Figure(name, ratio, "x", note=note)


def final_probas(study_file: Path, data_path: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The study's final model's probabilities on its test rows, and their labels."""
    cfg = load_study(study_file)
    data = load_data(cfg.data, data_path)
    test = load_npz(RunStore(cfg.out).file("split.npz"))["test_idx"]
    final = FinalEnsemble.load(RunStore(cfg.out).final)
    x = final.inputs(data.pixels[test].numpy(), scale=data.scale)
    return final.run(x)[0], data.y[test].numpy()


def compare(
    label: str, source: Path, base: Path, data: str | None, quick: bool
) -> tuple[list[Figure], dict[str, Any]]:
    """Item 14 on the study file `source`: median, then hyperband, in folders of their own."""
    runs, files = {}, {}
    for pruner in ("median", "hyperband"):
        folder = base / pruner
        changes: dict[str, Any] = {"search.pruner": pruner, "tracking.enabled": False}
        if quick:
            changes |= QUICK
        study = study_from(source, folder, **changes)
        files[pruner] = write_study(study, folder / f"{source.stem}.toml")
        runs[pruner] = run_study(files[pruner], *(["--data", data] if data else []))
    maximize = load_study(files["median"]).cv.metric == "accuracy"
    storage = {p: r.out / "optuna.db" for p, r in runs.items()}
    target = best_value(storage["median"], maximize)
    t_median, _ = time_to_target(storage["median"], target, maximize)
    t_hyper, best_hyper = time_to_target(storage["hyperband"], target, maximize)
    (pm, y), (ph, _) = (final_probas(files[p], data) for p in ("median", "hyperband"))
    diff = paired_bootstrap(y, ph.argmax(1), pm.argmax(1), ph, pm)["log_loss"]
    worse = diff["ci_low"] > 0  # hyperband's log loss higher, beyond the CI
    figs = [
        Figure(
            f"{label}: median search, time to its own best CV",
            t_median or 0.0,
            "s",
            note=f"target {target:.4f}; its whole search {runs['median'].stages['search']:.0f} s",
        ),
        Figure(
            f"{label}: hyperband search",
            runs["hyperband"].stages.get("search", 0.0),
            "s",
            note=f"its best CV {best_hyper:.4f}",
        ),
    ]
    if t_hyper is None:
        figs.append(
            Figure(
                f"{label}: hyperband time to the median's best",
                math.nan,
                "x",
                note=f"not reached: its best {best_hyper:.4f} < {target:.4f}",
            )
        )
    else:
        figs.append(
            at_least(
                f"{label}: time to quality, median / hyperband",
                (t_median or 0.0) / t_hyper,
                2.0,
                note=f"hyperband reached {target:.4f} at {t_hyper:.0f} s",
            )
        )
    if maximize:
        rows = len(load_npz(runs["median"].out / "split.npz")["train_idx"])
        figs.append(near_target(label, storage, target, rows))
    figs.append(
        Figure(
            f"{label}: final test log loss, hyperband - median",
            diff["diff"],
            "nats",
            note=f"95 % CI {diff['ci_low']:+.4f} to {diff['ci_high']:+.4f}: "
            + ("worse beyond the CI" if worse else "no worse within the CI"),
            passed=not worse,
            target="CI low <= 0",
        )
    )
    details = {p: {"stages": r.stages, "wall_s": r.wall_s} for p, r in runs.items()}
    return figs, {**details, "target": target, "t_median": t_median, "t_hyperband": t_hyper}


def time_to_quality(
    tmp: Path, quick: bool, machine_tag: str, studies: tuple[str, ...] = ("digits", "mnist")
) -> ItemResult:
    result = ItemResult(
        14,
        "Time to quality: hyperband against the median pruner",
        machine_tag,
        [
            "each study run twice, one after the other, same seeds: pruner median (the file's) "
            "and hyperband; tracking off in both",
            "time to quality: from the search's first trial start to the end of the first "
            "complete trial at or past the median search's best CV score (any model)",
            "final test log loss: both final models on the same test rows, 95 % paired bootstrap",
        ],
    )
    if "digits" in studies:
        figs, details = compare("digits", DIGITS_STUDY, tmp / "ttq-digits", None, quick)
        result.figures += figs
        result.details["digits"] = details
    if "mnist" in studies and MNIST_T10K.exists():
        n = MNIST_ROWS[quick]
        images, labels = mnist(n)
        folder = tmp / "ttq-mnist"
        data = write_idx(folder / "data", images, labels)
        figs, details = compare(f"mnist {n}", MNIST_STUDY, folder, str(data), quick)
        result.figures += figs
        result.details["mnist"] = details
        result.setup.append(f"mnist {n}: studies/mnist.toml on the first {n} t10k images")
    return result


def budget_adherence(
    tmp: Path, quick: bool, machine_tag: str, budgets: tuple[int, ...] | None = None
) -> ItemResult:
    budgets = budgets or BUDGETS[quick]
    result = ItemResult(
        15,
        "The time budget on the digits study",
        machine_tag,
        [
            f"`workbench study studies/digits.toml --budget B` for B in {budgets} min, "
            "tracking on (a local sqlite store), each in a fresh folder"
        ],
    )
    for minutes in budgets:
        folder = tmp / f"budget-{minutes}m"
        changes: dict[str, Any] = QUICK if quick else {}
        file = write_study(study_from(DIGITS_STUDY, folder, **changes), folder / "digits.toml")
        run = run_study(file, "--budget", f"{minutes}m")
        over = 100.0 * (run.wall_s / (60.0 * minutes) - 1.0)
        found = RunStore(run.out).ensemble_result()
        if found is None:
            raise BenchError(f"--budget {minutes}m: no ensemble result in {run.out}")
        final = found.rung("final").test
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in run.stages.items())
        result.figures.append(
            at_most(
                f"--budget {minutes}m: wall time over the budget",
                over,
                10.0,
                note=f"{run.wall_s:.0f} s in all ({stages})",
            )
        )
        result.figures.append(
            Figure(
                f"--budget {minutes}m: final test accuracy",
                100 * final.accuracy,
                "%",
                note=f"{found.final.method}",
            )
        )
        result.figures.append(
            Figure(f"--budget {minutes}m: final test log loss", final.log_loss, "nats")
        )
        result.details[f"{minutes}m"] = {"wall_s": run.wall_s, "stages": run.stages}
    return result
