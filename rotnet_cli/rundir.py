"""The run directory and the exported folder: the contract between commands, in one place.

Every fact about the folders rotnet writes lives here: file names, how each file is read
(validated like user input: a DataError or WeightsError that names the file), how it is
written (atomically, through checkpoint.py), the safetensors metadata with its format
marker, and the output-folder policy that every command shares::

    runs/NAME/                      rotnet pretrain
      config.json                   CONFIG: the config, what it resolved to, versions, command, start time
      metrics.jsonl                 METRICS: one JSON object per finished epoch
      checkpoint.pt                 CHECKPOINT: the full training state (weights_only loadable)
      model.safetensors             WEIGHTS: backbone.* and head.*; marker "run"
      probe.json                    PROBE: what rotnet probe measured, one result per setting
      checkpoints/                  CHECKPOINTS: kept weights (--keep-checkpoints, --best-metric), marker "run"
        epoch-12.safetensors        the weights after epoch 12; load as RUN:epoch-12 or RUN/checkpoints/epoch-12
        best.safetensors            the best epoch by --best-metric; load as RUN:best
      logs/                         LOGS: what --logger writes (scalars.csv, tensorboard/, mlruns/, wandb/)
    EXPORT/                         rotnet export (timm's local-dir / hub layout)
      model.safetensors             the backbone alone, timm's keys; marker "export"
      config.json                   timm's save_config_for_hf
      README.md                     the model card
      rotation_head.safetensors     with --with-head: weight, bias; marker "rotation-head"

Both folders name their weights ``model.safetensors`` (timm and the hub expect that name
in an export), so what a file is comes from the ``rotnet_format`` key of its metadata,
never from the files around it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import re
from .shell import shell_join, shell_quote
import shutil
import socket
import stat
import sys
import tempfile
import time
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

from . import jsontext
from ._version import __version__
from .checkpoint import (
    current_umask,
    encode_text,
    load_checkpoint,
    make_dir,
    printable,
    remove_stale_temp_files,
    safetensors_metadata,
    save_checkpoint,
    save_safetensors,
    write_json,
    write_text,
)
from .config import FILE_FIX, MAX_IMG_SIZE, MIN_IMG_SIZE, PretrainConfig, parse_rotations
from .errors import ConfigError, DataError, OutputError, WeightsError

# -- file names
CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"
PROBE = "probe.json"
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_HEAD = "rotation_head.safetensors"
EXPORT_ONNX = "model.onnx"  # with --format onnx (see onnx.py)
MODEL_CARD = "README.md"
EXPORT_DIR = "export"  # the default place of a run's export (rotnet export RUN --out RUN/export)
CHECKPOINTS = "checkpoints"
LOGS = "logs"
BEST = "best"  # checkpoints/best.safetensors
LOG_ENTRIES = (
    "scalars.csv",
    "tensorboard",
    "wandb",
    "mlflow.db",
    "mlflow-artifacts",
)  # what the loggers write in logs/
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, WEIGHTS, PROBE)
RUN_ENTRIES = (
    *RUN_FILES,
    EXPORT_DIR,
    CHECKPOINTS,
    LOGS,
)  # what --overwrite replaces; anything else in the folder is the user's
EXPORT_FILES = (EXPORT_WEIGHTS, EXPORT_CONFIG, MODEL_CARD, EXPORT_HEAD, EXPORT_ONNX)
PROBE_FORMAT = "rotnet-probe-results"  # probe.json: {"format": PROBE_FORMAT, "results": [one per setting]}
# an overwritten run's files while the new run has no checkpoint; the folder's name says how far the move got
REPLACING, REPLACED, RESTORING = ".rotnet-replacing", ".rotnet-replaced", ".rotnet-restoring"
LOCK = ".rotnet-lock"  # the OS lock of a run directory (the file names the holder)
PROBE_SAVE_WAIT_S = 10.0  # a probe saving waits this long for another probe's save (milliseconds), not for a run
PICTURE_SOFTWARE = "rotnet"  # PNG "Software" text of the pictures rotnet draws: how --overwrite knows its own

# -- safetensors metadata: str -> str. "format": "pt" is what the Hugging Face loaders expect
# of a PyTorch file; rotnet's own marker says which of its files this is.
FORMAT_KEY = "rotnet_format"
RUN_FORMAT = "run"  # a run's model.safetensors: backbone.* + head.*
EXPORT_FORMAT = "export"  # an export's model.safetensors: the backbone's own keys
HEAD_FORMAT = "rotation-head"  # an export's rotation_head.safetensors
FORMATS = (RUN_FORMAT, EXPORT_FORMAT, HEAD_FORMAT)
TEXT_FIELDS = (
    "format",
    FORMAT_KEY,
    "rotnet_version",
    "model",
    "source",
    "data",
    "dtype",
)  # stored as they are; the rest as JSON


def plain_text(text: str) -> str:
    """``text`` as valid Unicode (see checkpoint.printable): for safetensors metadata."""
    return printable(text)


# ----------------------------------------------------------------------------- fields read from files


class FileFields:
    """Typed reads of a record that came from a file: a missing field, a wrong type or an
    impossible value is one line that names the file and the field, never a traceback later."""

    def __init__(self, record: dict[str, Any], source: Any, error: type[Exception] = WeightsError):
        self.record, self.source, self.error = record, source, error

    def fail(self, key: str, what: str) -> None:
        value = self.record.get(key)
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise self.error(f"{self.source}: {key!r} is {shown}, not {what}; {FILE_FIX}")

    def missing(self, key: str) -> None:
        raise self.error(f"{self.source} has no {key!r}; {FILE_FIX}")

    def get(self, key: str, required: bool) -> Any:
        if key not in self.record or self.record[key] is None:
            if required:
                self.missing(key)
            return None
        return self.record[key]

    def text(self, key: str, required: bool = True) -> str | None:
        value = self.get(key, required)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            self.fail(key, "a non-empty string")
        return value

    def integer(self, key: str, low: int, high: int | None = None, required: bool = True) -> int | None:
        value = self.get(key, required)
        if value is not None and (not _is_int(value) or value < low or (high is not None and value > high)):
            self.fail(key, f"an integer from {low}" + (f" to {high}" if high is not None else " up"))
        return value

    def number(self, key: str, low: float, high: float, required: bool = True) -> float | None:
        value = self.get(key, required)
        if value is not None and (not _is_number(value) or not low <= value <= high):
            self.fail(key, f"a number from {low:g} to {high:g}")
        return value

    def channel_stats(self, key: str, positive: bool, required: bool = False) -> tuple[float, ...] | None:
        """mean or std: three finite numbers (std above 0: the images are divided by it)."""
        value = self.get(key, required)
        if value is None:
            return None
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 3
            or not all(_is_number(v) for v in value)
            or (positive and not all(v > 0 for v in value))
        ):
            self.fail(key, "3 numbers (one per RGB channel)" + (", each above 0" if positive else ""))
        return tuple(float(v) for v in value)

    def rotations(self, key: str, required: bool = False) -> tuple[float, ...] | None:
        value = self.get(key, required)
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
            self.fail(key, "a list of angles in degrees")
        try:
            return parse_rotations(list(value))
        except ConfigError as e:
            raise self.error(f"{self.source}: {key!r} is not a rotation set ({e}); {FILE_FIX}") from None

    def mapping(self, key: str, required: bool = True) -> dict[str, Any] | None:
        value = self.get(key, required)
        if value is not None and not isinstance(value, dict):
            self.fail(key, "an object")
        return value

    def listing(self, key: str, required: bool = True) -> list | None:
        value = self.get(key, required)
        if value is not None and not isinstance(value, list):
            self.fail(key, "a list")
        return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _img_size(fields: FileFields, key: str, required: bool = False) -> int | None:
    return fields.integer(key, MIN_IMG_SIZE, MAX_IMG_SIZE, required=required)


# ----------------------------------------------------------------------------- safetensors metadata


def save_weights(path: Path, tensors: dict, kind: str, model: str, **facts: Any) -> Path:
    """Write rotnet weights with the metadata every loader reads: marker, version, model and ``facts``."""
    assert kind in FORMATS, kind
    meta = {"format": "pt", FORMAT_KEY: kind, "rotnet_version": __version__, "model": model}
    for key, value in facts.items():
        if value is not None:
            # safetensors stores valid Unicode only: a path's undecodable bytes are kept as \xNN
            meta[key] = plain_text(value) if key in TEXT_FIELDS else json.dumps(value, allow_nan=False)
    return save_safetensors(path, tensors, meta)


def read_weights_metadata(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    """Decode and check the metadata of a rotnet safetensors file, field by field.

    A file without rotnet's marker is a WeightsError (foreign weights); a field of the wrong
    type or an impossible value is one too, naming the file and the field.
    """
    if raw.get(FORMAT_KEY) is None and "rotnet_version" in raw and "model" in raw:
        raise WeightsError(  # a development build before the marker: its runs and exports are not read back
            f"{path} was written by an early development build of rotnet ({plain_text(raw['rotnet_version'])[:40]}) "
            "whose files are no longer read; pretrain (or export) it again with this version"
        )
    if raw.get(FORMAT_KEY) not in FORMATS or "model" not in raw:
        raise WeightsError(
            f"{path} has no rotnet metadata naming its model; load plain timm weights with "
            "timm.create_model(NAME, checkpoint_path=...) or export a rotnet run first"
        )
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = value if key in TEXT_FIELDS else jsontext.loads(value)
        except ValueError:
            raise WeightsError(
                f"{path}: its metadata {key!r} is not valid ({value[:40]!r}); the file was not written by rotnet"
            ) from None
    fields = FileFields(meta, f"{path} (metadata)")
    fields.text("model")
    meta["rotations"] = fields.rotations("rotations", required=meta[FORMAT_KEY] == HEAD_FORMAT)
    _img_size(fields, "img_size")
    meta["mean"] = fields.channel_stats("mean", positive=False)
    meta["std"] = fields.channel_stats("std", positive=True)
    fields.integer("num_features", 1, required=False)
    fields.integer("head_hidden_size", 1, required=False)
    fields.integer("epochs", 0, required=False)
    fields.number("val_rot_acc", 0.0, 1.0, required=False)
    for key in ("data", "source", "dtype"):
        fields.text(key, required=False)
    check_calibration_fields(fields)
    check_training_images_fields(fields)
    return {k: v for k, v in meta.items() if v is not None}


TEMPERATURE_RANGE = (0.05, 20.0)  # calibration.py fits within it: outside, the logits carry no usable signal


def check_calibration_fields(fields: FileFields) -> None:
    """The rotation head's temperature and what it changed (calibration.Calibration.to_dict)."""
    value = fields.mapping("calibration", required=False)
    if value is None:
        return
    inner = FileFields(value, f"{fields.source} calibration", fields.error)
    inner.number("temperature", *TEMPERATURE_RANGE)
    for key in ("ece_before", "ece_after"):
        inner.number(key, 0.0, 1.0)
    for key in ("nll_before", "nll_after"):
        inner.number(key, 0.0, 1e6)
    inner.integer("samples", 1)


def check_training_images_fields(fields: FileFields) -> None:
    """What the training images looked like (fingerprint.py): sizes, colour, feature statistics."""
    value = fields.mapping("training_images", required=False)
    if value is None:
        return
    inner = FileFields(value, f"{fields.source} training_images", fields.error)
    inner.integer("images", 1)
    inner.integer("side", 1, required=False)
    inner.number("colour", 0.0, 1.0)
    inner.channel_stats("mean", positive=False, required=True)
    inner.channel_stats("std", positive=False, required=True)
    features = inner.mapping("features", required=False)
    if features is None:
        return
    stats = FileFields(features, f"{fields.source} training_images.features", fields.error)
    centre, spread = stats.listing("mean"), stats.listing("std")
    if not centre or len(centre) != len(spread) or not all(_is_number(v) for v in centre):
        stats.fail("mean", "a list of numbers as long as 'std'")
    if not all(_is_number(v) and v > 0 for v in spread):
        stats.fail("std", "a list of numbers above 0")
    stats.number("threshold", 0.0, 1e6)
    if stats.text("reference", required=False) not in (None, "held-out", "training"):
        stats.fail("reference", "'held-out' or 'training'")


def weights_format(path: Path) -> str:
    """The marker of a rotnet safetensors file (run, export or rotation-head); a WeightsError otherwise."""
    return read_weights_metadata(path, safetensors_metadata(path))[FORMAT_KEY]


# ----------------------------------------------------------------------------- reading a run directory


def _read_json(path: Path, error: type[Exception]) -> Any:
    try:
        return jsontext.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except PermissionError:
        raise error(f"cannot read {path}: permission denied; make it readable (chmod u+r)") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # not UTF-8, not JSON
        raise error(f"{path} is not valid JSON ({str(e)[:80]}); {FILE_FIX}") from None


def read_config(run_dir: Path) -> dict[str, Any]:
    """config.json of a run: {"config": {...}, "resolved": {...}, ...}, its "config" checked field by
    field (read_run_config gives it as a PretrainConfig); a DataError naming the file and field."""
    path = Path(run_dir) / CONFIG
    record = _read_json(path, DataError)
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise DataError(f"{path} holds no run config; it was not written by rotnet pretrain")
    FileFields(record, path, DataError).mapping("resolved", required=False)
    return record


def read_run_config(run_dir: Path) -> PretrainConfig:
    """The PretrainConfig a run was started with, validated like user input."""
    path = Path(run_dir) / CONFIG
    try:
        return PretrainConfig.from_dict(read_config(run_dir)["config"], source=f"{path} 'config'")
    except ConfigError as e:
        raise DataError(str(e)) from None


def read_export_config(folder: Path) -> dict[str, Any]:
    """An export's config.json (timm's): architecture, pretrained_cfg (input_size, mean, std), model_args;
    checked field by field. -> {"architecture", "img_size", "build_size", "mean", "std", "record"}."""
    path = Path(folder) / EXPORT_CONFIG
    if not path.is_file():
        raise WeightsError(
            f"{path} is missing: an export needs the config.json beside its model.safetensors (timm reads the model "
            "from it); export the run again, or copy that file back"
        )
    record = _read_json(path, WeightsError)
    if not isinstance(record, dict):
        raise WeightsError(f"{path} holds a {type(record).__name__}, not a timm config object; {FILE_FIX}")
    fields = FileFields(record, path)
    pcfg = fields.mapping("pretrained_cfg", required=False) or {}
    args = fields.mapping("model_args", required=False) or {}
    inner = FileFields(pcfg, f"{path} pretrained_cfg")
    size = inner.get("input_size", required=False)
    if size is not None and not (
        isinstance(size, list)
        and len(size) == 3
        and all(_is_int(v) for v in size)
        and MIN_IMG_SIZE <= size[-1] <= MAX_IMG_SIZE
    ):
        inner.fail("input_size", f"[3, H, W] with sizes from {MIN_IMG_SIZE} to {MAX_IMG_SIZE}")
    build = args.get("img_size")
    if build is not None and not (
        (_is_int(build) and MIN_IMG_SIZE <= build <= MAX_IMG_SIZE)
        or (
            isinstance(build, list)
            and len(build) == 2
            and all(_is_int(v) and MIN_IMG_SIZE <= v <= MAX_IMG_SIZE for v in build)
        )
    ):
        FileFields(args, f"{path} model_args").fail("img_size", "a size in pixels or [H, W]")
    return {
        "architecture": fields.text("architecture"),
        "img_size": size[-1] if size else None,
        "build_size": build,
        "mean": inner.channel_stats("mean", positive=False),
        "std": inner.channel_stats("std", positive=True),
        "record": record,
    }


METRIC_NUMBERS = ("loss", "rot_acc", "val_loss", "val_rot_acc", "lr", "images_per_s", "seconds", "data_wait")


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl (``run`` is a run directory or the file itself).

    Every line must be a JSON object with an ``epoch`` and finite numbers (or null) for the
    figures: rotnet writes the whole file atomically, so a line that is not one means the file
    is not (or no longer) a rotnet metrics file. Blank lines are allowed. A missing file or a
    bad line is a DataError that names it.
    """
    run = Path(run)
    path = run / METRICS if run.is_dir() else run
    if not path.is_file():
        raise DataError(f"{path} does not exist; give a run directory made by rotnet pretrain (it holds {METRICS})")
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({getattr(e, 'strerror', None) or e})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = jsontext.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number} is not a JSON object; is it a rotnet {METRICS}?")
        fields = FileFields(row, f"{path} line {number}", DataError)
        fields.integer("epoch", 1)
        for key in METRIC_NUMBERS:
            if row.get(key) is not None and not _is_number(row[key]):
                fields.fail(key, "a finite number")
        rows.append(row)
    return rows


def read_probe(run_dir: Path) -> list[dict[str, Any]]:
    """The results probe.json keeps, one per setting ([] when the run was never probed); a DataError
    when the file is not one rotnet wrote. The form written before results were kept per setting
    (one result at the top level) reads as a list of one."""
    path = Path(run_dir) / PROBE
    if not path.is_file():
        return []
    record = _read_json(path, DataError)
    if isinstance(record, dict) and record.get("format") == PROBE_FORMAT and isinstance(record.get("results"), list):
        results = record["results"]
    elif isinstance(record, dict) and isinstance(record.get("rows"), list):
        results = [record]
    else:
        raise DataError(f"{path} does not hold rotnet probe results; move it away, or probe with --no-save")
    if not all(isinstance(result, dict) for result in results):
        raise DataError(f"{path} holds a result that is not an object; move it away, or probe with --no-save")
    return results


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint.pt, loaded without running code (see checkpoint.load_checkpoint), its fields
    checked: "config" becomes a validated PretrainConfig under "run_config"."""
    path = Path(path)
    state = load_checkpoint(path)
    fields = FileFields(state, path)
    config, model = fields.get("config", required=False), fields.get("model", required=False)
    if not isinstance(config, dict) or not isinstance(model, dict) or "model" not in config:
        raise WeightsError(f"{path} is not a rotnet checkpoint (no 'config' and 'model' entries)")
    try:
        state["run_config"] = PretrainConfig.from_dict(config, source=f"{path} 'config'")
    except ConfigError as e:
        raise WeightsError(str(e)) from None
    import torch

    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        fields.fail("model", "a map of tensor names to tensors")
    _img_size(fields, "img_size")
    state["mean"] = fields.channel_stats("mean", positive=False)
    state["std"] = fields.channel_stats("std", positive=True)
    fields.integer("epoch", 0, state["run_config"].epochs, required=False)
    fields.integer("step", 0, required=False)
    fields.integer("train_images", 0, required=False)
    fields.integer("world_size", 1, required=False)
    fields.integer("threads", 1, required=False)
    history = fields.listing("history", required=False)
    if history is not None and not all(isinstance(row, dict) for row in history):
        fields.fail("history", "a list of metrics rows")
    return state


def kept_checkpoint(out: Path, name: str) -> Path:
    """checkpoints/NAME.safetensors of a run (NAME: best or epoch-E)."""
    return Path(out) / CHECKPOINTS / f"{name}.safetensors"


def epoch_checkpoint_name(epoch: int) -> str:
    """The kept checkpoint of a finished epoch (1-based): epoch-12."""
    return f"epoch-{epoch}"


def kept_checkpoint_names(out: Path) -> list[str]:
    """The names of a run's kept checkpoints: best first, then the epochs in order."""
    names = [p.stem for p in (Path(out) / CHECKPOINTS).glob("*.safetensors")]
    epochs = sorted((n for n in names if n.startswith("epoch-") and n[6:].isdigit()), key=lambda n: int(n[6:]))
    return [n for n in names if n == BEST] + epochs


def run_dir_of(path: Path) -> Path | None:
    """The run directory a checkpoint.pt or model.safetensors lies in (None for a file on its own)."""
    path = Path(path)
    return path.parent if path.name in (CHECKPOINT, WEIGHTS) and (path.parent / CONFIG).is_file() else None


# ----------------------------------------------------------------------------- writing a run directory


def write_config(out: Path, config: dict[str, Any], resolved: dict[str, Any]) -> Path:
    """config.json: the config as given, what it resolved to, library versions, command line, start time."""
    import timm
    import torch
    import torchvision

    return write_json(
        out / CONFIG,
        {
            "config": config,
            "resolved": resolved,
            "versions": {
                "rotnet": __version__,
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "timm": timm.__version__,
                "python": platform.python_version(),
            },
            "command": sys.argv,
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        },
    )


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl from the rows so far (left as it is when it already says the same)."""
    text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in history)
    path = out / METRICS
    if path.is_file() and path.read_bytes() == encode_text(text):
        return  # a resume with nothing new to say leaves the file as it is
    write_text(path, text)


def write_checkpoint(out: Path, state: dict[str, Any]) -> Path:
    return save_checkpoint(out / CHECKPOINT, state)


def update_probe(run_dir: Path, update: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> Path:
    """probe.json with the results ``update`` makes of the saved ones (one per setting; rotnet probe
    decides which replaces which), read and written while holding the run directory's lock (a run
    being written, or another probe saving, is refused)."""
    run_dir = Path(run_dir)
    with FolderLock(
        run_dir / LOCK,
        run_dir,
        "wait until it ends, or pass --no-save",
        "make it writable (chmod u+w), or pass --no-save",
        wait_s=PROBE_SAVE_WAIT_S,
    ):
        return write_json(run_dir / PROBE, {"format": PROBE_FORMAT, "results": update(read_probe(run_dir))})


def record_extension(out: Path, epochs: int, at_epoch: int) -> Path:
    """config.json of a run resumed with a larger --epochs: the new total (so a later --resume continues it)
    and, under "extended", when and from what it grew."""
    record = read_config(out)
    record.setdefault("extended", []).append(
        {
            "from_epochs": record["config"].get("epochs"),
            "to_epochs": epochs,
            "at_epoch": at_epoch,
            "time": datetime.now().astimezone().isoformat(timespec="seconds"),
        }
    )
    record["config"]["epochs"] = epochs
    if isinstance(record.get("resolved"), dict) and "epochs" in record["resolved"]:  # what the run now trains to
        record["resolved"]["epochs"] = epochs  # (resolved.plan keeps the plan it started with)
    return write_json(Path(out) / CONFIG, record)


def remove_temp_files(out: Path) -> None:
    """Delete what a process killed while writing left behind (``.NAME.XXXX.tmp``)."""
    remove_stale_temp_files(out, RUN_FILES)
    kept = Path(out) / CHECKPOINTS
    if kept.is_dir():
        remove_stale_temp_files(kept, ("*.safetensors",))


def suggested_command(argv: Iterable[str]) -> str:
    """A command line as the user can paste it back (arguments quoted for the shell)."""
    argv = list(argv)
    if argv and Path(argv[0]).name == "rotnet":
        argv = ["rotnet", *argv[1:]]
    elif argv and argv[0].endswith(("__main__.py", "-m")):
        argv = ["python", "-m", "rotnet_cli", *argv[1:]]
    return shell_join(argv)


# ----------------------------------------------------------------------------- which files are rotnet's
# --overwrite replaces rotnet's own files and never what it did not write. A file is rotnet's by
# its content (its format marker, its record), never by its name alone.


def written_by_rotnet(path: Path) -> bool:
    """Whether rotnet wrote the file or folder ``path`` (any entry of a run directory, an export or a picture)."""
    path = Path(path)
    try:
        if path.is_symlink():
            return False  # a link is the user's, wherever it points
        if path.is_dir():
            if name_is(path, CHECKPOINTS):  # kept weights: rotnet safetensors, nothing else
                return all(p.suffix == ".safetensors" and written_by_rotnet(p) for p in path.iterdir())
            if name_is(path, LOGS):  # what the loggers write: their own files and folders, nothing else
                return all(p.name in LOG_ENTRIES for p in path.iterdir())
            return is_export_folder(path)
        name = path.name
        if name.endswith(".safetensors"):
            return safetensors_metadata(path).get(FORMAT_KEY) in FORMATS
        if name == CHECKPOINT:
            return _is_rotnet_checkpoint(path)
        if name == METRICS:  # every line an epoch's row (even one with NaN, as earlier versions wrote)
            rows = [jsontext.loads(line) for line in path.read_bytes().decode("utf-8").splitlines() if line.strip()]
            return all(isinstance(row, dict) and "epoch" in row for row in rows)
        if name == CONFIG:
            if (path.parent / EXPORT_WEIGHTS).is_file() and _marker(path.parent / EXPORT_WEIGHTS) == EXPORT_FORMAT:
                return True  # timm's config.json of a rotnet export
            record = jsontext.loads(path.read_bytes().decode("utf-8"))
            return (
                isinstance(record, dict)
                and isinstance(record.get("config"), dict)
                and "rotnet" in (record.get("versions") or {})
            )
        if name == PROBE:
            record = jsontext.loads(path.read_bytes().decode("utf-8"))
            if isinstance(record, dict) and record.get("format") == PROBE_FORMAT:
                return isinstance(record.get("results"), list)
            return isinstance(record, dict) and "rotnet_version" in record and isinstance(record.get("rows"), list)
        if name in (MODEL_CARD, EXPORT_ONNX):
            return _marker(path.parent / EXPORT_WEIGHTS) == EXPORT_FORMAT
        if name.lower().endswith(".png"):
            return is_rotnet_picture(path)
    except (OSError, ValueError, WeightsError, DataError):
        return False
    return False


def name_is(path: Path, name: str) -> bool:
    """``path`` is the run's entry ``name`` (a run directory's checkpoints/ or logs/)."""
    return path.name == name and (path.parent / CONFIG).is_file()


def is_export_folder(folder: Path) -> bool:
    """A folder rotnet export wrote: an export model.safetensors and nothing but the export's files."""
    if _marker(folder / EXPORT_WEIGHTS) != EXPORT_FORMAT:
        return False
    return all(entry.name in EXPORT_FILES and written_by_rotnet(entry) for entry in folder.iterdir())


def is_rotnet_picture(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        return str(getattr(image, "text", {}).get("Software", "")).startswith(PICTURE_SOFTWARE)


def _marker(path: Path) -> str | None:
    try:
        return safetensors_metadata(path).get(FORMAT_KEY)
    except (OSError, WeightsError):
        return None


def _is_rotnet_checkpoint(path: Path) -> bool:
    """torch.save writes a zip whose data.pkl holds the dict's keys as strings: rotnet's has "rotnet_version"."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        return bool(pickles) and b"rotnet_version" in archive.read(pickles[0])


# ----------------------------------------------------------------------------- the output-folder policy
# Every command that writes checks its output here before any work starts, and nothing that
# existed is changed by a refused command. One policy for all: an existing non-empty output is
# refused unless --overwrite (or --resume); --overwrite replaces rotnet's own files and refuses
# to replace anything rotnet did not write; files of other names are never touched.

EVERYTHING = None  # ``replaces`` of a command that replaces the whole folder (an export)


def check_out_dir(
    out: Path,
    *,
    overwrite: bool,
    resume: bool = False,
    resumable: bool = False,
    inputs: tuple[str, ...] = (),
    inside_inputs: bool = False,
    overwrite_does: str = "replace it",
    replaces: Iterable[str] | None | bool = False,
) -> None:
    """Refuse an --out that cannot be used; nothing is created or changed here.

    Refused: a file; a folder that is, or holds, one of ``inputs`` (and, unless
    ``inside_inputs``, one that lies inside an input folder); an existing non-empty folder,
    unless ``overwrite`` (or ``resume``, for a run that continues; ``resumable``: the
    command could continue the run it holds, so the message offers --resume). With
    ``overwrite``, the entries the command would replace (``replaces``: their names, or
    EVERYTHING for the whole folder; False: not checked) must all be rotnet's own.
    """
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; choose a folder name")
    resolved = out.resolve()
    for spec in inputs:
        given = Path(spec).expanduser()
        if not given.exists():
            continue
        given = given.resolve()
        if (
            given == resolved
            or resolved in given.parents
            or (not inside_inputs and given.is_dir() and given in resolved.parents)
        ):
            hint = (
                f", e.g. --out {shell_quote(str(out / EXPORT_DIR))}"
                if inside_inputs
                else " (the originals are never changed)"
            )
            raise OutputError(f"--out {out} overlaps the input {spec}; choose a folder outside the inputs{hint}")
    if resume:
        return
    entries = _entries(out)
    if entries and not overwrite:
        options = (
            f"pass --resume {shell_quote(str(out))} to continue it, "
            if resumable and (out / CHECKPOINT).is_file()
            else "pass "
        )
        raise OutputError(
            f"--out {out} exists and is not empty; {options}--overwrite to {overwrite_does}, or choose another --out"
        )
    if replaces is not False:
        names = set(replaces) if replaces is not EVERYTHING else None
        for entry in entries:
            if (names is None or entry.name in names) and not written_by_rotnet(entry):
                raise_foreign(out, entry)
        if entries:
            _refuse_another_kind(out, "export" if replaces is EVERYTHING else "run")


def folder_kind(folder: Path) -> str | None:
    """What rotnet keeps in ``folder``: "run" (a run directory, or its checkpoints/ or logs/), "export", or None."""
    if name_is(folder, CHECKPOINTS) or name_is(folder, LOGS):
        return "run"
    marker = _marker(folder / WEIGHTS)
    if marker == EXPORT_FORMAT:
        return "export"
    if marker == RUN_FORMAT or any((folder / name).exists() for name in (CHECKPOINT, METRICS, CHECKPOINTS)):
        return "run"
    return None


def _refuse_another_kind(out: Path, writes: str) -> None:
    """--overwrite replaces an earlier output of the same command: an export never replaces a run (its
    checkpoint and history would be lost for good), a run never replaces an export."""
    held = folder_kind(out)
    if held is None or held == writes:
        return
    what = "a training run's files" if held == "run" else "an exported model"
    hint = (
        f", e.g. --out {shell_quote(str(out / EXPORT_DIR))}"
        if folder_kind(out / "..") != "run" and held == "run"
        else ""
    )
    raise OutputError(
        f"--out {out} holds {what}, and --overwrite replaces only an earlier {writes} there; choose another --out{hint}"
    )


def check_out_file(
    out: Path,
    *,
    overwrite: bool,
    ours: Callable[[Path], bool] | None = None,
    name_hint: str = "a file name ending in .png",
) -> None:
    """The same policy for a single output file (a picture, an embeddings file): refused if it is a
    folder (the message asks for ``name_hint``), or exists, unless --overwrite and ``ours`` says the
    command wrote it (by default: rotnet wrote it)."""
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; give {name_hint}")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputError(f"--out {out} exists; pass --overwrite to replace it, or choose another --out")
        if not (ours or written_by_rotnet)(out):
            raise_foreign(out.parent, out)


def raise_foreign(out: Path, entry: Path) -> None:
    if not entry.is_symlink() and written_by_rotnet(entry):  # rotnet's, but another command's output (a run's weights)
        raise OutputError(
            f"--out {out}: {entry} is another rotnet command's output (not one this command writes), and --overwrite "
            "replaces only an earlier output of the same command; choose another --out"
        )
    raise OutputError(
        f"--out {out}: {entry} was not written by rotnet, and --overwrite replaces only rotnet's own files; "
        "move it away or choose another --out"
    )


def _entries(folder: Path) -> list[Path]:
    """The folder's entries, without the lock file of the process that checks it."""
    try:
        return sorted(p for p in folder.iterdir() if p.name != LOCK)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise OutputError(f"--out {folder} is a file; choose a folder name") from None
    except PermissionError:
        raise OutputError(
            f"cannot read {folder}: permission denied; make it readable, or choose another --out"
        ) from None


def default_run_dir(model: str) -> Path:
    """runs/MODEL-DATE-TIME, with the model name made safe for a folder."""
    safe = model.replace("/", "-").replace(":", "-")
    return Path("runs") / f"{safe}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def claim_default_run_dir(model: str) -> tuple[Path, list[Path]]:
    """Create runs/MODEL-DATE-TIME -> (it, the folders made, outermost first); two runs started in the
    same second get different folders (-2, -3 ...): the mkdir that creates a folder is atomic, so each
    claims its own."""
    base = default_run_dir(model)
    made = missing_folders(base.parent)
    make_dir(base.parent)
    for number in range(1, 10_000):
        candidate = base if number == 1 else base.with_name(f"{base.name}-{number}")
        try:
            candidate.mkdir()
            return candidate, [*made, candidate]
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(f"cannot create {candidate}: {e.strerror}; choose another --out") from None
    raise OutputError(f"every folder name {base}-N is taken; choose --out")


def missing_folders(folder: Path) -> list[Path]:
    """The folders ``make_dir(folder)`` would create, outermost first."""
    return [p for p in [*reversed(Path(folder).parents), Path(folder)] if not p.exists()]


def remove_if_empty(made: list[Path]) -> None:
    """Remove folders this process made (innermost first), as long as they are empty."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            break


# ----------------------------------------------------------------------------- the lock


class FolderLock:
    """An OS lock on a folder rotnet writes (flock on a lock file), held while a process writes it.

    The kernel releases it when the process ends, however it ends (kill -9 included), so a
    lock is never stale. The file names its holder (pid, host, command, since when) for the
    message another process gets. It is removed when released; a process that opened it just
    before checks, once it holds the lock, that the file is still the one at that path.
    """

    def __init__(
        self,
        path: Path,
        folder: Path,
        busy_fix: str = "wait until it ends, or choose another --out",
        denied_fix: str = "choose another --out",
        make_parents: bool = False,
        wait_s: float = 0.0,
    ):
        self.path, self.folder, self.busy_fix, self.denied_fix = Path(path), Path(folder), busy_fix, denied_fix
        self.make_parents = make_parents
        self.wait_s = wait_s  # how long to wait for a holder that only saves a file (a probe): not for a run
        self.made: list[Path] = []  # folders made for the lock file, removed again when left empty
        self.fd: int | None = None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            self._acquire()
        except BaseException:
            self.release()  # folders made for it go again
            raise

    def _acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (Windows)
            return
        if self.make_parents:
            self.made = missing_folders(self.path.parent)
            make_dir(self.path.parent)
        deadline = time.monotonic() + self.wait_s
        while True:
            # never through a link, nor into a file that is not rotnet's: the holder's line is written into it
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
            try:
                fd = os.open(self.path, flags, 0o666 & ~current_umask())
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                    raise OutputError(self._in_the_way()) from None
                raise OutputError(f"cannot write into {self.folder}: {e.strerror}; {self.denied_fix}") from None
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:  # a fifo, a device, a hard link to another file
                os.close(fd)
                raise OutputError(self._in_the_way())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise OutputError(
                    f"{self.folder} is in use by another rotnet process ({holder}); {self.busy_fix}"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        self.fd = fd
        since = datetime.now().astimezone().isoformat(timespec="seconds")
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": since,
            "command": suggested_command(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.write(fd, encode_text(json.dumps(info)))

    def _in_the_way(self) -> str:
        return (
            f"{self.path} is in the way of rotnet's lock file (a link, a folder or another kind of file rotnet did "
            "not make); remove it and run the command again"
        )

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # while still holding it: the next process locks a fresh file
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        remove_if_empty(self.made)  # a refused or failed command leaves no new folder
        self.made = []


def _holder(fd: int) -> str:
    try:
        info = jsontext.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        return f"pid {info['pid']} on {info['host']} since {info['since']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "it is starting"


# ----------------------------------------------------------------------------- a run directory being written


class RunDirWriter:
    """The run directory of a pretraining process: locked while it runs, and never left worse.

    - ``__enter__`` locks the folder (creating it when needed) and finishes what a killed
      process left: a half-done --overwrite (see below) and temporary files.
    - ``start_new(replace)``: a new run; with --overwrite the old run's files move into
      ``.rotnet-replaced/`` (via ``.rotnet-replacing/`` while they move), where they stay until
      ``checkpointed()``: the new run's first checkpoint. Only then is the old run deleted.
    - ``__exit__`` after a failure before that first checkpoint removes what the new run
      wrote and puts the old run back; a folder this process created goes away again.

    Every step is a rename whose result names the state it reached, so a kill at any point
    is repaired by the next process that opens the folder: ``.rotnet-replacing`` moves back;
    ``.rotnet-replaced`` is deleted if the folder has the new run's checkpoint, else it comes
    back (through ``.rotnet-restoring``, moved back whatever is there).
    """

    def __init__(self, out: Path, made: list[Path] | None = None, resume: bool = False):
        self.out, self.resume = Path(out), resume
        self.made = made if made is not None else missing_folders(self.out)  # removed again if left empty
        self.lock = FolderLock(
            self.out / LOCK,
            self.out,
            "wait until it ends (or stop it), then resume" if resume else "wait until it ends, or choose another --out",
            "make it writable (chmod u+w), or copy it and resume the copy" if resume else "choose another --out",
        )
        self.kept = resume  # a resumed run has a checkpoint: nothing to roll back
        self.started = False
        self.recovered: str | None = None  # what __enter__ repaired, for the user to read

    def __enter__(self) -> "RunDirWriter":
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"--out {self.out} is a file; choose a folder name")
        make_dir(self.out)
        try:
            self.lock.acquire()
            self.recovered = recover_replaced(self.out)
            remove_temp_files(self.out)
        except BaseException:
            self._leave()
            raise
        return self

    def start_new(self, replace: bool) -> None:
        """Before the new run's first file: set the old run aside (--overwrite)."""
        if replace:
            try:
                set_aside(self.out)
            except BaseException:
                _move_back(self.out, REPLACING)  # nothing new was written: the old files go back where they were
                raise
        self.started = True  # from here on, what is in the folder under rotnet's names is the new run's

    def checkpointed(self) -> None:
        """The new run has its first checkpoint: it can be resumed, the old one is deleted for good."""
        if not self.kept:
            self.kept = True
            shutil.rmtree(self.out / REPLACED, ignore_errors=True)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None and self.started and not self.kept:
                _discard_new_run(self.out)
                restore_replaced(self.out)
        finally:
            self._leave()

    def _leave(self) -> None:
        self.lock.release()
        remove_if_empty(self.made)  # the folders this process made, if nothing is in them


def set_aside(out: Path) -> None:
    """Move the old run's entries into .rotnet-replaced (atomic as a whole: see RunDirWriter)."""
    names = [name for name in RUN_ENTRIES if (out / name).exists()]
    if not names:
        return
    moving = out / REPLACING
    moving.mkdir()
    for name in names:
        os.replace(out / name, moving / name)
    os.replace(moving, out / REPLACED)


def restore_replaced(out: Path) -> None:
    """Put the set-aside run back (the new run's own entries must be gone already)."""
    if (out / REPLACED).is_dir():
        os.replace(out / REPLACED, out / RESTORING)
    _move_back(out, RESTORING)


def overwrite_pending(out: Path) -> bool:
    """Whether ``out`` holds an --overwrite stopped before the new run's first checkpoint (the old run set aside)."""
    if (out / REPLACING).is_dir() or (out / RESTORING).is_dir():
        return True
    return (out / REPLACED).is_dir() and not (out / CHECKPOINT).is_file()


def recover_replaced(out: Path) -> str | None:
    """Finish what a killed --overwrite left in ``out`` (under its lock); say what was done."""
    if (out / REPLACING).is_dir():
        _move_back(out, REPLACING)  # killed while the old run's files moved: nothing new was written yet
        return "put back the run that an interrupted --overwrite was moving aside"
    if (out / RESTORING).is_dir():
        _move_back(out, RESTORING)
        return "put back the run that an interrupted --overwrite had set aside"
    if (out / REPLACED).is_dir():
        if (out / CHECKPOINT).is_file():  # the new run reached its first checkpoint: the old one was to go
            shutil.rmtree(out / REPLACED, ignore_errors=True)
            return None
        _discard_new_run(out)
        restore_replaced(out)
        return "put back the run that an interrupted --overwrite had set aside (the new run had no checkpoint yet)"
    return None


def _move_back(out: Path, holder: str) -> None:
    folder = out / holder
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        target = out / entry.name
        if target.is_dir() and not target.is_symlink() and entry.is_dir():
            shutil.rmtree(target)  # a half-moved folder (an export) from an earlier attempt
        os.replace(entry, target)
    folder.rmdir()


def _discard_new_run(out: Path) -> None:
    """Remove what a run that never reached its first checkpoint wrote (rotnet's entries only)."""
    for name in RUN_ENTRIES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    remove_temp_files(out)


# ----------------------------------------------------------------------------- a folder written whole (an export)
# Written into a hidden sibling, checked, then renamed into place. A kill leaves either the
# staging folder (deleted by the next command on that --out) or, between the two renames of a
# replacement, the old folder under a fixed name that the next command puts back.


def export_lock(out: Path) -> FolderLock:
    """The lock of a folder written whole: a hidden sibling file (the folder itself is replaced by a rename)."""
    return FolderLock(out.parent / f".{out.name}{LOCK}", out, make_parents=True)


def staging_dir(out: Path) -> Path:
    """An empty hidden sibling of ``out`` to write a whole folder into (the final rename stays on one file system)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.rotnet-", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot create {out}: {e.strerror}; choose another --out") from e


def _previous_of(out: Path) -> Path:
    return out.parent / f".{out.name}.rotnet-previous"


def install_staged(staging: Path, out: Path) -> None:
    """Rename a finished staging folder into place; an existing ``out`` is replaced only now, after success."""
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes a private (0700) folder; outputs are meant to be shared
    if not out.exists():
        os.replace(staging, out)
        return
    previous = _previous_of(out)
    os.replace(out, previous)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(previous, out)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def recover_staged(out: Path) -> list[str]:
    """Under the folder's lock: put back an old folder a killed replacement left aside, and delete
    stale staging folders of ``out`` (also those of earlier rotnet versions). Returns what it did."""
    done = []
    # this version's names, and earlier ones': .NAME.XXXXXXXX.tmp and .NAME.XXXXXXXX.tmp.previous
    pattern = re.compile(
        rf"\.{re.escape(out.name)}\.(rotnet-)?[a-z0-9_]{{8}}\.tmp(\.previous)?|\.{re.escape(out.name)}\.rotnet-previous"
    )
    try:
        leftovers = sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir())
    except OSError:
        return done
    for path in leftovers:
        set_aside_old = path.name.endswith("previous")
        if set_aside_old and not out.exists():
            os.replace(path, out)  # killed between the two renames: the old folder comes back
            done.append(f"put back {out}, which an interrupted replacement had set aside")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path}, left by an interrupted command")
    return done


__all__ = [
    "CONFIG",
    "METRICS",
    "CHECKPOINT",
    "WEIGHTS",
    "PROBE",
    "EXPORT_CONFIG",
    "EXPORT_WEIGHTS",
    "EXPORT_HEAD",
    "MODEL_CARD",
    "RUN_FORMAT",
    "EXPORT_FORMAT",
    "HEAD_FORMAT",
    "save_weights",
    "read_weights_metadata",
    "read_config",
    "read_run_config",
    "read_export_config",
    "read_metrics",
    "read_probe",
    "read_checkpoint",
    "run_dir_of",
    "weights_format",
    "write_config",
    "write_metrics",
    "write_checkpoint",
    "update_probe",
    "check_out_dir",
    "check_out_file",
    "written_by_rotnet",
    "FolderLock",
    "RunDirWriter",
    "export_lock",
    "staging_dir",
    "install_staged",
    "recover_staged",
    "default_run_dir",
    "claim_default_run_dir",
    "FileFields",
    "plain_text",
    "suggested_command",
    "CHECKPOINTS",
    "LOGS",
    "BEST",
    "kept_checkpoint",
    "epoch_checkpoint_name",
    "kept_checkpoint_names",
    "record_extension",
]
