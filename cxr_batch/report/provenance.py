"""The provenance record: what produced a report, written beside it as ``<report>.provenance.json``.

One JSON document per report (schema: ``docs/provenance.schema.json``, described in
``docs/provenance.md``), with a ``schema_version`` and a list of ``runs``. Each run says when it
ran, the command line (secrets never: :func:`redact_argv`), the versions, the model (name,
version, precision, sha256 of the file), the execution provider that really ran, the CPU or GPU,
the thread and batch settings, the preprocessing contract, the out-of-distribution threshold, a
hash of the input list (:func:`input_list_sha256`), the shard, and the counts of the rows
it wrote by status and label. Every report row carries the ``run_id`` of the run that wrote it.

- ``classify`` writes the record when the run starts (status ``running``), every
  :data:`CHECKPOINT_S` seconds while it runs, and at the end (``finished``, ``interrupted`` on
  Ctrl-C, ``failed`` on a fatal error). Every write is atomic (a temporary file, fsync, rename):
  the record on disk is always a complete document. A run killed with ``kill -9`` stays
  ``running`` with the counts of its last checkpoint.
- ``classify --resume`` appends a run to the existing record; earlier runs are kept as they are.
- ``merge`` writes the merged report's record: every run of every part, each with the ``part``
  it came from, and a ``merge`` entry (:func:`merge_records`).

Library use (what ``classify`` does; other input sources, such as DICOMweb, do the same)::

    run_id = new_run_id()
    writer, existing = open_report(report_config, labels, ident, run_id=run_id)
    recorder = RunRecorder.start(record_file, run_id=run_id, report=out, model=model_facts(...), ...)
    try:
        for batch in batches:
            writer.write(batch)
            recorder.add(batch)
    except BaseException as exc:
        recorder.note_exception(exc)
        raise
    finally:
        writer.close()
        recorder.close()
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr_batch import __version__
from cxr_batch.contract import ModelMeta, file_sha256
from cxr_batch.errors import CxrBatchError, OutputError
from cxr_batch.io.safe_open import read_json
from cxr_batch.io.safe_write import write_file_atomic
from cxr_batch.redact import REDACTED, redact_argv, redact_source  # noqa: F401 - REDACTED re-exported
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
#: How :func:`input_list_sha256` hashes, recorded with the hash so it can be recomputed. Records
#: written before issue 24 name the earlier method, "sha256 of each path as UTF-8 (surrogateescape)
#: followed by a NUL byte, paths sorted by those bytes", which needs every path in memory at once.
INPUT_HASH_METHOD = (
    "sum modulo 2**256 of the sha256 of each path as UTF-8 (surrogateescape), as 64 hex digits "
    "(independent of the order, computed streaming)"
)


STATUSES = ("running", "finished", "interrupted", "failed")


# --------------------------------------------------------------------------- small facts


def utc_now(when: datetime | None = None) -> str:
    """``when`` (default now) in UTC, ISO 8601 with milliseconds and a ``Z``."""
    when = when or datetime.now(timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_run_id() -> str:
    """A time-sortable run id: a UUID version 7 (48-bit Unix milliseconds, then 74 random bits)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version 7
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # RFC 4122 variant
    value |= rand & ((1 << 62) - 1)  # rand_b, 62 bits
    return str(uuid.UUID(int=value))


class InputListHash:
    """:data:`INPUT_HASH_METHOD`, one path at a time: constant memory for any number of inputs."""

    def __init__(self) -> None:
        self.count = 0
        self._sum = 0

    def add(self, path: str) -> None:
        import hashlib

        digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest()
        self._sum = (self._sum + int.from_bytes(digest, "big")) & ((1 << 256) - 1)
        self.count += 1

    def hexdigest(self) -> str:
        return f"{self._sum:064x}"


def input_list_sha256(paths: Iterable[str]) -> str:
    """The input-list hash of ``paths`` (see :data:`INPUT_HASH_METHOD`).

    ``paths`` are the report's ``path`` values (or, for other sources, whatever names each input
    in the report). The sum of the paths' sha256 does not depend on their order, so it is
    computed as they stream by (the walk never holds the list: issue 24).
    """
    h = InputListHash()
    for path in paths:
        h.add(path)
    return h.hexdigest()


def record_path(report_out: str, provenance: str | None) -> str | None:
    """Where the record of the report ``report_out`` goes: ``provenance`` when given, else
    ``<report>.provenance.json``; for a report on stdout (``-``) only when ``provenance`` is given."""
    if provenance is not None:
        return provenance
    if report_out == "-":
        return None
    return report_out + SUFFIX


# ---- secrets: never in the record (one redactor for everything recorded: cxr_batch.redact)


# ---- the machine


def cpu_facts() -> dict[str, Any]:
    """The CPU: model, inference-relevant ISA flags (:mod:`cxr_batch.engine.cpu`, read once),
    architecture, the logical CPUs this process may use, physical cores."""
    from cxr_batch.engine.cpu import cpu_facts as host
    from cxr_batch.engine.cpu import physical_cores, usable_cpus

    facts = host()
    return {
        "model": facts.model or platform.processor() or None,
        "isa_flags": list(facts.flags),
        "architecture": facts.arch or platform.machine() or None,
        "usable_cpus": usable_cpus(),
        "physical_cores": physical_cores(),
    }


def gpu_facts() -> list[dict[str, Any]] | None:
    """The NVIDIA GPUs ``nvidia-smi`` lists (name, driver, memory); None when it can't be asked."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run(
            [smi, "--query-gpu=index,name,driver_version,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    gpus: list[dict[str, Any]] = []
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 4:
            memory = int(cells[3]) if cells[3].isdigit() else None
            gpus.append({"index": int(cells[0]) if cells[0].isdigit() else None, "name": cells[1],
                         "driver": cells[2], "memory_mib": memory})  # fmt: skip
    return gpus or None


def versions() -> dict[str, str | None]:
    """cxr-batch, onnxruntime, Python, numpy, Pillow, and pydicom when this run imported it."""
    import numpy
    import onnxruntime
    import PIL

    found: dict[str, str | None] = {
        "cxr_batch": __version__,
        "onnxruntime": str(onnxruntime.__version__),
        "python": platform.python_version(),
        "numpy": str(numpy.__version__),
        "pillow": str(PIL.__version__),
    }
    pydicom = sys.modules.get("pydicom")
    if pydicom is not None:
        found["pydicom"] = str(getattr(pydicom, "__version__", None))
    return found


def host_facts() -> dict[str, Any]:
    return {"hostname": socket.gethostname() or None, "platform": platform.platform(), "pid": os.getpid()}


# ---- the model


def model_facts(
    meta: ModelMeta, path: str | os.PathLike[str], origin: str | None = None, *, sha256: bool | str = True
) -> dict[str, Any]:
    """The model's identity: name, version, precision, the sha256 of the file, where it came from.

    ``sha256``: the file's digest when the caller has it (an engine's ``model_sha256``: the file
    is hashed once per run, in the background from the load on); True hashes the file here; False
    records none.
    """
    if sha256 is True:
        sha256 = file_sha256(path)
    return {
        "name": meta.name,
        "version": meta.version,
        "ident": meta.ident,
        "precision": meta.precision,
        "sha256": sha256 or None,
        "path": os.fspath(path),
        "origin": origin,
        "created": meta.created,
        "contract_version": meta.contract_version,
        "labels": list(meta.labels),
    }


def preprocessing_facts(meta: ModelMeta) -> dict[str, Any]:
    """The preprocessing contract the images went through (from the model's contract)."""
    return {
        "input_size": list(meta.input_size),
        "mean": list(meta.mean),
        "std": list(meta.std),
        "steps": dict(meta.preprocessing),
    }


def ood_facts(meta: ModelMeta) -> dict[str, Any] | None:
    """The out-of-distribution guard's threshold and method; None for a model without one."""
    ood = meta.ood
    if not ood:
        return None
    return {
        "threshold": meta.ood_threshold,
        "method": ood.get("method"),
        "output": ood.get("output"),
        "calibration": ood.get("calibration"),
    }


def screening_facts(meta: ModelMeta, in_use: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The screening call behind ``covid_screen``: the threshold in use, where it came from
    (``model contract`` or ``--covid-threshold``) and the model's own operating point."""
    own = meta.screening
    if in_use is None and own is None:
        return None
    return {
        "label": (in_use or {}).get("label") or (own.label if own else None),
        "threshold": (in_use or {}).get("threshold"),
        "source": (in_use or {}).get("source"),
        "model_threshold": own.threshold if own else None,
        "model_target_sensitivity": own.target_sensitivity if own else None,
    }


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


def engine_settings(classifier: Engine, engine: EngineConfig) -> dict[str, Any]:
    """The settings part of a run: what the engine really runs with (its ``run_settings``: the batch
    size that really runs, streams, threads; Ray: the CPUs per actor), the device, precision and
    threads asked for, and the engine (``local`` or ``ray``)."""
    settings: dict[str, Any] = {"batch_size": engine.batch_size, "threads_requested": engine.threads}
    settings.update(classifier.run_settings())
    settings.update(device=engine.device, engine=classifier.kind, precision_requested=engine.precision)
    return settings


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
