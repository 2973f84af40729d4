"""Lung fields from a segmenter's mask: the lung crop and the assessability verdict (numpy only).

One crop function, :func:`crop_to_lungs`, serves training, evaluation and inference; a
classifier's contract asks for it with ``preprocessing["crop"] == "lungs"`` (a classifier whose
contract names no crop sees the whole film, as before). The segmenter itself runs in
:mod:`cxr_batch.engine.lungs`; this module only reads its probability map.

The verdict: a film is *assessable* when the mask shows two lung fields of plausible size, shape
and position (:func:`assess`). The rules' numbers (:class:`LungRules`) were calibrated on frontal
films from every source we hold against CT/MR slices, blank and noise images, photographs and
lateral-like proxies: ``benchmarks/lungs_assessable.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cxr_batch.io.preprocess import Decoded, PreprocessSpec, decode, prepare

#: The crop's margin around the lung fields' bounding box, as a share of the box's side per side
#: (annotators leave dense consolidation out of masks; the crop must not cut it off).
CROP_MARGIN = 0.08


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    p, t = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / total


@dataclass(frozen=True)
class Component:
    """One 8-connected region of a mask, in fractions of the mask's height and width."""

    area: float  # share of the mask's pixels
    cy: float
    cx: float
    y0: float
    x0: float
    y1: float  # exclusive
    x1: float
    pixels: int

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def fill(self) -> float:
        """Share of its bounding box the region covers."""
        return self.area / max(self.height * self.width, 1e-12)


def components(mask: np.ndarray) -> list[Component]:
    """The 8-connected regions of a boolean mask, largest first (run-length union-find, numpy + a
    loop over runs: a 128×128 lung mask has a few hundred runs)."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    d = np.diff(np.pad(m, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)  # exclusive; same row-major order as the starts
    n = len(rows)
    if n == 0:
        return []
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(h + 1))
    s_l, e_l = starts.tolist(), ends.tolist()
    for r in range(1, h):
        i, i_end, j, j_end = int(first[r - 1]), int(first[r]), int(first[r]), int(first[r + 1])
        while i < i_end and j < j_end:
            if s_l[i] <= e_l[j] and s_l[j] <= e_l[i]:  # touching or overlapping, diagonals included
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if e_l[i] < e_l[j]:
                i += 1
            else:
                j += 1
    roots = np.asarray([find(i) for i in range(n)])
    length = (ends - starts).astype(np.float64)
    area = np.bincount(roots, weights=length, minlength=n)
    sx = np.bincount(roots, weights=length * (starts + ends - 1) / 2.0, minlength=n)
    sy = np.bincount(roots, weights=length * rows, minlength=n)
    out = []
    for root in np.nonzero(area)[0]:
        sel = roots == root
        out.append(
            Component(
                area=float(area[root]) / (h * w),
                cy=(float(sy[root]) / float(area[root]) + 0.5) / h,
                cx=(float(sx[root]) / float(area[root]) + 0.5) / w,
                y0=float(rows[sel].min()) / h,
                x0=float(starts[sel].min()) / w,
                y1=float(rows[sel].max() + 1) / h,
                x1=float(ends[sel].max()) / w,
                pixels=int(area[root]),
            )
        )
    out.sort(key=lambda c: -c.area)
    return out


@dataclass(frozen=True)
class LungRules:
    """What counts as two plausible lung fields (fractions of the film's height, width, area)."""

    #: regions smaller than this are specks, not lung fields
    min_region: float = 0.005
    #: each of the two lung fields at least this large
    min_field: float = 0.02
    #: both together at least / at most
    min_total: float = 0.05
    max_total: float = 0.65
    #: the smaller field at least this share of the larger
    min_ratio: float = 0.4
    #: one field's centre left of the middle, the other's right, each at least this far from it
    min_offset: float = 0.03
    #: the fields' vertical extents overlap by at least this share of the shorter one
    min_overlap: float = 0.5
    #: the shorter field at least this share of the taller one's height; centres at most this far
    #: apart vertically
    min_height_ratio: float = 0.6
    max_centre_dy: float = 0.15
    #: each field's bounding box at least this tall for its width, and at least this full
    min_aspect: float = 1.15
    min_fill: float = 0.22
    #: the mean lung probability inside the mask (frontal films: 0.93 and above)
    min_confidence: float = 0.925
    #: pixels the segmenter is unsure of (probability 0.2-0.8), as a share of the mask's area
    max_uncertain: float = 0.3
    #: one region across the midline is split at its thinnest column in the middle band when that
    #: column holds at most this share of the region's thickest column (a thin bridge over the
    #: mediastinum, not one lung's interior)
    max_bridge: float = 0.15


DEFAULT_RULES = LungRules()


@dataclass(frozen=True)
class LungVerdict:
    """The segmenter's reading of one film."""

    assessable: bool
    lung_fraction: float
    #: why not assessable (None when assessable)
    note: str | None
    #: the lung fields' bounding box (y0, x0, y1, x1) in fractions of the film, when two were found
    box: tuple[float, float, float, float] | None
    #: the lung mask at the segmenter's resolution (True = lung)
    mask: np.ndarray


def assess(prob: np.ndarray, threshold: float = 0.5, rules: LungRules = DEFAULT_RULES) -> LungVerdict:
    """The verdict for one film from the segmenter's lung probability map (H, W) in [0, 1]."""
    prob = np.asarray(prob, dtype=np.float32)
    mask = prob >= threshold
    fraction = float(mask.mean())

    def no(note: str, box: tuple[float, float, float, float] | None = None) -> LungVerdict:
        return LungVerdict(False, fraction, note, box, mask)

    regions = [c for c in components(mask) if c.area >= rules.min_region]
    if not regions:
        return no("no lung fields found")
    if len(regions) == 1 or (regions[0].x0 < 0.4 and regions[0].x1 > 0.6 and regions[1].area < 0.2 * regions[0].area):
        split = _split_at_bridge(mask, rules.max_bridge)
        if split is not None:
            regions = [c for c in components(split) if c.area >= rules.min_region]
    if len(regions) == 1:
        return no("one lung field")
    a, b = regions[0], regions[1]
    left, right = (a, b) if a.cx <= b.cx else (b, a)
    box = (min(a.y0, b.y0), min(a.x0, b.x0), max(a.y1, b.y1), max(a.x1, b.x1))
    total = a.area + b.area
    if total < rules.min_total or b.area < rules.min_field:
        return no("lung fields too small", box)
    if total > rules.max_total:
        return no("lung fields too large", box)
    if b.area < rules.min_ratio * a.area:
        return no("lung fields of very unequal size", box)
    overlap = min(a.y1, b.y1) - max(a.y0, b.y0)
    if (
        left.cx > 0.5 - rules.min_offset
        or right.cx < 0.5 + rules.min_offset
        or overlap < rules.min_overlap * min(a.height, b.height)
    ):
        return no("lung fields not side by side", box)
    if any(c.height < rules.min_aspect * c.width or c.fill < rules.min_fill for c in (a, b)):
        return no("lung fields of implausible shape", box)
    uncertain = float(((prob > 0.2) & (prob < 0.8)).sum()) / max(int(mask.sum()), 1)
    if float(prob[mask].mean()) < rules.min_confidence or uncertain > rules.max_uncertain:
        return no("lung fields uncertain", box)
    return LungVerdict(True, fraction, None, box, mask)


def _split_at_bridge(mask: np.ndarray, max_bridge: float) -> np.ndarray | None:
    """The mask with its thinnest column in the middle band (35-65% of the width) cleared, when that
    column is a thin bridge (at most ``max_bridge`` of the thickest column); None otherwise."""
    w = mask.shape[1]
    cols = mask.sum(axis=0)
    lo, hi = int(0.35 * w), int(0.65 * w) + 1
    thickest = int(cols.max())
    if thickest == 0:
        return None
    at = lo + int(np.argmin(cols[lo:hi]))
    if cols[at] > max_bridge * thickest:
        return None
    out = mask.copy()
    out[:, max(at - 1, 0) : at + 2] = False
    return out


def crop_box(
    box: tuple[float, float, float, float], height: int, width: int, margin: float = CROP_MARGIN
) -> tuple[int, int, int]:
    """The square crop (top, left, side) in pixels of a ``height`` × ``width`` film around the lung
    fields' box (fractions), widened by ``margin`` of its size on every side.

    The square is moved to lie inside the film where it fits; a side larger than the film's
    narrower dimension is kept and the part outside is padded (see :func:`crop_square`).
    """
    y0, x0, y1, x1 = box
    bh, bw = (y1 - y0) * height, (x1 - x0) * width
    side = max(bh, bw) * (1 + 2 * margin)
    side_px = max(1, round(side))
    cy, cx = (y0 + y1) / 2 * height, (x0 + x1) / 2 * width
    top, left = round(cy - side_px / 2), round(cx - side_px / 2)
    top = min(max(top, 0), height - side_px) if side_px <= height else (height - side_px) // 2
    left = min(max(left, 0), width - side_px) if side_px <= width else (width - side_px) // 2
    return top, left, side_px


def crop_square(grey: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    """``grey[top:top+side, left:left+side]``, padded with black (0) where it leaves the film."""
    h, w = grey.shape
    if top >= 0 and left >= 0 and top + side <= h and left + side <= w:
        return np.ascontiguousarray(grey[top : top + side, left : left + side])
    out = np.zeros((side, side), dtype=grey.dtype)
    sy0, sx0 = max(top, 0), max(left, 0)
    sy1, sx1 = min(top + side, h), min(left + side, w)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = grey[sy0:sy1, sx0:sx1]
    return out


def crop_to_lungs(grey: np.ndarray, verdict: LungVerdict | None, margin: float = CROP_MARGIN) -> np.ndarray:
    """The lung crop of a decoded film (grey, any size): the square around both lung fields plus a
    margin; the whole film when the segmenter found no two lung fields. The caller resizes it to
    the classifier's input (:func:`cxr_batch.io.preprocess.prepare`)."""
    if verdict is None or verdict.box is None:
        return grey
    top, left, side = crop_box(verdict.box, grey.shape[0], grey.shape[1], margin)
    return crop_square(grey, top, left, side)


def lung_view(
    grey: np.ndarray, read: Callable[[np.ndarray], LungVerdict] | None, crop: str | None
) -> tuple[np.ndarray, LungVerdict | None]:
    """The film the classifier sees, and the segmenter's verdict: the lung crop when ``crop`` is
    ``"lungs"`` (the classifier's contract), the whole film otherwise. ``read`` is the segmenter
    (:meth:`cxr_batch.engine.lungs.LungSegmenter.read`); None skips the lung stage.

    Training caches ``resize_grey(lung_view(...)[0], size)``, inference calls :func:`prepare` on
    it: the same pixels either way.
    """
    verdict = read(grey) if read is not None else None
    if crop == "lungs":
        return crop_to_lungs(grey, verdict), verdict
    return grey, verdict


def preprocess_file_lungs(
    path: str | os.PathLike[str],
    spec: PreprocessSpec,
    read: Callable[[np.ndarray], LungVerdict] | None,
    crop: str | None,
) -> tuple[np.ndarray, Decoded, LungVerdict | None]:
    """:func:`cxr_batch.io.preprocess.preprocess_file` with the lung stage: decode, read the lung
    fields, crop when asked, prepare. Without ``read`` and ``crop`` it is preprocess_file exactly."""
    decoded = decode(path, spec.input_size)
    grey, verdict = lung_view(decoded.grey, read, crop)
    return prepare(grey, spec), decoded, verdict


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels (a lung pixel with a background 4-neighbour)."""
    m = np.asarray(mask, dtype=bool)
    p = np.pad(m, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    edge: np.ndarray = m & ~inner
    return edge


__all__ = [
    "CROP_MARGIN",
    "DEFAULT_RULES",
    "Component",
    "LungRules",
    "LungVerdict",
    "assess",
    "components",
    "crop_box",
    "crop_square",
    "crop_to_lungs",
    "dice",
    "lung_view",
    "outline",
    "preprocess_file_lungs",
]
