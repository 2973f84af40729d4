"""``classify`` as a library call: discover → load the model → open the report → run → summarise.

The CLI builds a :class:`ClassifyConfig` from its options and calls :func:`run_classify`;
pipelines can do the same, or use :class:`cxr_batch.Classifier` directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from rich.console import Console
from rich.markup import escape
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

from cxr_batch.errors import InputError
from cxr_batch.inference import Classifier, EngineConfig
from cxr_batch.inputs import ACCEPTED_SUFFIXES, InputSpec, discover
from cxr_batch.report import ReportConfig, RunStats, check_output, open_report, render_summary


@dataclass(frozen=True)
class ClassifyConfig:
    """Everything one ``classify`` run needs."""

    inputs: InputSpec
    engine: EngineConfig
    report: ReportConfig
    quiet: bool = False


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- img/s" if speed is None else f"{speed:.1f} img/s")


@contextmanager
def _progress(console: Console, total: int, show: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar (count, rate, ETA) when ``show``; otherwise a no-op."""
    if not show:
        yield lambda n: None
        return
    progress = Progress(
        TextColumn("classify"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with progress:
        task = progress.add_task("classify", total=total)
        yield lambda n: progress.advance(task, n)


def run_classify(config: ClassifyConfig, console: Console | None = None, stdout: BinaryIO | None = None) -> RunStats:
    """Classify every input file into the report; returns the counts the summary shows.

    Args:
        config: inputs, engine and report settings.
        console: where progress, warnings and the summary go (default: stderr).
        stdout: the binary stream for ``--out -``.

    Raises:
        InputError: an input does not exist, or no input files were found.
        ModelError, NoDefaultModelError, DeviceError: the model can't be used.
        OutputError: the report can't be written (or resumed).
    """
    console = console or Console(stderr=True)
    check_output(config.report)  # fail fast, before the walk and the model load
    found = discover(config.inputs)
    for warning in found.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if not found.files:
        where = ", ".join([*config.inputs.paths, *(["--files-from"] if config.inputs.listed else [])]) or "(none)"
        raise InputError(
            f"no input files found in {where}: looked for {', '.join(sorted(ACCEPTED_SUFFIXES))} "
            "and DICOM files (hidden files and folders are skipped; check --include/--exclude/--no-recursive)"
        )

    classifier = Classifier.from_config(config.engine)
    meta = classifier.meta
    writer, existing = open_report(config.report, meta.labels, meta.ident, stdout)
    stats = RunStats(labels=meta.labels, model=meta.ident, provider=classifier.provider)
    try:
        todo = [f for f in found.files if f.display not in existing.paths]
        stats.kept, stats.kept_errors = existing.rows, existing.errors
        if existing.truncated:
            console.print(
                f"resume: removed a partial last row ({existing.truncated} bytes) left by an interrupted run",
                highlight=False,
                soft_wrap=True,
            )
        stale = existing.rows - (len(found.files) - len(todo))
        if stale > 0:
            console.print(
                f"[yellow]warning:[/] {stale} row(s) of {escape(config.report.out)} are not among this run's inputs "
                "(resume with the same inputs and --absolute-paths setting as the first run)",
                highlight=False,
                soft_wrap=True,
            )
        show = console.is_terminal and not config.quiet
        with _progress(console, len(todo), show) as advance:
            batches = classifier.iter_batches(todo)
            with closing(batches):  # on Ctrl-C, stop the decoder threads now
                for batch in batches:
                    writer.write(batch)
                    stats.add(batch)
                    advance(len(batch))
    finally:
        writer.close()
        stats.finish()
    if not config.quiet:
        render_summary(stats, console)
    return stats
