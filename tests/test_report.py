"""The HTML report: content equals the inputs, user text is escaped, the file is self-contained.

The fixture is a hand-built study (2 models x 6 trials incl. pruned and failed, curves, a full
EnsembleResult with a ladder of 7 rungs, costs and a choice, 3 looks at the test split, 8
misclassified 8x8 images, a class name and a look that are XSS attempts).
The browser tests load the written file in headless Chromium (a missing browser fails them).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html import unescape
from pathlib import Path

import numpy as np
import pytest
from conftest import Tables

from workbench.report import ModelSection, ReportInputs, TrialRow, render_report, write_report
from workbench.results import (
    Choice,
    Cost,
    Disagreement,
    EnsembleResult,
    FinalResult,
    Interval,
    MemberResult,
    MethodResult,
    Misclassified,
    OofScores,
    Paired,
    Reliability,
    Rule,
    Rung,
    Scores,
    Spread,
    TestLook,
)

XSS = "<img src=x onerror=alert(1)>"
CLASSES = ["cat", "dog", XSS, "bird & fish"]
UI = "http://127.0.0.1:5000"
METHODS = ["soft_voting", "hard_voting", "weighted", "selection"]
SECTIONS = ["Summary", "Headline", "Model mlp", "Model cnn", "Ensembles"]
ENSEMBLE_HEADINGS = [
    "The ladder: what each step buys, and what it costs",
    "Methods against the k-fold bag",
    "Members and weights",
    "Members on the test split",
    "Pairwise disagreement",
    "Reliability",
    "Confusion matrix",
    "Per-class recall",
    "Misclassified test images",
]
CHROMIUM = Path("/usr/bin/chromium")
ADDS = {  # each rung's one sentence: what it adds to the rung below
    "one network": "One trained network of the best configuration: the baseline.",
    "k-fold bag": "Averages the fold models cross-validation already trained: k times the cost.",
    "soft_voting": "The plain mean of every member's probabilities.",
    "hard_voting": "A majority vote of the members' labels, its shares temperature-calibrated.",
    "weighted": "Member weights fit on OOF rows to minimise log loss.",
    "selection": "Greedy selection on OOF rows: members added, with repeats, while they help.",
    "final": "What ships, temperature-scaled on OOF rows: weights & T < 2 fit once.",
}
OOF_CV_LOSS = [0.16, 0.15, 0.13, 0.14]  # weighted is the best combiner by OOF-CV log loss
NETWORK = {"accuracy": 0.93, "macro_f1": 0.926, "log_loss": 0.17, "brier": 0.1, "ece": 0.025}
FINAL = {"accuracy": 0.95, "macro_f1": 0.9461, "log_loss": 0.1125, "brier": 0.0701, "ece": 0.0123}
FINAL_CM = [[29, 1, 0, 0], [1, 28, 1, 0], [0, 1, 29, 0], [1, 0, 1, 28]]
SHIPS_REASON = (
    "weighted's out-of-fold log loss against cnn/trial-3 alone is -0.0120 nats a row (95 % CI "
    "-0.0200 to -0.0040): better by more than the noise, so the ensemble ships"
)
ALONE_REASON = (
    "weighted's out-of-fold log loss against cnn/trial-3 alone is -0.0030 nats a row (95 % CI "
    "-0.0090 to +0.0020): within the noise, so the best member ships alone"
)
LOOKS = [  # every look at the test split, by any command (one is an XSS attempt)
    TestLook(time="2025-01-01T10:00:00", command="ensemble", what="3 members, 4 methods", rows=120),
    TestLook(
        time="2025-01-01T11:30:00",
        command="export --quantize",
        what="the <script>int8</script> graph",
        rows=120,
        accuracy=0.9417,
    ),
    TestLook(
        time="2025-01-02T09:15:00",
        command="predict",
        what="the final model",
        rows=120,
        accuracy=0.95,
    ),
]


def metrics(rng: np.random.Generator, acc: float, confusion: bool = True) -> Scores:
    recall = [round(float(x), 4) for x in np.clip(acc + rng.normal(0, 0.03, 4), 0, 1)]
    counts = [[25 if i == j else int(rng.integers(0, 3)) for j in range(4)] for i in range(4)]
    return Scores(
        accuracy=acc,
        macro_f1=acc - 0.004,
        log_loss=1.1 - acc,
        brier=round(1.4 * (1.0 - acc), 5),
        ece=round(0.05 * (1.0 - acc) + 0.01, 5),
        per_class_recall=recall,
        confusion=counts if confusion else None,
    )


def reliability(shift: float) -> Reliability:
    conf = [None] * 7 + [0.5 + 0.0625 * k for k in range(8)]
    return Reliability(
        edges=[k / 15 for k in range(16)],
        confidence=conf,
        accuracy=[None if c is None else min(1.0, c + shift) for c in conf],
        count=[0] * 7 + [2, 3, 4, 6, 9, 15, 25, 36],
    )


def paired(against: str, acc: tuple, loss: tuple, mc: tuple | None = None) -> Paired:
    """A against `against`: (diff, ci_low, ci_high) of accuracy and log loss, McNemar (b, c, p)."""
    b, c, p = mc or (None, None, None)
    return Paired(
        against=against,
        accuracy=Interval(diff=acc[0], ci_low=acc[1], ci_high=acc[2]),
        log_loss=Interval(diff=loss[0], ci_low=loss[1], ci_high=loss[2]),
        mcnemar_b=b,
        mcnemar_c=c,
        mcnemar_p=p,
        n_boot=2000,
        seed=0,
    )


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
        MemberResult(
            name=name,
            model=name.split("/")[0],
            trial=int(name[-1]),
            kind="trial",
            cv_score=cv,
            oof=OofScores(accuracy=cv, log_loss=1.2 - cv),
            test=metrics(rng, acc),
            cost=Cost(networks=3, ms_per_image=ms, parameters=params, bytes=4 * params),
        )
        for name, cv, acc, ms, params in [
            ("cnn/trial-3", 0.951, 0.9400, 1.236, 360_000),
            ("cnn/trial-5", 0.948, 0.9375, 0.9, 240_000),
            ("mlp/trial-5", 0.921, 0.9125, 0.3, 150_000),
        ]
    ]
    names = [m.name for m in members]
    methods = {}
    for k, name in enumerate(METHODS):
        acc = 0.945 + 0.0025 * k
        methods[name] = MethodResult(
            name=name,
            members=names if name != "selection" else names[:2],
            weights=[0.5, 0.3, 0.2]
            if name == "weighted"
            else ([0.5, 0.5] if k == 3 else [1 / 3] * 3),
            oof=OofScores(accuracy=0.955 + 0.001 * k, log_loss=0.15 - 0.01 * k),
            oof_cv=OofScores(accuracy=0.953 + 0.001 * k, log_loss=OOF_CV_LOSS[k]),
            test=metrics(rng, acc),
        )
    net = Scores(**{**NETWORK, "per_class_recall": [0.93] * 4, "confusion": None})
    ladder = [
        Rung(
            name="one network",
            kind="network",
            label="cnn/trial-3: each of its 3 fold models alone (mean over folds)",
            adds=ADDS["one network"],
            test=net,
            spread=Spread(accuracy=(0.9167, 0.9417), log_loss=(0.15, 0.19)),
            cost=Cost(networks=1, ms_per_image=0.412, parameters=120_000, bytes=480_000),
        ),
        Rung(
            name="k-fold bag",
            kind="bag",
            label="cnn/trial-3: the mean of its 3 fold models (the best member by CV score)",
            adds=ADDS["k-fold bag"],
            test=members[0].test,
            vs_below=paired("one network", (0.01, 0.0025, 0.0175), (-0.03, -0.05, -0.01)),
            vs_network=paired("one network", (0.01, 0.0025, 0.0175), (-0.03, -0.05, -0.01)),
            cost=members[0].cost,
        ),
    ]
    for k, name in enumerate(METHODS):
        acc = 0.945 + 0.0025 * k
        ladder.append(
            Rung(
                name=name,
                kind="combiner",
                label=f"{name} over 3 members",
                adds=ADDS[name],
                test=methods[name].test,
                vs_below=paired(
                    "k-fold bag",
                    (acc - 0.94, -0.01 + 0.004 * k, 0.02 + 0.001 * k),
                    (-0.02 * k, -0.03 * k - 0.01, 0.005),
                    (7 + k, 3 + k, 0.0312 / (k + 1) if k < 3 else 3e-5),
                ),
                vs_network=paired("one network", (acc - 0.93, 0.004, 0.03), (-0.05, -0.08, -0.02)),
                cost=None  # unmeasured: dashes
                if name == "hard_voting"
                else Cost(
                    networks=6 if k == 3 else 9,
                    ms_per_image=2.136 if k == 3 else 12.436,
                    parameters=600_000 if k == 3 else 1_234_567,
                    bytes=2_400_000 if k == 3 else 4_938_268,
                ),
            )
        )
    final_test = Scores(
        **{**FINAL, "per_class_recall": [0.96, 0.92, 0.97, 0.95]}, confusion=FINAL_CM
    )
    ladder.append(
        Rung(
            name="final",
            kind="final",
            label="weighted ensemble, temperature-scaled (T = 1.37)",
            adds=ADDS["final"],
            test=final_test,
            vs_below=paired("weighted", (0.0, 0.0, 0.0), (-0.008, -0.015, -0.002), (0, 0, 1.0)),
            vs_network=paired("one network", (0.02, 0.005, 0.035), (-0.058, -0.09, -0.03)),
            cost=ladder[4].cost,
        )
    )
    ensemble = EnsembleResult(
        fingerprint="0f1e2d3c4b5a6978",
        split_fingerprint="ab12cd34",
        test_evaluations=1,
        reused=False,
        classes=CLASSES,
        n_test=120,
        folds=3,
        seconds=20.0,
        members=members,
        best_single="cnn/trial-3",
        methods=methods,
        choice=Choice(
            shipped="weighted",
            alone=False,
            best_method="weighted",
            best_member="cnn/trial-3",
            oof_vs_member=Interval(diff=-0.012, ci_low=-0.02, ci_high=-0.004),
            reason=SHIPS_REASON,
        ),
        final=FinalResult(
            method="weighted",
            rule=Rule(vote="soft", weights=[0.5, 0.3, 0.2], temperature=1.37),
            test=final_test,
            vs_bag=paired(
                "k-fold bag", (0.01, -0.002, 0.022), (-0.045, -0.07, -0.02), (4, 2, 0.69)
            ),
            reliability=reliability(-0.02),
            bag_reliability=reliability(-0.07),
        ),
        ladder=ladder,
        disagreement=Disagreement(
            members=names, matrix=[[0, 0.04, 0.09], [0.04, 0, 0.08], [0.09, 0.08, 0]]
        ),
        misclassified=[
            Misclassified(row=10 * i + 3, true=i % 4, pred=(i + 2) % 4, confidence=0.91 - 0.05 * i)
            for i in range(8)
        ],
    )
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
        test_looks=LOOKS,
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
    # method k: test accuracy 0.945 + 0.0025 k against the bag's 0.94; McNemar p
    # 0.0312 / (k + 1), the last < 1e-4; b = 7 + k rows only the method gets right
    diffs = ["+0.0050", "+0.0075", "+0.0100", "+0.0125"]
    cis = ["[-0.0100, +0.0200]", "[-0.0060, +0.0210]", "[-0.0020, +0.0220]", "[+0.0020, +0.0230]"]
    pvalues = ["0.0312", "0.0156", "0.0104", "< 0.0001"]
    for k, (name, row) in enumerate(zip(METHODS, rows, strict=False)):
        t, cells = ens.methods[name].test, texts(row)
        assert cells[0].startswith(name.replace("_", " "))
        assert cells[1:6] == [
            f4(0.945 + 0.0025 * k),
            f4(1.1 - (0.945 + 0.0025 * k)),
            f4(t.ece),
            f4(t.brier),
            f4(0.945 + 0.0025 * k - 0.004),
        ]
        assert cells[1] == ["0.9450", "0.9475", "0.9500", "0.9525"][k]
        assert cells[6:8] == [f4(0.953 + 0.001 * k), f4(OOF_CV_LOSS[k])]
        assert cells[8] == f"{diffs[k]} {cis[k]}"
        assert cells[10] == f"{pvalues[k]} b {7 + k} / c {3 + k}"
    assert texts(rows[-1])[:2] == ["cnn/trial-3 k-fold bag", "0.9400"]
    assert texts(rows[-1])[6:8] == ["0.9510", "0.2490"]  # the best member's plain OOF scores
    # weights per method and the shipped rule's; a member outside selection's ensemble is blank
    w = {texts(r)[0]: texts(r)[1:] for r in tables["weights"][1:]}
    assert texts(tables["weights"][0]) == [
        "member",
        *[m.replace("_", " ") for m in METHODS],
        "final",
    ]
    assert w == {
        "cnn/trial-3": ["0.333", "0.333", "0.500", "0.500", "0.500"],
        "cnn/trial-5": ["0.333", "0.333", "0.300", "0.500", "0.300"],
        "mlp/trial-5": ["0.333", "0.333", "0.200", "", "0.200"],
    }
    members = {texts(r)[0].split()[0]: texts(r) for r in tables["members"][2:]}
    assert {name: (cells[4], cells[7], *cells[12:]) for name, cells in members.items()} == {
        "cnn/trial-3": ("0.9510", "0.9400", "1.236", "360,000", "1.44"),
        "cnn/trial-5": ("0.9480", "0.9375", "0.900", "240,000", "0.96"),
        "mlp/trial-5": ("0.9210", "0.9125", "0.300", "150,000", "0.60"),
    }
    recall = tables["recall"][1:]
    assert [texts(r)[1] for r in recall] == CLASSES
    assert [texts(r)[3:5] for r in recall] == [
        [f4(f), f4(b)]
        for f, b in zip([0.96, 0.92, 0.97, 0.95], ens.members[0].test.per_class_recall, strict=True)
    ]
    assert [texts(r)[2] for r in recall] == ["30", "30", "30", "30"]  # the final's confusion rows


# The ladder as a reader sees it, written out by hand from the fixture: rung name (and badge),
# then accuracy (one network: with its lowest and highest fold), log loss, ECE, Brier, macro-F1,
# Δ accuracy and Δ log loss vs the rung below, the verdict, Δ accuracy and Δ log loss vs one
# network, ms per image (the networks run below it), parameters, MB.
LADDER = [
    ["one network", "0.9300 folds 0.9167 to 0.9417", "0.1700 folds 0.1500 to 0.1900", "0.0250",
     "0.1000", "0.9260", "–", "–", "–", "–", "–", "0.412 1 network", "120,000", "0.48"],
    ["k-fold bag", "0.9400", "0.1600", "0.0130", "0.0840", "0.9360",
     "+0.0100 [+0.0025, +0.0175]", "-0.0300 [-0.0500, -0.0100]",
     "vs one network: better accuracy, better log loss",
     "+0.0100 [+0.0025, +0.0175]", "-0.0300 [-0.0500, -0.0100]",
     "1.236 3 networks", "360,000", "1.44"],
    ["soft voting", "0.9450", "0.1550", "0.0127", "0.0770", "0.9410",
     "+0.0050 [-0.0100, +0.0200]", "+0.0000 [-0.0100, +0.0050]",
     "vs k-fold bag: no clear difference (CIs include 0)",
     "+0.0150 [+0.0040, +0.0300]", "-0.0500 [-0.0800, -0.0200]",
     "12.4 9 networks", "1,234,567", "4.94"],
    ["hard voting", "0.9475", "0.1525", "0.0126", "0.0735", "0.9435",
     "+0.0075 [-0.0060, +0.0210]", "-0.0200 [-0.0400, +0.0050]",
     "vs k-fold bag: no clear difference (CIs include 0)",
     "+0.0175 [+0.0040, +0.0300]", "-0.0500 [-0.0800, -0.0200]",
     "–", "–", "–"],
    ["weighted", "0.9500", "0.1500", "0.0125", "0.0700", "0.9460",
     "+0.0100 [-0.0020, +0.0220]", "-0.0400 [-0.0700, +0.0050]",
     "vs k-fold bag: no clear difference (CIs include 0)",
     "+0.0200 [+0.0040, +0.0300]", "-0.0500 [-0.0800, -0.0200]",
     "12.4 9 networks", "1,234,567", "4.94"],
    ["selection", "0.9525", "0.1475", "0.0124", "0.0665", "0.9485",
     "+0.0125 [+0.0020, +0.0230]", "-0.0600 [-0.1000, +0.0050]",
     "vs k-fold bag: better accuracy; log loss within the noise",
     "+0.0225 [+0.0040, +0.0300]", "-0.0500 [-0.0800, -0.0200]",
     "2.136 6 networks", "600,000", "2.40"],
    ["final ships", "0.9500", "0.1125", "0.0123", "0.0701", "0.9461",
     "+0.0000 [+0.0000, +0.0000]", "-0.0080 [-0.0150, -0.0020]",
     "vs weighted: better log loss; accuracy within the noise",
     "+0.0200 [+0.0050, +0.0350]", "-0.0580 [-0.0900, -0.0300]",
     "12.4 9 networks", "1,234,567", "4.94"],
]  # fmt: skip
RUNG_LABELS = [
    "cnn/trial-3: each of its 3 fold models alone (mean over folds)",
    "cnn/trial-3: the mean of its 3 fold models (the best member by CV score)",
    *[f"{m} over 3 members" for m in METHODS],
    "weighted ensemble, temperature-scaled (T = 1.37)",
]


def ladder_rows(html: str) -> list[tuple[list[str], str]]:
    """The ladder table's body: each rung's row of figures, and the line under it (its label and
    the one sentence of what it adds)."""
    _, header, *rows = Tables(html).tables["ladder"]
    assert texts(header)[:2] == ["rung", "accuracy"] and len(texts(header)) == 14
    assert len(rows) % 2 == 0
    return [(texts(f), texts(a)[0]) for f, a in zip(rows[::2], rows[1::2], strict=True)]


def check_ladder(html: str) -> None:
    rows = ladder_rows(html)
    assert [cells for cells, _ in rows] == LADDER
    rungs = ["one network", "k-fold bag", *METHODS, "final"]
    for (_, under), label, rung in zip(rows, RUNG_LABELS, rungs, strict=True):
        assert under == f"{label}. {ADDS[rung]}"


def test_ladder_shows_every_rung_its_figures_and_what_it_adds(html: str) -> None:
    check_ladder(html)
    attrs = Tables(html).rows_attrs["ladder"][2:]
    assert [a["data-rung"] for a in attrs if "chosen" in a["class"]] == ["final", "final"]
    assert "weights &amp; T &lt; 2 fit once" in html  # the adds sentence, escaped


def shipped(html: str) -> str:
    """The headline's sentence of what shipped and why, as text (tags dropped, entities read)."""
    m = re.search(r'<p id="shipped">(.*?)</p>', html, re.S)
    assert m, "no shipped sentence"
    return unescape(" ".join(re.sub(r"<[^>]+>", "", m[1]).split()))


def test_headline_says_what_shipped_and_why(inputs: ReportInputs, html: str) -> None:
    assert shipped(html) == (
        "What ships: the weighted ensemble of 3 members, temperature-scaled (T = 1.370), rather "
        f"than the best member, cnn/trial-3, alone. Why: {SHIPS_REASON}."
    )
    parsed = Tables(html)
    chosen = [a for a in parsed.rows_attrs["methods"] if "chosen" in (a.get("class") or "")]
    assert [a["data-method"] for a in chosen] == ["weighted"]  # the best combiner, which ships
    assert html.count('<span class="badge chosen">ships</span>') == 2  # methods and ladder
    card = html[html.index('id="headline-accuracy"') : html.index('id="headline-log_loss"')]
    # the final (weighted) model's 0.95, its +0.01 over the bag's 0.94, CI [-0.002, +0.022]
    assert "0.9500" in card and "k-fold bag: 0.9400" in card
    assert '+0.0100 <br><span class="ci">[-0.0020' in card
    assert "no clear difference (CI includes 0)" in card


def test_headline_counts_and_lists_the_looks_at_the_test_split(inputs: ReportInputs) -> None:
    html = render_report(ReportInputs(**{**inputs.__dict__, "models": []}))
    # three looks in the log, though the stored result counted one when it was made
    assert "has been looked at <strong>3 times</strong> so far" in html
    rows = [texts(r) for r in Tables(html).tables["test-looks"][1:]]
    assert rows == [
        ["1", "2025-01-01T10:00:00", "ensemble", "3 members, 4 methods", "120", "–"],
        ["2", "2025-01-01T11:30:00", "export --quantize", "the <script>int8</script> graph",
         "120", "0.9417"],
        ["3", "2025-01-02T09:15:00", "predict", "the final model", "120", "0.9500"],
    ]  # fmt: skip
    assert "the &lt;script&gt;int8&lt;/script&gt; graph" in html
    # no log passed: the result's own count, and no list
    bare = render_report(ReportInputs(**{**inputs.__dict__, "models": [], "test_looks": []}))
    assert "has been looked at <strong>1 time</strong> so far" in bare
    assert 'id="test-looks"' not in bare


def alone(ens: EnsembleResult) -> EnsembleResult:
    """The same study where the best combiner's OOF edge is noise: the best member ships alone."""
    final_rung = ens.ladder[-1].model_copy(
        update={
            "label": "cnn/trial-3 alone, temperature-scaled (T = 1.37)",
            "vs_below": paired("k-fold bag", (0.0, 0.0, 0.0), (-0.004, -0.009, 0.001), (0, 0, 1.0)),
        }
    )
    choice = ens.choice.model_copy(
        update={
            "shipped": "cnn/trial-3",
            "alone": True,
            "oof_vs_member": Interval(diff=-0.003, ci_low=-0.009, ci_high=0.002),
            "reason": ALONE_REASON,
        }
    )
    rule = Rule(vote="soft", weights=[1.0, 0.0, 0.0], temperature=1.37)
    final = ens.final.model_copy(update={"method": "cnn/trial-3", "rule": rule})
    return ens.model_copy(
        update={"choice": choice, "final": final, "ladder": [*ens.ladder[:-1], final_rung]}
    )


def test_headline_says_when_the_best_member_ships_alone(inputs: ReportInputs) -> None:
    assert inputs.ensemble is not None
    study = ReportInputs(**{**inputs.__dict__, "models": [], "ensemble": alone(inputs.ensemble)})
    html = render_report(study)
    assert shipped(html) == (
        "What ships: the best member alone, cnn/trial-3 (the mean of its 3 fold models, "
        "temperature-scaled, T = 1.370). "
        f"Why: {ALONE_REASON}."
    )
    assert "ships only when the 95 % paired-bootstrap CI of its per-row out-of-fold" in html
    final, under = ladder_rows(html)[-1]
    assert final[0] == "final ships" and under.startswith("cnn/trial-3 alone, temperature-scaled")
    assert final[8] == "vs k-fold bag: no clear difference (CIs include 0)"
    # the best combiner is marked, not as shipping; no method row is the chosen one
    assert texts(Tables(html).tables["methods"][2 + 2])[0] == "weighted best OOF-CV"
    assert html.count('<span class="badge chosen">ships</span>') == 1  # the ladder's final
    assert texts(Tables(html).tables["weights"][1])[-1] == "1.000"


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
    check_ladder(run.stdout)  # the ladder as Chromium parsed it: every rung, figure and sentence
    assert shipped(run.stdout).startswith("What ships: the weighted ensemble of 3 members")
    assert "has been looked at <strong>3 times</strong> so far" in run.stdout
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
