"""The safetensors metadata codec: str -> str on disk, typed facts in memory, a format marker saying what a file is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import jsontext
from .._version import __version__
from ..checkpoint import safetensors_metadata, save_safetensors
from ..errors import WeightsError
from .fields import FileFields, check_calibration_fields, check_training_images_fields, img_size_field
from .layout import FORMAT_KEY, FORMATS, HEAD_FORMAT, TEXT_FIELDS, plain_text

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
    img_size_field(fields, "img_size")
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


def weights_format(path: Path) -> str:
    """The marker of a rotnet safetensors file (run, export or rotation-head); a WeightsError otherwise."""
    return read_weights_metadata(path, safetensors_metadata(path))[FORMAT_KEY]
