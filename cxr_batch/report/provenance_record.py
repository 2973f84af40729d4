"""The provenance record itself: its schema, reading, writing and checking it, and recording one run.

The JSON document beside a report (``<report>.provenance.json``; schema
``docs/provenance.schema.json``): :data:`SCHEMA_VERSION`, where it goes (:func:`record_path`),
:func:`write_record` (atomic), :func:`read_record` (checks the frame),
:func:`check_record_output` (refuses early); :class:`RunRecorder`, which adds one run to a
record and checkpoints it (:func:`start_classifier_run`: with every fact taken from a loaded
engine); the rows a run really left in its report (:func:`count_report_rows`); and ``merge``'s
record (:func:`merge_records`). The facts in a run come from
:mod:`cxr_batch.report.provenance_facts`; the command line and source go through the project's
one redactor, :mod:`cxr_batch.redact`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr_batch import __version__
from cxr_batch.errors import CxrBatchError, OutputError
from cxr_batch.io.safe_open import read_json
from cxr_batch.io.safe_write import write_file_atomic
from cxr_batch.redact import redact_argv, redact_source
from cxr_batch.report.provenance_facts import (
    INPUT_HASH_METHOD,
    InputListHash,
    cpu_facts,
    engine_settings,
    gpu_facts,
    host_facts,
    model_facts,
    ood_facts,
    preprocessing_facts,
    screening_facts,
    utc_now,
    versions,
)
from cxr_batch.report.tally import Tally

if TYPE_CHECKING:
    from cxr_batch.engine.types import Engine, EngineConfig, Result
    from cxr_batch.io.shard import Shard
    from cxr_batch.report.writer import ReportConfig

#: The version of the record's layout (``schema_version``); see docs/provenance.schema.json.
SCHEMA_VERSION = 1
KIND = "cxr-batch provenance"
#: The suffix of the record written beside a report.
SUFFIX = ".provenance.json"
#: The largest provenance record read back (each run adds a few kilobytes).
RECORD_MAX_BYTES = 64 << 20
#: Seconds between the record's checkpoints during a run (so ``kill -9`` loses at most that much of it).
CHECKPOINT_S = 10.0

STATUSES = ("running", "finished", "interrupted", "failed")


def record_path(report_out: str, provenance: str | None) -> str | None:
    """Where the record of the report ``report_out`` goes: ``provenance`` when given, else
    ``<report>.provenance.json``; for a report on stdout (``-``) only when ``provenance`` is given."""
    if provenance is not None:
        return provenance
    if report_out == "-":
        return None
    return report_out + SUFFIX


# --------------------------------------------------------------------------- counts


#: The rows a run wrote, by status, by label (ok rows), flagged out of distribution, by error
#: reason: the one tally of report rows (``counts`` in the record is :meth:`Tally.to_dict`).
Counts = Tally


def count_report_rows(path: str | os.PathLike[str], fmt: str, run_id: str, offset: int = 0) -> Counts:
    """Count the complete rows of run ``run_id`` in a report file, from byte ``offset`` on.

    What a run that stopped early (Ctrl-C can land between writing a batch and counting it) really
    left in the report. A partial last row (its ``run_id`` cut or missing) or a damaged row is not
    counted. Read with the one report reader (:mod:`cxr_batch.report.reader`).
    """
    from cxr_batch.report.reader import ReportReader, ReportRow

    counts = Counts()
    with ReportReader(path, fmt) as report:  # any size: read as a stream, each line bounded
        if fmt == "csv" and "run_id" not in (report.columns or ()):
            return counts
        counts.add(row for row in report.rows(offset) if isinstance(row, ReportRow) and row.run_id == run_id)
    return counts


# --------------------------------------------------------------------------- reading and writing


def write_record(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> None:
    """Write ``doc`` to ``path`` atomically: a temporary file beside it, fsync, rename, fsync the folder.

    Raises:
        OutputError: the file can't be written.
    """
    target = Path(path)
    data = json.dumps(doc, indent=2, ensure_ascii=True) + "\n"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(target, data.encode("ascii"))  # the one output writer: atomic, never through a link
    except OSError as exc:
        raise OutputError(f"cannot write the provenance record {path}: {exc.strerror or exc}") from None
    with contextlib.suppress(OSError):
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a record and check its frame (a ``schema_version`` this version knows, a ``runs`` list).

    Raises:
        OutputError: the file can't be read, is not a record, or has a newer schema version.
    """
    try:
        doc = read_json(path, RECORD_MAX_BYTES, what="the provenance record")
    except OSError as exc:
        raise OutputError(f"cannot read the provenance record {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise OutputError(f"{path} is not a valid provenance record ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list) or "schema_version" not in doc:
        raise OutputError(f"{path} is not a cxr-batch provenance record (no schema_version and runs)")
    version = doc["schema_version"]
    if not isinstance(version, int) or version < 1:
        raise OutputError(f"{path}: schema_version {version!r} is not a positive integer")
    if version > SCHEMA_VERSION:
        raise OutputError(
            f"{path} has provenance schema version {version}; this cxr-batch ({__version__}) writes "
            f"version {SCHEMA_VERSION}: upgrade cxr-batch to add runs to it"
        )
    return doc


def check_record_output(path: str, *, report: str | None, resume: bool, overwrite: bool) -> None:
    """Refuse early what can be refused before anything runs.

    Raises:
        OutputError: the record is a folder, is the report itself, exists without ``resume`` or
            ``overwrite``, or (with ``resume``) exists but can't be added to.
    """
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"--provenance {path} is a folder; give a file name such as {p / 'results.provenance.json'}")
    if report is not None and report != "-" and os.path.abspath(path) == os.path.abspath(report):
        raise OutputError(f"--provenance {path} is the report itself; give another file name")
    if not p.exists():
        return
    if resume:
        read_record(p)  # damaged or newer: say so now, not after the run
    elif not overwrite:
        raise OutputError(
            f"the provenance record {path} already exists (of an earlier report of that name?); "
            "pass --overwrite to replace it, --resume to add this run to it, or --provenance FILE"
        )


# --------------------------------------------------------------------------- one run


@dataclass
class _Outcome:
    status: str = "finished"
    error: str | None = None


class RunRecorder:
    """Records one run into a provenance record file, appending to the record when resuming.

    Build it with :meth:`start` (which writes the record with this run as ``running``), call
    :meth:`add` with every batch written to the report, :meth:`note_exception` when the run
    stops on an exception, and :meth:`close` at the end (after the report is closed).
    """

    def __init__(self, path: str, doc: dict[str, Any], run: dict[str, Any], labels: Sequence[str]) -> None:
        self.path = path
        self.doc = doc
        self.run = run
        self.labels = tuple(labels)
        self.counts = Counts()
        self._started = datetime.now(timezone.utc)
        self._last_write = time.monotonic()
        self._outcome = _Outcome()
        self._closed = False
        #: (report file, format, byte offset where this run's rows start): recount from there on an early stop
        self._recount: tuple[str, str, int] | None = None

    @property
    def run_id(self) -> str:
        return str(self.run["run_id"])

    @classmethod
    def start(
        cls,
        path: str,
        *,
        run_id: str,
        report: str,
        report_format: str,
        model: Mapping[str, Any],
        provider: str,
        settings: Mapping[str, Any],
        preprocessing: Mapping[str, Any],
        ood: Mapping[str, Any] | None,
        inputs: Iterable[str],
        shard: Shard | None = None,
        resume: bool = False,
        kept_rows: int = 0,
        source: Mapping[str, Any] | None = None,
        argv: Sequence[str] | None = None,
        command: str = "classify",
        started: datetime | None = None,
        report_offset: int | None = None,
        screening: Mapping[str, Any] | None = None,
        lungs: Mapping[str, Any] | None = None,
    ) -> RunRecorder:
        """Open (or, with ``resume``, read) the record at ``path``, add this run and write it.

        Args:
            path: the record file.
            run_id: the id the report's rows carry (:func:`new_run_id`).
            report: the report's path as given (``-`` for stdout); report_format: ``csv`` or ``jsonl``.
            model: :func:`model_facts`. provider: the execution provider that runs the model
                (updated at the end with :meth:`set_provider` if it is only known then).
            settings: the engine's batch and thread settings, as they really are.
            preprocessing: :func:`preprocessing_facts`; ood: :func:`ood_facts`.
            inputs: the names of this run's inputs (the report's ``path`` values), hashed here.
            shard: the shard this run classifies. resume: add to an existing record.
            kept_rows: rows already in the report that this run keeps (resume).
            source: where the inputs come from (default ``{"kind": "files"}``); no credentials.
            argv: the command line (default ``sys.argv``); always passed through :func:`redact_argv`.
            command: the cxr-batch command (``classify``).
            started: when the run began (default now), timezone-aware.
            report_offset: the report file's size before this run's first row. When given and the run
                stops early (Ctrl-C, a fatal error), the counts are taken from the rows that really
                reached the report (:func:`count_report_rows`), not from what :meth:`add` was given.
            screening: :func:`screening_facts`: the threshold behind ``covid_screen`` and where it came from.
            lungs: the lung segmenter's file, sha256 and model (None: the lung stage did not run).

        Raises:
            OutputError: the record can't be read (resume) or written.
        """
        names = InputListHash()
        for name in inputs:
            names.add(name)
        doc: dict[str, Any] | None = None
        if resume and os.path.exists(path):
            doc = read_record(path)
        if doc is None:
            doc = {"schema_version": SCHEMA_VERSION, "kind": KIND, "report": report, "runs": []}
        doc["schema_version"] = max(int(doc["schema_version"]), SCHEMA_VERSION)
        execution: dict[str, Any] = {
            "provider": provider,
            "device_requested": settings.get("device"),
            "engine": settings.get("engine", "local"),
            "cpu": cpu_facts(),
            "gpu": gpu_facts() if "CUDA" in provider else None,
        }
        run: dict[str, Any] = {
            "run_id": run_id,
            "command": command,
            "status": "running",
            "interrupted": False,
            "error": None,
            "started": utc_now(started),
            "ended": None,
            "duration_s": None,
            "argv": redact_argv(sys.argv if argv is None else argv),
            "host": host_facts(),
            "versions": versions(),
            "report": {"path": report, "format": report_format},
            "source": redact_source(source) if source is not None else {"kind": "files"},
            "model": dict(model),
            "execution": execution,
            "settings": {k: v for k, v in settings.items() if k not in ("device", "engine")},
            "preprocessing": dict(preprocessing),
            "ood": dict(ood) if ood is not None else None,
            "screening": dict(screening) if screening is not None else None,
            "lung_segmenter": dict(lungs) if lungs is not None else None,
            "inputs": {"count": names.count, "sha256": names.hexdigest(), "method": INPUT_HASH_METHOD},
            "shard": None if shard is None else {"index": shard.index, "count": shard.count},
            "resumed": resume and kept_rows > 0,
            "kept_rows": kept_rows,
            "counts": Counts().to_dict(model.get("labels") or ()),
        }
        doc["runs"].append(run)
        recorder = cls(path, doc, run, model.get("labels") or ())
        if started is not None:
            recorder._started = started
        if report_offset is not None and report != "-":
            recorder._recount = (report, report_format, report_offset)
        recorder._write()
        return recorder

    def add(self, results: Sequence[Result]) -> None:
        """Count a batch written to the report; checkpoints the record every :data:`CHECKPOINT_S` s.

        Raises:
            OutputError: a checkpoint can't be written.
        """
        self.counts.add(results)
        now = time.monotonic()
        if now - self._last_write >= CHECKPOINT_S:
            self._last_write = now
            self._write()

    def set_provider(self, provider: str) -> None:
        self.run["execution"]["provider"] = provider

    def note_exception(self, exc: BaseException) -> None:
        """The run stops on ``exc``: Ctrl-C (or a signal turned into SystemExit) is ``interrupted``,
        anything else ``failed`` with the error (a library error's message, else its type)."""
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            self._outcome = _Outcome(
                "interrupted", "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else "interrupted"
            )
        elif isinstance(exc, CxrBatchError):
            self._outcome = _Outcome("failed", str(exc))
        else:
            self._outcome = _Outcome("failed", f"unexpected error: {type(exc).__name__}")

    def close(self) -> str | None:
        """Write the final record (end time, status, counts). Idempotent.

        Returns:
            None, or, when the run already stopped on an exception and the record can't be written,
            the message (so the first exception is the one the caller sees).

        Raises:
            OutputError: the record can't be written (only when the run itself went well).
        """
        if self._closed:
            return None
        self._closed = True
        if self._outcome.status != "finished" and self._recount is not None:
            with contextlib.suppress(OSError, UnicodeError):
                report, fmt, offset = self._recount
                self.counts = count_report_rows(report, fmt, self.run_id, offset)
        ended = datetime.now(timezone.utc)
        self.run.update(
            status=self._outcome.status,
            interrupted=self._outcome.status == "interrupted",
            error=self._outcome.error,
            ended=utc_now(ended),
            duration_s=round(max(0.0, (ended - self._started).total_seconds()), 3),
        )
        try:
            self._write()
        except OutputError as exc:
            if self._outcome.status != "finished":
                return str(exc)
            raise
        return None

    def _write(self) -> None:
        self.run["counts"] = self.counts.to_dict(self.labels)
        write_record(self.path, self.doc)


# --------------------------------------------------------------------------- merge


@dataclass
class PartRecord:
    """What ``merge`` saw of one part: its rows' run ids and counts, and its record if found."""

    part: str
    record_path: str
    rows: int
    shard: int | None
    run_ids: set[str]
    counts: Counts


def part_record_path(part: str) -> str:
    """Where ``merge`` looks for a part's record: ``<part>.provenance.json``."""
    return part + SUFFIX


def merge_records(
    parts: Sequence[PartRecord],
    *,
    report: str,
    report_format: str,
    labels: Sequence[str],
    paths_sha256: str,
    rows: int,
    counts: Counts,
    expect: int | None,
    started: str,
    argv: Sequence[str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The merged report's record: every run of every part (each with the ``part`` it came from),
    ``merged_from`` (one entry per part) and ``merge`` (the merge itself).

    Returns:
        The record and warnings (a part without a record; rows whose run id no record holds).

    Raises:
        OutputError: a part's record exists but is damaged.
    """
    warnings: list[str] = []
    runs: list[dict[str, Any]] = []
    merged_from: list[dict[str, Any]] = []
    for part in parts:
        entry: dict[str, Any] = {
            "part": part.part,
            "record": None,
            "rows": part.rows,
            "shard": part.shard,
            "run_ids": sorted(part.run_ids),
            "unrecorded_run_ids": [],
            "counts": part.counts.to_dict(labels),
        }
        if os.path.exists(part.record_path):
            doc = read_record(part.record_path)
            entry["record"] = part.record_path
            known = set()
            for run in doc["runs"]:
                if isinstance(run, dict):
                    runs.append({**run, "part": part.part})
                    known.add(run.get("run_id"))
            missing = sorted(part.run_ids - known)
            entry["unrecorded_run_ids"] = missing
            if missing:
                warnings.append(
                    f"{part.record_path} does not record run(s) {', '.join(missing)} that wrote rows of {part.part}"
                )
        else:
            entry["unrecorded_run_ids"] = sorted(part.run_ids)
            if part.rows:
                warnings.append(f"{part.part} has no provenance record ({part.record_path}); its runs are not recorded")
        merged_from.append(entry)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "report": report,
        "runs": runs,
        "merged_from": merged_from,
        "merge": {
            "started": started,
            "ended": utc_now(),
            "argv": redact_argv(sys.argv if argv is None else argv),
            "host": host_facts(),
            "versions": {"cxr_batch": __version__, "python": platform.python_version()},
            "report": {"path": report, "format": report_format},
            "parts": len(parts),
            "expect": expect,
            "inputs": {"count": rows, "sha256": paths_sha256, "method": INPUT_HASH_METHOD},
            "counts": counts.to_dict(labels),
        },
    }
    return doc, warnings


# --------------------------------------------------------------------------- one run of a loaded engine


def start_classifier_run(
    path: str,
    run_id: str,
    classifier: Engine,
    engine: EngineConfig,
    report: ReportConfig,
    inputs: Iterable[str],
    *,
    shard: Shard | None = None,
    kept_rows: int = 0,
    started: datetime | None = None,
    report_offset: int | None = None,
    source: Mapping[str, Any] | None = None,
) -> RunRecorder:
    """:meth:`RunRecorder.start` with every fact taken from a loaded engine (what ``classify`` does).

    The model's sha256 is the engine's (hashed once per run, in the background from the load on).

    Raises:
        OutputError: the record can't be read (resume) or written.
    """
    meta = classifier.meta
    segmenter = classifier.segmenter
    return RunRecorder.start(
        path,
        run_id=run_id,
        report=report.out,
        report_format=report.format,
        model=model_facts(meta, classifier.model_path, classifier.model_origin, sha256=classifier.model_sha256),
        provider=classifier.provider,
        settings=engine_settings(classifier, engine),
        preprocessing=preprocessing_facts(meta),
        ood=ood_facts(meta),
        inputs=inputs,
        shard=shard,
        resume=report.resume,
        kept_rows=kept_rows,
        started=started,
        report_offset=report_offset,
        source=source,
        screening=screening_facts(meta, classifier.screening),
        lungs=None if segmenter is None else segmenter.describe(),
    )
