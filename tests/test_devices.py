"""Devices: which GPU a worker trains on, how many workers a GPU host runs, and an out-of-memory
error that fails a trial with what to change. This machine has no GPU: the CUDA side is driven
through the GPU count and an out-of-memory error raised by the model, not run on a device."""

from __future__ import annotations

import os

import pytest
import torch

from workbench import runtime
from workbench.config import TrainConfig
from workbench.errors import TrainingError
from workbench.models import create_model
from workbench.train import fit


def test_worker_i_trains_on_gpu_i_mod_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "gpu_count", lambda: 2)
    devices = [str(runtime.select_device("auto", worker=i)) for i in range(5)]
    assert devices == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert str(runtime.select_device("cuda", worker=3)) == "cuda:1"
    assert str(runtime.select_device("cpu", worker=1)) == "cpu"
    assert runtime.default_workers("auto", per_gpu=3) == 6  # 3 trials share each GPU
    assert runtime.default_workers("cpu", per_gpu=3) == len(os.sched_getaffinity(0))


def test_no_gpu_means_the_cpu_or_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "gpu_count", lambda: 0)
    assert str(runtime.select_device("auto", worker=1)) == "cpu"
    assert runtime.default_workers("auto", per_gpu=4) == len(os.sched_getaffinity(0))
    with pytest.raises(RuntimeError, match="device = 'cuda' but no CUDA device is visible"):
        runtime.select_device("cuda")


def test_out_of_memory_fails_the_trial_with_batch_and_image_size() -> None:
    model = create_model("cnn", 3, (3, 8, 8), width=4, depth=1)

    def too_big(module: torch.nn.Module, args: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model.net.register_forward_pre_hook(too_big)
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 3, (32,))
    with pytest.raises(TrainingError) as info:
        fit(model, (x, y), (x, y), TrainConfig(epochs=1, batch_size=16))
    message = str(info.value)
    assert "out of memory" in message and "batch_size = 16 of 3x8x8 images" in message
    assert "lower train.batch_size" in message


def test_amp_is_a_declared_choice() -> None:
    assert TrainConfig().amp == "bf16" and TrainConfig(amp="fp16").amp == "fp16"
    with pytest.raises(ValueError, match="'bf16', 'fp16' or 'off'"):
        TrainConfig(amp="int8")
