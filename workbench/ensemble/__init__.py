"""Ensembles over member probabilities (members, rows, classes): combiners and a registry."""

from workbench.ensemble.combiners import (
    COMBINERS,
    EnsembleSelection,
    HardVoting,
    SoftVoting,
    TemperatureScaling,
    WeightedAverage,
    check_members,
    make_combiner,
    weighted_mean,
)

__all__ = [
    "COMBINERS",
    "EnsembleSelection",
    "HardVoting",
    "SoftVoting",
    "TemperatureScaling",
    "WeightedAverage",
    "check_members",
    "make_combiner",
    "weighted_mean",
]
