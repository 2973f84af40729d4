"""Rich tables for :func:`cxr_batch.evaluation.metrics.classification_metrics` (train's test report and evaluate).

No torch and no onnxruntime here: both ``train`` and ``evaluate`` import it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from cxr_batch.text import markup


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}"


def _ci(ci: Sequence[Any] | None) -> str:
    if ci is None or len(ci) != 2 or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci):
        return "-"
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def print_metrics(metrics: dict[str, Any], console: Console, title: str = "metrics") -> None:
    """The headline numbers, the per-class table (one column per class, so it fits 80 columns;
    precision, recall and specificity with their 95% intervals) and the confusion matrix."""
    console.print(
        f"{title}: n={metrics['n']}, accuracy {_num(metrics['accuracy'])} {_ci(metrics.get('accuracy_ci95'))}, "
        f"macro-F1 {_num(metrics['macro_f1'])}, ECE {_num(metrics['ece'])}",
        highlight=False,
        soft_wrap=True,
    )
    per_class = metrics["per_class"]
    t = Table(title="per class", caption=f"95% CI: {metrics.get('ci_method', 'Wilson score interval, 95%')}")
    t.add_column("")
    for name in per_class:
        t.add_column(markup(name), justify="right")
    t.add_row("support", *[str(m["support"]) for m in per_class.values()])
    for key, name in (("precision", "precision"), ("recall", "recall (sensitivity)"), ("specificity", "specificity")):
        t.add_row(name, *[_num(m[key]) for m in per_class.values()])
        t.add_row("  95% CI", *[_ci(m.get(f"{key}_ci95")) for m in per_class.values()], style="dim")
    t.add_row("F1", *[_num(m["f1"]) for m in per_class.values()])
    t.add_row("ROC AUC (one vs rest)", *[_num(m["roc_auc"]) for m in per_class.values()])
    console.print(t)
    cm = Table(title="confusion matrix")
    cm.add_column("true \\ predicted")
    for name in metrics["labels"]:
        cm.add_column(markup(name), justify="right")
    for name, row in zip(metrics["labels"], metrics["confusion_matrix"], strict=True):
        cm.add_row(markup(name), *[str(v) for v in row])
    console.print(cm)


def print_by_source(by_source: dict[str, dict[str, Any]], console: Console, title: str = "per source") -> None:
    """One line per source: n, accuracy with its 95% interval, macro-F1 and each class's recall
    (classes the source has no image of are left out). Lines, not a table: they fit any width."""
    if not by_source:
        return
    console.print(f"{title} (95% CI: Wilson):", highlight=False)
    for name, m in by_source.items():
        recalls = ", ".join(
            f"{markup(x)} {_num(pc['recall'])} ({pc['support']})" for x, pc in m["per_class"].items() if pc["support"]
        )
        console.print(
            f"  {markup(name)}: n={m['n']}, accuracy {_num(m['accuracy'])} {_ci(m.get('accuracy_ci95'))}, "
            f"macro-F1 {_num(m['macro_f1'])}; recall {recalls}",
            highlight=False,
            soft_wrap=True,
        )
