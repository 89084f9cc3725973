"""A registry of small model factories, in the style of timm: `@register_model`, `create_model`.

Every factory takes `(num_classes, in_shape, **hparams)` and returns a bare network; `create_model`
wraps it in `Classifier`, which carries the input normalisation (per-channel mean and std of the
training rows) as buffers, so a checkpoint's state dict is the whole preprocessing too.
Width, depth and dropout are hyperparameters: on this CPU a full-width ResNet-18 trains at 227 img/s
on 8x8 digits, so width must be searchable.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from workbench.config import AugmentConfig, StudyConfig, TrainConfig
from workbench.errors import ConfigError

Factory = Callable[..., nn.Module]
_REGISTRY: dict[str, Factory] = {}


def register_model(fn: Factory) -> Factory:
    """Add a factory to the registry under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_hparams(name: str) -> list[str]:
    """The keyword hyperparameters a factory accepts (beyond num_classes and in_shape)."""
    params = inspect.signature(_factory(name)).parameters
    return [p for p in params if p not in ("num_classes", "in_shape")]


def _factory(name: str) -> Factory:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"Unknown model '{name}'; {hint}registered models: {list_models()}")
    return _REGISTRY[name]


class Classifier(nn.Module):
    """Normalise inputs in [0, 1] with the training rows' statistics, then run the network."""

    mean: torch.Tensor  # (1, C, 1, 1) buffer
    std: torch.Tensor  # (1, C, 1, 1) buffer

    def __init__(
        self, net: nn.Module, num_classes: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [0, 1] -> (B, classes)
        return self.net((x - self.mean) / self.std)


def create_model(
    name: str,
    num_classes: int,
    in_shape: tuple[int, int, int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **hparams: object,
) -> Classifier:
    """Build a registered model; unknown names and keywords are errors listing what is valid."""
    factory = _factory(name)
    unknown = sorted(set(hparams) - set(model_hparams(name)))
    if unknown:
        raise ConfigError(
            f"model '{name}' has no hyperparameter(s) {unknown}; it accepts {model_hparams(name)}"
        )
    channels = in_shape[0]
    net = factory(num_classes=num_classes, in_shape=tuple(in_shape), **hparams)
    return Classifier(net, num_classes, mean or [0.0] * channels, std or [1.0] * channels)


def check_models(cfg: StudyConfig) -> None:
    """Every `[models.<name>]` names a registered factory, and every key is a hyperparameter of
    that factory or a `[train]` key. Called once, right after the study file is loaded."""
    for section, spec in cfg.models.items():
        arch = spec.arch or section
        if arch not in _REGISTRY:
            where = f"models.{section}.arch" if spec.arch else f"models.{section}"
            raise ConfigError(
                f"{where}: unknown model '{arch}'; registered models: {list_models()}"
            )
        known = (
            set(model_hparams(arch))
            | set(TrainConfig.model_fields)
            | set(AugmentConfig.model_fields)
        )
        for kind, keys in (("params", spec.params), ("space", spec.space)):
            for key in keys:
                if key not in known:
                    close = difflib.get_close_matches(key, known, n=1)
                    hint = f"did you mean '{close[0]}'? " if close else ""
                    raise ConfigError(
                        f"models.{section}.{kind}.{key}: '{arch}' has no hyperparameter '{key}'; "
                        f"{hint}valid: {model_hparams(arch)} or any [train] or [data.augment] key"
                    )


# --- factories ---------------------------------------------------------------------------------


@register_model
def mlp(
    num_classes: int,
    in_shape: tuple[int, int, int],
    width: int = 256,
    depth: int = 2,
    dropout: float = 0.0,
) -> nn.Module:
    """`depth` hidden layers of `width` units (Linear, ReLU, Dropout) on the flattened image."""
    c, h, w = in_shape
    layers: list[nn.Module] = [nn.Flatten()]
    d = c * h * w
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        d = width
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


@register_model
def cnn(
    num_classes: int,
    in_shape: tuple[int, int, int],
    width: int = 32,
    depth: int = 2,
    dropout: float = 0.0,
) -> nn.Module:
    """`depth` stages of two 3x3 conv-BN-ReLU layers, channels width * 2**stage, each stage
    halving the image with max-pooling while it is at least 4 pixels; global average pool head."""
    c, h, w = in_shape
    layers: list[nn.Module] = []
    for stage in range(depth):
        out = width * 2**stage
        layers += _conv_bn(c, out) + _conv_bn(out, out)
        if min(h, w) >= 4:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(c, num_classes),
    ]
    return nn.Sequential(*layers)


_RESNET_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


@register_model
def resnet(
    num_classes: int,
    in_shape: tuple[int, int, int],
    width: int = 16,
    depth: int = 18,
    dropout: float = 0.0,
) -> nn.Module:
    """torchvision's ResNet (BasicBlock) adapted to small images: a 3x3 stride-1 stem, no max-pool,
    any input channel count, and stage widths width * (1, 2, 4, 8) (64 = torchvision's)."""
    # imported here, not at the top: torchvision's import pulls in torch._dynamo, 1.5 s of every
    # worker's start-up here (python -X importtime), which studies without a resnet need not pay
    from torchvision.models.resnet import BasicBlock

    if depth not in _RESNET_BLOCKS:
        raise ConfigError(f"resnet depth must be one of {sorted(_RESNET_BLOCKS)}, got {depth}")
    layers: list[nn.Module] = [*_conv_bn(in_shape[0], width)[:2], nn.ReLU(inplace=True)]
    cin = width
    for stage, blocks in enumerate(_RESNET_BLOCKS[depth]):
        planes, stride = width * 2**stage, 1 if stage == 0 else 2
        for b in range(blocks):
            s = stride if b == 0 else 1
            down = None
            if s != 1 or cin != planes:
                down = nn.Sequential(
                    nn.Conv2d(cin, planes, 1, stride=s, bias=False), nn.BatchNorm2d(planes)
                )
            block = BasicBlock(cin, planes, stride=s, downsample=down)
            nn.init.zeros_(block.bn2.weight)  # zero-init residual: each block starts as identity
            layers.append(block)
            cin = planes
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(cin, num_classes),
    ]
    return nn.Sequential(*layers)
