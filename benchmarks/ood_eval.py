"""Measure the out-of-distribution guard of a model: flagged rates and AUROC per group.

    python benchmarks/ood_eval.py [--model export/cxr-resnet18.onnx] [--run runs/default-r18-224]
                                  [--data ../shared/data] [--write-contract]

Groups: the model's own test split (in distribution; target ≤ 5% flagged), natural photographs
(scikit-image's sample images, needs scikit-image), CT and MR DICOM slices, blank images and random
noise (target ≥ 95% flagged), and, for information, other chest radiographs: the RSNA DICOMs and
the sample images. AUROC is between the test split's scores and each group's (higher = better
separated). Writes benchmarks/OOD.md; with --write-contract also stores the figures in the model's
contract (``ood.evaluation``) and rewrites its model card.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxr_batch.engine.classifier import Classifier
from cxr_batch.evaluation.metrics import roc_auc
from cxr_batch.io.labelled import Split
from cxr_batch.io.safe_write import write_file_atomic

REPO = Path(__file__).resolve().parents[1]


def _scores(clf: Classifier, paths: list[Path]) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    scores, flagged, results = [], [], []
    for r in clf.classify(paths):
        if r.status != "ok" or r.ood_score is None:
            print(f"  skipped {r.path}: {r.error}", file=sys.stderr)
            continue
        scores.append(r.ood_score)
        flagged.append(r.in_distribution is False)
        results.append(r)
    return np.asarray(scores), np.asarray(flagged, dtype=bool), results


def _tuberculosis(folder: Path, n: int) -> list[Path]:
    """A seeded sample of the tuberculosis films of lung-masks/{montgomery,shenzhen} (their SOURCES.csv)."""
    import csv
    import random

    found: list[Path] = []
    for source in ("montgomery", "shenzhen"):
        table = folder / source / "SOURCES.csv"
        if not table.is_file():
            continue
        with open(table, newline="", encoding="utf-8") as fh:
            found += [folder / source / r["file"] for r in csv.DictReader(fh) if r["source_label"] == "tuberculosis"]
    return sorted(random.Random(0).sample(found, min(n, len(found))))


def _natural(dst: Path) -> list[Path]:
    try:
        import skimage.data as sd
    except ImportError:
        print("scikit-image is not installed: no natural photographs (pip install scikit-image)", file=sys.stderr)
        return []
    names = [
        "astronaut",
        "camera",
        "coffee",
        "chelsea",
        "rocket",
        "cat",
        "coins",
        "moon",
        "page",
        "text",
        "horse",
        "clock",
        "hubble_deep_field",
        "immunohistochemistry",
        "motorcycle_left",
        "retina",
        "skin",
        "brick",
        "grass",
        "gravel",
        "colorwheel",
        "logo",
        "microaneurysms",
        "cell",
        "eagle",
    ]
    out = []
    for n in names:
        fn = getattr(sd, n, None)
        if fn is None:
            continue
        try:
            arr = np.asarray(fn())
        except Exception as exc:  # some datasets need pooch downloads
            print(f"  no {n}: {type(exc).__name__}", file=sys.stderr)
            continue
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        if arr.dtype != np.uint8:
            arr = (255 * (arr - arr.min()) / max(float(np.ptp(arr)), 1e-9)).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 2:
            arr = arr[..., 0]
        p = dst / f"natural-{n}.png"
        Image.fromarray(arr).save(p)
        out.append(p)
    return out


def _synthetic(dst: Path) -> tuple[list[Path], list[Path]]:
    blank, noise = [], []
    for v in (0, 64, 128, 192, 255):
        p = dst / f"blank-{v}.png"
        Image.fromarray(np.full((256, 256), v, np.uint8)).save(p)
        blank.append(p)
    rng = np.random.default_rng(0)
    for i in range(10):
        p = dst / f"noise-uniform-{i}.png"
        Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(p)
        noise.append(p)
        g = np.clip(rng.normal(128, 40, (256, 256)), 0, 255).astype(np.uint8)
        p = dst / f"noise-gauss-{i}.png"
        Image.fromarray(g).save(p)
        noise.append(p)
    return blank, noise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "export" / "cxr-resnet18.onnx")
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "default-r18-224")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "OOD.md")
    ap.add_argument("--write-contract", action="store_true")
    ap.add_argument("--tb-sample", type=int, default=120, help="tuberculosis films measured (seeded sample)")
    args = ap.parse_args()
    command = "python benchmarks/ood_eval.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    clf = Classifier(model=str(args.model), device="cpu")
    if clf.meta.ood is None:
        sys.exit(f"{args.model} has no OOD guard (export it with --ood)")
    split = Split.read(args.run / "split.csv")
    sources = (
        json.loads((args.run / "config.json").read_text()).get("sources")
        if (args.run / "config.json").exists()
        else None
    )
    roots = (
        {
            name: Path(p)
            if Path(p).is_dir()
            else args.data / Path(p).name
            if (args.data / Path(p).name).is_dir()
            else args.data / "lung-masks" / Path(p).name
            for name, p in sources.items()
        }
        if sources
        else args.data / "covid19-radiography"
    )
    test = [p for p, _ in split.paths(roots, "test")]
    groups: list[tuple[str, list[Path]]] = [("test split (in distribution)", test)]
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        natural = _natural(tmp)
        blank, noise = _synthetic(tmp)
        dicom = args.data / "dicom"
        ctmr = sorted((dicom / "pydicom-testfiles").rglob("*.dcm"))
        rsna = sorted((dicom / "rsna-pneumonia-challenge_lungbox").rglob("*.dcm"))
        samples = sorted(
            p for p in (REPO / "sample_images").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")
        )
        bacterial = sorted((args.data / "near-ood" / "bacterial").glob("*.png"))
        tb = _tuberculosis(args.data / "lung-masks", args.tb_sample)
        groups += [
            ("pediatric bacterial pneumonia (near-ood; not a class)", bacterial),
            (f"adult tuberculosis, Montgomery + Shenzhen (near-ood; not a class; seeded sample of {len(tb)})", tb),
            ("natural photographs (scikit-image)", natural),
            ("CT and MR slices (DICOM)", ctmr),
            ("blank images", blank),
            ("random noise", noise),
            ("RSNA chest radiographs (DICOM, other hospitals; information)", rsna),
            ("sample_images chest X-rays (information)", samples),
        ]
        results: list[dict[str, Any]] = []
        base_scores: np.ndarray | None = None
        for name, paths in groups:
            if not paths:
                continue
            s, f, rows = _scores(clf, paths)
            if base_scores is None:
                base_scores = s
            auroc = None
            if name != groups[0][0] and len(s):
                y = np.r_[np.zeros(len(base_scores)), np.ones(len(s))].astype(bool)
                auroc = roc_auc(np.r_[base_scores, s], y)
            called = {label: sum(r.label == label for r in rows) for label in clf.labels}
            entry: dict[str, Any] = {
                "name": name,
                "n": len(s),
                "flagged": float(f.mean()) if len(f) else float("nan"),
                "auroc": auroc,
                "score_median": float(np.median(s)) if len(s) else None,
                "called": called,
            }
            if name.startswith("sample_images"):
                entry["predictions"] = [
                    {
                        "file": Path(r.path).relative_to(REPO / "sample_images").as_posix(),
                        "label": r.label,
                        "confidence": round(float(r.confidence), 4),
                        "in_distribution": r.in_distribution,
                    }
                    for r in rows
                ]
            results.append(entry)
            print(f"{name}: n={len(s)} flagged={f.mean():.1%} auroc={auroc}", file=sys.stderr)
    threshold = clf.meta.ood_threshold
    lines = [
        f"# Out-of-distribution guard: {clf.meta.ident} ({clf.meta.precision})",
        "",
        f"Command: `{command}`",
        "",
        f"Threshold {threshold:.3f} ({clf.meta.ood.get('calibration')}). Lateral chest views: none were available "
        "to measure.",
        "",
        "| group | images | flagged | AUROC vs test split | median score | called " + " / ".join(clf.labels) + " |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        auroc = "-" if r["auroc"] is None else f"{r['auroc']:.3f}"
        called = " / ".join(str(r["called"][x]) for x in clf.labels)
        lines.append(f"| {r['name']} | {r['n']} | {r['flagged']:.1%} | {auroc} | {r['score_median']:.1f} | {called} |")
    write_file_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.write_contract:
        from cxr_batch.training.card import write_card
        from cxr_batch.training.onnx_file import read_contract_file, save_model, write_contract

        proto, meta = read_contract_file(args.model)
        ood = dict(meta.ood or {})
        ood["evaluation"] = {"command": command, "groups": results}
        write_contract(proto, meta.with_updates(ood=ood))
        save_model(proto, args.model)
        if meta.precision == "fp32":
            write_card(args.model, read_contract_file(args.model)[1], None)


if __name__ == "__main__":
    main()
