"""rotnet probe as a user runs it: every stage and head, baselines, the semi-supervised
subset, an untouched backbone, probe.json, and one-line errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import rotnet_cli.probing as probe_lib
from rotnet_cli.cli import app
from rotnet_cli.config import ProbeConfig
from rotnet_cli.models import num_stages
from rotnet_cli.weights import load_weights

FAST = ["--epochs", "4", "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory) -> Path:
    """The shared run, copied: probes write probe.json into it."""
    return Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("probe") / "run"))


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory) -> Path:
    """Three colour classes (red, green, blue) with noise: separable by any features."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    for label, name in enumerate(["red", "green", "blue"]):
        (root / name).mkdir()
        for i in range(24):
            pixels = rng.integers(0, 90, size=(20, 20, 3))
            pixels[..., label] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def invoke(*args: str):
    return CliRunner().invoke(app, ["probe", *args])


def test_every_stage_with_every_default_head(run_dir):
    result = invoke(str(run_dir), "--json", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    stages = num_stages(load_weights(run_dir).backbone)
    assert [row["stage"] for row in report["rows"]] == list(range(1, stages + 1))
    assert report["heads"] == ["linear", "mlp", "knn"]
    for row in report["rows"]:
        assert row["weights"] == "run" and len(row["shape"]) == 3
        for head in ("linear", "mlp", "knn"):
            assert 0 <= row[head] <= 1
    assert report["train_images"] + report["val_images"] == 1797  # digits, stratified 80/20 split
    # a run directory keeps the same result in probe.json
    saved = json.loads((run_dir / "probe.json").read_text())
    assert saved["rows"] == report["rows"] and saved["weights"] == str(run_dir)


def test_table_compares_with_random_weights(run_dir):
    result = invoke(str(run_dir), "--compare", "random", "--layers", "2,-1", "--head", "knn", *FAST)
    assert result.exit_code == 0, result.output
    assert "random" in result.stdout and "best: stage" in result.stdout
    saved = json.loads((run_dir / "probe.json").read_text())
    last = num_stages(load_weights(run_dir).backbone)
    assert [(r["weights"], r["stage"]) for r in saved["rows"]] == [("run", 2), ("run", last), ("random", 2), ("random", last)]


def test_backbone_is_bitwise_unchanged(run_dir, monkeypatch):
    loaded = load_weights(run_dir)
    before = {k: v.clone() for k, v in loaded.backbone.state_dict().items()}
    monkeypatch.setattr(probe_lib, "load_weights", lambda spec, device, seed=0, img_size=None: loaded)
    probe_lib.probe(ProbeConfig(weights=str(run_dir), heads=("linear", "mlp", "knn", "conv"), pool="flatten",
                                layers=(-1,), epochs=1, device="cpu", workers=0, save=False))
    after = loaded.backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not loaded.backbone.training


def test_labels_per_class_trains_on_exactly_k_per_class(run_dir):
    result = probe_lib.probe(ProbeConfig(weights=str(run_dir), labels_per_class=5, heads=("knn",), device="cpu",
                                         workers=0, save=False))
    assert result.train_images == 5 * 10 and result.val_images == 359  # validation keeps its full size
    keep, short = probe_lib.keep_per_class(torch.arange(40) % 4, 5, seed=1)
    assert torch.bincount(torch.arange(40)[keep] % 4).tolist() == [5, 5, 5, 5] and short == []
    assert not torch.equal(keep, probe_lib.keep_per_class(torch.arange(40) % 4, 5, seed=2)[0])  # seeded choice


def test_every_head_beats_chance_on_a_separable_set(run_dir, toy_folder):
    result = invoke(str(run_dir), "--data", str(toy_folder), "--val-split", "0.25", "--layers", "3,-1",
                    "--head", "linear,mlp,knn,conv", "--pool", "flatten", "--epochs", "30", "-b", "32",
                    "--device", "cpu", "--workers", "0", "--json", "--no-save")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_classes"] == 3 and report["val_images"] == 18  # 6 per class, stratified
    for row in report["rows"]:
        for head in ("linear", "mlp", "knn", "conv"):
            assert row[head] > 0.6, (row, head)  # chance is 1/3


def test_val_data_folder_is_used_as_validation(run_dir, toy_folder):
    result = probe_lib.probe(ProbeConfig(weights=str(run_dir), data=str(toy_folder), val_data=str(toy_folder),
                                         layers=(-1,), heads=("knn",), device="cpu", workers=0, save=False))
    assert result.train_images == result.val_images == 72
    assert result.rows[0].accuracy["knn"] > 0.9  # the same images: each is its own nearest neighbour


@pytest.mark.parametrize("args, message", [
    (["--layers", "9"], "--layers 9"),
    (["--head", "linear,svm"], "--head"),
    (["--pool", "median"], "--pool"),
    (["--img-size", "48"], "was trained at 32 px"),  # saved weights are probed at their own size
])
def test_bad_options_are_one_line_errors(run_dir, args, message):
    before = (run_dir / "probe.json").read_bytes() if (run_dir / "probe.json").exists() else None
    result = invoke(str(run_dir), *args, *FAST)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
    assert ((run_dir / "probe.json").read_bytes() if before is not None else None) == before


def test_img_size_sets_the_size_of_a_timm_or_random_baseline():
    # timm's test models default to 160 px; on 32 px data a user probes them at 32
    result = invoke("random:test_resnet", "--img-size", "32", "--layers", "-1", "--head", "knn", "--json", *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["img_size"] == 32
    default = invoke("random:test_resnet", "--layers", "-1", "--head", "knn", "--json", *FAST)
    assert json.loads(default.stdout)["img_size"] == 160


def test_unlabelled_flat_folder_is_a_one_line_error(run_dir, tmp_path):
    for i in range(3):
        Image.new("RGB", (12, 12), (i * 60, 0, 0)).save(tmp_path / f"{i}.png")
    result = invoke(str(run_dir), "--data", str(tmp_path), *FAST)
    assert result.exit_code == 1
    assert "no class sub-folders" in result.output and "Traceback" not in result.output


def test_stacked_linear_rows_are_independent_linears():
    # three rows, two widths: each row is its own Linear on its own first in_dims features
    dims = [3, 5, 3]
    layer = probe_lib.StackedLinear(dims, 4)
    x = torch.randn(16, 3, 5)
    x[:, [0, 2], 3:] = 0  # rows 0 and 2 have 3 features, zero-padded to 5
    y = layer(x)
    for r, dim in enumerate(dims):
        weight, bias = layer.row(r)
        assert weight.shape == (dim, 4)
        assert torch.allclose(y[:, r], x[:, r, :dim] @ weight + bias, atol=1e-5)
    other = x.clone()
    other[:, 1] += 1  # changing row 1's input changes no other row
    assert torch.equal(layer(other)[:, [0, 2]], y[:, [0, 2]])
