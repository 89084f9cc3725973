"""The ensembling stage on a tiny real study: members, snapshots, one test evaluation, the model;
member inference on two processes, and the stage's ONNX check on a sample of the test rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from workbench import evaluate, graph, search, views
from workbench.cli import stages
from workbench.config import StudyConfig, load_study
from workbench.data import load_data, load_or_make_split
from workbench.ensemble.members import MemberSpec, Refit, load_members, snapshot_specs
from workbench.ensemble.stage import HeldOut, run_ensemble
from workbench.export import save_final
from workbench.final import FinalEnsemble
from workbench.infer import member_probas, test_probas, tta_oof
from workbench.results import EnsembleResult, TestProbas
from workbench.runtime import forked_map
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


# --- the stage on every core ---------------------------------------------------------------


def _where(shared: int, item: int) -> tuple[int, int, int]:
    """(shared + item, the process that ran it, its torch threads)."""
    return shared + item, os.getpid(), torch.get_num_threads()


def test_forked_map_runs_items_in_forked_one_thread_processes_and_keeps_their_order() -> None:
    """Two workers: every item runs in a process forked for it (not this one) on one torch
    thread, whatever this process runs on, and the results come back in the items' order,
    however the two shared them; one worker: one forked process; none: every item here."""
    here, before = os.getpid(), torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        two = list(forked_map(_where, 10, range(6), 2))
        one = list(forked_map(_where, 10, range(3), 1))
        none = list(forked_map(_where, 10, range(3), 0))
    finally:
        torch.set_num_threads(before)
    assert [v for v, _, _ in two] == [10, 11, 12, 13, 14, 15]
    assert here not in {pid for _, pid, _ in two} and len({pid for _, pid, _ in two}) <= 2
    assert {threads for _, _, threads in two} == {1}
    assert [v for v, _, _ in one] == [10, 11, 12] and len({(p, t) for _, p, t in one}) == 1
    assert one[0][1] != here and one[0][2] == 1  # forked, one thread
    assert none == [(10, here, 3), (11, here, 3), (12, here, 3)]


def test_member_inference_on_two_processes_is_the_one_process_result_bit_for_bit(
    study: tuple,
) -> None:
    """Members with a TTA view, the best member's fold models alone, the refit network and a
    member's out-of-fold TTA rows: the same float64 probabilities from one process as from two;
    and they are each fold model's own probabilities, computed here a network at a time."""
    cfg, data, split = study
    members, _ = load_members(specs_of(cfg), split.train_idx, cfg.cv.folds)
    checkpoints = [m.checkpoints for m in members]
    best = search.completed_trials(cfg, "mlp", search.open_storage(cfg))[0].number
    refit = cfg.out / "refits" / "mlp" / f"{best:04d}" / "model.pt"
    x, flip = data.rows(split.test_idx), views.resolve(["hflip"])
    one, two = (
        test_probas(checkpoints, x, 1, refits=[refit], views=flip, workers=w) for w in (1, 2)
    )
    for a, b in [(one.members, two.members), (one.folds, two.folds), (one.refits, two.refits)]:
        assert a is not None and b is not None and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    folds = [predict_proba(load_model(p), x) for p in checkpoints[1]]
    np.testing.assert_array_equal(two.folds, np.stack(folds))
    np.testing.assert_array_equal(two.members[1], np.mean(folds, axis=0))
    assert two.refits is not None
    np.testing.assert_array_equal(two.refits[0], predict_proba(load_model(refit), x))
    # member 1's TTA variant: the mean over its fold models of the image and its mirror image
    images = data.images(split.test_idx)
    mirrored = [predict_proba(load_model(p), images.flip(-1)) for p in checkpoints[1]]
    np.testing.assert_allclose(
        two.members[len(members) + 1], np.mean(folds + mirrored, axis=0), rtol=0, atol=1e-12
    )
    # out-of-fold TTA: each fold model on its own rows (any partition of the rows will do here)
    train, oof = data.rows(split.train_idx), members[1].oof
    held = np.array_split(np.arange(len(split.train_idx)), len(checkpoints[1]))
    one_oof, two_oof = (tta_oof(checkpoints[1], train, held, oof, flip, workers=w) for w in (1, 2))
    assert not np.isnan(two_oof).any()
    np.testing.assert_array_equal(one_oof, two_oof)


def _with(cfg: StudyConfig, **ensemble: int) -> StudyConfig:
    """The study with these [ensemble] keys."""
    return cfg.model_copy(update={"ensemble": cfg.ensemble.model_copy(update=ensemble)})


def test_the_stage_checks_its_graph_on_a_sample_and_reuses_its_result_at_any_worker_count(
    study: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole stage on two processes: its ONNX graph checked on `check_rows` test rows;
    then run again with one process and every row checked: `workers` and `check_rows` change
    how the stage runs, not its result, so the stored one is reused and the test split is not
    looked at again."""
    cfg, data, split = study
    first = _with(cfg, workers=2, check_rows=50)
    stages.ensemble_stage(first, data, split, Tracker(first, enabled=False))
    said = " ".join(capsys.readouterr().out.split())
    n = len(split.test_idx)
    assert f"over {n:,} rows on 2 processes" in said
    assert f"on 50 of {n} test rows labels equal" in said
    again = _with(cfg, workers=1, check_rows=0)
    stages.ensemble_stage(again, data, split, Tracker(again, enabled=False))
    assert "ensemble inputs unchanged: reusing" in " ".join(capsys.readouterr().out.split())
    assert len(RunStore(cfg.out).test_looks()) == 1


def test_graph_sample_is_seeded_sorted_and_all_rows_when_asked() -> None:
    drawn = graph.sample(1000, 64, seed=3)
    assert len(drawn) == 64 == len(set(drawn.tolist())) and np.all(np.diff(drawn) > 0)
    assert drawn.min() >= 0 and drawn.max() < 1000
    assert graph.sample(1000, 64, seed=3).tolist() == drawn.tolist()
    assert graph.sample(1000, 64, seed=4).tolist() != drawn.tolist()
    assert graph.sample(1000, 0, seed=3).tolist() == list(range(1000))  # 0: every row
    assert graph.sample(40, 64, seed=3).tolist() == list(range(40))  # fewer rows than asked
