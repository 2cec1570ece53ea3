"""The data plan: image size, batch, epochs and augmentation decided from the data; every option given wins."""

import json

import pytest
import torch
from conftest import ramp_folder
from typer.testing import CliRunner

from rotnet_cli import planning
from rotnet_cli.cli import app
from rotnet_cli.planning import Content, Decision, ImageSizes, ModelFacts

RESNET = ModelFacts("resnet18", 224, fixed_size=False)
PHOTOS = Content(colour_spread=40.0, ink_share=0.4)
FACES = Content(colour_spread=0.0, ink_share=0.35)
SCANS = Content(colour_spread=1.0, ink_share=0.65)


def _size(sides, device="cpu", model=RESNET, given=None, native=None) -> Decision:
    return planning.plan_image_size(given, model, device, native, ImageSizes(tuple(sides)) if sides else None)


def test_tiny_images_are_not_blown_up_to_the_models_size():
    decision = _size([25] * 70)  # lfw face crops: 25 px
    assert decision.value == 32 and "25 px" in decision.why


def test_huge_images_get_the_models_own_size_on_a_gpu_and_a_cpu_size_on_a_cpu():
    assert _size([3000, 4000], device="cuda").value == 224  # large folders on a GPU: today's size
    cpu = _size([3000, 4000], device="cpu")
    assert cpu.value == planning.CPU_MAX_SIZE and "--img-size" in cpu.why


def test_unknown_sizes_take_the_models_size_except_on_a_cpu():
    assert _size(None, device="cuda").value == 224
    assert _size(None, device="cpu").value == planning.CPU_MAX_SIZE


def test_mixed_sizes_take_the_median_rounded_up_to_a_multiple_of_8():
    decision = _size([24, 30, 37, 40, 41], device="cuda")
    assert decision.value == 40 and "24-41 px (median 37)" in decision.why


def test_a_fixed_size_model_and_an_explicit_size_and_a_dataset_size():
    vit = ModelFacts("vit_tiny", 224, fixed_size=True)
    assert _size([25], model=vit).value == 224
    assert _size([25], given=96) == Decision(96, "asked for")
    assert _size(None, native=32).value == 32  # digits, CIFAR: their own size


def test_a_small_folder_trains_in_small_batches_and_a_large_one_keeps_128():
    assert planning.plan_batch_size(None, 63).value == 16  # fewer images than 128: never an error
    assert planning.plan_batch_size(None, 7).value == 7  # all in one batch
    assert planning.plan_batch_size(None, 1617).value == 32  # the digits demo: 51 steps per epoch
    assert planning.plan_batch_size(None, 1_000_000).value == 128  # today's batch where it fits
    assert planning.plan_batch_size(None, 1_000_000, world_size=8).value == 128
    assert planning.plan_batch_size(None, 5, world_size=2).value == 4  # a multiple of the processes
    assert planning.plan_batch_size(64, 63) == Decision(64, "asked for")


def test_the_batch_line_counts_batches_which_step_options_do_not_change(tmp_path):
    # under --max-steps-per-epoch 1 an epoch is 1 step: the batch line said "3 steps per epoch"
    assert planning.plan_batch_size(None, 37).why == "37 training images make 3 batches"
    folder = tmp_path / "few"
    ramp_folder(folder, 40, 40)
    result = CliRunner().invoke(
        app,
        ["pretrain", "--data", str(folder), "--out", str(tmp_path / "run"), "--max-steps-per-epoch", "1"]
        + ["--epochs", "1", "--model", "test_resnet", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "batch 16 (36 training images make 3 batches)" in text
    assert "epochs 1 (asked for: 1 step)" in text
    assert "every image 16 of 36 each epoch (--max-steps-per-epoch 1)" in text


def test_epochs_come_from_a_step_budget_and_large_folders_keep_10():
    small = planning.plan_epochs(None, 63, 16)  # 4 steps per epoch (the last batch kept)
    assert small.value * 4 >= planning.STEP_BUDGET and small.value == 125
    assert planning.plan_epochs(None, 1_000_000, 128).value == planning.MIN_EPOCHS
    assert planning.plan_epochs(None, 3, 3).value == planning.MAX_EPOCHS
    assert planning.plan_epochs(7, 63, 16).value == 7


def test_every_image_is_seen_every_epoch():
    assert "the last batch holds 15" in planning.plan_partial_batch(63, 16).why
    assert "left over" in planning.plan_partial_batch(63, 16, world_size=2).why


@pytest.mark.parametrize(
    "content, expected",
    [(SCANS, "shift"), (FACES, "crop"), (PHOTOS, "crop+flip"), (Content(40.0, 0.7), "crop")],
    ids=["scans-and-digits", "grey-faces", "colour-photos", "colour-writing"],
)
def test_augmentation_follows_what_the_images_are(content, expected):
    assert planning.plan_augment("auto", content).value == expected
    assert planning.plan_augment("crop+flip", content) == Decision("crop+flip", "asked for")


def test_text_like_pixels_are_measured_as_ink_on_paper():
    page = torch.full((4, 3, 32, 32), 240, dtype=torch.uint8)
    page[:, :, 8:24:4, 4:28] = 10  # lines of ink
    tones = torch.linspace(0, 255, 32).round().to(torch.uint8).expand(4, 3, 32, 32).clone()  # a smooth ramp
    assert planning.measure_content(page).ink_on_paper and planning.measure_content(page).grey
    assert not planning.measure_content(tones).ink_on_paper


def test_large_images_are_measured_shrunk_and_decided_alike(tmp_path):
    # a scanned page at --img-size 2048 is judged as its 256 px copy would be, not as 32 floats of 4M pixels
    page = torch.full((2, 3, 2048, 2048), 240, dtype=torch.uint8)
    page[:, :, 256:1792:128, 128:1920] = 10  # lines of ink, 64 px thick
    small = torch.nn.functional.interpolate(page.float(), size=planning.CONTENT_SIZE, mode="area").to(torch.uint8)
    assert planning.measure_content(page) == planning.measure_content(small)
    assert planning.measure_content(page).ink_on_paper

    # files are decoded for the look at no more than CONTENT_SIZE, whatever size training decodes them at
    from rotnet_cli import data as data_lib

    folder = tmp_path / "scans"
    ramp_folder(folder, 3, 40)
    images = data_lib.ImageSet(name="scans", img_size=1024, paths=sorted(folder.glob("*.png")))
    assert data_lib.sample_images(images).shape == (3, 3, planning.CONTENT_SIZE, planning.CONTENT_SIZE)


def test_the_bare_command_on_a_tiny_folder_plans_prints_and_records(tmp_path):
    ramp_folder(tmp_path / "faces", 12, 25)
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(tmp_path / "faces"), "--model", "test_resnet", "--device", "cpu", "-j", "0"]
    result = CliRunner().invoke(app, [*args, "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "data plan" in result.stderr and "25 px" in result.stderr
    assert "\n  image size   32 px" in result.stderr  # a line of its own, not an escaped "\\n"
    record = json.loads((out / "config.json").read_text())
    resolved = record["resolved"]
    assert resolved["img_size"] == 32 and resolved["batch_size"] == 11 and resolved["train_images"] == 11
    assert resolved["plan"]["epochs"] == {"value": 1, "why": "asked for: 1 step"}
    assert resolved["plan"]["augment"]["value"] == "crop"  # grey tones, not scans
    assert record["config"]["batch_size"] == 11  # what the run used: --config and --resume repeat it
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1


def test_explicit_options_win_over_the_plan(tmp_path):
    ramp_folder(tmp_path / "photos", 10, 40, mode="RGB")
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(tmp_path / "photos"), "--model", "test_resnet", "--device", "cpu", "-j", "0"]
    given = ["--img-size", "48", "-b", "4", "--epochs", "1", "--augment", "none", "--val-split", "0"]
    result = CliRunner().invoke(app, [*args, *given, "--out", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "config.json").read_text())["resolved"]["plan"]
    assert {name: plan[name]["value"] for name in ("img_size", "batch_size", "epochs", "augment")} == {
        "img_size": 48,
        "batch_size": 4,
        "epochs": 1,
        "augment": "none",
    }
    assert all(plan[name]["why"].startswith("asked for") for name in ("img_size", "batch_size", "epochs", "augment"))
    assert "the last batch holds 2" in plan["partial_batch"]["why"]  # 10 images in batches of 4: 3 steps
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1


def test_a_model_that_cannot_run_on_the_planned_size_gets_the_smallest_larger_size_it_runs_on(monkeypatch):
    # inception_v3 on 25 px faces: 299 px (its own) was 7x the pixels of the 112 px it runs on
    from rotnet_cli import pretraining
    from rotnet_cli.config import PretrainConfig
    from rotnet_cli.errors import InputSizeError

    tried = []

    def create_backbone(name, img_size=None):
        tried.append(img_size)
        if img_size < 75:  # inception_v3's own limit
            raise InputSizeError(f"{name} cannot run on {img_size} px", size=299)
        return torch.nn.Identity()

    monkeypatch.setattr(pretraining, "create_backbone", create_backbone)
    monkeypatch.setattr(pretraining, "takes_only_default_size", lambda name: False)
    said = []
    _, size = pretraining.run_backbone(PretrainConfig(model="inception_v3", data="faces"), said.append, planned_size=32)
    assert size == 112 and tried == [32, 48, 72, 112]
    assert said[-1].text == "inception_v3 cannot run on 32 px images; faces is resized to 112 px"
    assert planning.larger_sizes(32, 299) == [48, 72, 112, 168, 256] and planning.larger_sizes(32, 40) == []

    # a model timm builds for one size only goes there at once
    tried.clear()
    monkeypatch.setattr(pretraining, "takes_only_default_size", lambda name: True)
    _, size = pretraining.run_backbone(PretrainConfig(model="inception_v3", data="faces"), said.append, planned_size=32)
    assert size == 299 and tried == [32, 299]


def test_config_of_a_run_on_other_data_plans_that_runs_planned_values_again(tmp_path):
    # --config RUN/config.json --data OTHER applied RUN's plan (made for RUN's images) to OTHER as "asked for"
    ramp_folder(tmp_path / "faces", 20, 24)  # grey, 24 px
    ramp_folder(tmp_path / "photos", 20, 56, mode="RGB")
    args = ["pretrain", "--model", "test_resnet", "--device", "cpu", "-j", "0", "--max-steps-per-epoch", "1"]
    first = CliRunner().invoke(
        app, [*args, "--data", str(tmp_path / "faces"), "--epochs", "1", "--out", str(tmp_path / "a")]
    )
    assert first.exit_code == 0, first.output

    def plan_of(run):
        plan = json.loads((run / "config.json").read_text())["resolved"]["plan"]
        return {
            name: (plan[name]["value"], plan[name]["why"]) for name in ("img_size", "batch_size", "epochs", "augment")
        }

    config = str(tmp_path / "a" / "config.json")
    again = CliRunner().invoke(
        app, [*args, "--config", config, "--data", str(tmp_path / "photos"), "-b", "4", "--out", str(tmp_path / "b")]
    )
    assert again.exit_code == 0, again.output
    plan = plan_of(tmp_path / "b")
    assert plan["img_size"][0] == 56 and not plan["img_size"][1].startswith("asked for")  # the photos' own size
    assert not plan["augment"][1].startswith("asked for")  # decided by the photos' pixels
    assert plan["batch_size"] == (4, "asked for")  # this command line still wins
    assert plan["epochs"] == (1, "asked for: 1 step")  # the first run asked for it: repeated as asked
    # the same data: the run is repeated as it trained
    same = CliRunner().invoke(app, [*args, "--config", config, "--out", str(tmp_path / "c")])
    assert same.exit_code == 0, same.output
    assert {name: value for name, (value, _) in plan_of(tmp_path / "c").items()} == {
        name: value for name, (value, _) in plan_of(tmp_path / "a").items()
    }
