"""The progress of long runs (classify, evaluate, the HTML report's thumbnails), on stderr.

On a terminal: a rich progress bar (count, rate, elapsed, ETA). In a pipeline, a Slurm or cron
log (stderr not a terminal): one plain log line every :data:`DEFAULT_INTERVAL_S` seconds
(``$CXR_BATCH_PROGRESS_INTERVAL`` to change it; 0 turns the lines off). Nothing with ``--quiet``.

The rate is the average since the start, shown only after :data:`MIN_RATE_SECONDS`: the first
batches of a run arrive together (two inference streams, rows flushed at once), and a rate over
a few milliseconds (thousands of images/s) says nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

#: Seconds between two progress lines when stderr is not a terminal.
DEFAULT_INTERVAL_S = 30.0
INTERVAL_ENV = "CXR_BATCH_PROGRESS_INTERVAL"
#: No rate (and no ETA) before this many seconds: an early rate is noise.
MIN_RATE_SECONDS = 2.0


def log_interval() -> float | None:
    """Seconds between log lines (``$CXR_BATCH_PROGRESS_INTERVAL``, default 30); None: no lines."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value > 0 else None


def rate(done: int, elapsed: float) -> float | None:
    """Items per second since the start, or None before :data:`MIN_RATE_SECONDS` or any item."""
    if elapsed < MIN_RATE_SECONDS or done <= 0:
        return None
    return done / elapsed


def _clock(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def progress_line(what: str, done: int, total: int, elapsed: float, unit: str | None = "img/s") -> str:
    """``2026-12-03T10:15:54Z classify: 1200/5000 (24.0%), 40.1 img/s, elapsed 0:00:30, ETA 0:01:35``."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    pct = f" ({100.0 * done / total:.1f}%)" if total else ""
    parts = [f"{stamp} {what}: {done}/{total}{pct}"]
    r = rate(done, elapsed)
    if unit:
        parts.append(f"{r:.1f} {unit}" if r is not None else f"-- {unit}")
    parts.append(f"elapsed {_clock(elapsed)}")
    parts.append(f"ETA {_clock((total - done) / r)}" if r else "ETA --")
    return ", ".join(parts)


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        r = rate(int(task.completed), task.finished_time or task.elapsed or 0.0)
        return Text(f"-- {self.unit}" if r is None else f"{r:.1f} {self.unit}")


class _EtaColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        r = rate(int(task.completed), task.elapsed or 0.0)
        if task.total is None or not r:
            return Text("ETA -:--:--")
        return Text(f"ETA {_clock(max(0.0, task.total - task.completed) / r)}")


class _LogLines:
    """``advance(n)`` that prints :func:`progress_line` once ``interval`` seconds have passed."""

    def __init__(self, console: Console, total: int, what: str, unit: str | None, interval: float) -> None:
        self.console, self.total, self.what, self.unit, self.interval = console, total, what, unit, interval
        self.start = time.monotonic()
        self.due = self.start + interval
        self.done = 0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now >= self.due:
            self.due = now + self.interval
            line = progress_line(self.what, self.done, self.total, now - self.start, self.unit)
            self.console.print(line, highlight=False, soft_wrap=True, markup=False)


@contextmanager
def progress_bar(
    console: Console,
    total: int,
    show: bool,
    what: str = "classify",
    unit: str | None = "img/s",
    *,
    log: bool = False,
) -> Iterator[Callable[[int], None]]:
    """Progress labelled ``what``; yields ``advance(n)``.

    ``show``: a rich progress bar (count, rate, elapsed, ETA). Otherwise, with ``log`` and a
    console that is not a terminal, a plain log line every :func:`log_interval` seconds; else
    nothing. Callers pass ``show=is_terminal and not quiet, log=not quiet``.
    """
    if not show:
        interval = log_interval()
        if not log or console.is_terminal or interval is None:
            yield lambda n: None
            return
        yield _LogLines(console, total, what, unit, interval).advance
        return
    columns: list[ProgressColumn] = [TextColumn(what), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(_RateColumn(unit))
    columns += [TimeElapsedColumn(), _EtaColumn()]
    progress = Progress(*columns, console=console, transient=True)
    with progress:
        task = progress.add_task(what, total=total)
        yield lambda n: progress.advance(task, n)


__all__ = ["DEFAULT_INTERVAL_S", "INTERVAL_ENV", "MIN_RATE_SECONDS", "log_interval", "progress_bar", "progress_line"]
