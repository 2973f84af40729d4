"""The int8 model derived from the fp32 master: ``NAME-int8.onnx``.

Static QDQ quantisation (:class:`Int8Scheme`, :data:`INT8_SCHEMES`, :func:`quantize_file`),
calibrated on the run's training images, and the derivation ``export --quantize int8`` runs
(:func:`derive_int8`): the int8 copy measured against the master on the test split and written
only when it is as good (the limits are in :mod:`cxr_batch.contract`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console

from cxr_batch.contract import (
    INT8_GATE_MAX_PROB_DIFF,
    INT8_GATE_MIN_AGREEMENT,
    INT8_MAX_F1_DROP,
    INT8_MIN_AGREEMENT,
    ModelMeta,
    int8_gate,
)
from cxr_batch.engine.cpu import cpu_summary
from cxr_batch.errors import CxrBatchError, ModelError
from cxr_batch.evaluation.metrics import classification_metrics
from cxr_batch.io.labelled import Roots, Split
from cxr_batch.training.onnx_file import OnnxModel, _onnx
from cxr_batch.training.references import _tensors, _without_self_check, model_probs, test_screening

if TYPE_CHECKING:
    from cxr_batch.training.export import ExportConfig

# The int8 model is written only when it is INT8_MAX_F1_DROP / INT8_MIN_AGREEMENT close to the fp32
# master on the test split (both in cxr_batch.contract); whether ``--precision auto`` may take it is
# the stricter gate there (int8_gate).


class _Calibration:
    """onnxruntime CalibrationDataReader over preprocessed training images."""

    def __init__(self, x: np.ndarray, batch: int = 16) -> None:
        self.x, self.batch = x, batch
        self._it: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter([{"input": self.x[i : i + self.batch]} for i in range(0, len(self.x), self.batch)])


@dataclass(frozen=True)
class Int8Scheme:
    """How :func:`quantize_file` quantises: static QDQ with these settings.

    The default is the one measured right on CPUs without VNNI (``benchmarks/RESULTS.md``, int8
    schemes): uint8 activations, int8 per-channel weights in 7 bits (``reduce_range``), so the
    int16 intermediate of ``vpmaddubsw`` (U8S8 on AVX2 and AVX-512 without VNNI) cannot saturate.
    ``fp32_ends`` keeps the first convolution and the classifier (``fc``) in float32: the layers
    whose rounding moves the probabilities most. ``calibration``: ``minmax`` or ``percentile``
    (activation ranges clipped at the ``percentile``-th percentile of the calibration images).
    """

    reduce_range: bool = True
    per_channel: bool = True
    activations: str = "uint8"  # "uint8" (asymmetric) or "int8" (symmetric)
    weights: str = "int8"  # "int8" or "uint8"
    fp32_ends: bool = False
    calibration: str = "minmax"  # "minmax" or "percentile"
    percentile: float = 99.999

    def describe(self) -> str:
        kind = {"uint8": "u8", "int8": "s8"}
        name = f"{kind[self.activations].upper()}{kind[self.weights].upper()}"
        calib = "MinMax" if self.calibration == "minmax" else f"percentile ({self.percentile}) calibration"
        return (
            f"QDQ static, {self.activations} activations ({'asymmetric' if self.activations == 'uint8' else 'symmetric'}), "
            f"{self.weights} {'per-channel' if self.per_channel else 'per-tensor'} weights ({name})"
            f"{', 7-bit weights (reduce_range)' if self.reduce_range else ', 8-bit weights'}"
            f"{', first conv and fc kept in fp32' if self.fp32_ends else ''}, "
            f"{calib if self.calibration != 'minmax' else 'MinMax calibration'}"
        )


#: The schemes ``cxr-batch export --int8-scheme`` offers (measured in benchmarks/int8_schemes.py).
INT8_SCHEMES = {
    "7bit": Int8Scheme(),
    "7bit-ends": Int8Scheme(fp32_ends=True),
    "7bit-ends-percentile": Int8Scheme(fp32_ends=True, calibration="percentile"),
    "8bit-ends": Int8Scheme(reduce_range=False, fp32_ends=True),
    "8bit-ends-percentile": Int8Scheme(reduce_range=False, fp32_ends=True, calibration="percentile"),
}


def _end_nodes(graph: Any) -> list[str]:
    """The first convolution and the node that computes ``logits`` (the classifier)."""
    first = next((n.name for n in graph.node if n.op_type == "Conv"), None)
    last = next((n.name for n in graph.node if "logits" in n.output), None)
    return [x for x in (first, last) if x]


def quantize_file(fp32: Path | OnnxModel, out: Path, xcal: np.ndarray, scheme: Int8Scheme = Int8Scheme()) -> Path:
    """Static QDQ int8 copy of ``fp32`` (a file, or a model in memory) at ``out``, calibrated on
    the preprocessed images ``xcal``.

    The out-of-distribution guard (nodes named ``ood/...``) stays in float32: its squared
    distances span a range no 8-bit scale covers. The contract is copied unchanged.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx = _onnx()
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    if scheme.calibration not in methods:
        raise CxrBatchError(f"unknown int8 calibration {scheme.calibration!r}; choose from {sorted(methods)}")
    with tempfile.TemporaryDirectory() as td:
        pre = Path(td) / "pre.onnx"
        source = fp32
        if isinstance(fp32, OnnxModel):  # the quantiser reads files: the model's bytes, in this scratch folder
            source = Path(td) / "fp32.onnx"
            source.write_bytes(fp32.serialized())
        quant_pre_process(str(source), str(pre))
        graph = onnx.load(str(pre)).graph
        keep = [n.name for n in graph.node if n.name.startswith("ood/")]
        if scheme.fp32_ends:
            keep += _end_nodes(graph)
        extra = {"CalibPercentile": scheme.percentile} if scheme.calibration == "percentile" else {}
        quantize_static(
            str(pre),
            str(out),
            # percentile calibration stacks every batch's activations: batches must have one shape
            _Calibration(xcal, batch=1 if scheme.calibration == "percentile" else 16),
            quant_format=QuantFormat.QDQ,
            per_channel=scheme.per_channel,
            reduce_range=scheme.reduce_range,
            activation_type=types[scheme.activations],
            weight_type=types[scheme.weights],
            calibrate_method=methods[scheme.calibration],
            nodes_to_exclude=keep or None,
            extra_options=extra or None,
        )
    return out


def calibration_images(meta: ModelMeta, root: Roots, split: Split, n: int) -> np.ndarray:
    """``n`` training images of ``split`` (seeded pick), preprocessed for ``meta``."""
    rng = np.random.default_rng(0)
    train = split.paths(root, "train")
    pick = sorted(rng.choice(len(train), size=min(n, len(train)), replace=False).tolist())
    return _tensors([train[i] for i in pick], meta.spec, list(meta.labels))[0]


def derive_int8(
    fp32: Path,
    root: Roots | None,
    split: Split | None,
    cfg: ExportConfig,
    console: Console,
    scheme: Int8Scheme = Int8Scheme(),
) -> dict[str, Any]:
    """Derive ``NAME-int8.onnx`` from the fp32 master file (:func:`_derive_int8`) and save both
    (the master gets the screening point's test figures)."""
    master = OnnxModel.read(fp32)
    try:
        info, int8 = _derive_int8(master, root, split, cfg, console, scheme)
    finally:
        master.save()
    int8.save()
    console.print(f"wrote {int8.path} ({int8.path.stat().st_size / 1e6:.1f} MB)")
    return info


def _derive_int8(
    master: OnnxModel,
    root: Roots | None,
    split: Split | None,
    cfg: ExportConfig,
    console: Console,
    scheme: Int8Scheme = Int8Scheme(),
) -> tuple[dict[str, Any], OnnxModel]:
    """Derive ``NAME-int8.onnx`` from the fp32 master (what ``cxr-batch export --quantize int8`` runs):
    :func:`quantize_file` with ``scheme``, calibrated on training images; refused (unless forced)
    when test macro-F1 drops by more than :data:`~cxr_batch.contract.INT8_MAX_F1_DROP` or top-1
    agreement with fp32 is under :data:`~cxr_batch.contract.INT8_MIN_AGREEMENT`;
    the OOD guard refitted on the int8 model's own embeddings.

    Both stay in memory (the caller saves them): returns the quantisation record and the int8 model."""
    onnx = _onnx()
    meta = master.meta
    if root is None or split is None:
        raise CxrBatchError("--quantize int8 needs the run's training data for calibration (pass --data DIR)")
    labels = list(meta.labels)
    xcal = calibration_images(meta, root, split, cfg.calibration_images)
    out = master.path.with_name(master.path.stem + "-int8.onnx")
    with tempfile.TemporaryDirectory() as td:
        scratch = quantize_file(master, Path(td) / out.name, xcal, scheme)
        int8 = OnnxModel(out, onnx.load(str(scratch)), meta)
    test_items = split.items(root, "test")
    yt, p32, sources = model_probs(master, test_items, meta.spec, labels)
    _, p8, _ = model_probs(int8, test_items, meta.spec, labels)
    test_screening(master, yt, p32, sources, console)
    m32 = classification_metrics(yt, p32, labels)
    m8 = classification_metrics(yt, p8, labels)
    agree = float((p32.argmax(1) == p8.argmax(1)).mean()) if len(yt) else float("nan")
    drop = m32["macro_f1"] - m8["macro_f1"]
    info = {
        "calibration_images": len(xcal),
        "test_n": len(yt),
        "fp32_accuracy": m32["accuracy"],
        "fp32_macro_f1": m32["macro_f1"],
        "int8_accuracy": m8["accuracy"],
        "int8_macro_f1": m8["macro_f1"],
        "macro_f1_drop_points": 100 * drop,
        "top1_agreement_with_fp32": agree,
        "max_abs_prob_diff": float(np.abs(p32 - p8).max()) if len(yt) else float("nan"),
        "scheme": scheme.describe(),
        "measured_on": cpu_summary(),
    }
    info["gate"] = {
        "passed": int8_gate(agree, info["max_abs_prob_diff"]),
        "min_top1_agreement": INT8_GATE_MIN_AGREEMENT,
        "max_abs_prob_diff": INT8_GATE_MAX_PROB_DIFF,
        "split": "test",
        "rule": "--precision auto takes this file (on a CPU with 8-bit dot products) only when passed",
    }
    console.print(
        f"int8 on the test split: macro-F1 {m8['macro_f1']:.4f} vs fp32 {m32['macro_f1']:.4f} "
        f"({100 * drop:+.2f} points drop), top-1 agreement {agree:.4f}, largest |Δprob| "
        f"{info['max_abs_prob_diff']:.4f}: gate {'passed' if info['gate']['passed'] else 'not passed'} "
        f"(>= {INT8_GATE_MIN_AGREEMENT}, <= {INT8_GATE_MAX_PROB_DIFF}; auto takes fp32 where it is not)"
    )
    # classify runs the int8 file by default on CPU whenever it is installed, so it is written only
    # when it is as good as the master: macro-F1 within INT8_MAX_F1_DROP, top-1 agreement >= INT8_MIN_AGREEMENT.
    if (drop > INT8_MAX_F1_DROP or not agree >= INT8_MIN_AGREEMENT) and not cfg.force:
        out.unlink(missing_ok=True)  # an earlier export's int8 file does not match this master
        raise ModelError(
            f"int8 model loses {100 * drop:.2f} macro-F1 points (limit {100 * INT8_MAX_F1_DROP:.1f}) and agrees with "
            f"fp32 on {100 * agree:.2f}% of test images (limit {100 * INT8_MIN_AGREEMENT:.1f}%); not written "
            "(use --force to write it anyway)"
        )
    m8_summary = {
        k: m8[k]
        for k in ("split", "n", "accuracy", "accuracy_ci95", "macro_f1", "ece", "per_class", "confusion_matrix")
        if k in m8
    }
    int8.meta = meta.with_updates(
        precision="int8",
        metrics={**m8_summary, "split": "test"},
        extra={**_without_self_check(meta.extra), "quantization": info, "master": master.path.name},
    )
    if meta.ood is not None:  # calibrate the int8 model's guard on its own embeddings
        from cxr_batch.training.ood import fit_model

        fit_model(int8, root, split, console=console, max_fit=cfg.ood_fit_images, holdout=cfg.holdout_source)
    return info, int8


#: The earlier name of :func:`derive_int8`.
quantize_int8 = derive_int8
