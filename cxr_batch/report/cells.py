"""CSV text cells that a spreadsheet would run as formulas, neutralised reversibly.

Excel and LibreOffice treat a cell that begins with ``=``, ``+``, ``-``, ``@``, a TAB or a
carriage return as a formula (CSV injection). A file name can begin with any of them. In the
CSV report every *text* cell (``path``, ``label``, ``error``, ``notes``, the DICOM fields, ...;
never the numbers) that begins with one of them, or with a single quote, gets one ``'``
prefixed: ``=cmd|' /C calc'!A0.png`` is written ``'=cmd|' /C calc'!A0.png``, ``'a.png`` is
written ``''a.png``. Reading a cell back removes exactly one leading ``'`` when there is one
(:func:`unescape_cell`), so every name round-trips byte for byte, and a spreadsheet shows the
leading quote as text. ``--resume`` and ``merge`` read the cells this way. JSON lines are
never changed: no spreadsheet evaluates them.
"""

from __future__ import annotations

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
