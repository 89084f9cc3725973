"""Pretrained torchvision backbones: weights read from files the tests make (torchvision networks
with seeded random weights, saved as state dicts), fine-tuning, and every registered backbone.
Expected tensors come from the saved files and torchvision itself, not from workbench."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torchvision.models import get_model, get_weight

from workbench.config import TrainConfig
from workbench.errors import ConfigError
from workbench.models import create_model
from workbench.models.backbones import MIN_SIZE
from workbench.train import fit, load_model, save_checkpoint


def weights_file(path: Path, arch: str = "resnet18", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(get_model(arch, weights=None).state_dict(), path)
    return path


def test_weights_from_a_file_are_the_backbone(tmp_path: Path) -> None:
    path = weights_file(tmp_path / "r18.pth")
    saved = torch.load(path, weights_only=True)
    model = create_model("resnet18", 5, (3, 32, 32), weights=str(path))
    state = model.net.state_dict()
    for name, tensor in saved.items():
        if not name.startswith("fc."):
            assert torch.equal(state[name], tensor), name
    assert state["fc.weight"].shape == (5, 512)  # the head: this study's classes
    assert model.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert model.std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])
    assert {id(p) for p in model.head.parameters()} == {
        id(model.net.fc.weight),
        id(model.net.fc.bias),
    }


def test_a_weights_name_is_found_under_torch_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    filename = Path(get_weight(name).url).name
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError) as info:
        create_model("mobilenet_v3_small", 3, (3, 32, 32), weights=name)
    where = tmp_path / "torch" / "hub" / "checkpoints" / filename
    assert f"weights file {where} not found" in str(info.value)
    assert "torchvision.models.mobilenet_v3_small(weights=" in str(info.value)
    weights_file(where, "mobilenet_v3_small", seed=1)
    model = create_model("mobilenet_v3_small", 3, (3, 32, 32), weights=name)
    saved = torch.load(where, weights_only=True)
    assert torch.equal(model.net.features[0][0].weight, saved["features.0.0.weight"])
    mean = get_weight(name).transforms().mean
    assert model.mean.flatten().tolist() == pytest.approx(mean)


def test_a_missing_file_and_another_architecture_each_give_one_message(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match=rf"weights file {re.escape(str(missing))} not found"):
        create_model("resnet18", 3, (3, 32, 32), weights=str(missing))
    r50 = weights_file(tmp_path / "r50.pth", "resnet50")
    with pytest.raises(ConfigError) as info:
        create_model("resnet18", 3, (3, 32, 32), weights=str(r50))
    # conv1 and bn1 agree; resnet50's first block starts with a 1x1 convolution
    assert "layer 'layer1.0.conv1.weight' has shape (64, 64, 1, 1) in the file" in str(info.value)
    assert "(64, 64, 3, 3) in resnet18" in str(info.value)
    with pytest.raises(ConfigError, match="neither a torchvision weights name"):
        create_model("resnet18", 3, (3, 32, 32), weights="ResNet18_Weights.NOPE")


def test_one_channel_input_sums_the_first_convolution_over_rgb(tmp_path: Path) -> None:
    path = weights_file(tmp_path / "r18.pth")
    saved = torch.load(path, weights_only=True)
    model = create_model("resnet18", 4, (1, 28, 28), weights=str(path))
    expected = saved["conv1.weight"].sum(dim=1, keepdim=True)
    torch.testing.assert_close(model.net.conv1.weight, expected)
    assert model.mean.numel() == 1 and model(torch.rand(2, 1, 28, 28)).shape == (2, 4)


def test_frozen_backbone_stays_bit_identical_then_learns(tmp_path: Path) -> None:
    path = weights_file(tmp_path / "r18.pth")
    model = create_model("resnet18", 3, (3, 32, 32), weights=str(path))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 32, 32, generator=g), torch.randint(0, 3, (64,), generator=g)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    seen: list[dict[str, torch.Tensor]] = []

    def snapshot(epoch: int, metrics: dict[str, float]) -> None:
        seen.append({k: v.clone() for k, v in model.net.state_dict().items()})

    cfg = TrainConfig(epochs=2, batch_size=16, freeze_epochs=1, backbone_lr_scale=0.1)
    fit(model, (x, y), (x[:16], y[:16]), cfg, on_epoch=snapshot)
    frozen, thawed = seen
    backbone = [k for k in before if not k.startswith("fc.")]
    for k in backbone:  # weights and BatchNorm running statistics alike
        assert torch.equal(frozen[k], before[k]), f"{k} changed while frozen"
    assert not torch.equal(frozen["fc.weight"], before["fc.weight"])  # the head learnt
    changed = [
        k for k in backbone if k.endswith("weight") and not torch.equal(thawed[k], before[k])
    ]
    assert "conv1.weight" in changed and "layer4.1.conv2.weight" in changed


def test_a_checkpoint_rebuilds_without_the_weights_file(tmp_path: Path) -> None:
    path = weights_file(tmp_path / "r18.pth")
    model = create_model("resnet18", 3, (3, 16, 16), weights=str(path)).eval()
    meta = {"arch": "resnet18", "num_classes": 3, "in_shape": [3, 16, 16]}
    ckpt = save_checkpoint(
        tmp_path / "fold-0.pt", model, {**meta, "hparams": {"weights": str(path)}}
    )
    path.unlink()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_model(ckpt)(x), model(x))


def test_small_inputs_are_upsized_to_what_the_backbone_needs() -> None:
    model = create_model("convnext_tiny", 7, (1, 12, 12))  # random weights, grey 12x12
    assert model.min_size == MIN_SIZE == 32
    seen: list[tuple[int, ...]] = []
    model.net.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    assert model(torch.rand(2, 1, 12, 12)).shape == (2, 7)
    assert seen == [(2, 1, 32, 32)]


RESNET18 = """[models.resnet18.params]
weights = "{weights}"
freeze_epochs = 1
epochs = 3
[models.resnet18.space]
lr = {{ low = 1e-3, high = 3e-3, log = true }}
backbone_lr_scale = {{ low = 0.1, high = 1.0, log = true }}"""

LOAD = """
import sys, numpy as np, mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
table = model.predict(np.random.default_rng(0).random((3, 3, 24, 24)).astype(np.float32))
print(list(table.columns), table.shape)
"""


def test_a_fine_tuned_resnet18_study_runs_and_its_model_loads_without_the_weights(
    tmp_path: Path,
) -> None:
    import json
    import os
    import subprocess
    import sys

    from conftest import CLI_ENV, run_cli
    from test_photo_studies import study_file, write_photos

    photos = tmp_path / "photos"
    write_photos(photos, per_class=30)
    weights = weights_file(tmp_path / "weights" / "resnet18.pth")
    models = RESNET18.format(weights=weights)
    file = study_file(tmp_path, "pretrained", photos, "image_size = 24", "", models)
    result = run_cli("study", str(file), "--workers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "runs" / "pretrained"
    final = json.loads((out / "ensemble" / "final" / "ensemble.json").read_text())
    assert final["in_shape"] == [3, 24, 24] and final["members"]
    link = json.loads((out / "ensemble" / "mlflow.json").read_text())
    weights.unlink()  # the model must not need it
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    env = {**CLI_ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{out.parent / 'mlflow.db'}"}
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD, link["model_uri"]],
        cwd=fresh,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    classes = final["classes"]  # 3 photo classes: label, its probability, one column each
    columns = ["label", "probability", *[f"p_{c}" for c in classes]]
    assert loaded.stdout.strip().splitlines()[-1] == f"{columns} (3, 5)"
    assert os.path.exists(out / "ensemble" / "final")
