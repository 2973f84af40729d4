"""The HTML report's pages as data, for the templates: the galleries (which rows, in which order, on
which page), the summary counts, the run's facts, the evaluation tables, the confusion matrix, the
reliability diagram's geometry, the pager and the cards. Numbers are formatted here; no HTML is
made here (the templates make it, and escape every value: :mod:`cxr_batch.report.html.render`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_batch.redact import redact_record
from cxr_batch.report.html.data import FACT_COLUMNS, Row, RunReport, Thumb
from cxr_batch.report.html.thumbs import PLACEHOLDER, THUMB_SIDE

#: The verdict words of ``in_distribution`` (true, false, empty).
VERDICTS = {True: "in distribution", False: "flagged", None: "no verdict"}


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` decimals; ``-`` for none (or not finite)."""
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def pct(n: int, total: int) -> str:
    """``n`` as a percentage of ``total`` (one decimal); ``-`` when the total is 0."""
    return f"{100.0 * n / total:.1f}" if total else "-"


# --------------------------------------------------------------------------- galleries


@dataclass
class Gallery:
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


def galleries(run: RunReport, low: float) -> list[Gallery]:
    """The report's galleries, in the order of the navigation bar."""
    ok = [r for r in run.rows if r.ok and r.label is not None]
    out: list[Gallery] = []
    by_label: dict[str | None, list[Row]] = {}
    for r in ok:
        by_label.setdefault(r.label, []).append(r)
    known = list(run.labels) + sorted(str(k) for k in by_label if k not in run.labels)
    for i, label in enumerate(known):
        rows = sorted(by_label.get(label, []), key=lambda r: (-(r.confidence or 0.0), r.path))
        slug = _slug(label)
        out.append(
            Gallery(f"label-{i}{'-' + slug if slug else ''}", f"predicted {label}", label, "most confident first", rows)
        )
    flagged = sorted((r for r in ok if r.in_distribution is False), key=lambda r: (-(r.confidence or 0.0), r.path))
    out.append(Gallery("flagged", "flagged out of distribution", "flagged", "most confident first", flagged))
    lows = sorted(
        (r for r in ok if r.confidence is not None and r.confidence < low),
        key=_conf_key,
    )
    out.append(
        Gallery("low-confidence", f"low confidence (below {low:g})", "low confidence", "least confident first", lows)
    )
    unassessable = sorted((r for r in run.rows if r.ok and r.assessable is False), key=lambda r: r.path)
    if unassessable or any(r.assessable is not None for r in run.rows):
        out.append(Gallery("not-assessable", "not assessable (no label)", "not assessable", "by path", unassessable))
    errors = sorted(
        (r for r in run.rows if not (r.ok and r.label is not None) and r.assessable is not False), key=lambda r: r.path
    )
    out.append(Gallery("errors", "unreadable", "unreadable", "by path", errors))
    return out + _mistake_galleries(run)


def mistake_key(labels: Sequence[str], true: str, predicted: str) -> str:
    """The gallery of the films of class ``true`` that the model called ``predicted``."""
    known = list(labels)

    def index(label: str) -> str:
        return str(known.index(label)) if label in known else _slug(label) or "x"

    return f"wrong-{index(true)}-{index(predicted)}"


def _mistake_galleries(run: RunReport) -> list[Gallery]:
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
        Gallery(
            mistake_key(run.labels, t, p),
            f"misclassified: true {t}, predicted {p}",
            f"{t} → {p}",
            "most confident first",
            sorted(pairs[(t, p)], key=lambda r: (-(r.confidence or 0.0), r.path)),
        )
        for t, p in sorted(pairs, key=rank)
    ]


# --------------------------------------------------------------------------- navigation


@dataclass(frozen=True)
class Link:
    """A link of the navigation bar or the pager: its target (a page of the folder) and its text."""

    target: str
    text: str
    here: bool = False


def nav(galleries: Sequence[Gallery], here: str) -> list[Link]:
    """The navigation bar: the summary, then every gallery with its number of images."""
    return [Link("index.html", "summary", here == "index")] + [
        Link(g.page_name(1), f"{g.nav} ({len(g.rows)})", here == g.key) for g in galleries
    ]


@dataclass(frozen=True)
class PagerItem:
    """One item of the pager: ``prev``, ``next``, ``page`` (a link), ``here`` (this page) or ``gap``."""

    kind: str
    number: int = 0
    target: str = ""


def pager(g: Gallery, number: int, total: int) -> list[PagerItem]:
    """Previous, the first and last pages, three pages either side of this one, next (none: one page)."""
    if total <= 1:
        return []
    items = []
    if number > 1:
        items.append(PagerItem("prev", number - 1, g.page_name(number - 1)))
    shown = sorted({1, total, *range(max(1, number - 3), min(total, number + 3) + 1)})
    last = 0
    for n in shown:
        if n - last > 1:
            items.append(PagerItem("gap"))
        items.append(PagerItem("here", n) if n == number else PagerItem("page", n, g.page_name(n)))
        last = n
    if number < total:
        items.append(PagerItem("next", number + 1, g.page_name(number + 1)))
    return items


# --------------------------------------------------------------------------- cards


@dataclass(frozen=True)
class Prob:
    label: str
    width: str  #: the bar's width, in percent
    value: str


@dataclass(frozen=True)
class Card:
    """One image's card in a gallery."""

    index: int
    classes: str
    path: str
    #: the thumbnail, or the placeholder when there is none (``missing``)
    image: Thumb
    missing: bool
    heatmap: Thumb | None
    #: "label" (classified), "not-assessable" or "error"
    kind: str
    label: str | None
    confidence: str
    flagged: bool
    low: bool
    true_label: str | None
    right: bool
    probs: list[Prob]
    ood: str | None
    error: str
    dicom: str | None
    notes: str | None
    thumb_note: str | None


def card(row: Row, labels: Sequence[str], low: float) -> Card:
    classes = ["card"]
    if not row.ok:
        classes.append("err")
    elif row.in_distribution is False:
        classes.append("flag")
    kind = (
        "label"
        if row.ok and row.label is not None
        else "not-assessable"
        if row.ok and row.assessable is False
        else "error"
    )
    probs = [
        Prob(label, f"{0.0 if p is None else max(0.0, min(100.0, 100.0 * p)):.1f}", fmt(p))
        for label, p in zip(labels, row.probs, strict=False)
    ]
    extra = [x for x in (row.modality, row.view_position) if x]
    return Card(
        index=row.index,
        classes=" ".join(classes),
        path=row.path,
        image=row.thumb or Thumb(PLACEHOLDER, THUMB_SIDE, THUMB_SIDE),
        missing=row.thumb is None,
        heatmap=row.heatmap if row.heatmap is not None and row.heatmap.link is not None else None,
        kind=kind,
        label=row.label,
        confidence=fmt(row.confidence),
        flagged=row.in_distribution is False,
        low=row.confidence is not None and row.confidence < low,
        true_label=row.true_label,
        right=row.true_label == row.label,
        probs=probs,
        ood=None if row.ood_score is None else f"{row.ood_score:.4g} ({VERDICTS[row.in_distribution]})",
        error=row.error or "error (no message)",
        dicom=" ".join(extra) if extra else None,
        notes=row.notes,
        thumb_note=row.thumb_note,
    )


# --------------------------------------------------------------------------- the summary


@dataclass(frozen=True)
class CountRow:
    """A row of a count table: its ``data-count`` key, its name (with a link to a gallery when
    there is one: ``link_text`` linked, then ``after``), the count and its percentage."""

    key: str
    n: int
    pct: str
    link: str | None = None
    link_text: str = ""
    after: str = ""
    #: the mean confidence (label rows; None: an empty cell)
    mean: str | None = None
    total: bool = False


def label_rows(run: RunReport, galleries: Sequence[Gallery]) -> list[CountRow]:
    """The counts by label, then not assessable, then errors by reason, then the total."""
    stats = run.stats
    total = stats.total
    rows = []
    label_pages = {g.nav: g for g in galleries if g.key.startswith("label-")}
    for label in stats.labels:
        n = stats.per_label.get(label, 0)
        mean = stats.confidence_sum.get(label, 0.0) / n if n else None
        g = label_pages.get(label)
        page = g.page_name(1) if g else None
        rows.append(CountRow("label:" + label, n, pct(n, total), page, label, mean=fmt(mean)))
    for label, n in sorted(stats.per_label.items()):
        if label not in stats.labels:
            rows.append(CountRow("label:" + label, n, pct(n, total), None, label))
    if stats.not_assessable:
        n = stats.not_assessable
        rows.append(
            CountRow("not assessable", n, pct(n, total), "not-assessable-1.html", "not assessable", " (no label)")
        )
    for reason, n in stats.errors.most_common():
        rows.append(CountRow("error:" + reason, n, pct(n, total), "errors-1.html", "error:", " " + reason))
    rows.append(CountRow("total", total, pct(total, total), None, "total", total=True))
    return rows


def status_rows(run: RunReport) -> list[CountRow]:
    """Rows by status, ``ok`` first."""
    total = run.stats.total
    status = Counter(r.status for r in run.rows)
    return [
        CountRow("status:" + s, n, pct(n, total), None, s)
        for s, n in sorted(status.items(), key=lambda kv: (kv[0] != "ok", kv[0]))
    ]


def ood_rows(run: RunReport) -> list[CountRow]:
    """Classified rows by out-of-distribution verdict."""
    ok = [r for r in run.rows if r.ok and r.label is not None]
    verdicts = Counter(VERDICTS[r.in_distribution] for r in ok)
    return [
        CountRow(
            "ood:" + v,
            verdicts.get(v, 0),
            pct(verdicts.get(v, 0), len(ok)),
            "flagged-1.html" if v == "flagged" else None,
            v,
        )
        for v in VERDICTS.values()
    ]


def _flatten(doc: Any, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, str]]:
    if isinstance(doc, dict) and depth < 3:
        for k, v in doc.items():
            yield from _flatten(v, f"{prefix}{k}." if depth < 2 else f"{prefix}{k}", depth + 1)
    elif isinstance(doc, dict | list):
        yield prefix.rstrip("."), json.dumps(doc, ensure_ascii=False)[:2000]
    else:
        yield prefix.rstrip("."), "" if doc is None else str(doc)


def facts(run: RunReport, metrics: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The run's facts (name, value): the reports, the model columns, evaluate's facts, the
    provenance records (redacted: no secret, no patient value), the rows left out. At most 200."""
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
    return rows[:200]


@dataclass(frozen=True)
class GalleryLink:
    target: str
    title: str
    key: str
    n: int
    pages: int
    order: str


def gallery_links(galleries: Sequence[Gallery], per_page: int) -> list[GalleryLink]:
    return [GalleryLink(g.page_name(1), g.title, g.key, len(g.rows), g.pages(per_page), g.order) for g in galleries]


# --------------------------------------------------------------------------- evaluation


def _ci(value: Any) -> str:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
        return f" [{value[0]:.3f}, {value[1]:.3f}]"
    return ""


def _num(value: Any) -> str:
    return fmt(float(value)) if isinstance(value, int | float) else "-"


@dataclass(frozen=True)
class Metrics:
    """``evaluate --out``'s numbers, formatted."""

    n: str
    accuracy: str
    macro_f1: str
    ece: str
    unreadable: str
    #: per class: the label, its support, then precision, recall, specificity (each with its
    #: interval), F1 and ROC AUC
    per_class: list[tuple[str, str, list[str]]]


def metrics(doc: dict[str, Any]) -> Metrics:
    labels = [str(x) for x in doc.get("labels", [])]
    per_class = doc.get("per_class") if isinstance(doc.get("per_class"), dict) else {}
    rows = []
    for label in labels:
        m = per_class.get(label, {}) if isinstance(per_class, dict) else {}
        if not isinstance(m, dict):
            continue
        cells = [_num(m.get(k)) + _ci(m.get(k + "_ci95")) for k in ("precision", "recall", "specificity")]
        rows.append((label, str(m.get("support", "-")), [*cells, _num(m.get("f1")), _num(m.get("roc_auc"))]))
    return Metrics(
        n=str(doc.get("n", "-")),
        accuracy=_num(doc.get("accuracy")) + _ci(doc.get("accuracy_ci95")),
        macro_f1=_num(doc.get("macro_f1")),
        ece=_num(doc.get("ece")),
        unreadable=str(doc.get("error_count", "-")),
        per_class=rows,
    )


@dataclass(frozen=True)
class CmCell:
    key: str
    n: int
    #: the cell's background: the share of its row, as an alpha (formatted)
    alpha: str
    #: white text (a dark cell)
    white: bool
    #: the "misclassified" gallery of the cell, when there is one
    link: str | None


@dataclass(frozen=True)
class Confusion:
    labels: list[str]
    #: per true class: its label and its cells
    rows: list[tuple[str, list[CmCell]]]


def confusion(doc: dict[str, Any], labels: Sequence[str], galleries: Sequence[Gallery] = ()) -> Confusion | None:
    """The confusion matrix (None: the document has none); an off-diagonal cell links to its
    "misclassified" gallery when there is one."""
    pages = {g.key: g.page_name(1) for g in galleries if g.key.startswith("wrong-")}
    cm = doc.get("confusion_matrix")
    if not isinstance(cm, list) or len(cm) != len(labels):
        return None
    rows = []
    for i, row in enumerate(cm):
        if not isinstance(row, list):
            continue
        values = [int(v) if isinstance(v, int | float) else 0 for v in row]
        total = sum(values) or 1
        cells = [
            CmCell(
                f"cm:{i}:{j}",
                v,
                f"{0.85 * v / total:.3f}",
                v / total > 0.5,
                pages.get(mistake_key(labels, labels[i], labels[j])) if i != j and v else None,
            )
            for j, v in enumerate(values)
        ]
        rows.append((labels[i], cells))
    return Confusion(list(labels), rows)


@dataclass(frozen=True)
class Truth:
    """Without a metrics file: how many classified films with a true label are right."""

    right: int
    n: int
    pct: str
    #: films with a true label the model does not know
    other: int
    confusion: Confusion | None


def truth(run: RunReport, galleries: Sequence[Gallery]) -> Truth:
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
    return Truth(right, n, pct(right, n), other, confusion({"confusion_matrix": cm}, labels, galleries))


@dataclass(frozen=True)
class Bar:
    x: str
    y: str
    width: str
    height: str
    title: str
    #: the bin's mean confidence, a dot on the diagonal: (x, y), or None
    dot: tuple[str, str] | None


@dataclass(frozen=True)
class Reliability:
    """The reliability diagram's geometry (an inline SVG, no JavaScript) and its table of bins."""

    size: int
    pad: int
    span: int
    #: axis ticks: (text, x of the x tick, y of the y tick)
    ticks: list[tuple[str, str, str]]
    bars: list[Bar]
    #: the diagonal: x1, y1, x2, y2
    diagonal: tuple[str, str, str, str]
    #: the table: confidence range, images, mean confidence, accuracy
    rows: list[tuple[str, str, str, str]]


def reliability(bins: Any) -> Reliability | None:
    """Accuracy per confidence bin against the diagonal (None: the document has no bins)."""
    if not isinstance(bins, list) or not bins:
        return None
    size, pad = 300, 40
    span = size - 2 * pad

    def x(v: float) -> float:
        return pad + v * span

    def y(v: float) -> float:
        return size - pad - v * span

    ticks = [(f"{t:g}", f"{x(t):.1f}", f"{y(t) + 4:.1f}") for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    bars, rows = [], []
    for b in bins:
        if not isinstance(b, dict):
            continue
        lo, hi, n, acc, conf = (b.get(k) for k in ("lower", "upper", "n", "accuracy", "confidence"))
        if not (isinstance(lo, int | float) and isinstance(hi, int | float) and isinstance(n, int | float)):
            continue
        rows.append((f"{lo:.2f}-{hi:.2f}", str(int(n)), fmt(conf), fmt(acc)))
        if not isinstance(acc, int | float) or not n:
            continue
        w = x(float(hi)) - x(float(lo))
        bars.append(
            Bar(
                f"{x(float(lo)):.1f}",
                f"{y(float(acc)):.1f}",
                f"{max(w - 1, 1):.1f}",
                f"{float(acc) * span:.1f}",
                f"confidence {lo:.2f}-{hi:.2f}: {int(n)} images, accuracy {acc:.3f}",
                (f"{x(float(conf)):.1f}", f"{y(float(conf)):.1f}") if isinstance(conf, int | float) else None,
            )
        )
    diagonal = (str(x(0)), str(y(0)), str(x(1)), str(y(1)))
    return Reliability(size, pad, span, ticks, bars, diagonal, rows)
