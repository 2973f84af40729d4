"""Open input files without ever blocking on, or reading from, something that is not a file.

``open()`` on a FIFO waits for a writer forever; a name that links to ``/dev/zero`` or
``/dev/urandom`` reads without end; opening some devices has side effects. So every input is
``stat``-ed first (following links) and only a regular file is opened, with ``O_NONBLOCK`` as a
second defence (a FIFO swapped in between the two calls then opens at once instead of
blocking) and ``fstat`` on the descriptor to check that what was opened is still a regular file.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

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
