"""Export a training checkpoint to ONNX under the model contract, verify it, and quantise it.

Needs the ``train`` extra (torch, onnx); import only inside the ``export`` command.
The fp32 ONNX is the master copy: the int8 model and any metadata change derive from it.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from cxr_batch.contract import (
    DEFAULT_PREPROCESSING,
    INT8_GATE_MAX_PROB_DIFF,
    INT8_GATE_MIN_AGREEMENT,
    INT8_MAX_F1_DROP,
    INT8_MIN_AGREEMENT,
    SCREEN_LABEL,
    SCREEN_SENSITIVITY,
    ModelMeta,
    int8_gate,
)
from cxr_batch.engine.cpu import cpu_summary
from cxr_batch.engine.lungs import preprocess_for, preprocess_labelled
from cxr_batch.engine.postprocess import softmax
from cxr_batch.errors import CxrBatchError, DataError, MissingExtraError, ModelError, OutputError
from cxr_batch.evaluation.evaluate import json_safe
from cxr_batch.evaluation.metrics import classification_metrics
from cxr_batch.io.labelled import Roots, Split
from cxr_batch.io.preprocess import PreprocessSpec
from cxr_batch.io.safe_open import read_json
from cxr_batch.training.card import write_card
from cxr_batch.training.onnx_file import OnnxModel, _onnx, ort_source, read_contract_file, write_contract

OPSET = 17
PARITY_TOLERANCE = 1e-4
# The int8 model is written only when it is INT8_MAX_F1_DROP / INT8_MIN_AGREEMENT close to the fp32
# master on the test split (both in cxr_batch.contract); whether ``--precision auto`` may take it is
# the stricter gate there (int8_gate).
#: The fp16 model (for CUDA) is written only when no probability moves more than this.
FP16_TOLERANCE = 1e-2
OUTPUTS = {"logits": "logits", "features": "features", "embedding": "embedding"}
#: What a user's own export is called unless they say otherwise: never the released model's name
#: and version, so a home-made model can't pass for the shipped one in a report.
DEFAULT_NAME = "cxr-resnet18-custom"
DEFAULT_VERSION = "0.0.0+local"


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: str
    out: str
    name: str = DEFAULT_NAME
    version: str = DEFAULT_VERSION
    quantize: str | None = None  # None or "int8"
    calibration_images: int = 300
    force: bool = False
    data_dir: str | None = None  # where the run's images are (default: from the run's config.json)
    parity_images: int = 64
    ood: bool = True  # fit the out-of-distribution guard when the run's data is available
    fp16: bool = False  # also write NAME-fp16.onnx, the model classify prefers on CUDA
    #: a recipe sweep's JSON (benchmarks/augment_sweep.py): how the recipe was chosen, for the card
    selection: str | None = None
    #: replace an existing ``out`` (otherwise refused)
    overwrite: bool = False
    #: the recipe to record (default: the training run's, from the checkpoint's config)
    recipe: dict[str, Any] | None = None
    #: ``cxr-batch adapt``: the base model, the site's data and the before/after metrics
    adaptation: dict[str, Any] | None = None
    #: an int8 model that fails the faithfulness gate is skipped with a notice instead of an error
    int8_optional: bool = False
    #: the screening operating point: the COVID-19 sensitivity it must reach on validation
    screen_sensitivity: float = SCREEN_SENSITIVITY
    #: the run's held-out source (train --holdout-source): its train rows are validation too
    holdout_source: str | None = None
    #: how the int8 file is quantised: a name in :data:`INT8_SCHEMES`
    int8_scheme: str = "7bit"
    #: lines for the card's recipe section (e.g. what was not evaluated in this release)
    notes: tuple[str, ...] = ()
    #: fit the OOD guard on a seeded sample of at most this many training images (None: all)
    ood_fit_images: int | None = None


def latest_checkpoint(runs: Path = Path("runs")) -> Path:
    """The best checkpoint of the most recently modified run under ``runs/``."""
    found = sorted(runs.glob("*/best.ckpt"), key=lambda p: p.stat().st_mtime) if runs.is_dir() else []
    if not found:
        raise CxrBatchError(
            f"no checkpoint found under {runs}/ (looked for {runs}/*/best.ckpt). "
            "Pass one: cxr-batch export runs/NAME/best.ckpt --out export/NAME.onnx"
        )
    return found[-1]


def _read_json(path: Path, what: str) -> Any:
    """A JSON file of the run folder, through the one bounded opener (NaN allowed: metrics cells)."""
    try:
        doc = read_json(path, what=what, allow_nan=True)
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: {what} is not a JSON object")
    return doc


def check_new_file(out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing model file unless ``overwrite`` (``export`` and ``adapt``).

    Raises:
        OutputError: ``out`` exists (or is not a file) and ``overwrite`` is not set.
    """
    if out.is_dir():
        raise OutputError(f"{out} is a folder; give the model file's name, e.g. {out / 'model.onnx'}")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists; pass --overwrite to replace it")


def _run_context(ckpt_path: Path, data_dir: str | None) -> tuple[dict[str, Any], Roots | None, Split | None]:
    """The run's config, where its images are (one root, or one per source) and its split."""
    run = ckpt_path.parent
    config: dict[str, Any] = {}
    if (run / "config.json").exists():
        config = _read_json(run / "config.json", "the run's config.json")
    split = Split.read(run / "split.csv") if (run / "split.csv").exists() else None
    sources: dict[str, str] = config.get("sources") or {}
    if not data_dir and len(sources) > 1:
        roots = {name: Path(p) for name, p in sources.items()}
        return config, (roots if all(p.is_dir() for p in roots.values()) else None), split
    first = data_dir or config.get("data_dir") or (config.get("data_dirs") or [None])[0]
    root = Path(first) if first else None
    if root is not None and not root.is_dir():
        root = None
    return config, root, split


def _tensors(
    items: Sequence[tuple[Path, str]], spec: PreprocessSpec, labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    pairs = list(preprocess_labelled(items, spec))
    if not pairs:
        return np.zeros((0, 3, *spec.input_size), np.float32), np.zeros(0, np.int64)
    return np.stack([x for x, _ in pairs]), np.asarray([list(labels).index(label) for _, label in pairs], np.int64)


def ort_logits(
    model_path: Path | str | bytes | OnnxModel, x: np.ndarray, threads: int | None = None, batch: int = 32
) -> np.ndarray:
    """Run the logits output of an ONNX model (a file, or one in memory) over an in-memory batch (CPU)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(ort_source(model_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = [sess.run(["logits"], {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def export_checkpoint(cfg: ExportConfig, console: Console | None = None) -> Path:
    """Checkpoint → verified fp32 ONNX with the contract and a model card; optionally int8 too."""
    console = console or Console(stderr=True)
    try:
        import torch

        from cxr_batch.training.train import build_model, load_checkpoint
    except ImportError as exc:
        raise MissingExtraError("export", "train", "torch, torchvision") from exc
    onnx = _onnx()

    ckpt_path = Path(cfg.checkpoint)
    check_new_file(Path(cfg.out), cfg.overwrite)
    if not ckpt_path.is_file():
        raise CxrBatchError(f"{ckpt_path}: no such checkpoint")
    ck = load_checkpoint(ckpt_path)
    labels = list(ck["labels"])
    tcfg = ck["config"]
    size = int(tcfg["image_size"])
    spec = PreprocessSpec(
        (size, size),
        tuple(tcfg["mean"]),  # type: ignore[arg-type]
        tuple(tcfg["std"]),  # type: ignore[arg-type]
        tcfg.get("resize", "bilinear"),
        tcfg.get("crop") or None,
    )
    model = build_model(len(labels))
    model.load_state_dict(ck["model"])
    model.float().eval()

    class Wrapper(torch.nn.Module):
        """ResNet-18 forward that also returns layer4's maps and the pooled embedding."""

        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            m: Any = self.m
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            features = m.layer4(m.layer3(m.layer2(m.layer1(x))))
            embedding = torch.flatten(m.avgpool(features), 1)
            return m.fc(embedding), features, embedding

    wrapper = Wrapper(model).eval()
    dummy = torch.zeros(2, 3, size, size)
    with torch.no_grad():
        wrapper(dummy)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(
        wrapper,
        (dummy,),
        str(tmp),
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=list(OUTPUTS.values()),
        dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in OUTPUTS.values()}},
    )
    proto = onnx.load(str(tmp))
    onnx.checker.check_model(proto)

    # Parity on real images, through the shared numpy preprocessing.
    config, root, split = _run_context(ckpt_path, cfg.data_dir)
    if cfg.holdout_source is None and config.get("holdout_source"):
        cfg = replace(cfg, holdout_source=str(config["holdout_source"]))
    items: list[tuple[Path, str]] = []
    if root is not None and split is not None:
        items = split.paths(root, "test")[: cfg.parity_images]
    if not items:
        sample = Path(__file__).resolve().parents[2] / "sample_images"
        items = [(p, labels[0]) for p in sorted(sample.rglob("*")) if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    x, _ = _tensors(items, spec, labels) if items else (np.zeros((1, 3, size, size), np.float32), None)
    if len(x) == 0:
        x = np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = softmax(wrapper(torch.from_numpy(x))[0].numpy())
    got = softmax(ort_logits(tmp, x))
    parity = float(np.abs(ref - got).max())
    console.print(f"ONNX parity on {len(x)} images: max |Δprob| = {parity:.2e} (limit {PARITY_TOLERANCE:.0e})")
    if parity > PARITY_TOLERANCE:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"ONNX output differs from PyTorch by {parity:.2e} > {PARITY_TOLERANCE:.0e}; not written")

    metrics = _read_metrics(ckpt_path.parent)
    training_data = _training_data(config, split, tcfg)
    meta = ModelMeta(
        name=cfg.name,
        version=cfg.version,
        created=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        labels=tuple(labels),
        input_size=(size, size),
        mean=spec.mean,
        std=spec.std,
        preprocessing={**DEFAULT_PREPROCESSING, "resize": spec.resize, **({"crop": spec.crop} if spec.crop else {})},
        input_name="input",
        outputs=dict(OUTPUTS),
        metrics=metrics,
        training_data=training_data,
        precision="fp32",
        extra={
            "arch": "resnet18",
            "opset": OPSET,
            "parity_max_abs_prob_diff": parity,
            "recipe": cfg.recipe if cfg.recipe is not None else _recipe(tcfg),
            **({"adaptation": cfg.adaptation} if cfg.adaptation else {}),
            **({"init": init} if (init := _init_facts(tcfg)) else {}),
            **({"selection": _selection(cfg.selection)} if cfg.selection else {}),
            **({"notes": list(cfg.notes)} if cfg.notes else {}),
        },
    )
    from cxr_batch.training.cam import add_cam_output

    meta = add_cam_output(proto, meta, source=str(out))  # the 'cam' output for heatmaps, checked with onnxruntime
    tmp.unlink(missing_ok=True)
    # The master stays in memory through every step that derives from it, and is saved once.
    derive_from_master(out, root, split, cfg, console, parity=x, model=OnnxModel(out, proto, meta))
    return out


def derive_from_master(
    master: Path,
    root: Roots | None,
    split: Split | None,
    cfg: ExportConfig,
    console: Console,
    parity: np.ndarray | None = None,
    *,
    model: OnnxModel | None = None,
) -> dict[str, Any] | None:
    """Everything ``cxr-batch export`` derives from an fp32 master (a fresh export, or an existing
    ``.onnx``): the OOD guard (``cfg.ood``), the int8 model (``cfg.quantize``), the fp16 model
    (``cfg.fp16``), the load-time self-check of every file written, and the model card.

    The master (``model``, a fresh export held in memory; else the file ``master``, its contract
    read once) and the files derived from it stay in memory through every step, their contracts
    handed on, and each is saved once at the end (or, when a step fails, as far as it got).

    Returns the int8 model's quantisation record when one was made.
    """
    m = model if model is not None else OnnxModel.read(master)
    derived: list[OnnxModel] = []

    def save_all() -> None:
        for f in (m, *derived):
            f.save()
            console.print(f"wrote {f.path} ({f.path.stat().st_size / 1e6:.1f} MB)")

    int8_info: dict[str, Any] | None = None
    try:
        if root is not None and split is not None:
            fit_validation(m, root, split, cfg, console)
        else:
            console.print("[yellow]no run data found: no validation metrics and no screening operating point[/]")
        if cfg.ood and root is not None and split is not None:
            from cxr_batch.training.ood import fit_model

            fit_model(m, root, split, console=console, max_fit=cfg.ood_fit_images, holdout=cfg.holdout_source)
        elif cfg.ood:
            console.print("[yellow]no training data found for the run: the OOD guard was not fitted[/]")
        if cfg.quantize == "int8":
            if cfg.int8_scheme not in INT8_SCHEMES:
                raise CxrBatchError(f"unknown int8 scheme {cfg.int8_scheme!r}; choose from {sorted(INT8_SCHEMES)}")
            try:
                int8_info, int8 = _derive_int8(m, root, split, cfg, console, INT8_SCHEMES[cfg.int8_scheme])
                derived.append(int8)
            except ModelError as exc:
                if not cfg.int8_optional:
                    raise
                console.print(f"[yellow]int8 model not written:[/] {exc}")
        if cfg.fp16:
            if parity is None and root is not None and split is not None:  # real images, as a fresh export does
                items = split.paths(root, "test")[: cfg.parity_images]
                parity = _tensors(items, m.meta.spec, m.meta.labels)[0]
            derived.append(_derive_fp16(m, parity, console))
        write_self_checks(m, derived, self_check_candidates(root, split), console)
    except CxrBatchError:
        save_all()  # what the steps before the failure made, as each step used to save it
        raise
    save_all()
    write_card(m.path, m.meta, int8_info)
    return int8_info


def validation_items(root: Roots, split: Split, holdout: str | None) -> list[tuple[Path, str, str]]:
    """The images a run was validated on: its val rows, plus the train rows of a held-out source
    (train --holdout-source never trained on them). ``(path, label, source)``."""
    val = split.items(root, "val")
    if holdout:
        val += [t for t in split.items(root, "train") if t[2] == holdout]
    return val


def model_probs(
    model: Path | OnnxModel,
    items: Sequence[tuple[Path, str, str]],
    spec: PreprocessSpec,
    labels: Sequence[str],
    batch: int = 32,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(y, probabilities, source per row) of an ONNX model's logits on labelled files, batch by
    batch through the shared preprocessing (files that fail to decode are left out)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(ort_source(model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    ys: list[int] = []
    srcs: list[str] = []
    out: list[np.ndarray] = []
    buf: list[np.ndarray] = []

    def flush() -> None:
        if buf:
            out.append(softmax(sess.run(["logits"], {name: np.stack(buf)})[0]))
            buf.clear()

    from cxr_batch.engine.lungs import crop_reader
    from cxr_batch.errors import ImageError

    read = crop_reader(spec.crop)
    for path, label, src in items:
        try:
            x, _ = preprocess_for(path, spec, read)
        except ImageError:
            continue
        buf.append(x)
        ys.append(list(labels).index(label))
        srcs.append(src)
        if len(buf) == batch:
            flush()
    flush()
    p = np.concatenate(out) if out else np.zeros((0, len(labels)))
    return np.asarray(ys, np.int64), p, srcs


def fit_validation(
    master: Path | OnnxModel, root: Roots, split: Split, cfg: ExportConfig, console: Console
) -> dict[str, Any]:
    """Measure the fp32 master on the run's validation images (per source, and the held-out source
    on its own) and choose the screening operating point there: the highest P(covid) threshold with
    validation sensitivity >= ``cfg.screen_sensitivity``. Both go into the master's contract
    (``metrics["validation"]``, ``screening``), so every file derived from it carries them.
    A master held in memory is updated there; a file is saved."""
    from cxr_batch.contract import ScreeningPoint
    from cxr_batch.evaluation.metrics import metrics_by_source, operating_point, screening_threshold

    model = master if isinstance(master, OnnxModel) else OnnxModel.read(master)
    meta = model.meta
    labels = list(meta.labels)
    items = validation_items(root, split, cfg.holdout_source)
    y, p, sources = model_probs(model, items, meta.spec, labels)
    m = classification_metrics(y, p, labels)
    validation: dict[str, Any] = {
        k: m[k] for k in ("n", "accuracy", "accuracy_ci95", "macro_f1", "per_class", "confusion_matrix", "ci_method")
    }
    validation["split"] = "validation"
    validation["by_source"] = metrics_by_source(y, p, labels, sources)
    validation["holdout_source"] = cfg.holdout_source
    validation["images"] = "the val rows of every source" + (
        f", plus the train rows of {cfg.holdout_source} (held out of training)" if cfg.holdout_source else ""
    )
    screening = None
    if SCREEN_LABEL in labels and (y == labels.index(SCREEN_LABEL)).any():
        k = labels.index(SCREEN_LABEL)
        threshold = screening_threshold(p[:, k], y == k, cfg.screen_sensitivity)
        point = operating_point(p[:, k], y == k, threshold)
        point["by_source"] = {
            name: operating_point(p[np.asarray(sources) == name, k], y[np.asarray(sources) == name] == k, threshold)
            for name in sorted(set(sources))
        }
        point["n"] = len(y)
        point["images"] = validation["images"]
        point["rule"] = (
            f"the highest P({SCREEN_LABEL}) threshold with validation sensitivity >= {cfg.screen_sensitivity}"
        )
        screening = ScreeningPoint(SCREEN_LABEL, threshold, cfg.screen_sensitivity, json_safe(point))
        console.print(
            f"screening point: P({SCREEN_LABEL}) >= {threshold:.4f}: validation sensitivity {point['sensitivity']:.4f} "
            f"({point['tp']}/{point['tp'] + point['fn']}), specificity {point['specificity']:.4f} "
            f"({point['tn']}/{point['tn'] + point['fp']})"
        )
    console.print(f"validation (fp32, {len(y)} images): accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}")
    model.meta = meta.with_updates(metrics={**meta.metrics, "validation": json_safe(validation)}, screening=screening)
    if not isinstance(master, OnnxModel):
        model.save()
    return validation


def test_screening(
    master: Path | OnnxModel, y: np.ndarray, p: np.ndarray, sources: Sequence[str], console: Console
) -> dict[str, Any] | None:
    """Sensitivity and specificity of the master's screening point on the test split (measured, never
    chosen there), overall and per source, stored in its contract as ``metrics["screening_test"]``
    (a master held in memory is updated there; a file is saved)."""
    from cxr_batch.evaluation.metrics import operating_point

    m = master if isinstance(master, OnnxModel) else OnnxModel.read(master)
    meta = m.meta
    sp = meta.screening
    if sp is None or len(y) == 0:
        return None
    k = list(meta.labels).index(sp.label)
    point = operating_point(p[:, k], y == k, sp.threshold)
    src = np.asarray(list(sources), dtype=object)
    point["by_source"] = {
        name: operating_point(p[src == name, k], y[src == name] == k, sp.threshold) for name in sorted(set(sources))
    }
    point["split"] = "test"
    console.print(
        f"screening point on the test split: sensitivity {point['sensitivity']:.4f} ({point['tp']}/"
        f"{point['tp'] + point['fn']}), specificity {point['specificity']:.4f} ({point['tn']}/{point['tn'] + point['fp']})"
    )
    m.meta = meta.with_updates(metrics={**meta.metrics, "screening_test": json_safe(point)})
    if not isinstance(master, OnnxModel):
        m.save()
    return point


def _without_self_check(extra: dict[str, Any]) -> dict[str, Any]:
    """A derived file gets its own self-check (its tolerance differs), never the master's."""
    from cxr_batch.engine.selfcheck import SELF_CHECK_KEY

    return {k: v for k, v in extra.items() if k != SELF_CHECK_KEY}


#: The load-time self-check (cxr_batch.engine.selfcheck): this many reference images, stored as
#: 8-bit grey thumbnails of this size (about 1.3 kB each in the contract, zlib + base64).
SELF_CHECK_IMAGES = 4
SELF_CHECK_SIZE = 32
#: Candidates they are chosen from: a seeded sample of the test split.
SELF_CHECK_CANDIDATES = 48
#: fp32 against itself: onnxruntime's fp32 kernels differ between CPUs (AVX2, AVX-512, ARM),
#: thread counts and CUDA by about 1e-5 in these logits (measured: benchmarks/RESULTS.md).
FP32_SELF_CHECK_TOLERANCE = 0.02
#: A derived model's tolerance: this many times its deviation on the references at export, and no
#: less than the floor. A right int8 kernel anywhere computes what the exporting machine computed
#: (integer arithmetic) up to rounding; a saturating one deviates several times more (measured).
SELF_CHECK_FACTOR = 2.0
SELF_CHECK_FLOOR = {"int8": 0.25, "fp16": 0.05}


def self_check_candidates(root: Roots | None, split: Split | None, n: int = SELF_CHECK_CANDIDATES) -> list[Path]:
    """Real X-rays the self-check's references are picked from: the test split, else sample_images."""
    if root is not None and split is not None:
        test = [p for p, _ in split.paths(root, "test")]
        if test:
            pick = np.random.default_rng(0).choice(len(test), size=min(n, len(test)), replace=False)
            return [test[i] for i in sorted(pick.tolist())]
    sample = Path(__file__).resolve().parents[2] / "sample_images"
    return sorted(p for p in sample.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:n]


def synthetic_thumbnails(n: int, size: int = SELF_CHECK_SIZE, seed: int = 0) -> np.ndarray:
    """(n, size, size) uint8 seeded stand-ins for chest films (two dark lung fields on a brighter
    body, smooth noise): references for a model exported with no images at hand."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    out = []
    for _ in range(n):
        body = 0.75 - 0.25 * ((xx - 0.5) ** 2 + (yy - 0.55) ** 2) * 4
        for cx in (0.32, 0.68):
            cx += rng.uniform(-0.04, 0.04)
            lung = ((xx - cx) / rng.uniform(0.13, 0.18)) ** 2 + ((yy - 0.5) / rng.uniform(0.25, 0.32)) ** 2 < 1
            body = np.where(lung, body - rng.uniform(0.3, 0.45), body)
        img = body + rng.normal(0, 0.04, (size, size))
        out.append(np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8))
    return np.stack(out)


def thumbnails(paths: Sequence[Path], size: int = SELF_CHECK_SIZE) -> np.ndarray:
    """(N, size, size) uint8 grey thumbnails, decoded as classify decodes (files that fail are skipped)."""
    from cxr_batch.errors import ImageError
    from cxr_batch.io.preprocess import decode, resize_grey

    out = []
    for path in paths:
        try:
            grey = decode(path, (size, size)).grey
        except ImageError:
            continue
        small = resize_grey(grey, (size, size))
        out.append(np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8))
    return np.stack(out) if out else np.zeros((0, size, size), np.uint8)


def write_self_checks(
    master: Path | OnnxModel,
    derived: Sequence[Path | OnnxModel],
    candidates: Sequence[Path],
    console: Console | None = None,
) -> dict[str, dict[str, Any]]:
    """Store the load-time self-check in ``master`` and in each derived file (int8, fp16).

    The references are the :data:`SELF_CHECK_IMAGES` candidates on which the most quantised derived
    model deviates most from fp32 (the most sensitive to a kernel that computes it differently);
    every file stores the same images and the master's fp32 logits for them, with its own tolerance:
    :data:`FP32_SELF_CHECK_TOLERANCE` for the master, ``max(floor, factor × its deviation on
    them)`` for a derived file. Returns the entries written, by file name. Models held in memory
    are updated there; files are saved.
    """
    from cxr_batch.engine.selfcheck import METRIC, SELF_CHECK_KEY, centred, encode_images
    from cxr_batch.io.preprocess import prepare

    console = console or Console(stderr=True)
    _onnx()  # the train extra is there
    m = master if isinstance(master, OnnxModel) else OnnxModel.read(master)
    models = [d if isinstance(d, OnnxModel) else OnnxModel.read(d) for d in derived]
    # files given by path are saved here; models held in memory, by their owner
    save = [not isinstance(given, OnnxModel) for given in (master, *derived)]
    meta = m.meta
    thumbs = thumbnails(candidates)
    if len(thumbs) == 0:  # no data and no sample images (an installed package): seeded stand-ins
        thumbs = synthetic_thumbnails(SELF_CHECK_CANDIDATES)
    x = np.stack([prepare(t.astype(np.float32) / 255.0, meta.spec) for t in thumbs])
    ref = ort_logits(m, x).astype(np.float64)
    deviation = {d: np.abs(centred(ort_logits(d, x)) - centred(ref)).max(axis=1) for d in models}
    order = {"int8": 0, "fp16": 1, "fp32": 2}
    driver = min(models, key=lambda d: order.get(d.meta.precision, 3)) if models else None
    picked = (
        np.argsort(-deviation[driver], kind="stable")[:SELF_CHECK_IMAGES]
        if driver is not None
        else np.arange(min(SELF_CHECK_IMAGES, len(thumbs)))
    )
    picked = np.sort(picked)
    images = encode_images(thumbs[picked])
    logits = [[round(float(v), 6) for v in row] for row in ref[picked]]
    written: dict[str, dict[str, Any]] = {}
    for model, to_save in zip([m, *models], save, strict=True):
        path = model.path
        if model is m:
            measured = 0.0
            tolerance = FP32_SELF_CHECK_TOLERANCE
            basis = "fp32 master: fixed, far above the 1e-5 kernel differences between CPUs and thread counts"
        else:
            measured = float(deviation[model][picked].max())
            floor = SELF_CHECK_FLOOR.get(model.meta.precision, SELF_CHECK_FLOOR["int8"])
            tolerance = max(floor, SELF_CHECK_FACTOR * measured)
            basis = (
                f"max({floor}, {SELF_CHECK_FACTOR} x {measured:.4f}), the {model.meta.precision} model's deviation "
                f"on these images when exported, measured on {cpu_summary()['model']}; on all {len(thumbs)} "
                f"candidates it was at most {float(deviation[model].max()):.4f}"
            )
        entry = {
            "images": images,
            "logits_fp32": logits,
            "metric": METRIC,
            "tolerance": round(tolerance, 4),
            "measured_at_export": round(measured, 6),
            "tolerance_basis": basis,
            "master": m.path.name,
        }
        model.meta = model.meta.with_updates(extra={**model.meta.extra, SELF_CHECK_KEY: entry})
        if to_save:
            model.save()
        written[path.name] = entry
        console.print(
            f"self-check written into {path.name}: {len(picked)} reference images, tolerance {tolerance:.3g} "
            f"(deviation at export {measured:.3g})"
        )
    return written


def _read_metrics(run: Path) -> dict[str, Any]:
    p = run / "metrics.json"
    if not p.exists():
        return {}
    m = json_safe(_read_json(p, "the run's metrics.json"))  # per-source cells can be NaN: strict JSON in the contract
    return {
        k: m[k]
        for k in (
            "split",
            "n",
            "accuracy",
            "accuracy_ci95",
            "macro_f1",
            "ece",
            "per_class",
            "confusion_matrix",
            "best_epoch",
            "ci_method",
            "by_source",
        )
        if k in m
    }


def _training_data(config: dict[str, Any], split: Split | None, tcfg: dict[str, Any]) -> dict[str, Any]:
    dirs = tcfg.get("data_dirs") or [tcfg.get("data_dir", "")]
    names = list(config.get("sources") or {}) or [Path(str(d)).name for d in dirs]
    d: dict[str, Any] = {"source": " + ".join(names), "sources": names, "layout": config.get("layout")}
    if split is not None:
        parts: dict[str, dict[str, int]] = {}
        by_source: dict[str, dict[str, dict[str, int]]] = {}
        for _, label, s, _, src in split.rows:
            parts.setdefault(s, {}).setdefault(label, 0)
            parts[s][label] += 1
            cell = by_source.setdefault(src or names[0], {}).setdefault(s, {})
            cell[label] = cell.get(label, 0) + 1
        if len(by_source) > 1:
            d["split_counts_by_source"] = by_source
        d.update(
            {
                "files": len(split.rows),
                "split_counts": parts,
                "split_sha256": split.fingerprint(),
                "file_list_sha256": _file_list_hash(split),
            }
        )
    return d


def _file_list_hash(split: Split) -> str:
    import hashlib

    h = hashlib.sha256()
    for rel in sorted(r[0] for r in split.rows):
        h.update((rel + "\n").encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _recipe(tcfg: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "image_size",
        "seed",
        "weights",
        "hflip",
        "patience",
        "augment",
        "epoch_images",
        "warmup",
    )
    weights = str(tcfg.get("weights") or "none")
    crop = {"crop": tcfg["crop"]} if tcfg.get("crop") else {}
    balance = tcfg.get("balance") or "class"
    return (
        {k: tcfg.get(k) for k in keys if k in tcfg or k in keys[:9]}
        | {
            "weights": Path(weights).name if weights.endswith(".onnx") else weights,
            "optimizer": "AdamW + OneCycle",
            "sampling": "class-balanced" if balance == "class" else "class- and source-balanced",
        }
        | crop
    )


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


def _init_facts(tcfg: dict[str, Any]) -> dict[str, Any] | None:
    """The released model a run started from (``train --weights MODEL.onnx``), as the card names it."""
    weights = str(tcfg.get("weights") or "")
    if not weights.endswith(".onnx") or not Path(weights).is_file():
        return None
    from cxr_batch.contract import file_sha256

    _, start = read_contract_file(Path(weights))
    r = start.extra.get("recipe", {}) or {}
    how = "random initialisation" if str(r.get("weights", "none")) == "none" else f"`{r.get('weights')}` initialisation"
    td = start.training_data or {}
    return {
        "file": Path(weights).name,
        "model": start.ident,
        "sha256": file_sha256(Path(weights)),
        "origin": f"trained from {how} on the training split of `{td.get('source')}` "
        f"(split sha256 `{td.get('split_sha256')}`)",
    }


def _selection(path: str) -> dict[str, Any]:
    doc = _read_json(Path(path), "the selection file")
    chosen = doc.get("chosen")
    return {
        "chosen": chosen,
        "rule": doc.get("rule"),
        "command": portable_command(doc.get("command")),
        "cpu": doc.get("cpu"),
        "summary": doc.get("summary")
        or f"Each recipe was fine-tuned briefly and scored on the validation split, clean and stressed "
        f"(passed once through a fixed, seeded scanner-like degradation); rule: {doc.get('rule')}. Chosen: `{chosen}`.",
        "recipes": doc.get("recipes"),
    }


_ABS_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"]+")


def portable_path(path: str, base: str | None = None) -> str:
    """An absolute path as a shipped contract may hold it: relative to ``base`` (the current folder)
    when it lies under ``base`` or its parent (``../shared/data/x``), ``~/...`` under the home folder,
    else only its last component (``<...>/name``): no machine's layout reaches a shipped model."""
    base = os.path.abspath(base or os.getcwd())
    path = os.path.normpath(path)
    for root in (base, os.path.dirname(base)):
        if root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
            return os.path.relpath(path, base)
    home = os.path.expanduser("~")
    if home not in ("/", "~") and path.startswith(home.rstrip("/") + "/"):
        return "~/" + os.path.relpath(path, home)
    return f"<...>/{os.path.basename(path)}"


def portable_command(command: Any, base: str | None = None) -> Any:
    """A recorded command line with every absolute path made portable (:func:`portable_path`);
    anything that is not a string is returned as is."""
    if not isinstance(command, str):
        return command
    return _ABS_PATH.sub(lambda m: portable_path(m.group(0), base), command)


#: The earlier name of :func:`derive_int8`.
quantize_int8 = derive_int8

__all__ = [
    "ExportConfig",
    "Int8Scheme",
    "derive_from_master",
    "derive_int8",
    "export_checkpoint",
    "export_fp16",
    "latest_checkpoint",
    "portable_command",
    "portable_path",
    "quantize_file",
    "quantize_int8",
    "write_card",
    "write_self_checks",
]
