"""Item 5: images/second of the logged final model (MLflow pyfunc) vs the bare module it wraps.

The pyfunc is loaded from the ensemble run of item 4's digits study with
`mlflow.pyfunc.load_model("runs:/<id>/model")`. The floor: the same final model as the bare
`FinalEnsemble` module (workbench/final.py: every member's fold models and the combiner in one
nn.Module), called directly. Same test images, 1 torch thread; passes alternate, median taken.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import tomllib
import torch

from bench.common import (
    BenchError,
    Figure,
    ItemResult,
    StudyRun,
    at_least,
    median,
    spread,
    timed,
)
from workbench.config import DataConfig
from workbench.data import load_data
from workbench.final import FinalEnsemble

TARGET = 0.9  # x: the pyfunc keeps >= 90 % of the bare module's throughput


def test_images(out: Path) -> np.ndarray:
    """The study's held-out digits as float32 (N, 1, 8, 8) in [0, 1]."""
    test_idx = np.load(out / "split.npz")["test_idx"]
    return load_data(DataConfig()).images(test_idx).numpy().astype(np.float32)


def ensemble_run_id(study: StudyRun) -> tuple[str, str]:
    """(tracking URI, run id) of the study's latest top-level `ensemble` run."""
    from mlflow import MlflowClient

    cfg = tomllib.loads(study.file.read_text())
    uri = cfg["tracking"]["uri"]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg["tracking"].get("experiment") or cfg["name"])
    if exp is None:
        raise BenchError(f"no MLflow experiment '{cfg['name']}' in {uri}")
    runs = client.search_runs(
        [exp.experiment_id],
        "tags.`workbench.kind` = 'ensemble'",
        order_by=["attributes.start_time DESC"],
    )
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not top:
        raise BenchError(f"no ensemble run in {uri}: did the ensemble stage log its model?")
    return uri, top[0].info.run_id


def run(study: StudyRun, quick: bool, machine_tag: str) -> ItemResult:
    import mlflow

    torch.set_num_threads(1)
    x = test_images(study.out)
    uri, run_id = ensemble_run_id(study)
    mlflow.set_tracking_uri(uri)
    load_s, pyfunc = timed(lambda: mlflow.pyfunc.load_model(f"runs:/{run_id}/model"))
    final = study.out / "ensemble" / "final"
    meta = json.loads((final / "ensemble.json").read_text())
    module = FinalEnsemble.load(final)
    folds = module.members

    def members_alone() -> None:  # the bare module: the floor
        module.run(x)

    def logged() -> np.ndarray:
        table = pyfunc.predict(x)
        return table[[c for c in table.columns if c.startswith("p_")]].to_numpy()

    members_alone()  # warm-up
    logged()
    reps = 2 if quick else 7
    p_s: list[float] = []  # seconds per pass, pyfunc
    m_s: list[float] = []  # seconds per pass, members alone
    for rep in range(reps):
        for which in ("pyfunc", "members") if rep % 2 == 0 else ("members", "pyfunc"):
            (p_s if which == "pyfunc" else m_s).append(
                timed(logged if which == "pyfunc" else members_alone)[0]
            )
    ratios = [m / p for m, p in zip(m_s, p_s, strict=True)]  # pyfunc img/s / module img/s
    proba = logged()
    n_models = sum(len(f) for f in folds)
    return ItemResult(
        5,
        "Ensemble inference: logged pyfunc model vs the bare final module",
        machine_tag,
        [
            f"{len(x)} held-out digits images per pass, one batch; {len(folds)} members x "
            f"{meta['folds']} fold models = {n_models} networks; combiner: "
            f"{meta['combiner']['vote']} vote, temperature {_temperature(meta['combiner'])}",
            f"pyfunc: mlflow.pyfunc.load_model('runs:/{run_id}/model') (loaded in {load_s:.1f} s);"
            " floor: the FinalEnsemble module it wraps, called directly on the same array",
            f"{reps} alternating pairs of passes; median ratio of pyfunc img/s to module img/s",
        ],
        [
            Figure("bare FinalEnsemble module", len(x) / median(m_s), "img/s"),
            Figure(
                "logged pyfunc model",
                len(x) / median(p_s),
                "img/s",
                note=f"rows sum to 1: {np.allclose(proba.sum(1), 1)}",
            ),
            at_least("pyfunc / module", median(ratios), TARGET, note=f"pairs: {spread(ratios)}"),
        ],
        {
            "run_id": run_id,
            "members": meta["members"],
            "pyfunc_seconds": p_s,
            "members_seconds": m_s,
            "pair_ratios": ratios,
            "load_seconds": load_s,
        },
    )


def _temperature(state: dict[str, Any]) -> str:
    t = state.get("temperature")
    return "none" if t is None else f"{t:.3f}"
