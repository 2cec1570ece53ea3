"""Issue 27, items 5-10: a hostile user's file names, options and files.

Each test failed before its fix: CSV rows cut by a carriage return (7), control characters
reaching the terminal (9), embeddings answered with other weights (5).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rotnet_cli.cli import app

CR_NAME = "cr\rx.png"
ESC_NAME = "esc\x1b[2Jx.png"


def _rotnet(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def _png(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def hostile_folder(tmp_path) -> Path:
    """10 images: 8 plain names, one with a carriage return, one with a terminal escape (clear screen)."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    names = [f"{i}.png" for i in range(8)] + [CR_NAME, ESC_NAME]
    for seed, name in enumerate(names):
        _png(folder / name, seed)
    return folder


def _csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


# ----------------------------------------------------------------------------- item 7: CSV quoting


def test_a_carriage_return_in_a_name_keeps_predictions_csv_one_row_per_image(tiny_run, hostile_folder, tmp_path):
    out = tmp_path / "report"
    result = _rotnet("predict", tiny_run, hostile_folder, "--out", out, "--device", "cpu", "--workers", "0")
    assert result.exit_code == 0, result.output
    rows = _csv_rows(out / "predictions.csv")
    assert len(rows) == 11  # header + 10 images
    assert any(row[0].endswith(CR_NAME) for row in rows[1:])
    # a line-based reader (wc -l, pandas' default engine) sees no bare carriage return either
    assert b"\r" not in (out / "predictions.csv").read_bytes().replace(b'cr\rx.png"', b"")


def test_embeddings_csv_with_a_carriage_return_reads_back_in_neighbours_and_viz(tiny_run, hostile_folder, tmp_path):
    table = tmp_path / "x.csv"
    result = _rotnet("embed", tiny_run, hostile_folder, "--out", table, "--device", "cpu", "--workers", "0")
    assert result.exit_code == 0, result.output
    from rotnet_cli.embedding import read_embeddings

    read = read_embeddings(table)
    assert len(read) == 10 and any(p.endswith(CR_NAME) for p in read.paths)
    pairs = tmp_path / "pairs.csv"
    result = _rotnet("neighbours", table, "--out", pairs, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert all(len(row) == 6 for row in _csv_rows(pairs))
    result = _rotnet("viz", "embeddings", table, "--out", tmp_path / "map.png", "--method", "pca")
    assert result.exit_code == 0, result.output


def test_every_csv_writer_goes_through_the_one_quoting_writer():
    """A csv.writer of its own (whose "\\n" line end leaves "\\r" bare) is how item 7 happened."""
    root = Path(__file__).parent.parent / "rotnet_cli"
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if p.name != "csvfiles.py" and ("csv.writer(" in p.read_text() or "csv.DictWriter(" in p.read_text())
    ]
    assert offenders == []


# ----------------------------------------------------------------------------- item 9: control characters


@pytest.fixture
def escape_folder(hostile_folder) -> Path:
    """The hostile folder plus an unreadable file whose name clears the screen: every command warns about it."""
    (hostile_folder / "bad\x1b[2J.png").write_bytes(b"not an image")
    return hostile_folder


def _assert_no_raw_controls(result, shown: bool = True) -> None:
    text = result.stdout + result.stderr
    assert "\x1b" not in text and "\r" not in text, repr(text[-600:])
    if shown:
        assert "\\x1b[2J" in text  # shown, escaped


def test_predict_shows_control_characters_escaped_in_its_table_and_warnings(tiny_run, escape_folder, tmp_path):
    result = _rotnet("predict", tiny_run, escape_folder, "--device", "cpu", "--workers", "0")
    assert result.exit_code == 0, result.output
    _assert_no_raw_controls(result)


def test_embed_and_neighbours_show_control_characters_escaped(tiny_run, escape_folder, tmp_path):
    table = tmp_path / "x.npz"
    result = _rotnet("embed", tiny_run, escape_folder, "--out", table, "--device", "cpu", "--workers", "0")
    assert result.exit_code == 0, result.output
    _assert_no_raw_controls(result)
    result = _rotnet("neighbours", table, "--device", "cpu", "-k", "9")
    assert result.exit_code == 0, result.output
    _assert_no_raw_controls(
        result, shown=False
    )  # its 10 most alike pairs need not hold that image: the weights rank them
    result = _rotnet("neighbours", table, "--query", escape_folder, "--device", "cpu", "--workers", "0")
    assert result.exit_code == 0, result.output
    _assert_no_raw_controls(result)


def test_pretrain_warns_about_a_control_character_name_escaped(escape_folder, tmp_path):
    result = _rotnet(
        "pretrain", "--model", "test_resnet", "--data", escape_folder, "--epochs", "1", "-b", "4",
        "--max-steps-per-epoch", "1", "--device", "cpu", "--workers", "0", "--out", tmp_path / "run",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    _assert_no_raw_controls(result)


# ----------------------------------------------------------------------------- item 5: which weights made the embeddings


def _retrain_in_place(run: Path) -> None:
    """The run's weights change (as a retrain with --overwrite would), its metadata stays."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = run / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.ndim == 4:  # the conv filters
            tensors[name] = tensor + 0.05 * torch.randn_like(tensor)
    save_file(tensors, str(weights), metadata=metadata)


@pytest.mark.parametrize("fmt", [".npz", ".safetensors"])
def test_embeddings_record_a_fingerprint_of_the_weights(tiny_run, hostile_folder, tmp_path, fmt):
    from rotnet_cli.embedding import read_embeddings

    files = []
    for name in ("a", "b"):
        files.append(tmp_path / f"{name}{fmt}")
        result = _rotnet("embed", tiny_run, hostile_folder, "--out", files[-1], "--device", "cpu", "--workers", "0")
        assert result.exit_code == 0, result.output
    prints = [read_embeddings(f).meta["weights_sha256"] for f in files]
    assert prints[0] == prints[1] and len(prints[0]) == 64  # the same weights, the same fingerprint


def test_neighbours_refuses_a_query_after_the_run_was_retrained(copy_of_run, hostile_folder, tmp_path):
    table = tmp_path / "x.npz"
    result = _rotnet("embed", copy_of_run, hostile_folder, "--out", table, "--device", "cpu", "--workers", "0")
    assert result.exit_code == 0, result.output
    query = hostile_folder / "0.png"
    result = _rotnet("neighbours", table, "--query", query, "--device", "cpu", "--workers", "0")
    assert result.exit_code == 0, result.output  # the same weights still answer
    _retrain_in_place(copy_of_run)
    result = _rotnet("neighbours", table, "--query", query, "--device", "cpu", "--workers", "0")
    assert result.exit_code == 1, result.output
    assert "not the weights that made" in result.stderr and "rotnet embed" in result.stderr


def test_neighbours_refuses_weights_of_another_run_of_the_same_model(tiny_run, copy_of_run, hostile_folder, tmp_path):
    table = tmp_path / "x.npz"
    result = _rotnet("embed", tiny_run, hostile_folder, "--out", table, "--device", "cpu", "--workers", "0")
    assert result.exit_code == 0, result.output
    _retrain_in_place(copy_of_run)
    query = hostile_folder / "0.png"
    args = ["neighbours", table, "--query", query, "--weights", copy_of_run, "--device", "cpu", "--workers", "0"]
    result = _rotnet(*args)
    assert result.exit_code == 1, result.output
    assert "not the weights that made" in result.stderr and "--weights" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


# ----------------------------------------------------------------------------- item 6: every option's range and type


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[-1]


@pytest.mark.parametrize(
    "text, says",
    [
        ("epochs: true\n", "epochs"),
        ("epochs: 1.5\n", "epochs"),
        ("momentum: 1.5\n", "--momentum must be in [0, 1)"),
        ("val_split: [0.1, 0.2]\n", "val_split"),
    ],
)
def test_a_config_file_value_is_checked_exactly_like_the_command_line(tmp_path, text, says):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    result = _rotnet("pretrain", "--config", config, "--device", "cpu", "--out", tmp_path / "run")
    assert result.exit_code in (1, 2), result.output
    assert says in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_config_types_are_checked_in_the_dataclass_too():
    from rotnet_cli.config import PretrainConfig
    from rotnet_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="--epochs"):
        PretrainConfig(epochs=True)
    with pytest.raises(ConfigError, match="--momentum"):
        PretrainConfig(momentum=1.5)


def test_a_best_metric_stage_the_model_lacks_is_refused_before_training(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--model", "test_resnet", "--eval-data", "digits", "--best-metric", "knn:9"]
    result = _rotnet(*args, "--epochs", "1", "--max-steps-per-epoch", "1", "--device", "cpu", "--out", out)
    assert result.exit_code == 1, result.output
    line = _one_error_line(result)
    assert "--best-metric knn:9" in line and "5 stages" in line
    assert not out.exists()


def test_a_diverging_loss_stops_the_run_keeps_the_last_good_checkpoint_and_exits_1(tmp_path, monkeypatch):
    import torch.nn.functional as F

    from rotnet_cli import pretraining

    # from the 2nd epoch on the loss is 100x what it was: far above chance for every step (weights still finite)
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        loss = F.cross_entropy(logits.float(), labels)
        return loss if calls["n"] <= 12 else loss * 100 + 50

    monkeypatch.setattr(pretraining, "rotation_loss", poisoned)
    out = tmp_path / "run"
    args = ["pretrain", "--model", "test_resnet", "--epochs", "3", "-b", "8", "--max-steps-per-epoch", "12"]
    result = _rotnet(*args, "--lr", "0.0001", "--device", "cpu", "--workers", "0", "--out", out)
    assert result.exit_code == 1, result.output
    line = _one_error_line(result)
    assert "diverged" in line and "checkpoint" in line
    assert (out / "checkpoint.pt").is_file() and not (out / "model.safetensors").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [row["epoch"] for row in rows if "epoch" in row] == [1]


def test_a_healthy_run_never_trips_the_divergence_rule(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--model", "test_resnet", "--epochs", "2", "-b", "8", "--max-steps-per-epoch", "12"]
    result = _rotnet(*args, "--device", "cpu", "--workers", "0", "--out", out)
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------- item 8: one line, not "a bug in rotnet"


@pytest.fixture
def looping_folder(tmp_path) -> Path:
    """One good image and a link to itself named like one (a.png -> a.png)."""
    folder = tmp_path / "loop"
    folder.mkdir()
    _png(folder / "good.png", 0)
    (folder / "a.png").symlink_to("a.png")
    return folder


@pytest.mark.parametrize("command", ["predict", "neighbours", "viz attention"])
def test_a_self_looping_link_is_an_unreadable_file_not_a_crash(tiny_run, looping_folder, tmp_path, command):
    if command == "predict":
        args = ["predict", tiny_run, looping_folder]
    elif command == "neighbours":
        table = tmp_path / "x.npz"
        made = _rotnet("embed", tiny_run, looping_folder, "--out", table, "--device", "cpu", "--workers", "0")
        assert made.exit_code == 0, made.output
        args = ["neighbours", table, "--query", looping_folder]
    else:
        args = ["viz", "attention", tiny_run, looping_folder, "--out", tmp_path / "maps"]
    result = _rotnet(*args, "--device", "cpu", *(["--workers", "0"] if command != "viz attention" else []))
    assert "a bug in rotnet" not in result.output
    assert result.exit_code == 0, result.output


def test_a_file_name_that_is_not_utf8_is_written_to_an_embeddings_csv(tiny_run, tmp_path):
    import os

    folder = tmp_path / "names"
    folder.mkdir()
    _png(folder / "good.png", 0)
    _png(Path(os.fsdecode(bytes(folder) + b"/caf\xe9.png")), 1)
    table = tmp_path / "x.csv"
    result = _rotnet("embed", tiny_run, folder, "--out", table, "--device", "cpu", "--workers", "0")
    assert result.exit_code == 0, result.output
    from rotnet_cli.embedding import read_embeddings

    assert any(p.endswith("caf\\xe9.png") for p in read_embeddings(table).paths)


def test_a_yaml_anchor_bomb_in_config_is_refused_fast(tmp_path):
    # one option whose value nests 9 levels of 9 aliases: 9**9 strings (gigabytes) once expanded
    levels = ["&a [x, x, x, x, x, x, x, x, x]"]
    levels += [f"&{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("rotations: [" + ", ".join(levels) + "]\n")
    result = _rotnet("pretrain", "--config", bomb, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert "list of lists" in result.stderr and "a bug" not in result.stderr


def _deep_json(depth: int = 200_000) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("where", ["config.json", "metrics.jsonl", "--config"])
def test_a_deeply_nested_json_is_one_line(copy_of_run, tmp_path, where):
    if where == "--config":
        file = tmp_path / "deep.json"
        file.write_text('{"epochs": ' + _deep_json() + "}")
        result = _rotnet("pretrain", "--config", file, "--out", tmp_path / "run")
    elif where == "config.json":
        (copy_of_run / "config.json").write_text(_deep_json())
        result = _rotnet("pretrain", "--resume", copy_of_run, "--device", "cpu")
    else:
        (copy_of_run / "metrics.jsonl").write_text(_deep_json() + "\n")
        result = _rotnet("viz", "curves", copy_of_run, "--out", tmp_path / "curves.png")
    assert result.exit_code in (1, 2), result.output
    assert "a bug in rotnet" not in result.output and "Traceback" not in result.output


def test_a_deeply_nested_safetensors_header_is_one_line(tmp_path):
    import struct

    header = ('{"__metadata__": {"a": "b"}, "x": ' + _deep_json() + "}").encode()
    weights = tmp_path / "deep.safetensors"
    weights.write_bytes(struct.pack("<Q", len(header)) + header)
    result = _rotnet("viz", "filters", weights, "--out", tmp_path / "f.png")
    assert result.exit_code == 1, result.output
    assert "a bug in rotnet" not in result.output


# ----------------------------------------------------------------------------- items 8 and 10: a resume that cannot log


def test_a_resume_whose_logs_cannot_be_written_is_one_line_and_changes_no_file(copy_of_run, monkeypatch):
    from conftest import files_in

    from rotnet_cli import loggers

    def read_only(self, folder, *args):
        raise PermissionError(13, "Permission denied", str(folder / loggers.CSV_FILE))

    monkeypatch.setattr(loggers.CsvLogger, "__init__", read_only)
    before = files_in(copy_of_run)
    result = _rotnet("pretrain", "--resume", copy_of_run, "--epochs", "2", "--device", "cpu", "--workers", "0")
    assert result.exit_code == 1, result.output
    line = _one_error_line(result)
    assert "a bug" not in line and "choose another --out" not in line
    assert "logs" in line and "--logger" in line
    assert files_in(copy_of_run) == before


# ----------------------------------------------------------------------------- item 8: torch that cannot load


def test_torch_that_cannot_load_under_a_memory_limit_is_one_line(tiny_run, tmp_path):
    import os
    import subprocess
    import sys

    image = tmp_path / "a.png"
    _png(image, 0)
    command = f"ulimit -v 400000; exec {sys.executable} -m rotnet_cli predict {tiny_run} {image} --device cpu"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=os.environ, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "a bug in rotnet" not in done.stderr and "memory" in done.stderr.splitlines()[-1]


def test_no_writable_temporary_folder_is_one_line(capsys):
    import typer

    from rotnet_cli.cli._common import _run_to_last_word

    def command():
        raise FileNotFoundError(2, "No usable temporary directory found in ['/tmp', '/var/tmp', '/work']")

    with pytest.raises(typer.Exit):
        _run_to_last_word(command, (), {})
    line = capsys.readouterr().err.strip()
    assert "a bug" not in line and "TMPDIR" in line
