"""Shared fixtures: tiny ONNX models built with onnx.helper (no torch), real X-ray folders, images."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
#: ../shared/data next to the repository; absent on a fresh clone, where its tests skip.
SHARED = REPO.parent / "shared" / "data"
SAMPLE_IMAGES = REPO / "sample_images"
LABELS = ("normal", "viral", "covid")
SIZE = (32, 32)


def contract(**changes: Any) -> dict[str, Any]:
    """A valid contract for the tiny models; ``changes`` override keys (None deletes one)."""
    doc: dict[str, Any] = {
        "name": "tiny",
        "version": "1",
        "created": "2024-01-01T00:00:00Z",
        "labels": list(LABELS),
        "input_size": list(SIZE),
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "preprocessing": {"grey": "bt601_luma", "resize": "bilinear", "channels": 3},
        "input_name": "input",
        "outputs": {"logits": "logits", "embedding": "embedding"},
        "metrics": {},
        "training_data": {},
        "precision": "fp32",
    }
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def build_model(
    path: Path,
    *,
    meta: dict[str, Any] | str | None = None,
    n_classes: int = len(LABELS),
    input_rank: int = 4,
    size: tuple[int, int] = SIZE,
    seed: int = 0,
    slow_layers: int = 0,
    fixed_batch: int | None = None,
    ood: bool = False,
) -> Path:
    """Conv(3→4, 3×3, stride 2) → ReLU → global average pool → ``embedding`` (N×4) → Gemm → ``logits``.

    ``meta``: the contract (a dict is dumped as JSON, a str is stored as-is, None stores none).
    ``slow_layers`` adds that many 1024×1024 MatMul+Tanh layers on the input whose result is
    multiplied by 0 and added to the logits: same outputs, more time per image.
    ``ood`` adds an ``ood_score`` output (N,): the sum of the embedding.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    batch: int | str = fixed_batch if fixed_batch is not None else "batch"
    if input_rank == 4:
        in_shape: list[int | str] = [batch, 3, *size]
    else:
        in_shape = [batch, 3, size[0] * size[1]]
    inits = [
        numpy_helper.from_array(rng.normal(0, 1.0, (4, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.normal(0, 0.7, (n_classes, 4)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.5, (n_classes,)).astype(np.float32), "fc_b"),
    ]
    if input_rank == 4:
        nodes = [
            helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["conv"], strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["relu"]),
            helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
            helper.make_node("Flatten", ["pool"], ["embedding"], axis=1),
        ]
    else:  # a rank-3 input: reduce the pixels, project the 3 channels to 4 features
        inits.append(numpy_helper.from_array(rng.normal(0, 1, (3, 4)).astype(np.float32), "proj"))
        nodes = [
            helper.make_node("ReduceMean", ["input"], ["mean"], axes=[2], keepdims=0),
            helper.make_node("MatMul", ["mean", "proj"], ["embedding"]),
        ]
    nodes.append(helper.make_node("Gemm", ["embedding", "fc_w", "fc_b"], ["logits0"], transB=1))
    if slow_layers and input_rank == 4:
        h, w = size
        inits += [
            numpy_helper.from_array(np.array([-1, 1024], np.int64), "slow_shape"),
            numpy_helper.from_array((rng.normal(0, 1, (1024, 1024)) / 32).astype(np.float32), "slow_w"),
            numpy_helper.from_array(np.array([0.0], np.float32), "zero"),
            numpy_helper.from_array(np.array([-1, 1], np.int64), "col"),
            numpy_helper.from_array(np.array([-1, 3 * h * w], np.int64), "flat"),
        ]
        nodes.append(helper.make_node("Reshape", ["input", "slow_shape"], ["s0"]))
        for i in range(slow_layers):
            nodes.append(helper.make_node("MatMul", [f"s{i}", "slow_w"], [f"m{i}"]))
            nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"s{i + 1}"]))
        nodes += [
            helper.make_node("Reshape", [f"s{slow_layers}", "flat"], ["sf"]),
            helper.make_node("ReduceSum", ["sf"], ["ssum"], keepdims=1),  # (N, 1)
            helper.make_node("Mul", ["ssum", "zero"], ["szero"]),
            helper.make_node("Add", ["logits0", "szero"], ["logits"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["logits0"], ["logits"]))
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, n_classes]),
        helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, 4]),
    ]
    if ood:
        nodes.append(helper.make_node("ReduceSum", ["embedding"], ["ood_score"], keepdims=0, noop_with_empty_axes=0))
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "ood_axis"))
        nodes[-1].input.append("ood_axis")
        outputs.append(helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, [batch]))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)], outputs, initializer=inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta is None:
        pass
    else:
        entry = model.metadata_props.add()
        entry.key = "cxr_batch"
        entry.value = meta if isinstance(meta, str) else json.dumps(meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_onnx(models_dir: Path) -> Path:
    """A valid 3-class model with the cxr-batch contract (input 32×32)."""
    return build_model(models_dir / "tiny.onnx", meta=contract())


@pytest.fixture(scope="session")
def other_onnx(models_dir: Path) -> Path:
    """Another valid model: same labels, other weights and version (resume must refuse it)."""
    return build_model(models_dir / "tiny-v2.onnx", meta=contract(version="2"), seed=1)


@pytest.fixture(scope="session")
def make_model(models_dir: Path) -> Callable[..., Path]:
    """``make_model(name, **build_model kwargs)`` → the path of a freshly built model."""

    def make(name: str, **kwargs: Any) -> Path:
        return build_model(models_dir / name, **kwargs)

    return make


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def run_cli(
    *args: str, env: Mapping[str, str | None] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``cxr-batch ARGS`` run in this process by Click's CliRunner, answered as ``subprocess.run``
    answers (returncode, stdout, stderr apart) without the cost of a new interpreter. ``env`` sets
    (None: removes) variables for the run only, ``cwd`` is its working folder, ``sys.argv`` its
    own command line.
    A Python exception other than SystemExit (a traceback on a user's screen) fails the test.
    Tests that need a real process (signals, kills, rlimits, a hang cut off by a timeout, what a
    fresh interpreter imports) keep ``subprocess``."""
    from cxr_batch.cli.main import main

    argv = sys.argv
    sys.argv = ["cxr-batch", *args]  # what the run records as its command line, as in a process
    try:
        with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
            result = CliRunner(env=env).invoke(main, list(args))
    finally:
        sys.argv = argv
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"traceback instead of a message: {result.exception!r}\n{result.stderr}") from (
            result.exception
        )
    return subprocess.CompletedProcess(["cxr-batch", *args], result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED / "covid19-radiography").is_dir():
        pytest.skip(f"the shared X-ray data is not here ({SHARED}); these tests need ../shared/data")
    return SHARED


@pytest.fixture
def sample_images() -> Path:
    if not any(SAMPLE_IMAGES.rglob("*.jp*g")):
        pytest.skip(f"{SAMPLE_IMAGES} holds no sample X-rays yet")
    return SAMPLE_IMAGES


def write_png(path: Path, seed: int, size: tuple[int, int] = (48, 40), mode: str = "L") -> Path:
    """A small random image (a different one per seed)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    img = Image.fromarray(arr, "L")
    if mode != "L":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Three PNGs (one in a sub-folder) and nothing else."""
    root = tmp_path / "images"
    write_png(root / "a.png", 1)
    write_png(root / "b.png", 2)
    write_png(root / "sub" / "c.png", 3)
    return root


@pytest.fixture
def png_factory() -> Callable[..., Path]:
    return write_png


#: A run id (cxr_batch.report.provenance.new_run_id: a UUID version 7).
RUN_ID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def strip_run_ids(data: bytes) -> bytes:
    """A report's bytes with every run id replaced by ``<run>``: two runs over the same files then
    compare equal byte for byte (each run writes its own ``run_id``; nothing else may differ)."""
    return RUN_ID.sub(b"<run>", data)


def sigint_default() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT: a shell's background job (CI
    started with ``&``, ``nohup``) inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt; reset it so the child behaves as under a terminal's Ctrl-C."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
