"""What a hostile sweep (27f) of predict's files, in-place turns and messages found, one test per cause."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from rotnet_cli.cli import app

# ESC[2J clears a terminal; \xff is not UTF-8 (a file name from an old camera or a Latin-1 disk)
HOSTILE = os.fsdecode(b"x\x1b[2J\xff")


def test_paths_in_result_lines_and_tables_reach_the_terminal_escaped(tiny_run, tmp_path):
    """Not only error lines: the "run directory", "to DIR", "report:" lines and the predict table
    print the path a user gave, so a control character there must not act on the terminal."""
    out = tmp_path / f"export-{HOSTILE}"
    result = CliRunner().invoke(app, ["export", str(tiny_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\\x1b[2J\\xff" in result.stdout

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(photos / f"{HOSTILE}.png")
    report = tmp_path / f"report-{HOSTILE}"
    args = ["predict", str(tiny_run), str(photos), "--out", str(report), "--device", "cpu", "--workers", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and result.stdout.count("\\x1b[2J\\xff") == 2  # the table's row and "report:"

    run = Path(shutil.copytree(tiny_run, tmp_path / f"run-{HOSTILE}"))
    result = CliRunner().invoke(app, ["pretrain", "--resume", str(run), "--epochs", "2", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "run directory: " in result.stdout


def test_a_backup_suffix_with_a_control_character_is_refused_before_anything_is_turned(tiny_run, tmp_path):
    photo = tmp_path / "a.png"
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(photo)
    args = ["predict", str(tiny_run), str(photo), "--fix", "--in-place", "--backup-suffix", "\n.bak"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 1 and "--backup-suffix" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_resume_of_a_run_whose_config_was_deleted_says_so_instead_of_asking_for_the_run(copy_of_run):
    (copy_of_run / "config.json").unlink()
    before = sorted(p.name for p in copy_of_run.iterdir())
    result = CliRunner().invoke(app, ["pretrain", "--resume", str(copy_of_run)])
    assert result.exit_code == 1, result.output
    line = " ".join(result.output.split())
    assert "config.json is missing" in line and "not a rotnet run" not in line
    assert sorted(p.name for p in copy_of_run.iterdir()) == before


def test_a_fifo_given_by_name_is_an_unreadable_row_not_a_hang(tiny_run, tmp_path):
    """A folder scan skips fifos; one given by name was opened, which blocks until a writer comes."""
    import subprocess
    import sys

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    args = [str(tiny_run), str(fifo), str(tmp_path / "a.png"), "--fix", "--copy-unchanged", "--out", str(out)]
    command = [sys.executable, "-m", "rotnet_cli", "predict", *args, "--device", "cpu", "--workers", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    with open(out / "predictions.csv", newline="") as report:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(report)}
    assert rows["pipe.png"]["action"] == "unreadable"

    command = [
        sys.executable,
        "-m",
        "rotnet_cli",
        "viz",
        "attention",
        str(tiny_run),
        str(fifo),
        "--out",
        str(tmp_path / "v"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
