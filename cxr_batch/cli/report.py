"""``cxr-batch report``: thin; the work is in :mod:`cxr_batch.report.html` (imported in the command body)."""

from __future__ import annotations

from collections.abc import Sequence

import click

from cxr_batch.cli.options import interruptible, library_errors
from cxr_batch.text import shown

#: Defaults, repeated here so ``--help`` does not import the report module (numpy, Pillow).
LOW_CONFIDENCE = 0.6
PER_PAGE = 200


@click.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option(
    "--html",
    "html_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=str),
    metavar="OUT_DIR",
    help="Write the HTML report into this folder (new, empty, or one an earlier report wrote): open OUT_DIR/index.html.",
)
@click.option(
    "--images",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=str),
    metavar="DIR",
    help="Where the report's relative paths point: the folder(s) given to classify, or evaluate's DATA_DIR. "
    "Repeatable. Only files under these folders are read (absolute or '../' paths outside them, links "
    "included, get a card saying why). Default: the metrics file's data folder, else the current folder.",
)
@click.option(
    "--heatmaps",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    metavar="DIR",
    help="The classify --heatmaps folder: show each image's heatmap beside it. Default: the 'heatmaps' folder "
    "beside the report, when there is one; a folder that does not exist is a warning, not an error.",
)
@click.option(
    "--metrics",
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    default=None,
    metavar="FILE",
    help="The metrics JSON of 'cxr-batch evaluate --out': show the metrics, confusion matrix and reliability diagram.",
)
@click.option(
    "--labels",
    "labels_file",
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    default=None,
    metavar="FILE",
    help="True labels (a path,label CSV, paths as in the report): misclassified galleries and true labels on "
    "the cards. An evaluate --predictions report has them already.",
)
@click.option(
    "--low-confidence",
    type=click.FloatRange(0.0, 1.0),
    default=LOW_CONFIDENCE,
    show_default=True,
    help="Classified images below this confidence go to the low-confidence gallery.",
)
@click.option("--per-page", type=click.IntRange(min=1), default=PER_PAGE, show_default=True, help="Images per page.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no closing line (warnings still show).")
@interruptible("the report folder is left incomplete; the next run into it rebuilds it.")
@library_errors
def report_command(
    results: tuple[str, ...],
    html_dir: str,
    images: tuple[str, ...],
    heatmaps: str | None,
    metrics: str | None,
    labels_file: str | None,
    low_confidence: float,
    per_page: int,
    quiet: bool,
) -> None:
    """Turn a classify or evaluate report into static HTML pages to review in a browser.

    RESULTS is a report (CSV or JSON lines; several files: the parts of a sharded run). The
    pages open from disk with no server, no network and no JavaScript: a summary with the
    counts (and, with --metrics, the evaluation), and galleries of thumbnails per predicted
    label, flagged out-of-distribution, low confidence and unreadable files; with true labels
    (evaluate's predictions, or --labels), a "misclassified" gallery per true → predicted pair.

    Example: cxr-batch report results.csv --images sample_images --html report/
    """
    from cxr_batch.report.html import HtmlConfig, build_html, find_heatmaps  # numpy, Pillow

    heatmaps, note = find_heatmaps(heatmaps, results)
    if note is not None and not (quiet and note.startswith("note:")):
        click.echo(shown(note), err=True)
    build_html(
        HtmlConfig(
            reports=results,
            out_dir=html_dir,
            images=images,
            heatmaps=heatmaps,
            metrics=metrics,
            labels=labels_file,
            low_confidence=low_confidence,
            per_page=per_page,
            quiet=quiet,
        )
    )


def check_html_dir(html_dir: str | None, out: str) -> None:
    """``classify --html``: refuse early (before classifying) what the report would refuse later."""
    if html_dir is None:
        return
    if out == "-":
        raise click.UsageError("--html needs a report file, not --out -")
    from cxr_batch.report.html import check_html_output

    check_html_output(html_dir)


def html_after_classify(
    html_dir: str | None, out: str, inputs: Sequence[str], heatmaps: str | None, quiet: bool
) -> None:
    """``classify --html``: the report of the run just written, its paths resolved against its inputs."""
    if html_dir is None:
        return
    from cxr_batch.report.html import HtmlConfig, build_html

    # The folders classified, the files the command line named, and the current folder (where
    # named files' relative paths point): nothing else is read.
    roots = (*inputs, ".")
    build_html(HtmlConfig(reports=(out,), out_dir=html_dir, images=roots, heatmaps=heatmaps, quiet=quiet))
