"""What a newcomer reads: help that shows flags as flags and options in panels, commands in
workflow order, bare `rotnet` as help; messages that say what happened in plain words;
commands to copy printed whole; the test extra that runs every test."""

import ast
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomllib
import torch
import typer
from typer.testing import CliRunner

from rotnet_cli.cli import app
from rotnet_cli.cli._common import err_console, error_boundary, out_console
from rotnet_cli.cli.pretrain import HELP_PANELS, _render_summary
from rotnet_cli.config import PretrainConfig
from rotnet_cli.errors import Interrupted
from rotnet_cli.runtime import describe_device

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    ["pretrain"],
    ["probe"],
    ["export"],
    ["predict"],
    ["reproduce"],
    ["viz", "filters"],
    ["viz", "attention"],
    ["viz", "curves"],
]


def help_text(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("bare", [[], ["viz"]])
def test_bare_rotnet_prints_its_help_and_exits_0(bare):
    result = CliRunner().invoke(app, bare)
    assert result.exit_code == 0 and "Usage: rotnet" in result.stdout and "Commands" in result.stdout


def test_commands_are_listed_in_workflow_order():
    text = help_text()
    listed = [
        name
        for name in re.findall(r"^│ (\w+) ", text, flags=re.M)
        if name in {"pretrain", "probe", "export", "viz", "predict", "reproduce"}
    ]
    assert listed == ["pretrain", "probe", "export", "viz", "predict", "reproduce"]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_flags_show_as_flags_and_arguments_as_names(command):
    text = help_text(*command)
    assert "<bool>" not in text  # `--download <bool>` reads as if `--download true` worked; it does not
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage and re.search(r"\[OPTIONS\]( [A-Z\[][A-Z.\]]*)*\s*$", usage), usage


@pytest.mark.parametrize("command", [*COMMANDS, ["embed"], ["neighbours"], ["viz", "embeddings"]], ids=" ".join)
def test_help_examples_are_whole_commands_on_a_narrow_terminal(command):
    # rich wrapped the examples at the window's width: a copied half of a command runs something else
    click_command = typer.main.get_command(app)
    for name in command:
        click_command = click_command.commands[name]
    examples = [
        re.sub(r"\[/?(b|dim)?\]", "", line).replace("\\[", "[").strip() for line in click_command.epilog.splitlines()
    ]
    examples = [line for line in examples if line.startswith(("rotnet ", "torchrun "))]
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    shown = [line.strip() for line in result.stdout.splitlines()]
    assert examples and all(example in shown for example in examples), command


def test_a_flag_given_a_value_is_a_usage_error():
    result = CliRunner().invoke(app, ["pretrain", "--download", "true"])
    assert result.exit_code == 2 and "true" in result.output


def test_every_pretrain_option_is_in_a_help_panel_in_set_up_order():
    command = typer.main.get_command(app).commands["pretrain"]
    with typer.Context(command) as ctx:
        options = [p for p in command.get_params(ctx) if not p.hidden and p.name != "help"]
    assert {p.name for p in options} == {name for names in HELP_PANELS.values() for name in names}
    text = help_text("pretrain")
    positions = [text.index(f"─ {title} ─") for title in HELP_PANELS]
    assert positions == sorted(positions)
    data_panel = text[positions[1] : positions[2]]
    assert "--img-size" in data_panel and "--download" in data_panel and "--epochs" not in data_panel


def test_the_pretrain_help_trains_a_vit_with_adamw_as_the_readme_does():
    vit_lines = [line for line in help_text("pretrain").splitlines() if "rotnet pretrain --model vit" in line]
    assert vit_lines and all("--optimizer adamw" in line for line in vit_lines)


def test_the_test_extra_brings_every_package_a_test_imports_or_skips():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    test_extra = {re.split(r"[<>=\[ ;]", req)[0].lower() for req in extras["test"]}
    wanted = set()  # what the default run imports or skips; slow tests may skip where an extra is missing
    for path in (ROOT / "tests").glob("test_*.py"):
        for test in ast.walk(ast.parse(path.read_text())):
            if isinstance(test, ast.FunctionDef) and not any("slow" in ast.unparse(d) for d in test.decorator_list):
                wanted |= set(re.findall(r"importorskip\(\s*[\"']([\w.]+)[\"']", ast.unparse(test)))
    assert wanted and {name.split(".")[0] for name in wanted} <= test_extra


def test_messages_say_one_thread_and_the_default_a_run_used():
    torch.set_num_threads(1)  # as the suite runs
    assert describe_device(torch.device("cpu")) == "cpu (1 thread)"
    saved, asked = PretrainConfig(), PretrainConfig(lr=0.5)
    assert saved.contradictions(asked, ["lr"]) == ["--lr 0.5 (the run used the default, 0.1)"]


def test_a_stopped_run_says_stopped_once_and_names_the_resume_command():
    @error_boundary
    def stopped() -> None:
        raise Interrupted(
            "stopped after epoch 2 of 10; checkpoint saved; resume with: rotnet pretrain --resume runs/demo"
        )

    with err_console.capture() as captured, pytest.raises(typer.Exit) as exit_info:
        stopped()
    assert exit_info.value.exit_code == 130
    assert (
        captured.get().strip()
        == "stopped after epoch 2 of 10; checkpoint saved; resume with: rotnet pretrain --resume runs/demo"
    )


def test_summary_says_what_the_table_leaves_out_and_prints_next_commands_whole(tmp_path):
    out_dir = tmp_path / ("a-run-directory-with-a-name-long-enough-to-pass-eighty-columns-" + "x" * 30)
    rows = [
        {"epoch": e, "loss": 0.5, "rot_acc": 0.8, "val_loss": 0.6, "val_rot_acc": 0.75, "images_per_s": 900.0}
        for e in range(1, 13)
    ]
    result = SimpleNamespace(
        out_dir=out_dir,
        history=rows,
        final=rows[-1],
        val_rot_acc_per_rotation={},
        labelled=True,
        best=None,
        val_images=None,
        calibration=None,
    )
    with out_console.capture() as captured:
        _render_summary(result, PretrainConfig(epochs=12))
    lines = captured.get().splitlines()
    assert f"the last 10 of 12 epochs; all of them: {out_dir}/metrics.jsonl" in lines
    assert f"  rotnet probe {out_dir} --compare random" in lines  # one line each, at any width
    assert f"  rotnet export {out_dir} --out {out_dir}/export" in lines


def test_next_probe_command_asks_for_labelled_images_after_an_unlabelled_folder(tmp_path):
    rows = [{"epoch": 1, "loss": 0.5, "rot_acc": 0.8, "val_loss": 0.6, "val_rot_acc": 0.75, "images_per_s": 900.0}]
    result = SimpleNamespace(
        out_dir=tmp_path / "run",
        history=rows,
        final=rows[-1],
        val_rot_acc_per_rotation={},
        labelled=False,
        best=None,
        val_images=None,
        calibration=None,
    )
    with out_console.capture() as captured:
        _render_summary(result, PretrainConfig(data=str(tmp_path / "photos"), epochs=1))
    output = captured.get()
    # probe scores features against labels: the photos folder has none, so the command must not name it
    assert f"  rotnet probe {tmp_path / 'run'} --data LABELLED_FOLDER --compare random" in output.splitlines()
    assert "a folder of class sub-folders" in output
