"""What rotnet pretrain guarantees when things go wrong: kill -9, Ctrl-C, broken images,
a diverging loss, a full disk, checkpoints from strangers.

Exactness is checked bitwise: final model.safetensors tensors with torch.equal, and every
metrics row except its timing fields.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import files_in
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import rotnet_cli.pretraining as pretrain_module
from rotnet_cli import rundir
from rotnet_cli.atomicfiles import atomic_write
from rotnet_cli.checkpoint import load_checkpoint, save_checkpoint
from rotnet_cli.cli import app
from rotnet_cli.config import PretrainConfig
from rotnet_cli.errors import ConfigError, DataError, Interrupted, OutputError, WeightsError
from rotnet_cli.events import WarningMessage
from rotnet_cli.pretraining import pretrain, resume_config
from rotnet_cli.stopping import signals_deferred
from rotnet_cli.weights import load_weights

TIMING = ("images_per_s", "seconds", "data_wait", "eval_seconds")
ROTNET = str(Path(sys.executable).parent / "rotnet")
# A run long enough to be killed in the middle: 2 epochs x 24 steps, a checkpoint every 4 steps.
SLOW_RUN = [
    "pretrain",
    "--model",
    "test_resnet",
    "--epochs",
    "2",
    "--max-steps-per-epoch",
    "24",
    "-b",
    "16",
    "--save-every",
    "4",
    "--device",
    "cpu",
    "--workers",
    "0",
    "--log-every",
    "5",
]
FAST = dict(
    model="test_resnet",
    epochs=2,
    max_steps_per_epoch=5,
    batch_size=16,
    device="cpu",
    workers=0,
    save_every=2,
    log_every=1,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Same thread count as the subprocesses (OMP_NUM_THREADS=1), so results compare bitwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert metrics(a) == metrics(b)
    assert not list(b.glob(".*.tmp")), "temporary files were left behind"


def stopped_early(run: Path, **options) -> None:
    """A run stopped (as by Ctrl-C) after its first step, with its checkpoint."""
    with pytest.raises(Interrupted):
        pretrain(PretrainConfig(**{**FAST, **options}, out=str(run)), should_stop=lambda: True)


def position(run: Path) -> tuple[int, int] | None:
    """(epoch, step) of the run's checkpoint, or None before the first one."""
    try:
        state = torch.load(run / "checkpoint.pt", weights_only=True, map_location="cpu")
    except (FileNotFoundError, RuntimeError, EOFError):
        return None
    return int(state["epoch"]), int(state["step"])


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROTNET_DEBUG": "0"}
    return subprocess.Popen([ROTNET, *args], env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def wait_for_checkpoint(
    proc: subprocess.Popen, run: Path, at_least: tuple[int, int], timeout: float = 120
) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = position(run)
        if found is not None and found >= at_least:
            return found
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before a checkpoint at {at_least}"
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint at {at_least} within {timeout}s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: SLOW_RUN, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = start([*SLOW_RUN, "--out", str(out)], out.parent / "log")
    assert proc.wait(timeout=300) == 0, (out.parent / "log").read_text()
    return out


@pytest.fixture(scope="module")
def fast_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fast-reference") / "run"
    pretrain(PretrainConfig(**FAST, out=str(out)))
    return out


# ----------------------------------------------------------------------------- exact resume


# should_stop is polled after every step but an epoch's last, and once after each epoch but the last:
# with 5 steps per epoch, call 3 is epoch 1 step 3, call 5 the end of epoch 1, call 8 epoch 2 step 3
@pytest.mark.parametrize("stop_after", [3, 5, 8], ids=["mid-epoch-1", "epoch-boundary", "mid-epoch-2"])
def test_stopped_and_resumed_run_is_bitwise_the_uninterrupted_one(tmp_path, fast_reference, stop_after):
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] == stop_after

    run = tmp_path / "run"
    with pytest.raises(Interrupted, match="--resume"):
        pretrain(PretrainConfig(**FAST, out=str(run)), should_stop=stop)
    assert not (run / "model.safetensors").exists()
    result = pretrain(resume_config(run, {}))
    assert result.resumed_from is not None
    assert_same_run(fast_reference, run)


@pytest.mark.parametrize(
    "kills",
    [
        pytest.param([(0, 8), (1, 8)], id="mid-epoch-1,mid-epoch-2"),
        pytest.param([(0, 4), (1, 0), (1, 16)], id="three-kills", marks=pytest.mark.slow),
    ],
)
def test_kill_9_at_several_points_then_resume_is_bitwise_the_uninterrupted_run(tmp_path, uninterrupted, kills):
    """SIGKILL shortly after a given checkpoint appears (so at a random point of the steps after it)."""
    run = tmp_path / "run"
    args = [*SLOW_RUN, "--out", str(run)]
    for target in kills:
        proc = start(args, tmp_path / "log")
        reached = wait_for_checkpoint(proc, run, target)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert position(run) >= reached  # the checkpoint on disk is complete and loadable
        args = ["pretrain", "--resume", str(run), "--device", "cpu", "--workers", "0"]
    proc = start(args, tmp_path / "log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "log").read_text()
    assert_same_run(uninterrupted, run)


def test_ctrl_c_writes_a_checkpoint_says_how_to_resume_and_exits_130(tmp_path, uninterrupted):
    run = tmp_path / "run"
    proc = start([*SLOW_RUN, "--out", str(run)], tmp_path / "log")
    before = wait_for_checkpoint(proc, run, (0, 4))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    message = (tmp_path / "log").read_text()
    assert f"rotnet pretrain --resume {run}" in message
    epoch, step = position(run)
    assert (epoch, step) >= before
    assert f"epoch {epoch + 1}, step {step}" in message or f"after epoch {epoch}" in message
    assert not (run / "model.safetensors").exists()

    resumed = start(["pretrain", "--resume", str(run), "--device", "cpu"], tmp_path / "log2")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "log2").read_text()
    assert_same_run(uninterrupted, run)


def test_sigterm_from_a_scheduler_checkpoints_like_ctrl_c(tmp_path):
    run = tmp_path / "run"
    proc = start([*SLOW_RUN, "--out", str(run)], tmp_path / "log")
    before = wait_for_checkpoint(proc, run, (0, 4))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    assert "SIGTERM: saving a checkpoint" in (tmp_path / "log").read_text()
    assert position(run) >= before and not (run / "model.safetensors").exists()


def test_resume_with_contradicting_options_names_them_and_changes_nothing(tiny_run):
    before = files_in(tiny_run)
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            "--resume",
            str(tiny_run),
            "--epochs",
            "3",
            "--rotations",
            "0,90",
            "--lr",
            "0.5",
            "--workers",
            "1",
        ],
    )
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "--epochs" not in errors[0]  # a larger --epochs extends the run (tests/test_watch.py)
    assert "--lr 0.5 (the run used" in errors[0]
    assert "--rotations 0,90 (the run used 0,180)" in errors[0]
    assert "--workers" not in errors[0]  # options that do not change the computation may differ
    assert files_in(tiny_run) == before


def test_resume_refuses_changed_data(tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    for i in range(40):
        _png(data / f"{i}.png", i)
    run = tmp_path / "run"
    with pytest.raises(Interrupted):  # stops (with a checkpoint) after its first step
        pretrain(PretrainConfig(**FAST, data=str(data), out=str(run), val_split=0), should_stop=lambda: True)
    (data / "0.png").unlink()
    with pytest.raises(Exception, match="the training data changed"):
        pretrain(resume_config(run, {}))
    # as many files as before, but another one in its place: the split would be drawn anew over them
    _png(data / "new.png", 0)
    before = files_in(run)
    with pytest.raises(DataError, match=r"the training data changed \(40 image files when the run started and now"):
        pretrain(resume_config(run, {}))
    assert files_in(run) == before
    (data / "new.png").rename(data / "0.png")  # the same names again: it resumes
    pretrain(resume_config(run, {}))


# ----------------------------------------------------------------------------- broken data


def _png(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def folder_with_broken_files(tmp_path) -> tuple[Path, list[Path]]:
    data = tmp_path / "photos"
    data.mkdir()
    for i in range(40):
        _png(data / f"good{i:02d}.png", i)
    good = (data / "good00.png").read_bytes()
    broken = [data / "empty.png", data / "truncated.png", data / "letter.jpg", data / "binary.webp"]
    broken[0].write_bytes(b"")
    broken[1].write_bytes(good[: len(good) // 2])
    broken[2].write_text("Dear colleague, this is not a JPEG.")
    broken[3].write_bytes(os.urandom(300))
    broken.append(data / "README.txt")
    broken[4].write_text("not an image, and not named like one: counted too")
    return data, broken


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_counted_skipped_and_the_run_completes(tmp_path, folder_with_broken_files, workers):
    data, broken = folder_with_broken_files
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            "--model",
            "test_resnet",
            "--data",
            str(data),
            "--epochs",
            "1",
            "-b",
            "8",
            "--device",
            "cpu",
            "--workers",
            str(workers),
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "skipped 5 file(s) that are not readable images" in result.stderr
    assert str(sorted(broken)[0]) in result.stderr  # the first few are named
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert (
        json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]["train_images"]
        + json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]["val_images"]
        == 40
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_strict_data_makes_the_first_unreadable_image_an_error(tmp_path, folder_with_broken_files, workers):
    data, broken = folder_with_broken_files
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            "--model",
            "test_resnet",
            "--data",
            str(data),
            "--epochs",
            "1",
            "-b",
            "8",
            "--device",
            "cpu",
            "--workers",
            str(workers),
            "--strict-data",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "unreadable image" in lines[0] and "--strict-data" in lines[0], result.stderr
    assert any(str(p) in lines[0] for p in broken)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_loader_workers_without_room_in_shared_memory_give_one_line_not_a_hang(folder_with_broken_files):
    """A full /dev/shm (a container's 64 MB) or a file-size limit stops a worker from handing its batch
    over; before, the error was lost in the queue's feeder thread and the loader waited forever."""
    data, _ = folder_with_broken_files
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"  # smaller than one batch of decoded images
        "from rotnet_cli.data import ImageSet, decode_all\n"
        "from rotnet_cli.errors import DataError\n"
        "paths = sorted(p for p in __import__('pathlib').Path(sys.argv[1]).glob('good*.png'))\n"
        "try:\n"
        "    decode_all(ImageSet('photos', 32, paths=paths), workers=1)\n"
        "except DataError as e:\n"
        "    print('DataError:', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(data)], capture_output=True, text=True, timeout=120)
    assert "DataError:" in done.stdout and "shared memory" in done.stdout and "-j 0" in done.stdout, (
        done.stdout + done.stderr
    )


# ----------------------------------------------------------------------------- a diverging loss


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    pretrain(PretrainConfig(**{**FAST, "epochs": 1, "max_steps_per_epoch": 2}, out=str(run)))
    (run / "notes.txt").write_text("mine")  # not rotnet's: never touched
    old = files_in(run)

    # a new run that diverges at its first step, before any checkpoint: the old run is back
    real_loss = pretrain_module.rotation_loss
    monkeypatch.setattr(
        pretrain_module, "rotation_loss", lambda logits, labels: real_loss(logits, labels) * float("nan")
    )
    failed = CliRunner().invoke(
        app,
        [
            "pretrain",
            "--model",
            "test_resnet",
            "--epochs",
            "1",
            "--max-steps-per-epoch",
            "2",
            "-b",
            "16",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--seed",
            "5",
            "--out",
            str(run),
            "--overwrite",
        ],
    )
    assert failed.exit_code == 1 and "NaN" in failed.stderr and "the run it replaced is back as it was" in failed.stderr
    assert files_in(run) == old

    # the same new run that trains: the old files are replaced, the user's file stays
    monkeypatch.setattr(pretrain_module, "rotation_loss", real_loss)
    pretrain(
        PretrainConfig(**{**FAST, "epochs": 1, "max_steps_per_epoch": 2, "seed": 5, "overwrite": True}, out=str(run))
    )
    assert sorted(files_in(run)) == sorted(old)  # no .rotnet-replaced left behind
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "model.safetensors").read_bytes() != old["model.safetensors"]
    assert json.loads((run / "config.json").read_text())["config"]["seed"] == 5


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = pretrain_module.rotation_loss
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        loss = real_loss(logits, labels)
        return loss * float("nan") if calls["n"] >= 4 else loss

    monkeypatch.setattr(pretrain_module, "rotation_loss", poisoned)
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            "--model",
            "test_resnet",
            "--epochs",
            "1",
            "--max-steps-per-epoch",
            "6",
            "-b",
            "16",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--save-every",
            "2",
            "--log-every",
            "10",
            "--out",
            str(run),
        ],
    )
    assert result.exit_code == 1
    error = result.stderr.strip().splitlines()[-1]
    assert "NaN or infinite at step 4 " in error and "last good checkpoint" in error and "lower --lr" in error
    state = load_checkpoint(run / "checkpoint.pt")
    assert (state["epoch"], state["step"]) == (0, 2)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (run / "model.safetensors").exists()


# ----------------------------------------------------------------------------- full disk, unwritable output


def test_atomic_write_keeps_the_previous_file_when_the_disk_fills(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"previous complete content")

    def half_then_full(tmp: Path) -> None:
        tmp.write_bytes(b"half of the new")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:  # torch.save reports a full disk as a RuntimeError raised while handling it
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None

    with pytest.raises(OutputError, match="disk full while writing .*previous version is intact"):
        atomic_write(target, half_then_full)
    assert target.read_bytes() == b"previous complete content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_disk_full_during_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    saves = {"n": 0}

    def fills_the_disk(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] < 2:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fills_the_disk)
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            "--model",
            "test_resnet",
            "--epochs",
            "1",
            "--max-steps-per-epoch",
            "6",
            "-b",
            "16",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--save-every",
            "2",
            "--out",
            str(run),
        ],
    )
    assert result.exit_code == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: disk full while writing") and "free space and resume" in error
    assert position(run) == (0, 2)
    assert not list(run.glob(".*.tmp"))


def test_output_that_cannot_be_created_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            "--model",
            "test_resnet",
            "--epochs",
            "1",
            "-b",
            "16",
            "--device",
            "cpu",
            "--max-steps-per-epoch",
            "1",
            "--out",
            str(blocker / "run"),
        ],
    )
    assert result.exit_code == 1
    assert "choose another --out" in result.stderr.strip().splitlines()[-1]
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_read_only_run_directory_on_resume_keeps_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    stopped_early(run)
    saved = (run / "checkpoint.pt").read_bytes()
    run.chmod(0o500)
    try:
        result = CliRunner().invoke(app, ["pretrain", "--resume", str(run)])
    finally:
        run.chmod(0o700)
    assert result.exit_code == 1
    assert "choose another --out" in result.stderr.strip().splitlines()[-1]
    assert (run / "checkpoint.pt").read_bytes() == saved


# ----------------------------------------------------------------------------- loading is safe


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_checkpoint_with_a_pickled_payload_is_refused_and_never_run(tmp_path, writer, write_malicious_checkpoint):
    run = tmp_path / "run"
    stopped_early(run)
    marker = write_malicious_checkpoint(run / "checkpoint.pt", load_checkpoint(run / "checkpoint.pt"), writer)
    result = CliRunner().invoke(app, ["pretrain", "--resume", str(run)])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    with pytest.raises(WeightsError):
        load_weights(run / "checkpoint.pt")
    assert not marker.exists()


def test_a_checkpoint_from_a_newer_rotnet_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"config": {}, "model": {}})
    state = torch.load(path, weights_only=True)
    torch.save({**state, "format": 99, "rotnet_version": "9.0.0"}, path)
    with pytest.raises(WeightsError, match=r"newer rotnet \(9.0.0\); upgrade rotnet"):
        load_checkpoint(path)


def test_a_checkpoint_for_another_model_is_a_clear_error(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    stopped_early(run)
    stopped_early(other, model="test_vit")
    (run / "checkpoint.pt").write_bytes((other / "checkpoint.pt").read_bytes())
    result = CliRunner().invoke(app, ["pretrain", "--resume", str(run)])
    assert result.exit_code == 1
    assert "config.json and checkpoint.pt there describe different runs" in result.stderr.strip().splitlines()[-1]


def test_every_torch_load_in_rotnet_is_weights_only():
    package = Path(pretrain_module.__file__).parent
    for source in package.rglob("*.py"):
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{source.name}:{number}: {line.strip()}"


# ============================================================================= issue 14: the classes of faults
# Each section names the item of issue 14 ("Reliability II") it covers; every test here failed on
# the code before it.


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones too) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert lines and lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, (
        result.stderr
    )
    return lines[-1]


# ----------------------------------------------------------------------------- 1: --overwrite's set-aside survives any kills


class Killed(BaseException):
    """kill -9 at this point: the process does nothing more (no except, no finally of rotnet's)."""


def _old_run(folder: Path) -> dict[str, bytes]:
    folder.mkdir()
    for name in rundir.RUN_FILES:
        (folder / name).write_bytes(f"old {name}".encode())
    (folder / "export").mkdir()
    (folder / "export" / "model.safetensors").write_bytes(b"old export")
    (folder / "notes.txt").write_text("the user's")
    return files_of(folder)


REAL_REPLACE = os.replace


def _kill_at(monkeypatch, call: int) -> None:
    """The ``call``-th os.replace (0-based) from now on kills the process instead."""
    count = {"n": 0}

    def replace(src, dst):
        if count["n"] == call:
            raise Killed
        count["n"] += 1
        REAL_REPLACE(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def _new_run_that_fails(out: Path) -> None:
    """What pretrain --overwrite does to ``out`` when the new run fails before its first checkpoint."""
    rundir.set_aside(out)
    (out / "config.json").write_text("new config")
    (out / "metrics.jsonl").write_text("")
    rundir.writing._discard_new_run(out)
    rundir.restore_replaced(out)


@pytest.mark.parametrize("first_kill", range(14))
def test_the_set_aside_run_comes_back_whatever_order_of_kills_and_retries(tmp_path, monkeypatch, first_kill):
    """Kill at every rename of setting the old run aside and putting it back, then kill the repair
    itself at every rename: the next process on the folder always finds the old run, whole."""
    out = tmp_path / "run"
    old = _old_run(out)
    _kill_at(monkeypatch, first_kill)
    try:
        _new_run_that_fails(out)
    except Killed:
        pass
    for second_kill in range(20):  # the repair is killed too, at every point, then done again
        _kill_at(monkeypatch, second_kill)
        try:
            rundir.recover_replaced(out)
            break
        except Killed:
            continue
    monkeypatch.setattr(os, "replace", REAL_REPLACE)
    rundir.recover_replaced(out)
    assert files_of(out) == old
    assert not rundir.overwrite_pending(out)


def test_a_checkpoint_of_the_new_run_makes_the_set_aside_old_run_go(tmp_path):
    out = tmp_path / "run"
    _old_run(out)
    rundir.set_aside(out)
    (out / "checkpoint.pt").write_bytes(b"the new run's first checkpoint")  # killed before the old run was deleted
    assert rundir.recover_replaced(out) is None
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "notes.txt"]


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the moment to kill it"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_resume_after_a_stopped_overwrite_puts_the_old_run_back_and_advises_a_safe_command(tmp_path):
    """The fast sibling of the test below: the folder as kill -9 leaves it, then --resume."""
    run = tmp_path / "run"
    pretrain(PretrainConfig(**{**FAST, "epochs": 1, "max_steps_per_epoch": 1}, out=str(run)))
    old = files_of(run)
    rundir.set_aside(run)  # what pretrain --overwrite did before it was killed ...
    killed_argv = [ROTNET, "pretrain", "--model", "test_resnet", "--seed", "7", "--out", str(run), "--overwrite"]
    (run / "config.json").write_text(
        json.dumps({"config": PretrainConfig(**FAST, seed=7).to_dict(), "command": killed_argv})
    )
    (run / rundir.LOCK).write_text("{}")  # ... and its lock file, no longer locked

    result = CliRunner().invoke(app, ["pretrain", "--resume", str(run)])
    error = one_error_line(result)
    assert files_of(run) == old and "is back in" in error
    advice = error.split("To start the new run again: ")[1].split(" (the old run is kept")[0]
    assert shlex.split(advice) == ["rotnet", *killed_argv[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("to_the_end", [False, True])
def test_kill_9_after_overwrite_then_the_advised_commands_keep_the_old_run(tmp_path, to_the_end):
    """kill -9 before the new run's first checkpoint, then what the messages advise, killed again:
    the old run is never lost; it goes only once the new run has its first checkpoint."""
    run = tmp_path / "run"
    pretrain(PretrainConfig(**{**FAST, "epochs": 1, "max_steps_per_epoch": 2}, out=str(run)))
    old = files_of(run)
    overwrite = [
        "pretrain",
        "--model",
        "test_resnet",
        "--epochs",
        "1",
        "--max-steps-per-epoch",
        "24",
        "-b",
        "16",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--seed",
        "7",
        "--out",
        str(run),
        "--overwrite",
    ]
    before_first_checkpoint = lambda: (run / rundir.REPLACED).is_dir() and (run / "config.json").is_file()  # noqa: E731

    _kill_when(start(overwrite, tmp_path / "log"), before_first_checkpoint)
    refused = subprocess.run(
        [ROTNET, "pretrain", "--resume", str(run)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert refused.returncode == 1, refused.stderr
    assert files_of(run) == old  # the resume put the old run back, as it was
    advice = refused.stderr.split("To start the new run again: ")[1].split(" (the old run is kept")[0]
    assert "--overwrite" in advice and "--seed 7" in advice

    _kill_when(start(shlex.split(advice)[1:], tmp_path / "log"), before_first_checkpoint)  # the advice, killed too
    assert rundir.overwrite_pending(run)
    if not to_the_end:
        with rundir.RunDirWriter(run, resume=True):  # what the next rotnet pretrain on it does first
            pass
        assert files_of(run) == old
        return
    proc = start(shlex.split(advice)[1:], tmp_path / "log")  # run to the end: now the old run may go
    assert proc.wait(timeout=300) == 0, (tmp_path / "log").read_text()
    assert json.loads((run / "config.json").read_text())["config"]["seed"] == 7
    assert not (run / rundir.REPLACED).exists() and (run / "model.safetensors").read_bytes() != old["model.safetensors"]


# ----------------------------------------------------------------------------- 3: one process writes a run directory


def test_a_second_process_on_a_run_directory_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    first = start([*SLOW_RUN, "--out", str(run), "--epochs", "20", "--max-steps-per-epoch", "400"], tmp_path / "log")
    try:
        wait_for_checkpoint(first, run, (0, 4))
        second = subprocess.run(
            [ROTNET, *SLOW_RUN, "--out", str(run), "--seed", "3"],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert second.returncode == 1 and first.poll() is None, second.stderr
        error = second.stderr.strip().splitlines()[-1]
        assert f"is in use by another rotnet process (pid {first.pid} on " in error and "since" in error, error
        assert "rotnet pretrain --model test_resnet" in error  # the holder's command
        assert json.loads((run / "config.json").read_text())["config"]["seed"] == 0  # one run's files, not a mix
    finally:
        first.kill()
        first.wait()


def test_a_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pathlib import Path; from rotnet_cli.rundir import FolderLock; "
                f"FolderLock(Path({str(tmp_path / 'lock')!r}), Path('run')).acquire(); print('held', flush=True); time.sleep(600)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputError, match=f"in use by another rotnet process \\(pid {holder.pid} on "):
        rundir.FolderLock(tmp_path / "lock", tmp_path).acquire()
    holder.kill()  # kill -9: no clean-up ran, the lock file is still there
    holder.wait()
    with rundir.FolderLock(tmp_path / "lock", tmp_path):
        pass


def test_a_probe_saving_while_another_saves_waits_and_both_results_are_kept(tmp_path):
    import threading

    run = tmp_path / "run"
    run.mkdir()
    rundir.update_probe(run, lambda results: [*results, {"setting": "a", "rows": []}])
    other = rundir.FolderLock(run / rundir.LOCK, run)  # another probe, in the middle of its save
    other.acquire()
    threading.Timer(0.5, other.release).start()
    rundir.update_probe(run, lambda results: [*results, {"setting": "b", "rows": []}])  # waits, then merges
    assert [r["setting"] for r in rundir.read_probe(run)] == ["a", "b"]


@pytest.mark.parametrize("occupant", ["link to a file of yours", "hard link to it", "dangling link", "folder", "fifo"])
def test_a_lock_path_taken_by_something_else_is_refused_and_never_written_through(tmp_path, occupant):
    yours = tmp_path / "yours.txt"
    yours.write_text("mine")
    lock = tmp_path / "run" / ".rotnet-lock"
    lock.parent.mkdir()
    make = {
        "link to a file of yours": lambda: lock.symlink_to(yours),
        "hard link to it": lambda: os.link(yours, lock),
        "dangling link": lambda: lock.symlink_to(tmp_path / "nowhere"),
        "folder": lock.mkdir,
        "fifo": lambda: os.mkfifo(lock),
    }
    make[occupant]()
    with pytest.raises(OutputError, match="is in the way of rotnet's lock file .*remove it"):
        rundir.FolderLock(lock, lock.parent).acquire()
    assert yours.read_text() == "mine" and os.path.lexists(lock)  # nothing written through it, nothing removed


def test_runs_started_in_the_same_second_get_their_own_default_directories(tmp_path, monkeypatch):
    """Issue 19, item 4: the default run directory is claimed atomically (mkdir), with a suffix on collision."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir.policy, "default_run_dir", lambda model: Path("runs") / f"{model}-20261124-101500")
    first, made = rundir.claim_default_run_dir("resnet18")
    second, _ = rundir.claim_default_run_dir("resnet18")
    assert (first.name, second.name) == ("resnet18-20261124-101500", "resnet18-20261124-101500-2")
    assert made == [Path("runs"), first] and first.is_dir() and second.is_dir()


# ----------------------------------------------------------------------------- 4: no NaN is ever saved or printed


@pytest.mark.parametrize(
    "validation, caught_by", [("0.1", "the validation loss became NaN"), ("0", "weights became NaN or infinite")]
)
def test_weights_that_blow_up_while_the_loss_is_finite_are_never_saved(tmp_path, monkeypatch, validation, caught_by):
    real_step, steps = torch.optim.SGD.step, {"n": 0}

    def step_that_diverges(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        steps["n"] += 1
        if steps["n"] == 2:  # the epoch's last step: every loss it reported was finite
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step_that_diverges)
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            "--model",
            "test_resnet",
            "--epochs",
            "1",
            "--max-steps-per-epoch",
            "2",
            "-b",
            "16",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--out",
            str(run),
            "--json",
            "--val-split",
            validation,
        ],
    )
    error = one_error_line(result)
    assert caught_by in error and "lower --lr" in error
    assert result.stdout == "" and not run.exists()  # nothing was kept: no checkpoint, no metrics, no folder


def test_json_written_or_printed_is_never_bare_nan(tmp_path, capsys):
    from rotnet_cli.atomicfiles import write_json
    from rotnet_cli.cli._common import print_json

    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"loss": float("nan")})
    assert not (tmp_path / "x.json").exists()
    print_json({"loss": float("nan"), "rows": [float("inf"), 1.5]})
    assert json.loads(capsys.readouterr().out) == {"loss": None, "rows": [None, 1.5]}


def test_weights_with_nan_are_refused_by_every_command(copy_of_run):
    from safetensors.torch import save_file

    tensors = load_file(copy_of_run / "model.safetensors")
    metadata = rundir.safetensors_metadata(copy_of_run / "model.safetensors")
    first = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[first][0] = float("nan")
    save_file(tensors, str(copy_of_run / "model.safetensors"), metadata=metadata)
    with pytest.raises(WeightsError, match=f"NaN or infinite weights .*{first.split('.', 1)[1]}.* diverged"):
        load_weights(copy_of_run)


# ----------------------------------------------------------------------------- 5 (and issue 19, item 14): one overwrite policy


def test_overwrite_replaces_rotnet_pictures_and_never_the_users(tiny_run, tmp_path):
    """viz writes over nothing without --overwrite, and with it only over pictures rotnet drew."""
    theirs, ours = tmp_path / "theirs.png", tmp_path / "ours.png"
    _png(theirs, 0)
    assert CliRunner().invoke(app, ["viz", "filters", str(tiny_run), "--out", str(ours)]).exit_code == 0
    kept = {p.name: p.read_bytes() for p in (theirs, ours)}

    refused = CliRunner().invoke(app, ["viz", "filters", str(tiny_run), "--out", str(ours)])
    assert "pass --overwrite" in one_error_line(refused)
    refused = CliRunner().invoke(app, ["viz", "filters", str(tiny_run), "--out", str(theirs), "--overwrite"])
    assert "theirs.png was not written by rotnet" in one_error_line(refused)
    assert {p.name: p.read_bytes() for p in (theirs, ours)} == kept
    replaced = CliRunner().invoke(
        app, ["viz", "filters", str(tiny_run), "random:test_resnet", "--out", str(ours), "--overwrite"]
    )
    assert replaced.exit_code == 0 and ours.read_bytes() != kept["ours.png"]

    # a folder of pictures: one that is not empty needs --overwrite, which keeps every other file
    folder = tmp_path / "attention"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    attention = ["viz", "attention", str(tiny_run), str(theirs), "--out", str(folder), "--device", "cpu"]
    assert "--overwrite" in one_error_line(CliRunner().invoke(app, attention))
    assert CliRunner().invoke(app, [*attention, "--overwrite"]).exit_code == 0
    assert CliRunner().invoke(app, [*attention, "--overwrite"]).exit_code == 0  # its own picture is replaced
    assert (
        sorted(p.name for p in folder.iterdir()) == ["notes.txt", "theirs.png"]
        and (folder / "notes.txt").read_text() == "mine"
    )


def test_pretrain_overwrite_refuses_a_folder_whose_run_files_are_not_rotnets(tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}')
    before = files_of(out)
    with pytest.raises(OutputError, match="config.json was not written by rotnet"):
        pretrain(PretrainConfig(**FAST, out=str(out), overwrite=True))
    assert files_of(out) == before


def test_overwrite_never_replaces_another_commands_output(copy_of_run, tiny_run, tmp_path):
    """export --overwrite onto a run (or its kept checkpoints) would delete the run's checkpoint and history for good;
    pretrain --overwrite onto an export would leave half an export: both are refused, and nothing changes."""
    kept = copy_of_run / "checkpoints"
    kept.mkdir()
    (kept / "epoch-1.safetensors").write_bytes((copy_of_run / "model.safetensors").read_bytes())
    before = files_in(copy_of_run)
    for out in (copy_of_run, kept):
        refused = CliRunner().invoke(app, ["export", str(tiny_run), "--out", str(out), "--overwrite"])
        assert "holds a training run's files" in one_error_line(refused)
    assert "--out " + str(copy_of_run / "export") in one_error_line(
        refused := CliRunner().invoke(app, ["export", str(tiny_run), "--out", str(copy_of_run), "--overwrite"])
    )
    assert files_in(copy_of_run) == before

    exported = tmp_path / "exported"
    assert CliRunner().invoke(app, ["export", str(tiny_run), "--out", str(exported)]).exit_code == 0
    before = files_in(exported)
    with pytest.raises(OutputError, match="holds an exported model"):
        pretrain(PretrainConfig(**FAST, out=str(exported), overwrite=True))
    assert files_in(exported) == before


# ----------------------------------------------------------------------------- 6: an export killed half-way is repaired


def test_an_export_killed_between_its_renames_is_put_back_by_the_next_one(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "exported"
    export = ["export", str(tiny_run), "--out", str(out)]
    assert CliRunner().invoke(app, export).exit_code == 0
    old = files_of(out)

    def killed_between_the_renames(staging: Path, out: Path) -> None:
        os.replace(out, rundir.writing._previous_of(out))  # the old export aside ...
        raise Killed  # ... and the new one never renamed into place

    monkeypatch.setattr(rundir, "install_staged", killed_between_the_renames)
    with pytest.raises(Killed):
        from rotnet_cli.config import ExportConfig
        from rotnet_cli.exporting import export as run_export

        run_export(ExportConfig(weights=str(tiny_run), out=str(out), overwrite=True, with_head=True))
    monkeypatch.undo()
    assert not out.exists()  # the old export is aside; a stale staging folder of an old version lies there too
    (tmp_path / ".exported.abcd1234.tmp").mkdir()
    (tmp_path / ".exported.abcd1234.tmp" / "model.safetensors").write_bytes(b"x" * 1000)

    refused = CliRunner().invoke(app, export)  # the next export puts the old one back first, then refuses it
    assert "--overwrite" in one_error_line(refused)
    assert files_of(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


# ----------------------------------------------------------------------------- 9: any name a file system allows


ODD = os.fsdecode(b"odd \xff\nname")  # not UTF-8, with a newline


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
def test_paths_of_any_bytes_work_through_every_command(tmp_path, monkeypatch):
    data = tmp_path / f"data {ODD}"  # two classes, so that probe can use it too
    for i in range(8):
        (data / f"class {ODD}{i % 2}").mkdir(parents=True, exist_ok=True)
        _png(data / f"class {ODD}{i % 2}" / f"{ODD}{i}.png", i)
    image = next(data.rglob("*.png"))
    run = tmp_path / f"run {ODD}"
    monkeypatch.setenv("ROTNET_DEBUG", "0")

    def ok(*args) -> str:
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.stdout

    summary = json.loads(
        ok(
            "pretrain",
            "--model",
            "test_resnet",
            "--data",
            data,
            "--epochs",
            "1",
            "-b",
            "4",
            "--max-steps-per-epoch",
            "1",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--out",
            run,
            "--json",
        )
    )
    assert summary["out_dir"] == str(run)  # JSON escapes the undecodable byte, and it comes back the same
    assert "odd \\xff\nname" in rundir.safetensors_metadata(run / "model.safetensors")["data"]  # metadata: valid UTF-8
    ok("pretrain", "--resume", run)
    ok("export", run, "--out", run / f"export {ODD}", "--with-head")
    assert load_weights(run / f"export {ODD}").head is not None
    ok("probe", run, "--data", data, "--head", "knn", "--val-split", "0.5", "--device", "cpu", "--workers", "0")
    assert (run / "probe.json").is_file()
    ok("viz", "filters", run, "--out", run / f"{ODD}.png")
    ok("viz", "attention", run, image, "--out", run / f"attention {ODD}", "--device", "cpu")
    ok("predict", run, image, "--device", "cpu", "--workers", "0", "--json")


def test_a_message_with_a_newline_in_a_path_is_still_one_line(tmp_path):
    bad = tmp_path / "a\nb"
    bad.write_text("not a folder")
    result = CliRunner().invoke(app, ["pretrain", "--out", str(bad)])
    assert "a\\nb is a file" in one_error_line(result)


# ----------------------------------------------------------------------------- 10: nothing to train on is found before anything is written


def test_streamed_batches_left_too_small_by_unreadable_files_pass_without_a_step(tmp_path):
    """--cache none: a batch left with one readable image under BatchNorm (--copies one) passes, not a traceback.
    Four files, one unreadable, batches of two: one batch trains, the other holds the broken file and passes."""
    data = tmp_path / "photos"
    data.mkdir()
    for i in range(3):
        _png(data / f"{i}.png", i)
    (data / "broken.png").write_bytes(b"not an image")
    result = pretrain(
        PretrainConfig(
            model="test_resnet",
            data=str(data),
            epochs=1,
            batch_size=2,
            copies="one",
            cache="none",
            val_split=0,
            device="cpu",
            workers=0,
            out=str(tmp_path / "run"),
        )
    )
    assert result.skipped_files == [str(data / "broken.png")] and math.isfinite(result.final["loss"])


# ----------------------------------------------------------------------------- 12: Ctrl-C, however and whenever


def test_signals_are_held_back_while_a_file_is_written(tmp_path):
    target = tmp_path / "file.bin"

    def write(tmp: Path) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the write
        time.sleep(0.05)
        tmp.write_bytes(b"complete")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert target.read_bytes() == b"complete"  # the interrupt came after the rename
    reached = False
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            reached = True  # nothing was raised in here: the interrupt waits for the end of the block
    assert reached


def test_a_training_stop_flag_takes_the_first_ctrl_c_and_a_second_stops_at_once_and_the_handlers_come_back():
    from rotnet_cli import stopping

    said: list[str] = []
    flag = stopping.StopFlag(said.append, training=True)
    before = {sig: signal.getsignal(sig) for sig in stopping.SIGNALS}
    with flag.installed():
        assert stopping.phase() is stopping.Phase.TRAINING
        with stopping.signals_deferred():  # a checkpoint being written: the Ctrl-C waits for the file
            assert stopping.phase() is stopping.Phase.DEFERRED
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert not flag()
        assert flag() and said == ["SIGTERM: saving a checkpoint at the end of this step (Ctrl-C again to abort)"]
        assert stopping.phase() is stopping.Phase.TRAINING
        with pytest.raises(KeyboardInterrupt):  # the second one does not wait for the step
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert {sig: signal.getsignal(sig) for sig in stopping.SIGNALS} == before


def test_a_ctrl_c_while_torch_imports_waits_for_the_import_then_interrupts(monkeypatch):
    # raised inside torch's import, the KeyboardInterrupt crossed pybind11 and aborted the process (exit -6,
    # "terminate called after throwing an instance of 'pybind11::error_already_set'"); a module whose spec
    # says it is initialising stands in for torch/__init__ running
    import types
    from importlib.machinery import ModuleSpec

    from rotnet_cli import stopping

    importing = types.ModuleType("torchvision")
    importing.__spec__ = ModuleSpec("torchvision", None)
    importing.__spec__._initializing = True
    monkeypatch.setitem(sys.modules, "torchvision", importing)
    before = signal.signal(signal.SIGINT, stopping.interrupt)
    try:
        stopping.reset()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the import goes on: nothing raised in its middle
        assert not stopping.ctrl_c_seen()
        with pytest.raises(KeyboardInterrupt):
            importing.__spec__._initializing = False  # the import is done: the Ctrl-C comes now
            time.sleep(2)
        assert stopping.ctrl_c_seen()  # counted once
        assert stopping._state["seen"] == 1
    finally:
        signal.signal(signal.SIGINT, before)
        stopping.reset()


def _loaded(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches /proc to see how far the start-up got")
@pytest.mark.parametrize(
    "moment, signum",
    [
        ("0.3s", signal.SIGINT),
        ("0.8s", signal.SIGINT),
        ("loading torch", signal.SIGINT),
        ("setting up", signal.SIGINT),
        ("loading torch", signal.SIGTERM),  # a scheduler's stop while the command imports: was a silent kill
    ],
    ids=["0.3s", "0.8s", "loading-torch", "setting-up", "sigterm-loading-torch"],
)
def test_ctrl_c_while_starting_is_one_line_and_exit_130(tmp_path, moment, signum):
    """Ctrl-C (or SIGTERM) at any moment of the start-up (the interpreter itself aside): exit 130 and one line."""
    proc = subprocess.Popen(
        [
            ROTNET,
            "pretrain",
            "--model",
            "test_resnet",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "run"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ROTNET_DEBUG": "0", "OMP_NUM_THREADS": "1"},
    )
    if moment.endswith("s"):
        time.sleep(float(moment[:-1]))
    else:
        deadline = time.monotonic() + 60
        while not _loaded(proc.pid, "libtorch") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.0 if moment == "loading torch" else 1.0)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and lines and lines[-1].startswith("stopped"), stderr
    assert sum(line.startswith(("stopped:", "error:")) for line in lines) == 1, stderr
    assert not (tmp_path / "run").exists()


SHORT_PRETRAIN = ["pretrain", "--model", "test_resnet", "--device", "cpu", "--workers", "0", "--epochs", "1"]


def rotnet_after(patch: str, args: list[str]) -> subprocess.CompletedProcess:
    """``rotnet ARGS`` run by rotnet's own main() in a fresh interpreter, after the Python source ``patch``."""
    main = "\nfrom rotnet_cli.cli import main\nsys.argv = ['rotnet', *sys.argv[1:]]\nmain()\n"
    return subprocess.run(
        [sys.executable, "-c", patch + main, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ROTNET_DEBUG": "0", "OMP_NUM_THREADS": "1"},
    )


# rotnet's own main() with its config step made to do what some library code does while it
# imports: a Ctrl-C arrives and a broad `except` swallows its KeyboardInterrupt
SWALLOWING_START = """
import os, signal, sys, time
from rotnet_cli.config import PretrainConfig

original = PretrainConfig.from_dict.__func__


def swallowing(cls, *args, **kwargs):
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
    except BaseException:
        pass
    return original(cls, *args, **kwargs)


PretrainConfig.from_dict = classmethod(swallowing)
"""


def test_a_ctrl_c_that_library_code_swallowed_while_starting_still_stops_the_run(tmp_path):
    # seen in CI: a Ctrl-C during start-up was lost and the run trained on for minutes
    run = tmp_path / "run"
    proc = rotnet_after(SWALLOWING_START, [*SHORT_PRETRAIN, "--out", str(run)])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 130, proc.stderr
    assert lines[-1].startswith("stopped") and "Traceback" not in proc.stderr, proc.stderr
    assert not run.exists()


# the `rotnet` command loading, with one of its imports doing what some library code does while it
# imports: a Ctrl-C arrives and a broad `except` swallows its KeyboardInterrupt (found by a start-up scan)
SWALLOWING_IMPORT = """
import builtins, os, signal, sys, time

real_import = builtins.__import__


def swallowing_import(name, *args, **kwargs):
    if name == "typer" and "typer" not in sys.modules:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        except BaseException:
            pass
    return real_import(name, *args, **kwargs)


builtins.__import__ = swallowing_import
from rotnet_cli.cli import main

builtins.__import__ = real_import
sys.argv = ["rotnet", *sys.argv[1:]]
main()
"""


def test_a_ctrl_c_that_an_import_swallowed_while_the_cli_loads_still_stops(tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", "--model", "test_resnet", "--device", "cpu", "--workers", "0", "--epochs", "1"]
    proc = subprocess.run(
        [sys.executable, "-c", SWALLOWING_IMPORT, *args, "--max-steps-per-epoch", "1", "--out", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ROTNET_DEBUG": "0", "OMP_NUM_THREADS": "1"},
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 130, proc.stderr
    assert lines == ["stopped: interrupted before the command started; nothing was changed"], proc.stderr
    assert not run.exists()


# rotnet's own main() with a set-up step that takes long (decoding a big folder, building a big model)
CTRL_C_WHILE_SETTING_UP = """
import os, signal, sys, time
import rotnet_cli.pretraining as pretraining

original = pretraining.set_up


def slow_set_up(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(60)
    return original(*args, **kwargs)


pretraining.set_up = slow_set_up
"""


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_a_first_ctrl_c_before_training_begins_stops_at_once_and_keeps_nothing(tmp_path, copy_of_run, overwrite):
    run = copy_of_run if overwrite else tmp_path / "run"  # an earlier run, to come back as it was
    before = files_in(run) if overwrite else None
    started = time.monotonic()
    proc = rotnet_after(CTRL_C_WHILE_SETTING_UP, [*SHORT_PRETRAIN, "--out", str(run), *(["--overwrite"] * overwrite)])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 130, proc.stderr
    assert time.monotonic() - started < 50  # not after the 60 s of set-up and a first step
    assert lines[-1].startswith("stopped") and "nothing was kept" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    if overwrite:
        assert files_in(run) == before
    else:
        assert not run.exists()


# a Ctrl-C that arrives while the interpreter shuts down, after the command's last line (seen in a
# slow test: a second Ctrl-C 0.2 s after the first came after the stop line and Python died of SIGINT).
# Registered before rotnet's main() runs, this callback runs after rotnet's own: the last teardown.
CTRL_C_AT_SHUTDOWN = """
import atexit, os, signal, sys, time

atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(1)))
"""


def test_a_ctrl_c_after_the_last_line_changes_nothing(tmp_path):
    proc = rotnet_after(CTRL_C_AT_SHUTDOWN, ["probe", str(tmp_path / "no-such-run")])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr  # the command's own exit code
    assert lines[-1].startswith("error:") and "does not exist" in lines[-1], proc.stderr  # the command's last word
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr


def test_a_ctrl_c_that_python_wrapped_in_another_error_is_a_stop_not_a_bug(monkeypatch):
    # Python turns a KeyboardInterrupt raised while a class is created (__set_name__) into a RuntimeError
    def wrapped(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("Error calling __set_name__ on 'cached_property' instance") from e

    monkeypatch.setattr(pretrain_module, "pretrain", wrapped)
    result = CliRunner().invoke(app, ["pretrain", "--model", "test_resnet", "--device", "cpu", "--out", "unused"])
    assert result.exit_code == 130
    assert result.stderr.strip() == "stopped: interrupted"


@pytest.mark.parametrize(
    "gap", [0.0, pytest.param(0.03, marks=pytest.mark.slow), pytest.param(0.2, marks=pytest.mark.slow)]
)
def test_ctrl_c_twice_is_one_line_exit_130_and_an_intact_checkpoint(tmp_path, gap):
    run = tmp_path / "run"
    proc = start([*SLOW_RUN, "--out", str(run), "--save-every", "1"], tmp_path / "log")  # a save at every step
    wait_for_checkpoint(proc, run, (0, 3))
    proc.send_signal(signal.SIGINT)
    time.sleep(gap)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    log = (tmp_path / "log").read_text()
    assert "Traceback" not in log and log.strip().splitlines()[-1].startswith("stopped"), log
    assert f"--resume {run}" in log
    load_checkpoint(run / "checkpoint.pt")  # complete and loadable


# ----------------------------------------------------------------------------- 13: every message names a fix that exists


def test_probe_that_cannot_save_prints_its_results_and_says_what_to_do(copy_of_run, monkeypatch):
    monkeypatch.setattr(
        rundir.writing, "PROBE_SAVE_WAIT_S", 0.2
    )  # a run holds the lock for its whole length: waiting ends
    with rundir.FolderLock(copy_of_run / rundir.LOCK, copy_of_run):  # another process writes the run
        result = CliRunner().invoke(
            app, ["probe", str(copy_of_run), "--head", "knn", "--epochs", "1", "--device", "cpu", "--workers", "0"]
        )
    error = one_error_line(result)
    assert "probe.json was not saved" in error and "--no-save" in error and "in use by another rotnet process" in error
    assert "knn" in result.stdout and "%" in result.stdout  # the table was printed all the same
    assert not (copy_of_run / "probe.json").exists()


def test_disk_full_before_the_first_checkpoint_says_start_again_and_leaves_nothing(tmp_path, monkeypatch):
    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    run = tmp_path / "run"
    args = [
        "pretrain",
        "--model",
        "test_resnet",
        "--epochs",
        "1",
        "--max-steps-per-epoch",
        "2",
        "-b",
        "16",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--out",
        str(run),
    ]
    error = one_error_line(CliRunner().invoke(app, args))
    assert "before the first checkpoint" in error and "run the same command again" in error and "resume" not in error
    assert not run.exists()  # so the same command works once there is space
    monkeypatch.undo()
    assert CliRunner().invoke(app, args).exit_code == 0


def test_disk_full_during_an_export_says_export_again(tiny_run, tmp_path, monkeypatch):
    import rotnet_cli.atomicfiles as atomicfiles
    import rotnet_cli.checkpoint as checkpoint
    from rotnet_cli.errors import DiskFullError

    def full(path, write):
        raise DiskFullError(path, f"disk full while writing {path}")

    monkeypatch.setattr(atomicfiles, "atomic_write", full)
    monkeypatch.setattr(checkpoint, "atomic_write", full)
    monkeypatch.setattr(rundir.metadata, "save_safetensors", lambda path, tensors, meta: full(path, None))
    error = one_error_line(CliRunner().invoke(app, ["export", str(tiny_run), "--out", str(tmp_path / "e")]))
    assert "export again" in error and "resume" not in error
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 14: no misleading diagnosis


@pytest.fixture
def photos_with_broken_files(tmp_path) -> Path:
    data = tmp_path / "photos"
    data.mkdir()
    for i in range(34):
        _png(data / f"{i:02d}.png", i)
    for name in ("broken1.png", "broken2.jpg"):
        (data / name).write_bytes(b"not an image")
    return data


def test_resume_with_another_cache_mode_is_not_called_changed_data(tmp_path, photos_with_broken_files):
    run = tmp_path / "run"
    stopped_early(run, data=str(photos_with_broken_files), val_split=0)  # decoded into memory: 34 readable images
    with pytest.raises(DataError) as refused:
        pretrain(resume_config(run, {"cache": "none"}))
    assert "data is unchanged (36 image files)" in str(refused.value) and "--cache ram" in str(refused.value)
    assert "the training data changed" not in str(refused.value)

    streamed = tmp_path / "streamed"  # streamed both times: it resumes
    stopped_early(streamed, data=str(photos_with_broken_files), val_split=0, cache="none")
    assert pretrain(resume_config(streamed, {"cache": "none"})).resumed_from is not None


def test_a_config_json_of_another_run_is_named_not_a_state_dict_error(tmp_path):
    run = tmp_path / "run"
    stopped_early(run)
    record = json.loads((run / "config.json").read_text())
    record["config"]["model"] = "test_vit"
    (run / "config.json").write_text(json.dumps(record))
    with pytest.raises(
        ConfigError,
        match="config.json and checkpoint.pt there describe different runs .*model: 'test_vit' vs 'test_resnet'",
    ):
        pretrain(resume_config(run, {}))


def test_an_export_without_its_config_json_says_so(tiny_run, tmp_path):
    out = tmp_path / "e"
    assert CliRunner().invoke(app, ["export", str(tiny_run), "--out", str(out), "--with-head"]).exit_code == 0
    (out / "config.json").unlink()
    with pytest.raises(WeightsError, match="config.json is missing"):
        load_weights(out)


def test_a_file_that_cannot_be_opened_is_not_called_corrupt(tmp_path):
    from rotnet_cli.checkpoint import load_safetensors

    for name, load in (("model.safetensors", load_safetensors), ("checkpoint.pt", load_checkpoint)):
        folder = tmp_path / name
        folder.mkdir()
        with pytest.raises(WeightsError) as refused:
            load(folder)
        assert "corrupt" not in str(refused.value) and "not a readable" not in str(refused.value), refused.value


# ----------------------------------------------------------------------------- 15: 16-bit and float images keep their brightness


def test_16_bit_and_float_images_decode_at_their_brightness(tmp_path):
    from rotnet_cli.data import UnsupportedPixels, decode_file

    Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16)).save(tmp_path / "grey16.png")  # half of 65535
    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32)).save(tmp_path / "half.tiff")
    Image.fromarray(np.full((16, 16), 7.5, dtype=np.float32)).save(tmp_path / "hdr.tiff")
    for name in ("grey16.png", "half.tiff"):
        assert decode_file(tmp_path / name, 8).float().mean().item() == pytest.approx(128, abs=1), name
    with pytest.raises(UnsupportedPixels):
        decode_file(tmp_path / "hdr.tiff", 8)


# ----------------------------------------------------------------------------- 16: links and hidden entries, one rule each


def test_broken_and_looping_links_and_fifos_are_skipped_and_hidden_folders_are_not_data(tmp_path):
    from rotnet_cli.data import open_source

    data = tmp_path / "photos"
    (data / ".thumbnails").mkdir(parents=True)
    for i in range(6):
        _png(data / f"{i}.png", i)
    _png(data / ".thumbnails" / "t.png", 9)
    _png(data / ".hidden.png", 9)
    (data / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (data / "loop.png").symlink_to(data / "loop.png")
    (data / "back").symlink_to(data)  # a folder loop: walked once
    os.mkfifo(data / "pipe.png")  # reading it would wait forever for a writer
    source = open_source(str(data), 16, cache="ram", workers=0)
    assert len(source.train) == 6
    assert sorted(Path(p).name for p in source.skipped) == ["gone.png", "loop.png", "pipe.png"]
    with pytest.raises(DataError, match="unreadable image .*gone.png"):
        open_source(str(data), 16, cache="ram", workers=0, strict=True)


# ----------------------------------------------------------------------------- 17: the thread count of a resume


def test_resuming_with_another_thread_count_says_so(tmp_path):
    run = tmp_path / "run"
    stopped_early(run)
    events = []
    torch.set_num_threads(2)
    try:
        with pytest.raises(Interrupted):  # one step is enough to see what it says
            pretrain(resume_config(run, {}), progress=events.append, should_stop=lambda: True)
    finally:
        torch.set_num_threads(1)
    warnings = [e.text for e in events if isinstance(e, WarningMessage)]
    assert any("used 1 CPU threads, this process 2" in w and "OMP_NUM_THREADS=1" in w for w in warnings), warnings
