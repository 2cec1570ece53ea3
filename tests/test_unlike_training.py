"""A run records what its training images looked like, and predict flags images unlike them
on folder-trained runs too: a model of grey 25 px faces warns on large colour photos (and
withholds its confidence there), and says nothing about held-out faces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rotnet_cli import rundir
from rotnet_cli.cli import app
from rotnet_cli.config import PredictConfig, PretrainConfig
from rotnet_cli.errors import WeightsError
from rotnet_cli.events import WarningMessage
from rotnet_cli.prediction import predict
from rotnet_cli.pretraining import pretrain

runner = CliRunner()
skimage_data = pytest.importorskip("skimage.data")


def save_grey(pixels: np.ndarray, path: Path, turns: int = 0) -> None:
    Image.fromarray(np.ascontiguousarray(np.rot90((pixels * 255).round().astype(np.uint8), turns))).save(path)


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> tuple[Path, Path]:
    """(training folder of 70 grey 25 px faces, folder of 10 held-out faces at each of 4 rotations)."""
    crops = skimage_data.lfw_subset()[:100]  # the first 100 are faces, 25x25 in [0, 1]
    root = tmp_path_factory.mktemp("faces")
    train, held = root / "train", root / "held"
    train.mkdir()
    held.mkdir()
    for i, face in enumerate(crops[:70]):
        save_grey(face, train / f"{i:03d}.png")
    for i, face in enumerate(crops[70:80]):
        for turns in range(4):
            save_grey(face, held / f"{i:03d}_{90 * turns}.png", turns)
    return train, held


@pytest.fixture(scope="module")
def face_run(tmp_path_factory, faces) -> Path:
    out = tmp_path_factory.mktemp("face-run") / "run"
    pretrain(
        PretrainConfig(
            model="test_resnet",
            data=str(faces[0]),
            img_size=24,
            epochs=2,
            batch_size=16,
            seed=0,
            workers=0,
            device="cpu",
            out=str(out),
        )
    )
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage_data, name)()).save(folder / f"{name}.jpg")
    return folder


def run_predict(run: Path, folder: Path):
    warnings = []
    result = predict(
        PredictConfig(weights=str(run), inputs=(str(folder),), workers=0, device="cpu"),
        progress=lambda e: warnings.append(e.text) if isinstance(e, WarningMessage) else None,
    )
    return result, warnings


def test_the_run_records_its_training_images(face_run):
    from rotnet_cli.weights import load_weights

    record = load_weights(str(face_run)).info["training_images"]
    assert record["side"] == 25 and record["colour"] == 0.0 and record["images"] == 63
    assert len(record["features"]["mean"]) == len(record["features"]["std"]) and record["features"]["threshold"] > 0


def test_large_colour_photos_for_a_model_of_grey_faces_warn_and_withhold_confidence(face_run, photos):
    result, warnings = run_predict(face_run, photos)

    assert len(warnings) == 1
    warning = warnings[0]
    assert "these images differ clearly from what test_resnet was trained on" in warning
    assert "3 of 3 are in colour" in warning and "training images 25 px" in warning
    assert "confidence is withheld" in warning
    for p in result.predictions:
        assert p.unlike_training and p.confidence == pytest.approx(0.25) and p.predicted is not None


def test_held_out_faces_raise_no_warning(face_run, faces):
    result, warnings = run_predict(face_run, faces[1])
    assert warnings == [] and not any(p.unlike_training for p in result.predictions)


def test_the_table_and_report_say_which_confidences_were_withheld(face_run, photos, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(
        app, ["predict", str(face_run), str(photos), "--out", str(out), "--device", "cpu", "--workers", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "(withheld)" in result.output and "confidence is set to chance" in " ".join(result.output.split())
    report = json.loads((out / "predictions.json").read_text())
    assert all("in colour" in row["unlike_training"] for row in report["predictions"])


def test_a_damaged_record_is_one_line_naming_the_file(tmp_path):
    raw = {"rotnet_format": "run", "model": "test_resnet", "training_images": json.dumps({"images": 3})}
    with pytest.raises(WeightsError, match="training_images"):
        rundir.read_weights_metadata(tmp_path / "model.safetensors", raw)
