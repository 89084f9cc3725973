"""Every value a study file can give a hyperparameter is checked when the file is loaded: against
the model factory's declared constraints, and against the [train] rules across keys at the corners
of the search space. Messages name the key path, the value and what is valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli

from workbench.config import StudyConfig, load_study
from workbench.errors import ConfigError
from workbench.models import (
    Interval,
    check_models,
    create_model,
    list_models,
    model_constraints,
    model_hparams,
    register_model,
    small,
)
from workbench.spaces import Value, corners


def study(tmp_path: Path, body: str) -> StudyConfig:
    path = tmp_path / "study.toml"
    path.write_text('name = "t"\n' + body)
    cfg = load_study(path)
    check_models(cfg)
    return cfg


def error(tmp_path: Path, body: str) -> str:
    with pytest.raises(ConfigError) as info:
        study(tmp_path, body)
    return str(info.value)


# --- each factory declares what it builds ------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_every_hyperparameter_of_every_factory_has_a_constraint(name: str) -> None:
    assert sorted(model_constraints(name)) == sorted(model_hparams(name))


def test_a_factory_without_a_constraint_per_hyperparameter_is_not_registered() -> None:
    def tiny(num_classes: int, in_shape: tuple[int, int, int], width: int = 4, depth: int = 1):
        return torch.nn.Linear(1, num_classes)

    with pytest.raises(TypeError, match=r"tiny: constraints are declared for \['width'\]"):
        register_model(width=Interval(int, 1, None))(tiny)
    with pytest.raises(TypeError, match=r"tiny: the default width = 4 is not an int >= 8"):
        register_model(width=Interval(int, 8, None), depth=Interval(int, 1, None))(tiny)
    assert "tiny" not in list_models()


# (model, key, a valid boundary value, the value just outside it)
BOUNDARIES = [
    (name, key, inside, outside)
    for name in ("mlp", "cnn", "resnet")
    for key, inside, outside in [("width", 1, 0), ("dropout", 0.0, -0.01), ("dropout", 0.99, 1.0)]
] + [
    ("mlp", "depth", 1, 0),
    ("cnn", "depth", 1, 0),
    ("resnet", "depth", 10, 12),
    ("resnet", "depth", 34, 50),
]


@pytest.mark.parametrize(("name", "key", "inside", "outside"), BOUNDARIES)
def test_a_boundary_builds_and_forwards_and_just_outside_is_rejected_at_load(
    tmp_path: Path, name: str, key: str, inside: float, outside: float
) -> None:
    torch.manual_seed(0)
    hp = {"width": 2, key: inside}  # narrow: the resnet at depth 34 stays quick
    model = create_model(name, 3, (1, 8, 8), **hp)
    out = model(torch.rand(2, 1, 8, 8))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    msg = error(tmp_path, f"[models.{name}.params]\n{key} = {outside}\n")
    assert msg.startswith(f"models.{name}.params.{key}: {outside!r} ")
    with pytest.raises(ConfigError, match=rf"model '{name}': {key} = {outside!r} "):
        create_model(name, 3, (1, 8, 8), **{key: outside})  # a trial's values are checked too


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_the_excluded_values_build_networks_that_ignore_their_input() -> None:
    # why width 0 and dropout 1 are rejected though the factories would build them
    x = torch.rand(2, 1, 8, 8)
    zero_width = small.mlp(3, (1, 8, 8), width=0).train()
    full_dropout = small.mlp(3, (1, 8, 8), dropout=1.0).train()
    for net in (zero_width, full_dropout):
        out = net(x)
        torch.testing.assert_close(out[0], out[1])  # the same output for two different images


@pytest.mark.parametrize("name", [n for n in list_models() if model_hparams(n) == ["weights"]])
def test_backbone_weights_must_be_a_string(tmp_path: Path, name: str) -> None:
    msg = error(tmp_path, f"[models.{name}.params]\nweights = 3\n")
    assert (
        msg == f"models.{name}.params.weights: 3 is not a string; '{name}' weights must be a string"
    )


# --- load-time messages: key path, value, what is valid ----------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "[models.mlp.space]\ndropout = { low = 0.0, high = 1.5 }\n",
            "models.mlp.space.dropout: the range's high end 1.5 is out of range; "
            "'mlp' dropout must be a float in [0, 1)",
        ),
        (
            "[models.cnn.params]\ndropout = -0.1\n",
            "models.cnn.params.dropout: -0.1 is out of range; "
            "'cnn' dropout must be a float in [0, 1)",
        ),
        (
            "[models.resnet.space]\ndepth = { choices = [10, 50] }\n",
            "models.resnet.space.depth: choice 50 is not valid; "
            "'resnet' depth must be one of [10, 18, 34]",
        ),
        (  # a range's grid point between its ends: 10, 18, 26, 34
            "[models.resnet.space]\ndepth = { low = 10, high = 34, step = 8 }\n",
            "models.resnet.space.depth: the range's value 26 is not valid; "
            "'resnet' depth must be one of [10, 18, 34]; "
            "a range gives every value in between: list them as choices",
        ),
        (
            "[models.mlp.params]\nwidth = 0\n",
            "models.mlp.params.width: 0 is out of range; 'mlp' width must be an int >= 1",
        ),
        (
            "[models.cnn.space]\nwidth = { choices = [16, 8.5] }\n",
            "models.cnn.space.width: choice 8.5 is not an int; 'cnn' width must be an int >= 1",
        ),
        (  # a float range gives floats, as Optuna draws them
            "[models.mlp.space]\nwidth = { low = 8.0, high = 64.0 }\n",
            "models.mlp.space.width: the range's low end 8.0 is not an int; "
            "'mlp' width must be an int >= 1",
        ),
        (  # a log range: its ends as given
            "[models.mlp.space]\ndropout = { low = 1e-3, high = 1.0, log = true }\n",
            "models.mlp.space.dropout: the range's high end 1.0 is out of range; "
            "'mlp' dropout must be a float in [0, 1)",
        ),
        (  # a stepped int range ends at its last grid point: 2, 5, 8 (a width of 9 is not drawn)
            "[models.mlp.space]\nwidth = { low = -1, high = 9, step = 3 }\n",
            "models.mlp.space.width: the range's low end -1 is out of range; "
            "'mlp' width must be an int >= 1",
        ),
    ],
)
def test_a_factory_value_the_space_can_produce_is_named(
    tmp_path: Path, body: str, expected: str
) -> None:
    assert error(tmp_path, body) == expected


def test_the_file_names_itself_in_a_train_key_error(tmp_path: Path) -> None:
    body = '[models.mlp.space]\noptimizer = { choices = ["sgd", "adam"] }\n'
    msg = error(tmp_path, body)
    assert msg.startswith(f"{tmp_path / 'study.toml'}: 1 error(s) in the study file\n")
    assert msg.splitlines()[1] == (
        "  models.mlp.space.optimizer: choice 'adam' is not a valid `train.optimizer`: "
        "Input should be 'adamw' or 'sgd'"
    )


def test_a_log_range_with_low_at_zero_is_rejected(tmp_path: Path) -> None:
    msg = error(tmp_path, "[models.mlp.space]\nlr = { low = 0.0, high = 0.1, log = true }\n")
    assert "models.mlp.space.lr: a log range needs `low > 0`, but got low=0.0" in msg


# --- rules across [train] keys, at the corners of the space ------------------------------------

RULE = "`cycles <= epochs` must hold for schedule = 'cosine_restarts'"


def test_more_cycles_than_the_fewest_epochs_is_found_at_load(tmp_path: Path) -> None:
    body = (
        '[train]\nschedule = "cosine_restarts"\n'
        "[models.mlp.params]\ncycles = 5\n[models.mlp.space]\nepochs = { low = 3, high = 30 }\n"
    )
    assert error(tmp_path, body).splitlines()[1] == (
        f"  models.mlp: space.epochs low end 3 with params.cycles = 5 breaks a [train] rule: "
        f"{RULE}, but got cycles=5, epochs=3"
    )


def test_a_corner_of_three_searched_keys_names_all_three(tmp_path: Path) -> None:
    body = (
        "[models.mlp.space]\n"
        'schedule = { choices = ["onecycle", "cosine_restarts"] }\n'
        "cycles = { low = 1, high = 4 }\n"
        "epochs = { low = 2, high = 10 }\n"
        "lr = { low = 1e-3, high = 1e-1, log = true }\n"  # no part of the rule: not named
    )
    assert error(tmp_path, body).splitlines()[1] == (
        "  models.mlp: space.schedule choice 'cosine_restarts' with space.cycles high end 4 and "
        f"space.epochs low end 2 breaks a [train] rule: {RULE}, but got cycles=4, epochs=2"
    )


def test_a_model_value_is_checked_with_the_models_own_values_not_the_train_section(
    tmp_path: Path,
) -> None:
    # [train] has 3 epochs, but this model trains 10: its 5 cycles fit
    body = (
        '[train]\nepochs = 3\nschedule = "cosine_restarts"\n'
        "[models.mlp.params]\ncycles = 5\nepochs = 10\n"
    )
    assert study(tmp_path, body).models["mlp"].params["cycles"] == 5


def test_beyond_4096_corners_each_key_is_still_checked_at_its_ends(tmp_path: Path) -> None:
    # 13 searched keys with 2 values each: 8192 corners; each key's ends, the others at their first
    two = {
        "lr": "{ low = 1e-3, high = 1e-1 }",
        "momentum": "{ low = 0.8, high = 0.9 }",
        "weight_decay": "{ low = 0.0, high = 1e-3 }",
        "label_smoothing": "{ low = 0.0, high = 0.1 }",
        "grad_clip": "{ low = 0.0, high = 1.0 }",
        "patience": "{ low = 0, high = 3 }",
        "batch_size": "{ choices = [32, 64] }",
        "freeze_epochs": "{ low = 0, high = 1 }",
        "backbone_lr_scale": "{ low = 0.1, high = 1.0 }",
        "class_weights": "{ choices = [false, true] }",
        "schedule": '{ choices = ["cosine_restarts", "onecycle"] }',
        "epochs": "{ low = 3, high = 30 }",
        "cycles": "{ low = 1, high = 5 }",
    }
    body = "[models.mlp.space]\n" + "".join(f"{k} = {v}\n" for k, v in two.items())
    assert error(tmp_path, body).splitlines()[1] == (
        "  models.mlp: space.schedule choice 'cosine_restarts' with space.epochs low end 3 and "
        f"space.cycles high end 5 breaks a [train] rule: {RULE}, but got cycles=5, epochs=3"
    )


def test_corners_are_the_full_product_up_to_the_limit_then_one_key_at_a_time() -> None:
    values = {k: [Value(0, "low end"), Value(1, "high end"), Value(2, "choice")] for k in "abc"}
    assert len(list(corners(values, limit=27))) == 27  # 3 * 3 * 3
    per_key = list(corners(values, limit=26))
    assert len(per_key) == 9  # 3 keys x 3 values
    assert {"a": 0, "b": 2, "c": 0} in [{k: v.value for k, v in c.items()} for c in per_key]


def test_a_valid_study_at_every_boundary_loads(tmp_path: Path) -> None:
    body = """
[train]
schedule = "cosine_restarts"
[models.mlp.params]
cycles = 3
[models.mlp.space]
width = { choices = [1, 8] }
depth = { low = 1, high = 3 }
dropout = { low = 0.0, high = 0.9 }
epochs = { low = 3, high = 10 }
[models.resnet.space]
depth = { choices = [10, 18, 34] }
width = { low = 1, high = 64, log = true }
[models.resnet18.params]
weights = ""
"""
    cfg = study(tmp_path, body)
    assert cfg.models["resnet"].space["depth"].choices == (10, 18, 34)  # type: ignore[union-attr]


# --- the CLI: one line, exit 2, nothing written ------------------------------------------------


def test_the_cli_names_the_key_and_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        f'name = "x"\noutput_dir = "{tmp_path / "runs"}"\n'
        "[models.mlp.space]\ndropout = { low = 0.0, high = 1.5 }\n"
    )
    result = run_cli("study", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    said = " ".join(result.stdout.split())  # rich wraps long lines
    assert said == (
        f"error: {bad}: models.mlp.space.dropout: the range's high end 1.5 is out of range; "
        "'mlp' dropout must be a float in [0, 1)"
    )
    assert not (tmp_path / "runs").exists()
