"""``report --html``: building the HTML report folder: its configuration (:class:`HtmlConfig`), the
checks on the output folder (its marker, a killed build, planted links), where a report's paths may
be read (:class:`_Roots`), the thumbnails made in threads, and the pages written, all through the
folder's :class:`~cxr_batch.io.safe_write.OutputDir` (atomic, never through a link).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from cxr_batch import __version__
from cxr_batch.errors import ImageError, InputError, OutputError
from cxr_batch.io.safe_write import LinkRefused, OutputDir, is_temporary_name
from cxr_batch.report.heatmap import heatmap_relpath
from cxr_batch.report.html import model
from cxr_batch.report.html.data import (
    PROVENANCE_MAX_BYTES,
    Row,
    RunReport,
    Thumb,
    apply_labels,
    read_metrics,
    read_run,
    read_true_labels,
)
from cxr_batch.report.html.render import render, stylesheet
from cxr_batch.report.html.thumbs import PLACEHOLDER, THUMB_SIDE, THUMBS, Thumbnailer, placeholder_png
from cxr_batch.report.lock import lock_or_refuse
from cxr_batch.report.progress import progress_bar

#: Cards per gallery page.
PER_PAGE = 200
#: Below this confidence an ok row is in the low-confidence gallery.
LOW_CONFIDENCE = 0.6
#: The file that marks a folder as written by this module (and lists the pages to replace).
MARKER = ".cxr-batch-report.json"


@dataclass(frozen=True)
class HtmlConfig:
    """What ``report --html`` reads and where it writes."""

    reports: tuple[str, ...]
    out_dir: str
    #: folders the report's relative paths are resolved against, in order (classify's inputs;
    #: evaluate's data folder). Empty: the metrics file's data folder, else the current folder.
    images: tuple[str, ...] = ()
    heatmaps: str | None = None
    metrics: str | None = None
    #: a ``path,label`` CSV of true labels (paths as the report writes them)
    labels: str | None = None
    low_confidence: float = LOW_CONFIDENCE
    per_page: int = PER_PAGE
    thumb_side: int = THUMB_SIDE
    workers: int | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        if not self.reports:
            raise ValueError("give at least one report")
        if not 0.0 <= self.low_confidence <= 1.0:
            raise ValueError("low_confidence must be in [0, 1]")
        if self.per_page < 1 or self.thumb_side < 16:
            raise ValueError("per_page must be at least 1 and thumb_side at least 16")


@dataclass
class HtmlResult:
    """What was written."""

    index: Path
    pages: list[str]
    rows: int
    thumbnails_made: int
    thumbnails_reused: int
    unavailable: int
    heatmaps: int


def _is_file_not_link(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _stale_build(p: Path) -> bool:
    """A folder a killed report build left before writing its marker (a version that wrote the
    marker last): the placeholder thumbnail, and nothing but the names a report writes."""
    if not _is_file_not_link(p / PLACEHOLDER):
        return False
    for entry in os.listdir(p):
        if entry in (THUMBS, "style.css") or entry.endswith(".html") or is_temporary_name(entry):
            continue
        return False
    return True


def check_html_output(out_dir: str) -> None:
    """Refuse a folder that is a file, or holds files that an earlier report did not write.

    A folder an earlier report wrote (its marker is there, complete or not: a killed build) or a
    killed build of an older version left (:func:`_stale_build`) is reused and rebuilt.

    Raises:
        OutputError: see above.
    """
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise OutputError(f"--html {out_dir} exists and is not a folder")
    if p.is_dir() and not _is_file_not_link(p / MARKER) and any(p.iterdir()) and not _stale_build(p):
        raise OutputError(
            f"--html {out_dir} is a folder with other files in it; give a new or empty folder "
            "(or one an earlier 'cxr-batch report' wrote, which is then updated)"
        )


def _marker(pages: Sequence[str], complete: bool) -> str:
    doc = {"written_by": f"cxr-batch {__version__}", "complete": complete, "pages": list(pages)}
    return json.dumps(doc, indent=1) + "\n"


def _prepare_out(out_dir: Path) -> OutputDir:
    """Open (and lock) the folder, mark it as a report folder whose build is under way, remove the
    pages of an earlier report and a killed build's temporary files, and write the placeholder.
    Everything is written through :class:`OutputDir`: atomically and never through a link."""
    check_html_output(str(out_dir))
    try:
        out = OutputDir(out_dir)
    except OSError as exc:
        raise OutputError(f"cannot write the report folder {out_dir}: {exc.strerror or exc}") from None
    try:
        lock_or_refuse(out.fd, f"the report folder {out_dir}")
        old: Any = []
        earlier = out.read_existing(MARKER, PROVENANCE_MAX_BYTES)
        if earlier is not None:  # an earlier report here: remove its pages (thumbnails stay, as a cache)
            try:
                old = json.loads(earlier.decode("utf-8")).get("pages", [])
            except (ValueError, AttributeError):
                old = []
        pages = (
            [n for n in old if isinstance(n, str) and "/" not in n and n.endswith(".html")]
            if isinstance(old, list)
            else []
        )
        # First the marker, "complete": false: a build killed from here on leaves a folder the
        # next run recognises and rebuilds, never one it refuses.
        out.write_text(MARKER, _marker(pages, complete=False))
        for name in pages:
            with contextlib.suppress(LinkRefused):
                out.unlink(name)
        out.remove_stale_temporaries()
        out.makedirs(THUMBS)
        out.write_bytes(PLACEHOLDER, placeholder_png())
    except LinkRefused as exc:
        out.close()
        raise OutputError(f"cannot write the report folder {out_dir}: {exc}") from None
    except OSError as exc:
        out.close()
        raise OutputError(f"cannot write the report folder {out_dir}: {exc.strerror or exc}") from None
    except BaseException:
        out.close()
        raise
    return out


def _within(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


class _Roots:
    """Where a report's paths may be read: under the image folders (``--images``) or, for
    ``classify --html``, the files its command line named; links resolved before the check."""

    def __init__(self, roots: Sequence[str]) -> None:
        self.roots = tuple(roots)
        self.dirs = tuple(r for r in roots if os.path.isdir(r))
        self.real_dirs = tuple(os.path.realpath(r) for r in self.dirs)
        self.real_files = frozenset(os.path.realpath(r) for r in roots if not os.path.isdir(r))

    def allows(self, real: str) -> bool:
        return real in self.real_files or any(_within(real, r) for r in self.real_dirs)

    def resolve(self, path: str) -> tuple[str | None, str | None]:
        """(the file to read, resolved; or None and why not: None when simply not found)."""
        candidates = [path] if os.path.isabs(path) else [os.path.join(r, path) for r in self.dirs]
        outside = False
        for candidate in candidates:
            if not os.path.lexists(candidate):
                continue
            real = os.path.realpath(candidate)
            if self.allows(real):
                return real, None
            outside = True
        if outside:
            return None, "not shown: the file is outside the image folders (--images); nothing outside them is read"
        return None, None


def find_heatmaps(given: str | None, reports: Sequence[str]) -> tuple[str | None, str | None]:
    """``report``'s heatmap folder and a note for the user: ``given`` when it is a folder; none,
    with a warning, when ``given`` does not exist (a run without ``--heatmaps`` has none, and a
    report is worth having without them); without ``given``, the ``heatmaps`` folder beside the
    first report when there is one (the README's layout), named in the note.

    Raises:
        InputError: ``given`` exists but is not a folder.
    """
    if given is not None:
        if os.path.isdir(given):
            return given, None
        if os.path.lexists(given):
            raise InputError(f"--heatmaps {given} is not a folder")
        return None, (
            f"warning: no heatmap folder {given}: the report shows no heatmaps "
            f"(classify --heatmaps {given} writes them)"
        )
    if not reports:
        return None, None
    beside = os.path.join(os.path.dirname(reports[0]), "heatmaps")
    if os.path.isdir(beside):
        return (
            beside,
            f"note: showing the heatmaps in {beside}, found beside {reports[0]} (--heatmaps DIR names another)",
        )
    return None, None


def build_html(config: HtmlConfig, console: Console | None = None) -> HtmlResult:
    """Read the report(s) and write the HTML report folder.

    Args:
        config: the reports, the folder, and where to find images, heatmaps and metrics.
        console: progress, warnings and the closing line (default: stderr).

    Raises:
        InputError: a report, the metrics file or the heatmap folder can't be used.
        OutputError: the folder can't be written, or holds other files.
    """
    console = console or Console(stderr=True)
    check_html_output(config.out_dir)
    if config.heatmaps is not None and not os.path.isdir(config.heatmaps):
        raise InputError(f"--heatmaps {config.heatmaps} is not a folder")
    metrics = read_metrics(config.metrics) if config.metrics is not None else None
    run = read_run(config.reports, console)
    if config.labels is not None:
        apply_labels(run, read_true_labels(config.labels))
    roots: tuple[str, ...] = config.images
    if not roots:
        data = metrics.get("data") if metrics is not None else None
        data_root = data.get("root") if isinstance(data, dict) else None
        roots = (str(data_root),) if isinstance(data_root, str) and data_root else (".",)
    out_dir = Path(config.out_dir)
    out = _prepare_out(out_dir)
    try:
        pages, thumbs, heat_count = _build(run, metrics, config, out, roots, console)
    finally:
        out.close()
    unavailable = sum(1 for r in run.rows if r.thumb is None)
    result = HtmlResult(
        index=out_dir / "index.html",
        pages=pages,
        rows=len(run.rows),
        thumbnails_made=thumbs.made,
        thumbnails_reused=thumbs.reused,
        unavailable=unavailable,
        heatmaps=heat_count,
    )
    missing = [r for r in run.rows if r.thumb is None and r.ok]
    if missing:
        console.print(
            f"[yellow]warning:[/] {len(missing)} classified image(s) could not be shown "
            f"(first: {escape(missing[0].path)}: {escape(missing[0].thumb_note or '')}); their cards say why",
            highlight=False,
            soft_wrap=True,
        )
    if not config.quiet:
        console.print(
            escape(
                f"html report: {len(run.rows)} rows, {len(pages)} pages, {thumbs.made} thumbnails made "
                f"({thumbs.reused} reused), {heat_count} heatmaps: open {result.index}"
            ),
            highlight=False,
            soft_wrap=True,
        )
    return result


def _build(
    run: RunReport,
    metrics: dict[str, Any] | None,
    config: HtmlConfig,
    out: OutputDir,
    roots: Sequence[str],
    console: Console,
) -> tuple[list[str], Thumbnailer, int]:
    """Thumbnails (in threads), pages, then the marker saying the build is complete."""
    thumbs = Thumbnailer(out, config.thumb_side)
    allowed = _Roots(roots)
    heat_dir = Path(config.heatmaps).resolve() if config.heatmaps is not None else None
    out_abs = out.path.resolve()
    heat_count = [0]

    def one(row: Row) -> None:
        row.file, why = allowed.resolve(row.path)
        if row.file is None:
            row.thumb_note = why or "image not found at report time (looked under " + ", ".join(roots) + ")"
        else:
            try:
                row.thumb = thumbs.thumbnail(row.file)
            except ImageError as exc:
                row.thumb_note = f"no thumbnail: {exc}"
        if heat_dir is not None and row.ok:
            try:
                target = heat_dir / heatmap_relpath(row.path)
            except ValueError:
                return
            # Only a heatmap inside the heatmap folder (a planted link to elsewhere is not read).
            if _within(os.path.realpath(target), str(heat_dir)) and _is_file_not_link(target):
                try:
                    t = thumbs.thumbnail(str(target), "heatmap")
                except ImageError:
                    return
                link = Path(os.path.relpath(target, out_abs)).as_posix()
                row.heatmap = Thumb(t.src, t.width, t.height, link)
                heat_count[0] += 1

    workers = config.workers or max(1, min(8, os.cpu_count() or 1))
    show = console.is_terminal and not config.quiet
    pool = ThreadPoolExecutor(workers, "cxr-thumb")
    try:
        with progress_bar(console, len(run.rows), show, "thumbnails", None, log=not config.quiet) as advance:
            chunk = 256
            for start in range(0, len(run.rows), chunk):
                batch = run.rows[start : start + chunk]
                for future in [pool.submit(one, row) for row in batch]:
                    future.result()
                advance(len(batch))
    except BaseException:
        # Ctrl-C, SIGTERM, an output error: stop the threads at their next read, don't wait for them.
        thumbs.stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)

    pages = _write_pages(run, metrics, config, out)
    try:
        out.write_text(MARKER, _marker(pages, complete=True))
    except OSError as exc:
        raise OutputError(f"cannot write {out.path / MARKER}: {exc.strerror or exc}") from None
    return pages, thumbs, heat_count[0]


# --------------------------------------------------------------------------- pages


def _index(run: RunReport, metrics: dict[str, Any] | None, galleries: Sequence[model.Gallery], per_page: int) -> str:
    truth = None
    if metrics is None and any(r.true_label is not None for r in run.rows):
        truth = model.truth(run, galleries)
    labels = [str(x) for x in metrics.get("labels", [])] if metrics is not None else []
    return render(
        "index.html.j2",
        title="cxr-batch report",
        nav=model.nav(galleries, "index"),
        label_rows=model.label_rows(run, galleries),
        status_rows=model.status_rows(run),
        ood_rows=model.ood_rows(run),
        gallery_links=model.gallery_links(galleries, per_page),
        metrics=model.metrics(metrics) if metrics is not None else None,
        confusion=model.confusion(metrics, labels, galleries) if metrics is not None else None,
        reliability=model.reliability(metrics.get("reliability")) if metrics is not None else None,
        truth=truth,
        facts=model.facts(run, metrics),
    )


def _gallery_page(
    g: model.Gallery,
    number: int,
    per_page: int,
    galleries: Sequence[model.Gallery],
    run: RunReport,
    low: float,
    wide: bool,
) -> str:
    total = g.pages(per_page)
    start = (number - 1) * per_page
    rows = g.rows[start : number * per_page]
    title = g.title + (f" (page {number} of {total})" if total > 1 else "")
    return render(
        "gallery.html.j2",
        title=f"cxr-batch report: {title}",
        nav=model.nav(galleries, g.key),
        count=len(g.rows),
        order=g.order,
        first=start + 1,
        last=start + len(rows),
        items=model.pager(g, number, total),
        number=number,
        total=total,
        wide=wide,
        cards=[model.card(r, run.labels, low) for r in rows],
    )


def _write_pages(run: RunReport, metrics: dict[str, Any] | None, config: HtmlConfig, out: OutputDir) -> list[str]:
    galleries = model.galleries(run, config.low_confidence)
    written: list[str] = []

    def write(name: str, content: str) -> None:
        try:
            out.write_text(name, content)  # atomic; a link named like a page or style.css is replaced
        except LinkRefused as exc:
            raise OutputError(f"cannot write {out.path / name}: {exc}") from None
        except OSError as exc:
            raise OutputError(f"cannot write {out.path / name}: {exc.strerror or exc}") from None
        if name.endswith(".html"):
            written.append(name)

    write("style.css", stylesheet())
    write("index.html", _index(run, metrics, galleries, config.per_page))
    wide = config.heatmaps is not None
    for g in galleries:
        for number in range(1, g.pages(config.per_page) + 1):
            write(
                g.page_name(number),
                _gallery_page(g, number, config.per_page, galleries, run, config.low_confidence, wide),
            )
    return written
