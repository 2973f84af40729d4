"""Labelled data folders: layout detection (shared by train and evaluate) and the split."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cxr_batch.errors import DataError
from cxr_batch.io.preprocess import DICOM_SUFFIXES, IMAGE_SUFFIXES
from cxr_batch.io.safe_open import (
    MAX_IMAGE_FILE_BYTES,
    MAX_LIST_BYTES,
    DamagedFileError,
    FileTooLargeError,
    open_bounded,
    read_text,
)
from cxr_batch.io.safe_write import write_file_atomic

#: The three classes of the COVID-19 Radiography Database, in model order.
DATABASE_LABELS = ("normal", "viral", "covid")

#: Folder names (lower case, '_' and '-' read as spaces) → canonical label.
_ALIASES = {
    "normal": "normal",
    "viral pneumonia": "viral",
    "viral": "viral",
    "covid": "covid",
    "covid 19": "covid",
    "covid19": "covid",
    "lung opacity": "lung_opacity",
}

#: Labels the database has but that are left out unless --classes asks for them.
_OPTIONAL_DATABASE_LABELS = ("lung_opacity",)
_SKIP_DIRS = {"masks"}


@dataclass
class LabelledSet:
    """Files with labels, found under one root."""

    root: Path
    labels: list[str]
    items: list[tuple[Path, str]]
    layout: str
    ignored: list[str] = field(default_factory=list)
    #: entries named like images that are not regular files (FIFOs, devices, broken links), never opened
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    #: the name this root goes by in a split and in per-source metrics (its folder name by default)
    source: str = ""
    #: rows of a labels file left out because their label is not a class: {label value: count}
    excluded: dict[str, int] = field(default_factory=dict)
    #: those rows' files, with their label value (``train --not-normal`` trains on some of them)
    left_out: list[tuple[Path, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.source:
            self.source = Path(self.root).resolve().name or "data"

    def counts(self) -> dict[str, int]:
        c = dict.fromkeys(self.labels, 0)
        for _, label in self.items:
            c[label] += 1
        return c


def canonical_label(name: str) -> str:
    key = " ".join(name.lower().replace("_", " ").replace("-", " ").split())
    return _ALIASES.get(key, name)


def _images_under(folder: Path, unreadable: list[Path] | None = None) -> list[Path]:
    """Image and DICOM files under ``folder``, sorted, skipping hidden names and mask folders.

    Entries named like images that are not regular files (a FIFO, a device, a broken link) are
    never opened here; they go to ``unreadable`` (evaluate gives each an error row)."""
    images = folder / "images"
    if images.is_dir():  # release 4 and later: CLASS/images/*.png next to CLASS/masks/
        folder = images
    out: list[Path] = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).parts
        if any(part.startswith(".") or part.lower() in _SKIP_DIRS for part in rel):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES | DICOM_SUFFIXES:
            continue
        if path.is_file():
            out.append(path)
        elif unreadable is not None and not path.is_dir():
            unreadable.append(path)
    return out


def find_labelled(root: str | Path, classes: Sequence[str] | None = None) -> LabelledSet:
    """Find class folders under ``root``.

    COVID-19 Radiography Database layouts (release 2: ``COVID/``, ``NORMAL/``,
    ``Viral Pneumonia/``; release 4+: ``<class>/images/`` beside ``masks/``; the plain
    ``normal/ viral/ covid/``) map to ``normal``, ``viral``, ``covid`` in that order.
    Any other set of folders gives one label per folder, sorted by name.
    ``classes`` picks and orders the labels (canonical names or folder names).

    Raises:
        DataError: no class folders, an unknown class asked for, or an empty class.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    by_label: dict[str, Path] = {}
    for d in dirs:
        label = canonical_label(d.name)
        if label in by_label:
            raise DataError(f"{root}: folders '{by_label[label].name}' and '{d.name}' both mean class '{label}'")
        by_label[label] = d
    if not by_label:
        raise DataError(f"{root}: no class folders found (expected e.g. normal/ viral/ covid/)")

    ignored: list[str] = []
    if set(DATABASE_LABELS) <= set(by_label):
        layout = "covid19-radiography"
        if any((by_label[x] / "images").is_dir() for x in DATABASE_LABELS):
            layout += " (release 4+)"
        elif any(by_label[x].name != x for x in DATABASE_LABELS):
            layout += " (release 2)"
        default = list(DATABASE_LABELS)
        ignored = [by_label[x].name for x in by_label if x not in DATABASE_LABELS]
    else:
        layout = "class folders"
        default = sorted(by_label)

    if classes:
        wanted = [canonical_label(c) for c in classes]
        unknown = [c for c, w in zip(classes, wanted, strict=True) if w not in by_label]
        if unknown:
            raise DataError(f"{root}: no folder for class(es) {unknown}; found {sorted(by_label)}")
        labels = wanted
        ignored = [by_label[x].name for x in by_label if x not in labels]
    else:
        labels = default
        if layout == "class folders":
            ignored = []
    if len(set(labels)) != len(labels):
        raise DataError(f"duplicate classes in {labels}")

    items: list[tuple[Path, str]] = []
    unreadable: list[tuple[Path, str]] = []
    for label in labels:
        odd: list[Path] = []
        files = _images_under(by_label[label], odd)
        if not files:
            raise DataError(f"{by_label[label]}: class '{label}' has no images")
        items.extend((f, label) for f in files)
        unreadable.extend((f, label) for f in odd)
    return LabelledSet(root=root, labels=labels, items=items, layout=layout, ignored=ignored, unreadable=unreadable)


#: Column names a labels file may use for the file and for its label (first present wins).
_FILE_COLUMNS = ("path", "file")
_LABEL_COLUMNS = ("label", "source_label")


def is_labels_file(root: str | Path) -> bool:
    """A data root given as a CSV file: its rows name the images (relative to its folder) and their labels."""
    return Path(root).suffix.lower() == ".csv" and Path(root).is_file()


def root_folder(root: str | Path) -> Path:
    """The folder a data root's relative paths are under: the root itself, or a labels file's folder."""
    return Path(root).parent if is_labels_file(root) else Path(root)


def find_labelled_csv(
    labels_file: str | Path, classes: Sequence[str], label_map: Mapping[str, str] | None = None
) -> LabelledSet:
    """Images named by a labels file (e.g. ``lung-masks/montgomery/SOURCES.csv``), no class folders needed.

    The file needs a header with a file column (``path`` or ``file``, relative to the file's folder)
    and a label column (``label``, else ``source_label``). Each label value goes through ``label_map``
    (exact value → class), else :func:`canonical_label`. Rows whose label is then not among
    ``classes`` (``tuberculosis``: not a class) are left out and counted in ``excluded``.
    The set's root is the file's folder and its source name that folder's name.

    Raises:
        DataError: the file can't be read or lacks the columns, a path is absolute or leaves the
            folder, a listed file is missing, a file is listed twice, or no row has a wanted class.
    """
    from cxr_batch.io.safe_open import open_regular

    src = Path(labels_file)
    base = src.parent
    label_map = dict(label_map or {})
    try:
        with open_regular(src) as raw:
            text = raw.read().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{src}: cannot read the labels file ({exc})") from None
    reader = csv.DictReader(text.splitlines())
    fields = [f.strip() for f in reader.fieldnames or []]
    file_col = next((c for c in _FILE_COLUMNS if c in fields), None)
    label_col = next((c for c in _LABEL_COLUMNS if c in fields), None)
    if file_col is None or label_col is None:
        raise DataError(
            f"{src}: a labels file needs a header with a file column (path or file) and label or source_label"
        )
    items: list[tuple[Path, str]] = []
    excluded: dict[str, int] = {}
    left_out: list[tuple[Path, str]] = []
    seen: dict[str, int] = {}
    for row in reader:
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str)}
        rel, value = row.get(file_col, ""), row.get(label_col, "")
        if not rel and not value:
            continue
        line = reader.line_num
        if not rel or not value:
            raise DataError(f"{src}: line {line}: needs both a file and a label")
        norm = os.path.normpath(rel)
        if os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
            raise DataError(f"{src}: line {line}: {rel!r} must be a path inside {base}")
        if norm in seen:
            raise DataError(f"{src}: lines {seen[norm]} and {line} both name {rel!r}; list each file once")
        seen[norm] = line
        label = label_map[value] if value in label_map else canonical_label(value)
        path = base / norm
        if label not in classes:
            excluded[value] = excluded.get(value, 0) + 1
            if path.is_file():
                left_out.append((path, value))
            continue
        if not path.is_file():
            raise DataError(f"{src}: line {line}: {rel!r} is not a file under {base}")
        items.append((path, label))
    labels = [c for c in classes if any(label == c for _, label in items)]
    if not labels:
        raise DataError(
            f"{src}: no row has one of the classes {list(classes)} (labels found: {sorted(excluded)}); "
            "map them with --label-map VALUE=CLASS"
        )
    items = [it for c in labels for it in items if it[1] == c]  # class order, then file order
    return LabelledSet(
        root=base, labels=labels, items=items, layout=f"labels file {src.name}", excluded=excluded, left_out=left_out
    )


def file_digest(path: Path) -> str:
    """sha256 of an image file, read in chunks; only a regular file of at most
    :data:`~cxr_batch.io.safe_open.MAX_IMAGE_FILE_BYTES` (a sparse 4 GB file is refused, not hashed).

    Raises:
        DataError: not a regular file, too large, or unreadable.
    """
    try:
        with open_bounded(path, MAX_IMAGE_FILE_BYTES, what=f"{path}") as fh:
            h = hashlib.sha256()
            left = MAX_IMAGE_FILE_BYTES + 1
            while left > 0 and (chunk := fh.read(min(1 << 20, left))):
                h.update(chunk)
                left -= len(chunk)
            if left <= 0:  # it grew past the cap while being read
                raise FileTooLargeError(path, f"{path}", MAX_IMAGE_FILE_BYTES)
    except OSError as exc:
        raise DataError(f"cannot use {path} as a training image: {exc.strerror or exc}") from None
    return h.hexdigest()


#: Where a split's files are: one root for every row, or one root per source name.
Roots = Path | Mapping[str, Path]


def source_names(roots: Sequence[str | Path]) -> list[str]:
    """One source name per data root: the folder's name (a labels file's folder's), made unique with ``-2``, ``-3`` ... in order."""
    names: list[str] = []
    for r in roots:
        base = root_folder(r).resolve().name or "data"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def roots_by_source(roots: Sequence[str | Path]) -> dict[str, Path]:
    return dict(zip(source_names(roots), (root_folder(r) for r in roots), strict=True))


@dataclass
class Split:
    """Rows of (relative path, label, split, sha256, source).

    ``source`` names the data root a file was found under (see :func:`source_names`); the path is
    relative to that root. Split files written before sources existed have no ``source`` column:
    their rows get ``""``, which :meth:`paths` resolves against the single root it is given.
    """

    rows: list[tuple[str, str, str, str, str]]

    def sources(self) -> list[str]:
        return sorted({r[4] for r in self.rows})

    def paths(self, roots: Roots, part: str) -> list[tuple[Path, str]]:
        return [(p, label) for p, label, _ in self.items(roots, part)]

    def items(self, roots: Roots, part: str) -> list[tuple[Path, str, str]]:
        """``(path, label, source)`` of every row in ``part`` (train, val or test)."""
        out = []
        for rel, label, s, _, source in self.rows:
            if s != part:
                continue
            if isinstance(roots, Path):
                root = roots
            elif source in roots:
                root = roots[source]
            elif len(roots) == 1:
                root = next(iter(roots.values()))
            else:
                raise DataError(f"the split names source '{source}', which is not among the data roots {sorted(roots)}")
            path = root / rel
            # A split names files under its roots only: an absolute or '../' path is refused (a
            # split file is input, and may be anyone's). Links inside the data are the data's own.
            norm = os.path.normpath(rel)
            if not rel or os.path.isabs(rel) or norm == ".." or norm.startswith(".." + os.sep):
                raise DataError(f"the split names {rel!r}, which is outside its data folder {root}; refused")
            out.append((path, label, source))
        return out

    def fingerprint(self) -> str:
        """sha256 of the sorted rows. With a single source the source column is left out, so a
        one-root split has the same fingerprint as before sources were recorded."""
        single = len({r[4] for r in self.rows}) <= 1
        h = hashlib.sha256()
        for row in sorted(r[:4] if single else (r[4], *r[:4]) for r in self.rows):
            h.update(("\t".join(row) + "\n").encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def write(self, path: Path) -> None:
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(["path", "label", "split", "sha256", "source"])
        w.writerows(self.rows)
        write_file_atomic(path, buf.getvalue().encode("utf-8", "surrogateescape"))

    @classmethod
    def read(cls, path: Path) -> Split:
        try:
            text = read_text(path, MAX_LIST_BYTES, what="the split file", encoding="utf-8-sig")
        except OSError as exc:
            raise DataError(f"cannot read the split file {path}: {exc.strerror or exc}") from None
        except DamagedFileError as exc:
            raise DataError(f"{path}: {exc}") from None
        with io.StringIO(text, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"path", "label", "split"} <= set(reader.fieldnames):
                raise DataError(f"{path}: a split file needs the columns path,label,split")
            try:
                rows = [
                    (r["path"], r["label"], r["split"], r.get("sha256") or "", r.get("source") or "") for r in reader
                ]
            except csv.Error as exc:
                raise DataError(f"{path}: not valid CSV ({exc})") from None
        bad = {r[2] for r in rows} - {"train", "val", "test"}
        if bad:
            raise DataError(f"{path}: unknown split names {sorted(bad)}")
        return cls(rows)


def find_labelled_many(
    roots: Sequence[str | Path], classes: Sequence[str] | None = None, label_map: Mapping[str, str] | None = None
) -> list[LabelledSet]:
    """:func:`find_labelled` for each root, merged into one class list.

    The class list is the first root's (or ``classes``); a later root may hold a subset of the
    classes (``kermany-normal/normal`` beside the three-class database), never a class the first
    lacks. A later root may be a labels file (:func:`find_labelled_csv`, with ``label_map``): its
    rows with another label are left out. Each set's ``source`` is its unique root name.

    Raises:
        DataError: as :func:`find_labelled`, or a root with a class outside the class list.
    """
    if not roots:
        raise DataError("no data folders given")
    names = source_names(roots)
    if is_labels_file(roots[0]):
        raise DataError(f"{roots[0]}: the first data root sets the classes and must be a folder of class folders")
    first = find_labelled(roots[0], classes)
    sets = [first]
    for root in roots[1:]:
        if is_labels_file(root):
            sets.append(find_labelled_csv(root, first.labels, label_map))
            continue
        found = find_labelled(root)
        extra = [x for x in found.labels if x not in first.labels]
        if extra and classes is None:
            raise DataError(
                f"{root}: class folder(s) {extra} are not among the classes {first.labels} of {roots[0]}; "
                "pass --classes to choose"
            )
        wanted = [x for x in first.labels if x in found.labels]
        if not wanted:
            raise DataError(f"{root}: none of the classes {first.labels} has a folder here")
        sets.append(find_labelled(root, wanted))
    for s, name in zip(sets, names, strict=True):
        s.source = name
    return sets


def make_split(
    data: LabelledSet | Sequence[LabelledSet], seed: int = 0, val: float = 0.15, test: float = 0.15
) -> Split:
    """Seeded split, stratified by source and class; files with identical content (within or across
    roots) always land on the same side, decided where the content is first seen.

    Sources are drawn in the order given, classes in label order, from one random stream: a single
    root gives exactly the split of earlier versions, and adding a root after it leaves the first
    root's assignment unchanged.
    """
    sets = [data] if isinstance(data, LabelledSet) else list(data)
    labels: list[str] = []
    for ds in sets:
        labels.extend(x for x in ds.labels if x not in labels)
    digests: dict[tuple[int, Path], str] = {}
    first_seen: dict[str, tuple[int, str]] = {}  # digest -> (set index, label)
    for i, ds in enumerate(sets):
        for path, label in ds.items:
            d = file_digest(path)
            digests[(i, path)] = d
            first_seen.setdefault(d, (i, label))
    per_group: dict[tuple[int, str], list[str]] = defaultdict(list)
    for d, (i, label) in first_seen.items():
        per_group[(i, label)].append(d)
    rng = random.Random(seed)
    side: dict[str, str] = {}
    for i, ds in enumerate(sets):
        for label in ds.labels:
            group = sorted(per_group[(i, label)])
            rng.shuffle(group)
            n = len(group)
            n_test = round(n * test)
            n_val = round(n * val)
            for k, d in enumerate(group):
                side[d] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    rows = [
        (path.relative_to(ds.root).as_posix(), label, side[digests[(i, path)]], digests[(i, path)], ds.source)
        for i, ds in enumerate(sets)
        for path, label in ds.items
    ]
    return Split(rows)
