"""Thumbnails for the HTML report: :class:`Thumbnailer` writes one small JPEG per distinct file content
under ``thumbs/`` (classify's own decoder, pixels only), from any thread, through the report
folder's :class:`~cxr_batch.io.safe_write.OutputDir`; and the placeholder shown when there is none.
"""

from __future__ import annotations

import errno
import hashlib
import io
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cxr_batch.errors import ImageError, OutputError
from cxr_batch.io.preprocess import decode, resize_grey
from cxr_batch.io.safe_open import NotRegularFileError, check_regular, open_regular
from cxr_batch.io.safe_write import LinkRefused, OutputDir
from cxr_batch.report.heatmap import overlay_size
from cxr_batch.report.html.data import Thumb

#: The longer side of a thumbnail, in pixels (shown smaller; sharp on high-DPI screens).
THUMB_SIDE = 256
THUMB_QUALITY = 82
THUMBS = "thumbs"
PLACEHOLDER = f"{THUMBS}/unavailable.png"
#: The largest input file a thumbnail is made of (hashed, then decoded), and the largest earlier
#: thumbnail reused.
MAX_FILE_BYTES = 2 << 30
MAX_THUMB_BYTES = 8 << 20


class _Once:
    """The result of one computation that several threads may ask for (the first one computes it)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.value: Any = None


class Thumbnailer:
    """Writes one thumbnail per distinct file content under ``thumbs/`` of the output folder, from any thread.

    Files are recognised first by (device, inode, size, mtime) (so links and copies that were
    hard-linked are hashed once), then by the SHA-256 of their bytes. A thumbnail already in the
    folder (from an earlier report) is reused. Only regular files are read (a FIFO or a link to
    ``/dev/zero`` gets a card saying so, at once), at most :data:`MAX_FILE_BYTES` of each; setting
    :attr:`stop` makes every thread give up at its next read (Ctrl-C, SIGTERM).
    """

    def __init__(self, out: OutputDir, side: int = THUMB_SIDE) -> None:
        self.out = out
        self.out_dir = out.path
        self.side = side
        self.made = 0
        self.reused = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._by_inode: dict[tuple[int, int, int, int], _Once] = {}
        self._by_name: dict[str, _Once] = {}

    def _once(self, table: dict[Any, _Once], key: Any, compute: Callable[[], Any]) -> Any:
        with self._lock:
            slot = table.get(key)
            mine = slot is None
            if slot is None:
                slot = table[key] = _Once()
        if not mine:
            slot.event.wait()
            return slot.value
        try:
            slot.value = compute()
        except BaseException as exc:  # keep waiting threads from hanging; they get the same failure
            slot.value = exc
            raise
        finally:
            slot.event.set()
        return slot.value

    def thumbnail(self, file: str, kind: str = "image") -> Thumb:
        """The thumbnail of ``file`` (an input image, decoded as classify decodes it; or a heatmap PNG).

        Raises:
            ImageError: the file is not a regular file, can't be read or decoded, or is too large.
        """
        try:
            st = check_regular(file)
        except NotRegularFileError as exc:
            raise ImageError(f"not a regular file: {exc.kind}") from None
        except OSError as exc:
            raise ImageError(f"cannot open file: {exc.strerror or exc}") from None
        if st.st_size > MAX_FILE_BYTES:
            raise ImageError(f"file too large for a thumbnail ({st.st_size} bytes; at most {MAX_FILE_BYTES})")
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        value = self._once(self._by_inode, (kind, key), lambda: self._by_content(file, kind))
        if isinstance(value, BaseException):
            raise value
        assert isinstance(value, Thumb)
        return value

    def _by_content(self, file: str, kind: str) -> Thumb | BaseException:
        try:
            digest = _sha256(file, self.stop)
        except NotRegularFileError as exc:
            return ImageError(f"not a regular file: {exc.kind}")
        except OSError as exc:
            return ImageError(f"cannot read file: {exc.strerror or exc}")
        name = f"{THUMBS}/{digest[:2]}/{digest[:32]}{'' if kind == 'image' else '-h'}.jpg"
        value = self._once(self._by_name, name, lambda: self._make(file, kind, name))
        return value  # type: ignore[no-any-return]

    def _make(self, file: str, kind: str, name: str) -> Thumb | BaseException:
        earlier = self.out.read_existing(name, MAX_THUMB_BYTES)  # never through a link
        if earlier is not None:
            try:
                with Image.open(io.BytesIO(earlier)) as img:
                    width, height = img.size
                with self._lock:
                    self.reused += 1
                return Thumb(name, width, height)
            except (OSError, ValueError, Image.DecompressionBombError):
                pass  # a damaged thumbnail: make it again
        if self.stop.is_set():
            return ImageError("interrupted")
        try:
            image = self._render(file, kind)
        except ImageError as exc:
            return exc
        except MemoryError:
            return ImageError("out of memory while making the thumbnail")
        except Exception as exc:  # a decoder's unexpected failure must not stop the report
            return ImageError(f"cannot make a thumbnail: {type(exc).__name__}: {exc}")
        try:
            with self.out.atomic(name) as fh:  # atomic, never through a link
                image.save(fh, format="JPEG", quality=THUMB_QUALITY, optimize=True)
        except LinkRefused as exc:
            return ImageError(f"thumbnail not written: {exc}")
        except OSError as exc:
            raise OutputError(f"cannot write the thumbnail {self.out_dir / name}: {exc.strerror or exc}") from None
        with self._lock:
            self.made += 1
        return Thumb(name, image.width, image.height)

    def _render(self, file: str, kind: str) -> Image.Image:
        if kind == "heatmap":  # our own PNG: Pillow reads it (with its decompression-bomb guard)
            try:
                with open_regular(file) as fh, Image.open(fh) as img:
                    img.draft("RGB", (self.side, self.side))
                    rgb = img.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise ImageError(f"cannot read the heatmap: {exc}") from None
            rgb.thumbnail((self.side, self.side), Image.Resampling.LANCZOS)
            return rgb
        decoded = decode(file, (self.side, self.side))  # pixels only: no DICOM metadata travels
        width, height = overlay_size(decoded.width, decoded.height, self.side)
        grey = resize_grey(decoded.grey, (height, width))
        return Image.fromarray(np.round(np.clip(grey, 0.0, 1.0) * 255.0).astype(np.uint8), "L")


def _sha256(path: str, stop: threading.Event | None = None) -> str:
    """The SHA-256 of a regular file, read in bounded chunks (at most :data:`MAX_FILE_BYTES`);
    gives up with OSError when ``stop`` is set."""
    digest = hashlib.sha256()
    total = 0
    with open_regular(path) as fh:
        while chunk := fh.read(1 << 20):
            total += len(chunk)
            if total > MAX_FILE_BYTES:
                raise OSError(errno.EFBIG, f"larger than {MAX_FILE_BYTES} bytes")
            if stop is not None and stop.is_set():
                raise OSError(errno.EINTR, "interrupted")
            digest.update(chunk)
    return digest.hexdigest()


def placeholder_png() -> bytes:
    img = Image.new("L", (THUMB_SIDE, THUMB_SIDE), 228)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, THUMB_SIDE - 1, THUMB_SIDE - 1), outline=160, width=4)
    draw.line((40, 40, THUMB_SIDE - 40, THUMB_SIDE - 40), fill=170, width=6)
    draw.line((40, THUMB_SIDE - 40, THUMB_SIDE - 40, 40), fill=170, width=6)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
