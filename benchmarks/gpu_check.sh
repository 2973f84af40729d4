#!/usr/bin/env bash
# GPU check (issue 11, item 5): on a machine with a CUDA GPU, in under 5 minutes,
#   1. install the CUDA runtime the README names, in a fresh venv: pip install . then
#      pip uninstall onnxruntime && pip install "onnxruntime-gpu[cuda,cudnn]" (CUDA 12.x, cuDNN 9.x from PyPI);
#   2. cxr-batch classify --device cuda on sample_images, and check the CUDA provider really ran;
#   3. classify --device cuda on a few thousand copies (hard links) of the shared X-rays, fp16 and fp32:
#      img/s end to end, the model alone on preprocessed tensors, and the decode share.
# Usage:  bash benchmarks/gpu_check.sh [N_IMAGES]          (default 3000)
# Env:    GPU_CHECK_VENV=DIR  use this venv as it is (no install; e.g. one with onnxruntime-gpu already)
#         GPU_CHECK_DEVICE=cpu  run steps 2-3 on the CPU instead (tests this script without a GPU)
# Exit:   0 checked; 1 a check failed; 2 no CUDA GPU here (one line on stderr).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
N=${1:-3000}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
POOL=${GPU_CHECK_IMAGES:-$REPO/../shared/data/covid19-radiography}
START=$(date +%s)

if [ "$DEVICE" = cuda ]; then
  if ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi -L 2> /dev/null | grep -q '^GPU '; then
    echo "gpu_check: no CUDA GPU here (nvidia-smi missing or lists no GPU); nothing measured" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
[ -d "$POOL" ] || { echo "gpu_check: no X-ray folder at $POOL (set GPU_CHECK_IMAGES=DIR)" >&2; exit 1; }

if [ -n "${GPU_CHECK_VENV:-}" ]; then
  . "$GPU_CHECK_VENV/bin/activate"
else
  VENV=/tmp/cxr-gpu-check-venv
  rm -rf "$VENV" && python3 -m venv "$VENV" && . "$VENV/bin/activate"
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
  echo "== install: pip install . ; then onnxruntime-gpu[cuda,cudnn] in place of onnxruntime (README)"
  timeout 150 pip install -q . || { echo "gpu_check: pip install . failed" >&2; exit 1; }
  if [ "$DEVICE" = cuda ]; then
    pip uninstall -q -y onnxruntime
    timeout 150 pip install -q "onnxruntime-gpu[cuda,cudnn]" || { echo "gpu_check: installing onnxruntime-gpu failed" >&2; exit 1; }
  fi
fi
python -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"

WORK=$(mktemp -d /tmp/cxr-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export GPU_CHECK_DEVICE="$DEVICE" GPU_CHECK_N="$N" GPU_CHECK_POOL="$POOL" GPU_CHECK_WORK="$WORK" GPU_CHECK_REPO="$REPO"
# The measurement is one Python program (below); the whole run stays under 5 minutes.
rc=0
timeout $(( 290 - ($(date +%s) - START) )) python - <<'PY' || rc=$?
import os, re, subprocess, sys, time
from pathlib import Path

import numpy as np

device, n = os.environ["GPU_CHECK_DEVICE"], int(os.environ["GPU_CHECK_N"])
pool, work, repo = Path(os.environ["GPU_CHECK_POOL"]), Path(os.environ["GPU_CHECK_WORK"]), Path(os.environ["GPU_CHECK_REPO"])
want = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
failed = []


def classify(folder, precision, out):
    cmd = ["cxr-batch", "classify", str(folder), "--out", str(out), "--device", device, "--precision", precision, "--overwrite"]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    summary = " ".join(done.stderr.split())
    if done.returncode not in (0, 3):
        sys.exit(f"gpu_check: classify {folder.name} --precision {precision} failed (exit {done.returncode}): {summary[-600:]}")
    ran = re.search(r"images/s\) on (\S+)", summary)
    provider = ran.group(1) if ran else "?"
    rows = sum(1 for _ in open(out, encoding="utf-8")) - 1
    ok = provider == want
    if not ok:
        failed.append(f"{folder.name} {precision}: ran on {provider}, not {want}")
    precision_line = re.search(r"precision (\S+: .*?)(?: \d+ images flagged|$)", summary)
    return wall, rows, provider, precision_line.group(1) if precision_line else ""


# 1. sample_images, the default precision (auto: fp16 on CUDA)
wall, rows, provider, why = classify(repo / "sample_images", "auto", work / "samples.csv")
print(f"sample_images: {rows} rows in {wall:.1f} s on {provider}; precision {why}")

# 2. a few thousand hard-linked copies of the shared X-rays
files = sorted(p for p in pool.rglob("*.png"))[:n] or sys.exit(f"gpu_check: no PNGs under {pool}")
big = work / "xrays"
big.mkdir()
for i in range(n):
    src = files[i % len(files)]
    dst = big / f"{i:05d}-{src.name}"
    try:
        os.link(src, dst)
    except OSError:
        dst.write_bytes(src.read_bytes())

from cxr_batch.engine.classifier import Classifier, default_workers
from cxr_batch.io.preprocess import preprocess_file
from concurrent.futures import ThreadPoolExecutor

# decoding alone, with classify's decoder threads: the ceiling decoding sets
paths = sorted(big.iterdir())
clf = Classifier(device=device, precision="fp32")
spec = clf.meta.spec
t = time.perf_counter()
with ThreadPoolExecutor(default_workers()) as pool_:
    tensors = list(pool_.map(lambda p: preprocess_file(p, spec)[0], paths[:1024]))
decode_rate = len(tensors) / (time.perf_counter() - t)
x = np.stack(tensors)
print(f"decoding alone: {decode_rate:.0f} img/s with {default_workers()} decoder threads")
print("| precision | classify end to end img/s | model alone img/s | decode share of classify's wall time | provider |")
print("| --- | ---: | ---: | ---: | --- |")
for precision in ("fp16", "fp32"):
    model = Classifier(device=device, precision=precision)
    model.logits(x[:64])  # warm-up: CUDA kernels, cuDNN autotune
    t = time.perf_counter()
    for _ in range(2):
        model.logits(x)
    alone = 2 * len(x) / (time.perf_counter() - t)
    wall, rows, provider, _ = classify(big, precision, work / f"big-{precision}.csv")
    e2e = rows / wall
    print(f"| {precision} | {e2e:.0f} | {alone:.0f} | {min(1.0, e2e / decode_rate):.0%} | {provider} |")
    if model.provider != want:
        failed.append(f"model alone {precision}: ran on {model.provider}, not {want}")
if failed:
    sys.exit("gpu_check: " + "; ".join(failed))
print(f"gpu_check: ok ({n} images, device {device})")
PY
if [ "$rc" = 124 ]; then echo "gpu_check: ran past the 5-minute budget; nothing more measured" >&2; exit 1; fi
if [ "$rc" != 0 ]; then echo "gpu_check: the measurement failed (exit $rc; its message is above)" >&2; exit 1; fi
echo "gpu_check took $(( $(date +%s) - START )) s"
