"""The one way cxr-batch writes an output file: atomically, and never through a symbolic link.

Every output (the report, heatmaps, SRs, HTML pages and thumbnails, plots, provenance records,
markers, checkpoints' side files) goes through :class:`OutputDir` or :func:`write_file_atomic`:

- the data goes to a hidden temporary file (``.NAME.<random>.tmp``, created with ``O_EXCL`` and
  ``O_NOFOLLOW``) in the final file's own folder, is flushed and ``fsync``-ed, then renamed over
  the final name: a full disk, an error or a kill leaves the earlier file (or none), never a
  truncated file under the final name; the temporary file is removed on any error;
- the rename replaces a link named like the output instead of writing into the link's target;
- with :class:`OutputDir`, the sub-folders below the output folder are opened one component at
  a time with ``O_NOFOLLOW`` relative to the folder's descriptor, so a planted link to a folder
  elsewhere is refused (:class:`LinkRefused`) and nothing is written outside the folder; ``..``,
  absolute and empty paths are refused the same way;
- files get mode ``0o666`` less the umask (like any file the user makes) unless asked otherwise.

The output folder itself may be a link: the user named it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import BinaryIO

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)

#: Default permission bits of a new output file, before the umask.
DEFAULT_MODE = 0o666


class LinkRefused(OSError):
    """A path below an output folder is a link, ``..``, absolute, or not a folder: nothing is written."""


def _parts(rel: str | os.PathLike[str]) -> tuple[str, ...]:
    pure = PurePath(rel)
    if pure.anchor or not pure.parts:
        raise LinkRefused(f"not a relative path inside the output folder: {os.fspath(rel)!r}")
    for part in pure.parts:
        if part in ("..", ".", ""):
            raise LinkRefused(f"not a plain path inside the output folder: {os.fspath(rel)!r}")
    return pure.parts


class _Probe(Exception):
    """Raised inside :meth:`OutputDir.check_writable` to drop the probe file once written."""


#: The names of temporary files: :func:`tmp_name`'s, and the heatmap writer's before it used this module.
_TMP_NAME = re.compile(r"\..+\.[0-9a-f]{12}\.tmp|\.cxr-heatmap-[0-9a-f]{12}\.tmp")


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is one of this module's temporary names (what a killed writer leaves)."""
    return bool(_TMP_NAME.fullmatch(name))


def tmp_name(name: str) -> str:
    """The hidden temporary name used while ``name`` is written (``.NAME.<hex>.tmp``)."""
    return f".{name[:180]}.{secrets.token_hex(6)}.tmp"


@contextlib.contextmanager
def _atomic_in(dir_fd: int, name: str, mode: int) -> Iterator[BinaryIO]:
    tmp = tmp_name(name)
    fd = os.open(tmp, _TMP_FLAGS, mode, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


class OutputDir:
    """An output folder, opened once; files below it are written atomically and never through links.

    Args:
        folder: the folder (created with its parents when ``create``).
        create: make the folder when it is missing.

    Raises:
        OSError: the folder can't be created or opened (``NotADirectoryError`` when it is a file).
    """

    def __init__(self, folder: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(folder)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, _DIR_FLAGS)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _open_dir(self, parts: tuple[str, ...], create: bool) -> int:
        """A descriptor of the folder ``parts`` below this one (caller closes it), link-free."""
        fd = os.dup(self.fd)
        try:
            for i, part in enumerate(parts):
                try:
                    nxt = os.open(part, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                    nxt = os.open(part, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd)
                except OSError as exc:  # ELOOP (a link) or ENOTDIR (a file)
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                        raise
                    where = self.path.joinpath(*parts[: i + 1])
                    try:
                        is_link = stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode)
                    except OSError:
                        is_link = False
                    raise LinkRefused(
                        f"{where} is a symbolic link; nothing is written through links"
                        if is_link
                        else f"{where} is not a folder; nothing is written there"
                    ) from exc
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    def check_writable(self) -> None:
        """Write and remove a small probe file: raises OSError when the folder can't be written."""
        try:
            with self.atomic(".cxr-batch-probe") as fh:
                fh.write(b"cxr-batch")
                fh.flush()
                os.fsync(fh.fileno())
                raise _Probe  # the temporary file is removed, nothing is renamed
        except _Probe:
            pass

    def read_existing(self, rel: str | os.PathLike[str], limit: int) -> bytes | None:
        """The bytes of the regular file ``rel`` below the folder (at most ``limit``), reached
        without following any link; None when it is missing, a link, not a regular file, larger
        than ``limit`` or can't be read (an earlier output reused as a cache, never trusted)."""
        parts = _parts(rel)
        try:
            dir_fd = self._open_dir(parts[:-1], create=False)
        except OSError:
            return None
        try:
            fd = os.open(
                parts[-1], os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), dir_fd=dir_fd
            )
        except OSError:
            return None
        finally:
            os.close(dir_fd)
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
                return None
            data = fh.read(limit + 1)
        return data if len(data) <= limit else None

    def unlink(self, rel: str | os.PathLike[str]) -> None:
        """Remove the entry ``rel`` (a file or a link, never what a link points to) if it is there."""
        parts = _parts(rel)
        try:
            dir_fd = self._open_dir(parts[:-1], create=False)
        except FileNotFoundError:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(parts[-1], dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def remove_stale_temporaries(self) -> int:
        """Remove the temporary files a killed writer left (``.NAME.<hex>.tmp`` and the heatmap
        writer's older ``.cxr-heatmap-<hex>.tmp``) in this folder and below it, never following
        links. Call it only on a folder this run holds the lock of. Returns how many were removed."""
        removed = 0
        for _root, _dirs, files, root_fd in os.fwalk(".", dir_fd=self.fd, follow_symlinks=False):
            for name in files:
                if not is_temporary_name(name):
                    continue
                with contextlib.suppress(OSError):
                    if stat.S_ISREG(os.lstat(name, dir_fd=root_fd).st_mode):
                        os.unlink(name, dir_fd=root_fd)
                        removed += 1
        return removed

    def makedirs(self, rel: str | os.PathLike[str]) -> None:
        """Create the sub-folder ``rel`` (and its parents) without following links."""
        os.close(self._open_dir(_parts(rel), create=True))

    @contextlib.contextmanager
    def atomic(self, rel: str | os.PathLike[str], mode: int = DEFAULT_MODE) -> Iterator[BinaryIO]:
        """A binary file object whose content replaces ``rel`` when the block ends without error."""
        parts = _parts(rel)
        dir_fd = self._open_dir(parts[:-1], create=True)
        try:
            with _atomic_in(dir_fd, parts[-1], mode) as fh:
                yield fh
        finally:
            os.close(dir_fd)

    def write_bytes(self, rel: str | os.PathLike[str], data: bytes, mode: int = DEFAULT_MODE) -> None:
        """Write ``data`` to ``rel`` atomically."""
        with self.atomic(rel, mode) as fh:
            fh.write(data)

    def write_text(
        self, rel: str | os.PathLike[str], text: str, encoding: str = "utf-8", mode: int = DEFAULT_MODE
    ) -> None:
        """Write ``text`` to ``rel`` atomically."""
        self.write_bytes(rel, text.encode(encoding), mode)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: int = DEFAULT_MODE) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces ``path`` when the block ends without error.

    The folder of ``path`` is the user's choice (it may be a link); the file itself is never
    written through a link: a link named ``path`` is replaced.
    """
    p = Path(path)
    with OutputDir(p.parent if str(p.parent) else ".", create=False) as d, d.atomic(p.name, mode) as fh:
        yield fh


def write_file_atomic(path: str | os.PathLike[str], data: bytes | str, mode: int = DEFAULT_MODE) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically, never through a link."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_file(path, mode) as fh:
        fh.write(raw)
