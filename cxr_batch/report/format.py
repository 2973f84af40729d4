"""The report format, in one place: its columns, how a result becomes a row, how cells are written.

Everything that writes a report (:mod:`cxr_batch.report.writer`, ``merge``, ``evaluate
--predictions``) and everything that reads one (:mod:`cxr_batch.report.reader`: ``--resume``,
``merge``, the HTML report, the provenance record's recount) takes the format from here.

Columns, in order (:func:`columns`): ``path, status, label, confidence, prob_<label>...`` (model
order), ``width, height, error``, the model's identity ``model, model_sha256, precision`` (the
same on every row of a run; ``resume`` and ``merge`` refuse rows of another identity), then
``notes`` and the columns other features fill (empty until then): ``modality, view_position,
sop_instance_uid, study_instance_uid`` (from ``Result.fields``, set by the DICOM reader),
``ood_score, in_distribution``, ``lung_fraction, assessable`` and ``covid_screen`` (the screening
call at the operating point; ``label`` stays the argmax); then ``run_id``, the run that wrote the
row (its entry in the provenance record). ``evaluate --predictions`` adds ``true_label, correct``
last. The labels of a report are its ``prob_`` columns, in order (:func:`labels_of`).

Values (:func:`row_values`): numbers to 6 significant digits, ``None`` for empty. In CSV
(:func:`csv_text`) ``None`` is an empty cell, booleans ``true``/``false``; in JSON lines numbers,
``null`` and ``true``/``false``.

Encoding (:data:`ENCODING`, :data:`ERRORS`): UTF-8 with ``surrogateescape``. A file name that
is not valid UTF-8 is written with its original bytes (CSV), so reading the CSV back gives the
exact name that ``os.fsencode`` turns into the original bytes. JSON lines are pure ASCII
(``ensure_ascii``): such a byte ``0xNN`` appears as ``\\udcNN``, which ``json.loads`` returns as
the same surrogate-escaped name. Commas, quotes and newlines are quoted by the csv module.

Cells a spreadsheet would run as formulas (CSV injection): Excel and LibreOffice treat a cell
that begins with ``=``, ``+``, ``-``, ``@``, a TAB or a carriage return as a formula, and a file
name can begin with any of them. In the CSV report every *text* cell (``path``, ``label``,
``error``, ``notes``, the DICOM fields, ...; never the numbers) that begins with one of them, or
with a single quote, gets one ``'`` prefixed (:func:`escape_cell`): ``=cmd|' /C calc'!A0.png`` is
written ``'=cmd|' /C calc'!A0.png``, ``'a.png`` is written ``''a.png``. Reading a cell back
removes exactly one leading ``'`` when there is one (:func:`unescape_cell`), so every name
round-trips byte for byte, and a spreadsheet shows the leading quote as text. JSON lines are
never changed: no spreadsheet evaluates them.

A row read back is checked against the same rules (:func:`csv_cell` for a CSV cell,
:func:`jsonl_row_problem` for a JSON line): a number column holds a number or nothing,
``status`` is ``ok`` or ``error``, ``in_distribution`` and ``assessable`` a boolean or nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cxr_batch.errors import OutputError

if TYPE_CHECKING:
    from cxr_batch.engine.types import Result

Format = Literal["csv", "jsonl"]
FORMATS: tuple[str, ...] = ("csv", "jsonl")

ENCODING = "utf-8"
ERRORS = "surrogateescape"
#: How CSV rows end (RFC 4180). Not only for spreadsheets: Python's csv writer quotes a field
#: holding a bare ``\\r`` only when ``\\r`` is part of the line terminator, and a file name may hold one.
CSV_LINE_END = "\r\n"

HEAD_COLUMNS = ("path", "status", "label", "confidence")
#: The prefix of the probability columns: ``prob_<label>``, one per label, in the model's order.
PROB_PREFIX = "prob_"
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

#: Columns holding a number (or nothing) in every report; the ``prob_`` columns too.
NUMBER_COLUMNS = ("confidence", "width", "height", "ood_score", "lung_fraction")
#: The values ``status`` takes.
STATUSES = ("ok", "error")
#: The report's true/false columns (JSON booleans in JSONL, ``true``/``false`` in CSV).
BOOLEAN_COLUMNS = frozenset({"in_distribution", "assessable", "correct"})


def columns(labels: Sequence[str], truth: bool = False) -> list[str]:
    """The report's columns for a model with these labels (the one place that defines them);
    ``truth``: with :data:`TRUTH_COLUMNS` at the end (``evaluate --predictions``)."""
    cols = [*HEAD_COLUMNS, *(f"{PROB_PREFIX}{label}" for label in labels), *TAIL_COLUMNS, *EXTRA_COLUMNS, *RUN_COLUMNS]
    return cols + list(TRUTH_COLUMNS) if truth else cols


def labels_of(cols: Sequence[str] | None) -> tuple[str, ...]:
    """The labels a report's columns name: its ``prob_<label>`` columns, in order."""
    return tuple(c[len(PROB_PREFIX) :] for c in cols or () if c.startswith(PROB_PREFIX))


def is_number_column(name: str) -> bool:
    return name in NUMBER_COLUMNS or name.startswith(PROB_PREFIX)


def describe_diff(found: Sequence[str], wanted: Sequence[str]) -> str:
    """How a report's columns differ from the ones wanted: ``missing a, b; unexpected c``."""
    missing = [c for c in wanted if c not in found]
    extra = [c for c in found if c not in wanted]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing)}")
    if extra:
        parts.append(f"unexpected {', '.join(extra)}")
    return "; ".join(parts) or "same columns in another order"


# --------------------------------------------------------------------------- cells

#: Leading characters that make a spreadsheet cell a formula.
FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"


def escape_cell(text: str) -> str:
    """A text cell as the CSV report writes it."""
    if text.startswith(FORMULA_LEADS) or text.startswith(QUOTE):
        return QUOTE + text
    return text


def unescape_cell(text: str) -> str:
    """A text cell of the CSV report as it was before :func:`escape_cell`."""
    return text[1:] if text.startswith(QUOTE) else text


def csv_text(value: Any) -> str:
    """One typed value as the CSV report writes it (text cells neutralised, :func:`escape_cell`)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return escape_cell(value)  # a text cell never starts a spreadsheet formula
    return str(value)


def csv_record(row: Mapping[str, Any], cols: Sequence[str]) -> list[str]:
    """A row of typed values (:func:`row_values`) as the CSV report's fields, in column order."""
    return [csv_text(row[c]) for c in cols]


def json_line(row: Mapping[str, Any], cols: Sequence[str]) -> str:
    """A row of typed values as the JSON-lines report's line: keys in column order, pure ASCII."""
    return json.dumps({c: row[c] for c in cols}, ensure_ascii=True) + "\n"


_BOOLEANS = {"true": True, "false": False}


def _text_cell(column: str, cell: str) -> Any:
    return (cell[1:] if cell[:1] == QUOTE else cell) or None  # unescape_cell, inlined: the hot path


def _status_cell(column: str, cell: str) -> Any:
    if cell not in STATUSES:
        raise ValueError(f"status is {_kind(unescape_cell(cell))}, not ok or error")
    return cell


def _number_cell(column: str, cell: str) -> Any:
    if not cell:
        return None
    if cell.isdigit() and cell.isascii():
        return int(cell)
    try:
        return float(cell)
    except ValueError:
        raise ValueError(f"{column} is {_kind(cell)}, not a number") from None


def _boolean_cell(column: str, cell: str) -> Any:
    if not cell:
        return None
    try:
        return _BOOLEANS[cell]
    except KeyError:
        raise ValueError(f"{column} is {_kind(cell)}, not true, false or empty") from None


def _cell_parser(column: str) -> Callable[[str, str], Any]:
    if column == "status":
        return _status_cell
    if is_number_column(column):
        return _number_cell
    if column in BOOLEAN_COLUMNS:
        return _boolean_cell
    return _text_cell


def csv_cell(column: str, cell: str) -> Any:
    """A CSV cell of ``column`` as a typed value, the inverse of :func:`csv_text`: ``None`` for an
    empty cell, a number (``int`` where the cell is one, else ``float``), ``True``/``False``, or
    the text with its neutralising quote removed.

    Raises:
        ValueError: the cell does not hold what its column holds; the message says what is wrong
            as :func:`jsonl_row_problem` says it (``prob_covid is 'abc', not a number``).
    """
    return _cell_parser(column)(column, cell)


def csv_row_parser(cols: Sequence[str]) -> Callable[[Sequence[str]], dict[str, Any]]:
    """:func:`csv_cell` for every field of a record of these columns, the columns looked at once:
    ``parse(record)`` → column → typed value. Raises ``ValueError`` as :func:`csv_cell`."""
    parsers = [(c, _cell_parser(c)) for c in cols]

    def parse(record: Sequence[str]) -> dict[str, Any]:
        return {c: parser(c, cell) for (c, parser), cell in zip(parsers, record, strict=True)}

    return parse


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


# --------------------------------------------------------------------------- rows


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
        row[f"{PROB_PREFIX}{label}"] = _num(result.probs.get(label)) if result.probs else None
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


def add_truth(row: dict[str, Any], result: Result, truth: Mapping[str, str] | None) -> dict[str, Any]:
    """Fill :data:`TRUTH_COLUMNS` of ``row`` from ``truth`` (report path → true label)."""
    if truth is not None:
        true = truth.get(result.path)
        row["true_label"] = true
        row["correct"] = (result.label == true) if result.ok and true is not None else None
    return row


# --------------------------------------------------------------------------- file names


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
