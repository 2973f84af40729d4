"""CSV text cells neutralised against spreadsheet formulas: kept for existing imports.

The rule and the two functions live with the rest of the report format,
:mod:`cxr_batch.report.format` (:func:`~cxr_batch.report.format.escape_cell`,
:func:`~cxr_batch.report.format.unescape_cell`).
"""

from __future__ import annotations

from cxr_batch.report.format import FORMULA_LEADS, QUOTE, escape_cell, unescape_cell

__all__ = ["FORMULA_LEADS", "QUOTE", "escape_cell", "unescape_cell"]
