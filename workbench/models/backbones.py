"""Pretrained torchvision backbones, fine-tuned: resnet18/50, vgg16_bn, mobilenet_v3_small,
efficientnet_b0, convnext_tiny (`torchvision.models.get_model`).

`weights` is a torchvision weights name ("ResNet18_Weights.IMAGENET1K_V1", looked up in the local
torch hub cache, `$TORCH_HOME/hub/checkpoints/`) or the path of a state dict; "" trains from
random initialisation. Nothing is downloaded. The last Linear layer (every family's classifier)
is replaced for the study's classes; a one-channel input adapts the first convolution (weights
summed over RGB, as for an (x, x, x) image, and the channels' mean normalisation); pretrained
networks normalise with the weights' mean and std instead of the training rows', and inputs smaller
than the family's minimum are upsized. A checkpoint holds every tensor, so a fold model is
rebuilt from it without the weights file (`create_model(..., weights="")`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.errors import ConfigError
from workbench.models.constraints import OfType
from workbench.models.registry import Net, register_model

MIN_SIZE = 32  # px: five stride-2 stages leave 1x1; vgg16_bn and convnext_tiny need it (meta)
_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # ImageNet-1k mean and std


def build(arch: str, num_classes: int, in_shape: tuple[int, int, int], weights: str) -> Net:
    """The torchvision network `arch`, its weights loaded, adapted to this study's inputs."""
    from torchvision.models import get_model

    net = get_model(arch, weights=None)  # 1000 classes: the shape the weights files have
    mean, std = None, None
    if weights:
        state, normalisation = _load_weights(arch, weights)
        _check_shapes(arch, weights, net, state)
        net.load_state_dict(state)
        mean, std = normalisation
    if in_shape[0] != 3:
        _adapt_first_conv(net, in_shape[0])
        if mean is not None and std is not None:
            mean, std = [sum(mean) / 3] * in_shape[0], [sum(std) / 3] * in_shape[0]
    head = _replace_head(net, num_classes)
    return Net(net, head, mean, std, MIN_SIZE)


def weights_path(arch: str, weights: str) -> Path:
    """Where `weights` is read from: a path as given, or the hub cache file of a weights name."""
    if weights.endswith((".pt", ".pth")) or os.sep in weights or "/" in weights:
        return Path(weights).expanduser()
    from torchvision.models import get_weight

    try:
        w = get_weight(weights)
    except (ValueError, KeyError, AttributeError):
        raise ConfigError(
            f"{arch}: weights {weights!r} is neither a torchvision weights name (e.g. "
            f"'ResNet18_Weights.IMAGENET1K_V1') nor the path of a .pt/.pth state dict"
        ) from None
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)


def _load_weights(arch: str, weights: str) -> tuple[dict[str, torch.Tensor], Any]:
    path = weights_path(arch, weights)
    if not path.is_file():
        how = (
            f"torchvision.models.{arch}(weights={weights!r}) on a machine with internet access "
            f"downloads it to $TORCH_HOME/hub/checkpoints/; copy that file to {path.parent}"
            if path.parent.name == "checkpoints"
            else "save one with torch.save(model.state_dict(), path)"
        )
        raise ConfigError(f"{arch}: weights file {path} not found; {how}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(f"{arch}: weights file {path} cannot be read ({e})") from None
    if isinstance(state, dict) and "state_dict" in state:  # a training checkpoint's wrapping
        state = state["state_dict"]
    return state, _normalisation(weights)


def _normalisation(weights: str) -> tuple[list[float], list[float]]:
    """The weights' own mean and std: from torchvision's entry for a name, ImageNet for a file."""
    if weights.endswith((".pt", ".pth")) or "/" in weights:
        return _IMAGENET
    from torchvision.models import get_weight

    t = get_weight(weights).transforms()
    return list(getattr(t, "mean", _IMAGENET[0])), list(getattr(t, "std", _IMAGENET[1]))


def _check_shapes(arch: str, weights: str, net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A file of another architecture: one message naming the first tensor that does not fit."""
    own = net.state_dict()
    for name, tensor in own.items():
        if name not in state:
            raise ConfigError(
                f"{arch}: weights {weights!r} do not fit {arch}: the file has no {name!r} "
                f"(it holds {len(state)} tensors, {arch} has {len(own)}); is it another network?"
            )
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ConfigError(
                f"{arch}: weights {weights!r} do not fit {arch}: layer {name!r} has shape "
                f"{tuple(state[name].shape)} in the file and {tuple(tensor.shape)} in {arch}"
            )


def _adapt_first_conv(net: nn.Module, channels: int) -> None:
    parent, name, conv = next(
        (p, n, m) for p in net.modules() for n, m in p.named_children() if isinstance(m, nn.Conv2d)
    )
    new = nn.Conv2d(
        channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        conv.stride,  # type: ignore[arg-type]
        conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True).expand_as(new.weight) / channels)
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    setattr(parent, name, new)


def _replace_head(net: nn.Module, num_classes: int) -> nn.Linear:
    parent, name, last = [
        (p, n, m) for p in net.modules() for n, m in p.named_children() if isinstance(m, nn.Linear)
    ][-1]
    head = nn.Linear(last.in_features, num_classes)
    setattr(parent, name, head)
    return head


def _factory(arch: str) -> Any:
    def factory(num_classes: int, in_shape: tuple[int, int, int], weights: str = "") -> Net:
        return build(arch, num_classes, in_shape, weights)

    factory.__name__ = arch
    factory.__doc__ = f"torchvision's {arch}, head replaced; `weights`: a name or a file"
    return factory


for _arch in (
    "resnet18",
    "resnet50",
    "vgg16_bn",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "convnext_tiny",
):
    register_model(weights=OfType(str))(_factory(_arch))  # a name or a path; "" = random init
