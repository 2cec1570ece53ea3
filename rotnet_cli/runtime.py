"""Where and how the work runs: device, precision, seeding, random states, torchrun/DDP."""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, DeviceError

FUSED_OPTIMIZER_DEVICES = ("cuda", "cpu")  # where torch has fused SGD and AdamW kernels


def available_devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'N' | 'mps' -> a torch.device that exists here.

    Under torchrun, 'auto' and 'cuda' mean this process's own GPU (LOCAL_RANK).
    """
    text = str(spec).strip().lower()
    devices = available_devices()
    here = ", ".join(devices)
    if text == "auto":
        if torch.cuda.is_available():
            text = "cuda"
        elif "mps" in devices:
            return torch.device("mps")
        else:
            return torch.device("cpu")
    if text.isdigit():
        text = f"cuda:{text}"
    if text == "cuda" and local_rank is not None:
        text = f"cuda:{local_rank}"
    if text == "cuda":
        text = "cuda:0"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise DeviceError(f"--device {spec!r} is not a device name; use one of: {here}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: no CUDA GPU is visible here; available: {here}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: there is no GPU {device.index}; available: {here}")
        return device
    if device.type == "mps":
        if "mps" not in devices:
            raise DeviceError(f"--device mps: Apple MPS is not available here; available: {here}")
        return device
    raise DeviceError(f"--device {spec!r} is not supported; use one of: {here}")


def describe_device(device: torch.device) -> str:
    """One line naming the device, e.g. 'cuda:0 (NVIDIA H100 80GB HBM3, 79.2 GiB)'."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'' if threads == 1 else 's'})"
    return str(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 where the GPU supports it, else fp32 (CPU and MPS default to fp32)."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("--precision fp16 needs a GPU; on CPU use fp32 or bf16")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_backends(device: torch.device) -> None:
    """On CUDA, what timm's train.py sets: cuDNN picks the fastest conv algorithms for the
    shapes it sees, and fp32 matmuls/convs may use TF32 tensor cores. No effect elsewhere.

    The autotuned algorithms are not bitwise deterministic across processes; the data order
    and augmentation stay exact on resume, the float sums may differ in the last bits.
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed: int, rank: int = 0) -> None:
    """Python, NumPy and torch generators from ``seed + rank`` (timm's random_seed)."""
    from timm.utils import random_seed

    random_seed(seed, rank)


def rng_state() -> dict[str, Any]:
    """This process's random number generators (Python, NumPy, torch CPU and CUDA) as plain values
    (tensors, numbers and tuples: a checkpoint keeps them loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned (a checkpoint's lists come back as lists, not tuples)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a distributed job (world_size 1 when it runs alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def slurm_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What torchrun would have set, for a process that srun started without torchrun: RANK, WORLD_SIZE,
    LOCAL_RANK from SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS), SLURM_LOCALID; MASTER_ADDR the first
    host of the step's (or job's) node list, where srun's default block distribution puts task 0, else
    SLURM_LAUNCH_NODE_IPADDR; MASTER_PORT derived from SLURM_JOB_ID, so every task of a job agrees on it
    and two jobs on one node rarely meet. Variables already set win; {} outside srun or under torchrun.
    """
    if "SLURM_PROCID" not in environ or "TORCHELASTIC_RUN_ID" in environ or "RANK" in environ:
        return {}
    tasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")
    if not tasks:
        return {}
    mapped = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": tasks,
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
    }
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    host = first_host(nodes) if nodes else environ.get("SLURM_LAUNCH_NODE_IPADDR")
    if host:
        mapped["MASTER_ADDR"] = host
    job = environ.get("SLURM_JOB_ID", "")
    mapped["MASTER_PORT"] = str(15000 + int(job) % 20000) if job.isdigit() else "29500"
    return {k: v for k, v in mapped.items() if k not in environ}


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,09],cpu1' -> 'gpu03', 'rack[1-2]-n[7,9]' -> 'rack1-n7'."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):  # the first comma outside brackets ends the first entry
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", nodelist[:end].strip())


# the variables timm's world_info_from_env reads, each a whole number (world sizes at least 1)
LAUNCHER_RANKS = ("LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "RANK", "PMI_RANK")
LAUNCHER_RANKS += ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
LAUNCHER_SIZES = ("WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE")


def check_launcher_env(environ: Mapping[str, str]) -> None:
    """A launcher variable that is no whole number (SLURM_NTASKS=abc) is one line naming it, not a ValueError."""
    for name in LAUNCHER_RANKS + LAUNCHER_SIZES:
        if name not in environ:
            continue
        value = environ[name].strip()
        least = 1 if name in LAUNCHER_SIZES else 0
        if not value.isdigit() or int(value) < least:
            raise ConfigError(
                f"the environment variable {name} is {environ[name]!r}, not a whole number from {least}; "
                f"unset it (unset {name}) or launch with torchrun or srun, which set it"
            )


def dist_from_env() -> DistInfo:
    """torchrun's RANK, WORLD_SIZE and LOCAL_RANK (or SLURM's, MPI's: timm's world_info_from_env).

    A process srun started without torchrun gets torchrun's variables from SLURM's first (slurm_env).
    """
    from timm.utils import world_info_from_env

    check_launcher_env(os.environ)  # before mapping SLURM's: the message names the variable the user set
    os.environ.update(slurm_env(os.environ))

    local_rank, rank, world = world_info_from_env()
    if world <= 1:
        return DistInfo()
    if rank >= world:  # the other ranks would wait for this one forever in init_process_group
        raise ConfigError(
            f"this process is rank {rank} of a world of {world} processes (RANK/SLURM_PROCID must be below "
            "WORLD_SIZE/SLURM_NTASKS); launch with torchrun or srun, which set both, or fix the variables you exported"
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def init_distributed(dist: DistInfo, device: torch.device) -> None:
    if not dist.enabled or torch.distributed.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ConfigError(
            f"this is process {dist.rank} of {dist.world_size}, but no MASTER_ADDR/MASTER_PORT says where they meet; "
            "launch with torchrun --nproc-per-node N -m rotnet_cli pretrain ..., or export MASTER_ADDR and MASTER_PORT"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart == "0":
        torch.distributed.init_process_group(backend=backend, rank=dist.rank, world_size=dist.world_size)
        return
    # restarted by torchrun's elastic agent: its store outlives the workers, and the dead attempt's
    # keys (each rank's gloo address) would send this attempt's ranks to processes that are gone
    from datetime import timedelta

    from torch.distributed.rendezvous import _create_c10d_store

    store = _create_c10d_store(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), dist.rank, dist.world_size, timedelta(minutes=30)
    )
    torch.distributed.init_process_group(
        backend=backend,
        rank=dist.rank,
        world_size=dist.world_size,
        store=torch.distributed.PrefixStore(f"rotnet/attempt-{restart}", store),
    )


def shutdown_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# With one process these are no-ops; in a distributed job every rank calls them at the same points.


def barrier(dist: DistInfo) -> None:
    if dist.enabled:
        torch.distributed.barrier()


def gather_objects(obj: Any, dist: DistInfo) -> list[Any]:
    """[rank 0's obj, rank 1's obj, ...] on every rank."""
    if not dist.enabled:
        return [obj]
    gathered: list = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def reduce_int(value: int, op: str, device: torch.device, dist: DistInfo) -> int:
    """The 'min' or 'max' of an integer over all ranks (the value itself with one process)."""
    if not dist.enabled:
        return value
    tensor = torch.tensor(value, device=device, dtype=torch.long)
    torch.distributed.all_reduce(
        tensor, op={"min": torch.distributed.ReduceOp.MIN, "max": torch.distributed.ReduceOp.MAX}[op]
    )
    return int(tensor.item())


def all_reduce_sum(*tensors: torch.Tensor, dist: DistInfo) -> None:
    """Sum each tensor over all ranks, in place."""
    if dist.enabled:
        for t in tensors:
            torch.distributed.all_reduce(t)
