"""The command line, run as a user runs it: a small real study in two worker processes."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from conftest import Tables, run_cli


def test_study_runs_with_two_workers_then_resumes(tiny_file: Path, tmp_path: Path) -> None:
    first = run_cli("study", str(tiny_file), "--workers", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "best trial per model" in first.stdout and "mlp" in first.stdout
    out = tmp_path / "runs" / "tiny"
    study = optuna.load_study(study_name="tiny/mlp", storage=f"sqlite:///{out / 'optuna.db'}")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert 3 <= len(finished) <= 4  # 3 asked; two workers may both start the last one
    assert {p.name for p in (out / "logs").iterdir()} == {"worker-0.log", "worker-1.log"}
    assert (out / "study.resolved.json").exists() and (out / "split.npz").exists()

    check_report_matches_the_stored_results(tmp_path / "reports" / "tiny.html", study, out)
    check_predict_on_grey_digits(tiny_file, tmp_path, out)

    again = run_cli("study", str(tiny_file), "--workers", "2", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "every model study is complete" in again.stdout
    assert len(optuna.load_study(study_name="tiny/mlp", storage=study._storage).trials) == len(
        study.trials
    )


def check_predict_on_grey_digits(study_file: Path, tmp_path: Path, out: Path) -> None:
    """The digits model takes 1x8x8 images: 8x8 grey PNGs are predicted as pixels / 255; a
    file of another size is an error naming it and the size the model takes."""
    import csv

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from workbench.final import FinalEnsemble

    digits = load_digits()
    folder = tmp_path / "new"
    folder.mkdir()
    grey = np.rint(digits.images[:6] * 255 / 16).astype(np.uint8)
    for i, img in enumerate(grey):
        Image.fromarray(img).save(folder / f"{i}.png")
    table = tmp_path / "digits.csv"
    result = run_cli(
        "predict", str(study_file), str(folder / "*.png"), "--out", str(table), cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = list(csv.DictReader(table.open()))
    assert [Path(r["path"]).name for r in rows] == [f"{i}.png" for i in range(6)]
    final = FinalEnsemble.load(out / "ensemble" / "final")
    expected = final.predict_proba(grey[:, None] / 255.0)
    got = np.array([[float(r[f"p_{c}"]) for c in final.classes] for r in rows])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    assert [r["label"] for r in rows] == [final.classes[k] for k in expected.argmax(1)]
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(folder / "tall.png")
    bad = run_cli("predict", str(study_file), str(folder), cwd=tmp_path)
    assert bad.returncode == 2 and "tall.png is 9x8, but the model takes 8x8 images" in bad.stdout


def test_bad_input_is_one_clear_line_not_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[models.cnn]\n[cv]\nfolds = 3\n[data]\nsource = "idx"\n')
    result = run_cli("study", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "data.path is not set" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def check_report_matches_the_stored_results(report: Path, study: optuna.Study, out: Path) -> None:
    """The report written by `study` shows the Optuna storage's numbers and the stored results,
    cell by cell (each expected cell formatted here, to 4 decimals)."""
    page = report.read_text("utf-8")
    assert "<title>tiny · workbench report</title>" in page
    assert 'http-equiv="Content-Security-Policy"' in page
    tables = Tables(page).tables
    header, *rows = tables["leaderboard-1"]  # the one model, mlp
    assert [text for text, _ in header][:3] == ["#", "state", "CV accuracy"]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    shown = {int(r[0][0]): r[2][0] for r in rows if int(r[0][0]) in {t.number for t in complete}}
    assert shown == {t.number: f"{t.value:.4f}" for t in complete}
    results = json.loads((out / "ensemble" / "results.json").read_text())
    _, _, *rows = tables["methods"]
    by_method = {r[0][0].split()[0]: [text for text, _ in r] for r in rows}
    for name, method in results["methods"].items():
        cells = by_method[name.replace("_", " ").split()[0]]
        assert cells[1:3] == [
            f"{method['test']['accuracy']:.4f}",
            f"{method['test']['log_loss']:.4f}",
        ]


def test_the_snapshot_run_is_run_once_by_the_workers_and_ensembled(
    tiny_file: Path, tmp_path: Path
) -> None:
    """Two workers, snapshots on: whichever sees the search finished first queues the snapshot
    run of the best trial, one of them runs it (a second queued copy ends as a surplus), and
    the ensemble stage uses its two members without training anything itself."""
    tiny_file.write_text(tiny_file.read_text() + "[ensemble]\nsnapshots = 2\n")
    first = run_cli("study", str(tiny_file), "--workers", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    storage = f"sqlite:///{tmp_path / 'runs' / 'tiny' / 'optuna.db'}"
    best = optuna.load_study(study_name="tiny/mlp", storage=storage).best_trial
    snaps = optuna.load_study(study_name="tiny/mlp/snapshots", storage=storage).trials
    done = [t for t in snaps if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 1 and done[0].user_attrs["of_trial"] == best.number
    assert all(t.user_attrs.get("surplus") for t in snaps if t not in done)
    results = json.loads((tmp_path / "runs" / "tiny" / "ensemble" / "results.json").read_text())
    names = {m["name"] for m in results["members"]}
    assert {f"mlp/snapshots-of-{best.number}/snapshot-{m}" for m in (0, 1)} <= names
    again = run_cli("study", str(tiny_file), "--workers", "2", cwd=tmp_path)
    assert again.returncode == 0 and "every model study is complete" in again.stdout
    assert len(optuna.load_study(study_name="tiny/mlp/snapshots", storage=storage).trials) == len(
        snaps
    )


def test_spawned_workers_where_fork_is_not_used(
    tiny_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """macOS and Windows spawn `python -m workbench worker` instead of forking: the same study
    runs to the same end through that path (run in-process here, with fork switched off)."""
    from typer.testing import CliRunner

    from workbench.cli import commands

    monkeypatch.setattr(commands, "FORK", False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(commands.app, ["study", str(tiny_file), "--workers", "2"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "tiny"
    study = optuna.load_study(study_name="tiny/mlp", storage=f"sqlite:///{out / 'optuna.db'}")
    assert sum(t.state.is_finished() for t in study.trials) >= 3  # complete or pruned
    logs = {p.name: p.read_text() for p in (out / "logs").iterdir()}
    assert set(logs) == {"worker-0.log", "worker-1.log"}
    assert (out / "ensemble" / "results.json").exists()
