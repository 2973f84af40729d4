"""DICOM reader. Full support (pydicom, LUTs, MONOCHROME1) is a separate issue; this is the plug."""

from __future__ import annotations

from pathlib import Path

from cxr_batch.errors import ImageError
from cxr_batch.preprocess import Decoded


def read_dicom(path: Path, target: tuple[int, int] | None = None) -> Decoded:
    """Decode a DICOM file to grey [0, 1]."""
    raise ImageError("DICOM input is not supported yet in this version of cxr-batch")
