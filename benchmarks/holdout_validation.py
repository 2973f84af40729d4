"""A model on a training run's validation design (issue 19): per source, a held-out hospital, and
the screening threshold each target sensitivity would give.

    python benchmarks/holdout_validation.py --model export/cxr-resnet18.onnx --holdout montgomery \\
        ../shared/data/covid19-radiography ../shared/data/kermany-normal \\
        ../shared/data/lung-masks/shenzhen/SOURCES.csv ../shared/data/lung-masks/montgomery/SOURCES.csv

The split is the one ``cxr-batch train`` draws for these roots (seed 0; or ``--split FILE``). The
validation images are what export's ``fit_validation`` uses: the val rows of every source plus the
train rows of the held-out source. Never reads the test split. Prints Markdown; ``--json`` saves it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxr_batch.evaluation.metrics import (  # noqa: E402
    classification_metrics,
    metrics_by_source,
    operating_point,
    screening_threshold,
)
from cxr_batch.io.labelled import Split, find_labelled_many, make_split, roots_by_source  # noqa: E402
from cxr_batch.training.onnx_file import read_contract_file  # noqa: E402
from cxr_batch.training.references import model_probs, validation_items  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="+", help="the run's data roots, in train's order")
    ap.add_argument("--model", type=Path, default=REPO / "export" / "cxr-resnet18.onnx")
    ap.add_argument("--holdout", default=None, help="the source kept out of training")
    ap.add_argument("--split", type=Path, default=None)
    ap.add_argument("--targets", type=float, nargs="*", default=[0.90, 0.95, 0.97, 0.99])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    split = Split.read(args.split) if args.split else make_split(find_labelled_many(args.roots), seed=0)
    roots = roots_by_source(args.roots)
    meta = read_contract_file(args.model)[1]
    labels = list(meta.labels)
    y, p, src = model_probs(args.model, validation_items(roots, split, args.holdout), meta.spec, labels)
    m = classification_metrics(y, p, labels)
    by = metrics_by_source(y, p, labels, src)
    k = labels.index("covid")
    s = np.asarray(src)
    print(f"{meta.ident} ({meta.precision}), {len(y)} validation images, split sha256 {split.fingerprint()}\n")
    print(f"All: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}\n")
    print("| source | n | accuracy | " + " | ".join(f"{x} recall" for x in labels) + " |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in labels) + " |")
    for name, sm in by.items():
        rec = [f"{sm['per_class'][x]['recall']:.4f}" if sm["per_class"][x]["support"] else "-" for x in labels]
        held = " (held out)" if name == args.holdout else ""
        print(f"| {name}{held} | {sm['n']} | {sm['accuracy']:.4f} | " + " | ".join(rec) + " |")
    rows = []
    print("\n| target sensitivity | threshold | sensitivity | specificity | specificity per source |")
    print("| ---: | ---: | ---: | ---: | --- |")
    for t in args.targets:
        th = screening_threshold(p[:, k], y == k, t)
        op = operating_point(p[:, k], y == k, th)
        per = {n: operating_point(p[s == n, k], y[s == n] == k, th)["specificity"] for n in sorted(set(src))}
        rows.append({"target": t, **op, "specificity_by_source": per})
        per_text = ", ".join(f"{n} {v:.3f}" for n, v in per.items())
        print(f"| {t:.2f} | {th:.4f} | {op['sensitivity']:.4f} | {op['specificity']:.4f} | {per_text} |")
    argmax = float(((p.argmax(1) == k) & (y == k)).sum() / max(1, (y == k).sum()))
    print(f"\nCOVID-19 sensitivity at argmax (the label column): {argmax:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"metrics": m, "by_source": by, "thresholds": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
