"""The one weight loader (rotnet_cli.weights.load_weights): every spec it accepts, every bad input it refuses.

Every refusal is a WeightsError whose message is one line that names the problem.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from rotnet_cli.checkpoint import load_safetensors
from rotnet_cli.errors import WeightsError
from rotnet_cli.weights import load_weights


@pytest.fixture
def run_dir(tiny_run) -> Path:
    return tiny_run  # two rotations: a head of 2 outputs, not the default 4


def run_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def assert_same_weights(module: torch.nn.Module, expected: dict[str, torch.Tensor], prefix: str) -> None:
    state = module.state_dict()
    assert {f"{prefix}{k}" for k in state} == {k for k in expected if k.startswith(prefix)}
    for key, value in state.items():
        assert torch.equal(value, expected[prefix + key]), key


def refusal(spec) -> str:
    with pytest.raises(WeightsError) as info:
        load_weights(str(spec))
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


# ----------------------------------------------------------------------------- specs that load


def test_run_directory_loads_backbone_head_and_preprocessing(run_dir):
    loaded = load_weights(str(run_dir))
    assert (loaded.kind, loaded.model_name, loaded.run_dir) == ("run", "test_resnet", run_dir)
    assert loaded.rotations == (0.0, 180.0)
    assert loaded.img_size == 32 and len(loaded.mean) == len(loaded.std) == 3
    tensors = run_tensors(run_dir)
    assert_same_weights(loaded.backbone, tensors, "backbone.")
    assert_same_weights(loaded.head, tensors, "head.")
    assert not loaded.backbone.training  # ready for inference
    assert loaded.rotnet()(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_run_directory_without_final_weights_falls_back_to_its_checkpoint(run_dir, tmp_path):
    stopped = tmp_path / "stopped"
    shutil.copytree(run_dir, stopped)
    (stopped / "model.safetensors").unlink()  # training stopped before the final weights were written
    loaded = load_weights(str(stopped))
    assert loaded.kind == "run" and loaded.run_dir == stopped
    checkpoint = torch.load(stopped / "checkpoint.pt", weights_only=True)["model"]
    assert_same_weights(loaded.backbone, checkpoint, "backbone.")
    assert_same_weights(loaded.head, checkpoint, "head.")
    assert loaded.rotations == (0.0, 180.0)


def test_checkpoint_and_safetensors_files_load_directly(run_dir):
    from_checkpoint = load_weights(str(run_dir / "checkpoint.pt"))
    from_safetensors = load_weights(str(run_dir / "model.safetensors"))
    assert (from_checkpoint.kind, from_safetensors.kind) == ("checkpoint", "safetensors")
    assert from_checkpoint.run_dir == from_safetensors.run_dir == run_dir
    # the final checkpoint and the final weights are the same model
    assert_same_weights(from_checkpoint.backbone, run_tensors(run_dir), "backbone.")
    assert_same_weights(from_safetensors.head, run_tensors(run_dir), "head.")


def test_random_spec_is_a_reproducible_baseline_that_leaves_the_callers_rng_alone():
    rng_before = torch.get_rng_state()
    first, second = load_weights("random:test_resnet"), load_weights("random:test_resnet")
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert first.kind == "random" and first.head is None and first.rotations is None
    for (key, a), b in zip(first.backbone.state_dict().items(), second.backbone.state_dict().values()):
        assert torch.equal(a, b), key
    other_seed = load_weights("random:test_resnet", seed=1)
    assert not torch.equal(first.backbone.conv1[0].weight, other_seed.backbone.conv1[0].weight)
    with pytest.raises(WeightsError, match="no rotation head"):
        first.rotnet()


def test_timm_spec_offline_is_a_clear_one_line_error(tmp_path):
    # A fresh process, so that huggingface_hub reads HF_HUB_OFFLINE and the empty cache at import.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "NO_COLOR": "1", "COLUMNS": "400"}
    done = subprocess.run(
        [sys.executable, "-m", "rotnet_cli", "export", "timm:test_resnet", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "test_resnet" in lines[0] and "hub" in lines[0], lines
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- specs that are refused


def test_missing_path(tmp_path):
    message = refusal(tmp_path / "nope")
    assert "does not exist" in message and "random:NAME" in message


def test_folder_that_is_neither_a_run_nor_an_export(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert "not a rotnet run directory or exported model" in refusal(tmp_path)


def test_truncated_safetensors(run_dir, tmp_path):
    data = (run_dir / "model.safetensors").read_bytes()
    cut = tmp_path / "model.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in refusal(cut)


def test_truncated_checkpoint(run_dir, tmp_path):
    data = (run_dir / "checkpoint.pt").read_bytes()
    cut = tmp_path / "checkpoint.pt"
    cut.write_bytes(data[: len(data) // 2])
    assert "not a readable checkpoint" in refusal(cut)


@pytest.mark.parametrize("content", [b"", b"hello, this is not a checkpoint", bytes(range(256)) * 4])
def test_file_that_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    message = refusal(path)
    assert str(path) in message and ("checkpoint" in message or "empty" in message)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, writer, write_malicious_checkpoint):
    path = tmp_path / "checkpoint.pt"
    marker = write_malicious_checkpoint(path, {"config": {"model": "test_resnet"}, "model": {}}, writer)
    message = refusal(path)
    assert "needs arbitrary code" in message or "not a PyTorch checkpoint" in message
    assert not marker.exists()


def test_weights_that_do_not_fit_the_named_model_name_the_keys(run_dir, tmp_path):
    tensors, meta = load_safetensors(run_dir / "model.safetensors")
    path = tmp_path / "mislabelled.safetensors"
    save_file(tensors, str(path), metadata={**meta, "model": "test_convnext"})  # resnet weights, convnext name
    message = refusal(path)
    assert "do not fit test_convnext" in message
    missing = message.split(" missing (")[1].split(")")[0].split(", ")
    unexpected = message.split(" unexpected (")[1].split(")")[0].split(", ")
    assert 1 <= len(missing) <= 5 and 1 <= len(unexpected) <= 5
    assert set(missing) <= set(timm.create_model("test_convnext", num_classes=0).state_dict())  # convnext's keys ...
    assert set(unexpected) <= {k[len("backbone.") :] for k in tensors}  # ... and the resnet file's


def test_safetensors_without_rotnet_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    assert "no rotnet metadata" in refusal(path)


def test_a_run_of_an_early_development_build_is_named_as_such(run_dir, tmp_path):
    tensors, meta = load_safetensors(run_dir / "model.safetensors")
    path = tmp_path / "early.safetensors"
    save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if k != "rotnet_format"})  # before the marker
    message = refusal(path)
    assert "early development build of rotnet" in message and "pretrain (or export) it again" in message


def test_a_kept_checkpoint_asked_of_an_export_names_the_run_it_came_from(run_dir, tmp_path):
    from rotnet_cli import ExportConfig, export

    out = tmp_path / "exported"
    export(ExportConfig(weights=str(run_dir), out=str(out)))
    message = refusal(f"{out}:best")
    assert "is an export, which keeps no checkpoints" in message and "RUN:best" in message
    assert "--keep-checkpoints" not in message  # advice for a run, not for an export
