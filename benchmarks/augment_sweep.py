"""Choose the training recipe on VALIDATION images only (never test): a short fine-tune per recipe,
scored on the clean validation split and on a "stressed" copy of it (the validation images passed
once through a fixed, seeded scanner-like degradation: resampling, JPEG, gamma, noise, crop), per source.

    python benchmarks/augment_sweep.py ../shared/data/covid19-radiography ../shared/data/kermany-normal \
        --weights export/cxr-resnet18.onnx --out runs/sweep --image-size 128 --epochs 2 --epoch-images 2400

Writes runs/sweep/sweep.json and prints one line per recipe. The test split is not read.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cxr_batch.engine.postprocess import softmax
from cxr_batch.evaluation.metrics import classification_metrics, metrics_by_source
from cxr_batch.io.labelled import Split, find_labelled_many
from cxr_batch.training.train import (
    TrainConfig,
    _load_cache,
    augment_scanner,
    build_model,
    predict_cached,
    train_model,
)

RECIPES = {
    "light/class": {"augment": "light", "balance": "class"},
    "scanner/class+source": {"augment": "scanner", "balance": "class+source"},
}


def cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
        flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
        isa = sorted(f for f in flags if f == "avx2" or f.startswith(("avx512", "amx")) or "vnni" in f)
        return f"{model} ({', '.join(isa) or 'no AVX2/AVX-512'})"
    except OSError:
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", default="none")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--epoch-images", type=int, default=2400)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "cpu": cpu(),
        "torch": torch.__version__,
        "command": "python benchmarks/augment_sweep.py " + " ".join(f"{a}" for a in __import__("sys").argv[1:]),
        "recipes": {},
    }
    split_file = None
    stressed = None
    for name in args.recipes.split(","):
        run = out / name.replace("/", "_").replace("+", "-")
        cfg = TrainConfig(
            data_dirs=tuple(args.data),
            out=str(run),
            epochs=args.epochs,
            image_size=args.image_size,
            epoch_images=args.epoch_images,
            weights=args.weights,
            lr=args.lr,
            split=split_file,
            patience=args.epochs,
            **RECIPES[name],
        )
        t0 = time.time()
        if not (run / "best.ckpt").exists():
            train_model(cfg, report_test=False)
        split_file = str(run / "split.csv")
        split = Split.read(Path(split_file))
        sets = find_labelled_many(args.data)
        roots = {d.source: Path(d.root) for d in sets}
        labels = sets[0].labels
        val = split.items(roots, "val")
        from rich.console import Console

        x_val, y_val, _, keep = _load_cache(
            [(p, x) for p, x, _ in val], labels, args.image_size, "bilinear", Console(stderr=True), "val"
        )
        s_val = [s for (_, _, s), k in zip(val, keep, strict=True) if k]
        if stressed is None:
            gen = torch.Generator().manual_seed(12345)
            xs = torch.from_numpy(x_val.astype(np.float32)).unsqueeze(1)
            stressed = torch.cat([augment_scanner(xs[i : i + 64], gen, False) for i in range(0, len(xs), 64)])
            stressed = stressed[:, 0].numpy()
        ck = torch.load(run / "best.ckpt", map_location="cpu", weights_only=False)
        model = build_model(len(labels))
        model.load_state_dict(ck["model"])
        row = {"recipe": RECIPES[name], "best_epoch": ck["history"]["best_epoch"], "seconds": round(time.time() - t0)}
        for tag, arr in (("val", x_val), ("val_stressed", stressed)):
            p = softmax(predict_cached(model, arr, cfg, torch.device("cpu"), False))
            m = classification_metrics(y_val, p, labels)
            bs = metrics_by_source(y_val, p, labels, s_val)
            row[tag] = {
                "accuracy": m["accuracy"],
                "macro_f1": m["macro_f1"],
                "recall": {k: v["recall"] for k, v in m["per_class"].items()},
                "by_source_accuracy": {k: v["accuracy"] for k, v in bs.items()},
            }
        row["score"] = 0.5 * (row["val"]["macro_f1"] + row["val_stressed"]["macro_f1"])
        results["recipes"][name] = row
        print(
            f"{name}: val acc {row['val']['accuracy']:.4f} F1 {row['val']['macro_f1']:.4f} | stressed acc "
            f"{row['val_stressed']['accuracy']:.4f} F1 {row['val_stressed']['macro_f1']:.4f} | per source "
            f"{row['val']['by_source_accuracy']} / {row['val_stressed']['by_source_accuracy']}",
            flush=True,
        )
        (out / "sweep.json").write_text(json.dumps(results, indent=2))
    best = max(results["recipes"], key=lambda k: results["recipes"][k]["score"])
    results["chosen"] = best
    results["rule"] = "highest mean of clean and stressed validation macro-F1"
    (out / "sweep.json").write_text(json.dumps(results, indent=2))
    print("chosen:", best)


if __name__ == "__main__":
    main()
