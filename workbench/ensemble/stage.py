"""The ensembling stage: fit combiners on out-of-fold rows, choose one, score the test split once.

1. Members' OOF probabilities, shape (members, training rows, classes), are the only thing any
   combiner is fit on. Each method is also cross-validated over the OOF rows, in the study's
   `cv.folds` stratified folds (fewer when a class has fewer rows, so every fold holds every
   class): that estimate, not the test set, chooses the final method.
2. The held-out test split is looked at here, once: every member, every method and the best
   single member (best CV score) are scored together, on the members' test probabilities that
   the caller's `predict` gives (member inference is workbench/infer.py; this module works on
   arrays and imports no torch). The result is stored with a fingerprint of its inputs;
   rerunning on unchanged inputs reuses it without calling `predict`, and every test evaluation
   is counted.
3. The final rule (results["final"]["rule"]: vote, weights, temperature) is what the export stage
   packages (workbench/export.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import KFold, StratifiedKFold

from workbench import evaluate
from workbench.config import EnsembleConfig
from workbench.ensemble.combiners import TemperatureScaling, make_combiner
from workbench.ensemble.members import Member
from workbench.ensemble.rule import combiner_state
from workbench.errors import WorkbenchError
from workbench.files import atomic_write

MISCLASSIFIED_SHOWN = 64  # the report's grid of misclassified test images


@dataclass(frozen=True)
class HeldOut:
    y: np.ndarray  # (rows,) labels of the test split
    classes: list[str]
    split_fingerprint: str


def _combiner(name: str, cfg: EnsembleConfig, seed: int) -> Any:
    kwargs: dict[str, Any] = {}
    if name == "selection":
        kwargs = {
            "iterations": cfg.selection_iterations,
            "init": cfg.selection_init,
            "bags": cfg.selection_bags,
            "random_state": seed,
        }
    return make_combiner(name, **kwargs)


def cross_validated(
    combiner: Any, P: np.ndarray, y: np.ndarray, seed: int, folds: int = 5
) -> dict[str, float]:
    """The combiner's OOF-row estimate: fit on k-1 folds of the rows, predict the k-th, k times."""
    out = np.zeros(P.shape[1:])
    for fit_rows, held in _folds(y, folds, seed):
        out[held] = clone(combiner).fit(P[:, fit_rows], y[fit_rows]).predict_proba(P[:, held])
    return evaluate.scores(out, y)


def _folds(y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds, at most as many as the smallest class has rows: scikit-learn warns
    (and a fold lacks that class) otherwise. A class with a single row: plain k-fold."""
    smallest = int(np.unique(y, return_counts=True)[1].min())
    k = max(2, min(folds, smallest))
    splitter = StratifiedKFold if smallest >= k else KFold
    return list(splitter(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def fingerprint(members: list[Member], cfg: EnsembleConfig, test: HeldOut) -> str:
    h = hashlib.sha256(cfg.model_dump_json().encode() + test.split_fingerprint.encode())
    for m in members:
        h.update(m.name.encode())
        h.update(np.ascontiguousarray(m.oof).tobytes())
    return h.hexdigest()[:16]


def run_ensemble(
    members: list[Member],
    y_train: np.ndarray,
    test: HeldOut,
    cfg: EnsembleConfig,
    out: Path,
    seed: int,
    predict: Callable[[], np.ndarray],
    metric: str = "accuracy",
    folds: int = 5,
) -> dict[str, Any]:
    """Fit, choose, evaluate once; returns (and stores) the results. `predict()` gives the
    members' test probabilities (members, test rows, classes); it is called only when the
    stored evaluation cannot be reused. `folds`: the study's cv.folds, for choosing a method."""
    if not members:
        raise WorkbenchError("no completed trials to ensemble: run the search first")
    key = fingerprint(members, cfg, test)
    stored = out / "results.json"
    if stored.exists():
        previous = json.loads(stored.read_text())
        if previous.get("fingerprint") == key:
            return {**previous, "reused": True}
    t0 = time.perf_counter()
    P = np.stack([m.oof for m in members])
    fitted: dict[str, Any] = {}
    methods: dict[str, dict[str, Any]] = {}
    for name in cfg.methods:  # 1) fit on OOF rows only
        comb = _combiner(name, cfg, seed)
        fitted[name] = comb.fit(P, y_train)
        methods[name] = {
            "members": [m.name for m in members],
            "weights": [float(w) for w in comb.weights_],
            "oof": evaluate.scores(comb.predict_proba(P), y_train),
            "oof_cv": cross_validated(comb, P, y_train, seed, folds),
        }
    chosen = min(methods, key=lambda n: methods[n]["oof_cv"]["log_loss"])
    final = fitted[chosen]
    if cfg.temperature:
        final = TemperatureScaling(_combiner(chosen, cfg, seed)).fit(P, y_train)
    # 2) the one look at the test split
    P_test = predict()
    count = _count_test_evaluation(out, key)
    results = _score(
        members, y_train, methods, fitted, chosen, final, P_test, test, cfg, seed, metric
    )
    results.update(
        {
            "fingerprint": key,
            "split_fingerprint": test.split_fingerprint,
            "test_evaluations": count,
            "chosen": chosen,
            "reused": False,
            "classes": test.classes,
            "n_test": len(test.y),
            "seconds": time.perf_counter() - t0,
        }
    )
    results["final"]["rule"] = combiner_state(final)
    atomic_write(stored, lambda f: f.write(json.dumps(results, indent=1).encode()))
    return results


def _count_test_evaluation(out: Path, key: str) -> int:
    """Append to the log of test evaluations; return how many there have been."""
    log = out / "test_evaluations.json"
    entries = json.loads(log.read_text()) if log.exists() else []
    entries.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "fingerprint": key})
    atomic_write(log, lambda f: f.write(json.dumps(entries, indent=1).encode()))
    return len(entries)


def _score(
    members: list[Member],
    y_train: np.ndarray,
    methods: dict[str, dict[str, Any]],
    fitted: dict[str, Any],
    chosen: str,
    final: Any,
    P_test: np.ndarray,
    test: HeldOut,
    cfg: EnsembleConfig,
    seed: int,
    metric: str,
) -> dict[str, Any]:
    y = test.y
    better = max if metric == "accuracy" else min
    best_i = members.index(better(members, key=lambda m: m.spec.cv_score))
    best_p = P_test[best_i]

    def versus(proba: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
        return {
            "vs_best_single": evaluate.paired_bootstrap(
                y, pred, best_p.argmax(1), proba, best_p, n_boot=cfg.bootstrap, seed=seed
            ),
            "mcnemar": evaluate.mcnemar(y, pred, best_p.argmax(1)),
        }

    for name, comb in fitted.items():
        proba = comb.predict_proba(P_test)
        methods[name]["test"] = evaluate.metrics(proba, y)
        methods[name].update(versus(proba, comb.predict(P_test)))
    final_p = final.predict_proba(P_test)
    wrong = np.flatnonzero(final_p.argmax(1) != y)
    wrong = wrong[np.argsort(-final_p[wrong].max(1))][:MISCLASSIFIED_SHOWN]
    return {
        "members": [
            {
                "name": m.name,
                "model": m.spec.model,
                "trial": m.spec.trial,
                "kind": m.spec.kind,
                "cv_score": m.spec.cv_score,
                "oof": evaluate.scores(m.oof, y_train),
                "test": evaluate.metrics(P_test[i], y),
            }
            for i, m in enumerate(members)
        ],
        "best_single": members[best_i].name,
        "methods": methods,
        "final": {
            "method": chosen,
            "temperature": getattr(final, "temperature_", None),
            "test": evaluate.metrics(final_p, y),
            **versus(final_p, final.predict(P_test)),
            "reliability": evaluate.reliability(final_p, y),
            "best_single_reliability": evaluate.reliability(best_p, y),
        },
        "disagreement": {
            "members": [m.name for m in members],
            "matrix": evaluate.disagreement(P_test).tolist(),
        },
        "misclassified": [
            {
                "row": int(r),
                "true": int(y[r]),
                "pred": int(final_p[r].argmax()),
                "confidence": float(final_p[r].max()),
            }
            for r in wrong
        ],
    }
