"""DICOM at the speed of the model (issue 24): three ratios, each measured in one run.

    python benchmarks/bench_dicom_speed.py                         # this tree
    python benchmarks/bench_dicom_speed.py --baseline /work/main   # and main's code, interleaved

1. ``cxr-batch classify`` on 208 real 1024² JPEG-baseline chest DICOMs (the 16 RSNA files of
   ``../shared/data/dicom``, replicated with new UIDs by pydicom) against 208 of the pool's 256²
   PNGs: images/s of whole runs (start-up included), target ≥ 0.7.
2. The same DICOMs with ``--sr DIR`` against without: target ≥ 0.8. And, in this process (this tree
   only), the CPU time (``time.process_time``) of ``SRWriter.make`` per SR (read the source, build,
   write) with SR templates and with highdicom for every SR, interleaved: the SR's own cost, which
   whole-run rates on a shared machine hide (an SR worker takes its share of the CPUs).
3. Peak RSS of ``classify`` over 100,000 files against 1,000 (empty ``.png`` files, 1,000 a folder:
   each is an error row, so this measures the walk, the report and the provenance record, not
   decoding): target within 50 MB.

Runs are interleaved (PNG, DICOM, DICOM --sr, ...) and each rate is the median of ``--repeats``
runs; every command runs in its own subprocess with the shipped default precision
(``--precision auto``). ``--baseline DIR`` runs the same commands on the code tree in DIR (e.g.
a checkout of main) for a before/after. The results go to benchmarks/RESULTS.md between the
``<!-- bench_dicom_speed -->`` markers.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_classify import POOL, REPO, RESULTS, Run, machine, run_measured, write_results

from cxr_batch.engine.cpu import cpu_summary

DICOM_DIR = REPO.parent / "shared" / "data" / "dicom" / "rsna-pneumonia-challenge_lungbox"
MARK_BEGIN = "<!-- bench_dicom_speed -->"
MARK_END = "<!-- /bench_dicom_speed -->"
DICOM_TARGET, SR_TARGET, RSS_TARGET_MB = 0.7, 0.8, 50.0


def replicate_dicoms(dest: Path, n: int) -> None:
    """``n`` copies of the RSNA films, each with new study, series and instance UIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    sources = sorted(DICOM_DIR.glob("*/*.dcm"))
    if not sources:
        raise SystemExit(f"no RSNA DICOMs under {DICOM_DIR}")
    dest.mkdir(parents=True)
    for i in range(n):
        ds = pydicom.dcmread(sources[i % len(sources)])
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(dest / f"{i:04d}.dcm", enforce_file_format=True)


def link_pngs(dest: Path, n: int) -> None:
    files = sorted(p for label in ("normal", "viral", "covid") for p in (POOL / label).glob("*.png"))
    dest.mkdir(parents=True)
    for i in range(n):
        src = files[(i * 7919) % len(files)]  # spread over the three classes
        try:
            os.link(src, dest / f"{i:04d}.png")
        except OSError:
            shutil.copyfile(src, dest / f"{i:04d}.png")


def empty_files(dest: Path, n: int, per_folder: int) -> None:
    for i in range(n):
        folder = dest / f"part{i // per_folder:04d}"
        if i % per_folder == 0:
            folder.mkdir(parents=True)
        (folder / f"{i:07d}.png").touch()


def command(tree: Path) -> tuple[list[str], dict[str, str]]:
    """``python -m cxr_batch.cli`` importing the package of ``tree`` (no bytecode written there)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    return [sys.executable, "-m", "cxr_batch.cli"], env


def classify(tree: Path, inputs: Path, out: Path, *extra: str) -> Run:
    cmd, env = command(tree)
    for stale in (out, Path(str(out) + ".provenance.json")):
        stale.unlink(missing_ok=True)
    run = run_measured([*cmd, "classify", str(inputs), "--out", str(out), "--quiet", *extra], env=env)
    if run.returncode not in (0, 3):
        raise SystemExit(f"classify failed (exit {run.returncode}) in {tree}:\n{run.stderr[-3000:]}")
    return run


def sr_cpu_ms(dicoms: Path, n: int, folder: Path) -> dict[str, float]:
    """CPU ms per SR of ``SRWriter.make`` on ``n`` of the DICOMs: with templates ("template") and
    highdicom for every SR ("highdicom"); the best of two interleaved passes each, the first SR
    of each writer (imports, the template) left out."""
    import time

    import pydicom

    from cxr_batch.engine.types import Result
    from cxr_batch.report.sr import ModelIdent, SRWriter

    model = ModelIdent("cxr-resnet18", "1.1.0", "0" * 64, "int8", ("normal", "viral", "covid"))
    results = []
    for p in sorted(dicoms.glob("*.dcm"))[: n + 1]:
        uid = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        probs = {"normal": 0.1, "viral": 0.7, "covid": 0.2}
        results.append(
            Result(p.name, str(p), "ok", model.name, "viral", 0.7, probs, ood_score=2.0, in_distribution=True)
        )
        results[-1].fields["sop_instance_uid"] = uid
    best: dict[str, float] = {}
    for i, fast in enumerate((False, True, False, True)):
        writer = SRWriter(folder / f"cpu-{i}", model, fast=fast)
        writer.make(results[0])
        t0 = time.process_time()
        for r in results[1:]:
            _, error = writer.make(r)
            if error is not None:
                raise SystemExit(f"SR failed: {error}")
        ms = (time.process_time() - t0) / (len(results) - 1) * 1000
        writer.close()
        name = "template" if fast else "highdicom"
        best[name] = min(best.get(name, ms), ms)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=208, help="DICOMs and PNGs per run (208)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each rate (0: only the RSS)")
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=100_000)
    ap.add_argument("--baseline", metavar="DIR", help="also run the code tree in DIR (e.g. main's checkout)")
    ap.add_argument("--skip-rss", action="store_true", help="only the rates")
    ap.add_argument("--sr-cpu", type=int, default=64, metavar="N", help="SRs for the per-SR CPU time (0: none)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--no-write", action="store_true", help="print the results only")
    args = ap.parse_args()

    trees = {"this tree": REPO}
    if args.baseline:
        trees = {"baseline": Path(args.baseline).resolve(), **trees}
    work = Path(tempfile.mkdtemp(prefix="bench_dicom_speed_"))
    rates: dict[str, dict[str, list[float]]] = {name: {"png": [], "dicom": [], "sr": []} for name in trees}
    rss: dict[str, dict[str, Run]] = {name: {} for name in trees}
    try:
        if args.repeats:
            print(f"preparing {args.files} DICOMs and PNGs under {work}", file=sys.stderr, flush=True)
            replicate_dicoms(work / "dicom", args.files)
            link_pngs(work / "png", args.files)
        for rep in range(args.repeats):
            for name, tree in trees.items():
                for kind in ("png", "dicom", "sr"):
                    inputs = work / ("png" if kind == "png" else "dicom")
                    extra = ["--sr", str(work / f"sr-{rep}-{len(rates[name][kind])}")] if kind == "sr" else []
                    run = classify(tree, inputs, work / "r.csv", *extra)
                    rates[name][kind].append(args.files / run.wall_s)
                    print(f"{name} {kind}: {args.files / run.wall_s:.1f} img/s", file=sys.stderr, flush=True)
        sr_ms = {}
        if args.sr_cpu:
            if not (work / "dicom").exists():
                replicate_dicoms(work / "dicom", max(args.sr_cpu + 1, 1))
            sr_ms = sr_cpu_ms(work / "dicom", args.sr_cpu, work)
            print(f"SR CPU ms: {sr_ms}", file=sys.stderr, flush=True)
        if not args.skip_rss:
            print(f"creating {args.large} empty files", file=sys.stderr, flush=True)
            empty_files(work / "many", args.large, args.small)
            for name, tree in trees.items():
                rss[name]["small"] = classify(tree, work / "many" / "part0000", work / "small.csv")
                rss[name]["large"] = classify(tree, work / "many", work / "large.csv")
                print(
                    f"{name} RSS: {rss[name]['small'].max_rss_mb:.0f} MB / {rss[name]['large'].max_rss_mb:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    facts = cpu_summary()
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]])
    lines = [
        MARK_BEGIN,
        "## bench_dicom_speed: DICOM at the speed of the model (issue 24)",
        "",
        f"CPU: {facts['model']} ({facts['arch']}), flags {', '.join(facts['flags']) or 'none relevant'}; "  # type: ignore[arg-type]
        f"`--precision auto` takes {facts['auto_cpu_precision']} here.",
        "",
        "```",
        cmd,
        "```",
        "",
    ]
    if args.repeats:
        lines += [
            f"Whole runs of {args.files} files each (start-up included), the median of {args.repeats} interleaved runs.",
            "",
            "| code | PNG 256² img/s | DICOM 1024² img/s | DICOM `--sr` img/s | DICOM / PNG (≥ 0.7) "
            "| `--sr` / without (≥ 0.8) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
    for name in trees if args.repeats else ():
        png, dicom, sr = (statistics.median(rates[name][k]) for k in ("png", "dicom", "sr"))
        lines.append(
            f"| {name} | {png:.1f} | {dicom:.1f} | {sr:.1f} | {dicom / png:.2f} {verdict(dicom / png >= DICOM_TARGET)} "
            f"| {sr / dicom:.2f} {verdict(sr / dicom >= SR_TARGET)} |"
        )
    if sr_ms:
        lines += [
            "",
            f"CPU time of one SR (`SRWriter.make`: read the source, build, write; this tree, in one process, "
            f"{args.sr_cpu} SRs, best of two interleaved passes): highdicom for every SR "
            f"{sr_ms['highdicom']:.1f} ms, SR templates {sr_ms['template']:.1f} ms "
            f"({sr_ms['highdicom'] / sr_ms['template']:.0f}× less).",
        ]
    if not args.skip_rss:
        lines += [
            "",
            f"Peak RSS of classify over empty `.png` files, {args.small:,} a folder (each an error row: the walk, the "
            "report and the provenance record, not decoding):",
            "",
            f"| code | {args.small:,} files | {args.large:,} files | difference (≤ {RSS_TARGET_MB:.0f} MB) |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name in trees:
            small, large = rss[name]["small"], rss[name]["large"]
            delta = large.max_rss_mb - small.max_rss_mb
            lines.append(
                f"| {name} | {small.max_rss_mb:.0f} MB | {large.max_rss_mb:.0f} MB "
                f"| {delta:+.0f} MB {verdict(delta <= RSS_TARGET_MB)} |"
            )
    lines += [
        "",
        f"Load average at the end: {os.getloadavg()[0]:.2f}. Machine: "
        + "; ".join(f"{k} {v}" for k, v in machine().items())
        + ".",
        MARK_END,
    ]
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_write:
        write_results(Path(args.results), section, MARK_BEGIN, MARK_END)
        print(f"wrote {args.results}", file=sys.stderr)


if __name__ == "__main__":
    main()
