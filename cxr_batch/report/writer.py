"""The report: CSV or JSON lines, one row per input file, plus the human summary.

Columns, in order: ``path, status, label, confidence, prob_<label>...`` (model order),
``width, height, error``, the model's identity ``model, model_sha256, precision`` (the same on
every row of a run; ``resume`` and ``merge`` refuse rows of another identity), then ``notes`` and the columns other features fill (empty
until then): ``modality, view_position, sop_instance_uid, study_instance_uid`` (from
``Result.fields``, set by the DICOM reader), ``ood_score, in_distribution`` and ``covid_screen``
(the screening call at the operating point; ``label`` stays the argmax); then ``run_id``,
the run that wrote the row (its entry in the provenance record). ``evaluate --predictions`` adds
``true_label, correct`` last.

Encoding: UTF-8 with ``surrogateescape``. A file name that is not valid UTF-8 is written
with its original bytes (CSV), so reading the CSV back with
``open(path, newline="", encoding="utf-8", errors="surrogateescape")`` gives back the exact
name that ``os.fsencode`` turns into the original bytes. JSON lines are pure ASCII
(``ensure_ascii``): such a byte ``0xNN`` appears as ``\\udcNN``, which ``json.loads`` returns
as the same surrogate-escaped name. Commas, quotes and newlines are quoted by the csv module.
CSV text cells that a spreadsheet would run as a formula get a leading ``'`` (:mod:`cxr_batch.report.cells`), removed on reading.

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
import json
import math
import os
import stat
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal, Protocol

from rich.console import Console
from rich.table import Table

from cxr_batch.engine.types import Result
from cxr_batch.errors import OutputError
from cxr_batch.io.safe_open import DamagedFileError, iter_lines, open_regular, parse_json
from cxr_batch.report.cells import escape_cell, unescape_cell
from cxr_batch.report.lock import lock_or_refuse
from cxr_batch.text import markup

Format = Literal["csv", "jsonl"]
FORMATS: tuple[str, ...] = ("csv", "jsonl")

HEAD_COLUMNS = ("path", "status", "label", "confidence")
#: What identifies the model that made a row: the same on every row of a run; resume and merge
#: refuse rows whose values differ (another model file, or another precision of it).
IDENTITY_COLUMNS = ("model", "model_sha256", "precision")
TAIL_COLUMNS = ("width", "height", "error", *IDENTITY_COLUMNS)
#: Columns filled from ``Result.fields`` (readers set them; DICOM metadata, never patient data).
FIELD_COLUMNS = ("modality", "view_position", "sop_instance_uid", "study_instance_uid")
#: ``lung_fraction``, ``assessable``: the lung stage (empty where it did not run).
#: ``covid_screen``: ``positive``/``negative`` at the model's screening operating point (or
#: ``--covid-threshold``); empty on error rows and where no call is made.
EXTRA_COLUMNS = (
    "notes",
    *FIELD_COLUMNS,
    "ood_score",
    "in_distribution",
    "lung_fraction",
    "assessable",
    "covid_screen",
)
#: The run that wrote the row: its entry in the provenance record (cxr_batch.report.provenance).
RUN_COLUMNS = ("run_id",)
#: ``evaluate --predictions`` only: the file's true label and whether the model's label is it
#: (empty on an error row).
TRUTH_COLUMNS = ("true_label", "correct")

ENCODING = "utf-8"
ERRORS = "surrogateescape"


def columns(labels: Sequence[str], truth: bool = False) -> list[str]:
    """The report's columns for a model with these labels (the one place that defines them);
    ``truth``: with :data:`TRUTH_COLUMNS` at the end (``evaluate --predictions``)."""
    cols = [*HEAD_COLUMNS, *(f"prob_{label}" for label in labels), *TAIL_COLUMNS, *EXTRA_COLUMNS, *RUN_COLUMNS]
    return cols + list(TRUTH_COLUMNS) if truth else cols


def add_truth(row: dict[str, Any], result: Result, truth: Mapping[str, str] | None) -> dict[str, Any]:
    """Fill :data:`TRUTH_COLUMNS` of ``row`` from ``truth`` (report path → true label)."""
    if truth is not None:
        true = truth.get(result.path)
        row["true_label"] = true
        row["correct"] = (result.label == true) if result.ok and true is not None else None
    return row


@dataclass(frozen=True)
class RunIdentity:
    """The values of :data:`IDENTITY_COLUMNS` for one run: ``name@version``, the sha256 of the
    model file and its precision. Two files can share ``name@version`` (an int8 and an fp32
    export, or a user's own export with the default name); they never share a sha256."""

    model: str
    model_sha256: str = ""
    precision: str = ""

    def values(self) -> dict[str, str]:
        return {"model": self.model, "model_sha256": self.model_sha256, "precision": self.precision}

    def describe(self) -> str:
        return f"{self.model} ({self.precision or '?'}, sha256 {self.model_sha256 or '?'})"

    @classmethod
    def of(cls, model: str | RunIdentity) -> RunIdentity:
        return model if isinstance(model, RunIdentity) else cls(model)


#: Columns holding a number (or nothing) in every report.
NUMBER_COLUMNS = ("confidence", "width", "height", "ood_score", "lung_fraction")
#: The values ``status`` takes.
STATUSES = ("ok", "error")


def is_number_column(name: str) -> bool:
    return name in NUMBER_COLUMNS or name.startswith("prob_")


#: The report's true/false columns (JSON booleans in JSONL, ``true``/``false`` in CSV).
BOOLEAN_COLUMNS = frozenset({"in_distribution", "assessable"})


def jsonl_row_problem(obj: Mapping[str, Any]) -> str | None:
    """What is wrong with the types of a JSONL report row read back (``None``: nothing).

    A number column holds a finite number or null (never a string, a boolean, an object, NaN or
    Infinity); ``status`` is ``"ok"`` or ``"error"``; ``in_distribution`` and ``assessable`` a boolean or null;
    every other column text or null. What a hand edit or another tool may leave; the callers
    refuse the row as damaged, naming the column (never quoting a long value).
    """
    for key, value in obj.items():
        if is_number_column(key):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"{key} is {_kind(value)}, not a number"
            if not math.isfinite(value):
                return f"{key} is {value!r}, not a finite number"
        elif key == "status":
            if value not in STATUSES:
                return f"status is {_kind(value)}, not ok or error"
        elif key in BOOLEAN_COLUMNS:
            if value is not None and not isinstance(value, bool):
                return f"{key} is {_kind(value)}, not true, false or null"
        elif value is not None and not isinstance(value, str):
            return f"{key} is {_kind(value)}, not text"
    return None


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else "a long text"
    if isinstance(value, bool):
        return "a boolean"
    return repr(value) if isinstance(value, int | float) or value is None else type(value).__name__


def _num(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.6g}")


def row_values(
    result: Result, labels: Sequence[str], identity: RunIdentity | None = None, run_id: str | None = None
) -> dict[str, Any]:
    """One report row with typed values (None for empty), keys in column order."""
    row: dict[str, Any] = {
        "path": result.path,
        "status": result.status,
        "label": result.label,
        "confidence": _num(result.confidence),
    }
    for label in labels:
        row[f"prob_{label}"] = _num(result.probs.get(label)) if result.probs else None
    row.update(
        width=result.width,
        height=result.height,
        error=result.error,
        model=result.model,
        model_sha256=identity.model_sha256 if identity is not None else None,
        precision=identity.precision if identity is not None else None,
        notes="; ".join(result.notes) or None,
    )
    for key in FIELD_COLUMNS:
        row[key] = result.fields.get(key) or None
    row["ood_score"] = _num(result.ood_score)
    row["in_distribution"] = result.in_distribution
    row["lung_fraction"] = None if result.lung_fraction is None else round(result.lung_fraction, 4)
    row["assessable"] = result.assessable
    row["covid_screen"] = result.covid_screen if result.ok else None
    row["run_id"] = run_id
    return row


def _csv_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return escape_cell(value)  # a text cell never starts a spreadsheet formula
    return str(value)


def report_format(out: str, fmt: str | None = None) -> Format:
    """``fmt`` when given, else by suffix: ``.jsonl``/``.ndjson`` → jsonl, anything else (and ``-``) → csv."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}")
        return "jsonl" if fmt == "jsonl" else "csv"
    return "jsonl" if Path(out).suffix.lower() in (".jsonl", ".ndjson") else "csv"


#: The suffixes a report file may have, by format (no suffix, as ``/dev/null``, is CSV).
REPORT_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", "": "csv"}


def output_format(out: str, fmt: str | None = None) -> Format:
    """The format of a report to write: :func:`report_format`, but a file named like another
    format (``results.json``, ``results.txt``, ``results.xlsx``) is refused instead of silently
    getting CSV in it; ``--format`` says what to write into such a name on purpose.

    Raises:
        OutputError: an unknown suffix without ``fmt``.
    """
    if fmt is None and out != "-":
        suffix = Path(out).suffix.lower()
        if suffix not in REPORT_SUFFIXES:
            raise OutputError(
                f"--out {out}: cxr-batch writes CSV (.csv) or JSON lines (.jsonl, .ndjson), not {suffix}; "
                "name the file .csv or .jsonl, or pass --format csv|jsonl to write that format under this name"
            )
    return report_format(out, fmt)


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


class CsvWriter:
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
        self.sink = sink
        self.labels = tuple(labels)
        self.columns = list(cols)
        self.identity = identity
        self.run_id = run_id
        self.truth = truth
        self._csv = csv.writer(sink.stream, lineterminator="\r\n")
        if header:
            try:
                self._csv.writerow(self.columns)
            except OSError as exc:
                raise sink.fail(exc) from None
            sink.commit()

    def write(self, results: Sequence[Result]) -> None:
        try:
            for r in results:
                row = add_truth(row_values(r, self.labels, self.identity, self.run_id), r, self.truth)
                self._csv.writerow([_csv_text(row[c]) for c in self.columns])
        except OSError as exc:
            raise self.sink.fail(exc) from None
        self.sink.commit()

    def close(self) -> None:
        self.sink.close()


class JsonlWriter:
    """One JSON object a line, keys in column order, typed values (numbers, null, true/false)."""

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

    def write(self, results: Sequence[Result]) -> None:
        try:
            for r in results:
                row = add_truth(row_values(r, self.labels, self.identity, self.run_id), r, self.truth)
                self.sink.stream.write(json.dumps({c: row[c] for c in self.columns}, ensure_ascii=True) + "\n")
        except OSError as exc:
            raise self.sink.fail(exc) from None
        self.sink.commit()

    def close(self) -> None:
        self.sink.close()


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


def _line_offsets(fh: BinaryIO, path: Path, counter: list[int], complete: list[bool]) -> Iterator[str]:
    """Lines of a binary file as text, keeping the byte offset reached and whether the line ended."""
    for raw in iter_lines(fh, path, what="a line of the report"):
        counter[0] += len(raw)
        complete[0] = raw.endswith(b"\n")
        yield raw.decode(ENCODING, ERRORS)


def _scan_csv(path: Path, cols: Sequence[str], model: RunIdentity) -> tuple[Existing, int]:
    """Read the complete rows; returns them and the byte offset where the complete rows end."""
    existing = Existing()
    offset, ended = [0], [False]
    good_end = 0
    row_no = 0
    with open_regular(path) as fh:
        reader = csv.reader(_line_offsets(fh, path, offset, ended), strict=True)
        while True:
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                if "unexpected end of data" in str(exc):
                    break  # a quoted field cut by the end of the file: a partial last row
                raise OutputError(f"{path}: row {row_no + 1} is not valid CSV ({exc}); not resuming") from None
            row_no += 1
            if row_no == 1 and record and record[0].startswith("\ufeff"):
                record[0] = record[0][1:]  # a byte-order mark a spreadsheet saved
            if not ended[0] or (row_no > 1 and len(record) != len(cols)):
                # Incomplete: must be the last row. Anything after it means the file is damaged.
                if fh.read(1):
                    raise OutputError(f"{path}: row {row_no} is incomplete but more data follows; not resuming")
                break
            if row_no == 1:
                if record != list(cols):
                    raise OutputError(_columns_differ(path, record, cols))
                existing.has_header = True
            else:
                row = dict(zip(cols, (unescape_cell(v) for v in record), strict=True))
                _take_row(existing, row, model, path, row_no)
            good_end = offset[0]
    return existing, good_end


def _scan_jsonl(path: Path, cols: Sequence[str], model: RunIdentity) -> tuple[Existing, int]:
    existing = Existing()
    good_end = 0
    with open_regular(path) as fh:
        for row_no, raw in enumerate(iter_lines(fh, path, what="a line of the report"), start=1):
            obj: Any = None
            why = "not a JSON object"
            if row_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
                good_end += 3
            if raw.endswith(b"\n"):
                try:
                    obj = parse_json(raw.decode(ENCODING, ERRORS), what="the row")
                except DamagedFileError as exc:  # not JSON, NaN/Infinity, nested too deep
                    why = f"a damaged row: {exc.reason}"
                    obj = None
            if not isinstance(obj, dict):
                if fh.read(1) or raw.endswith(b"\n"):
                    raise OutputError(f"{path}: line {row_no} is {why}; not resuming")
                break  # a partial last line
            if list(obj) != list(cols):
                raise OutputError(_columns_differ(path, list(obj), cols, f"line {row_no} has other columns"))
            problem = jsonl_row_problem(obj)
            if problem is not None:
                raise OutputError(f"{path}: line {row_no} is a damaged row: {problem}; not resuming")
            _take_row(existing, {k: "" if v is None else str(v) for k, v in obj.items()}, model, path, row_no)
            good_end += len(raw)
    return existing, good_end


def _describe_diff(found: Sequence[str], wanted: Sequence[str]) -> str:
    missing = [c for c in wanted if c not in found]
    extra = [c for c in found if c not in wanted]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing)}")
    if extra:
        parts.append(f"unexpected {', '.join(extra)}")
    return "; ".join(parts) or "same columns in another order"


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
        f"{path}: {what} than this run's ({_describe_diff(found, cols)}); "
        "resume with the same model, or write a new report"
    )


def _take_row(existing: Existing, row: dict[str, str], model: RunIdentity, path: Path, row_no: int) -> None:
    if row["model"] != model.model:
        raise OutputError(
            f"{path}: row {row_no} was written by model {row['model']!r}, this run uses {model.model!r}; "
            "resume with the same model, or write a new report"
        )
    wanted = model.values()
    if any(row.get(c, "") != wanted[c] for c in IDENTITY_COLUMNS):
        theirs = RunIdentity(row["model"], row.get("model_sha256", ""), row.get("precision", ""))
        raise OutputError(
            f"{path}: row {row_no} was written by {theirs.describe()}, this run uses {model.describe()}: "
            "another model file or precision under the same name; resume with the same --model and "
            "--precision, or write a new report"
        )
    existing.paths.add(row["path"])
    existing.rows += 1
    existing.absolute_rows += os.path.isabs(row["path"])
    if row["status"] != "ok":
        existing.errors += 1
        existing.error_paths.add(row["path"])


def read_existing(path: str | os.PathLike[str], fmt: Format, cols: Sequence[str], model: str | RunIdentity) -> Existing:
    """Read a report for ``resume`` and cut a partial last row (left by a killed run) off the file.

    Raises:
        OutputError: the columns or the model differ, or the file is damaged before its end.
    """
    p = Path(path)
    scan = _scan_jsonl if fmt == "jsonl" else _scan_csv
    try:
        existing, good_end = scan(p, cols, RunIdentity.of(model))
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


@dataclass
class RunStats:
    """What the summary table shows; :meth:`add` every batch written."""

    labels: tuple[str, ...]
    model: str
    provider: str
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    per_label: Counter[str] = field(default_factory=Counter)
    confidence_sum: dict[str, float] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    total: int = 0
    #: rows kept from an earlier run (resume) and how many of them are errors
    kept: int = 0
    kept_errors: int = 0
    #: ok rows the out-of-distribution guard flagged; with ``drop_ood`` they leave the label counts
    flagged: int = 0
    drop_ood: bool = False
    #: the precision in use and why (the engine's ``precision_reason``); empty: not shown
    precision_note: str = ""
    #: outputs asked for that failed (SRs not written or not stored): the run exits 3 then too
    output_failures: int = 0
    #: ok rows the lung stage found not assessable (their label is empty), and the assessable
    #: rows, of which how many the out-of-distribution guard flagged
    not_assessable: int = 0
    assessable: int = 0
    assessable_flagged: int = 0

    def add(self, results: Sequence[Result]) -> None:
        for r in results:
            self.total += 1
            if r.ok and r.assessable is False:
                self.not_assessable += 1
                if r.in_distribution is False:
                    self.flagged += 1
                continue
            if r.ok and r.assessable:
                self.assessable += 1
                self.assessable_flagged += r.in_distribution is False
            if r.ok and r.in_distribution is False:
                self.flagged += 1
                if self.drop_ood:
                    continue
            if r.ok and r.label is not None:
                self.per_label[r.label] += 1
                self.confidence_sum[r.label] = self.confidence_sum.get(r.label, 0.0) + (r.confidence or 0.0)
            else:
                self.errors[r.error_reason or "error"] += 1

    def finish(self) -> None:
        self.finished = time.perf_counter()

    @property
    def unlike_training(self) -> bool:
        """Most assessable films score beyond the out-of-distribution threshold: the run-level warning."""
        return self.assessable > 0 and self.assessable_flagged > self.assessable / 2

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

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
        mean = stats.confidence_sum.get(label, 0.0) / n if n else None
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
