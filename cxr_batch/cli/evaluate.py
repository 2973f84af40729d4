"""``cxr-batch evaluate``: thin; the work is in :mod:`cxr_batch.evaluation.evaluate` (imported in the command body)."""

from __future__ import annotations

import sys

import click

from cxr_batch.cli.options import EXIT_PARTIAL, engine_config, engine_options, interruptible, library_errors


@click.command("evaluate")
@click.argument("data_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--out", "-o", required=True, metavar="FILE", help="The metrics JSON to write.")
@click.option(
    "--labels",
    "labels_file",
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    default=None,
    metavar="FILE.csv",
    help="Labels from a CSV with the columns path,label (paths relative to DATA_DIR; with several DATA_DIRS "
    "a source column names the folder, as in train's split.csv) instead of class folders.",
)
@click.option(
    "--part",
    type=click.Choice(["train", "val", "test"]),
    default=None,
    help="With --labels: only the rows whose split column says this (e.g. --labels runs/r18/split.csv --part test).",
)
@click.option(
    "--predictions",
    metavar="FILE",
    default=None,
    help="Also write the per-image results, as classify does (.csv, or .jsonl for JSON lines).",
)
@click.option(
    "--plots",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    metavar="DIR",
    help='Write confusion_matrix.png, roc_curves.png and reliability.png into DIR (pip install "cxr-batch[plots]").',
)
@engine_options
@click.option("--overwrite", is_flag=True, help="Replace an existing metrics file (and predictions).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no tables.")
@interruptible("no metrics were written (the rows of --predictions written so far are kept).")
@library_errors
def evaluate_command(
    data_dirs: tuple[str, ...],
    out: str,
    labels_file: str | None,
    part: str | None,
    predictions: str | None,
    plots: str | None,
    model: str | None,
    device: str,
    precision: str,
    batch_size: int,
    threads: int,
    covid_threshold: float | None,
    lungs: bool,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Measure a model on labelled chest X-rays: accuracy, macro-F1, per-class precision,
    recall, specificity and F1 with 95% Wilson intervals, the confusion matrix, one-vs-rest
    ROC AUC and the expected calibration error, written as JSON.

    Several DATA_DIRS are evaluated together, each as a source: the JSON has by_source beside the
    overall metrics and the table shows one line per source.

    Labels come from class folders (recognised as train recognises them; folders the model
    has no label for are listed and skipped) or from --labels FILE.csv. Images go through
    the classify engine; unreadable files are counted and listed. Exit status: 0, 3 when
    some files could not be read, 1 fatal error, 2 usage error.

    Example: cxr-batch evaluate labelled/ --out metrics.json --predictions results.csv --plots plots/
    """
    if part is not None and labels_file is None:
        raise click.UsageError("--part needs --labels FILE.csv (a file with a split column)")
    from cxr_batch.evaluation.evaluate import EvaluateConfig, run_evaluate  # numpy, onnxruntime

    config = EvaluateConfig(
        data_dir=data_dirs[0],
        extra_data_dirs=tuple(data_dirs[1:]),
        part=part,
        out=out,
        engine=engine_config(model, device, precision, batch_size, threads, covid_threshold, lungs),
        labels_file=labels_file,
        predictions=predictions,
        plots=plots,
        overwrite=overwrite,
        quiet=quiet,
    )
    evaluation = run_evaluate(config)
    if evaluation.error_count:
        sys.exit(EXIT_PARTIAL)
