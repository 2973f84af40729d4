"""Classification metrics with numpy only; used by train's test report and by evaluate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion; (nan, nan) when n == 0."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties averaged."""
    pos = positive.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-1 confidence over equal-width bins."""
    if len(y) == 0:
        return math.nan
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in pairwise(edges):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def reliability_bins(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> list[dict[str, Any]]:
    """The reliability diagram behind :func:`expected_calibration_error` (same bins): per bin its
    edges, the number of images, their mean top-1 confidence and their accuracy (None when empty)."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    conf = probs.max(axis=1) if len(y) else np.zeros(0)
    correct = (probs.argmax(axis=1) == y).astype(np.float64) if len(y) else np.zeros(0)
    edges = np.linspace(0.0, 1.0, bins + 1)
    out: list[dict[str, Any]] = []
    for lo, hi in pairwise(edges):
        mask = (conf > lo) & (conf <= hi)
        n = int(mask.sum())
        out.append(
            {
                "lower": float(lo),
                "upper": float(hi),
                "n": n,
                "confidence": float(conf[mask].mean()) if n else None,
                "accuracy": float(correct[mask].mean()) if n else None,
            }
        )
    return out


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest ROC curve: (false positive rates, true positive rates), one point per distinct
    score threshold from (0, 0) to (1, 1). Its trapezoid area equals :func:`roc_auc`."""
    scores = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive).astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return np.array([0.0, 1.0]), np.array([math.nan, math.nan])
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], pos[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each run of equal scores
    tps = np.cumsum(p)[last]
    fps = np.cumsum(~p)[last]
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def _ratio(a: int, b: int) -> float:
    return a / b if b else math.nan


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/specificity/F1 with 95% Wilson intervals,
    the confusion matrix (rows true, columns predicted), one-vs-rest ROC AUC and ECE."""
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(labels)
    pred = probs.argmax(axis=1) if len(y) else np.zeros(0, dtype=np.int64)
    cm = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(y, pred, strict=True):
        cm[t, p] += 1
    n = int(cm.sum())
    per_class: dict[str, dict[str, Any]] = {}
    f1s = []
    for i, name in enumerate(labels):
        tp = int(cm[i, i])
        fp = int(cm[:, i].sum() - tp)
        fn = int(cm[i, :].sum() - tp)
        tn = n - tp - fp - fn
        precision = _ratio(tp, tp + fp)
        recall = _ratio(tp, tp + fn)
        spec = _ratio(tn, tn + fp)
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        f1s.append(f1)
        per_class[name] = {
            "support": tp + fn,
            "precision": precision,
            "precision_ci95": list(wilson_interval(tp, tp + fp)),
            "recall": recall,
            "recall_ci95": list(wilson_interval(tp, tp + fn)),
            "specificity": spec,
            "specificity_ci95": list(wilson_interval(tn, tn + fp)),
            "f1": f1,
            "roc_auc": roc_auc(probs[:, i], y == i) if n else math.nan,
        }
    correct = int(np.trace(cm))
    return {
        "n": n,
        "labels": list(labels),
        "accuracy": _ratio(correct, n),
        "accuracy_ci95": list(wilson_interval(correct, n)),
        "macro_f1": float(np.nanmean(f1s)) if n else math.nan,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "ece": expected_calibration_error(probs, y),
        "ci_method": "Wilson score interval, 95%",
    }


def metrics_by_source(
    y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str], sources: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """:func:`classification_metrics` for the images of each source (sorted by name), so a user sees
    where a model fails. A source with one class only has recall and accuracy for it; its other
    classes' precision, recall and F1 are NaN where undefined."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    src = np.asarray(list(sources), dtype=object)
    if len(src) != len(y):
        raise ValueError(f"{len(src)} sources for {len(y)} images")
    return {
        name: classification_metrics(y[src == name], p[src == name].reshape(-1, len(labels)), labels)
        for name in sorted(set(src.tolist()))
    }


#: The grid a screening threshold is rounded down to (:func:`screening_threshold`).
THRESHOLD_STEP = 1e-5


def screening_threshold(scores: np.ndarray, positive: np.ndarray, sensitivity: float = 0.90) -> float:
    """The highest threshold ``t`` at which ``scores >= t`` reaches ``sensitivity`` on these images:
    the k-th highest positive score, k = ceil(sensitivity x positives), rounded down to
    :data:`THRESHOLD_STEP` (so the k-th image is not lost to the ~1e-7 differences between
    onnxruntime sessions, batch sizes and thread counts).

    Raises:
        ValueError: no positive image (no sensitivity to reach).
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    n_pos = int(pos.sum())
    if n_pos == 0:
        raise ValueError("no positive images: a sensitivity can't be reached")
    k = max(1, math.ceil(sensitivity * n_pos - 1e-9))
    kth = float(np.sort(s[pos])[::-1][k - 1])
    return min(kth, math.floor(kth / THRESHOLD_STEP + 1e-6) * THRESHOLD_STEP)


#: The validation sensitivities a screening point may be raised to (``export --screen-holdout-specificity``).
SCREEN_TARGETS = (0.90, 0.95, 0.97, 0.98, 0.99)


def screening_target_for_specificity(
    scores: np.ndarray,
    positive: np.ndarray,
    holdout_negative: np.ndarray,
    floor: float,
    base: float = 0.90,
    targets: Sequence[float] = SCREEN_TARGETS,
) -> tuple[float | None, list[dict[str, Any]]]:
    """The highest validation sensitivity target (``base`` and every one of ``targets`` above it)
    whose :func:`screening_threshold` keeps the specificity on ``holdout_negative`` (a held-out
    hospital's non-COVID images, a mask over ``scores``) at ``floor`` or above: a lower threshold
    buys sensitivity on a new hospital's films, the held-out hospital says what it costs its normals.

    Returns the target (None when even ``base`` misses the floor) and, for each target tried, its
    threshold and the held-out specificity with counts.

    Raises:
        ValueError: no positive image, or no held-out negative image.
    """
    s = np.asarray(scores, dtype=np.float64)
    held = s[np.asarray(holdout_negative, dtype=bool)]
    if not len(held):
        raise ValueError("no held-out negative images: no specificity to keep")
    tried: list[dict[str, Any]] = []
    chosen: float | None = None
    for target in sorted({float(base), *(float(t) for t in targets if t > base)}):
        t = screening_threshold(s, positive, target)
        op = operating_point(held, np.zeros(len(held), bool), t)
        tried.append(
            {"target": target, "threshold": t, "holdout_specificity": op["specificity"], "tn": op["tn"], "n": len(held)}
        )
        if op["specificity"] >= floor:
            chosen = target
    return chosen, tried


def operating_point(scores: np.ndarray, positive: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity and specificity of ``scores >= threshold``, with counts and Wilson intervals
    (a metric without images is NaN)."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    called = s >= threshold
    tp, fn = int((called & pos).sum()), int((~called & pos).sum())
    tn, fp = int((~called & ~pos).sum()), int((called & ~pos).sum())
    return {
        "threshold": float(threshold),
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "sensitivity": _ratio(tp, tp + fn),
        "sensitivity_ci95": list(wilson_interval(tp, tp + fn)),
        "specificity": _ratio(tn, tn + fp),
        "specificity_ci95": list(wilson_interval(tn, tn + fp)),
        "ci_method": "Wilson score interval, 95%",
    }
