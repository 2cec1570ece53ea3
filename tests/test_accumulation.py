"""--accum-steps and the global batch: what a user who trades memory for steps relies on.

A model without BatchNorm trained with N micro-batches of b per step must end where one step of
N*b ends (the same images, crops and rotations, the same lr schedule); a run stopped between
optimizer steps resumes to the same weights; config.json and the start line say the global
batch and the learning rate in use.
"""

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from rotnet_cli.cli import app
from rotnet_cli.config import PretrainConfig
from rotnet_cli.errors import ConfigError, Interrupted
from rotnet_cli.pretraining import micro_batches, pretrain

# test_vit has LayerNorms only: its gradient over a batch is the sum of its micro-batches' gradients
FAST = dict(model="test_vit", img_size=32, max_steps_per_epoch=3, workers=0, device="cpu", val_split=0.05, lr=0.05)


def weights(run) -> dict[str, torch.Tensor]:
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_n_micro_batches_of_b_train_like_one_step_of_n_times_b(tmp_path):
    accumulated = pretrain(PretrainConfig(**FAST, epochs=1, batch_size=8, accum_steps=4, out=str(tmp_path / "a")))
    whole = pretrain(PretrainConfig(**FAST, epochs=1, batch_size=32, out=str(tmp_path / "w")))
    pretrain(PretrainConfig(**FAST, epochs=1, batch_size=8, out=str(tmp_path / "s")))
    a, w, s = weights(tmp_path / "a"), weights(tmp_path / "w"), weights(tmp_path / "s")
    for key in w:
        torch.testing.assert_close(a[key], w[key], atol=2e-5, rtol=1e-4)
    assert any((s[k] - w[k]).abs().max() > 1e-3 for k in w)  # without accumulation, 8 images per step differ
    assert accumulated.history[0]["loss"] == pytest.approx(whole.history[0]["loss"], rel=1e-5)
    assert accumulated.history[0]["lr"] == whole.history[0]["lr"]  # the schedule counts optimizer steps


def test_a_run_stopped_between_optimizer_steps_resumes_to_the_same_weights(tmp_path):
    cfg = dict(**FAST, epochs=1, batch_size=8, accum_steps=2)
    pretrain(PretrainConfig(**cfg, out=str(tmp_path / "full")))
    with pytest.raises(Interrupted):  # asked to stop after the first optimizer step (2 micro-batches)
        pretrain(PretrainConfig(**cfg, out=str(tmp_path / "part")), should_stop=lambda: True)
    pretrain(PretrainConfig(**cfg, out=str(tmp_path / "part"), resume=True))
    full, part = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(full[k], part[k]) for k in full)


def test_config_and_start_line_state_the_global_batch_and_the_lr_in_use(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--model", "test_vit", "--img-size", "32", "--epochs", "1", "--max-steps-per-epoch", "1"]
    args += ["--device", "cpu", "--workers", "0", "-b", "16", "--accum-steps", "4", "--lr-scale", "linear"]
    args += ["--lr", "0.1", "--lr-ref-batch", "128", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "global batch 64 images per optimizer step (16 per process x 1 process x 4 accumulation steps)" in (
        result.output
    )
    assert "peak lr 0.05" in result.output  # 0.1 x 64 / 128
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["accum_steps"] == 4 and record["config"]["lr_scale"] == "linear"
    assert record["resolved"]["global_batch"] == 64 and record["resolved"]["lr"] == pytest.approx(0.05)


def test_lr_scale_defaults_to_none_and_sqrt_scales_by_the_root():
    assert PretrainConfig(batch_size=512, lr=0.1).resolved_lr == 0.1  # today's runs are unchanged
    assert PretrainConfig(batch_size=128, accum_steps=4, lr=0.1, lr_scale="sqrt").resolved_lr == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="--accum-steps"):
        PretrainConfig(accum_steps=0)
    with pytest.raises(ConfigError, match="--lr-scale"):
        PretrainConfig(lr_scale="cubic")


def test_micro_batches_keep_every_copy_of_an_image_together():
    # 4 rotations x 6 images, rotation-major: row j is image j % 6; 3 micro-batches of 2 images
    parts = micro_batches(24, 6, 3)
    assert [sorted({int(r) % 6 for r in p}) for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert sorted(torch.cat(parts).tolist()) == list(range(24))
    assert [len(p) for p in micro_batches(5, 5, 2)] == [3, 2]  # an uneven streamed batch: a smaller last part


def test_lr_ref_batch_without_lr_scale_is_a_usage_error_not_silently_ignored(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["pretrain", "--lr-ref-batch", "256", "--out", str(out)])
    assert result.exit_code == 2 and "--lr-scale linear or sqrt" in " ".join(result.output.split())
    assert not out.exists()
    (tmp_path / "c.yaml").write_text("lr_ref_batch: 256\n")  # the same from a --config file
    result = CliRunner().invoke(app, ["pretrain", "--config", str(tmp_path / "c.yaml"), "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()
