"""What makes the MLflow UI open on a study and compare it: the experiment's kind and note, the
study's data as a dataset input, the search's history as series of the `study:<model>` run, and
the tags the runs table groups by. runs.py calls these; they build MLflow entities and text.

MLflow 3's UI picks an experiment's view from its tag `mlflow.experimentKind`: without it a new
experiment opens on the GenAI overview (traces, token usage); `custom_model_development` opens it
on the runs table. A dataset input (name, digest, source, profile) fills the runs table's Dataset
column, and "Group by" and the filter can use it: a changed dataset shows as a new digest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.config import StudyConfig, fingerprint

if TYPE_CHECKING:
    from workbench.data import ImageData, Split

KIND_TAG = "mlflow.experimentKind"
TRAINING = "custom_model_development"  # the UI's "traditional ML" view: the runs table first
NOTE_TAG = "mlflow.note.content"  # an experiment's (or run's) description, Markdown
CONTEXT_TAG = "mlflow.data.context"  # what a run did with a dataset input: train, test
BUILT_IN = {"digits": "sklearn.datasets.load_digits"}  # the source of data read from no path


@dataclass(frozen=True)
class DataRef:
    """The study's data as MLflow's dataset input describes it."""

    name: str  # e.g. "digits", "MNIST", the image folder's name
    digest: str  # the image store's fingerprint: sha256 of pixels, labels, classes (12 hex)
    source: str  # a file URI for data read from a path; else the source's name ("digits")
    rows: int  # images, training and test rows together
    image: tuple[int, ...]  # one image's shape (C, H, W), uint8 pixels
    classes: int
    train_rows: int  # rows the search cross-validates on
    test_rows: int  # held-out rows, read by the final evaluation only
    split: str  # "stratified" or "source" (the source's own test split)

    @classmethod
    def of(cls, data: ImageData, split: Split) -> DataRef:
        kind, _, rest = data.source.split(" (")[0].partition(":")  # "idx:/data/mnist (N images)"
        path = rest.rpartition(":")[2] if kind == "torchvision" else rest  # "MNIST:/root"
        name = rest.partition(":")[0] if kind == "torchvision" else Path(path).name or kind
        return cls(
            name=name,
            digest=split.fingerprint,
            source=Path(path).resolve().as_uri() if path else BUILT_IN.get(kind, kind),
            rows=len(data.y),
            image=tuple(int(s) for s in data.pixels.shape[1:]),
            classes=len(data.classes),
            train_rows=len(split.train_idx),
            test_rows=len(split.test_idx),
            split=split.kind,
        )


def dataset_input(data: DataRef, context: str) -> Any:
    """The dataset input of a run (`context`: "train" for the search, "test" for the ensemble's
    evaluation): source, digest and shape, as the UI's dataset drawer shows them."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    schema = {
        "mlflow_tensorspec": {
            "features": json.dumps([_tensor("image", "uint8", [-1, *data.image])]),
            "targets": json.dumps([_tensor("label", "int64", [-1])]),
        }
    }
    profile = {
        "num_rows": data.rows,
        "image_shape": list(data.image),
        "classes": data.classes,
        "train_rows": data.train_rows,
        "test_rows": data.test_rows,
        "split": data.split,
    }
    entity = Dataset(
        name=data.name,
        digest=data.digest,
        source_type="local" if data.source.startswith("file:") else "code",
        source=json.dumps({"uri": data.source}),
        schema=json.dumps(schema),
        profile=json.dumps(profile),
    )
    return DatasetInput(entity, tags=[InputTag(CONTEXT_TAG, context)])


def _tensor(name: str, dtype: str, shape: list[int]) -> dict[str, Any]:
    return {"type": "tensor", "tensor-spec": {"dtype": dtype, "shape": shape}, "name": name}


def page(base: str, experiment_id: str) -> str:
    """The experiment's page on a UI at `base`, in the training view. MLflow 3.17's UI takes
    the view from this query (or the user's last choice), no longer from `mlflow.experimentKind`
    alone: without it a first visit lands on the GenAI overview."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def where(name: str, uri: str, experiment_id: str) -> str:
    """The line a study prints first: the experiment's page, or how to serve the store."""
    if uri.startswith(("http://", "https://")):
        return f"MLflow: experiment '{name}' at {page(uri, experiment_id)}"
    return (
        f"MLflow: experiment '{name}' in {uri}; `make ui` serves the default store "
        f"(runs/mlflow): {page('http://127.0.0.1:5000', experiment_id)}"
    )


def description(study_file: Path) -> str:
    """The study file's leading comment block, without its `#`s: what the study is for."""
    lines = []
    for line in study_file.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return " ".join(" ".join(lines).split())


def experiment_note(cfg: StudyConfig, about: str, data: DataRef | None) -> str:
    """The experiment's description (Markdown, the first block of its page in the UI)."""
    metric = f"cv_{cfg.cv.metric}"
    lines = [about or f"Study `{cfg.name}`.", ""]
    if data is not None:
        lines.append(
            f"Data: **{data.name}** (digest `{data.digest}`), {data.rows} images of shape "
            f"{'x'.join(map(str, data.image))}, {data.classes} classes: {data.train_rows} "
            f"searched with {cfg.cv.folds}-fold CV, {data.test_rows} held out ({data.split})."
        )
    lines += [
        f"Models: {', '.join(f'`{m}`' for m in cfg.models)}; each `study:<model>` run draws "
        f"the search as `history/{metric}`, `history/best_{metric}` and `history/{metric}_std` "
        "(step = trial number).",
        "",
        "Compare (filter box): the best trial of each model: "
        "`tags.workbench.best = 'true'`; one trial's folds: "
        "`attributes.run_name LIKE '<model>/trial-<n>/%'`; the ensemble methods: "
        "`attributes.run_name LIKE 'ensemble/%'`. Group by `workbench.config` or "
        "`workbench.family` for the mean per configuration or per family.",
    ]
    return "\n".join(lines)


def config_id(family: str, params: dict[str, Any]) -> str:
    """One configuration (architecture and every hyperparameter) as 12 hex: a trial, its
    retries, its snapshot and refit runs share it."""
    return fingerprint({"family": family, "params": {k: str(v) for k, v in params.items()}})


@dataclass(frozen=True)
class TrialScore:
    """A finished (complete) trial of a model's search, as the `study:<model>` run draws it."""

    number: int  # the Optuna trial number: the step of every series
    value: float  # its CV score: the mean over folds of cv.metric
    std: float  # the std over folds of the same metric (NaN when not recorded)
    best_so_far: float  # the best value of the complete trials numbered <= this one
    run_id: str  # its MLflow trial run ("" when it has none)
    is_best: bool  # the study's best trial


def series(metric: str, scores: Sequence[TrialScore]) -> dict[str, dict[int, float]]:
    """metric key -> {step (trial number): value}: the search's history, one point per trial.
    The chart view orders its sections by the keys' prefixes, by name: `history/` comes before
    the ensemble run's `rung/` sections (140 charts on digits), so it is drawn first."""
    key = f"history/cv_{metric}"
    out: dict[str, dict[int, float]] = {key: {}, f"history/best_cv_{metric}": {}, f"{key}_std": {}}
    for s in scores:
        out[key][s.number] = s.value
        out[f"history/best_cv_{metric}"][s.number] = s.best_so_far
        if not math.isnan(s.std):
            out[f"{key}_std"][s.number] = s.std
    return out


def log_history(client: Any, run_id: str, points: dict[str, dict[int, float]]) -> None:
    """Log the points not yet in the run's history (a resume adds only its new trials), in
    batches of MLflow's 1,000 metrics a call."""
    import time

    from mlflow.entities import Metric

    now, batch = int(time.time() * 1000), []
    for key, steps in points.items():
        if not steps:
            continue
        logged = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        batch += [Metric(key, v, now, n) for n, v in steps.items() if logged.get(n) != v]
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i : i + 1000])


def tag_best(client: Any, best: set[str], tagged: set[str]) -> None:
    """`workbench.best = true` on the best trial run of the study, and on no other."""
    for run_id in tagged - best:
        client.delete_tag(run_id, "workbench.best")
    for run_id in best - tagged:
        client.set_tag(run_id, "workbench.best", "true")
