"""Input discovery: turn the command line's files, folders and ``--files-from`` lists into files.

The walk is deterministic (entries sorted by name, depth first), skips hidden names, follows
symbolic links to folders but never enters the same real folder twice (so a link loop ends),
and picks up the image suffixes of :mod:`cxr_batch.io.preprocess` plus DICOM files recognised by
their ``DICM`` marker whatever their name (DICOM files are often named by UID: ``1.2.840.113.504``).

Each :class:`InputFile` carries the path the report shows: relative to the folder it was found
under (posix separators), the path as given for files named explicitly, or the absolute path
with ``absolute_paths``. Names are ``str`` decoded with the file system's encoding and
``surrogateescape``, so names that are not valid UTF-8 survive: ``os.fsencode(name)`` gives the
original bytes back.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, cast

from cxr_batch.errors import InputError
from cxr_batch.io.preprocess import DICOM_SUFFIXES, IMAGE_SUFFIXES
from cxr_batch.io.safe_open import open_regular

#: Suffixes the walk takes without looking inside the file.
ACCEPTED_SUFFIXES = IMAGE_SUFFIXES | DICOM_SUFFIXES


@dataclass(frozen=True, slots=True)
class InputFile:
    """One file to classify: where to read it and how the report names it."""

    path: str  #: the path to open (as found; symbolic links are not resolved)
    display: str  #: the report's ``path`` column
    #: Set when discovery or a source already knows the row is an error (a folder that can't be
    #: listed, a DICOMweb instance that could not be fetched).
    error: str | None = None


@dataclass(frozen=True)
class InputSpec:
    """What to look for; built from the ``classify`` options."""

    paths: tuple[str, ...] = ()
    recursive: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    absolute_paths: bool = False
    #: One path a line (already read from ``--files-from``): files, or folders with ``list_dirs``.
    listed: tuple[str, ...] = ()
    #: Walk a folder the list names (``--files-from-dirs``). Off by default: a list names files,
    #: and a list read wrongly (``/`` from a UTF-16 file taken byte by byte) must not walk the disk.
    list_dirs: bool = False
    #: What the run writes (the report, the heatmap folder): never taken as inputs, even when
    #: they lie inside an input folder (compared by device and inode, so any spelling or link).
    outputs: tuple[str, ...] = ()


@dataclass
class Discovery:
    """The files found, in order, and what could not be looked at (shown as warnings)."""

    files: list[InputFile]
    warnings: list[str] = field(default_factory=list)
    #: What the walk left out, by reason (:data:`SKIP_REASONS`): for "no input files found" and ``--dry-run``.
    skipped: Counter[str] = field(default_factory=Counter)


#: Why the walk left an entry out (the keys of :attr:`Discovery.skipped`), in the order messages list them.
SKIP_REASONS = (
    "files not matching --include",
    "files matching --exclude",
    "folders matching --exclude",
    "folders not walked (--no-recursive)",
    "files that are not images or DICOM",
    "hidden files and folders",
)


#: The longest path ``--files-from`` takes (Linux's PATH_MAX): a longer "line" is not a path list.
MAX_LISTED_PATH = 4096
_CHUNK = 1 << 16


def read_path_list(stream: BinaryIO, name: str = "--files-from") -> list[str]:
    """Paths from a list: one a line, or NUL-separated (``find -print0``, ``xargs -0`` style).

    Bytes, so any file name can be listed (NUL-separated: even one containing a newline). The
    list is NUL-separated when its first 64 KiB hold a NUL byte. One path a line: blank lines
    are skipped and a trailing carriage return is dropped. NUL-separated: nothing is stripped
    and an empty record (two NULs in a row, as ``/dev/zero`` gives) is an error. Memory stays
    bounded by the records themselves: a record longer than :data:`MAX_LISTED_PATH` bytes
    (a binary file, ``/dev/zero`` read as lines) is an error, not an ever-growing buffer.

    Raises:
        InputError: a record too long or empty (NUL mode), or a NUL byte inside a line.
    """
    head = stream.read(_CHUNK)
    encoding, bom = list_encoding(head)
    if encoding != "utf-8":
        stream = cast(BinaryIO, _Transcoded(stream, head[bom:], encoding, name))
        head = stream.read(_CHUNK)
    elif bom:
        head = head[bom:]
    if b"\0" in head:
        return _read_nul_separated(stream, head, name)
    out: list[str] = []
    number = 0

    def take(line: bytes) -> None:
        if len(line) > MAX_LISTED_PATH + 1:
            raise InputError(
                f"{name}: line {number} is longer than {MAX_LISTED_PATH} bytes, which no path is: "
                "is it a list of paths, one a line (or NUL-separated)?"
            )
        if b"\0" in line:
            raise InputError(
                f"{name}: line {number} holds a NUL byte, which no path can; for NUL-separated lists "
                "(find -print0) every path must end in NUL"
            )
        line = line.rstrip(b"\r")
        if line.strip():
            out.append(os.fsdecode(line))

    pending = head
    while True:
        lines = pending.split(b"\n")
        pending = lines.pop()  # after the last newline: the start of the next line (or b"")
        if lines and (max(map(len, lines)) > MAX_LISTED_PATH + 1 or any(b"\0" in line for line in lines)):
            for line in lines:  # slow path, to name the bad line
                number += 1
                take(line)
        else:
            number += len(lines)
            out.extend(os.fsdecode(line.rstrip(b"\r")) for line in lines if line.strip())
        if len(pending) > MAX_LISTED_PATH + 1:
            number += 1
            take(pending)  # raises: too long
        more = stream.read(_CHUNK)
        if not more:
            if pending:
                number += 1
                take(pending)
            return out
        pending += more


_BOMS = (
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xff\xfe\0\0", "utf-32-le"),  # before UTF-16 LE, whose mark it starts with
    (b"\0\0\xfe\xff", "utf-32-be"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
)


def list_encoding(head: bytes) -> tuple[str, int]:
    """The encoding of a path list from its first bytes, and the length of its byte-order mark.

    A byte-order mark decides (Windows PowerShell writes UTF-16 LE with one; Notepad may add
    one to UTF-8). Without one, UTF-16 and UTF-32 are told from a NUL-separated list by where
    the NUL bytes fall: text in UTF-16 LE has a NUL in (nearly) every second byte, in UTF-32 LE
    three in every four, and no 16- or 32-bit unit is all zero (no path holds a NUL character);
    a NUL-separated list has a NUL only at the end of each path. Anything else is UTF-8 (or the
    file system's bytes), as before.
    """
    for mark, encoding in _BOMS:
        if head.startswith(mark):
            return encoding, len(mark)
    sample = head[:4096]
    if len(sample) < 2 or b"\0" not in sample:
        return "utf-8", 0
    n4 = len(sample) // 4 * 4
    if n4 >= 4:
        units = [sample[i : i + 4] for i in range(0, n4, 4)]
        if all(u[2:] == b"\0\0" and u[:2] != b"\0\0" for u in units):
            return "utf-32-le", 0
        if all(u[:2] == b"\0\0" and u[2:] != b"\0\0" for u in units):
            return "utf-32-be", 0
    n2 = len(sample) // 2 * 2
    pairs = [sample[i : i + 2] for i in range(0, n2, 2)]
    if b"\0\0" not in pairs:
        if sum(p[1] == 0 for p in pairs) >= 0.9 * len(pairs):
            return "utf-16-le", 0
        if sum(p[0] == 0 for p in pairs) >= 0.9 * len(pairs):
            return "utf-16-be", 0
    return "utf-8", 0


class _Transcoded:
    """A UTF-16/32 list read as the UTF-8 bytes of the same text, chunk by chunk (bounded memory)."""

    def __init__(self, stream: BinaryIO, head: bytes, encoding: str, name: str) -> None:
        import codecs

        self._stream = stream
        self._pending = head
        self._decoder = codecs.getincrementaldecoder(encoding)("strict")
        self._encoding = encoding
        self._name = name
        self._done = False

    def read(self, size: int = -1) -> bytes:
        while not self._done:
            raw = self._pending or self._stream.read(_CHUNK)
            self._pending = b""
            try:
                text = self._decoder.decode(raw, final=not raw)
            except UnicodeDecodeError:
                raise InputError(
                    f"{self._name}: the list looks like {self._encoding.upper()} text but is not valid "
                    f"{self._encoding.upper()}; save it as UTF-8 (one path a line)"
                ) from None
            self._done = not raw
            if text:
                return os.fsencode(text)
        return b""


def _read_nul_separated(stream: BinaryIO, head: bytes, name: str) -> list[str]:
    out: list[str] = []
    pending = head
    while True:
        records = pending.split(b"\0")
        pending = records.pop()  # after the last NUL: the start of the next record (or b"")
        for record in records:
            if not record:
                raise InputError(
                    f"{name}: empty record after path {len(out)} (two NUL bytes in a row): "
                    "not a NUL-separated list of paths (find -print0)?"
                )
            if len(record) > MAX_LISTED_PATH:
                raise InputError(
                    f"{name}: path {len(out) + 1} is longer than {MAX_LISTED_PATH} bytes, which no path is"
                )
            out.append(os.fsdecode(record))
        if len(pending) > MAX_LISTED_PATH:
            raise InputError(f"{name}: path {len(out) + 1} is longer than {MAX_LISTED_PATH} bytes, which no path is")
        more = stream.read(_CHUNK)
        if not more:
            if pending:
                out.append(os.fsdecode(pending))  # the last path without its NUL
            return out
        pending += more


def _glob(name: str, glob: str) -> bool:
    """Globs ignore case, as the suffixes do: ``*.png`` takes ``A.PNG`` (cameras and PACS exports
    write upper case), on every platform."""
    return fnmatch.fnmatchcase(name.lower(), glob.lower())


def _matches(glob: str, rel: str) -> bool:
    """A glob with a ``/`` matches the relative path; one without matches any path component."""
    if "/" in glob:
        return _glob(rel, glob)
    return any(_glob(part, glob) for part in rel.split("/"))


def _include_name(rel: str, include: Sequence[str]) -> bool:
    if not include:
        return True
    name = rel.rsplit("/", 1)[-1]
    return any(_glob(name, g) or _glob(rel, g) for g in include)


def _sniff_dicom(path: str) -> bool:
    try:
        with open_regular(path) as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _wanted_suffix(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in ACCEPTED_SUFFIXES


class _Walker:
    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        self.warnings: list[str] = []
        self.skipped: Counter[str] = Counter()
        self._visited_dirs: set[tuple[int, int]] = set()
        self.output_dirs: set[tuple[int, int]] = set()
        self.output_files: set[tuple[int, int]] = set()
        for out in spec.outputs:
            try:
                st = os.stat(out)
            except OSError:
                continue  # not there yet: created after discovery, so it can't be found by it
            (self.output_dirs if stat.S_ISDIR(st.st_mode) else self.output_files).add((st.st_dev, st.st_ino))
        self._output_inodes = {ino for _, ino in self.output_files}

    def is_output(self, path: str) -> bool:
        """Whether ``path`` is (or links to) one of the run's outputs."""
        if not self.output_files and not self.output_dirs:
            return False
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) in self.output_files | self.output_dirs

    def display(self, path: str, rel: str) -> str:
        return os.path.abspath(path) if self.spec.absolute_paths else rel

    def walk(self, root: str) -> Iterator[InputFile]:
        """Depth-first, sorted by name; each file's display path is relative to ``root``."""
        try:
            st = os.stat(root)
        except OSError as exc:
            self.warnings.append(f"cannot read folder {root}: {exc.strerror or exc}")
            return
        if (st.st_dev, st.st_ino) in self.output_dirs:
            self.warnings.append(f"skipped folder {root}: it is where this run writes its output")
            return
        self._visited_dirs.add((st.st_dev, st.st_ino))
        # A stack of (folder path, its relative path, sorted entries, next index): no recursion limit.
        stack: list[tuple[str, str, list[os.DirEntry[str]], int]] = []
        entries, error = self._list(root)
        if entries is None:
            yield InputFile(root, os.path.abspath(root) if self.spec.absolute_paths else root, error=error)
            return
        stack.append((root, "", entries, 0))
        while stack:
            folder, rel_folder, entries, i = stack.pop()
            if i >= len(entries):
                continue
            stack.append((folder, rel_folder, entries, i + 1))
            entry = entries[i]
            name = entry.name
            if name.startswith("."):
                self.skipped["hidden files and folders"] += 1
                continue
            rel = f"{rel_folder}{name}"
            if self._is_dir(entry):
                if not self.spec.recursive:
                    self.skipped["folders not walked (--no-recursive)"] += 1
                    continue
                if self._excluded(rel):
                    self.skipped["folders matching --exclude"] += 1
                    continue
                key = self._dir_key(entry.path)
                if key is None or key in self._visited_dirs or key in self.output_dirs:
                    continue  # a loop, a second way in, or the run's own output folder
                self._visited_dirs.add(key)
                sub, error = self._list(entry.path)
                if sub is not None:
                    stack.append((entry.path, rel + "/", sub, 0))
                else:  # a row naming the folder: its files are missing from the report (exit 3)
                    yield InputFile(entry.path, self.display(entry.path, rel + "/"), error=error)
                continue
            if self._excluded(rel):
                self.skipped["files matching --exclude"] += 1
                continue
            if not _include_name(rel, self.spec.include):
                self.skipped["files not matching --include"] += 1
                continue
            if not self._is_candidate(entry):
                self.skipped["files that are not images or DICOM"] += 1
            elif not self._is_output_entry(entry):
                yield InputFile(entry.path, self.display(entry.path, rel))

    def _is_output_entry(self, entry: os.DirEntry[str]) -> bool:
        if not self.output_files:
            return False
        try:
            if not entry.is_symlink() and entry.inode() not in self._output_inodes:
                return False  # the common case, without a system call
        except OSError:
            return False
        return self.is_output(entry.path)

    def _list(self, folder: str) -> tuple[list[os.DirEntry[str]] | None, str]:
        """The sorted entries, or None and why the folder (or part of it) can't be listed."""
        try:
            with os.scandir(folder) as it:
                return sorted(it, key=lambda e: e.name), ""
        except OSError as exc:
            return None, f"cannot list folder: {exc.strerror or exc}; its files were not classified"

    @staticmethod
    def _is_dir(entry: os.DirEntry[str]) -> bool:
        try:
            return entry.is_dir()  # follows symbolic links; False for broken links and loops
        except OSError:
            return False

    @staticmethod
    def _dir_key(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _excluded(self, rel: str) -> bool:
        return any(_matches(g, rel) for g in self.spec.exclude)

    @staticmethod
    def _is_candidate(entry: os.DirEntry[str]) -> bool:
        try:
            is_file = entry.is_file()  # follows links; from the directory entry's type for others
        except OSError:
            is_file = False
        if not is_file:
            try:
                st = entry.stat()
            except OSError:
                # A broken link named like an image is still an input the user expects a row for.
                return entry.is_symlink() and _wanted_suffix(entry.name)
            # A FIFO, socket or device (or a link to one): an error row ("not a regular file"),
            # never skipped without a word and never opened.
            return not stat.S_ISDIR(st.st_mode)
        if _wanted_suffix(entry.name):
            return True
        return _sniff_dicom(entry.path)


def iter_inputs(
    spec: InputSpec, warnings: list[str] | None = None, skipped: Counter[str] | None = None
) -> Iterator[InputFile]:
    """Yield the files ``spec`` names, in order, each once.

    A file named on the command line or in the list is always taken, whatever its suffix (it
    becomes an error row if it can't be decoded). A folder is walked. A path that does not
    exist is an :class:`InputError` when given on the command line; listed paths that do not
    exist still get a row (an error row), so a long pipeline list never dies on one stale line.

    Raises:
        InputError: a command-line path does not exist, or two different files would be
            reported under the same path.
    """
    walker = _Walker(spec)
    seen: set[str] = set()
    shown: dict[str, str] = {}
    # One folder (or one file): the walk itself never yields a file twice (each real folder is
    # entered once) nor two files under one name, so nothing is kept per file and memory stays
    # flat for any number of files (issue 24). Several inputs may overlap: each file's path and
    # name are kept to skip a file reached twice and to refuse two files under one name.
    single = len(spec.paths) + len(spec.listed) <= 1

    def emit(files: Iterable[InputFile]) -> Iterator[InputFile]:
        if single:
            yield from files
            return
        for f in files:
            key = os.path.abspath(f.path)
            if key in seen:
                continue  # the same file reached twice (a folder and a file in it, a link to a folder)
            seen.add(key)
            other = shown.setdefault(f.display, f.path)
            if other != f.path:
                raise InputError(
                    f"two different files would both be reported as {f.display!r}: {other!r} and {f.path!r}; "
                    "use --absolute-paths, or classify their common parent folder"
                )
            yield f

    for arg in spec.paths:
        if not os.path.lexists(arg):
            raise InputError(f"input path does not exist: {arg}")
    for arg, from_list in [(a, False) for a in spec.paths] + [(a, True) for a in spec.listed]:
        if from_list and not spec.list_dirs and _is_dir_path(arg):
            yield from emit([_listed_folder(arg, spec)])
        elif _is_dir_path(arg):
            yield from emit(walker.walk(arg))
        elif walker.is_output(arg):
            walker.warnings.append(f"skipped {arg}: it is this run's own output")
        elif from_list or os.path.lexists(arg):
            shown_as = os.path.abspath(arg) if spec.absolute_paths else arg
            yield from emit([InputFile(arg, shown_as)])
        if warnings is not None and walker.warnings:
            warnings.extend(walker.warnings)
            walker.warnings.clear()
        if skipped is not None:
            skipped.update(walker.skipped)
            walker.skipped.clear()


def _listed_folder(path: str, spec: InputSpec) -> InputFile:
    """The error row of a folder named in ``--files-from`` without ``--files-from-dirs``: never walked."""
    return InputFile(
        path,
        os.path.abspath(path) if spec.absolute_paths else path,
        error="a folder, named in --files-from: not walked (a list names files; "
        "pass --files-from-dirs to classify the folders it names)",
    )


def _is_dir_path(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def discover(spec: InputSpec) -> Discovery:
    """All the files :func:`iter_inputs` yields, as a list.

    Memory grows by one small record per file (two short strings); ``classify`` walks with
    :func:`iter_inputs` instead (twice: once to count and hash, once to classify), which keeps none.

    Raises:
        InputError: see :func:`iter_inputs`.
    """
    warnings: list[str] = []
    skipped: Counter[str] = Counter()
    files = list(iter_inputs(spec, warnings, skipped))
    return Discovery(files=files, warnings=warnings, skipped=skipped)


def describe_skipped(skipped: Counter[str], spec: InputSpec) -> str:
    """``12 files not matching --include '*.PNG', 3 hidden files and folders``: what the walk left out."""
    parts = []
    for reason in SKIP_REASONS:
        n = skipped.get(reason, 0)
        if not n:
            continue
        globs = spec.include if "--include" in reason else spec.exclude if "--exclude" in reason else ()
        shown = " ".join(repr(g) for g in globs)
        parts.append(f"{n} {reason}{' ' + shown if shown else ''}")
    return ", ".join(parts)


def no_input_files(spec: InputSpec, skipped: Counter[str]) -> str:
    """The message when discovery found nothing: where it looked, for what, and what it left out."""
    where = ", ".join([*spec.paths, *(["--files-from"] if spec.listed else [])]) or "(none)"
    left_out = describe_skipped(skipped, spec)
    return (
        f"no input files found in {where}: looked for {', '.join(sorted(ACCEPTED_SUFFIXES))} and DICOM files "
        "(suffixes and globs ignore case); " + (f"left out: {left_out}" if left_out else "the folders hold no files")
    )
