"""Small networks trained from scratch: an MLP, a plain CNN and a ResNet for small images.

Width, depth and dropout are hyperparameters: on this CPU a full-width ResNet-18 trains at 227 img/s
on 8x8 digits, so width must be searchable.
"""

from __future__ import annotations

from torch import nn

from workbench.errors import ConfigError
from workbench.models.constraints import Interval, Options
from workbench.models.registry import register_model

WIDTH = Interval(int, 1, None)  # 0 builds layers of no units: a network that learns nothing
DROPOUT = Interval(float, 0.0, 1.0, closed="left")  # 1 zeroes every unit: outputs ignore inputs


@register_model(width=WIDTH, depth=Interval(int, 1, None), dropout=DROPOUT)
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


@register_model(width=WIDTH, depth=Interval(int, 1, None), dropout=DROPOUT)
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


@register_model(width=WIDTH, depth=Options(tuple(_RESNET_BLOCKS)), dropout=DROPOUT)
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
