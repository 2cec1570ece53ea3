"""rotnet viz: filter grids, attention maps per stage and rotation, training curves."""

from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from rotnet_cli.cli import app
from rotnet_cli.errors import ModelError
from rotnet_cli.rotations import rotate_all
from rotnet_cli.viz import (
    LABEL_BAND,
    PANEL_GAP,
    ROW_LABEL_WIDTH,
    SCALE_BAR,
    TILE_PADDING,
    agreement,
    attention_maps,
    colormap_lut,
    rotate_back,
    save_png,
    stem_conv,
)
from rotnet_cli.weights import load_weights

ROTATIONS = (0.0, 90.0, 180.0, 270.0)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def stem_shape(spec: str) -> tuple[int, int, int, int]:
    return tuple(stem_conv(load_weights(spec).backbone)[1].shape)


def grid_pixels(count: int, kernel: int, scale: int, cols: int) -> tuple[int, int]:
    tile = kernel * scale + TILE_PADDING
    return min(cols, count) * tile + TILE_PADDING, math.ceil(count / cols) * tile + TILE_PADDING


def disc_image(size: int, mean: tuple[float, ...]) -> torch.Tensor:
    """(1, 3, S, S) uint8: a white disc in the upper-left quarter on the model's mean colour.

    A mean-coloured background normalises to zero, so the maps follow the disc, not the frame.
    """
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (yy - size * 0.3) ** 2 + (xx - size * 0.3) ** 2 < (size * 0.15) ** 2
    background = torch.tensor(mean).mul(255).round().to(torch.uint8)[:, None, None].expand(3, size, size)
    return torch.where(disc, torch.full_like(background, 255), background)[None]


def save_disc_png(path, size: int = 48) -> None:
    array = disc_image(size, (0.485, 0.456, 0.406))[0].permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)


# ----------------------------------------------------------------------------- filters


def test_filter_png_size_follows_count_scale_and_cols(tmp_path):
    out = tmp_path / "f.png"
    count, _, k, _ = stem_shape("random:test_resnet")
    result = invoke("viz", "filters", "random:test_resnet", "--scale", 4, "--cols", 5, "--out", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == grid_pixels(count, k, 4, 5)
    assert str(out) in result.stdout and f"{count} filters" in result.stdout


def test_filter_tiles_are_distinct_and_not_blank(tmp_path):
    out = tmp_path / "f.png"
    count, _, k, _ = stem_shape("random:test_convnext")
    scale, cols = 3, 6
    assert (
        invoke("viz", "filters", "random:test_convnext", "--scale", scale, "--cols", cols, "--out", out).exit_code == 0
    )
    pixels = np.asarray(Image.open(out).convert("RGB")).astype(np.int16)
    step = k * scale + TILE_PADDING
    tiles = [
        pixels[TILE_PADDING + (i // cols) * step :, TILE_PADDING + (i % cols) * step :][: k * scale, : k * scale]
        for i in range(count)
    ]
    assert all(t.std() > 10 for t in tiles)  # each tile normalised on its own: full contrast
    assert len({t.tobytes() for t in tiles}) == count
    # nearest-neighbour enlargement: every scale x scale block is one colour
    assert (tiles[0][::scale, ::scale].repeat(scale, 0).repeat(scale, 1) == tiles[0]).all()


def test_several_weights_are_panels_side_by_side_with_labels(tmp_path, tiny_run):
    out = tmp_path / "f.png"
    scale, cols = 8, 4
    result = invoke(
        "viz",
        "filters",
        "random:test_resnet",
        tiny_run,
        "--scale",
        scale,
        "--cols",
        cols,
        "--label",
        "before",
        "--label",
        "after",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    count, _, k, _ = stem_shape("random:test_resnet")
    panel_w, panel_h = grid_pixels(count, k, scale, cols)
    picture = Image.open(out).convert("L")
    assert picture.size == (2 * panel_w + PANEL_GAP, panel_h + LABEL_BAND)
    band = np.asarray(picture)[:LABEL_BAND]
    for x0 in (0, panel_w + PANEL_GAP):  # some dark text above each panel
        assert band[:, x0 : x0 + panel_w].min() < 128
    assert f"{2 * count} filters" in result.stdout
    # trained and random filters differ
    left = np.asarray(picture)[LABEL_BAND:, :panel_w]
    right = np.asarray(picture)[LABEL_BAND:, panel_w + PANEL_GAP :]
    assert not np.array_equal(left, right)


def test_stem_is_found_without_pretrained_cfg_and_its_absence_is_an_error():
    name, weight = stem_conv(nn.Sequential(nn.Linear(2, 2), nn.Conv2d(3, 5, 3)))
    assert name == "1" and weight.shape == (5, 3, 3, 3)
    with pytest.raises(ModelError, match="no convolution stem"):
        stem_conv(nn.Sequential(nn.Linear(4, 4)))


def test_model_without_conv_stem_is_a_one_line_error_and_writes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "f.png"
    save_png(Image.new("RGB", (4, 4)), out)  # an earlier picture of rotnet's, which --overwrite may replace
    old = out.read_bytes()
    mlp = SimpleNamespace(backbone=nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), model_name="mlp")
    monkeypatch.setattr("rotnet_cli.viz.load_weights", lambda spec, device: mlp)
    line = one_line_error(invoke("viz", "filters", "random:mlp", "--out", out, "--overwrite"))
    assert "no convolution stem" in line
    assert out.read_bytes() == old


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cols", "0"], "--cols"),
        (["--out", "f.jpg"], ".png"),
        (["--label", "a", "--label", "b"], "--label"),
    ],
)
def test_bad_filter_options_are_one_line_errors(tmp_path, args, message):
    assert message in one_line_error(invoke("viz", "filters", "random:test_resnet", *args))


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("model", ["test_resnet", "test_vit"])
def test_attention_maps_have_the_image_size(model):
    weights = load_weights(f"random:{model}")
    stages = [0, len(weights.backbone.feature_info) - 1]
    images = disc_image(48, weights.mean).expand(2, -1, -1, -1)
    maps = attention_maps(weights.backbone, images, weights.mean, weights.std, stages, [1.0, 4.0])
    assert maps.shape == (2, 2, 48, 48)
    assert maps.amin() >= 0 and maps.amax() <= 1 and (maps.amax(dim=(-2, -1)) == 1).all()


def test_attention_maps_of_huge_activations_are_the_same_maps(monkeypatch):
    """|activation|^4 of an unnormalised random model overflows float32 (convmixer did); the maps
    must not depend on the activations' scale at all."""
    import rotnet_cli.viz

    feature = torch.rand(2, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    images = torch.zeros(2, 3, 24, 24, dtype=torch.uint8)
    maps = {}
    for scale in (1.0, 1e12):
        monkeypatch.setattr(
            rotnet_cli.viz, "forward_stages", lambda backbone, x, indices, scale=scale: [feature * scale]
        )
        maps[scale] = attention_maps(None, images, (0.5,) * 3, (0.5,) * 3, [0], [4.0])
    assert torch.isfinite(maps[1e12]).all()
    torch.testing.assert_close(maps[1e12], maps[1.0])


def test_aligned_maps_of_a_rotated_pattern_agree():
    weights = load_weights("random:test_resnet")
    copies, _ = rotate_all(disc_image(64, weights.mean), ROTATIONS)
    maps = attention_maps(weights.backbone, copies, weights.mean, weights.std, [0, 1], [1.0, 1.0])  # (4, 2, 64, 64)
    aligned = agreement(rotate_back(maps, ROTATIONS))
    unaligned = agreement(maps)
    # turned back, every copy attends to the disc in the same place; unturned, to four places
    assert all(a > 0.5 for a in aligned)
    assert all(a > u + 0.4 for a, u in zip(aligned, unaligned))


def test_attention_png_per_image_rows_are_the_run_rotations(tmp_path, tiny_run):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    save_disc_png(images / "a.png")
    save_disc_png(images / "sub" / "a.png")  # same stem: must not overwrite the first picture
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "maps"
    result = invoke(
        "viz",
        "attention",
        tiny_run,
        images,
        "--out",
        out,
        "--layers",
        "1,-1",
        "--scale",
        2,
        "--align",
        "--json",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (
        report["rotations"] == [0.0, 180.0] and report["stages"] == [1, 5] and report["img_size"] == 32
    )  # the run's own set
    assert len(report["images"]) == 2 and "broken.jpg" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a-2.png", "a.png"]
    tile = 32 * 2 + TILE_PADDING
    columns, rows = 1 + 2, 2
    picture = Image.open(out / "a.png")
    grid_height = LABEL_BAND + rows * tile + TILE_PADDING
    assert picture.size == (ROW_LABEL_WIDTH + columns * tile + TILE_PADDING, grid_height + SCALE_BAR + LABEL_BAND)
    # under the map columns, the colour scale: the colour map from its lowest to its highest colour
    scale_row = np.asarray(picture.convert("RGB"))[grid_height + SCALE_BAR // 2, ROW_LABEL_WIDTH + tile : -TILE_PADDING]
    lut = (colormap_lut("jet") * 255).round().numpy()
    assert np.abs(scale_row[0] - lut[0]).max() <= 1 and np.abs(scale_row[-1] - lut[-1]).max() <= 1
    # --align turns the 180-degree copy back upright: both rows show the same input
    pixels = np.asarray(picture.convert("RGB"))
    first = pixels[LABEL_BAND + TILE_PADDING :, ROW_LABEL_WIDTH + TILE_PADDING :][
        : tile - TILE_PADDING, : tile - TILE_PADDING
    ]
    second = pixels[LABEL_BAND + TILE_PADDING + tile :, ROW_LABEL_WIDTH + TILE_PADDING :][
        : tile - TILE_PADDING, : tile - TILE_PADDING
    ]
    assert np.array_equal(first, second)


def test_attention_of_weights_without_head_uses_four_rotations_or_the_option(tmp_path):
    save_disc_png(tmp_path / "d.png")
    base = ["viz", "attention", "random:test_resnet", tmp_path / "d.png", "--img-size", 32, "--layers", 2, "--json"]
    report = json.loads(invoke(*base, "--out", tmp_path / "o1").stdout)
    assert report["rotations"] == list(ROTATIONS) and report["powers"] == [1.0]
    report = json.loads(invoke(*base, "--out", tmp_path / "o2", "--rotations", "0,45", "--power", "2").stdout)
    assert report["rotations"] == [0.0, 45.0] and report["powers"] == [2.0]
    assert -1 <= report["mean_agreement"][0] <= 1


def test_attention_prints_the_agreement_table(tmp_path):
    save_disc_png(tmp_path / "d.png")
    result = invoke(
        "viz",
        "attention",
        "random:test_resnet",
        tmp_path / "d.png",
        "--img-size",
        32,
        "--layers",
        "1,2",
        "--out",
        tmp_path / "o",
    )
    assert result.exit_code == 0, result.output
    assert "agreement" in result.stdout and str(tmp_path / "o" / "d.png") in result.stdout.replace("\n", "")


def test_attention_bad_inputs_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    base = ["viz", "attention", "random:test_resnet"]
    assert "holds no images" in one_line_error(invoke(*base, empty, "--out", tmp_path / "o"))
    assert "does not exist" in one_line_error(invoke(*base, tmp_path / "missing.png", "--out", tmp_path / "o"))
    assert "could be read" in one_line_error(invoke(*base, broken, "--out", tmp_path / "o"))
    assert "stages" in one_line_error(invoke(*base, broken, "--layers", "9", "--img-size", 32, "--out", tmp_path / "o"))
    assert "--power" in one_line_error(invoke(*base, broken, "--power", "high", "--out", tmp_path / "o"))
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# ----------------------------------------------------------------------------- curves


def write_metrics(run, epochs: int = 3) -> None:
    run.mkdir()
    rows = [
        {
            "epoch": e,
            "loss": 1.4 - 0.3 * e,
            "rot_acc": 0.3 + 0.2 * e,
            "val_loss": 1.5 - 0.3 * e,
            "val_rot_acc": 0.3 + 0.15 * e,
        }
        for e in range(1, epochs + 1)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_curves_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    from rotnet_cli.config import CurvesConfig
    from rotnet_cli.errors import RotnetError
    from rotnet_cli.viz import draw_curves

    write_metrics(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(RotnetError, match=r"pip install 'rotnet-cli\[plot\]'"):
        draw_curves(CurvesConfig(run=str(tmp_path / "run"), out=str(tmp_path / "c.png")))
    line = one_line_error(invoke("viz", "curves", tmp_path / "run", "--out", tmp_path / "c.png"))
    assert "needs matplotlib" in line and "pip install matplotlib" in line
    assert not (tmp_path / "c.png").exists()


def test_curves_of_a_folder_without_metrics_is_a_one_line_error(tmp_path):
    (tmp_path / "run").mkdir()
    assert "metrics.jsonl" in one_line_error(invoke("viz", "curves", tmp_path / "run", "--out", tmp_path / "c.png"))


def test_curves_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path / "run", epochs=4)
    result = invoke("viz", "curves", tmp_path / "run", "--out", tmp_path / "c.png")
    assert result.exit_code == 0, result.output
    assert "4 epochs" in result.stdout
    picture = Image.open(tmp_path / "c.png")
    assert picture.format == "PNG" and picture.width > picture.height > 100
    write_metrics(tmp_path / "one", epochs=1)  # the README's shortened demo: "(1 epoch)", not "(1 epochs)"
    result = invoke("viz", "curves", tmp_path / "one", "--out", tmp_path / "one.png")
    assert result.exit_code == 0, result.output
    assert "(1 epoch)" in result.stdout


def test_curves_into_a_folder_that_is_a_file_is_a_one_line_error_that_changes_nothing(tmp_path):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path / "run")
    blocker = tmp_path / "taken"
    blocker.write_text("mine")
    line = one_line_error(invoke("viz", "curves", tmp_path / "run", "--out", blocker / "c.png"))
    assert f"{blocker} is a file, not a folder" in line and "--out" in line
    assert blocker.read_text() == "mine"


def test_curves_names_an_output_path_with_brackets_as_it_is(tmp_path):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path / "run")
    out = tmp_path / "[draft]c.png"  # rich markup would take [draft] for a style tag
    result = invoke("viz", "curves", tmp_path / "run", "--out", out)
    assert result.exit_code == 0, result.output
    assert out.is_file() and str(out) in result.stdout.replace("\n", "")
