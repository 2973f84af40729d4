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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from cxr_batch.errors import InputError
from cxr_batch.io.preprocess import DICOM_SUFFIXES, IMAGE_SUFFIXES

#: Suffixes the walk takes without looking inside the file.
ACCEPTED_SUFFIXES = IMAGE_SUFFIXES | DICOM_SUFFIXES


@dataclass(frozen=True, slots=True)
class InputFile:
    """One file to classify: where to read it and how the report names it."""

    path: str  #: the path to open (as found; symbolic links are not resolved)
    display: str  #: the report's ``path`` column
    #: set by a source that could not fetch the file (e.g. DICOMweb): the row is this error
    error: str | None = None


@dataclass(frozen=True)
class InputSpec:
    """What to look for; built from the ``classify`` options."""

    paths: tuple[str, ...] = ()
    recursive: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    absolute_paths: bool = False
    #: One path a line (already read from ``--files-from``); files or folders.
    listed: tuple[str, ...] = ()


@dataclass
class Discovery:
    """The files found, in order, and what could not be looked at (shown as warnings)."""

    files: list[InputFile]
    warnings: list[str] = field(default_factory=list)


def read_path_list(stream: BinaryIO) -> list[str]:
    """One path a line (bytes, so any file name but one containing a newline can be listed).

    Blank lines are skipped; a trailing carriage return is dropped.
    """
    out: list[str] = []
    for raw in stream:
        line = raw.rstrip(b"\n").rstrip(b"\r")
        if line.strip():
            out.append(os.fsdecode(line))
    return out


def _matches(glob: str, rel: str) -> bool:
    """A glob with a ``/`` matches the relative path; one without matches any path component."""
    if "/" in glob:
        return fnmatch.fnmatchcase(rel, glob)
    return any(fnmatch.fnmatchcase(part, glob) for part in rel.split("/"))


def _include_name(rel: str, include: Sequence[str]) -> bool:
    if not include:
        return True
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(rel, g) for g in include)


def _sniff_dicom(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
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
        self._visited_dirs: set[tuple[int, int]] = set()

    def display(self, path: str, rel: str) -> str:
        return os.path.abspath(path) if self.spec.absolute_paths else rel

    def walk(self, root: str) -> Iterator[InputFile]:
        """Depth-first, sorted by name; each file's display path is relative to ``root``."""
        try:
            st = os.stat(root)
        except OSError as exc:
            self.warnings.append(f"cannot read folder {root}: {exc.strerror or exc}")
            return
        self._visited_dirs.add((st.st_dev, st.st_ino))
        # A stack of (folder path, its relative path, sorted entries, next index): no recursion limit.
        stack: list[tuple[str, str, list[os.DirEntry[str]], int]] = []
        entries = self._list(root)
        if entries is None:
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
                continue
            rel = f"{rel_folder}{name}"
            if self._is_dir(entry):
                if not self.spec.recursive or self._excluded(rel):
                    continue
                key = self._dir_key(entry.path)
                if key is None or key in self._visited_dirs:
                    continue  # a link back to a folder already walked: a loop, or a second way in
                self._visited_dirs.add(key)
                sub = self._list(entry.path)
                if sub is not None:
                    stack.append((entry.path, rel + "/", sub, 0))
                continue
            if self._excluded(rel) or not _include_name(rel, self.spec.include):
                continue
            if self._is_candidate(entry):
                yield InputFile(entry.path, self.display(entry.path, rel))

    def _list(self, folder: str) -> list[os.DirEntry[str]] | None:
        try:
            with os.scandir(folder) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.warnings.append(f"cannot list folder {folder}: {exc.strerror or exc}")
            return None

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
            is_file = entry.is_file()
        except OSError:
            is_file = False
        if not is_file:
            # A broken link named like an image is still an input the user expects a row for.
            return entry.is_symlink() and _wanted_suffix(entry.name)
        if _wanted_suffix(entry.name):
            return True
        return _sniff_dicom(entry.path)


def iter_inputs(spec: InputSpec, warnings: list[str] | None = None) -> Iterator[InputFile]:
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

    def emit(files: Iterable[InputFile]) -> Iterator[InputFile]:
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
        if _is_dir_path(arg):
            yield from emit(walker.walk(arg))
        elif from_list or os.path.lexists(arg):
            shown_as = os.path.abspath(arg) if spec.absolute_paths else arg
            yield from emit([InputFile(arg, shown_as)])
        if warnings is not None and walker.warnings:
            warnings.extend(walker.warnings)
            walker.warnings.clear()


def _is_dir_path(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def discover(spec: InputSpec) -> Discovery:
    """All the files :func:`iter_inputs` yields, as a list (the progress bar needs the total).

    Memory grows by one small record per file (two short strings); image data never
    accumulates (see :class:`cxr_batch.engine.classifier.Classifier`).

    Raises:
        InputError: see :func:`iter_inputs`.
    """
    warnings: list[str] = []
    files = list(iter_inputs(spec, warnings))
    return Discovery(files=files, warnings=warnings)
