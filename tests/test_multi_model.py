"""A multi-model study through the CLI: cnn and resnet searched together on digits (2 trials each,
3 folds, 2 epochs, 2 workers), ensembled across both models, and reported. The report's cells are
compared one by one with the Optuna storage and results.json, written with plain f-strings."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from conftest import Tables, run_cli

STUDY = """
name = "duo"
seed = 0
output_dir = "{out}"
[cv]
folds = 3
[search]
trials = 2
pruner = "none"
[train]
epochs = 2
batch_size = 64
[tracking]
enabled = false
[ensemble]
top_k = 2
[models.cnn]
params = {{ width = 16, depth = 1 }}
[models.cnn.space]
lr = {{ low = 3e-3, high = 2e-2, log = true }}
[models.resnet]
params = {{ depth = 10, width = 8 }}
[models.resnet.space]
lr = {{ low = 3e-3, high = 2e-2, log = true }}
"""
MODELS = ("cnn", "resnet")


def texts(row: list[tuple[str, dict]]) -> list[str]:
    return [text for text, _ in row]


def test_cnn_and_resnet_searched_together_and_ensembled_across_both(tmp_path: Path) -> None:
    file = tmp_path / "duo.toml"
    file.write_text(STUDY.format(out=tmp_path / "runs"))
    result = run_cli("study", str(file), "--workers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "runs" / "duo"
    storage = f"sqlite:///{out / 'optuna.db'}"
    studies = {m: optuna.load_study(study_name=f"duo/{m}", storage=storage) for m in MODELS}
    for model, study in studies.items():
        real = [t for t in study.trials if not t.user_attrs.get("surplus")]
        assert [t.state.name for t in real] == ["COMPLETE", "COMPLETE"], model
        for t in real:  # each trial's files: 3 fold checkpoints and the out-of-fold rows
            folder = out / t.user_attrs["dir"]
            assert folder.parent.name == model
            assert {p.name for p in folder.glob("fold-*.pt")} == {f"fold-{k}.pt" for k in range(3)}
            assert (folder / "oof.npz").exists()

    results = json.loads((out / "ensemble" / "results.json").read_text())
    members = {m["name"] for m in results["members"]}  # the 2 best trials of each model
    assert members == {f"{m}/trial-{n}" for m in MODELS for n in (0, 1)}
    assert {name.split("/")[0] for name in results["methods"]["soft_voting"]["members"]} == {
        "cnn",
        "resnet",
    }

    # the report, cell by cell: each leaderboard row's CV value is its trial's, to 4 decimals
    tables = Tables((tmp_path / "reports" / "duo.html").read_text("utf-8")).tables
    for k, model in enumerate(MODELS, start=1):
        header, *rows = tables[f"leaderboard-{k}"]
        assert texts(header)[:3] == ["#", "state", "CV accuracy"]
        shown = {int(texts(r)[0]): texts(r)[2] for r in rows}
        trials = [t for t in studies[model].trials if t.state.name == "COMPLETE"]
        assert shown == {t.number: f"{t.value:.4f}" for t in trials}, model
    # each method's row: its test accuracy, log loss, ECE, Brier, macro F1, then OOF-CV figures
    _, header, *rows = tables["methods"]
    assert texts(header)[:8] == [
        "method",
        "accuracy",
        "log loss",
        "ECE",
        "Brier",
        "macro-F1",
        "accuracy",
        "log loss",
    ]
    by_method = {texts(r)[0].split()[0]: texts(r) for r in rows}
    for name, method in results["methods"].items():
        t, cv = method["test"], method["oof_cv"]
        expected = [t["accuracy"], t["log_loss"], t["ece"], t["brier"], t["macro_f1"]]
        expected += [cv["accuracy"], cv["log_loss"]]
        assert by_method[name.replace("_", " ").split()[0]][1:8] == [
            f"{x:.4f}" for x in expected
        ], name
