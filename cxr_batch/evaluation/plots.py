"""PNG figures for ``evaluate --plots``: confusion matrix, one-vs-rest ROC curves, reliability diagram.

Needs matplotlib (the ``plots`` extra), imported only here and only when plots are asked for.
Figures are drawn with the object-oriented API (``matplotlib.figure.Figure``), never pyplot,
so no GUI backend and no global state are involved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cxr_batch.errors import MissingExtraError, OutputError
from cxr_batch.evaluation.metrics import roc_curve
from cxr_batch.io.safe_write import OutputDir

#: The files written, in this order.
FILES = ("confusion_matrix.png", "roc_curves.png", "reliability.png")
DPI = 120


def require_matplotlib() -> None:
    """Raises MissingExtraError (with the pip command) when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("--plots", "plots", "matplotlib") from exc


def _figure(width: float, height: float) -> Any:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def confusion_matrix_figure(doc: dict[str, Any]) -> Any:
    """Counts, coloured by the share of each true class (row), annotated 'count (row %)'."""
    labels = doc["labels"]
    cm = np.asarray(doc["confusion_matrix"], dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig = _figure(1.6 + 1.1 * len(labels), 1.2 + 1.0 * len(labels))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(len(labels)):
        for j in range(len(labels)):
            colour = "white" if share[i, j] > 0.6 else "black"
            ax.text(j, i, f"{int(cm[i, j])}\n({100 * share[i, j]:.0f}%)", ha="center", va="center", color=colour)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = doc.get("accuracy")
    ax.set_title(f"confusion matrix, n={doc['n']}" + (f", accuracy {acc:.3f}" if acc is not None else ""))
    fig.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    return fig


def roc_figure(doc: dict[str, Any], y: np.ndarray, probs: np.ndarray) -> Any:
    """One-vs-rest ROC curve per class, with its AUC (the metrics' ``roc_auc``) in the legend, and the
    screening operating point (``covid_screen``'s threshold) marked on its class's curve."""
    fig = _figure(5.2, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    for i, name in enumerate(doc["labels"]):
        fpr, tpr = roc_curve(probs[:, i], y == i)
        auc = doc["per_class"][name]["roc_auc"]
        if auc is None:  # no positives or no negatives: no curve
            continue
        ax.plot(fpr, tpr, linewidth=2, label=f"{name} (AUC {auc:.3f}, n={doc['per_class'][name]['support']})")
        scr = doc.get("screening")
        if (
            scr
            and scr.get("label") == name
            and scr.get("sensitivity") is not None
            and scr.get("specificity") is not None
        ):
            ax.plot(
                [1 - scr["specificity"]],
                [scr["sensitivity"]],
                marker="o",
                markersize=9,
                markerfacecolor="none",
                markeredgewidth=2,
                color="black",
                linestyle="none",
                label=f"screening point, P({name}) >= {scr['threshold']:.3g}",
            )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC curves, one class vs the rest")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def reliability_figure(doc: dict[str, Any]) -> Any:
    """Accuracy against top-1 confidence per bin (the ECE's bins), with the image count per bin below."""
    bins = doc["reliability"]
    fig = _figure(5.2, 5.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
    filled = [b for b in bins if b["n"]]
    centres = [(b["lower"] + b["upper"]) / 2 for b in filled]
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    top.bar(centres, [b["accuracy"] for b in filled], width=width, edgecolor="black", alpha=0.8, label="accuracy")
    top.plot(
        [b["confidence"] for b in filled],
        [b["accuracy"] for b in filled],
        "o",
        color="black",
        markersize=3,
        label="mean confidence in the bin",
    )
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    ece = doc.get("ece")
    top.set_title("reliability diagram" + (f", ECE {ece:.3f}" if ece is not None else ""))
    top.legend(loc="upper left", fontsize="small")
    bottom.bar(centres, [b["n"] for b in filled], width=width, edgecolor="black", color="grey")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("images")
    return fig


def write_plots(folder: str | os.PathLike[str], doc: dict[str, Any], y: np.ndarray, probs: np.ndarray) -> list[Path]:
    """Write :data:`FILES` into ``folder`` from the evaluate document and its labels/probabilities.

    Raises:
        MissingExtraError: matplotlib is not installed.
        OutputError: the folder can't be written.
    """
    require_matplotlib()
    out = Path(folder)
    figures = [confusion_matrix_figure(doc), roc_figure(doc, y, probs), reliability_figure(doc)]
    written = []
    try:
        with OutputDir(out) as out_dir:  # atomic, never through a link (a planted one is replaced)
            for name, fig in zip(FILES, figures, strict=True):
                with out_dir.atomic(name) as fh:
                    fig.savefig(fh, format=Path(name).suffix.lstrip("."))
                written.append(out / name)
    except OSError as exc:
        raise OutputError(f"cannot write the plots into {out}: {exc.strerror or exc}") from None
    return written
