"""Atomic writes and safe loads: a crash never leaves half a file, a load never runs code."""

from __future__ import annotations

import errno
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from ._version import __version__
from .errors import OutputError, WeightsError

CHECKPOINT_FORMAT = 2  # 2: the lr scheduler joined the training state
TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write(tmp_path)``: temp file in the same folder, fsync, rename.

    The rename is atomic on POSIX, so readers see the old complete file or the new complete
    one, never a mix. On any failure the temp file is removed and the old file is intact; a
    full disk or a folder that cannot be written is an OutputError naming the file.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual mode
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        os_error = os_error_behind(e) if isinstance(e, Exception) else None
        if os_error is not None and os_error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OutputError(f"disk full while writing {path}; free space and resume (the previous file is intact)") from e
        if os_error is not None and os_error.errno in (errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOENT, errno.ENOTDIR):
            raise OutputError(f"cannot write {path}: {os_error.strerror}; choose another --out") from e
        raise
    return path


def os_error_behind(e: BaseException) -> OSError | None:
    """The OSError that caused ``e``: torch.save reports a full disk as a RuntimeError raised
    while handling the OSError, so the chain of causes is searched."""
    seen = 0
    current: BaseException | None = e
    while current is not None and seen < 8:
        if isinstance(current, OSError) and current.errno is not None:
            return current
        current = current.__cause__ or current.__context__
        seen += 1
    return None


def make_dir(folder: str | Path) -> Path:
    """mkdir -p; a failure (no permission, a file in the way) is an OutputError, not a traceback."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {folder}: {e.strerror}; choose another --out") from None
    return folder


def remove_stale_temp_files(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temp files of ``names`` that a killed process left in ``folder`` (``.NAME.XXXX.tmp``)."""
    stale = [p for name in names for p in Path(folder).glob(f".{name}.*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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
    if not path.is_file():
        raise WeightsError(f"{path} does not exist; give a run directory, checkpoint.pt or .safetensors file")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path} is empty (0 bytes); it was not written completely, use another checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
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
    """(tensors, metadata); truncated or foreign files are a WeightsError."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path), device=device)
    except Exception as e:  # safetensors raises its own SafetensorError and OSError subclasses
        raise WeightsError(f"{path} is not a readable safetensors file (truncated or corrupt): {str(e)[:160]}") from e
    return tensors, metadata
