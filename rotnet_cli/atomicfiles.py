"""Atomic files: a crash never leaves half a file, a failed write never changes the old one.

Every file rotnet writes goes through ``atomic_write`` (temp file in the same folder, fsync,
rename); checkpoint.py and the rundir writers build on it.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import DiskFullError, OutputError
from .stopping import signals_deferred

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write(tmp_path)``: temp file in the same folder, fsync, rename.

    The rename is atomic on POSIX, so readers see the old complete file or the new complete
    one, never a mix. On any failure the temp file is removed and the old file is intact; a
    full disk or a folder that cannot be written is an OutputError naming the file.
    """
    path = Path(path)
    tmp: Path | None = None
    existed = path.exists()
    try:
        with signals_deferred():  # a Ctrl-C (or SIGTERM) lands after the rename, never inside torch.save
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
            os.close(fd)
            tmp = Path(tmp_name)
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual mode
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
            _fsync_dir(path.parent)
    except BaseException as e:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # a folder that forbids it (append-only): the error that stopped the write is the one to tell
        os_error = os_error_behind(e) if isinstance(e, Exception) else None
        if os_error is not None and os_error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            # what to do next depends on the command (resume, start again, export again): callers may say more
            kept = "its previous version is intact" if existed else "nothing was written"
            raise DiskFullError(
                path, f"disk full while writing {path} ({kept}); free space and run the command again"
            ) from e
        if os_error is not None and os_error.errno in (
            errno.EACCES,
            errno.EROFS,
            errno.EPERM,
            errno.ENOENT,
            errno.ENOTDIR,
        ):
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
        # a file where a folder of the path should be: name it (mkdir -p names only the folder it could not make)
        in_the_way = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if in_the_way is not None:
            raise OutputError(f"{in_the_way} is a file, not a folder; choose another --out") from None
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
    # file names that are not UTF-8 (surrogate escapes) are written as \\xNN rather than failing the whole write
    return atomic_write(path, lambda tmp: tmp.write_bytes(encode_text(text)))


def encode_text(text: str) -> bytes:
    """UTF-8 bytes of ``text``; an undecodable file name in it (surrogate escapes) becomes \\xNN, never an error."""
    return printable(text).encode("utf-8")


def printable(text: str) -> str:
    """``text`` as valid Unicode: the undecodable bytes of a file name (Python's surrogate escapes) as
    \\xNN, any other lone surrogate as \\uXXXX. For places that hold only Unicode (safetensors
    metadata, a model card); files themselves are always opened by their real names."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def write_json(path: str | Path, obj: Any) -> Path:
    """JSON that every parser reads: NaN and infinity are refused here (ValueError), never written as bare NaN."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")
