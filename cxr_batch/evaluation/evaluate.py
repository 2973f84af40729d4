"""``evaluate``: measure a model on labelled X-rays with the classify engine, numpy and rich only.

Ground truth comes from class folders, recognised by :func:`cxr_batch.io.labelled.find_labelled` (the
same detection ``train`` uses), or from a ``path,label`` CSV. Folders and CSV labels that the
model doesn't know are listed in ``skipped``, never guessed. The images go through
:class:`cxr_batch.engine.classifier.Classifier` exactly as in ``classify`` (decoding, batching, error
rows); unreadable files are counted and listed in ``errors``.

The metrics are :func:`cxr_batch.evaluation.metrics.classification_metrics` (train's test report) computed
on the probabilities *as the report writes them* (:func:`cxr_batch.report.format.row_values`, 6
significant digits), so recomputing from the ``--predictions`` CSV gives identical numbers.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from cxr_batch import __version__
from cxr_batch.engine.classifier import Classifier, EngineConfig, Result
from cxr_batch.errors import DataError, OutputError
from cxr_batch.evaluation.metrics import classification_metrics, metrics_by_source, operating_point, reliability_bins
from cxr_batch.evaluation.tables import print_by_source, print_metrics
from cxr_batch.io.inputs import InputFile
from cxr_batch.io.labelled import canonical_label, find_labelled, roots_by_source
from cxr_batch.io.safe_open import MAX_LIST_BYTES, DamagedFileError, read_text
from cxr_batch.io.safe_write import write_file_atomic
from cxr_batch.report.format import RunIdentity, output_format, row_values
from cxr_batch.report.writer import ReportConfig, ReportWriter, check_output, open_report
from cxr_batch.text import markup

#: Unreadable files and skipped labels shown on stderr at most (all of them are in the JSON).
SHOW = 10


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything one ``evaluate`` run needs."""

    data_dir: str
    #: the metrics JSON
    out: str
    #: more labelled roots after ``data_dir``; each root is a source, with metrics of its own
    extra_data_dirs: tuple[str, ...] = ()
    #: with ``labels_file``: keep only its rows whose ``split`` column says this (e.g. ``test`` of a split.csv)
    part: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    #: a ``path,label`` CSV (paths relative to ``data_dir``) instead of class folders
    labels_file: str | None = None
    #: also write the per-image report (classify's CSV or JSON lines)
    predictions: str | None = None
    #: write PNG figures here (needs the ``plots`` extra)
    plots: str | None = None
    overwrite: bool = False
    quiet: bool = False


@dataclass
class GroundTruth:
    """The labelled files to evaluate, in order, and what was left out."""

    files: list[InputFile]
    #: report path → label (a label of the model)
    labels: dict[str, str]
    source: str
    #: left out: {"label", "folder" (folders only), "files", "reason"}
    skipped: list[dict[str, Any]] = field(default_factory=list)
    #: report path → the source (data root name) it belongs to
    sources: dict[str, str] = field(default_factory=dict)


@dataclass
class Evaluation:
    """What ``evaluate`` measured: ``document`` is what the metrics JSON holds."""

    document: dict[str, Any]
    y_true: np.ndarray
    probs: np.ndarray
    written: list[Path] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return int(self.document["error_count"])


def _model_label(label: str, model_labels: tuple[str, ...]) -> str | None:
    """A ground-truth label as the model names it (folder aliases such as 'COVID-19' included), or None."""
    if label in model_labels:
        return label
    canon = canonical_label(label)
    return canon if canon in model_labels else None


def folder_truth(
    root: str | os.PathLike[str], model_labels: tuple[str, ...], source: str | None = None, prefix: bool = False
) -> GroundTruth:
    """Ground truth from class folders under ``root``, for the labels the model knows.

    ``source`` names the root in per-source metrics (default: its folder name); ``prefix`` writes
    report paths as ``SOURCE/relative path`` (several roots in one report).

    Raises:
        DataError: no class folders, an empty class folder, or no folder the model has a label for.
    """
    root = Path(root)
    found = find_labelled(root)  # the layout as train sees it; lists the folders it leaves out
    candidates = [*found.labels, *(canonical_label(name) for name in found.ignored)]
    use = [label for label in model_labels if label in candidates]
    if not use:
        raise DataError(
            f"{root}: none of its class folders ({', '.join(sorted(candidates))}) is a label of the model "
            f"({', '.join(model_labels)}); pass --labels FILE.csv to give labels another way"
        )
    data = find_labelled(root, classes=use)
    name = source or data.source
    files: list[InputFile] = []
    labels: dict[str, str] = {}
    sources: dict[str, str] = {}
    # Entries that are not regular files are classified too: each gets its error row (never skipped silently).
    for path, label in [*data.items, *data.unreadable]:
        rel = path.relative_to(root).as_posix()
        if prefix:
            rel = f"{name}/{rel}"
        files.append(InputFile(str(path), rel))
        labels[rel] = label
        sources[rel] = name
    skipped = []
    for folder in data.ignored:
        try:
            n = len(find_labelled(root, classes=[folder]).items)
        except DataError:
            n = 0
        skipped.append(
            {"label": canonical_label(folder), "folder": folder, "files": n, "reason": "the model has no such label"}
        )
    return GroundTruth(
        files=files,
        labels=labels,
        source="class folders" if data.layout == "class folders" else f"class folders ({data.layout})",
        skipped=skipped,
        sources=sources,
    )


def merge_truths(truths: list[GroundTruth]) -> GroundTruth:
    """Several roots' ground truth as one (report paths are already unique: see ``prefix``)."""
    if len(truths) == 1:
        return truths[0]
    out = GroundTruth(files=[], labels={}, source=" + ".join(t.source for t in truths))
    for t in truths:
        out.files.extend(t.files)
        out.labels.update(t.labels)
        out.sources.update(t.sources)
        out.skipped.extend({**s, "source": next(iter(t.sources.values()), "")} for s in t.skipped)
    return out


def csv_truth(
    labels_file: str | os.PathLike[str],
    root: str | os.PathLike[str] | dict[str, Path],
    model_labels: tuple[str, ...],
    part: str | None = None,
) -> GroundTruth:
    """Ground truth from a CSV with ``path`` and ``label`` columns (others are ignored).

    Relative paths are under ``root``. Each path is normalised (``./a.png``, ``a//b.png`` and
    ``x/../a.png`` name one file, shown in the report as ``a.png``), and must lie inside ``root``
    (an absolute path too). Rows whose label the model doesn't know are skipped and counted; a
    missing file becomes an error row when it is classified. ``root`` may map source names to
    roots: then a ``source`` column (as train's split.csv has) says which root each row is under,
    and the report path is ``SOURCE/path``. ``part`` keeps only the rows whose ``split`` column
    equals it.

    Raises:
        DataError: the file can't be read, lacks the columns, has an incomplete row, names a
            path outside ``root``, or names one file twice (the message gives both lines).
    """
    src = Path(labels_file)
    files: list[InputFile] = []
    labels: dict[str, str] = {}
    first_seen: dict[str, tuple[int, str, str]] = {}  # normalised path → (line, path as written, label)
    sources: dict[str, str] = {}
    unknown: Counter[str] = Counter()
    try:
        # a regular file of bounded size (never a FIFO or /dev/zero), read through the one opener
        text = read_text(src, MAX_LIST_BYTES, what="the labels file", encoding="utf-8-sig")
        with io.StringIO(text, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"path", "label"} <= {f.strip() for f in reader.fieldnames}:
                raise DataError(f"{src}: a labels file needs a header with the columns path,label")
            for row in reader:
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str)}
                path, label = row.get("path", ""), row.get("label", "")
                if not path and not label:
                    continue
                line = reader.line_num
                if part is not None and row.get("split", "") != part:
                    continue
                base, src_name = _csv_root(root, row.get("source", ""), src, line)
                if not path or not label:
                    raise DataError(f"{src}: line {line}: needs both a path and a label")
                full = os.path.normpath(os.path.join(base, path))  # an absolute path stays itself
                if os.path.commonpath([base, full]) != base or full == base:
                    raise DataError(
                        f"{src}: line {line}: {path!r} is outside DATA_DIR {base}; labelled files must lie "
                        "under DATA_DIR (paths are relative to it)"
                    )
                rel = Path(os.path.relpath(full, base)).as_posix()
                key = f"{src_name}\0{rel}"
                earlier = first_seen.get(key)
                if earlier is not None:
                    e_line, e_path, e_label = earlier
                    same = "the same label" if e_label == label else f"labels {e_label!r} and {label!r}"
                    raise DataError(
                        f"{src}: lines {e_line} ({e_path!r}) and {line} ({path!r}) both name the file {rel!r}, "
                        f"with {same}; list each file once"
                    )
                first_seen[key] = (line, path, label)
                as_model = _model_label(label, model_labels)
                if as_model is None:
                    unknown[label] += 1
                    continue
                shown = f"{src_name}/{rel}" if isinstance(root, dict) and len(root) > 1 else rel
                files.append(InputFile(full, shown))
                labels[shown] = as_model
                sources[shown] = src_name
    except OSError as exc:
        raise DataError(f"cannot read the labels file {src}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, DamagedFileError, csv.Error) as exc:
        raise DataError(f"{src}: not a UTF-8 CSV file ({exc})") from None
    skipped = [
        {"label": label, "files": n, "reason": "the model has no such label"} for label, n in sorted(unknown.items())
    ]
    return GroundTruth(files=files, labels=labels, source=f"labels file {src}", skipped=skipped, sources=sources)


def _csv_root(root: str | os.PathLike[str] | dict[str, Path], source: str, src: Path, line: int) -> tuple[str, str]:
    """(the absolute root a labels-file row is under, its source name)."""
    if not isinstance(root, dict):
        return os.path.abspath(root), source or Path(root).resolve().name
    if len(root) == 1:
        name, only = next(iter(root.items()))
        return os.path.abspath(only), source or name
    if source not in root:
        raise DataError(
            f"{src}: line {line}: source {source!r} is not one of the data folders given ({', '.join(sorted(root))})"
        )
    return os.path.abspath(root[source]), source


def json_safe(value: Any) -> Any:
    """NaN and infinity become None (null), so the document is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def report_probabilities(result: Result, labels: tuple[str, ...]) -> list[float]:
    """The probabilities exactly as the report writes them (same rounding)."""
    row = row_values(result, labels)
    return [float(row[f"prob_{label}"]) for label in labels]


def _check_outputs(config: EvaluateConfig) -> ReportConfig | None:
    out = Path(config.out)
    if out.is_dir():
        raise OutputError(f"--out {config.out} is a folder; give a file name such as {out / 'metrics.json'}")
    if out.exists() and not out.is_file():
        raise OutputError(f"--out {config.out} is not a regular file; the metrics are written to a file")
    if out.exists() and not config.overwrite:
        raise OutputError(f"{config.out} already exists; pass --overwrite to replace it")
    if config.predictions is None:
        return None
    if config.predictions == "-":
        raise OutputError("--predictions needs a file name ('-' is not supported: stdout is for data)")
    pred = Path(config.predictions)
    if os.path.abspath(pred) == os.path.abspath(out) or (
        out.exists() and pred.exists() and os.path.samefile(pred, out)
    ):
        raise OutputError(
            f"--out and --predictions name the same file ({config.out}): one would overwrite the other; "
            "give two file names"
        )
    report = ReportConfig(out=config.predictions, format=output_format(config.predictions), overwrite=config.overwrite)
    check_output(report)
    return report


def screening_metrics(
    screening: dict[str, Any] | None,
    y: np.ndarray,
    p: np.ndarray,
    labels: Sequence[str],
    sources: Sequence[str],
) -> dict[str, Any] | None:
    """Sensitivity and specificity of the ``covid_screen`` call (P(label) >= threshold) against the
    truth, with Wilson intervals, overall and per source; None when the run makes no such call."""
    if screening is None or screening["label"] not in labels:
        return None
    k = list(labels).index(screening["label"])
    out = {**screening, **operating_point(p[:, k], y == k, screening["threshold"])}
    src = np.asarray(list(sources), dtype=object)
    if len(set(src.tolist())) > 1:
        out["by_source"] = {
            name: operating_point(p[src == name, k], y[src == name] == k, screening["threshold"])
            for name in sorted(set(src.tolist()))
        }
    return out


def run_evaluate(config: EvaluateConfig, console: Console | None = None) -> Evaluation:
    """Classify the labelled images, compute the metrics, write the JSON (and predictions, plots).

    Args:
        config: data, outputs and engine settings.
        console: where progress, the tables and the summary go (default: stderr).

    Raises:
        DataError: no usable labels (see :func:`folder_truth`, :func:`csv_truth`), or no images.
        ModelError, NoDefaultModelError, DeviceError: the model can't be used.
        OutputError: an output exists without ``overwrite`` or can't be written.
        MissingExtraError: ``plots`` without matplotlib.
    """
    from cxr_batch.report.progress import progress_bar

    console = console or Console(stderr=True)
    report = _check_outputs(config)  # fail fast, before the model load and the walk
    if config.plots is not None:
        from cxr_batch.evaluation.plots import require_matplotlib

        require_matplotlib()
    classifier = Classifier.from_config(config.engine)
    for notice in classifier.notices:  # once: the model in use is not the one asked for by default
        console.print(f"[yellow]notice:[/] {markup(notice)}", highlight=False, soft_wrap=True)
    labels = classifier.labels
    dirs = [config.data_dir, *config.extra_data_dirs]
    roots = roots_by_source(dirs)
    if config.labels_file is not None:
        truth = csv_truth(config.labels_file, roots, labels, config.part)
    else:
        truth = merge_truths([folder_truth(r, labels, name, len(dirs) > 1) for name, r in roots.items()])
    if not truth.files:
        raise DataError(f"{truth.source}: no labelled images with a label the model knows ({', '.join(labels)})")

    writer: ReportWriter | None = None
    model_sha256 = classifier.model_sha256  # hashed once, in the background since the load
    if report is not None:
        identity = RunIdentity(classifier.meta.ident, model_sha256, classifier.meta.precision)
        writer, _ = open_report(report, labels, identity, truth=truth.labels)
    ys: list[int] = []
    row_sources: list[str] = []
    probs: list[list[float]] = []
    errors: list[dict[str, Any]] = []
    not_assessable: list[dict[str, Any]] = []
    flagged = 0
    try:
        with progress_bar(
            console, len(truth.files), console.is_terminal and not config.quiet, "evaluate", log=not config.quiet
        ) as advance:
            batches = classifier.iter_batches(truth.files)
            with closing(batches):
                for batch in batches:
                    if writer is not None:
                        writer.write(batch)
                    for r in batch:
                        label = truth.labels[r.path]
                        if r.ok and r.assessable is False:  # no label: apart from the metrics
                            why = next((n for n in r.notes if n.startswith("not assessable: ")), "not assessable")
                            not_assessable.append({"path": r.path, "label": label, "why": why.split(": ", 1)[-1]})
                        elif r.ok:
                            ys.append(labels.index(label))
                            row_sources.append(truth.sources.get(r.path, ""))
                            probs.append(report_probabilities(r, labels))
                            flagged += r.in_distribution is False
                        else:
                            errors.append({"path": r.path, "label": label, "error": r.error})
                    advance(len(batch))
    finally:
        if writer is not None:
            writer.close()

    y = np.asarray(ys, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64).reshape(len(ys), len(labels))
    metrics = classification_metrics(y, p, labels)
    document: dict[str, Any] = {
        **metrics,
        "by_source": metrics_by_source(y, p, labels, row_sources),
        "reliability": reliability_bins(p, y),
        "files": len(truth.files),
        "error_count": len(errors),
        "errors": errors,
        "skipped": truth.skipped,
        "not_assessable_count": len(not_assessable) if classifier.lungs is not None else None,
        "not_assessable": not_assessable,
        "lung_segmenter": None if classifier.lungs is None else classifier.lungs.describe(),
        "out_of_distribution": flagged if "ood_score" in classifier.meta.outputs else None,
        "data": {
            "root": str(config.data_dir),
            "roots": {name: str(r) for name, r in roots.items()},
            "source": truth.source,
            "part": config.part,
        },
        "screening": screening_metrics(classifier.screening, y, p, labels, row_sources),
        "model": classifier.meta.ident,
        "model_path": str(classifier.model_path),
        "model_sha256": model_sha256,
        "model_origin": classifier.model_origin,
        "provider": classifier.provider,
        "precision_reason": classifier.precision_reason,
        "predictions": config.predictions,
        "cxr_batch_version": __version__,
    }
    document = json_safe(document)
    written = [_write_json(Path(config.out), document)]
    if config.plots is not None:
        from cxr_batch.evaluation.plots import write_plots

        written += write_plots(config.plots, document, y, p)
    evaluation = Evaluation(document=document, y_true=y, probs=p, written=written)
    if not config.quiet:
        print_summary(evaluation, console)
    return evaluation


def _write_json(path: Path, document: dict[str, Any]) -> Path:
    """Write through the one output writer: atomic, never through a link, mode as the umask says."""
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, text)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def print_summary(evaluation: Evaluation, console: Console) -> None:
    """The per-class table and confusion matrix, then unreadable files, skipped labels and outputs."""
    doc = evaluation.document
    nan = float("nan")
    shown = {
        **doc,
        "accuracy": nan if doc["accuracy"] is None else doc["accuracy"],
        "macro_f1": nan if doc["macro_f1"] is None else doc["macro_f1"],
        "ece": nan if doc["ece"] is None else doc["ece"],
    }
    print_metrics(shown, console, title=f"evaluate {markup(doc['model'])}")
    if len(doc.get("by_source") or {}) > 1:
        print_by_source(doc["by_source"], console)  # its cells show None (undefined) as "-"

    def say(text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)

    say(
        f"{doc['files']} labelled images ({markup(doc['data']['source'])}): {doc['n']} classified, "
        f"{doc['error_count']} unreadable"
        + (f", {doc['not_assessable_count']} not assessable" if doc.get("not_assessable_count") else "")
    )
    if doc.get("not_assessable_count"):
        say(
            f"[yellow]not assessable:[/] {doc['not_assessable_count']} images (no two plausible lung fields): "
            "left out of the metrics, listed in the metrics file"
        )
    for e in doc["errors"][:SHOW]:
        say(f"[red]unreadable:[/] {markup(e['path'])} ({markup(e['label'])}): {markup(e['error'])}")
    if doc["error_count"] > SHOW:
        say(f"[red]unreadable:[/] {doc['error_count'] - SHOW} more, listed in the metrics file")
    for s in doc["skipped"]:
        where = f"folder {s['folder']!r}" if "folder" in s else f"label {s['label']!r}"
        say(
            f"[yellow]skipped:[/] {markup(where)}, {s['files']} files: {markup(s['reason'])} "
            f"({markup(', '.join(doc['labels']))})"
        )
    scr = doc.get("screening")
    if scr and doc["n"]:

        def rate(key: str) -> str:
            lo, hi = scr[f"{key}_ci95"]
            return "-" if scr[key] is None else f"{scr[key]:.4f} [{lo:.3f}, {hi:.3f}]"

        say(
            f"screening ({markup(scr['label'])} if P >= {scr['threshold']:.4g}, {markup(scr['source'])}): "
            f"sensitivity {rate('sensitivity')} ({scr['tp']}/{scr['tp'] + scr['fn']}), "
            f"specificity {rate('specificity')} ({scr['tn']}/{scr['tn'] + scr['fp']}); 95% CI: Wilson"
        )
    if doc.get("out_of_distribution"):
        say(f"[yellow]note:[/] {doc['out_of_distribution']} classified images were flagged out of distribution")
    for path in evaluation.written:
        say(f"wrote {markup(path)}")
    if doc.get("predictions"):
        say(f"wrote {markup(doc['predictions'])}")
