"""Real timm architectures through every command: "any timm backbone" as a user meets it.

timm's tiny test models all return num_features-wide features at any input size; real
families do not. The fast tests here take a few cheap representatives of what differs:
a MobileNetV3 whose conv_head after pooling widens the features, a VGG whose pre-logits
ConvMlp does (timm's own VGG class, made thin so that it costs seconds), a ViT at a size
other than its own, a hybrid conv/attention model (EfficientViT, also with a wide head);
they run through the same per-family code as the full sweep (tools/compat_sweep.py),
which is the slow test at the end.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vgg import VGG
from typer.testing import CliRunner

from rotnet_cli.cli import app
from rotnet_cli.config import PretrainConfig
from rotnet_cli.errors import InputSizeError
from rotnet_cli.models import create_backbone, feature_width
from rotnet_cli.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]


def _load_sweep():
    spec = importlib.util.spec_from_file_location("compat_sweep", ROOT / "tools" / "compat_sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compat_sweep"] = module
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()

# -- a thin VGG: timm's VGG class (features, then a pre-logits ConvMlp to 4096 before pooling)
# with two small conv blocks and a 40-channel MLP middle, so it trains in a second
default_cfgs = generate_default_cfgs(
    {
        "vgg_thin_for_tests": {
            "input_size": (3, 32, 32),
            "num_classes": 10,
            "first_conv": "features.0",
            "classifier": "head.fc",
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
        }
    }
)


@register_model
def vgg_thin_for_tests(pretrained: bool = False, **kwargs) -> VGG:
    return build_model_with_cfg(
        VGG,
        "vgg_thin_for_tests",
        pretrained,
        model_cfg=[16, "M", 32, "M"],
        mlp_ratio=0.01,
        feature_cfg={"flatten_sequential": True, "out_indices": (0, 1, 2)},
        **kwargs,
    )


# model, input size: each one's features are not what its num_features says, or its size is not its own
REPRESENTATIVES = {
    "mobilenetv3": ("mobilenetv3_small_050", 32),  # conv_head after pooling: 1024 features, num_features 288
    "vgg": ("vgg_thin_for_tests", 32),  # pre-logits ConvMlp: 4096 features, num_features 32
    "vision_transformer": ("vit_tiny_patch16_224", 32),  # built for 32 px through timm's img_size
    "efficientvit_mit": ("efficientvit_b0", 32),  # hybrid conv/attention, head 1280 wide, num_features 128
}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return sweep.make_images(tmp_path_factory.mktemp("compat") / "images")


@pytest.mark.parametrize("family", list(REPRESENTATIVES))
def test_representative_family_runs_every_command(family, images, tmp_path):
    model, size = REPRESENTATIVES[family]
    record = sweep.run_family(family, model, tmp_path, images, size=size)

    assert record["results"] == {command: "ok" for command in sweep.COMMANDS}
    # the rotation head reads what the backbone returns, and the run says how wide that is
    loaded = load_weights(tmp_path / "families" / family / "run")
    width = loaded.backbone(torch.zeros(1, 3, size, size)).shape[1]
    assert loaded.head.in_features == width == feature_width(loaded.backbone)
    with safe_open(str(tmp_path / "families" / family / "run" / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["head_hidden_size"]) == width
    export = tmp_path / "families" / family / "export"
    assert f"({width} features" in (export / "README.md").read_text()
    with safe_open(str(export / "rotation_head.safetensors"), "pt") as f:
        assert f.get_tensor("weight").shape == (4, width)


def test_the_representatives_differ_where_it_matters():
    """Guard the choice above: wider features than num_features, and a ViT away from its own size."""
    for model in ("mobilenetv3_small_050", "vgg_thin_for_tests", "efficientvit_b0"):
        backbone = create_backbone(model, img_size=32)
        assert feature_width(backbone) > backbone.num_features, model
    vit = create_backbone("vit_tiny_patch16_224", img_size=32)
    assert vit.patch_embed.img_size == (32, 32)


# ----------------------------------------------------------------------------- input sizes


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    """The one error line, last on stderr (after the device line of commands that print one)."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.output, result.stderr
    return errors[0]


@pytest.mark.parametrize(
    "model, size, needed",
    [
        ("crossvit_tiny_240", 64, 240),  # built for 64 px, its two patch sizes do not fit it
        ("inception_v3", 32, 299),  # too small for its downsampling
    ],
)
def test_an_input_size_the_model_cannot_take_is_one_line_before_training(model, size, needed, images, tmp_path):
    result = invoke(
        "pretrain",
        "--model",
        model,
        "--data",
        images,
        "--img-size",
        size,
        "--epochs",
        "1",
        "-b",
        "4",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--out",
        tmp_path / "run",
    )
    line = one_line_error(result)
    assert f"{model} cannot run on {size} px images" in line and f"use --img-size {needed}" in line
    assert not (tmp_path / "run").exists()


def test_a_dataset_size_the_model_cannot_take_gives_way_to_the_model_size():
    """The digits are 32 px; without --img-size, a model that cannot run on 32 px gets the smallest of a
    few larger sizes it runs on, below its own (the digits are then resized to it), and the run says so;
    an explicit --img-size is never changed."""
    from rotnet_cli.events import Message
    from rotnet_cli.pretraining import run_backbone

    events = []
    backbone, size = run_backbone(PretrainConfig(model="crossvit_tiny_240", data="digits"), events.append)
    # 48 px fails (its two branches' token counts differ); 72 px runs, not its own 240
    assert size == 72 and backbone.patch_embed[0].img_size == (72, 72)
    assert events == [Message("crossvit_tiny_240 cannot run on 32 px images; digits is resized to 72 px")]
    with pytest.raises(InputSizeError):
        run_backbone(PretrainConfig(model="crossvit_tiny_240", data="digits", img_size=32))


def test_input_size_error_names_a_size_that_works():
    with pytest.raises(InputSizeError) as refused:
        create_backbone("crossvit_tiny_240", img_size=64)
    create_backbone("crossvit_tiny_240", img_size=refused.value.size)  # does not raise


# ----------------------------------------------------------------------------- the error boundary


def test_a_bug_is_one_line_naming_it(monkeypatch, expect_bug, tmp_path):
    """An exception rotnet did not expect: its type and message on one line, exit 1, no traceback."""
    import rotnet_cli.exporting

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(rotnet_cli.exporting, "load_weights", broken)
    result = invoke("export", "random:test_resnet", "--out", tmp_path / "out")

    line = one_line_error(result)
    assert "ZeroDivisionError: division by zero" in line and "rerun with --debug for the traceback" in line
    assert "Traceback" not in result.output and "second line" not in result.output
    assert [type(e) for e in expect_bug] == [ZeroDivisionError]  # the suite's bug detector saw it too


def test_a_bug_keeps_its_traceback_with_debug(monkeypatch, tmp_path):
    import rotnet_cli.exporting

    monkeypatch.setattr(rotnet_cli.exporting, "load_weights", lambda *a, **k: 1 / 0)
    result = invoke("--debug", "export", "random:test_resnet", "--out", tmp_path / "out")
    assert result.exit_code == 1 and isinstance(result.exception, ZeroDivisionError)


# ----------------------------------------------------------------------------- timm: without a network


def _unreachable(*args, **kwargs):
    raise OSError("no route to host")


def test_timm_weights_without_a_network_are_one_line_without_retries(monkeypatch, tmp_path):
    import huggingface_hub.constants

    attempts = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: attempts.append(a) or _unreachable())
    result = invoke("export", "timm:test_resnet", "--out", tmp_path / "out")
    line = one_line_error(result)
    assert "out of reach" in line and "random:test_resnet" in line
    assert len(attempts) == 1  # rotnet's one look at the hub; its client's retries (a minute of them) never start
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline only for that load


def test_timm_weights_in_the_local_cache_load_without_a_network(monkeypatch, tmp_path):
    """Cached weights (here: random ones in the hub cache layout) load with the hub out of reach."""
    import huggingface_hub.constants
    from safetensors.torch import save_file

    reference = create_backbone("test_resnet")
    snapshot = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(socket, "create_connection", _unreachable)

    loaded = load_weights("timm:test_resnet")
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[key], value), key


def test_a_model_without_pretrained_weights_says_so():
    result = invoke("export", "timm:rotnet_nin4", "--out", "unused")
    assert "timm has no pretrained weights for rotnet_nin4; compare with random:rotnet_nin4" in one_line_error(result)


# ----------------------------------------------------------------------------- the full sweep


@pytest.mark.slow
def test_every_timm_family_runs_every_command_or_says_why_in_one_line(tmp_path):
    """The whole sweep (hours on a CPU): no family may end in a bug, a traceback or a crash."""
    out = tmp_path / "compatibility.md"
    sweep.sweep(sweep.build_parser().parse_args(["--work", str(tmp_path / "work"), "--out", str(out)]))
    results = sweep.read_results(tmp_path / "work")
    assert set(results) == set(sweep.choose_models(tmp_path / "work"))
    for family, record in results.items():
        for command, outcome in record["results"].items():
            assert not sweep.is_bug(outcome), f"{family} {command}: {outcome}"
    assert "| vgg |" in out.read_text()
