"""Issue 24 as a hostile new user tries it: small and odd folders, the plan, predict's confidences."""

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from rotnet_cli.cli import app

FAST = ["--model", "test_resnet", "--device", "cpu", "-j", "0", "--epochs", "1", "--max-steps-per-epoch", "1"]


def _faces(path, n, side=25, mode="L"):
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        ramp = np.linspace(0, 255, side)[None, :] * np.linspace(0.3, 1, side)[:, None]
        Image.fromarray((ramp * 0.8 + rng.integers(0, 30, (side, side))).astype(np.uint8)).convert(mode).save(
            path / f"{i}.png"
        )
    return path


def test_the_data_plan_prints_as_a_block_of_lines_not_escaped_newlines(tmp_path):
    data = _faces(tmp_path / "faces", 4)
    result = CliRunner().invoke(app, ["pretrain", "--data", str(data), *FAST, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "\\n" not in result.stderr  # was: "data plan (every option you give wins):\n  image size ..." on one line
    lines = result.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("data plan"))
    assert [line.split()[0] for line in lines[start + 1 : start + 6]] == [
        "image",
        "batch",
        "epochs",
        "augmentation",
        "every",
    ]
