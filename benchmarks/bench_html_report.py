"""``cxr-batch report --html`` on a 20,000-row report: wall time and peak RSS.

    python benchmarks/bench_html_report.py                 # 20,000 rows, 2,000 distinct images
    python benchmarks/bench_html_report.py --rows 100000 --unique 0

The rows are real classify output, replicated:

- *replicated*: ``classify`` (the default model) runs on ``sample_images`` plus, when the shared
  data is here, the chest DICOM ``RG1_UNCI.dcm``, and one broken PNG (an error row). Those rows
  are repeated under ``copyNNNNN/`` prefixes up to ``--rows``, each repeated path a symbolic link
  to the real file: 20,000 rows, 11 distinct images. Thumbnails are made once per distinct file
  (recognised by inode, then content hash), so this measures the report's own cost per row:
  reading, stat, pages.
- *distinct*: ``classify`` on the first ``--unique`` images of the shared pool (256×256 PNGs),
  so every row needs its own thumbnail: the cost of decoding and encoding thumbnails.

Each is measured cold (a new output folder) and warm (the same folder again: the thumbnails are
reused, the pages rewritten). Every ``cxr-batch report`` runs in its own subprocess; its peak RSS
is that process's ``ru_maxrss`` and its CPU time ``ru_utime + ru_stime`` (``os.wait4``). Results go to benchmarks/RESULTS.md between the
``<!-- bench_html_report -->`` markers.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_classify import POOL, REPO, RESULTS, cxr_batch_command, machine, write_results

MARK_BEGIN = "<!-- bench_html_report -->"
MARK_END = "<!-- /bench_html_report -->"
DICOM = REPO.parent / "shared" / "data" / "dicom" / "pydicom-data" / "other" / "RG1_UNCI.dcm"


def classify(folder: Path, out: Path) -> None:
    done = subprocess.run(
        [*cxr_batch_command(), "classify", str(folder), "--out", str(out), "--quiet"], capture_output=True, text=True
    )
    if done.returncode not in (0, 3):
        raise SystemExit(f"classify failed: {done.stderr}")


def replicated(work: Path, rows: int) -> tuple[Path, Path, int]:
    """A report of ``rows`` rows replicating the real rows of a few real files; returns
    (report, image folder, distinct files)."""
    base = work / "base"
    shutil.copytree(REPO / "sample_images", base, ignore=shutil.ignore_patterns("*.md", "*.csv"))
    if DICOM.is_file():
        shutil.copyfile(DICOM, base / "RG1_UNCI.dcm")
    (base / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    real = work / "real.csv"
    classify(base, real)
    with open(real, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        records = list(reader)
    images = work / "images"
    images.mkdir()
    for name in os.listdir(base):
        os.symlink(base / name, images / name)
    out = work / "replicated.csv"
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\r\n")
        writer.writerow(header)
        for i in range(rows):
            record = list(records[i % len(records)])
            copy = i // len(records)
            if copy:
                rel = f"copy{copy:05d}/{record[0]}"
                target = images / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(base / record[0], target)
                record[0] = rel
            writer.writerow(record)
    return out, images, len(records)


def distinct(work: Path, n: int) -> tuple[Path, Path] | None:
    if n <= 0 or not POOL.is_dir():
        return None
    folder = work / "pool"
    files = sorted(p for label in sorted(os.listdir(POOL)) for p in (POOL / label).iterdir())
    step = max(1, len(files) // n)
    for src in files[::step][:n]:
        target = folder / src.parent.name / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, target)
    out = work / "distinct.csv"
    classify(folder, out)
    return out, folder


def measure(report: Path, images: Path, site: Path, label: str) -> dict[str, str]:
    cmd = [*cxr_batch_command(), "report", str(report), "--images", str(images), "--html", str(site)]
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"report failed: {err.read()}")
    with open(report, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        rows = sum(1 for _ in csv.reader(fh)) - 1
    pages = len(list(site.glob("*.html")))
    thumbs = len(list((site / "thumbs").rglob("*.jpg")))
    size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    biggest = max(p.stat().st_size for p in site.glob("*.html"))
    return {
        "run": label,
        "rows": f"{rows:,}",
        "wall s": f"{wall:.2f}",
        "CPU s (user+sys)": f"{usage.ru_utime + usage.ru_stime:.2f}",
        "rows/s (wall)": f"{rows / wall:,.0f}",
        "peak RSS MB": f"{usage.ru_maxrss / 1024:.0f}",
        "pages": str(pages),
        "thumbnails": str(thumbs),
        "folder MB": f"{size / 1e6:.1f}",
        "largest page kB": f"{biggest / 1e3:.0f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--unique", type=int, default=2_000, help="distinct shared-pool images (0: skip)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="cxr-bench-html-") as tmp:
        work = Path(tmp)
        report, images, n = replicated(work, args.rows)
        results.append(measure(report, images, work / "site-r", f"replicated ({n} distinct files), cold"))
        results.append(measure(report, images, work / "site-r", "replicated, warm (thumbnails reused)"))
        pool = distinct(work, args.unique)
        if pool is not None:
            results.append(measure(pool[0], pool[1], work / "site-d", "distinct images, cold"))
            results.append(measure(pool[0], pool[1], work / "site-d", "distinct images, warm"))
    info = machine()
    cols = list(results[0])
    lines = [
        "| " + " | ".join(cols) + " |",
        "| " + " | ".join("---" if c == "run" else "---:" for c in cols) + " |",
        *("| " + " | ".join(r[c] for c in cols) + " |" for r in results),
    ]
    load = os.getloadavg()
    section = "\n".join(
        [
            MARK_BEGIN,
            "## HTML report (issue 15): `cxr-batch report --html` on 20,000 rows",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} with `python benchmarks/bench_html_report.py"
            + (f" --rows {args.rows}" if args.rows != 20_000 else "")
            + (f" --unique {args.unique}" if args.unique != 2_000 else "")
            + "`: "
            f"{info.get('cpu')} ({info.get('logical CPUs')} logical CPUs, {info.get('isa') or 'no AVX2'}), "
            f"Python {info.get('python')}, Pillow {info.get('pillow', '?')}; load average "
            f"{load[0]:.1f} at the end (a shared machine: wall times are indicative). Default options "
            "(200 cards a page, 256-pixel thumbnails, one thumbnail thread per core up to 8).",
            "",
            *lines,
            "",
            "Peak RSS is `ru_maxrss`, CPU the user+system time, of the `cxr-batch report` process alone "
            "(`os.wait4`); on a loaded machine the CPU time is the steadier number. *replicated*: real classify "
            "rows of sample_images, RG1_UNCI.dcm and a broken PNG repeated under symbolic links (one "
            "thumbnail per distinct file); *distinct*: classify output of that many different shared-pool "
            "images, one thumbnail each. *warm*: the same output folder again.",
            MARK_END,
            "",
        ]
    )
    print(section)
    if not args.no_write:
        write_results(RESULTS, section, MARK_BEGIN, MARK_END)


if __name__ == "__main__":
    main()
