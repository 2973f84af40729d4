"""Text shown on a terminal: file names and messages made safe to print.

A file name may hold any byte but ``/`` and NUL: an ANSI escape sequence in a name would clear
the screen, move the cursor or retitle the window when printed raw, a carriage return would hide
what came before it, a bidirectional override would show the name reversed. :func:`shown`
escapes every such character, visibly and unambiguously:

- C0 controls, DEL and C1 controls: ``\\n``, ``\\r``, ``\\t`` or ``\\xNN`` (``ESC`` → ``\\x1b``);
- bytes that were not valid UTF-8 (kept by ``surrogateescape`` as U+DC80…U+DCFF): ``\\xNN``,
  the original byte;
- Unicode format characters that reorder or hide text (bidi embeddings, overrides and isolates,
  zero-width characters, the BOM), the line and paragraph separators, and surrogates that are not
  such bytes (a JSON ``"\\ud800"``): ``\\uNNNN``;
- a backslash itself stays a backslash (names with backslashes are common on shared drives),
  so ``\\x1b`` in the output is either the escape of ESC or those four characters in the name;
  the report file keeps the exact name either way.

:func:`markup` also escapes rich markup (``[bold]`` in a name is printed, never interpreted).
Every message cxr-batch prints (warnings, errors, tables, the ``Error:`` line) goes through one
of these; so does every text of the HTML report (``named=False``: ``\\x0a`` rather than ``\\n``),
before its HTML escaping (:mod:`cxr_batch.report.html.render`).
"""

from __future__ import annotations

import re

#: Format characters that change how the text around them is shown (Unicode category Cf, the
#: ones terminals and editors act on).
_FORMAT = "\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff"
#: ... and the line/paragraph separators (U+2028, U+2029), and every surrogate.
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff{_FORMAT}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    ch = match.group()
    if ch in _NAMED:
        return _NAMED[ch]
    return _hex(ch)


def _hex(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def shown(text: object, named: bool = True) -> str:
    """``text`` (any object, through ``str``) with control and format characters escaped.

    ``named=False``: newline, carriage return and tab as ``\\x0a``, ``\\x0d``, ``\\x09`` too.
    """
    return _UNSAFE.sub(_escape_one if named else _hex_match, str(text))


def _hex_match(match: re.Match[str]) -> str:
    return _hex(match.group())


def markup(text: object) -> str:
    """:func:`shown`, then rich markup escaped: safe inside a ``console.print`` markup string."""
    from rich.markup import escape

    return escape(shown(text))
