"""predict's files: where each upright copy goes, which files in --out are predict's own, and
the repair of what an interrupted in-place turn left behind.

- Layout: one folder input is mirrored below --out; with several, each keeps its folder's name
  (two camera folders that both hold IMG_0001.png predict together). Names that would still
  collide are refused only when copies are written.
- Ownership: --overwrite replaces rotnet's own files and refuses anything else (rundir's
  policy). A picture has no room for a marker that survives every format, so predict lists
  what it wrote, with each file's SHA-256, in a manifest in --out; a file is predict's own when
  the manifest names it and its bytes are still the ones predict wrote.
- In place: one process turns an image at a time (an advisory lock on the file); a turn that a
  kill -9 stopped left the original untouched, maybe with a temp file and a backup identical to
  it; the next run on the image removes both and says so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import data as data_lib
from . import rundir
from .atomicfiles import TEMP_SUFFIX, write_json
from .errors import ConfigError, DataError, OutputError

# in --out: {"format": MANIFEST_FORMAT, "files": {relative path: sha256}}, and while a run writes
# copies, PENDING: one line per copy, [relative path, sha256], appended before the copy is renamed
# into place, so that what a killed run wrote is still predict's to replace -- by its content: a
# file the user put or edited there afterwards is theirs (a bare list of names would take it too)
MANIFEST = ".rotnet-predict.json"
PENDING = ".rotnet-predict.pending"
REPORT_CSV = "predictions.csv"
REPORT_JSON = "predictions.json"
# names at the top of --out that are predict's own: no copy may be written there
OWN_NAMES = (REPORT_CSV, REPORT_JSON, MANIFEST, PENDING)
MANIFEST_FORMAT = "rotnet-predict-outputs"
# Formats cameras and phones write that this build cannot decode: a row says so instead of silence.
UNSUPPORTED_IMAGE_EXTENSIONS = (
    ".heic",
    ".heif",
    ".cr2",
    ".cr3",
    ".nef",
    ".arw",
    ".dng",
    ".raf",
    ".orf",
    ".rw2",
    ".jxl",
    *((".avif",) if not data_lib.AVIF else ()),  # an older Pillow: no AVIF decoder
)
UNSUPPORTED_NOTE = "format not supported (convert it to JPEG or PNG first)"


@dataclass(frozen=True)
class InputImage:
    path: Path
    relative: Path  # where its upright copy goes below --out
    supported: bool = True  # False: a format rotnet cannot decode (a row says so)


# ----------------------------------------------------------------------------- inputs and their layout below --out


def collect_inputs(specs: tuple[str, ...], writes_copies: bool) -> list[InputImage]:
    """Files as given, folders recursively; each image once, in a reproducible order.

    Several folders keep their names below --out; a name that still collides is refused
    when ``writes_copies`` (nothing would tell the copies apart), and never otherwise."""
    folders = [spec for spec in specs if Path(spec).expanduser().is_dir()]
    keep_names = len(folders) > 1
    found, seen = [], set()
    for spec in specs:
        try:
            pairs = data_lib.image_inputs([spec])  # a file given by name is taken whatever its ending
        except DataError:
            if spec not in folders or not _unsupported_files([spec], False, set()):
                raise
            pairs = []  # only HEIC or raw files: each gets its row
        for path, relative in pairs:
            if _identity(path) not in seen:
                seen.add(_identity(path))
                found.append(InputImage(path, relative, path.suffix.lower() not in UNSUPPORTED_IMAGE_EXTENSIONS))
    if keep_names:
        found = [_below_its_folder(image, folders) for image in found]
    found += _unsupported_files(folders, keep_names, {_identity(image.path) for image in found})
    if writes_copies:
        _refuse_collisions(found)
    return found


def _identity(path: Path) -> str:
    """Where a file really is, for telling one image given twice: os.path.realpath, since
    Path.resolve raises on a self-looping link (which is an unreadable file, given its row)."""
    return os.path.realpath(path)


def _folder_name(spec: str) -> str:
    """The folder's name as given (a link keeps its own name); "." and ".." by the folder they mean."""
    return Path(os.path.abspath(Path(spec).expanduser())).name or "root"


def _below_its_folder(image: InputImage, folders: list[str]) -> InputImage:
    for spec in folders:
        root = Path(spec).expanduser()
        if image.path == root / image.relative:
            return InputImage(image.path, Path(_folder_name(spec)) / image.relative, image.supported)
    return image  # a file given by itself keeps its bare name


def _unsupported_files(folders: list[str], keep_names: bool, seen: set[Path]) -> list[InputImage]:
    """The files of formats rotnet cannot decode below the folders (each once, none already in ``seen``)."""
    found = []
    for spec in folders:
        root = Path(spec).expanduser()
        _, others = data_lib._scan(root)  # the image scan's walk: its rules for links and hidden files
        for path in others:
            if path.suffix.lower() in UNSUPPORTED_IMAGE_EXTENSIONS and _identity(path) not in seen:
                seen.add(_identity(path))
                relative = path.relative_to(root)
                found.append(InputImage(path, Path(_folder_name(spec)) / relative if keep_names else relative, False))
    return found


def _refuse_collisions(found: list[InputImage]) -> None:
    targets: dict[Path, Path] = {}
    for image in found:
        if image.relative.parts[0] in OWN_NAMES:  # the report (or the list of predict's files) would replace it
            raise ConfigError(
                f"{image.path} would be written as {image.relative} below --out, where predict writes "
                f"its own {image.relative.parts[0]}; rename it, or predict it without --fix"
            )
        other = targets.setdefault(image.relative, image.path)
        if other != image.path:
            # below a folder kept by name: renaming a folder helps; a bare name (a file given by
            # itself, or one folder's mirror) needs the file renamed
            fix = "give their folders different names" if len(image.relative.parts) > 1 else "rename one of them"
            raise ConfigError(
                f"{other} and {image.path} would both be written as {image.relative} below --out; "
                f"{fix}, or predict them in separate runs"
            )


# ----------------------------------------------------------------------------- which files in --out are predict's


def refuse_report_among_inputs(out: Path, specs: tuple[str, ...]) -> None:
    """--in-place --out: the report's folder must not overlap the inputs (the report would land
    among the photos it describes); the message says what --out is for under --in-place."""
    resolved = out.expanduser().resolve()
    for spec in specs:
        given = Path(spec).expanduser()
        if not given.exists():
            continue
        given = given.resolve()
        if given == resolved or resolved in given.parents or (given.is_dir() and given in resolved.parents):
            raise OutputError(
                f"--out {out} overlaps the input {spec}; with --in-place the images are turned where they are "
                "and --out holds only the report: choose a folder outside the inputs, e.g. --out report"
            )


def check_replaceable(out: Path, names: Iterable[Path]) -> None:
    """With --overwrite: every existing file predict would write in ``out`` (``names``, relative)
    must be one predict wrote there and nobody changed since; anything else is refused."""
    if not out.is_dir():
        return
    owned = read_manifest(out)
    if os.path.lexists(out / MANIFEST) and owned is None:
        rundir.raise_foreign(out, out / MANIFEST)
    pending = out / PENDING
    if os.path.lexists(pending) and (pending.is_symlink() or not pending.is_file()):
        rundir.raise_foreign(out, pending)
    for relative in names:
        _refuse_link_below(out, relative)
        entry = out / relative
        if entry.is_dir() and not entry.is_symlink():
            continue  # never replaced: the copy meant for it fails, and its row says why
        if os.path.lexists(entry) and not is_own(out, relative, owned):
            rundir.raise_foreign(out, entry)
    held = rundir.folder_kind(out)
    if held is not None:
        what = "a training run's files" if held == "run" else "an exported model"
        raise OutputError(
            f"--out {out} holds {what}, and predict writes only into a folder of its own; choose another --out"
        )


def _refuse_link_below(out: Path, relative: Path) -> None:
    """A folder below --out that is a link (perhaps to the photos themselves) would take the copy
    out of --out: a file there may be byte for byte predict's and still be the user's only one."""
    folder = out
    for part in relative.parent.parts:
        folder = folder / part
        if folder.is_symlink():
            raise OutputError(
                f"--out {out}: {folder} is a link (to {os.readlink(folder)}), and predict writes only inside "
                "--out itself; remove the link or choose another --out"
            )


@dataclass
class Manifest:
    """What predict wrote in an --out: relative path -> SHA-256, and the copies a killed run was
    writing: relative path -> the SHA-256s it was about to put there."""

    files: dict[str, str]
    pending: dict[str, set[str]]


def is_own(out: Path, relative: Path, owned: Manifest | None) -> bool:
    entry = out / relative
    if owned is None or entry.is_symlink() or not entry.is_file():
        return False
    key = relative.as_posix()
    digest = file_digest(entry)
    return owned.files.get(key) == digest or digest in owned.pending.get(key, ())


def read_manifest(out: Path) -> Manifest | None:
    """What predict wrote in ``out``; None when there is no valid manifest."""
    path = out / MANIFEST
    try:
        if path.is_symlink() or path.stat().st_size > 64 * 2**20:
            return None
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or record.get("format") != MANIFEST_FORMAT:
        return None
    files = record.get("files")
    if not isinstance(files, dict):
        return None
    return Manifest(
        {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, str) and len(v) == 64},
        _read_pending(out),
    )


def _read_pending(out: Path) -> dict[str, set[str]]:
    """The copies a killed run was writing (PENDING's lines); a line that is not one is ignored."""
    pending: dict[str, set[str]] = {}
    path = out / PENDING
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 64 * 2**20:
            return pending
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return pending
    for line in lines:
        try:
            key, digest = json.loads(line)
        except (ValueError, TypeError, RecursionError):
            continue
        if isinstance(key, str) and isinstance(digest, str) and len(digest) == 64:
            pending.setdefault(key, set()).add(digest)
    return pending


def record_written(out: Path, written: Iterable[Path]) -> Path:
    """The manifest once the run's files are written: theirs and the earlier files still as
    predict wrote them, each by its SHA-256 (a copy a killed run wrote counts as written)."""
    owned = read_manifest(out) or Manifest({}, {})
    files = {}
    for key in {*owned.files, *owned.pending}:
        with contextlib.suppress(OSError, ValueError):
            if is_own(out, Path(key), owned):
                files[key] = file_digest(out / key)
    for path in map(Path, written):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError, ValueError):
                files[path.relative_to(out).as_posix()] = file_digest(path)
    manifest = _write_manifest(out, Manifest(files, {}))
    with contextlib.suppress(OSError):
        (out / PENDING).unlink(missing_ok=True)
    return manifest


def record_started(out: Path) -> Path:
    """The manifest before any copy is written: the folder of a run killed before its end is predict's."""
    return _write_manifest(out, read_manifest(out) or Manifest({}, {}))


def record_pending(out: Path, target: Path, content: bytes) -> None:
    """Before ``content`` is renamed into ``target`` (below ``out``): note it, flushed to disk,
    so that the copy is predict's to replace even if this run is killed right after."""
    line = json.dumps([target.relative_to(out).as_posix(), hashlib.sha256(content).hexdigest()]) + "\n"
    fd = os.open(out / PENDING, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, line.encode("ascii"))  # ensure_ascii: a name that is not UTF-8 stays its surrogate escapes
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(out: Path, manifest: Manifest) -> Path:
    # ensure_ascii: a name that is not UTF-8 is kept as its surrogate escapes and read back exactly
    record = {"format": MANIFEST_FORMAT, "files": manifest.files}
    return write_json(out / MANIFEST, record)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- in place: one turn at a time, repaired


@contextlib.contextmanager
def turn_lock(path: Path) -> Iterator[bool]:
    """Hold an advisory lock on the image while it is turned; yields False when another process
    holds it (a second predict on the same file). A file system without locks yields True."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield True  # the turn itself reports why the file cannot be read
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                yield False
                return
        yield True
    finally:
        os.close(fd)


_TEMP_NAME = re.compile(rf"\.(.+)\.[A-Za-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}")  # atomic_write's mkstemp names


def stale_temp_files(files: Iterable[Path]) -> dict[Path, list[Path]]:
    """file -> the temp files a killed write of it left beside it (``.NAME.XXXXXXXX.tmp``).
    One listing per folder, not per file: a folder of 10,000 photos is listed once."""
    by_folder: dict[Path, dict[str, Path]] = {}
    for path in files:
        by_folder.setdefault(path.parent, {})[path.name] = path
    found: dict[Path, list[Path]] = {}
    for folder, names in by_folder.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            match = _TEMP_NAME.fullmatch(entry.name)
            if match and match.group(1) in names and entry.is_file(follow_symlinks=False):
                found.setdefault(names[match.group(1)], []).append(Path(entry.path))
    return found


def remove_files(paths: Iterable[Path]) -> list[str]:
    removed = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path.name)
    return removed


def backup_is_the_original(image: Path, backup: Path) -> bool:
    """The backup is the file itself (a hard link) or a byte-for-byte copy: keeping it keeps nothing."""
    try:
        if backup.is_symlink() or not backup.is_file():
            return False
        if os.path.samefile(image, backup):
            return True
        return backup.stat().st_size == image.stat().st_size and file_digest(backup) == file_digest(image)
    except OSError:
        return False


def ownership(path: Path) -> tuple[int, int, int] | None:
    """(uid, gid, permission bits) of the file, None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


def describe_ownership(before: tuple[int, int, int], after: tuple[int, int, int]) -> str:
    return (
        f"owner, group and mode not kept: {before[0]}:{before[1]} {before[2]:o} before, "
        f"{after[0]}:{after[1]} {after[2]:o} now"
    )


__all__ = [
    "InputImage",
    "collect_inputs",
    "check_replaceable",
    "record_written",
    "record_pending",
    "record_started",
    "read_manifest",
    "turn_lock",
    "stale_temp_files",
    "remove_files",
    "backup_is_the_original",
    "MANIFEST",
    "REPORT_CSV",
    "REPORT_JSON",
    "UNSUPPORTED_NOTE",
]
