"""The search stage, on real digits: OOF coverage, determinism, resume, pruning, Ctrl-C, storage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from workbench import search
from workbench.config import StudyConfig, load_study
from workbench.data import ImageData, Split, load_data, load_or_make_split
from workbench.errors import StorageError
from workbench.files import load_npz
from workbench.tracking import Tracker
from workbench.train import Interrupted, load_model, predict_proba

ROOT = Path(__file__).resolve().parents[1]


def prepare(cfg: StudyConfig) -> tuple[ImageData, Split]:
    data = load_data(cfg.data)
    return data, load_or_make_split(data, cfg.data, cfg.seed, cfg.out / "split.npz")


def run(cfg: StudyConfig, **kw: object) -> optuna.Study:
    data, split = prepare(cfg)
    storage = search.open_storage(cfg)
    search.create_studies(cfg, storage)
    search.run_worker(cfg, data, split, Tracker(cfg, enabled=False), **kw)  # type: ignore[arg-type]
    return optuna.load_study(study_name="tiny/mlp", storage=storage)


def test_completed_trials_keep_oof_probabilities_and_fold_checkpoints(
    tiny_cfg: StudyConfig,
) -> None:
    study = run(tiny_cfg)
    data, split = prepare(tiny_cfg)
    records = search.completed_trials(tiny_cfg, "mlp", search.open_storage(tiny_cfg))
    assert records and records[0].value == max(r.value for r in records)
    for rec in records:
        oof = load_npz(rec.dir / "oof.npz")
        # one row per training image, in split order, never a test row, each row summing to 1
        np.testing.assert_array_equal(oof["rows"], split.train_idx)
        assert not set(oof["rows"]) & set(split.test_idx)
        np.testing.assert_array_equal(oof["y"], data.y[split.train_idx].numpy())
        assert np.isfinite(oof["proba"]).all()
        np.testing.assert_allclose(oof["proba"].sum(1), 1.0, atol=1e-9)
        # the trial's value is the mean of its fold scores, which the OOF rows reproduce
        folds = rec.attrs["fold_scores"]
        assert len(folds) == 3 and rec.value == pytest.approx(np.mean(folds))
        assert rec.attrs["cv_accuracy_std"] == pytest.approx(np.std(folds))
        assert (oof["proba"].argmax(1) == oof["y"]).mean() == pytest.approx(
            np.mean(folds), abs=2e-3
        )
        # k fold checkpoints that load on their own and predict like the OOF rows say
        assert sorted(p.name for p in rec.dir.glob("fold-*.pt")) == [
            "fold-0.pt",
            "fold-1.pt",
            "fold-2.pt",
        ]
        model = load_model(rec.dir / "fold-0.pt")
        assert predict_proba(model, data.images(np.arange(5))).shape == (5, 10)
    assert len(study.trials) == 3


def test_same_seed_gives_the_same_trials_and_scores(tiny_file: Path, tmp_path: Path) -> None:
    results = []
    for out in ("a", "b"):
        cfg = load_study(tiny_file).model_copy(update={"output_dir": str(tmp_path / out)})
        study = run(cfg)
        results.append([(t.params, t.value, t.state) for t in study.trials])
    assert results[0] == results[1]
    assert len({str(p) for p, _, _ in results[0]}) == 3  # and the trials do differ


def test_a_second_run_resumes_instead_of_restarting(tiny_file: Path) -> None:
    first = run(load_study(tiny_file, trials=2))
    assert len(first.trials) == 2
    again = run(load_study(tiny_file, trials=2))
    assert len(again.trials) == 2  # complete: nothing added
    more = run(load_study(tiny_file, trials=3))
    assert [t.number for t in more.trials] == [0, 1, 2]
    assert more.trials[0].params == first.trials[0].params


def test_hopeless_trials_are_pruned_in_the_default_study(tmp_path: Path) -> None:
    """The shipped digits study's pruner stops a hopeless MLP trial inside its first fold."""
    cfg = load_study(ROOT / "studies" / "digits.toml", trials=5)
    cfg = cfg.model_copy(update={"output_dir": str(tmp_path), "models": {"mlp": cfg.models["mlp"]}})
    data, split = prepare(cfg)
    storage = search.open_storage(cfg)
    study = search.create_studies(cfg, storage)["mlp"]
    for lr in (3e-3, 1e-2, 2e-2, 5e-3):  # four sound trials: the pruner's startup
        study.enqueue_trial(
            {"width": 256, "depth": 2, "dropout": 0.1, "lr": lr, "weight_decay": 1e-4}
        )
    # smallest width, most dropout, lowest learning rate: far behind at every early epoch
    study.enqueue_trial(
        {"width": 128, "depth": 3, "dropout": 0.5, "lr": 3e-4, "weight_decay": 1e-2}
    )
    search.run_worker(cfg, data, split, Tracker(cfg, enabled=False))
    trials = study.get_trials()
    assert [t.state.name for t in trials[:4]] == ["COMPLETE"] * 4
    hopeless = trials[4]
    assert hopeless.state == optuna.trial.TrialState.PRUNED
    assert max(hopeless.intermediate_values) < cfg.train.epochs  # stopped within fold 0
    assert not (cfg.out / "trials" / "mlp" / "0004").exists()  # pruned trials leave no files


def test_ctrl_c_requeues_the_running_trial_and_its_retry_keeps_the_finished_folds(
    tiny_cfg: StudyConfig,
) -> None:
    data, split = prepare(tiny_cfg)
    storage = search.open_storage(tiny_cfg)
    search.create_studies(tiny_cfg, storage)
    folder = tiny_cfg.out / "trials" / "mlp" / "0001"
    # "Ctrl-C" arrives during the second trial, once its first fold is done
    stop = (folder / "fold-0.npz").exists
    with pytest.raises(Interrupted):
        search.run_worker(tiny_cfg, data, split, Tracker(tiny_cfg, enabled=False), should_stop=stop)
    study = optuna.load_study(study_name="tiny/mlp", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "WAITING"]
    stopped, queued = study.trials[1], study.trials[2]
    assert stopped.user_attrs["interrupted"] and "interrupted" not in queued.user_attrs
    assert queued.params == stopped.params
    assert (tiny_cfg.out / "trials" / "mlp" / "0000" / "oof.npz").exists()
    kept = (folder / "fold-0.pt").stat().st_mtime_ns
    assert not (folder / "fold-1.npz").exists()  # stopped after an epoch of fold 1
    (row,) = search.progress(tiny_cfg, storage)
    assert row.failed == 0  # an interrupted trial is not a failure: it is queued again
    # resuming runs the queued copy first: fold 0 kept, folds 1 and 2 trained; then the study
    # completes with one new trial
    search.run_worker(tiny_cfg, data, split, Tracker(tiny_cfg, enabled=False))
    retry = study.get_trials()[2]
    assert retry.state.name == "COMPLETE" and retry.user_attrs["folds_resumed"] == [0]
    assert retry.user_attrs["dir"] == "trials/mlp/0001"
    assert (folder / "fold-0.pt").stat().st_mtime_ns == kept  # not retrained
    stride = tiny_cfg.train.epochs
    assert {step // stride for step in retry.intermediate_values} == {1, 2}
    states = [t.state.name for t in study.get_trials()]
    assert states.count("COMPLETE") + states.count("PRUNED") == 3


def test_a_changed_study_file_is_refused_on_resume(tiny_file: Path) -> None:
    cfg = load_study(tiny_file)
    search.create_studies(cfg, search.open_storage(cfg))
    tiny_file.write_text(tiny_file.read_text().replace("high = 3e-2", "high = 1e-1"))
    changed = load_study(tiny_file)
    with pytest.raises(
        StorageError, match=r"changed: models\.mlp\.space\.lr\.high \(0\.03 -> 0\.1\)"
    ):
        search.create_studies(changed, search.open_storage(changed))


def test_ensemble_and_distill_keys_may_change_on_resume_and_a_new_key_is_named(
    tiny_file: Path,
) -> None:
    """What only the ensemble stage reads ([ensemble], [distill]) may change between runs; a key
    that one side lacks, even one whose value is None, is named rather than "(structure)"."""
    cfg = load_study(tiny_file)
    storage = search.open_storage(cfg)
    search.create_studies(cfg, storage)
    text = tiny_file.read_text()
    tiny_file.write_text(text + '[ensemble]\ntta = ["hflip"]\n[distill]\nmodel = "mlp"\n')
    search.create_studies(load_study(tiny_file), storage)  # resumes: no error
    from workbench.search.storage import _diff

    assert _diff({"a": 1}, {"a": 1, "b": None}) == ["b (absent -> None)"]


def test_a_storage_that_cannot_connect_gets_one_clear_line(
    tiny_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKBENCH_STORAGE", "postgresql://nobody:pw@127.0.0.1:9/none")
    cfg = load_study(tiny_file)
    with pytest.raises(
        StorageError,
        match=r"cannot open the Optuna storage 'postgresql://nobody:\*\*\*@127\.0\.0\.1:9/none'",
    ):
        search.open_storage(cfg)


def test_sampled_parameters_respect_the_space() -> None:
    from workbench.config import Choice, FloatRange, IntRange

    space = {
        "a": IntRange(low=2, high=8, step=2),
        "b": FloatRange(low=1e-3, high=1e-1, log=True),
        "c": Choice(choices=("x", "y")),
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        p = search.sample_params(trial, space)
        assert p["a"] in (2, 4, 6, 8) and 1e-3 <= p["b"] <= 1e-1 and p["c"] in ("x", "y")
        study.tell(trial, 0.0)
    assert torch.tensor([t.params["a"] for t in study.trials]).unique().numel() > 1
