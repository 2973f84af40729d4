"""``cxr-batch adapt`` on 500 local films on this CPU: time, and before/after on the site and on the pool.

    python benchmarks/bench_adapt.py [--data ../shared/data] [--out /tmp/bench-adapt] [--threads 2]

The "site": the adult normal films of two hospitals the shipped model never saw
(``lung-masks/montgomery`` and ``lung-masks/shenzhen``, file names ending ``_0``: 80 + 278) and 142 of
the pool's viral films drawn (seeded) from the **training** part of the shipped model's split
(``export/run-1.1.0/split.csv``), so the site has two classes and no COVID-19. One labels file, one
``adapt`` run (it splits the 500 films adapt/validation/test itself and prints the before/after table
on its test part). Then the base and the adapted model are measured with ``cxr-batch evaluate`` on the
pool's held-out films: the ``test`` part of the 1.1.0 split (1,034 films the shipped model was never
trained or tuned on, none of them used by ``adapt``): does the adapted model forget COVID-19?

Writes ``OUT/bench_adapt.json`` and prints a Markdown summary; the CPU and its flags are named. The CPU
seconds (user + system) of the adapt process are recorded beside the wall time: on a shared machine the
wall time depends on the other load (also recorded), the CPU time much less.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu() -> dict[str, object]:
    info = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = sorted(set(re.findall(r"\b(avx512[a-z_0-9]*|avx2|amx[a-z_0-9]*)\b", info)))
    return {"model": model.group(1) if model else platform.processor(), "flags": flags}


def run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system of the child) and stderr of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu_s, proc.stderr


def write_site_labels(data: Path, labels: Path, n_viral: int) -> list[tuple[str, str]]:
    """The "site": Montgomery + Shenzhen adult normals and ``n_viral`` pool viral films drawn (seeded)
    from the training part of the 1.1.0 split; written as a ``path,label`` file relative to ``data``."""
    rows = [
        (f"lung-masks/{site}/images/{p.name}", "normal")
        for site in ("montgomery", "shenzhen")
        for p in sorted((data / "lung-masks" / site / "images").glob("*_0.png"))
    ]
    with open(REPO / "export" / "run-1.1.0" / "split.csv", newline="", encoding="utf-8") as fh:
        split = list(csv.DictReader(fh))
    viral = sorted(r["path"] for r in split if r["split"] == "train" and r["label"] == "viral")
    rows += [(f"covid19-radiography/{p}", "viral") for p in random.Random(0).sample(viral, n_viral)]
    with open(labels, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-adapt"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--viral", type=int, default=142, help="pool viral films (training part of the 1.1.0 split)")
    ap.add_argument(
        "--freeze",
        default=None,
        help="adapt --freeze (default: adapt's own; layer3: train layer4 and fc; layer4: fc only)",
    )
    ap.add_argument("--anchor-weight", type=float, help="adapt --anchor-weight (default: adapt's)")
    ap.add_argument("--anchors", type=int, help="adapt --anchors (default: adapt's)")
    ap.add_argument("--skip-pool", action="store_true", help="don't measure on the pool's held-out films")
    ap.add_argument(
        "--pool-part",
        choices=("test", "val"),
        default="test",
        help="which held-out part of the 1.1.0 split measures forgetting: val to choose a recipe, test to report it",
    )
    args = ap.parse_args()
    data = args.data.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    labels = args.out / "site-labels.csv"
    rows = write_site_labels(data, labels, args.viral)

    model = args.out / "site.onnx"
    cli = [sys.executable, "-m", "cxr_batch.cli"]
    adapt_cmd = [*cli, "adapt", str(data), "--labels", str(labels), "--out", str(model), "--overwrite"]
    adapt_cmd += ["--model", str(REPO / "export" / "cxr-resnet18.onnx")]
    if args.freeze:
        adapt_cmd += ["--freeze", args.freeze]
    if args.anchor_weight is not None:
        adapt_cmd += ["--anchor-weight", str(args.anchor_weight)]
    if args.anchors is not None:
        adapt_cmd += ["--anchors", str(args.anchors)]
    adapt_cmd += ["--threads", str(args.threads), "--site", "Montgomery + Shenzhen normals, pool viral"]
    seconds, cpu_seconds, log = run(adapt_cmd)
    record = json.loads((args.out / "site-run" / "adapt.json").read_text())
    result: dict[str, object] = {
        "command": " ".join(adapt_cmd),
        "films": len(rows),
        "adapt_seconds": round(seconds, 1),
        "adapt_cpu_seconds": round(cpu_seconds, 1),
        "load_average_after": os.getloadavg(),
        "adapt_inner_seconds": record["seconds"],
        "site_test": record["comparison"],
        "best_epoch": record["recipe"]["best_epoch"],
        "anchor_distillation": record["recipe"].get("anchor_distillation"),
        "warnings": record["warnings"],
        "cpu": cpu(),
        "threads": args.threads,
    }
    print(log[-4000:], file=sys.stderr)
    if not args.skip_pool:
        pool: dict[str, object] = {}
        for name, path in (("base", REPO / "export" / "cxr-resnet18.onnx"), ("adapted", model)):
            out = args.out / f"pool-{name}.json"
            cmd = [*cli, "evaluate", str(data / "covid19-radiography"), str(data / "kermany-normal")]
            cmd += ["--labels", str(REPO / "export" / "run-1.1.0" / "split.csv"), "--part", args.pool_part]
            cmd += ["--model", str(path), "--out", str(out), "--overwrite", "--quiet"]
            run(cmd)
            m = json.loads(out.read_text())
            pool[name] = {
                "command": " ".join(cmd),
                "n": m["n"],
                "accuracy": m["accuracy"],
                "accuracy_ci95": m["accuracy_ci95"],
                "recall": {k: v["recall"] for k, v in m["per_class"].items()},
            }
        result["pool_held_out"] = pool
        result["pool_part"] = args.pool_part
    (args.out / "bench_adapt.json").write_text(json.dumps(result, indent=2))
    print(
        f"adapt on {len(rows)} films: {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU (user + system), "
        f"{args.threads} threads, on {result['cpu']}; load average after {os.getloadavg()}"
    )
    print("| local test part | films | base | adapted |\n| --- | ---: | ---: | ---: |")
    for r in record["comparison"]:
        print(f"| {r['metric']} | {r['n']} | {r['before']:.3f} | {r['after']:.3f} |")
    if "pool_held_out" in result:
        print(f"| pool held-out (1.1.0 {args.pool_part} part) | films | accuracy | normal | viral | covid |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, m in result["pool_held_out"].items():  # type: ignore[union-attr]
            rec = m["recall"]
            print(
                f"| {name} | {m['n']} | {m['accuracy']:.4f} | {rec['normal']:.4f} | {rec['viral']:.4f} | "
                f"{rec['covid']:.4f} |"
            )


if __name__ == "__main__":
    main()
