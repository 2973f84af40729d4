"""The report: CSV or JSON lines, one row per input file, plus the human summary.

The format (columns, row values, the encoding, the neutralised cells) is
:mod:`cxr_batch.report.format`; reading a report back (``resume``) is
:mod:`cxr_batch.report.reader`; counting its rows is :mod:`cxr_batch.report.tally`. The names
they define are importable from here too, as before.

One writer at a time: the report file is locked (``flock``, exclusive, non-blocking) from
before it is read for ``resume`` or truncated for ``overwrite`` until the run ends, so a second
run writing the same report is refused instead of interleaving rows.

No result is lost: rows are written, flushed and fsync'ed batch by batch, an existing report
is never overwritten without ``overwrite``, and ``resume`` keeps the complete rows of an
interrupted run (cutting a partial last row left by ``kill -9``) and appends the rest.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import math
import os
import stat
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol

from rich.console import Console
from rich.table import Table

from cxr_batch.engine.types import Result
from cxr_batch.errors import OutputError
from cxr_batch.report.format import (
    BOOLEAN_COLUMNS,
    CSV_LINE_END,
    ENCODING,
    ERRORS,
    EXTRA_COLUMNS,
    FIELD_COLUMNS,
    FORMATS,
    HEAD_COLUMNS,
    IDENTITY_COLUMNS,
    NUMBER_COLUMNS,
    REPORT_SUFFIXES,
    RUN_COLUMNS,
    STATUSES,
    TAIL_COLUMNS,
    TRUTH_COLUMNS,
    Format,
    RunIdentity,
    add_truth,
    columns,
    csv_record,
    describe_diff,
    is_number_column,
    json_line,
    jsonl_row_problem,
    output_format,
    report_format,
    row_values,
)
from cxr_batch.report.lock import lock_or_refuse
from cxr_batch.report.reader import ReportReader, ReportRow
from cxr_batch.report.tally import Tally
from cxr_batch.text import markup

#: Re-exported from :mod:`cxr_batch.report.format` (their home) for existing imports.
__all__ = [
    "BOOLEAN_COLUMNS",
    "ENCODING",
    "ERRORS",
    "EXTRA_COLUMNS",
    "FIELD_COLUMNS",
    "FORMATS",
    "HEAD_COLUMNS",
    "IDENTITY_COLUMNS",
    "NUMBER_COLUMNS",
    "REPORT_SUFFIXES",
    "RUN_COLUMNS",
    "STATUSES",
    "TAIL_COLUMNS",
    "TRUTH_COLUMNS",
    "CsvWriter",
    "Existing",
    "Format",
    "JsonlWriter",
    "ReportConfig",
    "ReportWriter",
    "RunIdentity",
    "RunStats",
    "add_truth",
    "check_output",
    "columns",
    "is_number_column",
    "jsonl_row_problem",
    "open_report",
    "output_format",
    "read_existing",
    "render_summary",
    "report_format",
    "row_values",
    "unlike_training_warning",
]


@dataclass(frozen=True)
class ReportConfig:
    """Where and how to write; built from the ``classify`` options."""

    out: str  #: a file path, or "-" for stdout
    format: Format = "csv"
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        if self.overwrite and self.resume:
            raise ValueError("overwrite and resume exclude each other")
        if self.out == "-" and self.resume:
            raise ValueError("resume needs a report file, not stdout")

    @property
    def to_stdout(self) -> bool:
        return self.out == "-"


class ReportWriter(Protocol):
    """Writes batches of results; each ``write`` ends flushed (and fsync'ed for files)."""

    def write(self, results: Sequence[Result]) -> None: ...

    def close(self) -> None: ...


class _Sink:
    """The report stream. A write error (disk full, ...) becomes an :class:`OutputError` naming the file."""

    def __init__(self, stream: IO[str], sync: bool, detach: bool, name: str = "-") -> None:
        self.stream = stream
        self.sync = sync
        self.detach = detach
        self.name = name
        self.failed = False

    def fail(self, exc: OSError) -> OutputError:
        self.failed = True
        kept = "; the rows written before are kept: make room, then rerun with --resume" if self.sync else ""
        return OutputError(f"cannot write the report {self.name}: {exc.strerror or exc}{kept}")

    def commit(self) -> None:
        try:
            self.stream.flush()
            if self.sync:
                os.fsync(self.stream.fileno())
        except OSError as exc:
            raise self.fail(exc) from None

    def close(self) -> None:
        if self.stream.closed:
            return
        if self.failed:  # the buffer can't be written: drop it, close the file (and its lock)
            with contextlib.suppress(OSError, ValueError):
                self.stream.close()
            return
        try:
            self.commit()
        finally:
            if self.detach and hasattr(self.stream, "detach"):
                with contextlib.suppress(OSError, ValueError):
                    self.stream.detach()  # stdout: flush our wrapper but leave the real stream open
            else:
                with contextlib.suppress(OSError):
                    self.stream.close()


class _RowWriter:
    """Writes each result as one row (:func:`~cxr_batch.report.format.row_values`), in column
    order; a subclass says how a row is put in the file. Each ``write`` ends flushed."""

    def __init__(
        self,
        sink: _Sink,
        cols: Sequence[str],
        labels: Sequence[str],
        identity: RunIdentity | None = None,
        run_id: str | None = None,
        truth: Mapping[str, str] | None = None,
    ) -> None:
        self.sink = sink
        self.labels = tuple(labels)
        self.columns = list(cols)
        self.identity = identity
        self.run_id = run_id
        self.truth = truth

    def _write_row(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def write(self, results: Sequence[Result]) -> None:
        try:
            for r in results:
                self._write_row(add_truth(row_values(r, self.labels, self.identity, self.run_id), r, self.truth))
        except OSError as exc:
            raise self.sink.fail(exc) from None
        self.sink.commit()

    def close(self) -> None:
        self.sink.close()


class CsvWriter(_RowWriter):
    """CSV rows (csv module, RFC 4180: ``\\r\\n`` line ends, minimal quoting).

    ``\\r\\n`` is not only for spreadsheets: Python's csv writer quotes a field holding a bare
    ``\\r`` only when ``\\r`` is part of the line terminator, and a file name may hold one.
    """

    def __init__(
        self,
        sink: _Sink,
        cols: Sequence[str],
        labels: Sequence[str],
        header: bool,
        identity: RunIdentity | None = None,
        run_id: str | None = None,
        truth: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(sink, cols, labels, identity, run_id, truth)
        self._csv = csv.writer(sink.stream, lineterminator=CSV_LINE_END)
        if header:
            try:
                self._csv.writerow(self.columns)
            except OSError as exc:
                raise sink.fail(exc) from None
            sink.commit()

    def _write_row(self, row: dict[str, Any]) -> None:
        self._csv.writerow(csv_record(row, self.columns))


class JsonlWriter(_RowWriter):
    """One JSON object a line, keys in column order, typed values (numbers, null, true/false)."""

    def _write_row(self, row: dict[str, Any]) -> None:
        self.sink.stream.write(json_line(row, self.columns))


# --------------------------------------------------------------------------- existing reports


@dataclass
class Existing:
    """The complete rows already in a report (for ``resume``)."""

    paths: set[str] = field(default_factory=set)
    #: the paths of the error rows (no heatmap is expected for them)
    error_paths: set[str] = field(default_factory=set)
    #: rows whose path is absolute (``--absolute-paths``, or a file named by its absolute path)
    absolute_rows: int = 0
    rows: int = 0
    errors: int = 0
    #: bytes of a partial last row that were cut off
    truncated: int = 0
    #: whether the file holds a complete header (CSV) and so needs none written
    has_header: bool = False


def check_output(config: ReportConfig) -> None:
    """Refuse early what can be refused before loading anything.

    Raises:
        OutputError: the report exists without overwrite/resume, or is a folder.
    """
    if config.to_stdout:
        return
    path = Path(config.out)
    if path.is_dir():
        raise OutputError(f"--out {config.out} is a folder; give a file name such as {path / 'results.csv'}")
    if config.resume and path.exists() and not path.is_file():
        raise OutputError(f"--resume: {config.out} is not a regular file, so it holds no report to resume")
    if path.exists() and not (config.overwrite or config.resume):
        raise OutputError(
            f"{config.out} already exists; pass --overwrite to replace it, or --resume to keep its rows "
            "and classify only the files not in it yet"
        )


def _scan(path: Path, fmt: Format, cols: Sequence[str], model: RunIdentity) -> tuple[Existing, int]:
    """Read the complete rows; returns them and the byte offset where the complete rows end.

    A partial last row (:attr:`~cxr_batch.report.reader.RowProblem.partial`) ends the scan: it is
    cut off. Any other problem means the file is damaged before its end: not resumed.
    """
    existing = Existing()
    csv_file = fmt == "csv"
    with ReportReader(path, fmt) as report:
        if csv_file:
            if report.header_problem is not None:
                raise OutputError(f"{path}: row 1 is not valid CSV ({report.header_problem}); not resuming")
            if report.columns is None or not report.header_complete:
                return existing, 0  # an empty file, or a header cut by a killed run: write it again
            if report.columns != list(cols):
                raise OutputError(_columns_differ(path, report.columns, cols))
            existing.has_header = True
        good_end = report.header_end
        for item in report.rows():
            # CSV rows are numbered as records of the file (the header is row 1), JSON lines by line
            where = f"row {item.number + 1}" if csv_file else f"line {item.number}"
            if isinstance(item, ReportRow):
                if not csv_file and list(item.values) != list(cols):
                    raise OutputError(_columns_differ(path, list(item.values), cols, f"{where} has other columns"))
                _take_row(existing, item, model, path, where)
                good_end = item.end
            elif item.partial:
                break
            elif item.kind == "keys":
                raise OutputError(_columns_differ(path, item.keys, cols, f"{where} has other columns"))
            elif csv_file and item.kind == "fields":
                raise OutputError(f"{path}: {where} is incomplete but more data follows; not resuming")
            elif item.kind == "csv":
                raise OutputError(f"{path}: {where} is not valid CSV ({item.detail}); not resuming")
            elif item.kind == "object":
                raise OutputError(f"{path}: {where} is not a JSON object; not resuming")
            else:
                raise OutputError(f"{path}: {where} is a damaged row: {item.detail}; not resuming")
    return existing, good_end


def _columns_differ(path: Path, found: Sequence[str], cols: Sequence[str], what: str = "its columns differ") -> str:
    missing = [c for c in IDENTITY_COLUMNS if c in cols and c not in found]
    if missing and "model" in found:
        # An older cxr-batch wrote only name@version: which file and precision made the rows
        # can't be known, and name@version alone mixes an int8 and an fp32 run. Refuse.
        return (
            f"{path} was written by an older cxr-batch, without the {' and '.join(missing)} column(s): "
            "which model file and precision made its rows can't be checked, so it is not resumed "
            "(rows of two models would mix); write a new report, or --overwrite"
        )
    return (
        f"{path}: {what} than this run's ({describe_diff(found, cols)}); "
        "resume with the same model, or write a new report"
    )


def _take_row(existing: Existing, row: ReportRow, model: RunIdentity, path: Path, where: str) -> None:
    theirs = row.identity
    if theirs.model != model.model:
        raise OutputError(
            f"{path}: {where} was written by model {theirs.model!r}, this run uses {model.model!r}; "
            "resume with the same model, or write a new report"
        )
    if theirs != model:
        raise OutputError(
            f"{path}: {where} was written by {theirs.describe()}, this run uses {model.describe()}: "
            "another model file or precision under the same name; resume with the same --model and "
            "--precision, or write a new report"
        )
    existing.paths.add(row.path)
    existing.rows += 1
    existing.absolute_rows += os.path.isabs(row.path)
    if not row.ok:
        existing.errors += 1
        existing.error_paths.add(row.path)


def read_existing(path: str | os.PathLike[str], fmt: Format, cols: Sequence[str], model: str | RunIdentity) -> Existing:
    """Read a report for ``resume`` and cut a partial last row (left by a killed run) off the file.

    Raises:
        OutputError: the columns or the model differ, or the file is damaged before its end.
    """
    p = Path(path)
    try:
        existing, good_end = _scan(p, fmt, cols, RunIdentity.of(model))
        size = p.stat().st_size
        if good_end < size:
            fd = os.open(p, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
            try:
                os.ftruncate(fd, good_end)
                os.fsync(fd)
            finally:
                os.close(fd)
            existing.truncated = size - good_end
    except OSError as exc:
        raise OutputError(f"cannot resume the report {path}: {exc.strerror or exc}") from None
    return existing


_LINK_REFUSED = (
    "{out} is a symbolic link to a file; the report is never written through a link "
    "(remove the link, or name the file it points to)"
)


def open_report(
    config: ReportConfig,
    labels: Sequence[str],
    model: str | RunIdentity,
    stdout: BinaryIO | None = None,
    run_id: str | None = None,
    truth: Mapping[str, str] | None = None,
) -> tuple[ReportWriter, Existing]:
    """Open the report for writing (after :func:`read_existing` when resuming).

    Args:
        config: where and how.
        labels: the model's labels (they name the ``prob_`` columns).
        model: the run's identity (or just ``name@version``); resume refuses rows of another.
        stdout: the binary stream for ``--out -`` (default ``sys.stdout.buffer``).
        run_id: the ``run_id`` column of every row written (the run's provenance record entry).
        truth: report path → true label: adds the ``true_label`` and ``correct`` columns (evaluate).

    Raises:
        OutputError: see :func:`check_output` and :func:`read_existing`; the file can't be opened,
            or another run is writing it (it holds the lock).
    """
    import io

    cols = columns(labels, truth is not None)
    identity = RunIdentity.of(model)
    writer: ReportWriter
    if config.to_stdout:
        binary = stdout if stdout is not None else sys.stdout.buffer
        text = io.TextIOWrapper(binary, encoding=ENCODING, errors=ERRORS, newline="", write_through=True)
        sink = _Sink(text, sync=False, detach=True)
        if config.format == "jsonl":
            writer = JsonlWriter(sink, cols, labels, identity, run_id, truth)
        else:
            writer = CsvWriter(sink, cols, labels, header=True, identity=identity, run_id=run_id, truth=truth)
        return writer, Existing()

    check_output(config)
    path = Path(config.out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder for the report {config.out}: {exc.strerror or exc}") from None
    # Open without truncating, lock, and only then read (resume) or truncate (overwrite): a
    # second run on the same report is refused before it can touch a byte of it.
    if config.resume:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    elif config.overwrite:
        flags = os.O_WRONLY | os.O_CREAT
    else:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    # Never through a link to a file (a planted link would make the run overwrite or append to its
    # target); a link to a device or a FIFO (/dev/stdout, a named pipe the user made) is a stream.
    linked = os.path.islink(path)
    if linked and (not os.path.exists(path) or stat.S_ISREG(os.stat(path).st_mode)):
        raise OutputError(_LINK_REFUSED.format(out=config.out))
    nofollow = 0 if linked else getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags | nofollow | getattr(os, "O_CLOEXEC", 0), 0o666)
    except FileExistsError:
        raise OutputError(f"{config.out} already exists; pass --overwrite or --resume") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(_LINK_REFUSED.format(out=config.out)) from None
        hint = " (a read-only file or folder?)" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""
        raise OutputError(f"cannot write the report {config.out}: {exc.strerror or exc}{hint}") from None
    if linked and stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for a link to a file since the check
        os.close(fd)
        raise OutputError(_LINK_REFUSED.format(out=config.out))
    existing = Existing()
    try:
        lock_or_refuse(fd, f"the report {config.out}")
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        if config.resume and regular and os.fstat(fd).st_size:
            existing = read_existing(path, config.format, cols, identity)
        elif config.overwrite and regular:
            os.ftruncate(fd, 0)
        stream = open(fd, "w", encoding=ENCODING, errors=ERRORS, newline="")  # noqa: SIM115 - closed by the writer
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write the report {config.out}: {exc.strerror or exc}") from None
        raise
    sink = _Sink(stream, sync=regular, detach=False, name=config.out)
    if config.format == "jsonl":
        return JsonlWriter(sink, cols, labels, identity, run_id, truth), existing
    return (
        CsvWriter(sink, cols, labels, header=not existing.has_header, identity=identity, run_id=run_id, truth=truth),
        existing,
    )


# --------------------------------------------------------------------------- summary


@dataclass(kw_only=True)
class RunStats(Tally):
    """What the summary table shows: the :class:`~cxr_batch.report.tally.Tally` of the rows
    written (:meth:`add` every batch) and the run's facts."""

    labels: tuple[str, ...]
    model: str
    provider: str
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    #: rows kept from an earlier run (resume) and how many of them are errors
    kept: int = 0
    kept_errors: int = 0
    #: the precision in use and why (the engine's ``precision_reason``); empty: not shown
    precision_note: str = ""
    #: outputs asked for that failed (SRs not written or not stored): the run exits 3 then too
    output_failures: int = 0

    def finish(self) -> None:
        self.finished = time.perf_counter()

    @property
    def all_errors(self) -> int:
        """Error rows in the whole report, kept ones included (decides the exit code)."""
        return self.error_count + self.kept_errors

    @property
    def wall_s(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    @property
    def rate(self) -> float:
        return self.total / self.wall_s if self.wall_s > 0 else math.nan


def render_summary(
    stats: RunStats, console: Console, *, title: str = "cxr-batch classify", timing: bool = True
) -> None:
    """The rich summary table (per label, errors by reason, totals, speed, provider, model).

    ``timing=False`` leaves out the speed line (``merge`` did not classify anything itself).
    """
    table = Table(title=title, title_justify="left")
    table.add_column("label / error")
    table.add_column("images", justify="right")
    table.add_column("%", justify="right")
    table.add_column("mean confidence", justify="right")
    total = stats.total
    for label in stats.labels:
        n = stats.per_label.get(label, 0)
        mean = stats.mean_confidence(label)
        table.add_row(markup(label), str(n), _pct(n, total), "-" if mean is None else f"{mean:.3f}")
    for reason, n in stats.errors.most_common():
        table.add_row(f"[red]error:[/] {markup(reason)}", str(n), _pct(n, total), "")
    if stats.not_assessable:
        table.add_row(
            "[yellow]not assessable (no label)[/]", str(stats.not_assessable), _pct(stats.not_assessable, total), ""
        )
    if stats.drop_ood and stats.flagged:
        table.add_row("[yellow]out of distribution (dropped)[/]", str(stats.flagged), _pct(stats.flagged, total), "")
    table.add_section()
    table.add_row("total", str(total), _pct(total, total), "")
    console.print(table)
    lines = [
        f"{total} images in {stats.wall_s:.1f} s ({stats.rate:.1f} images/s) on {stats.provider}",
        f"model {stats.model}",
    ]
    if stats.precision_note:
        lines.append(f"precision {stats.precision_note}")
    if not timing:
        lines.pop(0)
    if stats.flagged:
        lines.append(
            f"{stats.flagged} images flagged out of distribution (in_distribution=false)"
            + (
                ", left out of the label counts (--drop-ood)"
                if stats.drop_ood
                else "; --drop-ood leaves them out of the label counts"
            )
        )
    if stats.not_assessable:
        lines.append(
            f"{stats.not_assessable} images not assessable (assessable=false: not two plausible lung fields); "
            "their label is empty, their probabilities are kept"
        )
    if stats.unlike_training:
        lines.append(f"warning: {unlike_training_warning(stats.assessable_flagged, stats.assessable)}")
    if stats.kept:
        lines.append(f"resumed: kept {stats.kept} rows from the earlier run ({stats.kept_errors} errors)")
    for line in lines:
        console.print(markup(line), highlight=False, soft_wrap=True)


def unlike_training_warning(flagged: int, assessable: int) -> str:
    """The run-level warning when most assessable films score beyond the OOD threshold."""
    return (
        f"{flagged} of {assessable} assessable films look unlike the model's training data "
        "(ood_score beyond the threshold): check the labels on this site's own labelled films "
        "(cxr-batch evaluate) before trusting them"
    )


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}" if total else "-"
