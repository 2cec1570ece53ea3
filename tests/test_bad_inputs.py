"""Every bad input, on every command: one line that names the fix, exit 1 or 2, no traceback,
and no file that existed before is touched (nor any new file left behind).

The table below is the contract. Each row runs the real CLI (CliRunner) inside a sentinel
folder that holds a finished run, images, broken data and a non-empty output folder; the
whole folder is hashed before and after.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from rotnet_cli.cli import app

# args (with {placeholders} for sentinel paths), expected exit code, text the error line must contain
MATRIX = [
    # -- pretrain: options
    ("pretrain --model not_a_model_xyz", 1, "unknown timm model"),
    ("pretrain --device cuda:7", 1, "available"),
    ("pretrain --device banana", 1, "use one of"),
    ("pretrain --precision fp16 --device cpu", 1, "on CPU use fp32 or bf16"),
    ("pretrain --precision fp8", 1, "--precision must be one of"),
    ("pretrain --rotations 0,90,90", 1, "appears twice"),
    ("pretrain --rotations 0", 1, "at least two angles"),
    ("pretrain --rotations 0,abc", 1, "e.g. --rotations 0,90,180,270"),
    ("pretrain --rotations 0,400", 1, "use e.g. 270 instead of -90"),
    ("pretrain --epochs 0", 1, "--epochs must be > 0"),
    ("pretrain --epochs abc", 2, ""),
    ("pretrain --batch-size -4", 1, "--batch-size must be > 0"),
    ("pretrain --lr nan", 1, "--lr must be > 0"),
    ("pretrain --momentum -1", 1, "--momentum must be in [0, 1)"),
    ("pretrain --seed 100000000000000", 1, "--seed must be in"),
    ("pretrain --copies some", 1, "--copies must be one of all, one"),
    ("pretrain --val-split 1.5", 1, "--val-split must be in [0, 1)"),
    ("pretrain --warmup-epochs 5 --epochs 2", 1, "must be shorter than --epochs"),
    ("pretrain --schedule step", 1, "needs --milestones"),
    ("pretrain --no-such-option", 2, ""),
    # -- pretrain: output folder and resume
    ("pretrain --out {run}", 1, "pass --resume"),
    ("pretrain --out {full_dir}", 1, "--overwrite"),
    ("pretrain --out {notes}", 1, "choose a folder name"),
    ("pretrain --resume {missing}", 1, "not a rotnet run"),
    ("pretrain --resume {empty}", 1, "not a rotnet run"),
    ("pretrain --resume {run} --overwrite", 1, "choose one"),
    # -- pretrain: data
    ("pretrain --data {missing}", 1, "not a known dataset name"),
    ("pretrain --data {empty}", 1, "holds no images"),
    ("pretrain --data {notes}", 1, "give a folder of images"),
    ("pretrain --data {empty_class} --device cpu", 1, "remove it or add images"),
    ("pretrain --data {broken} --device cpu", 1, "could be read"),
    ("pretrain --data cifar10 --data-dir {empty}", 1, "pass --download"),
    # -- pretrain: weights to start from
    ("pretrain --init {missing} --device cpu", 1, "does not exist"),
    ("pretrain --init {evil} --device cpu", 1, "was refused"),
    (
        "pretrain --model test_vit --init {run} --device cpu",
        1,
        "do not fit --model test_vit at 32 px; pass --model test_resnet",
    ),
    # -- export
    ("export {missing} --out {new}", 1, "does not exist"),
    ("export {run} --out {full_dir}", 1, "--overwrite"),
    ("export {evil} --out {new}", 1, "was refused"),
    ("export {foreign} --out {new}", 1, "rotnet metadata"),
    ("export {notes} --out {new}", 1, "is not a PyTorch checkpoint"),
    ("export timm:not_a_model_xyz --out {new}", 1, "unknown timm model"),
    ("export {run}", 2, ""),
    ("export {run} --out {new} --dtype fp8", 1, "--dtype"),
    # -- probe
    ("probe {missing}", 1, "does not exist"),
    ("probe {run} --data {few} --device cpu", 1, "class sub-folders"),
    ("probe {run} --head svm --device cpu", 1, "--head"),
    ("probe random:not_a_model_xyz", 1, "unknown timm model"),
    ("probe {run} --device cuda:7", 1, "available"),
    ("probe {run} --recipe fancy --device cpu", 1, "--recipe must be one of quick, paper"),
    ("probe {run} --features sometimes --device cpu", 1, "--features must be one of cached, augmented"),
    ("probe {run} --recipe paper --epochs 0 --device cpu", 1, "--epochs must be > 0"),
    # -- reproduce
    ("reproduce paper-cifar10 --schedule fast --out {new}", 1, "--schedule must be one of paper, official"),
    ("reproduce paper-imagenet --out {new}", 1, "recipe must be one of paper-cifar10"),
    # -- predict
    ("predict {run} {missing}", 1, "does not exist"),
    ("predict {missing} {img}", 1, "does not exist"),
    ("predict {run} {img} --fix --out {full_dir} --device cpu", 1, "--overwrite"),
    ("predict {run} {img} --min-confidence 3 --device cpu", 1, "--min-confidence"),
    ("predict {run}", 2, ""),
    # -- embed, neighbours, viz embeddings
    ("embed {run} {few} --out {new}.txt", 1, "give a file name ending in .parquet, .npz"),
    ("embed {run} {missing} --out {new}.npz --device cpu", 1, "not a known dataset name"),
    ("embed {missing} {few} --out {new}.npz --device cpu", 1, "does not exist"),
    ("embed {run} {few} --out {new}.npz --layer 9 --device cpu", 1, "stages; use 1.."),
    ("embed {run} {few} --out {new}.npz --pool sum", 1, "--pool must be one of avg, max"),
    ("embed {run} {broken} --out {new}.npz --device cpu", 1, "could be read"),
    ("embed {run} {few} --out {new}.npz --img-size 64 --device cpu", 1, "drop --img-size"),
    ("embed {run} {few}", 2, ""),
    ("neighbours {missing}.npz", 1, "does not exist"),
    ("neighbours {notes}", 1, "embeddings files end in"),
    ("neighbours {foreign}", 1, "not written by rotnet embed"),
    ("neighbours {noise_npz}", 1, "not a zip archive, as every .npz is"),
    ("neighbours {foreign} -k 0", 1, "-k must be > 0"),
    ("neighbours {foreign} --out {new}.json", 1, "ending in .csv"),
    ("viz embeddings {missing}.npz --out {new}.png", 1, "does not exist"),
    ("viz embeddings {foreign} --out {new}.png --method isomap", 1, "--method must be one of pca, tsne, umap"),
    # -- viz
    ("viz filters {missing}", 1, "does not exist"),
    ("viz filters {evil}", 1, "was refused"),
    ("viz attention {run} {missing}", 1, "does not exist"),
    ("viz attention {run} {img} --cmap rainbow --device cpu", 1, "--cmap"),
    ("viz attention {run} {img} --rotations 0,0 --device cpu", 1, "appears twice"),
    ("viz curves {missing}", 1, "does not exist"),
    ("viz sideways {run}", 2, ""),
    # -- issue 14, item 5 and issue 19, item 14: one overwrite policy; rotnet replaces only its own files
    ("pretrain --out {foreign_run} --overwrite --device cpu", 1, "was not written by rotnet"),
    ("export {run} --out {full_dir} --overwrite", 1, "keep.txt was not written by rotnet"),
    ("viz filters {run} --out {img}", 1, "pass --overwrite"),
    ("viz filters {run} --out {img} --overwrite", 1, "photo.png was not written by rotnet"),
    ("viz curves {run} --out {img}", 1, "pass --overwrite"),
    ("viz attention {run} {img} --out {full_dir} --device cpu", 1, "--overwrite"),
    # -- item 10: nothing a step could train on, found before anything is written
    ("pretrain --data {broken} --cache none --device cpu", 1, "none of the 2 image files"),
    ("pretrain --model test_resnet -b 1 --copies one --device cpu", 1, "BatchNorm"),
    ("probe {run} -b 1 --device cpu", 1, "BatchNorm"),
    # -- item 11: sizes bounded before anything is allocated
    ("viz filters {run} --scale 100000 --out {new_png}", 1, "pixels"),
    ("viz attention {run} {img} --scale 100000 --out {new} --device cpu", 1, "pixels"),
    ("pretrain --img-size 100000", 1, "--img-size must be between"),
    # -- item 13: the advice names a command that works
    ("pretrain --resume {stopped}", 1, "start it again with: rotnet pretrain"),
    # -- a second process on a run directory (item 3) is refused: see test_reliability
    # -- issue 27: predict's --overwrite replaces only what predict wrote; advice that is true and works
    ("predict {run} {img} --fix --out {users_out} --overwrite --device cpu", 1, "was not written by rotnet"),
    ("predict {run} {img} --out {users_out} --overwrite --device cpu", 1, "predictions.csv was not written by rotnet"),
    ("predict {run} {few} --fix --in-place --out {few} --device cpu", 1, "--out holds only the report"),
    ("pretrain --resume {lost_checkpoint}", 1, "checkpoint.pt is missing"),
    # -- score and viz outliers (issue 25)
    ("score {run}", 1, "give the images to score"),
    ("score {run} {missing} --device cpu", 1, "does not exist"),
    ("score {missing} {few} --device cpu", 1, "does not exist"),
    ("score {run} {few} --out {new}.txt", 1, "give a file name ending in .csv"),
    ("score {run} {few} --method magic", 1, "--method must be one of rotation, knn, both"),
    ("score {run} {few} -k 0", 1, "-k must be > 0"),
    ("score {run} {few} --top -1", 2, ""),
    ("score {run} --inliers {few}", 1, "needs --outliers"),
    ("score {run} {few} --inliers {few} --outliers {few}", 1, "not both"),
    ("score {run} {few} --reference {few}", 1, "add --method knn or both"),
    ("score {run} {few} --normal cats --device cpu", 1, "no class sub-folders"),
    ("score {run} digits --normal 11 --device cpu", 1, "has the classes 0, 1"),
    ("score {run} {broken} --device cpu --workers 0", 1, "could be read"),
    ("score {run} {few} --out {full_dir}/keep.txt --overwrite", 1, "ending in .csv"),
    ("score random:test_resnet {few} --img-size 32 --device cpu", 1, "--method knn"),
    ("score random:test_resnet {few} --img-size 32 --method knn --device cpu", 1, "--reference"),
    ("viz outliers {missing}.csv", 1, "does not exist"),
    ("viz outliers {notes}", 1, "scores files end in"),
    ("viz outliers {noise_npz}", 1, "not written by rotnet score"),
    ("viz outliers {run} {few} -n 0", 1, "-n must be > 0"),
    ("viz outliers {run} {few} --out {img} --device cpu", 1, "pass --overwrite"),
    # -- issue 27, item 6: every option's range, before any work
    ("pretrain --momentum 1.5", 1, "--momentum must be in [0, 1)"),
    (
        "pretrain --model test_resnet --eval-data digits --best-metric knn:9 --epochs 1 --max-steps-per-epoch 1 --device cpu",
        1,
        "5 stages",
    ),
    ("neighbours {foreign} --show -1", 1, "--show must be >= 0"),
    # -- issue 27, item 8: a config that would expand without bound, JSON nested beyond the stack
    ("pretrain --config {yaml_bomb}", 2, ""),
    ("pretrain --config {deep_json}", 2, ""),
    ("pretrain --resume {deep_run} --device cpu", 1, "config.json"),
    # -- issue 27, item 10: the message names the option the user gave
    ("pretrain --milestones 5,2 --epochs 1", 1, "--epochs 1 has no epoch"),
    ("pretrain --milestones 5,2 --epochs 10", 1, "--milestones must be increasing"),
    ("pretrain --milestones 3,12 --epochs 10", 1, "between 1 and 9"),
    ("pretrain --eval-data {missing} --epochs 1 --max-steps-per-epoch 1 --device cpu", 1, "--eval-data"),
    ("pretrain --eval-data {one} --epochs 1 --max-steps-per-epoch 1 --device cpu", 1, "--eval-data"),
    ("pretrain --eval-data {empty_class} --epochs 1 --max-steps-per-epoch 1 --device cpu", 1, "--eval-data"),
]


class _Payload:
    """Unpickling this runs code: it must never be unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _png(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory, tiny_run) -> dict[str, Path]:
    """A folder with everything the bad inputs point at; tests must leave it as it is."""
    root = tmp_path_factory.mktemp("sentinel")
    shutil.copytree(tiny_run, root / "run")
    paths = {
        "root": root,
        "run": root / "run",
        "img": root / "photo.png",
        "notes": root / "notes.txt",
        "empty": root / "empty",
        "full_dir": root / "full_dir",
        "few": root / "few",
        "broken": root / "broken",
        "empty_class": root / "empty_class",
        "evil": root / "evil.pt",
        "foreign": root / "foreign.safetensors",
        "noise_npz": root / "noise.npz",
        "missing": root / "does-not-exist",
        "new": root / "new-output",
        "new_png": root / "new.png",
        "foreign_run": root / "my-project",
        "one": root / "one",
        "stopped": root / "stopped",
        "users_out": root / "users_out",
        "lost_checkpoint": root / "lost_checkpoint",
        "yaml_bomb": root / "bomb.yaml",
        "deep_json": root / "deep.json",
        "deep_run": root / "deep-run",
    }
    _png(paths["img"], 0)
    paths["notes"].write_text("not an image\n")
    paths["empty"].mkdir()
    paths["full_dir"].mkdir()
    (paths["full_dir"] / "keep.txt").write_text("the user's file\n")
    paths["few"].mkdir()
    for i in range(3):
        _png(paths["few"] / f"{i}.png", i)
    paths["broken"].mkdir()
    (paths["broken"] / "zero.png").write_bytes(b"")
    (paths["broken"] / "text.jpg").write_text("not a jpeg")
    (paths["empty_class"] / "cats").mkdir(parents=True)
    (paths["empty_class"] / "dogs").mkdir()
    _png(paths["empty_class"] / "cats" / "0.png", 0)
    torch.save({"model": _Payload(root / "PWNED")}, paths["evil"])
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, str(paths["foreign"]))
    paths["noise_npz"].write_bytes(bytes(range(256)) * 8)  # numpy would take it for a pickle
    paths["foreign_run"].mkdir()
    (paths["foreign_run"] / "config.json").write_text('{"project": "mine, not a rotnet run"}\n')
    paths["one"].mkdir()
    _png(paths["one"] / "only.png", 0)
    paths["stopped"].mkdir()  # a run killed before its first checkpoint: config.json, nothing to resume
    shutil.copy(paths["run"] / "config.json", paths["stopped"] / "config.json")
    paths["users_out"].mkdir()  # the user's own photo and spreadsheet where predict would write
    _png(paths["users_out"] / "photo.png", 5)
    (paths["users_out"] / "predictions.csv").write_text("my own notes\n")
    shutil.copytree(paths["run"], paths["lost_checkpoint"])  # a finished run copied without its checkpoint
    (paths["lost_checkpoint"] / "checkpoint.pt").unlink()
    levels = ["&a [x, x, x, x, x, x, x, x, x]"]  # 9**9 strings once expanded
    levels += [f"&{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    paths["yaml_bomb"].write_text("rotations: [" + ", ".join(levels) + "]\n")
    paths["deep_json"].write_text('{"epochs": ' + "[" * 200_000 + "]" * 200_000 + "}")
    shutil.copytree(paths["run"], paths["deep_run"])
    (paths["deep_run"] / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    return paths


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def _registered(command: str) -> bool:
    from typer.main import get_command

    return command in get_command(app).commands  # type: ignore[attr-defined]


@pytest.mark.parametrize("args, code, fix", MATRIX, ids=[row[0] for row in MATRIX])
def test_bad_input_gives_one_line_and_changes_nothing(sentinel, monkeypatch, args, code, fix):
    command = args.split()[0]
    if not _registered(command):
        pytest.skip(f"`rotnet {command}` is not registered in this build")
    monkeypatch.chdir(sentinel["root"])  # default outputs (runs/, filters.png, ...) would land here
    monkeypatch.setenv("ROTNET_DEBUG", "0")
    before = _snapshot(sentinel["root"])

    argv = [a.format(**{k: str(v) for k, v in sentinel.items()}) for a in args.split()]
    result = CliRunner().invoke(app, argv)

    assert result.exit_code == code, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if code == 1:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
        assert fix in errors[0], f"{errors[0]!r} does not say {fix!r}"
        assert_named_options_exist(argv, errors[0])
    assert _snapshot(sentinel["root"]) == before
    assert not (sentinel["root"] / "PWNED").exists()


def _options_of(argv: list[str]) -> set[str]:
    """Every option name of the command that ``argv`` invokes (``viz filters`` is a command of the group viz)."""
    from typer.main import get_command

    command = get_command(app)
    for word in argv:  # a group's commands (typer may bring its own copy of click: no isinstance)
        if word in getattr(command, "commands", {}):
            command = command.commands[word]
    return {
        name for param in command.params for name in getattr(param, "opts", []) + getattr(param, "secondary_opts", [])
    }


def assert_named_options_exist(argv: list[str], message: str) -> None:
    """Item 13 of issue 14: a message names a fix that exists; every --option it names is one of the command's."""
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", message))
    missing = named - _options_of(argv)
    assert not missing, f"{message!r} names {sorted(missing)}, which `rotnet {argv[0]}` does not have"


# ----------------------------------------------------------------------------- files from strangers (issue 14, item 7)
# Every field rotnet reads from a file is validated like user input: a wrong type or an impossible
# value is one line that names the file and the field, never a traceback or a NaN result.


def _set_metadata(path: Path, **raw: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    save_file(load_file(str(path)), str(path), metadata={**metadata, **raw})


def _set_checkpoint(run: Path, change) -> None:
    (run / "model.safetensors").unlink()  # the run directory then loads from its checkpoint
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    change(state)
    torch.save(state, run / "checkpoint.pt")


def _set_json(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def _set_config(record: dict, **fields) -> None:
    record["config"].update(fields)


FILTERS = ["viz", "filters", "{spec}", "--out", "{tmp}/f.png"]
RESUME = ["pretrain", "--resume", "{spec}"]
STRANGER_FILES = [
    # (id, which copy: run | export, how it is changed, the command, the file named, the field named)
    (
        "meta-rotations-text",
        "run",
        lambda d: _set_metadata(d / "model.safetensors", rotations='"0,90"'),
        FILTERS,
        "model.safetensors",
        "'rotations'",
    ),
    (
        "meta-rotations-object",
        "run",
        lambda d: _set_metadata(d / "model.safetensors", rotations='{"a": 1}'),
        FILTERS,
        "model.safetensors",
        "'rotations'",
    ),
    (
        "meta-img-size-text",
        "run",
        lambda d: _set_metadata(d / "model.safetensors", img_size='"big"'),
        FILTERS,
        "model.safetensors",
        "'img_size'",
    ),
    (
        "meta-img-size-negative",
        "run",
        lambda d: _set_metadata(d / "model.safetensors", img_size="-4"),
        FILTERS,
        "model.safetensors",
        "'img_size'",
    ),
    (
        "meta-mean-length",
        "run",
        lambda d: _set_metadata(d / "model.safetensors", mean="[0.5, 0.5]"),
        FILTERS,
        "model.safetensors",
        "'mean'",
    ),
    (
        "meta-std-zero",
        "run",
        lambda d: _set_metadata(d / "model.safetensors", std="[0.0, 0.2, 0.2]"),
        FILTERS,
        "model.safetensors",
        "'std'",
    ),
    (
        "meta-epochs-text",
        "run",
        lambda d: _set_metadata(d / "model.safetensors", epochs='"2"'),
        FILTERS,
        "model.safetensors",
        "'epochs'",
    ),
    (
        "meta-model-unknown",
        "run",
        lambda d: _set_metadata(d / "model.safetensors", model="not_a_model_xyz"),
        FILTERS,
        "model.safetensors",
        "names the model",
    ),
    (
        "checkpoint-rotations-text",
        "run",
        lambda d: _set_checkpoint(d, lambda s: s["config"].update(rotations="0,90")),
        FILTERS,
        "checkpoint.pt",
        "'rotations'",
    ),
    (
        "checkpoint-epochs-negative",
        "run",
        lambda d: _set_checkpoint(d, lambda s: s["config"].update(epochs=-1)),
        FILTERS,
        "checkpoint.pt",
        "--epochs",
    ),
    (
        "checkpoint-img-size-text",
        "run",
        lambda d: _set_checkpoint(d, lambda s: s.update(img_size="big")),
        FILTERS,
        "checkpoint.pt",
        "'img_size'",
    ),
    (
        "checkpoint-mean-length",
        "run",
        lambda d: _set_checkpoint(d, lambda s: s.update(mean=[1.0, 2.0])),
        FILTERS,
        "checkpoint.pt",
        "'mean'",
    ),
    (
        "checkpoint-config-list",
        "run",
        lambda d: _set_checkpoint(d, lambda s: s.update(config=[1])),
        FILTERS,
        "checkpoint.pt",
        "'config'",
    ),
    (
        "config-epochs-text",
        "run",
        lambda d: _set_json(d / "config.json", lambda r: _set_config(r, epochs="2")),
        RESUME,
        "config.json",
        "'epochs'",
    ),
    (
        "config-rotations-text",
        "run",
        lambda d: _set_json(d / "config.json", lambda r: _set_config(r, rotations="0,90")),
        RESUME,
        "config.json",
        "'rotations'",
    ),
    (
        "config-img-size-negative",
        "run",
        lambda d: _set_json(d / "config.json", lambda r: _set_config(r, img_size=-3)),
        RESUME,
        "config.json",
        "--img-size",
    ),
    (
        "config-list",
        "run",
        lambda d: _set_json(d / "config.json", lambda r: r.update(config=[])),
        RESUME,
        "config.json",
        "no run config",
    ),
    (
        "config-not-utf8",
        "run",
        lambda d: (d / "config.json").write_bytes(b'{"config": "\xff"}'),
        RESUME,
        "config.json",
        "not valid JSON",
    ),
    (
        "metrics-epoch-text",
        "run",
        lambda d: (d / "metrics.jsonl").write_text('{"epoch": "2", "loss": 1.0}\n'),
        ["viz", "curves", "{spec}", "--out", "{tmp}/c.png"],
        "metrics.jsonl line 1",
        "'epoch'",
    ),
    (
        "metrics-bare-nan",
        "run",
        lambda d: (d / "metrics.jsonl").write_text('{"epoch": 1, "loss": NaN}\n'),
        ["viz", "curves", "{spec}", "--out", "{tmp}/c.png"],
        "metrics.jsonl line 1",
        "'loss'",
    ),
    (
        "export-input-size-text",
        "export",
        lambda d: _set_json(d / "config.json", lambda r: r["pretrained_cfg"].update(input_size=[3, "big", 32])),
        FILTERS,
        "config.json",
        "input_size",
    ),
    (
        "export-mean-length",
        "export",
        lambda d: _set_json(d / "config.json", lambda r: r["pretrained_cfg"].update(mean=[0.5, 0.5])),
        FILTERS,
        "config.json",
        "'mean'",
    ),
    (
        "export-std-zero",
        "export",
        lambda d: _set_json(d / "config.json", lambda r: r["pretrained_cfg"].update(std=[0, 1, 1])),
        FILTERS,
        "config.json",
        "'std'",
    ),
    (
        "export-architecture-number",
        "export",
        lambda d: _set_json(d / "config.json", lambda r: r.update(architecture=5)),
        FILTERS,
        "config.json",
        "'architecture'",
    ),
    (
        "export-pretrained-cfg-list",
        "export",
        lambda d: _set_json(d / "config.json", lambda r: r.update(pretrained_cfg=[])),
        FILTERS,
        "config.json",
        "'pretrained_cfg'",
    ),
    ("export-config-missing", "export", lambda d: (d / "config.json").unlink(), FILTERS, "config.json", "is missing"),
    (
        "export-head-rotations-text",
        "export",
        lambda d: _set_metadata(d / "rotation_head.safetensors", rotations='"x"'),
        FILTERS,
        "rotation_head.safetensors",
        "'rotations'",
    ),
]


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "export"
    result = CliRunner().invoke(app, ["export", str(tiny_run), "--out", str(out), "--with-head"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(
    "kind, change, command, file, field", [row[1:] for row in STRANGER_FILES], ids=[row[0] for row in STRANGER_FILES]
)
def test_a_stranger_file_is_one_line_naming_the_file_and_the_field(
    tiny_run, exported, tmp_path, monkeypatch, kind, change, command, file, field
):
    spec = Path(shutil.copytree(tiny_run if kind == "run" else exported, tmp_path / "weights"))
    change(spec)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROTNET_DEBUG", "0")
    before = _snapshot(tmp_path)

    result = CliRunner().invoke(app, [a.format(spec=spec, tmp=tmp_path) for a in command])

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert file in lines[0] and field in lines[0], lines[0]
    assert _snapshot(tmp_path) == before
