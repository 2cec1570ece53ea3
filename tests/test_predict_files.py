"""predict's files (issue 27): --overwrite replaces only what predict wrote, an in-place turn
keeps the owner's file theirs and leaves the folder as it was when it fails or is killed,
several camera folders predict together.

The model's answer is fixed here (every image "rotated by 180 degrees, sure"), so each test
is about the files, not about how well a tiny model sees."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from rotnet_cli import prediction
from rotnet_cli.cli import app


@pytest.fixture(autouse=True)
def every_image_upside_down(monkeypatch):
    """The model says 180 degrees, with certainty, for every image (tiny_run's set is 0, 180)."""

    def sure_180(model, images, rotations, *args):
        probs = torch.zeros(len(images), len(rotations))
        probs[:, rotations.index(180)] = 1.0
        return probs

    monkeypatch.setattr(prediction, "rotation_probabilities", sure_180)


def png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(path)
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, ["predict", *map(str, args), "--device", "cpu", "--workers", "0"])



@pytest.mark.parametrize("route", ["reencode", "lossless"])
def test_a_progressive_jpeg_stays_progressive(tiny_run, tmp_path, route):
    if route == "lossless":
        pytest.importorskip("turbojpeg")
    photo = tmp_path / "a.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(
        photo, progressive=True, quality=90
    )
    out = tmp_path / "out"
    result = invoke(tiny_run, photo, "--fix", "--out", out, "--jpeg", route)
    assert result.exit_code == 0, result.output
    with Image.open(out / "a.jpg") as copy:
        assert copy.info.get("progressive") or copy.info.get("progression")
