"""The fp32 master measured on the run's images, and the reference images stored in each file.

Running a model over images in memory (:func:`ort_logits`, :func:`model_probs`); the validation
metrics and the screening operating point chosen on validation (:func:`fit_validation`), that
point measured on the test split (:func:`test_screening`); and the load-time self-check's
reference images, logits and tolerances written into the master and every derived file
(:func:`write_self_checks`, read by :mod:`cxr_batch.engine.selfcheck`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console

from cxr_batch.contract import SCREEN_LABEL
from cxr_batch.engine.cpu import cpu_summary
from cxr_batch.engine.lungs import preprocess_for, preprocess_labelled
from cxr_batch.engine.postprocess import softmax
from cxr_batch.errors import CxrBatchError
from cxr_batch.evaluation.evaluate import json_safe
from cxr_batch.evaluation.metrics import classification_metrics
from cxr_batch.io.labelled import Roots, Split
from cxr_batch.io.preprocess import PreprocessSpec
from cxr_batch.training.onnx_file import OnnxModel, _onnx, ort_source

if TYPE_CHECKING:
    from cxr_batch.training.export import ExportConfig


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
        target = cfg.screen_sensitivity
        rule = f"the highest P({SCREEN_LABEL}) threshold with validation sensitivity >= {target}"
        raised: dict[str, Any] | None = None
        if cfg.screen_holdout_specificity is not None:
            target, rule, raised = _raised_target(p[:, k], y, k, sources, cfg, cfg.screen_holdout_specificity, console)
        threshold = screening_threshold(p[:, k], y == k, target)
        point = operating_point(p[:, k], y == k, threshold)
        point["by_source"] = {
            name: operating_point(p[np.asarray(sources) == name, k], y[np.asarray(sources) == name] == k, threshold)
            for name in sorted(set(sources))
        }
        point["n"] = len(y)
        point["images"] = validation["images"]
        point["rule"] = rule
        if raised is not None:
            point["raised"] = raised
        screening = ScreeningPoint(SCREEN_LABEL, threshold, target, json_safe(point))
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


def _raised_target(
    p_label: np.ndarray,
    y: np.ndarray,
    k: int,
    sources: Sequence[str],
    cfg: ExportConfig,
    floor: float,
    console: Console,
) -> tuple[float, str, dict[str, Any]]:
    """``export --screen-holdout-specificity``: the validation sensitivity target raised as far as
    the held-out source's non-COVID validation images keep that specificity (the held-out hospital
    stands in for a user's own, whose COVID-19 films the model ranks well but scores lower).
    Returns (target, the rule in words, what was tried)."""
    from cxr_batch.evaluation.metrics import screening_target_for_specificity

    held = cfg.holdout_source
    if not held or held not in sources:
        raise CxrBatchError(
            "--screen-holdout-specificity needs a run with a held-out source (train --holdout-source) "
            "whose validation images are there"
        )
    negatives = (np.asarray(sources) == held) & (y != k)
    try:
        chosen, tried = screening_target_for_specificity(p_label, y == k, negatives, floor, base=cfg.screen_sensitivity)
    except ValueError as exc:
        raise CxrBatchError(f"--screen-holdout-specificity: {exc} ({held})") from None
    target = cfg.screen_sensitivity if chosen is None else chosen
    targets = ", ".join(f"{t['target']:g}" for t in tried)
    rule = (
        f"the highest P({SCREEN_LABEL}) threshold with validation sensitivity >= {target}: the highest target of "
        f"{targets} whose threshold keeps specificity >= {floor:g} on the "
        f"held-out source {held}'s validation non-COVID images"
        + ("" if chosen is not None else f" (none did: the target stays {cfg.screen_sensitivity:g})")
    )
    for t in tried:
        console.print(
            f"screening target {t['target']:g}: P({SCREEN_LABEL}) >= {t['threshold']:.4f}, {held} specificity "
            f"{t['holdout_specificity']:.4f} ({t['tn']}/{t['n']})"
        )
    return target, rule, {"holdout_source": held, "specificity_floor": floor, "tried": tried, "chosen": chosen}


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
