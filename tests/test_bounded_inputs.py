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
