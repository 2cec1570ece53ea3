"""rotnet predict: a briefly trained RotNet detects the rotation of held-out digits, and
--fix writes exact upright copies without touching the originals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from rotnet_cli import data
from rotnet_cli.cli import app
from rotnet_cli.config import PredictConfig, PretrainConfig
from rotnet_cli.errors import ConfigError
from rotnet_cli.prediction import combine_votes, predict, tta_index_table, write_upright
from rotnet_cli.pretraining import pretrain

SEED = 0
VAL_SPLIT = 0.1
ANGLES = (0, 90, 180, 270)
IMG_SIZE = 16  # digits are 8x8: 16 px keeps the module's training run to seconds
FAST_BAR = 0.6  # proves learning (chance is 0.25; this run reached 0.74, 0.81 with --tta)
ORIENTATION = 0x0112
runner = CliRunner()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A test_resnet RotNet trained briefly on digits, with the usual 10% held out."""
    out = tmp_path_factory.mktemp("predict-run") / "run"
    pretrain(PretrainConfig(
        model="test_resnet", data="digits", img_size=IMG_SIZE, epochs=3, batch_size=32, optimizer="adamw", lr=3e-3,
        val_split=VAL_SPLIT, seed=SEED, workers=0, device="cpu", out=str(out),
    ))
    return out


def held_out_digits(size: int) -> torch.Tensor:
    """The digits pretraining held out (never trained on), as it sees them: (N, 3, size, size) uint8."""
    images = data.open_source("digits", size).train.images
    return images[data.split_indices(len(images), VAL_SPLIT, SEED)[1]]


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    return held_out_digits(IMG_SIZE)


def rot90(image: np.ndarray, angle: int) -> np.ndarray:
    """(H, W, ...) turned counter-clockwise by a multiple of 90 degrees, as torch.rot90 on (H, W)."""
    return np.ascontiguousarray(np.rot90(image, angle // 90, axes=(0, 1)))


def hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def rotated_folder(tmp_path_factory, held_out) -> tuple[Path, dict[str, int]]:
    """Every held-out digit rotated by each of 0/90/180/270 as PNGs; file name -> true angle."""
    folder = tmp_path_factory.mktemp("rotated-digits")
    truth = {}
    for i, image in enumerate(held_out):
        for angle in ANGLES:
            name = f"{i:03d}_{angle}.png"
            Image.fromarray(rot90(hwc(image), angle)).save(folder / name)
            truth[name] = angle
    return folder, truth


@pytest.fixture(scope="module")
def heldout_predictions(run_dir, rotated_folder) -> dict[str, dict]:
    folder, _ = rotated_folder
    result = predict(PredictConfig(weights=str(run_dir), inputs=(str(folder),), workers=0, device="cpu"))
    return {Path(p.path).name: p for p in result.predictions}


@pytest.fixture(scope="module")
def reliable_digits(held_out, heldout_predictions) -> list[int]:
    """Held-out digits whose four rotations the model all gets right, confidently."""
    good = [
        i for i in range(len(held_out))
        if all(
            heldout_predictions[f"{i:03d}_{a}.png"].predicted == a and heldout_predictions[f"{i:03d}_{a}.png"].confidence > 0.7
            for a in ANGLES
        )
    ]
    assert len(good) >= 3, "the briefly trained model should be sure about a few digits"
    return good[:3]


def non_square(digit: torch.Tensor, noise_seed: int | None) -> np.ndarray:
    """The SxS digit in the middle of an S x 1.5S picture: the model sees exactly the digit
    (centre crop), while the sides (random noise, or black) test the full-resolution copy."""
    size = digit.shape[-1]
    shape = (size, size * 3 // 2, 3)
    rng = np.random.default_rng(noise_seed)
    canvas = rng.integers(0, 256, shape, dtype=np.uint8) if noise_seed is not None else np.zeros(shape, np.uint8)
    canvas[:, size // 4 : size // 4 + size] = hwc(digit)
    return canvas


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def invoke(*args: str):
    return runner.invoke(app, ["predict", *args, "--device", "cpu", "--workers", "0"])


# ----------------------------------------------------------------------------- accuracy


def accuracy(predictions: dict, truth: dict[str, int]) -> float:
    return sum(predictions[name].predicted == angle for name, angle in truth.items()) / len(truth)


def test_held_out_digits_rotated_by_known_angles_are_detected(rotated_folder, heldout_predictions):
    _, truth = rotated_folder
    assert accuracy(heldout_predictions, truth) >= FAST_BAR


def test_test_time_agreement_is_at_least_as_good_on_held_out_digits(run_dir, rotated_folder, heldout_predictions):
    folder, truth = rotated_folder
    result = invoke(str(run_dir), str(folder), "--tta", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tta"] is True
    with_tta = {Path(p["path"]).name: p for p in report["predictions"]}
    tta_acc = sum(with_tta[name]["predicted"] == angle for name, angle in truth.items()) / len(truth)
    assert tta_acc >= FAST_BAR
    assert tta_acc >= accuracy(heldout_predictions, truth) - 0.02


@pytest.mark.slow
def test_the_demo_model_gets_at_least_0_9_of_held_out_digits_right(tmp_path):
    """The README's demo run (`rotnet pretrain`: resnet18, 30 epochs, about 3 minutes on 2 cores)
    with --tta: 0.917 when measured with the suite's one thread (0.915 without; on two
    threads 0.900 and 0.908); what it misses are mostly 0s and 8s, which look alike upside down."""
    out = tmp_path / "run"
    pretrain(PretrainConfig(val_split=VAL_SPLIT, seed=SEED, device="cpu", out=str(out)))
    folder = tmp_path / "rotated"
    folder.mkdir()
    truth = {}
    for i, image in enumerate(held_out_digits(32)):
        for angle in ANGLES:
            Image.fromarray(rot90(hwc(image), angle)).save(folder / f"{i:03d}_{angle}.png")
            truth[f"{i:03d}_{angle}.png"] = angle
    result = predict(PredictConfig(weights=str(out), inputs=(str(folder),), tta=True, workers=0, device="cpu"))
    assert accuracy({Path(p.path).name: p for p in result.predictions}, truth) >= 0.9


# ----------------------------------------------------------------------------- --fix end to end


def test_fix_writes_exact_full_resolution_upright_copies_and_leaves_inputs_alone(
    tmp_path, run_dir, held_out, reliable_digits
):
    inputs = tmp_path / "scans"
    (inputs / "nested").mkdir(parents=True)
    upright = {}
    for n, i in enumerate(reliable_digits):
        upright[i] = non_square(held_out[i], noise_seed=n)
        for angle in ANGLES:
            Image.fromarray(rot90(upright[i], angle)).save(inputs / ("nested" if angle == 180 else "") / f"{i}_{angle}.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    before = snapshot(inputs)
    out = tmp_path / "upright"

    result = invoke(str(run_dir), str(inputs), "--fix", "--out", str(out))

    assert result.exit_code == 0, result.output
    assert snapshot(inputs) == before
    rows = {Path(r["path"]).relative_to(inputs).as_posix(): r for r in json.loads((out / "predictions.json").read_text())}
    assert rows["broken.png"]["action"] == "unreadable"
    assert "broken.png" in result.output
    for i, image in upright.items():
        for angle in ANGLES:
            relative = f"nested/{i}_{angle}.png" if angle == 180 else f"{i}_{angle}.png"
            row = rows[relative]
            assert row["predicted"] == angle and row["correction"] == (360 - angle) % 360
            if angle == 0:
                assert row["action"] == "skipped-upright" and not (out / relative).exists()
                continue
            assert row["action"] == "fixed" and row["output"] == str(out / relative)
            with Image.open(out / relative) as fixed:
                assert fixed.format == "PNG" and fixed.size == (image.shape[1], image.shape[0])
                assert np.array_equal(np.asarray(fixed), image)
    csv_lines = (out / "predictions.csv").read_text().splitlines()
    assert csv_lines[0].startswith("path,predicted,correction,confidence,action")
    assert len(csv_lines) == 1 + len(rows)


def test_exif_orientation_is_applied_first_as_a_viewer_would(tmp_path, run_dir, held_out, reliable_digits):
    digit = non_square(held_out[reliable_digits[0]], noise_seed=None)  # (S, 1.5S, 3), upright
    inputs = tmp_path / "phone"
    inputs.mkdir()

    def save_jpeg(pixels: np.ndarray, name: str, orientation: int) -> None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        Image.fromarray(pixels).save(inputs / name, quality=98, exif=exif.tobytes())

    # Orientation 6: a viewer turns the stored pixels 90 degrees clockwise.
    save_jpeg(rot90(digit, 90), "stored_sideways_shown_upright.jpg", 6)
    save_jpeg(digit, "stored_upright_shown_sideways.jpg", 6)
    out = tmp_path / "upright"

    result = invoke(str(run_dir), str(inputs), "--fix", "--out", str(out), "--json")

    assert result.exit_code == 0, result.output
    rows = {Path(p["path"]).name: p for p in json.loads(result.stdout)["predictions"]}
    assert rows["stored_sideways_shown_upright.jpg"]["predicted"] == 0
    assert rows["stored_sideways_shown_upright.jpg"]["action"] == "skipped-upright"
    shown_sideways = rows["stored_upright_shown_sideways.jpg"]
    assert shown_sideways["predicted"] == 270 and shown_sideways["action"] == "fixed"
    assert "re-encoded" in shown_sideways["note"]
    with Image.open(out / "stored_upright_shown_sideways.jpg") as fixed:
        assert fixed.format == "JPEG" and fixed.size == (digit.shape[1], digit.shape[0])
        assert fixed.getexif().get(ORIENTATION) is None  # the pixels themselves are upright now
        assert np.abs(np.asarray(fixed, dtype=np.int16) - digit).mean() < 4  # JPEG re-encoding is lossy


def test_only_confident_predictions_are_fixed(tmp_path, run_dir, rotated_folder, heldout_predictions):
    folder, _ = rotated_folder
    threshold = float(np.median([p.confidence for p in heldout_predictions.values() if p.predicted != 0]))
    out = tmp_path / "upright"
    result = invoke(str(run_dir), str(folder), "--fix", "--out", str(out), "--min-confidence", f"{threshold:.6f}", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["predictions"]
    fixed = [r for r in rows if r["action"] == "fixed"]
    doubtful = [r for r in rows if r["action"] == "skipped-low-confidence"]
    assert fixed and doubtful
    assert all(r["confidence"] >= threshold - 1e-6 and Path(r["output"]).is_file() for r in fixed)
    assert all(r["confidence"] < threshold + 1e-6 and r["predicted"] != 0 for r in doubtful)
    written = {p.name for p in out.rglob("*.png")}
    assert written == {Path(r["path"]).name for r in fixed}


# ----------------------------------------------------------------------------- the copy itself


def palette_png(indices: np.ndarray, palette: list[int], path: Path) -> None:
    image = Image.new("P", (indices.shape[1], indices.shape[0]))
    image.putdata(indices.ravel().tolist())
    image.putpalette(palette)
    image.save(path, transparency=7)


@pytest.mark.parametrize("angle", [90, 180, 270])
def test_correcting_a_rotated_png_restores_it_bitwise(tmp_path, angle):
    rng = np.random.default_rng(angle)
    original = rng.integers(0, 256, (20, 36), dtype=np.uint8)  # palette indices, not square
    palette = rng.integers(0, 256, 768).tolist()
    palette_png(rot90(original, angle), palette, tmp_path / "rotated.png")

    note = write_upright(tmp_path / "rotated.png", tmp_path / "fixed.png", (360 - angle) % 360)

    assert note == "exact"
    with Image.open(tmp_path / "fixed.png") as fixed:
        assert fixed.mode == "P" and fixed.size == (36, 20)
        assert np.array_equal(np.asarray(fixed), original)
        assert fixed.getpalette() == palette and fixed.info.get("transparency") == 7


def test_angles_that_are_not_multiples_of_90_are_resampled_and_say_so(tmp_path):
    Image.fromarray(np.full((20, 40, 3), 200, np.uint8)).save(tmp_path / "in.png")
    note = write_upright(tmp_path / "in.png", tmp_path / "out.png", 45)
    assert "resampled" in note
    with Image.open(tmp_path / "out.png") as fixed:
        assert fixed.width > 40 and fixed.height > 20  # the canvas grows to hold the turned picture


# ----------------------------------------------------------------------------- test-time agreement


def test_votes_of_rotated_copies_combine_on_the_implied_original_rotation():
    rotations = (0.0, 90.0, 180.0, 270.0)
    table = tta_index_table(rotations)
    own = 1  # the image is rotated by 90; its copy r must then look rotated by 90 + rotations[r]
    log_probs = torch.full((4, 1, 4), -5.0)
    for r in range(4):
        log_probs[r, 0, (own + r) % 4] = -0.1
    log_probs[0, 0] = torch.tensor([-0.5, -1.0, -5.0, -5.0])  # the unrotated copy alone would say 0
    probs = combine_votes(log_probs.log_softmax(2), table)
    assert probs.shape == (1, 4) and torch.allclose(probs.sum(1), torch.ones(1))
    assert probs.argmax(1).item() == own


def test_tta_refuses_a_rotation_set_whose_copies_cannot_vote():
    with pytest.raises(ConfigError, match="--tta"):
        tta_index_table((0.0, 90.0, 180.0))


# ----------------------------------------------------------------------------- refusals


def test_out_must_not_overlap_the_inputs_and_nothing_is_written(tmp_path, run_dir, rotated_folder):
    folder, _ = rotated_folder
    before = snapshot(folder)
    for out in (folder, folder / "upright"):
        result = invoke(str(run_dir), str(folder), "--fix", "--out", str(out))
        assert result.exit_code == 1
        assert "overlaps the input" in result.output
    assert snapshot(folder) == before


def test_a_non_empty_out_needs_overwrite(tmp_path, run_dir, held_out):
    Image.fromarray(rot90(hwc(held_out[0]), 90)).save(tmp_path / "one.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused = invoke(str(run_dir), str(tmp_path / "one.png"), "--fix", "--out", str(out))
    assert refused.exit_code == 1 and "--overwrite" in refused.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    allowed = invoke(str(run_dir), str(tmp_path / "one.png"), "--fix", "--out", str(out), "--overwrite")
    assert allowed.exit_code == 0, allowed.output
    assert (out / "predictions.csv").is_file() and (out / "keep.txt").read_text() == "mine"


def test_fix_without_out_is_refused(run_dir, rotated_folder):
    result = invoke(str(run_dir), str(rotated_folder[0]), "--fix")
    assert result.exit_code == 1 and "--fix needs --out" in result.output


def test_weights_without_a_rotation_head_are_refused(rotated_folder):
    result = invoke("random:test_resnet", str(rotated_folder[0]))
    assert result.exit_code == 1 and "rotation head" in result.output
