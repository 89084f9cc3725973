"""The model registry, in the style of timm: `@register_model`, `create_model`, `Classifier`.

Every factory takes `(num_classes, in_shape, **hparams)` and returns a bare network, or a `Net`
when it brings more (a pretrained backbone: its head, its own input normalisation, the smallest
input it takes). `create_model` wraps it in `Classifier`, which carries the input normalisation
(per-channel mean and std: the training rows', or the weights') as buffers, so a checkpoint's
state dict is the whole preprocessing too.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from workbench.config import AugmentConfig, StudyConfig, TrainConfig
from workbench.errors import ConfigError
from workbench.models.constraints import Constraint, violation
from workbench.spaces import Param, Scalar, Value

Factory = Callable[..., nn.Module]
_REGISTRY: dict[str, Factory] = {}
_CONSTRAINTS: dict[str, dict[str, Constraint]] = {}


def register_model(**constraints: Constraint) -> Callable[[Factory], Factory]:
    """A decorator adding a factory to the registry under its function name, with what each of
    its hyperparameters may be (`@register_model(width=Interval(int, 1, None), ...)`): every
    keyword needs one, and its default must satisfy it."""

    def add(fn: Factory) -> Factory:
        params = inspect.signature(fn).parameters
        keys = [p for p in params if p not in ("num_classes", "in_shape")]
        if sorted(keys) != sorted(constraints):
            raise TypeError(
                f"{fn.__name__}: constraints are declared for {sorted(constraints)}, "
                f"but its hyperparameters are {sorted(keys)}"
            )
        for key, c in constraints.items():
            if violation(c, [Value(params[key].default)]):
                raise TypeError(
                    f"{fn.__name__}: the default {key} = {params[key].default!r} is not {c}"
                )
        _REGISTRY[fn.__name__] = fn
        _CONSTRAINTS[fn.__name__] = dict(constraints)
        return fn

    return add


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_hparams(name: str) -> list[str]:
    """The keyword hyperparameters a factory accepts (beyond num_classes and in_shape)."""
    params = inspect.signature(_factory(name)).parameters
    return [p for p in params if p not in ("num_classes", "in_shape")]


def model_constraints(name: str) -> dict[str, Constraint]:
    """What each hyperparameter of a factory may be, as declared with it."""
    _factory(name)
    return dict(_CONSTRAINTS[name])


def _factory(name: str) -> Factory:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"Unknown model '{name}'; {hint}registered models: {list_models()}")
    return _REGISTRY[name]


@dataclass
class Net:
    """What a factory returns when a bare network is not all: a pretrained backbone."""

    module: nn.Module
    head: nn.Module  # the layer made for this study's classes; the rest is the backbone
    mean: Sequence[float] | None = None  # the weights' normalisation, over the training rows'
    std: Sequence[float] | None = None
    min_size: int = 1  # smaller inputs are upsized to this (bilinear) before the network


class Classifier(nn.Module):
    """Normalise inputs in [0, 1] (the training rows' or the weights' statistics), upsize them
    to what the network needs, then run it."""

    mean: torch.Tensor  # (1, C, 1, 1) buffer
    std: torch.Tensor  # (1, C, 1, 1) buffer

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        head: nn.Module | None = None,
        min_size: int = 1,
    ) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.head = head  # None: the whole network is trained from scratch, no backbone
        self.min_size = min_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [0, 1] -> (B, classes)
        if min(x.shape[-2:]) < self.min_size:
            scale = self.min_size / min(x.shape[-2:])
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The parameters outside the head (empty for a network without a backbone)."""
        if self.head is None:
            return []
        head = {id(p) for p in self.head.parameters()}
        return [p for p in self.net.parameters() if id(p) not in head]

    def backbone_modules(self) -> list[nn.Module]:
        if self.head is None:
            return []
        head = {id(m) for m in self.head.modules()}
        return [m for m in self.net.modules() if id(m) not in head and m is not self.net]


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
    for key, value in hparams.items():
        c = _CONSTRAINTS[name][key]
        bad = violation(c, [Value(value)])  # type: ignore[arg-type]
        if bad:
            raise ConfigError(f"model '{name}': {key} = {value!r} {bad[1]}; it must be {c}")
    channels = in_shape[0]
    net = factory(num_classes=num_classes, in_shape=tuple(in_shape), **hparams)
    if isinstance(net, Net):
        mean, std = net.mean or mean, net.std or std
        return Classifier(
            net.module,
            num_classes,
            mean or [0.0] * channels,
            std or [1.0] * channels,
            net.head,
            net.min_size,
        )
    return Classifier(net, num_classes, mean or [0.0] * channels, std or [1.0] * channels)


def state_bytes(module: nn.Module) -> int:
    """The bytes of a module's state dict (parameters and persistent buffers): what its
    checkpoint and an ONNX graph's initializers hold, file headers aside. Works on the meta
    device (shapes only)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def check_models(cfg: StudyConfig) -> None:
    """Every `[models.<name>]` names a registered factory, every key is a hyperparameter of that
    factory or a `[train]` key, and every value its `params` and `space` can give a factory's
    hyperparameter is one the factory builds. Called once, right after the study file is loaded.
    """
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
        _check_values(section, arch, spec.params, spec.space)


def _check_values(
    section: str, arch: str, params: dict[str, Scalar], space: dict[str, Param]
) -> None:
    constraints = _CONSTRAINTS[arch]
    given: dict[tuple[str, str], Iterable[Value]] = {
        ("params", k): [Value(v)] for k, v in params.items() if k in constraints
    }
    given |= {("space", k): constraints[k].values(p) for k, p in space.items() if k in constraints}
    for (kind, key), values in given.items():
        bad = violation(constraints[key], values)
        if bad:
            hint = "; a range gives every value in between: list them as choices" * (
                bad[0].kind == "value"
            )
            raise ConfigError(
                f"models.{section}.{kind}.{key}: {bad[0]} {bad[1]}; "
                f"'{arch}' {key} must be {constraints[key]}{hint}"
            )
