"""The final ensemble's rule as numbers: what a fitted combiner needs to predict, and the fitted
combiner rebuilt from them, so that the served model predicts through the very code that was
scored on the test split (hard-vote ties included).

    {"vote": "soft" | "hard", "weights": [w_1, ...], "temperature": T | None}

Soft voting, OOF-fit weights and ensemble selection all predict as a weighted mean of member
probabilities (SoftVoting with their weights); hard voting is weighted vote shares with its tie
rule; temperature scaling wraps either.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workbench.ensemble.combiners import HardVoting, SoftVoting, TemperatureScaling


def combiner_state(combiner: Any) -> dict[str, Any]:
    """The numbers a fitted combiner predicts with: vote kind, member weights, temperature."""
    inner = combiner.combiner_ if isinstance(combiner, TemperatureScaling) else combiner
    return {
        "vote": "hard" if isinstance(inner, HardVoting) else "soft",
        "weights": [float(w) for w in combiner.weights_],
        "temperature": getattr(combiner, "temperature_", None),
    }


def fitted_rule(state: dict[str, Any], n_classes: int) -> Any:
    """The fitted combiner that `state` describes (predict_proba and predict over P)."""
    weights = np.asarray(state["weights"], dtype=np.float64)
    inner = (HardVoting if state["vote"] == "hard" else SoftVoting)(weights=weights)
    inner.weights_ = weights / weights.sum()
    inner.n_members_, inner.classes_ = len(weights), np.arange(n_classes)
    if state["temperature"] is None:
        return inner
    rule = TemperatureScaling(inner)
    rule.combiner_, rule.temperature_ = inner, float(state["temperature"])
    rule.weights_, rule.n_members_, rule.classes_ = inner.weights_, inner.n_members_, inner.classes_
    return rule
