"""The names and formats of the folders rotnet writes: the contract between commands.

Every fact about the folders rotnet writes lives here: file names, how each file is read
(validated like user input: a DataError or WeightsError that names the file), how it is
written (atomically, through atomicfiles.py), the safetensors metadata with its format
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

from ..atomicfiles import (
    printable,
)

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
    """``text`` as valid Unicode (see atomicfiles.printable): for safetensors metadata."""
    return printable(text)
