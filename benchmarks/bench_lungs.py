"""What the lung stage costs classify: end-to-end time and peak memory, with and without it, in one run.

    python benchmarks/bench_lungs.py                      # 200 pool films, 3 rounds
    python benchmarks/bench_lungs.py --n 500 --repeat 5 --model export/cxr-resnet18.onnx

Each round runs ``cxr-batch classify FOLDER --out r.csv`` twice, in its own subprocess each time,
once with ``--no-lungs`` and once with the lung stage (the order alternates between rounds), over
the same folder of real films (hard links of a seeded draw from the shared pool). Reported: the
median wall times and peak RSS of both, and their ratios (goal: at most 25% slower end to end).
Ratios measured in one run are what counts; absolute numbers move with whatever else the machine
does. The CPU and its flags are printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_classify import POOL, REPO, link_tree, machine, run_measured, sample_files


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    import re

    flags = sorted(set(re.findall(r"\b(avx512[a-z_]*|avx2|amx[a-z_]*)\b", text)))
    return " ".join(flags) or "none of avx2/avx512/amx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=POOL, help="folder of films (default: the shared pool)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", default=None, help="classifier (default: the embedded default)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    files = sample_files(args.images, args.n)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "cxr_batch.cli", "classify"]
    times: dict[str, list[float]] = {"without": [], "with": []}
    rss: dict[str, list[float]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory(prefix="bench-lungs-") as tmp:
        folder = Path(tmp) / "films"
        link_tree(files, args.images, folder)
        for round_no in range(args.repeat):
            order = ["without", "with"] if round_no % 2 == 0 else ["with", "without"]
            for kind in order:
                out = Path(tmp) / f"{kind}-{round_no}.csv"
                extra = ["--no-lungs"] if kind == "without" else []
                model = ["--model", args.model] if args.model else []
                run = run_measured(
                    [*cmd, str(folder), "--out", str(out), "-q", "--threads", str(args.threads), *model, *extra],
                    env=env,
                )
                if run.returncode not in (0, 3):
                    raise SystemExit(f"classify failed ({run.returncode}): {run.stderr[-2000:]}")
                times[kind].append(run.wall_s)
                rss[kind].append(run.max_rss_mb)
                print(
                    f"round {round_no + 1} {kind:7s} lungs: {run.wall_s:6.1f} s, {run.max_rss_mb:6.0f} MB", flush=True
                )
    t = {k: statistics.median(v) for k, v in times.items()}
    m = {k: statistics.median(v) for k, v in rss.items()}
    info = machine()
    result = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "images": len(files),
        "rounds": args.repeat,
        "cpu": info.get("cpu"),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "median_wall_s": t,
        "images_per_s": {k: len(files) / v for k, v in t.items()},
        "median_peak_rss_mb": m,
        "time_ratio_with_over_without": t["with"] / t["without"],
        "rss_ratio_with_over_without": m["with"] / m["without"],
    }
    print(
        f"\n{len(files)} films, {args.repeat} rounds, {info.get('cpu')} ({os.cpu_count()} CPUs; {cpu_flags()}):\n"
        f"  without the lung stage: {t['without']:.1f} s ({len(files) / t['without']:.1f} images/s), {m['without']:.0f} MB peak\n"
        f"  with it:                {t['with']:.1f} s ({len(files) / t['with']:.1f} images/s), {m['with']:.0f} MB peak\n"
        f"  time ratio {result['time_ratio_with_over_without']:.3f} (goal <= 1.25), "
        f"peak-memory ratio {result['rss_ratio_with_over_without']:.3f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
