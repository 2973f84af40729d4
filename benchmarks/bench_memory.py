"""classify's memory on a large folder, and its start-up times.

    python benchmarks/bench_memory.py                    # 1,000 vs 20,000 files, the default model
    python benchmarks/bench_memory.py --model export/cxr-resnet18-int8.onnx --large 5000

- Memory: peak RSS of ``cxr-batch classify`` on the first 1,000 files of a folder and on all
  20,000 (hard links of the shared pool's images, cycled). classify streams, so the two peaks
  should be within 50 MB of each other.
- Start-up: wall time of ``cxr-batch --help`` (target < 0.3 s; the median of ``--help-runs``),
  and the time from starting ``cxr-batch classify`` on the default model until the report holds
  its first result row (target < 2 s).

Each command runs in its own subprocess. The results go to benchmarks/RESULTS.md between the
``<!-- bench_memory -->`` markers.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_classify import POOL, REPO, RESULTS, cxr_batch_command, machine, run_measured, sample_files, write_results

from cxr_batch.engine.cpu import cpu_summary

MARK_BEGIN = "<!-- bench_memory -->"
MARK_END = "<!-- /bench_memory -->"
RSS_TARGET_MB = 50.0
HELP_TARGET_S = 0.3
FIRST_ROW_TARGET_S = 2.0


def build_folder(source: Path, dest: Path, n: int, per_folder: int) -> list[Path]:
    """``n`` hard links (else copies) of the images under ``source``, cycled, ``per_folder`` per sub-folder.

    Returns the sub-folders, in order: the first holds the first ``per_folder`` files.
    """
    files = sample_files(source, 10**9)
    folders: list[Path] = []
    for i in range(n):
        folder = dest / f"part{i // per_folder:03d}"
        if i % per_folder == 0:
            folder.mkdir(parents=True)
            folders.append(folder)
        src = files[i % len(files)]
        target = folder / f"{i:06d}{src.suffix.lower()}"
        try:
            os.link(src, target)
        except OSError:
            shutil.copyfile(src, target)
    return folders


def time_help(runs: int) -> list[float]:
    cmd = [*cxr_batch_command(), "--help"]
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t)
    return times


def time_first_row(folder: Path, out: Path, model: str | None) -> float:
    """Seconds from starting classify until the report holds one result row; the run is then interrupted."""
    cmd = [*cxr_batch_command(), "classify", str(folder), "--out", str(out), "--quiet"]
    cmd += ["--model", model] if model else []
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = float("nan")
    try:
        while proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 2:  # the header and one row
                first = time.perf_counter() - t
                break
            time.sleep(0.002)
        if first != first and out.exists() and out.read_bytes().count(b"\n") >= 2:
            first = time.perf_counter() - t  # finished between two polls
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    if first != first:
        raise SystemExit(f"classify wrote no row (exit {proc.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", metavar="DIR", help="where to take the images from (default: the shared pool)")
    ap.add_argument("--model", default=None, help="ONNX model (default: the embedded default, as users get it)")
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=20000)
    ap.add_argument("--help-runs", type=int, default=10)
    ap.add_argument("--results", default=str(RESULTS), help="the Markdown file to update")
    ap.add_argument("--no-write", action="store_true", help="print the results only")
    ap.add_argument("--startup-only", action="store_true", help="only the --help and first-row times (no RSS runs)")
    ap.add_argument("--tag", default="", help="write a section of its own, e.g. 'avx2' (default: the main section)")
    args = ap.parse_args()
    if args.large % args.small:
        raise SystemExit("--large must be a multiple of --small")
    source = Path(args.images) if args.images else POOL
    if not source.is_dir():
        raise SystemExit(f"{source}: no such folder; pass --images DIR")

    work = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    try:
        large_n = args.small if args.startup_only else args.large  # only the first folder is used then
        print(f"linking {large_n} files under {work}", file=sys.stderr, flush=True)
        folders = build_folder(source, work / "large", large_n, args.small)
        help_times = time_help(args.help_runs)
        print("time to the first row", file=sys.stderr, flush=True)
        first_rows = [time_first_row(folders[0], work / f"first-{i}.csv", args.model) for i in range(3)]
        runs = {}
        for name, target in () if args.startup_only else (("small", folders[0]), ("large", work / "large")):
            n = args.small if name == "small" else args.large
            print(f"classify {n} files", file=sys.stderr, flush=True)
            cmd = [*cxr_batch_command(), "classify", str(target), "--out", str(work / f"{name}.csv"), "--quiet"]
            cmd += ["--model", args.model] if args.model else []
            run = run_measured(cmd)
            if run.returncode not in (0, 3):
                raise SystemExit(f"classify failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
            runs[name] = (n, run)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    help_s = statistics.median(help_times)
    first_s = statistics.median(first_rows)

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]])
    info = machine()
    begin, end = (
        (MARK_BEGIN, MARK_END)
        if not args.tag
        else (f"<!-- bench_memory {args.tag} -->", f"<!-- /bench_memory {args.tag} -->")
    )
    facts = cpu_summary()
    lines = [
        begin,
        "## bench_memory: streaming memory and start-up" + (f" ({args.tag})" if args.tag else ""),
        "",
        f"CPU: {facts['model']} ({facts['arch']}), flags {', '.join(facts['flags']) or 'none relevant'}; "  # type: ignore[arg-type]
        f"`--precision auto` takes {facts['auto_cpu_precision']} here.",
        "",
        "```",
        command,
        "```",
        "",
        f"Model: {args.model or 'the embedded default (--precision auto)'}.",
        "",
        "| measure | value | target | |",
        "| --- | ---: | ---: | --- |",
    ]
    if runs:
        (n_small, small), (n_large, large) = runs["small"], runs["large"]
        delta = large.max_rss_mb - small.max_rss_mb
        lines += [
            f"| peak RSS, classify {n_small} files | {small.max_rss_mb:.0f} MB | | {n_small / small.wall_s:.0f} img/s |",
            f"| peak RSS, classify {n_large} files | {large.max_rss_mb:.0f} MB | | {n_large / large.wall_s:.0f} img/s |",
            f"| difference | {delta:+.0f} MB | ≤ {RSS_TARGET_MB:.0f} MB | {verdict(delta <= RSS_TARGET_MB)} |",
        ]
    lines += [
        f"| `cxr-batch --help` (median of {len(help_times)}) | {help_s:.3f} s | < {HELP_TARGET_S} s | {verdict(help_s < HELP_TARGET_S)} |",
        f"| start → first result row in the report (median of {len(first_rows)}) | {first_s:.2f} s | < {FIRST_ROW_TARGET_S:.0f} s "
        f"| {verdict(first_s < FIRST_ROW_TARGET_S)} |",
        "",
        f"Load average at the end: {os.getloadavg()[0]:.2f}. Machine: "
        + "; ".join(f"{k} {v}" for k, v in info.items())
        + ".",
        end,
    ]
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_write:
        write_results(Path(args.results), section, begin, end)
        print(f"wrote {args.results}", file=sys.stderr)


if __name__ == "__main__":
    main()
