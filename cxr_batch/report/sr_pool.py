"""SRs off the critical path: ``classify --sr`` builds and saves SRs in a pool of worker processes.

Building an SR with highdicom and saving it is pure Python (tens of milliseconds an image, several
times the model's time): in the run's own thread it made ``--sr`` 3-5 times slower. The run hands
each classified batch to :class:`SRPool` and goes on classifying; worker processes (not threads:
the work holds the GIL) run :meth:`cxr_batch.report.sr.SRWriter.make` (each fills its SRs in
from templates, :mod:`cxr_batch.report.sr_template`), and STOW-RS requests go
from one thread of this process (they wait on the network, not on the CPU).

Rows stay exact and in order: a batch's rows are written only once the outcome of each of its
SRs (and of its STOW-RS request) is known and noted in its rows, batches leave the pool in the
order they entered it, and the counts (:attr:`SRWriter.stats`) are kept in this process. So a
run killed with SRs in flight has written no row for their files, and ``--resume`` classifies
them again (an SR's UIDs derive from its image and the model, so writing it again replaces the
same file). Memory stays bounded: at most ``max_pending`` batches wait for their SRs; when the
SRs fall behind, the run waits for the oldest batch instead of queueing more.

Workers are started with ``spawn`` (never ``fork``: the run has onnxruntime and decoder threads
running), so each imports pydicom and highdicom once (about a second, while the first batches
are classified).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cxr_batch.engine.types import Result
    from cxr_batch.report.sr import BuiltSR, ModelIdent, SRWriter

#: The SR writer of a worker process (set by :func:`_init_worker`).
_WORKER: SRWriter | None = None
_KEEP: bool = False


def _init_worker(folder: str, model: ModelIdent, keep: bool) -> None:
    global _WORKER, _KEEP
    import signal
    import warnings

    from cxr_batch.report.sr import SRWriter

    # Ctrl-C reaches the whole process group: the run stops the pool itself, and a worker must
    # not print a traceback. Nothing a worker warns about may reach the terminal either (a
    # library warning can quote a patient element): its outcome goes back in the row's note.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.simplefilter("ignore")

    _WORKER = SRWriter(folder, model)
    _KEEP = keep


def _make(r: Result) -> tuple[str | None, str | None, bytes | None]:
    """In a worker: (SOP instance UID, error, the SR's bytes when it is to be stored) of one result."""
    assert _WORKER is not None
    sr, error = _WORKER.make(r)
    if sr is None:
        return None, error, None
    return sr.uid, None, sr.data if _KEEP else None


def default_workers() -> int:
    """Half the CPUs (at least one): the model and the decoders need the rest."""
    return max(1, (os.cpu_count() or 1) // 2)


@dataclass
class _Pending:
    batch: list[Result]
    made: list[tuple[Result, Future[tuple[str | None, str | None, bytes | None]]]]
    recorded: bool = False
    stored: list[tuple[Result, BuiltSR]] = field(default_factory=list)
    stow: Future[list[str | None]] | None = None


class SRPool:
    """Batches in, the same batches out (in order) once their SR outcomes are in their rows.

    Args:
        writer: the run's :class:`SRWriter` (its folder, model, ``store`` and :attr:`~SRWriter.stats`).
        workers: worker processes (default :func:`default_workers`).
        max_pending: batches in the pool at most (default: twice the workers, plus two).
    """

    def __init__(self, writer: SRWriter, workers: int | None = None, max_pending: int | None = None) -> None:
        self.writer = writer
        self.workers = workers or default_workers()
        self.max_pending = max_pending or 2 * self.workers + 2
        self._pending: deque[_Pending] = deque()
        self._processes = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(str(writer.folder), writer.model, writer.store is not None),
        )
        self._stow = ThreadPoolExecutor(max_workers=1) if writer.store is not None else None

    def submit(self, batch: list[Result]) -> None:
        """Hand one classified batch to the pool (its rows wait for :meth:`ready`)."""
        from cxr_batch.report.sr import wants_sr

        made = []
        for r in batch:
            if wants_sr(r):
                # Only what make() reads crosses to the worker: no model outputs, no notes.
                light = replace(r, notes=[], outputs={}, fields=dict(r.fields), lung_mask=None)
                made.append((r, self._processes.submit(_make, light)))
        self._pending.append(_Pending(batch, made))

    def ready(self, wait_all: bool = False) -> Iterator[list[Result]]:
        """The oldest batches whose SR outcomes are known, in order, with their notes in place.

        Waits for the oldest batch while more than ``max_pending`` are in the pool (or for every
        batch with ``wait_all``); otherwise yields only the batches that are done.
        """
        for entry in self._pending:
            self._advance(entry, block=False)  # start the STOW-RS of every batch whose SRs are made
        while self._pending:
            block = wait_all or len(self._pending) > self.max_pending
            if not self._advance(self._pending[0], block):
                return
            yield self._pending.popleft().batch

    def _advance(self, entry: _Pending, block: bool) -> bool:
        """Move one batch on as far as it goes; True once its rows can be written."""
        if not entry.recorded:
            futures = [f for _, f in entry.made]
            if not block and not all(f.done() for f in futures):
                return False
            wait_futures(futures)
            from cxr_batch.report.sr import BuiltSR

            for r, future in entry.made:
                uid, error, data = _outcome(future)
                if self.writer.record(r, uid, error) and uid is not None and data is not None:
                    entry.stored.append((r, BuiltSR(uid, data)))
            entry.recorded = True
            if self._stow is not None and entry.stored:
                store = self.writer.store
                entry.stow = self._stow.submit(store, [(sr.uid, sr.data) for _, sr in entry.stored])
        if entry.stow is not None:
            if not block and not entry.stow.done():
                return False
            self.writer.record_stored(entry.stored, _stow_outcome(entry.stow, len(entry.stored)))
            entry.stow = None
        return True

    def close(self, cancel: bool = False) -> None:
        """Stop the workers; ``cancel`` drops the SRs not started yet (an interrupted run)."""
        self._processes.shutdown(wait=not cancel, cancel_futures=cancel)
        if self._stow is not None:
            self._stow.shutdown(wait=not cancel, cancel_futures=cancel)


def _outcome(future: Future[tuple[str | None, str | None, Any]]) -> tuple[str | None, str | None, Any]:
    try:
        return future.result()
    except Exception as exc:  # a worker that died (BrokenProcessPool), an SR that can't be pickled
        return None, f"cannot build the SR: {type(exc).__name__}: {exc}", None


def _stow_outcome(future: Future[list[str | None]], count: int) -> Sequence[str | None]:
    try:
        return future.result()
    except Exception as exc:  # store() catches the client's errors itself; anything else, per SR
        return [f"STOW-RS failed: {type(exc).__name__}: {exc}"] * count
