"""Labelled data folders: layout detection (shared by train and evaluate) and the split."""

from __future__ import annotations

import csv
import hashlib
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cxr_batch.errors import DataError
from cxr_batch.io.preprocess import DICOM_SUFFIXES, IMAGE_SUFFIXES

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

    def counts(self) -> dict[str, int]:
        c = dict.fromkeys(self.labels, 0)
        for _, label in self.items:
            c[label] += 1
        return c


def _canon(name: str) -> str:
    key = " ".join(name.lower().replace("_", " ").replace("-", " ").split())
    return _ALIASES.get(key, name)


def _images_under(folder: Path) -> list[Path]:
    """Image and DICOM files under ``folder``, sorted, skipping hidden names and mask folders."""
    images = folder / "images"
    if images.is_dir():  # release 4 and later: CLASS/images/*.png next to CLASS/masks/
        folder = images
    out: list[Path] = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).parts
        if any(part.startswith(".") or part.lower() in _SKIP_DIRS for part in rel):
            continue
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES:
            out.append(path)
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
        label = _canon(d.name)
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
        wanted = [_canon(c) for c in classes]
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
    for label in labels:
        files = _images_under(by_label[label])
        if not files:
            raise DataError(f"{by_label[label]}: class '{label}' has no images")
        items.extend((f, label) for f in files)
    return LabelledSet(root=root, labels=labels, items=items, layout=layout, ignored=ignored)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Split:
    """Rows of (relative path, label, split, sha256)."""

    rows: list[tuple[str, str, str, str]]

    def paths(self, root: Path, part: str) -> list[tuple[Path, str]]:
        return [(root / rel, label) for rel, label, s, _ in self.rows if s == part]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for row in sorted(self.rows):
            h.update(("\t".join(row) + "\n").encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def write(self, path: Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "split", "sha256"])
            w.writerows(self.rows)

    @classmethod
    def read(cls, path: Path) -> Split:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"path", "label", "split"} <= set(reader.fieldnames):
                raise DataError(f"{path}: a split file needs the columns path,label,split")
            rows = [(r["path"], r["label"], r["split"], r.get("sha256") or "") for r in reader]
        bad = {r[2] for r in rows} - {"train", "val", "test"}
        if bad:
            raise DataError(f"{path}: unknown split names {sorted(bad)}")
        return cls(rows)


def make_split(data: LabelledSet, seed: int = 0, val: float = 0.15, test: float = 0.15) -> Split:
    """Stratified, seeded split. Files with identical content always land on the same side."""
    groups: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    digests: dict[Path, str] = {}
    for path, label in data.items:
        d = file_digest(path)
        digests[path] = d
        groups[d].append((path, label))
    per_label: dict[str, list[str]] = defaultdict(list)
    for d, members in groups.items():
        per_label[members[0][1]].append(d)
    rng = random.Random(seed)
    side: dict[str, str] = {}
    for label in data.labels:
        ds = sorted(per_label[label])
        rng.shuffle(ds)
        n = len(ds)
        n_test = round(n * test)
        n_val = round(n * val)
        for i, d in enumerate(ds):
            side[d] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    rows = [
        (path.relative_to(data.root).as_posix(), label, side[digests[path]], digests[path])
        for path, label in data.items
    ]
    return Split(rows)
