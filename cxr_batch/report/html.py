"""``report --html``: a static HTML report of a classify or evaluate run, for people to look at.

The report opens from disk (``file://``) with no server, no network and no JavaScript:

- ``index.html``: the counts by label, status and out-of-distribution verdict (the numbers of the
  summary table: the rows go through :class:`~cxr_batch.report.writer.RunStats`), the model facts
  the report has (``model`` and, when present, ``model_sha256``, ``precision``, ``run_id`` columns
  and a ``<report>.provenance.json``) and, with ``metrics`` (``evaluate --out``), the metrics,
  the confusion matrix and the reliability diagram (inline SVG);
- galleries, paginated (:data:`PER_PAGE` cards a page, so a page stays light at 100,000 rows):
  one per predicted label (most confident first), the images the guard flagged, the low-confidence
  ones (least confident first) and the error rows with their messages;
- ``thumbs/``: one small JPEG per distinct image content, decoded with classify's own decoder
  (:func:`cxr_batch.io.preprocess.decode`, so DICOM works; pixels only, never DICOM metadata),
  and one per heatmap. Thumbnails are named by the SHA-256 of the file's content: identical files
  share one, and a second report into the same folder reuses them.

Everything read from a report is untrusted. Every text goes through :func:`text` (HTML-escaped;
control, bidirectional-override and undecodable characters shown as visible ``\\xNN`` escapes),
every link through :func:`href` (percent-encoded, always relative). Pages are built with the
standard library (``html.escape`` and string joins): no template engine to install, so
``classify --html`` works with the core install, and the escaping sits in one place.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import html
import io
import json
import math
import os
import re
import stat
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw
from rich.console import Console
from rich.markup import escape

from cxr_batch import __version__
from cxr_batch.engine.types import Result
from cxr_batch.errors import ImageError, InputError, OutputError
from cxr_batch.io.preprocess import decode, resize_grey
from cxr_batch.io.safe_open import (
    FileTooLargeError,
    NotRegularFileError,
    check_regular,
    iter_lines,
    open_regular,
    parse_json,
    read_json,
)
from cxr_batch.io.safe_write import LinkRefused, OutputDir, is_temporary_name
from cxr_batch.redact import redact_record
from cxr_batch.report.cells import unescape_cell
from cxr_batch.report.heatmap import heatmap_relpath, overlay_size
from cxr_batch.report.lock import lock_or_refuse
from cxr_batch.report.progress import progress_bar
from cxr_batch.report.writer import ENCODING, ERRORS, RunStats, jsonl_row_problem, report_format

#: Cards per gallery page.
PER_PAGE = 200
#: Below this confidence an ok row is in the low-confidence gallery.
LOW_CONFIDENCE = 0.6
#: The longer side of a thumbnail, in pixels (shown smaller; sharp on high-DPI screens).
THUMB_SIDE = 256
THUMB_QUALITY = 82
THUMBS = "thumbs"
PLACEHOLDER = f"{THUMBS}/unavailable.png"
#: The file that marks a folder as written by this module (and lists the pages to replace).
MARKER = ".cxr-batch-report.json"
#: Report columns shown as model facts when present (read by name; any may be absent).
FACT_COLUMNS = ("model", "model_sha256", "precision", "run_id")
#: Report columns that are required.
REQUIRED = ("path", "status", "label", "confidence", "error", "model")
PROVENANCE_MAX_BYTES = 1 << 20
#: The largest input file a thumbnail is made of (hashed, then decoded), and the largest earlier
#: thumbnail reused.
MAX_FILE_BYTES = 2 << 30
MAX_THUMB_BYTES = 8 << 20


# --------------------------------------------------------------------------- escaping

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")


def _visible(match: re.Match[str]) -> str:
    ch = match.group()
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): show the byte
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def text(value: Any) -> str:
    """Any value as HTML text, safe in element content and in quoted attributes.

    ``& < > " '`` are escaped; control characters (tab and newline included), bidirectional
    overrides, zero-width characters and lone surrogates (names that were not UTF-8) become
    visible ``\\xNN``/``\\uNNNN`` text, so a name can neither inject markup nor disguise itself.
    """
    return html.escape(_UNSAFE.sub(_visible, str(value)), quote=True)


def href(relpath: str) -> str:
    """A relative link to ``relpath`` (a file path with ``/`` separators), for an attribute.

    Every byte but letters, digits, ``/`` and ``-._~`` is percent-encoded (from the file system
    bytes, so names that are not UTF-8 still link), so ``?``, ``#`` and ``scheme:`` stay part of
    the path.
    """
    return html.escape(quote(os.fsencode(relpath), safe="/"), quote=True)


# --------------------------------------------------------------------------- reading reports


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


# --------------------------------------------------------------------------- thumbnails


class _Once:
    """The result of one computation that several threads may ask for (the first one computes it)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.value: Any = None


class Thumbnailer:
    """Writes one thumbnail per distinct file content under ``thumbs/`` of the output folder, from any thread.

    Files are recognised first by (device, inode, size, mtime) (so links and copies that were
    hard-linked are hashed once), then by the SHA-256 of their bytes. A thumbnail already in the
    folder (from an earlier report) is reused. Only regular files are read (a FIFO or a link to
    ``/dev/zero`` gets a card saying so, at once), at most :data:`MAX_FILE_BYTES` of each; setting
    :attr:`stop` makes every thread give up at its next read (Ctrl-C, SIGTERM).
    """

    def __init__(self, out: OutputDir, side: int = THUMB_SIDE) -> None:
        self.out = out
        self.out_dir = out.path
        self.side = side
        self.made = 0
        self.reused = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._by_inode: dict[tuple[int, int, int, int], _Once] = {}
        self._by_name: dict[str, _Once] = {}

    def _once(self, table: dict[Any, _Once], key: Any, compute: Callable[[], Any]) -> Any:
        with self._lock:
            slot = table.get(key)
            mine = slot is None
            if slot is None:
                slot = table[key] = _Once()
        if not mine:
            slot.event.wait()
            return slot.value
        try:
            slot.value = compute()
        except BaseException as exc:  # keep waiting threads from hanging; they get the same failure
            slot.value = exc
            raise
        finally:
            slot.event.set()
        return slot.value

    def thumbnail(self, file: str, kind: str = "image") -> Thumb:
        """The thumbnail of ``file`` (an input image, decoded as classify decodes it; or a heatmap PNG).

        Raises:
            ImageError: the file is not a regular file, can't be read or decoded, or is too large.
        """
        try:
            st = check_regular(file)
        except NotRegularFileError as exc:
            raise ImageError(f"not a regular file: {exc.kind}") from None
        except OSError as exc:
            raise ImageError(f"cannot open file: {exc.strerror or exc}") from None
        if st.st_size > MAX_FILE_BYTES:
            raise ImageError(f"file too large for a thumbnail ({st.st_size} bytes; at most {MAX_FILE_BYTES})")
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        value = self._once(self._by_inode, (kind, key), lambda: self._by_content(file, kind))
        if isinstance(value, BaseException):
            raise value
        assert isinstance(value, Thumb)
        return value

    def _by_content(self, file: str, kind: str) -> Thumb | BaseException:
        try:
            digest = _sha256(file, self.stop)
        except NotRegularFileError as exc:
            return ImageError(f"not a regular file: {exc.kind}")
        except OSError as exc:
            return ImageError(f"cannot read file: {exc.strerror or exc}")
        name = f"{THUMBS}/{digest[:2]}/{digest[:32]}{'' if kind == 'image' else '-h'}.jpg"
        value = self._once(self._by_name, name, lambda: self._make(file, kind, name))
        return value  # type: ignore[no-any-return]

    def _make(self, file: str, kind: str, name: str) -> Thumb | BaseException:
        earlier = self.out.read_existing(name, MAX_THUMB_BYTES)  # never through a link
        if earlier is not None:
            try:
                with Image.open(io.BytesIO(earlier)) as img:
                    width, height = img.size
                with self._lock:
                    self.reused += 1
                return Thumb(name, width, height)
            except (OSError, ValueError, Image.DecompressionBombError):
                pass  # a damaged thumbnail: make it again
        if self.stop.is_set():
            return ImageError("interrupted")
        try:
            image = self._render(file, kind)
        except ImageError as exc:
            return exc
        except MemoryError:
            return ImageError("out of memory while making the thumbnail")
        except Exception as exc:  # a decoder's unexpected failure must not stop the report
            return ImageError(f"cannot make a thumbnail: {type(exc).__name__}: {exc}")
        try:
            with self.out.atomic(name) as fh:  # atomic, never through a link
                image.save(fh, format="JPEG", quality=THUMB_QUALITY, optimize=True)
        except LinkRefused as exc:
            return ImageError(f"thumbnail not written: {exc}")
        except OSError as exc:
            raise OutputError(f"cannot write the thumbnail {self.out_dir / name}: {exc.strerror or exc}") from None
        with self._lock:
            self.made += 1
        return Thumb(name, image.width, image.height)

    def _render(self, file: str, kind: str) -> Image.Image:
        if kind == "heatmap":  # our own PNG: Pillow reads it (with its decompression-bomb guard)
            try:
                with open_regular(file) as fh, Image.open(fh) as img:
                    img.draft("RGB", (self.side, self.side))
                    rgb = img.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise ImageError(f"cannot read the heatmap: {exc}") from None
            rgb.thumbnail((self.side, self.side), Image.Resampling.LANCZOS)
            return rgb
        decoded = decode(file, (self.side, self.side))  # pixels only: no DICOM metadata travels
        width, height = overlay_size(decoded.width, decoded.height, self.side)
        grey = resize_grey(decoded.grey, (height, width))
        return Image.fromarray(np.round(np.clip(grey, 0.0, 1.0) * 255.0).astype(np.uint8), "L")


def _sha256(path: str, stop: threading.Event | None = None) -> str:
    """The SHA-256 of a regular file, read in bounded chunks (at most :data:`MAX_FILE_BYTES`);
    gives up with OSError when ``stop`` is set."""
    digest = hashlib.sha256()
    total = 0
    with open_regular(path) as fh:
        while chunk := fh.read(1 << 20):
            total += len(chunk)
            if total > MAX_FILE_BYTES:
                raise OSError(errno.EFBIG, f"larger than {MAX_FILE_BYTES} bytes")
            if stop is not None and stop.is_set():
                raise OSError(errno.EINTR, "interrupted")
            digest.update(chunk)
    return digest.hexdigest()


def _placeholder_png() -> bytes:
    img = Image.new("L", (THUMB_SIDE, THUMB_SIDE), 228)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, THUMB_SIDE - 1, THUMB_SIDE - 1), outline=160, width=4)
    draw.line((40, 40, THUMB_SIDE - 40, THUMB_SIDE - 40), fill=170, width=6)
    draw.line((40, THUMB_SIDE - 40, THUMB_SIDE - 40, 40), fill=170, width=6)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- config and build


@dataclass(frozen=True)
class HtmlConfig:
    """What ``report --html`` reads and where it writes."""

    reports: tuple[str, ...]
    out_dir: str
    #: folders the report's relative paths are resolved against, in order (classify's inputs;
    #: evaluate's data folder). Empty: the metrics file's data folder, else the current folder.
    images: tuple[str, ...] = ()
    heatmaps: str | None = None
    metrics: str | None = None
    #: a ``path,label`` CSV of true labels (paths as the report writes them)
    labels: str | None = None
    low_confidence: float = LOW_CONFIDENCE
    per_page: int = PER_PAGE
    thumb_side: int = THUMB_SIDE
    workers: int | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        if not self.reports:
            raise ValueError("give at least one report")
        if not 0.0 <= self.low_confidence <= 1.0:
            raise ValueError("low_confidence must be in [0, 1]")
        if self.per_page < 1 or self.thumb_side < 16:
            raise ValueError("per_page must be at least 1 and thumb_side at least 16")


@dataclass
class HtmlResult:
    """What was written."""

    index: Path
    pages: list[str]
    rows: int
    thumbnails_made: int
    thumbnails_reused: int
    unavailable: int
    heatmaps: int


def _is_file_not_link(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _stale_build(p: Path) -> bool:
    """A folder a killed report build left before writing its marker (a version that wrote the
    marker last): the placeholder thumbnail, and nothing but the names a report writes."""
    if not _is_file_not_link(p / PLACEHOLDER):
        return False
    for entry in os.listdir(p):
        if entry in (THUMBS, "style.css") or entry.endswith(".html") or is_temporary_name(entry):
            continue
        return False
    return True


def check_html_output(out_dir: str) -> None:
    """Refuse a folder that is a file, or holds files that an earlier report did not write.

    A folder an earlier report wrote (its marker is there, complete or not: a killed build) or a
    killed build of an older version left (:func:`_stale_build`) is reused and rebuilt.

    Raises:
        OutputError: see above.
    """
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise OutputError(f"--html {out_dir} exists and is not a folder")
    if p.is_dir() and not _is_file_not_link(p / MARKER) and any(p.iterdir()) and not _stale_build(p):
        raise OutputError(
            f"--html {out_dir} is a folder with other files in it; give a new or empty folder "
            "(or one an earlier 'cxr-batch report' wrote, which is then updated)"
        )


def _marker(pages: Sequence[str], complete: bool) -> str:
    doc = {"written_by": f"cxr-batch {__version__}", "complete": complete, "pages": list(pages)}
    return json.dumps(doc, indent=1) + "\n"


def _prepare_out(out_dir: Path) -> OutputDir:
    """Open (and lock) the folder, mark it as a report folder whose build is under way, remove the
    pages of an earlier report and a killed build's temporary files, and write the placeholder.
    Everything is written through :class:`OutputDir`: atomically and never through a link."""
    check_html_output(str(out_dir))
    try:
        out = OutputDir(out_dir)
    except OSError as exc:
        raise OutputError(f"cannot write the report folder {out_dir}: {exc.strerror or exc}") from None
    try:
        lock_or_refuse(out.fd, f"the report folder {out_dir}")
        old: Any = []
        earlier = out.read_existing(MARKER, PROVENANCE_MAX_BYTES)
        if earlier is not None:  # an earlier report here: remove its pages (thumbnails stay, as a cache)
            try:
                old = json.loads(earlier.decode("utf-8")).get("pages", [])
            except (ValueError, AttributeError):
                old = []
        pages = (
            [n for n in old if isinstance(n, str) and "/" not in n and n.endswith(".html")]
            if isinstance(old, list)
            else []
        )
        # First the marker, "complete": false: a build killed from here on leaves a folder the
        # next run recognises and rebuilds, never one it refuses.
        out.write_text(MARKER, _marker(pages, complete=False))
        for name in pages:
            with contextlib.suppress(LinkRefused):
                out.unlink(name)
        out.remove_stale_temporaries()
        out.makedirs(THUMBS)
        out.write_bytes(PLACEHOLDER, _placeholder_png())
    except LinkRefused as exc:
        out.close()
        raise OutputError(f"cannot write the report folder {out_dir}: {exc}") from None
    except OSError as exc:
        out.close()
        raise OutputError(f"cannot write the report folder {out_dir}: {exc.strerror or exc}") from None
    except BaseException:
        out.close()
        raise
    return out


def _within(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


class _Roots:
    """Where a report's paths may be read: under the image folders (``--images``) or, for
    ``classify --html``, the files its command line named; links resolved before the check."""

    def __init__(self, roots: Sequence[str]) -> None:
        self.roots = tuple(roots)
        self.dirs = tuple(r for r in roots if os.path.isdir(r))
        self.real_dirs = tuple(os.path.realpath(r) for r in self.dirs)
        self.real_files = frozenset(os.path.realpath(r) for r in roots if not os.path.isdir(r))

    def allows(self, real: str) -> bool:
        return real in self.real_files or any(_within(real, r) for r in self.real_dirs)

    def resolve(self, path: str) -> tuple[str | None, str | None]:
        """(the file to read, resolved; or None and why not: None when simply not found)."""
        candidates = [path] if os.path.isabs(path) else [os.path.join(r, path) for r in self.dirs]
        outside = False
        for candidate in candidates:
            if not os.path.lexists(candidate):
                continue
            real = os.path.realpath(candidate)
            if self.allows(real):
                return real, None
            outside = True
        if outside:
            return None, "not shown: the file is outside the image folders (--images); nothing outside them is read"
        return None, None


def find_heatmaps(given: str | None, reports: Sequence[str]) -> tuple[str | None, str | None]:
    """``report``'s heatmap folder and a note for the user: ``given`` when it is a folder; none,
    with a warning, when ``given`` does not exist (a run without ``--heatmaps`` has none, and a
    report is worth having without them); without ``given``, the ``heatmaps`` folder beside the
    first report when there is one (the README's layout), named in the note.

    Raises:
        InputError: ``given`` exists but is not a folder.
    """
    if given is not None:
        if os.path.isdir(given):
            return given, None
        if os.path.lexists(given):
            raise InputError(f"--heatmaps {given} is not a folder")
        return None, (
            f"warning: no heatmap folder {given}: the report shows no heatmaps "
            f"(classify --heatmaps {given} writes them)"
        )
    if not reports:
        return None, None
    beside = os.path.join(os.path.dirname(reports[0]), "heatmaps")
    if os.path.isdir(beside):
        return (
            beside,
            f"note: showing the heatmaps in {beside}, found beside {reports[0]} (--heatmaps DIR names another)",
        )
    return None, None


def build_html(config: HtmlConfig, console: Console | None = None) -> HtmlResult:
    """Read the report(s) and write the HTML report folder.

    Args:
        config: the reports, the folder, and where to find images, heatmaps and metrics.
        console: progress, warnings and the closing line (default: stderr).

    Raises:
        InputError: a report, the metrics file or the heatmap folder can't be used.
        OutputError: the folder can't be written, or holds other files.
    """
    console = console or Console(stderr=True)
    check_html_output(config.out_dir)
    if config.heatmaps is not None and not os.path.isdir(config.heatmaps):
        raise InputError(f"--heatmaps {config.heatmaps} is not a folder")
    metrics = read_metrics(config.metrics) if config.metrics is not None else None
    run = read_run(config.reports, console)
    if config.labels is not None:
        apply_labels(run, read_true_labels(config.labels))
    roots: tuple[str, ...] = config.images
    if not roots:
        data = metrics.get("data") if metrics is not None else None
        data_root = data.get("root") if isinstance(data, dict) else None
        roots = (str(data_root),) if isinstance(data_root, str) and data_root else (".",)
    out_dir = Path(config.out_dir)
    out = _prepare_out(out_dir)
    try:
        pages, thumbs, heat_count = _build(run, metrics, config, out, roots, console)
    finally:
        out.close()
    unavailable = sum(1 for r in run.rows if r.thumb is None)
    result = HtmlResult(
        index=out_dir / "index.html",
        pages=pages,
        rows=len(run.rows),
        thumbnails_made=thumbs.made,
        thumbnails_reused=thumbs.reused,
        unavailable=unavailable,
        heatmaps=heat_count,
    )
    missing = [r for r in run.rows if r.thumb is None and r.ok]
    if missing:
        console.print(
            f"[yellow]warning:[/] {len(missing)} classified image(s) could not be shown "
            f"(first: {escape(missing[0].path)}: {escape(missing[0].thumb_note or '')}); their cards say why",
            highlight=False,
            soft_wrap=True,
        )
    if not config.quiet:
        console.print(
            escape(
                f"html report: {len(run.rows)} rows, {len(pages)} pages, {thumbs.made} thumbnails made "
                f"({thumbs.reused} reused), {heat_count} heatmaps: open {result.index}"
            ),
            highlight=False,
            soft_wrap=True,
        )
    return result


def _build(
    run: RunReport,
    metrics: dict[str, Any] | None,
    config: HtmlConfig,
    out: OutputDir,
    roots: Sequence[str],
    console: Console,
) -> tuple[list[str], Thumbnailer, int]:
    """Thumbnails (in threads), pages, then the marker saying the build is complete."""
    thumbs = Thumbnailer(out, config.thumb_side)
    allowed = _Roots(roots)
    heat_dir = Path(config.heatmaps).resolve() if config.heatmaps is not None else None
    out_abs = out.path.resolve()
    heat_count = [0]

    def one(row: Row) -> None:
        row.file, why = allowed.resolve(row.path)
        if row.file is None:
            row.thumb_note = why or "image not found at report time (looked under " + ", ".join(roots) + ")"
        else:
            try:
                row.thumb = thumbs.thumbnail(row.file)
            except ImageError as exc:
                row.thumb_note = f"no thumbnail: {exc}"
        if heat_dir is not None and row.ok:
            try:
                target = heat_dir / heatmap_relpath(row.path)
            except ValueError:
                return
            # Only a heatmap inside the heatmap folder (a planted link to elsewhere is not read).
            if _within(os.path.realpath(target), str(heat_dir)) and _is_file_not_link(target):
                try:
                    t = thumbs.thumbnail(str(target), "heatmap")
                except ImageError:
                    return
                link = Path(os.path.relpath(target, out_abs)).as_posix()
                row.heatmap = Thumb(t.src, t.width, t.height, link)
                heat_count[0] += 1

    workers = config.workers or max(1, min(8, os.cpu_count() or 1))
    show = console.is_terminal and not config.quiet
    pool = ThreadPoolExecutor(workers, "cxr-thumb")
    try:
        with progress_bar(console, len(run.rows), show, "thumbnails", None, log=not config.quiet) as advance:
            chunk = 256
            for start in range(0, len(run.rows), chunk):
                batch = run.rows[start : start + chunk]
                for future in [pool.submit(one, row) for row in batch]:
                    future.result()
                advance(len(batch))
    except BaseException:
        # Ctrl-C, SIGTERM, an output error: stop the threads at their next read, don't wait for them.
        thumbs.stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)

    pages = _write_pages(run, metrics, config, out)
    try:
        out.write_text(MARKER, _marker(pages, complete=True))
    except OSError as exc:
        raise OutputError(f"cannot write {out.path / MARKER}: {exc.strerror or exc}") from None
    return pages, thumbs, heat_count[0]


# --------------------------------------------------------------------------- pages

CSS = """
:root { color-scheme: light; --fg: #1d232b; --muted: #5b6570; --line: #d7dde3; --accent: #0b5cad; --bad: #b3261e;
  --warn: #8a5a00; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: var(--fg);
  margin: 0; background: #fff; }
header { background: #12263f; color: #fff; padding: 10px 20px; }
header h1 { font-size: 18px; margin: 0 0 4px; }
header nav a { color: #cfe3ff; margin-right: 14px; text-decoration: none; white-space: nowrap; }
header nav a.here { color: #fff; font-weight: 600; text-decoration: underline; }
main { padding: 14px 20px 40px; }
.disclaimer { color: var(--muted); font-size: 12px; margin: 0 0 12px; }
h2 { font-size: 16px; margin: 22px 0 8px; }
table { border-collapse: collapse; margin: 4px 0 10px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: var(--bg); font-weight: 600; }
.facts td { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; word-break: break-all; }
.cols { display: flex; flex-wrap: wrap; gap: 28px; align-items: flex-start; }
.pager { margin: 8px 0 12px; }
.pager a, .pager span { display: inline-block; padding: 2px 8px; margin: 0 2px 4px 0; border: 1px solid var(--line);
  border-radius: 4px; text-decoration: none; color: var(--accent); }
.pager span.here { background: var(--accent); color: #fff; border-color: var(--accent); }
.pager span.gap { border: none; color: var(--muted); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(var(--card, 200px), 1fr)); gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px; margin: 0; background: #fff; }
.card.flag { border-color: #e0b252; background: #fffaf0; }
.card.err { border-color: #e6a39e; background: #fff6f5; }
.imgs { display: flex; gap: 6px; }
.imgs a, .imgs > span { flex: 1 1 0; min-width: 0; }
.imgs img { width: 100%; height: auto; max-height: 200px; object-fit: contain; background: #000; display: block; }
.name { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; word-break: break-all; margin: 6px 0 2px; }
.pred { font-weight: 600; }
.truth.wrong { color: #b3261e; font-weight: 600; }
td.n a { color: inherit; }
.probs { width: 100%; margin: 4px 0; font-size: 12px; }
.probs th, .probs td { border: none; padding: 0 4px 0 0; background: none; font-weight: normal; }
.probs td.bar { width: 60%; }
.probs td.bar span { display: block; height: 8px; background: var(--accent); border-radius: 2px; }
.badge { display: inline-block; font-size: 11px; padding: 0 5px; border-radius: 3px; margin-right: 4px; }
.badge.flag { background: #f3d48b; color: #4a3300; }
.badge.low { background: #dfe7f1; color: #203040; }
.note { font-size: 12px; color: var(--muted); margin-top: 3px; word-break: break-word; }
.error { font-size: 12px; color: var(--bad); margin-top: 3px; word-break: break-word; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
""".strip()


def _page(title: str, nav: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # No network, no scripts: the page may load only its own folder's images and style.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self' file: data:; "
        "style-src 'self' file: 'unsafe-inline'\">"
        '<meta name="referrer" content="no-referrer">'
        f"<title>{text(title)}</title>"
        '<link rel="stylesheet" href="style.css"></head>\n<body>\n'
        f"<header><h1>{text(title)}</h1><nav>{nav}</nav></header>\n"
        "<main>\n"
        '<p class="disclaimer">cxr-batch is a research tool, not a medical device: never use its output for diagnosis.</p>\n'
        f"{body}\n</main>\n</body></html>\n"
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}" if total else "-"


@dataclass
class _Gallery:
    key: str  #: the file name stem: "label-0-normal", "flagged", "low-confidence", "errors"
    title: str
    nav: str
    order: str
    rows: list[Row]

    def page_name(self, number: int) -> str:
        return f"{self.key}-{number}.html"

    def pages(self, per_page: int) -> int:
        return max(1, math.ceil(len(self.rows) / per_page))


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40]


def _conf_key(row: Row) -> tuple[float, str]:
    return (row.confidence if row.confidence is not None else -1.0, row.path)


def _galleries(run: RunReport, low: float) -> list[_Gallery]:
    ok = [r for r in run.rows if r.ok and r.label is not None]
    out: list[_Gallery] = []
    by_label: dict[str | None, list[Row]] = {}
    for r in ok:
        by_label.setdefault(r.label, []).append(r)
    known = list(run.labels) + sorted(str(k) for k in by_label if k not in run.labels)
    for i, label in enumerate(known):
        rows = sorted(by_label.get(label, []), key=lambda r: (-(r.confidence or 0.0), r.path))
        slug = _slug(label)
        out.append(
            _Gallery(
                f"label-{i}{'-' + slug if slug else ''}", f"predicted {label}", label, "most confident first", rows
            )
        )
    flagged = sorted((r for r in ok if r.in_distribution is False), key=lambda r: (-(r.confidence or 0.0), r.path))
    out.append(_Gallery("flagged", "flagged out of distribution", "flagged", "most confident first", flagged))
    lows = sorted(
        (r for r in ok if r.confidence is not None and r.confidence < low),
        key=_conf_key,
    )
    out.append(
        _Gallery("low-confidence", f"low confidence (below {low:g})", "low confidence", "least confident first", lows)
    )
    unassessable = sorted((r for r in run.rows if r.ok and r.assessable is False), key=lambda r: r.path)
    if unassessable or any(r.assessable is not None for r in run.rows):
        out.append(_Gallery("not-assessable", "not assessable (no label)", "not assessable", "by path", unassessable))
    errors = sorted(
        (r for r in run.rows if not (r.ok and r.label is not None) and r.assessable is not False), key=lambda r: r.path
    )
    out.append(_Gallery("errors", "unreadable", "unreadable", "by path", errors))
    return out + _mistake_galleries(run)


def mistake_key(labels: Sequence[str], true: str, predicted: str) -> str:
    """The gallery of the films of class ``true`` that the model called ``predicted``."""
    known = list(labels)

    def index(label: str) -> str:
        return str(known.index(label)) if label in known else _slug(label) or "x"

    return f"wrong-{index(true)}-{index(predicted)}"


def _mistake_galleries(run: RunReport) -> list[_Gallery]:
    """One "misclassified" gallery per true → predicted pair, when the rows have true labels."""
    pairs: dict[tuple[str, str], list[Row]] = {}
    for r in run.rows:
        if r.ok and r.label is not None and r.true_label is not None and r.label != r.true_label:
            pairs.setdefault((r.true_label, r.label), []).append(r)
    order = list(run.labels)

    def rank(pair: tuple[str, str]) -> tuple[int, int, str, str]:
        t, p = pair
        return (order.index(t) if t in order else len(order), order.index(p) if p in order else len(order), t, p)

    return [
        _Gallery(
            mistake_key(run.labels, t, p),
            f"misclassified: true {t}, predicted {p}",
            f"{t} → {p}",
            "most confident first",
            sorted(pairs[(t, p)], key=lambda r: (-(r.confidence or 0.0), r.path)),
        )
        for t, p in sorted(pairs, key=rank)
    ]


def _nav(galleries: Sequence[_Gallery], here: str) -> str:
    links = [f'<a href="index.html"{" class=here" if here == "index" else ""}>summary</a>']
    for g in galleries:
        cls = ' class="here"' if here == g.key else ""
        links.append(f'<a href="{href(g.page_name(1))}"{cls}>{text(g.nav)} ({len(g.rows)})</a>')
    return "".join(links)


def _pager(g: _Gallery, number: int, total: int) -> str:
    if total <= 1:
        return ""
    parts = []
    if number > 1:
        parts.append(f'<a href="{href(g.page_name(number - 1))}" rel="prev">&larr; previous</a>')
    shown = sorted({1, total, *range(max(1, number - 3), min(total, number + 3) + 1)})
    last = 0
    for n in shown:
        if n - last > 1:
            parts.append('<span class="gap">&hellip;</span>')
        if n == number:
            parts.append(f'<span class="here">{n}</span>')
        else:
            parts.append(f'<a href="{href(g.page_name(n))}">{n}</a>')
        last = n
    if number < total:
        parts.append(f'<a href="{href(g.page_name(number + 1))}" rel="next">next &rarr;</a>')
    return f'<nav class="pager">page {number} of {total}: {"".join(parts)}</nav>'


def _card(row: Row, labels: Sequence[str], low: float) -> str:
    classes = ["card"]
    if not row.ok:
        classes.append("err")
    elif row.in_distribution is False:
        classes.append("flag")
    if row.thumb is not None:
        img = (
            f'<span><img src="{href(row.thumb.src)}" width="{row.thumb.width}" height="{row.thumb.height}" '
            f'alt="thumbnail of {text(row.path)}"></span>'
        )
    else:
        img = (
            f'<span><img src="{href(PLACEHOLDER)}" width="{THUMB_SIDE}" height="{THUMB_SIDE}" '
            'alt="no thumbnail" class="missing"></span>'
        )
    if row.heatmap is not None and row.heatmap.link is not None:
        img += (
            f'<a href="{href(row.heatmap.link)}" title="open the full heatmap"><img src="{href(row.heatmap.src)}" '
            f'width="{row.heatmap.width}" height="{row.heatmap.height}" alt="heatmap of {text(row.path)}"></a>'
        )
    parts = [f'<figure class="{" ".join(classes)}" id="r{row.index}"><div class="imgs">{img}</div><figcaption>']
    parts.append(f'<div class="name">{text(row.path)}</div>')
    if row.ok and row.label is not None:
        badges = ""
        if row.in_distribution is False:
            badges += '<span class="badge flag">out of distribution</span>'
        if row.confidence is not None and row.confidence < low:
            badges += '<span class="badge low">low confidence</span>'
        parts.append(f'<div><span class="pred">{text(row.label)}</span> {_fmt(row.confidence)} {badges}</div>')
        if row.true_label is not None:
            right = row.true_label == row.label
            parts.append(
                f'<div class="truth {"right" if right else "wrong"}">true: {text(row.true_label)}'
                f"{'' if right else ' (misclassified)'}</div>"
            )
        probs = []
        for label, p in zip(labels, row.probs, strict=False):
            width = 0.0 if p is None else max(0.0, min(100.0, 100.0 * p))
            probs.append(
                f'<tr><th>{text(label)}</th><td class="bar"><span style="width:{width:.1f}%"></span></td>'
                f'<td class="n">{_fmt(p)}</td></tr>'
            )
        parts.append(f'<table class="probs">{"".join(probs)}</table>')
        if row.ood_score is not None:
            verdict = {True: "in distribution", False: "flagged", None: "no verdict"}[row.in_distribution]
            parts.append(f'<div class="note">OOD score {row.ood_score:.4g} ({verdict})</div>')
    elif row.ok and row.assessable is False:
        parts.append('<div><span class="badge flag">not assessable</span> no label</div>')
    else:
        parts.append(f'<div class="error">{text(row.error or "error (no message)")}</div>')
        if row.true_label is not None:
            parts.append(f'<div class="truth">true: {text(row.true_label)}</div>')
    extra = [x for x in (row.modality, row.view_position) if x]
    if extra:
        parts.append(f'<div class="note">DICOM {text(" ".join(extra))}</div>')
    if row.notes:
        parts.append(f'<div class="note">{text(row.notes)}</div>')
    if row.thumb_note:
        parts.append(f'<div class="note">{text(row.thumb_note)}</div>')
    parts.append("</figcaption></figure>")
    return "".join(parts)


def _gallery_page(
    g: _Gallery, number: int, per_page: int, galleries: Sequence[_Gallery], run: RunReport, low: float, wide: bool
) -> str:
    total = g.pages(per_page)
    rows = g.rows[(number - 1) * per_page : number * per_page]
    start = (number - 1) * per_page
    head = (
        f'<p><span data-count="gallery">{len(g.rows)}</span> images, {text(g.order)}'
        + (f"; showing {start + 1}-{start + len(rows)}" if rows else "")
        + ".</p>"
    )
    pager = _pager(g, number, total)
    style = ' style="--card: 330px"' if wide else ""
    cards = "\n".join(_card(r, run.labels, low) for r in rows) if rows else "<p>None.</p>"
    body = f'{head}{pager}<div class="grid"{style}>\n{cards}\n</div>{pager}'
    title = f"{g.title}" + (f" (page {number} of {total})" if total > 1 else "")
    return _page(f"cxr-batch report: {title}", _nav(galleries, g.key), body)


def _count_cell(key: str, n: int) -> str:
    return f'<td class="n" data-count="{text(key)}">{n}</td>'


def _summary_tables(run: RunReport, galleries: Sequence[_Gallery]) -> str:
    stats = run.stats
    total = stats.total
    rows = []
    label_pages = {g.nav: g for g in galleries if g.key.startswith("label-")}
    for label in stats.labels:
        n = stats.per_label.get(label, 0)
        mean = stats.confidence_sum.get(label, 0.0) / n if n else None
        g = label_pages.get(label)
        name = f'<a href="{href(g.page_name(1))}">{text(label)}</a>' if g else text(label)
        rows.append(
            f"<tr><td>{name}</td>{_count_cell('label:' + label, n)}<td class=n>{_pct(n, total)}</td>"
            f"<td class=n>{_fmt(mean)}</td></tr>"
        )
    for label, n in sorted(stats.per_label.items()):
        if label not in stats.labels:
            rows.append(
                f"<tr><td>{text(label)}</td>{_count_cell('label:' + label, n)}<td class=n>{_pct(n, total)}</td><td></td></tr>"
            )
    if stats.not_assessable:
        n = stats.not_assessable
        rows.append(
            f'<tr><td><a href="not-assessable-1.html">not assessable</a> (no label)</td>'
            f"{_count_cell('not assessable', n)}<td class=n>{_pct(n, total)}</td><td></td></tr>"
        )
    for reason, n in stats.errors.most_common():
        rows.append(
            f'<tr><td><a href="errors-1.html">error:</a> {text(reason)}</td>{_count_cell("error:" + reason, n)}'
            f"<td class=n>{_pct(n, total)}</td><td></td></tr>"
        )
    rows.append(f"<tr><th>total</th>{_count_cell('total', total)}<td class=n>{_pct(total, total)}</td><td></td></tr>")
    labels_table = (
        "<table><tr><th>label / error</th><th>images</th><th>%</th><th>mean confidence</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    status = Counter(r.status for r in run.rows)
    status_rows = "".join(
        f"<tr><td>{text(s)}</td>{_count_cell('status:' + s, n)}<td class=n>{_pct(n, total)}</td></tr>"
        for s, n in sorted(status.items(), key=lambda kv: (kv[0] != "ok", kv[0]))
    )
    status_table = f"<table><tr><th>status</th><th>rows</th><th>%</th></tr>{status_rows}</table>"
    ok = [r for r in run.rows if r.ok and r.label is not None]
    verdicts = Counter({True: "in distribution", False: "flagged", None: "no verdict"}[r.in_distribution] for r in ok)
    ood_rows = "".join(
        f"<tr><td>{'<a href=flagged-1.html>flagged</a>' if v == 'flagged' else text(v)}</td>"
        f"{_count_cell('ood:' + v, verdicts.get(v, 0))}<td class=n>{_pct(verdicts.get(v, 0), len(ok))}</td></tr>"
        for v in ("in distribution", "flagged", "no verdict")
    )
    ood_table = f"<table><tr><th>out-of-distribution verdict (classified rows)</th><th>images</th><th>%</th></tr>{ood_rows}</table>"
    return f'<h2>Counts</h2><div class="cols"><div>{labels_table}</div><div>{status_table}{ood_table}</div></div>'


def _flatten(doc: Any, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, str]]:
    if isinstance(doc, dict) and depth < 3:
        for k, v in doc.items():
            yield from _flatten(v, f"{prefix}{k}." if depth < 2 else f"{prefix}{k}", depth + 1)
    elif isinstance(doc, dict | list):
        yield prefix.rstrip("."), json.dumps(doc, ensure_ascii=False)[:2000]
    else:
        yield prefix.rstrip("."), "" if doc is None else str(doc)


def _facts(run: RunReport, metrics: dict[str, Any] | None) -> str:
    rows = [("report", ", ".join(run.sources)), ("rows", str(len(run.rows)))]
    for column in FACT_COLUMNS:
        values = run.facts.get(column)
        if values:
            shown = "; ".join(f"{v} ({n} rows)" if len(values) > 1 else v for v, n in values.most_common(5))
            if len(values) > 5:
                shown += f"; and {len(values) - 5} more"
            rows.append((column, shown))
    if metrics is not None:
        for key in ("model", "model_sha256", "model_origin", "provider", "cxr_batch_version"):
            if metrics.get(key) is not None:
                rows.append((f"evaluate: {key}", str(metrics[key])))
        data = metrics.get("data")
        if isinstance(data, dict):
            rows.append(("evaluate: data", f"{data.get('root', '')} ({data.get('source', '')})"))
    for source, doc in run.provenance.items():
        for key, value in _flatten(redact_record(doc)):  # a record written by any version: no secret, no patient value
            rows.append((f"provenance ({Path(source).name}): {key}", value))
    if run.skipped_partial:
        rows.append(("left out", f"{run.skipped_partial} incomplete or damaged rows"))
    body = "".join(f"<tr><th>{text(k)}</th><td>{text(v)}</td></tr>" for k, v in rows[:200])
    return f'<h2>Run</h2><table class="facts">{body}</table>'


def _metrics_section(doc: dict[str, Any], galleries: Sequence[_Gallery] = ()) -> str:
    labels = [str(x) for x in doc.get("labels", [])]

    def ci(value: Any) -> str:
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
            return f" [{value[0]:.3f}, {value[1]:.3f}]"
        return ""

    def num(value: Any) -> str:
        return _fmt(float(value)) if isinstance(value, int | float) else "-"

    head = (
        "<table>"
        f"<tr><th>images classified</th><td class=n data-count='metrics:n'>{text(doc.get('n', '-'))}</td></tr>"
        f"<tr><th>accuracy (95% CI)</th><td class=n>{num(doc.get('accuracy'))}{ci(doc.get('accuracy_ci95'))}</td></tr>"
        f"<tr><th>macro F1</th><td class=n>{num(doc.get('macro_f1'))}</td></tr>"
        f"<tr><th>expected calibration error</th><td class=n>{num(doc.get('ece'))}</td></tr>"
        f"<tr><th>unreadable</th><td class=n>{text(doc.get('error_count', '-'))}</td></tr>"
        "</table>"
    )
    per_class = doc.get("per_class") if isinstance(doc.get("per_class"), dict) else {}
    pc_rows = []
    for label in labels:
        m = per_class.get(label, {}) if isinstance(per_class, dict) else {}
        if not isinstance(m, dict):
            continue
        pc_rows.append(
            f"<tr><th>{text(label)}</th><td class=n>{text(m.get('support', '-'))}</td>"
            + "".join(
                f"<td class=n>{num(m.get(k))}{ci(m.get(k + '_ci95'))}</td>"
                for k in ("precision", "recall", "specificity")
            )
            + f"<td class=n>{num(m.get('f1'))}</td><td class=n>{num(m.get('roc_auc'))}</td></tr>"
        )
    per_class_table = (
        "<table><tr><th>class</th><th>support</th><th>precision (95% CI)</th><th>recall (95% CI)</th>"
        f"<th>specificity (95% CI)</th><th>F1</th><th>ROC AUC</th></tr>{''.join(pc_rows)}</table>"
    )
    return (
        "<h2>Evaluation</h2>"
        f'<div class="cols"><div>{head}{per_class_table}</div></div>'
        f'<div class="cols"><div><h2>Confusion matrix</h2>{_confusion(doc, labels, galleries)}</div>'
        f"<div><h2>Reliability</h2>{_reliability_svg(doc.get('reliability'))}</div></div>"
    )


def _confusion(doc: dict[str, Any], labels: Sequence[str], galleries: Sequence[_Gallery] = ()) -> str:
    """The confusion matrix; an off-diagonal cell links to its "misclassified" gallery when there is one."""
    pages = {g.key: g.page_name(1) for g in galleries if g.key.startswith("wrong-")}

    def cell(i: int, j: int, v: int) -> str:
        page = pages.get(mistake_key(labels, labels[i], labels[j])) if i != j and v else None
        return f'<a href="{href(page)}" title="see these films">{v}</a>' if page else str(v)

    cm = doc.get("confusion_matrix")

    if not isinstance(cm, list) or len(cm) != len(labels):
        return "<p>No confusion matrix in the metrics file.</p>"
    head = "".join(f"<th>{text(lab)}</th>" for lab in labels)
    body = []
    for i, row in enumerate(cm):
        if not isinstance(row, list):
            continue
        cells = [int(v) if isinstance(v, int | float) else 0 for v in row]
        total = sum(cells) or 1
        tds = "".join(
            f'<td class=n data-count="cm:{i}:{j}" style="background: rgba(11, 92, 173, {0.85 * v / total:.3f});'
            f'{" color: #fff;" if v / total > 0.5 else ""}">{cell(i, j, v)}</td>'
            for j, v in enumerate(cells)
        )
        body.append(f"<tr><th>{text(labels[i])}</th>{tds}</tr>")
    return (
        f"<table><tr><th>true \\ predicted</th>{head}</tr>{''.join(body)}</table>"
        '<p class="note">Rows: true class; columns: predicted class.</p>'
    )


def _truth_section(run: RunReport, galleries: Sequence[_Gallery]) -> str:
    """Without a metrics file: the confusion matrix of the rows that have a true label the model knows."""
    labels = list(run.labels)
    cm = [[0] * len(labels) for _ in labels]
    other = 0
    for r in run.rows:
        if r.ok and r.label in labels and r.true_label in labels:
            cm[labels.index(r.true_label)][labels.index(r.label)] += 1  # type: ignore[arg-type]
        elif r.true_label is not None and r.ok:
            other += 1
    n = sum(map(sum, cm))
    right = sum(cm[i][i] for i in range(len(labels)))
    note = f"<p>{right} of {n} classified films with a true label are right ({_pct(right, n)}%)."
    note += f" {other} more have a true label the model does not know.</p>" if other else "</p>"
    doc = {"confusion_matrix": cm}
    return f"<h2>True labels</h2>{note}<h2>Confusion matrix</h2>{_confusion(doc, labels, galleries)}"


def _reliability_svg(bins: Any) -> str:
    """Accuracy per confidence bin against the diagonal, as inline SVG (no JavaScript, no matplotlib)."""
    if not isinstance(bins, list) or not bins:
        return "<p>No reliability bins in the metrics file.</p>"
    size, pad = 300, 40
    span = size - 2 * pad

    def x(v: float) -> float:
        return pad + v * span

    def y(v: float) -> float:
        return size - pad - v * span

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" viewBox="0 0 {size} {size}" '
        'role="img" aria-label="reliability diagram">',
        f'<rect x="{pad}" y="{pad}" width="{span}" height="{span}" fill="#fafbfc" stroke="#999"/>',
    ]
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{x(t):.1f}" y="{size - pad + 14}" text-anchor="middle">{t:g}</text>')
        parts.append(f'<text x="{pad - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    rows = []
    for b in bins:
        if not isinstance(b, dict):
            continue
        lo, hi, n, acc, conf = (b.get(k) for k in ("lower", "upper", "n", "accuracy", "confidence"))
        if not (isinstance(lo, int | float) and isinstance(hi, int | float) and isinstance(n, int | float)):
            continue
        rows.append(
            f"<tr><td class=n>{lo:.2f}-{hi:.2f}</td><td class=n>{int(n)}</td><td class=n>{_fmt(conf)}</td>"
            f"<td class=n>{_fmt(acc)}</td></tr>"
        )
        if not isinstance(acc, int | float) or not n:
            continue
        w = x(float(hi)) - x(float(lo))
        parts.append(
            f'<rect x="{x(float(lo)):.1f}" y="{y(float(acc)):.1f}" width="{max(w - 1, 1):.1f}" '
            f'height="{float(acc) * span:.1f}" fill="#0b5cad" fill-opacity="0.75">'
            f"<title>confidence {lo:.2f}-{hi:.2f}: {int(n)} images, accuracy {acc:.3f}</title></rect>"
        )
        if isinstance(conf, int | float):
            parts.append(f'<circle cx="{x(float(conf)):.1f}" cy="{y(float(conf)):.1f}" r="2.5" fill="#b3261e"/>')
    parts.append(
        f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(1)}" y2="{y(1)}" stroke="#b3261e" stroke-dasharray="4 3"/>'
        f'<text x="{size / 2}" y="{size - 8}" text-anchor="middle">top-1 confidence</text>'
        f'<text x="12" y="{size / 2}" text-anchor="middle" transform="rotate(-90 12 {size / 2})">accuracy</text>'
        "</svg>"
    )
    table = (
        "<details><summary>bins</summary><table><tr><th>confidence</th><th>images</th><th>mean confidence</th>"
        f"<th>accuracy</th></tr>{''.join(rows)}</table></details>"
    )
    return (
        "".join(parts)
        + '<p class="note">Bars: accuracy per bin; dots: mean confidence; dashed: perfect calibration.</p>'
        + table
    )


def _gallery_links(galleries: Sequence[_Gallery], per_page: int) -> str:
    items = "".join(
        f'<tr><td><a href="{href(g.page_name(1))}">{text(g.title)}</a></td>{_count_cell("gallery:" + g.key, len(g.rows))}'
        f"<td class=n>{g.pages(per_page)}</td><td>{text(g.order)}</td></tr>"
        for g in galleries
    )
    return (
        f"<h2>Galleries</h2><table><tr><th>gallery</th><th>images</th><th>pages</th><th>order</th></tr>{items}</table>"
    )


def _write_pages(run: RunReport, metrics: dict[str, Any] | None, config: HtmlConfig, out: OutputDir) -> list[str]:
    galleries = _galleries(run, config.low_confidence)
    written: list[str] = []

    def write(name: str, content: str) -> None:
        try:
            out.write_text(name, content)  # atomic; a link named like a page or style.css is replaced
        except LinkRefused as exc:
            raise OutputError(f"cannot write {out.path / name}: {exc}") from None
        except OSError as exc:
            raise OutputError(f"cannot write {out.path / name}: {exc.strerror or exc}") from None
        if name.endswith(".html"):
            written.append(name)

    write("style.css", CSS + "\n")
    body = _summary_tables(run, galleries) + _gallery_links(galleries, config.per_page)
    if metrics is not None:
        body += _metrics_section(metrics, galleries)
    elif any(r.true_label is not None for r in run.rows):
        body += _truth_section(run, galleries)
    body += _facts(run, metrics)
    write("index.html", _page("cxr-batch report", _nav(galleries, "index"), body))
    wide = config.heatmaps is not None
    for g in galleries:
        for number in range(1, g.pages(config.per_page) + 1):
            write(
                g.page_name(number),
                _gallery_page(g, number, config.per_page, galleries, run, config.low_confidence, wide),
            )
    return written
