"""The classify engine: model resolution, the onnxruntime session and :class:`Classifier`.

Pipeline: a small pool of decoder threads runs :func:`cxr_batch.io.preprocess.preprocess_file`
ahead of the model (Pillow and numpy release the GIL), at most ``(streams + 2) * batch_size +
workers`` files queued, decoded or in a batch not yet returned, so memory stays flat whether the
input holds 10 files or 1,000,000 (each decoded file is held as one small model-sized tensor).
Batches go through onnxruntime in inference threads, ahead of the caller, so whatever the caller
does with a batch (writing and syncing the report) overlaps the next batches' inference. On a CPU,
two batches ("streams") run at once, each in its own session with half the cores. Results come out
in input order, one per file: a file that can't be decoded becomes an error result, never an
exception. Measurements behind these choices: ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr_batch.contract import (
    SCREEN_LABEL,
    FileDigest,
    ModelMeta,
    check_output_shapes,
    file_sha256,
    int8_gate_verdict,
    read_contract,
)
from cxr_batch.engine.cpu import cpu_facts, default_workers, int8_choice, physical_cores, usable_cpus
from cxr_batch.engine.postprocess import softmax
from cxr_batch.engine.selfcheck import CheckResult, run_self_check
from cxr_batch.engine.types import DEFAULT_BATCH_SIZE as DEFAULT_BATCH_SIZE
from cxr_batch.engine.types import DEVICES as DEVICES
from cxr_batch.engine.types import MAX_BATCH_BYTES as MAX_BATCH_BYTES
from cxr_batch.engine.types import PRECISIONS as PRECISIONS
from cxr_batch.engine.types import Device as Device
from cxr_batch.engine.types import EngineConfig as EngineConfig
from cxr_batch.engine.types import Precision as Precision
from cxr_batch.engine.types import Result as Result
from cxr_batch.engine.types import bounded_batch
from cxr_batch.errors import DeviceError, ImageError, ModelError, NoDefaultModelError
from cxr_batch.io.inputs import InputFile
from cxr_batch.io.lungs import LungVerdict, preprocess_file_lungs
from cxr_batch.io.preprocess import PreprocessSpec

if TYPE_CHECKING:
    import onnxruntime as ort

    from cxr_batch.engine.lungs import LungSegmenter

#: The environment variable that names a model when ``--model`` is not given.
MODEL_ENV = "CXR_BATCH_MODEL"
#: The embedded default models (``export/`` in the source tree, ``cxr_batch.models`` installed).
DEFAULT_MODEL_FILES = {"fp32": "cxr-resnet18.onnx", "int8": "cxr-resnet18-int8.onnx", "fp16": "cxr-resnet18-fp16.onnx"}
#: What ``--precision auto`` takes, first installed wins: int8 runs 3x faster than fp32 on CPUs
#: with 8-bit dot products (VNNI, AMX, ARM dot product; :func:`cxr_batch.engine.cpu.int8_choice`),
#: fp32 is as fast and exact on the others; fp16 uses the GPU's tensor cores; fp16 on a CPU is
#: emulated, so it comes last there. See :func:`auto_order`.
AUTO_ORDER = {
    "cpu": ("int8", "fp32", "fp16"),
    "cpu-no-int8": ("fp32", "int8", "fp16"),
    "cuda": ("fp16", "fp32", "int8"),
}

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

CUDA_HELP = (
    "To run on the GPU, install onnxruntime-gpu instead of onnxruntime "
    "(pip uninstall onnxruntime && pip install onnxruntime-gpu) with the CUDA and cuDNN major versions "
    "that onnxruntime-gpu release was built for (CUDA 12.x and cuDNN 9.x for current releases; "
    "'pip install \"onnxruntime-gpu[cuda,cudnn]\"' installs them from PyPI), and check that the NVIDIA "
    "driver works (nvidia-smi). Requirements: "
    "https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements. "
    "Or use --device cpu."
)


def default_streams(threads: int, cuda: bool) -> int:
    """Batches in onnxruntime at once: 1 on CUDA (one GPU, one queue); on a CPU, 2 when there are
    at least 2 threads. Two half-size sessions keep every core busy through each other's serial
    stretches and never wait at a parallel-for barrier for a core a decoder thread took."""
    return 1 if cuda or threads < 2 else 2


# --------------------------------------------------------------------------- model resolution


@dataclass(frozen=True)
class ModelChoice:
    """Which model file to load, and why."""

    path: Path
    #: "--model", "$CXR_BATCH_MODEL" or "embedded default"
    origin: str


def default_model_dirs() -> list[Path]:
    """Where the embedded default models may be: the installed ``cxr_batch.models`` package,
    then ``<repo>/export/`` when running from a source tree."""
    return package_model_dirs()


def package_model_dirs() -> list[Path]:
    """:func:`default_model_dirs`' answer, for the lung segmenter too (tests replace the former only)."""
    dirs: list[Path] = []
    try:
        from importlib.resources import files

        found = files("cxr_batch.models")
        if isinstance(found, Path):
            dirs.append(found)
        else:  # a MultiplexedPath (namespace package) or a zip; only real folders can be used
            with contextlib.suppress(Exception):
                candidate = Path(str(found))
                if candidate.is_dir():
                    dirs.append(candidate)
    except ModuleNotFoundError:
        pass
    source_tree = Path(__file__).resolve().parents[2] / "export"  # cxr_batch/engine/ -> the repository
    if source_tree.is_dir():
        dirs.append(source_tree)
    unique: list[Path] = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def auto_order(cuda: bool = False) -> tuple[str, ...]:
    """The precisions ``--precision auto`` tries, first installed wins: fp16 first on CUDA; on a
    CPU int8 first only when the CPU has 8-bit dot products (:func:`~cxr_batch.engine.cpu.int8_choice`)."""
    if cuda:
        return AUTO_ORDER["cuda"]
    return AUTO_ORDER["cpu"] if int8_choice()[0] else AUTO_ORDER["cpu-no-int8"]


def find_default_model(precision: Precision = "auto", cuda: bool = False) -> Path:
    """The embedded default model file for ``precision``.

    ``auto`` takes the fp16 model on CUDA when it is installed; on a CPU the int8 model when the
    CPU has 8-bit dot products (VNNI, AMX, ARM dot product) and it is installed; the fp32 master
    otherwise (see :func:`auto_order`).

    Raises:
        NoDefaultModelError: no default model is installed (or not the precision asked for).
    """
    for folder in default_model_dirs():
        files = {p: folder / name for p, name in DEFAULT_MODEL_FILES.items()}
        have = [p for p, f in files.items() if f.is_file()]
        if not have:
            continue
        if precision == "auto":
            return files[next(p for p in auto_order(cuda) if p in have)]
        if precision in have:
            return files[precision]
        raise NoDefaultModelError(
            f"the embedded {precision} model ({DEFAULT_MODEL_FILES[precision]}) is not installed in {folder}; "
            "use --precision auto, or pass a model with --model PATH"
        )
    raise NoDefaultModelError(
        "no model given and no default model is installed: pass --model PATH (an ONNX model with the "
        f"cxr-batch contract) or set {MODEL_ENV}=PATH. This build of cxr-batch ships without "
        f"{DEFAULT_MODEL_FILES['fp32']}; 'cxr-batch export' creates one."
    )


def choose_model(
    model: str | os.PathLike[str] | None, precision: Precision = "auto", cuda: bool = False
) -> ModelChoice:
    """``model``, else ``$CXR_BATCH_MODEL``, else the embedded default.

    Raises:
        ModelError: the named file does not exist.
        NoDefaultModelError: nothing named and no default installed.
    """
    if model is not None:
        path, origin = Path(model), "--model"
    elif os.environ.get(MODEL_ENV):
        path, origin = Path(os.environ[MODEL_ENV]), f"${MODEL_ENV}"
    else:
        return ModelChoice(find_default_model(precision, cuda), "embedded default")
    if not path.exists():
        raise ModelError(f"model file not found: {path} (from {origin})")
    if path.is_dir():
        raise ModelError(f"{path} (from {origin}) is a folder; pass the .onnx file")
    return ModelChoice(path, origin)


# --------------------------------------------------------------------------- sessions


def _ort_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's exception classes (they derive from Exception directly), plus the Python ones."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = (
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "NoModel",
        "EngineError",
        "RuntimeException",
        "InvalidProtobuf",
        "ModelLoaded",
        "NotImplemented",
        "InvalidGraph",
        "EPFail",
    )
    found = tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))
    return (*found, RuntimeError, ValueError, OSError)


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build offers."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def cuda_possible(device: Device, providers: list[str] | None = None) -> bool:
    """Whether to choose for CUDA (the model it prefers, its stream count): ``device="cuda"``, or
    ``"auto"`` with a CUDA provider in this onnxruntime build (``providers``, default
    :func:`available_providers`). Whether CUDA really starts is checked by :func:`create_session`."""
    if device == "cuda":
        return True
    return device == "auto" and CUDA in (available_providers() if providers is None else providers)


def create_session(
    path: str | os.PathLike[str], device: Device = "auto", threads: int = 0
) -> tuple[ort.InferenceSession, str]:
    """Load ``path`` in onnxruntime on ``device``; returns the session and the provider that runs it.

    onnxruntime silently falls back to CPU when the CUDA libraries don't load, so the providers
    the session really got are checked after creating it.

    Raises:
        ModelError: the file is not a loadable ONNX model.
        DeviceError: ``device="cuda"`` and CUDA is not really available.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: the CUDA fallback is reported by us, in words
    # One graph, run op after op on all physical cores: ResNet-18 has no parallel branches worth
    # an inter-op pool, and SMT siblings add nothing to these convolution kernels.
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = threads or physical_cores() or 0
    # No busy-waiting between ops and batches: the decoder threads need those cycles
    # (measured: spinning lowers classify's throughput; benchmarks/RESULTS.md).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")

    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise DeviceError(
            f"--device cuda: this onnxruntime ({ort.__version__}) has no CUDA support "
            f"(providers: {', '.join(available)}). {CUDA_HELP}"
        )
    providers = [CUDA, CPU] if cuda_possible(device, available) else [CPU]
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except _ort_errors() as exc:
        raise ModelError(f"{path}: cannot load the model: {exc}") from None
    active = session.get_providers()
    if device == "cuda" and (not active or active[0] != CUDA):
        raise DeviceError(
            "--device cuda: onnxruntime-gpu is installed but the CUDA provider failed to start "
            "(usually CUDA or cuDNN libraries missing or of the wrong version), so onnxruntime fell back "
            f"to {', '.join(active)}. {CUDA_HELP}"
        )
    return session, (active[0] if active else CPU)


@dataclass
class LoadedModel:
    """A validated model, ready to run."""

    session: ort.InferenceSession
    meta: ModelMeta
    path: Path
    origin: str
    provider: str
    #: the precision in use and why (``fp32: AMD EPYC has no VNNI ...``)
    reason: str = ""
    #: what the user must be told once (a fallback to fp32)
    notices: tuple[str, ...] = ()
    #: the load-time self-check (None: the contract has no reference images)
    check: CheckResult | None = None
    #: the file's sha256, computed once (started in the background when the file was chosen)
    digest: FileDigest | None = None

    def sha256(self) -> str:
        """The model file's sha256 (hashed once, whoever asks first)."""
        if self.digest is None:
            self.digest = FileDigest(self.path)
        return self.digest.hexdigest()


def screening_in_use(meta: ModelMeta, covid_threshold: float | None, source: str = "model") -> dict[str, Any] | None:
    """The screening call the ``covid_screen`` column makes: ``--covid-threshold`` when given, else
    the contract's operating point; ``{"label", "threshold", "source"}``, or None (no call).

    Raises:
        ModelError: ``--covid-threshold`` with a model that has no ``covid`` label.
    """
    if covid_threshold is not None:
        if SCREEN_LABEL not in meta.labels:
            raise ModelError(
                f"{source}: --covid-threshold needs a model with a '{SCREEN_LABEL}' label (it has {list(meta.labels)})"
            )
        return {"label": SCREEN_LABEL, "threshold": float(covid_threshold), "source": "--covid-threshold"}
    if meta.screening is not None and meta.screening.label == SCREEN_LABEL:
        return {"label": SCREEN_LABEL, "threshold": meta.screening.threshold, "source": "model contract"}
    return None


def precision_reason(meta: ModelMeta, origin: str, precision: Precision, provider: str) -> str:
    """Why this model's precision is the one in use, in one line."""
    if origin != "embedded default":
        return f"{meta.precision}: the file's own (from {origin})"
    if precision != "auto":
        return f"{meta.precision}: --precision {precision}"
    if provider == CUDA:
        return f"{meta.precision}: on CUDA" + (
            " (the GPU's tensor cores)" if meta.precision == "fp16" else ", no fp16 model installed"
        )
    use_int8, why = int8_choice()
    if (meta.precision == "int8") == use_int8:
        return why
    return f"{meta.precision}: the {'int8' if use_int8 else 'fp32'} model is not installed; " + why.split(": ", 1)[1]


def open_model(
    config: EngineConfig, session_device: Device | None = None, cuda: bool | None = None, *, hash_model: bool = True
) -> LoadedModel:
    """Resolve, load and validate the model ``config`` names, then run its self-check
    (:func:`apply_self_check`): what ``classify``, ``evaluate`` and the Ray driver share.

    Args:
        session_device: the device of the session made here (default ``config.device``).
        cuda: whether to choose the model CUDA prefers (default: CUDA is possible here).
        hash_model: start hashing the chosen file in a background thread, overlapping the rest of
            the load (:attr:`LoadedModel.digest`); False hashes it only if someone asks (a Ray actor never does).

    Raises:
        ModelError, NoDefaultModelError: see :func:`choose_model` and :func:`read_contract`;
            also a failed self-check that can't fall back.
        DeviceError: see :func:`create_session`.
    """
    device = config.device if session_device is None else session_device
    for_cuda = cuda_possible(config.device) if cuda is None else cuda
    choice = choose_model(config.model, config.precision, cuda=for_cuda)
    session, provider = create_session(choice.path, device, config.threads)
    if (
        choice.origin == "embedded default"
        and config.precision == "auto"
        and provider != CUDA
        and for_cuda
        and device != "cpu"
    ):
        # CUDA was expected but did not start: take the CPU's default instead.
        on_cpu = find_default_model("auto", cuda=False)
        if on_cpu != choice.path:
            choice = ModelChoice(on_cpu, choice.origin)
            session, provider = create_session(choice.path, device, config.threads)
    meta = read_contract(session, str(choice.path))
    if choice.origin != "embedded default" and config.precision != "auto" and meta.precision != config.precision:
        raise ModelError(
            f"{choice.path} is a {meta.precision} model but --precision {config.precision} was asked; "
            "--precision picks between the embedded default models, so leave it at auto with --model"
        )
    reason_provider = CUDA if (cuda is not None and cuda) else provider
    gate_reason = ""
    if choice.origin == "embedded default" and config.precision == "auto" and meta.precision == "int8":
        passed, why = int8_gate_verdict(meta)
        if not passed:  # the int8 file is not as faithful as fp32: auto takes the fp32 master
            with contextlib.suppress(NoDefaultModelError):
                fp32 = find_default_model("fp32")
                if fp32 != choice.path:
                    choice = ModelChoice(fp32, choice.origin)
                    session, provider = create_session(choice.path, device, config.threads)
                    meta = read_contract(session, str(choice.path))
                    gate_reason = f"fp32: the int8 model did not pass the export gate ({why}) (--precision auto)"
    loaded = LoadedModel(
        session=session,
        meta=meta,
        path=choice.path,
        origin=choice.origin,
        provider=provider,
        reason=gate_reason or precision_reason(meta, choice.origin, config.precision, reason_provider),
        # the file is chosen: hash it while the self-check, the output check and the segmenter load
        digest=FileDigest(choice.path).start() if hash_model else FileDigest(choice.path),
    )
    return apply_self_check(loaded, config, device, hash_model=hash_model)


def apply_self_check(
    loaded: LoadedModel, config: EngineConfig, device: Device | None = None, *, hash_model: bool = True
) -> LoadedModel:
    """Run the contract's reference images (:mod:`cxr_batch.engine.selfcheck`) and act on the result.

    Passed, or a contract without references: ``loaded``, with the result. Failed: under
    ``--precision auto`` with the embedded default, the embedded fp32 model instead (when it
    passes), with a notice for the user; otherwise (``--precision int8``/``fp16`` asked,
    ``--model`` or ``$CXR_BATCH_MODEL``, or fp32 failing itself) a ModelError naming the
    deviation and the way out.
    """
    check = run_self_check(loaded.session, loaded.meta)
    loaded = replace(loaded, check=check)
    if check is None or check.ok:
        return loaded
    precision = loaded.meta.precision
    if loaded.origin == "embedded default" and config.precision == "auto" and precision != "fp32":
        with contextlib.suppress(NoDefaultModelError):
            fp32 = find_default_model("fp32")
            if fp32 != loaded.path:
                session, provider = create_session(fp32, config.device if device is None else device, config.threads)
                meta = read_contract(session, str(fp32))
                fp32_check = run_self_check(session, meta)
                if fp32_check is None or fp32_check.ok:
                    notice = (
                        f"the {precision} model {loaded.path.name} gives wrong results on this machine "
                        f"({check.describe()}); using the fp32 model {fp32.name} instead"
                    )
                    return LoadedModel(
                        session=session,
                        meta=meta,
                        path=fp32,
                        origin=loaded.origin,
                        provider=provider,
                        reason=f"fp32: the {precision} model failed its self-check here (--precision auto)",
                        notices=(*loaded.notices, notice),
                        check=fp32_check,
                        digest=FileDigest(fp32).start() if hash_model else FileDigest(fp32),
                    )
    if precision == "fp32":
        way_out = "the file is damaged or was changed after export: reinstall it or export it again"
    else:
        way_out = (
            f"run with --precision fp32 (the embedded fp32 model), or pass the fp32 master with --model; "
            f"{precision} kernels of this CPU or onnxruntime build don't compute it as exported, or the file is damaged"
        )
    raise ModelError(
        f"{loaded.path}: the {precision} model gives wrong results on this machine: {check.describe()}. {way_out}"
    )


def load_model(config: EngineConfig, *, hash_model: bool = True) -> LoadedModel:
    """Resolve, load, validate and self-check the model ``config`` names (see :func:`open_model`),
    with the extra outputs ``config`` asks for.

    Raises:
        ModelError, NoDefaultModelError: see :func:`choose_model` and :func:`read_contract`.
        DeviceError: see :func:`create_session`.
    """
    loaded = open_model(config, hash_model=hash_model)
    meta, path = loaded.meta, loaded.path
    for role in config.extra_outputs:
        if role not in meta.outputs:
            hint = (
                ", so it can't make heatmaps (it still classifies without --heatmaps). Add the output to the "
                "model file, no retraining needed (needs the train extra): cxr-batch add-cam MODEL.onnx"
                if role == "cam"
                else ""
            )
            raise ModelError(f"{path}: the model has no '{role}' output (it has {sorted(meta.outputs)}){hint}")
    check_output_shapes(loaded.session, meta, config.extra_outputs, str(path))  # one tiny run (issue 12)
    return loaded


def model_info(model: str | os.PathLike[str] | None = None, precision: Precision = "auto") -> dict[str, Any]:
    """What ``cxr-batch info`` prints: the contract, sha256, graph inputs/outputs, providers, the
    CPU and the precision ``auto`` takes on it, and the model's self-check run here (reported, not
    enforced: ``classify`` and ``evaluate`` act on it).

    Raises:
        ModelError, NoDefaultModelError: the model can't be found, loaded or validated.
    """
    choice = choose_model(model, precision)
    session, _ = create_session(choice.path, "cpu", threads=0)
    meta = read_contract(session, str(choice.path))
    check = run_self_check(session, meta)

    def shape(s: Sequence[object]) -> list[object]:
        return [d if isinstance(d, int) else str(d) for d in s]

    return {
        "path": str(choice.path),
        "origin": choice.origin,
        "sha256": file_sha256(choice.path),
        "size_bytes": choice.path.stat().st_size,
        "model": meta.ident,
        "card": model_card(choice.path, meta),
        "contract": meta_dict(meta),
        "inputs": [{"name": i.name, "type": i.type, "shape": shape(i.shape)} for i in session.get_inputs()],
        "outputs": [{"name": o.name, "type": o.type, "shape": shape(o.shape)} for o in session.get_outputs()],
        "providers_available": available_providers(),
        "cpu": cpu_facts().as_dict(),
        "precision": {
            "in_use": meta.precision,
            "why": precision_reason(meta, choice.origin, precision, CPU),
            "auto_on_this_cpu": int8_choice()[1],
        },
        "self_check": None
        if check is None
        else {
            "passed": check.ok,
            "images": check.images,
            "deviation": check.deviation,
            "tolerance": check.tolerance,
            "max_prob_diff": check.max_prob_diff,
            "seconds": round(check.seconds, 4),
            "summary": check.describe(),
            "in_words": check.in_words(meta.precision),
        },
    }


def model_card(path: Path, meta: ModelMeta) -> str | None:
    """The model card beside a model file (``<file stem>.md``, else ``<contract name>.md``), or None."""
    for name in (f"{path.stem}.md", f"{meta.name}.md"):
        card = path.parent / name
        if card.is_file():
            return str(card)
    return None


def meta_dict(meta: ModelMeta) -> dict[str, Any]:
    """The contract as a plain JSON-ready dict."""
    import json

    loaded: dict[str, Any] = json.loads(meta.to_json())
    return loaded


# --------------------------------------------------------------------------- results


@dataclass
class _Prepared:
    item: InputFile
    tensor: np.ndarray | None = None
    width: int | None = None
    height: int | None = None
    notes: list[str] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    not_radiograph: str | None = None
    verdict: LungVerdict | None = None


def _prepare(
    item: InputFile,
    spec: PreprocessSpec,
    lungs: LungSegmenter | None = None,
    crop: str | None = None,
    verdicts: bool = True,
) -> _Prepared:
    """Runs in a decoder thread. Never raises: any failure becomes the file's error message.

    With ``lungs``, the segmenter reads the decoded film here (one film per call, the decoder
    threads in parallel), before the classifier's preprocessing, which crops to the lungs when
    the classifier's contract asks for it (``crop == "lungs"``). ``verdicts=False`` (the lung
    stage off, a lung-crop classifier): the crop is made, the verdict is not reported.
    """
    if item.error is not None:  # discovery already knows (a folder that can't be listed)
        return _Prepared(item, error=item.error)
    try:
        tensor, decoded, verdict = preprocess_file_lungs(item.path, spec, None if lungs is None else lungs.read, crop)
    except ImageError as exc:
        return _Prepared(item, error=str(exc))
    except MemoryError:
        return _Prepared(item, error="out of memory while decoding the image")
    except Exception as exc:  # a decoder bug must cost one row, never the whole run
        return _Prepared(item, error=f"unexpected decoding error: {type(exc).__name__}: {exc}")
    prepared = _Prepared(
        item,
        tensor=tensor,
        width=decoded.width,
        height=decoded.height,
        notes=list(decoded.notes),
        fields=dict(decoded.fields),
        verdict=verdict if verdicts else None,
    )
    if decoded.not_radiograph:
        # Still classified (the row keeps its probabilities), but flagged out of distribution
        # whatever the score: the header says it is not what the model knows.
        prepared.not_radiograph = decoded.not_radiograph
        prepared.notes.append(f"out of distribution: {decoded.not_radiograph}")
    return prepared


def _apply_verdict(r: Result, prepared: _Prepared) -> None:
    """The lung stage's columns; a film that is not assessable keeps its probabilities, loses its label."""
    verdict = prepared.verdict
    if verdict is None:
        return
    r.lung_fraction = verdict.lung_fraction
    r.lung_mask = verdict.mask
    why = verdict.note
    if why is None and prepared.not_radiograph:
        why = prepared.not_radiograph  # the DICOM header says it is not a radiograph
    r.assessable = why is None
    if why is not None:
        r.notes.append(f"not assessable: {why}")
        r.label = None
        r.confidence = None


def _stack(tensors: list[np.ndarray], buffer: list[np.ndarray] | None) -> np.ndarray:
    """``np.stack(tensors)``, into the array ``buffer`` holds when there is one (grown as needed)."""
    if buffer is None:
        return np.stack(tensors)
    shape = (len(tensors), *tensors[0].shape)
    if not buffer or buffer[0].shape[1:] != shape[1:] or buffer[0].shape[0] < shape[0]:
        buffer[:] = [np.empty(shape, dtype=np.float32)]
    return np.stack(tensors, out=buffer[0][: shape[0]])


def _as_input(item: InputFile | str | os.PathLike[str]) -> InputFile:
    if isinstance(item, InputFile):
        return item
    path = os.fspath(item)
    return InputFile(path, path)


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
        try:
            return self._loaded.sha256()
        except OSError as exc:
            raise ModelError(
                f"cannot read the model file {self.model_path} to hash it: {exc.strerror or exc}"
            ) from None

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
        pending: deque[Future[_Prepared]] = deque()
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cxr-decode")
        exhausted = False

        def top_up() -> None:
            nonlocal exhausted
            while not exhausted and len(pending) < ahead:
                try:
                    item = _as_input(next(it))
                except StopIteration:
                    exhausted = True
                    return
                pending.append(
                    pool.submit(_prepare, item, spec, self._crop_lungs, self.meta.crop, self.lungs is not None)
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
                batch: list[_Prepared] = []
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

    def _run(self, batch: list[_Prepared], buffers: threading.local | None = None) -> list[Result]:
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
        x = _stack([t for t in (batch[i].tensor for i in ready) if t is not None], buffer)
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
            _apply_verdict(r, batch[i])
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
