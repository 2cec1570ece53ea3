"""Experiment loggers: a run's figures in the tools people already watch (--logger).

``csv`` (the default: needs nothing), ``tensorboard`` (torch.utils.tensorboard), ``wandb``
(Weights & Biases; offline mode works) and ``mlflow`` (a local sqlite store unless
MLFLOW_TRACKING_URI names another), any combination. Each but csv is an optional extra,
imported only when a run asks for it. They write under RUN/logs/ and receive, from rank 0 only:

- per step (every --log-every steps): train/loss and train/rot_acc (the mean over the steps since
  the last log), train/lr, train/images_per_s, train/data_wait;
- per epoch: epoch/loss, epoch/rot_acc, val/loss, val/rot_acc (and per rotation), knn/stageS and
  linear/stageS (--eval-data), epoch/seconds, epoch/number;
- the config as hyper-parameters (new runs), and the stem filters as an image every epoch.

The x axis is the number of training steps done. A resumed run continues the same logger run
(the W&B and MLflow run ids are kept in the checkpoint; TensorBoard and csv use the same files)
without repeating a step: the loop logs again from its checkpoint on, and each logger drops
what it already holds. TensorBoard purges the events after the checkpoint (its purge_step), csv
cuts its rows there, and MLflow and W&B skip the steps they hold already (resume is exact, so the
values logged again would be the same).
"""

from __future__ import annotations

import csv
import errno
import importlib.util
import io
import json
import math
import os
import secrets
import string
from pathlib import Path
from typing import Any

from . import csvfiles, jsontext, rundir
from .atomicfiles import make_dir, write_text
from .errors import ConfigError, OutputError, RotnetError

# --logger NAME -> (module it imports, the extra that installs it)
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
PROJECT = "rotnet"  # the W&B project and MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say otherwise
CSV_FILE = "scalars.csv"
CSV_HEADER = ["step", "name", "value"]
WANDB_LAST_STEPS = "wandb-last-steps.json"  # W&B cannot tell an offline run how far it got: rotnet notes it


def check_installed(names: tuple[str, ...]) -> None:
    """A missing logger package is one line naming its extra, before anything is written."""
    for name in names:
        if name in NEEDS and importlib.util.find_spec(NEEDS[name][0]) is None:
            raise ConfigError(
                f"--logger {name} needs the {NEEDS[name][0]} package: pip install 'rotnet-cli[{NEEDS[name][1]}]'"
            )


class Logger:
    """One experiment tracker. ``step``: training steps done, the x axis of every figure."""

    name = ""

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def log_image(self, step: int, tag: str, image) -> None:
        """``image``: a PIL RGB image. Loggers without images ignore it."""

    def flush(self) -> None:
        pass

    def resume_state(self) -> dict[str, Any]:
        """What the checkpoint keeps so that a resumed run continues this logger's run."""
        return {}

    def close(self, finished: bool) -> None:
        pass


class Loggers:
    """Every --logger of the run (none on ranks other than 0); the loop calls these at its log points."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log_scalars(step, scalars)

    def log_epoch(self, step: int, row: dict[str, Any], model=None) -> None:
        """An epoch's metrics row (and the stem filters of ``model``, where a logger takes images); then flush,
        so a run watched live shows every finished epoch."""
        if not self.loggers:
            return
        for logger in self.loggers:
            logger.log_scalars(step, epoch_scalars(row))
        if model is not None:
            image = filters_image(model)
            if image is not None:
                for logger in self.loggers:
                    logger.log_image(step, "filters", image)
        for logger in self.loggers:
            logger.flush()

    def flush(self) -> None:
        """Before a checkpoint: what was logged up to it is on disk, so a resume after a kill misses no step."""
        for logger in self.loggers:
            logger.flush()

    def resume_state(self) -> dict[str, dict[str, Any]]:
        return {logger.name: logger.resume_state() for logger in self.loggers if logger.resume_state()}

    def close(self, finished: bool) -> None:
        for logger in self.loggers:
            try:
                logger.close(finished)
            except Exception:  # a tracker that fails to close must not hide why the run ended
                pass


def open_loggers(
    names: tuple[str, ...],
    out: Path,
    hparams: dict[str, Any],
    resume_step: int | None,
    saved: dict[str, dict[str, Any]],
) -> Loggers:
    """The loggers of a run, writing under out/logs. ``resume_step``: the steps done at the checkpoint a
    resumed run continues from (None for a new run); ``saved``: their resume_state() from that checkpoint."""
    folder = make_dir(Path(out) / rundir.LOGS)
    opened: list[Logger] = []
    try:
        for name in names:
            try:
                opened.append(_OPENERS[name](folder, Path(out).name, hparams, resume_step, saved.get(name, {})))
            except OSError as e:  # a read-only or full logs/: the option and the folder, not a traceback
                fix = "make it writable (chmod -R u+w), " if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""
                raise OutputError(
                    f"--logger {name} cannot write in {folder} ({e.strerror or e}); {fix}or give --logger without "
                    f"{name} (--logger none logs nothing but metrics.jsonl)"
                ) from e
    except BaseException:
        Loggers(opened).close(finished=False)
        raise
    return Loggers(opened)


# ----------------------------------------------------------------------------- what is logged


def step_scalars(loss: float, rot_acc: float, lr: float, images_per_s: float, data_wait: float) -> dict[str, float]:
    return {
        "train/loss": loss,
        "train/rot_acc": rot_acc,
        "train/lr": lr,
        "train/images_per_s": images_per_s,
        "train/data_wait": data_wait,
    }


def epoch_scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as flat scalar names (figures an epoch did not measure are left out)."""
    scalars = {
        "epoch/number": row["epoch"],
        "epoch/loss": row.get("loss"),
        "epoch/rot_acc": row.get("rot_acc"),
        "epoch/lr": row.get("lr"),
        "epoch/seconds": row.get("seconds"),
        "val/loss": row.get("val_loss"),
        "val/rot_acc": row.get("val_rot_acc"),
    }
    for angle, acc in (row.get("val_rot_acc_per_rotation") or {}).items():
        scalars[f"val/rot_acc_{angle}"] = acc
    for head, per_stage in (row.get("eval") or {}).items():
        for stage, acc in per_stage.items():
            scalars[f"{head}/stage{stage}"] = acc
    if row.get("eval_seconds") is not None:
        scalars["epoch/eval_seconds"] = row["eval_seconds"]
    return {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def flat_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """The config as the trackers take it: numbers, text and booleans; lists as text; None left out."""
    flat = {}
    for key, value in hparams.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        if value is not None:
            flat[key] = value
    return flat


def filters_image(model):
    """The stem filters of the model (rotnet viz filters' grid) as a PIL image; None for a model without a stem conv."""
    from .viz import filters_picture

    try:
        return filters_picture(model.backbone)
    except RotnetError:
        return None


# ----------------------------------------------------------------------------- the loggers


class CsvLogger(Logger):
    """logs/scalars.csv: one row per scalar (step, name, value), so new names never change the header."""

    name = "csv"

    def __init__(self, folder: Path, run_name: str, hparams: dict, resume_step: int | None, saved: dict):
        self.path = folder / CSV_FILE
        if resume_step is not None and self.path.is_file():  # drop what was logged after the checkpoint
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            if lines and not lines[-1].endswith("\n"):
                lines.pop()  # a row cut by a kill: the resumed run logs its step again
            rows = list(csv.reader(lines))
            # a kill may also leave the file empty (its header unwritten): only whole rows up to the checkpoint stay
            kept = [row for row in rows if len(row) == 3 and row[0].isdigit() and int(row[0]) <= resume_step]
            text = io.StringIO()
            csvfiles.writer(text).writerows([CSV_HEADER, *kept])
            write_text(self.path, text.getvalue())
        new = not self.path.is_file()
        self.file = open(self.path, "a", newline="", encoding="utf-8")
        self.writer = csvfiles.writer(self.file)
        if new:
            self.writer.writerow(CSV_HEADER)
            self.file.flush()

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.writer.writerows((step, name, repr(float(value))) for name, value in scalars.items())

    def flush(self) -> None:
        self.file.flush()

    def close(self, finished: bool) -> None:
        self.file.close()


class TensorBoardLogger(Logger):
    """logs/tensorboard/: event files for `tensorboard --logdir RUN/logs/tensorboard`."""

    name = "tensorboard"

    def __init__(self, folder: Path, run_name: str, hparams: dict, resume_step: int | None, saved: dict):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        # purge_step: TensorBoard hides this folder's events from that step on, which the resumed run logs again
        self.writer = SummaryWriter(
            str(folder / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1
        )
        if resume_step is None:
            flat = {
                k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat_hparams(hparams).items()
            }
            for summary in hparams_summary(flat, {"val/rot_acc": 0.0, "knn/stage1": 0.0}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```\n" + json.dumps(hparams, indent=2, default=str) + "\n```", 0)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def log_image(self, step: int, tag: str, image) -> None:
        import numpy as np

        self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self, finished: bool) -> None:
        self.writer.close()


class WandbLogger(Logger):
    """Weights & Biases under logs/wandb/ (WANDB_MODE=offline works without an account; `wandb sync` uploads).

    W&B resumes an online run by its id. An offline run cannot be resumed (W&B starts a new offline
    folder with the same id, which `wandb sync` uploads to the same run), so rotnet notes the last step
    it gave W&B of every scalar in logs/wandb-last-steps.json and does not give it those steps again.
    """

    name = "wandb"

    def __init__(self, folder: Path, run_name: str, hparams: dict, resume_step: int | None, saved: dict):
        import wandb

        self.wandb = wandb
        self.mark = folder / WANDB_LAST_STEPS
        self.run_id = saved.get("id") or "".join(
            secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8)
        )
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=run_name,
            id=self.run_id,
            resume="allow",
            dir=str(folder),
            config=flat_hparams(hparams),
            settings=wandb.Settings(console="off", silent=True),  # rotnet's own output stays as it is
        )
        marks = _read_json(self.mark) if resume_step is not None else {}
        self.last_steps: dict[str, int] = marks.get(self.run_id, {}) if isinstance(marks.get(self.run_id), dict) else {}

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        new = {name: value for name, value in scalars.items() if step > self.last_steps.get(name, -1)}
        if new:
            self.run.log(new, step=step)
            self.last_steps.update(dict.fromkeys(new, step))
            _replace_json(self.mark, {self.run_id: self.last_steps})

    def log_image(self, step: int, tag: str, image) -> None:
        if step > self.last_steps.get(tag, -1):
            self.run.log({tag: self.wandb.Image(image)}, step=step)
            self.last_steps[tag] = step
            _replace_json(self.mark, {self.run_id: self.last_steps})

    def resume_state(self) -> dict[str, Any]:
        return {"id": self.run_id}

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class MlflowLogger(Logger):
    """MLflow: a sqlite store in logs/mlflow.db unless MLFLOW_TRACKING_URI names another (`mlflow ui
    --backend-store-uri sqlite:///RUN/logs/mlflow.db` shows it); the experiment is MLFLOW_EXPERIMENT_NAME or rotnet."""

    name = "mlflow"

    def __init__(self, folder: Path, run_name: str, hparams: dict, resume_step: int | None, saved: dict):
        import logging

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines about creating tables are not rotnet's
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(folder / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else self.client.create_experiment(
                name,
                artifact_location=None
                if os.environ.get("MLFLOW_TRACKING_URI")
                else (folder / "mlflow-artifacts").resolve().as_uri(),
            )
        )
        self.run_id = saved.get("id")
        self.last_steps: dict[str, int] = {}  # scalar -> the last step the store holds (a resumed run skips up to it)
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            for key in self.client.get_run(self.run_id).data.metrics:
                self.last_steps[key] = max(m.step for m in self.client.get_metric_history(self.run_id, key))
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            params = [Param(k, str(v)[:500]) for k, v in flat_hparams(hparams).items()]
            self.client.log_batch(self.run_id, params=params)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        new = [Metric(k, v, now, step) for k, v in scalars.items() if step > self.last_steps.get(k, -1)]
        if new:
            self.client.log_batch(self.run_id, metrics=new)

    def log_image(self, step: int, tag: str, image) -> None:
        if step > self.last_steps.get("epoch/number", -1):  # logged after its epoch's scalars
            self.client.log_image(self.run_id, image, key=tag, step=step)

    def resume_state(self) -> dict[str, Any]:
        return {"id": self.run_id}

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


def _replace_json(path: Path, record: dict) -> None:
    """Write a small JSON file by rename (whole after a kill; no fsync: it is a note, not a result)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    try:
        record = jsontext.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


_OPENERS = {"csv": CsvLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MlflowLogger}

__all__ = ["Logger", "Loggers", "open_loggers", "check_installed", "step_scalars", "epoch_scalars", "NEEDS"]
