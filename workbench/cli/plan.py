"""`workbench check`'s plan: what a study would run, on what, and where its results would go."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import numpy as np
from rich.markup import escape
from rich.table import Table

from workbench import search, tracking
from workbench.cli.stages import REPORTS
from workbench.config import Choice, IntRange, ModelSpec, StudyConfig
from workbench.console import console
from workbench.data import ImageData, Split
from workbench.files import free_space, size_text
from workbench.runtime import gpu_count
from workbench.store import RunStore

CLASSES_SHOWN = 10  # class names listed; the rest are counted


def show(cfg: StudyConfig, data: ImageData, split: Split, workers: int) -> None:
    """Print the three tables of the plan, then the verdict."""
    console.print(models_table(cfg))
    console.print(data_table(cfg, data, split))
    console.print(places_table(cfg, workers))
    console.print(f"[green]ok:[/] `workbench study` can start ({cfg.name}); nothing was trained")


def models_table(cfg: StudyConfig) -> Table:
    table = Table(title=f"{cfg.name}: models searched ({cfg.search.sampler} sampler)")
    for col in ("model", "arch", "trials", "fixed", "searched"):
        table.add_column(col, justify="right" if col == "trials" else "left")
    table.caption = ensemble_plan(cfg)
    for name, spec in cfg.models.items():
        fixed = ", ".join(f"{k}={v}" for k, v in spec.params.items())
        table.add_row(
            escape(name),
            escape(spec.arch or name),
            str(cfg.trials_for(name)),
            escape(fixed) or "-",
            escape(searched(spec)) or "-",
        )
    return table


def ensemble_plan(cfg: StudyConfig) -> str:
    e = cfg.ensemble
    if not e.enabled:
        return "ensemble: off (ensemble.enabled = false)"
    snaps = f" + a {e.snapshots}-cycle snapshot run of each best" if e.snapshots > 1 else ""
    refit = " + each best retrained on all training rows (refit)" if e.refit else ""
    return f"ensemble: the best {e.top_k} trials per model{snaps}{refit}; {', '.join(e.methods)}"


def searched(spec: ModelSpec) -> str:
    """Each searched key with its range: `lr 0.0003..0.03 log`, `width {128, 256}`."""
    parts = []
    for key, p in spec.space.items():
        if isinstance(p, Choice):
            parts.append(f"{key} {{{', '.join(map(str, p.choices))}}}")
            continue
        step = None if isinstance(p, IntRange) and p.step == 1 else p.step
        extra = (" log" if p.log else "") + (f" step {step:g}" if step is not None else "")
        parts.append(f"{key} {p.low:g}..{p.high:g}{extra}")
    return "; ".join(parts)


def data_table(cfg: StudyConfig, data: ImageData, split: Split) -> Table:
    c, h, w = data.in_shape
    names = ", ".join(data.classes[:CLASSES_SHOWN])
    more = f", ... ({data.num_classes - CLASSES_SHOWN} more)" if data.num_classes > 10 else ""
    y_train = data.y[split.train_idx].numpy()
    val = [len(v) for _, v in split.folds(y_train, cfg.cv.folds, cfg.seed, data.classes)]
    per_fold = f"{min(val)}" if min(val) == max(val) else f"{min(val)}-{max(val)}"
    smallest = int(np.bincount(y_train, minlength=data.num_classes).min())
    kind = "stratified" if split.groups is None else "stratified group"
    rows = [
        ("source", data.source),
        ("rows", str(len(data.y))),
        ("classes", f"{data.num_classes} ({names}{more})"),
        ("image shape", f"{c} x {h} x {w} (channels x height x width)"),
        ("image store", store_text(cfg, data)),
        ("split", f"{split.describe()}, data fingerprint {split.fingerprint}"),
        *_group_rows(split),
        ("training rows", f"{len(split.train_idx)} (smallest class: {smallest})"),
        ("test rows", f"{len(split.test_idx)} (held out; read once, by the ensemble stage)"),
        ("folds", f"{cfg.cv.folds} {kind}, {per_fold} validation rows each"),
        ("metric", cfg.cv.metric),
    ]
    return _pairs("data and cross-validation", rows)


def _group_rows(split: Split) -> list[tuple[str, str]]:
    """The groups of a grouped split: how many on each side, and the largest group's share."""
    if split.groups is None:
        return []
    names, counts = np.unique(split.groups, return_counts=True)
    top = int(np.argmax(counts))
    share = counts[top] / len(split.groups)
    train, test = (len(np.unique(split.groups[i])) for i in (split.train_idx, split.test_idx))
    return [
        ("groups", f"{len(names)} ({train} in training rows, {test} in test rows; none in both)"),
        ("largest group", f"{str(names[top])!r}: {counts[top]} rows, {share:.1%} of them"),
    ]


def store_text(cfg: StudyConfig, data: ImageData) -> str:
    """The store's size (one byte a pixel a channel) and its disk's free space (the output
    folder's: the store is its images/)."""
    n, c, h, w = data.pixels.shape
    size = data.pixels.numel() * data.pixels.element_size()
    free = free_space(RunStore(cfg.out).images)
    return f"{size_text(size)} ({n} x {c} x {h} x {w} bytes); {size_text(free)} free on its disk"


def places_table(cfg: StudyConfig, workers: int) -> Table:
    missing = search.missing_studies(cfg)
    n = len(cfg.models)
    studies = (
        f"none yet: `workbench study` creates {n}"
        if len(missing) == n
        else f"all {n} exist: `workbench study` resumes them"
        if not missing
        else f"{n - len(missing)} of {n} exist; new: {', '.join(missing)}"
    )
    if cfg.tracking.enabled:
        where = tracking.tracking_uri(cfg)
        record = [
            ("MLflow tracking", _masked(where)),
            ("MLflow experiment", cfg.tracking.experiment or cfg.name),
        ]
    else:
        record = [("MLflow tracking", "off (tracking.enabled = false)")]
    rows = [
        ("device", device_plan(cfg.device)),
        ("workers", str(workers)),
        ("output folder", str(cfg.out.absolute())),
        ("Optuna storage", search.shown_url(search.storage_url(cfg))),
        ("Optuna studies", studies),
        *record,
        ("report", str((REPORTS / f"{cfg.name}.html").absolute())),
    ]
    return _pairs("where it runs and where results go", rows)


def device_plan(device: str) -> str:
    gpus = gpu_count() if device != "cpu" else 0
    if not gpus:
        return f"{device}: cpu" + (" (no CUDA device visible)" if device == "auto" else "")
    return f"{device}: {gpus} CUDA device(s), worker i on cuda:(i mod {gpus})"


def _masked(uri: str) -> str:
    """A URI with any password in it replaced by ***."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _pairs(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in rows:
        table.add_row(key, escape(value))
    return table
