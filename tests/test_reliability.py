"""What rotnet pretrain guarantees when things go wrong: kill -9, Ctrl-C, broken images,
a diverging loss, a full disk, checkpoints from strangers.

Exactness is checked bitwise: final model.safetensors tensors with torch.equal, and every
metrics row except its timing fields.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from conftest import files_in
from typer.testing import CliRunner

import rotnet_cli.pretraining as pretrain_module
from rotnet_cli.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from rotnet_cli.cli import app
from rotnet_cli.config import PretrainConfig
from rotnet_cli.errors import Interrupted, OutputError, WeightsError
from rotnet_cli.pretraining import pretrain, resume_config
from rotnet_cli.weights import load_weights

TIMING = ("images_per_s", "seconds", "data_wait", "eval_seconds")
ROTNET = str(Path(sys.executable).parent / "rotnet")
# A run long enough to be killed in the middle: 2 epochs x 24 steps, a checkpoint every 4 steps.
SLOW_RUN = ["pretrain", "--model", "test_resnet", "--epochs", "2", "--max-steps-per-epoch", "24", "-b", "16",
            "--save-every", "4", "--device", "cpu", "--workers", "0", "--log-every", "5"]
FAST = dict(model="test_resnet", epochs=2, max_steps_per_epoch=5, batch_size=16, device="cpu", workers=0, save_every=2, log_every=1)


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


def wait_for_checkpoint(proc: subprocess.Popen, run: Path, at_least: tuple[int, int], timeout: float = 120) -> tuple[int, int]:
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


@pytest.mark.parametrize("kills", [
    pytest.param([(0, 8), (1, 8)], id="mid-epoch-1,mid-epoch-2"),
    pytest.param([(0, 4), (1, 0), (1, 16)], id="three-kills", marks=pytest.mark.slow),
])
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
    result = CliRunner().invoke(app, ["pretrain", "--resume", str(tiny_run), "--epochs", "3", "--rotations", "0,90",
                                      "--lr", "0.5", "--workers", "1"])
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
    result = CliRunner().invoke(app, ["pretrain", "--model", "test_resnet", "--data", str(data), "--epochs", "1", "-b", "8",
                                      "--device", "cpu", "--workers", str(workers), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.stderr
    assert "skipped 5 file(s) that are not readable images" in result.stderr
    assert str(sorted(broken)[0]) in result.stderr  # the first few are named
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]["train_images"] + \
        json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]["val_images"] == 40


@pytest.mark.parametrize("workers", [0, 2])
def test_strict_data_makes_the_first_unreadable_image_an_error(tmp_path, folder_with_broken_files, workers):
    data, broken = folder_with_broken_files
    result = CliRunner().invoke(app, ["pretrain", "--model", "test_resnet", "--data", str(data), "--epochs", "1", "-b", "8",
                                      "--device", "cpu", "--workers", str(workers), "--strict-data", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "unreadable image" in lines[0] and "--strict-data" in lines[0], result.stderr
    assert any(str(p) in lines[0] for p in broken)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- a diverging loss


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    pretrain(PretrainConfig(**{**FAST, "epochs": 1, "max_steps_per_epoch": 2}, out=str(run)))
    (run / "notes.txt").write_text("mine")  # not rotnet's: never touched
    old = files_in(run)

    # a new run that diverges at its first step, before any checkpoint: the old run is back
    real_loss = pretrain_module.rotation_loss
    monkeypatch.setattr(pretrain_module, "rotation_loss", lambda logits, labels: real_loss(logits, labels) * float("nan"))
    failed = CliRunner().invoke(app, ["pretrain", "--model", "test_resnet", "--epochs", "1", "--max-steps-per-epoch", "2",
                                      "-b", "16", "--device", "cpu", "--workers", "0", "--seed", "5",
                                      "--out", str(run), "--overwrite"])
    assert failed.exit_code == 1 and "NaN" in failed.stderr
    assert files_in(run) == old

    # the same new run that trains: the old files are replaced, the user's file stays
    monkeypatch.setattr(pretrain_module, "rotation_loss", real_loss)
    pretrain(PretrainConfig(**{**FAST, "epochs": 1, "max_steps_per_epoch": 2, "seed": 5, "overwrite": True}, out=str(run)))
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
    result = CliRunner().invoke(app, ["pretrain", "--model", "test_resnet", "--epochs", "1", "--max-steps-per-epoch", "6",
                                      "-b", "16", "--device", "cpu", "--workers", "0", "--save-every", "2",
                                      "--log-every", "10", "--out", str(run)])
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

    with pytest.raises(OutputError, match="disk full while writing .*previous file is intact"):
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
    result = CliRunner().invoke(app, ["pretrain", "--model", "test_resnet", "--epochs", "1", "--max-steps-per-epoch", "6",
                                      "-b", "16", "--device", "cpu", "--workers", "0", "--save-every", "2", "--out", str(run)])
    assert result.exit_code == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: disk full while writing") and "free space and resume" in error
    assert position(run) == (0, 2)
    assert not list(run.glob(".*.tmp"))


def test_output_that_cannot_be_created_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    result = CliRunner().invoke(app, ["pretrain", "--model", "test_resnet", "--epochs", "1", "-b", "16", "--device", "cpu",
                                      "--max-steps-per-epoch", "1", "--out", str(blocker / "run")])
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
    assert "does not fit this run's model" in result.stderr.strip().splitlines()[-1]


def test_every_torch_load_in_rotnet_is_weights_only():
    package = Path(pretrain_module.__file__).parent
    for source in package.rglob("*.py"):
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{source.name}:{number}: {line.strip()}"
