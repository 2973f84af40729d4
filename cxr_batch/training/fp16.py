"""The fp16 model derived from the fp32 master: ``NAME-fp16.onnx``, the file ``classify`` prefers on CUDA.

Converted in memory (the out-of-distribution guard kept in float32) and written only when no
probability moves by more than :data:`FP16_TOLERANCE` against the master.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console

from cxr_batch.engine.postprocess import softmax
from cxr_batch.errors import ModelError
from cxr_batch.training.onnx_file import OnnxModel, _onnx, write_contract
from cxr_batch.training.references import _without_self_check, ort_logits

#: The fp16 model (for CUDA) is written only when no probability moves more than this.
FP16_TOLERANCE = 1e-2


def export_fp16(fp32: Path, x: np.ndarray | None = None, console: Console | None = None) -> Path:
    """Derive ``NAME-fp16.onnx`` from the fp32 master file (:func:`_derive_fp16`) and save it."""
    console = console or Console(stderr=True)
    out = _derive_fp16(OnnxModel.read(fp32), x, console).save()
    console.print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


def _derive_fp16(master: OnnxModel, x: np.ndarray | None = None, console: Console | None = None) -> OnnxModel:
    """Derive ``NAME-fp16.onnx`` from the fp32 master, in memory: the model ``classify`` prefers on CUDA.

    Weights and activations in float16 with float32 input and outputs, so the contract and the
    preprocessing are unchanged; the out-of-distribution guard stays in float32 (its squared
    distances can overflow float16). Checked against the master on ``x`` (preprocessed images;
    random tensors when None) with onnxruntime on the CPU.

    Raises:
        ModelError: a probability moves by more than :data:`FP16_TOLERANCE`.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel as OrtOnnxModel

    console = console or Console(stderr=True)
    onnx = _onnx()
    meta = master.meta
    proto = onnx.ModelProto()
    proto.CopyFrom(master.proto)  # the converter edits the graph it is given: the master stays fp32
    write_contract(proto, meta)
    keep = [n.name for n in proto.graph.node if n.name.startswith("ood/")]
    half = OrtOnnxModel(convert_float_to_float16(proto, keep_io_types=True, node_block_list=keep or None))
    half.topological_sort()  # the converter appends its Cast nodes at the end of the graph
    onnx.checker.check_model(half.model)
    out = master.path.with_name(master.path.stem + "-fp16.onnx")
    if x is None or len(x) == 0:
        x = np.random.default_rng(0).standard_normal((8, 3, *meta.input_size)).astype(np.float32)
    p32, p16 = softmax(ort_logits(master, x)), softmax(ort_logits(half.model.SerializeToString(), x))
    diff = float(np.abs(p32 - p16).max())
    agree = float((p32.argmax(1) == p16.argmax(1)).mean())
    console.print(
        f"fp16 parity on {len(x)} images: max |Δprob| = {diff:.2e} (limit {FP16_TOLERANCE:.0e}), top-1 agreement {agree:.4f}"
    )
    if diff > FP16_TOLERANCE:
        raise ModelError(f"the fp16 model differs from fp32 by {diff:.2e} > {FP16_TOLERANCE:.0e}; not written")
    extra = {
        **_without_self_check(meta.extra),
        "master": master.path.name,
        "fp16_parity": {"images": len(x), "max_abs_prob_diff": diff, "top1_agreement": agree},
    }
    return OnnxModel(out, half.model, meta.with_updates(precision="fp16", extra=extra))
