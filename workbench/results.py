"""What the ensemble stage found, as typed, frozen records: written once as results.json and read
by type everywhere (console, report, tracking, the final model's packaging).

The records are pydantic models (frozen, unknown keys rejected), so that `to_json` / `from_json`
round-trip without hand-written (de)serialisers: `EnsembleResult.from_json(r.to_json()) == r`.
A results.json written by another version of workbench does not load (`ResultsFormatError`);
the ensemble stage then evaluates again and counts that look at the test split.

The ladder (`Rung`) is the answer to "what does ensembling buy here, at what cost": one network,
the best configuration's k-fold bag, each combiner, and the shipped rule, each scored on the one
look at the test split with a paired bootstrap CI against the rung below and against one network.

A look at the test split (`TestLook`) is any score computed on the held-out rows, by any
command; `RunStore.count_test_look` appends it to the study's one log (test_evaluations.json).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT = 2  # results.json's layout; a stored result of another layout is evaluated anew


@dataclass(frozen=True)
class TestProbas:
    """What member inference (workbench/infer.py) gives the ensemble stage for the test rows."""

    __test__ = False  # not a pytest class

    members: np.ndarray  # (members, rows, classes): each member's mean of its fold models
    folds: np.ndarray  # (folds, rows, classes): the best member's fold models, each alone
    refits: np.ndarray | None = None  # (refits, rows, classes): each refit network
    student: np.ndarray | None = None  # (rows, classes): the distilled student, if any


class ResultsFormatError(ValueError):
    """A results.json that is not this version's layout (or not a result at all)."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ResultsFormatError(
                f"not a {cls.__name__} of results format {FORMAT}: {where}: {first['msg']}"
            ) from None


class Scores(_Record):
    """Test metrics of what a classifier ships: its labels (accuracy, macro-F1, recall, the
    confusion matrix) and its probabilities (log loss in nats, multiclass Brier in [0, 2], top-label
    ECE of the shipped label's probability)."""

    accuracy: float
    macro_f1: float
    log_loss: float
    brier: float
    ece: float
    per_class_recall: list[float]
    confusion: list[list[int]] | None  # true rows; None for a mean over several networks


class OofScores(_Record):
    """Accuracy and log loss (nats) on out-of-fold rows: what members and combiners are chosen
    on."""

    accuracy: float
    log_loss: float


class Interval(_Record):
    """A difference A - B averaged over rows, with its 95 % paired-bootstrap percentile interval."""

    diff: float
    ci_low: float
    ci_high: float

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low > 0.0 or self.ci_high < 0.0


class Paired(_Record):
    """A against B on the same test rows: accuracy (positive favours A) and log loss (negative
    favours A), with McNemar's exact test where B is one classifier (None against a mean over
    several networks)."""

    against: str  # B's rung or member name
    accuracy: Interval
    log_loss: Interval
    mcnemar_b: int | None = None  # rows only A gets right
    mcnemar_c: int | None = None  # rows only B gets right
    mcnemar_p: float | None = None
    n_boot: int
    seed: int


class Cost(_Record):
    """What predicting costs: the networks run, their wall time per image (batch 256, 1 torch
    thread, the machine that ran the stage), parameters, and the bytes of their weights."""

    networks: int
    ms_per_image: float
    parameters: int
    bytes: int


class Spread(_Record):
    """Lowest and highest over several networks (the fold models of one configuration)."""

    accuracy: tuple[float, float]
    log_loss: tuple[float, float]


RungKind = Literal["network", "refit", "bag", "combiner", "final", "student"]


class Rung(_Record):
    """One step of the ladder, scored on the one look at the test split."""

    name: str  # "one network", "cnn on all rows", "k-fold bag", "soft_voting", ..., "final"
    kind: RungKind
    label: str  # what it is here, e.g. "cnn/trial-6, each of its 5 fold models alone"
    adds: str  # one sentence: what this rung adds to the one below
    test: Scores  # for "one network": the mean over its fold models
    spread: Spread | None = None  # for "one network": lowest and highest fold model
    vs_below: Paired | None = None
    vs_network: Paired | None = None
    cost: Cost | None = None


class MemberResult(_Record):
    name: str  # "cnn/trial-6", "cnn/snapshots-of-6/snapshot-2"
    model: str
    trial: int
    kind: str  # "trial" | "snapshot"
    cv_score: float  # the study metric's mean over folds
    oof: OofScores
    test: Scores
    cost: Cost | None = None


class MethodResult(_Record):
    """A combiner fit on OOF rows: its weights, its OOF scores (in-sample and cross-validated over
    the OOF rows, which is what chooses), and its test scores."""

    name: str
    members: list[str]
    weights: list[float]
    oof: OofScores
    oof_cv: OofScores
    test: Scores


class Choice(_Record):
    """Which candidate the final model is, and why: the best combiner by cross-validated OOF log
    loss ships only when it beats the best member alone on the OOF rows by more than the noise
    (the paired bootstrap CI of their per-row log-loss difference lies below 0)."""

    shipped: str  # a method name, or the best member's name when it ships alone
    alone: bool  # True: the final model is the best member alone
    best_method: str  # the best combiner by OOF-CV log loss
    best_member: str  # the best member by CV score (its k-fold bag)
    oof_vs_member: Interval  # best_method − best_member, per-row OOF log loss (nats)
    reason: str  # one sentence, for the console and the report


class Rule(_Record):
    """The numbers the final model predicts with (workbench/final.py runs them)."""

    vote: Literal["soft", "hard"]
    weights: list[float]  # one per candidate member, in the results' member order
    temperature: float | None


class Reliability(_Record):
    edges: list[float]
    confidence: list[float | None]
    accuracy: list[float | None]
    count: list[int]


class Misclassified(_Record):
    row: int  # position in the test split
    true: int
    pred: int
    confidence: float  # the final model's probability of `pred`


class FinalResult(_Record):
    method: str  # the shipped candidate (Choice.shipped)
    rule: Rule
    test: Scores
    vs_bag: Paired  # against the best member's k-fold bag
    reliability: Reliability
    bag_reliability: Reliability


class Disagreement(_Record):
    members: list[str]
    matrix: list[list[float]]  # share of test rows on which two members' labels differ


class EnsembleResult(_Record):
    """Everything the ensemble stage's one look at the test split found (results.json)."""

    format: int = FORMAT
    fingerprint: str  # of the inputs: members' OOF rows, the [ensemble] section, the split
    split_fingerprint: str
    test_evaluations: int  # looks at the test split so far, by any command (this one included)
    reused: bool  # the stored result of unchanged inputs, read again without a look
    classes: list[str]
    n_test: int
    folds: int  # fold models per member
    seconds: float
    members: list[MemberResult]
    best_single: str  # the best member by CV score: its k-fold bag is the ladder's second rung
    methods: dict[str, MethodResult]
    choice: Choice
    final: FinalResult
    ladder: list[Rung]
    disagreement: Disagreement
    misclassified: list[Misclassified]

    def member(self, name: str) -> MemberResult:
        return next(m for m in self.members if m.name == name)

    def rung(self, name: str) -> Rung:
        return next(r for r in self.ladder if r.name == name)

    def student_keeps(self) -> float | None:
        """The share of what ships' test-accuracy gain over one network that the distilled
        student keeps (1.0: all of it; negative: worse than one network); None without a
        student or without a gain to keep."""
        names = {r.name for r in self.ladder}
        if "student" not in names:
            return None
        net = self.rung("one network").test.accuracy
        gain = self.rung("final").test.accuracy - net
        return (self.rung("student").test.accuracy - net) / gain if gain > 0 else None

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), indent=1).encode()

    @classmethod
    def loads(cls, text: str | bytes) -> EnsembleResult:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ResultsFormatError(f"not JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ResultsFormatError(f"results format {got!r}, this workbench reads {FORMAT}")
        return cls.from_json(data)


class TestLook(_Record):
    """One look at the held-out test split: who looked, at what, on how many rows, and the score
    printed, appended to test_evaluations.json by `RunStore.count_test_look`."""

    __test__ = False  # not a pytest class

    time: str = Field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))  # local, ISO
    command: str  # "ensemble", "export", "export --quantize", "predict", ...
    what: str  # what was scored: "the final model", "member cnn/trial-3", "the int8 graph"
    rows: int  # test rows scored
    fingerprint: str = ""  # the ensemble stage's input fingerprint, where there is one
    accuracy: float | None = None  # the score shown, where one was shown


def student_sentence(keeps: float) -> str:
    """What share of the shipped model's accuracy gain over one network the student keeps."""
    if keeps < 0:
        return (
            f"the student scores below one network: it keeps none of the shipped model's "
            f"accuracy gain over one network ({keeps:.0%})"
        )
    return f"the student keeps {keeps:.0%} of the shipped model's accuracy gain over one network"


@dataclass(frozen=True)
class ModelUse:
    """What one model family got of a study's time budget (search.budget)."""

    model: str
    trials: int  # runs finished: complete and pruned
    seconds: float  # worker-seconds its trials ran, finished or stopped
    undone: str  # what it did not get: trials not started, runs stopped at the deadline


@dataclass(frozen=True)
class Spending:
    """The last `workbench study`'s time budget and what the search spent it on."""

    budget: float  # s, for the whole command
    reserve: float  # s kept for the stages after the search
    models: list[ModelUse]
