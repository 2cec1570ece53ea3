"""The `rotnet` command: one small module per command; parse -> config -> call -> render."""

from __future__ import annotations

from typing import Annotated

import typer

from .._version import __version__
from ._common import set_debug

app = typer.Typer(
    name="rotnet",
    help=(
        "RotNet self-supervised learning for any timm backbone: a network learns features by "
        "predicting which rotation was applied to an image (Gidaris et al., ICLR 2018). No labels needed."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rotnet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks (also ROTNET_DEBUG=1).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    set_debug(debug)


# Each command registers itself on `app` when its module is imported.
from . import pretrain as _pretrain  # noqa: E402,F401

# --- more commands register below (one import each) ---
from . import reproduce as _reproduce  # noqa: E402,F401
from . import predict as _predict  # noqa: E402,F401
from . import export as _export  # noqa: E402,F401
from . import probe as _probe  # noqa: E402,F401
from . import viz as _viz  # noqa: E402,F401


def main() -> None:
    app(prog_name="rotnet")
