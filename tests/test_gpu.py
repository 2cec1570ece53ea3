"""GPU paths: bf16 autocast, channels_last, the dataset cached on the device, device choice.

Marked `gpu`: deselected by default (see pyproject's addopts) and skipped without CUDA.
Run on a GPU machine with: pytest -m gpu
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from rotnet_cli.cli import app
from rotnet_cli.config import PretrainConfig
from rotnet_cli.pretraining import pretrain
from rotnet_cli.runtime import describe_device, resolve_device, resolve_precision

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_auto_device_and_precision_pick_the_gpu_and_bf16():
    device = resolve_device("auto")
    assert device.type == "cuda"
    assert resolve_precision("auto", device) == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert torch.cuda.get_device_name(device) in describe_device(device)
    assert resolve_device("0") == torch.device("cuda:0")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pretrain_on_the_gpu_with_channels_last_and_device_cache(tmp_path, precision):
    result = pretrain(PretrainConfig(
        model="test_resnet", epochs=2, batch_size=64, max_steps_per_epoch=5, device="cuda", precision=precision,
        channels_last=True, cache="device", out=str(tmp_path / precision),
    ))
    assert result.device.startswith("cuda")
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"] * 1.5  # trains, does not diverge


def test_probe_runs_on_the_gpu(tmp_path):
    run = tmp_path / "run"
    pretrain(PretrainConfig(model="test_resnet", epochs=1, batch_size=64, max_steps_per_epoch=3, device="cuda", out=str(run)))
    result = CliRunner().invoke(app, ["probe", str(run), "--epochs", "2", "--device", "cuda", "--json"])
    assert result.exit_code == 0, result.output
    assert "cuda" in json.loads(result.stdout)["device"]
