"""The one tally of report rows: by status, by label, by error reason, out of distribution, assessable.

The summary table (:class:`cxr_batch.report.writer.RunStats` is a :class:`Tally` with the run's
facts), the provenance record's ``counts`` (:meth:`Tally.to_dict`), ``merge`` and the HTML report
all count rows here. :meth:`Tally.add` takes :class:`~cxr_batch.engine.types.Result` objects as
a run makes them and :class:`~cxr_batch.report.reader.ReportRow` objects as a report is read back
alike (anything with the attributes of :class:`Countable`), so a row counts the same whether it
was just classified or read from a file.

How a row counts:

- an error row (``status`` other than ``ok``): under its reason, the error's text before the first
  ``": "`` (:func:`error_reason`);
- an ok row the out-of-distribution guard flagged (``in_distribution`` false): in ``flagged``;
- an ok row without a label (the lung stage found the film not assessable, ``assessable`` false):
  in ``not_assessable``, not under a label;
- otherwise under its label, with its confidence (for the mean); with ``drop_ood`` a flagged row
  leaves the label counts (``classify --drop-ood``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class Countable(Protocol):
    """What a row needs to be counted: a :class:`~cxr_batch.engine.types.Result` or a read-back
    :class:`~cxr_batch.report.reader.ReportRow`."""

    @property
    def status(self) -> str: ...
    @property
    def label(self) -> str | None: ...
    @property
    def confidence(self) -> float | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def in_distribution(self) -> bool | None: ...
    @property
    def assessable(self) -> bool | None: ...


def error_reason(error: str | None) -> str:
    """The summary's grouping key of an error: its text before the first ``": "`` (``error`` when empty)."""
    return error.split(": ", 1)[0] if error else "error"


@dataclass(kw_only=True)
class Tally:
    """Counts of report rows; :meth:`add` rows (or results) as they are written or read."""

    #: ok rows that are out of distribution leave the label counts (``classify --drop-ood``)
    drop_ood: bool = False
    #: rows counted
    rows: int = 0
    #: rows by ``status``
    status: Counter[str] = field(default_factory=Counter)
    #: ok rows by label (without the flagged ones under ``drop_ood``), and the sum of their confidences
    per_label: Counter[str] = field(default_factory=Counter)
    confidence_sum: dict[str, float] = field(default_factory=dict)
    #: error rows by :func:`error_reason`
    errors: Counter[str] = field(default_factory=Counter)
    #: ok rows the out-of-distribution guard flagged (``in_distribution`` false)
    flagged: int = 0
    #: ok rows without a label: the lung stage found no two plausible lung fields
    not_assessable: int = 0
    #: ok rows the lung stage found assessable, and how many of them were flagged
    assessable: int = 0
    assessable_flagged: int = 0

    def add(self, rows: Iterable[Countable]) -> None:
        """Count rows: :class:`~cxr_batch.engine.types.Result` objects or read-back report rows."""
        for r in rows:
            self.add_row(r.status, r.label, r.error, r.in_distribution, r.assessable, r.confidence)

    def add_row(
        self,
        status: str,
        label: str | None,
        error: str | None,
        in_distribution: bool | None,
        assessable: bool | None = None,
        confidence: float | None = None,
    ) -> None:
        """Count one row given by its values."""
        self.rows += 1
        self.status[status] += 1
        if status != "ok":
            self.errors[error_reason(error)] += 1
            return
        flagged = in_distribution is False
        self.flagged += flagged
        if assessable is False or not label:
            self.not_assessable += 1
            return
        if assessable:
            self.assessable += 1
            self.assessable_flagged += flagged
        if flagged and self.drop_ood:
            return
        self.per_label[label] += 1
        self.confidence_sum[label] = self.confidence_sum.get(label, 0.0) + (confidence or 0.0)

    def update(self, other: Tally) -> None:
        """Add the counts of ``other`` (a part of a merged report) to these."""
        self.rows += other.rows
        self.status.update(other.status)
        self.per_label.update(other.per_label)
        for label, total in other.confidence_sum.items():
            self.confidence_sum[label] = self.confidence_sum.get(label, 0.0) + total
        self.errors.update(other.errors)
        self.flagged += other.flagged
        self.not_assessable += other.not_assessable
        self.assessable += other.assessable
        self.assessable_flagged += other.assessable_flagged

    @property
    def total(self) -> int:
        """Rows counted (the summary's name for :attr:`rows`)."""
        return self.rows

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def unlike_training(self) -> bool:
        """Most assessable films score beyond the out-of-distribution threshold: the run-level warning."""
        return self.assessable > 0 and self.assessable_flagged > self.assessable / 2

    def mean_confidence(self, label: str) -> float | None:
        n = self.per_label.get(label, 0)
        return self.confidence_sum.get(label, 0.0) / n if n else None

    def to_dict(self, labels: Sequence[str] = ()) -> dict[str, Any]:
        """The counts as the provenance record holds them (``labels`` first, in this order)."""
        by_label = {label: self.per_label.get(label, 0) for label in labels}
        by_label.update({k: v for k, v in sorted(self.per_label.items()) if k not in by_label})
        by_status = {s: self.status.get(s, 0) for s in ("ok", "error")}
        by_status.update({k: v for k, v in sorted(self.status.items()) if k not in by_status})
        return {
            "rows": self.rows,
            "status": by_status,
            "labels": by_label,
            "out_of_distribution": self.flagged,
            "not_assessable": self.not_assessable,
            "errors": dict(self.errors.most_common()),
        }

    @classmethod
    def of(cls, rows: Iterable[Countable], *, drop_ood: bool = False) -> Tally:
        tally = cls(drop_ood=drop_ood)
        tally.add(rows)
        return tally


def total(tallies: Iterable[Tally]) -> Tally:
    """The sum of several tallies (the parts of a merged report)."""
    out = Tally()
    for t in tallies:
        out.update(t)
    return out


__all__ = ["Countable", "Tally", "error_reason", "total"]
