"""One writer at a time: an exclusive, non-blocking ``flock`` on an output (the report file, the
heatmap folder) for the whole run. A second run that wants the same output is refused at once
with :class:`~cxr_batch.errors.OutputError`; the lock goes with the file descriptor, so it is
released when the run ends, however it ends (even ``kill -9``).

Where locks can't be taken (no ``fcntl``: Windows; a file system without ``flock`` support,
``ENOLCK``/``EOPNOTSUPP``), the run goes on unlocked: locking protects against a mistake, it
must not stop a run that would otherwise work.
"""

from __future__ import annotations

import errno

from cxr_batch.errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def lock_or_refuse(fd: int, what: str) -> None:
    """Take an exclusive lock on ``fd`` or raise :class:`OutputError` naming ``what``.

    Raises:
        OutputError: another process holds the lock (another cxr-batch run writes ``what``).
    """
    if fcntl is None:  # pragma: no cover
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputError(
            f"{what} is being written by another cxr-batch run (it holds the lock): two runs writing one "
            "output would mix their rows; wait for that run to end (then --resume), or write elsewhere"
        ) from None
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return
        raise OutputError(f"cannot lock {what}: {exc.strerror or exc}") from None
