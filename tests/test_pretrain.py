"""rotnet pretrain as a user runs it: the run directory, learning, models, resume, errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import files_in
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from rotnet_cli.cli import app
from rotnet_cli.config import PretrainConfig
from rotnet_cli.errors import Interrupted
from rotnet_cli.pretraining import pretrain

FAST = dict(model="test_resnet", batch_size=32, max_steps_per_epoch=3, workers=0, device="cpu")
METRIC_FIELDS = {"epoch", "loss", "rot_acc", "val_loss", "val_rot_acc", "lr", "images_per_s", "seconds"}


def test_run_directory_has_every_documented_file(tiny_run_with_summary):
    out, summary = tiny_run_with_summary
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "metrics.jsonl",
        "checkpoint.pt",
        "model.safetensors",
        "logs",
    }
    assert [p.name for p in (out / "logs").iterdir()] == ["scalars.csv"]  # --logger csv, the default
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["model"] == "test_resnet" and config["config"]["rotations"] == [0, 180]
    assert {"torch", "timm", "rotnet"} <= set(config["versions"]) and config["started"] and config["command"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and METRIC_FIELDS <= set(rows[0]) and rows[0]["epoch"] == 1
    assert 0 <= rows[0]["val_rot_acc"] <= 1 and rows[0]["images_per_s"] > 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # no code is unpickled
    assert {"model", "optimizer", "scaler", "epoch", "step", "rng", "config"} <= set(state) and state["epoch"] == 1
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["model"] == "test_resnet" and json.loads(meta["rotations"]) == [0, 180]
    assert (
        json.loads(meta["img_size"]) == 32 and len(json.loads(meta["mean"])) == 3 and len(json.loads(meta["std"])) == 3
    )
    assert any(k.startswith("backbone.") for k in keys) and {"head.weight", "head.bias"} <= keys
    assert set(summary["val_rot_acc_per_rotation"]) == {"0", "180"}
    assert summary["out_dir"] == str(out)


def test_existing_run_is_refused_and_untouched(tiny_run):
    out = tiny_run
    before = files_in(out)
    result = CliRunner().invoke(app, ["pretrain", "--model", "test_resnet", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 1
    assert "--resume" in result.stderr and "--overwrite" in result.stderr and "Traceback" not in result.output
    assert files_in(out) == before


def _overfit_folder(folder, n=8):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        # asymmetric shapes, so every rotation looks different
        img = np.zeros((32, 32, 3), dtype=np.uint8)
        img[4:12, 2:28] = rng.integers(100, 255, 3)
        img[12:28, 2:8] = rng.integers(100, 255, 3)
        Image.fromarray(img).save(folder / f"{i}.png")


def test_loss_falls_when_overfitting_a_few_images(tmp_path):
    _overfit_folder(tmp_path / "few")
    result = pretrain(
        PretrainConfig(
            model="test_resnet",
            data=str(tmp_path / "few"),
            epochs=25,
            batch_size=8,
            val_split=0,
            augment=False,
            lr=0.05,
            workers=0,
            device="cpu",
            out=str(tmp_path / "run"),
        )
    )
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.history[-1]["rot_acc"] > 0.9


@pytest.mark.parametrize("model", ["test_vit", "test_convnext"])
def test_vit_and_convnext_pretrain(tmp_path, model):
    result = pretrain(PretrainConfig(**{**FAST, "model": model}, epochs=1, out=str(tmp_path / model)))
    assert result.epochs_done == 1 and np.isfinite(result.final["loss"])
    assert (tmp_path / model / "model.safetensors").is_file()


def test_init_builds_a_fixed_size_model_at_the_run_size(tmp_path):
    # test_vit's default size is not 32 px: --init random:/timm: weights must be built for the run's size
    cfg = PretrainConfig(
        **{**FAST, "model": "test_vit", "max_steps_per_epoch": 1},
        init="random:test_vit",
        epochs=1,
        out=str(tmp_path / "r"),
    )
    assert pretrain(cfg).epochs_done == 1


def test_one_copy_and_interpolated_rotations(tmp_path):
    result = pretrain(
        PretrainConfig(**FAST, epochs=1, copies="one", rotations=(0.0, 45.0, 90.0), out=str(tmp_path / "r"))
    )
    assert set(result.val_rot_acc_per_rotation) == {"0", "45", "90"}


def test_resume_continues_to_the_same_weights(tmp_path):
    full = pretrain(PretrainConfig(**FAST, epochs=2, out=str(tmp_path / "full")))
    with pytest.raises(Interrupted, match="--resume"):
        pretrain(PretrainConfig(**FAST, epochs=2, out=str(tmp_path / "part")), should_stop=_stop_after_first_epoch())
    resumed = pretrain(PretrainConfig(**FAST, epochs=2, out=str(tmp_path / "part"), resume=True))
    with (
        safe_open(str(tmp_path / "full" / "model.safetensors"), "pt") as a,
        safe_open(str(tmp_path / "part" / "model.safetensors"), "pt") as b,
    ):
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]


def test_resuming_a_finished_run_changes_nothing_and_succeeds(tmp_path):
    # a scheduler that requeues `rotnet pretrain --resume DIR` after the run finished
    run = tmp_path / "run"
    pretrain(PretrainConfig(**FAST, epochs=1, out=str(run)))
    before = files_in(run, with_times=True)
    result = CliRunner().invoke(app, ["pretrain", "--resume", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "nothing to train" in result.stderr
    assert files_in(run, with_times=True) == before


def _stop_after_first_epoch():
    """should_stop that asks to stop at the end of epoch 1 (after its last step)."""
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] >= FAST["max_steps_per_epoch"]

    return should_stop


def test_unknown_model_suggests_close_names(tmp_path):
    result = CliRunner().invoke(
        app, ["pretrain", "--model", "resnet19", "--out", str(tmp_path / "x"), "--device", "cpu"]
    )
    assert result.exit_code == 1 and "did you mean" in result.stderr and "resnet18" in result.stderr
    assert not (tmp_path / "x").exists()


def test_help_does_not_import_torch_or_timm():
    code = (
        "import sys; from rotnet_cli.cli import app; from typer.testing import CliRunner;"
        "r = CliRunner().invoke(app, ['pretrain', '--help']); assert r.exit_code == 0, r.output;"
        "assert '--rotations' in r.output;"
        "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_installed_rotnet_command_runs():
    script = Path(sys.executable).parent / "rotnet"  # the console script pip installed beside python
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("rotnet ")
    out = subprocess.run(
        [sys.executable, "-m", "rotnet_cli", "pretrain", "--rotations", "0,0"], capture_output=True, text=True
    )
    assert out.returncode == 1 and "appears twice" in out.stderr and "Traceback" not in out.stderr


def test_python_api_names_are_the_functions_even_after_the_cli_loaded_the_modules():
    import rotnet_cli.cli  # noqa: F401 - imports the library modules behind the commands
    from rotnet_cli import export, predict, probe
    from rotnet_cli import pretrain as api_pretrain

    assert api_pretrain is pretrain
    assert all(
        callable(f) and f.__name__ == name for f, name in ((export, "export"), (predict, "predict"), (probe, "probe"))
    )
