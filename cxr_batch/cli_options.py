"""Click options shared by several commands (classify, evaluate, info). Light: no numpy, no onnxruntime."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

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


