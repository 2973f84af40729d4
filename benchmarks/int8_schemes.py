"""int8 quantisation schemes against the fp32 master, on real X-rays, on this CPU (issue 11).

    python benchmarks/int8_schemes.py --old /tmp/old-int8.onnx --n-test 400 --n-kermany 200
    python benchmarks/int8_schemes.py --split export/run-1.1.0/split.csv --part val --n-test 300 --n-kermany 100

With ``--split`` (a run's split.csv, several sources) the images are a seeded sample of that split's
``--part`` rows (``val`` to choose a scheme without touching the test split), and the calibration
images come from its train rows, as export takes them.

For each scheme, ``cxr_batch.training.quantize.quantize_file`` derives an int8 copy of the fp32
master, calibrated on the same 300 training images as ``cxr-batch export --quantize int8``
(the seed-0 split of the shared pool, which reproduces the shipped model's split fingerprint).
Every copy, fp32 and (``--old``) an existing int8 file then run on the same preprocessed images:
a seeded sample of the pool's test split and of ``kermany-normal`` (pediatric normals, never
trained on). Reported per model: top-1 agreement with fp32, largest and mean probability
difference, largest difference of the mean-centred logits, accuracy, the share flagged out of
distribution with the file's own contract threshold (scheme copies carry the master's; the
shipped int8 file has its threshold refitted on its own embeddings), and the model alone in
img/s (batch 16, one session with all cores). Prints Markdown; needs the train extra (onnx).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxr_batch.engine.cpu import cpu_facts, int8_choice  # noqa: E402
from cxr_batch.engine.postprocess import softmax  # noqa: E402
from cxr_batch.io.labelled import Split, find_labelled, make_split  # noqa: E402
from cxr_batch.training.onnx_file import read_contract_file  # noqa: E402
from cxr_batch.training.quantize import Int8Scheme, calibration_images, quantize_file  # noqa: E402
from cxr_batch.training.references import _tensors  # noqa: E402

DATA = REPO.parent / "shared" / "data"
SCHEMES = {
    "U8S8 per-channel, reduce_range": Int8Scheme(reduce_range=True, per_channel=True),
    "U8S8 per-channel, reduce_range, fp32 ends": Int8Scheme(fp32_ends=True),
    "U8S8 per-channel, reduce_range, fp32 ends, percentile": Int8Scheme(fp32_ends=True, calibration="percentile"),
    "U8S8 per-channel 8-bit, fp32 ends": Int8Scheme(reduce_range=False, fp32_ends=True),
    "U8S8 per-channel 8-bit, fp32 ends, percentile": Int8Scheme(
        reduce_range=False, fp32_ends=True, calibration="percentile"
    ),
    "U8S8 per-tensor, reduce_range": Int8Scheme(reduce_range=True, per_channel=False),
    "U8S8 per-channel (no reduce_range)": Int8Scheme(reduce_range=False, per_channel=True),
    "S8S8 per-channel": Int8Scheme(reduce_range=False, per_channel=True, activations="int8"),
    "U8U8 per-channel": Int8Scheme(reduce_range=False, per_channel=True, weights="uint8"),
}


def run(model: Path, x: np.ndarray, threads: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    names = ["logits", "ood_score"]
    outs = [sess.run(names, {"input": x[i : i + 16]}) for i in range(0, len(x), 16)]
    logits = np.concatenate([o[0] for o in outs])
    ood = np.concatenate([np.asarray(o[1]).reshape(-1) for o in outs])
    timed = x[:64]
    sess.run(names, {"input": timed[:16]})
    t = time.perf_counter()
    for i in range(0, len(timed), 16):
        sess.run(["logits"], {"input": timed[i : i + 16]})
    return logits, ood, len(timed) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", type=Path, default=REPO / "export" / "cxr-resnet18.onnx")
    ap.add_argument("--old", type=Path, default=None, help="an existing int8 file to measure too")
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--n-kermany", type=int, default=200)
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--split", type=Path, default=None, help="a run's split.csv (sources under ../shared/data)")
    ap.add_argument("--part", default="val", choices=["val", "test"], help="with --split: the rows measured on")
    args = ap.parse_args()

    _, meta = read_contract_file(args.fp32)
    labels = list(meta.labels)
    root: Path | dict[str, Path]
    if args.split:
        split = Split.read(args.split)
        root = {s: DATA / s if (DATA / s).is_dir() else DATA / "lung-masks" / s for s in split.sources()}
        part = [(p, lab) for p, lab, src in split.items(root, args.part) if src != "kermany-normal"]
        kids = [(p, lab) for p, lab, src in split.items(root, args.part) if src == "kermany-normal"]
        test = random.Random(0).sample(part, min(args.n_test, len(part)))
        kermany = [p for p, _ in random.Random(0).sample(kids, min(args.n_kermany, len(kids)))]
    else:
        root = DATA / "covid19-radiography"
        split = make_split(find_labelled(root), seed=0)
        assert split.fingerprint() == meta.training_data.get("split_sha256"), "not the model's split"
        test = random.Random(0).sample(split.paths(root, "test"), args.n_test)
        kermany = sorted((DATA / "kermany-normal" / "normal").glob("*.png"))
        kermany = random.Random(0).sample(kermany, min(args.n_kermany, len(kermany)))
    x, y = _tensors([*test, *((p, "normal") for p in kermany)], meta.spec, labels)
    xcal = calibration_images(meta, root, split, 300)
    facts = cpu_facts()
    print(f"CPU: {facts.describe()}; auto would take {int8_choice(facts)[1]}", file=sys.stderr)

    models: dict[str, Path] = {"fp32": args.fp32}
    if args.old:
        scheme = read_contract_file(args.old)[1].extra.get("quantization", {}).get("scheme", "int8")
        models[f"{args.old.name} ({scheme})"] = args.old
    work = Path(tempfile.mkdtemp(prefix="cxr-int8-"))
    for name in args.schemes:
        out = work / (name.split()[0] + f"-{len(models)}.onnx")
        t = time.perf_counter()
        quantize_file(args.fp32, out, xcal, SCHEMES[name])
        print(f"{name}: quantised in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        models[name] = out

    rows = []
    ref_logits = ref_p = None
    for name, path in models.items():
        _, m = read_contract_file(path)
        threshold = float("nan") if m.ood_threshold is None else m.ood_threshold
        logits, ood, speed = run(path, x)
        p = softmax(logits)
        if ref_logits is None:
            ref_logits, ref_p = logits, p
        assert ref_p is not None
        c, cr = logits - logits.mean(1, keepdims=True), ref_logits - ref_logits.mean(1, keepdims=True)
        n_t = len(test)
        row = {
            "model": name,
            "agree": float((p.argmax(1) == ref_p.argmax(1)).mean()),
            "max_dp": float(np.abs(p - ref_p).max()),
            "mean_dp": float(np.abs(p - ref_p).max(1).mean()),
            "max_dlogit": float(np.abs(c - cr).max()),
            "acc_test": float((p[:n_t].argmax(1) == y[:n_t]).mean()),
            "acc_kermany": float((p[n_t:].argmax(1) == y[n_t:]).mean()),
            "ood_test": float((ood[:n_t] > threshold).mean()),
            "ood_kermany": float((ood[n_t:] > threshold).mean()),
            "img_s": speed,
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    what = f"{args.part} rows of {args.split}" if args.split else "test-split"
    print(f"\nCPU: {facts.describe()}. {len(test)} {what} images + {len(kermany)} kermany-normal images.\n")
    print(
        "| model | top-1 agreement with fp32 | largest Δprob | mean of per-image largest Δprob | largest Δ centred logit "
        f"| accuracy, {args.part if args.split else 'test'} split | accuracy, kermany-normal "
        f"| OOD flagged, {args.part if args.split else 'test'} | OOD flagged, kermany | alone img/s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['model']} | {r['agree']:.2%} | {r['max_dp']:.3f} | {r['mean_dp']:.4f} | {r['max_dlogit']:.2f} | "
            f"{r['acc_test']:.3f} | {r['acc_kermany']:.3f} | {r['ood_test']:.1%} | {r['ood_kermany']:.1%} | {r['img_s']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"cpu": facts.as_dict(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
