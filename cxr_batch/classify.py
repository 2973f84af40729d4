"""``classify`` as a library call: discover → load the model → open the report → run → summarise.

The CLI builds a :class:`ClassifyConfig` from its options and calls :func:`run_classify`;
pipelines can do the same, or use :class:`cxr_batch.Classifier` directly.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, BinaryIO

from rich.console import Console

from cxr_batch.contract import CAM_ROLE
from cxr_batch.engine.classifier import Classifier, EngineConfig
from cxr_batch.errors import InputError, OutputError
from cxr_batch.io.inputs import InputFile, InputSpec, discover, iter_inputs, no_input_files
from cxr_batch.io.shard import Shard
from cxr_batch.report import provenance, sinks
from cxr_batch.report.heatmap import HeatmapWriter
from cxr_batch.report.progress import progress_bar
from cxr_batch.report.sinks import BatchSink, HeatmapSink, ProvenanceSink, ReportSink, SpoolSink, SRSink, SRStage
from cxr_batch.report.writer import (
    Existing,
    ReportConfig,
    RunIdentity,
    RunStats,
    check_output,
    open_report,
    render_summary,
    unlike_training_warning,
)
from cxr_batch.text import markup

if TYPE_CHECKING:
    from cxr_batch.engine.ray import RayConfig
    from cxr_batch.engine.types import Engine
    from cxr_batch.io.dicomweb import DicomwebConfig, DicomwebSource
    from cxr_batch.report.sr import SRWriter
    from cxr_batch.report.sr_pool import SRPool


@dataclass(frozen=True)
class ClassifyConfig:
    """Everything one ``classify`` run needs."""

    inputs: InputSpec
    engine: EngineConfig
    report: ReportConfig
    quiet: bool = False
    #: classify only this shard of the discovered files (``--shard K/N``)
    shard: Shard | None = None
    #: run the model in Ray Data (``--engine ray``); None runs it in this process
    ray: RayConfig | None = None
    #: write a class-activation heatmap PNG per classified image under this folder (``--heatmaps``)
    heatmaps: str | None = None
    #: leave out-of-distribution rows out of the summary's label counts (``--drop-ood``)
    drop_ood: bool = False
    #: the provenance record (``--provenance``); None: ``<report>.provenance.json``, none for stdout
    provenance: str | None = None
    #: False writes no provenance record (and leaves the ``run_id`` column empty)
    record_provenance: bool = True
    #: classify the instances a DICOMweb service finds instead of ``inputs`` (``--dicomweb``)
    dicomweb: DicomwebConfig | None = None
    #: write a DICOM SR per classified DICOM image under this folder (``--sr``)
    sr: str | None = None
    #: store the SRs back by STOW-RS (``--stow``; needs ``dicomweb`` and ``sr``)
    stow: bool = False
    #: worker processes that build and save the SRs (None: half the CPUs); 0 builds them in the
    #: run's own thread, before each batch's rows (the way before issue 24)
    sr_workers: int | None = None


def run_classify(config: ClassifyConfig, console: Console | None = None, stdout: BinaryIO | None = None) -> RunStats:
    """Classify every input file into the report; returns the counts the summary shows.

    Args:
        config: inputs, engine and report settings.
        console: where progress, warnings and the summary go (default: stderr).
        stdout: the binary stream for ``--out -``.

    Raises:
        InputError: an input does not exist, or no input files were found.
        ModelError, NoDefaultModelError, DeviceError: the model can't be used.
        OutputError: the report can't be written (or resumed; with a shard, it holds other shards' rows).
        MissingExtraError: ``config.ray`` is set and Ray Data is not installed.
    """
    console = console or Console(stderr=True)
    started = datetime.now(timezone.utc)
    check_output(config.report)  # fail fast, before the walk and the model load
    record = provenance.record_path(config.report.out, config.provenance) if config.record_provenance else None
    if record is not None:
        provenance.check_record_output(
            record, report=config.report.out, resume=config.report.resume, overwrite=config.report.overwrite
        )
    if config.ray is not None:
        from cxr_batch.engine.ray import require_ray

        require_ray()  # MissingExtraError before a long walk, not after it
    source, walk = _inputs(config, console)  # fails fast, before the model loads
    shard = config.shard

    try:
        classifier = _engine(config)
    except BaseException:
        if source is not None:
            source.close()
        raise
    meta = classifier.meta
    # The model file is hashed once (in the background since it was chosen); the rows, the SRs
    # and the provenance record all take this digest.
    identity = RunIdentity(meta.ident, classifier.model_sha256, meta.precision)
    for notice in classifier.notices:  # once, whatever --quiet says: the model in use changed
        console.print(f"[yellow]notice:[/] {markup(notice)}", highlight=False, soft_wrap=True)
    heatmaps = HeatmapWriter(config.heatmaps, meta.labels) if config.heatmaps is not None else None
    run_id = provenance.new_run_id() if record is not None else None
    srs: SRWriter | None = None
    if config.sr is not None:
        from cxr_batch.report.sr import ModelIdent, SRWriter

        if classifier.kind != "local":
            raise InputError("--sr needs --engine local")
        store = source.store_encoded if (config.stow and source is not None) else None
        srs = SRWriter(config.sr, ModelIdent.of(meta, identity.model_sha256), store=store)
    pool: SRPool | None = None
    if srs is not None and config.sr_workers != 0:
        from cxr_batch.report.sr_pool import SRPool

        pool = SRPool(srs, config.sr_workers)
    stage = SRStage(srs, pool)
    # The run's outputs besides the report, in the order they take each batch and are closed;
    # the report goes first and the provenance record last (once it is started).
    others: list[BatchSink] = []
    if heatmaps is not None:
        others.append(HeatmapSink(heatmaps))
    if srs is not None:
        others.append(SRSink(srs))
    if source is not None:
        others.append(SpoolSink(source))
    try:
        writer, existing = open_report(config.report, meta.labels, identity, stdout, run_id=run_id)
        offset = None if config.report.to_stdout else os.path.getsize(config.report.out)  # this run's rows start here
    except BaseException:
        stage.close(cancel=True)
        sinks.close(others)
        raise
    stats = RunStats(labels=meta.labels, model=meta.ident, provider=classifier.provider, drop_ood=config.drop_ood)
    stats.precision_note = classifier.precision_reason
    outputs: list[BatchSink] = [ReportSink(writer, stats), *others]
    try:
        restyle = _in_report_style(existing, config, console)
        counts = _Counts()

        def files(warnings: list[str] | None = None) -> Iterator[InputFile]:
            """This run's files (its shard's), named as the report names them; walked again each call."""
            for f in walk(warnings):
                counts.found += 1
                if shard is not None and not shard.owns(f.display):
                    continue
                yield f if restyle is None else InputFile(f.path, restyle.get(f.path, f.display), f.error)

        def first_pass() -> Iterator[str]:
            """Counts the files, and those still to do, while the provenance record hashes their names."""
            for f in files(walk_warnings):
                counts.files += 1
                if f.display not in existing.paths:
                    counts.todo += 1
                yield f.display

        walk_warnings: list[str] = []
        if shard is not None:
            foreign = sorted(p for p in existing.paths if not shard.owns(p))
            if foreign:
                raise OutputError(
                    f"{config.report.out} holds {len(foreign)} row(s) of other shards than {shard} "
                    f"(first: {foreign[0]!r}); resume each shard into its own report"
                )
        stats.kept, stats.kept_errors = existing.rows, existing.errors
        if record is not None and run_id is not None:
            recorder = provenance.start_classifier_run(
                record,
                run_id,
                classifier,
                config.engine,
                config.report,
                first_pass(),
                shard=shard,
                kept_rows=existing.rows,
                started=started,
                report_offset=offset,
                source=source.describe() if source is not None else None,
            )
            outputs.append(ProvenanceSink(recorder, classifier))
        else:
            for _ in first_pass():
                pass
        for warning in walk_warnings:
            console.print(f"[yellow]warning:[/] {markup(warning)}", highlight=False, soft_wrap=True)
        if shard is not None and not config.quiet:
            # An empty shard is not an error: with N larger than a folder, some shards get no files,
            # and a job array task must still succeed (it writes a report with no rows).
            console.print(f"shard {shard}: {counts.files} of {counts.found} files", highlight=False)
        if existing.truncated:
            console.print(
                f"resume: removed a partial last row ({existing.truncated} bytes) left by an interrupted run",
                highlight=False,
                soft_wrap=True,
            )
        stale = existing.rows - (counts.files - counts.todo)
        if stale > 0:
            console.print(
                f"[yellow]warning:[/] {stale} row(s) of {markup(config.report.out)} are not among this run's inputs "
                "(resume with the same inputs and --absolute-paths setting as the first run)",
                highlight=False,
                soft_wrap=True,
            )
        todo = (f for f in files() if f.display not in existing.paths)
        show = console.is_terminal and not config.quiet
        with progress_bar(console, counts.todo, show, "classify", "img/s", log=not config.quiet) as advance:
            if source is not None and classifier.kind != "local":
                raise InputError("--dicomweb needs --engine local")
            batches = classifier.iter_batches(todo if source is None else source.retrieve(todo))
            with closing(batches):  # on Ctrl-C, stop the decoder threads now
                for batch in batches:
                    for done in stage.feed(batch):  # the batch, once its SR outcomes (if any) are in its notes
                        sinks.write_batch(outputs, done)
                        advance(len(done))
                for done in stage.drain():
                    sinks.write_batch(outputs, done)
                    advance(len(done))
        if heatmaps is not None and existing.rows:
            _redo_heatmaps(classifier, heatmaps, files(), existing, console, config.quiet)
        stats.provider = classifier.provider  # Ray: known once the workers have reported
    except BaseException as exc:
        sinks.fail(outputs, exc)
        raise
    finally:
        stage.close(cancel=sys.exc_info()[0] is not None)  # on an error, drop the SRs not started
        for problem in sinks.close(outputs):  # the provenance record last: it counts synced rows
            console.print(f"[yellow]warning:[/] {markup(problem)}", highlight=False, soft_wrap=True)
    if not config.quiet:
        render_summary(stats, console)  # it says so itself when the films look unlike the training data
        report = "stdout" if config.report.to_stdout else config.report.out
        where = f"report: {report}" + (f"; provenance record: {record}" if record is not None else "")
        console.print(markup(where), highlight=False, soft_wrap=True)
    elif stats.unlike_training:
        warning = unlike_training_warning(stats.assessable_flagged, stats.assessable)
        console.print(f"[yellow]warning:[/] {markup(warning)}", highlight=False, soft_wrap=True)
    # each output says what it wrote; a DICOMweb retrieval that failed ends the run with its error
    stats.output_failures += sinks.report(outputs, console, config.quiet)
    return stats


def _inputs(
    config: ClassifyConfig, console: Console
) -> tuple[DicomwebSource | None, Callable[[list[str] | None], Iterator[InputFile]]]:
    """The run's inputs: the DICOMweb source (or None) and a function that walks them, lazily, each call.

    Raises:
        InputError: an input does not exist, or no input files were found.
    """
    source: DicomwebSource | None = None
    walk: Callable[[list[str] | None], Iterator[InputFile]]
    if config.dicomweb is not None:
        from cxr_batch.io.dicomweb import DicomwebSource

        source = DicomwebSource(config.dicomweb)
        found = source.discover()
        for warning in found.warnings:
            console.print(f"[yellow]warning:[/] {markup(warning)}", highlight=False, soft_wrap=True)
        if not found.files:
            source.close()
            raise InputError(f"no image instances found on {source.url} for the given --study/--series/--query")

        def walk(warnings: list[str] | None) -> Iterator[InputFile]:
            return iter(found.files)

    else:
        # The run's own outputs are never inputs, even inside an input folder (issue 12, item 6).
        own = tuple(p for p in (config.report.out, config.heatmaps, config.sr) if p is not None and p != "-")
        spec = replace(config.inputs, outputs=(*config.inputs.outputs, *own))

        def walk(warnings: list[str] | None) -> Iterator[InputFile]:
            # Lazily, folder by folder: the file list is never held (issue 24, item 4).
            return iter_inputs(spec, warnings)

        # Fail fast, before the model loads: a missing input path, or no input file at all.
        first: list[str] = []
        skipped: Counter[str] = Counter()
        peek = iter_inputs(spec, first, skipped)
        empty = next(peek, None) is None
        if not empty and len(spec.paths) + len(spec.listed) > 1:
            for _ in peek:  # several inputs: two files under one name are refused before anything is written
                pass
        del peek
        if empty:
            for warning in first:
                console.print(f"[yellow]warning:[/] {markup(warning)}", highlight=False, soft_wrap=True)
            raise InputError(no_input_files(config.inputs, skipped))
    return source, walk


def _engine(config: ClassifyConfig) -> Engine:
    """The engine the run asks for, its model loaded (and being hashed in the background)."""
    classifier: Engine
    if config.ray is not None:
        from cxr_batch.engine.ray import RayEngine

        classifier = RayEngine(config.engine, config.ray)
    else:
        engine = config.engine
        if config.heatmaps is not None and CAM_ROLE not in engine.extra_outputs:
            engine = replace(engine, extra_outputs=(*engine.extra_outputs, CAM_ROLE))
        classifier = Classifier.from_config(engine)  # a model without the 'cam' output fails here
    return classifier


@dataclass
class _Counts:
    found: int = 0  #: files the walk found (all shards)
    files: int = 0  #: this run's files (its shard's)
    todo: int = 0  #: those without a row in the report yet


def _in_report_style(existing: Existing, config: ClassifyConfig, console: Console) -> dict[str, str] | None:
    """``--resume --absolute-paths`` on a report written with relative paths: the report's name of
    each file (by the path to open), to name the files as the report does; None otherwise.

    Without this, none of the report's rows would match and every file would get a second row.
    The inputs are walked again without ``--absolute-paths`` (the walk is deterministic) and each
    file takes its relative name; the new rows keep the report's relative style, so the report
    stays one style (and can still be resumed, sharded and merged). The other way round (a
    report of absolute paths resumed without the flag) can't be told apart from a first run
    that named files by absolute paths, so it is left as it is and the stale-rows warning says so.
    (This one case holds a name per file in memory.)
    """
    if not (config.inputs.absolute_paths and existing.rows and existing.absolute_rows < existing.rows):
        return None
    other = discover(replace(config.inputs, absolute_paths=False))
    console.print(
        f"resume: {markup(config.report.out)} was written with relative paths (without --absolute-paths); "
        "matching its rows by file and writing the new rows with relative paths too",
        highlight=False,
        soft_wrap=True,
    )
    return {f.path: f.display for f in other.files}


def _redo_heatmaps(
    classifier: Engine,
    heatmaps: HeatmapWriter,
    files: Iterable[InputFile],
    existing: Existing,
    console: Console,
    quiet: bool,
) -> None:
    """``resume`` with heatmaps: make again the heatmaps of kept ok rows that are missing or empty
    (a killed run, a full disk). Their rows are kept as they are; only the heatmaps are written."""
    kept_ok = [f for f in files if f.display in existing.paths and f.display not in existing.error_paths]
    redo = set(heatmaps.missing(f.display for f in kept_ok))
    if not redo:
        return
    if not quiet:
        console.print(f"resume: making {len(redo)} missing or empty heatmap(s) of kept rows again", highlight=False)
    batches = classifier.iter_batches([f for f in kept_ok if f.display in redo])
    with closing(batches):
        for batch in batches:
            heatmaps.write(batch)
