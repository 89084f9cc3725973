"""The training loop and checkpoints, on real digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.config import AugmentConfig, TrainConfig
from workbench.data import Rows, channel_stats
from workbench.errors import CheckpointError
from workbench.models import create_model
from workbench.train import Interrupted, fit, load_model, predict_proba, save_checkpoint


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(d.target)


def split(digits: tuple[torch.Tensor, torch.Tensor]) -> tuple:
    x, y = digits
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def model_for(x: torch.Tensor, name: str = "cnn", **hp: object) -> torch.nn.Module:
    mean, std = channel_stats(x)
    torch.manual_seed(0)
    return create_model(name, 10, (1, 8, 8), mean, std, **{"width": 8, **hp})


def test_fit_learns_digits_and_reports_every_epoch(digits: tuple) -> None:
    train, val = split(digits)
    model = model_for(train[0])
    seen: list[tuple[int, dict[str, float]]] = []
    cfg = TrainConfig(epochs=4, lr=1e-2)
    result = fit(model, train, val, cfg, on_epoch=lambda e, m: seen.append((e, m)))
    assert [e for e, _ in seen] == [0, 1, 2, 3]
    assert set(seen[0][1]) == {"train_loss", "val_loss", "val_accuracy", "lr"}
    assert seen[-1][1]["train_loss"] < seen[0][1]["train_loss"]
    assert result.history[-1]["val_accuracy"] > 0.85  # 4 epochs of a width-8 CNN
    proba = predict_proba(model, val[0])
    assert proba.shape == (397, 10)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
    assert result.images_per_second > 0


def test_a_refit_trains_without_validation_rows_and_keeps_the_last_epoch(digits: tuple) -> None:
    """A refit on every training row (search/followups.py) has nothing to score or stop on: each
    epoch reports its training loss and learning rate only, the model holds the last epoch's
    weights, and early stopping, which needs validation rows, is refused."""
    train, val = split(digits)
    model = model_for(train[0])
    result = fit(model, train, None, TrainConfig(epochs=3, lr=1e-2))
    assert [set(e) for e in result.history] == [{"train_loss", "lr"}] * 3
    assert result.best_epoch == 2
    assert np.mean(predict_proba(model, val[0]).argmax(1) == val[1].numpy()) > 0.8  # it learnt
    with pytest.raises(ValueError, match="patience = 2 stops on validation loss"):
        fit(model_for(train[0]), train, None, TrainConfig(epochs=3, patience=2))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "cosine_restarts", "constant"])
def test_every_optimizer_and_schedule_trains(digits: tuple, optimizer: str, schedule: str) -> None:
    train, val = split(digits)
    model = model_for(train[0], "mlp", width=64)
    cfg = TrainConfig(
        epochs=2,
        lr=0.05 if optimizer == "sgd" else 5e-3,
        optimizer=optimizer,
        schedule=schedule,
        label_smoothing=0.1,
        grad_clip=1.0,
        class_weights=True,
    )
    result = fit(model, train, val, cfg, augment=AugmentConfig(shift=1))
    assert result.history[-1]["val_accuracy"] > 0.5


def test_early_stopping_restores_the_lowest_val_loss_epoch(digits: tuple) -> None:
    train, val = split(digits)
    model = model_for(train[0], "mlp", width=64)
    # a constant, too-high learning rate makes val loss bounce: patience 1 must stop early
    cfg = TrainConfig(epochs=30, lr=0.05, schedule="constant", patience=1)
    result = fit(model, train, val, cfg)
    losses = [h["val_loss"] for h in result.history]
    assert len(losses) < 30
    assert result.best_epoch == int(np.argmin(losses))
    from workbench.train import evaluate

    assert evaluate(model, Rows.of(*val))[0] == pytest.approx(min(losses), rel=1e-5)


def test_cosine_restarts_keeps_one_snapshot_per_cycle(digits: tuple) -> None:
    train, val = split(digits)
    model = model_for(train[0], "mlp", width=32)
    result = fit(model, train, val, TrainConfig(epochs=6, schedule="cosine_restarts", cycles=3))
    assert len(result.snapshots) == 3
    first, last = result.snapshots[0], result.snapshots[-1]
    assert not torch.equal(first["net.1.weight"], last["net.1.weight"])


def test_should_stop_interrupts_at_an_epoch_boundary(digits: tuple) -> None:
    train, val = split(digits)
    epochs: list[int] = []
    with pytest.raises(Interrupted, match="after epoch 1"):
        fit(
            model_for(train[0]),
            train,
            val,
            TrainConfig(epochs=5),
            on_epoch=lambda e, m: epochs.append(e),
            should_stop=lambda: True,
        )
    assert epochs == [0]


def test_same_seed_same_weights(digits: tuple) -> None:
    train, val = split(digits)
    runs = []
    for _ in range(2):
        model = model_for(train[0])
        fit(
            model,
            train,
            val,
            TrainConfig(epochs=1),
            augment=AugmentConfig(shift=1),
            generator=torch.Generator().manual_seed(7),
        )
        runs.append(predict_proba(model, val[0]))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_checkpoint_round_trip_and_corruption(digits: tuple, tmp_path: Path) -> None:
    train, val = split(digits)
    model = model_for(train[0], "cnn", depth=1)
    meta = {
        "arch": "cnn",
        "num_classes": 10,
        "in_shape": [1, 8, 8],
        "hparams": {"width": 8, "depth": 1},
    }
    path = save_checkpoint(tmp_path / "fold-0.pt", model, meta)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temp file left behind
    again = load_model(path)
    np.testing.assert_array_equal(predict_proba(model, val[0]), predict_proba(again, val[0]))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"fold-0\.pt is truncated or corrupt"):
        load_model(path)
    with pytest.raises(CheckpointError, match=r"missing\.pt is missing"):
        load_model(tmp_path / "missing.pt")


def test_a_run_too_short_for_one_cycle_warm_up_still_trains(digits: tuple) -> None:
    """4 steps in all: torch's OneCycleLR divides by zero there; workbench anneals instead."""
    train, val = split(digits)
    small = (train[0][:256], train[1][:256])
    result = fit(
        model_for(small[0], "mlp", width=16),
        small,
        val,
        TrainConfig(epochs=1, batch_size=64, schedule="onecycle"),
    )
    assert len(result.history) == 1
