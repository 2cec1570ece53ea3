"""torchrun: two CPU processes (gloo) train one model.

A small harness runs ``pretrain`` under torchrun and has every rank save the weights it
ends with, which rotnet itself writes from rank 0 only. The model is ``test_vit``: it has
no batch-dependent layer (LayerNorm, not BatchNorm), so two ranks of 8 images compute
the same loss and gradient as one process of 16, up to float summation order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rotnet_cli.config import PretrainConfig

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
OPTIONS = dict(
    model="test_vit",
    epochs=2,
    max_steps_per_epoch=4,
    batch_size=16,
    device="cpu",
    workers=0,
    augment=False,
    optimizer="adamw",
    lr=1e-3,
    save_every=3,
    log_every=1,
)

HARNESS = """
import json, os, sys
from pathlib import Path
import rotnet_cli.pretraining as P
from rotnet_cli.config import PretrainConfig
from rotnet_cli.errors import Interrupted
from safetensors.torch import save_file

options, out, stop_after = json.loads(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
built = []
RotNet = P.RotNet
P.RotNet = lambda *a: built.append(RotNet(*a)) or built[-1]  # keep each rank's model
calls = {"n": 0}

def stop():
    calls["n"] += 1
    return calls["n"] == stop_after

config = P.resume_config(out, {}) if (out / "checkpoint.pt").exists() else PretrainConfig(**options, out=str(out))
try:
    P.pretrain(config, should_stop=stop)
except Interrupted:  # both ranks stop at the same step (exit 0: torchrun reports any other code as a failure)
    sys.exit(0)
state = {k: v.contiguous() for k, v in built[-1].state_dict().items()}
save_file(state, str(out.parent / f"{out.name}-rank{os.environ['RANK']}.safetensors"))
"""


def torchrun(tmp_path: Path, out: Path, stop_after: int = 0) -> None:
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            json.dumps(OPTIONS),
            str(out),
            str(stop_after),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def losses(run: Path) -> list[tuple[float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(row["loss"], row["val_loss"]) for row in rows]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    torchrun(tmp, tmp / "run")
    return tmp / "run"


def test_both_ranks_end_with_identical_weights_and_rank_0_writes_the_run(ddp_run):
    rank0, rank1 = (load_file(ddp_run.parent / f"run-rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    written = load_file(ddp_run / "model.safetensors")
    assert all(torch.equal(written[k], rank0[k]) for k in rank0)
    assert json.loads((ddp_run / "config.json").read_text())["resolved"]["world_size"] == 2
    assert sorted(p.name for p in ddp_run.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "logs",
        "metrics.jsonl",
        "model.safetensors",
    ]


def test_loss_matches_one_process_with_the_same_global_batch(ddp_run, tmp_path):
    from rotnet_cli.pretraining import pretrain

    torch.set_num_threads(1)
    single = tmp_path / "single"
    pretrain(PretrainConfig(**OPTIONS, out=str(single)))
    # float sums in another order (two half-batch means, gloo's all-reduce) differ in the
    # last bits; over 8 steps that stays far below 1e-4 relative, while one wrong image
    # or a gradient not averaged would move the loss by percents
    for (ddp_loss, ddp_val), (one_loss, one_val) in zip(losses(ddp_run), losses(single), strict=True):
        assert ddp_loss == pytest.approx(one_loss, rel=1e-4)
        assert ddp_val == pytest.approx(one_val, rel=1e-4)


@pytest.mark.slow  # two more torchrun launches (~45 s on 2 cores); single-process resume is in test_reliability
def test_a_stopped_torchrun_resumes_to_the_same_weights(ddp_run, tmp_path):
    run = tmp_path / "run"
    torchrun(tmp_path, run, stop_after=2)
    assert not (run / "model.safetensors").exists()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["world_size"]) == (0, 2) and 0 < state["step"] < 4
    torchrun(tmp_path, run)
    resumed, uninterrupted = load_file(run / "model.safetensors"), load_file(ddp_run / "model.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert losses(run) == losses(ddp_run)


def test_calibration_fits_on_every_ranks_share_of_the_validation_images(ddp_run):
    from safetensors import safe_open

    from rotnet_cli import rundir

    with safe_open(str(ddp_run / "model.safetensors"), "pt") as f:
        raw = f.metadata()
    calibration = rundir.read_weights_metadata(ddp_run / "model.safetensors", raw)["calibration"]
    val_images = json.loads((ddp_run / "config.json").read_text())["resolved"]["val_images"]
    assert val_images == 180 and calibration["samples"] == val_images * 4  # all 180 x 4 rotations, not rank 0's 90
