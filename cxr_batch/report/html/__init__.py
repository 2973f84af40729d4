"""``report --html``: a static HTML report of a classify or evaluate run, for people to look at.

The report opens from disk (``file://``) with no server, no network and no JavaScript:

- ``index.html``: the counts by label, status and out-of-distribution verdict (the numbers of the
  summary table: the rows go through :class:`~cxr_batch.report.writer.RunStats`), the model facts
  the report has (``model`` and, when present, ``model_sha256``, ``precision``, ``run_id`` columns
  and a ``<report>.provenance.json``) and, with ``metrics`` (``evaluate --out``), the metrics,
  the confusion matrix and the reliability diagram (inline SVG);
- galleries, paginated (:data:`PER_PAGE` cards a page, so a page stays light at 100,000 rows):
  one per predicted label (most confident first), the images the guard flagged, the low-confidence
  ones (least confident first) and the error rows with their messages;
- ``thumbs/``: one small JPEG per distinct image content, decoded with classify's own decoder
  (:func:`cxr_batch.io.preprocess.decode`, so DICOM works; pixels only, never DICOM metadata),
  and one per heatmap. Thumbnails are named by the SHA-256 of the file's content: identical files
  share one, and a second report into the same folder reuses them.

The package, one idea a module:

- :mod:`.data`: the report rows, true labels, metrics and provenance, read from files (no HTML);
- :mod:`.thumbs`: the thumbnails;
- :mod:`.model`: the pages as data (galleries, counts, tables, pager, cards; no HTML);
- :mod:`.render`: the Jinja2 environment (autoescaping, every value through :func:`text`, every
  link through :func:`href`) and ``templates/`` (the pages and ``style.css``, package data);
- :mod:`.build`: the output folder, the build, the pages written through the safe writer.

Jinja2 (a core dependency) is imported only when an HTML report is asked for.
"""

from cxr_batch.report.html.build import (
    LOW_CONFIDENCE,
    MARKER,
    PER_PAGE,
    HtmlConfig,
    HtmlResult,
    build_html,
    check_html_output,
    find_heatmaps,
)
from cxr_batch.report.html.data import Row, RunReport, Thumb, apply_labels, read_metrics, read_run, read_true_labels
from cxr_batch.report.html.model import mistake_key
from cxr_batch.report.html.render import href, text
from cxr_batch.report.html.thumbs import PLACEHOLDER, THUMB_SIDE, THUMBS, Thumbnailer

__all__ = [
    "LOW_CONFIDENCE",
    "MARKER",
    "PER_PAGE",
    "PLACEHOLDER",
    "THUMBS",
    "THUMB_SIDE",
    "HtmlConfig",
    "HtmlResult",
    "Row",
    "RunReport",
    "Thumb",
    "Thumbnailer",
    "apply_labels",
    "build_html",
    "check_html_output",
    "find_heatmaps",
    "href",
    "mistake_key",
    "read_metrics",
    "read_run",
    "read_true_labels",
    "text",
]
