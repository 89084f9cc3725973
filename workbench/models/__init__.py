"""Models: the registry (`create_model`), small networks, and torchvision backbones."""

from workbench.models import backbones, small  # noqa: F401  (each registers its factories)
from workbench.models.registry import (
    Classifier,
    Net,
    check_models,
    create_model,
    list_models,
    model_hparams,
    register_model,
)

__all__ = [
    "Classifier",
    "Net",
    "check_models",
    "create_model",
    "list_models",
    "model_hparams",
    "register_model",
]
