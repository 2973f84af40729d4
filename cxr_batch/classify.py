"""``classify`` as a library call: discover → load the model → open the report → run → summarise.

The CLI builds a :class:`ClassifyConfig` from its options and calls :func:`run_classify`;
pipelines can do the same, or use :class:`cxr_batch.Classifier` directly.
"""

from __future__ import annotations

import os
from contextlib import closing
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, BinaryIO

from rich.console import Console

from cxr_batch.contract import CAM_ROLE, file_sha256
from cxr_batch.engine.classifier import Classifier, EngineConfig
from cxr_batch.errors import InputError, OutputError
from cxr_batch.io.inputs import ACCEPTED_SUFFIXES, InputFile, InputSpec, discover
from cxr_batch.io.shard import Shard
from cxr_batch.report import provenance
from cxr_batch.report.heatmap import HeatmapWriter
from cxr_batch.report.progress import progress_bar
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
    from cxr_batch.engine.ray import RayConfig, RayEngine
    from cxr_batch.io.dicomweb import DicomwebConfig, DicomwebSource
    from cxr_batch.report.sr import SRWriter


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
    source: DicomwebSource | None = None
    if config.dicomweb is not None:
        from cxr_batch.io.dicomweb import DicomwebSource

        source = DicomwebSource(config.dicomweb)
        found = source.discover()
    else:
        # The run's own outputs are never inputs, even inside an input folder (issue 12, item 6).
        outputs = tuple(p for p in (config.report.out, config.heatmaps, config.sr) if p is not None and p != "-")
        found = discover(replace(config.inputs, outputs=(*config.inputs.outputs, *outputs)))
    for warning in found.warnings:
        console.print(f"[yellow]warning:[/] {markup(warning)}", highlight=False, soft_wrap=True)
    if not found.files and source is not None:
        source.close()
        raise InputError(f"no image instances found on {source.url} for the given --study/--series/--query")
    if not found.files:
        where = ", ".join([*config.inputs.paths, *(["--files-from"] if config.inputs.listed else [])]) or "(none)"
        raise InputError(
            f"no input files found in {where}: looked for {', '.join(sorted(ACCEPTED_SUFFIXES))} "
            "and DICOM files (hidden files and folders are skipped; check --include/--exclude/--no-recursive)"
        )
    files = found.files
    shard = config.shard
    if shard is not None:
        # An empty shard is not an error: with N larger than a folder, some shards get no files,
        # and a job array task must still succeed (it writes a report with no rows).
        files = [f for f in files if shard.owns(f.display)]
        if not config.quiet:
            console.print(f"shard {shard}: {len(files)} of {len(found.files)} files", highlight=False)

    classifier: Classifier | RayEngine
    if config.ray is not None:
        from cxr_batch.engine.ray import RayEngine

        classifier = RayEngine(config.engine, config.ray)
    else:
        engine = config.engine
        if config.heatmaps is not None and CAM_ROLE not in engine.extra_outputs:
            engine = replace(engine, extra_outputs=(*engine.extra_outputs, CAM_ROLE))
        classifier = Classifier.from_config(engine)  # a model without the 'cam' output fails here
    meta = classifier.meta
    identity = RunIdentity(meta.ident, file_sha256(classifier.model_path), meta.precision)
    for notice in classifier.notices:  # once, whatever --quiet says: the model in use changed
        console.print(f"[yellow]notice:[/] {markup(notice)}", highlight=False, soft_wrap=True)
    heatmaps = HeatmapWriter(config.heatmaps, meta.labels) if config.heatmaps is not None else None
    run_id = provenance.new_run_id() if record is not None else None
    recorder: provenance.RunRecorder | None = None
    srs: SRWriter | None = None
    if config.sr is not None:
        from cxr_batch.report.sr import ModelIdent, SRWriter

        if not isinstance(classifier, Classifier):
            raise InputError("--sr needs --engine local")
        store = source.store if (config.stow and source is not None) else None
        srs = SRWriter(config.sr, ModelIdent.of(meta, file_sha256(classifier.model_path)), store=store)
    try:
        writer, existing = open_report(config.report, meta.labels, identity, stdout, run_id=run_id)
        offset = None if config.report.to_stdout else os.path.getsize(config.report.out)  # this run's rows start here
    except BaseException:
        if heatmaps is not None:
            heatmaps.close()
        raise
    stats = RunStats(labels=meta.labels, model=meta.ident, provider=classifier.provider, drop_ood=config.drop_ood)
    stats.precision_note = classifier.precision_reason
    try:
        files = _in_report_style(files, existing, config, console)
        if shard is not None:
            foreign = sorted(p for p in existing.paths if not shard.owns(p))
            if foreign:
                raise OutputError(
                    f"{config.report.out} holds {len(foreign)} row(s) of other shards than {shard} "
                    f"(first: {foreign[0]!r}); resume each shard into its own report"
                )
        todo = [f for f in files if f.display not in existing.paths]
        stats.kept, stats.kept_errors = existing.rows, existing.errors
        if record is not None and run_id is not None:
            recorder = provenance.start_classifier_run(
                record,
                run_id,
                classifier,
                config.engine,
                config.report,
                (f.display for f in files),
                shard=shard,
                kept_rows=existing.rows,
                started=started,
                report_offset=offset,
                ray=config.ray is not None,
                source=source.describe() if source is not None else None,
            )
        if existing.truncated:
            console.print(
                f"resume: removed a partial last row ({existing.truncated} bytes) left by an interrupted run",
                highlight=False,
                soft_wrap=True,
            )
        stale = existing.rows - (len(files) - len(todo))
        if stale > 0:
            console.print(
                f"[yellow]warning:[/] {stale} row(s) of {markup(config.report.out)} are not among this run's inputs "
                "(resume with the same inputs and --absolute-paths setting as the first run)",
                highlight=False,
                soft_wrap=True,
            )
        show = console.is_terminal and not config.quiet
        with progress_bar(console, len(todo), show, "classify", "img/s") as advance:
            if source is None:
                batches = classifier.iter_batches(todo)
            elif isinstance(classifier, Classifier):
                batches = classifier.iter_batches(source.retrieve(todo))
            else:
                raise InputError("--dicomweb needs --engine local")
            with closing(batches):  # on Ctrl-C, stop the decoder threads now
                for batch in batches:
                    if srs is not None:
                        srs.write(batch)  # first: its notes go into the rows
                    writer.write(batch)
                    stats.add(batch)
                    if recorder is not None:
                        recorder.add(batch)
                    if heatmaps is not None:
                        heatmaps.write(batch)
                    if source is not None:
                        source.release(batch)
                    advance(len(batch))
        if heatmaps is not None and existing.rows:
            _redo_heatmaps(classifier, heatmaps, files, existing, console, config.quiet)
        stats.provider = classifier.provider  # Ray: known once the workers have reported
    except BaseException as exc:
        if recorder is not None:
            recorder.note_exception(exc)
        raise
    finally:
        try:
            writer.close()
        finally:
            if heatmaps is not None:
                heatmaps.close()
            if source is not None:
                source.close()
            stats.finish()
            if recorder is not None:
                recorder.set_provider(classifier.provider)
                problem = recorder.close()  # after the report is closed: the record counts synced rows
                if problem is not None:
                    console.print(f"[yellow]warning:[/] {markup(problem)}", highlight=False, soft_wrap=True)
    if not config.quiet:
        render_summary(stats, console)  # it says so itself when the films look unlike the training data
    elif stats.unlike_training:
        warning = unlike_training_warning(stats.assessable_flagged, stats.assessable)
        console.print(f"[yellow]warning:[/] {markup(warning)}", highlight=False, soft_wrap=True)
    if heatmaps is not None:
        heatmaps.report(console, quiet=config.quiet)
    if srs is not None:
        srs.report(console, quiet=config.quiet)
    if source is not None and source.fatal is not None:
        from cxr_batch.io.dicomweb import DicomwebError

        raise DicomwebError(source.fatal)
    return stats


def _in_report_style(
    files: list[InputFile], existing: Existing, config: ClassifyConfig, console: Console
) -> list[InputFile]:
    """``--resume --absolute-paths`` on a report written with relative paths: name the files as
    the report does.

    Without this, none of the report's rows would match and every file would get a second row.
    The inputs are walked again without ``--absolute-paths`` (the walk is deterministic) and each
    file takes its relative name; the new rows keep the report's relative style, so the report
    stays one style (and can still be resumed, sharded and merged). The other way round (a
    report of absolute paths resumed without the flag) can't be told apart from a first run
    that named files by absolute paths, so it is left as it is and the stale-rows warning says so.
    """
    if not (config.inputs.absolute_paths and existing.rows and existing.absolute_rows < existing.rows):
        return files
    other = discover(replace(config.inputs, absolute_paths=False))
    names = {f.path: f.display for f in other.files}
    console.print(
        f"resume: {markup(config.report.out)} was written with relative paths (without --absolute-paths); "
        "matching its rows by file and writing the new rows with relative paths too",
        highlight=False,
        soft_wrap=True,
    )
    return [InputFile(f.path, names.get(f.path, f.display)) for f in files]


def _redo_heatmaps(
    classifier: Classifier | RayEngine,
    heatmaps: HeatmapWriter,
    files: list[InputFile],
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
