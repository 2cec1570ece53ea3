"""Which files are rotnet's (ownership sniffing) and the output-folder policy every command shares."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

from .. import jsontext
from ..atomicfiles import (
    make_dir,
)
from ..checkpoint import safetensors_metadata
from ..errors import DataError, OutputError, WeightsError
from ..shell import shell_quote
from .layout import (
    CHECKPOINT,
    CHECKPOINTS,
    CONFIG,
    EXPORT_DIR,
    EXPORT_FILES,
    EXPORT_FORMAT,
    EXPORT_ONNX,
    EXPORT_WEIGHTS,
    FORMAT_KEY,
    FORMATS,
    LOCK,
    LOG_ENTRIES,
    LOGS,
    METRICS,
    MODEL_CARD,
    PICTURE_SOFTWARE,
    PROBE,
    PROBE_FORMAT,
    RUN_FORMAT,
    WEIGHTS,
)

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
