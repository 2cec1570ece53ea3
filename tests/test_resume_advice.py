"""--resume advice (issue 27, item 2): every command it suggests names the folder the user
gave, says what is true of it, and works when pasted (each is run here)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from conftest import files_in
from typer.testing import CliRunner

from rotnet_cli.cli import app


def recorded_as_typed(run: Path, out: Path) -> None:
    """config.json records the command line as the user typed it, with the original --out."""
    record = json.loads((run / "config.json").read_text())
    record["command"] = [
        "/usr/local/bin/rotnet",
        "pretrain",
        "--model",
        "test_resnet",
        "--rotations",
        "0,180",
        "--out",
        str(out),
    ]
    (run / "config.json").write_text(json.dumps(record))


def one_line(result) -> str:
    return " ".join(result.output.split())


def suggested(message: str) -> list[str]:
    """The command after 'with:' / ':' at the end of the advice, as argv without 'rotnet'."""
    match = re.search(r"(?:with|there|weights|from it): (rotnet pretrain .*?)(?: \(|$)", message)
    assert match, message
    argv = shlex.split(match.group(1))
    assert argv[:2] == ["rotnet", "pretrain"]
    return argv[1:]


def run_quickly(argv: list[str]) -> list[str]:
    return [*argv, "--epochs", "1", "--max-steps-per-epoch", "1", "--device", "cpu", "--workers", "0"]


def test_a_copy_of_a_finished_run_without_its_checkpoint_is_told_the_truth_about_the_copy(tiny_run, tmp_path):
    original = files_in(tiny_run)
    copy = Path(shutil.copytree(tiny_run, tmp_path / "copy"))
    (copy / "checkpoint.pt").unlink()
    recorded_as_typed(copy, tiny_run)

    result = CliRunner().invoke(app, ["pretrain", "--resume", str(copy)])
    assert result.exit_code == 1
    message = one_line(result)
    assert "stopped before its first checkpoint" not in message
    assert "checkpoint.pt is missing" in message
    assert str(tiny_run) not in message  # the path config.json recorded is not the folder given

    argv = suggested(message)
    assert str(copy) in " ".join(argv)
    pasted = CliRunner().invoke(app, run_quickly(argv))
    assert pasted.exit_code == 0, pasted.output
    assert files_in(tiny_run) == original


def test_a_run_stopped_before_its_first_checkpoint_is_started_again_in_the_folder_given(tiny_run, tmp_path):
    stopped = tmp_path / "moved-here"
    stopped.mkdir()
    shutil.copy(tiny_run / "config.json", stopped / "config.json")
    recorded_as_typed(stopped, tiny_run)  # its recorded --out is elsewhere
    original = files_in(tiny_run)

    result = CliRunner().invoke(app, ["pretrain", "--resume", str(stopped)])
    assert result.exit_code == 1
    message = one_line(result)
    assert "stopped before its first checkpoint" in message
    argv = suggested(message)
    assert str(stopped) in argv and str(tiny_run) not in " ".join(argv)
    pasted = CliRunner().invoke(app, run_quickly(argv))
    assert pasted.exit_code == 0, pasted.output
    assert (stopped / "checkpoint.pt").is_file()
    assert files_in(tiny_run) == original


def test_an_export_given_to_resume_is_named_as_one_and_no_refused_command_is_suggested(tiny_run, tmp_path):
    export = tmp_path / "export"
    made = CliRunner().invoke(app, ["export", str(tiny_run), "--out", str(export)])
    assert made.exit_code == 0, made.output
    before = files_in(export)

    result = CliRunner().invoke(app, ["pretrain", "--resume", str(export)])
    assert result.exit_code == 1
    message = one_line(result)
    assert "exported model" in message and "--overwrite" not in message
    assert files_in(export) == before

    pasted = CliRunner().invoke(
        app, run_quickly(["pretrain", "--init", str(export), "--model", "test_resnet", "--out", str(tmp_path / "new")])
    )
    assert pasted.exit_code == 0, pasted.output  # the --init it names works


def test_next_commands_for_a_run_folder_that_is_not_utf8_paste_back_to_its_bytes(tmp_path):
    """Smaller item: a name's undecodable bytes were printed raw, which a UTF-8 terminal shows
    (and copies) as U+FFFD, so the pasted command named another folder. Printed as $'..\\xff',
    bash reads the word back to the exact bytes."""
    out = os.fsdecode(os.fsencode(tmp_path) + b"/run-\xff\xfe")
    result = CliRunner().invoke(
        app,
        run_quickly(["pretrain", "--model", "test_resnet", "--rotations", "0,180", "-b", "16", "--out", out]),
    )
    assert result.exit_code == 0, result.output
    raw = next(line for line in result.stdout_bytes.splitlines() if b"rotnet probe" in line)
    line = raw.decode("utf-8")  # what a terminal shows and copies: text, never a raw undecodable byte
    assert "\ufffd" not in line
    start = line.index("rotnet probe ") + len("rotnet probe ")
    quoted = line[start:].split(" --")[0].strip()
    echoed = subprocess.run(["bash", "-c", f"printf %s {quoted}"], capture_output=True, check=True).stdout
    assert echoed == os.fsencode(out), quoted


def test_overwrite_says_it_replaces_the_runs_export_which_it_does(copy_of_run, tmp_path):
    """Smaller item: pretrain --overwrite removed RUN/export without a word; the help says so now."""
    shown = CliRunner().invoke(app, ["pretrain", "--help"], env={"COLUMNS": "400"})
    overwrite_help = next(line for line in shown.output.splitlines() if "--overwrite" in line)
    assert "export/" in overwrite_help
    exported = CliRunner().invoke(app, ["export", str(copy_of_run), "--out", str(copy_of_run / "export")])
    assert exported.exit_code == 0, exported.output
    again = CliRunner().invoke(
        app, run_quickly(["pretrain", "--model", "test_resnet", "--out", str(copy_of_run), "--overwrite"])
    )
    assert again.exit_code == 0, again.output
    assert not (copy_of_run / "export").exists()


def test_a_killed_overwrite_in_a_folder_moved_since_is_advised_to_start_again_in_that_folder(copy_of_run, tmp_path):
    from rotnet_cli import rundir

    elsewhere = tmp_path / "where-it-was-started"
    rundir.set_aside(copy_of_run)  # what pretrain --overwrite does before its first checkpoint ...
    killed = ["/usr/local/bin/rotnet", "pretrain", "--model", "test_resnet", "-o", str(elsewhere), "--overwrite"]
    (copy_of_run / "config.json").write_text(json.dumps({"config": {}, "command": killed}))  # ... killed there
    result = CliRunner().invoke(app, ["pretrain", "--resume", str(copy_of_run)])
    message = one_line(result)
    assert result.exit_code == 1 and "is back in" in message
    advice = shlex.split(message.split("To start the new run again: ")[1].split(" (the old run")[0])
    assert str(copy_of_run) in advice and str(elsewhere) not in advice
