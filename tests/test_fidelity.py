"""Multi-fidelity search (workbench/search/fidelity.py): the exact Wilcoxon p-value, the fold-level
test against the best trial, and a hyperband study whose rungs stop trials inside fold 0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import TINY
from optuna.trial import TrialState, create_trial
from scipy import stats
from test_search import run

from workbench import search
from workbench.config import load_study
from workbench.report import ModelSection, ReportInputs, TrialRow, render_report
from workbench.search.fidelity import FOLD_STEP, FidelityPruner, signed_rank_p

RNG = np.random.default_rng(7)
VECTORS = [
    RNG.normal(size=4),
    RNG.normal(size=7),
    RNG.normal(size=12),
    np.array([-0.1, -0.2, -0.3, -0.4]),  # every fold worse: the smallest p for n = 4
    np.array([1.0, 1.0, -2.0, 2.0, 3.0, -3.0]),  # tied |d|: average ranks
    np.array([0.0, 1.0, -2.0, 0.0, 3.0]),  # zero differences: split between the sides
    np.array([0.0, 0.0, -1.0, -1.0, 2.0, -0.5]),  # zeros and ties together
    np.zeros(4),  # nothing to tell apart: p = 1
    np.round(RNG.normal(size=10), 1),  # rounding makes ties
]


@pytest.mark.parametrize("alternative", ["less", "greater"])
@pytest.mark.parametrize("d", VECTORS, ids=range(len(VECTORS)))
def test_exact_p_value_equals_scipy(d: np.ndarray, alternative: str) -> None:
    """scipy's method "auto" is exact for n <= 13: its exact distribution, or with ties or zeros
    a permutation test over all 2^n signs; zero_method "zsplit" as Optuna's WilcoxonPruner."""
    expected = stats.wilcoxon(d, alternative=alternative, zero_method="zsplit").pvalue
    assert signed_rank_p(d, alternative) == pytest.approx(expected, abs=1e-12)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [1, 3, 4, 8])
def test_every_fold_worse_gives_two_to_the_minus_n(n: int) -> None:
    # only the all-negative assignment of 2^n has a positive-rank sum as small as 0
    assert signed_rank_p(-np.arange(1.0, n + 1)) == 2.0**-n


@pytest.mark.parametrize(
    ("direction", "best", "worse"), [("maximize", 0.9, 0.5), ("minimize", 0.3, 1.2)]
)
def test_folds_far_worse_than_the_best_prune_after_four_folds_not_three(
    direction: str, best: float, worse: float
) -> None:
    study = optuna.create_study(direction=direction, pruner=FidelityPruner("asha", 0.1))
    fold_scores = [best + 0.01 * k for k in range(6)]
    study.add_trial(
        create_trial(value=float(np.mean(fold_scores)), user_attrs={"fold_scores": fold_scores})
    )
    trial = study.ask()
    decisions = []
    for k in range(5):
        trial.report(worse + 0.01 * k, FOLD_STEP + k)
        decisions.append(trial.should_prune())
    # p = 2^-k with k folds all worse: 0.125 after 3 (kept), 0.0625 after 4 (< 0.1: pruned)
    assert decisions == [False, False, False, True, True]


def test_a_trial_better_on_one_fold_or_on_average_is_kept() -> None:
    study = optuna.create_study(direction="maximize", pruner=FidelityPruner("asha", 0.1))
    study.add_trial(create_trial(value=0.8, user_attrs={"fold_scores": [0.8] * 5}))
    # worse on three folds, better on the one with the smallest |d|: p = 2/16 = 0.125
    mixed = study.ask()
    for k, score in enumerate([0.7, 0.6, 0.5, 0.81]):
        mixed.report(score, FOLD_STEP + k)
    assert not mixed.should_prune()
    # worse on four folds by a hair, better on one by far: p = 1/32 but the mean is higher
    ahead = study.ask()
    for k, score in enumerate([0.799, 0.799, 0.799, 0.799, 0.99]):
        ahead.report(score, FOLD_STEP + k)
    assert not ahead.should_prune()


@pytest.mark.parametrize("pruner", ["hyperband", "asha"])
def test_hyperband_rungs_reach_fold_1_only_for_survivors(pruner: str, tmp_path: Path) -> None:
    """3 epochs per fold, 3 folds (the Wilcoxon test never acts: 2^-2 > 0.1 before the last
    fold), so every pruned trial was stopped by a rung of fold 0: after 1 or 3 epochs."""
    text = TINY.format(out=tmp_path / "runs")
    text = text.replace("[search]\n", f'[search]\npruner = "{pruner}"\n')
    file = tmp_path / "tiny.toml"
    file.write_text(text.replace("epochs = 2", "epochs = 3").replace("trials = 3", "trials = 6"))
    cfg = load_study(file)
    study = run(cfg)
    trials = study.get_trials()
    states = [t.state for t in trials]
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states, states
    rows = {r["number"]: r for r in search.trial_rows(cfg, "mlp", search.open_storage(cfg))}
    for t in trials:
        epochs = [s for s in t.intermediate_values if s < FOLD_STEP]
        if max(epochs) >= 3:  # a report at a step of fold 1 (fold * 3 + epoch)
            assert t.state == TrialState.COMPLETE, t.number
            folds = t.user_attrs["fold_scores"]
            assert [t.intermediate_values[FOLD_STEP + k] for k in (0, 1)] == pytest.approx(
                folds[:2]
            )
            assert rows[t.number]["used"] == "9 ep x 3 folds"
        else:
            assert t.state == TrialState.PRUNED, t.number
            assert len(epochs) in (1, 3)  # epochs trained at the rung: 1 x 3^k
            assert rows[t.number]["used"] == f"{len(epochs)} ep x 1 fold"
    # the OOF contract: only trials that finished every fold are candidates for the ensemble
    members = search.completed_trials(cfg, "mlp", search.open_storage(cfg))
    assert sorted(r.number for r in members) == [
        t.number for t in trials if t.state == TrialState.COMPLETE
    ]
    # the report's leaderboard shows what each trial used
    section = ModelSection(
        "mlp", "accuracy", "maximize", [TrialRow(model="mlp", **r) for r in rows.values()], {}, {}
    )
    inputs = ReportInputs(
        study="tiny",
        config={},
        data_source="digits",
        in_shape=(1, 8, 8),
        classes=[str(c) for c in range(10)],
        split={},
        stage_seconds={},
        tracking=None,
        models=[section],
        ensemble=None,
        misclassified_images=None,
        created="now",
    )
    page = render_report(inputs)
    assert '<th class="n">used</th>' in page and "9 ep x 3 folds" in page
