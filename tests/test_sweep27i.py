"""What a hostile sweep (27i) of options, config files, embeddings fingerprints and divergence found, one test per cause."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from rotnet_cli.cli import app


@pytest.mark.parametrize(
    ("name", "text"),
    [("opts.yaml", "epochs: 1\nlr: 0.1\nepochs: 2\n"), ("opts.json", '{"epochs": 1, "lr": 0.1, "epochs": 2}')],
)
def test_a_config_file_that_names_an_option_twice_is_refused_not_read_as_the_last(tmp_path, name, text):
    """YAML and JSON parsers keep the last of two equal keys without a word: a user who edited one
    and left the other trained for the epochs they had meant to replace."""
    config = tmp_path / name
    config.write_text(text)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["pretrain", "--config", str(config), "--out", str(out), "--model", "test_resnet"])
    assert result.exit_code == 2, result.output
    assert "'epochs' is given twice" in " ".join(result.output.split())
    assert not out.exists()


@pytest.mark.parametrize("text", ["epochs: [1]\n", "lr: [0.1]\n", "batch_size: [4, 8]\n"])
def test_a_list_where_a_number_goes_is_refused_in_a_config_file(tmp_path, text):
    """Lists become comma-separated text for the options that take it (rotations, milestones); for a
    number option ``epochs: [1]`` was joined to "1" and ran, which ``--epochs 1,2`` never would."""
    config = tmp_path / "opts.yaml"
    config.write_text(text)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["pretrain", "--config", str(config), "--out", str(out), "--model", "test_resnet"])
    assert result.exit_code == 2, result.output
    assert "a list is not a value of this option" in " ".join(result.output.split())
    assert not out.exists()


def test_a_config_file_list_still_fills_a_comma_separated_option(tmp_path):
    config = tmp_path / "opts.yaml"
    config.write_text("rotations: [0, 180]\nepochs: 1\n")
    import typer.main

    from rotnet_cli.cli._common import read_options_file

    click_cmd = typer.main.get_command(app).commands["pretrain"]
    ctx = click_cmd.make_context("pretrain", ["--model", "test_resnet"], resilient_parsing=True)
    assert read_options_file(str(config), ctx)["rotations"] == "0,180"


def test_a_collapsed_model_whose_loss_swings_between_huge_and_small_is_diverged():
    """--momentum 0.999 --lr 10 (11 steps an epoch) gave these per-step losses and exited 0: the rule
    wanted every one of 10 steps high, and a collapsed model is right now and then (loss ~ ln 4)."""
    import math

    import torch

    from rotnet_cli.pretraining import DIVERGED_FACTOR, EpochSums

    observed = [1.5, 9.6, 1929.1, 68498.0, 96365.4, 441169.1, 1864441.5, 1415170.9, 336603.4, 2.6, 1721938.5]
    sums = EpochSums(len(observed), torch.device("cpu"))
    for step, loss in enumerate(observed):
        sums.add(step, torch.tensor(loss), torch.zeros(8, 4), torch.zeros(8, dtype=torch.long))
    assert sums.first_diverged_step(DIVERGED_FACTOR * math.log(4)) == 2  # the first high step

    healthy = [1.4, 1.3, 30.0, 40.0, 1.2, 1.1, 1.0, 25.0, 0.9, 0.9, 0.8]  # spikes of a step or two
    sums = EpochSums(len(healthy), torch.device("cpu"))
    for step, loss in enumerate(healthy):
        sums.add(step, torch.tensor(loss), torch.zeros(8, 4), torch.zeros(8, dtype=torch.long))
    assert sums.first_diverged_step(DIVERGED_FACTOR * math.log(4)) is None


def test_every_csv_rotnet_writes_keeps_a_name_that_is_not_utf8_as_hex(tmp_path):
    """neighbours --query FOLDER --out x.csv with a file named b"bad\\xff.png" failed with
    UnicodeEncodeError ("a bug in rotnet"): the one CSV writer now writes such a name as \\xNN."""
    import csv
    import os

    from rotnet_cli import csvfiles

    out = tmp_path / "t.csv"
    with open(out, "w", newline="", encoding="utf-8") as f:
        csvfiles.writer(f).writerow([os.fsdecode(b"bad\xff.png"), 1, "cr\rx.png"])
    with open(out, newline="", encoding="utf-8") as f:
        assert list(csv.reader(f)) == [["bad\\xff.png", "1", "cr\rx.png"]]


def test_divergence_is_seen_across_epochs_of_a_few_steps():
    """A small folder's plan gives 4 steps an epoch: the 7-of-10 rule never had 10 steps to look at."""
    import math

    import torch

    from rotnet_cli.pretraining import DIVERGED_FACTOR, EpochSums

    ceiling = DIVERGED_FACTOR * math.log(4)
    tail = torch.tensor([1.4, 1.3, 2e3, 5e4, 3e5, 1.2, 9e5, 2e6])  # the epochs before (per copy)
    sums = EpochSums(4, torch.device("cpu"))
    for step, loss in enumerate([4e6, 2.0, 7e6, 8e6]):
        sums.add(step, torch.tensor(loss), torch.zeros(8, 4), torch.zeros(8, dtype=torch.long))
    assert sums.first_diverged_step(ceiling) is None  # 4 steps alone: too few to judge
    assert sums.first_diverged_step(ceiling, before=tail) == -6  # the first high step, 6 before this epoch's first
    calm = torch.tensor([1.4, 1.3, 1.2, 1.2, 1.1, 1.0, 0.9, 0.9])
    assert sums.first_diverged_step(ceiling, before=calm) is None  # 3 high of the last 10: not diverged


def test_a_run_of_two_steps_an_epoch_that_diverges_stops_and_says_its_checkpoint_came_after(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--model", "test_resnet", "--img-size", "16", "--lr", "10", "--momentum", "0.999"]
    args += ["--max-steps-per-epoch", "2", "--epochs", "20", "-b", "32", "--workers", "0", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "the loss diverged: 7 of 10 steps in a row" in text, text[-800:]
    assert "was written after the loss rose, so it is kept but not worth resuming" in text
    assert not (out / "model.safetensors").exists()  # nothing is saved from a diverged model
