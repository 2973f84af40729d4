"""Decoding and preprocessing: numpy and Pillow only.

This is the one preprocessing path. ``classify``, ``evaluate`` and the evaluation at the end
of ``train`` all call :func:`preprocess_file` (or :func:`decode` then :func:`prepare`), and
training caches the output of :func:`resize_grey`, the first half of :func:`prepare`, so the
numbers reported at training time are the numbers users get.

The recipe: decode → grey in [0, 1] (scaled by the file's real bit depth) → resize to the
model's input size (Pillow, on float32 data) → 3 identical channels → ``(x - mean) / std``.

Decoding at the scale the model needs: given the model's input size (``target``), a decoder
never hands on more than about :data:`REDUCED_SCALE` times the target's pixels per side. JPEG
(files, and JPEG-baseline DICOM pixel data) decodes at 1/2, 1/4 or 1/8 scale with libjpeg's
``draft``; JPEG 2000 DICOM pixel data at a lower resolution level; everything else is first
reduced by an integer factor with a box filter (:func:`reduction_factor`, ``Image.reduce``) before
the float conversion, DICOM windowing and the final resize. The reduced image stays at least
twice the target on both sides, so the final antialiased resize still averages every pixel:
``tests/test_decode_scale.py`` runs the shipped model on both paths (``target=None`` is the
full-size path) and checks the labels are identical and the probabilities within a measured
tolerance.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxr_batch.errors import ImageError, ModelError
from cxr_batch.io.safe_open import NotRegularFileError, open_regular
from cxr_batch.io.warning_capture import capture

#: File suffixes the directory walk picks up (lower case). DICOM is also sniffed by content.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})

#: Resampling filters a model's contract may name.
RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}

#: ITU-R BT.601 luma weights, the same ones Pillow's ``convert("L")`` uses.
LUMA = (0.299, 0.587, 0.114)

#: Pillow applies ``reduce()`` (a fast box filter by an integer factor) first when the image is
#: at least this many times larger than the target, then the named filter for the rest.
REDUCING_GAP = 3.0

#: Reduced-scale decoding keeps at least this many times the model's input size on each side.
REDUCED_SCALE = 2

#: Frames counted for the multi-frame note; beyond this it says "1 of more than N".
MAX_FRAMES_COUNTED = 100
#: Formats whose frame count is in the header (reading it costs nothing).
_CHEAP_FRAME_COUNT = frozenset({"PNG", "MPO", "WEBP", "FLI"})

#: The EXIF tag that says how the stored pixels must be rotated or flipped for display.
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class PreprocessSpec:
    """What :func:`prepare` needs; built from a model's contract (``ModelMeta.spec``)."""

    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "bilinear"
    #: ``"lungs"``: the classifier was trained on lung crops (:func:`cxr_batch.io.lungs.crop_to_lungs`),
    #: so its input needs the lung segmenter (:func:`cxr_batch.engine.lungs.preprocess_for`)
    crop: str | None = None

    def __post_init__(self) -> None:
        if self.resize not in RESAMPLE:
            raise ValueError(f"unknown resize method {self.resize!r}; expected one of {sorted(RESAMPLE)}")
        if self.crop not in (None, "lungs"):
            raise ValueError(f"unknown crop {self.crop!r}; expected 'lungs' or none")


@dataclass
class Decoded:
    """A decoded image: grey float32 pixels in [0, 1] and what was learnt on the way."""

    grey: np.ndarray
    width: int
    height: int
    notes: list[str] = field(default_factory=list)
    #: Extra report columns a reader fills in (e.g. DICOM UIDs). Never patient data.
    fields: dict[str, str] = field(default_factory=dict)
    #: Set by readers that know the input is not a radiograph (e.g. DICOM modality CT).
    not_radiograph: str | None = None


Reader = Callable[[Path, "tuple[int, int] | None"], Decoded]

_readers: list[tuple[str, Callable[[Path, bytes], bool], Reader]] = []


def register_reader(name: str, sniff: Callable[[Path, bytes], bool], read: Reader) -> None:
    """Plug in a decoder. ``sniff(path, first_132_bytes)`` says whether it handles the file.

    Readers registered later are asked first; Pillow is the fallback for everything else.
    """
    _readers.insert(0, (name, sniff, read))


def is_dicom(path: Path, head: bytes) -> bool:
    """DICOM by extension or by the ``DICM`` marker at offset 128."""
    return path.suffix.lower() in DICOM_SUFFIXES or head[128:132] == b"DICM"


def _read_dicom(path: Path, target: tuple[int, int] | None) -> Decoded:
    from cxr_batch.io.dicom import read_dicom  # the DICOM reader imports pydicom lazily

    return read_dicom(path, target)


register_reader("dicom", is_dicom, _read_dicom)


def decode(path: str | os.PathLike[str], target: tuple[int, int] | None = None) -> Decoded:
    """Decode one file to grey float32 pixels in [0, 1].

    Only regular files are opened (see :mod:`cxr_batch.io.safe_open`): a FIFO, a device or a
    socket is refused at once, so an input can never block the run. Library warnings raised
    while decoding become the file's notes (:mod:`cxr_batch.io.warning_capture`), never stderr.

    Args:
        path: the image file.
        target: the model's (H, W); lets JPEG decoding downscale early with ``draft()``.

    Raises:
        ImageError: the file cannot be read or decoded; the message says why.
    """
    p = Path(path)
    try:
        fh = open_regular(p)
    except NotRegularFileError as exc:
        if exc.kind == "directory":
            raise ImageError("is a directory, not an image file") from None
        raise ImageError(f"not a regular file: {exc.kind}") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file") from None
    except OSError as exc:
        raise ImageError(f"cannot open file: {exc.strerror or exc}") from None
    with fh, capture() as caught:
        try:
            head = fh.read(132)
        except OSError as exc:
            raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
        if not head:
            raise ImageError("empty file (0 bytes)")
        decoded: Decoded | None = None
        for _name, sniff, read in _readers:
            if sniff(p, head):
                decoded = read(p, target)
                break
        if decoded is None:
            fh.seek(0)
            decoded = _decode_pillow(fh, target)
    decoded.notes.extend(n for n in caught if n not in decoded.notes)
    return decoded


def _decode_pillow(path: Path | BinaryIO, target: tuple[int, int] | None) -> Decoded:
    try:
        with Image.open(path) as img:
            # Pillow raises above twice MAX_IMAGE_PIXELS and only warns between 1x and 2x; refuse
            # both, so a huge image never eats the machine's memory. (Pillow's warning becomes a
            # note through decode()'s capture(), then this error replaces it.)
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and img.width * img.height > limit:
                raise ImageError(
                    f"image too large (decompression-bomb guard): {img.width}x{img.height} = "
                    f"{img.width * img.height} pixels, more than {limit}"
                )
            return _from_pil(img, target)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large (decompression-bomb guard): {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("not a recognised image file (PNG, JPEG, BMP, TIFF or DICOM)") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower():
            raise ImageError(f"truncated or corrupt image: {msg}") from None
        raise ImageError(f"cannot decode image: {msg}") from None


def _from_pil(img: Image.Image, target: tuple[int, int] | None) -> Decoded:
    notes: list[str] = []
    n_frames = count_frames(img)
    if n_frames > 1:
        img.seek(0)
        many = f"more than {MAX_FRAMES_COUNTED}" if n_frames > MAX_FRAMES_COUNTED else str(n_frames)
        notes.append(f"multi-frame file: used frame 1 of {many}")
    # The file's own size, as displayed: draft() below may decode a JPEG at a reduced scale,
    # and EXIF orientations 5-8 swap the axes.
    width, height = img.size
    if img.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):
        width, height = height, width
    if img.format == "JPEG" and target is not None:
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while staying at least twice the target.
        side = REDUCED_SCALE * max(target)
        img.draft(img.mode, (side, side))
    img.load()
    img = ImageOps.exif_transpose(img) or img
    factor = reduction_factor(img.size, target)
    if factor > 1 and img.mode in _REDUCIBLE_MODES:
        img = img.reduce(factor)  # a box filter on the stored values, before the float conversion
    grey = to_grey(img)
    return Decoded(grey=grey, width=width, height=height, notes=notes)


#: Pillow modes ``Image.reduce`` handles and :func:`to_grey` converts linearly (not palette, 1-bit).
_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "I", "F"})


def reduction_factor(size: tuple[int, int], target: tuple[int, int] | None) -> int:
    """The integer factor an image of ``size`` = (W, H) may be shrunk by before the final resize.

    The largest factor that keeps the image at least :data:`REDUCED_SCALE` times the target
    (H, W) on both sides; 1 (no reduction) without a target or for images already small.
    """
    if target is None:
        return 1
    width, height = size
    th, tw = target
    return max(1, min(height // (REDUCED_SCALE * max(th, 1)), width // (REDUCED_SCALE * max(tw, 1))))


def count_frames(img: Image.Image, limit: int | None = None) -> int:
    """The number of frames, counted no further than ``limit`` + 1 (default :data:`MAX_FRAMES_COUNTED`).

    Pillow's ``n_frames`` walks every frame of a TIFF or GIF (a 4 MB TIFF can hold 40,000 pages,
    and walking them takes tens of seconds); the note only needs "1 of N" for small N.
    """
    limit = MAX_FRAMES_COUNTED if limit is None else limit
    if not getattr(img, "is_animated", False):
        return 1
    if img.format in _CHEAP_FRAME_COUNT:
        return int(getattr(img, "n_frames", 1))
    count = 1
    try:
        while count <= limit:
            img.seek(count)
            count += 1
    except EOFError:
        pass
    finally:
        img.seek(0)
    return count


def _bit_depth_max(img: Image.Image, arr: np.ndarray) -> float:
    """The largest value the file's real bit depth allows (never clip 16-bit data to 255)."""
    mode = img.mode
    if mode.startswith("I;16"):
        return 65535.0
    if mode == "I":
        bits = None
        tags = getattr(img, "tag_v2", None)
        if tags is not None:
            bps = tags.get(258)
            if bps:
                bits = int(bps[0] if isinstance(bps, tuple) else bps)
        if bits is None:
            bits = 16 if (arr.size == 0 or (arr.min() >= 0 and arr.max() <= 65535)) else 32
        return float(2**bits - 1)
    return 255.0


def to_grey(img: Image.Image) -> np.ndarray:
    """Pillow image → grey float32 array in [0, 1].

    Colour uses BT.601 luma; alpha is composited over black; palette, CMYK and YCbCr go
    through RGB; 16-bit and 32-bit integer data are scaled by their bit depth.
    """
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
        mode = "RGB"
    elif mode == "1":
        img = img.convert("L")
        mode = "L"
    elif mode in ("RGBX", "RGBa"):
        img = img.convert("RGBA")
        mode = "RGBA"
    elif mode == "La":
        img = img.convert("LA")
        mode = "LA"

    if mode in ("L", "LA", "RGB", "RGBA"):
        # Same values as np.asarray(img, dtype=np.float32) / 255, about 9x faster: asking numpy for
        # float32 straight from a Pillow image takes a slow element-by-element path.
        arr = np.divide(np.asarray(img), np.float32(255.0), dtype=np.float32)
        if mode == "L":
            return np.ascontiguousarray(arr)
        if mode == "LA":
            return np.ascontiguousarray(arr[..., 0] * arr[..., 1])
        grey = arr[..., 0] * LUMA[0] + arr[..., 1] * LUMA[1] + arr[..., 2] * LUMA[2]
        if mode == "RGBA":
            grey = grey * arr[..., 3]
        return np.ascontiguousarray(grey, dtype=np.float32)
    if mode.startswith("I"):
        raw = np.asarray(img)
        top = _bit_depth_max(img, raw)
        if top <= 2**24:
            # Up to 24 bits every value (or one clipped anyway) and the divisor are exact in
            # float32, and a float32 division is correctly rounded, so this equals float64
            # division then rounding to float32, bit for bit, with one float32 array instead of
            # three float64 ones (a 16-bit 9400x9400 PNG peaked at 2.3 GB with those).
            arr = np.asarray(np.divide(raw, np.float32(top), dtype=np.float32))
            del raw
        else:
            arr = (raw.astype(np.float64) / top).astype(np.float32)
        np.clip(arr, 0.0, 1.0, out=arr)
        return arr
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        return scale_to_unit(arr)
    raise ImageError(f"unsupported pixel mode {mode!r}")


def scale_to_unit(arr: np.ndarray) -> np.ndarray:
    """Floating data: keep it when it is already in [0, 1], else min-max scale it."""
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ImageError("image contains NaN or infinite pixel values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return arr
    if hi <= lo:
        return np.zeros_like(arr)
    return (arr - lo) / (hi - lo)


def resize_grey(grey: np.ndarray, size: tuple[int, int], method: str = "bilinear") -> np.ndarray:
    """Resize a grey float32 image to ``size`` = (H, W) with Pillow's antialiased filters."""
    h, w = size
    if grey.shape == (h, w):
        return np.ascontiguousarray(grey, dtype=np.float32)
    img = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32))
    out = img.resize((w, h), RESAMPLE[method], reducing_gap=REDUCING_GAP)
    return np.asarray(out, dtype=np.float32)


def normalise(resized: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Grey (H, W) or (N, H, W) → 3 identical channels, ``(x - mean) / std`` per channel."""
    mean_a = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    if resized.dtype == np.float32 and resized.ndim in (2, 3):
        # One channel at a time into a preallocated output: the same float32 operations as the
        # broadcast below, bit for bit, but about 20x faster (numpy broadcasts the (3, 1, 1)
        # operands slowly), which is a quarter of the per-image preprocessing time.
        out = np.empty((*resized.shape[:-2], 3, *resized.shape[-2:]), dtype=np.float32)
        for c in range(3):
            channel = out[..., c, :, :]
            np.subtract(resized, mean_a[c, 0, 0], out=channel)
            np.divide(channel, std_a[c, 0, 0], out=channel)
        return out
    x = resized[..., None, :, :] if resized.ndim == 3 else resized[None]
    return np.ascontiguousarray((x - mean_a) / std_a, dtype=np.float32)


def prepare(grey: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Grey [0, 1] image → model input (3, H, W) float32."""
    return normalise(resize_grey(grey, spec.input_size, spec.resize), spec.mean, spec.std)


def preprocess_file(path: str | os.PathLike[str], spec: PreprocessSpec) -> tuple[np.ndarray, Decoded]:
    """Decode and prepare one file: the exact path ``classify`` takes for every image of a model
    trained on whole films.

    Raises:
        ImageError: the file can't be decoded.
        ModelError: ``spec`` asks for the lung crop, which needs the segmenter
            (:func:`cxr_batch.engine.lungs.preprocess_for` runs it).
    """
    if spec.crop is not None:
        raise ModelError("this model was trained on lung crops: its input needs the lung segmenter")
    decoded = decode(path, spec.input_size)
    return prepare(decoded.grey, spec), decoded
