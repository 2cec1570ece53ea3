"""Honest small numbers: accuracies on a few images carry their count and a Wilson interval,
a tiny validation split is called too small, and probe's summary compares the best run cell
with each baseline's best cell, not only the same stage."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rotnet_cli.cli.pretrain import _render_honest_figures
from rotnet_cli.cli.probe import best_line
from rotnet_cli.config import PretrainConfig
from rotnet_cli.intervals import accuracy_text, wilson_interval


def test_wilson_interval_matches_the_textbook_values():
    # 7 of 10: the Wilson 95% interval is 0.397 to 0.892 (Newcombe 1998's worked values, to 3 places)
    low, high = wilson_interval(7, 10)
    assert low == pytest.approx(0.3968, abs=1e-3) and high == pytest.approx(0.8922, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)  # stays within [0, 1]
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_a_small_count_says_its_interval_a_large_one_does_not_need_to():
    assert accuracy_text(5 / 7, 7, "images") == "71.4% of 7 images (95% interval 36-92%)"
    assert accuracy_text(0.94, 10_000, "answers") == "94.0% of 10,000 answers"


def summary(val_images: int, acc: float, calibration: dict | None = None, own_validation: bool = False):
    return SimpleNamespace(
        final={"val_rot_acc": acc}, val_images=val_images, calibration=calibration, own_validation=own_validation
    )


def test_a_tiny_validation_split_is_called_too_small(capsys):
    calibration = {"temperature": 1.83, "samples": 28, "ece_before": 0.121, "ece_after": 0.034}
    _render_honest_figures(summary(7, 0.75, calibration), PretrainConfig(data="faces"))
    out, err = capsys.readouterr()
    text = " ".join((out + err).split())
    assert "validation: 75.0% of 28 answers on 7 held-out images x 4 rotations (95% interval" in text
    assert "holds only 7 images, too few for its accuracy to mean much" in text
    assert (
        "calibration: temperature 1.83 fitted on 28 held-out answers; expected calibration error 12.1% -> 3.4%" in text
    )


def test_a_calibration_that_leaves_under_confident_answers_as_they_are_says_why(capsys):
    # the fit stops at temperature 1: a large error left unchanged is answers less sure than right
    calibration = {"temperature": 1.0, "samples": 188, "ece_before": 0.154, "ece_after": 0.154}
    _render_honest_figures(summary(47, 0.505, calibration), PretrainConfig(data="objects"))
    text = " ".join(capsys.readouterr().out.split())
    assert "15.4% -> 15.4% (the answers were less sure than right; rotnet never makes them surer" in text
    # a fit that ran to its limit says the answers carried nothing (sweep 24d: "20.00 ... 75.0% -> 75.0%")
    calibration = {"temperature": 20.0, "samples": 16, "ece_before": 0.75, "ece_after": 0.75}
    _render_honest_figures(summary(4, 0.25, calibration), PretrainConfig(data="few"))
    assert "(the fit's limit: the held-out answers carried almost no information" in " ".join(
        capsys.readouterr().out.split()
    )
    # a softened head, or an error within the noise, needs no such words
    for temperature, ece in ((1.21, 0.154), (1.0, 0.01)):
        calibration = {"temperature": temperature, "samples": 188, "ece_before": ece, "ece_after": ece}
        _render_honest_figures(summary(47, 0.505, calibration), PretrainConfig(data="objects"))
        assert "less sure than right" not in capsys.readouterr().out


def test_a_run_that_learned_little_is_told_what_would_help(capsys):
    # the objects benchmark's bare run: 50.5% of 188 answers (interval 43-58%), from random weights
    _render_honest_figures(summary(47, 0.505), PretrainConfig(data="objects", model="resnet18"))
    err = " ".join(capsys.readouterr().err.split())
    assert "the run learned little of which way is up (50.5% right, chance 25%)" in err
    assert "start from pretrained weights (--init timm:resnet18)" in err
    # from pretrained weights already: more images or steps are what is left
    _render_honest_figures(summary(47, 0.505), PretrainConfig(data="objects", init="timm:resnet18"))
    err = " ".join(capsys.readouterr().err.split())
    assert "learned little" in err and "add images or train longer (--epochs)" in err and "--init" not in err
    # a run that learned, and one whose few validation images cannot show it did not: no such warning
    for images, accuracy in ((120, 0.975), (7, 0.6)):
        _render_honest_figures(summary(images, accuracy), PretrainConfig(data="faces"))
        assert "learned little" not in capsys.readouterr().err
    # one held-out image at 8 rotations: 8 answers, but of one picture, prove nothing (sweep 24d)
    eight = PretrainConfig(data="few", rotations=tuple(range(0, 360, 45)))
    _render_honest_figures(summary(1, 0.125), eight)
    assert "learned little" not in capsys.readouterr().err
    _render_honest_figures(summary(100, 0.3), eight)  # the bar follows chance: 12.5% of 8 rotations
    assert "(30.0% right, chance 12.5%)" in " ".join(capsys.readouterr().err.split())


def test_a_folder_with_its_own_val_is_told_to_add_images_there_not_to_use_val_split(capsys, tmp_path):
    _render_honest_figures(summary(10, 0.9), PretrainConfig(data=str(tmp_path)))
    assert "hold out more (--val-split)" in " ".join(capsys.readouterr().err.split())
    _render_honest_figures(summary(10, 0.9, own_validation=True), PretrainConfig(data=str(tmp_path)))
    err = " ".join(capsys.readouterr().err.split())
    assert f"add images to {tmp_path / 'val'}" in err and "--val-split" not in err


def test_a_large_validation_split_is_not_warned_about(capsys):
    _render_honest_figures(summary(2000, 0.94), PretrainConfig())
    out, err = capsys.readouterr()
    assert "too few" not in out + err and "94.0% of 8,000 answers" in out


def row(weights: str, stage: int, linear: float, knn: float):
    return SimpleNamespace(weights=weights, stage=stage, accuracy={"linear": linear, "knn": knn})


def test_probe_compares_the_best_run_cell_with_the_best_random_cell():
    """The issue's case: the run's best stage (0.80) against random's best (0.83, at another stage)."""
    rows = [
        row("run", 1, 0.60, 0.55),
        row("run", 2, 0.80, 0.70),
        row("random", 1, 0.83, 0.75),
        row("random", 2, 0.50, 0.40),
    ]
    result = SimpleNamespace(rows=rows, heads=("linear", "knn"), val_images=100)

    line = best_line(result, (rows[1], "linear"))

    assert line.startswith("best: stage 2 with the linear head, 80.0% of 100 val images (95% interval")
    assert "not above random's best, stage 1 with the linear head, 83.00%" in line
    assert "random at the same stage and head: 50.00%" in line


def test_a_run_knows_whether_its_validation_images_came_with_the_folder(tmp_path):
    import numpy as np
    from PIL import Image

    from rotnet_cli.pretraining import pretrain

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        (tmp_path / "data" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / "data" / split / f"{i}.png"
            )
    fast = dict(model="test_resnet", epochs=1, workers=0, device="cpu", img_size=16)
    own = pretrain(PretrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "own"), **fast))
    assert own.own_validation and own.val_images == 4  # DIR/val, not a --val-split share of DIR/train
    split = pretrain(PretrainConfig(data=str(tmp_path / "data" / "train"), out=str(tmp_path / "split"), **fast))
    assert not split.own_validation
