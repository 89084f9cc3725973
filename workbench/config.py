"""A study file: TOML parsed into frozen, typed objects, validated once when it is loaded.

Every section and key is declared here, with its unit or meaning. Unknown keys are errors that name
the closest known key; search spaces are data (`[models.<name>.space.<param>]`). Code downstream
trusts these objects and never re-validates them.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import tomllib
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from workbench import views
from workbench.errors import ConfigError
from workbench.sections import PHOTOS, pattern_problem

# the [data], [data.augment] and [cv] sections, re-exported: a study file's types are here
from workbench.sections import AugmentConfig as AugmentConfig
from workbench.sections import CVConfig as CVConfig
from workbench.sections import DataConfig as DataConfig
from workbench.sections import Frozen as _Frozen
from workbench.sections import TableColumns as TableColumns
from workbench.spaces import (
    SPACE_TAGS,
    Param,
    Scalar,
    Value,
    ends,
    section_error,
)
from workbench.spaces import Choice as Choice  # re-exported: a study file's types are here
from workbench.spaces import FloatRange as FloatRange
from workbench.spaces import IntRange as IntRange

# --- sections ----------------------------------------------------------------------------------


class SearchConfig(_Frozen):
    trials: int = Field(20, ge=1)  # finished (complete + pruned) trials per model study
    workers: int = Field(0, ge=0)  # worker processes; 0 = one per core
    sampler: Literal["tpe", "random"] = "tpe"
    startup_trials: int = Field(8, ge=0)  # random trials before TPE models the space
    # per-epoch median or percentile pruning (with the two keys below); "hyperband" or "asha":
    # rungs over the epochs of fold 0, then a Wilcoxon test per fold (workbench/search/fidelity.py)
    pruner: Literal["median", "percentile", "none", "hyperband", "asha"] = "median"
    pruner_startup_trials: int = Field(4, ge=0)  # finished trials before any pruning
    pruner_warmup_epochs: int = Field(2, ge=0)  # epochs of each fold never pruned
    percentile: float = Field(25.0, gt=0.0, lt=100.0)  # for pruner = "percentile"
    # hyperband/asha: prune a trial whose completed folds are worse than the best trial's at this
    # one-sided p (exact Wilcoxon signed-rank); k folds give p >= 2^-k: at 0.1, from the 4th fold
    wilcoxon_p: float = Field(0.1, gt=0.0, le=1.0)
    storage: str | None = None  # Optuna RDB URL; default sqlite in the output folder
    heartbeat: int = Field(10, ge=1)  # s between a running trial's heartbeats; stale after 3 missed
    # with GPUs: workers default to (GPUs x workers_per_gpu), worker i on GPU i mod GPUs
    workers_per_gpu: int = Field(1, ge=1)
    # wall-clock budget of the whole `workbench study` command, in seconds ("30m", "2h", "1h30m"
    # and "90s" are read too; --budget sets it): a trial starts only while it can finish, model
    # families compete for the time (workbench/search/budget.py), and the trial counts become
    # upper bounds. None: no budget
    budget: float | None = Field(None, gt=0.0, strict=False)
    min_trials: int = Field(2, ge=1)  # with a budget: trials every model family is given

    @field_validator("budget", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return duration_seconds(v) if isinstance(v, str) else v


class TrainConfig(_Frozen):
    """Training defaults for every model; any of these keys may also be searched per model."""

    epochs: int = Field(20, ge=1)  # passes over the fold's training rows
    batch_size: int = Field(64, ge=1)  # images per optimizer step
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0.0)  # peak learning rate
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # SGD momentum (AdamW ignores it)
    weight_decay: float = Field(5e-4, ge=0.0)  # decoupled (AdamW) or L2 (SGD)
    schedule: Literal["onecycle", "cosine", "cosine_restarts", "constant"] = "onecycle"
    cycles: int = Field(1, ge=1)  # cosine_restarts: equal cycles over the run (snapshots)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float = Field(0.0, ge=0.0)  # max global gradient norm; 0 = off
    patience: int = Field(0, ge=0)  # early stop after this many epochs without val-loss gain
    class_weights: bool = False  # weight the loss by inverse class frequency
    # pretrained backbones: the head alone for the first epochs (the backbone's BatchNorm kept in
    # eval mode meanwhile), then everything at lr * backbone_lr_scale for the backbone
    freeze_epochs: int = Field(0, ge=0)
    # mixed precision on CUDA (the CPU always trains in float32): bf16 autocast, fp16 autocast
    # with a gradient scaler, or off
    amp: Literal["bf16", "fp16", "off"] = "bf16"
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _cycles_fit(self) -> TrainConfig:
        if self.schedule == "cosine_restarts" and self.cycles > self.epochs:
            raise ValueError(
                f"`cycles <= epochs` must hold for schedule = 'cosine_restarts', but got "
                f"cycles={self.cycles}, epochs={self.epochs}"
            )
        return self


class ModelSpec(_Frozen):
    arch: str | None = None  # registry name of the factory; default: the section's own name
    trials: int | None = Field(None, ge=1)  # overrides search.trials for this model
    params: dict[str, Scalar] = Field(
        default_factory=dict
    )  # fixed hyperparameters (factory kwargs or [train] keys)
    space: dict[str, Param] = Field(default_factory=dict)  # searched hyperparameters

    @model_validator(mode="after")
    def _disjoint(self) -> ModelSpec:
        both = sorted(set(self.params) & set(self.space))
        if both:
            raise ValueError(f"{both} appear in both `params` and `space`; keep each in one")
        return self


Method = Literal["hard_voting", "soft_voting", "weighted", "selection"]


class EnsembleConfig(_Frozen):
    """Which members, which combiners; weights are fit on out-of-fold rows, never on test rows."""

    enabled: bool = True
    top_k: int = Field(3, ge=1)  # candidates: the best k completed trials of each model study
    methods: tuple[Method, ...] = Field(
        ("hard_voting", "soft_voting", "weighted", "selection"), min_length=1, strict=False
    )
    selection_iterations: int = Field(50, ge=1)  # ensemble selection: greedy additions
    selection_init: int = Field(3, ge=1)  # ensemble selection: start from the N best members
    selection_bags: int = Field(1, ge=1)  # ensemble selection: bagged runs averaged
    temperature: bool = True  # temperature-scale the chosen ensemble, T fit on OOF rows
    # what ships: "auto", the best combiner only when it beats the best member alone on OOF rows
    # by more than the noise (ensemble/choice.py); "ensemble" or "member" whatever the margin
    ship: Literal["auto", "ensemble", "member"] = "auto"
    snapshots: int = Field(0, ge=0)  # cosine cycles of a snapshot run of each best config; 0 off
    # retrain each model's best configuration once on every training row (a queued run of the
    # search): the ladder's "one network on all rows", beside the fold models it is compared with
    refit: bool = False
    bootstrap: int = Field(2000, ge=100)  # paired bootstrap resamples for confidence intervals
    # test-time views (workbench/views.py): each candidate member also competes as its TTA
    # variant, the mean over the image and these views, chosen or not on OOF rows like any other
    tta: tuple[str, ...] = Field((), strict=False)
    # how the stage runs, not what it finds (left out of the stored result's fingerprint):
    workers: int = Field(0, ge=0)  # processes predicting members, 1 torch thread each; 0 = per core
    # test rows the ONNX graph is checked on against the torch model: a seeded sample; 0 = all.
    # An export fault on 0.6 % of rows or more shows in 512 with 95 % probability (1 - 0.994^512)
    check_rows: int = Field(512, ge=0)

    @field_validator("tta")
    @classmethod
    def _views(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if (why := views.problem(name)) is not None:
                raise ValueError(why)
        if len(set(v)) < len(v):
            raise ValueError(f"a view is listed twice in {list(v)}")
        return v


class DistillConfig(_Frozen):
    """One student network trained on every training row against the shipped model's
    out-of-fold probabilities (workbench/distill.py): the ensemble's gain at one network's cost.

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(labels), with
    teacher_T and student_T the probabilities softened by temperature T (Hinton et al. 2015)."""

    model: str  # a model section: the student uses its best trial's configuration
    params: dict[str, Scalar] = Field(
        default_factory=dict
    )  # keys that replace that configuration's (epochs, shift, ...)
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # weight of the teacher's term; 0: labels only
    temperature: float = Field(2.0, gt=0.0, le=20.0)  # T: both sides softened by it


class TrackingConfig(_Frozen):
    enabled: bool = True
    uri: str | None = None  # MLflow tracking URI; default: MLFLOW_TRACKING_URI, else local sqlite
    experiment: str | None = None  # default: the study name
    register_as: str | None = None  # register the final ensemble under this model name
    # where completed trials' files live: "local" (this host's output folder) or "mlflow" (the
    # tracking server's artifact store, so that workers on many hosts share them)
    artifacts: Literal["local", "mlflow"] = "local"

    @model_validator(mode="after")
    def _artifacts_need_tracking(self) -> TrackingConfig:
        if self.artifacts == "mlflow" and not self.enabled:
            raise ValueError(
                "tracking.artifacts = 'mlflow' keeps trial files in MLflow, but tracking.enabled "
                "is false; enable tracking or set tracking.artifacts = 'local'"
            )
        return self


class StudyConfig(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # names folders and studies
    seed: int = 0  # one seed for splits, folds, samplers and weights
    output_dir: str = "runs"  # results go to <output_dir>/<name>/
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = DataConfig()
    cv: CVConfig = CVConfig()
    search: SearchConfig = SearchConfig()
    train: TrainConfig = TrainConfig()
    models: dict[str, ModelSpec] = Field(min_length=1)
    ensemble: EnsembleConfig = EnsembleConfig()
    distill: DistillConfig | None = None  # a student of the shipped model; None: no student
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _student_model(self) -> StudyConfig:
        if self.distill is not None and self.distill.model not in self.models:
            raise ValueError(
                f"distill.model = {self.distill.model!r} is not a model section; the study's "
                f"models: {sorted(self.models)}"
            )
        return self

    @model_validator(mode="after")
    def _groups(self) -> StudyConfig:
        by, column, source = self.cv.group_by, self.data.columns.group, self.data.source
        if by is not None and source not in PHOTOS:
            raise ValueError(
                f"cv.group_by = {by!r} names the groups of a table's rows (a column) or of an "
                f"image folder's files (a pattern on their names), but data.source = {source!r} "
                f"has neither; remove cv.group_by"
            )
        if source == "table" and by is not None and column is not None and by != column:
            raise ValueError(
                f"cv.group_by = {by!r} and data.columns.group = {column!r} name two group "
                f"columns; keep one of them"
            )
        if source == "folder" and by is not None and (why := pattern_problem(by)) is not None:
            raise ValueError(f"cv.group_by: {why}")
        return self

    @model_validator(mode="after")
    def _train_keys(self) -> StudyConfig:
        """Every value a model's `params` and `space` (and `[distill] params`) give a [train] or
        [data.augment] key is valid, alone and at the corners with the model's other values. Any
        other key is a model factory's keyword, checked against its constraints by
        workbench/models."""
        sources = [(f"models.{m}", spec.params, spec.space) for m, spec in self.models.items()]
        if self.distill is not None:  # the student's keys over its model's configuration
            sources.append(("distill", self.distill.params, {}))
        base: _Frozen
        for where, params, space in sources:
            for base, section in ((self.train, "train"), (self.data.augment, "data.augment")):
                fields = type(base).model_fields
                given = {f"space.{k}": ends(p) for k, p in space.items() if k in fields}
                given |= {f"params.{k}": [Value(v)] for k, v in params.items() if k in fields}
                error = section_error(base, section, given, where)
                if error:
                    raise ValueError(error)
        return self

    @property
    def group_by(self) -> str | None:
        """What groups the rows (a table column or a file-name pattern); None: no groups."""
        return self.cv.group_by or (
            self.data.columns.group if self.data.source == "table" else None
        )

    def trials_for(self, model: str) -> int:
        return self.models[model].trials or self.search.trials

    @property
    def out(self) -> Path:
        return Path(self.output_dir) / self.name


# --- loading -----------------------------------------------------------------------------------


def load_study(
    path: str | Path, trials: int | None = None, budget: str | None = None
) -> StudyConfig:
    """Read a study file; every error names the file, the key path, the value and what is valid.

    `trials` (the CLI's --trials) sets the number of trials of every model study; `budget` (the
    CLI's --budget, "30m") sets search.budget.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: study file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    if budget is not None:
        raw.setdefault("search", {})["budget"] = budget
    if trials is not None:
        raw.setdefault("search", {})["trials"] = trials
        for spec in raw.get("models", {}).values():
            if isinstance(spec, dict):
                spec["trials"] = trials
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(path, e)) from None


_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def duration_seconds(text: str) -> float:
    """ "1h30m" -> 5400.0: hours, minutes and seconds, each optional, in that order; a bare
    number is seconds."""
    with contextlib.suppress(ValueError):
        return float(text)
    m = _DURATION.fullmatch(text.strip().lower())
    if not text.strip() or m is None or not any(m.groups()):
        raise ValueError(
            f"a duration like '30m', '2h', '1h30m' or '90s' (or a number of seconds) must be "
            f"given, not {text!r}"
        )
    return sum(float(v) * _UNITS[u] for v, u in zip(m.groups(), "hms", strict=True) if v)


def _format(path: Path, e: ValidationError) -> str:
    errors = _one_per_value(e.errors())
    lines = [f"{path}: {len(errors)} error(s) in the study file"]
    for err in errors:
        loc = [str(x) for x in err["loc"] if not str(x).startswith("<")]
        where = ".".join(loc) or "(top level)"
        if err["type"] == "finite_number":
            lines.append(
                f"  {where}: {err['input']!r} is not a finite number; give a number (TOML's "
                f"inf and nan are refused)"
            )
        elif err["type"] == "extra_forbidden":
            known = _known_keys(err["loc"][:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            lines.append(f"  {where}: unknown key; {hint}known keys: {', '.join(known)}")
        elif err["type"] == "missing":
            lines.append(f"  {where}: required key is missing")
        elif not loc:  # a rule across sections: its message names the key path itself
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {msg} (got {err.get('input')!r})")
    return "\n".join(lines)


_SCALARS = ("bool", "int", "float", "str")  # the members of `Scalar`, as pydantic names them


def _one_per_value(errors: list[Any]) -> list[Any]:
    """A non-finite float where a `Scalar` goes (a `params` value, a choice) fails each member of
    the union; keep its one finite_number error, its location without the member's name."""
    bad = {err["loc"][:-1] for err in errors if err["type"] == "finite_number"}
    kept = []
    for err in errors:
        loc = err["loc"]
        if loc and loc[-1] in _SCALARS and loc[:-1] in bad:  # one member of a failed union
            if err["type"] == "finite_number":
                kept.append({**err, "loc": loc[:-1]})
            continue
        kept.append(err)
    return kept


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at `loc`, walking the config classes along the key path."""
    cls: Any = StudyConfig
    for part in loc:
        if isinstance(part, str) and part in SPACE_TAGS:
            cls = SPACE_TAGS[part]
        elif _is_model(cls) and part in cls.model_fields:
            cls = _unwrap(cls.model_fields[part].annotation)
        elif typing.get_origin(cls) is dict:
            cls = _unwrap(typing.get_args(cls)[1])
    return sorted(cls.model_fields) if _is_model(cls) else []


def _is_model(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, BaseModel)


def _unwrap(tp: Any) -> Any:
    """Optional[X] -> X, Annotated[X, ...] -> X."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


# --- the resolved config -----------------------------------------------------------------------


def resolved(cfg: StudyConfig) -> dict[str, Any]:
    """The config with every default filled in: what is written beside results and logged."""
    return cfg.model_dump(mode="json")


def resume_key(cfg: StudyConfig) -> dict[str, Any]:
    """The parts that a resumed study must share with its first run (trial counts may change)."""
    d = resolved(cfg)
    for key in ("search", "ensemble", "distill", "tracking", "output_dir", "device"):
        d.pop(key)
    for spec in d["models"].values():
        spec.pop("trials")
    # keys added after studies were first stored: at their defaults, a study made before resumes
    fresh = {"data": ("columns", "suffix", "val"), "cv": ("group_by",)}
    for name, keys in fresh.items():
        section = getattr(cfg, name)
        for key in keys:
            if getattr(section, key) == type(section).model_fields[key].default:
                d[name].pop(key)
    return d


def fingerprint(d: dict[str, Any]) -> str:
    """A short, stable hash of a JSON-able dict."""
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
