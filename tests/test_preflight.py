"""Preflight: every command checks the machine, the output folder, the storage, the MLflow server
and the data before it writes a file or forks a worker; a failure is one line and exit 2, and
the output folder is left byte-identical. `workbench check` prints the plan and trains nothing.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import optuna
import pytest
import tomllib
from conftest import ROOT, TINY, run_cli, tree
from sklearn.base import BaseEstimator

from workbench.data import cv_folds
from workbench.ensemble.stage import cross_validated_proba
from workbench.errors import ConfigError


def one_line(text: str) -> str:
    return " ".join(text.split())


def study_file(tmp_path: Path, *, top: str = "", extra: str = "", out: Path | None = None) -> Path:
    """The tiny study with `top` lines before its first table and `extra` tables after."""
    path = tmp_path / "tiny.toml"
    text = TINY.format(out=out or tmp_path / "runs")
    path.write_text(top + "\n" + text + "\n" + extra)
    return path


def fails_cleanly(
    command: str, file: Path, cwd: Path, watched: Path, env: dict[str, str] | None = None
) -> str:
    """Run `workbench COMMAND FILE`; it exits 2 with one error line and no traceback, and the
    folder `watched` is byte-identical afterwards. Returns the output, whitespace collapsed."""
    before = tree(watched)
    result = run_cli(command, str(file), cwd=cwd, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), output
    assert tree(watched) == before
    return one_line(output)


# The one-line failures of each check (device, output folder, storage, MLflow server, data,
# a stage before any study) are cases of tests/test_bad_inputs.py.


def test_a_worker_started_in_another_folder(tmp_path: Path) -> None:
    """output_dir is relative: from another folder the worker looks for a storage that is not
    there, and says which folder it looked in."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir(parents=True)
    file = study_file(home.parent, out=Path("runs"))
    (home / "runs" / "tiny").mkdir(parents=True)
    storage = f"sqlite:///{home / 'runs' / 'tiny' / 'optuna.db'}"
    optuna.create_study(study_name="tiny/mlp", storage=storage)  # as `workbench study` made it
    out = fails_cleanly("worker", file, elsewhere, tmp_path)
    assert f"no study 'tiny/mlp' in sqlite:///{elsewhere / 'runs' / 'tiny' / 'optuna.db'}" in out
    assert f"output_dir 'runs' is relative to this folder, {elsewhere}" in out


# --- workbench check -------------------------------------------------------------------------


def cells(stdout: str) -> list[list[str]]:
    """The rows of the rich tables printed: each row's cells, stripped."""
    return [
        [c.strip() for c in line.strip().strip("│").split("│")]
        for line in stdout.splitlines()
        if line.strip().startswith("│")
    ]


def test_check_prints_the_plan_of_the_digits_study(tmp_path: Path) -> None:
    file = ROOT / "studies" / "digits.toml"
    spec = tomllib.loads(file.read_text())
    result = run_cli("check", str(file), "--trials", "2", "--workers", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = cells(result.stdout)
    pairs = {r[0]: r[1] for r in rows if len(r) == 2}
    # the data, counted independently: scikit-learn's digits are 1,797 8x8 grey images
    n = 1797
    n_test = math.ceil(spec["data"]["test_size"] * n)  # train_test_split rounds the test part up
    n_train = n - n_test
    assert (n_test, n_train) == (360, 1437)  # what the study file's comment says
    folds = spec["cv"]["folds"]
    assert pairs["rows"] == str(n)
    assert pairs["classes"].startswith("10 (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)")
    assert pairs["image shape"].startswith("1 x 8 x 8")
    assert pairs["image store"].startswith(f"{n * 8 * 8 / 1000:.1f} kB ({n} x 1 x 8 x 8 bytes); ")
    assert pairs["image store"].endswith(" free on its disk")
    assert pairs["test rows"].startswith(f"{n_test} ")
    assert pairs["training rows"].startswith(f"{n_train} ")
    lo, hi = n_train // folds, -(-n_train // folds)
    assert pairs["folds"] == f"{folds} stratified, {lo}-{hi} validation rows each"
    # the models: every one, with --trials' count, and each searched key named
    by_model = {r[0]: r for r in rows if len(r) == 5 and r[0]}
    assert set(spec["models"]) <= set(by_model)
    for model, ms in spec["models"].items():
        assert by_model[model][2] == "2"
        searched = " ".join(r[4] for r in rows if len(r) == 5)
        assert all(key in searched for key in ms["space"])
    assert "width {128, 256, 512}" in one_line(result.stdout)
    assert "lr 0.0003..0.03 log" in one_line(result.stdout)
    # where it runs and where it goes
    out = tmp_path / "runs" / "digits"
    assert pairs["workers"] == "3"
    assert pairs["device"].startswith("auto: ")
    assert pairs["output folder"] == str(out)
    assert pairs["Optuna storage"] == f"sqlite:///{out / 'optuna.db'}"
    assert pairs["MLflow tracking"] == f"sqlite:///{tmp_path / 'runs' / 'mlflow' / 'mlflow.db'}"
    assert pairs["MLflow experiment"] == "digits"
    # nothing was searched or recorded: no storage, no MLflow store, no split, no report
    assert not (out / "optuna.db").exists() and not (tmp_path / "runs" / "mlflow").exists()
    assert not (out / "split.npz").exists() and not (tmp_path / "reports").exists()
    assert {p.name for p in out.iterdir()} == {"images"}  # only the decoded data


# --- loose ends of the same issue: folds named by class, the ensemble stage's folds -------------


def test_too_many_folds_name_the_class_by_its_name() -> None:
    y = np.array([0] * 10 + [1] * 3 + [2] * 8)
    with pytest.raises(ConfigError, match=r"cv\.folds = 4 and class 'dog' has 3 training row"):
        cv_folds(y, 4, seed=0, classes=("cat", "dog", "eel"))


class Recorder(BaseEstimator):
    """A combiner that predicts uniform probabilities and records the rows of every fit."""

    fits: ClassVar[list[int]] = []

    def fit(self, P: np.ndarray, y: np.ndarray) -> Recorder:
        Recorder.fits.append(len(y))
        self.classes_ = P.shape[2]
        return self

    def predict_proba(self, P: np.ndarray) -> np.ndarray:
        return np.full(P.shape[1:], 1.0 / P.shape[2])


@pytest.mark.parametrize(("folds", "expected"), [(3, [20] * 3), (5, [24] * 5), (10, [24] * 5)])
def test_the_ensemble_cross_validates_in_the_study_folds(folds: int, expected: list[int]) -> None:
    """30 rows, the smallest class 5: k folds fit on (k-1)/k of them, at most 5 folds; and
    scikit-learn never warns that a class has fewer rows than folds."""
    y = np.array([0] * 15 + [1] * 10 + [2] * 5)
    P = np.random.default_rng(0).dirichlet(np.ones(3), size=(2, len(y)))
    Recorder.fits = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        proba = cross_validated_proba(Recorder(), P, y, seed=0, folds=folds)
    assert Recorder.fits == expected
    assert -np.log(proba[np.arange(len(y)), y]).mean() == pytest.approx(math.log(3))
