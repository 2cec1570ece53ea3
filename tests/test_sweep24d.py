"""Sweep 24d: what a hostile first use of today's changes broke."""

import json
import os

import pytest
from conftest import ramp_folder
from typer.testing import CliRunner

from rotnet_cli.cli import app
from rotnet_cli.rundir.fields import FileFields, check_calibration_fields


def test_a_diverged_runs_calibration_record_is_read_back():
    # inception_v3 at lr 0.1 on 24 small images wrote nll_before 4e10; predict, export and probe then refused
    # rotnet's own file as "changed or not written by rotnet"
    record = {
        "calibration": {
            "temperature": 20.0,
            "ece_before": 0.75,
            "ece_after": 0.75,
            "nll_before": 40810991616.0,
            "nll_after": 2040549580.8,
            "samples": 8,
        }
    }
    check_calibration_fields(FileFields(record, "model.safetensors (metadata)"))
    record["calibration"]["nll_before"] = float("nan")  # not a number is still refused
    with pytest.raises(Exception, match="nll_before"):
        check_calibration_fields(FileFields(record, "model.safetensors (metadata)"))


def test_config_with_the_runs_own_folder_spelled_otherwise_repeats_the_run(tmp_path, monkeypatch):
    # --config RUN/config.json --data /abs/path/of/RUN's/folder re-planned RUN's values as for other data:
    # the paths were compared as text ("faces" against "/tmp/.../faces/")
    monkeypatch.chdir(tmp_path)
    ramp_folder(tmp_path / "faces", 20, 24)
    args = [
        "pretrain",
        "--model",
        "test_resnet",
        "--device",
        "cpu",
        "-j",
        "0",
        "--max-steps-per-epoch",
        "1",
        "--epochs",
        "1",
    ]
    first = CliRunner().invoke(app, [*args, "--data", "faces", "--out", "a"])
    assert first.exit_code == 0, first.output

    def whys(run):
        plan = json.loads((tmp_path / run / "config.json").read_text())["resolved"]["plan"]
        return {name: plan[name]["why"] for name in ("img_size", "batch_size", "augment")}

    for spelled in (str(tmp_path / "faces") + os.sep, "./faces"):
        out = f"b{len(spelled)}"
        again = CliRunner().invoke(app, [*args, "--config", "a/config.json", "--data", spelled, "--out", out])
        assert again.exit_code == 0, again.output
        assert all(why.startswith("asked for") for why in whys(out).values()), whys(out)
