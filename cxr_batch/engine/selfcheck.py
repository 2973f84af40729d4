"""The load-time self-check: a model runs a few reference images stored in its own contract and
its outputs are compared with the fp32 master's, stored with them.

Why: an int8 file can be right on the CPU it was measured on and wrong on another (U8S8 kernels
saturate without VNNI), and a damaged file can still load. The check costs one small batch.

The contract's ``extra["self_check"]`` (written by ``cxr_batch.training.references.write_self_checks``)::

    {"images": {"encoding": "zlib+base64", "dtype": "uint8", "shape": [N, H, W], "data": "..."},
     "logits_fp32": [[...], ...],     # the fp32 master's logits for them, through the contract's preprocessing
     "metric": "max_abs_centred_logit_diff",
     "tolerance": 0.6,                # beyond this the model is refused or replaced (see the engine)
     "tolerance_basis": "...",        # how the tolerance was measured
     "master": "cxr-resnet18.onnx"}

The images are tiny grey thumbnails of real test-split X-rays (8-bit), prepared exactly as
``classify`` prepares a decoded image (resize to the input size, normalise). The metric is the
largest absolute difference between the two sets of logits once each row's mean is removed
(softmax ignores a common shift), over all images and classes.
"""

from __future__ import annotations

import base64
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr_batch.contract import ModelMeta
from cxr_batch.engine.postprocess import softmax
from cxr_batch.engine.types import bounded_batch
from cxr_batch.errors import ModelError
from cxr_batch.io.preprocess import prepare

if TYPE_CHECKING:
    import onnxruntime as ort

SELF_CHECK_KEY = "self_check"
METRIC = "max_abs_centred_logit_diff"
#: At most this many reference images (the exporter stores 4) ...
MAX_IMAGES = 64
#: ... of at most this many pixels in all (N × H × W bytes once inflated; the exporter's are 4 KB):
#: a hostile contract's zlib stream inflates at most this far (a 4 MB stream can claim 6 GB).
MAX_PIXELS = 16 << 20


@dataclass(frozen=True)
class CheckResult:
    """The outcome of :func:`run_self_check`."""

    images: int
    #: the largest |Δ| of mean-centred logits against the fp32 master's
    deviation: float
    #: the largest probability difference, for the message
    max_prob_diff: float
    #: images whose top-1 label is the master's
    top1_agree: int
    tolerance: float
    seconds: float
    #: set when the reference batch could not even run
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(np.isfinite(self.deviation)) and self.deviation <= self.tolerance

    def describe(self) -> str:
        verdict = "passed" if self.ok else "FAILED"
        if self.error is not None:
            return f"self-check {verdict}: the reference batch did not run ({self.error})"
        return (
            f"self-check {verdict}: largest logit deviation from fp32 {self.deviation:.3g} "
            f"(tolerance {self.tolerance:.3g}) on {self.images} reference images, "
            f"largest probability difference {self.max_prob_diff:.3f}, top-1 {self.top1_agree}/{self.images} as fp32"
        )

    def in_words(self, precision: str) -> str:
        """The result as a user reads it (``cxr-batch info``): what was compared and whether it is
        within tolerance, without a count that reads like a failure when it is not one."""
        if self.error is not None or not np.isfinite(self.deviation):
            return self.describe()
        n, agree = self.images, self.top1_agree
        within = f"largest logit deviation {self.deviation:.3g}, tolerance {self.tolerance:.3g}"
        if not self.ok:
            return (
                f"self-check FAILED: {precision} deviates from fp32 beyond the tolerance on the {n} reference "
                f"images ({within}; same label as fp32 on {agree} of {n})"
            )
        if agree == n:
            return f"self-check passed: {precision} gives the same label as fp32 on all {n} reference images ({within})"
        return (
            f"self-check passed: {precision} gives the same label as fp32 on {agree} of {n} reference images "
            f"(the others are near ties, within tolerance: {within})"
        )


def encode_images(grey: np.ndarray) -> dict[str, Any]:
    """(N, H, W) uint8 thumbnails → the contract's compact JSON form."""
    grey = np.ascontiguousarray(grey, dtype=np.uint8)
    return {
        "encoding": "zlib+base64",
        "dtype": "uint8",
        "shape": list(grey.shape),
        "data": base64.b64encode(zlib.compress(grey.tobytes(), 9)).decode("ascii"),
    }


def decode_images(doc: dict[str, Any]) -> np.ndarray:
    """The contract's images back as (N, H, W) uint8. Raises ValueError when malformed."""
    if doc.get("encoding") != "zlib+base64" or doc.get("dtype") != "uint8":
        raise ValueError(f"unknown image encoding {doc.get('encoding')!r}/{doc.get('dtype')!r}")
    shape_doc = doc["shape"]
    if not isinstance(shape_doc, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape_doc):
        raise ValueError("images' shape must be a list of integers")
    shape = list(shape_doc)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"images must be N×H×W, not {shape}")
    n, h, w = shape
    if n > MAX_IMAGES or n * h * w > MAX_PIXELS:
        raise ValueError(
            f"{n} reference images of {h}×{w} pixels: more than the {MAX_IMAGES} images and {MAX_PIXELS:,} "
            "pixels a self-check may hold"
        )
    data = doc["data"]
    if not isinstance(data, str) or len(data) > 2 * MAX_PIXELS:  # base64 of a stream that can't inflate to less
        raise ValueError("images' data is not text of a plausible size")
    inflater = zlib.decompressobj()
    raw = inflater.decompress(base64.b64decode(data, validate=True), n * h * w + 1)  # never more than it may be
    if len(raw) != n * h * w or inflater.unconsumed_tail:
        raise ValueError(f"images' data does not hold {n}×{h}×{w} bytes")
    return np.frombuffer(raw, np.uint8).reshape(shape)


def reference_inputs(meta: ModelMeta) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The contract's reference images (N, H, W) uint8, their fp32 logits and the tolerance;
    None when the contract has no self-check. :func:`prepare_references` makes them tensors.

    Raises:
        ModelError: the self-check entry is malformed.
    """
    doc = meta.extra.get(SELF_CHECK_KEY)
    if doc is None:
        return None
    try:
        if doc.get("metric", METRIC) != METRIC:
            raise ValueError(f"unknown metric {doc.get('metric')!r}")
        grey = decode_images(doc["images"])
        expected = np.asarray(doc["logits_fp32"], dtype=np.float64)
        tolerance = float(doc["tolerance"])
        if expected.shape != (len(grey), len(meta.labels)):
            raise ValueError(
                f"logits_fp32 has shape {list(expected.shape)}, expected [{len(grey)}, {len(meta.labels)}]"
            )
    except (KeyError, TypeError, ValueError, AttributeError, zlib.error) as exc:
        raise ModelError(f"invalid model contract: its '{SELF_CHECK_KEY}' entry is malformed ({exc})") from None
    return grey, expected, tolerance


def centred(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    out: np.ndarray = z - z.mean(axis=1, keepdims=True)
    return out


def compare(got: np.ndarray, expected: np.ndarray, tolerance: float, seconds: float = 0.0) -> CheckResult:
    """Compare logits with the stored fp32 ones (the check's arithmetic, shared with the export)."""
    got = np.asarray(got, dtype=np.float64)
    if got.shape != expected.shape:
        return CheckResult(len(expected), float("inf"), 1.0, 0, tolerance, seconds)
    finite = bool(np.isfinite(got).all())
    deviation = float(np.abs(centred(got) - centred(expected)).max()) if finite else float("inf")
    p, q = softmax(np.where(np.isfinite(got), got, 0.0)), softmax(expected)
    return CheckResult(
        images=len(expected),
        deviation=deviation,
        max_prob_diff=float(np.abs(p - q).max()),
        top1_agree=int((p.argmax(1) == q.argmax(1)).sum()),
        tolerance=tolerance,
        seconds=seconds,
    )


def run_self_check(session: ort.InferenceSession, meta: ModelMeta) -> CheckResult | None:
    """Run the contract's reference images through ``session`` (one batch) and compare them with
    the fp32 master's logits; None when the contract has none (models exported before it).

    Raises:
        ModelError: the self-check entry is malformed.
    """
    refs = reference_inputs(meta)
    if refs is None:
        return None
    grey, expected, tolerance = refs
    start = time.perf_counter()
    step = bounded_batch(len(grey), meta.input_size)  # a batch's input stays under MAX_BATCH_BYTES
    got_parts = []
    try:
        for i in range(0, len(grey), step):
            x = prepare_references(grey[i : i + step], meta)
            got_parts.append(np.asarray(session.run([meta.outputs["logits"]], {meta.input_name: x})[0]))
    except Exception as exc:  # onnxruntime's own exception types: a failed check, decided by the caller
        return CheckResult(len(grey), float("inf"), 1.0, 0, tolerance, time.perf_counter() - start, error=str(exc))
    try:
        got = np.concatenate(got_parts)
    except ValueError:  # outputs of different widths: a shape the comparison refuses
        got = np.zeros((0, 0))
    return compare(got, expected, tolerance, time.perf_counter() - start)


def prepare_references(grey: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """Reference images (N, H, W) uint8 as the model's input tensors (N, 3, H, W), as classify prepares them."""
    return np.stack([prepare(g.astype(np.float32) / 255.0, meta.spec) for g in grey])


__all__ = [
    "SELF_CHECK_KEY",
    "CheckResult",
    "compare",
    "decode_images",
    "encode_images",
    "prepare_references",
    "reference_inputs",
    "run_self_check",
]
