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
