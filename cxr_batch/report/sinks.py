"""The run's outputs as sinks: what ``classify`` does with each batch of results, and at the end.

Each output (the report and its summary tally, the heatmaps, the SRs, the DICOMweb spool, the
provenance record) is a :class:`BatchSink`. ``run_classify`` builds the list once and, per batch
written, calls :meth:`BatchSink.write_batch` on each in order; when the run stops on an exception,
:meth:`BatchSink.fail`; in its ``finally``, :meth:`BatchSink.close` (every sink, even when one
fails); after the summary, :meth:`BatchSink.report`. A new output is a new sink, not another
branch of ``run_classify``.

Order matters and is the list's: the report first (the provenance record counts its rows), the
spool release after the heatmaps (which may read the retrieved file), the provenance record last
(it is closed once the report is, so it counts synced rows).

The SRs are made before the rows are written (their outcome goes into the row's notes), so they
are a stage in front of the sinks (:class:`SRStage`), which may hand batches back later
(made in worker processes), always in order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rich.console import Console

    from cxr_batch.engine.types import Engine, Result
    from cxr_batch.io.dicomweb import DicomwebSource
    from cxr_batch.report.heatmap import HeatmapWriter
    from cxr_batch.report.provenance import RunRecorder
    from cxr_batch.report.sr import SRWriter
    from cxr_batch.report.sr_pool import SRPool
    from cxr_batch.report.writer import ReportWriter, RunStats


class BatchSink(Protocol):
    """One output of a run."""

    def write_batch(self, batch: Sequence[Result]) -> None:
        """Take a batch of results, in input order (the report's rows are written by the first sink)."""
        ...

    def fail(self, exc: BaseException) -> None:
        """The run stops on ``exc`` (before :meth:`close`)."""
        ...

    def close(self) -> str | None:
        """Finish the output (idempotent); a warning for the user, or None.

        Raises:
            OutputError: the output can't be completed.
        """
        ...

    def report(self, console: Console, quiet: bool) -> int:
        """Tell the user what was written (after the summary); returns the outputs that failed."""
        ...


class Sink:
    """A sink that does nothing at each step: the outputs override what they need."""

    def write_batch(self, batch: Sequence[Result]) -> None:
        pass

    def fail(self, exc: BaseException) -> None:
        pass

    def close(self) -> str | None:
        return None

    def report(self, console: Console, quiet: bool) -> int:
        return 0


class ReportSink(Sink):
    """The report's rows (the writer of :mod:`cxr_batch.report.writer`) and the summary's tally."""

    def __init__(self, writer: ReportWriter, stats: RunStats) -> None:
        self.writer = writer
        self.stats = stats

    def write_batch(self, batch: Sequence[Result]) -> None:
        self.writer.write(batch)
        self.stats.add(batch)

    def close(self) -> str | None:
        try:
            self.writer.close()
        finally:
            self.stats.finish()
        return None


class HeatmapSink(Sink):
    """A class-activation heatmap PNG per classified image (``--heatmaps``)."""

    def __init__(self, heatmaps: HeatmapWriter) -> None:
        self.heatmaps = heatmaps

    def write_batch(self, batch: Sequence[Result]) -> None:
        self.heatmaps.write(batch)

    def close(self) -> str | None:
        self.heatmaps.close()
        return None

    def report(self, console: Console, quiet: bool) -> int:
        self.heatmaps.report(console, quiet=quiet)
        return 0


class SRSink(Sink):
    """The SRs' end: closing the writer and telling what was written (their making is :class:`SRStage`)."""

    def __init__(self, srs: SRWriter) -> None:
        self.srs = srs

    def close(self) -> str | None:
        self.srs.close()
        return None

    def report(self, console: Console, quiet: bool) -> int:
        self.srs.close()
        self.srs.report(console, quiet=quiet)
        return len(self.srs.stats.failures)


class SpoolSink(Sink):
    """The DICOMweb source's spool: each retrieved instance is released once its row is written."""

    def __init__(self, source: DicomwebSource) -> None:
        self.source = source

    def write_batch(self, batch: Sequence[Result]) -> None:
        self.source.release(batch)

    def close(self) -> str | None:
        self.source.close()
        return None

    def report(self, console: Console, quiet: bool) -> int:
        """Raises DicomwebError when a retrieval failed: the run is not complete."""
        if self.source.fatal is not None:
            from cxr_batch.io.dicomweb import DicomwebError

            raise DicomwebError(self.source.fatal)
        return 0


class ProvenanceSink(Sink):
    """The provenance record: counts each batch written, records how the run ended; closed last."""

    def __init__(self, recorder: RunRecorder, engine: Engine) -> None:
        self.recorder = recorder
        self.engine = engine

    def write_batch(self, batch: Sequence[Result]) -> None:
        self.recorder.add(batch)

    def fail(self, exc: BaseException) -> None:
        self.recorder.note_exception(exc)

    def close(self) -> str | None:
        self.recorder.set_provider(self.engine.provider)  # Ray: known once the workers have reported
        return self.recorder.close()  # after the report is closed: the record counts synced rows


def write_batch(sinks: Sequence[BatchSink], batch: Sequence[Result]) -> None:
    """``batch`` to every sink, in order."""
    for sink in sinks:
        sink.write_batch(batch)


def fail(sinks: Sequence[BatchSink], exc: BaseException) -> None:
    """The run stops on ``exc``: every sink is told."""
    for sink in sinks:
        sink.fail(exc)


def close(sinks: Sequence[BatchSink]) -> list[str]:
    """Close every sink in order, even when one raises (the first error is raised once all are
    closed); returns their warnings."""
    warnings: list[str] = []
    error: BaseException | None = None
    for sink in sinks:
        try:
            problem = sink.close()
        except BaseException as exc:
            if error is None:
                error = exc
            continue
        if problem is not None:
            warnings.append(problem)
    if error is not None:
        raise error
    return warnings


def report(sinks: Sequence[BatchSink], console: Console, quiet: bool) -> int:
    """Each sink tells what it wrote, in order; returns the outputs that failed, in all."""
    return sum(sink.report(console, quiet) for sink in sinks)


class SRStage:
    """The SRs, made before their rows are written (each SR's outcome goes into its row's notes).

    With an :class:`~cxr_batch.report.sr_pool.SRPool`, worker processes build them off the critical
    path and batches come back later, still in order; without, each batch's SRs are made in this
    thread before its rows. With neither (no ``--sr``), batches pass straight through.
    """

    def __init__(self, srs: SRWriter | None = None, pool: SRPool | None = None) -> None:
        self.srs = srs
        self.pool = pool

    def feed(self, batch: list[Result]) -> Iterator[list[Result]]:
        """The batches ready to be written once ``batch`` is in (none, it, or earlier ones)."""
        if self.pool is not None:
            self.pool.submit(batch)  # SRs off the critical path: rows follow in order
            yield from self.pool.ready()
            return
        if self.srs is not None:
            self.srs.write(batch)  # first: its notes go into the rows
        yield batch

    def drain(self) -> Iterator[list[Result]]:
        """The batches still in the pool, once their SRs are made."""
        if self.pool is not None:
            yield from self.pool.ready(wait_all=True)

    def close(self, cancel: bool) -> None:
        """Stop the pool's workers (``cancel``: on an error, drop the SRs not started)."""
        if self.pool is not None:
            self.pool.close(cancel=cancel)
