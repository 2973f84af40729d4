"""Class activation maps as a model output: ``cam`` (N×C×h×w), added to the ONNX graph at export.

For a network that ends ``features → global average pool → linear`` (ResNet-18 here), the logits
decompose exactly over the last feature maps:

    logits[c] = Σ_k W[c, k] · mean_xy F[k, x, y] + b[c] = mean_xy CAM[c, x, y] + b[c]
    with CAM[c, x, y] = Σ_k W[c, k] · F[k, x, y]

so the class activation map (Zhou et al., CVPR 2016) is exact, not an approximation. The graph
already holds ``F`` and ``W``; this module adds one ``Einsum`` node that reads the very tensor
feeding the classifier's ``Gemm``/``MatMul`` as ``W``. Why in the graph rather than elsewhere:

- onnxruntime has no API that returns an initializer's values, and ``onnx`` is not a runtime
  dependency, so the classify path cannot read ``W`` from the file; the graph computes the map.
- The map uses the model's own weights, not a copy (a copy in the contract could drift from
  the graph): an int8 model derived from the fp32 master gets its own, quantised, ``W``.
- The output is small (C×h×w, 3×7×7 floats at 224 px, against 512×7×7 for the raw features).
- The decomposition is checked with onnxruntime when the output is added: for random inputs,
  ``logits - mean_xy(cam)`` must be the same vector (the bias) for every input.

Adding the output needs the ``onnx`` package (``train`` extra); using it needs only onnxruntime.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cxr_batch.contract import CAM_ROLE, CONTRACT_KEY, ModelMeta
from cxr_batch.errors import MissingExtraError, ModelError
from cxr_batch.io.safe_write import write_file_atomic

__all__ = ["CAM_ROLE", "add_cam_output"]
#: Nodes between the pooled features and the classifier that don't change the values.
_PASS_THROUGH = {"Identity", "Flatten", "Reshape", "Squeeze", "QuantizeLinear", "DequantizeLinear"}
#: The decomposition check: |(logits - mean cam)[i] - (logits - mean cam)[j]| relative to the logits' scale.
FP32_TOLERANCE = 1e-4


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise MissingExtraError("adding the 'cam' output", "train", "onnx") from exc
    return onnx


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _pooled_source(tensor: str, producer: dict[str, Any], source: str) -> str:
    """Walk back from the classifier's input to the global average pool; return the pooled maps."""
    seen = 0
    while tensor in producer and seen < 32:
        node = producer[tensor]
        seen += 1
        if node.op_type == "GlobalAveragePool":
            return str(node.input[0])
        if node.op_type == "ReduceMean":
            axes = _attr(node, "axes", None)
            if axes is None and len(node.input) > 1:
                axes = "input"  # opset 18 passes axes as an input; accept it (checked numerically)
            if axes == "input" or sorted(int(a) for a in axes) in ([2, 3], [-2, -1]):
                return str(node.input[0])
        if node.op_type not in _PASS_THROUGH:
            break
        tensor = node.input[0]
    raise ModelError(
        f"{source}: cannot add class activation maps: the classifier's input does not come from a global "
        "average pool of feature maps (heatmaps need a 'features → average pool → linear' head, as in ResNet)"
    )


def add_cam_output(proto: Any, meta: ModelMeta, verify: bool = True, source: str = "model") -> ModelMeta:
    """Add the ``cam`` output (N×C×h×w) to an ONNX ModelProto, in place; return the updated contract.

    The caller writes the returned contract into the file (``cxr_batch.training.onnx_file.write_contract``).
    A model whose contract already names a ``cam`` output is left as it is.

    Args:
        proto: an ``onnx.ModelProto`` of a cxr-batch model (fp32 or int8).
        meta: its contract.
        verify: check the decomposition ``logits = mean_xy(cam) + bias`` with onnxruntime.
        source: the file name, for messages.

    Raises:
        ModelError: the classifier head is not ``average pool → Gemm/MatMul``, or the check fails.
        MissingExtraError: onnx is not installed.
    """
    onnx = _onnx()
    from onnx import TensorProto, helper

    if CAM_ROLE in meta.outputs:
        return meta
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    names = {t for node in graph.node for t in (*node.input, *node.output)} | {i.name for i in graph.initializer}
    if CAM_ROLE in names:
        raise ModelError(f"{source}: the graph already has a tensor named '{CAM_ROLE}' that the contract doesn't name")

    logits = meta.outputs["logits"]
    head = producer.get(logits)
    while head is not None and head.op_type in ("Identity", "QuantizeLinear", "DequantizeLinear"):
        head = producer.get(head.input[0])
    weights: str | None = None
    equation = ""
    alpha = 1.0
    pooled: str | None = None
    if head is not None and head.op_type == "Gemm" and not _attr(head, "transA", 0):
        pooled, weights = str(head.input[0]), str(head.input[1])
        # Gemm computes alpha · A·B' + beta · C; B' = B (K×C) or Bᵀ with B (C×K) when transB.
        equation = "nkhw,ck->nchw" if _attr(head, "transB", 0) else "nkhw,kc->nchw"
        alpha = float(_attr(head, "alpha", 1.0))
    else:
        matmul = head
        if head is not None and head.op_type == "Add":  # MatMul + bias, in either order
            matmul = next((producer[t] for t in head.input if t in producer and producer[t].op_type == "MatMul"), None)
        if matmul is not None and matmul.op_type == "MatMul":
            pooled, weights = str(matmul.input[0]), str(matmul.input[1])
            equation = "nkhw,kc->nchw"
    if pooled is None or weights is None:
        raise ModelError(
            f"{source}: cannot add class activation maps: the '{logits}' output does not come from a Gemm or "
            "MatMul (+ Add) classifier"
        )
    features = _pooled_source(pooled, producer, source)

    nodes = [
        helper.make_node(
            "Einsum",
            [features, weights],
            ["cam/raw" if alpha != 1.0 else CAM_ROLE],
            equation=equation,
            name="cam/einsum",
        )
    ]
    if alpha != 1.0:
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(alpha, np.float32), "cam/alpha"))
        nodes.append(helper.make_node("Mul", ["cam/raw", "cam/alpha"], [CAM_ROLE], name="cam/alpha"))
    graph.node.extend(nodes)
    batch = _batch_dim(graph, logits)
    graph.output.append(
        helper.make_tensor_value_info(CAM_ROLE, TensorProto.FLOAT, [batch, len(meta.labels), "cam_h", "cam_w"])
    )
    onnx.checker.check_model(proto)
    updated = meta.with_updates(outputs={**meta.outputs, CAM_ROLE: CAM_ROLE})
    if verify:
        verify_cam(proto.SerializeToString(), updated, source)
    return updated


def _batch_dim(graph: Any, logits: str) -> str | int:
    for out in graph.output:
        if out.name == logits:
            dims = out.type.tensor_type.shape.dim
            if dims and dims[0].dim_param:
                return str(dims[0].dim_param)
    return "batch"


def verify_cam(model: bytes | str | os.PathLike[str], meta: ModelMeta, source: str = "model") -> float:
    """Check ``logits - mean_xy(cam)`` is one vector (the bias) for different inputs; return the spread.

    Raises:
        ModelError: the spread is above the tolerance (fp32 models only; int8 models quantise the
            pooled features, so their maps are checked for shape only).
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(
        model if isinstance(model, bytes) else os.fspath(model), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).standard_normal((3, 3, *meta.input_size)).astype(np.float32)
    logits, cam = sess.run([meta.outputs["logits"], meta.outputs[CAM_ROLE]], {meta.input_name: x})
    if cam.ndim != 4 or cam.shape[:2] != (3, len(meta.labels)):
        raise ModelError(f"{source}: the '{CAM_ROLE}' output has shape {list(cam.shape)}, expected [N, C, h, w]")
    bias = logits.astype(np.float64) - cam.astype(np.float64).mean(axis=(2, 3))
    spread = float(np.abs(bias - bias[:1]).max())
    scale = max(1.0, float(np.abs(logits).max()))
    if meta.precision == "fp32" and spread > FP32_TOLERANCE * scale:
        raise ModelError(
            f"{source}: the class activation maps do not add up to the logits (spread {spread:.2e}); "
            "the classifier head is not a plain linear layer on the pooled features"
        )
    return spread


def add_cam_to_file(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Add the ``cam`` output to a cxr-batch ONNX file (in place unless ``out``); returns the file written.

    For a model shipped without it: heatmaps then work without retraining or re-exporting.

    Raises:
        ModelError: not a cxr-batch model, or see :func:`add_cam_output`.
        MissingExtraError: onnx is not installed.
    """
    onnx = _onnx()
    src = Path(path)
    proto = onnx.load(str(src))
    props = {p.key: p.value for p in proto.metadata_props}
    if CONTRACT_KEY not in props:
        raise ModelError(f"{src}: no '{CONTRACT_KEY}' metadata; not a cxr-batch model")
    meta = ModelMeta.from_json(props[CONTRACT_KEY], str(src))
    target = Path(out) if out is not None else src
    if CAM_ROLE in meta.outputs:
        if target != src:
            write_file_atomic(target, src.read_bytes())
        return target
    updated = add_cam_output(proto, meta, source=str(src))
    for prop in proto.metadata_props:
        if prop.key == CONTRACT_KEY:
            prop.value = updated.to_json()
    from cxr_batch.training.onnx_file import save_model

    save_model(proto, target)
    return target
