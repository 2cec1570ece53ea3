"""Writing a run directory: the files, the lock, RunDirWriter, an overwritten run set aside and put back, and
folders written whole (an export) through a staging folder."""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import jsontext
from .._version import __version__
from ..atomicfiles import (
    current_umask,
    encode_text,
    make_dir,
    remove_stale_temp_files,
    write_json,
    write_text,
)
from ..checkpoint import save_checkpoint
from ..errors import OutputError
from ..shell import shell_join
from .layout import (
    CHECKPOINT,
    CHECKPOINTS,
    CONFIG,
    LOCK,
    METRICS,
    PROBE,
    PROBE_FORMAT,
    REPLACED,
    REPLACING,
    RESTORING,
    RUN_ENTRIES,
    RUN_FILES,
)
from .policy import missing_folders, remove_if_empty
from .reading import read_config, read_probe

# ----------------------------------------------------------------------------- writing a run directory

PROBE_SAVE_WAIT_S = 10.0  # a probe saving waits this long for another probe's save (milliseconds), not for a run


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

    def __enter__(self) -> FolderLock:
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

    def __enter__(self) -> RunDirWriter:
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
