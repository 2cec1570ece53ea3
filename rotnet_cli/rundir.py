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

import json
import os
import platform
import shutil
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from ._version import __version__
from .checkpoint import (
    current_umask, load_checkpoint, make_dir, remove_stale_temp_files, save_checkpoint, save_safetensors, write_json,
    write_text,
)
from .errors import DataError, OutputError, WeightsError

# -- file names
CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"
PROBE = "probe.json"
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_HEAD = "rotation_head.safetensors"
MODEL_CARD = "README.md"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
BEST = "best"  # checkpoints/best.safetensors
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, WEIGHTS, PROBE)
RUN_ENTRIES = (*RUN_FILES, "export", CHECKPOINTS, LOGS)  # what --overwrite replaces; anything else in the folder is the user's
PROBE_FORMAT = "rotnet-probe-results"  # probe.json: {"format": PROBE_FORMAT, "results": [one per setting]}
REPLACED = ".rotnet-replaced"  # an overwritten run's files, until the new run's first checkpoint

# -- safetensors metadata: str -> str. "format": "pt" is what the Hugging Face loaders expect
# of a PyTorch file; rotnet's own marker says which of its files this is.
FORMAT_KEY = "rotnet_format"
RUN_FORMAT = "run"  # a run's model.safetensors: backbone.* + head.*
EXPORT_FORMAT = "export"  # an export's model.safetensors: the backbone's own keys
HEAD_FORMAT = "rotation-head"  # an export's rotation_head.safetensors
FORMATS = (RUN_FORMAT, EXPORT_FORMAT, HEAD_FORMAT)
TEXT_FIELDS = ("format", FORMAT_KEY, "rotnet_version", "model", "source", "data", "dtype")  # stored as they are; the rest as JSON


# ----------------------------------------------------------------------------- safetensors metadata


def save_weights(path: Path, tensors: dict, kind: str, model: str, **facts: Any) -> Path:
    """Write rotnet weights with the metadata every loader reads: marker, version, model and ``facts``."""
    assert kind in FORMATS, kind
    meta = {"format": "pt", FORMAT_KEY: kind, "rotnet_version": __version__, "model": model}
    for key, value in facts.items():
        if value is not None:
            meta[key] = value if key in TEXT_FIELDS else json.dumps(value)
    return save_safetensors(path, tensors, meta)


def read_weights_metadata(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    """Decode and check the metadata of a rotnet safetensors file; a foreign file is a WeightsError."""
    if raw.get(FORMAT_KEY) not in FORMATS or "model" not in raw:
        raise WeightsError(
            f"{path} has no rotnet metadata naming its model; load plain timm weights with "
            "timm.create_model(NAME, checkpoint_path=...) or export a rotnet run first"
        )
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = value if key in TEXT_FIELDS else json.loads(value)
        except ValueError:
            raise WeightsError(f"{path}: its metadata {key!r} is not valid ({value[:40]!r}); the file was not written by rotnet") from None
    return meta


# ----------------------------------------------------------------------------- reading a run directory


def read_config(run_dir: Path) -> dict[str, Any]:
    """config.json of a run: {"config": {...}, "resolved": {...}, ...}; a DataError when it is not one."""
    path = Path(run_dir) / CONFIG
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise DataError(f"{path} holds no run config; it was not written by rotnet pretrain")
    return record


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl (``run`` is a run directory or the file itself).

    Every line must be a JSON object: rotnet writes the whole file atomically, so a line that
    is not one means the file is not (or no longer) a rotnet metrics file. Blank lines are
    allowed. A missing file or a bad line is a DataError that names it.
    """
    run = Path(run)
    path = run / METRICS if run.is_dir() else run
    if not path.is_file():
        raise DataError(f"{path} does not exist; give a run directory made by rotnet pretrain (it holds {METRICS})")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number} is not a JSON object; is it a rotnet {METRICS}?")
        rows.append(row)
    return rows


def read_probe(run_dir: Path) -> list[dict[str, Any]]:
    """The results probe.json keeps, one per setting ([] when the run was never probed); a DataError
    when the file is not one rotnet wrote. The form written before results were kept per setting
    (one result at the top level) reads as a list of one."""
    path = Path(run_dir) / PROBE
    if not path.is_file():
        return []
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({str(e).splitlines()[0][:80]}); move it away, or probe with --no-save") from None
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
    """A checkpoint.pt, loaded without running code (see checkpoint.load_checkpoint)."""
    return load_checkpoint(path)


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


def weights_format(path: Path) -> str:
    """The marker of a rotnet safetensors file (run, export or rotation-head); a WeightsError otherwise."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own SafetensorError and OSError subclasses
        raise WeightsError(f"{path} is not a readable safetensors file (truncated or corrupt): {str(e)[:160]}") from e
    return read_weights_metadata(path, raw)[FORMAT_KEY]


# ----------------------------------------------------------------------------- writing a run directory


def write_config(out: Path, config: dict[str, Any], resolved: dict[str, Any]) -> Path:
    """config.json: the config as given, what it resolved to, library versions, command line, start time."""
    import timm
    import torch
    import torchvision

    return write_json(out / CONFIG, {
        "config": config,
        "resolved": resolved,
        "versions": {
            "rotnet": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "python": platform.python_version(),
        },
        "command": sys.argv,
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
    })


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl from the rows so far (left as it is when it already says the same)."""
    text = "".join(json.dumps(row) + "\n" for row in history)
    path = out / METRICS
    if path.is_file() and path.read_text() == text:
        return  # a resume with nothing new to say leaves the file as it is
    write_text(path, text)


def write_checkpoint(out: Path, state: dict[str, Any]) -> Path:
    return save_checkpoint(out / CHECKPOINT, state)


def write_probe(run_dir: Path, results: list[dict[str, Any]]) -> Path:
    """probe.json with every result kept, one per setting (rotnet probe decides which replaces which)."""
    return write_json(Path(run_dir) / PROBE, {"format": PROBE_FORMAT, "results": results})


def record_extension(out: Path, epochs: int, at_epoch: int) -> Path:
    """config.json of a run resumed with a larger --epochs: the new total (so a later --resume continues it)
    and, under "extended", when and from what it grew."""
    record = read_config(out)
    record.setdefault("extended", []).append({
        "from_epochs": record["config"].get("epochs"), "to_epochs": epochs, "at_epoch": at_epoch,
        "time": datetime.now().astimezone().isoformat(timespec="seconds"),
    })
    record["config"]["epochs"] = epochs
    return write_json(Path(out) / CONFIG, record)


def remove_temp_files(out: Path) -> None:
    """Delete what a process killed while writing left behind (``.NAME.XXXX.tmp``)."""
    remove_stale_temp_files(out, RUN_FILES)
    kept = Path(out) / CHECKPOINTS
    if kept.is_dir():
        remove_stale_temp_files(kept, ("*.safetensors",))


# ----------------------------------------------------------------------------- the output-folder policy
# Every command that writes a folder checks it here before any work starts, and nothing that
# existed is changed by a refused command. (A lock on run directories belongs here too.)


def default_run_dir(model: str) -> Path:
    """runs/MODEL-DATE-TIME, with the model name made safe for a folder."""
    safe = model.replace("/", "-").replace(":", "-")
    return Path("runs") / f"{safe}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def check_out_dir(
    out: Path, *, overwrite: bool, resume: bool = False, resumable: bool = False, inputs: tuple[str, ...] = (),
    inside_inputs: bool = False, overwrite_does: str = "replace it",
) -> None:
    """Refuse an --out that cannot be used; nothing is created or changed here.

    Refused: a file; a folder that is, or holds, one of ``inputs`` (and, unless
    ``inside_inputs``, one that lies inside an input folder); an existing non-empty folder,
    unless ``overwrite`` (or ``resume``, for a run that continues; ``resumable``: the
    command could continue the run it holds, so the message offers --resume).
    """
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; choose a folder name")
    resolved = out.resolve()
    for spec in inputs:
        given = Path(spec).expanduser()
        if not given.exists():
            continue
        given = given.resolve()
        if given == resolved or resolved in given.parents or (not inside_inputs and given.is_dir() and given in resolved.parents):
            hint = f", e.g. --out {out}/export" if inside_inputs else " (the originals are never changed)"
            raise OutputError(f"--out {out} overlaps the input {spec}; choose a folder outside the inputs{hint}")
    if resume:
        return
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        options = f"pass --resume {out} to continue it, " if resumable and (out / CHECKPOINT).is_file() else "pass "
        raise OutputError(f"--out {out} exists and is not empty; {options}--overwrite to {overwrite_does}, or choose another --out")


def prepare_run_dir(out: Path) -> None:
    """Create ``out`` and prove it can be written, before --overwrite moves anything."""
    make_dir(out)
    probe = out / ".rotnet-write-test"  # a folder we cannot write stays as it is
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write into {out}: {e.strerror}; choose another --out") from None


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


def staging_dir(out: Path) -> Path:
    """An empty hidden sibling of ``out`` to write a whole folder into (the final rename stays on one file system)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot create {out}: {e.strerror}; choose another --out") from e


def install_staged(staging: Path, out: Path) -> None:
    """Rename a finished staging folder into place; an existing ``out`` is replaced only now, after success."""
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes a private (0700) folder; outputs are meant to be shared
    if not out.exists():
        os.replace(staging, out)
        return
    previous = staging.with_name(staging.name + ".previous")
    os.replace(out, previous)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(previous, out)
        raise
    shutil.rmtree(previous, ignore_errors=True)


__all__ = [
    "CONFIG", "METRICS", "CHECKPOINT", "WEIGHTS", "PROBE", "EXPORT_CONFIG", "EXPORT_WEIGHTS", "EXPORT_HEAD",
    "MODEL_CARD", "RUN_FORMAT", "EXPORT_FORMAT", "HEAD_FORMAT", "save_weights", "read_weights_metadata",
    "read_config", "read_metrics", "read_probe", "read_checkpoint", "run_dir_of", "weights_format", "write_config",
    "write_metrics", "write_checkpoint", "write_probe", "check_out_dir", "prepare_run_dir", "ReplacedRun",
    "staging_dir", "install_staged", "default_run_dir", "CHECKPOINTS", "LOGS", "BEST", "kept_checkpoint",
    "epoch_checkpoint_name", "kept_checkpoint_names", "record_extension",
]
