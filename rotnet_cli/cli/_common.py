"""What every command shares: consoles, the error boundary, option types, rendering helpers.

Only the CLI imports typer and rich. Nothing here imports torch: `rotnet --help` must
stay fast, so commands import the library inside their bodies.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Annotated, Any, Callable, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape

from ..errors import RotnetError

# Results go to stdout; messages, progress and errors to stderr, so `--json` output
# on stdout stays machine-readable.
out_console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

_state = {"debug": False}


def set_debug(flag: bool) -> None:
    _state["debug"] = flag


def debug_enabled() -> bool:
    return _state["debug"] or os.environ.get("ROTNET_DEBUG", "") not in ("", "0")


# Typer's exits and usage errors pass through the boundary. Typer 0.29 carries its own copy of
# click (typer._click) while older releases raise click's classes: both are listed.
_CLI_FLOW = tuple({
    typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.exceptions.ClickException,
    next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"),
})


def error_boundary(command: Callable) -> Callable:
    """Turn every error into one red line and an exit code; tracebacks only with --debug.

    Known errors (RotnetError) say what to do; anything else is a bug and says so.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except RotnetError as e:
            if debug_enabled():
                raise
            style = "yellow" if e.exit_code == 130 else "bold red"
            prefix = "stopped" if e.exit_code == 130 else "error"
            # the message is plain text: square brackets in it (pip extras, paths) must survive
            err_console.print(f"[{style}]{prefix}:[/] {escape(str(e))}", soft_wrap=True, markup=True, highlight=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            err_console.print("[yellow]stopped:[/] interrupted")
            raise typer.Exit(130) from None
        except _CLI_FLOW:
            raise  # Typer's own exits and usage errors (typer.Exit is a RuntimeError)
        except Exception as e:  # a bug: still one line, the traceback only on request
            if debug_enabled():
                raise
            report_bug(e)
            raise typer.Exit(1) from None

    return wrapper


def report_bug(error: Exception) -> None:
    """One line for an exception rotnet did not expect: its type and message, and how to see more.

    The test suite replaces this function to turn every such line into a failing test.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__
    err_console.print(
        f"[bold red]error:[/] {escape(message)} (unexpected: a bug in rotnet, please report it); "
        "rerun with --debug for the traceback",
        soft_wrap=True, markup=True, highlight=False,
    )


def print_json(obj: Any) -> None:
    """Machine output: one JSON document on stdout, nothing else there."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def note(message: str) -> None:
    err_console.print(message, highlight=False, soft_wrap=True)


def warn_skipped(files: list[str]) -> None:
    """The closing reminder of files a command left out (the library warned as it found them)."""
    if files:
        warn(f"{len(files)} file(s) that are not readable images were skipped, e.g. {files[0]}")


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- shared options
# Names follow timm's train.py where it has one.

DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, N or mps.")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (and nothing else there).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (data order, splits, initialisation).")]
WorkersOpt = Annotated[int, typer.Option("--workers", "-j", help="Loader worker processes for image folders (default: CPU cores - 1, from 2 to 8).")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch (before rotation).")]
ImgSizeOpt = Annotated[Optional[int], typer.Option("--img-size", help="Square input size in pixels (default: the dataset's own, else the model's).")]
DataDirOpt = Annotated[Optional[str], typer.Option("--data-dir", help="Where torchvision datasets live (default ~/.cache/rotnet/datasets/NAME).")]
DownloadOpt = Annotated[bool, typer.Option("--download", help="Allow downloading a torchvision dataset (needs internet).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing non-empty output.")]
WeightsArg = Annotated[
    str,
    typer.Argument(
        help="Weights: a run directory, checkpoint.pt, model.safetensors, an exported folder, timm:NAME or random:NAME.",
        show_default=False,
    ),
]
