"""Performance properties that hold on any device, checked on CPU.

Speeds themselves are measured by benchmarks/, not here. What can be tested everywhere is
the design that makes them possible: the training step never waits for the device (no
host read per step), and the fast paths (bf16, channels_last, torch.compile, cuDNN
autotuning, enough loader workers) are wired in and train.
"""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from rotnet_cli import pretraining
from rotnet_cli.config import PretrainConfig, default_workers
from rotnet_cli.pretraining import pretrain
from rotnet_cli.runtime import configure_backends

# Tensor ops that make the host wait for the device on a GPU: reading a value, learning a
# data-dependent size, or copying to host memory.
HOST_READS = {
    "item",
    "tolist",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "nonzero",
    "cpu",
    "numpy",
    "unique",
    "masked_select",
}


class HostReads(TorchFunctionMode):
    """Counts the host-synchronising tensor ops called under it, by name."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.paused:
            pass
        elif name in HOST_READS:
            self.calls[name] += 1
        elif name == "__getitem__":  # a boolean mask index has a data-dependent size
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                self.calls["boolean index"] += 1
        return func(*args, **(kwargs or {}))


def host_reads_of_one_epoch(tmp_path, monkeypatch, steps: int, **options) -> collections.Counter:
    cfg = PretrainConfig(
        model="test_resnet",
        epochs=1,
        batch_size=16,
        max_steps_per_epoch=steps,
        log_every=1000,
        device="cpu",
        workers=0,
        out=str(tmp_path / f"run-{steps}"),
        **options,
    )
    reads = HostReads()
    calibrate = pretraining.calibrate

    def calibrate_uncounted(*args, **kwargs):
        # once per run, after the last step, on the host: LBFGS's iterations vary with the run's logits
        reads.paused = True
        try:
            return calibrate(*args, **kwargs)
        finally:
            reads.paused = False

    monkeypatch.setattr(pretraining, "calibrate", calibrate_uncounted)
    with reads:
        pretrain(cfg)
    return reads.calls


@pytest.mark.parametrize(
    "options",
    [
        {},  # the paper: every rotated copy
        {"copies": "one", "rotations": (0.0, 45.0, 90.0, 180.0)},  # sampled rotation, resampled and masked
    ],
    ids=["all-copies", "one-copy-resampled"],
)
def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch, options):
    # With --log-every above the epoch length the loop reads loss and accuracy only at the
    # epoch's end: three times as many steps must not mean a single extra host read.
    # (On a GPU each such read stalls the step until the device has caught up.)
    short = host_reads_of_one_epoch(tmp_path, monkeypatch, 3, **options)
    long = host_reads_of_one_epoch(tmp_path, monkeypatch, 9, **options)
    assert long == short
    assert sum(short.values()) > 0  # the counter does see the epoch-end reads


def test_the_host_read_counter_catches_a_read_in_the_step(tmp_path, monkeypatch):
    # The guard above is only worth something if a per-step .item() would trip it.
    real_loss = pretraining.rotation_loss

    def loss_that_reads(logits, labels):
        loss = real_loss(logits, labels)
        loss.item()
        return loss

    monkeypatch.setattr(pretraining, "rotation_loss", loss_that_reads)
    assert (
        host_reads_of_one_epoch(tmp_path, monkeypatch, 9)["item"]
        - host_reads_of_one_epoch(tmp_path, monkeypatch, 3)["item"]
        == 6
    )


def test_bf16_autocast_and_channels_last_train_and_save_fp32_weights(tmp_path):
    result = pretrain(
        PretrainConfig(
            model="test_resnet",
            epochs=2,
            batch_size=32,
            max_steps_per_epoch=6,
            device="cpu",
            precision="bf16",
            channels_last=True,
            workers=0,
            out=str(tmp_path / "run"),
        )
    )
    assert all(torch.isfinite(torch.tensor([row["loss"], row["val_loss"]])).all() for row in result.history)
    weights = load_file(tmp_path / "run" / "model.safetensors")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}  # autocast, not a cast


@pytest.mark.slow
def test_compiled_training_saves_the_plain_model(tmp_path):
    # torch.compile wraps the module; the run must still save and reload timm's own keys.
    # Slow (about 45 s of compiling on 2 cores); the uncompiled loop is tested everywhere.
    plain = pretrain(
        PretrainConfig(
            model="test_resnet",
            epochs=1,
            batch_size=32,
            max_steps_per_epoch=4,
            device="cpu",
            workers=0,
            out=str(tmp_path / "plain"),
        )
    )
    compiled = pretrain(
        PretrainConfig(
            model="test_resnet",
            epochs=1,
            batch_size=32,
            max_steps_per_epoch=4,
            device="cpu",
            workers=0,
            compile=True,
            out=str(tmp_path / "compiled"),
        )
    )
    assert (
        load_file(tmp_path / "compiled" / "model.safetensors").keys()
        == load_file(tmp_path / "plain" / "model.safetensors").keys()
    )
    # the same computation: compiled kernels may differ in the last bits only
    assert compiled.history[0]["loss"] == pytest.approx(plain.history[0]["loss"], rel=1e-3)


@pytest.fixture
def backend_flags():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_cuda_runs_autotune_convolutions_and_allow_tf32_like_timm_train(backend_flags):
    configure_backends(torch.device("cpu"))
    assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
    configure_backends(torch.device("cuda", 0))  # only flags: no GPU needed to set them
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize(
    "cores, local_world, expected",
    [
        (2, None, 2),
        (4, None, 3),
        (16, None, 8),
        (64, None, 8),
        (16, "4", 3),
        (16, "8", 2),
    ],
)
def test_default_workers_follow_the_cores_each_process_has(monkeypatch, cores, local_world, expected):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)  # torchrun: processes on this machine
    assert default_workers() == expected
    assert PretrainConfig().workers == expected


# ----------------------------------------------------------------------------- the benchmarks themselves
# Their figures are the evidence, so they must keep running; tiny settings here
# check that each prints its one JSON line with the figures it promises (not their values).

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
    "script, args, figures",
    [
        (
            "pipeline.py",
            [
                "--model",
                "test_resnet",
                "--batch-size",
                "8",
                "--steps",
                "2",
                "--repeats",
                "1",
                "--warmup",
                "1",
                "--jpeg-count",
                "40",
                "--workers",
                "0",
                "--official-workers",
                "1",
                "--device",
                "cpu",
            ],
            [
                "digits_vs_bare",
                "memory_vs_bare",
                "jpeg_cache_none_vs_bare",
                "jpeg_cache_auto_vs_bare",
                "rotnet_vs_official_memory",
                "rotnet_vs_official_jpeg",
            ],
        ),
        (
            "probe.py",
            [
                "--weights",
                "RUN",
                "--epochs",
                "2",
                "--augmented-epochs",
                "1",
                "--readme-weights",
                "random:test_resnet",
                "--device",
                "cpu",
            ],
            [
                "ratio_linear",
                "ratio_default_heads",
                "ratio_linear_mlp_knn",
                "ratio_readme_example",
                "ratio_augmented_per_epoch",
            ],
        ),
        (
            "memory.py",
            ["--model", "test_resnet", "--steps", "2", "--batch-size", "8", "--device", "cpu"],
            ["rotnet_vs_bare"],
        ),
        ("startup.py", ["--runs", "1"], ["help_vs_import_timm"]),
        (
            "online_eval.py",
            [
                "--model",
                "test_resnet",
                "--epochs",
                "2",
                "--max-steps-per-epoch",
                "1",
                "--batch-size",
                "8",
                "--img-size",
                "32",
                "--device",
                "cpu",
            ],
            ["eval_per_epoch", "eval_share_auto"],
        ),
    ],
    ids=["pipeline", "probe", "memory", "startup", "online_eval"],
)
def test_each_benchmark_prints_its_figures_as_one_json_line(tmp_path, tiny_run, script, args, figures):
    # RUN: a 32 px run (timm's test models default to 160 px, slow to probe on CPU); the probe saves nothing
    args = [str(tiny_run) if a == "RUN" else a for a in args]
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the JPEG folder and runs go under tmp_path
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["torch"] == torch.__version__ and result["threads"] >= 1
    for name in figures:
        assert isinstance(result[name], float) and result[name] > 0, name


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_optimizer_step_is_one_fused_kernel_on_cpu_and_cuda(optimizer):
    from rotnet_cli.models import RotNet, create_backbone, rotation_head
    from rotnet_cli.pretraining import make_optimizer

    backbone = create_backbone("test_resnet", img_size=32)
    model = RotNet(backbone, rotation_head(backbone, 4))
    cfg = PretrainConfig(model="test_resnet", optimizer=optimizer)
    for device in (torch.device("cpu"), torch.device("cuda", 0)):  # building it needs no GPU
        built = make_optimizer(model, cfg, device)
        assert built.defaults["fused"] is True
        # still timm's factory: no weight decay on norms and biases
        assert sorted(g["weight_decay"] for g in built.param_groups) == [0.0, cfg.resolved_weight_decay]
    assert not make_optimizer(model, cfg, torch.device("mps")).defaults.get("fused")
