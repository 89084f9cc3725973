"""The time budget (workbench/search/budget.py): no trial starts that cannot finish, running trials
stop at the deadline and are queued again, families compete by successive halving. The budget's
clock is replaced where the test must decide what time it is; trials train for real."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from workbench import search
from workbench.config import StudyConfig, duration_seconds, load_study
from workbench.data import load_data, load_or_make_split
from workbench.search import budget
from workbench.search.budget import Deadline, Family
from workbench.tracking import Tracker

T0 = 1_000_000.0  # a fake unix time: the command's start


@pytest.mark.parametrize(
    ("text", "seconds"), [("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("90s", 90), ("600", 600)]
)
def test_durations_read_as_people_write_them(text: str, seconds: float) -> None:
    assert duration_seconds(text) == seconds


def test_successive_halving_keeps_min_trials_and_then_the_better_half() -> None:
    # three families, min_trials 2; by best CV accuracy: a (0.9) > b (0.8) > c (0.3)
    fam = {"a": Family(2, 0.9), "b": Family(2, 0.8), "c": Family(2, 0.3)}
    # at 2 trials each (one halving): the top ceil(3 / 2) = 2 go on; c stops at its min_trials
    assert set(budget.held_back(fam, 2, maximize=True)) == {"c"}
    # a family below min_trials is never held back, however bad
    assert budget.held_back({**fam, "c": Family(1, 0.1)}, 2, maximize=True) == {}
    # at 4 trials (two halvings) only the top ceil(3 / 4) = 1 goes on: b stops at 4
    fam = {"a": Family(4, 0.9), "b": Family(4, 0.8), "c": Family(2, 0.3)}
    assert set(budget.held_back(fam, 2, maximize=True)) == {"b", "c"}
    # log loss: lower is better, and a family with nothing completed ranks last
    fam = {"a": Family(2, 0.5), "b": Family(2, 0.2), "c": Family(2, None)}
    assert set(budget.held_back(fam, 2, maximize=False)) == {"c"}
    assert "ranks 3 of 3" in budget.held_back(fam, 2, maximize=False)["c"]


def _trial(
    start: float, seconds: float, epochs: int, state: TrialState
) -> optuna.trial.FrozenTrial:
    t = optuna.trial.create_trial(
        state=state,
        value=0.5 if state == TrialState.COMPLETE else None,
        intermediate_values={e: 0.5 for e in range(epochs)},
    )
    t.datetime_start = dt.datetime.fromtimestamp(start)
    t.datetime_complete = dt.datetime.fromtimestamp(start + seconds)
    return t


def test_a_trial_is_estimated_at_all_folds_and_epochs_of_the_measured_epoch_time() -> None:
    # 6 s for 3 epochs (pruned) and 20 s for 10 epochs: 26 s / 13 epochs = 2 s an epoch
    trials = [_trial(T0, 6.0, 3, TrialState.PRUNED), _trial(T0, 20.0, 10, TrialState.COMPLETE)]
    assert budget.trial_seconds(trials, epochs=5, folds=3) == pytest.approx(2.0 * 5 * 3)
    assert budget.trial_seconds([], epochs=5, folds=3) is None


def _tiny(tiny_file: Path, out: Path, trials: int, **search_keys: object) -> StudyConfig:
    cfg = load_study(tiny_file, trials=trials)
    keys = {"budget": 600.0, **search_keys}
    return cfg.model_copy(
        update={"output_dir": str(out), "search": cfg.search.model_copy(update=keys)}
    )


def _run(cfg: StudyConfig, started: float) -> dict[str, optuna.Study]:
    data = load_data(cfg.data)
    split = load_or_make_split(data, cfg.data, cfg.seed, cfg.out / "split.npz")
    storage = search.open_storage(cfg)
    studies = search.create_studies(cfg, storage)
    budget.start(cfg, studies, started, cfg.out / "timings.json")
    search.run_worker(cfg, data, split, Tracker(cfg, enabled=False))
    return {m: optuna.load_study(study_name=f"tiny/{m}", storage=storage) for m in cfg.models}


def test_no_trial_starts_that_cannot_finish(
    tiny_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each finished trial moves the fake clock 100 s on; a trial is estimated at 100 s. With
    250 s to the search's end: trial 0 starts (nothing measured), trial 1 at 100 s (100 + 100 <=
    250), and trial 2 would end at 300 s > 250: it is not started, though 5 were asked for."""
    cfg = _tiny(tiny_file, tmp_path, trials=5)
    finished: list[int] = []
    monkeypatch.setattr(budget, "clock", lambda: T0 + 100.0 * len(finished))
    monkeypatch.setattr(budget, "trial_seconds", lambda trials, e, f: 100.0 if trials else None)
    monkeypatch.setattr(budget, "reserve_for", lambda b, t: 600.0 - 250.0)  # search ends at +250
    original = search.worker._run_one

    def counted(study: optuna.Study, objective: search.Objective) -> object:
        ended = original(study, objective)
        finished.append(1)
        return ended

    monkeypatch.setattr(search.worker, "_run_one", counted)
    study = _run(cfg, T0)["mlp"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert budget.read(study) == Deadline(T0, T0 + 600.0, 350.0)


def test_the_deadline_stops_a_running_trial_and_queues_it_again(
    tiny_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clock passes the search's end once the first trial has trained an epoch: the trial
    stops after that epoch, ends FAIL (interrupted) and a copy with its parameters is queued."""
    cfg = _tiny(tiny_file, tmp_path, trials=3)
    storage = search.open_storage(cfg)

    def clock() -> float:
        running = optuna.load_study(study_name="tiny/mlp", storage=storage).get_trials(
            deepcopy=False, states=(TrialState.RUNNING,)
        )
        return T0 + (10_000.0 if any(t.intermediate_values for t in running) else 0.0)

    monkeypatch.setattr(budget, "clock", clock)
    study = _run(cfg, T0)["mlp"]
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.WAITING]
    first, queued = study.trials
    assert first.user_attrs.get("interrupted") and len(first.intermediate_values) == 1
    assert queued.params == first.params


def test_spare_time_goes_back_to_held_back_families_best_first() -> None:
    # by best CV accuracy a > b > c; halving alone holds b and c back (as above). The trials a
    # has left take 10 worker-seconds, b's 10 more, c's 20 more (40 in all).
    fam = {"a": Family(4, 0.9, 10.0), "b": Family(4, 0.8, 10.0), "c": Family(2, 0.3, 20.0)}
    assert set(budget.held_back(fam, 2, maximize=True, spare=19.0)) == {"b", "c"}  # 10 + 10 > 19
    assert set(budget.held_back(fam, 2, maximize=True, spare=20.0)) == {"c"}  # 10 + 10 + 20 > 20
    assert budget.held_back(fam, 2, maximize=True, spare=40.0) == {}  # all of it fits
    # a family at its cap has nothing left to hold back, whatever its rank
    assert "c" not in budget.held_back({**fam, "c": Family(8, 0.3, 0.0)}, 2, maximize=True)
    # a family whose trials were never measured cannot be shown to fit
    fam = {**fam, "c": Family(2, 0.3)}
    assert set(budget.held_back(fam, 2, maximize=True, spare=1e9)) == {"c"}


def _two_families(tiny_file: Path, out: Path) -> StudyConfig:
    """Two mlp families on the digits, caps of 6 trials, min_trials 2: "slow" has a learning
    rate too small to learn anything in 2 epochs (near 10 % CV accuracy)."""
    cfg = _tiny(tiny_file, out, trials=6, min_trials=2, pruner="none")
    good = cfg.models["mlp"]
    slow = good.model_copy(
        update={"arch": "mlp", "params": {**good.params, "lr": 1e-7}, "space": {}}
    )
    return cfg.model_copy(update={"models": {"mlp": good, "slow": slow}})


def test_with_time_to_spare_every_family_gets_its_trials(tiny_file: Path, tmp_path: Path) -> None:
    """600 s for 12 trials of a few seconds: halving never has to choose, and the family far
    behind runs to its cap too."""
    cfg = _two_families(tiny_file, tmp_path)
    studies = _run(cfg, budget.clock())
    done = {m: sum(t.state == TrialState.COMPLETE for t in s.trials) for m, s in studies.items()}
    assert done == {"mlp": 6, "slow": 6}
    assert budget.ALLOCATION not in studies["slow"].user_attrs  # never held back
    spent = budget.spending(cfg, search.open_storage(cfg))
    assert spent is not None and [m.undone for m in spent.models] == ["nothing", "nothing"]


def test_when_time_is_short_a_family_far_behind_gets_min_trials_and_the_rest_go_to_the_better_one(
    tiny_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clock stands 0.1 s before the search's end (at 480 s of the 600 s budget, a fifth
    kept for the reserve) and a trial is estimated at 0 s, so every trial may start but no
    family's remaining trials fit in the spare time: the slow family stops at min_trials and the
    good one gets every further trial, up to its cap."""
    cfg = _two_families(tiny_file, tmp_path)
    monkeypatch.setattr(budget, "clock", lambda: T0 + 479.9)
    monkeypatch.setattr(budget, "trial_seconds", lambda trials, e, f: 0.0)
    studies = _run(cfg, T0)
    done = {m: sum(t.state == TrialState.COMPLETE for t in s.trials) for m, s in studies.items()}
    assert done == {"mlp": 6, "slow": 2}
    assert max(t.value for t in studies["slow"].trials) < min(
        t.value for t in studies["mlp"].trials
    )
    why = studies["slow"].user_attrs[budget.ALLOCATION]
    assert "ranks 2 of 2" in why and "search.min_trials = 2" in why
    spent = budget.spending(cfg, search.open_storage(cfg))
    assert spent is not None and [m.trials for m in spent.models] == [6, 2]
    assert (
        "held back" in spent.models[1].undone
        and "4 of its 6 trials not run" in spent.models[1].undone
    )


def test_study_with_a_budget_says_it_and_the_report_shows_its_use(tmp_path: Path) -> None:
    from conftest import TINY, run_cli

    file = tmp_path / "tiny.toml"
    file.write_text(TINY.format(out=tmp_path / "runs"))
    ran = run_cli("study", str(file), "--budget", "20m", cwd=tmp_path)
    said = " ".join(ran.stdout.split())
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "budget: 20m 00s for the whole command" in said
    assert "the search ends 4m 00s before, for the ensemble and report" in said  # a fifth
    page = " ".join((tmp_path / "reports" / "tiny.html").read_text().split())
    assert '<dd id="budget">20 min 00 s for the whole command' in page
    assert "<code>mlp</code>: 3 trials in" in page
