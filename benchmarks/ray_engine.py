"""``classify --engine ray`` against the local engine on this machine: throughput and Ray's fixed cost.

    nice -n 15 python benchmarks/ray_engine.py                 # tiny and ResNet-18, real X-rays
    nice -n 15 python benchmarks/ray_engine.py --models tiny --n 3000 --repeat 5

Every run is the CLI in its own process (``cxr-batch classify DIR --model M --out X -q``) on
hard links to real X-rays from ../shared/data, four ways (``VARIANTS``): the local engine with
its default threads; with ``--threads 1``; as two ``--shard K/2 --threads 1`` processes at once,
then ``merge``; and ``--engine ray`` (a local Ray started and shut down by the run, with the CLI's
default actor count, one per CPU, and task size, 256 files). Each model runs on a folder of one
image and on one of ``--n`` images:

- *fixed cost* = the wall time of the one-image run: interpreter, imports, model load and, for
  Ray, starting Ray, its actors (one model load each) and shutting it down;
- *end to end* = n / wall time of the n-image run;
- *steady* = (n - 1) / (T_n - T_1): the rate once everything is started.

``ray start-up alone`` times ``import ray; ray.init(); ray.shutdown()`` in a fresh process.

Models: ``tiny`` (Conv 3→4 + pool + linear at 32×32: decoding dominates) and ``resnet18``
(torchvision ResNet-18, random weights, exported to ONNX at 224×224: the model dominates).
The variants alternate (reversed every other round), so a load change on the machine hits both; the medians of
``--repeat`` rounds are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POOL = REPO.parent / "shared" / "data" / "covid19-radiography"
CONTRACT = {
    "version": "1",
    "created": "2024-01-01T00:00:00Z",
    "labels": ["normal", "viral", "covid"],
    "preprocessing": {"grey": "bt601_luma", "resize": "bilinear", "channels": 3},
    "input_name": "input",
    "outputs": {"logits": "logits"},
    "metrics": {},
    "training_data": {},
    "precision": "fp32",
}


def _with_contract(model: object, path: Path, name: str, size: int, mean: list[float], std: list[float]) -> Path:
    import onnx

    entry = model.metadata_props.add()  # type: ignore[attr-defined]
    entry.key = "cxr_batch"
    entry.value = json.dumps({**CONTRACT, "name": name, "input_size": [size, size], "mean": mean, "std": std})
    onnx.save(model, str(path))  # type: ignore[arg-type]
    return path


def tiny_model(path: Path) -> Path:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 1, (3, 4)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["e"], axis=1),
        helper.make_node("Gemm", ["e", "fc", "b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _with_contract(model, path, "bench-tiny", 32, [0.5] * 3, [0.25] * 3)


def resnet18_model(path: Path) -> Path:
    import onnx
    import torch
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    raw = path.with_suffix(".raw.onnx")
    torch.onnx.export(  # the TorchScript exporter: no onnxscript needed
        model,
        (torch.randn(1, 3, 224, 224),),
        str(raw),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    proto = onnx.load(str(raw))
    raw.unlink()
    return _with_contract(proto, path, "bench-resnet18", 224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def link_images(n: int, dest: Path) -> Path:
    pool = sorted(p for p in POOL.rglob("*.png"))
    files = pool[:: max(1, len(pool) // n)][:n]  # spread over the three classes
    if len(files) < n:
        raise SystemExit(f"only {len(files)} images under {POOL}")
    for f in files:
        target = dest / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            target.write_bytes(f.read_bytes())
    return dest


#: What runs the folder: the local engine (default threads, or one onnxruntime thread), the
#: local engine as two shards in parallel processes (one thread each) then merge, or Ray.
VARIANTS = {
    "local": ["--engine", "local"],
    "local --threads 1": ["--engine", "local", "--threads", "1"],
    "2 shards in parallel, --threads 1, + merge": ["--threads", "1"],
    "ray": ["--engine", "ray"],
}


def run(folder: Path, model: Path, variant: str, out: Path) -> float:
    base = [
        sys.executable,
        "-m",
        "cxr_batch.cli",
        "classify",
        str(folder),
        "--model",
        str(model),
        "--overwrite",
        "-q",
    ]
    extra = VARIANTS[variant]
    if variant.startswith("2 shards"):
        parts = [out.with_name(f"{out.stem}-{k}.csv") for k in range(2)]
        cmds = [[*base, *extra, "--shard", f"{k}/2", "--out", str(part)] for k, part in enumerate(parts)]
        merge = [
            sys.executable,
            "-m",
            "cxr_batch.cli",
            "merge",
            *map(str, parts),
            "--out",
            str(out),
            "--overwrite",
            "-q",
        ]
    else:
        cmds, merge = [[*base, *extra, "--out", str(out)]], None
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in cmds]
    for cmd, proc in zip(cmds, procs, strict=True):
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    if merge is not None:
        subprocess.run(merge, check=True, capture_output=True)
    return time.perf_counter() - t0


def ray_startup() -> float:
    code = (
        "import time, logging; t=time.perf_counter(); import ray; "
        "ray.init(address='local', include_dashboard=False, logging_level=logging.ERROR); ray.shutdown(); "
        "print(time.perf_counter()-t)"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "resnet18"], choices=["tiny", "resnet18"])
    ap.add_argument("--n", type=int, default=5000, help="images in the big folder, tiny model")
    ap.add_argument("--n-resnet", type=int, default=600, help="images in the big folder, resnet18")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cxr-bench-ray-") as tmp:
        root = Path(tmp)
        startup = statistics.median(ray_startup() for _ in range(args.repeat))
        print(f"ray start-up alone (import, init, shutdown): {startup:.1f} s")
        print(f"os.cpu_count() = {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
        print("\n| model | run | images | fixed cost s | end to end img/s | steady img/s |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for name in args.models:
            model = tiny_model(root / "tiny.onnx") if name == "tiny" else resnet18_model(root / "r18.onnx")
            n = args.n if name == "tiny" else args.n_resnet
            big = link_images(n, root / f"{name}-big")
            one = link_images(1, root / f"{name}-one")
            times: dict[str, dict[str, list[float]]] = {e: {"one": [], "big": []} for e in VARIANTS}
            for i in range(args.repeat):
                for engine in list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS)):
                    times[engine]["one"].append(run(one, model, engine, root / "s.csv"))
                    times[engine]["big"].append(run(big, model, engine, root / "b.csv"))
            for engine in VARIANTS:
                t_one = statistics.median(times[engine]["one"])
                t_big = statistics.median(times[engine]["big"])
                steady = (n - 1) / (t_big - t_one)
                print(f"| {name} | {engine} | {n} | {t_one:.1f} | {n / t_big:.1f} | {steady:.1f} |", flush=True)
            raw = {e: {k: [round(t, 2) for t in v] for k, v in d.items()} for e, d in times.items()}
            print(f"<!-- {name} wall times s: {json.dumps(raw)} -->", flush=True)
        print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
