"""The progress bar of long runs (classify, evaluate, the HTML report's thumbnails), on stderr.

Shown only when asked (stderr is a terminal and not ``--quiet``); otherwise a no-op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"-- {self.unit}" if speed is None else f"{speed:.1f} {self.unit}")


@contextmanager
def progress_bar(
    console: Console, total: int, show: bool, what: str = "classify", unit: str | None = "img/s"
) -> Iterator[Callable[[int], None]]:
    """A rich progress bar (count, rate, elapsed, ETA) labelled ``what`` when ``show``; otherwise a no-op.
    Yields ``advance(n)``."""
    if not show:
        yield lambda n: None
        return
    columns: list[ProgressColumn] = [TextColumn(what), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(_RateColumn(unit))
    columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    progress = Progress(*columns, console=console, transient=True)
    with progress:
        task = progress.add_task(what, total=total)
        yield lambda n: progress.advance(task, n)


__all__ = ["progress_bar"]
