"""``classify --engine ray``: the same decoding, preprocessing and ONNX model, run by Ray Data actors.

The file list becomes a dataset (one row per file: its index, the path to open and the report
path); ``map_batches`` runs :class:`_Worker`, a class-based worker holding one onnxruntime
session per actor (a :class:`cxr_batch.engine.classifier.Classifier`, so decoding, preprocessing, error
rows and the out-of-distribution flag are exactly those of a local run). Results stream back
to the driver in input order and go through the same report writer, so the report, ``--resume``
and the summary are those of a local run.

The model is resolved and its contract read on the driver (``--model``, ``$CXR_BATCH_MODEL`` or
the embedded default), then its bytes are shipped to the actors: workers on other machines need
cxr-batch installed but not the model file. The images are opened by the workers, so on a
cluster every node must see them at the same path (a shared file system).

Ray is an optional extra (``pip install "cxr-batch[ray]"``) imported only here, inside functions.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from cxr_batch.contract import FileDigest, ModelMeta
from cxr_batch.engine.classifier import Classifier, EngineConfig, Result
from cxr_batch.engine.lungs import LungSegmenter
from cxr_batch.engine.model import model_sha256, open_model, screening_in_use
from cxr_batch.engine.session import CPU, CUDA, cuda_possible
from cxr_batch.errors import CxrBatchError, DeviceError, MissingExtraError
from cxr_batch.io.inputs import InputFile
from cxr_batch.io.safe_open import MAX_MODEL_BYTES, read_bounded

#: Model batches per Ray task (by default). Each task has a fixed cost in Ray Data; with 16 the
#: tiny model ran 257 images/s on two actors against 158 with 4 (1,500 X-rays, this 2-core
#: machine), and the worker's decoder threads run ahead of the model within a task as in a local run.
TASK_BATCHES = 16
#: Ray Data settings turned off during a run: its progress bars would fight ours on stderr.
_QUIET = ("enable_progress_bars", "print_on_execution_start")


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide to run; built from ``--engine ray`` and ``--ray-address``."""

    #: a Ray cluster to join (``ray://host:10001``, ``host:6379`` or ``auto``); None starts Ray on this machine
    address: str | None = None
    #: actors to start; None: one per GPU with ``device="cuda"``, else one per ``cpus_per_actor`` CPUs
    actors: int | None = None
    #: CPUs a Ray started here may use (None: all of them); ignored with ``address``
    num_cpus: int | None = None
    #: files per Ray task (the unit streamed back and written); None: ``TASK_BATCHES`` model batches
    task_size: int | None = None

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ValueError("actors must be at least 1")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError("num_cpus must be at least 1")
        if self.task_size is not None and self.task_size < 1:
            raise ValueError("task_size must be at least 1")


def require_ray() -> None:
    """Check that Ray Data is installed, without importing it (that takes a second).

    Raises:
        MissingExtraError: ray or pyarrow is missing.
    """
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None:
        raise MissingExtraError("--engine ray", "ray", "ray[data]")


def _import_ray() -> Any:
    require_ray()
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingExtraError("--engine ray", "ray", "ray[data]") from None
    return ray


# --------------------------------------------------------------------------- transport


def _dump(r: Result) -> str:
    """A result as JSON (exact: floats by repr; names that are not UTF-8 as ``\\udcNN``).

    Every field but ``outputs`` (extra model outputs, which classify doesn't ask for) and
    ``lung_mask`` (for heatmaps, which run locally): a field
    added to :class:`Result` later travels too, or fails loudly if it isn't JSON.
    """
    skip = ("outputs", "lung_mask")  # arrays: extra outputs and the lung mask (heatmaps run locally)
    return json.dumps({f.name: getattr(r, f.name) for f in fields(r) if f.name not in skip}, ensure_ascii=True)


def _load(text: str) -> Result:
    return Result(**json.loads(text))


def _encode(name: str) -> bytes:
    """Arrow strings must be UTF-8; file names need not be, so they travel as bytes."""
    return name.encode("utf-8", "surrogateescape")


def _decode(raw: bytes) -> str:
    return bytes(raw).decode("utf-8", "surrogateescape")


class _Worker:
    """One Ray actor: one onnxruntime session, the local engine's decoder threads."""

    def __init__(
        self, model_bytes: bytes, model_name: str, engine: EngineConfig, lungs_bytes: bytes | None = None
    ) -> None:
        folder = tempfile.mkdtemp(prefix="cxr-ray-")
        try:
            path = os.path.join(folder, model_name)
            with open(path, "wb") as fh:
                fh.write(model_bytes)
            lungs_path = None
            if lungs_bytes is not None:  # the driver's segmenter, as the model: the same file everywhere
                lungs_path = os.path.join(folder, "lungs.onnx")
                with open(lungs_path, "wb") as fh:
                    fh.write(lungs_bytes)
            # onnxruntime holds the whole model in memory once the session exists; the driver
            # already chose the file (and its precision), so load exactly this one.
            # hash_model=False: the driver hashed the file; an actor never needs its digest
            self.classifier = Classifier.from_config(
                replace(engine, model=path, precision="auto", lungs_model=lungs_path), hash_model=False
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [
            InputFile(_decode(p), _decode(d), error=_decode(e) or None)
            for p, d, e in zip(batch["path"], batch["display"], batch["error"], strict=True)
        ]
        results = [r for chunk in self.classifier.iter_batches(items) for r in chunk]
        return {
            "index": np.asarray(batch["index"]),
            "result": np.array([_dump(r) for r in results], dtype=object),
            "provider": np.array([self.classifier.provider] * len(results), dtype=object),
        }


# --------------------------------------------------------------------------- driver


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a ``HOST:PORT`` (or ``ray://HOST:PORT``) nobody listens on: Ray retries for minutes.

    ``auto`` and other forms are left to Ray.
    """
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise CxrBatchError(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}; check --ray-address "
            "(the head node's HOST:6379, or ray://HOST:10001 for Ray Client)"
        ) from None


def _library_error(exc: BaseException) -> CxrBatchError | None:
    """The package error behind a Ray task failure (Ray wraps it, sometimes twice)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, CxrBatchError):
            # RayTaskError(ModelError) is a ModelError too, but its text is a traceback.
            cause = getattr(current, "cause", None)
            return cause if isinstance(cause, CxrBatchError) else current
        current = getattr(current, "cause", None) or current.__cause__
    return None


class RayEngine:
    """Runs :class:`Classifier` in Ray Data actors; the same :class:`~cxr_batch.engine.types.Engine`
    as the local engine, for ``run_classify`` and the provenance record.

    Args:
        engine: the model and how to run it (``batch_size`` is the model batch in each actor;
            ``threads`` the onnxruntime threads, and CPUs reserved, per actor; 0 means 1).
        config: the cluster to join (or none) and the number of actors.

    Raises:
        MissingExtraError: Ray Data is not installed.
        ModelError, NoDefaultModelError: the model can't be found, loaded or validated.
    """

    def __init__(self, engine: EngineConfig, config: RayConfig) -> None:
        require_ray()
        self.engine = engine
        self.config = config
        # The workers load what is chosen here. With device auto, the choice (int8 or fp32 on CPU,
        # by its flags; fp16 with CUDA) follows this machine; use --device cuda for a GPU cluster.
        cuda = cuda_possible(engine.device)
        # The same resolution, checks and load-time self-check as a local run (fallback to fp32
        # included), on this machine's CPU; the workers then load exactly the file chosen here.
        loaded = open_model(replace(engine, threads=1), session_device="cpu", cuda=cuda)
        self._meta: ModelMeta = loaded.meta
        #: the precision in use and why; what the user must be told once
        self.precision_reason = loaded.reason
        self.notices = loaded.notices
        self.model_path = loaded.path
        #: ``--model``, ``$CXR_BATCH_MODEL`` or ``embedded default``: the driver chose the file
        self.model_origin = loaded.origin
        #: the file's sha256, being computed in the background since the file was chosen
        self._digest = loaded.digest if loaded.digest is not None else FileDigest(loaded.path)
        del loaded  # the driver's session: the workers make their own
        #: the lung segmenter the workers run (checked here; its file travels to them)
        #: the segmenter the workers run: the lung stage's, or the one a lung-crop classifier needs
        self.lungs: LungSegmenter | None = None
        if engine.lungs or self._meta.crop is not None:
            self.lungs = LungSegmenter(engine.lungs_model)
        self.cpus_per_actor = max(1, engine.threads)
        self.actors = 0
        self._providers: set[str] = set()

    #: which engine this is (:class:`~cxr_batch.engine.types.Engine`)
    kind = "ray"

    @property
    def meta(self) -> ModelMeta:
        return self._meta

    @property
    def model_sha256(self) -> str:
        """The model file's sha256, hashed once on the driver (in the background from the load on).

        Raises:
            ModelError: the file can't be read any more.
        """
        return model_sha256(self._digest)

    def run_settings(self) -> dict[str, Any]:
        """The settings the actors run with (for the provenance record): CPUs reserved per actor."""
        return {"cpus_per_actor": self.cpus_per_actor}

    @property
    def segmenter(self) -> LungSegmenter | None:
        """The lung segmenter the workers run (the lung stage's, or a lung-crop classifier's crop)."""
        return self.lungs

    @property
    def screening(self) -> dict[str, Any] | None:
        """The screening call the workers make (the local engine's :func:`screening_in_use`)."""
        return screening_in_use(self._meta, self.engine.covid_threshold, str(self.model_path))

    @property
    def provider(self) -> str:
        """The execution providers the actors ran, e.g. ``CPUExecutionProvider on Ray (2 actors)``."""
        used = ", ".join(sorted(self._providers)) or (CUDA if self.engine.device == "cuda" else CPU)
        return (
            f"{used} on Ray ({self.actors} actor{'s' if self.actors != 1 else ''})" if self.actors else f"{used} on Ray"
        )

    @property
    def task_size(self) -> int:
        return self.config.task_size or self.engine.batch_size * TASK_BATCHES

    def _actor_count(self, ray: Any, files: int) -> int:
        if self.config.actors is not None:
            return self.config.actors
        resources = ray.cluster_resources()
        if self.engine.device == "cuda":
            wanted = int(resources.get("GPU", 0))
            if wanted < 1:
                raise DeviceError(
                    "--device cuda with --engine ray: the Ray cluster has no GPUs; "
                    "join a cluster with GPUs (--ray-address) or use --device cpu"
                )
        else:
            wanted = max(1, int(resources.get("CPU", 1)) // self.cpus_per_actor)
        return max(1, min(wanted, math.ceil(files / self.task_size)))  # no actor without a task

    def _start(self, ray: Any) -> bool:
        """Start or join Ray unless this process already did; returns whether to shut it down after."""
        if ray.is_initialized():
            return False
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            # Ray's own notices (token authentication, progress bars off, "execution finished")
            # would bury the summary; errors still show, and failures raise.
            "logging_level": logging.ERROR,
            "log_to_driver": False,  # worker log lines would break the report on --out - and the summary
        }
        if self.config.address:
            _check_reachable(self.config.address)
        try:
            if self.config.address:
                ray.init(address=self.config.address, **kwargs)
            else:
                # "local" always starts a new Ray here, even when $RAY_ADDRESS names a cluster.
                ray.init(address="local", num_cpus=self.config.num_cpus, **kwargs)
        except Exception as exc:  # Ray raises plain Exception, ConnectionError, RuntimeError, ...
            where = (
                f"join the Ray cluster at {self.config.address}" if self.config.address else "start Ray on this machine"
            )
            raise CxrBatchError(
                f"could not {where}: {exc} (check the address and that the cluster runs the same Ray "
                "version; a busy machine can time out starting Ray: retry, or use --engine local)"
            ) from exc
        return True

    def iter_batches(self, files: Iterable[InputFile]) -> Generator[list[Result], None, None]:
        """Yield the results in input order, a list per finished Ray batch (each written and flushed).

        ``files`` is made a list first: Ray Data builds its dataset from one.

        Starts (or joins) Ray on the first ``next`` and shuts it down at the end, unless Ray was
        already running in this process.

        Raises:
            ModelError, DeviceError: a worker could not load or run the model.
            CxrBatchError: the Ray run failed for another reason.
        """
        ray = _import_ray()
        data_log = logging.getLogger("ray.data")
        level = data_log.level
        data_log.setLevel(logging.ERROR)
        # Ray Data's settings are global to the process: set ours for this run, then put them back.
        ctx = ray.data.DataContext.get_current()
        saved = {name: getattr(ctx, name) for name in _QUIET if hasattr(ctx, name)}
        saved_order = ctx.execution_options.preserve_order
        started = False
        files = list(files)
        try:
            started = self._start(ray)
            if not files:
                return
            for name in saved:
                setattr(ctx, name, False)
            ctx.execution_options.preserve_order = True  # the reorder buffer in _run stays small
            yield from self._run(ray, files)
        finally:
            if started:
                ray.shutdown()
            for name, value in saved.items():
                setattr(ctx, name, value)
            ctx.execution_options.preserve_order = saved_order
            data_log.setLevel(level)

    def _run(self, ray: Any, files: Sequence[InputFile]) -> Iterable[list[Result]]:
        self.actors = self._actor_count(ray, len(files))
        ds = ray.data.from_items(
            [
                {"index": i, "path": _encode(f.path), "display": _encode(f.display), "error": _encode(f.error or "")}
                for i, f in enumerate(files)
            ]
        )
        # No actor restarts: Ray Data passes each actor its transformer and context as object-store
        # references, and with restarts on (its default) Ray's core worker logs an error line about
        # "constructor arguments in the object store" on every run (ray-project/ray#53727). A
        # crashed actor now ends the run with an error, like a crash of a local run; the rows
        # written so far are kept (--resume).
        remote: dict[str, Any] = {"num_cpus": self.cpus_per_actor, "max_restarts": 0}
        if self.engine.device == "cuda":
            remote["num_gpus"] = 1
        worker_engine = replace(
            self.engine, threads=self.cpus_per_actor, decode_workers=self.engine.decode_workers or self.cpus_per_actor
        )
        with warnings.catch_warnings():  # the driver's main thread, before any decoding starts
            # Recent Ray deprecates passing remote options such as max_restarts as keywords, with
            # no replacement for them yet.
            warnings.filterwarnings("ignore", message=r".*ray_remote_args.* is deprecated")
            ds = ds.map_batches(
                _Worker,
                fn_constructor_kwargs={
                    "model_bytes": read_bounded(self.model_path, MAX_MODEL_BYTES, what="the model file"),
                    "model_name": self.model_path.name,
                    "engine": worker_engine,
                    "lungs_bytes": None if self.lungs is None else self.lungs.path.read_bytes(),
                },
                batch_size=self.task_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=self.actors),
                **remote,
            )
        pending: dict[int, Result] = {}
        next_index = 0
        try:
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                self._providers.update(str(p) for p in out["provider"])
                for index, text in zip(out["index"], out["result"], strict=True):
                    pending[int(index)] = _load(str(text))
                ready: list[Result] = []
                while next_index in pending:
                    ready.append(pending.pop(next_index))
                    next_index += 1
                if ready:
                    yield ready
        except Exception as exc:
            cause = _library_error(exc)
            if cause is not None:
                raise cause from None
            raise CxrBatchError(f"the Ray run failed: {type(exc).__name__}: {exc}") from exc
        if next_index != len(files):
            raise CxrBatchError(f"the Ray run returned {next_index} of {len(files)} results")
