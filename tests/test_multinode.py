"""Past one machine: srun without torchrun, torchrun across nodes, and --resume auto under an elastic restart.

The fast tests check SLURM's variables mapped to torchrun's and what --resume auto decides; the
slow ones launch CPU processes with gloo (the fast sibling of a multi-process run is test_ddp.py's
standalone torchrun): two torchrun launchers as two nodes, and a process killed mid-run whose
restart by torchrun's elastic agent ends with the uninterrupted run's weights, bit for bit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_ddp import HARNESS, OPTIONS, TORCHRUN, ddp_run  # noqa: F401 (ddp_run: the uninterrupted 2-process run)
from typer.testing import CliRunner

from rotnet_cli.cli import app
from rotnet_cli.runtime import dist_from_env, first_host, slurm_env

SRUN = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242"}


@pytest.mark.parametrize(
    "nodelist, first",
    [("gpu[03-05,09],cpu1", "gpu03"), ("node7,node8", "node7"), ("rack[1-2]-n[007-9]", "rack1-n007"), ("solo", "solo")],
)
def test_the_master_is_the_first_host_of_the_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_srun_without_torchrun_gets_torchruns_variables(monkeypatch):
    env = {
        **SRUN,
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_JOB_NODELIST": "gpu[03-04]",
        "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.9",
    }
    mapped = slurm_env(env)
    # the step's task count wins over the job's; the master is where srun puts task 0
    assert mapped == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu03", "MASTER_PORT": "19242"}
    assert slurm_env({**SRUN})["MASTER_PORT"] == slurm_env({**SRUN, "SLURM_PROCID": "0"})["MASTER_PORT"]
    assert slurm_env({**SRUN, "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.9"})["MASTER_ADDR"] == "10.0.0.9"  # no node list
    assert slurm_env({**SRUN, "MASTER_ADDR": "head", "MASTER_PORT": "1"}).keys() == {"RANK", "WORLD_SIZE", "LOCAL_RANK"}
    assert slurm_env({**SRUN, "TORCHELASTIC_RUN_ID": "x"}) == {}  # torchrun under srun sets its own
    assert slurm_env({"PATH": "/bin"}) == {}
    environ = {**SRUN, "SLURM_JOB_NODELIST": "n[1-2]", "PATH": os.environ.get("PATH", "")}
    monkeypatch.setattr(os, "environ", environ)  # what dist_from_env sets stays in this copy
    info = dist_from_env()
    assert (info.rank, info.world_size, info.local_rank) == (3, 8, 1)
    assert environ["MASTER_ADDR"] == "n1" and environ["RANK"] == "3"


TINY = ["pretrain", "--model", "test_resnet", "--img-size", "32", "--epochs", "1", "--max-steps-per-epoch", "2"]
TINY += ["--device", "cpu", "--workers", "0", "--logger", "none", "--resume", "auto"]


def test_resume_auto_starts_continues_and_refuses_another_run(tmp_path):
    out = tmp_path / "run"
    started = CliRunner().invoke(app, [*TINY, "--out", str(out)])
    assert started.exit_code == 0, started.output
    first = (out / "model.safetensors").read_bytes()
    again = CliRunner().invoke(app, [*TINY, "--out", str(out)])  # a requeue of the finished run: nothing changes
    assert again.exit_code == 0, again.output and (out / "model.safetensors").read_bytes() == first
    other = CliRunner().invoke(app, [*TINY, "--out", str(out), "--lr", "0.5"])
    assert other.exit_code == 1 and "contradict the saved run" in other.output and "--lr" in other.output
    no_out = CliRunner().invoke(app, TINY)
    assert no_out.exit_code == 1 and "--resume auto needs --out" in no_out.output


def test_resume_auto_continues_a_stopped_run_to_the_same_weights(tmp_path):
    from rotnet_cli.config import PretrainConfig
    from rotnet_cli.errors import Interrupted
    from rotnet_cli.pretraining import auto_resume_config, pretrain

    options = dict(model="test_vit", img_size=32, epochs=1, max_steps_per_epoch=3, workers=0, device="cpu")
    pretrain(PretrainConfig(**options, out=str(tmp_path / "full")))
    params = {**options, "out": str(tmp_path / "part")}
    with pytest.raises(Interrupted):
        pretrain(auto_resume_config(params, set(params)), should_stop=lambda: True)
    resumed = auto_resume_config(params, set(params))
    assert resumed.resume
    pretrain(resumed)
    full, part = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert all(torch.equal(full[k], part[k]) for k in full)


# ----------------------------------------------------------------------------- launched processes (slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_harness(tmp_path: Path, text: str) -> Path:
    script = tmp_path / "harness.py"
    script.write_text(text)
    return script


@pytest.mark.slow  # two torchrun launchers (~1 min on 2 cores); the fast sibling is test_ddp.py's standalone run
def test_two_launchers_as_two_nodes_train_the_standalone_runs_weights(ddp_run, tmp_path):  # noqa: F811
    script, out, port = write_harness(tmp_path, HARNESS), tmp_path / "run", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = [
        subprocess.Popen(
            [TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1"]
            + ["--master-port", str(port), str(script), json.dumps(OPTIONS), str(out), "0"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=400)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(outputs)
    two_nodes, standalone = load_file(out / "model.safetensors"), load_file(ddp_run / "model.safetensors")
    assert all(torch.equal(two_nodes[k], standalone[k]) for k in standalone)


ELASTIC_HARNESS = """
import json, os, signal, sys
from pathlib import Path
import rotnet_cli.pretraining as P

options, out = json.loads(sys.argv[1]), Path(sys.argv[2])
calls = {"n": 0}

def stop():
    calls["n"] += 1
    # the first attempt's rank 1 dies after global step 7 of 8 (checkpoints: after steps 3, 4 and 6)
    if calls["n"] == 6 and os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        Path(str(out) + "-killed").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return False

params = {**options, "out": str(out)}
P.pretrain(P.auto_resume_config(params, set(params)), should_stop=stop)  # what pretrain --resume auto does
"""


@pytest.mark.slow  # torchrun twice over (~1 min on 2 cores); --resume auto's own fast tests are above
def test_a_killed_process_is_restarted_by_torchrun_and_the_run_ends_bitwise_as_uninterrupted(ddp_run, tmp_path):  # noqa: F811
    script, out = write_harness(tmp_path, ELASTIC_HARNESS), tmp_path / "run"
    proc = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", str(script)]
        + [json.dumps(OPTIONS), str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert Path(str(out) + "-killed").exists()  # the kill happened, and the agent's restart finished the run
    restarted, uninterrupted = load_file(out / "model.safetensors"), load_file(ddp_run / "model.safetensors")
    assert all(torch.equal(restarted[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.slow  # one more torchrun launch (~45 s on 2 cores); single-process accumulation is in test_accumulation.py
def test_accumulation_under_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    from test_ddp import losses

    from rotnet_cli.config import PretrainConfig
    from rotnet_cli.pretraining import pretrain

    # 2 processes x 8 images x 2 micro-batches (gradients averaged once, at the last one) against 1 x 32
    accumulated = {**OPTIONS, "accum_steps": 2}
    out = tmp_path / "ddp"
    (tmp_path / "harness.py").write_text(HARNESS)
    subprocess.run(
        [TORCHRUN, "--standalone", "--nproc-per-node", "2", str(tmp_path / "harness.py"), json.dumps(accumulated)]
        + [str(out), "0"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
        capture_output=True,
        timeout=400,
    )
    torch.set_num_threads(1)
    pretrain(PretrainConfig(**{**OPTIONS, "batch_size": 32}, out=str(tmp_path / "single")))
    for (ddp_loss, ddp_val), (one_loss, one_val) in zip(losses(out), losses(tmp_path / "single"), strict=True):
        assert ddp_loss == pytest.approx(one_loss, rel=1e-4)
        assert ddp_val == pytest.approx(one_val, rel=1e-4)
