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


def test_the_plans_step_count_counts_optimizer_steps_with_accumulation_and_a_step_cap():
    from rotnet_cli import planning

    # 18 images in batches of 16 are 2 batches; 4 accumulated batches make 1 optimizer step (was: "2 steps per epoch")
    accumulated = planning.plan_epochs(None, 18, 16, accum_steps=4)
    assert accumulated.why.startswith("1 step per epoch") and accumulated.value == planning.MAX_EPOCHS
    capped = planning.plan_epochs(None, 18, 16, max_steps_per_epoch=1)
    assert capped.why.startswith("1 step per epoch"), capped.why
    assert planning.plan_epochs(3, 18, 16, max_steps_per_epoch=1).why == "asked for: 3 steps"


def test_a_step_never_claims_more_images_than_the_folder_holds(tmp_path):
    data = _faces(tmp_path / "faces", 6)
    args = ["pretrain", "--data", str(data), *FAST, "--val-split", "0", "--accum-steps", "4"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "1 step of 24 rotated images per epoch" in result.stderr  # 6 images x 4 rotations (was: 96)


def test_extending_a_planned_run_keeps_resolved_epochs_true(tmp_path):
    import json

    data, out = _faces(tmp_path / "faces", 4), tmp_path / "run"
    first = CliRunner().invoke(app, ["pretrain", "--data", str(data), *FAST, "--out", str(out)])
    assert first.exit_code == 0, first.output
    more = CliRunner().invoke(app, ["pretrain", "--resume", str(out), "--epochs", "2", "-j", "0"])
    assert more.exit_code == 0, more.output
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["epochs"] == 2 and record["resolved"]["epochs"] == 2  # was 1: the epochs it no longer ran
    assert record["resolved"]["plan"]["epochs"]["value"] == 1  # the plan it started with, kept as it was


def test_the_feature_distance_note_names_the_images_its_threshold_came_from():
    from rotnet_cli import fingerprint

    record = {"colour": 0.0, "side": 25, "features": {"mean": [0.0], "std": [1.0], "threshold": 1.0}}
    trained_on = {**record, "features": {**record["features"], "reference": "training"}}
    # --val-split 0 (or under 5 held-out images): the threshold comes from the training images themselves
    (note,) = fingerprint.unlike_reasons(trained_on, False, 25, 3.0, 32)
    assert "held-out" not in note and "training images themselves" in note, note
    held_out = {**record, "features": {**record["features"], "reference": "held-out"}}
    assert "than held-out ones do" in fingerprint.unlike_reasons(held_out, False, 25, 3.0, 32)[0]


def test_a_run_without_held_out_images_records_its_threshold_came_from_training(tmp_path):
    from rotnet_cli import rundir

    data, out = _faces(tmp_path / "faces", 4), tmp_path / "run"
    result = CliRunner().invoke(app, ["pretrain", "--data", str(data), *FAST, "--val-split", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    path = out / "model.safetensors"
    meta = rundir.read_weights_metadata(path, rundir.safetensors_metadata(path))
    assert meta["training_images"]["features"]["reference"] == "training"


def test_fix_never_turns_an_image_whose_confidence_is_withheld_whatever_min_confidence(tmp_path):
    import json

    data, run = _faces(tmp_path / "faces", 4), tmp_path / "run"
    trained = CliRunner().invoke(app, ["pretrain", "--data", str(data), *FAST, "--val-split", "0", "--out", str(run)])
    assert trained.exit_code == 0, trained.output
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (400, 300, 3), dtype=np.uint8)).save(photos / "colour.png")
    out = tmp_path / "fixed"
    args = ["predict", str(run), str(photos), "--fix", "--min-confidence", "0", "--out", str(out), "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (row,) = json.loads((out / "predictions.json").read_text())["predictions"]
    assert row["unlike_training"] and row["confidence"] == 0.25
    assert row["action"] != "fixed" and row["output"] is None  # was: turned and written at --min-confidence 0
    assert not (out / "colour.png").exists()


def test_torchrun_with_fewer_validation_images_than_processes_ends(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = _faces(tmp_path / "faces", 7)  # 6 training images, 1 held out: rank 1 validates none
    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = [torchrun, "--nproc-per-node", "2", "-m", "rotnet_cli", "pretrain", "--data", str(data), *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # was: rank 0's validation forward waited forever in DDP's buffer sync for rank 1, which had no batch
    done = subprocess.run([*command, "--out", str(tmp_path / "run")], env=env, capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert (tmp_path / "run" / "model.safetensors").exists()
