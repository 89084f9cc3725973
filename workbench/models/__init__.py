"""Models: the registry (`create_model`), small networks, and torchvision backbones."""

from workbench.models import backbones, small  # noqa: F401  (each registers its factories)
from workbench.models.constraints import Interval, OfType, Options
from workbench.models.registry import (
    Classifier,
    Net,
    check_models,
    create_model,
    list_models,
    model_constraints,
    model_hparams,
    register_model,
    state_bytes,
)

__all__ = [
    "Classifier",
    "Interval",
    "Net",
    "OfType",
    "Options",
    "check_models",
    "create_model",
    "list_models",
    "model_constraints",
    "model_hparams",
    "register_model",
    "state_bytes",
]
