"""Readers of a run directory and an export: config, metrics, probe results, checkpoints, kept weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .. import jsontext
from ..checkpoint import load_checkpoint
from ..config import FILE_FIX, MAX_IMG_SIZE, MIN_IMG_SIZE, PretrainConfig
from ..errors import ConfigError, DataError, RotnetError, WeightsError
from .fields import FileFields, img_size_field, is_int, is_number
from .layout import BEST, CHECKPOINT, CHECKPOINTS, CONFIG, EXPORT_CONFIG, METRICS, PROBE, PROBE_FORMAT, WEIGHTS

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
        and all(is_int(v) for v in size)
        and MIN_IMG_SIZE <= size[-1] <= MAX_IMG_SIZE
    ):
        inner.fail("input_size", f"[3, H, W] with sizes from {MIN_IMG_SIZE} to {MAX_IMG_SIZE}")
    build = args.get("img_size")
    if build is not None and not (
        (is_int(build) and MIN_IMG_SIZE <= build <= MAX_IMG_SIZE)
        or (
            isinstance(build, list)
            and len(build) == 2
            and all(is_int(v) and MIN_IMG_SIZE <= v <= MAX_IMG_SIZE for v in build)
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
            if row.get(key) is not None and not is_number(row[key]):
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
    img_size_field(fields, "img_size")
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


Table = TypeVar("Table")


def read_table_file(path: str | Path, readers: dict[str, Callable[[Path], Table]], kind: str, command: str) -> Table:
    """A table file a command wrote (embeddings, scores), read by the reader its ending names; a missing
    file, another ending or a file its library cannot read is a DataError naming the command that writes it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path} does not exist; write {kind} with {command} WEIGHTS DATA --out {path.name}")
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: {kind} files end in {', '.join(readers)}; give a file written by {command}")
    try:
        return reader(path)
    except RotnetError:
        raise
    except Exception as e:  # every library raises its own types for a broken file
        raise DataError(
            f"{path} is not a readable {kind} file ({type(e).__name__}: {str(e)[:120]}); write it again with {command}"
        ) from e
