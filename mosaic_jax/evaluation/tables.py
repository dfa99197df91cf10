"""Markdown tables: the one writer of every table the project prints or writes.

Two layouts, both GitHub-flavoured markdown:

- compact (the files a run or the report writes: ``metrics_<split>.md``, ``comparison.md``,
  ``retrieval.md``): ``| a | b |`` rows under a separator that sets each column's alignment
  (``---`` left, ``---:`` right);
- padded (console tables: the ahead-of-time compile report, the benchmarks): every column as
  wide as its widest cell, so the table also reads as plain text.

A ``|`` inside a cell is escaped (``\\|``) so it cannot split the cell. Standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ALIGN = {"left": "---", "right": "---:"}


def _cells(row: Sequence[Any]) -> list[str]:
    return [str(c).replace("|", "\\|") for c in row]


def table_lines(header: Sequence[Any], rows: Sequence[Sequence[Any]],
                align: Sequence[str] | None = None, *, padded: bool = False) -> list[str]:
    """The table's lines (no newlines): header, separator, one line per row.

    Args:
      header: the column names.
      rows: the cells of each row (``str()`` of each), as many as ``header``.
      align: per column ``"left"`` or ``"right"`` (compact layout; default: all left).
      padded: the padded layout (columns padded to their widest cell; no alignment marks).
    """
    cells = [_cells(header), *(_cells(r) for r in rows)]
    for i, r in enumerate(cells[1:]):
        if len(r) != len(header):
            raise ValueError(f"table row {i} has {len(r)} cells for {len(header)} columns")
    if padded:
        if align is not None:
            raise ValueError("a padded table has no alignment marks")
        widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

        def line(r: list[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return [line(cells[0]), sep, *(line(r) for r in cells[1:])]
    align = ["left"] * len(header) if align is None else list(align)
    if len(align) != len(header) or any(a not in ALIGN for a in align):
        raise ValueError(f"align must give 'left' or 'right' for each of the {len(header)} "
                         f"columns, got {align}")
    sep = "|" + "|".join(ALIGN[a] for a in align) + "|"
    return ["| " + " | ".join(cells[0]) + " |", sep,
            *("| " + " | ".join(r) + " |" for r in cells[1:])]


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]],
                   align: Sequence[str] | None = None, *, padded: bool = False) -> str:
    """`table_lines` joined, ending with a newline."""
    return "\n".join(table_lines(header, rows, align, padded=padded)) + "\n"
