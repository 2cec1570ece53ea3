"""How rotnet's commands look in help: flags as flags, arguments as NAMES, commands in workflow order.

Typer's own rendering (0.29) shows a flag as ``--download <bool>``, which reads as if it took
a value (``--download true`` is then an error), and a required argument as ``{weights}``.
These classes keep Typer's parsing and change only what help and usage lines show. Every
command and group of the app is made with them (``cls=`` where it is registered).
"""

from __future__ import annotations

import inspect

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup


def _show_flags_as_flags(params: list) -> None:
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # no type column: a flag takes no value


def _usage_piece(argument: TyperArgument) -> str:
    """WEIGHTS, IMAGES..., [RECIPE]: the conventions of click and man pages."""
    name = (argument.metavar or argument.name or "").upper()
    name = name if argument.required else f"[{name}]"
    return name + ("..." if argument.nargs != 1 else "")


def help_panels(panels: dict[str, tuple[str, ...]]):
    """Group a command's options into rich help panels: {panel title: parameter names}, in the
    order the panels are shown. Options not named stay in the "Options" panel."""
    panel_of = {name: title for title, names in panels.items() for name in names}

    def decorate(command):
        command.rotnet_help_panels = panel_of  # kept by functools.wraps/update_wrapper (they copy __dict__)
        return command

    return decorate


class RotnetCommand(TyperCommand):
    def get_params(self, ctx) -> list:
        params = super().get_params(ctx)  # with --help, which click adds here
        _show_flags_as_flags(params)
        panel_of = getattr(self.callback, "rotnet_help_panels", {})
        for param in params:
            if param.name in panel_of and getattr(param, "rich_help_panel", None) is None:
                param.rich_help_panel = panel_of[param.name]
        return params

    def collect_usage_pieces(self, ctx) -> list[str]:
        arguments = [_usage_piece(p) for p in self.get_params(ctx) if isinstance(p, TyperArgument)]
        return ([self.options_metavar] if self.options_metavar else []) + arguments

    def format_help(self, ctx, formatter) -> None:
        # Typer wraps the epilog at the window's width, which breaks an example command in the
        # middle: copied, half of it runs. The examples are printed here instead, one line each.
        examples, self.epilog = self.epilog, None
        try:
            super().format_help(ctx, formatter)
        finally:
            self.epilog = examples
        if examples:
            print_examples(examples)


def print_examples(examples: str) -> None:
    """The Examples of a help page, every line whole (the terminal, not rich, folds a long one, so
    copying it gives the whole command), indented like the rest of the help."""
    from rich.console import Console

    console = Console(highlight=False)
    console.print()
    for line in inspect.cleandoc(examples).splitlines():
        console.print(f" {line}" if line else "", soft_wrap=True)
    console.print()


class RotnetGroup(TyperGroup):
    """A command group whose help lists commands in ``order`` (the workflow), then any others,
    and whose bare invocation prints its help and exits 0 (see ``show_help_when_bare``)."""

    order: tuple[str, ...] = ()

    def get_params(self, ctx) -> list:
        params = super().get_params(ctx)
        _show_flags_as_flags(params)
        return params

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        known = [name for name in self.order if name in names]
        return known + [name for name in names if name not in known]


def show_help_when_bare(ctx: typer.Context) -> None:
    """In a group's callback (invoke_without_command=True): no command given -> the help on
    stdout, exit 0. Typer's no_args_is_help prints it as a usage error (stderr, exit 2)."""
    if ctx.invoked_subcommand is None and not ctx.resilient_parsing:
        text = ctx.get_help()  # rich help prints itself and returns ""; plain help returns the text
        if text:
            typer.echo(text)
        raise typer.Exit(0)
