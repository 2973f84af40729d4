"""Hostile inputs (issue 12, the input and decoding items): real FIFOs, devices, links, huge or
padded files, bad header values, broken models. Every run here is a subprocess with a timeout,
so a hang fails the test instead of blocking the suite."""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO, build_model, contract, write_png
from PIL import Image
from test_dicom import RG1_UNCI, needs_data

from cxr_batch.contract import MAX_INPUT_SIDE, ModelMeta
from cxr_batch.errors import ImageError, ModelError
from cxr_batch.io.inputs import InputSpec, discover
from cxr_batch.io.preprocess import MAX_FRAMES_COUNTED, decode, to_grey

TIMEOUT = 120  # seconds for one CLI run on a busy machine; a hang is caught by this


def cli(*args: str, timeout: float = TIMEOUT, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``cxr-batch ARGS`` in a fresh process (this checkout's package), killed after ``timeout``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1", **kwargs.pop("env", {})}
    return subprocess.run(
        [sys.executable, "-m", "cxr_batch.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def no_raw_warnings(stderr: str) -> None:
    """Nothing from Python's warnings machinery and no traceback reaches the user."""
    for marker in ("Traceback", "Warning:", "UserWarning", "DecompressionBombWarning", "site-packages"):
        assert marker not in stderr, stderr


@pytest.fixture
def tiny(tiny_onnx: Path) -> Path:
    return tiny_onnx


# ------------------------------------------------------------------ 1. FIFOs and other special files


@pytest.mark.slow
def test_special_files_get_an_error_row_at_once_and_the_run_goes_on(tiny: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_png(data / "a.png", 1)
    write_png(data / "z.png", 2)
    os.mkfifo(data / "fifo.png")  # placed directly in the folder, named like an image
    os.mkfifo(data / "plainfifo")  # and without a suffix
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "target.fifo")
    (data / "link.png").symlink_to(outside / "target.fifo")  # a link to a FIFO inside the folder
    (data / "zero.dcm").symlink_to("/dev/zero")
    (data / "random.dcm").symlink_to("/dev/urandom")
    named = tmp_path / "named.png"
    os.mkfifo(named)  # named on the command line
    listed = tmp_path / "listed.jpg"
    os.mkfifo(listed)  # named in --files-from
    (tmp_path / "list.txt").write_text(f"{listed}\n")
    out = tmp_path / "r.csv"

    t0 = time.monotonic()
    proc = cli(
        "classify",
        str(data),
        str(named),
        "--files-from",
        str(tmp_path / "list.txt"),
        "--model",
        str(tiny),
        "--threads",
        "1",
        "--out",
        str(out),
        timeout=60,
    )
    assert time.monotonic() - t0 < 60
    assert proc.returncode == 3, proc.stderr
    got = {r["path"]: (r["status"], r["error"]) for r in rows(out)}
    fifo = ("error", "not a regular file: fifo")
    device = ("error", "not a regular file: character device")
    assert got == {
        "a.png": ("ok", ""),
        "fifo.png": fifo,
        "link.png": fifo,
        "plainfifo": fifo,
        "random.dcm": device,
        "zero.dcm": device,
        "z.png": ("ok", ""),
        str(named): fifo,
        str(listed): fifo,
    }
    no_raw_warnings(proc.stderr)


@pytest.mark.slow
def test_decode_never_opens_a_special_file(tmp_path: Path) -> None:
    """The library entry points refuse a FIFO or device from a stat alone (no open: no block)."""
    from cxr_batch.io.dicom import read_dicom

    os.mkfifo(tmp_path / "f.png")
    for target, kind in ((tmp_path / "f.png", "fifo"), (Path("/dev/zero"), "character device")):
        for fn in (decode, read_dicom):
            code = (
                "import sys\nfrom cxr_batch.errors import ImageError\n"
                f"from {fn.__module__} import {fn.__name__}\n"
                f"try:\n    {fn.__name__}({str(target)!r})\nexcept ImageError as e:\n    print(e)\n"
            )
            proc = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                timeout=30,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            assert proc.stdout.strip() == f"not a regular file: {kind}", (fn, proc.stdout, proc.stderr)


# ------------------------------------------------------------------ 2. bounded DICOM scan


def _timed_decode(path: Path) -> tuple[float, str]:
    t0 = time.monotonic()
    with pytest.raises(ImageError) as info:
        decode(path)
    return time.monotonic() - t0, str(info.value)


@pytest.mark.slow
@needs_data
def test_zero_filled_and_padded_dicom_are_rejected_fast(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    zeros = tmp_path / "zeros.dcm"
    zeros.write_bytes(bytes(20_000_000))
    seconds, msg = _timed_decode(zeros)
    assert seconds < 2.0 and msg.startswith("not a valid DICOM file"), (seconds, msg)

    raw = RG1_UNCI.read_bytes()
    meta_end = 144 + struct.unpack("<I", raw[140:144])[0]  # after (0002,0000) group length
    after_meta = tmp_path / "meta-then-zeros.dcm"
    after_meta.write_bytes(raw[:meta_end] + bytes(20_000_000))
    seconds, msg = _timed_decode(after_meta)
    assert seconds < 2.0 and msg.startswith("not a valid DICOM file"), (seconds, msg)

    # A valid start, then 2.5 million empty private elements (0009,0010) LO: a file pydicom would
    # walk element by element; the header read budget stops it.
    flood = tmp_path / "flood.dcm"
    flood.write_bytes(raw[:meta_end] + b"\x09\x00\x10\x00LO\x00\x00" * 2_500_000)
    seconds, msg = _timed_decode(flood)
    assert seconds < 5.0 and "header reads" in msg, (seconds, msg)

    # The real file itself is still fine.
    assert decode(RG1_UNCI).fields["modality"] == "CR"


# ------------------------------------------------------------------ 3. many-page TIFF


def many_page_tiff(path: Path, pages: int) -> Path:
    """A baseline little-endian TIFF of ``pages`` one-pixel 8-bit grey pages (written directly:
    Pillow's writer takes minutes for 40,000 pages). Pillow reads it as a multi-page TIFF."""
    entries = 8
    ifd_size = 2 + entries * 12 + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for i in range(pages):
        pixel_at = len(out) + ifd_size
        following = 0 if i == pages - 1 else pixel_at + 1
        tags = [
            (256, 3, 1),
            (257, 3, 1),
            (258, 3, 8),
            (259, 3, 1),
            (262, 3, 1),
            (273, 4, pixel_at),
            (278, 3, 1),
            (279, 4, 1),
        ]
        out += struct.pack("<H", entries)
        for tag, typ, value in tags:
            out += struct.pack("<HHI", tag, typ, 1) + (
                struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
            )
        out += struct.pack("<I", following) + bytes([i % 256])
    path.write_bytes(bytes(out))
    return path


def test_many_page_tiff_is_not_counted_to_the_end(tmp_path: Path) -> None:
    path = many_page_tiff(tmp_path / "pages.tif", 40_000)
    assert path.stat().st_size > 4_000_000
    with Image.open(path) as img:  # a real multi-page TIFF
        img.seek(1234)
        assert img.getpixel((0, 0)) == 1234 % 256
    t0 = time.monotonic()
    d = decode(path)
    assert time.monotonic() - t0 < 3.0
    assert d.notes == [f"multi-frame file: used frame 1 of more than {MAX_FRAMES_COUNTED}"]
    assert d.grey.shape == (1, 1) and d.grey[0, 0] == 0.0  # frame 1 (value 0)

    small = tmp_path / "three.tif"
    frames = [Image.new("L", (4, 4), v) for v in (10, 20, 30)]
    frames[0].save(small, save_all=True, append_images=frames[1:])
    assert decode(small).notes == ["multi-frame file: used frame 1 of 3"]


# ------------------------------------------------------------------ 6. outputs are never inputs


@pytest.fixture(scope="module")
def tiny_cam(models_dir: Path) -> Path:
    pytest.importorskip("onnx")
    from click.testing import CliRunner

    from cxr_batch.cli import main as cli_main

    src = build_model(models_dir / "hostile-nocam.onnx", meta=contract(), seed=3)
    out = models_dir / "hostile-cam.onnx"
    result = CliRunner().invoke(cli_main, ["add-cam", str(src), str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_the_runs_own_outputs_are_never_inputs(tiny_cam: Path, tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    for i, name in enumerate(("a.png", "b.png", "sub/c.png")):
        write_png(studies / name, i)
    report, heat = studies / "results.csv", studies / "heatmaps"
    # --no-lungs: these synthetic images show no lungs, so with the lung stage they get no label, no heatmap
    args = ["classify", str(studies), "--model", str(tiny_cam), "--threads", "1", "--out", str(report), "--no-lungs"]
    first = cli(*args, "--heatmaps", str(heat))
    assert first.returncode == 0, first.stderr
    assert sorted(p.relative_to(heat).as_posix() for p in heat.rglob("*.png")) == [
        "a.png.png",
        "b.png.png",
        "sub/c.png.png",
    ]
    again = cli(*args, "--heatmaps", str(heat), "--resume")
    assert again.returncode == 0, again.stderr
    assert [r["path"] for r in rows(report)] == ["a.png", "b.png", "sub/c.png"]
    assert not list(heat.rglob("*.png.png.png")) and not (heat / "heatmaps").exists()
    # A fresh run (overwrite) into the same places, and one reaching the folder through a link
    (tmp_path / "alias").symlink_to(heat)
    third = cli(*args, "--heatmaps", str(tmp_path / "alias"), "--overwrite")
    assert third.returncode == 0, third.stderr
    assert [r["path"] for r in rows(report)] == ["a.png", "b.png", "sub/c.png"]


def test_an_output_file_is_skipped_whatever_its_name_or_link(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_png(data / "a.png", 1)
    report = write_png(data / "report.png", 2)  # an output that looks like an input
    (data / "alias.png").symlink_to(report)
    spec = InputSpec(paths=(str(data),), outputs=(str(tmp_path / "data" / ".." / "data" / "report.png"),))
    assert [f.display for f in discover(spec).files] == ["a.png"]
    named = discover(InputSpec(paths=(str(report),), outputs=(str(report),)))
    assert named.files == [] and "this run's own output" in named.warnings[0]


# ------------------------------------------------------------------ 7. a folder that can't be listed


def _without_file_permission_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding
    set, so even root obeys file permissions (``chmod 000`` then really denies the listing)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_a_folder_that_cannot_be_listed_is_an_error_row_and_exit_3(tiny: Path, tmp_path: Path) -> None:
    """Real permissions (chmod 000); as root, the run is made without the capabilities that
    let root read any folder."""
    data = tmp_path / "data"
    write_png(data / "ok.png", 1)
    write_png(data / "locked" / "y.png", 2)
    os.chmod(data / "locked", 0o000)
    out = tmp_path / "r.csv"
    kwargs: dict[str, Any] = {}
    if os.geteuid() == 0:
        kwargs["preexec_fn"] = _without_file_permission_override
    try:
        try:
            proc = cli("classify", str(data), "--model", str(tiny), "--threads", "1", "--out", str(out), **kwargs)
        except subprocess.SubprocessError as exc:
            pytest.skip(f"cannot drop root's file-permission override here: {exc}")
        assert proc.returncode == 3, proc.stderr
        got = [(r["path"], r["status"], r["error"]) for r in rows(out)]
        assert got == [
            ("locked/", "error", "cannot list folder: Permission denied; its files were not classified"),
            ("ok.png", "ok", ""),
        ]
        no_raw_warnings(proc.stderr)
    finally:
        os.chmod(data / "locked", 0o755)


# ------------------------------------------------------------------ 12 and 18. DICOM header values, warnings


@pytest.mark.slow
@needs_data
def test_invalid_dicom_header_values_are_left_empty_and_never_echoed(tiny: Path, tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom import config

    ds = pydicom.dcmread(RG1_UNCI)
    saved = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        ds.SOPInstanceUID = '=HYPERLINK("http://evil.example/x","click")'
        ds.StudyInstanceUID = "1.2.840.99"
        ds.ViewPosition = "=1+2"
        ds.Modality = "cr"  # CS is upper case: normalised, as before
        path = tmp_path / "evil.dcm"
        ds.save_as(path, enforce_file_format=True)
    finally:
        config.settings.writing_validation_mode = saved

    d = decode(path)
    assert d.fields == {
        "modality": "CR",
        "view_position": "",
        "sop_instance_uid": "",
        "study_instance_uid": "1.2.840.99",
    }
    assert "invalid sop_instance_uid header value left empty (not a valid DICOM UI)" in d.notes
    assert "invalid view_position header value left empty (not a valid DICOM CS)" in d.notes
    assert not any("HYPERLINK" in n or "1+2" in n for n in d.notes)

    out = tmp_path / "r.csv"
    proc = cli("classify", str(path), "--model", str(tiny), "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    no_raw_warnings(proc.stderr)
    assert "HYPERLINK" not in proc.stderr and "HYPERLINK" not in out.read_text(encoding="utf-8")
    (row,) = rows(out)
    assert row["sop_instance_uid"] == "" and row["study_instance_uid"] == "1.2.840.99"


@pytest.mark.slow
def test_decompression_bomb_warning_never_reaches_stderr(tiny: Path, tmp_path: Path) -> None:
    limit = Image.MAX_IMAGE_PIXELS or 89_478_485
    side = int(limit**0.5) + 100  # between 1x and 2x the limit: Pillow warns, cxr-batch refuses
    path = tmp_path / "big.png"
    Image.new("L", (side, side)).save(path)
    out = tmp_path / "r.csv"
    proc = cli("classify", str(path), "--model", str(tiny), "--threads", "1", "--out", str(out))
    assert proc.returncode == 3, proc.stderr
    no_raw_warnings(proc.stderr)
    (row,) = rows(out)
    assert row["error"].startswith("image too large (decompression-bomb guard)")


def test_warnings_in_decoder_threads_become_notes_without_values() -> None:
    """The capture is per thread: another thread's warnings are not taken, its own are kept."""
    import threading
    import warnings

    from cxr_batch.io.warning_capture import capture

    got: dict[str, list[str]] = {}

    def worker(name: str, value: str) -> None:
        with capture() as caught:
            warnings.warn(f"Invalid value for VR UI: '{value}'", UserWarning, stacklevel=1)
            warnings.warn(f"odd thing in {name}: '{value}'", RuntimeWarning, stacklevel=1)
        got[name] = list(caught)

    threads = [threading.Thread(target=worker, args=(f"t{i}", f"=SECRET{i}")) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for i in range(4):
        assert got[f"t{i}"] == [f"decoder warning (RuntimeWarning): odd thing in t{i}: …"]
    with warnings.catch_warnings(record=True) as outside:  # outside capture(): untouched
        warnings.simplefilter("always")
        warnings.warn("plain", UserWarning, stacklevel=1)
    assert [str(w.message) for w in outside] == ["plain"]


# ------------------------------------------------------------------ 15. broken models


def _bad_shape_model(path: Path, role: str) -> Path:
    """Input N×3×32×32 → pooled N×3 → logits N×3; plus ``role``: N×0 (ood_score) or N×3 (cam)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["logits"], axis=1),
    ]
    inits = []
    if role == "ood_score":
        inits += [numpy_helper.from_array(np.array(v, np.int64), n) for v, n in (([0], "s"), ([0], "e"), ([1], "ax"))]
        nodes.append(helper.make_node("Slice", ["logits", "s", "e", "ax"], [role]))  # N×0
    else:
        nodes.append(helper.make_node("Identity", ["logits"], [role]))  # N×3, not N×C×h×w
    graph = helper.make_graph(
        nodes,
        "bad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info(role, TensorProto.FLOAT, None),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entry = model.metadata_props.add()
    entry.key, entry.value = "cxr_batch", __import__("json").dumps(contract(outputs={"logits": "logits", role: role}))
    onnx.save(model, str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("role", ["ood_score", "cam"])
def test_wrong_output_shapes_are_refused_at_load(role: str, tmp_path: Path, image_dir: Path) -> None:
    pytest.importorskip("onnx")
    model = _bad_shape_model(tmp_path / f"bad-{role}.onnx", role)
    extra = ["--heatmaps", str(tmp_path / "heat")] if role == "cam" else []
    out = tmp_path / "r.csv"
    proc = cli("classify", str(image_dir), "--model", str(model), "--threads", "1", "--out", str(out), *extra)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"the model's '{role}' output ({role}) has shape" in proc.stderr
    assert not out.exists() or len(rows(out)) == 0


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # a bug here fails, not the machine


@pytest.mark.slow
def test_absurd_input_size_is_refused_by_the_contract(tmp_path: Path, image_dir: Path) -> None:
    with pytest.raises(ModelError, match=f"larger than {MAX_INPUT_SIDE} pixels a side"):
        ModelMeta.from_dict(contract(input_size=[60000, 60000]))
    ModelMeta.from_dict(contract(input_size=[MAX_INPUT_SIDE, 512]))  # the bound itself is fine
    pytest.importorskip("onnx")
    model = build_model(tmp_path / "huge.onnx", meta=contract(input_size=[60000, 60000]), size=(60000, 60000))
    proc = cli(
        "classify",
        str(image_dir),
        "--model",
        str(model),
        "--out",
        str(tmp_path / "r.csv"),
        preexec_fn=_limit_memory,
    )
    assert proc.returncode == 1, proc.stderr
    assert "larger than 4096 pixels a side" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ 16. memory per file


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_decode_memory", REPO / "benchmarks" / "bench_decode_memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> Any:
    return _bench()


@pytest.mark.slow
def test_memory_of_a_huge_16bit_png_is_bounded(bench: Any, tmp_path: Path) -> None:
    path = bench.make_png(tmp_path / "big16.png")
    assert path.stat().st_size < 2_000_000
    base = bench.measure(None)["maxrss_kb"]
    r = bench.measure(str(path))
    assert r["outcome"] == "ok 9400x9400", r
    # 9400² pixels: the decoded 16-bit image (177 MB), its float32 grey (353 MB) and Pillow's
    # float copy for the resize. It peaked at 2.3 GB above baseline with float64 copies.
    assert (r["maxrss_kb"] - base) / 1024 < 1100, r


@pytest.mark.slow
@needs_data
def test_deflated_dicom_over_the_pixel_limit_is_refused_cheaply(bench: Any, tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    path = bench.make_deflated_dicom(tmp_path / "big.dcm")  # 12000² = 144 Mpx > Pillow's 89.5 Mpx
    assert path.stat().st_size < 5_000_000
    base = bench.measure(None)["maxrss_kb"]
    r = bench.measure(str(path))
    assert r["outcome"].startswith("error: image too large (decompression-bomb guard): 12000×12000"), r
    assert (r["maxrss_kb"] - base) / 1024 < 800, r  # it was accepted and peaked at 4.3 GB


@pytest.mark.slow
@needs_data
def test_dicom_pixels_are_the_same_in_blocks_as_in_one_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    """The block-wise DICOM pipeline gives the whole-frame result bit for bit (all three VOI paths)."""
    pydicom = pytest.importorskip("pydicom")
    import cxr_batch.io.dicom as dicom_mod

    whole = {}
    monkeypatch.setattr(dicom_mod, "CHUNK_PIXELS", 1 << 40)
    ds = pydicom.dcmread(RG1_UNCI)
    variants: dict[str, Any] = {"file": RG1_UNCI}
    for name, change in (
        ("no-window", lambda d: [d.__delattr__(k) for k in ("WindowCenter", "WindowWidth") if k in d]),
        (
            "rescaled-mono1",
            lambda d: (
                setattr(d, "RescaleSlope", 0.5),
                setattr(d, "RescaleIntercept", -3),
                setattr(d, "PhotometricInterpretation", "MONOCHROME1"),
            ),
        ),
    ):
        copy = pydicom.dcmread(RG1_UNCI)
        change(copy)
        buf = io.BytesIO()
        copy.save_as(buf, enforce_file_format=True)
        variants[name] = buf.getvalue()
    del ds

    def grey(src: Any, tmp: Path) -> np.ndarray:
        if isinstance(src, bytes):
            tmp.write_bytes(src)
            src = tmp
        return dicom_mod.read_dicom(src).grey

    tmp = Path(tempfile.mkdtemp()) / "v.dcm"
    try:
        for name, src in variants.items():
            whole[name] = grey(src, tmp)
        monkeypatch.setattr(dicom_mod, "CHUNK_PIXELS", 1000)  # blocks of a row or so
        for name, src in variants.items():
            assert np.array_equal(grey(src, tmp), whole[name]), name
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def test_16bit_grey_is_float64_exact(tmp_path: Path) -> None:
    """float32 arithmetic for 16-bit data gives exactly the float64-then-float32 values."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    path = tmp_path / "all16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        got = to_grey(img)
    expected = np.clip(values.astype(np.float64) / 65535.0, 0.0, 1.0).astype(np.float32)
    assert got.dtype == np.float32 and np.array_equal(got, expected)


# ------------------------------------------------------------------ 21. Ray engine's stderr


@pytest.mark.slow
@pytest.mark.ray
def test_ray_engine_prints_no_core_worker_error(tiny: Path, image_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    out = tmp_path / "r.csv"
    proc = cli(
        "classify",
        str(image_dir),
        "--engine",
        "ray",
        "--model",
        str(tiny),
        "--threads",
        "1",
        "--out",
        str(out),
        timeout=400,
    )
    if proc.returncode == 1 and "could not start Ray on this machine" in proc.stderr and "timed out" in proc.stderr:
        pytest.skip("Ray did not start in time on this (busy) machine")
    assert proc.returncode == 0, proc.stderr
    assert len(rows(out)) == 3
    for marker in ("core_worker", "constructor arguments", "Deprecation", "Traceback"):
        assert marker not in proc.stderr, proc.stderr


# ------------------------------------------------------------------ the earlier bad-input corpus


def _bad_corpus(root: Path) -> None:
    """One file of each kind of bad input the earlier issues listed, plus the new special files."""
    write_png(root / "good.png", 1)
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    good = (root / "good.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "noise.dcm").write_bytes(os.urandom(4096))
    (root / "zeros.dcm").write_bytes(bytes(1 << 20))
    (root / "broken.png").symlink_to(root / "missing.png")
    (root / "folder.png").mkdir()
    os.mkfifo(root / "fifo.tif")
    (root / "dev.bmp").symlink_to("/dev/zero")
    many_page_tiff(root / "pages.tif", 500)


@pytest.mark.slow
def test_bad_input_corpus_still_gives_one_row_per_file(tiny: Path, tmp_path: Path) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    _bad_corpus(root)
    out = tmp_path / "r.csv"
    proc = cli("classify", str(root), "--model", str(tiny), "--threads", "1", "--out", str(out), timeout=90)
    assert proc.returncode == 3, proc.stderr
    got = {r["path"]: r for r in rows(out)}
    assert sorted(got) == sorted(
        [
            "good.png",
            "empty.png",
            "text.jpg",
            "truncated.png",
            "noise.dcm",
            "zeros.dcm",
            "broken.png",
            "fifo.tif",
            "dev.bmp",
            "pages.tif",
        ]
    )  # the folder named like an image is walked (empty), not a row
    assert {p for p, r in got.items() if r["status"] == "ok"} == {"good.png", "pages.tif"}
    assert all(r["error"] for p, r in got.items() if p not in ("good.png", "pages.tif"))
    # the lung stage may add its own note after it (these synthetic pages show no lungs)
    assert (
        got["pages.tif"]["notes"].split("; ")[0] == f"multi-frame file: used frame 1 of more than {MAX_FRAMES_COUNTED}"
    )
    no_raw_warnings(proc.stderr)
