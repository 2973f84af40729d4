"""DICOM reader: pydicom (the ``dicom`` extra), imported only when a DICOM file is read.

The display pipeline follows DICOM PS3.4 N.2 for grey images:

1. decode the first frame (of a multi-frame file, only that frame is read and decoded);
2. Modality LUT: the Modality LUT Sequence, or Rescale Slope/Intercept;
3. VOI LUT: the first VOI LUT Sequence item, else the first Window Center/Width pair (with the
   VOI LUT Function), else the full range of the frame's own values (what a viewer shows when
   a file carries no window);
4. scale the VOI output range to [0, 1];
5. invert MONOCHROME1 (after windowing: its windows are given in stored-value terms).

Colour images (RGB, YBR converted by pydicom, PALETTE COLOR) become grey with the same BT.601
luma as :func:`cxr_batch.io.preprocess.to_grey`. The result then takes the common path in
:mod:`cxr_batch.io.preprocess`, like any greyscale PNG.

Protected health information stays out by construction: only the file meta and the elements in
:data:`_TAGS` and :data:`_PIXEL_TAGS` are ever parsed (pydicom skips the others unread), so no
patient element can reach a report field, a note, an error message or a warning.
"""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from PIL import Image

from cxr_batch.errors import ImageError
from cxr_batch.io.preprocess import LUMA, Decoded
from cxr_batch.io.safe_open import NotRegularFileError, open_regular
from cxr_batch.io.warning_capture import capture

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: Modality codes of projection radiography (PS3.3 C.7.3.1.1.1): Computed Radiography, Digital
#: Radiography and Radiographic imaging (conventional film/screen, digitised). ``DR`` is not a
#: defined term but some digital radiography systems write it.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RG", "DR"})

#: Modality codes that say nothing about what the picture is (other, secondary capture). Files
#: with these, or with no Modality, are left to the pixel-based out-of-distribution guard.
UNKNOWN_MODALITIES = frozenset({"", "OT", "SC"})

#: What to ``pip install`` when no installed plugin decodes a transfer syntax. pydicom decodes
#: the uncompressed, deflated and RLE syntaxes itself; Pillow (a core dependency) usually covers
#: JPEG baseline/extended and JPEG 2000.
_PLUGIN_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Extended (Process 2 and 4)
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K
}

#: Header elements read for the report and the modality check. With :data:`_PIXEL_TAGS` and the
#: file meta, the only elements ever parsed: keep patient, study-description and institution
#: elements out of both lists.
_TAGS: tuple[int, ...] = (
    0x00080005,  # SpecificCharacterSet
    0x00080016,  # SOPClassUID
    0x00080018,  # SOPInstanceUID
    0x00080060,  # Modality
    0x00185101,  # ViewPosition
    0x0020000D,  # StudyInstanceUID
    0x52009229,  # SharedFunctionalGroupsSequence (enhanced multi-frame rescale and window)
    0x52009230,  # PerFrameFunctionalGroupsSequence
)

#: Pixel description, Modality LUT, VOI LUT and palette elements, and the pixel data itself (read
#: only for files that can't be streamed frame by frame: no file meta, or deflated).
_PIXEL_TAGS: tuple[int, ...] = (
    0x00280002,  # SamplesPerPixel
    0x00280004,  # PhotometricInterpretation
    0x00280006,  # PlanarConfiguration
    0x00280008,  # NumberOfFrames
    0x00280010,  # Rows
    0x00280011,  # Columns
    0x00280100,  # BitsAllocated
    0x00280101,  # BitsStored
    0x00280102,  # HighBit
    0x00280103,  # PixelRepresentation
    0x00281050,  # WindowCenter
    0x00281051,  # WindowWidth
    0x00281052,  # RescaleIntercept
    0x00281053,  # RescaleSlope
    0x00281054,  # RescaleType
    0x00281056,  # VOILUTFunction
    0x00281101,  # Red/Green/Blue PaletteColorLookupTableDescriptor
    0x00281102,
    0x00281103,
    0x00281201,  # Red/Green/Blue PaletteColorLookupTableData
    0x00281202,
    0x00281203,
    0x00281221,  # Segmented Red/Green/Blue PaletteColorLookupTableData
    0x00281222,
    0x00281223,
    0x00283000,  # ModalityLUTSequence
    0x00283010,  # VOILUTSequence
    0x7FE00001,  # ExtendedOffsetTable
    0x7FE00002,  # ExtendedOffsetTableLengths
    0x7FE00008,  # FloatPixelData
    0x7FE00009,  # DoubleFloatPixelData
    0x7FE00010,  # PixelData
)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Without a file meta header, a file is taken for a bare DICOM dataset only if it has one of these.
_KNOWN_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "Modality", "Rows", "Columns")

#: pydicom and its plugins raise these for broken or unsupported files.
_DECODE_ERRORS = (
    AttributeError,
    EOFError,
    IndexError,
    KeyError,
    MemoryError,
    NotImplementedError,
    OSError,
    RuntimeError,
    TypeError,
    ValueError,
    struct.error,
    zlib.error,
)

_NEEDS_PYDICOM = 'DICOM input needs pydicom: pip install "cxr-batch[dicom]"'


def read_dicom(path: Path, target: tuple[int, int] | None = None) -> Decoded:
    """Decode the first frame of a DICOM file to grey [0, 1].

    Args:
        path: the DICOM file.
        target: the model's (H, W), or None for the full-size image. With a target, a
            greyscale frame is box-reduced by an integer factor to no less than twice the target
            before windowing (see :func:`_reduce_frame`).

    Returns:
        The grey image, the report ``fields`` (modality, view_position, sop_instance_uid,
        study_instance_uid), notes (multi-frame, ignored window) and ``not_radiograph`` when
        the Modality is not projection radiography.

    Raises:
        ImageError: pydicom (or the plugin for the file's compression) is not installed, the
            file is not DICOM, has no pixel data, or cannot be decoded.
    """
    _require_pydicom()
    notes: list[str] = []
    # pydicom's warnings (odd values of the elements read here) become notes without the values
    # they quote: see cxr_batch.io.warning_capture.
    try:
        fh = open_regular(path)
    except NotRegularFileError as exc:
        raise ImageError(f"not a regular file: {exc.kind}") from None
    except OSError as exc:
        raise ImageError(f"cannot open file: {exc.strerror or exc}") from None
    with fh, capture() as caught:
        ds, frame = _load_first_frame(fh)
        fields = _report_fields(ds, notes)
        n_frames = _int(ds.get("NumberOfFrames"), 1)
        if n_frames > 1:
            notes.append(f"multi-frame DICOM: used frame 1 of {n_frames}")
        frame, stored_range = _reduce_frame(frame, ds, target)
        grey = _to_grey(frame, ds, notes, stored_range)
        del frame
    notes.extend(n for n in caught if n not in notes)

    rows, cols = grey.shape
    return Decoded(
        grey=grey,
        width=_int(ds.get("Columns"), cols),
        height=_int(ds.get("Rows"), rows),
        notes=notes,
        fields=fields,
        not_radiograph=_not_radiograph(fields["modality"]),
    )


def _require_pydicom() -> None:
    try:
        import pydicom  # noqa: F401  (imported first: a stale pydicom.pixels import can't mask it)
    except ImportError:
        raise ImageError(_NEEDS_PYDICOM) from None
    try:
        from pydicom.pixels.utils import pixel_array  # noqa: F401  (new in pydicom 3.0)
    except ImportError:
        raise ImageError('DICOM input needs pydicom 3.0 or later: pip install "cxr-batch[dicom]"') from None


# --- reading -----------------------------------------------------------------------------------


#: Most read calls pydicom may make while parsing the header (about one or two per element): a
#: file of millions of empty elements after a valid start is refused within a fraction of a
#: second (a few seconds on a loaded machine) instead of being walked element by element. The
#: shared chest radiographs, CT and MR need 76 to 305; an enhanced multi-frame header with per-frame
#: groups needs some tens per frame.
MAX_HEADER_READS = 50_000

#: A deflated dataset may inflate to at most this many times the pixel limit, in bytes (two
#: bytes a pixel, twice over): checked by streaming before pydicom inflates it in memory.
INFLATE_FACTOR = 4


class _ScanLimitError(Exception):
    pass


class _Bounded(io.RawIOBase):
    """A read-only view of an open file that refuses more than ``budget`` read calls."""

    def __init__(self, fh: BinaryIO, budget: int) -> None:
        super().__init__()
        self._fh = fh
        self.budget = budget

    def _spend(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise _ScanLimitError

    def read(self, size: int | None = -1) -> bytes:
        self._spend()
        return self._fh.read(-1 if size is None else size)

    def readinto(self, buffer: Any) -> int:
        self._spend()
        return self._fh.readinto(buffer)  # type: ignore[attr-defined,no-any-return]

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:  # the caller owns the file
        pass


def _check_start(fh: BinaryIO) -> bytes:
    """Refuse, from the first bytes alone, files that can't be DICOM (zeros, random data)."""
    fh.seek(0)
    head = fh.read(144)
    if head[128:132] == b"DICM":
        if head[132:134] != b"\x02\x00":
            raise ImageError("not a valid DICOM file (no file meta information after the DICM marker)")
        meta_end = _meta_end(head)
        if meta_end is not None:
            fh.seek(132)
            meta = fh.read(meta_end - 132)
            first = fh.read(2)
            if first == b"\x00\x00" and _DEFLATED_UID not in meta:
                raise ImageError("not a valid DICOM file (no data element after the file meta information)")
        return head
    # A bare dataset (no preamble): its first element must be of a low even group (0002 file
    # meta, 0008 identification), in either byte order. Zeros (group 0000) and most random
    # data stop here, before pydicom would walk them element by element.
    if len(head) < 8 or not any(
        int.from_bytes(head[:2], order) in (0x0002, 0x0004, 0x0008) for order in ("little", "big")
    ):
        raise ImageError("not a valid DICOM file (no DICM marker and no DICOM element at the start)")
    return head


_DEFLATED_UID = b"1.2.840.10008.1.2.1.99"


def _meta_end(head: bytes) -> int | None:
    """Where the file meta information ends, from its (0002,0000) group length; None without one."""
    if head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00" or len(head) < 144:
        return None
    explicit = head[136:138] == b"UL"
    length = int(struct.unpack("<I", head[140:144] if explicit else head[136:140])[0])
    return 132 + (12 if explicit else 8) + length


def _is_deflated(fh: BinaryIO, head: bytes) -> bool:
    meta_end = _meta_end(head)
    if meta_end is None:
        return False
    fh.seek(132)
    return _DEFLATED_UID in fh.read(meta_end - 132)


#: Inflated bytes read for the header of a deflated dataset before its size is checked.
DEFLATED_HEADER_BYTES = 4 << 20


def _check_deflated(fh: BinaryIO, head: bytes) -> None:
    """Refuse a deflated dataset whose frame is over the pixel limit, or that inflates to too much."""
    from pydicom import dcmread

    meta_end = _meta_end(head)
    assert meta_end is not None
    fh.seek(meta_end)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    prefix = b""
    try:
        while len(prefix) < DEFLATED_HEADER_BYTES and (chunk := fh.read(1 << 16)):
            prefix += inflater.decompress(chunk, DEFLATED_HEADER_BYTES - len(prefix))
            if inflater.eof:
                break
        rows_cols = dcmread(
            io.BytesIO(prefix), force=True, stop_before_pixels=True, specific_tags=[0x00280010, 0x00280011]
        )
    except (*_DECODE_ERRORS, _ScanLimitError):
        rows_cols = None  # a header longer than the prefix, or broken: the full read decides
    if rows_cols is not None:
        _check_frame_size(rows_cols)
    _check_inflated_size(fh, head)


def _check_inflated_size(fh: BinaryIO, head: bytes) -> None:
    """A deflated dataset is inflated by pydicom in one piece: refuse one that would be huge."""
    limit = Image.MAX_IMAGE_PIXELS
    meta_end = _meta_end(head)
    if not limit or meta_end is None:
        return  # no (0002,0000) group length: pydicom needs it to find the deflated part anyway
    fh.seek(meta_end)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    budget = INFLATE_FACTOR * int(limit)
    total = 0
    try:
        while chunk := fh.read(1 << 20):
            data = inflater.decompress(chunk, budget + 1 - total)
            total += len(data)
            while inflater.unconsumed_tail and total <= budget:
                total += len(inflater.decompress(inflater.unconsumed_tail, budget + 1 - total))
            if total > budget:
                raise ImageError(
                    f"image too large (decompression-bomb guard): the deflated DICOM dataset inflates "
                    f"to more than {budget} bytes"
                )
            if inflater.eof:
                break
    except zlib.error:
        return  # pydicom says what is wrong with it
    finally:
        fh.seek(0)


def _load_first_frame(fh: BinaryIO) -> tuple[Dataset, np.ndarray]:
    """The header (only the elements cxr-batch reads) and the first frame's stored values."""
    head = _check_start(fh)
    if _is_deflated(fh, head):
        # pydicom inflates a deflated dataset in one piece, even for the header: check the frame
        # size from an inflated prefix, and the inflated size by streaming, before it does.
        _check_deflated(fh, head)
        header = None
    else:
        header = _read_header(fh)
        pixel_data_at = fh.tell()  # the header read stops at the Pixel Data element
        _check_frame_size(header)  # before reading any pixel data
    tsyntax = header.file_meta.get("TransferSyntaxUID") if header is not None else None
    # pixel_array(file) needs a file meta header and can't inflate deflated datasets.
    streamable = tsyntax is not None and not tsyntax.is_deflated
    if not streamable:
        ds = _read_whole(fh)
        _check_frame_size(ds)
    else:
        assert header is not None
        ds = header
    tsyntax = ds.file_meta.TransferSyntaxUID
    _check_decoder(tsyntax)
    if streamable:  # the codestream's own size, before a decoder sizes its output from it
        _check_codestream(fh, pixel_data_at, ds, tsyntax)
    # From a file, pixel_array reads past the header to frame 1 and decodes only that frame, so
    # memory stays about one frame whatever the number of frames.
    fh.seek(0)
    frame = _decode(fh if streamable else ds, tsyntax)
    for keyword in _PIXEL_KEYWORDS:  # the encoded copy is no longer needed
        if keyword in ds:
            del ds[keyword]
    return ds, frame


#: VOI LUT Functions that map values linearly (clipped): box-filtering before them changes only
#: pixels next to the window's edges.
_LINEAR_VOI = frozenset({"", "LINEAR", "LINEAR_EXACT"})


def _reduce_frame(
    frame: np.ndarray, ds: Dataset, target: tuple[int, int] | None
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Shrink a greyscale frame by an integer factor (box filter) before the windowing.

    Returns the frame (reduced, float32, or as it was) and, when reduced, the full frame's range
    of stored values: without a window, the full path scales the frame's own full range to
    [0, 1], and the averaged frame has a narrower one.

    Only where the display pipeline is linear (Rescale Slope/Intercept, a linear window or the
    full range), so averaging the stored values first gives the same grey values except next to
    the window's edges (where it averages before clipping); a Modality or VOI LUT, a sigmoid
    window, colour and palette frames, and 32-bit data keep their full size. The result is at
    least twice ``target`` on both sides (:func:`cxr_batch.io.preprocess.reduction_factor`).

    JPEG's reduced-scale decoding (DCT scaling, Pillow's ``draft``) is not used for DICOM: on the
    RSNA 1024² films, decoding at 512² for the 224² model moved probabilities by up to 0.04 and
    flipped the label of a 0.49/0.50 film, against 0.002 for this box reduction (measured with
    ``tests/test_decode_scale.py``'s files and model).
    """
    from cxr_batch.io.preprocess import reduction_factor

    if frame.ndim != 2:
        return frame, None
    factor = reduction_factor((frame.shape[1], frame.shape[0]), target)
    if factor < 2:
        return frame, None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    _lift_functional_groups(ds)
    function = _header_text(ds, "VOILUTFunction").upper()
    if (
        photometric not in ("MONOCHROME1", "MONOCHROME2")
        or ds.get("ModalityLUTSequence")
        or ds.get("VOILUTSequence")
        or function not in _LINEAR_VOI
        or frame.dtype.kind not in "uif"
        or (frame.dtype.itemsize > 2 and frame.dtype != np.float32)  # not exact in float32
        or frame.size == 0
    ):
        return frame, None
    if frame.dtype.kind == "f" and not np.isfinite(frame).all():
        return frame, None  # NaN and infinities: the full path says so
    stored_range = (float(frame.min()), float(frame.max()))
    reduced = Image.fromarray(np.ascontiguousarray(frame, dtype=np.float32), "F").reduce(factor)
    return np.asarray(reduced), stored_range


def _read_header(fh: BinaryIO) -> Dataset:
    from pydicom import dcmread

    fh.seek(0)
    try:
        # force: also bare datasets without the preamble and "DICM" (older ACR-NEMA style exports)
        ds = dcmread(
            _Bounded(fh, MAX_HEADER_READS),
            force=True,
            stop_before_pixels=True,
            specific_tags=[*_TAGS, *_PIXEL_TAGS],
        )
    except _ScanLimitError:
        raise ImageError(
            f"not a valid DICOM file: no pixel data after {MAX_HEADER_READS} header reads (corrupt or padded file)"
        ) from None
    except _DECODE_ERRORS as exc:
        raise ImageError(f"not a valid DICOM file: {_reason(exc)}") from None
    if not ds.file_meta.get("TransferSyntaxUID") and not any(k in ds for k in _KNOWN_KEYWORDS):
        raise ImageError("not a valid DICOM file (no file meta information and no known DICOM elements)")
    return ds


def _read_whole(fh: BinaryIO) -> Dataset:
    """Header and all pixel data, for the files ``pixel_array(file)`` can't stream."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    fh.seek(0)
    try:
        ds = dcmread(_Bounded(fh, MAX_HEADER_READS), force=True, specific_tags=[*_TAGS, *_PIXEL_TAGS])
    except _ScanLimitError:
        raise ImageError(f"not a valid DICOM file: more than {MAX_HEADER_READS} header reads") from None
    except _DECODE_ERRORS as exc:
        raise ImageError(f"not a valid DICOM file: {_reason(exc)}") from None
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise ImageError("DICOM file has no pixel data")
    if not ds.file_meta.get("TransferSyntaxUID"):
        implicit, little = ds.original_encoding
        if implicit:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    return ds


def _check_frame_size(ds: Dataset) -> None:
    """The same decompression-bomb limit as for other images (Pillow's), checked before decoding."""
    limit = Image.MAX_IMAGE_PIXELS
    rows, cols = _int(ds.get("Rows"), 0), _int(ds.get("Columns"), 0)
    if limit and rows * cols > limit:
        raise ImageError(f"image too large (decompression-bomb guard): {cols}×{rows} pixels, the limit is {int(limit)}")


def _check_codestream(fh: BinaryIO, pixel_data_at: int, ds: Dataset, tsyntax: Any) -> None:
    """A JPEG / JPEG 2000 frame whose codestream is not Rows×Columns is refused before decoding."""
    from cxr_batch.io.codestream import check_first_frame

    rows, cols = _int(ds.get("Rows"), 0), _int(ds.get("Columns"), 0)
    check_first_frame(fh, pixel_data_at, str(tsyntax), rows, cols, int(Image.MAX_IMAGE_PIXELS or 0))


def _check_decoder(tsyntax: Any) -> None:
    """Fail early, naming the package to install, when no plugin decodes ``tsyntax``."""
    from pydicom.pixels.decoders.base import get_decoder

    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise ImageError(f"DICOM transfer syntax {_ts_name(tsyntax)} is not supported") from None
    if not decoder.is_available:
        raise ImageError(_missing_plugin_message(tsyntax))


def _missing_plugin_message(tsyntax: Any) -> str:
    packages = _PLUGIN_PACKAGES.get(str(tsyntax), "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")
    return (
        f"DICOM pixel data is compressed as {_ts_name(tsyntax)} and no installed plugin decodes it: "
        f"pip install {packages}"
    )


def _decode(src: BinaryIO | Dataset, tsyntax: Any) -> np.ndarray:
    from pydicom.pixels.utils import pixel_array

    try:
        arr = pixel_array(src, index=0)
    except AttributeError as exc:
        if "no pixel data" in str(exc).lower():
            raise ImageError("DICOM file has no pixel data") from None
        raise ImageError(f"cannot decode DICOM pixel data: {_reason(exc)}") from None
    except _DECODE_ERRORS as exc:
        raise ImageError(f"cannot decode DICOM pixel data ({_ts_name(tsyntax)}): {_reason(exc)}") from None
    return np.asarray(arr)


# --- pixels ------------------------------------------------------------------------------------


#: Pixels converted at a time in float64 (8 MB), so the float64 copies the DICOM pipeline needs
#: stay that size whatever the image size; the result is written straight into float32.
CHUNK_PIXELS = 1 << 20


def _to_grey(
    frame: np.ndarray, ds: Dataset, notes: list[str], stored_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Stored values of one frame → grey float32 [0, 1] as a viewer would display them.

    ``stored_range``: the smallest and largest stored value of the full-size frame when ``frame``
    is a reduced copy (see :func:`_reduce_frame`); the full range is taken from it.
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if frame.ndim == 3 or photometric == "PALETTE COLOR":
        grey = _colour_to_grey(frame, ds, photometric)
        if not np.isfinite(grey).all():
            raise ImageError("DICOM image contains NaN or infinite pixel values")
        grey = grey.astype(np.float32)  # a fresh array: clip it in place
        return np.clip(grey, 0.0, 1.0, out=grey)
    if frame.ndim == 2:
        return _monochrome_to_grey(frame, ds, notes, invert=photometric == "MONOCHROME1", stored_range=stored_range)
    raise ImageError(f"unexpected DICOM pixel array shape {frame.shape}")


def _row_blocks(frame: np.ndarray) -> list[slice]:
    step = max(1, CHUNK_PIXELS // max(1, frame.shape[1]))
    return [slice(r, r + step) for r in range(0, frame.shape[0], step)]


def _monochrome_to_grey(
    frame: np.ndarray,
    ds: Dataset,
    notes: list[str],
    invert: bool,
    stored_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Modality LUT, then the VOI LUT, the window or the full range, then MONOCHROME1 inversion.

    Every step works pixel by pixel, so it runs on blocks of rows (:data:`CHUNK_PIXELS`): the
    same float64 operations as on the whole frame, bit for bit, without whole-frame float64
    copies. A step that fails on any block is dropped for the whole image, with a note.
    """
    _lift_functional_groups(ds)
    blocks = _row_blocks(frame)
    out = np.empty(frame.shape, dtype=np.float32)
    modality = True
    try:
        for block in blocks[:1]:
            _modality(frame[block], ds, True)
    except _DECODE_ERRORS as exc:
        notes.append(f"DICOM modality LUT ignored: {_reason(exc)}")
        modality = False

    def values_of(block: slice) -> np.ndarray:
        return _modality(frame[block], ds, modality)

    if ds.get("VOILUTSequence"):
        try:
            top = _voi_lut_top(ds)
            _fill(out, blocks, lambda b: _voi(values_of(b), ds, top), invert)
            return out
        except _DECODE_ERRORS as exc:
            notes.append(f"DICOM VOI LUT ignored: {_reason(exc)}")
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        try:
            y_min, y_max = _windowing_range(ds)
            _fill(out, blocks, lambda b: _window(values_of(b), ds, y_min, y_max), invert)
            return out
        except _DECODE_ERRORS as exc:
            notes.append(f"DICOM window ignored: {_reason(exc)}")

    if stored_range is not None:  # a reduced frame: the full frame's range (the Modality LUT is linear)
        lo, hi = _finite_range([_modality(np.asarray(stored_range, dtype=np.float64), ds, modality)])
    else:
        lo, hi = _finite_range(values_of(b) for b in blocks)
    _fill(out, blocks, lambda b: _min_max(values_of(b), lo, hi), invert)
    return out


def _modality(values: np.ndarray, ds: Dataset, apply: bool) -> np.ndarray:
    from pydicom.pixels.processing import apply_modality_lut

    return apply_modality_lut(values, ds) if apply else values


def _voi(values: np.ndarray, ds: Dataset, top: float) -> np.ndarray:
    from pydicom.pixels.processing import apply_voi

    if not np.issubdtype(values.dtype, np.integer):
        values = np.rint(values).astype(np.int64)  # LUT inputs are integers (after a rescale)
    return apply_voi(values, ds, index=0).astype(np.float64) / top


def _window(values: np.ndarray, ds: Dataset, y_min: float, y_max: float) -> np.ndarray:
    from pydicom.pixels.processing import apply_windowing

    out = apply_windowing(values, ds, index=0)
    out -= y_min  # apply_windowing returns a new float64 array
    out /= y_max - y_min
    return out


def _fill(out: np.ndarray, blocks: list[slice], convert: Any, invert: bool) -> None:
    """``out[block] = clip(convert(block))`` for each block, inverted for MONOCHROME1."""
    for block in blocks:
        grey = convert(block)
        if invert:
            grey = np.subtract(1.0, grey, out=grey if grey.dtype == np.float64 else None)
        if not np.isfinite(grey).all():
            raise ImageError("DICOM image contains NaN or infinite pixel values")
        out[block] = grey  # float64 → float32, as astype() does
    np.clip(out, 0.0, 1.0, out=out)


def _windowing_range(ds: Dataset) -> tuple[float, float]:
    """The output range ``apply_windowing`` maps to (same rule as pydicom, PS3.3 C.11.2.1.2)."""
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        y_min, y_max = 0.0, float(2**bits - 1)
    else:
        stored = int(ds.BitsStored)
        if int(ds.get("PixelRepresentation", 0)) == 0:
            y_min, y_max = 0.0, float(2**stored - 1)
        else:
            y_min, y_max = float(-(2 ** (stored - 1))), float(2 ** (stored - 1) - 1)
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if slope is not None and intercept is not None:
            y_min = y_min * float(slope) + float(intercept)
            y_max = y_max * float(slope) + float(intercept)
    if y_max == y_min:
        raise ValueError("empty windowing output range")
    return y_min, y_max


def _voi_lut_top(ds: Dataset) -> float:
    """Largest output of the first VOI LUT.

    The descriptor's bits per entry is the nominal output depth, but many files declare 16 bits
    for 12-bit entries; like dcmtk, use the depth the entries actually need when it is smaller.
    """
    from pydicom.pixels.processing import apply_voi

    item = ds.VOILUTSequence[0]
    n_entries, first_map, bits = (int(v) for v in item.LUTDescriptor)
    n_entries = n_entries or 2**16
    every_entry = apply_voi(np.arange(first_map, first_map + n_entries, dtype=np.int64), ds, index=0)
    needed = max(int(every_entry.max()).bit_length(), 1)
    return float(2 ** min(bits, needed) - 1)


def _finite_range(blocks: Any) -> tuple[float, float]:
    """The smallest and largest finite value over all blocks (no VOI transform: the full range)."""
    lo, hi = np.inf, -np.inf
    for values in blocks:
        if np.issubdtype(values.dtype, np.integer):
            if values.size:
                lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
            continue
        finite = values[np.isfinite(values)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    if lo > hi:
        raise ImageError("DICOM image contains NaN or infinite pixel values")
    return lo, hi


def _min_max(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """No VOI transform in the file: show the frame's full range of values (``lo``..``hi``)."""
    values = values.astype(np.float64, copy=False)
    if lo is None or hi is None:
        lo, hi = _finite_range([values])
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float64)
    scaled = values - lo
    scaled /= hi - lo
    return scaled


def _colour_to_grey(frame: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        from pydicom.pixels.processing import apply_color_lut

        try:
            rgb = apply_color_lut(frame, ds)
        except _DECODE_ERRORS as exc:
            raise ImageError(f"cannot apply the DICOM palette: {_reason(exc)}") from None
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2]) if "RedPaletteColorLookupTableDescriptor" in ds else 8
        top = float(2 ** (8 if bits <= 8 else 16) - 1)
    else:
        rgb = frame
        top = float(2 ** _int(ds.get("BitsStored"), 8) - 1)
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise ImageError(f"unsupported DICOM colour layout {rgb.shape} ({photometric})")
    luma: np.ndarray = rgb[..., :3].astype(np.float64) @ np.asarray(LUMA, dtype=np.float64)
    if np.issubdtype(frame.dtype, np.floating):
        return _min_max(luma)
    return luma / top


def _lift_functional_groups(ds: Dataset) -> None:
    """Enhanced multi-frame files keep rescale and window in functional groups: use frame 1's."""
    groups = []
    for keyword in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        seq = ds.get(keyword)
        if seq:
            groups.append(seq[0])
    for group in groups:
        for macro, keywords in (
            ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept", "RescaleType")),
            ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
        ):
            items = group.get(macro)
            if not items:
                continue
            for keyword in keywords:
                if keyword not in ds and keyword in items[0]:
                    setattr(ds, keyword, items[0].get(keyword))


# --- header ------------------------------------------------------------------------------------


#: What a value may look like, by value representation (PS3.5 6.2): UI is digits and dots, at
#: most 64 characters; CS is upper-case letters, digits, space and underscore, at most 16.
_VR_PATTERNS = {
    "UI": re.compile(r"[0-9.]{1,64}"),
    "CS": re.compile(r"[A-Z0-9 _]{1,16}"),
}


def valid_uid(value: str) -> bool:
    """Whether ``value`` is a UID the report accepts (digits and dots, at most 64 characters):
    the one check for every UID read from a file or a server."""
    return bool(_VR_PATTERNS["UI"].fullmatch(value))


#: The report's DICOM columns: (column, keyword, VR).
_REPORT_ELEMENTS = (
    ("modality", "Modality", "CS"),
    ("view_position", "ViewPosition", "CS"),
    ("sop_instance_uid", "SOPInstanceUID", "UI"),
    ("study_instance_uid", "StudyInstanceUID", "UI"),
)


def _report_fields(ds: Dataset, notes: list[str] | None = None) -> dict[str, str]:
    """The report's DICOM columns. Never add patient elements here (see module docstring).

    Whoever sends a DICOM file controls these values, and they end up in spreadsheets: a value
    that its value representation does not allow (a UI that is not digits and dots, a CS with
    lower case or punctuation, such as ``=HYPERLINK(...)``) is left empty with a note, and is
    never echoed.
    """
    fields: dict[str, str] = {}
    for column, keyword, vr in _REPORT_ELEMENTS:
        value = _header_text(ds, keyword)
        if vr == "CS":
            value = value.upper()  # CS is upper case; some writers don't care (kept as before)
        if value and not _VR_PATTERNS[vr].fullmatch(value):
            if notes is not None:
                notes.append(f"invalid {column} header value left empty (not a valid DICOM {vr})")
            value = ""
        fields[column] = value
    return fields


def _header_text(ds: Dataset, keyword: str) -> str:
    """The element's value as text, or "" (an element pydicom can't even convert counts as empty)."""
    try:
        return _text(ds.get(keyword))
    except _DECODE_ERRORS:
        return ""


def _not_radiograph(modality: str) -> str | None:
    if modality in RADIOGRAPH_MODALITIES or modality in UNKNOWN_MODALITIES:
        return None
    return f"DICOM modality {modality} is not a radiograph (expected CR, DX or RG)"


def _text(value: Any) -> str:
    """A header value as one clean line (multi-valued elements joined with a backslash)."""
    if value is None:
        return ""
    from pydicom.multival import MultiValue

    text = "\\".join(str(v) for v in value) if isinstance(value, MultiValue | list | tuple) else str(value)
    return "".join(ch for ch in text if ch.isprintable()).strip()


def _int(value: Any, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _ts_name(tsyntax: Any) -> str:
    name = getattr(tsyntax, "name", "") or str(tsyntax)
    return str(name)


def _reason(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (pydicom lists each plugin's failure on its own line)."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
