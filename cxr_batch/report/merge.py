"""``merge``: join the reports of a sharded run (``classify --shard K/N``) into one.

Checks, each an error that names the files (nothing is dropped silently):

- every part is a complete report: a header, no partial last row (a shard interrupted mid-row
  must be finished with ``classify --resume`` first), every row with all its columns;
- all parts have the same columns, and every row names the same model: the same
  ``name@version``, model file (``model_sha256``) and ``precision``; parts written before those
  columns existed are refused (which file made their rows can't be checked);
- every number column holds a number (or nothing): a hand-edited part fails with the file and line;
- no path appears twice, in one part or across parts;
- with ``expect=N``: every row of a part hashes to the same shard of N (so a part written with
  another N, or two parts mixed up, is caught), no two parts hold the same shard, and N parts
  are given (a part with no rows, from a shard that got no files, counts for one of the shards
  no row points at). The shard is recomputed from each row's ``path``, so parts need no extra
  column and no naming convention.

The merged report lists the rows in the order an unsharded run over one input folder writes
them: the walk order, names sorted at each folder level, depth first. That is the order of the
paths split at ``/`` and compared part by part (:func:`walk_key`). Each part is already in that
order, so the parts are merged as streams (memory stays flat for millions of rows); a part that
is not (several inputs, ``--files-from``) is sorted in memory instead. CSV rows are written back
field by field with the writer ``classify`` uses, JSON lines byte for byte, so merging the parts
gives the same file as one unsharded run, but for the ``run_id`` column (each shard is its own run).

Beside the merged report goes its provenance record (:func:`cxr_batch.report.provenance.merge_records`):
the runs of every part's ``<part>.provenance.json``, each with the part it came from.
"""

from __future__ import annotations

import csv
import heapq
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from rich.console import Console

from cxr_batch.errors import MergeError, OutputError
from cxr_batch.io.safe_open import FileTooLargeError
from cxr_batch.io.safe_write import atomic_file
from cxr_batch.io.shard import shard_of
from cxr_batch.report import provenance, tally
from cxr_batch.report.format import (
    CSV_LINE_END,
    ENCODING,
    ERRORS,
    IDENTITY_COLUMNS,
    Format,
    RunIdentity,
    describe_diff,
    labels_of,
    output_format,
    report_format,
)
from cxr_batch.report.reader import ReportReader, ReportRow, RowProblem
from cxr_batch.report.tally import Tally
from cxr_batch.report.writer import RunStats, render_summary
from cxr_batch.text import markup

#: Columns a part must have to be read as a cxr-batch report.
REQUIRED = ("path", "status", "label", "confidence", "error", *IDENTITY_COLUMNS)


def walk_key(path: str) -> tuple[str, ...]:
    """Sort key reproducing the walk order from a report path: component by component.

    The walk lists each folder's entries sorted by name and enters a folder where its name
    falls, so ``a/z.png`` (folder ``a``) comes before ``a b.png`` and ``a.png``.
    """
    return tuple(path.split("/"))


@dataclass(frozen=True)
class MergeConfig:
    """What ``merge`` joins and where it writes."""

    parts: tuple[str, ...]
    out: str
    #: the shard count N of the run; checks that all N shards are there and each part is one of them
    expect: int | None = None
    overwrite: bool = False
    quiet: bool = False
    #: the merged provenance record; None: ``<out>.provenance.json``
    provenance: str | None = None
    #: False writes no merged provenance record
    record_provenance: bool = True

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("give at least one part")
        if self.expect is not None and self.expect < 1:
            raise ValueError("expect must be at least 1")


@dataclass
class MergeStats:
    """What the merge found: the summary counts of the whole, and where each part's rows belong."""

    stats: RunStats
    parts: int
    #: the shard of N each part holds (None: the part has no rows); only with ``expect``
    shards: dict[str, int | None] = field(default_factory=dict)
    #: the merged provenance record written, if any
    record: str | None = None


@dataclass
class _Row:
    key: tuple[str, ...]
    part: int  # index into the parts, so equal paths sort by part (stable error messages)
    row: ReportRow  # the row as read: its number, typed values and record (CSV fields, or the JSON line)

    @property
    def number(self) -> int:
        return self.row.number

    @property
    def path(self) -> str:
        return self.row.path


class _Unsorted(Exception):
    """A part is not in walk order: merge in memory instead of as streams."""


class _Part:
    """One part: its columns and format, and a row reader (:mod:`cxr_batch.report.reader`) that checks as it goes."""

    def __init__(self, index: int, path: str, fmt: Format) -> None:
        self.index = index
        self.path = path
        self.fmt = fmt
        self.columns: list[str] | None = None
        self.shard: int | None = None
        self.rows = 0
        #: the run ids of its rows and their counts, for the merged provenance record
        self.run_ids: set[str] = set()
        self.counts = Tally()
        with self._open() as report:
            if not report.complete:
                raise MergeError(
                    f"{path} ends in a partial row: that shard's run was interrupted; "
                    "finish it with 'cxr-batch classify ... --shard K/N --resume' and merge again"
                )
            if fmt == "csv" and not report.size:
                raise MergeError(f"{path} is empty (not even a header): did that shard's run fail before it started?")
            if report.header_problem is not None:
                raise MergeError(f"{path}: its header is not valid CSV ({report.header_problem}); the part is damaged")
            self.columns = report.columns
            missing = report.missing(REQUIRED)
        if self.columns is not None:
            old = [c for c in missing if c in IDENTITY_COLUMNS]
            if old and missing == old and "model" in self.columns:
                raise MergeError(
                    f"{path} was written by an older cxr-batch, without the {' and '.join(old)} column(s): "
                    "which model file and precision made its rows can't be checked, so it is not merged "
                    "(rows of two models would mix); classify that shard again with this version"
                )
            if missing:
                raise MergeError(f"{path} is not a cxr-batch report (no {', '.join(missing)} column)")

    def _open(self) -> ReportReader:
        try:
            return ReportReader(self.path, self.fmt, what="a line of the part")
        except FileTooLargeError as exc:
            raise MergeError(f"{self.path}: {exc}; the part is damaged") from None
        except OSError as exc:
            raise MergeError(f"cannot read part {self.path}: {exc.strerror or exc}") from None

    def rows_iter(self) -> Iterator[_Row]:
        with self._open() as report:
            try:
                for item in report.rows():
                    if isinstance(item, RowProblem):
                        raise MergeError(self._damaged(item))
                    if self.fmt == "jsonl":
                        self._check_jsonl(item)
                    yield _Row(walk_key(item.path), self.index, item)
            except FileTooLargeError as exc:
                raise MergeError(f"{self.path}: {exc}; the part is damaged") from None

    def _damaged(self, problem: RowProblem) -> str:
        where = f"{self.path} line {problem.line}"
        if problem.kind == "csv":
            return f"{where}: not valid CSV ({problem.detail})"
        if problem.kind == "object":
            return f"{self.path}: line {problem.line} is not a JSON object"
        if problem.kind == "keys":
            return f"{where}: other keys than line 1; the part is damaged"
        if problem.kind == "value" and self.fmt == "csv":
            return f"{where}: {problem.detail}; the part is damaged (edited by hand?)"
        if problem.kind == "value":
            return f"{where}: {problem.detail}; a damaged row, the part is damaged (edited by hand?)"
        if problem.kind in ("json", "blank"):
            return f"{where}: {problem.detail}; a damaged row, the part is damaged"
        return f"{where}: {problem.describe()}; the part is damaged"

    def _check_jsonl(self, row: ReportRow) -> None:
        """The columns merge relies on hold text (JSON lines may hold null where CSV has an empty cell)."""
        if not isinstance(row.get("path"), str):
            raise MergeError(f"{self.path} line {row.line}: no path")
        for c in IDENTITY_COLUMNS:
            if not isinstance(row.get(c), str):
                raise MergeError(f"{self.path} line {row.line}: {c} is not text; the part is damaged")


def _check_output(config: MergeConfig, parts: Sequence[str]) -> None:
    out = Path(config.out)
    if out.is_dir():
        raise OutputError(f"--out {config.out} is a folder; give a file name such as {out / 'results.csv'}")
    for part in parts:
        if os.path.abspath(part) == os.path.abspath(out) or (out.exists() and os.path.samefile(part, out)):
            raise OutputError(f"--out {config.out} is also one of the parts; write the merged report elsewhere")
    if out.exists() and not out.is_file():  # the rename would replace a device node or a FIFO
        raise OutputError(f"--out {config.out} is not a regular file; the merged report is written to a file")
    if out.exists() and not config.overwrite:
        raise OutputError(f"{config.out} already exists; pass --overwrite to replace it")


def _open_parts(config: MergeConfig) -> tuple[list[_Part], Format]:
    seen: dict[tuple[int, int], str] = {}
    for path in config.parts:
        if not os.path.isfile(path):
            raise MergeError(f"part {path} is not a file")
        st = os.stat(path)
        other = seen.get((st.st_dev, st.st_ino))
        if other is not None:
            shown = other if other == path else f"{other} and {path}"
            raise MergeError(f"the same part is given twice: {shown}")
        seen[(st.st_dev, st.st_ino)] = path
    formats = {path: report_format(path) for path in config.parts}
    fmt = formats[config.parts[0]]
    for path, f in formats.items():
        if f != fmt:
            raise MergeError(f"{config.parts[0]} is {fmt} but {path} is {f}; merge parts of one format")
    out_fmt = output_format(config.out)
    if out_fmt != fmt:
        raise MergeError(f"the parts are {fmt} but --out {config.out} names a {out_fmt} file; use a .{fmt} name")
    parts = [_Part(i, path, fmt) for i, path in enumerate(config.parts)]
    first = next((p for p in parts if p.columns is not None), None)
    if first is not None and first.columns is not None:
        for p in parts:
            if p.columns is not None and p.columns != first.columns:
                raise MergeError(
                    f"{p.path} has other columns than {first.path} ({describe_diff(p.columns, first.columns)}): "
                    "parts of one run have the same columns; were they written by different models or versions?"
                )
    return parts, fmt


class _Checker:
    """Checks rows in merged order: model, duplicates, shards."""

    def __init__(self, parts: Sequence[_Part], expect: int | None) -> None:
        self.parts = parts
        self.expect = expect
        self.model: tuple[RunIdentity, _Part] | None = None
        self.previous: _Row | None = None

    def check(self, row: _Row) -> None:
        part = self.parts[row.part]
        part.rows += 1
        run_id = row.row.run_id
        if run_id:
            part.run_ids.add(run_id)
        identity = row.row.identity
        if self.model is None:
            self.model = (identity, part)
        elif identity != self.model[0]:
            first = self.model[0]
            if identity.model != first.model:
                theirs, ours = repr(identity.model), repr(first.model)
            else:
                theirs, ours = identity.describe(), first.describe()
            raise MergeError(
                f"{part.path} row {row.number} was written by model {theirs}, "
                f"{self.model[1].path} by {ours}: merge parts of one model only (one file, one precision)"
            )
        prev = self.previous
        if prev is not None and prev.path == row.path:
            a, b = self.parts[prev.part], part
            where = (
                f"twice in {a.path} (rows {prev.number} and {row.number})"
                if a is b
                else f"in both {a.path} (row {prev.number}) and {b.path} (row {row.number})"
            )
            raise MergeError(
                f"path {markup(repr(row.path))} appears {where}; a file belongs to one shard only: were parts of "
                "different runs (or a part and an earlier merge) given together?"
            )
        self.previous = row
        if self.expect is not None:
            k = shard_of(row.path, self.expect)
            if part.shard is None:
                part.shard = k
            elif k != part.shard:
                raise MergeError(
                    f"{part.path}: row {row.number} ({row.path!r}) belongs to shard {k}/{self.expect}, its earlier "
                    f"rows to shard {part.shard}/{self.expect}: this part is not one shard of {self.expect} "
                    "(written with another N, or parts mixed up?)"
                )

    def finish(self) -> None:
        if self.expect is None:
            return
        n = self.expect
        owners: dict[int, _Part] = {}
        for p in self.parts:
            if p.shard is None:
                continue
            other = owners.setdefault(p.shard, p)
            if other is not p:
                raise MergeError(f"{other.path} and {p.path} both hold shard {p.shard}/{n}; each shard has one part")
        empty = [p.path for p in self.parts if p.shard is None]
        if len(self.parts) != n:
            missing = [k for k in range(n) if k not in owners]
            detail = f"no part holds rows of shard(s) {_ranges(missing)}" if missing else "too many parts"
            if empty:
                detail += f"; {len(empty)} part(s) have no rows ({', '.join(empty)}), each may be one of those shards"
            raise MergeError(f"--expect {n}: {len(self.parts)} part(s) given, {n} expected: {detail}")


def _ranges(numbers: Sequence[int]) -> str:
    """[0, 1, 2, 5] → '0-2, 5'."""
    out: list[str] = []
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        out.append(str(numbers[i]) if i == j else f"{numbers[i]}-{numbers[j]}")
        i = j + 1
    return ", ".join(out)


def _in_order(part: _Part) -> Iterator[_Row]:
    previous: tuple[str, ...] | None = None
    for row in part.rows_iter():
        if previous is not None and row.key < previous:
            raise _Unsorted(part.path)
        previous = row.key
        yield row


def _merged(parts: Sequence[_Part], streaming: bool) -> Iterator[_Row]:
    if streaming:
        return heapq.merge(*(_in_order(p) for p in parts), key=lambda r: (r.key, r.part, r.number))
    everything = [row for p in parts for row in p.rows_iter()]
    everything.sort(key=lambda r: (r.key, r.part, r.number))
    return iter(everything)


def _write(
    parts: Sequence[_Part], fmt: Format, stream: IO[str], expect: int | None, streaming: bool, paths: list[str]
) -> RunStats:
    columns = next((p.columns for p in parts if p.columns is not None), None)
    checker = _Checker(parts, expect)
    model: str | None = None
    writer = csv.writer(stream, lineterminator=CSV_LINE_END)  # as report.CsvWriter writes
    if fmt == "csv" and columns is not None:
        writer.writerow(columns)
    paths.clear()
    for p in parts:
        p.rows, p.shard, p.run_ids, p.counts = 0, None, set(), Tally()
    for row in _merged(parts, streaming):
        checker.check(row)
        if model is None:
            model = row.row.model
        record = row.row.record  # written back as read: CSV fields as in the part, JSON lines byte for byte
        if isinstance(record, str):
            stream.write(record)
        else:
            writer.writerow(record)
        parts[row.part].counts.add([row.row])
        paths.append(row.path)
    checker.finish()
    stats = RunStats(labels=labels_of(columns), model="(no rows)" if model is None else model, provider="")
    for p in parts:  # the whole is the sum of its parts
        stats.update(p.counts)
    return stats


def _write_record(
    config: MergeConfig, parts: Sequence[_Part], fmt: Format, record: str, paths: list[str], started: str
) -> list[str]:
    """Write the merged provenance record; returns the warnings to show."""
    columns = next((p.columns for p in parts if p.columns is not None), None)
    total = tally.total(p.counts for p in parts)
    doc, warnings = provenance.merge_records(
        [
            provenance.PartRecord(
                part=p.path,
                record_path=provenance.part_record_path(p.path),
                rows=p.rows,
                shard=p.shard,
                run_ids=p.run_ids,
                counts=p.counts,
            )
            for p in parts
        ],
        report=config.out,
        report_format=fmt,
        labels=labels_of(columns),
        paths_sha256=provenance.input_list_sha256(paths),
        rows=len(paths),
        counts=total,
        expect=config.expect,
        started=started,
    )
    provenance.write_record(record, doc)
    return warnings


def merge_reports(config: MergeConfig, console: Console | None = None) -> MergeStats:
    """Check the parts and write them as one report (atomically: a temporary file, then a rename).

    Args:
        config: the parts, the output and the shard count to expect.
        console: where the summary goes (default: stderr).

    Returns:
        The counts of the merged report (for the summary and the exit code) and each part's shard.

    Raises:
        MergeError: the parts conflict (columns, model, a path twice, shards), or one is damaged
            or missing; the message names the files.
        OutputError: ``out`` (or its provenance record) exists without ``overwrite``, is one of the
            parts, or can't be written; or a part's provenance record is damaged.
    """
    console = console or Console(stderr=True)
    started = provenance.utc_now()
    _check_output(config, config.parts)
    record = provenance.record_path(config.out, config.provenance) if config.record_provenance else None
    if record is not None:
        provenance.check_record_output(record, report=config.out, resume=False, overwrite=config.overwrite)
        for part in config.parts:
            if os.path.abspath(record) in (os.path.abspath(part), os.path.abspath(provenance.part_record_path(part))):
                raise OutputError(
                    f"--provenance {record} is a part or a part's record; write the merged record elsewhere"
                )
            if os.path.exists(provenance.part_record_path(part)):
                provenance.read_record(provenance.part_record_path(part))  # damaged: say so before merging
    parts, fmt = _open_parts(config)
    paths: list[str] = []  # the merged rows' paths, for the input-list hash of the merged record
    out = Path(config.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write {config.out}: {exc.strerror or exc}") from None
    try:
        # The one output writer: atomic, never through a link, mode as the umask says.
        with atomic_file(out) as raw:
            stream = io.TextIOWrapper(raw, encoding=ENCODING, errors=ERRORS, newline="")
            try:
                stats = _write(parts, fmt, stream, config.expect, streaming=True, paths=paths)
            except _Unsorted:
                stream.seek(0)
                stream.truncate()
                stats = _write(parts, fmt, stream, config.expect, streaming=False, paths=paths)
            stream.flush()
            stream.detach()  # atomic_file syncs and renames the file
    except OSError as exc:  # a full disk, a part that can't be read: a message, not a traceback
        if exc.filename is not None and not str(exc.filename).endswith(".tmp"):
            raise MergeError(f"cannot read {exc.filename}: {exc.strerror or exc}") from None
        raise OutputError(f"cannot write {config.out}: {exc.strerror or exc} (nothing was written)") from None
    stats.finish()
    result = MergeStats(stats=stats, parts=len(parts), shards={p.path: p.shard for p in parts}, record=record)
    if record is not None:
        for warning in _write_record(config, parts, fmt, record, paths, started):
            console.print(f"[yellow]warning:[/] {markup(warning)}", highlight=False, soft_wrap=True)
    if not config.quiet:
        render_summary(stats, console, title="cxr-batch merge", timing=False)
        line = f"merged {len(parts)} part(s), {stats.total} rows, into {config.out}"
        if config.expect is not None:
            line += f" (all {config.expect} shards)"
        console.print(markup(line), highlight=False, soft_wrap=True)
    return result
