"""A wall-clock budget for the whole `workbench study` command, and model families competing for it.

The parent sets the deadline when the command starts (`start`), in every model study of the
storage, so every worker on every host reads the same one: the budget is the study's, not each
worker's. The search must end by `Deadline.search_end`, which keeps `reserve` seconds for the
stages after it (ensemble, student, export, report): the last run's own timings of those stages
in this output folder when there are any, else a fifth of the budget (at least 30 s; on the
default digits study they took 80 s of 443, 18 %).

- A trial starts only if it can finish by then: all folds at the most epochs the model's space
  allows, at the seconds per epoch its finished and running trials took (`trial_seconds`). A
  model with nothing measured yet starts its first trial.
- A running trial is stopped at `search_end` (after its current epoch): it is queued again with
  its completed folds, as a Ctrl-C'd trial is, and the ensemble uses what completed.
- Families compete (`held_back`): every family is given `search.min_trials`; past that,
  successive halving on their best CV scores: after a family's trials double past min_trials r
  times, it gets new trials only while it ranks in the top ceil(families / 2^r). Halving holds a
  family back only while time is short: while the trials left to the families it keeps, and to
  the held-back ones better ranked, would not all finish before the search ends (`spare`);
  otherwise the spare time goes back to them, best first. The trial counts are caps.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from workbench.config import StudyConfig
from workbench.results import ModelUse, Spending
from workbench.search.fidelity import epoch_values
from workbench.search.storage import FINISHED, TAKEN, best_trial, study_name

ATTR = "budget"  # the study user attr holding the deadline (JSON), or None without a budget
ALLOCATION = "allocation"  # the study user attr: why the family stopped getting trials
RESERVE_SHARE, RESERVE_MIN = 0.2, 30.0  # share of the budget kept for later stages; at least, s
AFTER_SEARCH = ("ensemble", "report")  # stages in timings.json whose time the reserve covers


def clock() -> float:
    """Unix seconds now; the one clock of the budget (tests replace it)."""
    return time.time()


@dataclass(frozen=True)
class Deadline:
    start: float  # unix s: when the command started
    end: float  # unix s: when the whole command must have ended
    reserve: float  # s kept at the end for the stages after the search

    @property
    def search_end(self) -> float:
        return self.end - self.reserve

    def passed(self) -> bool:
        return clock() >= self.search_end

    def describe(self) -> str:
        """The budget in one line, for the console."""
        until = time.strftime("%H:%M:%S", time.localtime(self.end))
        return (
            f"budget: {minutes(self.end - self.start)} for the whole command (until {until}); "
            f"trials start only while they can finish, and the search ends "
            f"{minutes(self.reserve)} before, for the ensemble and report"
        )


def minutes(seconds: float) -> str:
    """90.0 -> "1m 30s"."""
    m, s = divmod(round(seconds), 60)
    return f"{m}m {s:02d}s" if m else f"{s}s"


def reserve_for(budget: float, timings: Path) -> float:
    """Seconds to keep for the stages after the search: their last measured time (timings.json
    of this output folder) plus a fifth, else a fifth of the budget; at least RESERVE_MIN."""
    measured = 0.0
    if timings.exists():
        stages = json.loads(timings.read_text())
        measured = 1.2 * sum(float(stages.get(s, 0.0)) for s in AFTER_SEARCH)
    return max(measured or RESERVE_SHARE * budget, RESERVE_MIN)


def start(
    cfg: StudyConfig, studies: Mapping[str, optuna.Study], started: float, timings: Path
) -> Deadline | None:
    """Store the command's deadline in every model study (None without a budget: an earlier
    run's deadline is cleared, so that workers never obey a stale one)."""
    budget = cfg.search.budget
    deadline = None
    if budget is not None:
        deadline = Deadline(started, started + budget, min(reserve_for(budget, timings), budget))
    for study in studies.values():
        study.set_user_attr(ATTR, None if deadline is None else asdict(deadline))
    return deadline


def read(study: optuna.Study) -> Deadline | None:
    """The deadline the parent stored in `study`, if any."""
    stored = study.user_attrs.get(ATTR)
    return Deadline(**stored) if stored else None


def trial_seconds(trials: list[FrozenTrial], epochs: int, folds: int) -> float | None:
    """The wall time a new trial may take at most: `folds` x `epochs` at the seconds per epoch
    of `trials` (finished ones over their whole run, running ones so far); None if none has
    trained an epoch yet."""
    now, seconds, trained = clock(), 0.0, 0
    for t in trials:
        epochs_run = int(t.user_attrs.get("epochs_trained", len(epoch_values(t))))
        if t.datetime_start is None or not epochs_run:
            continue
        ended = t.datetime_complete.timestamp() if t.datetime_complete else now
        seconds += max(ended - t.datetime_start.timestamp(), 0.0)
        trained += epochs_run
    return seconds / trained * epochs * folds if trained else None


def can_finish(study: optuna.Study, deadline: Deadline | None, epochs: int, folds: int) -> bool:
    """Would a new trial of this study finish by the deadline, as far as its trials tell?"""
    if deadline is None:
        return True
    if deadline.passed():
        return False
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    need = trial_seconds(study.get_trials(deepcopy=False, states=states), epochs, folds)
    return need is None or clock() + need <= deadline.search_end


@dataclass(frozen=True)
class Family:
    """Where one model family stands in the competition for trials."""

    taken: int  # trials finished, running or queued
    best: float | None  # its best CV score so far (None: none completed)
    left: float = math.inf  # worker-seconds its trials up to its cap would take (0: at its cap;
    # inf: not measured yet)


def held_back(
    families: Mapping[str, Family], min_trials: int, maximize: bool, spare: float = 0.0
) -> dict[str, str]:
    """The families that may not start a new trial now, each with the reason: successive
    halving on best CV scores past `min_trials`, while the `spare` worker-seconds (those left
    before the search ends, times the workers) cannot also run the held-back family's trials;
    see the module docstring."""
    sign = 1.0 if maximize else -1.0

    def order(model: str) -> float:  # best first; a family with no completed trial last
        best = families[model].best
        return math.inf if best is None else -sign * best

    ranked = sorted(families, key=order)
    n, out = len(families), {}
    for rank, model in enumerate(ranked):
        taken = families[model].taken
        if taken < min_trials or not families[model].left:  # below min_trials, or at its cap
            continue
        rounds = int(math.log2(taken / min_trials)) + 1  # halvings this family has reached
        keep = math.ceil(n / 2**rounds)
        if rank >= keep:
            out[model] = (
                f"ranks {rank + 1} of {n} by best CV score after {taken} trials; successive "
                f"halving keeps the top {keep} at {taken} trials while time is short "
                f"(search.min_trials = {min_trials})"
            )
    need = sum(f.left for m, f in families.items() if m not in out)
    for model in [m for m in ranked if m in out]:  # spare time goes back, best first
        need += families[model].left
        if need > spare:
            break
        del out[model]
    return out


Job = tuple[str, optuna.Study, Any, Callable[[], bool]]  # name, study, objective, has work?


def in_turn(cfg: StudyConfig, jobs: list[Job], deadline: Deadline | None) -> list[Job]:
    """The jobs in the order a worker looks at them: model after model without a budget; with
    one, the model families the allocation keeps, fewest trials first, then the follow-ups. A
    family newly held back is said once in the worker's log and recorded on its study."""
    if deadline is None:
        return jobs
    search = {name: study for name, study, *_ in jobs if name in cfg.models}
    families = {m: _family(s, cfg.trials_for(m)) for m, s in search.items()}
    # the workers now: this one (between trials) and those running a trial, on any host
    workers = 1 + sum(
        len(s.get_trials(deepcopy=False, states=(TrialState.RUNNING,))) for _, s, *_ in jobs
    )
    spare = max(deadline.search_end - clock(), 0.0) * workers
    held = held_back(families, cfg.search.min_trials, cfg.cv.metric == "accuracy", spare)
    for model, study in search.items():
        why = held.get(model)
        if study.user_attrs.get(ALLOCATION) != why:
            study.set_user_attr(ALLOCATION, why)
            said = f"gets no more trials: it {why}" if why else "gets trials again"
            print(f"allocation: {model} {said}", flush=True)
    kept = [j for j in jobs if j[0] in search and j[0] not in held]
    kept.sort(key=lambda j: families[j[0]].taken)
    return kept + [j for j in jobs if j[0] not in search]


def _family(study: optuna.Study, cap: int) -> Family:
    """`study`'s standing; its trials still to run cost what its finished ones took on average
    (pruned ones included, so a hyperband family's short trials count as short)."""
    trials = study.get_trials(deepcopy=False, states=TAKEN)
    done = [t.duration.total_seconds() for t in trials if t.state in FINISHED and t.duration]
    to_run = max(cap - len(trials), 0)
    left = to_run * sum(done) / len(done) if done else (math.inf if to_run else 0.0)
    best = best_trial(study)
    return Family(len(trials), None if best is None else best.value, left)


def spending(cfg: StudyConfig, storage: optuna.storages.BaseStorage) -> Spending | None:
    """The stored budget of the last command and each model's share of it; None without one."""
    studies = {
        m: optuna.load_study(study_name=study_name(cfg, m), storage=storage) for m in cfg.models
    }
    deadline = read(next(iter(studies.values())))
    if deadline is None:
        return None
    total = deadline.end - deadline.start
    return Spending(total, deadline.reserve, [_use(cfg, m, s) for m, s in studies.items()])


def _use(cfg: StudyConfig, model: str, study: optuna.Study) -> ModelUse:
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    stopped = sum(t.state == TrialState.FAIL and "interrupted" in t.user_attrs for t in trials)
    seconds = sum(t.duration.total_seconds() for t in trials if t.duration)
    left = cfg.trials_for(model) - len(finished)
    undone = [f"{left} of its {cfg.trials_for(model)} trials not run"] if left > 0 else []
    if stopped:
        undone.append(f"{stopped} stopped at the deadline and queued again")
    if (why := study.user_attrs.get(ALLOCATION)) is not None:
        undone.append(f"held back: it {why}")
    return ModelUse(model, len(finished), seconds, "; ".join(undone) or "nothing")
