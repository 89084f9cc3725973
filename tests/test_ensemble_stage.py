"""The ensembling stage on a tiny real study: members, snapshots, one test evaluation, the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest

from workbench import evaluate, search
from workbench.config import StudyConfig, load_study
from workbench.data import load_data, load_or_make_split
from workbench.ensemble.members import MemberSpec, Refit, load_members, snapshot_specs
from workbench.ensemble.stage import HeldOut, run_ensemble
from workbench.export import save_final
from workbench.final import FinalEnsemble
from workbench.infer import member_probas, test_probas
from workbench.results import EnsembleResult, TestProbas
from workbench.store import RunStore
from workbench.tracking import Tracker
from workbench.train import load_model, predict_proba


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudyConfig, object, object]:
    from conftest import TINY

    tmp = tmp_path_factory.mktemp("stage")
    path = tmp / "tiny.toml"
    path.write_text(TINY.format(out=tmp / "runs") + "[ensemble]\nsnapshots = 3\nrefit = true\n")
    cfg = load_study(path, trials=4)
    data = load_data(cfg.data)
    split = load_or_make_split(data, cfg.data, cfg.seed, cfg.out / "split.npz")
    storage = search.open_storage(cfg)
    search.create_studies(cfg, storage)
    search.run_worker(cfg, data, split, Tracker(cfg, enabled=False))  # search, then follow-ups
    return cfg, data, split


def specs_of(cfg: StudyConfig) -> list[MemberSpec]:
    records = search.completed_trials(cfg, "mlp", search.open_storage(cfg))
    specs = [
        MemberSpec(f"mlp/trial-{r.number}", "mlp", r.number, "trial", r.value, r.dir)
        for r in records[:3]
    ]
    best = records[0]
    folder = cfg.out / "snapshots" / "mlp" / f"{best.number:04d}"
    owner = MemberSpec("mlp/snapshots", "mlp", best.number, "snapshot", best.value, folder)
    return specs + snapshot_specs(owner, owner.dir, "accuracy")


def test_the_snapshot_run_is_a_trial_of_the_search_one_member_per_cycle(study: tuple) -> None:
    cfg, data, split = study
    storage = search.open_storage(cfg)
    best = search.completed_trials(cfg, "mlp", storage)[0]
    snaps = optuna.load_study(study_name="tiny/mlp/snapshots", storage=storage)
    (run,) = snaps.get_trials(states=(optuna.trial.TrialState.COMPLETE,))  # exactly one
    assert run.user_attrs["of_trial"] == best.number and run.user_attrs["cycles"] == 3
    assert run.user_attrs["hp"] == {
        "width": 64,  # models.mlp.params
        **best.params,
        "schedule": "cosine_restarts",
        "cycles": 3,
        "epochs": 3,  # the study's 2 epochs, raised to one per cycle
    }
    folder = cfg.out / run.user_attrs["dir"]
    assert folder == cfg.out / "snapshots" / "mlp" / f"{best.number:04d}"
    assert sorted(p.name for p in folder.glob("snap-*")) == ["snap-0", "snap-1", "snap-2"]
    assert set(run.user_attrs["files"]["files"]) >= {f"snap-{m}/oof.npz" for m in range(3)}
    members, skipped = load_members(specs_of(cfg)[-3:], split.train_idx, cfg.cv.folds)
    assert not skipped and [m.spec.kind for m in members] == ["snapshot"] * 3
    # each snapshot has its own out-of-fold probabilities over every training row
    assert not np.allclose(members[0].oof, members[2].oof)
    for m in members:
        np.testing.assert_allclose(m.oof.sum(1), 1.0, atol=1e-9)
    # done once: a worker started again finds nothing to run
    mtime = (folder / "snap-0" / "oof.npz").stat().st_mtime
    search.run_worker(cfg, data, split, Tracker(cfg, enabled=False))
    assert len(snaps.get_trials()) == 1
    assert (folder / "snap-0" / "oof.npz").stat().st_mtime == mtime


def test_the_refit_is_a_trial_that_trains_the_best_configuration_on_every_training_row(
    study: tuple,
) -> None:
    cfg, data, split = study
    storage = search.open_storage(cfg)
    best = search.completed_trials(cfg, "mlp", storage)[0]
    refits = optuna.load_study(study_name="tiny/mlp/refit", storage=storage)
    (run,) = refits.get_trials(states=(optuna.trial.TrialState.COMPLETE,))  # exactly one
    assert run.user_attrs["of_trial"] == best.number
    assert run.user_attrs["hp"] == {"width": 64, **best.params, "patience": 0}
    assert run.value == best.value  # it scores as its configuration did: no rows held out
    folder = cfg.out / run.user_attrs["dir"]
    assert folder == cfg.out / "refits" / "mlp" / f"{best.number:04d}"
    (history,) = json.loads((folder / "history.json").read_text())  # one training
    assert len(history) == 2 and all(set(e) == {"train_loss", "lr"} for e in history)
    # its normalisation is every training row's channel statistics, not a fold's
    model = load_model(folder / "model.pt")
    mean, std = data.rows(split.train_idx).channel_stats()
    assert model.mean.flatten().tolist() == pytest.approx(list(mean), rel=1e-5)
    assert model.std.flatten().tolist() == pytest.approx(list(std), rel=1e-5)
    assert set(run.user_attrs["files"]["files"]) == {"model.pt", "history.json"}


def test_stage_evaluates_the_test_split_once_and_saves_a_loadable_final_model(
    study: tuple, tmp_path: Path
) -> None:
    cfg, data, split = study
    members, _ = load_members(specs_of(cfg), split.train_idx, cfg.cv.folds)
    y_train = data.y[split.train_idx].numpy()
    test = HeldOut(data.y[split.test_idx].numpy(), list(data.classes), split.fingerprint)
    x_test = data.rows(split.test_idx)
    looks: list[int] = []

    def predict(best: int, among: list = members) -> TestProbas:  # test probabilities, counted
        looks.append(1)
        return test_probas([m.checkpoints for m in among], x_test, best)

    store = RunStore(tmp_path)
    results = run_ensemble(members, y_train, test, cfg.ensemble, store, 0, predict)
    assert results.test_evaluations == 1 and not results.reused and len(looks) == 1
    assert set(results.methods) == {"hard_voting", "soft_voting", "weighted", "selection"}
    # the best combiner is the one with the best cross-validated OOF log loss, not test loss
    cv_loss = {n: m.oof_cv.log_loss for n, m in results.methods.items()}
    assert results.choice.best_method == min(cv_loss, key=cv_loss.get)
    for method in results.methods.values():
        assert len(method.weights) == len(members)
        assert sum(method.weights) == pytest.approx(1.0)
    # the best single member is the best by CV score; its test metrics are recomputable
    best = max(members, key=lambda m: m.spec.cv_score)
    assert results.best_single == best.name
    single = evaluate.metrics(member_probas([best.checkpoints], x_test)[0], test.y)
    assert results.member(best.name).test.accuracy == pytest.approx(single["accuracy"])
    assert results.rung("k-fold bag").test.accuracy == pytest.approx(single["accuracy"])
    # the final model saved from the stage's rule predicts exactly what the stage scored
    kept = [(m.name, m.checkpoints) for m in members]
    save_final(
        store.final,
        kept,
        results.final.rule.to_json(),
        results.final.method,
        list(data.classes),
        data.in_shape,
        data.preprocess,
    )
    final = FinalEnsemble.load(store.final)
    proba = final.predict_proba(data.images(split.test_idx).numpy())
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
    assert evaluate.metrics(proba, test.y)["log_loss"] == pytest.approx(
        results.final.test.log_loss, rel=1e-9
    )
    wrong = round((1 - results.final.test.accuracy) * len(test.y))
    assert len(results.misclassified) == wrong
    # the stored result reads back as it was written
    assert EnsembleResult.loads(store.results.read_bytes()) == results
    # unchanged inputs: the stored evaluation is reused and the test split is not read again
    again = run_ensemble(members, y_train, test, cfg.ensemble, store, 0, predict)
    assert again.reused and again.test_evaluations == 1 and len(looks) == 1
    assert [look.command for look in store.test_looks()] == ["ensemble"]
    # different members: a new evaluation, and it is counted
    fewer = run_ensemble(
        members[:2], y_train, test, cfg.ensemble, store, 0, lambda b: predict(b, members[:2])
    )
    assert not fewer.reused and fewer.test_evaluations == 2 and len(looks) == 2


def test_one_network_rung_and_its_ci_computed_by_hand_from_the_fold_models(
    study: tuple, tmp_path: Path
) -> None:
    """The ladder's first rungs from the stored fold checkpoints: each fold model alone, then
    their mean; the bag's gain over one network and its bootstrap CI, resampled here by hand."""
    cfg, data, split = study
    members, _ = load_members(specs_of(cfg), split.train_idx, cfg.cv.folds)
    test = HeldOut(data.y[split.test_idx].numpy(), list(data.classes), split.fingerprint)
    x_test, y = data.rows(split.test_idx), data.y[split.test_idx].numpy()
    best_trial = search.completed_trials(cfg, "mlp", search.open_storage(cfg))[0]
    refit = cfg.out / "refits" / "mlp" / f"{best_trial.number:04d}" / "model.pt"
    refits = [Refit(f"mlp/refit-of-{best_trial.number}", "mlp", best_trial.number, refit)]
    result = run_ensemble(
        members,
        data.y[split.train_idx].numpy(),
        test,
        cfg.ensemble,
        RunStore(tmp_path),
        cfg.seed,
        lambda best: test_probas([m.checkpoints for m in members], x_test, best, refits=[refit]),
        refits=refits,
    )
    # the refit network: its rung's accuracy is its own labels' on the test rows
    rung = result.rung("mlp on all rows")
    assert rung.kind == "refit" and result.ladder[1] == rung  # right above one network
    refit_p = predict_proba(load_model(refit), x_test)
    assert rung.test.accuracy == pytest.approx(np.mean(refit_p.argmax(1) == y))
    assert rung.vs_network is not None and rung.vs_network.against == "one network"
    best = next(m for m in members if m.name == result.best_single)
    folds = [predict_proba(load_model(p), x_test) for p in best.checkpoints]
    each = [np.mean(p.argmax(1) == y) for p in folds]  # every fold model's accuracy alone
    network = result.rung("one network")
    assert network.test.accuracy == pytest.approx(np.mean(each))
    assert network.spread is not None and network.spread.accuracy == pytest.approx(
        (min(each), max(each))
    )
    bag = np.mean(folds, axis=0)
    # per row: the bag's correctness minus the mean correctness of the k fold models
    d = (bag.argmax(1) == y) - np.mean([p.argmax(1) == y for p in folds], axis=0)
    rng = np.random.default_rng(cfg.seed)
    means = d[rng.integers(0, len(y), size=(cfg.ensemble.bootstrap, len(y)))].mean(axis=1)
    vs = result.rung("k-fold bag").vs_network
    assert vs is not None and vs.against == "one network"
    assert vs.accuracy.diff == pytest.approx(d.mean())
    assert (vs.accuracy.ci_low, vs.accuracy.ci_high) == pytest.approx(
        tuple(np.percentile(means, [2.5, 97.5]))
    )


def test_a_corrupt_member_is_skipped_with_a_warning_naming_it(study: tuple, tmp_path: Path) -> None:
    cfg, _, split = study
    specs = specs_of(cfg)[:2]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "oof.npz").write_bytes((specs[1].dir / "oof.npz").read_bytes()[:100])
    specs[1] = MemberSpec("mlp/trial-broken", "mlp", 99, "trial", 0.5, broken)
    members, skipped = load_members(specs, split.train_idx, cfg.cv.folds)
    assert [m.name for m in members] == [specs[0].name]
    assert len(skipped) == 1 and "mlp/trial-broken" in skipped[0]
    assert "oof.npz is truncated or corrupt" in skipped[0]
