"""Train the lung-field segmenter (a small U-Net) on folders of films with lung masks; export it.

Needs the ``train`` extra (torch, onnx); import only inside ``train-lungs`` / ``export-lungs``.

A mask folder holds ``images/NAME.png`` and ``masks/NAME.png`` (0 background, 255 lung): the
layout of ``../shared/data/lung-masks/*``. Each folder is a source; the split draws a validation
part from every source (seeded). Images go through the one preprocessing path
(:func:`cxr_batch.io.preprocess.decode` then :func:`~cxr_batch.io.preprocess.resize_grey`), so the
segmenter sees at training time exactly what it sees in ``classify``.

Run folder: config.json, split.csv, history.json, metrics.json, last.pt, best.pt (plain state
dicts and numbers, loaded with ``weights_only=True``).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    from cxr_batch.errors import MissingExtraError

    raise MissingExtraError("training", "train", "torch") from exc

from rich.console import Console

from cxr_batch import __version__
from cxr_batch.errors import CxrBatchError, DataError, ImageError
from cxr_batch.io.lungs import dice
from cxr_batch.io.preprocess import IMAGE_SUFFIXES, decode, resize_grey
from cxr_batch.io.safe_open import MAX_LIST_BYTES, read_json, read_text
from cxr_batch.io.safe_write import write_file_atomic

#: Grey [0, 1] → (x - mean) / std, one channel.
LUNG_MEAN = 0.5
LUNG_STD = 0.25


@dataclass(frozen=True)
class LungTrainConfig:
    mask_dirs: tuple[str, ...]
    out: str
    image_size: int = 128
    channels: tuple[int, ...] = (8, 16, 32, 64, 128)
    epochs: int = 25
    batch_size: int = 16
    epoch_images: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 8
    val_fraction: float = 0.15
    seed: int = 0
    threads: int | None = None
    resize: str = "bilinear"
    mean: float = LUNG_MEAN
    std: float = LUNG_STD
    #: smoke tests: only the first N pairs of each folder
    limit_per_source: int | None = None


# --------------------------------------------------------------------------------------------
# the network


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """A small U-Net: one grey channel in, one lung logit per pixel out (same size)."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        ch = list(channels)
        self.down = nn.ModuleList()
        cin = 1
        for c in ch[:-1]:
            self.down.append(_Block(cin, c))
            cin = c
        self.bottom = _Block(ch[-2], ch[-1])
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for c_skip, c_in in zip(reversed(ch[:-1]), reversed(ch[1:]), strict=True):
            self.up.append(nn.ConvTranspose2d(c_in, c_skip, 2, stride=2))
            self.dec.append(_Block(2 * c_skip, c_skip))
        self.head = nn.Conv2d(ch[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            x = dec(torch.cat([up(x), skip], 1))
        out: torch.Tensor = self.head(x)
        return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# data


def mask_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of one mask folder, sorted by name.

    Raises:
        DataError: the folder lacks images/ or masks/, or holds no pair.
    """
    images, masks = folder / "images", folder / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise DataError(f"{folder}: a mask folder needs images/ and masks/ subfolders")
    pairs = [
        (p, masks / p.name)
        for p in sorted(images.iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES and (masks / p.name).is_file()
    ]
    if not pairs:
        raise DataError(f"{folder}: no image in images/ has a mask of the same name in masks/")
    return pairs


def load_pair(image: Path, mask: Path, size: int, method: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """(grey image resized to size², binary mask resized to size²) through the shared decoder."""
    x = resize_grey(decode(image, (size, size)).grey, (size, size), method)
    m = resize_grey(decode(mask).grey, (size, size), "box") >= 0.5
    return x, m


def load_full_mask(mask: Path) -> np.ndarray:
    return decode(mask).grey >= 0.5


def make_split(
    sources: dict[str, list[tuple[Path, Path]]], seed: int, val_fraction: float
) -> list[tuple[str, str, str]]:
    """(source, name, train|val) rows: a seeded validation part of every source."""
    rows: list[tuple[str, str, str]] = []
    for i, (source, pairs) in enumerate(sorted(sources.items())):
        rng = np.random.default_rng([seed, i])
        order = rng.permutation(len(pairs))
        n_val = max(1, round(val_fraction * len(pairs)))
        val = set(order[:n_val].tolist())
        rows.extend((source, p.name, "val" if j in val else "train") for j, (p, _) in enumerate(pairs))
    return rows


def fingerprint(rows: Sequence[tuple[str, str, str]]) -> str:
    """sha256 of the sorted (source, file, split) rows: which films trained the model."""
    h = hashlib.sha256()
    for row in sorted(rows):
        h.update(("\t".join(row) + "\n").encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# augmentation


def augment_pair(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift ±8%, scale 0.85-1.15, rotation ±10°, horizontal flip (half), gamma 0.6-1.6,
    contrast ±25%, brightness ±10%, Gaussian noise (σ ≤ 0.04, on half), resolution loss (a third).

    ``x`` (N, 1, H, W) grey in [0, 1], ``m`` (N, 1, H, W) in {0, 1}; the same geometry for both.
    """
    n, _, h, w = x.shape

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=gen) * (hi - lo) + lo

    angle = u(-10, 10) * math.pi / 180
    scale = u(0.85, 1.15)
    tx, ty = u(-0.08, 0.08), u(-0.08, 0.08)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    flip = torch.rand(n, generator=gen) < 0.5
    theta[flip, 0, :2] *= -1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    m = (F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False) >= 0.5).float()
    shrink, factor = torch.rand(n, generator=gen) < 1 / 3, u(0.3, 0.8)
    gamma = torch.exp(u(math.log(0.6), math.log(1.6))).view(n, 1, 1, 1)
    noise_on, sigma = torch.rand(n, generator=gen) < 0.5, u(0.0, 0.04)
    noise = torch.randn(x.shape, generator=gen)
    out = []
    for i in range(n):
        xi = x[i : i + 1]
        if shrink[i]:
            s = max(8, int(h * float(factor[i])))
            xi = F.interpolate(F.interpolate(xi, size=(s, s), mode="area"), size=(h, w), mode="bilinear")
        out.append(xi)
    x = torch.cat(out).clamp(0, 1) ** gamma
    x = x + noise * (sigma * noise_on).view(n, 1, 1, 1)
    contrast = u(0.75, 1.25).view(n, 1, 1, 1)
    bright = u(-0.1, 0.1).view(n, 1, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + bright).clamp(0.0, 1.0), m


def dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    soft_dice = (2 * inter + 1) / (p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return bce + (1 - soft_dice).mean()


# --------------------------------------------------------------------------------------------
# training


def _cache(
    pairs: Sequence[tuple[Path, Path]], size: int, method: str, console: Console
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    xs, ms, kept = [], [], []
    for i, (img, mask) in enumerate(pairs):
        try:
            x, m = load_pair(img, mask, size, method)
        except ImageError as exc:
            console.print(f"[yellow]skipped[/] {img}: {exc}")
            continue
        xs.append(x)
        ms.append(m)
        kept.append(i)
    return np.stack(xs).astype(np.float32), np.stack(ms).astype(np.float32), kept


@torch.no_grad()
def _val_dice(model: nn.Module, x: np.ndarray, m: np.ndarray, cfg: LungTrainConfig) -> np.ndarray:
    model.eval()
    out: list[float] = []
    for i in range(0, len(x), 32):
        xb = (torch.from_numpy(x[i : i + 32]).unsqueeze(1) - cfg.mean) / cfg.std
        pred = (model(xb)[:, 0] > 0).numpy()
        out.extend(dice(p, t > 0.5) for p, t in zip(pred, m[i : i + 32], strict=True))
    return np.asarray(out)


def train_lungs(cfg: LungTrainConfig, resume: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Train; select the epoch with the best mean validation Dice (mean over sources)."""
    console = console or Console(stderr=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    last_path = out / "last.pt"
    if resume and not last_path.exists():
        raise CxrBatchError(f"--resume: {last_path} does not exist")
    if not resume and last_path.exists():
        raise CxrBatchError(f"{out} already holds a run; use --resume to continue it or another --out")

    sources: dict[str, list[tuple[Path, Path]]] = {}
    for d in cfg.mask_dirs:
        name = Path(d).resolve().name
        if name in sources:
            raise DataError(f"two mask folders are named {name!r}; each folder is a source")
        pairs = mask_pairs(Path(d))
        sources[name] = pairs[: cfg.limit_per_source] if cfg.limit_per_source else pairs
    rows = make_split(sources, cfg.seed, cfg.val_fraction)
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["source", "file", "split"])
    w.writerows(rows)
    write_file_atomic(out / "split.csv", buf.getvalue())
    part = {(s, f): sp for s, f, sp in rows}
    train_pairs = [(s, p) for s, ps in sorted(sources.items()) for p in ps if part[(s, p[0].name)] == "train"]
    val_pairs = [(s, p) for s, ps in sorted(sources.items()) for p in ps if part[(s, p[0].name)] == "val"]
    write_file_atomic(
        out / "config.json",
        json.dumps(
            {
                **asdict(cfg),
                "sources": {
                    s: str(Path(d).resolve())
                    for s, d in zip(
                        sorted(sources), sorted(cfg.mask_dirs, key=lambda d: Path(d).resolve().name), strict=True
                    )
                },
                "pairs": {s: len(p) for s, p in sources.items()},
                "train": len(train_pairs),
                "val": len(val_pairs),
                "data_fingerprint": fingerprint(rows),
                "cxr_batch": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            indent=2,
        ),
    )
    size = cfg.image_size
    x_tr, m_tr, _ = _cache([p for _, p in train_pairs], size, cfg.resize, console)
    x_va, m_va, kept = _cache([p for _, p in val_pairs], size, cfg.resize, console)
    s_va = np.asarray([val_pairs[i][0] for i in kept])
    # each source drawn equally often
    s_tr = np.asarray([s for s, _ in train_pairs])
    weights = np.zeros(len(s_tr))
    for s in set(s_tr.tolist()):
        weights[s_tr == s] = 1.0 / (s_tr == s).sum()
    weights_t = torch.from_numpy(weights)
    console.print(f"lung masks: train {len(x_tr)} / val {len(x_va)} from {sorted(sources)}")

    torch.manual_seed(cfg.seed)
    model = UNet(cfg.channels)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, cfg.epoch_images // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.1)
    history: dict[str, Any] = {"epochs": [], "best_epoch": 0, "best_dice": -1.0}
    start = 0
    if resume:
        from cxr_batch.training.train import load_checkpoint

        ck = load_checkpoint(last_path)
        planned = ck["scheduler"].get("total_steps") if isinstance(ck.get("scheduler"), dict) else None
        if planned is not None and planned != cfg.epochs * steps:
            raise DataError(
                f"--resume continues the run in {out} with the schedule it started with "
                f"({planned // steps} epochs): give the same --epochs, "
                "or start a new run"
            )
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        history = read_json(out / "history.json", what="the run's history")
        start = int(ck["epoch"]) + 1
    patience_left = cfg.patience - (len(history["epochs"]) - history["best_epoch"] if history["epochs"] else 0)
    gen = torch.Generator()
    for epoch in range(start, cfg.epochs):
        gen.manual_seed(cfg.seed * 1000 + epoch)
        order = torch.multinomial(weights_t, steps * cfg.batch_size, replacement=True, generator=gen).numpy()
        model.train()
        t0 = time.time()
        loss_sum = 0.0
        for step in range(steps):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            xb, mb = augment_pair(
                torch.from_numpy(x_tr[idx]).unsqueeze(1), torch.from_numpy(m_tr[idx]).unsqueeze(1), gen
            )
            loss = dice_bce(model((xb - cfg.mean) / cfg.std), mb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach())
        dv = _val_dice(model, x_va, m_va, cfg)
        per_source = {s: float(dv[s_va == s].mean()) for s in sorted(set(s_va.tolist()))}
        score = float(np.mean(list(per_source.values())))
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / steps,
            "val_dice": score,
            **{f"val_dice[{s}]": v for s, v in per_source.items()},
            "lr": sched.get_last_lr()[0],
            "seconds": round(time.time() - t0, 1),
        }
        history["epochs"].append(row)
        improved = score > history["best_dice"]
        if improved:
            history["best_dice"], history["best_epoch"] = score, epoch + 1
            patience_left = cfg.patience
        else:
            patience_left -= 1
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": epoch,
        }
        from cxr_batch.training.train import save_checkpoint  # the one atomic, plain-data checkpoint writer

        if improved:  # best before last, as in train.py: a kill between the two never loses the best
            save_checkpoint({"model": model.state_dict(), "epoch": epoch}, out / "best.pt")
        save_checkpoint(state, last_path)
        write_file_atomic(out / "history.json", json.dumps(history, indent=2))
        console.print(
            f"epoch {epoch + 1:3d}  loss {row['train_loss']:.4f}  val Dice {score:.4f}  "
            + "  ".join(f"{s} {v:.4f}" for s, v in per_source.items())
            + f"  {row['seconds']}s"
            + ("  *" if improved else "")
        )
        if patience_left <= 0:
            console.print(f"early stop: no validation improvement for {cfg.patience} epochs")
            break
    metrics = {
        "best_epoch": history["best_epoch"],
        "val_dice_mean_of_sources": history["best_dice"],
        **{k: v for k, v in history["epochs"][history["best_epoch"] - 1].items() if k.startswith("val_dice[")},
    }
    write_file_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def load_unet(run: Path) -> tuple[UNet, dict[str, Any]]:
    config = read_json(run / "config.json", what="the run's config")
    model = UNet(tuple(config["channels"]))
    from cxr_batch.training.train import load_checkpoint

    ck = load_checkpoint(run / "best.pt")
    model.load_state_dict(ck["model"])
    return model.eval(), config


# --------------------------------------------------------------------------------------------
# export


@dataclass(frozen=True)
class LungExportConfig:
    run: str
    out: str
    name: str = "cxr-lungs"
    version: str = "1.0.0"
    threshold: float = 0.5
    #: mask folders the segmenter never saw, measured in full (e.g. ../shared/data/lung-masks/shenzhen)
    unseen: tuple[str, ...] = ()
    #: copy the run's small files (config, split, history, metrics) here
    run_files: str | None = None


def _dice_all(segmenter: Any, pairs: Sequence[tuple[Path, Path]]) -> list[float]:
    from cxr_batch.engine.lungs import pair_dice

    out = []
    for img, mask in pairs:
        try:
            out.append(pair_dice(segmenter, img, mask))
        except ImageError:
            continue
    return out


def _summary(d: Sequence[float]) -> dict[str, Any]:
    a = np.asarray(d, dtype=np.float64)
    return {
        "pairs": len(a),
        "mean": round(float(a.mean()), 4),
        "median": round(float(np.median(a)), 4),
        "p05": round(float(np.percentile(a, 5)), 4),
        "min": round(float(a.min()), 4),
    }


def export_lungs(cfg: LungExportConfig, console: Console | None = None) -> Path:
    """The run's best epoch → ONNX with the lung-segmenter contract; Dice measured through the
    inference path (onnxruntime) on every source's validation part and on the unseen folders."""
    import shutil

    from cxr_batch.contract import DEFAULT_PREPROCESSING, LUNG_SEGMENTER, ModelMeta
    from cxr_batch.engine.lungs import LungSegmenter
    from cxr_batch.training.export import OPSET
    from cxr_batch.training.onnx_file import _onnx, save_model, write_contract

    console = console or Console(stderr=True)
    onnx = _onnx()
    run = Path(cfg.run)
    if not (run / "best.pt").is_file():
        raise CxrBatchError(f"{run}: no best.pt; train with 'cxr-batch train-lungs' first")
    model, config = load_unet(run)
    size = int(config["image_size"])
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    dummy = torch.zeros(2, 1, size, size)
    torch.onnx.export(
        model,
        (dummy,),
        str(tmp),
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["mask"],
        dynamic_axes={"input": {0: "batch"}, "mask": {0: "batch"}},
    )
    proto = onnx.load(str(tmp))
    onnx.checker.check_model(proto)
    m, s = float(config["mean"]), float(config["std"])
    meta = ModelMeta(
        name=cfg.name,
        version=cfg.version,
        created=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        labels=("lung",),
        input_size=(size, size),
        mean=(m, m, m),
        std=(s, s, s),
        preprocessing={**DEFAULT_PREPROCESSING, "channels": 1, "resize": config.get("resize", "bilinear")},
        input_name="input",
        outputs={"mask": "mask"},
        kind=LUNG_SEGMENTER,
        training_data={
            "sources": config["pairs"],
            "train": config["train"],
            "val": config["val"],
            "split_seed": config["seed"],
            "data_fingerprint": config["data_fingerprint"],
        },
        extra={
            "arch": "unet",
            "channels": list(config["channels"]),
            "params": count_params(model),
            "opset": OPSET,
            "threshold": cfg.threshold,
            "output": "lung logits N×1×H×W (sigmoid, then the threshold)",
        },
    )
    write_contract(proto, meta)
    save_model(proto, tmp)

    # Parity with torch, then Dice through the inference path.
    seg = LungSegmenter(tmp)
    split = list(csv.DictReader(io.StringIO(read_text(run / "split.csv", MAX_LIST_BYTES, what="the run's split"))))
    sources = {Path(d).name: Path(d) for d in config["sources"].values()}
    val: dict[str, list[tuple[Path, Path]]] = {}
    for row in split:
        if row["split"] == "val":
            root = sources[row["source"]]
            val.setdefault(row["source"], []).append((root / "images" / row["file"], root / "masks" / row["file"]))
    xs = np.concatenate([seg.inputs(decode(p).grey)[None] for ps in val.values() for p, _ in ps[:8]])
    with torch.no_grad():
        ref = torch.sigmoid(model(torch.from_numpy(xs)))[:, 0].numpy()
    parity = float(np.abs(ref - seg.probabilities(xs)).max())
    console.print(f"ONNX parity on {len(xs)} films: max |Δp| = {parity:.2e}")
    if parity > 1e-4:
        tmp.unlink(missing_ok=True)
        raise CxrBatchError(f"the ONNX segmenter differs from PyTorch by {parity:.2e}; not written")
    metrics: dict[str, Any] = {"val_dice": {}, "unseen_dice": {}}
    for source, pairs in sorted(val.items()):
        metrics["val_dice"][source] = _summary(_dice_all(seg, pairs))
        console.print(f"validation Dice {source}: {metrics['val_dice'][source]}")
    for folder in cfg.unseen:
        pairs = mask_pairs(Path(folder))
        metrics["unseen_dice"][Path(folder).name] = _summary(_dice_all(seg, pairs))
        console.print(f"unseen Dice {Path(folder).name}: {metrics['unseen_dice'][Path(folder).name]}")
    metrics["dice_resolution"] = "the reference mask's (256x256): probabilities resized bilinear, then thresholded"
    metrics["parity_max_abs_prob_diff"] = parity
    meta = meta.with_updates(metrics=metrics)
    write_contract(proto, meta)
    save_model(proto, out)
    tmp.unlink(missing_ok=True)
    console.print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    card = out.with_suffix(".md")
    write_file_atomic(card, lungs_card(meta, out.name))
    console.print(f"wrote {card}")
    if cfg.run_files:
        dest = Path(cfg.run_files)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "split.csv", "history.json", "metrics.json"):
            if (run / name).is_file():
                shutil.copyfile(run / name, dest / name)
        write_file_atomic(dest / "export_metrics.json", json.dumps(metrics, indent=2) + "\n")
    return out


def _dice_line(name: str, d: dict[str, Any]) -> str:
    return f"| {name} | {d['pairs']} | {d['mean']:.4f} | {d['median']:.4f} | {d['p05']:.4f} | {d['min']:.4f} |"


def lungs_card(meta: Any, file_name: str) -> str:
    """The segmenter's card (Markdown), from its contract."""
    m, td, ex = meta.metrics, meta.training_data, meta.extra
    val = [_dice_line(f"{k} (validation)", v) for k, v in sorted(m.get("val_dice", {}).items())]
    unseen = [_dice_line(f"{k} (never seen)", v) for k, v in sorted(m.get("unseen_dice", {}).items())]
    sources = ", ".join(f"{k} ({v} pairs)" for k, v in sorted(td.get("sources", {}).items()))
    return f"""# {meta.name} {meta.version}: lung-field segmenter

**Research use only. Not a medical device**; not validated for diagnosis or for deciding whether a film is
fit for reading. It decides, for cxr-batch, whether a film shows two plausible lung fields (`assessable`)
and where to crop the classifier's view.

- File: `{file_name}` (ONNX opset {ex.get("opset")}, fp32, {ex.get("params")} parameters), contract kind
  `{meta.kind}`; created {meta.created}.
- Network: U-Net, channels {ex.get("channels")}, input {meta.input_size[0]}×{meta.input_size[1]} grey
  (the whole film resized, aspect not kept; `(x - {meta.mean[0]}) / {meta.std[0]}`), one lung logit per
  pixel; lung where sigmoid ≥ {ex.get("threshold")}.
- Trained by `cxr-batch train-lungs` on {sources}: {td.get("train")} training and {td.get("val")}
  validation pairs (seeded split per source, seed {td.get("split_seed")}); data fingerprint
  `{td.get("data_fingerprint")}` (sha256 of the sorted source/file/split rows).

## Dice

Measured through the inference path (onnxruntime, `cxr_batch.engine.lungs.pair_dice`), at the reference
masks' resolution (256×256: probabilities resized bilinear, then thresholded), by `cxr-batch export-lungs`.

| set | pairs | mean | median | 5th percentile | min |
| --- | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(val + unseen)}

The Shenzhen masks (CC BY-NC-SA 4.0, non-commercial) were never trained on: they measure the segmenter on
a hospital (China, adult TB screening) it never saw. Montgomery's validation part is 15% of 138 films.

## Commands

```bash
cxr-batch train-lungs ../shared/data/lung-masks/montgomery ../shared/data/lung-masks/covid19-radiography-viral \\
    --out runs/lungs --threads 2
cxr-batch export-lungs runs/lungs --out export/cxr-lungs.onnx \\
    --unseen ../shared/data/lung-masks/shenzhen --run-files export/run-lungs-{meta.version}
```

## Data, licences, credits

- Montgomery County TB set (USA): images and manual lung masks by the U.S. National Library of Medicine
  (NLM/NIH), public research release; cite Jaeger et al. 2014 (Quant Imaging Med Surg 4(6)) and Candemir
  et al. 2014 (IEEE TMI 33(2)).
- Pediatric viral pneumonia films: Kermany, Zhang & Goldbaum 2018 (Mendeley Data, CC BY 4.0), with the
  lung masks of the COVID-19 Radiography Database (Chowdhury et al. 2020, IEEE Access 8; Rahman et al.
  2021, Comput Biol Med 132); the masks carry no explicit licence: research data with the database's
  citations.
- Validation only: Shenzhen No.3 People's Hospital set (NLM release; credit NLM and the hospital),
  masks by Stirenko et al. 2018, CC BY-NC-SA 4.0.

## Biases and limits

- Two sources only: US adult PA screening films (mostly normal or TB) and pediatric films from one
  hospital in China. Portable AP films, ICU films with lines and tubes, large effusions, white-outs,
  pneumonectomy, scoliosis and neonates are barely or not represented: a real frontal film of a very
  sick chest can be called not assessable, and dense consolidation may be left out of the mask
  (annotators leave it out too; the crop adds a margin for this).
- All films were squashed to squares before training; the segmenter works on the squashed film.
- The assessability verdict is rules on this mask (`cxr_batch.io.lungs.LungRules`), calibrated on our
  frontal films against CT/MR slices, blank, noise and proxies of photographs and lateral views; see
  `benchmarks/lungs_assessable.py` and the README for the numbers and what the proxies are.
"""


__all__ = [
    "LungExportConfig",
    "LungTrainConfig",
    "UNet",
    "dice_bce",
    "export_lungs",
    "load_unet",
    "mask_pairs",
    "train_lungs",
]
