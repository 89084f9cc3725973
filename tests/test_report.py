"""The HTML report: content equals the inputs, user text is escaped, the file is self-contained.

The fixture is a hand-built study (2 models x 6 trials incl. pruned and failed, curves, a full
ensemble results dict, 8 misclassified 8x8 images, a class name that is an XSS attempt).
The browser tests load the written file in headless Chromium (a missing browser fails them).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import Tables

from workbench.report import ModelSection, ReportInputs, TrialRow, render_report, write_report

XSS = "<img src=x onerror=alert(1)>"
CLASSES = ["cat", "dog", XSS, "bird & fish"]
UI = "http://127.0.0.1:5000"
METHODS = ["soft_voting", "hard_voting", "weighted", "selection"]
SECTIONS = ["Summary", "Headline", "Model mlp", "Model cnn", "Ensembles"]
ENSEMBLE_HEADINGS = [
    "Methods against the best single model",
    "Members and weights",
    "Members on the test split",
    "Pairwise disagreement",
    "Reliability",
    "Confusion matrix",
    "Per-class recall",
    "Misclassified test images",
]
CHROMIUM = Path("/usr/bin/chromium")


def metrics(rng: np.random.Generator, acc: float) -> dict:
    recall = [round(float(x), 4) for x in np.clip(acc + rng.normal(0, 0.03, 4), 0, 1)]
    confusion = [[25 if i == j else int(rng.integers(0, 3)) for j in range(4)] for i in range(4)]
    return {
        "accuracy": acc,
        "macro_f1": acc - 0.004,
        "log_loss": 1.1 - acc,
        "brier": round(1.4 * (1.0 - acc), 5),
        "ece": round(0.05 * (1.0 - acc) + 0.01, 5),
        "per_class_recall": recall,
        "confusion": confusion,
    }


def reliability(shift: float) -> dict:
    conf = [None] * 7 + [0.5 + 0.0625 * k for k in range(8)]
    return {
        "edges": [k / 15 for k in range(16)],
        "confidence": conf,
        "accuracy": [None if c is None else min(1.0, c + shift) for c in conf],
        "count": [0] * 7 + [2, 3, 4, 6, 9, 15, 25, 36],
    }


def trials(model: str, metric_base: float, sign: float) -> list[TrialRow]:
    states = ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE", "FAIL", "COMPLETE"]
    rows = []
    for n, state in enumerate(states):
        value = None if state == "FAIL" else round(metric_base + sign * 0.011 * n, 4)
        done = state == "COMPLETE"
        params = {"lr": 10 ** (-3 + 0.37 * n), "width": 32 * (n + 1), "optimizer": "<script>sgd"}
        if n != 1:
            params["dropout"] = 0.05 * n  # one trial lacks a parameter: its cell shows a dash
        rows.append(
            TrialRow(
                model,
                n,
                state,
                value,
                0.0123 + 0.001 * n if done else None,
                params,
                None if state == "FAIL" else 12.5 * (n + 1),
                f"run{model}{n:02d}abcdef",
            )
        )
    return rows


def curves(n_epochs: int = 5) -> list[list[dict[str, float]]]:
    return [
        [
            {
                "train_loss": 1.0 / (e + 1) + 0.01 * k,
                "val_loss": 1.1 / (e + 1) + 0.02 * k,
                "val_accuracy": 0.6 + 0.06 * e - 0.01 * k,
                "lr": 0.01,
            }
            for e in range(n_epochs)
        ]
        for k in range(3)
    ]


@pytest.fixture(scope="module")
def inputs() -> ReportInputs:
    rng = np.random.default_rng(0)
    members = [
        {
            "name": name,
            "model": name.split("/")[0],
            "trial": int(name[-1]),
            "kind": "trial",
            "cv_score": cv,
            "oof": {"accuracy": cv, "log_loss": 1.2 - cv},
            "test": metrics(rng, acc),
        }
        for name, cv, acc in [
            ("cnn/trial-3", 0.951, 0.9400),
            ("cnn/trial-5", 0.948, 0.9375),
            ("mlp/trial-5", 0.921, 0.9125),
        ]
    ]
    names = [m["name"] for m in members]
    methods = {}
    for k, name in enumerate(METHODS):
        acc = 0.945 + 0.0025 * k
        methods[name] = {
            "members": names if name != "selection" else names[:2],
            "weights": [0.5, 0.3, 0.2]
            if name == "weighted"
            else ([0.5, 0.5] if k == 3 else [1 / 3] * 3),
            "oof": {"accuracy": 0.955 + 0.001 * k, "log_loss": 0.15 - 0.01 * k},
            "oof_cv": {"accuracy": 0.953 + 0.001 * k, "log_loss": 0.16 - 0.01 * k},
            "test": metrics(rng, acc),
            "vs_best_single": {
                "accuracy": {
                    "diff": acc - 0.94,
                    "ci_low": -0.01 + 0.004 * k,
                    "ci_high": 0.02 + 0.001 * k,
                },
                "log_loss": {"diff": -0.02 * k, "ci_low": -0.03 * k - 0.01, "ci_high": 0.005},
                "n_boot": 2000,
            },
            "mcnemar": {"b": 3 + k, "c": 7 + k, "p_value": 0.0312 / (k + 1) if k < 3 else 3e-5},
        }
    ensemble = {
        "fingerprint": "0f1e2d3c4b5a6978",
        "split_fingerprint": "ab12cd34",
        "test_evaluations": 1,
        "classes": CLASSES,
        "n_test": 120,
        "members": members,
        "best_single": "cnn/trial-3",
        "methods": methods,
        "chosen": "weighted",
        "final": {
            "method": "weighted",
            "temperature": 1.37,
            "test": metrics(rng, 0.9525),
            "reliability": reliability(-0.02),
            "best_single_reliability": reliability(-0.07),
        },
        "disagreement": {
            "members": names,
            "matrix": [[0, 0.04, 0.09], [0.04, 0, 0.08], [0.09, 0.08, 0]],
        },
        "misclassified": [
            {"row": 10 * i + 3, "true": i % 4, "pred": (i + 2) % 4, "confidence": 0.91 - 0.05 * i}
            for i in range(8)
        ],
    }
    models = [
        ModelSection(
            "mlp",
            "accuracy",
            "maximize",
            trials("mlp", 0.90, 1.0),
            {"lr": 0.61, "width": 0.27, "dropout": 0.12},
            {3: curves(), 5: curves()},
        ),
        ModelSection(
            "cnn",
            "log_loss",
            "minimize",
            trials("cnn", 0.30, -1.0),
            {"lr": 0.8, "optimizer": 0.2},
            {3: curves(), 5: curves()},
        ),
    ]
    config = {
        "name": "digits",
        "seed": 0,
        "cv": {"folds": 3},
        "train": {"epochs": 5, "lr": 3e-3},
        "models": {
            "cnn": {
                "params": {"width": 32},
                "space": {"lr": {"low": 1e-4, "high": 0.1, "log": True}},
            }
        },
    }
    return ReportInputs(
        study="digits",
        config=config,
        data_source="digits (1797 images)",
        in_shape=(1, 8, 8),
        classes=CLASSES,
        split={
            "train": 1677,
            "test": 120,
            "kind": "stratified",
            "fingerprint": "ab12cd34",
            "folds": 3,
        },
        stage_seconds={"search": 300.0, "ensemble": 20.0, "report": 2.0},
        tracking={
            "uri": "file:///tmp/mlruns",
            "experiment_id": "7",
            "ui_url": UI,
            "study_runs": {"mlp": "studymlp123456", "cnn": "studycnn123456"},
        },
        models=models,
        ensemble=ensemble,
        misclassified_images=rng.random((8, 8, 8)),
        created="2025-01-02T03:04:05",
    )


@pytest.fixture(scope="module")
def html(inputs: ReportInputs) -> str:
    return render_report(inputs)  # rendered once: the charts take a second or two


def texts(row: list[tuple[str, dict]]) -> list[str]:
    return [text for text, _ in row]


def test_every_section_heading_is_present(html: str) -> None:
    headings = Tables(html).headings
    for h in [
        *SECTIONS,
        *ENSEMBLE_HEADINGS,
        "Leaderboard",
        "Optimization history",
        "Hyperparameter importance",
        "Learning curves",
    ]:
        assert h in headings, f"missing section {h!r}; headings are {headings}"


# The tables as a reader sees them, written out by hand from the fixture's numbers: metrics to 4
# decimals, hyperparameters to 4 significant digits, times as "12.5 s" / "1 min 15 s", a dash
# for a missing value. (Not through the report's own formatting helpers: a bug there would pass.)
LR = ["0.001", "0.002344", "0.005495", "0.01288", "0.0302", "0.07079"]  # 10 ** (-3 + 0.37 n)
WIDTH = ["32", "64", "96", "128", "160", "192"]
DROPOUT = ["0", "–", "0.1", "0.15", "0.2", "0.25"]  # trial 1 has none
STD = ["0.0123", "0.0133", "–", "0.0153", "–", "0.0173"]  # complete trials only
TIME = ["12.5 s", "25.0 s", "37.5 s", "50.0 s", "–", "1 min 15 s"]
LEADERBOARDS = {  # model: (metric, CV values of trials 0-5)
    "mlp": ("accuracy", ["0.9000", "0.9110", "0.9220", "0.9330", "–", "0.9550"]),
    "cnn": ("log_loss", ["0.3000", "0.2890", "0.2780", "0.2670", "–", "0.2450"]),
}
STATES = ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE", "FAIL", "COMPLETE"]


def test_leaderboard_equals_the_trials(html: str) -> None:
    tables = Tables(html).tables
    for k, (model, (metric, values)) in enumerate(LEADERBOARDS.items(), start=1):
        header, *rows = tables[f"leaderboard-{k}"]
        assert texts(header) == [
            "#",
            "state",
            f"CV {metric}",
            "± std",
            "lr",  # parameters in order of first appearance
            "width",
            "optimizer",
            "dropout",
            "time",
            "MLflow run",
        ]
        expected = [
            # the last cell: the MLflow run id's first 8 characters
            [
                str(n),
                STATES[n],
                values[n],
                STD[n],
                LR[n],
                WIDTH[n],
                "<script>sgd",
                DROPOUT[n],
                TIME[n],
                f"run{model}{n:02d}",
            ]
            for n in range(6)
        ]
        got = [texts(r) for r in rows]
        # the best trial's state cell is marked: highest accuracy for mlp, lowest log loss for
        # cnn (trial 5 in both)
        assert got[5][1].startswith("COMPLETE") and "best" in got[5][1]
        assert [c for r in got[:5] for c in r if "best" in c] == []
        got[5][1] = "COMPLETE"
        assert got == expected
        sort = [row[2][1]["data-sort"] for row in rows]  # the raw value, sorted as a number
        assert sort == SORT_KEYS[model]
    assert "Best: trial 5 with 0.9550 ± 0.0173." in html


SORT_KEYS = {  # a failed trial's empty key sorts last
    "mlp": ["0.9", "0.911", "0.922", "0.933", "", "0.955"],
    "cnn": ["0.3", "0.289", "0.278", "0.267", "", "0.245"],
}


def f4(x: float) -> str:
    """What a metric cell shows, written with a plain f-string."""
    return f"{x:.4f}"


def test_ensemble_tables_equal_the_results(inputs: ReportInputs, html: str) -> None:
    ens = inputs.ensemble
    assert ens is not None
    tables = Tables(html).tables
    _, header, *rows = tables["methods"]  # a group row, then the column names
    assert texts(header)[:2] == ["method", "accuracy"]
    assert len(rows) == len(METHODS) + 1
    # method k: test accuracy 0.945 + 0.0025 k against the best single's 0.94; McNemar p
    # 0.0312 / (k + 1), the last < 1e-4
    diffs = ["+0.0050", "+0.0075", "+0.0100", "+0.0125"]
    cis = ["[-0.0100, +0.0200]", "[-0.0060, +0.0210]", "[-0.0020, +0.0220]", "[+0.0020, +0.0230]"]
    pvalues = ["0.0312", "0.0156", "0.0104", "< 0.0001"]
    for k, (name, row) in enumerate(zip(METHODS, rows, strict=False)):
        m, cells = ens["methods"][name], texts(row)
        assert cells[0].startswith(name.replace("_", " "))
        t = m["test"]
        assert cells[1:6] == [
            f4(0.945 + 0.0025 * k),
            f4(1.1 - (0.945 + 0.0025 * k)),
            f4(t["ece"]),
            f4(t["brier"]),
            f4(0.945 + 0.0025 * k - 0.004),
        ]
        assert cells[1] == ["0.9450", "0.9475", "0.9500", "0.9525"][k]
        assert cells[6:8] == [f4(0.953 + 0.001 * k), f4(0.16 - 0.01 * k)]
        assert cells[8] == f"{diffs[k]} {cis[k]}"
        assert cells[10] == f"{pvalues[k]} b {3 + k} / c {7 + k}"
    assert texts(rows[-1])[:2] == ["cnn/trial-3 best single", "0.9400"]
    # weights per method, members' test metrics
    w = {texts(r)[0]: texts(r)[1:] for r in tables["weights"][1:]}
    assert w == {
        "cnn/trial-3": ["0.333", "0.333", "0.500", "0.500"],
        "cnn/trial-5": ["0.333", "0.333", "0.300", "0.500"],
        "mlp/trial-5": ["0.333", "0.333", "0.200", ""],
    }
    members = {texts(r)[0].split()[0]: texts(r) for r in tables["members"][2:]}
    assert {name: (cells[4], cells[7]) for name, cells in members.items()} == {
        "cnn/trial-3": ("0.9510", "0.9400"),
        "cnn/trial-5": ("0.9480", "0.9375"),
        "mlp/trial-5": ("0.9210", "0.9125"),
    }
    recall = tables["recall"][1:]
    assert [texts(r)[1] for r in recall] == CLASSES
    assert [texts(r)[3] for r in recall] == [
        f4(x) for x in ens["final"]["test"]["per_class_recall"]
    ]


def test_chosen_method_and_headline(html: str) -> None:
    parsed = Tables(html)
    chosen = [a for a in parsed.rows_attrs["methods"] if "chosen" in (a.get("class") or "")]
    assert [a["data-method"] for a in chosen] == ["weighted"]
    assert html.count('class="badge chosen"') == 1
    card = html[html.index('id="headline-accuracy"') : html.index('id="headline-log_loss"')]
    # the final (weighted) ensemble's 0.9525, its +0.01 over the best single's 0.94, CI
    # [-0.002, +0.022]
    assert "0.9525" in card and "best single: 0.9400" in card
    assert '+0.0100 <br><span class="ci">[-0.0020' in card
    assert "T = 1.370" in html


def test_user_text_is_escaped(html: str) -> None:
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<img src=x onerror" not in html
    assert "&lt;script&gt;sgd" in html and "<script>sgd" not in html
    assert "bird &amp; fish" in html
    # the only scripts: the one sorting script, allowed by hash in the CSP
    assert html.count("<script") == 1 and "script-src 'sha256-" in html
    assert not re.search(
        r"\son[a-z]+\s*=", html.replace(XSS.replace("<", "&lt;").replace(">", "&gt;"), "")
    )


def test_only_the_mlflow_link_leaves_the_file(inputs: ReportInputs, html: str) -> None:
    external = re.findall(r"""(?:src|href|xlink:href)\s*=\s*["']?((?:https?:)?//[^"'\s>]*)""", html)
    assert external and all(u == UI or u.startswith(UI + "/#/") for u in external), external
    attrs = re.findall(r"""<(\w+)\b[^>]*?\s([\w:-]+)=["']?(?:https?:)?//""", html)
    fetched = {(tag, a) for tag, a in attrs if not a.startswith("xmlns")}  # namespaces: names only
    assert fetched == {("a", "href")}, attrs  # URLs only in links, never src=
    assert f'href="{UI}/#/experiments/7/runs/runmlp05abcdef"' in html
    assert not re.search(r"<link\b|@import|url\(\s*['\"]?(https?:)?//", html)
    assert re.findall(r'<img src="([^:]+):', html) == ["data"] * 8
    # a ui_url that is not http(s) is never a link
    tracking = {**(inputs.tracking or {}), "ui_url": "javascript:alert(1)"}
    bad = ReportInputs(**{**inputs.__dict__, "tracking": tracking, "models": [], "ensemble": None})
    assert "javascript:" not in render_report(bad)


def test_missing_inputs_say_so_in_one_line(inputs: ReportInputs) -> None:
    mlp = inputs.models[0]
    bare = ModelSection("mlp", "accuracy", "maximize", mlp.trials[4:5], {}, {})  # one failed trial
    html = render_report(
        ReportInputs(
            **{
                **inputs.__dict__,
                "ensemble": None,
                "tracking": None,
                "misclassified_images": None,
                "models": [bare],
            }
        )
    )
    assert "No ensemble results yet" in html and "No learning curves" in html
    assert "No importances" in html and "No completed or pruned trial" in html
    assert "tracking was off" in html and "http://" not in html
    assert [h for h in Tables(html).headings if h in SECTIONS] == [
        "Summary",
        "Headline",
        "Model mlp",
        "Ensembles",
    ]
    no_images = render_report(
        ReportInputs(**{**inputs.__dict__, "misclassified_images": None, "models": []})
    )
    assert "images were not passed" in no_images and "<img" not in no_images
    assert "No studies" in no_images


def test_files_left_out_are_listed(inputs: ReportInputs) -> None:
    assert "Files left out" not in render_report(inputs)
    skipped = [f"photos/cat/{i}.jpg: cannot be decoded (<broken & odd>)" for i in range(23)]
    html = render_report(ReportInputs(**{**inputs.__dict__, "skipped_files": skipped}))
    assert "23 could not be decoded" in html
    assert "<code>photos/cat/0.jpg: cannot be decoded (&lt;broken &amp; odd&gt;)</code>" in html
    assert "photos/cat/19.jpg" in html and "photos/cat/20.jpg" not in html
    assert "and 3 more" in html


def test_write_report_is_atomic_small_and_pure(inputs: ReportInputs, tmp_path: Path) -> None:
    path = tmp_path / "reports" / "digits.html"
    path.parent.mkdir()
    path.write_text("old")
    assert write_report(inputs, path) == path
    assert [p.name for p in path.parent.iterdir()] == ["digits.html"]  # no temp file left
    assert path.read_text("utf-8").startswith("<!DOCTYPE html>")
    assert path.stat().st_size < 10 * 2**20
    assert path.stat().st_mode & 0o777 == 0o644
    assert "[models.cnn.space]" in path.read_text("utf-8")  # the study file, TOML-ish
    heavy = "{'torch', 'optuna', 'mlflow'}"
    code = f"import sys, workbench.report; print(sorted({heavy} & set(sys.modules)))"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        == "[]\n"
    )


# -- headless Chromium ----------------------------------------------------------------------------
# The page's console messages reach Chromium's log on stderr as `INFO:CONSOLE:1] "text", source:`
# (console.error included, so any console line counts); its network requests reach the NetLog.

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]


def chromium(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str], list[str]]:
    """Run Chromium; return the run, the page's console lines, the URLs the page fetched.
    A missing browser fails the test (not a skip: CI must not pass without rendering)."""
    if not CHROMIUM.exists():
        pytest.fail(f"no {CHROMIUM}: install Debian's chromium (`make system-deps` does)")
    netlog = tmp / "netlog.json"
    cmd = [
        str(CHROMIUM),
        *FLAGS,
        f"--user-data-dir={tmp / 'profile'}",
        f"--log-net-log={netlog}",
        *args,
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    log = json.loads(netlog.read_text("utf-8"))
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    requests = [e.get("params", {}) for e in log["events"] if e["type"] == start]
    fetched = [
        p["url"]
        for p in requests
        # the browser's own pings (updates, accounts) have no origin; the page's requests do
        if p.get("url")
        and p.get("initiator") != "not an origin"
        and not p["url"].startswith(("file:", "data:"))
    ]
    return run, console, fetched


def test_browser_renders_offline_without_errors(inputs: ReportInputs, tmp_path: Path) -> None:
    page = write_report(inputs, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    run, console, fetched = chromium(
        tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", "--dump-dom", page.as_uri()
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert 'data-sortable-ready="6"' in run.stdout, "the sorting script did not run"
    assert console == [], console  # no uncaught error, no CSP violation, no log at all
    assert fetched == [], fetched
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a drawn page, not a blank one


def test_browser_sorts_numbers_as_numbers(tmp_path: Path) -> None:
    # The report's script on a small table; a second script clicks headers and writes the order
    # into the DOM. Its deliberate error and the external image prove the checks above can fail.
    script = (Path(__file__).parents[1] / "workbench/report/templates/sortable.js").read_text()
    rows = [("10", "trial-10"), ("", "none"), ("9.5", "trial-9"), ("-2", "b")]
    page = tmp_path / "sort.html"
    page.write_text(
        "<!DOCTYPE html><html><body><img src='http://example.invalid/x.png'>"
        "<table class='sortable'><thead><tr><th>v</th><th>name</th></tr></thead><tbody>"
        + "".join(f"<tr><td data-sort='{v}'>{v or '–'}</td><td>{n}</td></tr>" for v, n in rows)
        + f"</tbody></table><script>{script}</script><script>"
        "var th = document.querySelectorAll('th'), out = [];"
        "function order() { return Array.from(document.querySelectorAll('tbody td:nth-child(2)'))"
        ".map(function (c) { return c.textContent; }).join(','); }"
        "th[0].click(); out.push(order()); th[0].click(); out.push(order());"
        "th[1].click(); out.push(order());"
        "document.body.setAttribute('data-order', out.join('|')); null.boom;"
        "</script></body></html>",
        "utf-8",
    )
    run, console, fetched = chromium(tmp_path, "--dump-dom", page.as_uri())
    order = re.search(r'data-order="([^"]*)"', run.stdout)
    assert order, run.stdout[-2000:]
    # numbers ascending, then descending, empty cells last both times; names in natural order
    assert order[1].split("|") == [
        "b,trial-9,trial-10,none",
        "trial-10,trial-9,b,none",
        "b,none,trial-9,trial-10",
    ]
    assert any("Uncaught TypeError" in line for line in console), run.stderr[-2000:]
    assert fetched == ["http://example.invalid/x.png"]
