"""``classify --dry-run``: what a run would classify, without loading the model or decoding an image.

The same discovery (and shard) as the run itself; each file is only looked at (``stat``, and the
first 132 bytes of a file without an image suffix): counts by type, the files that would be error
rows at once (unreadable, not a regular file, a folder that can't be listed), and what the walk
left out, by reason.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cxr_batch.io.inputs import Discovery, InputFile, InputSpec, discover
from cxr_batch.io.preprocess import DICOM_SUFFIXES
from cxr_batch.io.safe_open import NotRegularFileError, check_regular, open_regular
from cxr_batch.io.shard import Shard

if TYPE_CHECKING:
    from cxr_batch.io.dicomweb import DicomwebConfig

_TYPES = {".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff", ".png": "png", ".bmp": "bmp"}


@dataclass
class Plan:
    """What ``classify`` would do with these inputs."""

    #: the files the run would classify, in report order (after ``--shard``)
    files: list[InputFile]
    #: readable files by type: ``png``, ``jpeg``, ``dicom``, ... and ``other`` (named explicitly,
    #: not an image by its name: classify tries it and writes an error row if it can't decode it)
    by_type: Counter[str] = field(default_factory=Counter)
    #: (report path, why) of the files that would be error rows without being decoded
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    #: what the walk left out, by reason (see :data:`cxr_batch.io.inputs.SKIP_REASONS`)
    skipped: Counter[str] = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)
    #: files found before ``--shard`` took its part (None without a shard)
    before_shard: int | None = None


def file_type(path: str) -> str:
    """``png``, ``jpeg``, ``tiff``, ``bmp``, ``dicom`` (by suffix or by the ``DICM`` marker) or ``other``."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _TYPES:
        return _TYPES[suffix]
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    try:
        with open_regular(path) as fh:
            head = fh.read(132)
    except OSError:
        return "other"
    return "dicom" if head[128:132] == b"DICM" else "other"


def _unreadable(item: InputFile) -> str | None:
    if item.error is not None:
        return item.error
    try:
        check_regular(item.path)
    except NotRegularFileError as exc:
        return str(exc)
    except OSError as exc:
        return exc.strerror or str(exc)
    if not os.access(item.path, os.R_OK):
        return "permission denied"
    return None


def plan_inputs(spec: InputSpec, shard: Shard | None = None, dicomweb: DicomwebConfig | None = None) -> Plan:
    """Discover as ``classify`` does and look at each file, without decoding anything.

    Raises:
        InputError: an input path does not exist (as for the run).
        DicomwebError: the DICOMweb search fails.
    """
    if dicomweb is not None:
        from cxr_batch.io.dicomweb import DicomwebSource

        source = DicomwebSource(dicomweb)
        try:
            found: Discovery = source.discover()
        finally:
            source.close()
    else:
        found = discover(spec)
    files = found.files
    plan = Plan(files=files, skipped=found.skipped, warnings=list(found.warnings))
    if shard is not None:
        plan.before_shard = len(files)
        plan.files = files = [f for f in files if shard.owns(f.display)]
    for item in files:
        if dicomweb is not None:
            if item.error is not None:
                plan.unreadable.append((item.display, item.error))
            else:
                plan.by_type["dicomweb instance"] += 1
            continue
        why = _unreadable(item)
        if why is not None:
            plan.unreadable.append((item.display, why))
        else:
            plan.by_type[file_type(item.path)] += 1
    return plan


__all__ = ["Plan", "file_type", "plan_inputs"]
