"""Out-of-distribution guard: Mahalanobis distance of the pooled embedding to the class means.

Fitted on a model's own training embeddings (through its ``embedding`` output, so no retraining),
calibrated so that a chosen share (95%) of in-distribution validation images pass, and written
into the ONNX graph as an extra ``ood_score`` output, with the threshold in the contract.
Fitting needs the ``onnx`` package (``train`` extra); scoring needs only onnxruntime.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console

from cxr_batch.engine.lungs import preprocess_labelled
from cxr_batch.errors import CxrBatchError
from cxr_batch.io.labelled import Roots, Split
from cxr_batch.io.preprocess import PreprocessSpec

if TYPE_CHECKING:
    from cxr_batch.training.onnx_file import OnnxModel

OOD_OUTPUT = "ood_score"
METHOD = "mahalanobis_tied"


def embeddings(
    model_path: Path | str | OnnxModel,
    items: Sequence[tuple[Path, str]],
    spec: PreprocessSpec,
    labels: Sequence[str],
    output: str = "embedding",
    batch: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the model's embedding output over files (shared preprocessing). Returns (E, y)."""
    import onnxruntime as ort

    from cxr_batch.training.onnx_file import ort_source

    sess = ort.InferenceSession(ort_source(model_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    embs: list[np.ndarray] = []
    ys: list[int] = []
    buf: list[np.ndarray] = []
    for x, label in preprocess_labelled(items, spec):
        buf.append(x)
        ys.append(list(labels).index(label) if label in labels else -1)
        if len(buf) == batch:
            embs.append(sess.run([output], {name: np.stack(buf)})[0])
            buf.clear()
    if buf:
        embs.append(sess.run([output], {name: np.stack(buf)})[0])
    return (np.concatenate(embs) if embs else np.zeros((0, 0), np.float32)), np.asarray(ys, np.int64)


def fit(emb: np.ndarray, y: np.ndarray, n_classes: int, shrinkage: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the precision matrix of the shared (tied) covariance, with shrinkage.

    A class with no image (a site's data without viral films, ``cxr-batch adapt``) gets no mean: the
    score is then the distance to the nearest class that was seen."""
    d = emb.shape[1]
    present = [c for c in range(n_classes) if (y == c).any()]
    means = np.stack([emb[y == c].mean(axis=0) for c in present]).astype(np.float64)
    index = np.full(n_classes, -1, dtype=np.int64)
    index[present] = np.arange(len(present))
    centred = emb.astype(np.float64) - means[index[y]]
    cov = centred.T @ centred / max(len(emb) - len(present), 1)
    cov += shrinkage * np.trace(cov) / d * np.eye(d)
    return means, np.linalg.inv(cov)


def score(emb: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Distance to the nearest class mean: min_c sqrt((e - mu_c)^T P (e - mu_c))."""
    diff = emb[:, None, :].astype(np.float64) - means[None]
    d2 = np.einsum("ncd,de,nce->nc", diff, precision, diff)
    out: np.ndarray = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    return out


def add_to_graph(proto: Any, embedding: str, means: np.ndarray, precision: np.ndarray) -> None:
    """Append ``ood_score`` (N,) = min_c sqrt((e - mu_c) P (e - mu_c)) to an ONNX graph (opset >= 13)."""
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    for node in list(g.node):
        if node.name.startswith("ood/"):
            g.node.remove(node)
    for init in list(g.initializer):
        if init.name.startswith("ood/"):
            g.initializer.remove(init)
    for out in list(g.output):
        if out.name == OOD_OUTPUT:
            g.output.remove(out)
    g.initializer.extend(
        [
            numpy_helper.from_array(means.astype(np.float32), "ood/means"),
            numpy_helper.from_array(precision.astype(np.float32), "ood/precision"),
            numpy_helper.from_array(np.array([1], np.int64), "ood/axis1"),
            numpy_helper.from_array(np.array([2], np.int64), "ood/axis2"),
        ]
    )
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    nodes = [
        helper.make_node("Unsqueeze", [embedding, "ood/axis1"], ["ood/e"], name="ood/unsqueeze"),
        helper.make_node("Sub", ["ood/e", "ood/means"], ["ood/diff"], name="ood/sub"),
        helper.make_node("MatMul", ["ood/diff", "ood/precision"], ["ood/pd"], name="ood/matmul"),
        helper.make_node("Mul", ["ood/pd", "ood/diff"], ["ood/sq"], name="ood/mul"),
        helper.make_node("ReduceSum", ["ood/sq", "ood/axis2"], ["ood/d2"], keepdims=0, name="ood/sum"),
    ]
    if opset >= 18:
        nodes.append(helper.make_node("ReduceMin", ["ood/d2", "ood/axis1"], ["ood/min"], keepdims=0, name="ood/min"))
    else:
        nodes.append(helper.make_node("ReduceMin", ["ood/d2"], ["ood/min"], axes=[1], keepdims=0, name="ood/min"))
    nodes += [
        helper.make_node("Relu", ["ood/min"], ["ood/pos"], name="ood/relu"),
        helper.make_node("Sqrt", ["ood/pos"], [OOD_OUTPUT], name="ood/sqrt"),
    ]
    g.node.extend(nodes)
    g.output.append(helper.make_tensor_value_info(OOD_OUTPUT, TensorProto.FLOAT, ["batch"]))


def fit_model(
    model_path: Path | OnnxModel,
    root: Roots,
    split: Split,
    out: Path | None = None,
    quantile: float = 0.95,
    console: Console | None = None,
    max_fit: int | None = None,
    holdout: str | None = None,
) -> dict[str, Any]:
    """Fit the guard on a model's own train embeddings, calibrate on val, write it into the model.

    ``max_fit``: fit on a seeded sample of at most this many training images (a CPU budget);
    ``holdout``: a source kept out of training (train --holdout-source), left out of the fit.
    Returns the guard's record (also stored as ``ood`` in the model's contract).

    ``model_path`` may be a model held in memory (what ``export`` passes): the guard goes into it,
    and it is saved only to ``out`` when given (``export`` saves each file once, at its end).
    """
    import onnx

    from cxr_batch.training.onnx_file import OnnxModel, save_model, write_contract

    console = console or Console(stderr=True)
    model = model_path if isinstance(model_path, OnnxModel) else OnnxModel.read(model_path)
    proto, meta = model.proto, model.meta
    if "embedding" not in meta.outputs:
        raise CxrBatchError(f"{model_path}: the model has no 'embedding' output; re-export it with cxr-batch export")
    labels = list(meta.labels)
    train = [(p, label) for p, label, src in split.items(root, "train") if not holdout or src != holdout]
    if max_fit is not None and len(train) > max_fit:
        pick = np.random.default_rng(0).choice(len(train), size=max_fit, replace=False)
        train = [train[i] for i in sorted(pick.tolist())]
    e_train, y_train = embeddings(model, train, meta.spec, labels, meta.outputs["embedding"])
    e_val, _ = embeddings(model, split.paths(root, "val"), meta.spec, labels, meta.outputs["embedding"])
    if len(e_train) == 0 or len(e_val) == 0:
        raise CxrBatchError("fitting the OOD guard needs training and validation images")
    means, precision = fit(e_train, y_train, len(labels))
    val_scores = score(e_val, means, precision)
    threshold = float(np.quantile(val_scores, quantile))
    record: dict[str, Any] = {
        "method": METHOD,
        "description": "Mahalanobis distance of the pooled 512-d embedding to the nearest class mean, "
        "tied covariance (shrinkage 1e-2), fitted on the training split"
        + (f" (a seeded sample of {len(e_train)} images)" if max_fit is not None else "")
        + (f" without the held-out source {holdout}" if holdout else ""),
        "output": OOD_OUTPUT,
        "threshold": threshold,
        "calibration": f"{quantile:.0%} of validation images score at or below the threshold",
        "n_fit": len(e_train),
        "n_calibration": len(e_val),
        "val_pass_rate": float((val_scores <= threshold).mean()),
    }
    fitted = [label for c, label in enumerate(labels) if (y_train == c).any()]
    if fitted != labels:
        record["classes_fitted"] = fitted
        record["description"] += f"; class means only for {', '.join(fitted)} (no other class in the fitting data)"
    add_to_graph(proto, meta.outputs["embedding"], means, precision)
    model.meta = meta.with_updates(ood=record, outputs={**meta.outputs, "ood_score": OOD_OUTPUT})
    write_contract(proto, model.meta)
    onnx.checker.check_model(proto)
    if isinstance(model_path, OnnxModel) and out is None:
        console.print(f"OOD guard: threshold {threshold:.3f} ({record['calibration']}); fitted into {model.path.name}")
        return record
    target = out or model.path
    save_model(proto, target)
    console.print(f"OOD guard: threshold {threshold:.3f} ({record['calibration']}); wrote {target}")
    return record
