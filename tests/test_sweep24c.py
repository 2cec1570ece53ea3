"""A hostile new user's own folder (sweep 24c): the plan's reasons, one-line errors that name a fix,
a fingerprint limit of 0, predict on weights that hold no record of their training images, and a
run's config.json read by export and score like user input."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rotnet_cli import data as data_lib
from rotnet_cli.cli import app
from rotnet_cli.errors import DataError
from rotnet_cli.fingerprint import unlike_reasons
from rotnet_cli.planning import MAX_EPOCHS, STEP_BUDGET, plan_epochs
from rotnet_cli.prediction import RotationModel, unchecked


def test_epochs_held_at_the_cap_do_not_claim_the_step_budget():
    # 4 photos, 3 to train: one batch, one step per epoch; was "300 in all: a budget of at least 500"
    decision = plan_epochs(None, images=3, batch_size=3)
    assert decision.value == MAX_EPOCHS
    assert f"at most {MAX_EPOCHS} epochs, short of {STEP_BUDGET} steps" in decision.why
    assert "a budget of at least" not in decision.why
    assert "a budget of at least 500" in plan_epochs(None, images=63, batch_size=16).why  # met: as before


def test_a_fingerprint_limit_of_0_is_no_division_by_zero():
    # every image the limit was measured on had the same features: the limit is 0, which the file
    # check accepts; was ZeroDivisionError ("a bug in rotnet") for any image with other features
    record = {"colour": 0.0, "side": 25, "features": {"threshold": 0.0, "reference": "training"}}
    reasons = unlike_reasons(record, colour=False, side=25, distance=1.5, seen_at=32)
    assert reasons and "farther from the training images'" in reasons[0]
    assert unlike_reasons(record, colour=False, side=25, distance=0.0, seen_at=32) == []


def _faces(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((25, 25), 40 + 5 * i, dtype=np.uint8)).save(folder / f"f{i}.png")


def test_an_empty_val_folder_names_the_way_out(tmp_path):
    _faces(tmp_path / "train", 4)
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError) as e:
        data_lib.open_source(str(tmp_path), 32, workers=0)
    line = str(e.value)
    assert "\n" not in line and "val holds no images" in line
    assert f"give {tmp_path / 'train'} as --data" in line  # was: no fix at all


def test_a_val_folder_of_broken_files_names_the_folder_and_a_fix(tmp_path):
    _faces(tmp_path / "train", 4)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as e:
        data_lib.open_source(str(tmp_path), 32, workers=0)
    line = str(e.value)  # was: "none of the 1 image files in val could be read"
    assert str(tmp_path / "val") in line and "a.png" in line and "replace the broken files" in line


def _model(source: str, run_dir: Path | None) -> RotationModel:
    return RotationModel(
        lambda x: (x, None), "resnet18", (0.0, 90.0), 32, (0.5,) * 3, (0.5,) * 3, source, "cpu", "fp32", {}, run_dir
    )


def test_predict_says_when_nothing_checks_the_images_against_the_training_images(tmp_path):
    # a run stopped by Ctrl-C (checkpoint.pt only): a 400 px colour photo on a run of grey 25 px faces
    # came out at 94.7% confidence without a word; now one warning says why and how to finish the run
    stopped = unchecked(_model(str(tmp_path / "checkpoint.pt"), tmp_path), decoded=1)
    assert stopped and "stopped before its end" in stopped and f"rotnet pretrain --resume {tmp_path}" in stopped
    exported = unchecked(_model(str(tmp_path / "export"), None), decoded=1)
    assert exported and "holds no record of its training images" in exported
    assert unchecked(_model(str(tmp_path / "export"), None), decoded=0) is None


def _edit_config(run: Path, **changes) -> None:
    path = run / "config.json"
    record = json.loads(path.read_text())
    record["config"].update(changes)
    path.write_text(json.dumps(record))


def test_export_of_a_run_whose_config_names_data_as_a_number(copy_of_run, tmp_path):
    # was: AttributeError: 'int' object has no attribute 'encode' (unexpected: a bug in rotnet)
    _edit_config(copy_of_run, data=5)
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", str(copy_of_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "digits" in (out / "README.md").read_text()  # what the weights' own metadata says


@pytest.mark.parametrize("changes", [{"seed": "x"}, {"seed": 1e30}, {"val_split": "abc"}, {"val_split": 5}])
def test_score_reads_the_runs_seed_and_split_as_user_input(copy_of_run, changes):
    # was: ValueError / OverflowError as "a bug in rotnet" (seed), a silently different knn bank (split)
    _edit_config(copy_of_run, **changes)
    result = CliRunner().invoke(app, ["score", str(copy_of_run), "digits", "--method", "knn", "--device", "cpu"])
    assert result.exit_code == 1
    line = " ".join(result.output.split())
    assert "config.json" in line and "use the file rotnet wrote" in line and "a bug in rotnet" not in line
