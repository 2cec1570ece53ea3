"""Promises of issue 28 a hostile user broke (sweep 28): each test failed before its fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from rotnet_cli.cli import app
from rotnet_cli.data import _digits

ROOT = Path(__file__).resolve().parents[1]


def rotnet(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def onnx_folder(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep28-onnx") / "exported"
    result = rotnet("export", tiny_run, "--out", out, "--format", "onnx", "--with-head")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sweep28-digits")
    for i, image in enumerate(_digits(32).images[:4]):  # (3, 32, 32) uint8 each
        Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())).save(folder / f"d{i}.png")
    return folder


def test_an_onnx_file_whose_metadata_disagrees_with_its_graph_is_one_line(onnx_folder, digit_files, tmp_path):
    # the graph returns 2 logits (rotations 0,180) but the metadata now claims 4 rotations
    model = onnx.load_model(str(onnx_folder / "model.onnx"))
    for prop in model.metadata_props:
        if prop.key == "rotations":
            prop.value = "[0, 90, 180, 270]"
    edited = tmp_path / "edited.onnx"
    onnx.save_model(model, str(edited))
    result = rotnet("predict", edited, digit_files)
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    assert "does not match its metadata" in line and "rotnet export" in line and "bug" not in line


def test_an_installed_but_broken_onnxruntime_names_the_extra_not_a_bug(tiny_run, onnx_folder, digit_files, tmp_path):
    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("libonnxruntime.so: cannot open shared object file")\n')
    env = {**os.environ, "PYTHONPATH": f"{shadow.parent}{os.pathsep}{ROOT}"}
    for args in (
        ["predict", str(onnx_folder), str(digit_files)],
        ["export", str(tiny_run), "--out", str(tmp_path / "out"), "--format", "onnx"],
    ):
        done = subprocess.run([sys.executable, "-m", "rotnet_cli", *args], capture_output=True, text=True, env=env)
        assert done.returncode == 1, done.stderr
        lines = (done.stdout + done.stderr).strip().splitlines()
        assert "pip install --force-reinstall 'rotnet-cli[onnx]'" in lines[-1] and "bug" not in lines[-1]
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


PRETRAIN = ["pretrain", "--model", "test_resnet", "--epochs", "1", "-b", "16", "--max-steps-per-epoch", "1"]
PRETRAIN += ["--device", "cpu", "--workers", "0"]


@pytest.mark.parametrize(
    "slurm, named",
    [
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "abc"}, "SLURM_NTASKS is 'abc'"),
        ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "SLURM_PROCID is 'x'"),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost"}, "rank 5 of a world of 2"),
    ],
)
def test_nonsense_slurm_variables_are_one_line_naming_them(tmp_path, slurm, named):
    # before: a ValueError reported as a bug in rotnet, or (rank 5 of 2) a wait for ever for ranks that never come
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env = {**clean, **slurm, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "rotnet_cli", *PRETRAIN, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert named in last and "bug" not in last and "Traceback" not in done.stderr
    assert not out.exists()
