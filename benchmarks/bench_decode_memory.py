"""Peak memory of decoding one hostile-but-valid file (issue 12, item 16).

Each case runs in a fresh subprocess that decodes and prepares one file exactly as ``classify``
does (:func:`cxr_batch.io.preprocess.preprocess_file`, the model's 224×224 spec) and reports its
peak resident set size (``VmHWM`` in ``/proc/self/status``; ``resource.getrusage`` elsewhere,
whose ``ru_maxrss`` on Linux carries the parent's peak over fork and exec) and the same for a
process that only imports the modules (the baseline), so the difference is what the file cost.

    python benchmarks/bench_decode_memory.py            # all cases, appends to benchmarks/RESULTS.md
    python benchmarks/bench_decode_memory.py --no-write # print only

Cases: a 16-bit 9400×9400 PNG (just under Pillow's pixel limit), an 8-bit one of the same size,
a deflated 12000×12000 DICOM (over the limit: refused before decoding), a deflated DICOM just
under the limit, and a small real chest X-ray for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
RG1_UNCI = REPO.parent / "shared" / "data" / "dicom" / "pydicom-data" / "other" / "RG1_UNCI.dcm"

#: What the child runs: decode + prepare one file, then print its peak RSS (kB) and the outcome.
CHILD = r"""
import json, resource, sys, time
from cxr_batch.errors import ImageError
from cxr_batch.io.preprocess import PreprocessSpec, preprocess_file
import cxr_batch.io.dicom  # noqa: F401  (imported by the baseline too)
import pydicom  # noqa: F401
spec = PreprocessSpec(input_size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
outcome, t = "baseline", time.perf_counter()
if len(sys.argv) > 1:
    try:
        x, d = preprocess_file(sys.argv[1], spec)
        outcome = f"ok {d.width}x{d.height}"
    except ImageError as exc:
        outcome = f"error: {exc}"
# VmHWM is this process's own peak. getrusage's ru_maxrss is the fallback off Linux, but it
# carries over the parent's peak across fork and exec (the parent may have just made a big file).
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1])
except OSError:
    pass
print(json.dumps({"maxrss_kb": peak, "seconds": time.perf_counter() - t, "outcome": outcome}))
"""


def measure(path: str | None, src: Path = REPO) -> dict[str, Any]:
    """Peak RSS (kB) of a fresh process decoding ``path`` (None: imports only) with the package in ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [sys.executable, "-c", CHILD, *([path] if path else [])]
    # cwd: "python -c" puts the working directory first on sys.path, before PYTHONPATH.
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, check=True, cwd=src)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = proc.stderr
    return result


def make_png(path: Path, side: int = 9400, bits: int = 16) -> Path:
    """A ``side``² grey PNG whose rows repeat (so it compresses to well under a megabyte)."""
    import numpy as np
    from PIL import Image

    dtype = np.uint16 if bits == 16 else np.uint8
    row = (np.arange(side, dtype=np.int64) * 7 % (2**bits)).astype(dtype)
    arr = np.broadcast_to(row, (side, side)).copy()
    Image.fromarray(arr).save(path, compress_level=6)
    return path


def make_deflated_dicom(path: Path, side: int = 12000) -> Path:
    """The real chest CR ``RG1_UNCI.dcm`` with a ``side``² 16-bit frame, deflated (PS3.5 A.5)."""
    import numpy as np
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(RG1_UNCI)
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ramp = (np.arange(side, dtype=np.uint16) % 4096).astype("<u2")
    ds.PixelData = np.broadcast_to(ramp, (side, side)).tobytes()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return " ".join(
                    f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni") if f in flags
                )
    except OSError:
        pass
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print the table, don't append it to RESULTS.md")
    parser.add_argument("--src", type=Path, default=REPO, help="the source tree to measure (default: this one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cxr-mem-") as tmp:
        root = Path(tmp)
        cases: list[tuple[str, Path]] = [
            ("PNG 16-bit 9400×9400", make_png(root / "png16.png")),
            ("PNG 8-bit 9400×9400", make_png(root / "png8.png", bits=8)),
        ]
        if RG1_UNCI.is_file():
            cases += [
                ("DICOM deflated 12000×12000 (over the pixel limit)", make_deflated_dicom(root / "big.dcm")),
                ("DICOM deflated 9400×9400", make_deflated_dicom(root / "under.dcm", side=9400)),
                ("DICOM RG1_UNCI 1841×1955 (real CR)", RG1_UNCI),
            ]
        base = measure(None, args.src)["maxrss_kb"]
        lines = [
            "",
            f"## Decode memory per file (issue 12, item 16), {time.strftime('%Y-%m-%d')}",
            "",
            f"`python benchmarks/bench_decode_memory.py`: one fresh process per file, decode + prepare to 224×224 "
            f"as classify does; peak RSS (VmHWM), minus the {base / 1024:.0f} MB of a process that "
            f"only imports the same modules. Source: {args.src.name} tree. CPU: {cpu_model()} ({os.cpu_count()} logical CPUs; flags "
            f"{cpu_flags()}), Python {platform.python_version()}.",
            "",
            "| file | size on disk | peak RSS | above baseline | time | outcome |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for name, path in cases:
            r = measure(str(path), args.src)
            if "Warning" in r["stderr"]:
                print(f"warning on stderr for {name}: {r['stderr']}", file=sys.stderr)
            outcome = r["outcome"] if len(r["outcome"]) < 90 else r["outcome"][:87] + "..."
            lines.append(
                f"| {name} | {path.stat().st_size / 1024:.0f} KB | {r['maxrss_kb'] / 1024:.0f} MB | "
                f"{(r['maxrss_kb'] - base) / 1024:.0f} MB | {r['seconds']:.2f} s | {outcome} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        with RESULTS.open("a", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
