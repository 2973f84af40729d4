"""Library warnings raised while a file is decoded become the file's notes, never stderr lines.

Pillow (``DecompressionBombWarning``) and pydicom (``UserWarning: Invalid value for VR UI:
'<header value>'``) warn through :mod:`warnings`, which prints the library's source path and,
for pydicom, the header value itself. ``warnings.catch_warnings()`` can't be used around
decoding: it swaps process-wide state and decoding runs in threads. Instead, :func:`capture`
routes the warnings of the *current thread* to a list, through one ``showwarning`` hook that
passes every other thread's warnings (and those outside :func:`capture`) on unchanged.

The recorded text is reduced to a fixed description (:func:`describe`): quoted parts, where
the libraries put the offending values, are dropped, so a header value never reaches a note.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

_local = threading.local()
_lock = threading.Lock()
_previous: Callable[..., Any] | None = None

_QUOTED = re.compile(r"""'[^']*'|"[^"]*"|'.*|".*""")
_VR = re.compile(r"Invalid value for VR (\w{2})")


def _hook(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    sink: list[str] | None = getattr(_local, "sink", None)
    if sink is not None:
        note = describe(category, str(message))
        if note:
            sink.append(note)
        return
    previous = _previous or warnings._showwarning_orig  # type: ignore[attr-defined]
    previous(message, category, filename, lineno, file, line)


def _install() -> None:
    global _previous
    if warnings.showwarning is _hook:
        return
    with _lock:
        if warnings.showwarning is not _hook:
            _previous = warnings.showwarning
            warnings.showwarning = _hook


def describe(category: type[Warning], message: str) -> str:
    """A warning as a note, without the values it quotes; "" for none.

    pydicom's "Invalid value for VR ..." gives no note: the DICOM reader checks the values it
    reports itself and notes each one it leaves empty (:mod:`cxr_batch.io.dicom`).
    """
    if _VR.search(message):
        return ""
    text = _QUOTED.sub("…", " ".join(message.split()))
    if len(text) > 200:
        text = text[:197] + "..."
    return f"decoder warning ({category.__name__}): {text}"


@contextmanager
def capture() -> Iterator[list[str]]:
    """Collect this thread's warnings (as :func:`describe` text, each once) instead of printing them."""
    _install()
    outer: list[str] | None = getattr(_local, "sink", None)
    sink: list[str] = []
    _local.sink = sink
    try:
        yield sink
    finally:
        _local.sink = outer
        seen: set[str] = set()
        sink[:] = [n for n in sink if not (n in seen or seen.add(n))]  # type: ignore[func-returns-value]
        if outer is not None:
            outer.extend(sink)
