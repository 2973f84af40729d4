"""Fine-tune a ResNet-18 on class folders of chest X-rays. Needs the ``train`` extra (torch).

Import this module only inside the ``train`` command: it imports torch at the top.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import torch
    import torch.nn.functional as F
    import torchvision
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    from cxr_batch.errors import MissingExtraError

    raise MissingExtraError("training", "train", "torch, torchvision") from exc

from rich.console import Console

from cxr_batch import __version__
from cxr_batch.engine.lungs import crop_reader, preprocess_for
from cxr_batch.engine.postprocess import softmax
from cxr_batch.errors import CxrBatchError, DataError, ImageError
from cxr_batch.evaluation.metrics import classification_metrics, metrics_by_source
from cxr_batch.evaluation.tables import print_by_source, print_metrics
from cxr_batch.io.labelled import LabelledSet, Split, find_labelled_many, make_split
from cxr_batch.io.lungs import lung_view
from cxr_batch.io.preprocess import PreprocessSpec, decode, resize_grey
from cxr_batch.io.safe_open import open_regular
from cxr_batch.io.safe_write import atomic_file, write_file_atomic
from cxr_batch.report.progress import progress_bar
from cxr_batch.text import markup, shown

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TrainConfig:
    """The effective configuration of a run; saved as ``config.json`` in the run folder."""

    data_dirs: tuple[str, ...]
    out: str
    classes: tuple[str, ...] | None = None
    split: str | None = None
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    image_size: int = 224
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    weights: str = "none"
    hflip: bool = False
    patience: int = 8
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    resize: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    threads: int | None = None
    limit_per_class: int | None = None  # smoke tests: use only the first N files of each class
    #: augmentation preset: "light" (affine + brightness/contrast) or "scanner" (see augment_scanner)
    augment: str = "light"
    #: sampling weights: "class" (each class equally often) or "class+source" (each class equally
    #: often and, within a class, each source equally often)
    balance: str = "class"
    #: images drawn per epoch (default: the size of the training split)
    epoch_images: int | None = None
    #: the OneCycle schedule's warm-up share of the steps
    warmup: float = 0.15
    #: labels-file roots: (label value, class) pairs read before canonical_label (see find_labelled_csv)
    label_map: tuple[tuple[str, str], ...] = ()
    #: a source kept out of training: its train and val rows are validation (a hospital never seen);
    #: its test rows stay test
    holdout_source: str | None = None
    #: "lungs": train on lung crops (the embedded segmenter's :func:`cxr_batch.io.lungs.lung_view`,
    #: recorded in the contract so classify crops the same way); None: whole films
    crop: str | None = None
    #: label values of labels-file rows that are no class (``tuberculosis``) whose films are trained
    #: as "not normal": a loss on P(normal) alone, no new class, so a hospital's films are not all
    #: normal (the held-out source's are never trained on)
    not_normal: tuple[str, ...] = ()

    @property
    def data_dir(self) -> str:
        """The first data root (the only one for single-root runs)."""
        return self.data_dirs[0]

    def spec(self) -> PreprocessSpec:
        return PreprocessSpec((self.image_size, self.image_size), self.mean, self.std, self.resize, self.crop)


@dataclass
class History:
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = -math.inf


def plain(value: Any) -> Any:
    """``value`` as plain data a checkpoint may hold and ``torch.load(weights_only=True)`` accepts:
    dicts, lists, strings, numbers, booleans and None (numpy scalars and arrays become numbers and
    lists, tuples lists, paths and anything else strings). Tensors are left as they are."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, (int, str)) else k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a cxr-batch checkpoint as plain data only (``weights_only=True``): a checkpoint that
    holds any other pickled object (which could run code when loaded) is refused, never run.

    Raises:
        CxrBatchError: the file is missing, not a regular file, damaged, or holds anything but
            tensors, dicts, lists, strings and numbers.
    """
    try:
        with open_regular(path) as fh:
            ck = torch.load(fh, map_location=device, weights_only=True)
    except OSError as exc:
        raise CxrBatchError(f"{path}: can't read the checkpoint ({exc.strerror or exc})") from None
    except Exception as exc:
        # weights_only refuses a pickled class or function as "Unsupported global"; bytes that are
        # no pickle at all (any other UnpicklingError) are just not a checkpoint
        if "Unsupported global" in str(exc):
            raise CxrBatchError(
                f"{path}: refused: the checkpoint holds Python objects other than tensors and plain data, "
                "and loading them could run code; only checkpoints written by cxr-batch train are loaded"
            ) from None
        raise CxrBatchError(f"{path}: not a cxr-batch checkpoint ({type(exc).__name__})") from None
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict):
        raise CxrBatchError(f"{path}: not a cxr-batch checkpoint (no model weights)")
    return ck


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write a checkpoint atomically (never through a link), as plain data that
    :func:`load_checkpoint` accepts."""
    with atomic_file(path) as fh:
        torch.save(plain(state), fh)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CxrBatchError("--device cuda: torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def build_model(num_classes: int, weights: str = "none") -> torch.nn.Module:
    """torchvision ResNet-18 with ``fc`` replaced for ``num_classes``.

    ``weights``: ``none`` (random init), ``imagenet`` (torchvision's IMAGENET1K_V1 through
    its normal download and cache) or a path to a local state dict (loaded weights_only).
    """
    if weights == "imagenet":
        try:
            model = torchvision.models.resnet18(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
        except Exception as exc:  # urllib/HTTP/OS errors when offline and not cached
            raise CxrBatchError(
                f"could not load torchvision's ImageNet ResNet-18 weights ({type(exc).__name__}: {exc}). "
                "Offline? Use --weights none to train from random initialisation, or --weights PATH "
                "with a local state dict (e.g. a copy of resnet18-f37072fd.pth)."
            ) from None
    else:
        model = torchvision.models.resnet18(weights=None)
        if weights.endswith(".onnx"):
            from cxr_batch.training.onnx_init import load_onnx_weights

            path = Path(weights)
            if not path.is_file():
                raise CxrBatchError(f"--weights {weights}: no such file")
            model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
            load_onnx_weights(model, path, num_classes)
            return model  # type: ignore[no-any-return]
        if weights not in ("none", ""):
            path = Path(weights)
            if not path.is_file():
                raise CxrBatchError(f"--weights {weights}: not 'imagenet', 'none' or an existing file")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CxrBatchError(f"--weights {path}: cannot load a state dict ({exc})") from None
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or [m for m in missing if not m.startswith("fc.")]:
                raise CxrBatchError(
                    f"--weights {path}: not a ResNet-18 state dict (missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    return model  # type: ignore[no-any-return]


def _load_cache(
    items: Sequence[tuple[Path, str]],
    labels: Sequence[str],
    size: int,
    method: str,
    console: Console,
    what: str,
    workers: int = 0,
    crop: str | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Decode, crop to the lungs when ``crop`` asks (:func:`cxr_batch.io.lungs.lung_view`) and resize
    every file once (the first half of the shared preprocessing), in threads.

    Stored as float16 to halve the memory; validation during training reads this cache, the final
    test report goes through :func:`cxr_batch.engine.lungs.preprocess_for` itself.
    """
    from concurrent.futures import ThreadPoolExecutor

    arr = np.zeros((len(items), size, size), dtype=np.float16)
    ys = np.asarray([labels.index(label) for _, label in items], dtype=np.int64)
    keep = np.ones(len(items), dtype=bool)
    errors: list[str] = []
    read = crop_reader(crop)

    def load(path: Path) -> np.ndarray | str:
        try:
            grey, _ = lung_view(decode(path, (size, size)).grey, read, crop)
            return resize_grey(grey, (size, size), method)
        except ImageError as exc:
            return f"{path}: {exc}"

    with (
        progress_bar(console, len(items), console.is_terminal, f"decode {what}", "img/s", log=True) as advance,
        ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool,
    ):
        for i, got in enumerate(pool.map(load, [p for p, _ in items])):
            if isinstance(got, str):
                keep[i] = False
                errors.append(got)
            else:
                arr[i] = got
            advance(1)
    return arr[keep], ys[keep], errors, keep


def augment(x: torch.Tensor, gen: torch.Generator, hflip: bool) -> torch.Tensor:
    """Random affine (rotation ±7°, scale 0.9-1.1, shift ±6%), brightness/contrast ±10%.

    ``x``: (N, 1, H, W) grey in [0, 1]. Runs on whole batches, on the training device.
    """
    n = x.shape[0]
    dev = x.device

    def u(lo: float, hi: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen) * (hi - lo) + lo).to(dev)

    angle = u(-7, 7) * math.pi / 180
    scale = u(0.9, 1.1)
    tx, ty = u(-0.06, 0.06), u(-0.06, 0.06)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    if hflip:
        flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
        theta[flip, 0, :2] *= -1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = u(0.9, 1.1).view(n, 1, 1, 1)
    bright = u(-0.1, 0.1).view(n, 1, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + bright).clamp(0.0, 1.0)


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """(1, H, W) grey in [0, 1] through a JPEG encode/decode at ``quality`` (Pillow)."""
    import io

    from PIL import Image

    u8 = (x[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(u8, mode="L").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    back = np.asarray(Image.open(buf).convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(back)[None].to(x.device, x.dtype)


def augment_scanner(x: torch.Tensor, gen: torch.Generator, hflip: bool) -> torch.Tensor:
    """What differs between hospitals' pipelines, on top of :func:`augment`'s geometry:

    - crop and scale (0.85-1.15), rotation ±10°, shift ±8%;
    - resolution loss: half the images shrunk to 35-90% and re-sampled back;
    - JPEG re-compression (quality 30-90) on a third;
    - gamma 0.7-1.45 (log-uniform) on half, contrast ±20% and brightness ±10%;
    - Gaussian noise (σ up to 0.03) on a third.

    ``x``: (N, 1, H, W) grey in [0, 1]. Every draw comes from ``gen``, so a resumed epoch repeats.
    """
    n, _, h, w = x.shape
    dev = x.device

    def u(lo: float, hi: float, k: int = n) -> torch.Tensor:
        return torch.rand(k, generator=gen) * (hi - lo) + lo

    angle = u(-10, 10) * math.pi / 180
    scale = u(0.85, 1.15)
    tx, ty = u(-0.08, 0.08), u(-0.08, 0.08)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(dev)
    if hflip:
        flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
        theta[flip, 0, :2] *= -1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    shrink, factor = torch.rand(n, generator=gen) < 0.5, u(0.35, 0.9)
    jpeg, quality = torch.rand(n, generator=gen) < 1 / 3, u(30, 90)
    gamma_on, gamma = torch.rand(n, generator=gen) < 0.5, torch.exp(u(math.log(0.7), math.log(1.45)))
    noise_on, sigma = torch.rand(n, generator=gen) < 1 / 3, u(0.0, 0.03)
    noise = torch.randn(x.shape, generator=gen).to(dev)
    out = []
    for i in range(n):
        xi = x[i : i + 1]
        if shrink[i]:
            size = (max(8, int(h * float(factor[i]))), max(8, int(w * float(factor[i]))))
            xi = F.interpolate(xi, size=size, mode="area")
            xi = F.interpolate(xi, size=(h, w), mode="bilinear", align_corners=False)
        if jpeg[i]:
            xi = _jpeg(xi[0], int(quality[i]))[None]
        if gamma_on[i]:
            xi = xi.clamp(0, 1) ** float(gamma[i])
        if noise_on[i]:
            xi = xi + noise[i : i + 1] * float(sigma[i])
        out.append(xi)
    x = torch.cat(out)
    contrast = u(0.8, 1.2).view(n, 1, 1, 1).to(dev)
    bright = u(-0.1, 0.1).view(n, 1, 1, 1).to(dev)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + bright).clamp(0.0, 1.0)


AUGMENTATIONS = {"light": augment, "scanner": augment_scanner}


#: the training target of a "not normal" film (``--not-normal``): no class, only P(normal) is trained down
NOT_NORMAL = -1


def sampling_weights(
    y: np.ndarray, sources: Sequence[str], n_labels: int, balance: str, normal: int | None = None
) -> np.ndarray:
    """Per-image draw weights: each class drawn equally often; with ``class+source`` each source within
    a class equally often too (so no source's share of a class is a shortcut to learn).

    "Not normal" films (``y == NOT_NORMAL``, class ``normal`` given) are drawn, per source, as often as
    that source's normal films: a hospital's identity then says nothing about normal or not."""
    y = np.asarray(y)
    src = np.asarray(list(sources), dtype=object)
    w = np.zeros(len(y), dtype=np.float64)
    for c in range(n_labels):
        in_c = y == c
        if not in_c.any():
            continue
        if balance == "class+source":
            names = sorted(set(src[in_c].tolist()))
            for name in names:
                m = in_c & (src == name)
                w[m] = 1.0 / (n_labels * len(names) * m.sum())
        else:
            w[in_c] = 1.0 / (n_labels * in_c.sum())
    nn = y == NOT_NORMAL
    if nn.any():
        if normal is None:
            raise ValueError("not-normal films need the index of the normal class")
        for name in sorted(set(src[nn].tolist())):
            m, twin = nn & (src == name), (y == normal) & (src == name)
            w[m] = w[twin].sum() / m.sum() if twin.any() else 0.0
    return w


def training_loss(logits: torch.Tensor, y: torch.Tensor, normal: int | None) -> torch.Tensor:
    """Cross-entropy on labelled films; on "not normal" films (``y == NOT_NORMAL``) -log(1 - P(normal)),
    which leaves the split between the other classes free. Plain cross-entropy when none is in the batch."""
    nn = y == NOT_NORMAL
    if normal is None or not bool(nn.any()):
        return F.cross_entropy(logits, y)
    lsm = F.log_softmax(logits.float(), dim=1)
    ce = F.nll_loss(lsm, y.clamp(min=0), reduction="none")
    others = [i for i in range(logits.shape[1]) if i != normal]
    not_normal = -torch.logsumexp(lsm[:, others], dim=1)
    return torch.where(nn, not_normal, ce).mean()


def normalise_torch(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, 1, H, W) grey → (N, 3, H, W), ``(x - mean) / std``: cxr_batch.io.preprocess.normalise in torch."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - m) / s


@torch.no_grad()
def predict_cached(
    model: torch.nn.Module, arr: np.ndarray, cfg: TrainConfig, device: torch.device, amp: bool
) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(arr), 64):
        x = torch.from_numpy(arr[i : i + 64].astype(np.float32)).unsqueeze(1).to(device)
        x = normalise_torch(x, cfg.mean, cfg.std).contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def _bf16_ok() -> bool:
    """bf16 autocast helps only where the CPU has native bf16 (measured 3x faster with AVX512_BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            info = fh.read()
        return "avx512_bf16" in info or "amx_bf16" in info
    except OSError:
        return False


@torch.no_grad()
def evaluate_files(
    model: torch.nn.Module,
    items: Sequence[tuple[Path, str] | tuple[Path, str, str]],
    labels: Sequence[str],
    spec: PreprocessSpec,
    device: torch.device,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """The final report's path: cxr_batch.engine.lungs.preprocess_for (what classify runs),
    then the model in fp32. ``items``: (path, label) or (path, label, source).
    Returns (y_true, probabilities, errors, the source of each row)."""
    model.eval()
    ys, probs, errors = [], [], []
    sources: list[str] = []
    batch: list[np.ndarray] = []
    batch_y: list[int] = []

    def flush() -> None:
        if batch:
            x = torch.from_numpy(np.stack(batch)).to(device)
            probs.append(softmax(model(x).float().cpu().numpy()))
            ys.extend(batch_y)
            batch.clear()
            batch_y.clear()

    read = crop_reader(spec.crop)
    for item in items:
        path, label = item[0], item[1]
        try:
            tensor, _ = preprocess_for(path, spec, read)
        except ImageError as exc:
            errors.append(f"{path}: {exc}")
            continue
        sources.append(str(item[2]) if len(item) > 2 else "")
        batch.append(tensor)
        batch_y.append(list(labels).index(label))
        if len(batch) == batch_size:
            flush()
    flush()
    p = np.concatenate(probs) if probs else np.zeros((0, len(labels)))
    return np.asarray(ys, dtype=np.int64), p, errors, sources


def _not_normal_cache(
    sets: Sequence[LabelledSet], cfg: TrainConfig, labels: Sequence[str], normal: int | None, console: Console
) -> tuple[np.ndarray, list[str], list[str]]:
    """The ``--not-normal`` films of every source but the held-out one, decoded as the training
    films are: (images, their sources, files skipped)."""
    if normal is None:
        raise CxrBatchError("--not-normal needs a 'normal' class")
    wanted = set(cfg.not_normal)
    picked = [
        (path, d.source)
        for d in sets
        if d.source != cfg.holdout_source
        for path, value in d.left_out
        if value in wanted
    ]
    if not picked:
        raise DataError(
            f"--not-normal {', '.join(sorted(wanted))}: no labels-file row of a trained source has that label"
        )
    x, _, errors, keep = _load_cache(
        [(p, labels[normal]) for p, _ in picked],
        labels,
        cfg.image_size,
        cfg.resize,
        console,
        "not normal",
        cfg.workers,
        cfg.crop,
    )
    sources = [src for (_, src), k in zip(picked, keep, strict=True) if k]
    counts = {name: sources.count(name) for name in sorted(set(sources))}
    console.print(
        markup("trained as not normal: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        + (f" (never {markup(cfg.holdout_source)}'s: held out)" if cfg.holdout_source else "")
    )
    return x, sources, errors


def holdout_parts(
    train: list[tuple[Path, str, str]], val: list[tuple[Path, str, str]], holdout: str | None
) -> tuple[list[tuple[Path, str, str]], list[tuple[Path, str, str]]]:
    """Move the held-out source's training rows to validation: (train, val) with ``holdout`` never trained on."""
    if not holdout:
        return train, val
    return [t for t in train if t[2] != holdout], val + [t for t in train if t[2] == holdout]


def train_model(
    cfg: TrainConfig, resume: bool = False, console: Console | None = None, report_test: bool = True
) -> dict[str, Any]:
    """Train, select on validation, report once on test. Returns the test metrics.

    ``report_test=False`` (recipe sweeps) stops after training without reading the test split.

    The run folder gets config.json, split.csv, last.ckpt, best.ckpt, history.json and metrics.json.
    """
    console = console or Console(stderr=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    amp = device.type == "cuda" or _bf16_ok()
    last_path = out / "last.ckpt"
    if resume and not last_path.exists():
        raise CxrBatchError(f"--resume: {last_path} does not exist")
    if not resume and last_path.exists():
        raise CxrBatchError(f"{out} already holds a run; use --resume to continue it or another --out")

    sets = find_labelled_many(list(cfg.data_dirs), cfg.classes, dict(cfg.label_map))
    if cfg.limit_per_class:
        for data in sets:
            kept: list[tuple[Path, str]] = []
            for label in data.labels:
                kept.extend([it for it in data.items if it[1] == label][: cfg.limit_per_class])
            data.items = kept
    if cfg.augment not in AUGMENTATIONS:
        raise CxrBatchError(f"unknown augmentation {cfg.augment!r}; choose from {sorted(AUGMENTATIONS)}")
    if cfg.balance not in ("class", "class+source"):
        raise CxrBatchError(f"unknown balance {cfg.balance!r}; choose class or class+source")
    labels = sets[0].labels
    layout = " + ".join(f"{d.source} ({d.layout})" for d in sets) if len(sets) > 1 else sets[0].layout
    split_file = out / "split.csv"
    if cfg.split:
        split = Split.read(Path(cfg.split))
    elif resume and split_file.exists():
        split = Split.read(split_file)
    else:
        split = make_split(sets, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    unknown = {r[1] for r in split.rows} - set(labels)
    if unknown:
        raise DataError(f"the split has labels {sorted(unknown)} that are not among the classes {labels}")
    if cfg.holdout_source is not None and cfg.holdout_source not in {d.source for d in sets}:
        raise DataError(
            f"--holdout-source {cfg.holdout_source}: not a source of this run ({', '.join(d.source for d in sets)})"
        )
    split.write(split_file)
    write_file_atomic(
        out / "config.json",
        json.dumps(
            {
                **asdict(cfg),
                "labels": labels,
                "layout": layout,
                "sources": {d.source: str(d.root) for d in sets},
                "excluded": {d.source: d.excluded for d in sets if d.excluded},
                "ignored_folders": [f"{d.source}/{x}" if len(sets) > 1 else x for d in sets for x in d.ignored],
                "device_resolved": str(device),
                "autocast": amp,
                "cxr_batch": __version__,
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "python": platform.python_version(),
            },
            indent=2,
        ),
    )
    roots = {d.source: Path(d.root) for d in sets}
    train_src, val_src, test_src = (split.items(roots, s) for s in ("train", "val", "test"))
    train_src, val_src = holdout_parts(train_src, val_src, cfg.holdout_source)
    train_items, val_items, test_items = ([(p, x) for p, x, _ in part] for part in (train_src, val_src, test_src))
    console.print(f"run folder: {markup(str(out))}", highlight=False, soft_wrap=True)
    for d in sets:
        if d.excluded:
            console.print(
                markup(f"{d.source}: left out (not a class): " + ", ".join(f"{k} {v}" for k, v in d.excluded.items()))
            )
    if cfg.holdout_source:
        n_held = sum(1 for _, _, src in val_src if src == cfg.holdout_source)
        console.print(
            f"held out of training: {markup(cfg.holdout_source)} ({n_held} validation files; its test rows stay test)"
        )
    console.print(
        f"[bold]{markup(layout)}[/]: {len(split.rows)} files, labels {markup(labels)}; "
        f"train {len(train_items)} / val {len(val_items)} / test {len(test_items)}; device {device}"
        + (" (autocast)" if amp else "")
    )
    if not train_items or not val_items:
        raise DataError("the split has no training or no validation files; add images or change the fractions")

    size = cfg.image_size
    if cfg.crop not in (None, "lungs"):
        raise CxrBatchError(f"unknown crop {cfg.crop!r}; choose lungs or none")
    x_train, y_train, err_train, keep_train = _load_cache(
        train_items, labels, size, cfg.resize, console, "train", cfg.workers, cfg.crop
    )
    x_val, y_val, err_val, keep_val = _load_cache(
        val_items, labels, size, cfg.resize, console, "val", cfg.workers, cfg.crop
    )
    s_train = [s for (_, _, s), k in zip(train_src, keep_train, strict=True) if k]
    s_val = [s for (_, _, s), k in zip(val_src, keep_val, strict=True) if k]
    normal = labels.index("normal") if "normal" in labels else None
    if cfg.not_normal:
        x_nn, s_nn, err_nn = _not_normal_cache(sets, cfg, labels, normal, console)
        x_train = np.concatenate([x_train, x_nn])
        y_train = np.concatenate([y_train, np.full(len(x_nn), NOT_NORMAL, np.int64)])
        s_train = [*s_train, *s_nn]
        err_train += err_nn
    for e in err_train + err_val:
        console.print(f"[yellow]skipped[/] {markup(e)}", highlight=False, soft_wrap=True)

    torch.manual_seed(cfg.seed)
    model = build_model(len(labels), cfg.weights)
    if cfg.weights.endswith(".onnx") and not resume:
        from cxr_batch.training.onnx_init import recalibrate_batchnorm

        pick = np.linspace(0, len(x_train) - 1, min(len(x_train), 512)).astype(np.int64)
        xb0 = torch.from_numpy(x_train[pick].astype(np.float32)).unsqueeze(1)
        recalibrate_batchnorm(model, normalise_torch(xb0, cfg.mean, cfg.std))
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, (cfg.epoch_images or len(x_train)) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=cfg.warmup
    )
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    history = History()
    start_epoch = 0
    if resume:
        ck = load_checkpoint(last_path, device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        history = History(**ck["history"])
        start_epoch = ck["epoch"] + 1
        console.print(f"resuming after epoch {ck['epoch'] + 1}")

    # Balanced sampling with replacement: each class (and with class+source each source in it) equally often.
    weights = torch.from_numpy(sampling_weights(y_train, s_train, len(labels), cfg.balance, normal))
    augment_fn = AUGMENTATIONS[cfg.augment]
    gen = torch.Generator().manual_seed(cfg.seed)
    patience_left = cfg.patience

    for epoch in range(start_epoch, cfg.epochs):
        gen.manual_seed(cfg.seed * 1000 + epoch)  # resumable: each epoch's draws depend only on its number
        order = torch.multinomial(weights, steps_per_epoch * cfg.batch_size, replacement=True, generator=gen)
        model.train()
        t0 = time.time()
        loss_sum, seen = 0.0, 0
        what = f"epoch {epoch + 1}/{cfg.epochs}"
        with progress_bar(console, steps_per_epoch, console.is_terminal, what, "steps/s", log=True) as advance:
            for step in range(steps_per_epoch):
                idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size].numpy()
                xb = torch.from_numpy(x_train[idx].astype(np.float32)).unsqueeze(1).to(device)
                yb = torch.from_numpy(y_train[idx]).to(device)
                xb = normalise_torch(augment_fn(xb, gen, cfg.hflip), cfg.mean, cfg.std)
                xb = xb.contiguous(memory_format=torch.channels_last)
                with _autocast(device, amp):
                    loss = training_loss(model(xb), yb, normal)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                loss_sum += float(loss.detach()) * len(idx)
                seen += len(idx)
                advance(1)
        train_time = time.time() - t0
        logits = predict_cached(model, x_val, cfg, device, amp)
        vm = classification_metrics(y_val, softmax(logits), labels)
        vs = metrics_by_source(y_val, softmax(logits), labels, s_val) if len(roots) > 1 else {}
        val_loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_val)))
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "val_loss": val_loss,
            "val_accuracy": vm["accuracy"],
            "val_macro_f1": vm["macro_f1"],
            **{f"val_recall_{k}": v["recall"] for k, v in vm["per_class"].items()},
            **{f"val_accuracy[{k}]": v["accuracy"] for k, v in vs.items()},
            "lr": sched.get_last_lr()[0],
            "seconds": round(time.time() - t0, 1),
            "images_per_s": round(seen / train_time, 1),
        }
        history.epochs.append(row)
        score = vm["macro_f1"] - 1e-3 * val_loss  # macro-F1 first, lower loss breaks ties
        improved = score > history.best_score
        if improved:
            history.best_score, history.best_epoch = score, epoch + 1
            patience_left = cfg.patience
        else:
            patience_left -= 1
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": epoch,
            "history": asdict(history),
            "labels": labels,
            "config": asdict(cfg),
            "arch": "resnet18",
        }
        # best before last: a run killed between the two writes resumes from a last.ckpt whose best
        # checkpoint exists (the other order could leave a run that says "improved" with no best.ckpt)
        if improved:
            save_checkpoint({k: v for k, v in state.items() if k not in ("optimizer", "scheduler")}, out / "best.ckpt")
        save_checkpoint(state, last_path)
        write_file_atomic(out / "history.json", json.dumps(asdict(history), indent=2))
        for line in epoch_lines(history.epochs[-1:], labels, header=epoch == start_epoch):
            console.print(shown(line), highlight=False, soft_wrap=True, markup=False)
        if patience_left <= 0:
            console.print(f"early stop: no validation improvement for {cfg.patience} epochs")
            break

    if not report_test:
        return {}
    return final_report(out, cfg, labels, test_src, device, console)


def final_report(
    out: Path,
    cfg: TrainConfig,
    labels: Sequence[str],
    test_items: Sequence[tuple[Path, str, str]],
    device: torch.device,
    console: Console,
) -> dict[str, Any]:
    """Evaluate the best checkpoint on the test split, once, through the shared numpy path,
    overall and per source."""
    ck = load_checkpoint(out / "best.ckpt", device)
    model = build_model(len(labels)).to(device)
    model.load_state_dict(ck["model"])
    model.float().eval()
    y, probs, errors, sources = evaluate_files(model, test_items, labels, cfg.spec(), device)
    metrics = classification_metrics(y, probs, labels)
    metrics["by_source"] = metrics_by_source(y, probs, labels, sources)
    metrics["split"] = "test"
    metrics["best_epoch"] = ck["history"]["best_epoch"]
    metrics["errors"] = errors
    write_file_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    print_metrics(metrics, console, title=f"test split, best epoch {metrics['best_epoch']}")
    print_by_source(metrics["by_source"], console, title="test split per source")
    return metrics


def _epoch_columns(labels: Sequence[str]) -> list[tuple[str, str, int]]:
    """(key, header, width) of the per-epoch table: fixed widths, so each row printed after its
    epoch lines up with the header printed before the first."""
    cols = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1"] + [f"val_recall_{x}" for x in labels]
    cols += ["images_per_s", "seconds"]
    out = []
    for c in cols:
        header = c.replace("val_", "val ").replace("_", " ")
        out.append((c, header, max(8, len(header))))
    return out


def epoch_lines(rows: list[dict[str, Any]], labels: Sequence[str], header: bool) -> list[str]:
    """The per-epoch table as plain fixed-width lines (the header first when ``header``)."""
    cols = _epoch_columns(labels)
    lines = ["  ".join(h.rjust(w) for _, h, w in cols)] if header else []
    for r in rows:
        cells = []
        for c, _, w in cols:
            v = r.get(c, "")
            text = f"{v:.4f}" if isinstance(v, float) and c not in ("images_per_s", "seconds") else str(v)
            cells.append(text.rjust(w))
        lines.append("  ".join(cells))
    return lines


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: cxr-batch train DATA_DIR --out runs/NAME")
