"""--augment: the choices, the policy that `auto` follows, old runs, and what it buys on digits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from rotnet_cli import data
from rotnet_cli.cli import app
from rotnet_cli.config import PretrainConfig
from rotnet_cli.errors import ConfigError
from rotnet_cli.events import Message
from rotnet_cli.pretraining import pretrain, resume_config

FAST = dict(model="test_resnet", batch_size=32, max_steps_per_epoch=1, workers=0, device="cpu", epochs=1)


def _scans(n=12, size=32, noise=0, colour=False):
    """(n, 3, size, size) uint8 'scans': white paper with dark strokes; ``noise``: JPEG's chroma jitter."""
    g = torch.Generator().manual_seed(0)
    page = torch.full((n, 1, size, size), 245, dtype=torch.uint8)
    for i in range(n):  # a few strokes of ink each
        for _ in range(4):
            y, x = torch.randint(2, size - 10, (2,), generator=g).tolist()
            page[i, :, y : y + 8, x : x + 2] = 20
            page[i, :, y : y + 2, x : x + 8] = 20
    page = page.expand(-1, 3, -1, -1).clone()
    if noise:
        page[:, 0] -= torch.randint(0, noise + 1, (n, size, size), generator=g, dtype=torch.uint8)
    if colour:
        page[:, 2] = (page[:, 2].float() * 0.6).to(torch.uint8)  # yellowed paper, blue-black ink
    return page


def _smooth(n=12, size=32, colour=False):
    """Images of continuous tones (faces, photos): smooth random fields, grey or colour."""
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(n, 3 if colour else 1, 4, 4, generator=g)
    fields = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (fields.clamp(0, 1) * 255).to(torch.uint8).expand(-1, 3, -1, -1).clone()


@pytest.mark.parametrize(
    "spec, pixels, expected",
    [
        ("digits", "scans", "shift"),
        ("mnist", "scans", "shift"),
        ("~/scans", "scans+jpeg-noise", "shift"),  # a scanned page's JPEG chroma noise is still grey
        ("~/faces", "grey-tones", "crop"),  # grey faces and photos: cropped, never mirrored
        ("~/letters", "colour-scans", "crop"),  # colour images of ink on paper: not mirrored either
        ("svhn", "colour-tones", "crop"),  # colour photos of house numbers: the one name in the table
        ("SVHN", "colour-tones", "crop"),
        ("cifar10", "colour-tones", "crop+flip"),
        ("~/photos", "colour-tones", "crop+flip"),
    ],
)
def test_auto_policy_table(spec, pixels, expected):
    images = {
        "scans": _scans(),
        "scans+jpeg-noise": _scans(noise=3),
        "colour-scans": _scans(colour=True),
        "grey-tones": _smooth(),
        "colour-tones": _smooth(colour=True),
    }[pixels]
    choice, why = data.auto_augment(spec, data.ImageSet("x", 32, images=images))
    assert choice == expected and why


def test_auto_policy_of_the_built_in_digits():
    assert data.auto_augment("digits", data.open_source("digits", 32).train)[0] == "shift"


@pytest.mark.parametrize("mode, expected", [("L", "crop"), ("RGB", "crop+flip")])
def test_auto_policy_of_folders_read_from_disk(tmp_path, mode, expected):
    for i, image in enumerate(_smooth(5, colour=True)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).convert(mode).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")  # skipped, as in training
    streamed = data.open_source(str(tmp_path), 32, cache="none").train
    assert not streamed.in_memory
    assert data.auto_augment(str(tmp_path), streamed)[0] == expected


def test_crop_without_flip_is_the_crop_alone():
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    out = data.random_crop_flip(images, padding=2, generator=torch.Generator().manual_seed(0), flip=False)
    gen = torch.Generator().manual_seed(0)  # replay the draws: offsets only
    oy, ox = torch.randint(0, 5, (5,), generator=gen), torch.randint(0, 5, (5,), generator=gen)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(5):
        assert torch.equal(out[i], padded[i, :, oy[i] : oy[i] + 8, ox[i] : ox[i] + 8])
    assert torch.equal(data.random_crop_flip(images, 0, torch.Generator().manual_seed(0), flip=False), images)


def test_shift_moves_an_image_half_as_far_as_crop_and_never_mirrors():
    # digits fill their 32 px frame: the paper's 4 px crop cuts strokes off, shift's 2 px leaves them whole
    assert data.crop_padding("shift", 32) == 2 and data.crop_padding("crop", 32) == 4
    assert data.crop_padding("crop+flip", 32) == 4 and data.crop_padding("none", 32) == 0
    assert data.crop_padding("shift", 8) == 1  # a tiny image still moves
    line = torch.zeros((64, 3, 32, 32), dtype=torch.uint8)
    line[:, :, 10:22, 16] = 255  # an upright stroke, left of no centre: a mirror would move it to column 15
    out = data.random_crop_flip(line, data.crop_padding("shift", 32), torch.Generator().manual_seed(0), flip=False)
    cols = out.amax(dim=(1, 2)).float().argmax(dim=1)  # (64,) the column each shifted stroke landed in
    assert cols.min() >= 14 and cols.max() <= 18 and len(cols.unique()) == 5  # every shift of -2..2 px, no more


def test_choices_and_what_old_configs_meant():
    assert PretrainConfig().augment == "auto"
    assert PretrainConfig(augment=True).augment == "crop+flip"  # runs saved before the choices: augment: true
    assert PretrainConfig(augment=False).augment == "none"
    assert PretrainConfig.from_dict(PretrainConfig(augment="crop").to_dict()).augment == "crop"
    with pytest.raises(ConfigError, match="--augment must be one of auto, none, shift, crop, crop\\+flip"):
        PretrainConfig(augment="flip")


def test_an_old_run_resumes_with_the_augmentation_it_had(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    saved = {**PretrainConfig(out=str(run)).to_dict(), "augment": True}
    (run / "config.json").write_text(json.dumps({"config": saved}))
    (run / "checkpoint.pt").write_bytes(b"")  # resume_config only checks that it is there
    assert resume_config(run, {}).augment == "crop+flip"
    assert resume_config(run, {"augment": "crop+flip"}).augment == "crop+flip"
    with pytest.raises(ConfigError, match="--augment crop \\(the run used crop\\+flip\\)"):
        resume_config(run, {"augment": "crop"})


def test_the_choice_is_printed_at_start_and_recorded(tmp_path):
    events = []
    pretrain(PretrainConfig(**FAST, out=str(tmp_path / "auto")), progress=events.append)
    messages = [event.text for event in events if isinstance(event, Message)]
    plan = "\n".join(messages[messages.index("data plan (every option you give wins):") :])  # one event a line
    assert "augmentation shift  (grey, " in plan and "like scans and digits" in plan, plan
    saved = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert saved["config"]["augment"] == "shift" and saved["resolved"]["augment"] == "shift"
    assert saved["resolved"]["plan"]["augment"]["value"] == "shift"


def test_no_augment_flag_of_earlier_versions_still_works(tmp_path):
    out = tmp_path / "plain"
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            "--model",
            "test_resnet",
            "--epochs",
            "1",
            "-b",
            "32",
            "--max-steps-per-epoch",
            "1",
            "-j",
            "0",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-augment",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "augmentation none  (asked for)" in result.stderr
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["augment"] == "none" and saved["resolved"]["augment"] == "none"
    both = CliRunner().invoke(app, ["pretrain", "--no-augment", "--augment", "crop", "--out", str(tmp_path / "x")])
    assert both.exit_code == 2 and not (tmp_path / "x").exists()


def _val_rot_acc(tmp_path, augment: str, **config) -> float:
    result = pretrain(PretrainConfig(augment=augment, workers=0, device="cpu", out=str(tmp_path / augment), **config))
    return result.final["val_rot_acc"]


def test_auto_learns_digits_clearly_better_than_the_old_crop_and_flip(tmp_path):
    # the demo's data and policy on a small model (about 10 s of CPU each); measured on seeds 0-2:
    # auto 0.903 / 0.887 / 0.875, crop+flip 0.633 / 0.579 / 0.624 (resnet18 at 10 epochs: 0.950, 0.804)
    small = dict(model="test_resnet", img_size=16, epochs=3)
    assert _val_rot_acc(tmp_path, "auto", **small) > _val_rot_acc(tmp_path, "crop+flip", **small) + 0.1


@pytest.mark.slow  # two resnet18 demo runs (minutes on a CPU); the small model above runs by default
def test_the_demo_learns_clearly_better_than_the_old_default_at_equal_epochs(tmp_path):
    demo = PretrainConfig()
    new, old = _val_rot_acc(tmp_path, demo.augment), _val_rot_acc(tmp_path, "crop+flip")
    assert new > old + 0.05 and new > 0.897  # 0.897: the old demo after 30 epochs


def test_the_augmentation_benchmark_prints_one_json_line_per_variant(tmp_path):
    # the README's tables come from this script: it must keep running (tiny settings; figures not checked)
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "augmentation.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--model",
            "test_resnet",
            "--img-size",
            "16",
            "--epochs",
            "1",
            "--max-steps-per-epoch",
            "1",
            "--probe-epochs",
            "1",
            "--variants",
            "crop2+flip,random",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["variant"] for r in rows] == ["crop2+flip", "random"]
    assert rows[0]["augment"] == "crop+flip" and rows[0]["padding"] == 2 and 0 <= rows[0]["val_rot_acc"] <= 1
    for row in rows:
        for labels in ("full", "10"):
            assert len(row["probe"][labels]["linear"]) == len(row["probe"][labels]["knn"]) > 1
