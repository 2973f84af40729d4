"""What the HTML report shows, read from files: the report rows (:func:`read_run`, through the
project's one report reader, :mod:`cxr_batch.report.reader`), the true labels of ``report --labels``, the metrics of
``evaluate --out`` and the provenance record beside a report. Typed rows; no HTML.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from cxr_batch.errors import InputError
from cxr_batch.io.safe_open import FileTooLargeError, read_json
from cxr_batch.report.reader import ReportError, read_report
from cxr_batch.report.writer import RunStats

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


def read_run(reports: Sequence[str], console: Console | None = None) -> RunReport:
    """Read one report, or the parts of a sharded run, into typed rows and the summary counts
    (with the one report reader, :func:`cxr_batch.report.reader.read_report`).

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
        try:
            report = read_report(source)
        except ReportError as exc:
            raise InputError(f"{source}: {exc.reason}: not a cxr-batch report") from None
        except FileTooLargeError as exc:
            raise InputError(f"{source}: {exc}; not a cxr-batch report?") from None
        except OSError as exc:
            raise InputError(f"cannot read the report {source}: {exc.strerror or exc}") from None
        missing = report.missing(REQUIRED)
        if missing:
            raise InputError(f"{source} is not a cxr-batch report (no {', '.join(missing)} column)")
        if labels is None:
            labels = report.labels
        elif report.labels != labels:
            raise InputError(
                f"{source} has other labels ({', '.join(report.labels)}) than {reports[0]} ({', '.join(labels)}): "
                "give the reports of one run"
            )
        for problem in report.problems:
            if problem.kind == "csv" and not problem.partial:
                raise InputError(f"{source}: row {problem.number} is not valid CSV ({problem.detail})")
            if problem.kind == "blank":
                continue
            skipped += 1
            console.print(
                f"[yellow]warning:[/] {escape(source)}: row {problem.number} is incomplete or damaged; left out",
                highlight=False,
                soft_wrap=True,
            )
        for r in report.rows:
            if not r.path:
                skipped += 1
                console.print(
                    f"[yellow]warning:[/] {escape(source)}: row {r.number} has no path; left out",
                    highlight=False,
                    soft_wrap=True,
                )
                continue
            other = seen.get(r.path)
            if other is not None:
                where = f"twice in {source}" if other == source else f"in both {other} and {source}"
                raise InputError(
                    f"path {r.path!r} appears {where}: give the parts of one run (or the merged report), not both"
                )
            seen[r.path] = source
            rows.append(
                Row(
                    index=len(rows),
                    path=r.path,
                    status=r.status,
                    label=r.label,
                    confidence=r.confidence,
                    probs=tuple(r.probs(labels).values()),
                    error=r.error,
                    notes=r.text("notes"),
                    ood_score=r.num("ood_score"),
                    in_distribution=r.in_distribution,
                    model=r.model,
                    modality=r.text("modality"),
                    view_position=r.text("view_position"),
                    true_label=r.text("true_label"),
                    assessable=r.assessable,
                )
            )
            for column in FACT_COLUMNS:
                value = r.text(column)
                if value is not None:
                    facts.setdefault(column, Counter())[value] += 1
            if stats is None:
                stats = RunStats(labels=labels, model=r.model, provider="")
            stats.add([r])
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
