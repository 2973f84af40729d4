"""Start training from a released cxr-batch ONNX model (``train --weights MODEL.onnx``).

The exported graph has every BatchNorm folded into the convolution before it (``W' = W·γ/σ``,
``b' = β - μ·γ/σ``), so the original BatchNorm parameters are gone. :func:`load_onnx_weights` puts the
folded convolutions into a torchvision ResNet-18 and makes each BatchNorm the identity plus the folded
bias; :func:`recalibrate_batchnorm` then measures each BatchNorm's input statistics on real training
images and re-expresses the same function with those statistics (``running_mean = μ``, ``running_var
= σ²``, ``γ = √(σ² + ε)``, ``β = μ + b'``). In eval mode the network computes exactly what the ONNX
file computes; in train mode batch statistics are close to the stored ones, so fine-tuning starts
from the released model rather than from a network whose normalisation was thrown away.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cxr_batch.errors import CxrBatchError


def _conv_order(model: torch.nn.Module, size: int) -> list[str]:
    order: list[str] = []
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: order.append(n)))
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    model.train(was)
    for h in hooks:
        h.remove()
    return order


def _bn_name(conv: str) -> str:
    if conv.endswith("downsample.0"):
        return conv[: -len("0")] + "1"
    head, _, last = conv.rpartition(".")
    return (head + "." if head else "") + last.replace("conv", "bn")


def load_onnx_weights(model: torch.nn.Module, path: Path, num_classes: int) -> None:
    """Copy the folded convolutions and the classifier of a cxr-batch fp32 ONNX ResNet-18 into ``model``.

    Raises:
        CxrBatchError: not an fp32 ResNet-18 graph with that many classes, or ``onnx`` missing.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:  # pragma: no cover - onnx is in the train extra
        raise CxrBatchError("--weights MODEL.onnx needs the onnx package (train extra)") from None
    try:
        proto = onnx.load(str(path))
    except Exception as exc:
        raise CxrBatchError(f"--weights {path}: cannot read the ONNX file ({exc})") from None
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
        raise CxrBatchError(f"--weights {path}: a quantised model; start from the fp32 master file")
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    order = _conv_order(model, 64)
    if len(convs) != len(order):
        raise CxrBatchError(f"--weights {path}: {len(convs)} convolutions, a ResNet-18 has {len(order)}")
    modules = dict(model.named_modules())
    unused = list(convs)
    for name in order:
        conv = modules[name]
        assert isinstance(conv, torch.nn.Conv2d)
        shape = tuple(conv.weight.shape)
        match = next((n for n in unused if n.input[1] in init and init[n.input[1]].shape == shape), None)
        if match is None or len(match.input) < 3 or match.input[2] not in init:
            raise CxrBatchError(f"--weights {path}: no folded convolution of shape {shape} for {name}")
        unused.remove(match)
        bn = modules[_bn_name(name)]
        assert isinstance(bn, torch.nn.BatchNorm2d)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(init[match.input[1]].copy()))
            bias = torch.from_numpy(init[match.input[2]].copy())
            bn.weight.fill_(1.0)
            bn.bias.copy_(bias)
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
    gemm = [n for n in proto.graph.node if n.op_type == "Gemm"]
    fc = model.fc
    assert isinstance(fc, torch.nn.Linear)
    if len(gemm) != 1 or gemm[0].input[1] not in init:
        raise CxrBatchError(f"--weights {path}: expected one Gemm classifier, found {len(gemm)}")
    w = init[gemm[0].input[1]]
    trans_b = next((a.i for a in gemm[0].attribute if a.name == "transB"), 0)
    w = w if trans_b else w.T
    if w.shape != tuple(fc.weight.shape):
        raise CxrBatchError(
            f"--weights {path}: classifier {w.shape}, expected {tuple(fc.weight.shape)} ({num_classes} classes)"
        )
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
        fc.bias.copy_(torch.from_numpy(init[gemm[0].input[2]].copy()))


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor, batch: int = 32) -> None:
    """Give every identity-plus-bias BatchNorm (see :func:`load_onnx_weights`) the statistics of its
    input on ``x`` (normalised model inputs) without changing what the network computes in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    stats: dict[int, list[torch.Tensor | int]] = {}

    def hook(m: torch.nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        t = inp[0].double()
        s = stats.setdefault(id(m), [torch.zeros(t.shape[1], dtype=torch.float64)] * 2 + [0])
        s[0] = s[0] + t.sum(dim=(0, 2, 3))  # type: ignore[operator]
        s[1] = s[1] + (t * t).sum(dim=(0, 2, 3))  # type: ignore[operator]
        s[2] = int(s[2]) + t.shape[0] * t.shape[2] * t.shape[3]

    hooks = [m.register_forward_hook(hook) for m in bns]
    was = model.training
    model.eval()
    for i in range(0, len(x), batch):
        model(x[i : i + batch])
    for h in hooks:
        h.remove()
    for m in bns:
        s1, s2, n = stats[id(m)]
        assert isinstance(s1, torch.Tensor) and isinstance(s2, torch.Tensor) and isinstance(n, int)
        assert m.running_mean is not None and m.running_var is not None
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(1e-8)
        bias = m.bias.double()
        m.running_mean.copy_(mean.float())
        m.running_var.copy_(var.float())
        m.weight.copy_(torch.sqrt(var + m.eps).float())
        m.bias.copy_((mean + bias).float())
    model.train(was)
