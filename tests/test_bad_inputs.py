"""Every bad input, on every command: one line that names the fix, exit 1 or 2, no traceback,
and no file that existed before is touched (nor any new file left behind).

The table below is the contract. Each row runs the real CLI (CliRunner) inside a sentinel
folder that holds a finished run, images, broken data and a non-empty output folder; the
whole folder is hashed before and after.
"""

from __future__ import annotations

import hashlib
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
    ("pretrain --momentum -1", 1, "--momentum must be >= 0"),
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
    ("pretrain --data {few} -b 16 --device cpu", 1, "lower --batch-size"),
    ("pretrain --data {empty_class} --device cpu", 1, "remove it or add images"),
    ("pretrain --data {broken} --device cpu", 1, "could be read"),
    ("pretrain --data cifar10 --data-dir {empty}", 1, "pass --download"),
    # -- pretrain: weights to start from
    ("pretrain --init {missing} --device cpu", 1, "does not exist"),
    ("pretrain --init {evil} --device cpu", 1, "was refused"),
    ("pretrain --model test_vit --init {run} --device cpu", 1, "do not fit --model test_vit at 32 px; pass --model test_resnet"),
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
    paths = {"root": root, "run": root / "run", "img": root / "photo.png", "notes": root / "notes.txt",
             "empty": root / "empty", "full_dir": root / "full_dir", "few": root / "few", "broken": root / "broken",
             "empty_class": root / "empty_class", "evil": root / "evil.pt", "foreign": root / "foreign.safetensors",
             "missing": root / "does-not-exist", "new": root / "new-output"}
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
    assert _snapshot(sentinel["root"]) == before
    assert not (sentinel["root"] / "PWNED").exists()
