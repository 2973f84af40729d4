"""``cxr-batch adapt``: fine-tune a released model on one site's labelled films without forgetting.

The recipe for a few hundred films (the naive ``train --weights`` on them helps on the site and
forgets the rest; see issue 20):

- the base model's fp32 ONNX weights go into a torch ResNet-18 (:mod:`cxr_batch.training.onnx_init`);
  every BatchNorm stays in eval mode, so before the first step the network computes exactly what the
  ONNX file computes (no recalibration is needed: the statistics are never re-estimated);
- the early layers (up to ``layer4`` by default: only the classifier trains; chosen on the pool's validation
  part, see the README) are frozen: their outputs are computed once per
  film and view (the clean film, and ``views - 1`` copies through train's ``light`` augmentation),
  so each epoch costs only the blocks that train;
- the loss is class-balanced cross-entropy on the local labels plus a distillation term: the KL
  divergence from the base model's own softmax on the same view (temperature ``T``), for every
  class; and the same KL on synthetic classifier inputs drawn from the base model's OOD guard (a
  Gaussian per class of the pooled embedding, every class of the base model): the local films only
  cover what the site has, the draws also hold the regions of the classes it has not (:func:`gaussian_anchors`);
- a few epochs, early stopping on the local validation part (mean recall of the local classes);
  epoch 0 (the base model) is a candidate, so adapting never makes validation worse unseen.

The data is split adapt/validation/test (seeded, stratified by source and class, identical files
kept on one side: :func:`cxr_batch.io.labelled.make_split`, whose ``train`` part is the adapt part);
the model is exported by :func:`cxr_batch.training.export.export_checkpoint` (the OOD guard fitted on
the adapt part and calibrated on local validation, int8 only when it passes export's gate); the base
and the adapted model are measured once on the local test part.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from cxr_batch import __version__
from cxr_batch.contract import ModelMeta, file_sha256
from cxr_batch.engine.lungs import crop_reader, preprocess_for
from cxr_batch.engine.postprocess import softmax
from cxr_batch.errors import DataError, ImageError, OutputError
from cxr_batch.evaluation.evaluate import json_safe
from cxr_batch.evaluation.metrics import classification_metrics, wilson_interval
from cxr_batch.io.film_facts import film_facts, shortcut_warnings
from cxr_batch.io.labelled import LabelledSet, Split, canonical_label, find_labelled, make_split, source_names
from cxr_batch.io.safe_open import open_regular
from cxr_batch.io.safe_write import write_file_atomic
from cxr_batch.text import markup
from cxr_batch.training.onnx_file import read_contract_file

#: Fewer films than this in a class get a warning: its recall is measured on a handful of test films.
MIN_PER_CLASS = 20
FREEZE_CHOICES = ("layer2", "layer3", "layer4")
#: the synthetic-embedding distillation's defaults, chosen on the pool's validation part (README,
#: "Check and adapt the model to your hospital"; benchmarks/sweep_adapt_anchors.py)
ANCHOR_WEIGHT = 3.0
ANCHORS_PER_CLASS = 1024


@dataclass(frozen=True)
class AdaptConfig:
    """Everything one ``adapt`` run needs; saved as ``config.json`` in the run folder."""

    data_dirs: tuple[str, ...]
    out: str
    #: the base model (fp32 ONNX); default: the shipped fp32 model
    model: str | None = None
    #: a ``path,label`` CSV (paths relative to the first data folder) instead of class folders
    labels_file: str | None = None
    name: str | None = None
    version: str | None = None
    #: how the card names the site (default: the data folders' names)
    site: str | None = None
    #: the run folder (split.csv, checkpoint, predictions); default ``<out>-run`` beside the output
    run: str | None = None
    overwrite: bool = False
    epochs: int = 8
    patience: int = 3
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    #: frozen up to and including this block; ``layer4`` trains the classifier only
    freeze: str = "layer4"
    #: weight of the distillation term and its temperature
    distill: float = 1.0
    temperature: float = 2.0
    #: distillation on synthetic embeddings drawn from the base model's OOD guard (a Gaussian per
    #: class, every class of the base model: those absent locally too), fed to the classifier only:
    #: the weight of that term (0: none) and how many embeddings are drawn per class
    anchor_weight: float = ANCHOR_WEIGHT
    anchors: int = ANCHORS_PER_CLASS
    #: L2-SP: a pull of the trained weights to the base model's, weight * sum (w - w_base)^2 (0: none)
    l2sp: float = 0.0
    #: the clean film plus ``views - 1`` augmented copies
    views: int = 2
    val_fraction: float = 0.2
    test_fraction: float = 0.3
    seed: int = 0
    int8: bool = True
    threads: int | None = None
    #: tests: only the first N films of each class and source
    limit_per_class: int | None = None


def base_model_path(model: str | None) -> Path:
    """The base model file: ``model``, or the shipped fp32 model."""
    if model:
        path = Path(model)
        if not path.is_file():
            raise DataError(f"--model {model}: no such file")
        return path
    from cxr_batch.engine.model import find_default_model

    return find_default_model("fp32")


def read_labels_file(path: Path, root: Path) -> list[tuple[Path, str]]:
    """``path,label`` rows (paths relative to ``root``); ``file`` and ``source_label`` are read too."""
    with open_regular(path) as fh:
        text = fh.read().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    fields = set(reader.fieldnames or [])
    pcol = "path" if "path" in fields else "file" if "file" in fields else None
    lcol = "label" if "label" in fields else "source_label" if "source_label" in fields else None
    if pcol is None or lcol is None:
        raise DataError(f"{path}: a labels file needs the columns path,label")
    items: list[tuple[Path, str]] = []
    for line, row in enumerate(reader, start=2):
        rel, label = (row.get(pcol) or "").strip(), (row.get(lcol) or "").strip()
        if not rel or not label:
            raise DataError(f"{path}, line {line}: empty path or label")
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            raise DataError(f"{path}, line {line}: paths must be relative to {root}, without '..'")
        if not (root / p).is_file():
            raise DataError(f"{path}, line {line}: {markup(rel)} is not a file under {root}")
        items.append((root / p, canonical_label(label)))
    if not items:
        raise DataError(f"{path}: no rows")
    return items


def local_sets(cfg: AdaptConfig, model_labels: Sequence[str]) -> list[LabelledSet]:
    """The site's labelled films, one set per data folder, every label one of the model's.

    Raises:
        DataError: a class the model doesn't have, no films, or a labels file with several folders.
    """
    names = source_names(list(cfg.data_dirs))
    if cfg.labels_file:
        if len(cfg.data_dirs) != 1:
            raise DataError("--labels takes one DATA_DIR (the labels file's paths are relative to it)")
        root = Path(cfg.data_dirs[0])
        items = read_labels_file(Path(cfg.labels_file), root)
        labels = [x for x in model_labels if any(lab == x for _, lab in items)]
        sets = [
            LabelledSet(
                root=root, labels=labels or sorted({lab for _, lab in items}), items=items, layout="labels file"
            )
        ]
    else:
        sets = [find_labelled(d) for d in cfg.data_dirs]
    for s, name in zip(sets, names, strict=True):
        s.source = name
        unknown = sorted({lab for _, lab in s.items} - set(model_labels))
        if unknown:
            raise DataError(
                f"{s.root}: class(es) {unknown} are not classes of the model ({', '.join(model_labels)}); "
                "adapt learns the model's own classes only: leave those films out"
            )
        s.labels = [x for x in model_labels if x in s.labels]
        if cfg.limit_per_class:
            s.items = [it for label in s.labels for it in [i for i in s.items if i[1] == label][: cfg.limit_per_class]]
    return sets


def data_warnings(sets: Sequence[LabelledSet], console: Console) -> list[str]:
    """Too few films per class, and class folders whose films look made by another scanner."""
    warnings: list[str] = []
    counts: dict[str, int] = {}
    facts: dict[str, list[dict[str, str]]] = {}
    for s in sets:
        for path, label in s.items:
            counts[label] = counts.get(label, 0) + 1
            facts.setdefault(label, []).append(film_facts(path))
    for label, n in counts.items():
        if n < MIN_PER_CLASS:
            warnings.append(
                f"class '{label}' has {n} films (fewer than {MIN_PER_CLASS}): its part of the test set is a handful "
                "of films, and its before/after numbers are mostly noise"
            )
    for found in shortcut_warnings(facts):
        warnings.append(
            f"class '{found['class']}' films differ from the other classes' in {str(found['fact']).replace('_', ' ')} "
            f"(distance {found['distance']}: {found['class_values']} against {found['other_values']}): if the classes "
            "come from "
            "different scanners, a fine-tune can learn the scanner instead of the disease"
        )
    for w in warnings:
        console.print(f"[yellow]warning:[/] {markup(w)}", highlight=False)
    return warnings


class _Split(torch.nn.Module):
    """The frozen trunk (input → ``freeze``) and the trained head (→ logits) of a ResNet-18."""

    def __init__(self, model: torch.nn.Module, freeze: str) -> None:
        super().__init__()
        m: Any = model
        blocks = ["layer1", "layer2", "layer3", "layer4"]
        cut = blocks.index(freeze) + 1
        self.trunk = torch.nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, *[getattr(m, b) for b in blocks[:cut]])
        self.head_blocks = torch.nn.Sequential(*[getattr(m, b) for b in blocks[cut:]])
        self.pool, self.fc = m.avgpool, m.fc

    def head(self, f: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(torch.flatten(self.pool(self.head_blocks(f)), 1))
        return out


def _features(
    parts: _Split, grey: np.ndarray, mean: Sequence[float], std: Sequence[float], views: int, seed: int
) -> tuple[torch.Tensor, np.ndarray]:
    """Frozen-trunk outputs of every film for each view (view 0 clean), float16; and each row's film index."""
    from cxr_batch.training.train import augment, normalise_torch

    gen = torch.Generator().manual_seed(seed)
    feats: list[torch.Tensor] = []
    index: list[np.ndarray] = []
    with torch.no_grad():
        for v in range(views):
            for i in range(0, len(grey), 32):
                x = torch.from_numpy(grey[i : i + 32].astype(np.float32)).unsqueeze(1)
                if v > 0:
                    x = augment(x, gen, hflip=False)
                feats.append(parts.trunk(normalise_torch(x, mean, std)).half())
                index.append(np.arange(i, min(i + 32, len(grey))))
    return torch.cat(feats), np.concatenate(index)


def _mean_recall(y: np.ndarray, pred: np.ndarray) -> float:
    present = sorted(set(y.tolist()))
    return float(np.mean([(pred[y == c] == c).mean() for c in present])) if present else math.nan


def _test_tensors(items: Sequence[tuple[Path, str, str]], meta: ModelMeta) -> tuple[np.ndarray, list[int], list[str]]:
    """The shared preprocessing (what classify runs) of the test films; unreadable ones left out."""
    xs, keep, errors = [], [], []
    read = crop_reader(meta.crop)
    for i, (path, _, _) in enumerate(items):
        try:
            xs.append(preprocess_for(path, meta.spec, read)[0])
            keep.append(i)
        except ImageError as exc:
            errors.append(f"{path.name}: {exc}")
    x = np.stack(xs) if xs else np.zeros((0, 3, *meta.input_size), np.float32)
    return x, keep, errors


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    keep = ("n", "accuracy", "accuracy_ci95", "macro_f1", "confusion_matrix", "labels")
    out = {k: m[k] for k in keep if k in m}
    out["per_class"] = {
        k: {"support": v["support"], "recall": v["recall"], "recall_ci95": v["recall_ci95"]}
        for k, v in m["per_class"].items()
        if v["support"]
    }
    return out


def compare_rows(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """Accuracy and each local class's recall, before and after, with 95% Wilson intervals."""
    rows = []
    n = int(before["n"])
    rows.append(
        {
            "metric": "accuracy",
            "n": n,
            "before": before["accuracy"],
            "before_ci95": list(wilson_interval(round(before["accuracy"] * n), n)) if n else [math.nan] * 2,
            "after": after["accuracy"],
            "after_ci95": list(wilson_interval(round(after["accuracy"] * n), n)) if n else [math.nan] * 2,
        }
    )
    for label, pc in before["per_class"].items():
        if not pc["support"]:
            continue
        rows.append(
            {
                "metric": f"{label} recall",
                "n": pc["support"],
                "before": pc["recall"],
                "before_ci95": pc["recall_ci95"],
                "after": after["per_class"][label]["recall"],
                "after_ci95": after["per_class"][label]["recall_ci95"],
            }
        )
    return rows


def gain_warnings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A change that lies within the base model's 95% interval may be chance."""
    out = []
    for r in rows:
        lo, hi = r["before_ci95"]
        if r["after"] != r["before"] and lo <= r["after"] <= hi:
            out.append(
                f"{r['metric']}: the change {r['before']:.3f} → {r['after']:.3f} on {r['n']} test films is within the "
                f"base model's 95% interval [{lo:.3f}, {hi:.3f}]: it may be chance; measure on more films"
            )
    return out


def print_comparison(rows: Sequence[dict[str, Any]], console: Console, title: str) -> None:
    t = Table(title=title, title_justify="left")
    for c in ("", "films", "base (95% CI)", "adapted (95% CI)", "change"):
        t.add_column(c, justify="left" if not c else "right")
    for r in rows:
        t.add_row(
            r["metric"],
            str(r["n"]),
            f"{r['before']:.3f} [{r['before_ci95'][0]:.3f}, {r['before_ci95'][1]:.3f}]",
            f"{r['after']:.3f} [{r['after_ci95'][0]:.3f}, {r['after_ci95'][1]:.3f}]",
            f"{r['after'] - r['before']:+.3f}",
        )
    console.print(t)


def _check_outputs(cfg: AdaptConfig, base: Path) -> tuple[Path, Path]:
    from cxr_batch.training.export import check_new_file

    out = Path(cfg.out)
    if out.suffix.lower() != ".onnx":
        raise OutputError(f"--out {cfg.out}: the adapted model's file name must end in .onnx")
    if out.is_file() and (out.resolve() == base.resolve() or file_sha256(out) == file_sha256(base)):
        raise OutputError(f"--out {cfg.out} is the base model: write the adapted model to another file")
    check_new_file(out, cfg.overwrite)
    run = Path(cfg.run) if cfg.run else out.with_name(out.stem + "-run")
    if (run / "split.csv").exists() and not cfg.overwrite:
        raise OutputError(f"{run} already holds an adapt run; pass --overwrite or another --run")
    return out, run


def adapt_model(cfg: AdaptConfig, console: Console | None = None) -> dict[str, Any]:
    """Split, fine-tune, export and measure; returns the adaptation record (also in the contract).

    Raises:
        DataError: unusable local data. OutputError: an output exists without ``overwrite``.
        ModelError: the base model is not a cxr-batch fp32 ResNet-18.
    """
    from cxr_batch.training.export import ExportConfig, export_checkpoint
    from cxr_batch.training.train import _load_cache, build_model, save_checkpoint

    console = console or Console(stderr=True)
    t_start = time.time()
    if cfg.freeze not in FREEZE_CHOICES:
        raise DataError(f"--freeze {cfg.freeze}: choose one of {', '.join(FREEZE_CHOICES)}")
    base = base_model_path(cfg.model)
    out, run = _check_outputs(cfg, base)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _, base_meta = read_contract_file(base)
    labels = list(base_meta.labels)
    base_sha = file_sha256(base)
    sets = local_sets(cfg, labels)
    present = [x for x in labels if any(x in s.labels for s in sets)]
    console.print(
        f"[bold]adapt[/] {markup(base_meta.ident)} to {sum(len(s.items) for s in sets)} local films "
        f"({', '.join(f'{x} {sum(lab == x for s in sets for _, lab in s.items)}' for x in present)}); "
        f"classes not in the local data keep the base model's behaviour: {', '.join(x for x in labels if x not in present) or 'none'}"
    )
    warnings = data_warnings(sets, console)
    split = make_split(sets, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    run.mkdir(parents=True, exist_ok=True)
    split.write(run / "split.csv")
    roots = {s.source: Path(s.root) for s in sets}
    adapt_items, val_items, test_items = (split.items(roots, part) for part in ("train", "val", "test"))
    if not adapt_items or not val_items or not test_items:
        raise DataError(
            f"too few films to split: adapt {len(adapt_items)}, validation {len(val_items)}, test {len(test_items)}; "
            "add films"
        )

    size = base_meta.input_size[0]
    resize = str(base_meta.preprocessing.get("resize", "bilinear"))
    crop = base_meta.crop
    x_a, y_a, err_a, _ = _load_cache(
        [(p, lab) for p, lab, _ in adapt_items], labels, size, resize, console, "adapt", crop=crop
    )
    x_v, y_v, err_v, _ = _load_cache(
        [(p, lab) for p, lab, _ in val_items], labels, size, resize, console, "val", crop=crop
    )
    for e in err_a + err_v:
        console.print(f"[yellow]skipped[/] {markup(e)}")

    torch.manual_seed(cfg.seed)
    model = build_model(len(labels), str(base))
    model.eval()  # every BatchNorm keeps the base model's statistics, during training too
    parts = _Split(model, cfg.freeze)
    for p in parts.trunk.parameters():
        p.requires_grad_(False)
    t0 = time.time()
    f_a, idx_a = _features(parts, x_a, base_meta.mean, base_meta.std, cfg.views, cfg.seed)
    f_v, _ = _features(parts, x_v, base_meta.mean, base_meta.std, 1, cfg.seed)
    ya = torch.from_numpy(y_a[idx_a])
    with torch.no_grad():
        teacher = torch.cat([parts.head(f_a[i : i + 64].float()) for i in range(0, len(f_a), 64)])
        base_val = torch.cat([parts.head(f_v[i : i + 64].float()) for i in range(0, len(f_v), 64)])
    feature_s = time.time() - t0
    anchors = gaussian_anchors(base, labels, cfg.anchors, cfg.seed) if cfg.anchor_weight > 0 else None
    if anchors is None and cfg.anchor_weight > 0:
        console.print("[yellow]notice:[/] the base model has no OOD guard with class means: no synthetic anchors")
    t1 = time.time()
    fit = train_head(model, parts, f_a, ya, f_v, y_v, base_val, teacher, cfg, anchors, console)
    history, best_epoch = fit.history, fit.best_epoch
    train_s = time.time() - t1
    model.load_state_dict(fit.state)
    if best_epoch == 0:
        w = "no epoch beat the base model on local validation: the adapted model is the base model's weights"
        warnings.append(w)
        console.print(f"[yellow]warning:[/] {w}")

    # Before and after, once, on the local test part, through the shared preprocessing.
    x_t, keep, err_t = _test_tensors(test_items, base_meta)
    for e in err_t:
        console.print(f"[yellow]skipped[/] {markup(e)}")
    kept = [test_items[i] for i in keep]
    y_t = np.asarray([labels.index(lab) for _, lab, _ in kept], np.int64)
    from cxr_batch.training.references import ort_logits

    p_before = softmax(ort_logits(base, x_t))
    with torch.no_grad():
        p_after = softmax(torch.cat([model(torch.from_numpy(x_t[i : i + 32])) for i in range(0, len(x_t), 32)]).numpy())
    m_before = classification_metrics(y_t, p_before, labels)
    m_after = classification_metrics(y_t, p_after, labels)
    rows = compare_rows(_summary(m_before), _summary(m_after))
    warnings += gain_warnings(rows)
    _write_predictions(run / "test_predictions.csv", kept, roots, labels, p_before, p_after)

    name = cfg.name or f"{base_meta.name}-site"
    version = cfg.version or f"{base_meta.version}+site.1"
    site = cfg.site or " + ".join(s.source for s in sets)
    recipe = {
        "method": "adapt: frozen early layers, class-balanced cross-entropy + distillation from the base model"
        + (" on the local films and on synthetic embeddings of every class" if anchors is not None else ""),
        "frozen": f"conv1 .. {cfg.freeze} (BatchNorm statistics of every layer kept from the base model)",
        "trained": "layer4 and fc" if cfg.freeze != "layer4" else "fc",
        "epochs_max": cfg.epochs,
        "best_epoch": best_epoch,
        "patience": cfg.patience,
        "selection": "mean recall of the local classes on local validation (epoch 0 = the base model)",
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "optimizer": "AdamW, constant learning rate",
        "distillation": {"weight": cfg.distill, "temperature": cfg.temperature, "target": "base model softmax"},
        "anchor_distillation": _anchor_recipe(cfg, anchors, labels),
        "l2sp": cfg.l2sp,
        "views": cfg.views,
        "augment": "light",
        "sampling": "class-balanced (local classes)",
        "image_size": size,
        "seed": cfg.seed,
        "weights": base.name,
    }
    record: dict[str, Any] = {
        "site": site,
        "base": {"name": base_meta.name, "version": base_meta.version, "sha256": base_sha, "file": base.name},
        "local_data": {
            "sources": [s.source for s in sets],
            "classes": present,
            "films": len(split.rows),
            "split_sha256": split.fingerprint(),
            "split_counts": _counts(split),
            "split": f"seeded (seed {cfg.seed}), stratified by source and class, identical files on one side; "
            f"adapt {1 - cfg.val_fraction - cfg.test_fraction:.0%} / validation {cfg.val_fraction:.0%} / test {cfg.test_fraction:.0%} (split.csv: 'train' is the adapt part)",
        },
        "recipe": recipe,
        "history": history,
        "before": _summary(m_before),
        "after": _summary(m_after),
        "comparison": rows,
        "test_errors": len(err_t),
        "warnings": warnings,
        "after_computed_with": "the adapted weights in fp32 (torch); the exported file matches them within export's "
        "parity limit",
        "seconds": {"features": round(feature_s, 1), "training": round(train_s, 1)},
        "cxr_batch": __version__,
    }
    record = json_safe(record)

    tcfg = {
        "image_size": size,
        "mean": list(base_meta.mean),
        "std": list(base_meta.std),
        "resize": resize,
        "crop": base_meta.crop,
        "weights": str(base),
        "data_dirs": list(cfg.data_dirs),
        **{k: v for k, v in asdict(cfg).items() if k in ("epochs", "batch_size", "lr", "seed")},
    }
    save_checkpoint(
        {
            "model": model.state_dict(),
            "labels": labels,
            "config": tcfg,
            "history": {"best_epoch": best_epoch, "epochs": history},
            "arch": "resnet18",
        },
        run / "best.ckpt",
    )
    write_file_atomic(
        run / "config.json",
        json.dumps(
            {**asdict(cfg), "sources": {k: str(v) for k, v in roots.items()}, "labels": labels, "layout": "adapt"},
            indent=2,
        ),
    )
    metrics = {**m_after, "split": "test (local)", "best_epoch": best_epoch}
    write_file_atomic(run / "metrics.json", json.dumps(json_safe(metrics), indent=2))
    export_checkpoint(
        ExportConfig(
            checkpoint=str(run / "best.ckpt"),
            out=str(out),
            name=name,
            version=version,
            quantize="int8" if cfg.int8 else None,
            calibration_images=min(300, len(adapt_items)),
            overwrite=cfg.overwrite,
            recipe=recipe,
            adaptation=record,
            int8_optional=True,
        ),
        console,
    )
    _refit_screening(out, base_meta, split, roots, console)
    print_comparison(rows, console, f"local test part: {base_meta.ident} against {name}@{version}")
    for w in gain_warnings(rows):
        console.print(f"[yellow]warning:[/] {markup(w)}", highlight=False)
    seconds = time.time() - t_start
    record["seconds"]["total"] = round(seconds, 1)
    write_file_atomic(run / "adapt.json", json.dumps(record, indent=2, allow_nan=False))
    console.print(f"wrote {markup(str(out))} ({name} {version}) in {seconds:.0f} s; run folder {markup(str(run))}")
    return record


def gaussian_anchors(
    base: Path, labels: Sequence[str], per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Synthetic pooled embeddings (the classifier's 512-d input) for every class of the base model.

    The base model's OOD guard (``ood/means`` and ``ood/precision`` in its graph: the class means of
    the pooled embedding on its training films and their shared covariance's inverse, see
    :mod:`cxr_batch.training.ood`) is a Gaussian model of each class's embeddings; ``per_class``
    draws from N(mean_c, precision^-1) for each class it has a mean for, seeded. Returns the draws
    (float32) and each one's class index, or None when the base has no guard (or ``per_class`` is 0).
    """
    if per_class <= 0:
        return None
    from onnx import numpy_helper

    proto, meta = read_contract_file(base)
    inits = {i.name: i for i in proto.graph.initializer if i.name in ("ood/means", "ood/precision")}
    if meta.ood is None or len(inits) != 2:
        return None
    means = numpy_helper.to_array(inits["ood/means"]).astype(np.float64)
    precision = numpy_helper.to_array(inits["ood/precision"]).astype(np.float64)
    fitted = list(meta.ood.get("classes_fitted") or labels)
    if len(fitted) != len(means):
        return None
    cov = np.linalg.inv((precision + precision.T) / 2)
    chol = np.linalg.cholesky((cov + cov.T) / 2)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for mean, label in zip(means, fitted, strict=True):
        xs.append(mean + rng.standard_normal((per_class, len(mean))) @ chol.T)
        ys.append(np.full(per_class, list(labels).index(label), np.int64))
    return torch.from_numpy(np.concatenate(xs).astype(np.float32)), torch.from_numpy(np.concatenate(ys))


def _anchor_recipe(
    cfg: AdaptConfig, anchors: tuple[torch.Tensor, torch.Tensor] | None, labels: Sequence[str]
) -> dict[str, Any] | None:
    if anchors is None:
        return None
    counts = np.bincount(anchors[1].numpy()).tolist()
    return {
        "weight": cfg.anchor_weight,
        "per_class": cfg.anchors,
        "classes": [labels[c] for c, n in enumerate(counts) if n],
        "temperature": cfg.temperature,
        "source": "N(class mean, tied covariance) of the base model's OOD guard (pooled 512-d embedding)",
        "target": "the base classifier's softmax on the same draws",
        "applies_to": "fc only, the draws being classifier inputs"
        + (
            f"; {', '.join(FREEZE_CHOICES[FREEZE_CHOICES.index(cfg.freeze) + 1 :])} also train and move the real "
            "embeddings, which the draws do not follow"
            if cfg.freeze != "layer4"
            else ""
        ),
        "batch": f"{cfg.batch_size} draws per step, uniformly from the {len(anchors[0])} (as many per class)",
    }


@dataclass
class HeadFit:
    """What :func:`train_head` chose: the weights, their epoch (0: the base), every epoch's record."""

    state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, Any]]


def train_head(
    model: torch.nn.Module,
    parts: _Split,
    f_a: torch.Tensor,
    ya: torch.Tensor,
    f_v: torch.Tensor,
    y_v: np.ndarray,
    base_val: torch.Tensor,
    teacher: torch.Tensor,
    cfg: AdaptConfig,
    anchors: tuple[torch.Tensor, torch.Tensor] | None = None,
    console: Console | None = None,
) -> HeadFit:
    """Train the head on the frozen trunk's outputs; ``model`` must hold the base weights.

    Loss per step: class-balanced cross-entropy on the local labels, plus ``distill`` * T² * KL to the
    base's softmax on the same view (``teacher``), plus ``anchor_weight`` * T² * KL to the base
    classifier's softmax on a batch of synthetic embeddings (:func:`gaussian_anchors`, through ``fc``
    only), plus ``l2sp`` * the squared distance of the trained weights to the base's. Early stop on
    local validation's mean recall (then its loss), epoch 0 (the base) a candidate.
    """
    n_labels = int(parts.fc.out_features)
    trainable = [p for p in parts.head_blocks.parameters()] + list(parts.fc.parameters())
    start = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    y_all = ya.numpy()
    counts = np.bincount(y_all, minlength=n_labels).astype(np.float64)
    class_w = torch.tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0))
    weights = class_w[ya].double()  # each local class drawn equally often
    gen = torch.Generator().manual_seed(cfg.seed)
    t_temp = cfg.temperature
    yv = torch.from_numpy(y_v)
    a_x = a_t = None
    if anchors is not None and cfg.anchor_weight > 0:
        a_x = anchors[0]
        with torch.no_grad():
            a_t = F.softmax(parts.fc(a_x) / t_temp, 1)  # the base classifier's outputs on the draws

    def val_score(logits: torch.Tensor) -> tuple[float, float]:
        pred = logits.argmax(1).numpy()
        return _mean_recall(y_v, pred), float(F.cross_entropy(logits, yv))

    score0, loss0 = val_score(base_val)
    history: list[dict[str, Any]] = [
        {"epoch": 0, "val_mean_recall": score0, "val_loss": loss0, "what": "the base model"}
    ]
    best = (score0, -loss0)
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    best_epoch, patience = 0, cfg.patience
    for epoch in range(1, cfg.epochs + 1):
        order = torch.multinomial(weights, len(f_a), replacement=True, generator=gen)
        loss_sum = 0.0
        for i in range(0, len(order), cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            logits = parts.head(f_a[b].float())
            loss = F.cross_entropy(logits, ya[b])
            if cfg.distill > 0:
                kl = F.kl_div(
                    F.log_softmax(logits / t_temp, 1), F.softmax(teacher[b] / t_temp, 1), reduction="batchmean"
                )
                loss = loss + cfg.distill * t_temp * t_temp * kl
            if a_x is not None and a_t is not None:
                j = torch.randint(len(a_x), (cfg.batch_size,), generator=gen)
                kl_a = F.kl_div(F.log_softmax(parts.fc(a_x[j]) / t_temp, 1), a_t[j], reduction="batchmean")
                loss = loss + cfg.anchor_weight * t_temp * t_temp * kl_a
            if cfg.l2sp > 0:
                loss = loss + cfg.l2sp * sum(((p - p0) ** 2).sum() for p, p0 in zip(trainable, start, strict=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            loss_sum += float(loss.detach()) * len(b)
        with torch.no_grad():
            vl = torch.cat([parts.head(f_v[i : i + 64].float()) for i in range(0, len(f_v), 64)])
        score, vloss = val_score(vl)
        history.append(
            {"epoch": epoch, "train_loss": loss_sum / len(order), "val_mean_recall": score, "val_loss": vloss}
        )
        if console is not None:
            console.print(
                f"epoch {epoch}: train loss {loss_sum / len(order):.4f}, val mean recall {score:.4f}, val loss {vloss:.4f}"
            )
        if (score, -vloss) > best:
            best, best_epoch, patience = (score, -vloss), epoch, cfg.patience
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            patience -= 1
            if patience <= 0:
                if console is not None:
                    console.print(f"early stop: no validation improvement for {cfg.patience} epochs")
                break
    return HeadFit(best_state, best_epoch, history)


def _counts(split: Split) -> dict[str, dict[str, int]]:
    parts: dict[str, dict[str, int]] = {}
    for _, label, part, _, _ in split.rows:
        name = "adapt" if part == "train" else part
        parts.setdefault(name, {}).setdefault(label, 0)
        parts[name][label] += 1
    return parts


def _write_predictions(
    path: Path,
    kept: Sequence[tuple[Path, str, str]],
    roots: dict[str, Path],
    labels: Sequence[str],
    before: np.ndarray,
    after: np.ndarray,
) -> None:
    """One row per test film: its true label and both models' labels and probabilities."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        ["path", "source", "true_label", "base_label", "adapted_label"]
        + [f"base_prob_{x}" for x in labels]
        + [f"adapted_prob_{x}" for x in labels]
    )
    for (p, label, source), pb, pa in zip(kept, before, after, strict=True):
        w.writerow(
            [p.relative_to(roots[source]).as_posix(), source, label, labels[int(pb.argmax())], labels[int(pa.argmax())]]
            + [f"{v:.6g}" for v in pb]
            + [f"{v:.6g}" for v in pa]
        )
    write_file_atomic(path, buf.getvalue())


def _refit_screening(out: Path, base_meta: ModelMeta, split: Split, roots: dict[str, Path], console: Console) -> None:
    """The base model's screening operating point (a ``screening`` field in its contract, when the
    contract has one), chosen again on local validation: the highest threshold whose sensitivity there
    is at least the base's target. Kept from the base, with a note, when validation has no film of
    the screened class."""
    point = getattr(base_meta, "screening", None)
    if point is None:
        return
    from dataclasses import replace

    from cxr_batch.evaluation.metrics import operating_point, screening_threshold
    from cxr_batch.training.card import write_card
    from cxr_batch.training.onnx_file import rewrite_contract
    from cxr_batch.training.references import _tensors, ort_logits

    label, target = point.label, float(point.target_sensitivity)
    _, meta = read_contract_file(out)
    items = split.paths(roots, "val")
    positives = [it for it in items if it[1] == label]
    if positives:
        x, y = _tensors(items, meta.spec, list(meta.labels))
        k = list(meta.labels).index(label)
        p = softmax(ort_logits(out, x))[:, k]
        # the contract's one rule (export uses it too): the k-th highest positive score, rounded down
        threshold = screening_threshold(p, y == k, target)
        validation = {
            "refitted_on": "local validation (cxr-batch adapt)",
            "positives": int((y == k).sum()),
            "negatives": int((y != k).sum()),
            **operating_point(p, y == k, threshold),
        }
        new = replace(point, threshold=threshold, validation=validation)
        console.print(f"screening point for '{label}': threshold {threshold:.4f} on local validation")
    else:
        new = replace(
            point, validation={**point.validation, "note": "kept from the base model: no local film of this class"}
        )
        console.print(f"screening point for '{label}' kept from the base model (no local '{label}' film)")
    for path in (out, out.with_name(out.stem + "-int8.onnx")):
        if path.exists():  # the contract only: the graph is checked unchanged, the file replaced atomically
            rewrite_contract(path, lambda m: m.with_updates(screening=new))
    write_card(out, read_contract_file(out)[1], None)
