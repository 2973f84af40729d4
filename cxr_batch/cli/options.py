"""What the commands share: exit codes, error mapping, the model/engine options. Light: no numpy,
no onnxruntime (``cxr-batch --help`` imports this)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import click

from cxr_batch.errors import CxrBatchError
from cxr_batch.text import shown

if TYPE_CHECKING:
    from cxr_batch.engine.classifier import EngineConfig

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes (documented in the README).
EXIT_OK = 0
EXIT_FATAL = 1  # bad model, unwritable output, no inputs, missing extra: nothing (more) was done
EXIT_USAGE = 2  # Click's usage errors
EXIT_PARTIAL = 3  # the run finished, but some files could not be classified (see the error rows)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: what was written is kept (classify: rerun with --resume)


def library_errors(func: F) -> F:
    """Turn the package's exceptions into ``Error: ...`` on stderr and exit code 1.

    The message is printed with control characters escaped (it may hold a file name). An
    ``OSError`` that no layer turned into a message (a bug) still gets an ``Error:`` line
    naming the file, never a traceback.
    """

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CxrBatchError as exc:
            raise click.ClickException(shown(exc)) from exc
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename is not None else ""
            raise click.ClickException(shown(f"{where}{exc.strerror or exc}")) from exc

    return wrapper  # type: ignore[return-value]


def interruptible(message: str) -> Callable[[F], F]:
    """Ctrl-C and SIGTERM (what Slurm and Kubernetes send at a time limit) end the command the
    same way: ``Interrupted: <message>`` on stderr and exit code 130, after the command's own
    clean-up (``finally`` blocks: the report flushed, threads stopped, temporary files removed).
    """

    def decorate(func: F) -> F:
        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            received: list[int] = []

            def on_sigterm(signum: int, frame: object) -> None:
                if not received:
                    received.append(signum)
                    raise KeyboardInterrupt

            main_thread = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
            try:
                return func(*args, **kwargs)
            except KeyboardInterrupt:
                how = " (SIGTERM)" if received else ""
                click.echo(f"Interrupted{how}: {message}", err=True)
                sys.exit(EXIT_INTERRUPTED)
            finally:
                if main_thread:
                    signal.signal(signal.SIGTERM, previous)

        return wrapper  # type: ignore[return-value]

    return decorate


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
            click.option(
                "--lungs/--no-lungs",
                default=True,
                show_default=True,
                help="Run the lung-field segmenter first: the lung_fraction and assessable columns (a film "
                "without two plausible lung fields gets no label), and the lung crop for a model trained on it.",
            ),
        ]
    ):
        func = option(func)
    return func


def engine_config(
    model: str | None, device: str, precision: str, batch_size: int, threads: int, lungs: bool = True
) -> EngineConfig:
    """The :class:`~cxr_batch.engine.classifier.EngineConfig` for the values of :func:`engine_options`."""
    from cxr_batch.engine.classifier import EngineConfig  # numpy, onnxruntime: only once a command runs

    return EngineConfig(
        model=model,
        device=device,  # type: ignore[arg-type]  # click.Choice checked it
        precision=precision,  # type: ignore[arg-type]
        batch_size=batch_size,
        threads=threads,
        lungs=lungs,
    )
