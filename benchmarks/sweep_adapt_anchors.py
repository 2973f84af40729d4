"""Choose ``adapt``'s synthetic-anchor distillation (weight, draws per class) on the pool's validation part.

    python benchmarks/sweep_adapt_anchors.py [--data ../shared/data] [--out /tmp/sweep-anchors] [--threads 2]

The same "site" and split as ``bench_adapt.py`` (500 films: Montgomery + Shenzhen normals and 142 pool
viral films from the 1.1.0 split's training part; adapt's own seeded split), with the classifier-only
recipe (``--freeze layer4``): the frozen network's outputs are fixed, so they are computed once and each
recipe is only ``adapt``'s own head training (:func:`cxr_batch.training.adapt.train_head`, the code
``adapt`` runs). Each recipe's classifier is then applied to the pooled embeddings of

- the site's test part (the films ``adapt`` measures before/after on), and
- the pool's **validation** part of the 1.1.0 split (``--pool-part val``: never the test part here),
  through the base ONNX model's ``embedding`` output (with the trunk frozen, the adapted model's
  embedding is the base model's: only ``fc`` differs).

Writes ``OUT/sweep.json`` and prints a Markdown table. Only the choice is made here; the chosen
default is then measured end to end with ``bench_adapt.py --pool-part val``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]  # this tree, and bench_adapt


def recalls(y: np.ndarray, pred: np.ndarray, labels: list[str]) -> dict[str, float]:
    return {lab: float((pred[y == c] == c).mean()) for c, lab in enumerate(labels) if (y == c).any()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path("/tmp/sweep-anchors"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default="0,0.25,0.5,1,2,4", help="anchor weights to try")
    ap.add_argument("--per-class", default="256,1024,4096", help="draws per class to try")
    ap.add_argument("--l2sp", default="0.1,1,10", help="L2-SP weights to try (without anchors)")
    ap.add_argument("--epochs", type=int, default=8, help="adapt --epochs")
    args = ap.parse_args()

    import torch
    from bench_adapt import write_site_labels
    from rich.console import Console

    from cxr_batch.io.labelled import make_split
    from cxr_batch.io.safe_open import open_regular
    from cxr_batch.io.safe_write import atomic_file, write_file_atomic
    from cxr_batch.training.adapt import (
        AdaptConfig,
        _features,
        _Split,
        _test_tensors,
        gaussian_anchors,
        local_sets,
        train_head,
    )
    from cxr_batch.training.onnx_file import read_contract_file
    from cxr_batch.training.ood import embeddings
    from cxr_batch.training.train import _load_cache, build_model

    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    data = args.data.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    labels_file = args.out / "site-labels.csv"
    write_site_labels(data, labels_file, 142)
    base = REPO / "export" / "cxr-resnet18.onnx"
    cfg = AdaptConfig(
        data_dirs=(str(data),),
        out=str(args.out / "unused.onnx"),
        model=str(base),
        labels_file=str(labels_file),
        freeze="layer4",
        threads=args.threads,
        epochs=args.epochs,
    )
    _, meta = read_contract_file(base)
    labels = list(meta.labels)
    t0 = time.time()
    cache = args.out / "features.pt"
    torch.manual_seed(cfg.seed)
    model = build_model(len(labels), str(base))
    model.eval()
    parts = _Split(model, cfg.freeze)
    for p in parts.trunk.parameters():
        p.requires_grad_(False)
    if cache.is_file():  # the frozen outputs of an earlier run with the same data (delete to recompute)
        with open_regular(cache) as fh:  # tensors and names only: nothing in it can run code
            c = torch.load(fh, weights_only=True)
        f_a, ya, f_v, y_v, e_t, y_t, e_p, y_p = (
            c[k].numpy() if k in c["numpy"] else c[k] for k in ("f_a", "ya", "f_v", "y_v", "e_t", "y_t", "e_p", "y_p")
        )
    else:
        sets = local_sets(cfg, labels)
        split = make_split(sets, cfg.seed, cfg.val_fraction, cfg.test_fraction)
        roots = {s.source: Path(s.root) for s in sets}
        a_items, v_items, t_items = (split.items(roots, part) for part in ("train", "val", "test"))
        size, resize = meta.input_size[0], str(meta.preprocessing.get("resize", "bilinear"))
        x_a, y_a, _, _ = _load_cache(
            [(p, lab) for p, lab, _ in a_items], labels, size, resize, console, "adapt", crop=meta.crop
        )
        x_v, y_v, _, _ = _load_cache(
            [(p, lab) for p, lab, _ in v_items], labels, size, resize, console, "val", crop=meta.crop
        )
        f_a, idx_a = _features(parts, x_a, meta.mean, meta.std, cfg.views, cfg.seed)
        f_v, _ = _features(parts, x_v, meta.mean, meta.std, 1, cfg.seed)
        ya = torch.from_numpy(y_a[idx_a])
        with torch.no_grad():
            x_t, keep, _ = _test_tensors(t_items, meta)
            e_t = torch.cat(
                [
                    torch.flatten(parts.pool(parts.trunk(torch.from_numpy(x_t[i : i + 32]))), 1)
                    for i in range(0, len(x_t), 32)
                ]
            )
        y_t = np.asarray([labels.index(t_items[i][1]) for i in keep])
        with open(REPO / "export" / "run-1.1.0" / "split.csv", newline="", encoding="utf-8") as fh:
            pool_rows = [r for r in csv.DictReader(fh) if r["split"] == "val"]
        pool_items = [(data / r["source"] / r["path"], r["label"]) for r in pool_rows]
        e_p, y_p = embeddings(base, pool_items, meta.spec, labels, meta.outputs["embedding"])
        state = {"f_a": f_a, "ya": ya, "f_v": f_v, "y_v": y_v, "e_t": e_t, "y_t": y_t, "e_p": e_p, "y_p": y_p}
        with atomic_file(cache) as fh:  # numpy arrays as tensors, so that the cache loads with weights_only
            torch.save(
                {
                    **{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()},
                    "numpy": [k for k, v in state.items() if isinstance(v, np.ndarray)],
                },
                fh,
            )
    with torch.no_grad():
        teacher = torch.cat([parts.head(f_a[i : i + 64].float()) for i in range(0, len(f_a), 64)])
        base_val = torch.cat([parts.head(f_v[i : i + 64].float()) for i in range(0, len(f_v), 64)])
    prep_s = time.time() - t0
    console.print(f"features and embeddings: {prep_s:.0f} s; pool val {len(e_p)} films, site test {len(e_t)}")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    recipes: list[dict[str, float | int]] = [{"anchor_weight": 0.0, "anchors": 0, "l2sp": 0.0}]
    for w in (float(x) for x in args.weights.split(",")):
        if w > 0:
            recipes += [{"anchor_weight": w, "anchors": int(n), "l2sp": 0.0} for n in args.per_class.split(",")]
    recipes += [{"anchor_weight": 0.0, "anchors": 0, "l2sp": float(x)} for x in args.l2sp.split(",") if x]
    results = []
    with torch.no_grad():
        e_pt = torch.from_numpy(e_p.astype(np.float32))
        base_pool = parts.fc(e_pt).argmax(1).numpy()
        base_site = parts.fc(e_t).argmax(1).numpy()
    results.append(
        {
            "recipe": "1.1.0 (base)",
            "pool_val_accuracy": float((base_pool == y_p).mean()),
            "pool_val_recall": recalls(y_p, base_pool, labels),
            "site_test_accuracy": float((base_site == y_t).mean()),
            "site_test_recall": recalls(y_t, base_site, labels),
            "site_val_recall": recalls(y_v, base_val.argmax(1).numpy(), labels),
        }
    )
    for r in recipes:
        model.load_state_dict(base_state)
        rcfg = replace(cfg, anchor_weight=float(r["anchor_weight"]), anchors=int(r["anchors"]), l2sp=float(r["l2sp"]))
        anchors = gaussian_anchors(base, labels, rcfg.anchors, rcfg.seed) if rcfg.anchor_weight > 0 else None
        t = time.process_time()
        fit = train_head(model, parts, f_a, ya, f_v, y_v, base_val, teacher, rcfg, anchors)
        cpu_s = time.process_time() - t
        model.load_state_dict(fit.state)
        with torch.no_grad():
            pool_pred = parts.fc(e_pt).argmax(1).numpy()
            site_pred = parts.fc(e_t).argmax(1).numpy()
            val_pred = (
                torch.cat([parts.head(f_v[i : i + 64].float()) for i in range(0, len(f_v), 64)]).argmax(1).numpy()
            )
        results.append(
            {
                "recipe": r,
                "best_epoch": fit.best_epoch,
                "train_cpu_seconds": round(cpu_s, 2),
                "pool_val_accuracy": float((pool_pred == y_p).mean()),
                "pool_val_recall": recalls(y_p, pool_pred, labels),
                "site_test_accuracy": float((site_pred == y_t).mean()),
                "site_test_recall": recalls(y_t, site_pred, labels),
                "site_val_recall": recalls(y_v, val_pred, labels),
            }
        )
        console.print(json.dumps(results[-1]))
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "pool_part": "val",
        "pool_films": len(e_p),
        "site_test_films": len(e_t),
        "prep_seconds": round(prep_s, 1),
        "results": results,
    }
    write_file_atomic(args.out / "sweep.json", json.dumps(out, indent=2))
    print(
        "| recipe | best epoch | pool val acc | normal | viral | COVID-19 | site val normal | site val viral "
        "| site test acc | site test normal | site test viral |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        pr, sr = r["pool_val_recall"], r["site_test_recall"]
        print(
            f"| {r['recipe']} | {r.get('best_epoch', '')} | {r['pool_val_accuracy']:.4f} | {pr['normal']:.4f} | "
            f"{pr['viral']:.4f} | {pr['covid']:.4f} | {r['site_val_recall']['normal']:.3f} | "
            f"{r['site_val_recall']['viral']:.3f} | {r['site_test_accuracy']:.3f} | {sr['normal']:.3f} | "
            f"{sr['viral']:.3f} |"
        )


if __name__ == "__main__":
    main()
