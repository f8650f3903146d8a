"""Terminal output for the CLI: rich when installed, plain text otherwise (same information)."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, Sequence

try:
    import rich  # noqa: F401 - probe only
    from rich.console import Console as _RichConsole
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table as _RichTable

    HAVE_RICH = True
except ImportError:  # crossent[cli] not installed: degrade to print()
    HAVE_RICH = False


class Console:
    """``heading``, ``line``, ``table`` and ``progress``; ``plain=True`` forces the fallback."""

    def __init__(self, plain: bool = False) -> None:
        self.rich = HAVE_RICH and not plain
        # A wide virtual terminal keeps tables unwrapped when output is captured (tests, pipes).
        self._console = _RichConsole(highlight=False, width=None if sys.stdout.isatty() else 120) \
            if self.rich else None

    def heading(self, text: str) -> None:
        if self._console is not None:
            self._console.rule(f"[bold]{text}")
        else:
            print(f"\n== {text} ==")

    def line(self, text: str = "", style: str | None = None) -> None:
        if self._console is not None:
            self._console.print(text, style=style, markup=False)
        else:
            print(text)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[object]],
              left: int = 1) -> None:
        """The first ``left`` columns are text (left-aligned), the rest numbers (right-aligned)."""
        cells = [[str(c) for c in row] for row in rows]
        if self._console is not None:
            table = _RichTable(title=title)
            for i, name in enumerate(columns):
                table.add_column(name, justify="left" if i < left else "right")
            for row in cells:
                table.add_row(*row)
            self._console.print(table)
            return
        widths = [max(len(str(c)) for c in col) for col in zip(columns, *cells)]
        print(title)
        for row in [list(columns), *cells]:
            cells_out = (c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            print("  ".join(cells_out).rstrip())

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        """Yields ``step()``; a rich bar, or a line at the start and the end without rich."""
        if self._console is None:
            print(f"{description} ({total} steps) ...", flush=True)
            yield lambda: None
            print("done", flush=True)
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=self._console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda: bar.advance(task)
