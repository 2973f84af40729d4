"""The one reader of an existing report (CSV or JSON lines), for every caller that reads one back.

``classify --resume`` (:func:`cxr_batch.report.writer.read_existing`), ``merge``
(:mod:`cxr_batch.report.merge`), the provenance record's recount
(:func:`cxr_batch.report.provenance.count_report_rows`) and the HTML report (:func:`read_report`:
the whole report, typed, with its tally) read reports here, so a byte-order mark, a partial last row, a neutralised cell or a damaged row means the same to all of
them. What to *do* about a damaged row stays the caller's choice (resume cuts a partial last row
and refuses anything else, merge refuses, the HTML report leaves the row out with a warning, the
recount skips it): the reader says what it found and never raises for a row.

What it handles:

- **Size caps**: the file is opened with :func:`cxr_batch.io.safe_open.open_regular` (a regular
  file only: never a FIFO or a device) and read as a stream, one line at a time, each line at most
  :data:`~cxr_batch.io.safe_open.MAX_LINE_BYTES` (:class:`~cxr_batch.io.safe_open.FileTooLargeError`,
  an ``OSError``, names ``what``); memory stays flat whatever the file's size.
- **BOM**: a UTF-8 byte-order mark at the start (as a spreadsheet or an editor saves the file)
  is skipped; :attr:`ReportReader.bom` says there was one.
- **Partial last row**: a row the end of the file cuts (no newline after it, or a quoted field
  still open) is a :class:`RowProblem` of kind ``cut``; a last row with too few or too many fields
  is one of kind ``fields`` with ``last`` set. :attr:`RowProblem.partial` is true for both: what
  ``kill -9`` leaves. The same problems before the end mean the file is damaged.
- **Neutralised cells**: CSV text cells come back without the quote the writer put before a
  leading ``=``, ``+``, ``-``, ``@``, TAB, CR or ``'`` (:func:`cxr_batch.report.format.unescape_cell`).
- **Types**: every value comes back typed, as in JSON lines (:func:`~cxr_batch.report.format.csv_cell`,
  :func:`~cxr_batch.report.format.jsonl_row_problem`): ``None`` for empty, numbers as ``int`` or
  ``float``, ``true``/``false`` as booleans, text as ``str``. A cell that breaks its column's type
  (``prob_covid`` = ``abc``, ``status`` = ``maybe``) makes the row a problem of kind ``value``.
- **prob_ columns**: :attr:`ReportReader.labels` are the labels the ``prob_<label>`` columns name,
  in order; :meth:`ReportRow.probs` the row's probabilities by label. Columns are read by name,
  in whatever order and number the file has them (a report with extra columns reads fine);
  :meth:`ReportReader.missing` says which required ones are absent.

API::

    read_report(path, fmt=None, *, what="a line of the report") -> ReportRows
        # the whole report in memory: .path, .format, .columns, .labels, .bom, .rows
        # (list[ReportRow]), .problems (list[RowProblem]: rows left out), .tally (Tally of the
        # rows), .missing(required). Raises ReportError (no header, header not valid CSV) and
        # OSError (can't be read; a line over the cap: FileTooLargeError).

    with ReportReader(path, fmt=None, *, what=...) as report:   # a stream, for any size
        report.columns, report.labels, report.bom, report.header_complete, report.header_end
        report.complete                              # empty, or ends with a newline
        for item in report.rows(start=0):            # ReportRow | RowProblem, in file order
            ...

    ReportRow: .number (1 = first row), .line (file line it starts on), .values (column -> typed
        value), .record (CSV fields as in the file / the JSON line as read), .start, .end (byte
        offsets); .path .status .ok .label .confidence .error .error_reason .in_distribution
        .assessable .run_id .model .identity (RunIdentity) .probs(labels) (label -> float | None);
        any column by name: .get(column) (typed), .text(column), .num(column), .flag(column)
    RowProblem: .number .line .kind ("cut", "csv", "fields", "blank", "json", "object", "keys",
        "value") .detail .last .partial .keys .start .end, .describe()

A :class:`ReportRow` is what :class:`cxr_batch.report.tally.Tally` counts, as it counts a
:class:`~cxr_batch.engine.types.Result`.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, BinaryIO, Literal

from cxr_batch.errors import CxrBatchError
from cxr_batch.io.safe_open import DamagedFileError, iter_lines, open_regular, parse_json
from cxr_batch.report.format import (
    ENCODING,
    ERRORS,
    Format,
    RunIdentity,
    csv_row_parser,
    jsonl_row_problem,
    labels_of,
    report_format,
)
from cxr_batch.report.tally import Tally, error_reason

#: The byte-order mark a spreadsheet or an editor may put at the start of a UTF-8 file.
BOM = "\ufeff"
_BOM_BYTES = BOM.encode("utf-8")

ProblemKind = Literal["cut", "csv", "fields", "blank", "json", "object", "keys", "value"]


class ReportError(CxrBatchError, ValueError):
    """The file is not a report that can be read (empty, no header, a header that is not CSV).

    Raised by :func:`read_report` only; ``reason`` is the message without the file's name.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One complete, well-typed row of a report."""

    #: 1 for the first row (after the CSV header; counted from ``start`` when reading from there)
    number: int
    #: the line of the file the row starts on (1 = the file's first line)
    line: int
    #: column → typed value (``None`` for empty; CSV text cells unescaped)
    values: Mapping[str, Any]
    #: CSV: the fields as in the file (still escaped, for writing back as they were);
    #: JSON lines: the line as read (without a BOM), newline included
    record: list[str] | str
    #: byte offsets of the row in the file: where it starts, and just after its newline
    start: int
    end: int

    def get(self, column: str) -> Any:
        """The typed value of ``column`` (None: empty, or no such column)."""
        return self.values.get(column)

    def text(self, column: str) -> str | None:
        """``column`` as text (None: empty, absent or not text)."""
        value = self.values.get(column)
        return value if isinstance(value, str) and value else None

    def num(self, column: str) -> float | None:
        """``column`` as a float (None: empty, absent, or not a finite number: a CSV ``nan``)."""
        value = self.values.get(column)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None
        return float(value)

    def flag(self, column: str) -> bool | None:
        """``column`` as a boolean (None: empty or absent)."""
        value = self.values.get(column)
        return value if isinstance(value, bool) else None

    @property
    def path(self) -> str:
        return self.text("path") or ""

    @property
    def status(self) -> str:
        return self.text("status") or "error"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def label(self) -> str | None:
        return self.text("label")

    @property
    def confidence(self) -> float | None:
        return self.num("confidence")

    @property
    def error(self) -> str | None:
        return self.text("error")

    @property
    def error_reason(self) -> str | None:
        return None if self.ok else error_reason(self.error)

    @property
    def in_distribution(self) -> bool | None:
        return self.flag("in_distribution")

    @property
    def assessable(self) -> bool | None:
        return self.flag("assessable")

    @property
    def run_id(self) -> str | None:
        return self.text("run_id")

    @property
    def model(self) -> str:
        return self.text("model") or ""

    @property
    def identity(self) -> RunIdentity:
        """The row's ``model, model_sha256, precision`` (empty text where absent)."""
        return RunIdentity(self.model, self.text("model_sha256") or "", self.text("precision") or "")

    def probs(self, labels: Sequence[str]) -> dict[str, float | None]:
        """The row's probability for each label (its ``prob_<label>`` column; ``None``: empty or absent)."""
        return {label: self.num(f"prob_{label}") for label in labels}


@dataclass(frozen=True, slots=True)
class RowProblem:
    """A row that could not be read as a complete, well-typed row, and why.

    ``kind``: ``cut`` (the end of the file cuts it: no newline after it, or a quoted field still
    open), ``csv`` (not valid CSV: reading stops there), ``fields`` (another number of fields than
    the header), ``blank`` (an empty line in JSON lines), ``json`` (not JSON, NaN, nested too deep),
    ``object`` (JSON, but not an object), ``keys`` (other keys than the first row's; ``keys`` holds
    them), ``value`` (a cell that breaks its column's type). ``detail`` says what, without the
    file's name (``prob_covid is 'abc', not a number``).
    """

    number: int
    line: int
    kind: ProblemKind
    detail: str
    #: nothing follows it in the file
    last: bool
    start: int
    end: int
    keys: tuple[str, ...] = ()

    @property
    def partial(self) -> bool:
        """What an interrupted run leaves: the last row, cut short (or with too few fields)."""
        return self.last and self.kind in ("cut", "fields")

    def describe(self) -> str:
        """The problem in words, for a message that names the file and the line itself."""
        if self.kind == "cut":
            return "incomplete: the end of the file cuts it"
        if self.kind == "csv":
            return f"not valid CSV ({self.detail})"
        return self.detail


class _CsvStream:
    """CSV records of a binary file from an offset, knowing the bytes and lines consumed."""

    def __init__(self, fh: BinaryIO, path: str, what: str, offset: int, line: int) -> None:
        self.offset = offset
        self.line = line  #: lines consumed
        self.ended = True  #: whether the last line consumed ended with a newline
        self._fh, self._path, self._what = fh, path, what
        self.reader = csv.reader(self._lines(), strict=True)

    def _lines(self) -> Iterator[str]:
        for raw in iter_lines(self._fh, self._path, what=self._what):
            self.offset += len(raw)
            self.line += 1
            self.ended = raw.endswith(b"\n")
            yield raw.decode(ENCODING, ERRORS)

    def next(self) -> list[str] | None:
        """The next record (None at the end). Raises csv.Error."""
        return next(self.reader, None)


def _cut(exc: csv.Error) -> bool:
    """A quoted field still open at the end of the file."""
    return "unexpected end of data" in str(exc)


class ReportReader:
    """A report file opened for reading as a stream (see the module's docstring).

    Raises (on opening): ``OSError`` (missing, unreadable), :class:`~cxr_batch.io.safe_open.NotRegularFileError`
    (a FIFO, a device, a folder), :class:`~cxr_batch.io.safe_open.FileTooLargeError` (the header
    line over the cap). A CSV header that is not valid CSV sets :attr:`header_problem`.
    """

    def __init__(self, path: str | os.PathLike[str], fmt: str | None = None, *, what: str = "a line of the report"):
        self.path = os.fspath(path)
        self.format: Format = report_format(self.path, fmt)
        self.what = what
        #: the columns: the CSV header, or the keys of the first JSON object; None: none found
        self.columns: list[str] | None = None
        #: the file starts with a byte-order mark (skipped)
        self.bom = False
        #: CSV: the header ends with a newline (a run killed while writing it leaves it cut)
        self.header_complete = False
        #: CSV: why the header is not valid CSV (None: it is, or there is none)
        self.header_problem: str | None = None
        #: the byte offset where the rows start (after the CSV header; after the BOM)
        self.header_end = 0
        self._header_lines = 0
        self._fh = open_regular(self.path)
        try:
            self.size = os.fstat(self._fh.fileno()).st_size
            if self.format == "csv":
                self._read_csv_header()
            else:
                self._read_jsonl_columns()
        except BaseException:
            self._fh.close()
            raise

    # ------------------------------------------------------------------ opening

    def __enter__(self) -> ReportReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels the ``prob_`` columns name, in order."""
        return labels_of(self.columns)

    @property
    def complete(self) -> bool:
        """The file is empty or ends with a newline (no partial last row)."""
        if not self.size:
            return True
        here = self._fh.tell()
        try:
            self._fh.seek(-1, os.SEEK_END)
            return self._fh.read(1) == b"\n"
        finally:
            self._fh.seek(here)

    def missing(self, required: Sequence[str]) -> list[str]:
        """The columns of ``required`` the report lacks."""
        have = self.columns or []
        return [c for c in required if c not in have]

    def _read_csv_header(self) -> None:
        stream = _CsvStream(self._fh, self.path, self.what, 0, 0)
        try:
            record = stream.next()
        except csv.Error as exc:
            self.header_problem = None if _cut(exc) else str(exc)
            return
        if record is None:
            return
        if record and record[0].startswith(BOM):
            record[0] = record[0][len(BOM) :]
            self.bom = True
        self.columns = record
        self.header_complete = stream.ended
        self.header_end = stream.offset
        self._header_lines = stream.line

    def _read_jsonl_columns(self) -> None:
        self._fh.seek(0)
        for number, raw in enumerate(iter_lines(self._fh, self.path, what=self.what), start=1):
            if number == 1 and raw.startswith(_BOM_BYTES):
                self.bom = True
                self.header_end = len(_BOM_BYTES)
                raw = raw[len(_BOM_BYTES) :]
            if not raw.endswith(b"\n"):
                return
            try:
                obj = parse_json(raw.decode(ENCODING, ERRORS), what="the row")
            except DamagedFileError:
                continue
            if isinstance(obj, dict):
                self.columns = list(obj)
                return

    # ------------------------------------------------------------------ rows

    def _at_end(self) -> bool:
        return not self._fh.peek(1)[:1]  # type: ignore[attr-defined]

    def rows(self, start: int = 0) -> Iterator[ReportRow | RowProblem]:
        """The rows, complete and well-typed or not, in file order, from byte offset ``start``
        (a row boundary, such as where a resumed run began appending; never before the header).

        A CSV file with no complete header has no rows. A row that is not valid CSV ends the
        reading (what follows it can't be framed); every other problem is reported and reading
        goes on.
        """
        if self.format == "csv":
            yield from self._csv_rows(start)
        else:
            yield from self._jsonl_rows(start)

    def _csv_rows(self, start: int) -> Iterator[ReportRow | RowProblem]:
        cols = self.columns
        if cols is None or not self.header_complete:
            return
        begin = max(start, self.header_end)
        self._fh.seek(begin)
        stream = _CsvStream(self._fh, self.path, self.what, begin, self._header_lines)
        parse = csv_row_parser(cols)
        number = 0
        while True:
            first_line, row_start = stream.line + 1, stream.offset
            try:
                record = stream.next()
            except csv.Error as exc:
                number += 1
                kind: ProblemKind = "cut" if _cut(exc) else "csv"
                yield RowProblem(number, first_line, kind, str(exc), self._at_end(), row_start, stream.offset)
                return
            if record is None:
                return
            number += 1
            end = stream.offset
            if not stream.ended:
                yield RowProblem(number, first_line, "cut", "no newline at its end", True, row_start, end)
                return
            if len(record) != len(cols):
                detail = f"{len(record)} fields, the header has {len(cols)}"
                yield RowProblem(number, first_line, "fields", detail, self._at_end(), row_start, end)
                continue
            try:
                values = parse(record)
            except ValueError as exc:
                yield RowProblem(number, first_line, "value", str(exc), self._at_end(), row_start, end)
                continue
            yield ReportRow(number, first_line, values, record, row_start, end)

    def _jsonl_rows(self, start: int) -> Iterator[ReportRow | RowProblem]:
        cols = self.columns
        offset = start
        self._fh.seek(start)
        for number, raw in enumerate(iter_lines(self._fh, self.path, what=self.what), start=1):
            row_start = offset
            offset += len(raw)
            if row_start == 0 and raw.startswith(_BOM_BYTES):
                raw = raw[len(_BOM_BYTES) :]
                row_start = len(_BOM_BYTES)
            if not raw.endswith(b"\n"):
                yield RowProblem(number, number, "cut", "no newline at its end", True, row_start, offset)
                return
            line = raw.decode(ENCODING, ERRORS)
            kind: ProblemKind | None = None
            detail = ""
            keys: tuple[str, ...] = ()
            obj: Any = None
            if not line.strip():
                kind, detail = "blank", "an empty line"
            else:
                try:
                    obj = parse_json(line, what="the row")
                except DamagedFileError as exc:  # not JSON, NaN/Infinity, nested too deep
                    kind, detail = "json", exc.reason
                else:
                    if not isinstance(obj, dict):
                        kind, detail = "object", "not a JSON object"
                    elif cols is not None and list(obj) != cols:
                        kind, detail, keys = "keys", "other keys than the first row", tuple(map(str, obj))
                    else:
                        problem = jsonl_row_problem(obj)
                        if problem is not None:
                            kind, detail = "value", problem
            if kind is not None:
                yield RowProblem(number, number, kind, detail, self._at_end(), row_start, offset, keys)
                continue
            yield ReportRow(number, number, obj, line, row_start, offset)


@dataclass
class ReportRows:
    """A whole report read into memory (:func:`read_report`)."""

    path: str
    format: Format
    columns: tuple[str, ...]
    labels: tuple[str, ...]
    #: the complete, well-typed rows, in file order
    rows: list[ReportRow] = field(default_factory=list)
    #: the rows left out (a partial last row, damaged rows), in file order
    problems: list[RowProblem] = field(default_factory=list)
    #: the rows counted (:class:`~cxr_batch.report.tally.Tally`)
    tally: Tally = field(default_factory=Tally)
    #: the file starts with a byte-order mark
    bom: bool = False

    def missing(self, required: Sequence[str]) -> list[str]:
        """The columns of ``required`` the report lacks."""
        return [c for c in required if c not in self.columns]


def read_report(
    path: str | os.PathLike[str], fmt: str | None = None, *, what: str = "a line of the report"
) -> ReportRows:
    """Read a whole report: its columns, labels, rows, the rows left out and their tally.

    Raises:
        ReportError: the file is empty, has no header, or its header is not valid CSV.
        OSError: the file can't be read (``NotRegularFileError``: not a regular file;
            ``FileTooLargeError``: a line over the cap).
    """
    with ReportReader(path, fmt, what=what) as report:
        if report.header_problem is not None:
            raise ReportError(report.path, f"its header is not valid CSV ({report.header_problem})")
        if not report.size:
            raise ReportError(report.path, "it is empty")
        out = ReportRows(report.path, report.format, tuple(report.columns or ()), report.labels, bom=report.bom)
        for item in report.rows():
            if isinstance(item, RowProblem):
                out.problems.append(item)
            else:
                out.rows.append(item)
        out.tally.add(out.rows)
        if report.columns is None:
            what_ = "no complete header" if report.format == "csv" else "no row that is a JSON object"
            raise ReportError(report.path, f"it holds {what_}")
    return out


__all__ = ["BOM", "ReportError", "ReportReader", "ReportRow", "ReportRows", "RowProblem", "read_report"]
