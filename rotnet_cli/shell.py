"""Commands to paste: arguments quoted for a POSIX shell, also file names that are not UTF-8.

``shlex.quote`` keeps such a name's undecodable bytes as Python's surrogate escapes, which a
terminal shows as U+FFFD: the pasted command names another folder. Those arguments are written
in bash/zsh ANSI-C quoting instead ($'run-\\xff'), which gives the shell the exact bytes.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable


def shell_quote(arg: str) -> str:
    """``arg`` as one shell word that pastes back to exactly its bytes."""
    if arg.isprintable() and not any("\udc80" <= ch <= "\udcff" for ch in arg):
        return shlex.quote(arg)
    out = []
    for ch in arg:
        if "\udc80" <= ch <= "\udcff":  # an undecodable byte of a file name
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch in "\\'":
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:  # control characters: their bytes, so that the line stays one line on screen
            out.append("".join(f"\\x{b:02x}" for b in os.fsencode(ch)))
    return "$'" + "".join(out) + "'"


def shell_join(argv: Iterable[str]) -> str:
    return " ".join(shell_quote(arg) for arg in argv)


__all__ = ["shell_quote", "shell_join"]
