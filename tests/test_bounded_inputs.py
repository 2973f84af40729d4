"""Issue 21, inputs and memory: every file read through one bounded opener; path lists in any
Unicode encoding; no walk of a folder a list names; no decompression or batch without a bound.

Runs that could hang or blow up are subprocesses with a timeout (and an address-space limit where
memory is the point), so a regression fails the test instead of the machine."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_hostile_inputs import cli, no_raw_warnings, rows

from cxr_batch.io.inputs import InputSpec, discover

# --------------------------------------------------------------------------- 14: path lists


@pytest.fixture
def three(shared_data: Path, tmp_path: Path) -> list[Path]:
    """Three real X-rays copied under a name with a non-ASCII character."""
    out = []
    for label in ("normal", "covid", "viral"):
        src = sorted((shared_data / "covid19-radiography" / label).glob("*.png"))[0]
        (tmp_path / "imgs é").mkdir(exist_ok=True)
        out.append(Path(shutil.copy(src, tmp_path / "imgs é" / f"{label}-{src.name}")))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "encoding",
    ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be", "utf-8-sig"],
)
def test_a_list_in_utf16_utf32_or_with_a_bom_gives_one_row_a_path(
    encoding: str, three: list[Path], tiny_onnx: Path, tmp_path: Path
) -> None:
    listing = tmp_path / "list.txt"
    # What Windows PowerShell's `Get-ChildItem | Out-File` writes: CRLF lines, UTF-16 LE with a BOM.
    listing.write_bytes("".join(f"{p}\r\n" for p in three).encode(encoding))
    out = tmp_path / "r.csv"
    proc = cli("classify", "--files-from", str(listing), "--model", str(tiny_onnx), "--out", str(out), "-q")
    no_raw_warnings(proc.stderr)
    assert proc.returncode == 0, proc.stderr
    got = rows(out)
    assert [r["path"] for r in got] == [str(p) for p in three]
    assert [r["status"] for r in got] == ["ok"] * 3


@pytest.mark.slow
def test_a_listed_folder_is_an_error_row_and_never_walked(three: list[Path], tiny_onnx: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    # "/" as a UTF-16 list read byte by byte would give: the whole file system. Here it is named
    # outright, next to a real file and a real folder of images.
    listing.write_text(f"/\n{three[0]}\n{three[1].parent}\n", encoding="utf-8")
    out = tmp_path / "r.csv"
    proc = cli("classify", "--files-from", str(listing), "--model", str(tiny_onnx), "--out", str(out), "-q",
               timeout=60)  # fmt: skip
    no_raw_warnings(proc.stderr)
    assert proc.returncode == 3, proc.stderr
    got = rows(out)
    assert [(r["path"], r["status"]) for r in got] == [
        ("/", "error"),
        (str(three[0]), "ok"),
        (str(three[1].parent), "error"),
    ]
    assert "not walked" in got[0]["error"] and "--files-from-dirs" in got[0]["error"]
    # With --files-from-dirs the folder named in the list is walked, as a folder argument is.
    listing.write_text(f"{three[1].parent}\n", encoding="utf-8")
    proc = cli("classify", "--files-from", str(listing), "--files-from-dirs", "--model", str(tiny_onnx),
               "--out", str(out), "-q", "--overwrite")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["path"] for r in rows(out)) == sorted(p.name for p in three)


def test_files_from_dirs_needs_files_from(tiny_onnx: Path, tmp_path: Path) -> None:
    proc = cli("classify", str(tmp_path), "--files-from-dirs", "--out", str(tmp_path / "r.csv"))
    assert proc.returncode == 2 and "--files-from-dirs needs --files-from" in proc.stderr


def test_discovery_of_a_listed_root_yields_one_error_row(tmp_path: Path) -> None:
    found = discover(InputSpec(listed=("/", os.fspath(tmp_path))))
    assert [(f.display, f.error is not None) for f in found.files] == [("/", True), (os.fspath(tmp_path), True)]


def test_a_list_that_is_not_valid_utf16_is_a_clear_error(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xff\xfe" + "/a.png\n".encode("utf-16-le") + b"\x00\xd8")  # a lone surrogate
    proc = cli("classify", "--files-from", str(listing), "--out", str(tmp_path / "r.csv"))
    assert proc.returncode == 1 and "UTF-16-LE" in proc.stderr and "save it as UTF-8" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- 13e / 15: records and rows read back


@pytest.fixture
def run_jsonl(three: list[Path], tiny_onnx: Path, tmp_path: Path) -> Path:
    """A real JSONL report of three real X-rays (and its provenance record beside it)."""
    out = tmp_path / "r.jsonl"
    proc = cli("classify", *map(str, three), "--model", str(tiny_onnx), "--out", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    assert Path(f"{out}.provenance.json").is_file()
    return out


def _hostile(kind: str, target: Path) -> None:
    """Replace ``target`` by something that is not a small JSON file."""
    if target.exists() or target.is_symlink():
        target.unlink()
    if kind == "dev-zero":
        target.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "deep":
        target.write_text("[" * 200_000 + "]" * 200_000)
    elif kind == "directory":
        target.mkdir()
    elif kind == "sparse":
        with open(target, "wb") as fh:
            fh.truncate(4 << 30)
    else:
        raise AssertionError(kind)


HOSTILE = ["dev-zero", "fifo", "deep", "directory", "sparse"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_provenance_record_is_refused_on_resume(
    kind: str, run_jsonl: Path, tiny_onnx: Path, three: list[Path]
) -> None:
    _hostile(kind, Path(f"{run_jsonl}.provenance.json"))
    proc = cli("classify", *map(str, three), "--model", str(tiny_onnx), "--out", str(run_jsonl), "--resume", "-q",
               timeout=60)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "provenance" in proc.stderr and "Traceback" not in proc.stderr
    expected = {
        "dev-zero": "not a regular file: character device",
        "fifo": "not a regular file: fifo",
        "deep": "nested more than 64 levels deep",
        "directory": "is a folder",
        "sparse": "the provenance record is too large (4,294,967,296 bytes",
    }[kind]
    assert expected in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", HOSTILE)
def test_the_html_report_skips_a_hostile_provenance_record(kind: str, run_jsonl: Path, tmp_path: Path) -> None:
    _hostile(kind, Path(f"{run_jsonl}.provenance.json"))
    proc = cli("report", str(run_jsonl), "--html", str(tmp_path / "html"), "--images", str(tmp_path), "-q",
               timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "html" / "index.html").is_file()


def _edit_row(report: Path, line: int, text: str) -> None:
    lines = report.read_bytes().splitlines(keepends=True)
    lines[line - 1] = text.encode() + b"\n"
    report.write_bytes(b"".join(lines))


def _row_with(report: Path, line: int, key: str, raw: str) -> str:
    """Line ``line`` of the report with ``key``'s value replaced by raw JSON text ``raw``."""
    import json

    obj = json.loads(report.read_bytes().splitlines()[line - 1])
    obj[key] = "@@"
    return json.dumps(obj).replace('"@@"', raw)


DAMAGED = [
    ("confidence", "NaN", "NaN is not a JSON number"),
    ("confidence", "Infinity", "Infinity is not a JSON number"),
    ("prob_covid", "-Infinity", "-Infinity is not a JSON number"),
    ("confidence", '{"$gt": 0}', "confidence is an object, not a number"),
    ("width", "[1]", "width is a list, not a number"),
    ("status", '{"ok": true}', "status is an object, not ok or error"),
    ("status", '"maybe"', "status is 'maybe', not ok or error"),
    ("label", '{"a": 1}', "label is an object, not text"),
    ("in_distribution", '"yes"', "in_distribution is 'yes', not true, false or null"),
    ("notes", "[" * 100_000 + "]" * 100_000, "nested more than 64 levels deep"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("key", "raw", "message"), DAMAGED)
def test_resume_refuses_a_damaged_jsonl_row(
    key: str, raw: str, message: str, run_jsonl: Path, tiny_onnx: Path, three: list[Path]
) -> None:
    _edit_row(run_jsonl, 2, _row_with(run_jsonl, 2, key, raw))
    proc = cli("classify", *map(str, three), "--model", str(tiny_onnx), "--out", str(run_jsonl), "--resume", "-q",
               timeout=60)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert f"line 2 is a damaged row: {message}" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("key", "raw", "message"), DAMAGED)
def test_merge_refuses_a_damaged_jsonl_row(key: str, raw: str, message: str, run_jsonl: Path, tmp_path: Path) -> None:
    part = tmp_path / "p0.jsonl"
    part.write_bytes(run_jsonl.read_bytes())
    _edit_row(part, 3, _row_with(part, 3, key, raw))
    proc = cli("merge", str(part), "--out", str(tmp_path / "m.jsonl"), "--provenance", str(tmp_path / "m.prov.json"),
               timeout=60)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert f"{part} line 3" in proc.stderr and message in proc.stderr and "damaged" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m.jsonl").exists()


@pytest.mark.slow
def test_a_huge_line_is_refused_at_its_cap_not_read_whole(run_jsonl: Path, tmp_path: Path) -> None:
    """A 600 MB line (no newline) would cost 600 MB to resume or merge; the cap is 1 MiB a line."""
    part = tmp_path / "p0.jsonl"
    part.write_bytes(run_jsonl.read_bytes())
    with open(part, "ab") as fh:
        fh.write(b'{"path": "' + b"x" * (600 << 20) + b'"}\n')
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (400 << 20, 400 << 20))"
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run(
        [sys.executable, "-c", f"{limit}; from cxr_batch.cli.main import main; main()", "merge", str(part),
         "--out", str(tmp_path / "m.jsonl")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "a line of the part is too large" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- 13b: self-check images


def _bomb(inflated: int) -> str:
    """base64 of a zlib stream of ``inflated`` zero bytes (about 1/1000 of that size)."""
    import base64
    import zlib

    z = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    parts = [z.compress(chunk) for _ in range(inflated >> 20)]
    parts.append(z.flush())
    return base64.b64encode(b"".join(parts)).decode("ascii")


def _self_check(images: dict[str, object], n: int = 4) -> dict[str, object]:
    return {
        "images": images,
        "logits_fp32": [[0.0, 0.0, 0.0]] * n,
        "metric": "max_abs_centred_logit_diff",
        "tolerance": 0.6,
    }


@pytest.mark.slow
def test_a_self_check_zlib_bomb_inflates_no_further_than_its_declared_shape() -> None:
    import tracemalloc

    from cxr_batch.engine.selfcheck import decode_images

    doc = {"encoding": "zlib+base64", "dtype": "uint8", "shape": [4, 32, 32], "data": _bomb(256 << 20)}
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"does not hold 4×32×32 bytes"):
            decode_images(doc)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"inflating the self-check images took {peak:,} bytes"


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([100_000, 100_000, 100_000], "more than the 64 images"),
        ([4, 100_000, 100_000], "pixels a self-check may hold"),
        ([4, 32.0, 32], "a list of integers"),
        ([4, True, 32], "a list of integers"),
        ([0, 32, 32], "N×H×W"),
        ("4x32x32", "a list of integers"),
    ],
)
@pytest.mark.slow
def test_a_self_check_with_a_huge_or_odd_declared_shape_is_malformed(
    shape: object, message: str, make_model, three: list[Path], tmp_path: Path
) -> None:
    from conftest import contract

    images = {"encoding": "zlib+base64", "dtype": "uint8", "shape": shape, "data": _bomb(1 << 20)}
    model = make_model(f"bomb-{abs(hash(str(shape)))}.onnx", meta=contract(extra={"self_check": _self_check(images)}))
    proc = cli("classify", str(three[0]), "--model", str(model), "--out", str(tmp_path / "r.csv"), "-q", timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "'self_check' entry is malformed" in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_self_check_bomb_in_a_model_is_refused_within_a_memory_limit(
    make_model, three: list[Path], tmp_path: Path
) -> None:
    """1 GB from 1 MB: refused as malformed in a process limited to 1.5 GB of address space."""
    import subprocess
    import sys

    from conftest import REPO, contract

    images = {"encoding": "zlib+base64", "dtype": "uint8", "shape": [4, 32, 32], "data": _bomb(1 << 30)}
    model = make_model("bomb-1g.onnx", meta=contract(extra={"self_check": _self_check(images)}))
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))"
    proc = subprocess.run(
        [sys.executable, "-c", f"{limit}; from cxr_batch.cli.main import main; main()", "classify", str(three[0]),
         "--model", str(model), "--out", str(tmp_path / "r.csv"), "-q"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "does not hold 4×32×32 bytes" in proc.stderr and "Traceback" not in proc.stderr


def test_a_contract_nested_200000_deep_is_invalid_json_not_a_crash(
    make_model, three: list[Path], tmp_path: Path
) -> None:
    from conftest import contract

    doc = json_dumps(contract())
    deep = doc[:-1] + ', "extra": {"x": ' + "[" * 200_000 + "]" * 200_000 + "}}"
    model = make_model("deep-contract.onnx", meta=deep)
    proc = cli("classify", str(three[0]), "--model", str(model), "--out", str(tmp_path / "r.csv"), "-q", timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "metadata is not valid JSON (nested more than 64 levels deep)" in proc.stderr
    assert "Traceback" not in proc.stderr


def json_dumps(doc: object) -> str:
    import json

    return json.dumps(doc)


# --------------------------------------------------------------------------- 13c: bytes per batch


@pytest.mark.slow
def test_a_large_input_model_runs_smaller_batches_with_bounded_memory(
    make_model, three: list[Path], tmp_path: Path
) -> None:
    """A real ONNX model whose contract asks for 4096×4096 inputs (201 MB an image, ~1 GB with the
    model's own activations): at the default batch of 16 that is 3.2 GB of input a batch (8 images
    here: one batch of 8, about 8 GB at the peak); the engine runs batches of 2 (under 512 MiB).
    Measured here with this test's model on 12 copies: peak RSS 2.0 GB at --batch-size 1, 3.3 GB at 2."""
    import json
    import subprocess
    import sys

    from conftest import REPO, contract

    model = make_model("big-input.onnx", meta=contract(input_size=[4096, 4096]), size=(4096, 4096))
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(8):
        shutil.copy(three[i % 3], folder / f"{i:02d}.png")
    out = tmp_path / "r.csv"
    measure = (
        "import sys, atexit; "  # VmHWM: this process's peak RSS (ru_maxrss would inherit pytest's through exec)
        "atexit.register(lambda: print('maxrss_kb', [l.split()[1] for l in open('/proc/self/status') "
        "if l.startswith('VmHWM')][0], file=sys.stderr)); "
        "sys.argv = ['cxr-batch'] + sys.argv[1:]; "
        "from cxr_batch.cli.main import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", measure, "classify", str(folder), "--model", str(model), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [r["status"] for r in rows(out)] == ["ok"] * 8
    record = json.loads(Path(f"{out}.provenance.json").read_text())
    assert record["runs"][-1]["settings"]["batch_size"] == 2, record["runs"][-1]["settings"]
    assert "batches of 2 images, not 16" in proc.stderr
    maxrss = int(proc.stderr.rsplit("maxrss_kb", 1)[1].split()[0]) * 1024
    # One batch of all 8 would hold 8 inputs (1.6 GB) and the activations of 8 images at once.
    assert maxrss < 5_000_000_000, f"peak memory {maxrss:,} bytes"


# --------------------------------------------------------------------------- 13a: codestream size


def _compressed_dicom(src: Path, path: Path, fmt: str, patch: object = None, fragment: int = 0) -> Path:
    """A real X-ray at 64×64, compressed as JPEG (baseline) or JPEG 2000, in a DICOM whose header
    says 64×64; ``patch(codestream) -> codestream`` forges the codestream's own size."""
    import io

    pydicom = pytest.importorskip("pydicom")
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, generate_uid

    buf = io.BytesIO()
    img = Image.open(src).convert("L").resize((64, 64))
    if fmt == "j2k":
        img.save(buf, "JPEG2000", irreversible=False, no_jp2=True)
        tsyntax = JPEG2000Lossless
    else:
        img.save(buf, "JPEG", quality=90)
        tsyntax = JPEGBaseline8Bit
    stream = buf.getvalue()
    if patch is not None:
        stream = patch(stream)  # type: ignore[operator]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = tsyntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = 64, 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([stream], fragments_per_frame=-(-len(stream) // fragment) if fragment else 1)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    del pydicom
    return path


def _j2k_size(width: int, height: int):  # type: ignore[no-untyped-def]
    import struct

    def patch(stream: bytes) -> bytes:
        at = stream.index(b"\xff\x4f\xff\x51")
        return stream[: at + 8] + struct.pack(">II", width, height) + stream[at + 16 :]

    return patch


def _jpeg_size(width: int, height: int):  # type: ignore[no-untyped-def]
    import struct

    def patch(stream: bytes) -> bytes:
        at = stream.index(b"\xff\xc0")
        return stream[: at + 5] + struct.pack(">HH", height, width) + stream[at + 9 :]

    return patch


@pytest.mark.parametrize(
    ("fmt", "patch", "message"),
    [
        ("j2k", _j2k_size(20000, 20000), "its JPEG 2000 codestream is 20000×20000 pixels, the limit"),
        ("j2k", _j2k_size(8000, 8000), "its JPEG 2000 codestream is 8000×8000 pixels but its header says 64×64"),
        ("j2k", _j2k_size(0, 64), "its codestream says the image is 0×64 pixels"),
        ("jpeg", _jpeg_size(20000, 20000), "its JPEG codestream is 20000×20000 pixels, the limit"),
        ("jpeg", _jpeg_size(8000, 8000), "its JPEG codestream is 8000×8000 pixels but its header says 64×64"),
        ("jpeg", _jpeg_size(64, 0), "its codestream says the image is 64×0 pixels"),
        ("jpeg", _jpeg_size(0, 0), "its codestream says the image is 0×0 pixels"),
        ("jpeg", lambda b: b[:2] + b"\xff\xda\x00\x08" + b[2:], "no frame header before its scan"),
        ("jpeg", lambda b: b"\x00" + b, "does not start with a JPEG marker"),
        ("j2k", lambda b: b[:2] + b"\x00\x00" + b[4:], "no frame header"),
    ],
)
def test_a_codestream_larger_than_its_header_is_refused_before_decoding(
    fmt: str, patch: object, message: str, three: list[Path], tmp_path: Path
) -> None:
    import tracemalloc

    from cxr_batch.errors import ImageError
    from cxr_batch.io.preprocess import decode

    forged = _compressed_dicom(three[0], tmp_path / "forged.dcm", fmt, patch)
    assert forged.stat().st_size < 16_000  # a few kilobytes that would decode to up to 800 MB
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match=message):
            decode(forged, (32, 32))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{peak:,} bytes"


@pytest.mark.parametrize("fragment", [0, 8])
@pytest.mark.parametrize("fmt", ["j2k", "jpeg"])
def test_an_honest_compressed_dicom_still_decodes(fmt: str, fragment: int, three: list[Path], tmp_path: Path) -> None:
    """Also with the codestream cut into 8-byte fragments: its size is found across them."""
    from cxr_batch.io.preprocess import decode

    ok = _compressed_dicom(three[0], tmp_path / "ok.dcm", fmt, fragment=fragment)
    decoded = decode(ok, (32, 32))
    assert (decoded.width, decoded.height) == (64, 64) and decoded.grey.std() > 0.01


@pytest.mark.slow
def test_a_forged_jpeg2000_dicom_is_an_error_row_in_a_bounded_process(
    three: list[Path], tiny_onnx: Path, tmp_path: Path
) -> None:
    """8 KB that openjpeg would decode into an 8000×8000 frame: an error row, and the process stays small."""
    folder = tmp_path / "in"
    folder.mkdir()
    _compressed_dicom(three[0], folder / "forged.dcm", "j2k", _j2k_size(8000, 8000))
    _compressed_dicom(three[1], folder / "honest.dcm", "j2k")
    out = tmp_path / "r.csv"
    measure = (
        "import sys, atexit; "  # VmHWM: this process's peak RSS (ru_maxrss would inherit pytest's through exec)
        "atexit.register(lambda: print('maxrss_kb', [l.split()[1] for l in open('/proc/self/status') "
        "if l.startswith('VmHWM')][0], file=sys.stderr)); "
        "from cxr_batch.cli.main import main; main()"
    )
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run(
        [sys.executable, "-c", measure, "classify", str(folder), "--model", str(tiny_onnx), "--out", str(out), "-q"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    got = {r["path"]: r for r in rows(out)}
    assert got["honest.dcm"]["status"] == "ok"
    assert "8000×8000 pixels but its header says 64×64" in got["forged.dcm"]["error"]
    maxrss = int(proc.stderr.rsplit("maxrss_kb", 1)[1].split()[0]) * 1024
    assert maxrss < 400_000_000, f"{maxrss:,} bytes"  # unchecked, decoding it took a process to 517 MB


# --------------------------------------------------------------------------- 13d: train's hashes, lists read whole


def test_train_split_refuses_a_sparse_4gb_image_instead_of_hashing_it(three: list[Path], tmp_path: Path) -> None:
    import time
    import tracemalloc

    from cxr_batch.errors import DataError
    from cxr_batch.io.labelled import find_labelled, make_split

    root = tmp_path / "data"
    for label in ("normal", "covid", "viral"):
        (root / label).mkdir(parents=True)
    for i, src in enumerate(three):
        for label in ("normal", "covid", "viral"):
            shutil.copy(src, root / label / f"{i}.png")
    with open(root / "covid" / "huge.png", "wb") as fh:
        fh.truncate(4 << 30)  # 4 GB of holes: hashing it reads 4 GB
    data = find_labelled(root)
    start = time.perf_counter()
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"huge.png is too large \(4,294,967,296 bytes"):
            make_split(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 10 and peak < 16 << 20
    (root / "covid" / "huge.png").unlink()
    split = make_split(find_labelled(root))
    assert len(split.rows) == 9 and all(len(r[3]) == 64 for r in split.rows)


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory", "sparse"])
def test_split_and_labels_files_are_read_through_the_opener(kind: str, tmp_path: Path) -> None:
    from cxr_batch.errors import DataError
    from cxr_batch.evaluation.evaluate import csv_truth
    from cxr_batch.io.labelled import Split

    target = tmp_path / "split.csv"
    _hostile(kind, target)
    with pytest.raises(DataError, match="split file"):
        Split.read(target)
    with pytest.raises(DataError, match="labels file"):
        csv_truth(target, tmp_path, ("normal", "viral", "covid"))
