"""cxr-batch classify against the notebook's PyTorch pipeline, side by side, in one run.

    python benchmarks/bench_classify.py                      # 500 images from ../shared/data
    python benchmarks/bench_classify.py --images DIR --n 1000 --repeat 3

Every pipeline runs in its own subprocess over the same folder of real X-rays, so each has its
own peak RSS and none warms another's caches or thread pools:

  (a)  the notebook: PIL + torchvision transforms (``convert("RGB")`` as ImageFolder does,
       Resize to the model's size, ToTensor, Normalize) + DataLoader (batch 32, 0 and 2 workers)
       + PyTorch eager fp32, with the weights of ``--checkpoint``;
  (b)  ``cxr-batch classify DIR --out results.csv --model FP32``, end to end through the CLI;
  (c)  the same with the int8 model;
  (d)  the model alone in onnxruntime on preprocessed tensors in memory, fp32 and int8, run
       by ``Classifier.logits`` in the sessions, streams and batch size classify uses: the
       ceiling for (b) and (c). Each (d) runs right after the classify run it bounds.

Rates. *end to end* is images / wall time of the whole process (imports, model load, first
batch included). *steady* removes those fixed costs the same way for (a), (b) and (c): each
pipeline also runs on the first ``--warm`` images alone, and steady = (N - warm) / (T_N - T_warm).
(d) is timed after a warm-up. Ratios are given on steady rates, and for (b)/(a) and (c)/(a) on
end-to-end rates too (start-up included: torch's import and first batch weigh on (a)). Ratios
measured in one run are what counts; absolute numbers move with whatever else the machine does. ``--repeat 3`` runs the whole
round three times and keeps medians.

Agreement: the share of images whose top-1 label from (b) and (c) equals the notebook's.

The results, the machine and the command go to benchmarks/RESULTS.md, between the
``<!-- bench_classify -->`` markers (the rest of the file is left as it is).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxr_batch.engine.cpu import cpu_summary  # noqa: E402  (standard library only)

POOL = REPO.parent / "shared" / "data" / "covid19-radiography"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MARK_BEGIN = "<!-- bench_classify -->"
MARK_END = "<!-- /bench_classify -->"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NOTEBOOK_BATCH = 32


# --------------------------------------------------------------------------- the folder


def sample_files(root: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` image files under ``root`` (all when fewer), drawn with a fixed seed; sorted by path."""
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise SystemExit(f"no images under {root}")
    picked = found if len(found) <= n else random.Random(seed).sample(found, n)
    return sorted(picked, key=lambda p: p.relative_to(root).as_posix())


def link_tree(files: Sequence[Path], root: Path, dest: Path) -> list[str]:
    """Hard-link (else copy) ``files`` into ``dest`` keeping their paths under ``root``; returns those paths."""
    rels: list[str] = []
    for f in files:
        rel = f.relative_to(root)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copyfile(f, target)
        rels.append(rel.as_posix())
    return rels


# --------------------------------------------------------------------------- subprocess runs


@dataclass
class Run:
    """One measured subprocess."""

    wall_s: float
    max_rss_mb: float  # ru_maxrss of the process (the largest one, when it has children)
    tree_rss_mb: float  # the summed RSS of the process and its children, sampled every 50 ms
    returncode: int
    stderr: str


def _tree_rss_kb(pid: int) -> int:
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except (OSError, ValueError):
            continue
    return total


def run_measured(cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 3600) -> Run:
    """Run ``cmd``; wall time from spawn to exit and the peak RSS of that process alone."""
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=err, env=env)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            if sys.platform != "linux":
                return
            while not done.wait(0.05):
                peak[0] = max(peak[0], _tree_rss_kb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            done.set()
        wall = time.perf_counter() - t0
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read()
    # ru_maxrss is in KiB on Linux, bytes on macOS
    rss = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    return Run(wall, rss, max(peak[0] / 1024, rss), proc.returncode, text)


def cxr_batch_command() -> list[str]:
    script = Path(sys.executable).with_name("cxr-batch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cxr_batch.cli"]


# --------------------------------------------------------------------------- workers (subprocesses)


def worker_notebook(args: argparse.Namespace) -> None:
    """(a): what a notebook does. Writes {path: top-1 index} as JSON."""
    import torch
    import torchvision
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    cfg = ck["config"]
    size = int(cfg["image_size"])
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, len(ck["labels"]))
    model.load_state_dict(ck["model"])
    model.eval().to(device)
    tf = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize(list(cfg["mean"]), list(cfg["std"])),
        ]
    )
    root = Path(args.root)
    rels = Path(args.list).read_text(encoding="utf-8").splitlines()

    class Files(Dataset[Any]):
        def __len__(self) -> int:
            return len(rels)

        def __getitem__(self, i: int) -> Any:
            with Image.open(root / rels[i]) as img:
                return tf(img.convert("RGB"))  # torchvision's ImageFolder loader does convert("RGB")

    loader = DataLoader(Files(), batch_size=NOTEBOOK_BATCH, shuffle=False, num_workers=args.workers)
    preds: list[int] = []
    with torch.no_grad():
        for x in loader:
            preds.extend(model(x.to(device)).argmax(1).tolist())
    labels = list(ck["labels"])
    out = {"pred": {rel: labels[p] for rel, p in zip(rels, preds, strict=True)}, "threads": torch.get_num_threads()}
    Path(args.result).write_text(json.dumps(out), encoding="utf-8")


def worker_ort(args: argparse.Namespace) -> None:
    """(d): the model alone on preprocessed tensors, in the batches, streams and sessions classify uses."""
    import numpy as np

    from cxr_batch.engine.classifier import Classifier, create_session
    from cxr_batch.io.preprocess import preprocess_file

    clf = Classifier(args.model, args.device, batch_size=args.batch_size, threads=args.threads)
    meta = clf.meta
    root = Path(args.root)
    rels = Path(args.list).read_text(encoding="utf-8").splitlines()
    # One thread's preprocessing cost, measured apart: holding all the tensors (below) would add
    # the page faults of a fresh 300 MB to it.
    sample = rels[: min(len(rels), 100)]
    for rel in sample[:10]:
        preprocess_file(root / rel, meta.spec)
    t = time.thread_time()
    for rel in sample:
        preprocess_file(root / rel, meta.spec)
    preprocess_ms = 1e3 * (time.thread_time() - t) / len(sample)
    x = np.stack([preprocess_file(root / rel, meta.spec)[0] for rel in rels])
    clf.logits(x[: args.batch_size * 4])  # warm-up: every stream's session, arenas, thread pools
    t0 = time.perf_counter()
    top = clf.logits(x).argmax(1).tolist()
    rate = len(x) / (time.perf_counter() - t0)
    # For reference: one session with all the threads, batches one after the other.
    session, _ = create_session(args.model, args.device, args.threads)
    b = args.batch_size
    session.run(None, {meta.input_name: x[:b]})
    t0 = time.perf_counter()
    for i in range(0, len(x), b):
        session.run([meta.outputs["logits"]], {meta.input_name: x[i : i + b]})
    out = {
        "rate": rate,
        "rate_one_session": len(x) / (time.perf_counter() - t0),
        "streams": clf._streams,
        "preprocess_ms_per_image_cpu": preprocess_ms,
        "provider": clf.provider,
        "pred": {rel: meta.labels[p] for rel, p in zip(rels, top, strict=True)},
    }
    Path(args.result).write_text(json.dumps(out), encoding="utf-8")


# --------------------------------------------------------------------------- the benchmark


@dataclass
class Pipeline:
    key: str
    title: str
    full: list[Run] = field(default_factory=list)
    warm: list[Run] = field(default_factory=list)
    pred: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wall(self) -> float:
        return statistics.median(r.wall_s for r in self.full)

    @property
    def warm_wall(self) -> float:
        return statistics.median(r.wall_s for r in self.warm) if self.warm else 0.0

    def rate_e2e(self, n: int) -> float:
        return n / self.wall

    def rate_steady(self, n: int, n_warm: int) -> float:
        if "rate" in self.extra:
            return float(self.extra["rate"])
        if not self.warm:
            return self.rate_e2e(n)
        rates = [(n - n_warm) / max(f.wall_s - self.warm_wall, 1e-9) for f in self.full]
        return statistics.median(rates)

    @property
    def rss(self) -> float:
        return max(r.max_rss_mb for r in self.full)

    @property
    def tree_rss(self) -> float:
        return max(r.tree_rss_mb for r in self.full)


def _check(run: Run, what: str, ok: Sequence[int] = (0,)) -> Run:
    if run.returncode not in ok:
        raise SystemExit(f"{what} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return run


def read_csv_preds(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return {row["path"]: row["label"] for row in csv.DictReader(fh) if row["status"] == "ok"}


def agreement(a: dict[str, str], b: dict[str, str]) -> float:
    if not a:
        return float("nan")
    return sum(1 for k, v in a.items() if b.get(k) == v) / len(a)


def machine() -> dict[str, str]:
    """CPU model, cores and the library versions."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, str] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    info["cpu"] = fields.get("Model name", platform.processor() or "unknown")
    cores = fields.get("Core(s) per socket")
    sockets = fields.get("Socket(s)", "1")
    if cores:
        info["physical cores"] = str(int(cores) * int(sockets))
    info["logical CPUs"] = str(os.cpu_count())
    flags = fields.get("Flags", "").split()
    info["isa"] = " ".join(
        f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags
    )
    facts = cpu_summary()
    info["flags (cxr-batch)"] = " ".join(facts["flags"]) or "none relevant"  # type: ignore[arg-type]
    info["--precision auto"] = str(facts["auto_cpu_precision"])
    for pkg in ("cxr-batch", "onnxruntime", "onnxruntime-gpu", "numpy", "pillow", "torch", "torchvision"):
        with contextlib.suppress(PackageNotFoundError):
            info[pkg] = version(pkg)
    return info


def fmt_rate(x: float) -> str:
    return f"{x:.1f}"


def report(
    pipes: dict[str, Pipeline], n: int, n_warm: int, info: dict[str, str], command: str, notes: list[str], tag: str = ""
) -> str:
    notebook = "a0" in pipes
    a = pipes["a0"].rate_steady(n, n_warm) if notebook else float("nan")
    begin, end = markers(tag)
    facts = cpu_summary()
    lines = [
        begin,
        "## bench_classify: classify against the notebook's pipeline"
        + (f" ({tag})" if tag else "")
        + ("" if notebook else "; notebook pipeline not run (no checkpoint here)"),
        "",
        f"CPU: {facts['model']} ({facts['arch']}), flags {', '.join(facts['flags']) or 'none relevant'} "  # type: ignore[arg-type]
        f"(from {facts['source']}); `--precision auto` takes {facts['auto_cpu_precision']} here: {facts['why']}.",
        "",
        f"Run {dt.datetime.now().astimezone().replace(microsecond=0).isoformat()}, {n} images, one run "
        f"(median of {len(pipes['b'].full)} repeat(s)). Steady rates exclude start-up (see the script's docstring).",
        "",
        "```",
        command,
        "```",
        "",
        "| pipeline | steady img/s | end-to-end img/s | start-up + 1st batch (s) | peak RSS (MB) | top-1 agreement with (a) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, p in pipes.items():
        agree = "" if key == "a0" or not notebook else f"{100 * agreement(pipes['a0'].pred, p.pred):.1f}%"
        is_d = key.startswith("d")
        lines.append(
            f"| {p.title} | {fmt_rate(p.rate_steady(n, n_warm))} | {'' if is_d else fmt_rate(p.rate_e2e(n))} | "
            f"{'' if is_d else f'{p.warm_wall:.2f}'} | "
            f"{p.rss:.0f}{f' (tree {p.tree_rss:.0f})' if p.tree_rss > p.rss * 1.05 else ''} | {agree} |"
        )
    d32 = pipes["d32"].rate_steady(n, n_warm)
    d8 = pipes["d8"].rate_steady(n, n_warm)
    b = pipes["b"].rate_steady(n, n_warm)
    c = pipes["c"].rate_steady(n, n_warm)
    e2e = {k: pipes[k].rate_e2e(n) for k in ("a0", "b", "c") if k in pipes}
    ratios: list[tuple[str, float, float | None, str]] = []  # (name, steady, end to end, target)
    if notebook:
        ratios += [
            ("(b)/(a) fp32 classify vs notebook", b / a, e2e["b"] / e2e["a0"], "≥ 1.6"),
            ("(c)/(a) int8 classify vs notebook", c / a, e2e["c"] / e2e["a0"], "≥ 4"),
        ]
    ratios += [
        ("(b)/(d) fp32 classify vs model alone", b / d32, None, "≥ 0.9"),
        ("(c)/(d) int8 classify vs model alone", c / d8, None, "≥ 0.8 (where int8 is chosen)"),
    ]
    if notebook:
        ratios.append(
            ("(a, 2 workers)/(a)", pipes["a2"].rate_steady(n, n_warm) / a, pipes["a2"].rate_e2e(n) / e2e["a0"], "")
        )
    ratios.append(("(d) int8 / fp32", d8 / d32, None, "≥ 3 on VNNI"))
    lines += ["", f"| ratio | steady | end to end ({n} images) | target |", "| --- | ---: | ---: | ---: |"]
    lines += [
        f"| {name} | {steady:.2f} | {'' if whole is None else f'{whole:.2f}'} | {target} |"
        for name, steady, whole, target in ratios
    ]
    lines += [
        "",
        f"- int8 vs fp32 top-1 agreement, model alone on the same tensors: "
        f"{100 * agreement(pipes['d32'].pred, pipes['d8'].pred):.2f}%; "
        f"(b) vs (d) fp32: {100 * agreement(pipes['d32'].pred, pipes['b'].pred):.2f}%.",
        f"- Preprocessing (cxr_batch.io.preprocess.preprocess_file), one thread: "
        f"{pipes['d32'].extra.get('preprocess_ms_per_image_cpu', float('nan')):.2f} ms CPU per image.",
        f"- Threads: torch {pipes['a0'].extra.get('threads') if notebook else '-'}; onnxruntime as classify sets it: "
        f"{pipes['d32'].extra.get('streams')} stream(s) (provider {pipes['d32'].extra.get('provider')}). "
        f"(d) with one session of all threads instead: fp32 {pipes['d32'].extra.get('rate_one_session', float('nan')):.1f}, "
        f"int8 {pipes['d8'].extra.get('rate_one_session', float('nan')):.1f} img/s.",
        "- Peak RSS is the process's own `ru_maxrss`; (tree …) adds its children (DataLoader workers), sampled. "
        "(d) holds all preprocessed tensors in memory, so its RSS is not comparable.",
        *[f"- {note}" for note in notes],
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()) + ".",
        end,
    ]
    return "\n".join(lines) + "\n"


def markers(tag: str) -> tuple[str, str]:
    """The section's markers in RESULTS.md: one section per ``--tag`` (one per kind of CPU)."""
    if not tag:
        return MARK_BEGIN, MARK_END
    return f"<!-- bench_classify {tag} -->", f"<!-- /bench_classify {tag} -->"


def write_results(path: Path, section: str, mark_begin: str = MARK_BEGIN, mark_end: str = MARK_END) -> None:
    """Replace the text between the markers, or append the section; the rest stays as it is.

    ``section`` starts with ``mark_begin`` and ends with ``mark_end``.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    begin, end = text.find(mark_begin), text.find(mark_end)
    if begin != -1 and end > begin:
        rest = text[end + len(mark_end) :].lstrip("\n")
        text = text[:begin] + section + ("\n" + rest if rest else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def run_benchmark(args: argparse.Namespace) -> None:
    with_notebook = not args.no_notebook
    checked = [(args.model, "--model"), (args.int8_model, "--int8-model")] + (
        [(args.checkpoint, "--checkpoint")] if with_notebook else []
    )
    for needed, flag in checked:
        if not Path(needed).is_file():
            raise SystemExit(f"{flag} {needed}: no such file (export the model first, or pass the path)")
    source = Path(args.images) if args.images else POOL
    if not source.is_dir():
        raise SystemExit(f"{source}: no such folder; pass --images DIR")
    files = sample_files(source, args.n, args.seed)
    n = len(files)
    n_warm = min(args.warm, n // 2)
    load_before = os.getloadavg()
    notes: list[str] = []
    if n < 8 * n_warm:
        notes.append(
            f"only {n} images for a {n_warm}-image start-up run: the steady rates are rough; use --n 500 or more"
        )
    if load_before[0] > 0.5:
        notes.append(
            f"load average {load_before[0]:.2f} when the run started: something else was using the CPU, "
            "so these numbers are distorted"
        )
        print(f"warning: load average {load_before[0]:.2f}; the machine is not idle", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="bench_classify_"))
    try:
        rels = link_tree(files, source, work / "images")
        link_tree(files[:n_warm], source, work / "warm")
        (work / "all.txt").write_text("\n".join(rels) + "\n", encoding="utf-8")
        (work / "warm.txt").write_text("\n".join(rels[:n_warm]) + "\n", encoding="utf-8")
        py = [sys.executable, str(Path(__file__).resolve())]
        common = ["--threads", str(args.threads), "--device", args.device]
        bs = args.batch_size
        cli_extra = [
            *(["--batch-size", str(bs)] if bs else []),
            *(["--threads", str(args.threads)] if args.threads else []),
        ]
        from cxr_batch.engine.classifier import DEFAULT_BATCH_SIZE

        pipes = {
            "a0": Pipeline("a0", "(a) notebook: PIL + torchvision + DataLoader(0 workers) + PyTorch fp32"),
            "a2": Pipeline("a2", "(a) notebook, DataLoader(2 workers)"),
            "b": Pipeline("b", "(b) cxr-batch classify, fp32"),
            "c": Pipeline("c", "(c) cxr-batch classify, int8"),
            "d32": Pipeline("d32", "(d) onnxruntime alone, fp32"),
            "d8": Pipeline("d8", "(d) onnxruntime alone, int8"),
        }

        def notebook(p: Pipeline, workers: int, which: str, rep: int) -> Run:
            out = work / f"{p.key}-{which}-{rep}.json"
            cmd = [*py, "--worker", "notebook", "--root", str(work / "images"), "--list", str(work / f"{which}.txt")]
            cmd += ["--checkpoint", args.checkpoint, "--workers", str(workers), "--result", str(out), *common]
            run = _check(run_measured(cmd), p.title)
            if which == "all":
                res = json.loads(out.read_text(encoding="utf-8"))
                p.pred, p.extra["threads"] = res["pred"], res["threads"]
            return run

        def classify(p: Pipeline, model: str, which: str, rep: int) -> Run:
            out = work / f"{p.key}-{which}-{rep}.csv"
            cmd = [*cxr_batch_command(), "classify", str(work / ("images" if which == "all" else "warm"))]
            cmd += ["--out", str(out), "--model", model, "--device", args.device, *cli_extra]
            run = _check(run_measured(cmd), p.title, ok=(0, 3))
            if which == "all":
                p.pred = read_csv_preds(out)
                if len(p.pred) != n:
                    notes.append(f"{p.title}: {n - len(p.pred)} file(s) were error rows")
            return run

        def alone(p: Pipeline, model: str, rep: int) -> None:
            out = work / f"{p.key}-{rep}.json"
            cmd = [*py, "--worker", "ort", "--root", str(work / "images"), "--list", str(work / "all.txt")]
            cmd += ["--model", model, "--batch-size", str(bs or DEFAULT_BATCH_SIZE), "--result", str(out), *common]
            p.full.append(_check(run_measured(cmd), p.title))
            res = json.loads(out.read_text(encoding="utf-8"))
            p.pred = res.pop("pred")
            for key in ("rate", "rate_one_session"):
                p.extra.setdefault(f"{key}_runs", []).append(res.pop(key))
                p.extra[key] = statistics.median(p.extra[f"{key}_runs"])
            p.extra.update(res)

        # Round robin, so a slow spell hits every pipeline; each pipeline's runs are back to back,
        # and (d) runs right after the classify run it is the ceiling of.
        if not with_notebook:
            del pipes["a0"], pipes["a2"]
        for rep in range(args.repeat):
            for key in [k for k in ("a0", "a2", "b", "d32", "c", "d8") if k in pipes]:
                p = pipes[key]
                print(f"[{rep + 1}/{args.repeat}] {p.title}", file=sys.stderr, flush=True)
                if key.startswith("d"):
                    alone(p, args.model if key == "d32" else args.int8_model, rep)
                    continue
                for which in ("warm", "all"):
                    if key in ("a0", "a2"):
                        run = notebook(p, 0 if key == "a0" else 2, which, rep)
                    else:
                        run = classify(p, args.model if key == "b" else args.int8_model, which, rep)
                    (p.warm if which == "warm" else p.full).append(run)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    load_after = os.getloadavg()
    notes.append(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}")
    info = machine()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]])
    section = report(pipes, n, n_warm, info, command, notes, args.tag)
    print(section)
    if not args.no_write:
        write_results(Path(args.results), section, *markers(args.tag))
        print(f"wrote {args.results}", file=sys.stderr)


def rel(path: Path) -> str:
    """``path`` relative to the working directory when it is under it (shorter in RESULTS.md)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", metavar="DIR", help="folder of X-rays (default: the shared pool, sampled)")
    ap.add_argument("--n", type=int, default=500, help="images to sample (default 500; all when the folder has fewer)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--model", default=rel(REPO / "export/cxr-resnet18.onnx"), help="fp32 ONNX model")
    ap.add_argument("--int8-model", default=rel(REPO / "export/cxr-resnet18-int8.onnx"), help="int8 ONNX model")
    ap.add_argument(
        "--checkpoint", default=rel(REPO / "runs/default-r18-224/best.ckpt"), help="the same weights, for (a)"
    )
    ap.add_argument("--batch-size", type=int, default=0, help="classify's --batch-size (default: classify's own)")
    ap.add_argument("--threads", type=int, default=0, help="threads for torch and onnxruntime (0: their default)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--warm", type=int, default=32, help="images of the start-up run (default 32)")
    ap.add_argument("--repeat", type=int, default=1, help="run every pipeline this many times; medians are kept")
    ap.add_argument("--results", default=str(RESULTS), help="the Markdown file to update")
    ap.add_argument("--tag", default="", help="write a section of its own, e.g. 'avx2' (default: the main section)")
    ap.add_argument("--no-notebook", action="store_true", help="skip (a), the PyTorch pipeline (needs --checkpoint)")
    ap.add_argument("--no-write", action="store_true", help="print the results only")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    # the subprocesses
    ap.add_argument("--worker", choices=("notebook", "ort"), help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--list", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "notebook":
        worker_notebook(args)
    elif args.worker == "ort":
        worker_ort(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
