"""CSV as rotnet writes it: one writer for every table (predictions.csv, embeddings, neighbours, scalars).

Rows end in "\\n". Python's csv module quotes a field only when it holds the delimiter, the quote
character or a character of the line terminator, so with "\\n" a carriage return in a file name
(``cr\\rx.png``) went out bare and every reader split the row in two. A row with a carriage return
anywhere is therefore written with every field quoted; other rows stay minimal. Read such files
back with ``open(path, newline="")`` and ``csv.reader``: a quoted "\\r" is part of its field.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from .atomicfiles import printable


class Writer:
    """``csv.writer`` with rotnet's dialect: "\\n" line ends, and carriage returns kept inside quotes."""

    def __init__(self, file: TextIO):
        self.plain = csv.writer(file, lineterminator="\n")
        self.quoted = csv.writer(file, lineterminator="\n", quoting=csv.QUOTE_ALL)

    def writerow(self, row: Sequence[Any]) -> None:
        # a file name that is not UTF-8 (surrogate escapes) goes in as \xNN, as in every table rotnet writes:
        # the UTF-8 file could not hold it, and neighbours --query --out failed on it with UnicodeEncodeError
        row = [printable(value) if isinstance(value, str) else value for value in row]
        has_cr = any(isinstance(value, str) and "\r" in value for value in row)
        (self.quoted if has_cr else self.plain).writerow(row)

    def writerows(self, rows: Iterable[Sequence[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def writer(file: TextIO) -> Writer:
    return Writer(file)


class DictWriter:
    """``csv.DictWriter`` through ``Writer``: missing keys are empty fields."""

    def __init__(self, file: TextIO, fieldnames: Sequence[str]):
        self.fieldnames = list(fieldnames)
        self.rows = Writer(file)

    def writeheader(self) -> None:
        self.rows.writerow(self.fieldnames)

    def writerow(self, row: dict[str, Any]) -> None:
        self.rows.writerow([row.get(name, "") for name in self.fieldnames])

    def writerows(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.writerow(row)


__all__ = ["writer", "Writer", "DictWriter"]
