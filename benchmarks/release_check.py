"""Release figures beside holdout_validation.py, on validation images and films no model trained on.

    python benchmarks/release_check.py MODEL.onnx [MODEL.onnx ...] \\
        [--split export/run-1.2.0-candidates/split.csv] [--holdout montgomery] [--data ../shared/data]

For each model: the AUC of P(covid) between the pool's validation COVID-19 films and each source's
validation normals (the held-out hospital's included) and the pool's validation non-COVID films; and
what it calls the Montgomery (58) and Shenzhen (286) tuberculosis films (tuberculosis is no class and
no run trains on them: adult films unlike the training data). Never reads the test split. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxr_batch.evaluation.metrics import roc_auc  # noqa: E402
from cxr_batch.io.labelled import Split, roots_by_source  # noqa: E402
from cxr_batch.training.onnx_file import read_contract_file  # noqa: E402
from cxr_batch.training.references import model_probs, validation_items  # noqa: E402


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    return round(float(roc_auc(np.r_[pos, neg], np.r_[np.ones(len(pos)), np.zeros(len(neg))].astype(bool))), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--split", type=Path, default=REPO / "export" / "run-1.2.0-candidates" / "split.csv")
    ap.add_argument("--holdout", default="montgomery")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args()
    d = args.data
    roots = roots_by_source(
        [
            str(d / "covid19-radiography"),
            str(d / "kermany-normal"),
            str(d / "lung-masks" / "shenzhen" / "SOURCES.csv"),
            str(d / "lung-masks" / "montgomery" / "SOURCES.csv"),
        ]
    )
    items = validation_items(roots, Split.read(args.split), args.holdout)
    tb = {h: sorted((d / "lung-masks" / h / "images").glob("*_1.png")) for h in ("montgomery", "shenzhen")}
    out = {}
    for model in args.models:
        meta = read_contract_file(model)[1]
        labels = list(meta.labels)
        k = labels.index("covid")
        y, p, src = model_probs(model, items, meta.spec, labels)
        s = np.asarray(src)
        covid = p[(y == k) & (s == "covid19-radiography"), k]
        row: dict[str, object] = {
            f"auc_covid_vs_normals[{name}]": auc(covid, p[(s == name) & (y == labels.index("normal")), k])
            for name in sorted(set(src))
        }
        row["auc_covid_vs_pool_non_covid"] = auc(covid, p[(s == "covid19-radiography") & (y != k), k])
        for h, films in tb.items():
            _, pt, _ = model_probs(model, [(f, "normal", "tb") for f in films], meta.spec, labels)
            row[f"{h}_tuberculosis"] = {
                "n": len(pt),
                **{f"called_{x}": round(float((pt.argmax(1) == i).mean()), 4) for i, x in enumerate(labels)},
                "mean_p_covid": round(float(pt[:, k].mean()), 4),
            }
        out[meta.ident] = row
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
