"""onnxruntime sessions: the execution providers, whether CUDA is possible, creating a session.

What the model loading (:mod:`cxr_batch.engine.model`), the :class:`~cxr_batch.engine.classifier.Classifier`
and the lung segmenter share to run a model file in onnxruntime.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from cxr_batch.engine.cpu import physical_cores
from cxr_batch.engine.types import Device
from cxr_batch.errors import DeviceError, ModelError

if TYPE_CHECKING:
    import onnxruntime as ort

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
