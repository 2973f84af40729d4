"""Heatmaps: the class activation map of the predicted class, overlaid on the input X-ray.

numpy and Pillow only. The map comes from the model's ``cam`` output (N×C×h×w, see
:mod:`cxr_batch.training.cam`), computed by onnxruntime in the same call that gives the logits. Here it
is min-max normalised to [0, 1], upsampled (bilinear) to the image with the original image's
aspect (the model sees the image squashed to its square input, so stretching the map back puts
each cell over the pixels it saw), coloured with a small built-in colormap, and blended over
the grey image: the hotter a pixel, the more colour.

Each heatmap keeps the report path of its image under the heatmap folder with ``.png`` added
(``covid/a.jpg`` → ``DIR/covid/a.jpg.png``), so ``a.jpg`` and ``a.png`` never collide.

Writing is safe against what may already be in the folder and against faults:

- the folder is created, locked (one run at a time, :mod:`cxr_batch.report.lock`) and checked
  writable (a probe file is written and removed) before the run: an unwritable folder is an
  :class:`OutputError`, not a run of warnings;
- every heatmap is written through the one output writer (:mod:`cxr_batch.io.safe_write`):
  atomically (a full disk or a kill leaves the earlier heatmap, or none, never a truncated PNG
  under the final name; a kill's temporary files are removed by the next run, which holds the
  folder's lock), and never through a symbolic link (a linked sub-folder is refused for the
  heatmaps under it; a link named like a heatmap is replaced, its target untouched). Nothing is
  written outside the folder.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from rich.console import Console

from cxr_batch.contract import CAM_ROLE
from cxr_batch.errors import ImageError, OutputError
from cxr_batch.io.preprocess import decode, resize_grey
from cxr_batch.io.safe_write import LinkRefused, OutputDir
from cxr_batch.report.lock import lock_or_refuse
from cxr_batch.text import markup

if TYPE_CHECKING:
    from cxr_batch.engine.types import Result

#: Heatmaps keep the image's aspect; the longer side is at most this many pixels (never upscaled).
MAX_SIDE = 1024
#: Colour opacity at the hottest pixel, and at the coldest (a faint tint shows the map's extent).
ALPHA_MAX = 0.6
ALPHA_MIN = 0.1
#: The colormap's control points (value, R, G, B): indigo → blue → cyan → green → yellow → red.
COLORMAP = (
    (0.00, 0.19, 0.07, 0.23),
    (0.15, 0.22, 0.35, 0.90),
    (0.35, 0.10, 0.75, 0.85),
    (0.50, 0.30, 0.90, 0.40),
    (0.65, 0.85, 0.90, 0.20),
    (0.80, 0.98, 0.55, 0.10),
    (0.92, 0.90, 0.20, 0.05),
    (1.00, 0.65, 0.03, 0.02),
)
#: A ``..`` in a report path becomes this folder name, so every heatmap stays under the folder.
PARENT_DIR_NAME = "__parent__"


def normalise(cam: np.ndarray) -> np.ndarray:
    """Min-max scale one map (h×w) to [0, 1] in float32; a flat map becomes all zeros."""
    m = np.asarray(cam, dtype=np.float64)
    lo, hi = float(m.min()), float(m.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(m.shape, dtype=np.float32)
    return ((m - lo) / (hi - lo)).astype(np.float32)


def class_map(cam: np.ndarray, index: int) -> np.ndarray:
    """The normalised map of class ``index`` from one image's ``cam`` output (C×h×w)."""
    cam = np.asarray(cam)
    if cam.ndim != 3:
        raise ValueError(f"a 'cam' output row must be C×h×w, not {list(cam.shape)}")
    return normalise(cam[index])


def upsample(m: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear upsampling of a [0, 1] map to ``height``×``width`` (Pillow, pixel-centre aligned)."""
    img = Image.fromarray(np.ascontiguousarray(m, dtype=np.float32))
    out = np.asarray(img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 (shape ``values.shape + (3,)``) with :data:`COLORMAP`."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    stops = np.asarray(COLORMAP, dtype=np.float32)
    channels = [np.interp(v, stops[:, 0], stops[:, c]) for c in (1, 2, 3)]
    rgb = np.stack(channels, axis=-1)
    return np.round(rgb * 255.0).astype(np.uint8)


def blend(grey: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Colour the grey image (H×W in [0, 1]) by ``heat`` (H×W in [0, 1]); returns RGB uint8."""
    base = np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=-1) * 255.0
    alpha = (ALPHA_MIN + (ALPHA_MAX - ALPHA_MIN) * heat)[..., None]
    out = (1.0 - alpha) * base + alpha * colormap(heat).astype(np.float32)
    return np.round(np.clip(out, 0.0, 255.0)).astype(np.uint8)


def overlay_size(width: int, height: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(width, height) with the same aspect and the longer side at most ``max_side``."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


#: The lung outline's colour (the lung stage's mask, :mod:`cxr_batch.engine.lungs`).
LUNG_OUTLINE = (0, 255, 255)


def draw_lung_outline(rgb: np.ndarray, lung_mask: np.ndarray) -> np.ndarray:
    """Draw the boundary of ``lung_mask`` (any size, True = lung) on ``rgb`` (H×W×3), in place."""
    from cxr_batch.io.lungs import outline

    h, w = rgb.shape[:2]
    mask = Image.fromarray(np.asarray(lung_mask, dtype=np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
    edge = outline(np.asarray(mask) >= 128)
    rgb[edge] = LUNG_OUTLINE
    return rgb


def render(
    path: str | os.PathLike[str], heat: np.ndarray, max_side: int = MAX_SIDE, lung_mask: np.ndarray | None = None
) -> Image.Image:
    """Decode ``path`` (the same decoder classify uses) and overlay the normalised map ``heat`` (h×w),
    and the outline of the lung fields when ``lung_mask`` is given.

    Raises:
        ImageError: the file can no longer be decoded.
    """
    decoded = decode(path, (max_side // 2, max_side // 2))  # JPEGs may decode smaller, >= max_side
    width, height = overlay_size(decoded.width, decoded.height, max_side)
    grey = resize_grey(decoded.grey, (height, width))
    rgb = blend(grey, upsample(heat, width, height))
    if lung_mask is not None:
        draw_lung_outline(rgb, lung_mask)
    return Image.fromarray(rgb, "RGB")


def heatmap_relpath(report_path: str) -> Path:
    """Where an image's heatmap goes under the heatmap folder: its report path with ``.png`` added.

    An absolute report path (``--absolute-paths``) loses its root; ``..`` becomes
    :data:`PARENT_DIR_NAME` and ``.`` is dropped, so nothing is written outside the folder.
    """
    pure = PurePath(report_path)
    parts = pure.parts[1:] if pure.anchor else pure.parts
    safe = [PARENT_DIR_NAME if p == ".." else p for p in parts if p not in ("", ".")]
    if not safe:
        raise ValueError(f"no file name in {report_path!r}")
    safe[-1] += ".png"
    return Path(*safe)


class HeatmapWriter:
    """Write one heatmap PNG per classified result (results need the ``cam`` output).

    A heatmap that can't be made (the file changed since it was classified, a write error, a
    linked sub-folder) is recorded in :attr:`failures`; the classification row stands.

    Args:
        folder: the heatmap folder (created, locked and checked writable here).
        labels: the model's labels, in model order.
        workers: rendering threads (decode, resize, PNG encode); default one per core, at most 8.
        max_side: the longer side of a heatmap at most, in pixels.

    Raises:
        OutputError: the folder is not a folder, can't be created or written, or another run
            is writing heatmaps into it.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        labels: Sequence[str],
        workers: int | None = None,
        max_side: int = MAX_SIDE,
    ) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"--heatmaps {self.folder}: exists and is not a folder")
        try:
            self._out = OutputDir(self.folder)  # the folder itself may be a link; what is inside may not
        except OSError as exc:
            raise OutputError(
                f"--heatmaps {self.folder}: cannot create or open the folder: {exc.strerror or exc}"
            ) from None
        try:
            lock_or_refuse(self._out.fd, f"the heatmap folder {self.folder}")
            self._check_writable()
            self._out.remove_stale_temporaries()  # a killed run's (this run holds the lock)
        except BaseException:
            self._out.close()
            raise
        self.labels = tuple(labels)
        self.max_side = max_side
        self.written = 0
        self.failures: list[tuple[str, str]] = []
        self._claimed: dict[Path, str] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=workers or max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="cxr-heatmap"
        )

    def _check_writable(self) -> None:
        try:
            self._out.check_writable()
        except OSError as exc:
            raise OutputError(
                f"--heatmaps {self.folder}: the folder is not writable ({exc.strerror or exc}); nothing was classified"
            ) from None

    def target(self, report_path: str) -> Path:
        """The heatmap file for a report path."""
        return self.folder / heatmap_relpath(report_path)

    def missing(self, report_paths: Iterable[str]) -> list[str]:
        """The report paths whose heatmap is missing, empty (0 bytes) or not a plain file
        (``resume`` makes them again; a kill can leave none, never a partial one)."""
        out = []
        for p in report_paths:
            try:
                st = os.lstat(self.target(p))
            except OSError:
                out.append(p)
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                out.append(p)
        return out

    def write(self, results: Sequence[Result]) -> None:
        """Render the heatmaps of the ok results of one batch (in parallel); returns when written."""
        jobs = []
        for r in results:
            if not r.ok or r.label is None:
                continue
            cam = r.outputs.get(CAM_ROLE)
            if cam is None:
                self.failures.append((r.path, f"the model returned no '{CAM_ROLE}' output"))
                continue
            try:
                rel = heatmap_relpath(r.path)
            except ValueError as exc:
                self.failures.append((r.path, str(exc)))
                continue
            target = self.folder / rel
            first = self._claimed.setdefault(target, r.path)
            if first != r.path:
                self.failures.append((r.path, f"its heatmap name {target} is taken by {first!r}"))
                continue
            heat = class_map(cam, self.labels.index(r.label))
            jobs.append((r.path, self._pool.submit(self._render_one, r.file, heat, rel, r.lung_mask)))
        for path, job in jobs:
            error = job.result()
            if error is None:
                self.written += 1
            else:
                self.failures.append((path, error))

    def _render_one(self, file: str, heat: np.ndarray, rel: Path, lung_mask: np.ndarray | None = None) -> str | None:
        """Runs in a rendering thread; returns the error message, or None when written."""
        try:
            image = render(file, heat, self.max_side, lung_mask)
        except ImageError as exc:
            return f"cannot decode the image again: {exc}"
        except MemoryError:
            return "out of memory while rendering the heatmap"
        try:
            with self._out.atomic(rel) as fh:
                image.save(fh, format="PNG")
        except LinkRefused as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot write {self.folder / rel}: {exc.strerror or exc}"
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._out.close()  # releases the folder's lock

    def report(self, console: Console, show: int = 10, quiet: bool = False) -> None:
        """One line for the heatmaps written (unless ``quiet``), then a warning per heatmap that
        failed (the first ``show``; warnings are printed even when quiet)."""
        if not quiet:
            console.print(
                f"heatmaps: {self.written} written under {markup(self.folder)}", highlight=False, soft_wrap=True
            )
        for path, error in self.failures[:show]:
            console.print(
                f"[yellow]warning:[/] no heatmap for {markup(path)}: {markup(error)}", highlight=False, soft_wrap=True
            )
        if len(self.failures) > show:
            console.print(f"[yellow]warning:[/] {len(self.failures) - show} more heatmaps failed", highlight=False)
