"""Every registered model: shapes, finite outputs, a gradient on every parameter (timm-style).
The torchvision backbones run here with random weights (tests/test_backbones.py loads files)."""

from __future__ import annotations

import pytest
import torch

from workbench.errors import ConfigError
from workbench.models import create_model, list_models, model_hparams

SHAPES = [(1, 8, 8), (3, 32, 32), (1, 28, 28)]
SMALL = ["cnn", "mlp", "resnet"]  # trained from scratch: width, depth and dropout searchable


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_model_forward_backward(name: str, in_shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    small = {"width": 8} if name in SMALL else {}  # backbones: any input, upsized to >= 32 px
    model = create_model(
        name, 7, in_shape, mean=[0.5] * in_shape[0], std=[0.25] * in_shape[0], **small
    )
    x = torch.rand(4, *in_shape)
    out = model(x)
    assert out.shape == (4, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"No gradient for {n}"


def test_the_registry_holds_the_small_networks_and_six_backbones() -> None:
    backbones = [
        "convnext_tiny",
        "efficientnet_b0",
        "mobilenet_v3_small",
        "resnet18",
        "resnet50",
        "vgg16_bn",
    ]
    assert list_models() == sorted(SMALL + backbones)
    assert all(model_hparams(b) == ["weights"] for b in backbones)


@pytest.mark.parametrize("name", SMALL)
def test_width_depth_dropout_are_hyperparameters(name: str) -> None:
    assert {"width", "depth", "dropout"} <= set(model_hparams(name))
    small = create_model(name, 10, (1, 8, 8), width=8)
    large = create_model(name, 10, (1, 8, 8), width=32)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(large) > 2 * count(small)


def test_normalisation_travels_in_the_state_dict() -> None:
    model = create_model("cnn", 10, (3, 8, 8), mean=[0.1, 0.2, 0.3], std=[1.0, 2.0, 4.0], width=4)
    state = model.state_dict()
    assert state["mean"].flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert state["std"].flatten().tolist() == [1.0, 2.0, 4.0]


def test_unknown_model_and_keyword_are_errors() -> None:
    with pytest.raises(
        ConfigError,
        match=r"Unknown model 'cnnn'; did you mean 'cnn'\? "
        r"registered models: \['cnn', 'convnext_tiny', 'efficientnet_b0', ",
    ):
        create_model("cnnn", 10, (1, 8, 8))
    with pytest.raises(ConfigError, match=r"model 'mlp' has no hyperparameter\(s\) \['kernel'\]"):
        create_model("mlp", 10, (1, 8, 8), kernel=3)
    with pytest.raises(
        ConfigError,
        match=r"model 'resnet': depth = 12 is not valid; it must be one of \[10, 18, 34\]",
    ):
        create_model("resnet", 10, (1, 8, 8), depth=12)
