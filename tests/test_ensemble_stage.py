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
from workbench.ensemble.members import MemberSpec, load_members, snapshot_specs
from workbench.ensemble.stage import HeldOut, run_ensemble
from workbench.export import save_final
from workbench.final import FinalEnsemble
from workbench.infer import member_probas
from workbench.tracking import Tracker


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudyConfig, object, object]:
    from conftest import TINY

    tmp = tmp_path_factory.mktemp("stage")
    path = tmp / "tiny.toml"
    path.write_text(TINY.format(out=tmp / "runs") + "[ensemble]\nsnapshots = 3\n")
    cfg = load_study(path, trials=4)
    data = load_data(cfg.data)
    split = load_or_make_split(data, cfg.data, cfg.seed, cfg.out / "split.npz")
    storage = search.open_storage(cfg)
    search.create_studies(cfg, storage)
    search.run_worker(cfg, data, split, Tracker(cfg, enabled=False))  # search, then snapshots
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


def test_stage_evaluates_the_test_split_once_and_saves_a_loadable_final_model(
    study: tuple, tmp_path: Path
) -> None:
    cfg, data, split = study
    members, _ = load_members(specs_of(cfg), split.train_idx, cfg.cv.folds)
    y_train = data.y[split.train_idx].numpy()
    test = HeldOut(data.y[split.test_idx].numpy(), list(data.classes), split.fingerprint)
    x_test = data.rows(split.test_idx)
    looks: list[int] = []

    def predict() -> np.ndarray:  # the members' test probabilities, counted
        looks.append(1)
        return member_probas([m.checkpoints for m in members], x_test)

    out = tmp_path / "ensemble"
    results = run_ensemble(members, y_train, test, cfg.ensemble, out, 0, predict)
    assert results["test_evaluations"] == 1 and not results["reused"] and len(looks) == 1
    assert set(results["methods"]) == {"hard_voting", "soft_voting", "weighted", "selection"}
    # the chosen method is the one with the best cross-validated OOF log loss, not test loss
    cv_loss = {n: m["oof_cv"]["log_loss"] for n, m in results["methods"].items()}
    assert results["chosen"] == min(cv_loss, key=cv_loss.get)
    for method in results["methods"].values():
        assert len(method["weights"]) == len(members)
        assert sum(method["weights"]) == pytest.approx(1.0)
    # the best single member is the best by CV score; its test metrics are recomputable
    best = max(members, key=lambda m: m.spec.cv_score)
    assert results["best_single"] == best.name
    single = evaluate.metrics(member_probas([best.checkpoints], x_test)[0], test.y)
    stored = next(m for m in results["members"] if m["name"] == best.name)["test"]
    assert stored["accuracy"] == pytest.approx(single["accuracy"])
    # the final model saved from the stage's rule predicts exactly what the stage scored
    kept = [(m.name, m.checkpoints) for m in members]
    rule = results["final"]["rule"]
    save_final(
        out / "final",
        kept,
        rule,
        results["chosen"],
        list(data.classes),
        data.in_shape,
        data.preprocess,
    )
    final = FinalEnsemble.load(out / "final")
    proba = final.predict_proba(data.images(split.test_idx).numpy())
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
    assert evaluate.metrics(proba, test.y)["log_loss"] == pytest.approx(
        results["final"]["test"]["log_loss"], rel=1e-9
    )
    wrong = round((1 - results["final"]["test"]["accuracy"]) * len(test.y))
    assert len(results["misclassified"]) == wrong
    # unchanged inputs: the stored evaluation is reused and the test split is not read again
    again = run_ensemble(members, y_train, test, cfg.ensemble, out, 0, predict)
    assert again["reused"] and again["test_evaluations"] == 1 and len(looks) == 1
    assert len(json.loads((out / "test_evaluations.json").read_text())) == 1
    # different members: a new evaluation, and it is counted
    fewer = run_ensemble(members[:2], y_train, test, cfg.ensemble, out, 0, lambda: predict()[:2])
    assert not fewer["reused"] and fewer["test_evaluations"] == 2 and len(looks) == 2


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
