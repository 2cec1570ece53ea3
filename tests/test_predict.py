"""rotnet predict: a briefly trained RotNet detects the rotation of held-out digits, its
confidences stay honest with --tta, and --fix turns images upright as faithfully as their
format allows (exact, lossless or said otherwise), in a copy or in place with a backup, with
a report row for every image whatever happens."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, ImageSequence
from typer.testing import CliRunner

from rotnet_cli import data
from rotnet_cli.cli import app
from rotnet_cli.cli.predict import format_correction, format_rotation
from rotnet_cli.config import PredictConfig, PretrainConfig
from rotnet_cli.errors import ConfigError, OutputError
from rotnet_cli.prediction import combine_votes, plan_tta, predict, tta_index_table
from rotnet_cli.pretraining import pretrain
from rotnet_cli.upright import ORIENTATIONS, NotWritten, apply_grid, write_upright

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
    pretrain(
        PretrainConfig(
            model="test_resnet",
            data="digits",
            img_size=IMG_SIZE,
            epochs=3,
            batch_size=32,
            optimizer="adamw",
            lr=3e-3,
            val_split=VAL_SPLIT,
            seed=SEED,
            workers=0,
            device="cpu",
            out=str(out),
        )
    )
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
    # one pass an image (--no-tta): the tests below compare it with the copies' votes (the default)
    result = predict(PredictConfig(weights=str(run_dir), inputs=(str(folder),), tta=False, workers=0, device="cpu"))
    return {Path(p.path).name: p for p in result.predictions}


@pytest.fixture(scope="module")
def tta_run(run_dir, rotated_folder):
    """The same held-out digits through the CLI with --tta --json: (exit code, output, name -> row)."""
    result = invoke(str(run_dir), str(rotated_folder[0]), "--tta", "--json")
    rows = {Path(p["path"]).name: p for p in json.loads(result.stdout)["predictions"]} if result.exit_code == 0 else {}
    return result, rows


@pytest.fixture(scope="module")
def reliable_digits(held_out, heldout_predictions) -> list[int]:
    """Held-out digits whose four rotations the model all gets right, confidently."""
    good = [
        i
        for i in range(len(held_out))
        if all(
            heldout_predictions[f"{i:03d}_{a}.png"].predicted == a
            and heldout_predictions[f"{i:03d}_{a}.png"].confidence > 0.7
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
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def invoke(*args: str):
    return runner.invoke(app, ["predict", *args, "--device", "cpu", "--workers", "0"])


# ----------------------------------------------------------------------------- accuracy


def accuracy(predictions: dict, truth: dict[str, int]) -> float:
    return sum(predictions[name].predicted == angle for name, angle in truth.items()) / len(truth)


def test_held_out_digits_rotated_by_known_angles_are_detected(rotated_folder, heldout_predictions):
    _, truth = rotated_folder
    assert accuracy(heldout_predictions, truth) >= FAST_BAR


def test_test_time_agreement_is_at_least_as_good_on_held_out_digits(rotated_folder, heldout_predictions, tta_run):
    _, truth = rotated_folder
    result, with_tta = tta_run
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tta"] is True
    tta_acc = sum(with_tta[name]["predicted"] == angle for name, angle in truth.items()) / len(truth)
    assert tta_acc >= FAST_BAR
    assert tta_acc >= accuracy(heldout_predictions, truth) - 0.02


def calibration(confidence: np.ndarray, right: np.ndarray, threshold: float = 0.9, bins: int = 10) -> dict[str, float]:
    """Expected calibration error, its over-confident part, and the images --min-confidence would let through wrongly."""
    edges = np.minimum((confidence * bins).astype(int), bins - 1)
    ece = over = 0.0
    for b in range(bins):
        chosen = edges == b
        if chosen.any():
            gap = confidence[chosen].mean() - right[chosen].mean()  # > 0: surer than right
            ece += chosen.mean() * abs(gap)
            over += chosen.mean() * max(gap, 0.0)
    wrong = ~right
    return {
        "ece": ece,
        "overconfidence": over,
        "wrong_at_threshold": int((wrong & (confidence >= threshold)).sum()),
        "confidence_of_wrong": float(confidence[wrong].mean()) if wrong.any() else 0.0,
    }


def test_test_time_agreement_keeps_confidence_honest(rotated_folder, heldout_predictions, tta_run):
    """Issue 19: multiplying the copies' probabilities as if independent made wrong answers look
    sure. Measured once on this module's model (720 held-out digit images, the suite's one
    thread): without --tta ECE 0.055, 1 wrong at >= 0.9, wrong answers at 0.62 on average; the
    old product ECE 0.097 (0.070 of it over-confidence), 52 wrong at >= 0.9, 0.80; the average
    of the copies ECE 0.156 (all of it under-confidence), 0 wrong at >= 0.9, 0.61."""
    _, truth = rotated_folder
    _, with_tta = tta_run
    names = sorted(truth)

    def measure(rows, field):
        confidence = np.array([field(rows[n], "confidence") for n in names])
        right = np.array([field(rows[n], "predicted") == truth[n] for n in names])
        return calibration(confidence, right)

    plain = measure(heldout_predictions, getattr)
    tta = measure(with_tta, lambda row, key: row[key])
    assert tta["wrong_at_threshold"] <= plain["wrong_at_threshold"] + 2
    assert tta["overconfidence"] <= plain["overconfidence"] + 0.02
    assert tta["confidence_of_wrong"] <= plain["confidence_of_wrong"] + 0.02


def test_combined_votes_are_never_surer_than_the_surest_copy():
    rotations = (0.0, 90.0, 180.0, 270.0)
    table = tta_index_table(rotations)
    log_probs = (torch.randn(4, 50, 4, generator=torch.Generator().manual_seed(0)) * 4).log_softmax(2)
    combined = combine_votes(log_probs, table)  # (50, 4)
    aligned = log_probs.gather(2, table[:, None, :].expand(4, 50, 4)).exp()  # [r, i, o]: copy r's vote for o
    assert torch.allclose(combined.sum(1), torch.ones(50))
    assert (combined <= aligned.amax(0) + 1e-6).all()


@pytest.mark.slow
def test_the_demo_model_gets_at_least_0_9_of_held_out_digits_right(tmp_path):
    """The README's demo run (`rotnet pretrain`: resnet18, 30 epochs, about 3 minutes on 2 cores)
    with --tta. Measured when --tta multiplied the copies' votes: 0.917 with the suite's one
    thread (0.915 without --tta; on two threads 0.900 and 0.908); not yet measured since the
    votes are averaged. What it misses are mostly 0s and 8s, which look alike upside down."""
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
            Image.fromarray(rot90(upright[i], angle)).save(
                inputs / ("nested" if angle == 180 else "") / f"{i}_{angle}.png"
            )
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    old_times = 1_500_000_000  # the copies keep their originals' file times
    for path in inputs.rglob("*.png"):
        os.utime(path, (old_times, old_times))
    before = snapshot(inputs)
    out = tmp_path / "upright"

    result = invoke(str(run_dir), str(inputs), "--fix", "--out", str(out), "--min-confidence", "0.6")

    assert result.exit_code == 0, result.output
    assert snapshot(inputs) == before
    rows = {
        Path(r["path"]).relative_to(inputs).as_posix(): r
        for r in json.loads((out / "predictions.json").read_text())["predictions"]
    }
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
            assert (
                row["action"] == "fixed"
                and row["output"] == str(out / relative)
                and row["note"].endswith("pixels turned losslessly (checked)")
            )
            assert (out / relative).stat().st_mtime == old_times
            with Image.open(out / relative) as fixed:
                assert fixed.format == "PNG" and fixed.size == (image.shape[1], image.shape[0])
                assert np.array_equal(np.asarray(fixed), image)
    csv_lines = (out / "predictions.csv").read_text().splitlines()
    assert csv_lines[0].startswith("path,predicted,correction,rotated,to_fix,confidence,action")
    assert len(csv_lines) == 1 + len(rows)
    # one vocabulary: the CSV and JSON say an angle in the table's words, and the note says what was predicted
    turned = rows[f"{reliable_digits[0]}_90.png"]
    assert turned["rotated"] == "90° counter-clockwise" and turned["to_fix"] == "turn 90° clockwise"
    assert turned["note"].startswith("turn 90° clockwise: predicted 90° counter-clockwise at ")
    assert "turn 90° clockwise" in result.output and "90° counter-clockwise" in result.output


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

    result = invoke(str(run_dir), str(inputs), "--fix", "--out", str(out), "--json", "--min-confidence", "0.6")

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
    result = invoke(
        str(run_dir), str(folder), "--fix", "--out", str(out), "--min-confidence", f"{threshold:.6f}", "--json"
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["predictions"]
    fixed = [r for r in rows if r["action"] == "fixed"]
    doubtful = [r for r in rows if r["action"] == "skipped-low-confidence"]
    assert fixed and doubtful
    assert all(r["confidence"] >= threshold - 1e-6 and Path(r["output"]).is_file() for r in fixed)
    assert all(r["confidence"] < threshold + 1e-6 and r["predicted"] != 0 for r in doubtful)
    written = {p.name for p in out.rglob("*.png")}
    assert written == {Path(r["path"]).name for r in fixed}
    # --json and predictions.json are one shape: the same object, the rows under "predictions"
    assert json.loads((out / "predictions.json").read_text()) == json.loads(result.stdout)


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

    assert note == "pixels turned losslessly (checked)"
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
    # asked for, it is refused; by default such a set gets one pass, as does --no-tta
    with pytest.raises(ConfigError, match="--tta"):
        plan_tta(True, (0.0, 90.0, 180.0))
    assert plan_tta(None, (0.0, 90.0, 180.0)) is None and plan_tta(False, (0.0, 90.0, 180.0, 270.0)) is None
    assert torch.equal(plan_tta(None, (0.0, 90.0, 180.0, 270.0)), tta_index_table((0.0, 90.0, 180.0, 270.0)))


def test_by_default_a_picture_without_an_up_gets_chance_not_a_sure_answer(tmp_path, run_dir):
    # a flat grey square: its rotated copies are one picture, so their votes cancel out to 1/R; one
    # pass gives whatever the head says of it (a faces run said 94.6%, and --fix would have turned it)
    flat = tmp_path / "flat"
    flat.mkdir()
    for level in (0, 90, 160, 255):
        Image.fromarray(np.full((32, 32), level, np.uint8)).save(flat / f"grey{level}.png")
    result = invoke(str(run_dir), str(flat), "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["tta"] is True
    assert all(row["confidence"] == pytest.approx(0.25, abs=1e-4) for row in answer["predictions"])
    one_pass = json.loads(invoke(str(run_dir), str(flat), "--no-tta", "--json").stdout)
    assert one_pass["tta"] is False
    assert max(row["confidence"] for row in one_pass["predictions"]) > 0.25 + 1e-3


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


# ----------------------------------------------------------------------------- every image gets a row, whatever happens


def xpm_bytes(pixels: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 picture as XPM: a format PIL reads but cannot write."""
    colours = sorted({tuple(c) for c in pixels.reshape(-1, 3).tolist()})
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-"
    code = {c: alphabet[i // 64] + alphabet[i % 64] for i, c in enumerate(colours)}
    lines = [f"{pixels.shape[1]} {pixels.shape[0]} {len(colours)} 2"]
    lines += [f"{code[c]} c #{c[0]:02x}{c[1]:02x}{c[2]:02x}" for c in colours]
    lines += ["".join(code[tuple(px)] for px in row) for row in pixels.tolist()]
    return ("/* XPM */\nstatic char *image[] = {\n" + ",\n".join(f'"{line}"' for line in lines) + "\n};\n").encode()


def report(out: Path) -> tuple[list[dict], list[dict]]:
    """(CSV rows, JSON rows) of a predict report; both files must be valid UTF-8."""
    import csv

    csv_rows = list(csv.DictReader(io.StringIO((out / "predictions.csv").read_bytes().decode("utf-8"))))
    return csv_rows, json.loads((out / "predictions.json").read_bytes().decode("utf-8"))["predictions"]


def test_fix_gives_every_awkward_image_a_row_and_always_writes_the_report(tmp_path, run_dir, held_out, reliable_digits):
    """Issue 14, item 8: a file name that is not UTF-8, a format PIL cannot write, a target
    that is a folder and a broken file: each gets its row and reason, the rest are written."""
    digit = hwc(held_out[reliable_digits[0]])
    inputs = tmp_path / "in"
    inputs.mkdir()
    odd_name = os.fsencode(inputs) + b"/scan-\xff\xfe-90.png"  # latin-1 bytes: not valid UTF-8
    Image.fromarray(rot90(digit, 90)).save(os.fsdecode(odd_name), format="PNG")
    (inputs / "xpm-90.png").write_bytes(xpm_bytes(rot90(digit, 90)))
    Image.fromarray(rot90(digit, 90)).save(inputs / "blocked-90.png")
    Image.fromarray(rot90(digit, 270)).save(inputs / "fine-270.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "out"
    (out / "blocked-90.png").mkdir(parents=True)  # where its upright copy would go, a folder is in the way

    result = invoke(str(run_dir), str(inputs), "--fix", "--out", str(out), "--overwrite", "--min-confidence", "0.6")

    assert result.exit_code == 0, result.output
    csv_rows, json_rows = report(out)
    assert len(csv_rows) == len(json_rows) == 5
    rows = {Path(r["path"]).name: r for r in json_rows}
    odd = rows["scan-\\xff\\xfe-90.png"]  # shown escaped, its exact bytes in path_hex
    assert bytes.fromhex(odd["path_hex"]) == odd_name and odd["action"] == "fixed"
    assert os.path.isfile(os.fsdecode(os.fsencode(out) + b"/scan-\xff\xfe-90.png"))
    assert rows["xpm-90.png"]["action"] == "not-fixed" and "cannot write" in rows["xpm-90.png"]["note"]
    assert rows["blocked-90.png"]["action"] == "not-fixed" and "Is a directory" in rows["blocked-90.png"]["note"]
    assert rows["fine-270.png"]["action"] == "fixed" and rows["fine-270.png"]["note"].endswith(
        "pixels turned losslessly (checked)"
    )
    assert rows["broken.png"]["action"] == "unreadable"
    assert {r["path"] for r in csv_rows} == set(r["path"] for r in json_rows)
    assert "could not be turned" in result.output and "Traceback" not in result.output


def test_a_full_disk_stops_the_copies_reports_every_image_and_says_run_again(
    tmp_path, run_dir, held_out, reliable_digits, monkeypatch
):
    from rotnet_cli import upright

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in reliable_digits[:2]:
        Image.fromarray(rot90(hwc(held_out[i]), 90)).save(inputs / f"{i}.png")

    def full(path, write):
        raise OutputError(f"disk full while writing {path}") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(upright, "atomic_write", full)
    out = tmp_path / "out"
    result = invoke(str(run_dir), str(inputs), "--fix", "--out", str(out), "--min-confidence", "0.6")

    assert result.exit_code == 1
    assert "disk full" in result.output and "run predict again" in result.output and "resume" not in result.output
    _, rows = report(out)
    assert len(rows) == 2 and all(r["action"] == "not-fixed" and "disk is full" in r["note"] for r in rows)


def test_ctrl_c_while_fixing_still_writes_the_report(tmp_path, run_dir, held_out, reliable_digits, monkeypatch):
    from rotnet_cli import prediction

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in reliable_digits[:2]:
        Image.fromarray(rot90(hwc(held_out[i]), 90)).save(inputs / f"{i}.png")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prediction, "write_upright", interrupted)
    out = tmp_path / "out"
    result = invoke(str(run_dir), str(inputs), "--fix", "--out", str(out), "--min-confidence", "0.6")

    assert result.exit_code == 130
    _, rows = report(out)
    assert len(rows) == 2 and all(r["note"] == "not written: interrupted" for r in rows)


# ----------------------------------------------------------------------------- in place, and a complete mirror


def pick_by_confidence(heldout_predictions) -> tuple[float, str, str, str]:
    """(threshold, a surer rotated image, a less sure rotated image, an image predicted upright)."""
    rotated = sorted((p for p in heldout_predictions.values() if p.predicted != 0), key=lambda p: p.confidence)
    unsure, sure = rotated[len(rotated) // 4], rotated[-1]
    upright = next(p for p in heldout_predictions.values() if p.predicted == 0)
    return (unsure.confidence + sure.confidence) / 2, sure.path, unsure.path, upright.path


def test_in_place_keeps_a_backup_and_the_file_times_and_leaves_the_rest_byte_for_byte(
    tmp_path, run_dir, heldout_predictions
):
    threshold, sure, unsure, upright = pick_by_confidence(heldout_predictions)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, source in (("sure.png", sure), ("blocked.png", sure), ("unsure.png", unsure), ("upright.png", upright)):
        (photos / name).write_bytes(Path(source).read_bytes())
        os.utime(photos / name, (1_500_000_000, 1_500_000_000))
    (photos / "blocked.png.orig").write_text("an earlier backup")
    before = snapshot(photos)
    original = np.asarray(Image.open(photos / "sure.png"))
    turn = heldout_predictions[Path(sure).name].correction

    result = invoke(
        str(run_dir),
        str(photos),
        "--fix",
        "--in-place",
        "--min-confidence",
        f"{threshold:.6f}",
        "--out",
        str(tmp_path / "report"),
    )

    assert result.exit_code == 0, result.output
    after = snapshot(photos)
    for name in ("unsure.png", "upright.png", "blocked.png", "blocked.png.orig"):
        assert after[name] == before[name], name  # same bytes, same modification time
    assert after["sure.png.orig"] == before["sure.png"]
    assert after["sure.png"][1] == before["sure.png"][1] and after["sure.png"][0] != before["sure.png"][0]
    assert np.array_equal(np.asarray(Image.open(photos / "sure.png")), rot90(original, int(turn)))
    assert sorted(after) == [
        "blocked.png",
        "blocked.png.orig",
        "sure.png",
        "sure.png.orig",
        "unsure.png",
        "upright.png",
    ]
    _, rows = report(tmp_path / "report")
    actions = {Path(r["path"]).name: r["action"] for r in rows}
    assert actions == {
        "sure.png": "fixed",
        "blocked.png": "not-fixed",
        "unsure.png": "skipped-low-confidence",
        "upright.png": "skipped-upright",
    }
    assert "sure.png.orig" in result.output or ".orig" in result.output


def test_copy_unchanged_makes_a_complete_upright_mirror(tmp_path, run_dir, heldout_predictions):
    threshold, sure, unsure, upright = pick_by_confidence(heldout_predictions)
    scans = tmp_path / "scans"
    (scans / "deep").mkdir(parents=True)
    for name, source in (("sure.png", sure), ("deep/unsure.png", unsure), ("upright.png", upright)):
        (scans / name).write_bytes(Path(source).read_bytes())
    (scans / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "mirror"

    result = invoke(
        str(run_dir), str(scans), "--fix", "--out", str(out), "--copy-unchanged", "--min-confidence", f"{threshold:.6f}"
    )

    assert result.exit_code == 0, result.output
    mirrored = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {
        "predictions.csv",
        "predictions.json",
        ".rotnet-predict.json",  # what predict wrote, so that --overwrite replaces only that
    }
    assert mirrored == {"sure.png", "deep/unsure.png", "upright.png", "broken.png"}
    for name in ("deep/unsure.png", "upright.png", "broken.png"):
        assert (out / name).read_bytes() == (scans / name).read_bytes()
    assert (out / "sure.png").read_bytes() != (scans / "sure.png").read_bytes()


# ----------------------------------------------------------------------------- how faithfully a file is turned


def test_every_exif_orientation_is_the_transform_pil_shows():
    pixels = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    for orientation, grid in ORIENTATIONS.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", exif=exif.tobytes())
        shown = ImageOps.exif_transpose(Image.open(buffer))
        assert np.array_equal(np.asarray(shown), apply_grid(pixels, grid)), orientation


def frames_of(path: Path, mode: str | None = None) -> list[np.ndarray]:
    with Image.open(path) as image:
        return [np.asarray(frame.convert(mode) if mode else frame) for frame in ImageSequence.Iterator(image)]


def lossless_files(folder: Path, rng) -> dict[str, tuple[Path, str | None]]:
    """One file per lossless route PIL writes: name -> (path, mode to compare decoded frames in)."""
    colour = rng.integers(0, 256, (10, 14, 4), dtype=np.uint8)
    files = {}
    Image.fromarray(colour, "RGBA").save(folder / "rgba.png")
    files["png"] = (folder / "rgba.png", None)
    Image.fromarray(colour[..., :3]).save(folder / "lossless.webp", lossless=True)
    files["webp"] = (folder / "lossless.webp", None)
    Image.fromarray(colour[..., :3]).save(folder / "plain.bmp")
    files["bmp"] = (folder / "plain.bmp", None)
    Image.fromarray(rng.integers(0, 65536, (10, 14), dtype=np.uint16)).save(folder / "grey16.png")
    files["png 16-bit grey"] = (folder / "grey16.png", None)
    pages = [Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)) for _ in range(3)]
    pages[0].save(folder / "pages.tif", save_all=True, append_images=pages[1:], compression="tiff_lzw")
    files["tiff, 3 pages"] = (folder / "pages.tif", None)
    palette = rng.integers(0, 256, 768).tolist()
    frames = []
    for _ in range(4):
        frame = Image.new("P", (14, 10))
        frame.putdata(rng.integers(0, 16, 140).tolist())
        frame.putpalette(palette)
        frames.append(frame)
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=[100, 200, 300, 400], loop=0)
    files["gif, 4 frames"] = (folder / "anim.gif", "RGBA")
    return files


@pytest.mark.parametrize("turn", [90, 270])
def test_lossless_formats_are_turned_exactly_every_frame_and_say_so(tmp_path, turn):
    """Issue 14, item 15: an animated GIF keeps every frame and its timing; "losslessly" is said
    only after the written file was decoded and compared with the turned original."""
    for kind, (path, mode) in lossless_files(tmp_path, np.random.default_rng(turn)).items():
        target = tmp_path / f"upright-{path.name}"
        note = write_upright(path, target, turn)
        original, fixed = frames_of(path, mode), frames_of(target, mode)
        assert note.startswith("pixels turned losslessly (checked)") and len(fixed) == len(original), (kind, note)
        assert all(np.array_equal(f, rot90(o, turn)) for f, o in zip(fixed, original)), kind
    with Image.open(tmp_path / "upright-anim.gif") as gif:
        assert [frame.info["duration"] for frame in ImageSequence.Iterator(gif)] == [100, 200, 300, 400]


def png16(pixels: np.ndarray, extra: list[tuple[bytes, bytes]]) -> bytes:
    """A 16-bit RGB or RGBA PNG (which PIL would read as 8 bits) with extra chunks before the pixels."""
    height, width, channels = pixels.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2 if channels == 3 else 6, 0, 0, 0)
    body = [chunk(k, b) for k, b in extra]
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + b"".join(body)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29 marks its decoders deprecated
@pytest.mark.parametrize("channels", [3, 4])
def test_a_48_or_64_bit_png_keeps_all_16_bits_and_its_chunks(tmp_path, channels):
    import torch as torch_
    from torchvision.io import ImageReadMode, decode_png

    pixels = np.random.default_rng(channels).integers(0, 65536, (6, 9, channels), dtype=np.uint16)
    (tmp_path / "deep.png").write_bytes(
        png16(pixels, [(b"pHYs", struct.pack(">IIB", 1000, 2000, 1)), (b"tEXt", b"Title\0kept")])
    )

    note = write_upright(tmp_path / "deep.png", tmp_path / "fixed.png", 90)

    data = (tmp_path / "fixed.png").read_bytes()
    decoded = decode_png(torch_.frombuffer(bytearray(data), dtype=torch_.uint8), mode=ImageReadMode.UNCHANGED)
    assert note == "pixels turned losslessly (checked), 16 bits per channel"
    assert decoded.dtype == torch_.uint16 and np.array_equal(decoded.permute(1, 2, 0).numpy(), rot90(pixels, 90))
    with Image.open(tmp_path / "fixed.png") as fixed:
        assert fixed.info["Title"] == "kept"
    assert struct.pack(">IIB", 2000, 1000, 1) in data  # pixel density turns with the picture


def test_a_format_pil_cannot_write_is_not_turned_and_says_why(tmp_path):
    (tmp_path / "icon.png").write_bytes(xpm_bytes(np.zeros((4, 6, 3), np.uint8)))
    with pytest.raises(NotWritten, match="PIL reads XPM files but cannot write them"):
        write_upright(tmp_path / "icon.png", tmp_path / "out.png", 90)
    assert not (tmp_path / "out.png").exists()


def smooth_jpeg(path: Path, width: int, height: int, exif: dict[int, object]) -> None:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1).astype(np.uint8)
    tags = Image.Exif()
    for tag, value in exif.items():
        tags[tag] = value
    Image.fromarray(pixels).save(path, quality=90, **({"exif": tags.tobytes()} if exif else {}))


def scan_data(path: Path) -> bytes:
    data = path.read_bytes()
    return data[data.index(b"\xff\xda") :]  # from the start of scan: the compressed pixels


def shown(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image)).astype(np.int16)


@pytest.mark.parametrize("orientation", ["no EXIF", None, 1, 6, 3])
@pytest.mark.parametrize("turn", [90, 180, 270])
def test_the_orientation_tag_route_leaves_every_pixel_byte_and_viewers_show_it_upright(tmp_path, orientation, turn):
    tags = {0x010F: "Camera"} | ({0x0112: orientation} if orientation else {})
    smooth_jpeg(tmp_path / "photo.jpg", 40, 24, {} if orientation == "no EXIF" else tags)

    note = write_upright(tmp_path / "photo.jpg", tmp_path / "fixed.jpg", turn, jpeg="orientation-tag")

    assert note.startswith("EXIF Orientation set to")
    assert scan_data(tmp_path / "fixed.jpg") == scan_data(tmp_path / "photo.jpg")
    assert np.array_equal(shown(tmp_path / "fixed.jpg"), rot90(shown(tmp_path / "photo.jpg"), turn))
    with Image.open(tmp_path / "fixed.jpg") as fixed:
        assert fixed.getexif().get(0x010F) == (None if orientation == "no EXIF" else "Camera")


@pytest.mark.parametrize("orientation", [1, 6])
def test_lossless_jpeg_turns_move_blocks_without_re_encoding(tmp_path, orientation):
    pytest.importorskip("turbojpeg")
    smooth_jpeg(tmp_path / "photo.jpg", 64, 48, {0x0112: orientation, 0x010F: "Camera"})

    note = write_upright(tmp_path / "photo.jpg", tmp_path / "turned.jpg", 90, jpeg="lossless")
    back = write_upright(tmp_path / "turned.jpg", tmp_path / "back.jpg", 270, jpeg="lossless")

    assert note.startswith("lossless") and back.startswith("lossless")
    with Image.open(tmp_path / "turned.jpg") as turned:
        assert turned.getexif().get(0x0112, 1) == 1 and turned.getexif()[0x010F] == "Camera"
    difference = np.abs(shown(tmp_path / "turned.jpg") - rot90(shown(tmp_path / "photo.jpg"), 90))
    assert difference.mean() < 0.5  # the same coefficients; only the decoder's rounding differs
    if orientation == 1:  # turned and turned back: the compressed pixels are the original's, byte for byte
        assert scan_data(tmp_path / "back.jpg") == scan_data(tmp_path / "photo.jpg")


def test_lossless_jpeg_at_partial_edge_blocks_re_encodes_or_trims_and_says_so(tmp_path):
    pytest.importorskip("turbojpeg")
    smooth_jpeg(tmp_path / "photo.jpg", 61, 45, {})  # 4:2:0: 16-pixel blocks, both edges partial

    fallback = write_upright(tmp_path / "photo.jpg", tmp_path / "a.jpg", 90, jpeg="lossless")
    trimmed = write_upright(tmp_path / "photo.jpg", tmp_path / "b.jpg", 90, jpeg="lossless-trim")

    assert "re-encoded" in fallback and "not a whole number of JPEG blocks" in fallback
    assert Image.open(tmp_path / "a.jpg").size == (45, 61)
    assert "trimmed from 45x61 to 45x48" in trimmed and Image.open(tmp_path / "b.jpg").size == (45, 48)


def test_lossless_jpeg_without_its_extra_is_a_one_line_refusal(tmp_path, run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "turbojpeg", None)  # import turbojpeg now raises ImportError
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.jpg")
    out = tmp_path / "out"
    result = invoke(str(run_dir), str(tmp_path / "a.jpg"), "--fix", "--out", str(out), "--jpeg", "lossless")
    assert result.exit_code == 1 and "pip install 'rotnet-cli[jpeg]'" in result.output
    assert not out.exists()


# ----------------------------------------------------------------------------- images unlike the training data


def test_photos_for_a_model_of_grey_digits_get_a_warning(tmp_path, run_dir, rotated_folder, tta_run):
    y, x = np.mgrid[0:200, 0:300]
    colourful = np.stack([x * 255 // 300, y * 255 // 200, np.full_like(x, 60)], -1).astype(
        np.uint8
    )  # a colour gradient
    Image.fromarray(colourful).save(tmp_path / "photo.jpg")
    result = invoke(str(run_dir), str(tmp_path / "photo.jpg"))
    assert result.exit_code == 0, result.output
    warning = " ".join(result.output.split())
    assert "differ clearly from what test_resnet was trained on (digits)" in warning
    assert "colour" in warning and "200 px" in warning
    assert "differ clearly" not in tta_run[0].output  # held-out digits are what it was trained on
    # the README's first example: one photo among grey scans is named too, not outvoted by them
    mixed = invoke(str(run_dir), str(tmp_path / "photo.jpg"), str(rotated_folder[0]))
    assert mixed.exit_code == 0, mixed.output
    warning = " ".join(mixed.output.split())
    assert "some of these images differ clearly" in warning and "1 of " in warning and "are in colour" in warning


# ----------------------------------------------------------------------------- messages and refusals


def test_angles_read_as_a_person_says_them():
    """One vocabulary: the short way round, in words; the numbers stay counter-clockwise degrees."""
    assert [format_correction(a) for a in (0, 90, 180, 270, 45, 315)] == [
        "none",
        "turn 90° counter-clockwise",
        "turn 180°",
        "turn 90° clockwise",
        "turn 45° counter-clockwise",
        "turn 45° clockwise",
    ]
    assert [format_rotation(a) for a in (0, 90, 270, 360)] == [
        "upright",
        "90° counter-clockwise",
        "90° clockwise",
        "upright",
    ]


def test_batch_size_help_speaks_of_images_not_rotations():
    result = runner.invoke(app, ["predict", "--help"], terminal_width=200)
    line = next(line for line in result.output.splitlines() if "--batch-size" in line)
    assert "before rotation" not in line and "Images per forward pass" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--in-place"], "--in-place changes the originals only together with --fix"),
        (["--fix", "--in-place", "--copy-unchanged"], "--copy-unchanged"),
        (["--fix", "--out", "x", "--backup-suffix", ".bak"], "--backup-suffix"),
        (["--fix", "--in-place", "--backup-suffix", ".jpg"], "ends like an image file"),
        (["--fix", "--in-place", "--backup-suffix", ""], "--backup-suffix must be"),
        (["--fix", "--out", "x", "--jpeg", "rotate"], "--jpeg must be one of"),
    ],
)
def test_option_combinations_that_cannot_work_are_refused_before_anything_is_written(tmp_path, run_dir, args, message):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    before = snapshot(tmp_path)
    result = invoke(str(run_dir), str(tmp_path / "a.png"), *[a if a != "x" else str(tmp_path / "x") for a in args])
    assert result.exit_code == 1 and message in " ".join(result.output.split())
    assert snapshot(tmp_path) == before


def test_a_second_predict_into_the_same_out_while_one_writes_is_refused(tmp_path, run_dir, rotated_folder):
    # two predicts started together both found --out empty, both wrote and both said "report: OUT/..."
    out = tmp_path / "upright"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import time; from pathlib import Path; from rotnet_cli import rundir; "
                f"rundir.export_lock(Path({str(out)!r})).acquire(); print('held', flush=True); time.sleep(600)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = invoke(str(run_dir), str(rotated_folder[0]), "--fix", "--out", str(out))
        assert result.exit_code == 1
        assert f"is in use by another rotnet process (pid {holder.pid} on " in result.output
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    result = invoke(str(run_dir), str(rotated_folder[0]), "--fix", "--out", str(out))  # the holder is gone
    assert result.exit_code == 0, result.output
    assert (out / "predictions.csv").is_file() and not list(tmp_path.glob(".*lock*"))


def test_a_picture_over_pillows_size_limit_is_reported_as_such_not_as_broken(tmp_path, run_dir, monkeypatch):
    # its row said "could not be decoded", as if the file were broken (sweep 24d)
    Image.new("L", (100, 100)).save(tmp_path / "scan.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 100 x 100 picture is over twice this
    result = invoke(str(run_dir), str(tmp_path / "scan.png"), "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["predictions"]
    assert row["action"] == "unreadable"
    assert (
        row["note"].startswith("100 x 100 = 10,000 pixels, over Pillow's limit of 2,000") and "shrink it" in row["note"]
    )
