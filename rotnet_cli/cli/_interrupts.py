"""Counting Ctrl-Cs (and SIGTERMs) that reach the CLI, from its first line on.

A KeyboardInterrupt can be swallowed: by a library that catches broad exceptions while it imports,
or by Python itself, which wraps one raised while a class is created in another error. The count
lets the CLI honour such a Ctrl-C all the same (main() before a command starts, pretrain before it
trains). Imports nothing but the standard library: it is installed before typer, rich and torch load.
"""

from __future__ import annotations

from typing import Any

_count = {"seen": 0}


def interrupt(signum: int, frame: Any) -> None:
    """The handler while the CLI loads and while a command runs: counted, then a KeyboardInterrupt."""
    _count["seen"] += 1
    raise KeyboardInterrupt


def ctrl_c_seen() -> bool:
    """Whether Ctrl-C (or SIGTERM) arrived since the count was last reset, even if its KeyboardInterrupt was swallowed."""
    return _count["seen"] > 0


def reset() -> None:
    """A command starts: what happened before it has been dealt with."""
    _count["seen"] = 0
