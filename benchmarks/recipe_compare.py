"""Choose between training runs on validation only: read each run's history.json (the validation
figures of every epoch, per source, the held-out hospital included) and config.json, score each run at
its own best epoch, and write the selection file ``cxr-batch export --selection`` puts in the contract.

    python benchmarks/recipe_compare.py RUN_DIR... --out benchmarks/recipes-1.2.0.json

Rule: the mean of the per-source validation accuracies at the run's best epoch, or at ``--epoch N`` for
runs stopped early (each source counts once, so a hospital held out of training weighs as much as the
pool); ties go to the first run named.
The test split is never read (runs for a comparison are trained with ``--no-test-report``).

``--chosen NAME --rule TEXT``: the choice was made by another rule, written before the runs were
trained (a release rule, e.g. ``export/run-1.2.0-candidates/RELEASE-RULE.md``); the file records that
rule and that choice, and every run's figures beside it, scored as above.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxr_batch.engine.cpu import cpu_facts  # noqa: E402
from cxr_batch.io.safe_open import read_json  # noqa: E402
from cxr_batch.io.safe_write import write_file_atomic  # noqa: E402

RULE = (
    "the mean of the per-source validation accuracies (the held-out hospital is one source), at each run's best "
    "epoch unless --epoch names one; the test split is not read"
)
#: what makes one recipe differ from another (the rest of config.json is the same or bookkeeping)
RECIPE_KEYS = ("crop", "augment", "balance", "image_size", "epochs", "epoch_images", "lr", "holdout_source")


def summarise(run: Path, epoch: int | None = None) -> dict[str, Any]:
    history = read_json(run / "history.json", allow_nan=True)
    config = read_json(run / "config.json")
    best = int(history["best_epoch"]) if epoch is None else epoch
    row = next((r for r in history["epochs"] if int(r["epoch"]) == best), None)
    if row is None:
        sys.exit(f"{run}: no epoch {best} in history.json")
    by_source = {k[len("val_accuracy[") : -1]: float(v) for k, v in row.items() if k.startswith("val_accuracy[")}
    recall = {k[len("val_recall_") :]: float(v) for k, v in row.items() if k.startswith("val_recall_")}
    return {
        "recipe": {k: config.get(k) for k in RECIPE_KEYS},
        "best_epoch": best,
        "epochs_run": len(history["epochs"]),
        "seconds": round(sum(float(r.get("seconds", 0)) for r in history["epochs"])),
        "val": {
            "accuracy": float(row["val_accuracy"]),
            "macro_f1": float(row["val_macro_f1"]),
            "recall": recall,
            "by_source_accuracy": by_source,
        },
        "score": sum(by_source.values()) / len(by_source) if by_source else float(row["val_accuracy"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--names", help="comma-separated names for the runs (default: the folder names)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--epoch",
        type=int,
        help="score every run at this epoch instead of its best (runs stopped early: compare at the same point "
        "of the same schedule)",
    )
    ap.add_argument("--chosen", help="the run chosen by --rule (default: the highest score)")
    ap.add_argument("--rule", help="the rule that chose --chosen, written before the runs were trained")
    args = ap.parse_args()
    if bool(args.chosen) != bool(args.rule):
        sys.exit("--chosen and --rule go together")
    names = args.names.split(",") if args.names else [r.name for r in args.runs]
    if len(names) != len(args.runs):
        sys.exit("--names: one name per run")
    recipes = {name: summarise(run, args.epoch) for name, run in zip(names, args.runs, strict=True)}
    chosen = args.chosen or max(recipes, key=lambda n: (recipes[n]["score"], -names.index(n)))
    if chosen not in recipes:
        sys.exit(f"--chosen {chosen}: not one of {', '.join(names)}")
    rule = args.rule or RULE
    differ = [k for k in RECIPE_KEYS if len({json.dumps(r["recipe"].get(k)) for r in recipes.values()}) > 1]
    doc = {
        "summary": f"{len(recipes)} training runs on the same split and sources, differing in "
        f"{', '.join(differ) or 'nothing'}, scored on validation: {RULE}"
        + (f"; chosen by a rule written before training: {rule}" if args.rule else "")
        + (f", compared at epoch {args.epoch} of each (the same point of the same schedule)" if args.epoch else "")
        + f". Chosen: `{chosen}`.",
        "cpu": cpu_facts().describe(),
        "command": "python benchmarks/recipe_compare.py " + " ".join(sys.argv[1:]),
        "rule": rule,
        "recipes": recipes,
        "chosen": chosen,
    }
    write_file_atomic(args.out, json.dumps(doc, indent=2) + "\n")
    print(
        "| recipe | epoch | "
        + " | ".join(f"val {s}" for s in recipes[chosen]["val"]["by_source_accuracy"])
        + " | score |"
    )
    print("| --- | ---: | " + " | ".join("---:" for _ in recipes[chosen]["val"]["by_source_accuracy"]) + " | ---: |")
    for name, r in recipes.items():
        cells = " | ".join(f"{v:.4f}" for v in r["val"]["by_source_accuracy"].values())
        print(f"| {name}{' (chosen)' if name == chosen else ''} | {r['best_epoch']} | {cells} | {r['score']:.4f} |")


if __name__ == "__main__":
    main()
