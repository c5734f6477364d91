"""Tables that read at any terminal width.

Each column says what it holds: an address, a name or a reason is *kept* —
never dropped and never cut (an address is never wrapped either; a reason
may wrap between words); every other column has a priority, and when the
terminal is too narrow for all of them the lowest-priority columns go first.
A column with nothing in it takes no room. ``wide=True`` shows every column,
as wide as it needs, whatever the terminal. A title wider than its table is
printed as a line above it instead of wrapping over the table's width.

:func:`layout` is the decision (which columns, given the cells and a width);
:func:`render` builds the rich renderables; :func:`show` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

#: Columns a reason may wrap to, at the narrowest.
FOLD_MIN = 16
#: Columns of this priority or lower are details (a time, a count): they go as
#: soon as the table would have to wrap anything, before any cell is wrapped.
DETAIL = 1
#: A cell's padding (one space each side) and the border after it.
CELL_EXTRA = 3


@dataclass(frozen=True)
class Col:
    header: str
    #: Which columns go first when the terminal is narrow: the lowest first.
    priority: int = 0
    #: An address, a name or a reason: never dropped, never cut.
    keep: bool = False
    #: May wrap over lines between words (a reason, a list of addresses); a
    #: column that does not fold keeps each of its lines whole.
    fold: bool = False


def _lines(cell: str) -> list[Text]:
    return Text.from_markup(cell).split("\n") if cell else [Text("")]


def natural_width(col: Col, cells: list[str]) -> int:
    """The width the column wants: its longest line, or its header."""
    return max([len(col.header), *(line.cell_len for cell in cells for line in _lines(cell))])


def least_width(col: Col, cells: list[str]) -> int:
    """The narrowest the column may be: a column that does not fold keeps its
    longest line; one that folds keeps its longest word (an address is one)."""
    natural = natural_width(col, cells)
    if not col.fold:
        return natural
    words = [len(w) for cell in cells for line in _lines(cell) for w in line.plain.split()]
    return max([len(col.header), min(natural, FOLD_MIN), *words])


def layout(cols: list[Col], rows: list[list[str]], width: int, wide: bool = False) -> list[int]:
    """The indexes of the columns to show at ``width`` terminal columns:
    columns with nothing in them out (unless ``wide``); then details
    (priority up to :data:`DETAIL`), lowest first, until every cell fits on
    its line; then the lowest-priority columns that are not kept, until the
    rest fit with reasons wrapped (or only kept ones are left)."""
    cells = [[row[i] for row in rows] for i in range(len(cols))]
    shown = list(range(len(cols)))
    if wide:
        return shown
    if rows:
        shown = [i for i in shown if any(Text.from_markup(c).plain.strip() for c in cells[i])]

    def needed(indexes: list[int], at=least_width) -> int:
        return 1 + sum(at(cols[i], cells[i]) + CELL_EXTRA for i in indexes)

    droppable = sorted((i for i in shown if not cols[i].keep), key=lambda i: (cols[i].priority, -i))
    while droppable and cols[droppable[0]].priority <= DETAIL and needed(shown, natural_width) > width:
        shown.remove(droppable.pop(0))
    while needed(shown) > width and droppable:
        shown.remove(droppable.pop(0))
    return shown


def table_width(cols: list[Col], rows: list[list[str]], shown: list[int]) -> int:
    """The width the table takes with every shown column at its natural width."""
    return 1 + sum(natural_width(cols[i], [row[i] for row in rows]) + CELL_EXTRA for i in shown)


def render(title: str | None, cols: list[Col], rows: list[list[str]], width: int,
           wide: bool = False) -> list[RenderableType]:
    """The table (and its title line, when the title is wider than the table)
    for a terminal ``width`` columns wide. Cells are rich markup."""
    shown = layout(cols, rows, width, wide)
    full = table_width(cols, rows, shown)
    span = full if wide else min(width, full)
    above = title is not None and Text.from_markup(title).cell_len > span
    table = Table(title=None if above or title is None else title)
    for i in shown:
        col, cells = cols[i], [row[i] for row in rows]
        table.add_column(col.header, min_width=least_width(col, cells), no_wrap=not col.fold, overflow="fold")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    return [Text.from_markup(title, style="italic"), table] if above else [table]


def show(console: Console, title: str | None, cols: list[Col], rows: list[list[str]], wide: bool = False) -> None:
    """Print the table on ``console``: fitted to its width, or, ``wide``, as
    wide as every column needs."""
    print_all(console, render(title, cols, rows, console.width, wide), wide)


def print_all(console: Console, parts: list[RenderableType], wide: bool = False) -> None:
    """Print ``parts``; ``wide``: each as wide as it wants, past the terminal's
    width if need be (lines run on rather than columns being squeezed)."""
    for part in parts:
        if not wide:
            console.print(part)
            continue
        want = console.measure(part, options=console.options.update_width(10_000)).maximum
        width = console.width  # print() never goes past the console's width: widen it for this part
        console.width = max(width, want)
        try:
            console.print(part, crop=False)
        finally:
            console.width = width
