"""RotNet pretraining: the training loop, read top to bottom.

``pretrain(config, progress)`` builds everything from a validated PretrainConfig, trains
backbone + rotation head on the rotation pretext task, writes the run directory
(config.json, metrics.jsonl, checkpoint.pt, model.safetensors) and returns a result.
It never prints: progress goes through the ``progress(kind, info)`` callback.

Exact resume: the data order is a pure function of (seed, epoch), the augmentation and
rotation randomness of a step a pure function of (seed, step, rank), and the checkpoint
holds model, optimizer, scaler, the epoch's per-step sums so far and the global RNG state (dropout,
drop-path). So a resumed run replays the same computation as one never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import data as data_lib
from ._version import __version__
from .checkpoint import (
    load_checkpoint, make_dir, remove_stale_temp_files, save_checkpoint, save_safetensors, write_json, write_text,
)
from .config import RESUME_FREE_OPTIONS, PretrainConfig, format_rotations
from .errors import ConfigError, DataError, Interrupted, NonFiniteLossError, OutputError
from .models import RUN_CHECKPOINT, RUN_CONFIG, RUN_WEIGHTS, RotNet, create_backbone, data_config, load_weights
from .rotations import make_rotation_batch, rotate_all
from .runtime import (
    DistInfo, autocast, configure_backends, describe_device, dist_from_env, init_distributed, resolve_device, resolve_precision,
    seed_everything, shutdown_distributed,
)

METRICS = "metrics.jsonl"
NO_STEP = 2**62  # "no such step" for the first non-finite loss (a MIN over ranks keeps real steps)
RUN_FILES = (RUN_CONFIG, METRICS, RUN_CHECKPOINT, RUN_WEIGHTS, "probe.json")
RUN_ENTRIES = (*RUN_FILES, "export")  # what --overwrite replaces; anything else in the folder is the user's
REPLACED = ".rotnet-replaced"  # an overwritten run's files, until the new run's first checkpoint
FUSED_OPTIMIZER_DEVICES = ("cuda", "cpu")  # where torch has fused SGD and AdamW kernels

Progress = Callable[[str, dict], None]


@dataclass
class PretrainResult:
    out_dir: Path
    model: str
    device: str
    epochs_done: int
    history: list[dict] = field(default_factory=list)
    val_rot_acc_per_rotation: dict[str, float] = field(default_factory=dict)
    skipped_files: list[str] = field(default_factory=list)
    resumed_from: dict | None = None

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir), "model": self.model, "device": self.device, "epochs_done": self.epochs_done,
            "final": self.final, "val_rot_acc_per_rotation": self.val_rot_acc_per_rotation,
            "skipped_files": len(self.skipped_files), "resumed_from": self.resumed_from,
        }


class EpochSums:
    """One epoch's loss sums and correct counts, one slot per step, kept on the device.

    A step writes its slot (two small kernels, no host read); the host reads the slots only
    at log, checkpoint and epoch-end points. Per-step slots also tell which step first went
    NaN, and a resumed epoch restores them exactly, so its totals add up bitwise the same.
    """

    def __init__(self, steps: int, device: torch.device, saved: dict | None = None):
        self.loss = torch.zeros(steps, device=device)  # (steps,) sum of the step's per-copy losses
        self.correct = torch.zeros(steps, device=device, dtype=torch.long)  # (steps,) right predictions
        self.seen = 0  # rotated copies so far (a host number: batch sizes are known without the device)
        self.done = 0  # steps written
        if saved:
            self.done, self.seen = len(saved["loss"]), int(saved["seen"])
            self.loss[: self.done] = saved["loss"].to(device)
            self.correct[: self.done] = saved["correct"].to(device)

    def add(self, step: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss[step] = loss.detach() * len(labels)
        self.correct[step] = (logits.detach().argmax(1) == labels).sum()
        self.seen += len(labels)
        self.done = step + 1

    def first_nonfinite_step(self) -> int | None:
        """The first step of this epoch whose loss was NaN or inf (reads the device)."""
        bad = (~torch.isfinite(self.loss[: self.done])).nonzero()
        return int(bad[0]) if len(bad) else None

    def totals(self) -> torch.Tensor:
        """(3,) float on the device: loss sum, correct count, copies seen."""
        return torch.stack([self.loss.sum(), self.correct.sum().float(), torch.tensor(float(self.seen), device=self.loss.device)])

    def state(self) -> dict:
        """What a checkpoint keeps to continue this epoch exactly (reads the device)."""
        return {"loss": self.loss[: self.done].cpu(), "correct": self.correct[: self.done].cpu(), "seen": self.seen}


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the rotation classes (a module-level function so tests can poison it)."""
    return F.cross_entropy(logits.float(), labels)


def lr_at(step: int, cfg: PretrainConfig, steps_per_epoch: int) -> float:
    """Learning rate of a global step: linear warm-up, then cosine or step decay (per step)."""
    base = cfg.resolved_lr
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return base * (step + 1) / warmup
    if cfg.schedule == "step":
        epoch = step // steps_per_epoch
        return base * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """timm's optimizer factory (SGD is Nesterov; no weight decay on norms and biases), with
    torch's fused kernels where the device has them: one kernel per step instead of several
    per parameter group (a resnet18 SGD step on 2 CPU cores: 7.2 -> 2.9 ms), and under fp16
    the GradScaler hands the overflow check to the kernel instead of reading it on the host."""
    import timm.optim

    return timm.optim.create_optimizer_v2(
        model, opt=cfg.optimizer, lr=cfg.resolved_lr, weight_decay=cfg.resolved_weight_decay,
        **({"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}),
        **({"fused": True} if device.type in FUSED_OPTIMIZER_DEVICES else {}),
    )


def step_generator(device: torch.device, seed: int, step: int, rank: int) -> torch.Generator:
    """The randomness of one step (crop, flip, sampled rotation) as a function of its index."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 64 + rank)


# ----------------------------------------------------------------------------- run directory


def resume_config(run_dir: str | Path, overrides: dict[str, Any]) -> PretrainConfig:
    """The saved config of ``run_dir``, with ``overrides`` that must not contradict it."""
    run_dir = Path(run_dir)
    if overrides.get("overwrite"):
        raise ConfigError("--overwrite and --resume contradict each other: choose one")
    if not (run_dir / RUN_CONFIG).is_file():
        raise ConfigError(f"--resume {run_dir}: no {RUN_CONFIG} there, so it is not a rotnet run; give the run directory to continue")
    if not (run_dir / RUN_CHECKPOINT).is_file():
        raise ConfigError(
            f"--resume {run_dir}: the run stopped before its first checkpoint; start it again with --out {run_dir} --overwrite"
        )
    try:
        saved = json.loads((run_dir / RUN_CONFIG).read_text())["config"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ConfigError(f"--resume {run_dir}: {RUN_CONFIG} is unreadable ({e}); start a new run instead") from None
    base = PretrainConfig.from_dict(saved)
    given = PretrainConfig.from_dict({**base.to_dict(), **overrides})
    clashes = [
        f"--{k.replace('_', '-')} {_show(getattr(given, k))} (the run used {_show(getattr(base, k))})"
        for k in overrides
        if k not in RESUME_FREE_OPTIONS and getattr(given, k) != getattr(base, k)
    ]
    if clashes:
        raise ConfigError(f"--resume {run_dir}: options contradict the saved run: {'; '.join(clashes)}; drop them or start a new run")
    return PretrainConfig.from_dict({**given.to_dict(), "out": str(run_dir), "resume": True, "overwrite": False})


def _show(v: Any) -> str:
    return format_rotations(v) if isinstance(v, tuple) and v and isinstance(v[0], float) else str(v)


def default_out_dir(cfg: PretrainConfig) -> Path:
    safe = cfg.model.replace("/", "-").replace(":", "-")
    return Path("runs") / f"{safe}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def check_out_dir(cfg: PretrainConfig) -> Path:
    """Refuse a non-empty --out unless --resume or --overwrite; nothing is changed here."""
    out = Path(cfg.out) if cfg.out else default_out_dir(cfg)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; choose a folder name")
    if cfg.resume:
        return out
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise OutputError(f"{out} exists and is not empty; pass --resume {out} to continue it, --overwrite to replace it, or another --out")
    return out


class ReplacedRun:
    """--overwrite that never loses the old run to a new one that fails.

    When the new run starts, the old run's files (rotnet's own; anything else the user put
    there stays) move into ``out/.rotnet-replaced/``. They are deleted once the new run has
    written its first checkpoint, and moved back if it fails before that. A run killed in
    between leaves them in that folder.
    """

    def __init__(self, out: Path):
        self.out, self.held, self.active = out, out / REPLACED, False

    def set_aside(self) -> None:
        shutil.rmtree(self.held, ignore_errors=True)  # from a run killed before its first checkpoint
        names = [name for name in RUN_ENTRIES if (self.out / name).exists()]
        if names:
            self.held.mkdir()
            for name in names:
                os.replace(self.out / name, self.held / name)
        self.active = bool(names)

    def discard(self) -> None:
        if self.active:
            shutil.rmtree(self.held, ignore_errors=True)
            self.active = False

    def restore(self) -> None:
        """Put the old run back (best effort: on an error its files stay in the folder)."""
        if not self.active:
            return
        try:
            for name in RUN_ENTRIES:  # the failed run's
                path = self.out / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            for path in self.held.iterdir():
                os.replace(path, self.out / path.name)
            self.held.rmdir()
            self.active = False
        except OSError:
            pass


def _prepare_out_dir(out: Path, replaced: ReplacedRun | None) -> None:
    make_dir(out)
    probe = out / ".rotnet-write-test"  # before --overwrite moves anything: a folder we cannot write stays as it is
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write into {out}: {e.strerror}; choose another --out") from None
    if replaced is not None:
        replaced.set_aside()


# ----------------------------------------------------------------------------- the loop


def pretrain(
    cfg: PretrainConfig,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PretrainResult:
    """Run RotNet pretraining as configured; see the module docstring.

    ``should_stop`` is polled at step boundaries (Ctrl-C): the loop then writes a checkpoint
    and raises Interrupted. Under torchrun only rank 0 reports progress and writes files.
    """
    dist = dist_from_env()
    emit = (progress if dist.is_main else None) or (lambda kind, info: None)
    stop_requested = should_stop or (lambda: False)
    device = resolve_device(cfg.device, dist.local_rank)
    precision = resolve_precision(cfg.precision, device)
    configure_backends(device)
    if dist.enabled and cfg.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} must divide by the {dist.world_size} processes of torchrun")
    out = check_out_dir(cfg)
    resume_state = load_checkpoint(out / RUN_CHECKPOINT) if cfg.resume else None
    replaced = ReplacedRun(out) if cfg.overwrite and dist.is_main else None
    init_distributed(dist, device)
    try:
        result = _train(cfg, dist, device, precision, out, resume_state, emit, stop_requested, replaced)
        _barrier(dist)  # rank 0 writes the last files: the others wait rather than tear the group down under it
        return result
    except BaseException as e:
        if isinstance(e, (Interrupted, NonFiniteLossError)):
            _barrier(dist)  # every rank stops at the same step (they agreed on it), so they leave together too
        if replaced is not None:
            replaced.restore()  # the new run failed before its first checkpoint: the old one comes back
        raise
    finally:
        shutdown_distributed()


def _train(
    cfg, dist: DistInfo, device, precision, out: Path, resume_state, emit: Progress, stop_requested,
    replaced: ReplacedRun | None,
) -> PretrainResult:
    seed_everything(cfg.seed)  # the same initial weights on every rank
    emit("device", {"device": describe_device(device), "precision": precision, "world_size": dist.world_size})

    # -- model: a headless timm backbone + Linear(num_features, R) rotation head
    R = cfg.num_rotations
    img_size = cfg.img_size or data_lib.native_size(cfg.data)
    backbone = create_backbone(cfg.model, img_size=img_size)
    dcfg = data_config(backbone)
    img_size = img_size or int(dcfg["input_size"][-1])
    mean, std = tuple(dcfg["mean"]), tuple(dcfg["std"])
    model = RotNet(backbone, R)
    if cfg.init and resume_state is None:
        _load_init(model, cfg, img_size)
    seed_everything(cfg.seed + dist.rank)  # from here on each rank draws its own dropout/drop-path noise

    # -- data: uint8 (N, 3, S, S) train and validation sets
    source = data_lib.open_source(
        cfg.data, img_size, download=cfg.download, data_dir=cfg.data_dir, cache=cfg.cache, workers=cfg.workers,
        strict=cfg.strict_data, progress=lambda done, total: emit("decode", {"done": done, "total": total}),
    )
    train_set, val_set = source.train, source.val
    if val_set is None and cfg.val_split > 0:
        train_idx, val_idx = data_lib.split_indices(len(train_set), cfg.val_split, cfg.seed)
        train_set, val_set = train_set.subset(train_idx), train_set.subset(val_idx)
    skipped = _skipped_files(train_set, val_set)
    if skipped:
        emit("warning", {"message": data_lib.warn_skipped(skipped)})
    per_rank_batch = cfg.batch_size // dist.world_size
    images_per_rank = len(train_set) // dist.world_size
    if images_per_rank < per_rank_batch:
        raise DataError(
            f"the training set has {len(train_set)} images, fewer than one batch of {cfg.batch_size}; "
            f"lower --batch-size to at most {max(dist.world_size, images_per_rank * dist.world_size)}"
        )
    if cfg.cache == "device" or (cfg.cache == "auto" and device.type == "cuda" and train_set.in_memory and _fits_on(device, train_set)):
        train_set = _on_device(train_set, device)
        if val_set is not None and val_set.in_memory:
            val_set = _on_device(val_set, device)
    steps_per_epoch = images_per_rank // per_rank_batch
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    val_images = len(val_set) if val_set is not None else 0
    padding = max(1, img_size // 8)  # 4 px at 32 px, the paper's CIFAR crop
    augment, why = (cfg.augment, "asked for") if cfg.augment != "auto" else data_lib.auto_augment(cfg.data, train_set)
    emit("message", {"message": f"augmentation: {augment} ({why}){'' if augment == 'none' else f'; crop padding {padding} px'}"})

    # -- optimizer
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # -- resume: everything that decides the next step
    start_epoch, start_step, history, partial = 0, 0, [], None
    if resume_state is not None:
        start_epoch, start_step = int(resume_state["epoch"]), int(resume_state["step"])
        _check_resumable(resume_state, out, len(train_set), dist, start_step)
        _restore(resume_state, model, optimizer, scaler, dist, out)
        history = list(resume_state.get("history", []))
        partial = resume_state["partial"][dist.rank] if start_step else None
        emit("resume", {"epoch": start_epoch, "step": start_step})

    train_model = model
    if dist.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model)

    _barrier(dist)  # every rank has checked --out and read the checkpoint before rank 0 writes there
    if dist.is_main:
        if resume_state is None:
            _prepare_out_dir(out, replaced)
            write_json(out / RUN_CONFIG, _run_config(cfg, out, img_size, mean, std, device, precision, dist, len(train_set), val_images, augment))
        else:
            remove_stale_temp_files(out, RUN_FILES)  # left by a process killed while writing
        _write_metrics(out, history)
    emit("start", {
        "out_dir": str(out), "model": cfg.model, "img_size": img_size, "train_images": len(train_set),
        "val_images": val_images, "steps_per_epoch": steps_per_epoch,
        "epochs": cfg.epochs, "start_epoch": start_epoch, "batch_images": per_rank_batch * dist.world_size * (R if cfg.copies == "all" else 1),
    })

    saved_at = (start_epoch, start_step) if resume_state is not None else None

    def check_finite(epoch: int, sums: EpochSums) -> None:
        """Stop before anything is saved from a diverged model; all ranks agree on the step."""
        first_bad = sums.first_nonfinite_step()
        bad = _reduce_over_ranks(NO_STEP if first_bad is None else epoch * steps_per_epoch + first_bad, "min", device, dist)
        if bad == NO_STEP:
            return
        kept = f"the last good checkpoint {out / RUN_CHECKPOINT} (epoch {saved_at[0] + 1}, step {saved_at[1]}) is kept" if saved_at else "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"the loss became NaN or infinite at step {bad + 1} (epoch {bad // steps_per_epoch + 1}, step "
            f"{bad % steps_per_epoch + 1}); {kept}; lower --lr, add --warmup-epochs or use --precision fp32"
        )

    def checkpoint(epoch: int, step: int, sums: EpochSums | None) -> None:
        """Everything needed to continue at (epoch, step); rank 0 writes it atomically.

        Mid-epoch (``sums`` given) the epoch's sums so far go with it, once they are known to
        be finite; they and the RNG state differ per rank, so every rank sends its own. At an
        epoch's end the caller has checked the finished epoch already.
        """
        nonlocal saved_at
        if sums is not None:
            check_finite(epoch, sums)
        per_rank = _gather({"partial": sums.state() if sums is not None else None, "rng": _rng_state()}, dist)
        if dist.is_main:
            save_checkpoint(out / RUN_CHECKPOINT, {
                "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "history": history,
                "img_size": img_size, "mean": list(mean), "std": list(std), "train_images": len(train_set),
                "world_size": dist.world_size, "partial": [r["partial"] for r in per_rank], "rng": [r["rng"] for r in per_rank],
            })
            if replaced is not None:
                replaced.discard()  # the new run can now be resumed: the old one is gone for good
        saved_at = (epoch, step)

    def stop_now(sync_point: bool) -> bool:
        """Ctrl-C seen (on any rank; ranks compare only at sync points so they stop together)."""
        if not dist.enabled:
            return stop_requested()
        return sync_point and bool(_reduce_over_ranks(int(stop_requested()), "max", device, dist))

    for epoch in range(start_epoch, cfg.epochs):
        # this rank's share of the epoch's order, dealt round-robin as DistributedSampler does
        # (rank r gets r, r+W, ...), so the ranks' k-th batches together are the k-th global batch
        order = data_lib.epoch_order(len(train_set), cfg.seed, epoch)
        order = order[: images_per_rank * dist.world_size][dist.rank :: dist.world_size]  # (images_per_rank,)
        first = start_step if epoch == start_epoch else 0
        sums = EpochSums(steps_per_epoch, device, partial if first else None)
        seen_before = sums.seen  # a resumed epoch's copies from before: not part of this speed
        train_model.train()
        t0 = time.perf_counter()
        waited = 0.0
        batches = data_lib.iterate_batches(
            train_set, order, per_rank_batch, device, drop_last=True, workers=cfg.workers, start_batch=first,
            strict=cfg.strict_data, with_labels=False,
        )
        step = first
        while step < steps_per_epoch:
            t_wait = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - t_wait
            if batch is None:
                break
            global_step = epoch * steps_per_epoch + step
            lr = lr_at(global_step, cfg, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # on-device: crop+flip on uint8, normalise, then the rotated copies and their labels
            gen = step_generator(device, cfg.seed, global_step, dist.rank)
            x = data_lib.random_crop_flip(batch.images, padding, gen, flip=augment == "crop+flip") if augment != "none" else batch.images
            x = data_lib.normalize(x, mean, std)  # (B, 3, S, S) float32
            x, y = make_rotation_batch(x, cfg.rotations, cfg.copies, gen)  # (R*B or B, 3, S, S), labels
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)

            with autocast(device, precision):
                logits = train_model(x)  # (R*B, R)
            loss = rotation_loss(logits, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # fp16: skips the update when the scaled gradients overflowed
            scaler.update()

            # the sums stay on the device; the host reads them every log_every steps only
            sums.add(step, loss, logits, y)
            step += 1
            log_now = step % cfg.log_every == 0 or step == steps_per_epoch
            if log_now:
                check_finite(epoch, sums)
                loss_total, correct_total, seen_total = sums.totals().tolist()
                elapsed = time.perf_counter() - t0
                emit("step", {
                    "epoch": epoch + 1, "step": step, "steps": steps_per_epoch, "loss": loss_total / seen_total,
                    "rot_acc": correct_total / seen_total, "lr": lr,
                    "images_per_s": (seen_total - seen_before) * dist.world_size / max(elapsed, 1e-9),
                    "data_wait": waited / max(elapsed, 1e-9),
                })
            if step == steps_per_epoch:
                break  # the epoch-end checkpoint follows (a Ctrl-C now is handled after it)
            if cfg.save_every and (global_step + 1) % cfg.save_every == 0:
                checkpoint(epoch, step, sums)
            if stop_now(sync_point=log_now):
                if saved_at != (epoch, step):
                    checkpoint(epoch, step, sums)
                raise Interrupted(f"stopped at epoch {epoch + 1}, step {step}; checkpoint saved; resume with: rotnet pretrain --resume {out}")

        # -- end of epoch: reduce across ranks, validate, log, checkpoint
        check_finite(epoch, sums)
        seconds = time.perf_counter() - t0
        totals = sums.totals()
        if dist.enabled:
            torch.distributed.all_reduce(totals)
        loss_total, correct_total, seen_total = totals.tolist()
        val = _validate(train_model, val_set, cfg, mean, std, device, precision, per_rank_batch, dist) if val_images else {}
        row = {
            "epoch": epoch + 1,
            "loss": loss_total / seen_total,
            "rot_acc": correct_total / seen_total,
            "val_loss": val.get("loss"),
            "val_rot_acc": val.get("acc"),
            "lr": lr_at(epoch * steps_per_epoch + steps_per_epoch - 1, cfg, steps_per_epoch),
            "images_per_s": (seen_total - seen_before * dist.world_size) / max(seconds, 1e-9),
            "seconds": seconds,
            "data_wait": waited / max(seconds, 1e-9),
            "val_rot_acc_per_rotation": val.get("per_rotation", {}),
        }
        history.append(row)
        checkpoint(epoch + 1, 0, None)
        if dist.is_main:  # after the checkpoint: a kill between the two leaves metrics a row short, never ahead
            _write_metrics(out, history)
        emit("epoch", row)
        if stop_now(sync_point=True) and epoch + 1 < cfg.epochs:
            raise Interrupted(f"stopped after epoch {epoch + 1}; checkpoint saved; resume with: rotnet pretrain --resume {out}")

    finished_before = resume_state is not None and start_epoch >= cfg.epochs and (out / RUN_WEIGHTS).is_file()
    if finished_before:
        emit("message", {"message": f"{out} had already finished (epoch {cfg.epochs} of {cfg.epochs}); nothing to train, nothing changed"})
    elif dist.is_main:  # a finished run resumed again (a scheduler's requeue) keeps its files as they are
        save_safetensors(out / RUN_WEIGHTS, model.state_dict(), {
            "format": "rotnet", "rotnet_version": __version__, "model": cfg.model,
            "rotations": json.dumps(list(cfg.rotations)), "img_size": json.dumps(img_size),
            "mean": json.dumps(list(mean)), "std": json.dumps(list(std)),
            "num_features": json.dumps(model.backbone.num_features), "data": cfg.data,
            "epochs": json.dumps(cfg.epochs),
        })
    return PretrainResult(
        out_dir=out, model=cfg.model, device=describe_device(device), epochs_done=len(history), history=history,
        val_rot_acc_per_rotation=history[-1]["val_rot_acc_per_rotation"] if history else {},
        skipped_files=_skipped_files(train_set, val_set),  # streamed folders find unreadable files while training
        resumed_from={"epoch": start_epoch, "step": start_step} if resume_state is not None else None,
    )


@torch.no_grad()
def _validate(model, val_set, cfg: PretrainConfig, mean, std, device, precision, batch_size, dist: DistInfo) -> dict:
    """Rotation accuracy on every rotated copy of the held-out images (no augmentation)."""
    model.eval()
    R = cfg.num_rotations
    order = torch.arange(len(val_set))[dist.rank :: dist.world_size]
    correct = torch.zeros(R, device=device)
    count = torch.zeros(R, device=device)
    loss_sum = torch.zeros((), device=device)
    for batch in data_lib.iterate_batches(val_set, order, batch_size, device, drop_last=False, workers=cfg.workers, with_labels=False):
        x, y = rotate_all(data_lib.normalize(batch.images, mean, std), cfg.rotations)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += torch.bincount(y, weights=(logits.argmax(1) == y).float(), minlength=R)
        count += torch.bincount(y, minlength=R).float()
    if dist.enabled:
        for t in (correct, count, loss_sum):
            torch.distributed.all_reduce(t)
    total = count.sum().item()
    if total == 0:
        return {}
    per_rotation = {f"{a:g}": (correct[i] / count[i]).item() for i, a in enumerate(cfg.rotations)}
    return {"loss": loss_sum.item() / total, "acc": correct.sum().item() / total, "per_rotation": per_rotation}


def _skipped_files(train_set, val_set) -> list[str]:
    """The unreadable files of both sets, once each (the sets keep them as they find them)."""
    return list(dict.fromkeys(train_set.skipped + (val_set.skipped if val_set is not None else [])))


def _write_metrics(out: Path, history: list[dict]) -> None:
    text = "".join(json.dumps(row) + "\n" for row in history)
    path = out / METRICS
    if path.is_file() and path.read_text() == text:
        return  # a resume with nothing new to say leaves the file as it is
    write_text(path, text)


def _fits_on(device: torch.device, images) -> bool:
    """Keep a uint8 dataset on the GPU when it takes under a quarter of the free memory."""
    free, _ = torch.cuda.mem_get_info(device)
    return images.images.numel() < free // 4


def _on_device(images, device):
    images.images = images.images.to(device)
    return images


def _load_init(model: RotNet, cfg: PretrainConfig, img_size: int) -> None:
    """--init: start from existing weights (backbone; the head too when the rotations match)."""
    loaded = load_weights(cfg.init, img_size=img_size)  # timm:/random: models are built for this run's size
    try:
        model.backbone.load_state_dict(loaded.backbone.state_dict(), strict=True)
    except RuntimeError:
        raise ConfigError(
            f"--init {cfg.init} holds {loaded.model_name} weights for {loaded.img_size} px, which do not fit "
            f"--model {cfg.model} at {img_size} px; pass --model {loaded.model_name} --img-size {loaded.img_size}, or other --init weights"
        ) from None
    if loaded.head is not None and loaded.rotations == cfg.rotations:
        model.head.load_state_dict(loaded.head.state_dict())


def _rng_state() -> dict:
    """This process's random number generators (Python, NumPy, torch CPU and CUDA) as plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_resumable(state: dict, out: Path, train_images: int, dist: DistInfo, step: int) -> None:
    """Refuse a resume that could not continue the same computation."""
    saved_images = state.get("train_images")
    if saved_images is not None and saved_images != train_images:
        raise DataError(
            f"--resume {out}: the training data changed ({saved_images} images when the run started, {train_images} now); "
            "restore the data or start a new run"
        )
    if step and any(p is not None and "loss" not in p for p in state.get("partial", [])):
        raise ConfigError(
            f"--resume {out}: this checkpoint is from the middle of an epoch, written by an older rotnet development "
            "version in another form; resume it with that version, or start a new run"
        )
    saved_world = int(state.get("world_size", 1))
    if step and saved_world != dist.world_size:
        raise ConfigError(
            f"--resume {out}: this checkpoint is from the middle of an epoch of a run on {saved_world} process(es); "
            f"resume it with {saved_world} (here: {dist.world_size})"
        )


def _restore(state: dict, model, optimizer, scaler, dist: DistInfo, out: Path) -> None:
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise ConfigError(f"{out / RUN_CHECKPOINT} does not fit this run's model or optimizer: {str(e).splitlines()[0][:160]}") from None
    rng = state.get("rng", [])
    if dist.rank < len(rng):  # a run resumed on more processes than it had: new ranks keep their fresh seeds
        _set_rng_state(rng[dist.rank])


# ----------------------------------------------------------------------------- torchrun helpers
# With one process these are no-ops; under torchrun every rank calls them at the same points.


def _barrier(dist: DistInfo) -> None:
    if dist.enabled:
        torch.distributed.barrier()


def _gather(obj: dict, dist: DistInfo) -> list[dict]:
    """[rank 0's obj, rank 1's obj, ...] on every rank."""
    if not dist.enabled:
        return [obj]
    gathered: list = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _reduce_over_ranks(value: int, op: str, device: torch.device, dist: DistInfo) -> int:
    """The 'min' or 'max' of an integer over all ranks (the value itself with one process)."""
    if not dist.enabled:
        return value
    tensor = torch.tensor(value, device=device, dtype=torch.long)
    torch.distributed.all_reduce(tensor, op={"min": torch.distributed.ReduceOp.MIN, "max": torch.distributed.ReduceOp.MAX}[op])
    return int(tensor.item())


def _run_config(cfg, out, img_size, mean, std, device, precision, dist, n_train, n_val, augment) -> dict:
    import timm
    import torchvision

    return {
        "config": cfg.to_dict(),
        "resolved": {
            "out": str(out), "img_size": img_size, "mean": list(mean), "std": list(std), "lr": cfg.resolved_lr,
            "weight_decay": cfg.resolved_weight_decay, "augment": augment, "device": str(device), "precision": precision,
            "world_size": dist.world_size, "train_images": n_train, "val_images": n_val,
        },
        "versions": {
            "rotnet": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "python": platform.python_version(),
        },
        "command": sys.argv,
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
