"""The classify engine's :class:`Classifier`: decoder threads, inference streams, results in order.

Pipeline: a small pool of decoder threads runs :func:`cxr_batch.io.preprocess.preprocess_file`
ahead of the model (Pillow and numpy release the GIL), at most ``(streams + 2) * batch_size +
workers`` files queued, decoded or in a batch not yet returned, so memory stays flat whether the
input holds 10 files or 1,000,000 (each decoded file is held as one small model-sized tensor).
Batches go through onnxruntime in inference threads, ahead of the caller, so whatever the caller
does with a batch (writing and syncing the report) overlaps the next batches' inference. On a CPU,
two batches ("streams") run at once, each in its own session with half the cores. Results come out
in input order, one per file: a file that can't be decoded becomes an error result, never an
exception. Measurements behind these choices: ``benchmarks/RESULTS.md``.

Which model file runs and how it is loaded lives in :mod:`cxr_batch.engine.model`, onnxruntime
sessions in :mod:`cxr_batch.engine.session`, the decode stage in :mod:`cxr_batch.engine.pipeline`;
their names are importable from here too, as before.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr_batch.contract import SCREEN_LABEL, ModelMeta
from cxr_batch.engine.cpu import default_workers, physical_cores, usable_cpus
from cxr_batch.engine.model import AUTO_ORDER as AUTO_ORDER
from cxr_batch.engine.model import DEFAULT_MODEL_FILES as DEFAULT_MODEL_FILES
from cxr_batch.engine.model import MODEL_ENV as MODEL_ENV
from cxr_batch.engine.model import LoadedModel as LoadedModel
from cxr_batch.engine.model import ModelChoice as ModelChoice
from cxr_batch.engine.model import apply_self_check as apply_self_check
from cxr_batch.engine.model import auto_order as auto_order
from cxr_batch.engine.model import choose_model as choose_model
from cxr_batch.engine.model import default_model_dirs as default_model_dirs
from cxr_batch.engine.model import find_default_model as find_default_model
from cxr_batch.engine.model import load_model as load_model
from cxr_batch.engine.model import meta_dict as meta_dict
from cxr_batch.engine.model import model_card as model_card
from cxr_batch.engine.model import model_info as model_info
from cxr_batch.engine.model import open_model as open_model
from cxr_batch.engine.model import package_model_dirs as package_model_dirs
from cxr_batch.engine.model import precision_reason as precision_reason
from cxr_batch.engine.model import screening_in_use as screening_in_use
from cxr_batch.engine.pipeline import Prepared, apply_verdict, as_input, prepare, stack_tensors
from cxr_batch.engine.postprocess import softmax
from cxr_batch.engine.selfcheck import CheckResult
from cxr_batch.engine.session import CPU as CPU
from cxr_batch.engine.session import CUDA as CUDA
from cxr_batch.engine.session import CUDA_HELP as CUDA_HELP
from cxr_batch.engine.session import _ort_errors as _ort_errors
from cxr_batch.engine.session import available_providers as available_providers
from cxr_batch.engine.session import create_session as create_session
from cxr_batch.engine.session import cuda_possible as cuda_possible
from cxr_batch.engine.session import default_streams as default_streams
from cxr_batch.engine.types import DEFAULT_BATCH_SIZE as DEFAULT_BATCH_SIZE
from cxr_batch.engine.types import DEVICES as DEVICES
from cxr_batch.engine.types import MAX_BATCH_BYTES as MAX_BATCH_BYTES
from cxr_batch.engine.types import PRECISIONS as PRECISIONS
from cxr_batch.engine.types import Device as Device
from cxr_batch.engine.types import EngineConfig as EngineConfig
from cxr_batch.engine.types import Precision as Precision
from cxr_batch.engine.types import Result as Result
from cxr_batch.engine.types import bounded_batch
from cxr_batch.errors import ModelError
from cxr_batch.io.inputs import InputFile

if TYPE_CHECKING:
    import onnxruntime as ort

    from cxr_batch.engine.lungs import LungSegmenter

#: the decode stage's batch stacking, under the name tests and benchmarks used
_stack = stack_tensors


class Classifier:
    """Classify chest X-ray files with an ONNX model that carries the cxr-batch contract.

    Example::

        from cxr_batch import Classifier

        clf = Classifier()  # the embedded default model, CUDA when it really works, else CPU
        for r in clf.classify(["a.png", "b.dcm"]):
            print(r.path, r.status, r.label, r.confidence, r.error)

    Args:
        model: an ONNX file; None takes ``$CXR_BATCH_MODEL``, else the embedded default.
        device: "auto" (CUDA when it really starts, else CPU), "cpu" or "cuda".
        precision: for the embedded default only: "auto" (:data:`~cxr_batch.engine.cpu.PRECISION_AUTO_RULE`),
            "fp32", "int8", "fp16".
        batch_size: images per onnxruntime call.
        threads: onnxruntime threads in all; 0 = one per physical core.
        decode_workers: decoder threads; None = one per core, at most 8.
        extra_outputs: contract output roles to return in ``Result.outputs`` ("features", "embedding").
        streams: batches run at once, each in its own session; 0 = :func:`default_streams`.
        lungs: run the lung stage first (``lung_fraction``, ``assessable``; a film that is not
            assessable gets no label; the lung crop for a model trained on it).
        lungs_model: the segmenter file; None takes ``$CXR_BATCH_LUNGS``, else the embedded one.

    Raises:
        ModelError: the model is missing, unloadable or breaks the contract.
        NoDefaultModelError: no model named and none installed.
        DeviceError: ``device="cuda"`` without a working CUDA provider.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        device: Device = "auto",
        *,
        precision: Precision = "auto",
        batch_size: int = DEFAULT_BATCH_SIZE,
        threads: int = 0,
        decode_workers: int | None = None,
        extra_outputs: Sequence[str] = (),
        streams: int = 0,
        lungs: bool = True,
        lungs_model: str | os.PathLike[str] | None = None,
    ) -> None:
        config = EngineConfig(
            model=None if model is None else os.fspath(model),
            device=device,
            precision=precision,
            batch_size=batch_size,
            threads=threads,
            decode_workers=decode_workers,
            extra_outputs=tuple(extra_outputs),
            streams=streams,
            lungs=lungs,
            lungs_model=None if lungs_model is None else os.fspath(lungs_model),
        )
        self._init(config)

    @classmethod
    def from_config(cls, config: EngineConfig, *, hash_model: bool = True) -> Classifier:
        """Build from an :class:`EngineConfig` (what the CLI does).

        ``hash_model=False``: the model file is hashed only when :attr:`model_sha256` is asked for
        (a Ray actor never asks); by default it is hashed in the background while the load goes on.
        """
        self = cls.__new__(cls)
        self._init(config, hash_model=hash_model)
        return self

    #: which engine this is (:class:`~cxr_batch.engine.types.Engine`)
    kind = "local"

    def _init(self, config: EngineConfig, *, hash_model: bool = True) -> None:
        self.config = config
        total = config.threads or physical_cores() or usable_cpus()
        cuda = cuda_possible(config.device)
        #: batches run at once, each in its own session of ``_threads`` threads (see default_streams)
        self._streams = max(1, min(config.streams or default_streams(total, cuda), total))
        self._threads = total // self._streams if self._streams > 1 else config.threads
        self._loaded = load_model(replace(config, threads=self._threads), hash_model=hash_model)
        #: the lung stage's segmenter (None: ``lungs=False``)
        self.lungs: LungSegmenter | None = None
        from cxr_batch.engine.lungs import LungSegmenter

        if config.lungs:
            self.lungs = LungSegmenter(config.lungs_model)
        #: the segmenter the decoder threads run: the lung stage's, or (``lungs=False``) the one a
        #: classifier trained on lung crops still needs for its crop, its verdicts then dropped
        self._crop_lungs = self.lungs
        if self._crop_lungs is None and self._loaded.meta.crop is not None:
            self._crop_lungs = LungSegmenter(config.lungs_model)
        if self._loaded.provider == CUDA:
            self._streams = 1
        # Sessions not running a batch. The first is the one load_model made; the others are
        # made on first use, in the inference thread that needs one, overlapping the first batch.
        self._idle: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        self._made = 0
        self._made_lock = threading.Lock()
        meta = self._loaded.meta
        #: the batch size that runs: the requested one, smaller for large inputs (MAX_BATCH_BYTES)
        self._batch = bounded_batch(config.batch_size, meta.input_size)
        self._batch_notice: tuple[str, ...] = ()
        if self._batch < config.batch_size:
            self._batch_notice = (
                f"the model's input is {meta.input_size[0]}×{meta.input_size[1]}: batches of {self._batch} "
                f"images, not {config.batch_size}, to keep each batch's input under "
                f"{MAX_BATCH_BYTES >> 20} MiB",
            )
        self._output_names = [meta.outputs["logits"], *(meta.outputs[r] for r in config.extra_outputs)]
        # A model with an out-of-distribution guard in its graph (cxr_batch.training.ood) scores every
        # image for free; the contract's ``ood.threshold`` decides ``in_distribution``.
        self._ood_index: int | None = None
        self._ood_threshold: float | None = None
        if "ood_score" in meta.outputs:
            self._ood_index = len(self._output_names)
            self._output_names.append(meta.outputs["ood_score"])
            self._ood_threshold = meta.ood_threshold
        #: the screening call (the report's covid_screen): label, threshold, where it came from
        self._screening = screening_in_use(meta, config.covid_threshold, str(self._loaded.path))
        self._screen_index = meta.labels.index(SCREEN_LABEL) if self._screening else -1

    @property
    def meta(self) -> ModelMeta:
        """The model's contract."""
        return self._loaded.meta

    @property
    def labels(self) -> tuple[str, ...]:
        return self._loaded.meta.labels

    @property
    def segmenter(self) -> LungSegmenter | None:
        """The lung segmenter that runs (the lung stage's, or a lung-crop classifier's crop); None: none."""
        return self._crop_lungs

    @property
    def screening(self) -> dict[str, Any] | None:
        """The screening operating point in use (:func:`screening_in_use`); None when no call is made."""
        return self._screening

    @property
    def provider(self) -> str:
        """The execution provider that runs the model (e.g. ``CPUExecutionProvider``)."""
        return self._loaded.provider

    @property
    def model_path(self) -> Path:
        return self._loaded.path

    @property
    def model_origin(self) -> str:
        """``--model``, ``$CXR_BATCH_MODEL`` or ``embedded default``."""
        return self._loaded.origin

    @property
    def model_sha256(self) -> str:
        """The model file's sha256: hashed once, in the background from the load on.

        Raises:
            ModelError: the file can't be read any more.
        """
        return self._loaded.sha256()

    @property
    def precision_reason(self) -> str:
        """The precision in use and why, e.g. ``fp32: AMD EPYC has no VNNI, ...``."""
        return self._loaded.reason

    @property
    def notices(self) -> tuple[str, ...]:
        """What the user must be told once: a fallback to fp32 after a failed self-check."""
        return (*self._loaded.notices, *self._batch_notice)

    @property
    def self_check(self) -> CheckResult | None:
        """The load-time self-check's result (None: the model's contract has no reference images)."""
        return self._loaded.check

    def run_settings(self) -> dict[str, Any]:
        """The batch and thread settings as they really run (for the provenance record)."""
        cfg = self.config
        return {
            "batch_size": self._batch,
            "threads_requested": cfg.threads,
            "streams": self._streams,
            "threads_per_stream": self._threads or physical_cores() or None,  # None: onnxruntime's default
            "decode_workers": cfg.decode_workers or default_workers(),
        }

    def classify(self, paths: Iterable[InputFile | str | os.PathLike[str]]) -> Iterator[Result]:
        """Yield one :class:`Result` per path, in input order. ``paths`` may be a lazy iterator."""
        for batch in self.iter_batches(paths):
            yield from batch

    def classify_file(self, path: str | os.PathLike[str]) -> Result:
        """Classify one file."""
        return next(self.classify([path]))

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The logits for already preprocessed tensors (N, 3, H, W), run in the batches, streams and
        sessions :meth:`classify` uses, with no decoding: the ceiling for classify's throughput."""

        def run(chunk: np.ndarray) -> np.ndarray:
            session = self._acquire()
            try:
                if self._loaded.provider == CUDA:
                    return np.asarray(self._run_bound(session, chunk)[0])
                return np.asarray(session.run(self._output_names, {self.meta.input_name: chunk})[0])
            finally:
                self._idle.put(session)

        size = self._batch
        chunks = [x[i : i + size] for i in range(0, len(x), size)]
        with ThreadPoolExecutor(max_workers=self._streams, thread_name_prefix="cxr-infer") as runner:
            outs = list(runner.map(run, chunks))
        return np.concatenate(outs) if outs else np.zeros((0, len(self.meta.labels)), np.float32)

    def iter_batches(self, paths: Iterable[InputFile | str | os.PathLike[str]]) -> Generator[list[Result], None, None]:
        """Like :meth:`classify`, one list per model batch (what the CLI writes and flushes at once)."""
        spec = self.meta.spec
        workers = self.config.decode_workers or default_workers()
        size = self._batch
        # Files queued or decoded beyond the batch being collected. With ``streams`` batches
        # running and one waiting for the caller, at most (streams + 2) * size + workers files
        # are held at any time. A batch made smaller for large inputs also bounds the decoders'
        # lead (each decoded image is up to MAX_BATCH_BYTES / size).
        ahead = size + (min(workers, size) if size < self.config.batch_size else workers)
        it = iter(paths)
        pending: deque[Future[Prepared]] = deque()
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cxr-decode")
        exhausted = False

        def top_up() -> None:
            nonlocal exhausted
            while not exhausted and len(pending) < ahead:
                try:
                    item = as_input(next(it))
                except StopIteration:
                    exhausted = True
                    return
                pending.append(
                    pool.submit(prepare, item, spec, self._crop_lungs, self.meta.crop, self.lungs is not None)
                )

        # Inference threads (one per stream), ahead of the caller: while the caller writes batch k,
        # the next batches run (onnxruntime releases the GIL). Each thread keeps its batch input
        # array in ``buffers``: a fresh 10-20 MB array per batch costs thousands of page faults.
        streams = self._streams
        runner = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="cxr-infer")
        buffers = threading.local()
        running: deque[Future[list[Result]]] = deque()
        try:
            top_up()
            while pending:
                batch: list[Prepared] = []
                while pending and len(batch) < size:
                    while running and running[0].done():  # a slow input never holds back a result
                        yield running.popleft().result()
                    batch.append(pending.popleft().result())
                    top_up()
                running.append(runner.submit(self._run, batch, buffers))
                while len(running) > streams:
                    yield running.popleft().result()
            while running:
                yield running.popleft().result()
        finally:
            runner.shutdown(wait=True, cancel_futures=True)
            pool.shutdown(wait=True, cancel_futures=True)

    def _acquire(self) -> ort.InferenceSession:
        """An idle session; the streams' extra sessions are created on first use."""
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._made_lock:
            index, self._made = self._made, min(self._made + 1, self._streams)
        if index == 0:
            return self._loaded.session
        if index < self._streams:
            return create_session(self._loaded.path, self.config.device, self._threads)[0]
        return self._idle.get()

    def _run(self, batch: list[Prepared], buffers: threading.local | None = None) -> list[Result]:
        meta = self.meta
        ident = meta.ident
        results = [
            Result(
                path=p.item.display,
                file=p.item.path,
                status="error",
                model=ident,
                width=p.width,
                height=p.height,
                error=p.error,
                notes=p.notes,
                fields=p.fields,
            )
            for p in batch
        ]
        ready = [i for i, p in enumerate(batch) if p.tensor is not None]
        if not ready:
            return results
        buffer = None if buffers is None else buffers.__dict__.setdefault("array", [])
        x = stack_tensors([t for t in (batch[i].tensor for i in ready) if t is not None], buffer)
        try:
            session = self._acquire()
            try:
                if self._loaded.provider == CUDA:
                    outs = self._run_bound(session, x)
                else:
                    outs = session.run(self._output_names, {meta.input_name: x})
            finally:
                self._idle.put(session)
        except _ort_errors() as exc:
            raise ModelError(f"{self.model_path}: inference failed: {exc}") from None
        logits = np.asarray(outs[0])
        if logits.shape != (len(ready), len(meta.labels)):
            raise ModelError(
                f"{self.model_path}: the logits output has shape {list(logits.shape)}, "
                f"expected [{len(ready)}, {len(meta.labels)}]"
            )
        finite = np.isfinite(logits).all(axis=1)
        probs = softmax(np.where(finite[:, None], logits, 0.0))
        for row, i in enumerate(ready):
            r = results[i]
            if not finite[row]:
                r.error = "the model returned non-finite scores (NaN or infinity) for this image"
                continue
            p = probs[row]
            top = int(np.argmax(p))
            r.status = "ok"
            r.label = meta.labels[top]
            r.confidence = float(p[top])
            r.probs = {label: float(v) for label, v in zip(meta.labels, p, strict=True)}
            r.outputs = {
                role: np.asarray(out)[row]
                for role, out in zip(
                    self.config.extra_outputs, outs[1 : 1 + len(self.config.extra_outputs)], strict=True
                )
            }
            if self._ood_index is not None:
                score = float(np.asarray(outs[self._ood_index]).reshape(len(ready), -1)[row, 0])
                r.ood_score = score
                if self._ood_threshold is not None and np.isfinite(score):
                    r.in_distribution = score <= self._ood_threshold
            if batch[i].not_radiograph:
                r.in_distribution = False
            apply_verdict(r, batch[i])
            if self._screening is not None and r.assessable is not False:  # no call on a film that is not assessable
                positive = p[self._screen_index] >= self._screening["threshold"]
                r.covid_screen = "positive" if positive else "negative"
        return results

    def _run_bound(self, session: ort.InferenceSession, x: np.ndarray) -> list[np.ndarray]:
        """CUDA only: run through IO binding. The input goes to the GPU in one copy and only the
        outputs we read come back; the model's other outputs (layer4 maps) never leave the GPU."""
        binding = session.io_binding()
        binding.bind_cpu_input(self.meta.input_name, x)
        for name in self._output_names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())
