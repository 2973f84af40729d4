"""``classify --engine ray`` against the local engine on this machine: throughput and Ray's fixed cost.

    nice -n 15 python benchmarks/ray_engine.py                 # tiny and ResNet-18, real X-rays
    nice -n 15 python benchmarks/ray_engine.py --models tiny --n 3000 --repeat 3

Every run is the CLI in its own process (``cxr-batch classify DIR --model M --out X -q``,
``--engine ray`` for Ray: a local Ray started and shut down by the run), on hard links to real
X-rays from ../shared/data. Two folder sizes per model, ``--warm`` and ``--n`` images (the
automatic actor count, one per CPU, and the task size, 256 files, are the CLI's defaults):

- *end to end* = n / wall time of the whole process (imports, Ray start, model load included);
- *steady* = (n - warm) / (T_n - T_warm): the rate once everything is started;
- *fixed cost* = T_warm - warm / steady: the seconds a run costs before its first image
  (the intercept); Ray's start-up cost is the difference between the two engines' intercepts.

``ray start-up alone`` times ``import ray; ray.init(); ray.shutdown()`` in a fresh process.

Models: ``tiny`` (Conv 3→4 + pool + linear at 32×32: decoding dominates) and ``resnet18``
(torchvision ResNet-18, random weights, exported to ONNX at 224×224: the model dominates).
Local and Ray runs alternate, so a load change on the machine hits both; the medians of
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


def run(folder: Path, model: Path, engine: str, out: Path) -> float:
    cmd = [sys.executable, "-m", "cxr_batch.cli", "classify", str(folder), "--model", str(model),
           "--out", str(out), "--overwrite", "-q", "--engine", engine]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    return wall


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
    ap.add_argument("--n", type=int, default=1500, help="images in the big folder, tiny model")
    ap.add_argument("--n-resnet", type=int, default=600, help="images in the big folder, resnet18")
    # 300: more than one Ray task (256 files), so both folders run on the same number of actors
    ap.add_argument("--warm", type=int, default=300, help="images in the small folder")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cxr-bench-ray-") as tmp:
        root = Path(tmp)
        print(f"ray start-up alone (import, init, shutdown): {statistics.median(ray_startup() for _ in range(args.repeat)):.1f} s")
        print(f"os.cpu_count() = {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
        print("\n| model | engine | images | end to end img/s | steady img/s | fixed cost s |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for name in args.models:
            model = tiny_model(root / "tiny.onnx") if name == "tiny" else resnet18_model(root / "r18.onnx")
            n = args.n if name == "tiny" else args.n_resnet
            big = link_images(n, root / f"{name}-big")
            small = link_images(args.warm, root / f"{name}-small")
            times: dict[str, dict[str, list[float]]] = {e: {"small": [], "big": []} for e in ("local", "ray")}
            for i in range(args.repeat):
                for engine in ("local", "ray") if i % 2 == 0 else ("ray", "local"):
                    times[engine]["small"].append(run(small, model, engine, root / "s.csv"))
                    times[engine]["big"].append(run(big, model, engine, root / "b.csv"))
            for engine in ("local", "ray"):
                t_small = statistics.median(times[engine]["small"])
                t_big = statistics.median(times[engine]["big"])
                steady = (n - args.warm) / (t_big - t_small)
                fixed = t_small - args.warm / steady
                print(f"| {name} | {engine} | {n} | {n / t_big:.1f} | {steady:.1f} | {fixed:.1f} |")
        print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
