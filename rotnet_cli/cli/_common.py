"""What every command shares: consoles, the error boundary, option types, rendering helpers.

Only the CLI imports typer and rich. Nothing here imports torch: `rotnet --help` must
stay fast, so commands import the library inside their bodies.
"""

from __future__ import annotations

import codecs
import functools
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape

from .. import jsontext, stopping
from ..errors import RotnetError


class PlainConsole(Console):
    """A console that never hands the terminal a control character from text it prints: a file name
    holding ESC[2J would clear the screen, a carriage return overwrite the line. Every string it
    renders (print's arguments, table cells and titles) has them shown as \\x1b, \\r; newlines and
    tabs stay (a multi-line snippet). One-line places also escape newlines: see ``visible``."""

    def render_str(self, text: str, **kwargs: Any) -> Any:
        return super().render_str(_TERMINAL_CONTROLS.sub(_escaped_control, text), **kwargs)


# Results go to stdout; messages, progress and errors to stderr, so `--json` output
# on stdout stays machine-readable.
out_console = PlainConsole(highlight=False)
err_console = PlainConsole(stderr=True, highlight=False)


def print_table(table: Any) -> None:
    """A result table on stdout, whole. On a terminal it fits the window; piped or redirected (a log
    file, CI) rich would squeeze it into 80 columns and cut words ("4 rotatio…"), so there it takes
    the width it needs."""
    if out_console.is_terminal:
        out_console.print(table)
        return
    from rich.measure import Measurement

    needed = Measurement.get(out_console, out_console.options.update(max_width=1000), table).maximum
    # print() clamps its width to the console's: a console of the needed width, on the same stream
    PlainConsole(file=out_console.file, width=max(out_console.width, needed), highlight=False).print(table)


_state = {"debug": False}


def set_debug(flag: bool) -> None:
    _state["debug"] = flag


def debug_enabled() -> bool:
    return _state["debug"] or os.environ.get("ROTNET_DEBUG", "") not in ("", "0")


# Typer's exits and usage errors pass through the boundary. Typer 0.29 carries its own copy of
# click (typer._click) while older releases raise click's classes: both are listed.
_CLI_FLOW = tuple(
    {
        typer.Exit,
        typer.Abort,
        click.exceptions.Exit,
        click.exceptions.Abort,
        click.exceptions.ClickException,
        next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"),
    }
)


def error_boundary(command: Callable) -> Callable:
    """Turn every error into one red line and an exit code; tracebacks only with --debug.

    Known errors (RotnetError) say what to do; running out of memory says what to lower; anything
    else is a bug and says so. Also where Ctrl-C changes meaning: before a command starts it ends
    the process at once (stopping.stop_at_start); inside the command it is a KeyboardInterrupt that the
    command may handle; once the command has failed, further Ctrl-Cs cannot interrupt the last line
    (stopping.py names these states).
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        owns_signals = stopping.command_started()  # run by main()
        prepare_streams()  # file names of any bytes print (also where a test runner replaced the streams)
        try:
            return _run_to_last_word(command, args, kwargs)
        finally:
            if owns_signals:  # the command has said its last word: a signal now only ends the process, quietly
                stopping.command_finished()

    return wrapper


def _run_to_last_word(command: Callable, args: tuple, kwargs: dict) -> Any:
    """Run the command; every error it raises becomes its one last line and an exit code (see error_boundary)."""
    try:
        return command(*args, **kwargs)
    except RotnetError as e:
        if debug_enabled():
            raise
        # a stop (exit 130) says so itself: "stopped after epoch 2 of 10; ... resume with: ..."
        error_line(None if e.exit_code == 130 else "error", str(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        error_line("stopped", "interrupted")
        raise typer.Exit(130) from None
    except _CLI_FLOW:
        raise  # Typer's own exits and usage errors (typer.Exit is a RuntimeError)
    except Exception as e:  # torch reports an allocation that failed as a RuntimeError
        if debug_enabled():
            raise
        if _caused_by_ctrl_c(e):  # Python wraps a Ctrl-C raised while a class is created in a RuntimeError
            error_line("stopped", "interrupted")
            raise typer.Exit(130) from None
        environment = _environment_problem(e)
        if environment:
            error_line("error", environment)
        elif _out_of_memory(e):
            error_line("error", "out of memory; lower --batch-size (or --img-size), or use a device with more memory")
        else:  # a bug: still one line, the traceback only on request
            report_bug(e)
        raise typer.Exit(1) from None


def error_line(prefix: str | None, message: str) -> None:
    """One line on stderr, whatever the message holds: control characters of file names (a newline,
    a terminal escape) are shown as \\n, \\x1b rather than breaking the line or the terminal. A
    further Ctrl-C cannot cut it short (it is the command's last word). No prefix: a stop's own
    message, which begins with "stopped", in yellow."""
    line = f"[bold red]{prefix}:[/] " if prefix == "error" else f"[yellow]{prefix}:[/] " if prefix else ""
    with stopping.last_word():
        # the message is plain text: square brackets in it (pip extras, paths) must survive
        line += escape(visible(message)) if prefix else f"[yellow]{escape(visible(message))}[/]"
        err_console.print(line, soft_wrap=True, markup=True, highlight=False)


_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 (\x9b starts an escape on some terminals)
_TERMINAL_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # the same but newline and tab


def _escaped_control(match: re.Match) -> str:
    return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(match[0], f"\\x{ord(match[0]):02x}")


def visible(text: str) -> str:
    """``text`` with its control characters escaped, so it prints as one line: every file name shown
    to the user (a message, a warning, a table cell) goes through here."""
    return _CONTROLS.sub(_escaped_control, text)


def shown(text: Any) -> str:
    """A path (or other text from outside) inside rich markup: not-UTF-8 bytes as \\xNN, control
    characters escaped (a name holding ESC[2J must not clear the screen), square brackets kept as text."""
    return escape(visible(os.fsencode(str(text)).decode("utf-8", "backslashreplace")))


_LIBRARIES = ("torch", "torchvision", "timm", "safetensors", "numpy", "PIL")


def _environment_problem(e: BaseException) -> str | None:
    """The machine, not rotnet: a library that cannot load (a memory limit too low to map torch's
    shared objects, a broken install), or no writable temporary folder. None for anything else."""
    text = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    if isinstance(e, FileNotFoundError) and "No usable temporary directory" in text:
        return (
            "no writable temporary folder with free space (TMPDIR, /tmp, /var/tmp): free space there, "
            "or set TMPDIR to a writable folder"
        )
    if isinstance(e, (ImportError, OSError)) and (
        (isinstance(e, ImportError) and (e.name or "").split(".")[0] in _LIBRARIES)
        or "failed to map segment" in text
        or any(f"lib{name}" in text for name in _LIBRARIES)
    ):
        if "failed to map segment" in text or "cannot allocate memory" in text.lower():
            return (
                f"could not load the libraries rotnet runs on ({text}): a memory limit is too low for them; "
                "raise it (ulimit -v, the job's memory request) and run again"
            )
        return f"could not load the libraries rotnet runs on ({text}); reinstall them: pip install --force-reinstall rotnet-cli"
    return None


def _out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return (
        isinstance(e, MemoryError)
        or type(e).__name__ == "OutOfMemoryError"
        or "can't allocate memory" in text
        or "out of memory" in text.lower()
    )


def _caused_by_ctrl_c(e: BaseException) -> bool:
    """Whether a KeyboardInterrupt is among the exceptions that caused ``e``."""
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _surrogates(error: UnicodeError) -> tuple[bytes, int]:
    """Codec error handler for stdout/stderr: a file name's undecodable bytes (surrogate escapes) are
    written as the bytes they were, so printed paths can be copied back; other lone surrogates as \\uXXXX."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    out = b""
    for char in error.object[error.start : error.end]:
        code = ord(char)
        out += bytes([code - 0xDC00]) if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}".encode()
    return out, error.end


codecs.register_error("rotnet-surrogates", _surrogates)


def prepare_streams() -> None:
    """stdout and stderr print any file name the file system allows (see _surrogates)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="rotnet-surrogates")


def report_bug(error: Exception) -> None:
    """One line for an exception rotnet did not expect: its type and message, and how to see more.

    The test suite replaces this function to turn every such line into a failing test.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__
    error_line(
        "error", f"{message} (unexpected: a bug in rotnet, please report it); rerun with --debug for the traceback"
    )


def print_json(obj: Any) -> None:
    """Machine output: one JSON document on stdout, nothing else there. Valid JSON: a figure that is
    not a finite number is null (bare NaN is not JSON)."""
    sys.stdout.write(json.dumps(finite_or_null(obj), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def print_commands(intro: str, commands: list[str]) -> None:
    """Commands to copy, each on one line of its own, never wrapped (a terminal's width or a
    pipe's 80 columns would break them mid-command) and never read as markup."""
    out_console.print(intro, markup=False, highlight=False, soft_wrap=True)
    for command in commands:
        out_console.print(f"  {command}", markup=False, highlight=False, soft_wrap=True)


def finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def note(message: str) -> None:
    err_console.print(message, highlight=False, soft_wrap=True)


def warn_skipped(files: list[str]) -> None:
    """The closing reminder of files a command left out (the library warned as it found them)."""
    if files:
        warn(f"{len(files)} file(s) that are not readable images were skipped, e.g. {files[0]}")


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {shown(message)}", highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- shared options
# Names follow timm's train.py where it has one.

DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, N or mps.")
]
PrecisionOpt = Annotated[
    str, typer.Option("--precision", help="auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (and nothing else there).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (data order, splits, initialisation).")]
WorkersOpt = Annotated[
    int,
    typer.Option(
        "--workers", "-j", help="Loader worker processes for image folders (default: CPU cores - 1, from 2 to 8)."
    ),
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch (before rotation).")]
ImgSizeOpt = Annotated[
    int | None,
    typer.Option("--img-size", help="Square input size in pixels (default: the dataset's own, else the model's)."),
]
WeightsImgSizeOpt = Annotated[  # commands that read weights: a saved run knows its size, timm:NAME does not
    int | None,
    typer.Option(
        "--img-size",
        help="Input size in pixels for timm:NAME and random:NAME weights (default: the model's own); saved weights "
        "run at the size they were trained at.",
    ),
]
DataDirOpt = Annotated[
    str | None,
    typer.Option("--data-dir", help="Where torchvision datasets live (default ~/.cache/rotnet/datasets/NAME)."),
]
DownloadOpt = Annotated[
    bool, typer.Option("--download/--no-download", help="Allow downloading a torchvision dataset (needs internet).")
]
StrictDataOpt = Annotated[
    bool,
    typer.Option("--strict-data/--no-strict-data", help="Stop at the first unreadable image instead of skipping it."),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite/--no-overwrite",
        help="Replace an existing output: rotnet's own files only; files it did not write are never replaced.",
    ),
]
RUN_IDENTITY = ("out", "overwrite", "resume")  # in a run's config.json: where that run went, not how it trained


def read_options_file(path: str, ctx: typer.Context) -> dict[str, Any]:
    """--config FILE.yaml|json: option name -> value, checked against the command's options like the command line.

    A flat mapping of option names (``batch_size`` or ``batch-size``); a run's config.json is read
    as its "config" (without out, overwrite and resume, so that repeating a run never writes over it).
    Lists become the comma-separated text the options take (rotations: [0, 90] -> 0,90).
    """
    import difflib

    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise typer.BadParameter(f"cannot read {file}: {e.strerror}", param_hint="--config") from None
    except UnicodeDecodeError:  # a binary file, or text in another encoding
        raise typer.BadParameter(
            f"{file} is not UTF-8 text; give a YAML or JSON file of options, e.g. epochs: 30", param_hint="--config"
        ) from None
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            record = yaml.load(
                text, Loader=_unique_keys_yaml_loader()
            )  # a SafeLoader subclass: no tags that build objects
        else:
            record = jsontext.loads(text)
            json.loads(text, object_pairs_hook=_refuse_duplicate_keys)  # depth already bounded by jsontext
    except Exception as e:  # yaml's and json's own errors: the file is not what it claims
        first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise typer.BadParameter(
            f"{file} is not valid {'YAML' if file.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {first}",
            param_hint="--config",
        ) from None
    if (
        isinstance(record, dict) and isinstance(record.get("config"), dict) and "resolved" in record
    ):  # a run's config.json
        from ..config import as_trained

        # what that run trained with: an old run's augment true/false, or its plan's values left unset
        trained = as_trained(record["config"], record.get("resolved"))
        # which of those its data plan chose, not its command line (pretrain plans them again for other --data)
        ctx.meta[PLANNED_BY_CONFIG] = (planned_fields(record), record["config"].get("data"))
        record = {k: v for k, v in trained.items() if k not in RUN_IDENTITY}
    if not isinstance(record, dict):
        raise typer.BadParameter(
            f"{file} must hold a mapping of option names to values, e.g. epochs: 30", param_hint="--config"
        )
    params = {p.name: p for p in ctx.command.params if p.name not in ("config_file", "help")}
    names = {opt.lstrip("-").replace("-", "_"): p.name for p in params.values() for opt in p.opts}  # --opt, -j ... too
    options: dict[str, Any] = {}
    for key, value in record.items():
        norm = str(key).lstrip("-").replace("-", "_")
        name = names.get(norm) or (norm if norm in params else None)
        if name is None:
            close = difflib.get_close_matches(str(key).replace("-", "_"), list(params), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise typer.BadParameter(f"{file}: {key!r} is not an option of this command{hint}", param_hint="--config")
        value = _as_typed(params[name], value, f"{file}: {key}")
        if value is not None:
            try:
                params[name].process_value(ctx, value)  # converted and checked as the command line's would be
            except typer.BadParameter as e:
                raise typer.BadParameter(f"{file}: {key}: {e.format_message()}", param_hint="--config") from None
        options[name] = value
    return options


# ctx.meta key: (the options a --config run's data plan chose, the data that run planned them for)
PLANNED_BY_CONFIG = "rotnet.planned_by_config"


def planned_fields(record: dict[str, Any]) -> set[str]:
    """The options a run's config.json says its data plan chose (resolved.plan: each value's why), not
    its command line ("asked for"); a run from before the plan: those it left unset."""
    from ..config import PLANNED_FIELDS

    config, resolved = record["config"], record.get("resolved")
    plan = resolved.get("plan") if isinstance(resolved, dict) else None
    if not isinstance(plan, dict):
        return {name for name in PLANNED_FIELDS if config.get(name) in (None, "auto")}
    decisions = {name: plan.get(name) for name in PLANNED_FIELDS}
    return {
        name
        for name, decision in decisions.items()
        if isinstance(decision, dict) and not str(decision.get("why", "")).startswith("asked for")
    }


class DuplicateOptionKey(ValueError):
    """A --config file names one option twice: which value the user meant is unknowable."""


def _refuse_duplicate_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateOptionKey(f"{key!r} is given twice; keep one")
        seen[key] = value
    return seen


def _unique_keys_yaml_loader() -> Any:
    """yaml's SafeLoader keeps the last of two equal keys without a word; this one refuses them."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
            for i, key in enumerate(keys):
                if isinstance(key, str | int | float | bool) and key in keys[:i]:
                    raise DuplicateOptionKey(f"{key!r} is given twice; keep one")
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _as_typed(param: Any, value: Any, where: str) -> Any:
    """A --config value as the command line would give it: text (click then parses and checks it as
    it parses argv), so ``epochs: true`` is refused like ``--epochs true`` rather than read as 1;
    a flag takes true/false only; a list becomes the comma-separated text, of scalars only."""
    if value is None:
        return None
    if getattr(param, "is_flag", False):
        if not isinstance(value, bool):
            raise typer.BadParameter(f"{where}: {_shown_value(value)} is not true or false", param_hint="--config")
        return value
    if isinstance(value, (list, tuple)):
        if "str" not in _declared_type(param):  # only text options take a comma list (rotations, milestones)
            raise typer.BadParameter(
                f"{where}: a list is not a value of this option; give one value", param_hint="--config"
            )
        if any(isinstance(v, (list, tuple, dict)) for v in value):
            raise typer.BadParameter(f"{where}: a list of lists is not an option's value", param_hint="--config")
        return ",".join(map(str, value))
    if isinstance(value, bool):
        raise typer.BadParameter(f"{where}: {_shown_value(value)} is not a value of this option", param_hint="--config")
    if isinstance(value, dict):
        raise typer.BadParameter(f"{where}: a mapping is not an option's value", param_hint="--config")
    return str(value)


def _declared_type(param: Any) -> str:
    """The option's annotation as text ("int", "float | None", "str"); "str" where typer cannot say."""
    try:
        return str(param.bare_type())
    except Exception:  # an older typer without bare_type: keep lists working as before
        return "str"


def _shown_value(value: Any) -> str:
    return "true" if value is True else "false" if value is False else repr(value)[:40]


def _load_options_file(ctx: typer.Context, param: Any, value: str | None) -> str | None:
    """--config: the file's values become the defaults of this invocation, so the command line wins."""
    if value:
        ctx.default_map = {**(ctx.default_map or {}), **read_options_file(value, ctx)}
    return value


ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        is_eager=True,
        callback=_load_options_file,
        help="YAML or JSON file of options (a run's config.json too); options on the command line win.",
    ),
]
WeightsArg = Annotated[
    str,
    typer.Argument(
        help="Weights: a run directory, checkpoint.pt, model.safetensors, an exported folder, timm:NAME or random:NAME.",
        show_default=False,
    ),
]
