"""What the commands share: exit codes, error mapping, the model/engine options. Light: no numpy,
no onnxruntime (``cxr-batch --help`` imports this)."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import click

from cxr_batch.errors import CxrBatchError

if TYPE_CHECKING:
    from cxr_batch.engine.classifier import EngineConfig

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes (documented in the README).
EXIT_OK = 0
EXIT_FATAL = 1  # bad model, unwritable output, no inputs, missing extra: nothing (more) was done
EXIT_USAGE = 2  # Click's usage errors
EXIT_PARTIAL = 3  # the run finished, but some files could not be classified (see the error rows)


def library_errors(func: F) -> F:
    """Turn the package's exceptions into ``Error: ...`` on stderr and exit code 1."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CxrBatchError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


_DEVICES = ("auto", "cpu", "cuda")
_PRECISIONS = ("auto", "fp32", "int8", "fp16")


def _model_options(func: F) -> F:
    """--model, --precision: shared by the commands that load a model."""
    func = click.option(
        "--precision",
        type=click.Choice(_PRECISIONS),
        default="auto",
        show_default=True,
        help="Which embedded default model: auto = int8 on CPU, fp16 on CUDA (when installed), else fp32. "
        "With --model or $CXR_BATCH_MODEL the precision is the file's own (leave auto).",
    )(func)
    return func


def engine_options(func: F) -> F:
    """The model and engine options that classify and evaluate share."""
    for option in reversed(
        [
            click.option(
                "--model",
                "-m",
                metavar="PATH",
                default=None,
                help="ONNX model with the cxr-batch contract. Default: $CXR_BATCH_MODEL, else the embedded model.",
            ),
            click.option(
                "--device",
                type=click.Choice(_DEVICES),
                default="auto",
                show_default=True,
                help="auto uses CUDA only when it really starts, else CPU.",
            ),
            _model_options,
            click.option(
                "--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per model call."
            ),
            click.option(
                "--threads",
                type=click.IntRange(min=0),
                default=0,
                show_default=True,
                help="onnxruntime threads (0: one per physical core).",
            ),
        ]
    ):
        func = option(func)
    return func


def engine_config(model: str | None, device: str, precision: str, batch_size: int, threads: int) -> EngineConfig:
    """The :class:`~cxr_batch.engine.classifier.EngineConfig` for the values of :func:`engine_options`."""
    from cxr_batch.engine.classifier import EngineConfig  # numpy, onnxruntime: only once a command runs

    return EngineConfig(
        model=model,
        device=device,  # type: ignore[arg-type]  # click.Choice checked it
        precision=precision,  # type: ignore[arg-type]
        batch_size=batch_size,
        threads=threads,
    )
