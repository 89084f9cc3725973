"""The study file: every bad input gets an error naming the file, the key path and the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.config import (
    Choice,
    FloatRange,
    IntRange,
    StudyConfig,
    fingerprint,
    load_study,
    resolved,
    resume_key,
)
from workbench.errors import ConfigError
from workbench.models import check_models

ROOT = Path(__file__).resolve().parents[1]
GOOD = """
name = "t"
[models.cnn.space]
lr = { low = 1e-4, high = 1e-2, log = true }
width = { choices = [8, 16] }
depth = { low = 1, high = 3 }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("study", sorted((ROOT / "studies").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_study_files_load_and_name_registered_models(study: Path) -> None:
    cfg = load_study(study)
    check_models(cfg)
    assert cfg.models


def test_space_kinds_are_read_from_the_toml_types(tmp_path: Path) -> None:
    cfg = load_study(write(tmp_path, GOOD))
    space = cfg.models["cnn"].space
    assert isinstance(space["lr"], FloatRange) and space["lr"].log
    assert isinstance(space["depth"], IntRange) and (space["depth"].low, space["depth"].high) == (
        1,
        3,
    )
    assert isinstance(space["width"], Choice) and space["width"].choices == (8, 16)
    # defaults are filled in, and the config is frozen
    assert cfg.cv.folds == 5 and cfg.train.optimizer == "adamw"
    with pytest.raises(Exception, match="frozen"):
        cfg.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        # TOML syntax error: line and column
        ('name = "t"\n[models.cnn\n', r"study\.toml: TOML syntax error: .*line 2"),
        # unknown key, with the closest known one suggested
        (GOOD + "[train]\nepoch = 3\n", r"train\.epoch: unknown key; did you mean 'epochs'\?"),
        # [distill]: a model section of the study, and its params checked as [train] keys
        (
            GOOD + '[distill]\nmodel = "vit"\n',
            r"distill\.model = 'vit' is not a model section; the study's models: \['cnn'\]",
        ),
        (
            GOOD + '[distill]\nmodel = "cnn"\nparams = { epochs = 0 }\n',
            r"distill\.params\.epochs: 0 is not a valid `train\.epochs`",
        ),
        (GOOD + '[ensemble]\ntta = ["hflip", "spin"]\n', r"'spin' is not a test-time view"),
        (GOOD + "[cv]\nfold = 3\n", r"cv\.fold: unknown key; did you mean 'folds'\?"),
        # unknown key inside a search-space entry
        (
            GOOD.replace("log = true", "logg = true"),
            r"models\.cnn\.space\.lr\.logg: unknown key; did you mean 'log'",
        ),
        # wrong type
        (GOOD + '[cv]\nfolds = "five"\n', r"cv\.folds: .*valid integer.*'five'"),
        (GOOD + '[train]\nlr = "fast"\n', r"train\.lr: .*'fast'"),
        # low > high names the path and both values
        (
            GOOD.replace("low = 1, high = 3", "low = 4, high = 3"),
            r"models\.cnn\.space\.depth: .*low <= high.*low=4, high=3",
        ),
        (
            GOOD.replace("low = 1e-4", "low = 0.0"),
            r"models\.cnn\.space\.lr: a log range needs `low > 0`",
        ),
        # an invalid value of a searched [train] key
        (
            GOOD + '[models.cnn.params]\noptimizer = "adam"\n',
            r"models\.cnn\.params\.optimizer: 'adam' is not a valid `train\.optimizer`",
        ),
        # out-of-range values
        (GOOD + "[cv]\nfolds = 1\n", r"cv\.folds: .*greater than or equal to 2"),
        # empty choices, and missing name
        (GOOD.replace("[8, 16]", "[]"), r"models\.cnn\.space\.width\.choices"),
        ("[models.cnn]\n", r"name: required key is missing"),
        # trial files kept in MLflow need MLflow
        (
            GOOD + '[tracking]\nenabled = false\nartifacts = "mlflow"\n',
            r"tracking: .*artifacts = 'mlflow' keeps trial files in MLflow, but tracking\.enabled",
        ),
        (GOOD + '[tracking]\nartifacts = "s3"\n', r"tracking\.artifacts: .*'local' or 'mlflow'"),
        # photo folders and augmentation
        (
            GOOD + '[data]\nsource = "folder"\nimage_size = 0\n',
            r"data\.image_size: an int \(a square\) or \[height, width\], each >= 1.*got 0",
        ),
        (
            GOOD + '[data.augment]\nauto_augment = "auto"\n',
            r"data\.augment\.auto_augment: .*'none', 'trivial' or 'rand'",
        ),
        (
            GOOD + "[data.augment]\nrotate = 10\n",
            r"data\.augment\.rotate: unknown key; did you mean 'rotation'",
        ),
        (
            GOOD.replace("depth = {", "mixup = { low = -0.5, high = 0.4 }\ndepth = {"),
            r"models\.cnn\.space\.mixup: the range's low end -0\.5 is not a valid "
            r"`data\.augment\.mixup`: "
            r".*greater than or equal to 0",
        ),
    ],
)
def test_bad_study_files_name_the_culprit(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_study(write(tmp_path, text))
    assert str(tmp_path / "study.toml") in str(info.value)


def test_augmentation_keys_are_searchable_per_model(tmp_path: Path) -> None:
    text = GOOD.replace("depth = {", "mixup = { low = 0.0, high = 0.4 }\ndepth = {")
    text += '[models.cnn.params]\nauto_augment = "trivial"\n'
    cfg = load_study(write(tmp_path, text))
    check_models(cfg)  # augmentation keys are known to every model
    assert cfg.models["cnn"].params["auto_augment"] == "trivial"


def test_a_per_model_error_names_its_key_not_the_whole_file(tmp_path: Path) -> None:
    text = GOOD + '[models.cnn.params]\noptimizer = "adam"\n'
    with pytest.raises(ConfigError) as info:
        load_study(write(tmp_path, text))
    assert "(top level)" not in str(info.value) and "'models':" not in str(info.value)


def test_missing_study_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: study file not found"):
        load_study(tmp_path / "nope.toml")


def test_unknown_model_lists_the_registry(tmp_path: Path) -> None:
    cfg = load_study(write(tmp_path, GOOD + "[models.vit]\n"))
    with pytest.raises(
        ConfigError,
        match=r"models\.vit: unknown model 'vit'; registered models: \['cnn', 'convnext_tiny', ",
    ):
        check_models(cfg)


def test_unknown_hyperparameter_of_a_model(tmp_path: Path) -> None:
    cfg = load_study(write(tmp_path, GOOD.replace("width =", "widht =")))
    with pytest.raises(
        ConfigError,
        match=r"models\.cnn\.space\.widht: 'cnn' has no hyperparameter 'widht'; "
        r"did you mean 'width'",
    ):
        check_models(cfg)


def test_trials_override_sets_every_model(tmp_path: Path) -> None:
    cfg = load_study(write(tmp_path, GOOD + "[models.mlp]\ntrials = 9\n"), trials=3)
    assert cfg.trials_for("cnn") == 3 and cfg.trials_for("mlp") == 3


def test_resume_key_ignores_trial_counts_but_not_the_space(tmp_path: Path) -> None:
    a = load_study(write(tmp_path, GOOD))
    b = load_study(write(tmp_path, GOOD), trials=50)
    c = load_study(write(tmp_path, GOOD.replace("high = 1e-2", "high = 1e-1")))
    assert resume_key(a) == resume_key(b)
    assert resume_key(a) != resume_key(c)
    assert fingerprint(resolved(a)) != fingerprint(resolved(b))  # the full config does differ
    assert StudyConfig.model_validate(resolved(a)) == a  # the resolved dump round-trips


# every number read from a study file is finite: TOML's inf, -inf and nan are refused at load,
# named by their key path, wherever they stand (a key, a range's end, a choice, a fixed value)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize(
    ("snippet", "where"),
    [
        ("[train]\nlr = {v}\n", "train.lr"),
        ("[data.augment]\nrotation = {v}\n", "data.augment.rotation"),
        ("[models.cnn.space]\nlr = {{ low = 1e-4, high = {v} }}\n", "models.cnn.space.lr.high"),
        ("[models.cnn.space]\nlr = {{ low = {v}, high = 1.0 }}\n", "models.cnn.space.lr.low"),
        ("[models.cnn.space]\nlr = {{ choices = [0.1, {v}] }}\n", "models.cnn.space.lr.choices.1"),
        ("[models.cnn]\nparams = {{ dropout = {v} }}\n", "models.cnn.params.dropout"),
        ("[search]\npercentile = {v}\n", "search.percentile"),
    ],
)
def test_a_number_that_is_not_finite_is_refused_naming_its_key(
    tmp_path: Path, snippet: str, where: str, value: str
) -> None:
    models = "" if "[models.cnn" in snippet else "[models.cnn]\n"  # a study needs a model
    path = write(tmp_path, f'name = "t"\n{snippet.format(v=value)}{models}')
    with pytest.raises(ConfigError) as e:
        load_study(path)
    assert str(e.value) == (
        f"{path}: 1 error(s) in the study file\n  {where}: {float(value)!r} is not a finite "
        f"number; give a number (TOML's inf and nan are refused)"
    )
