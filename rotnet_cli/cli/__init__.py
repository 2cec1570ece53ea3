"""The `rotnet` command: one small module per command; parse -> config -> call -> render."""

from __future__ import annotations

from .. import stopping

# Ctrl-C while the CLI loads: its KeyboardInterrupt normally lands in the except below, but a library
# that catches broad exceptions while it imports (rich, typer and their dependencies probe optional
# modules) can swallow it, and the command then ran to its end. So the Ctrl-C is also counted and
# main() honours it (stopping.py names every state a signal meets).
stopping.while_loading()

try:  # Ctrl-C while the CLI loads: one line and exit 130, as everywhere else (not an import traceback)
    from typing import Annotated

    import typer

    from .._version import __version__
    from . import embed, export, predict, pretrain, probe, reproduce, score, viz
    from ._common import prepare_streams, set_debug
    from ._typer import RotnetCommand, RotnetGroup, show_help_when_bare
except KeyboardInterrupt:
    import sys

    sys.stderr.write("stopped: interrupted before the command started; nothing was changed\n")
    raise SystemExit(130) from None


class _Rotnet(RotnetGroup):
    # the workflow, as the README's table
    order = ("pretrain", "probe", "embed", "neighbours", "export", "viz", "predict", "score", "reproduce")


app = typer.Typer(
    cls=_Rotnet,
    name="rotnet",
    help=(
        "RotNet self-supervised learning for any timm backbone: a network learns features by "
        "predicting which rotation was applied to an image (Gidaris et al., ICLR 2018). No labels needed."
    ),
    invoke_without_command=True,  # bare `rotnet`: the help, exit 0
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
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks (also ROTNET_DEBUG=1).")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    set_debug(debug)
    show_help_when_bare(ctx)


# Every command, registered in one place (the command modules know nothing of the app).
app.command(cls=RotnetCommand, epilog=pretrain.EXAMPLES)(pretrain.pretrain)
app.command(cls=RotnetCommand, epilog=probe.EXAMPLES)(probe.probe)
app.command(cls=RotnetCommand, epilog=export.EXAMPLES)(export.export)
viz.viz_app.command("embeddings", cls=RotnetCommand, epilog=embed.MAP_EXAMPLES)(embed.embeddings_map)
app.add_typer(viz.viz_app, name="viz")
app.command(cls=RotnetCommand, epilog=predict.EXAMPLES)(predict.predict)
app.command(cls=RotnetCommand, epilog=embed.EMBED_EXAMPLES)(embed.embed)
app.command(cls=RotnetCommand, epilog=embed.NEIGHBOURS_EXAMPLES)(embed.neighbours)
app.command("neighbors", cls=RotnetCommand, epilog=embed.NEIGHBOURS_EXAMPLES, hidden=True)(
    embed.neighbours
)  # the US spelling
app.command(cls=RotnetCommand, epilog=score.EXAMPLES)(score.score)
app.command(cls=RotnetCommand, epilog=reproduce.EXAMPLES)(reproduce.reproduce)


def main() -> None:
    # until a command's error boundary takes them over; SIGTERM (a scheduler's stop) as Ctrl-C
    stopping.starting()
    prepare_streams()  # file names of any bytes print
    app(prog_name="rotnet")
