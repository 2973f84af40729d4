"""What the HTML report shows, read from files: the report rows (:func:`read_run`, the one reader of
CSV/JSON-lines reports here), the true labels of ``report --labels``, the metrics of
``evaluate --out`` and the provenance record beside a report. Typed rows; no HTML.
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from rich.console import Console
from rich.markup import escape

from cxr_batch.engine.types import Result
from cxr_batch.errors import InputError
from cxr_batch.io.safe_open import FileTooLargeError, iter_lines, open_regular, parse_json, read_json
from cxr_batch.report.cells import unescape_cell
from cxr_batch.report.writer import ENCODING, ERRORS, RunStats, jsonl_row_problem, report_format

#: Report columns shown as model facts when present (read by name; any may be absent).
FACT_COLUMNS = ("model", "model_sha256", "precision", "run_id")
#: Report columns that are required.
REQUIRED = ("path", "status", "label", "confidence", "error", "model")
PROVENANCE_MAX_BYTES = 1 << 20


@dataclass(slots=True)
class Row:
    """One report row, typed; what the pages need and nothing more."""

    index: int
    path: str
    status: str
    label: str | None
    confidence: float | None
    probs: tuple[float | None, ...]
    error: str | None
    notes: str | None
    ood_score: float | None
    in_distribution: bool | None
    model: str
    modality: str | None = None
    view_position: str | None = None
    #: the file found for the row (None: not found)
    file: str | None = None
    thumb: Thumb | None = None
    heatmap: Thumb | None = None
    #: why there is no thumbnail
    thumb_note: str | None = None
    #: the true label (evaluate's ``true_label`` column, or ``report --labels``)
    true_label: str | None = None
    #: the lung stage's verdict (None: the report has no such column, or the stage did not run)
    assessable: bool | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True, slots=True)
class Thumb:
    """A written thumbnail: its path under the report folder, its size, and what it links to."""

    src: str
    width: int
    height: int
    link: str | None = None


@dataclass
class RunReport:
    """All rows of one run (one report, or the parts of a sharded run) and its facts."""

    sources: tuple[str, ...]
    labels: tuple[str, ...]
    rows: list[Row]
    stats: RunStats
    #: column → {value: rows} for the :data:`FACT_COLUMNS` present
    facts: dict[str, Counter[str]] = field(default_factory=dict)
    #: report path → its provenance document (when a ``.provenance.json`` sits next to it)
    provenance: dict[str, Any] = field(default_factory=dict)
    skipped_partial: int = 0


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    return {"true": True, "false": False}.get(str(value).strip().lower()) if value is not None else None


def _str(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def _open_report(path: str) -> BinaryIO:
    try:
        return open_regular(path)
    except OSError as exc:
        raise InputError(f"cannot read the report {path}: {exc.strerror or exc}") from None


def _report_lines(fh: BinaryIO, path: str, text: bool = True) -> Iterator[Any]:
    """The report's lines (text, or bytes), each bounded: a report is read as a stream."""
    try:
        for raw in iter_lines(fh, path, what="a line of the report"):
            yield raw.decode(ENCODING, ERRORS) if text else raw
    except FileTooLargeError as exc:
        raise InputError(f"{path}: {exc}; not a cxr-batch report?") from None


def _csv_records(path: str) -> Iterator[tuple[int, dict[str, str] | None, list[str]]]:
    """(row number, row or None when partial, header) for each CSV row."""
    with _open_report(path) as fh:
        reader = csv.reader(_report_lines(fh, path), strict=True)
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(f"{path} is empty: not a cxr-batch report") from None
        except csv.Error as exc:
            raise InputError(f"{path}: its header is not valid CSV ({exc})") from None
        number = 0
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                if "unexpected end of data" in str(exc):
                    yield number + 1, None, header  # a quoted field cut by the end of the file
                    return
                raise InputError(f"{path}: row {number + 1} is not valid CSV ({exc})") from None
            number += 1
            if len(record) != len(header):
                yield number, None, header
                continue
            # Cells the writer neutralised against spreadsheet formulas come back as they were.
            yield number, dict(zip(header, map(unescape_cell, record), strict=True)), header


def _jsonl_records(path: str) -> Iterator[tuple[int, dict[str, Any] | None, list[str]]]:
    header: list[str] | None = None
    with _open_report(path) as fh:
        for number, raw in enumerate(_report_lines(fh, path, text=False), start=1):
            if not raw.strip():
                continue
            try:
                obj = parse_json(raw.decode(ENCODING, ERRORS), what="the row")
            except ValueError:  # not JSON, NaN/Infinity, nested too deep
                obj = None
            if not isinstance(obj, dict) or jsonl_row_problem(obj) is not None:
                yield number, None, header or []
                continue
            if header is None:
                header = list(obj)
            yield number, obj, header


def read_run(reports: Sequence[str], console: Console | None = None) -> RunReport:
    """Read one report, or the parts of a sharded run, into typed rows and the summary counts.

    A partial row (an interrupted run's last line, or a damaged line) is skipped with a warning.
    With :func:`_csv_records` and :func:`_jsonl_records`, the only place the HTML report reads
    report files.

    Raises:
        InputError: a file is not a cxr-batch report, the parts disagree (labels), or a path
            appears twice.
    """
    console = console or Console(stderr=True)
    rows: list[Row] = []
    labels: tuple[str, ...] | None = None
    seen: dict[str, str] = {}
    facts: dict[str, Counter[str]] = {}
    skipped = 0
    stats: RunStats | None = None
    for source in reports:
        if not os.path.isfile(source):
            raise InputError(f"report {source} is not a file")
        records = _jsonl_records(source) if report_format(source) == "jsonl" else _csv_records(source)
        checked = False
        for number, record, header in records:
            if not checked and header:
                missing = [c for c in REQUIRED if c not in header]
                if missing:
                    raise InputError(f"{source} is not a cxr-batch report (no {', '.join(missing)} column)")
                these = tuple(c[len("prob_") :] for c in header if c.startswith("prob_"))
                if labels is None:
                    labels = these
                elif these != labels:
                    raise InputError(
                        f"{source} has other labels ({', '.join(these)}) than {reports[0]} ({', '.join(labels)}): "
                        "give the reports of one run"
                    )
                checked = True
            if record is None or not isinstance(record.get("path"), str) or not record.get("path"):
                skipped += 1
                console.print(
                    f"[yellow]warning:[/] {escape(source)}: row {number} is incomplete or damaged; left out",
                    highlight=False,
                    soft_wrap=True,
                )
                continue
            assert labels is not None
            path = str(record["path"])
            other = seen.get(path)
            if other is not None:
                where = f"twice in {source}" if other == source else f"in both {other} and {source}"
                raise InputError(
                    f"path {path!r} appears {where}: give the parts of one run (or the merged report), not both"
                )
            seen[path] = source
            status = str(record.get("status") or "error")
            row = Row(
                index=len(rows),
                path=path,
                status=status,
                label=_str(record.get("label")),
                confidence=_float(record.get("confidence")),
                probs=tuple(_float(record.get(f"prob_{label}")) for label in labels),
                error=_str(record.get("error")),
                notes=_str(record.get("notes")),
                ood_score=_float(record.get("ood_score")),
                in_distribution=_bool(record.get("in_distribution")),
                model=str(record.get("model") or ""),
                modality=_str(record.get("modality")),
                view_position=_str(record.get("view_position")),
                true_label=_str(record.get("true_label")),
                assessable=_bool(record.get("assessable")),
            )
            rows.append(row)
            for column in FACT_COLUMNS:
                value = _str(record.get(column))
                if value is not None:
                    facts.setdefault(column, Counter())[value] += 1
            if stats is None:
                stats = RunStats(labels=labels, model=row.model, provider="")
            stats.add(
                [
                    Result(
                        path=row.path,
                        file=row.path,
                        status=row.status,
                        model=row.model,
                        label=row.label,
                        confidence=row.confidence,
                        error=row.error,
                        in_distribution=row.in_distribution,
                        assessable=row.assessable,
                    )
                ]
            )
    labels = labels or ()
    if stats is None:
        stats = RunStats(labels=labels, model="(no rows)", provider="")
    stats.finish()
    provenance = {}
    for source in reports:
        doc = _provenance(source)
        if doc is not None:
            provenance[source] = doc
    return RunReport(
        sources=tuple(reports),
        labels=labels,
        rows=rows,
        stats=stats,
        facts=facts,
        provenance=provenance,
        skipped_partial=skipped,
    )


def read_true_labels(path: str) -> dict[str, str]:
    """``report --labels FILE``: report path → true label, from a ``path,label`` CSV (a split.csv too).

    Raises:
        InputError: not a CSV with ``path`` and ``label`` columns.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
                raise InputError(f"--labels {path}: needs a header with the columns path,label")
            return {r["path"]: r["label"] for r in reader if r.get("path") and r.get("label")}
    except OSError as exc:
        raise InputError(f"--labels {path}: {exc.strerror or exc}") from None
    except csv.Error as exc:
        raise InputError(f"--labels {path}: not valid CSV ({exc})") from None


def apply_labels(run: RunReport, truth: dict[str, str]) -> None:
    """Set each row's true label from ``truth`` (by the report's path; the labels file wins)."""
    for row in run.rows:
        label = truth.get(row.path)
        if label is not None:
            row.true_label = label


def _provenance(report: str) -> Any:
    """The ``<report>.provenance.json`` (or ``<stem>.provenance.json``) next to a report, if any."""
    p = Path(report)
    for candidate in (p.with_name(p.name + ".provenance.json"), p.with_suffix(".provenance.json")):
        try:
            if candidate.is_file():
                return read_json(candidate, PROVENANCE_MAX_BYTES, what="the provenance record")
        except (OSError, ValueError):
            continue
    return None


def read_metrics(path: str) -> dict[str, Any]:
    """The metrics JSON ``evaluate --out`` writes.

    Raises:
        InputError: the file can't be read or is not a metrics document.
    """
    try:
        doc = read_json(path, what="the metrics file", allow_nan=True)  # files from older versions may hold NaN
    except OSError as exc:
        raise InputError(f"cannot read the metrics file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InputError(f"{path} is not a metrics file ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("labels"), list) or "confusion_matrix" not in doc:
        raise InputError(f"{path} is not a metrics file written by 'cxr-batch evaluate --out'")
    return doc
