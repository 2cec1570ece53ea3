"""GPU paths: bf16 autocast, channels_last, the dataset cached on the device, device choice.

Marked `gpu`: deselected by default (see pyproject's addopts) and skipped without CUDA.
Run on a GPU machine with: pytest -m gpu
"""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
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
    result = pretrain(
        PretrainConfig(
            model="test_resnet",
            epochs=2,
            batch_size=64,
            max_steps_per_epoch=5,
            device="cuda",
            precision=precision,
            channels_last=True,
            cache="device",
            out=str(tmp_path / precision),
        )
    )
    assert result.device.startswith("cuda")
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"] * 1.5  # trains, does not diverge


def test_probe_runs_on_the_gpu(tmp_path):
    run = tmp_path / "run"
    pretrain(
        PretrainConfig(model="test_resnet", epochs=1, batch_size=64, max_steps_per_epoch=3, device="cuda", out=str(run))
    )
    result = CliRunner().invoke(app, ["probe", str(run), "--epochs", "2", "--device", "cuda", "--json"])
    assert result.exit_code == 0, result.output
    assert "cuda" in json.loads(result.stdout)["device"]


def test_probe_heads_on_the_gpu_compute_what_they_compute_on_the_cpu():
    # on CUDA the rows are one padded batched matmul, on the CPU one matmul per row: the same heads
    from rotnet_cli.head_training import StackedLinear

    layer = StackedLinear([64, 128, 512, 512], 10)
    x = torch.randn(256, 64 + 128 + 512 + 512)
    on_cpu = layer(x)
    on_gpu = layer.cuda()(x.cuda()).cpu()
    assert torch.allclose(on_gpu, on_cpu, atol=2e-2, rtol=1e-2)  # TF32 matmuls on the GPU


@pytest.mark.parametrize("source", ["digits", "folder"])
def test_a_gpu_training_step_never_synchronises_with_the_host(tmp_path, source):
    # CUDA's sync debug mode warns at every operation that makes the host wait for the GPU.
    # With --log-every above the epoch length, 9 steps must warn exactly as often as 3:
    # nothing in a step (data, augmentation, rotation, model, optimizer, sums) waits.
    data = "digits"
    if source == "folder":  # streamed by loader workers into pinned memory
        folder = tmp_path / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(160):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        data = str(folder)

    def sync_warnings(steps: int) -> int:
        cfg = PretrainConfig(
            model="test_resnet",
            data=data,
            img_size=32,
            epochs=1,
            batch_size=16,
            max_steps_per_epoch=steps,
            log_every=1000,
            device="cuda",
            cache="none" if source == "folder" else "auto",
            workers=2,
            out=str(tmp_path / f"run-{steps}"),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                pretrain(cfg)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    sync_warnings(2)  # cuDNN autotuning and first-use allocations happen once per process
    assert sync_warnings(9) == sync_warnings(3)
