"""The size a compressed DICOM frame really has, read from its own codestream before decoding.

A DICOM decoder sizes its output from the codestream (the JPEG ``SOF`` marker, the JPEG 2000
``SIZ`` marker), not from the header's Rows and Columns that the decompression-bomb guard
checks. A file whose header says 64×64 while its 8 KB codestream says 20000×20000 would make
the decoder allocate and fill gigabytes (openjpeg and libjpeg decode a truncated codestream into
a zero-filled frame of the full declared size). So the first frame's first bytes are read (a
bounded prefix of its fragments), its marker segments walked to the frame header, and the frame
refused when its size differs from Rows and Columns, is zero, or is over the pixel limit.

Only the marker structure is parsed here, never the entropy-coded data. Encapsulated pixel data
is always little endian (PS3.5 A.4).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import BinaryIO

from cxr_batch.errors import ImageError

#: At most this much of the first frame's codestream is read to find its size (the frame header
#: comes after a few kilobytes of tables in every real file; APP segments are at most 64 KiB).
PREFIX_BYTES = 1 << 20

#: Transfer syntaxes whose frames are JPEG (ISO 10918: baseline, extended, lossless) ...
_JPEG = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                   "1.2.840.10008.1.2.4.70"})  # fmt: skip
#: ... JPEG-LS (ISO 14495: a JPEG-style marker stream, frame header SOF55) ...
_JPEG_LS = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
#: ... and JPEG 2000 / High-Throughput JPEG 2000 (ISO 15444: SOC then SIZ).
_J2K = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                  "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                  "1.2.840.10008.1.2.4.203"})  # fmt: skip
CHECKED_SYNTAXES = _JPEG | _JPEG_LS | _J2K

_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
_ITEM = b"\xfe\xff\x00\xe0"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0"
_UNDEFINED = 0xFFFFFFFF
#: JPEG start-of-frame markers: SOF0-3, 5-7, 9-11, 13-15 (C4 is DHT, C8 JPG, CC DAC), and
#: JPEG-LS SOF55 (F7).
_SOF = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
#: Markers without a length: RSTn, SOI, EOI, TEM.
_STANDALONE = frozenset({*range(0xD0, 0xDA), 0x01})


def check_first_frame(fh: BinaryIO, pixel_data_at: int, tsyntax: str, rows: int, cols: int, limit: int) -> None:
    """Refuse the file when its first frame's codestream is not ``cols``×``rows`` pixels.

    Args:
        fh: the DICOM file.
        pixel_data_at: the offset of the Pixel Data element (where a header read stopped).
        tsyntax: the transfer syntax UID; other syntaxes than :data:`CHECKED_SYNTAXES` pass.
        rows, cols: the header's Rows and Columns.
        limit: the most pixels a frame may have (0: no limit).

    Raises:
        ImageError: the codestream's size differs from the header's, is zero or over the limit,
            or can't be found in its first :data:`PREFIX_BYTES` bytes.
    """
    if tsyntax not in CHECKED_SYNTAXES:
        return
    kind = "JPEG 2000" if tsyntax in _J2K else "JPEG"
    size = None
    prefix = None
    for prefix in _first_frame_prefixes(fh, pixel_data_at):
        size = _j2k_size(prefix) if tsyntax in _J2K else _jpeg_size(prefix)
        if size is not None:
            break
    if prefix is None:
        return  # no encapsulated pixel data where the header ended: the decoder says what is wrong
    if size is None:
        raise ImageError(
            f"damaged {kind} pixel data: no frame header (the image's size) in the first "
            f"{PREFIX_BYTES:,} bytes of its codestream"
        )
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"damaged {kind} pixel data: its codestream says the image is {width}×{height} pixels")
    if limit and width * height > limit:
        raise ImageError(
            f"image too large (decompression-bomb guard): its {kind} codestream is {width}×{height} pixels, "
            f"the limit is {int(limit)}"
        )
    if (width, height) != (cols, rows):
        raise ImageError(
            f"damaged or forged DICOM file: its {kind} codestream is {width}×{height} pixels but its header "
            f"says {cols}×{rows} (Columns×Rows); not decoded"
        )


def _first_frame_prefixes(fh: BinaryIO, at: int) -> Iterator[bytes]:
    """The growing prefix of the first fragments' bytes (after each fragment), up to PREFIX_BYTES.

    Native (not encapsulated) pixel data gives nothing.

    Raises:
        ImageError: the item structure is damaged.
    """
    fh.seek(at)
    head = fh.read(12)
    if len(head) < 8 or head[:4] != _PIXEL_DATA_TAG:
        return
    if head[4:6].isalpha() and head[4:6].isupper():  # explicit VR: tag, VR, 2 reserved, 4-byte length
        (length,) = struct.unpack("<I", head[8:12])
        fh.seek(at + 12)
    else:  # implicit VR: tag, 4-byte length
        (length,) = struct.unpack("<I", head[4:8])
        fh.seek(at + 8)
    if length != _UNDEFINED:
        return
    data = b""
    offsets_table = True
    while len(data) < PREFIX_BYTES:
        item = fh.read(8)
        if len(item) < 8 or item[:4] == _SEQUENCE_END:
            return
        if item[:4] != _ITEM:
            raise ImageError("damaged encapsulated pixel data: an item tag is missing")
        (n,) = struct.unpack("<I", item[4:8])
        if n == _UNDEFINED:
            raise ImageError("damaged encapsulated pixel data: an item of undefined length")
        if offsets_table:  # the Basic Offset Table: skipped
            offsets_table = False
            fh.seek(n, os.SEEK_CUR)
            continue
        want = min(n, PREFIX_BYTES - len(data))
        chunk = fh.read(want)
        data += chunk
        yield data
        if len(chunk) < want:
            return
        if want < n:
            fh.seek(n - want, os.SEEK_CUR)


def _j2k_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the SIZ marker segment that follows SOC (also inside a JP2 wrapper)."""
    at = data.find(b"\xff\x4f\xff\x51")
    if at < 0 or len(data) < at + 24:
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", data[at + 8 : at + 24])
    return max(0, xsiz - xosiz), max(0, ysiz - yosiz)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame marker segment, walking the marker segments."""
    if not data.startswith(b"\xff\xd8"):
        raise ImageError("damaged JPEG pixel data: its codestream does not start with a JPEG marker (SOI)")
    i = 2
    while True:
        while i < len(data) and data[i] != 0xFF:  # bytes between segments: tolerated, as decoders do
            i += 1
        while i < len(data) and data[i] == 0xFF:  # fill bytes
            i += 1
        if i + 1 > len(data):
            return None
        marker = data[i]
        if marker in _STANDALONE:
            i += 1
            continue
        if i + 3 > len(data):
            return None
        (length,) = struct.unpack(">H", data[i + 1 : i + 3])
        if marker in _SOF:
            if i + 8 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 4 : i + 8])
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            raise ImageError("damaged JPEG pixel data: its codestream has no frame header before its scan")
        if length < 2:
            raise ImageError("damaged JPEG pixel data: a marker segment of length under 2")
        i += 1 + length
