"""The `rotnet` command: one small module per command; parse -> config -> call -> render."""

from __future__ import annotations

try:  # Ctrl-C while the CLI loads: one line and exit 130, as everywhere else (not an import traceback)
    from typing import Annotated

    import typer

    from .._version import __version__
    from . import export, predict, pretrain, probe, reproduce, viz
    from ._common import prepare_streams, set_debug, stop_at_start
except KeyboardInterrupt:
    import sys

    sys.stderr.write("stopped: interrupted before the command started; nothing was changed\n")
    raise SystemExit(130) from None

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


# Every command, registered in one place (the command modules know nothing of the app).
app.command(epilog=pretrain.EXAMPLES)(pretrain.pretrain)
app.command(epilog=probe.EXAMPLES)(probe.probe)
app.command(epilog=export.EXAMPLES)(export.export)
app.add_typer(viz.viz_app, name="viz")
app.command(epilog=predict.EXAMPLES)(predict.predict)
app.command(epilog=reproduce.EXAMPLES)(reproduce.reproduce)


def main() -> None:
    import signal

    prepare_streams()  # file names of any bytes print
    signal.signal(signal.SIGINT, stop_at_start)  # until a command's error boundary takes Ctrl-C over
    app(prog_name="rotnet")
