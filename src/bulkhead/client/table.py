"""Tables the way Qubes' tools print them (``column -t``): columns padded to the
widest cell plus two spaces, the last column not padded."""

from __future__ import annotations

import sys
from typing import Iterable, Sequence, TextIO


def format_table(rows: Iterable[Sequence[object]]) -> str:
    table = [[str(cell) for cell in row] for row in rows]
    if not table:
        return ""
    ncols = max(len(row) for row in table)
    widths = [0] * ncols
    for row in table:
        for i, cell in enumerate(row):
            if i < ncols - 1:
                widths[i] = max(widths[i], len(cell))
    lines = []
    for row in table:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + row[-1:]
        lines.append("  ".join(cells))
    return "\n".join(lines) + "\n"


def print_table(rows: Iterable[Sequence[object]], stream: TextIO | None = None) -> None:
    (stream or sys.stdout).write(format_table(rows))
