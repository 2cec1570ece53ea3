"""A hostile new user's own folder (sweep 24b): resumes that must keep the plan, and the plan's odd corners."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rotnet_cli import rundir
from rotnet_cli.cli import app
from rotnet_cli.config import PretrainConfig
from rotnet_cli.errors import ConfigError
from rotnet_cli.pretraining import auto_resume_config, resume_config

# what a bare `rotnet pretrain --data DIR` saves: the plan's values in "config"
PLANNED = dict(data="/tmp/faces", model="test_resnet", img_size=32, batch_size=16, epochs=125, augment="crop")


def _run_dir(tmp_path, checkpoint: bool):
    """A run directory as the bare command leaves it: with a checkpoint, or killed before the first one."""
    run = tmp_path / "run"
    run.mkdir()
    config = PretrainConfig(**PLANNED, out=str(run))
    rundir.write_config(run, config.to_dict(), {**dataclasses.asdict(config), "augment": "crop"})
    (run / rundir.METRICS).write_text("")
    if checkpoint:
        (run / rundir.CHECKPOINT).write_bytes(b"")  # resume_config only checks that it is there
    return run


def test_resume_with_augment_auto_keeps_the_plans_augmentation(tmp_path):
    run = _run_dir(tmp_path, checkpoint=True)
    # was: "options contradict the saved run: --augment auto (the run used crop)"
    assert resume_config(run, {"augment": "auto"}).augment == "crop"
    with pytest.raises(ConfigError, match="--augment shift \\(the run used crop\\)"):
        resume_config(run, {"augment": "shift"})  # another augmentation is still refused


def test_resume_auto_restarts_the_bare_command_killed_before_its_first_checkpoint(tmp_path):
    run = _run_dir(tmp_path, checkpoint=False)
    # the launcher repeats the command line: --augment is its default, auto; img size, batch, epochs unset
    params = {**PretrainConfig(data="/tmp/faces", model="test_resnet").to_dict(), "out": str(run)}
    given = {"data", "model", "out", "resume"}
    # was: "holds another run that stopped before its first checkpoint (--augment auto (the run used crop))"
    config = auto_resume_config(params, given)
    assert config.overwrite and not config.resume and config.augment == "auto"  # planned again from the same data
    with pytest.raises(ConfigError, match="--augment shift"):
        auto_resume_config({**params, "augment": "shift"}, given | {"augment"})
    (run / rundir.CHECKPOINT).write_bytes(b"")  # it checkpointed: the line with --augment auto given continues it
    resumed = auto_resume_config(params, given | {"augment"})
    assert resumed.resume and resumed.augment == "crop"


def test_the_plan_says_when_a_step_cap_leaves_images_out_of_an_epoch():
    from rotnet_cli import planning

    # was: "all of them each epoch (the last batch holds 6)" for 54 images with --max-steps-per-epoch 2
    capped = planning.plan_partial_batch(54, 16, max_steps_per_epoch=2)
    assert capped.value == "capped" and capped.why.startswith("32 of 54 each epoch (--max-steps-per-epoch 2)")
    assert (
        planning.plan_partial_batch(54, 16, max_steps_per_epoch=4).why
        == "all of them each epoch (the last batch holds 6)"
    )
    # a step of --accum-steps 2 takes two batches: 54 images make steps of 32 and 22
    assert planning.plan_partial_batch(54, 16, accum_steps=2).why == "all of them each epoch (the last batch holds 22)"
    plan = planning.make_plan(
        images=54,
        content=None,
        img_size=planning.Decision(32, "asked for"),
        batch_size=16,
        epochs=1,
        augment="none",
        max_steps_per_epoch=2,
    )
    assert "32 of 54" in plan.lines()[-1]


def _faces(path, n, side=25):
    import numpy as np
    from PIL import Image

    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        ramp = np.linspace(0, 255, side)[None, :] * np.linspace(0.3, 1, side)[:, None]
        Image.fromarray((ramp * 0.8 + rng.integers(0, 30, (side, side))).astype(np.uint8)).save(path / f"{i}.png")
    return path


def _calibration(run):
    import json

    from safetensors import safe_open

    with safe_open(str(run / rundir.WEIGHTS), "pt") as f:
        text = (f.metadata() or {}).get("calibration")
    return json.loads(text) if text else None


def test_a_run_stopped_before_its_weights_were_written_resumes_calibrated(tmp_path):
    data = _faces(tmp_path / "faces", 10)
    out = tmp_path / "run"
    common = ["--model", "test_resnet", "--device", "cpu", "-j", "0", "--val-split", "0.3"]
    args = ["pretrain", "--data", str(data), *common, "--epochs", "1", "--max-steps-per-epoch", "1"]
    assert CliRunner().invoke(app, [*args, "--out", str(out)]).exit_code == 0
    before = _calibration(out)
    assert before is not None and before["samples"] == 12  # 3 held-out images x 4 rotations
    (out / rundir.WEIGHTS).unlink()  # killed after the last checkpoint, while calibrating: no weights yet
    resumed = CliRunner().invoke(app, ["pretrain", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    after = _calibration(out)  # was: None, so predict used T = 1 and the summary had no calibration line
    assert after is not None and after["samples"] == before["samples"]
    assert after["temperature"] == pytest.approx(before["temperature"], rel=1e-4)
    assert "calibration: temperature" in resumed.stdout


@pytest.mark.parametrize("saved, expected", [(True, "crop+flip"), (False, "none"), ("auto", "crop+flip")])
def test_config_of_an_old_run_repeats_what_it_trained_with(tmp_path, saved, expected):
    import json

    data = _faces(tmp_path / "faces", 6)
    old = tmp_path / "old"
    old.mkdir()
    # a run from before --augment had choices (true/false) or before the plan (img_size unset, augment auto)
    config = {**PretrainConfig(data=str(data), model="test_resnet").to_dict(), "augment": saved, "out": str(old)}
    resolved = {"img_size": 40, "augment": "crop+flip"}
    (old / "config.json").write_text(json.dumps({"config": config, "resolved": resolved}))
    out = tmp_path / "again"
    fast = ["--device", "cpu", "-j", "0", "--epochs", "1", "--max-steps-per-epoch", "1"]
    result = CliRunner().invoke(app, ["pretrain", "--config", str(old / "config.json"), *fast, "--out", str(out)])
    # was: exit 2, "augment: true is not a value of this option"; and a planned 32 px where the run had 40
    assert result.exit_code == 0, result.output
    again = json.loads((out / "config.json").read_text())["resolved"]
    assert (again["augment"], again["img_size"]) == (expected, 40)


def test_augment_shift_from_a_yaml_config(tmp_path):
    import json

    data = _faces(tmp_path / "faces", 6)
    options = tmp_path / "options.yaml"
    options.write_text(f"data: {data}\nmodel: test_resnet\naugment: shift\nimg-size: 15\n")
    out = tmp_path / "run"
    fast = ["--device", "cpu", "-j", "0", "--epochs", "1", "--max-steps-per-epoch", "1"]
    result = CliRunner().invoke(app, ["pretrain", "--config", str(options), *fast, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["resolved"]["augment"] == "shift"


BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "own_folder.py"


@pytest.mark.parametrize(
    "args, says",
    [
        (["--folders", "faces,bogus"], "unknown folder 'bogus'"),  # was: built faces first
        (["--folders", "faces,objects", "--stamps", "/nonexistent"], "objects needs Debian's tuxpaint"),
        (["--folders", "faces", "--cases", "tunned"], "unknown case 'tunned'"),  # was: ran the tuned options
    ],
)
def test_the_own_folder_benchmark_refuses_before_building_anything(tmp_path, args, says):
    if "objects" in args and Path("/usr/share/tuxpaint/stamps").is_dir():
        pytest.skip("Debian's stamps are installed here")
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--keep", str(tmp_path / "kept"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "TUXPAINT_STAMPS": ""},
        timeout=120,
    )
    assert done.returncode == 1 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "kept" / "faces").exists()


def test_one_held_out_image_is_counted_as_one_and_its_missing_calibration_said(tmp_path):
    data = _faces(tmp_path / "faces", 2)
    args = ["pretrain", "--data", str(data), "--model", "test_resnet", "--device", "cpu", "-j", "0", "--epochs", "1"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "the one training image is the batch" in result.stderr  # was: "all 1 training images in one batch"
    assert "on 1 held-out image x 4 rotations" in result.stdout and "holds only 1 image," in result.stderr
    assert "(1 image each)" in result.stdout  # was: "1 images"
    assert "calibration: none, 1 held-out image too few to fit a temperature on" in result.stdout


def test_a_picture_over_pils_bomb_limit_decodes_without_pils_warning(tmp_path):
    import numpy as np
    from PIL import Image

    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(path)
    # in a process of its own, as a command runs: the filters a module sets on import are in force there
    code = (
        "import sys; from PIL import Image; from rotnet_cli import data; "
        "Image.MAX_IMAGE_PIXELS = 500; "  # 900 pixels: over the limit, under twice it (like a 10000 x 10000 PNG)
        "assert data.header_side(sys.argv[1]) == 30 and data.decode_file(sys.argv[1], 8).shape == (3, 8, 8)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # was: "PIL/Image.py:3593: DecompressionBombWarning: Image size (100000000 pixels) exceeds ..." and its source line
    assert "exceeds limit" not in done.stderr, done.stderr


def test_a_folder_of_one_image_trains_on_it_and_says_there_is_nothing_to_validate_on(tmp_path):
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from rotnet_cli.cli import app

    (tmp_path / "one").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
        tmp_path / "one" / "a.png"
    )
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(tmp_path / "one"), "--model", "test_resnet", "--epochs", "2", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--workers", "0", "--device", "cpu"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0, text[-600:]  # it failed: "no training images are left after holding out 1"
    assert "1 image: none can be held out for validation, so it trains on it alone" in text
    assert "no validation split (one image: all of it trains)" in text
    assert (out / "model.safetensors").exists()
