"""Tune the classify engine: each variant's throughput as a share of the model alone, in one process.

    python benchmarks/tune_classify.py --model export/cxr-resnet18-int8.onnx
    python benchmarks/tune_classify.py --variants base spin batch=32 workers=1 processes --rounds 12

For every variant, each round classifies one chunk of real X-rays through
:func:`cxr_batch.classify.run_classify` (decoding, batching, the CSV written and fsync'ed per batch,
exactly as ``cxr-batch classify``) and runs the same variant's session alone on that chunk's
preprocessed tensors. The ratio of the two, per round, is what is compared: rounds alternate
between variants, so a slow spell on a shared machine lowers both sides of a ratio. CPU time per
image is reported too; unlike wall time it hardly moves when other processes compete for the CPU.

Variants (combine with '+', e.g. ``batch=32+workers=1``):
  base          the engine as shipped
  spin          session.intra_op.allow_spinning=1 (with streams=1: one session)
  batch=N       batch size N
  workers=N     N decoder threads
  threads=N     N onnxruntime threads in all
  streams=N     N batches in onnxruntime at once, each in its own session (threads / N each)
  processes     decode in a process pool (forkserver) instead of threads
  serial        the engine before this tuning: one session, no inference thread (each batch
                runs when the caller asks for it)
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
POOL = REPO.parent / "shared" / "data" / "covid19-radiography"


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the process-pool variant's decoders)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def parse_variant(name: str) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for part in name.split("+"):
        key, _, value = part.partition("=")
        if key == "base":
            continue
        if key in ("batch", "workers", "threads", "streams"):
            opts[key] = int(value)
        elif key in ("spin", "processes"):
            opts[key] = True
        elif key == "serial":
            opts.update(serial=True, streams=1)
        else:
            raise SystemExit(f"unknown variant {part!r} (see --help)")
    return opts


def swap(module: Any, name: str, value: Any) -> Any:
    """Replace ``module.name`` (a test-style monkeypatch); returns the old value."""
    old = getattr(module, name)
    setattr(module, name, value)
    return old


@contextmanager
def patched(opts: dict[str, Any]) -> Iterator[None]:
    """Swap the decode pool for processes, or the inference thread for the caller, for one call."""
    import cxr_batch.engine.classifier as inference

    original = vars(inference)["ThreadPoolExecutor"]

    def pools(max_workers: int, thread_name_prefix: str = "") -> Executor:
        if opts.get("processes") and thread_name_prefix == "cxr-decode":
            return ProcessPoolExecutor(max_workers, mp_context=multiprocessing.get_context("forkserver"))
        if opts.get("serial") and thread_name_prefix == "cxr-infer":
            return _Inline()
        executor: Executor = original(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        return executor

    swap(inference, "ThreadPoolExecutor", pools)
    try:
        yield
    finally:
        swap(inference, "ThreadPoolExecutor", original)


class _Inline(Executor):
    """Runs the submitted call at once, in the caller's thread: the engine without an inference thread."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def make_classifier(model: str, opts: dict[str, Any]) -> Any:
    import onnxruntime as ort

    from cxr_batch.engine.classifier import DEFAULT_BATCH_SIZE, Classifier

    clf = Classifier(
        model,
        "cpu",
        batch_size=opts.get("batch", DEFAULT_BATCH_SIZE),
        threads=opts.get("threads", 0),
        decode_workers=opts.get("workers"),
        streams=opts.get("streams", 0),
    )
    if opts.get("spin"):
        so = ort.SessionOptions()
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        so.intra_op_num_threads = opts.get("threads", 0) or 0
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        clf._loaded.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return clf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "export" / "cxr-resnet18-int8.onnx"))
    ap.add_argument("--images", metavar="DIR", help="folder of X-rays (default: 480 sampled from the shared pool)")
    ap.add_argument("--n", type=int, default=480)
    ap.add_argument("--chunk", type=int, default=96, help="images per round and variant")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["base", "streams=1", "streams=1+spin", "batch=16", "batch=64", "workers=1", "processes", "serial"],
    )
    args = ap.parse_args()

    import numpy as np
    from rich.console import Console

    import cxr_batch.classify as batch_module
    from cxr_batch.classify import ClassifyConfig, run_classify
    from cxr_batch.engine.classifier import EngineConfig
    from cxr_batch.io.inputs import InputSpec
    from cxr_batch.io.preprocess import IMAGE_SUFFIXES, preprocess_file
    from cxr_batch.report.writer import ReportConfig

    source = Path(args.images) if args.images else POOL
    found = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    files = found if len(found) <= args.n else sorted(random.Random(0).sample(found, args.n))
    work = Path(tempfile.mkdtemp(prefix="tune_classify_"))
    try:
        chunks: list[tuple[Path, list[Path]]] = []
        for j in range(0, len(files), args.chunk):
            folder = work / f"chunk{j}"
            folder.mkdir()
            part = files[j : j + args.chunk]
            for k, f in enumerate(part):
                try:
                    os.link(f, folder / f"{k:05d}{f.suffix}")
                except OSError:
                    shutil.copyfile(f, folder / f"{k:05d}{f.suffix}")
            chunks.append((folder, part))
        variants = {v: parse_variant(v) for v in args.variants}
        clfs = {v: make_classifier(args.model, o) for v, o in variants.items()}
        spec = next(iter(clfs.values())).meta.spec
        tensors = [np.stack([preprocess_file(f, spec)[0] for f in part]) for _, part in chunks]
        rows: dict[str, list[tuple[float, float, float, float]]] = {v: [] for v in variants}
        for r in range(args.rounds):
            index = r % len(chunks)
            folder, _ = chunks[index]
            x = tensors[index]
            for v, clf in clfs.items():
                size = clf.config.batch_size
                clf.logits(x[: 4 * size])  # the model alone, in the variant's batches, streams and sessions
                t, c = time.perf_counter(), cpu_seconds()
                clf.logits(x)
                alone, alone_cpu = len(x) / (time.perf_counter() - t), (cpu_seconds() - c) / len(x)

                out = work / f"out-{r}-{len(rows[v])}-{abs(hash(v))}.csv"
                config = ClassifyConfig(
                    inputs=InputSpec(paths=(str(folder),)),
                    engine=replace(EngineConfig(model=args.model), batch_size=size),
                    report=ReportConfig(out=str(out)),
                    quiet=True,
                )

                class Prebuilt:  # reuse the loaded session: model loading is not what is compared
                    @staticmethod
                    def from_config(_: Any, clf: Any = clf) -> Any:
                        return clf

                original = swap(batch_module, "Classifier", Prebuilt)
                try:
                    with patched(variants[v]):
                        t, c = time.perf_counter(), cpu_seconds()
                        stats = run_classify(config, console=Console(file=io.StringIO()))
                        wall, cpu = time.perf_counter() - t, cpu_seconds() - c
                finally:
                    swap(batch_module, "Classifier", original)
                rate = stats.total / wall
                rows[v].append((rate, alone, 1e3 * cpu / stats.total, 1e3 * alone_cpu))
                print(
                    f"round {r + 1}/{args.rounds} {v:24s} classify {rate:6.1f} img/s, alone {alone:6.1f}, ratio {rate / alone:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nmodel {args.model}, {args.rounds} rounds of {args.chunk} images, load average {os.getloadavg()[0]:.2f}\n")
    print("| variant | classify img/s | alone img/s | ratio (median, IQR) | CPU ms/img classify | CPU ms/img alone |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for v, rs in rows.items():
        ratios = [a / b for a, b, _, _ in rs]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        print(
            f"| {v} | {statistics.median(a for a, _, _, _ in rs):.1f} | {statistics.median(b for _, b, _, _ in rs):.1f} | "
            f"{statistics.median(ratios):.2f} ({q[0]:.2f}-{q[2]:.2f}) | {statistics.median(c for _, _, c, _ in rs):.2f} | "
            f"{statistics.median(d for _, _, _, d in rs):.2f} |"
        )


if __name__ == "__main__":
    main()
