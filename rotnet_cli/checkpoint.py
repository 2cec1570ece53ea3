"""Checkpoints and safetensors files: saved atomically (atomicfiles.py), loaded without running code."""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from . import jsontext
from ._version import __version__
from .atomicfiles import atomic_write
from .errors import WeightsError

CHECKPOINT_FORMAT = 2  # 2: the lr scheduler joined the training state


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """torch.save a dict of tensors and plain values (loadable with weights_only=True)."""
    state = {"format": CHECKPOINT_FORMAT, "rotnet_version": __version__, **state}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # through a Python file, so a full disk surfaces as an OSError
            torch.save(state, f)

    return atomic_write(path, write)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling code; every failure is a WeightsError."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(
            f"{path} is a folder, not a checkpoint file; give a run directory, checkpoint.pt or .safetensors file"
        )
    if not path.is_file():
        raise WeightsError(f"{path} does not exist; give a run directory, checkpoint.pt or .safetensors file")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path} is empty (0 bytes); it was not written completely, use another checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:  # no permission, a folder...: nothing was read, so nothing is called corrupt
        raise _unreadable(path, e) from None
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; this is something else
            raise WeightsError(
                f"{path} is not a PyTorch checkpoint and was not loaded; give a run directory, checkpoint.pt or .safetensors file"
            ) from e
        raise WeightsError(
            f"{path} needs arbitrary code to load and was refused (weights_only=True); "
            "re-save it as plain tensors or safetensors"
        ) from e
    except Exception as e:  # torch raises many types (KeyError, RuntimeError, EOFError...) for foreign bytes
        raise WeightsError(
            f"{path} is not a readable checkpoint (truncated, or not written by torch.save: {type(e).__name__}); "
            "give a run directory, checkpoint.pt or .safetensors file"
        ) from e
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a rotnet checkpoint dict")
    fmt = state.get("format")
    if isinstance(fmt, int) and fmt > CHECKPOINT_FORMAT:
        raise WeightsError(
            f"{path} was written by a newer rotnet ({state.get('rotnet_version', '?')}); upgrade rotnet to read it"
        )
    return state


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Atomic safetensors write; tensors are made contiguous and unshared first."""
    from safetensors.torch import save

    clean = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    # Serialised in memory and written by Python (not safetensors' save_file): a full disk is
    # then an OSError that atomic_write names, where safetensors' own writer reports a SafetensorError.
    return atomic_write(path, lambda tmp: tmp.write_bytes(save(clean, metadata=metadata)))


def load_safetensors(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata); truncated or foreign files are a WeightsError.

    The bytes are read by Python and parsed by safetensors from memory: safetensors' own file
    functions refuse paths that are not valid UTF-8, which a file system allows.
    """
    from safetensors.torch import load

    path = Path(path)
    data = _read_bytes(path)
    metadata = _safetensors_header_metadata(path, data[: 8 + _header_length(path, data[:8])])
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own SafetensorError for bytes it cannot parse
        raise WeightsError(f"{path} is not a readable safetensors file (truncated or corrupt): {str(e)[:160]}") from e
    return ({k: v.to(device) for k, v in tensors.items()} if str(device) != "cpu" else tensors), metadata


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file, read from its header alone (the tensors are not loaded)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            header = head + f.read(_header_length(path, head))
    except OSError as e:
        raise _unreadable(path, e) from None
    return _safetensors_header_metadata(path, header)


# A safetensors file starts with the length of its JSON header (u64, little endian), then the header,
# whose "__metadata__" holds the str -> str metadata (the format's specification).
MAX_SAFETENSORS_HEADER = 100 * 2**20  # safetensors' own limit


def _header_length(path: Path, head: bytes) -> int:
    if len(head) < 8:
        raise WeightsError(f"{path} is not a readable safetensors file (truncated or corrupt: {len(head)} bytes)")
    (length,) = struct.unpack("<Q", head)
    if length > MAX_SAFETENSORS_HEADER:
        raise WeightsError(f"{path} is not a readable safetensors file (its header claims {length} bytes)")
    return length


def _safetensors_header_metadata(path: Path, header: bytes) -> dict[str, str]:
    length = _header_length(path, header[:8])
    try:
        if len(header) < 8 + length:
            raise ValueError("the header is cut short")
        parsed = jsontext.loads(header[8 : 8 + length].decode("utf-8"))
        metadata = parsed.get("__metadata__") or {} if isinstance(parsed, dict) else None
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise ValueError("its metadata is not a map of strings")
    except ValueError as e:
        raise WeightsError(f"{path} is not a readable safetensors file (truncated or corrupt: {e})") from None
    return metadata


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise _unreadable(path, e) from None


def _unreadable(path: Path, e: OSError) -> WeightsError:
    """A file that cannot be opened: missing, a folder, no permission (not 'corrupt': nothing was read)."""
    if isinstance(e, FileNotFoundError):
        return WeightsError(f"{path} does not exist")
    if isinstance(e, PermissionError):
        return WeightsError(
            f"cannot read {path}: permission denied; make it readable (chmod u+r) or copy it somewhere readable"
        )
    return WeightsError(f"cannot read {path}: {e.strerror or e}")
