"""The engine's performance features: the pipelined inference thread, the reused batch buffer,
IO binding (the CUDA path, exercised here on the CPU provider), the fp16 model and its choice on
CUDA, and the fast normalisation (bit for bit the old formula)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import contract

from cxr_batch.engine import classifier as inference
from cxr_batch.engine import model as model_loading
from cxr_batch.engine import session
from cxr_batch.engine.classifier import CPU, CUDA, Classifier
from cxr_batch.io.preprocess import normalise


@pytest.fixture
def default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    monkeypatch.setattr(model_loading, "default_model_dirs", lambda: [folder])
    monkeypatch.delenv("CXR_BATCH_MODEL", raising=False)
    return folder


def _install(folder: Path, make_model: Callable[..., Path], *precisions: str) -> None:
    for precision in precisions:
        # an int8 file --precision auto would take: its contract records a passed export gate (issue 19)
        gate = {"top1_agreement_with_fp32": 1.0, "max_abs_prob_diff": 0.0, "gate": {"passed": True}}
        extra = {"quantization": gate} if precision == "int8" else {}
        src = make_model(f"default-{precision}.onnx", meta=contract(name="default", precision=precision, extra=extra))
        (folder / inference.DEFAULT_MODEL_FILES[precision]).write_bytes(src.read_bytes())


def test_auto_takes_int8_on_a_vnni_cpu_and_fp16_on_cuda(
    default_dir: Path, make_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _install(default_dir, make_model, "fp32", "int8", "fp16")
    monkeypatch.setenv("CXR_BATCH_CPU_FLAGS", "avx2 avx512_vnni")
    assert inference.find_default_model("auto", cuda=False).name == "cxr-resnet18-int8.onnx"
    monkeypatch.setenv("CXR_BATCH_CPU_FLAGS", "avx2")  # no 8-bit dot products: fp32
    assert inference.find_default_model("auto", cuda=False).name == "cxr-resnet18.onnx"
    assert inference.find_default_model("auto", cuda=True).name == "cxr-resnet18-fp16.onnx"
    assert inference.find_default_model("fp16").name == "cxr-resnet18-fp16.onnx"


def test_fp16_is_never_the_cpu_default_while_another_model_is_installed(
    default_dir: Path, make_model: Callable[..., Path]
) -> None:
    _install(default_dir, make_model, "fp32", "fp16")
    assert inference.find_default_model("auto", cuda=False).name == "cxr-resnet18.onnx"


def test_cuda_that_does_not_start_falls_back_to_the_cpu_default(
    default_dir: Path, make_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime-gpu installed but CUDA silently falls back: auto must run the CPU's default
    (int8 on a CPU with VNNI), not fp16, on the CPU."""
    _install(default_dir, make_model, "fp32", "int8", "fp16")
    monkeypatch.setenv("CXR_BATCH_CPU_FLAGS", "avx512_vnni")
    real = inference.create_session
    monkeypatch.setattr(session, "available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(
        model_loading, "create_session", lambda path, device="auto", threads=0: real(path, "cpu", threads)
    )
    clf = Classifier(device="auto", threads=1)
    assert clf.meta.precision == "int8" and clf.provider == CPU


def test_io_binding_gives_the_same_outputs_as_run(tiny_onnx: Path, image_dir: Path) -> None:
    clf = Classifier(tiny_onnx, device="cpu", threads=1)
    x = np.random.default_rng(0).standard_normal((5, 3, *clf.meta.input_size)).astype(np.float32)
    expected = clf._loaded.session.run(clf._output_names, {clf.meta.input_name: x})
    got = clf._run_bound(clf._loaded.session, x)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_cuda_branch_classifies_like_the_cpu_branch(tiny_onnx: Path, image_dir: Path) -> None:
    files = sorted(str(p) for p in image_dir.rglob("*.png"))
    plain = list(Classifier(tiny_onnx, device="cpu", threads=1, batch_size=2).classify(files))
    bound = Classifier(tiny_onnx, device="cpu", threads=1, batch_size=2)
    bound._loaded.provider = CUDA  # takes the IO-binding path, on the CPU provider
    assert [(r.path, r.label, r.probs) for r in bound.classify(files)] == [(r.path, r.label, r.probs) for r in plain]


def test_batches_reuse_one_input_array() -> None:
    buffer: list[np.ndarray] = []
    a = [np.full((3, 4, 4), i, np.float32) for i in range(3)]
    first = inference._stack(a, buffer)
    second = inference._stack(a[:2], buffer)
    assert np.shares_memory(first, second) and second.shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(second, np.stack(a[:2]))
    bigger = inference._stack([*a, *a], buffer)  # grows when a batch is larger
    np.testing.assert_array_equal(bigger, np.stack([*a, *a]))


def test_results_keep_input_order_across_many_batches(tiny_onnx: Path, image_dir: Path) -> None:
    files = sorted(str(p) for p in image_dir.rglob("*.png")) * 7
    clf = Classifier(tiny_onnx, device="cpu", threads=1, batch_size=2, decode_workers=3)
    batches = list(clf.iter_batches(files))
    assert [r.file for b in batches for r in b] == files
    assert all(len(b) <= 2 for b in batches)
    single = {r.file: r.probs for r in Classifier(tiny_onnx, device="cpu", threads=1, batch_size=1).classify(files)}
    assert all(r.probs == single[r.file] for b in batches for r in b)


def test_closing_early_stops_the_engine_threads(tiny_onnx: Path, image_dir: Path) -> None:
    files = sorted(str(p) for p in image_dir.rglob("*.png")) * 20
    batches = Classifier(tiny_onnx, device="cpu", threads=1, batch_size=2).iter_batches(files)
    next(batches)
    batches.close()
    names = [t.name for t in threading.enumerate()]
    assert not [n for n in names if n.startswith(("cxr-infer", "cxr-decode"))], names


def test_a_failing_batch_raises_after_the_batches_before_it(tiny_onnx: Path, image_dir: Path) -> None:
    clf = Classifier(tiny_onnx, device="cpu", threads=1, batch_size=1)
    session = clf._loaded.session
    calls = []

    class Failing:
        def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("boom")
            return list(session.run(names, feeds))

    clf._loaded.session = Failing()  # type: ignore[assignment]
    batches = clf.iter_batches(sorted(str(p) for p in image_dir.rglob("*.png")))
    assert next(batches)[0].ok
    with pytest.raises(inference.ModelError, match="inference failed: boom"):
        next(batches)


def test_fast_normalise_is_bit_for_bit_the_formula() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    m = np.asarray(mean, np.float32).reshape(3, 1, 1)
    s = np.asarray(std, np.float32).reshape(3, 1, 1)
    rng = np.random.default_rng(0)
    one = rng.random((7, 5), dtype=np.float32)
    many = rng.random((4, 7, 5), dtype=np.float32)
    np.testing.assert_array_equal(normalise(one, mean, std), (one[None] - m) / s)
    np.testing.assert_array_equal(normalise(many, mean, std), (many[:, None] - m) / s)
    assert normalise(one, mean, std).dtype == np.float32 and normalise(one, mean, std).flags.c_contiguous


def test_threads_follow_the_cpus_this_process_may_use() -> None:
    cores = inference.physical_cores()
    assert cores is None or 1 <= cores <= inference.usable_cpus()
    assert 1 <= inference.default_workers() <= 8


def test_fp16_export_keeps_the_contract_and_float32_io(tiny_onnx: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from cxr_batch.training.fp16 import export_fp16

    master = tmp_path / "m.onnx"
    master.write_bytes(tiny_onnx.read_bytes())
    out = export_fp16(master)
    assert out.name == "m-fp16.onnx"
    clf = Classifier(out, device="cpu", threads=1)
    assert clf.meta.precision == "fp16" and clf.meta.labels == Classifier(master, device="cpu").meta.labels
    assert clf.meta.extra["fp16_parity"]["max_abs_prob_diff"] <= 1e-2
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"
    assert all(o.type == "tensor(float)" for o in session.get_outputs())


def test_two_streams_give_the_same_results_in_order(tiny_onnx: Path, image_dir: Path) -> None:
    files = sorted(str(p) for p in image_dir.rglob("*.png")) * 9
    one = Classifier(tiny_onnx, device="cpu", threads=1, batch_size=2)
    two = Classifier(tiny_onnx, device="cpu", threads=2, batch_size=2, streams=2)
    assert one._streams == 1 and two._streams == 2 and two._threads == 1
    got = [(r.file, r.probs) for r in two.classify(files)]
    assert got == [(r.file, r.probs) for r in one.classify(files)]
    assert 1 <= two._made <= 2  # a second session only when two batches overlapped


def test_streams_follow_the_threads(tiny_onnx: Path) -> None:
    assert Classifier(tiny_onnx, device="cpu", threads=1, streams=4)._streams == 1  # never more streams than threads
    assert Classifier(tiny_onnx, device="cpu", threads=4)._streams == inference.default_streams(4, cuda=False) == 2
    assert inference.default_streams(8, cuda=True) == 1


@pytest.mark.slow
def test_memory_stays_bounded_with_two_streams(tiny_onnx: Path, image_dir: Path) -> None:
    paths = sorted(str(p) for p in image_dir.rglob("*.png")) * 60
    pulled = 0

    def lazy() -> Iterator[str]:
        nonlocal pulled
        for p in paths:
            pulled += 1
            yield p

    size, workers, streams = 4, 2, 2
    clf = Classifier(tiny_onnx, device="cpu", batch_size=size, threads=2, decode_workers=workers, streams=streams)
    gap = 0
    for done, _ in enumerate(clf.classify(lazy()), start=1):
        gap = max(gap, pulled - done)
    assert gap <= (streams + 2) * size + workers


def _labelled(root: Path, per_class: int = 4) -> Path:
    from conftest import LABELS, write_png

    for k, label in enumerate(LABELS):
        for i in range(per_class):
            write_png(root / label / f"{i}.png", seed=100 * k + i, size=(32, 32))
    return root


@pytest.mark.slow
def test_int8_is_written_only_when_it_agrees_with_fp32(
    tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnx")
    from rich.console import Console

    from cxr_batch.errors import ModelError
    from cxr_batch.io.labelled import find_labelled, make_split
    from cxr_batch.training import export, quantize

    root = _labelled(tmp_path / "data")
    split = make_split(find_labelled(root), val=0.25, test=0.5)
    master = tmp_path / "m.onnx"
    master.write_bytes(tiny_onnx.read_bytes())
    cfg = export.ExportConfig(checkpoint=str(master), out=str(master), calibration_images=8)
    console = Console(file=None, quiet=True)
    monkeypatch.setattr(quantize, "INT8_MIN_AGREEMENT", 1.01)  # no model can agree on more than 100%
    with pytest.raises(ModelError, match=r"agrees with fp32 on .*not written"):
        quantize.quantize_int8(master, root, split, cfg, console)
    assert not (tmp_path / "m-int8.onnx").exists()
    info = quantize.quantize_int8(master, root, split, dataclasses.replace(cfg, force=True), console)
    assert (tmp_path / "m-int8.onnx").is_file() and 0.0 <= info["top1_agreement_with_fp32"] <= 1.0
