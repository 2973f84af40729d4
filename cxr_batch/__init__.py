"""cxr-batch: batch chest X-ray classification with ONNX Runtime. A research tool, not a medical device.

``from cxr_batch import Classifier`` is resolved lazily, so ``import cxr_batch`` stays light
(no numpy, onnxruntime or torch until the classifier is used).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("cxr-batch")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

if TYPE_CHECKING:
    from cxr_batch.engine.classifier import Classifier, Result

__all__ = ["Classifier", "Result", "__version__"]

_LAZY = {"Classifier": "cxr_batch.engine.classifier", "Result": "cxr_batch.engine.classifier"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cxr_batch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
