"""Open input files without ever blocking on, or reading from, something that is not a file.

``open()`` on a FIFO waits for a writer forever; a name that links to ``/dev/zero`` or
``/dev/urandom`` reads without end; opening some devices has side effects. So every input is
``stat``-ed first (following links) and only a regular file is opened, with ``O_NONBLOCK`` as a
second defence (a FIFO swapped in between the two calls then opens at once instead of
blocking) and ``fstat`` on the descriptor to check that what was opened is still a regular file.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from typing import Any, BinaryIO

from cxr_batch.errors import CxrBatchError

_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


class NotRegularFileError(OSError):
    """The path (after following links) is not a regular file; ``kind`` says what it is."""

    def __init__(self, path: str | os.PathLike[str], kind: str) -> None:
        super().__init__(f"not a regular file: {kind}")
        self.path = os.fspath(path)
        self.kind = kind


def file_kind(mode: int) -> str:
    """``"regular file"``, ``"directory"``, ``"fifo"``, ``"socket"``, ``"character device"``, ..."""
    if stat.S_ISREG(mode):
        return "regular file"
    for test, name in _KINDS:
        if test(mode):
            return name
    return "special file"


def check_regular(path: str | os.PathLike[str]) -> os.stat_result:
    """``os.stat(path)`` when it is a regular file.

    Raises:
        NotRegularFileError: it exists but is something else (fifo, device, socket, directory).
        OSError: it can't be looked at (missing, broken link, permission denied).
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(path, file_kind(st.st_mode))
    return st


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for binary reading; never blocks and never opens anything else.

    Raises:
        NotRegularFileError: the path is not a regular file (checked before and after opening).
        OSError: the file can't be opened.
    """
    check_regular(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(path, file_kind(st.st_mode))
        os.set_blocking(fd, True)  # no effect on regular files; leaves a normal descriptor
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# --------------------------------------------------------------------------- bounded reads
#
# Every file cxr-batch reads goes through :func:`open_regular` and one of the bounded readers
# below: a provenance record, a report read back (``--resume``, ``merge``, ``report``), a labels
# file, a model contract, a path list. A file over its cap is refused before it is read (its
# size from ``fstat``) and while it is read (a file that grows is cut at the cap + 1 byte), so a
# sparse 4 GB file, a link to ``/dev/zero`` or a FIFO never costs more than the cap.

#: The default cap on a JSON document read whole (a provenance record, a metrics file, a config).
MAX_JSON_BYTES = 64 << 20
#: The longest line a JSONL or CSV report may hold (a row is a few hundred bytes).
MAX_LINE_BYTES = 1 << 20
#: The largest list read whole: a labels file, a split file (a row is ~100 bytes: 2 million rows).
MAX_LIST_BYTES = 256 << 20
#: The largest image file cxr-batch hashes or reads (a chest radiograph is at most a few hundred
#: MB even as an uncompressed 16-bit DICOM at the pixel limit); ``train`` refuses larger ones.
MAX_IMAGE_FILE_BYTES = 1 << 30
#: The largest model file read into memory (protobuf's own limit for an ONNX file is 2 GiB).
MAX_MODEL_BYTES = 2 << 30
#: The deepest nesting a JSON document may have: cxr-batch's own documents stay under 10.
MAX_JSON_DEPTH = 64


class FileTooLargeError(CxrBatchError, OSError):
    """A file (or one line of it) is larger than what cxr-batch reads for that kind of file.

    An :class:`OSError` too, so callers that turn "can't read" into a message or an error row
    handle it without a special case; ``str()`` is the whole message.
    """

    def __init__(self, path: str | os.PathLike[str], what: str, limit: int, size: int | None = None) -> None:
        got = f"{size:,} bytes" if size is not None else "more"
        super().__init__(f"{what} is too large ({got}; at most {limit:,} bytes are read): is it the right file?")
        self.path = os.fspath(path)
        self.limit = limit
        self.size = size


class DamagedFileError(CxrBatchError, ValueError):
    """A file's content can't be parsed (not UTF-8, not JSON, nested too deep, NaN in JSON, ...).

    A :class:`ValueError` too, so callers that catch a parser's ``ValueError`` handle it.
    ``reason`` is the message without the name of what was read (for callers that name it).
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason is not None else message


def _size_cap(fh: BinaryIO, path: str | os.PathLike[str], max_bytes: int, what: str) -> None:
    size = os.fstat(fh.fileno()).st_size
    if size > max_bytes:
        raise FileTooLargeError(path, what, max_bytes, size)


def open_bounded(path: str | os.PathLike[str], max_bytes: int, what: str = "the file") -> BinaryIO:
    """:func:`open_regular`, refusing a file whose size is over ``max_bytes`` before any read.

    For files read as a stream (a report read back line by line): the caller still bounds each
    line (:func:`read_line`), as the file may grow while it is read.

    Raises:
        NotRegularFileError, FileTooLargeError, OSError.
    """
    fh = open_regular(path)
    try:
        _size_cap(fh, path, max_bytes, what)
    except BaseException:
        fh.close()
        raise
    return fh


def read_bounded(path: str | os.PathLike[str], max_bytes: int, what: str = "the file") -> bytes:
    """The whole content of a regular file of at most ``max_bytes`` bytes.

    Raises:
        NotRegularFileError: not a regular file (a FIFO, a device, a directory).
        FileTooLargeError: larger than ``max_bytes`` (checked before reading, and while reading).
        OSError: it can't be read.
    """
    with open_regular(path) as fh:
        _size_cap(fh, path, max_bytes, what)
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLargeError(path, what, max_bytes)
    return data


def read_line(
    fh: BinaryIO, path: str | os.PathLike[str], max_bytes: int = MAX_LINE_BYTES, what: str = "a line"
) -> bytes:
    """The next line of ``fh`` (with its newline; ``b""`` at the end), at most ``max_bytes`` long.

    Raises:
        FileTooLargeError: the line is longer (a damaged or foreign file, ``/dev/zero`` copied in).
    """
    line = fh.readline(max_bytes + 1)
    if len(line) > max_bytes:
        raise FileTooLargeError(path, what, max_bytes)
    return line


def iter_lines(
    fh: BinaryIO, path: str | os.PathLike[str], max_bytes: int = MAX_LINE_BYTES, what: str = "a line"
) -> Iterator[bytes]:
    """The lines of ``fh`` as :func:`read_line` reads them, up to the end of the file."""
    while line := read_line(fh, path, max_bytes, what):
        yield line


def check_depth(text: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than ``max_depth`` (before parsing it, which would recurse).

    Fast path: fewer brackets in all than ``max_depth`` can't nest deeper. Otherwise the text is
    scanned once, skipping strings.

    Raises:
        DamagedFileError: nested too deep.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return
    depth = 0
    in_string = False
    escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                raise DamagedFileError(f"nested more than {max_depth} levels deep")
        elif ch in "]}":
            depth -= 1


def _no_constant(name: str) -> Any:
    raise DamagedFileError(f"{name} is not a JSON number")


def parse_json(
    text: str | bytes, *, max_depth: int = MAX_JSON_DEPTH, allow_nan: bool = False, what: str = "the file"
) -> Any:
    """``json.loads`` that can't recurse without bound and, unless ``allow_nan``, refuses
    ``NaN``/``Infinity`` (which strict JSON does not have and no cxr-batch writer writes).

    Raises:
        DamagedFileError: not UTF-8, not JSON, nested too deep, or NaN/Infinity; the message
            starts with ``what``.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        check_depth(text, max_depth)
        if allow_nan:
            return json.loads(text)
        return json.loads(text, parse_constant=_no_constant)
    except DamagedFileError as exc:
        reason = exc.reason
    except RecursionError:
        reason = "nested too deep"
    except UnicodeDecodeError:
        reason = "not UTF-8 text"
    except ValueError as exc:
        reason = f"not valid JSON ({exc})"
    raise DamagedFileError(f"{what} is damaged: {reason}", reason)


def read_json(
    path: str | os.PathLike[str],
    max_bytes: int = MAX_JSON_BYTES,
    *,
    what: str = "the file",
    max_depth: int = MAX_JSON_DEPTH,
    allow_nan: bool = False,
) -> Any:
    """A JSON document from a regular file of at most ``max_bytes`` bytes, parsed with :func:`parse_json`.

    Raises:
        NotRegularFileError, FileTooLargeError, OSError: see :func:`read_bounded`.
        DamagedFileError: see :func:`parse_json`.
    """
    return parse_json(read_bounded(path, max_bytes, what), max_depth=max_depth, allow_nan=allow_nan, what=what)


def read_text(
    path: str | os.PathLike[str],
    max_bytes: int,
    *,
    what: str = "the file",
    encoding: str = "utf-8",
    errors: str = "strict",
) -> str:
    """A regular file of at most ``max_bytes`` bytes as text.

    Raises:
        NotRegularFileError, FileTooLargeError, OSError: see :func:`read_bounded`.
        DamagedFileError: it does not decode (with ``errors="strict"``).
    """
    data = read_bounded(path, max_bytes, what)
    try:
        return data.decode(encoding, errors)
    except UnicodeDecodeError:
        raise DamagedFileError(f"{what} is damaged: not {encoding} text", f"not {encoding} text") from None
