"""Input discovery: walk order, hidden files, globs, --files-from, DICOM sniffing, symlink loops."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from cxr_batch.cli.main import main
from cxr_batch.errors import InputError
from cxr_batch.io.inputs import InputSpec, discover, read_path_list


def shown(spec: InputSpec) -> list[str]:
    return [f.display for f in discover(spec).files]


@pytest.fixture
def tree(tmp_path: Path, png_factory: Callable[..., Path]) -> Path:
    root = tmp_path / "tree"
    for rel in ["b.png", "a.JPG", "c.tif", "z/deep/x.bmp", "m/y.jpeg", "m/masks/mask.png", "10.png", "9.png"]:
        png_factory(root / rel, 0)
    (root / "notes.txt").write_text("not an image")
    (root / "data.json").write_text("{}")
    png_factory(root / ".hidden.png", 0)
    png_factory(root / ".cache" / "inside.png", 0)
    # DICOM files by marker, whatever the name: none, a UID-like suffix; and a .dcm by suffix.
    dicm = b"\0" * 128 + b"DICM" + b"rest"
    (root / "m" / "IM0001").write_bytes(dicm)
    (root / "m" / "1.2.840.113619.504").write_bytes(dicm)
    (root / "scan.dcm").write_bytes(b"whatever")
    (root / "fake").write_bytes(b"\0" * 200)  # no suffix, no marker
    return root


def test_walk_is_sorted_recursive_and_skips_hidden_and_other_files(tree: Path) -> None:
    assert shown(InputSpec(paths=(str(tree),))) == [
        "10.png",
        "9.png",
        "a.JPG",
        "b.png",
        "c.tif",
        "m/1.2.840.113619.504",
        "m/IM0001",
        "m/masks/mask.png",
        "m/y.jpeg",
        "scan.dcm",
        "z/deep/x.bmp",
    ]


def test_no_recursive(tree: Path) -> None:
    assert shown(InputSpec(paths=(str(tree),), recursive=False)) == [
        "10.png",
        "9.png",
        "a.JPG",
        "b.png",
        "c.tif",
        "scan.dcm",
    ]


def test_include_and_exclude_globs(tree: Path) -> None:
    spec = InputSpec(paths=(str(tree),), include=("*.png",))
    assert shown(spec) == ["10.png", "9.png", "b.png", "m/masks/mask.png"]
    spec = InputSpec(paths=(str(tree),), exclude=("masks", "*.tif", "z/*"))
    assert shown(spec) == [
        "10.png",
        "9.png",
        "a.JPG",
        "b.png",
        "m/1.2.840.113619.504",
        "m/IM0001",
        "m/y.jpeg",
        "scan.dcm",
    ]
    spec = InputSpec(paths=(str(tree),), include=("m/*",), exclude=("m/masks/*",))
    assert shown(spec) == ["m/1.2.840.113619.504", "m/IM0001", "m/y.jpeg"]


def test_explicit_files_are_always_taken_and_shown_as_given(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    spec = InputSpec(paths=("notes.txt", ".hidden.png", "m"), exclude=("*.txt",))
    assert shown(spec) == ["notes.txt", ".hidden.png", "1.2.840.113619.504", "IM0001", "masks/mask.png", "y.jpeg"]


def test_absolute_paths(tree: Path) -> None:
    files = discover(InputSpec(paths=(str(tree / "m"),), absolute_paths=True, recursive=False)).files
    assert [f.display for f in files] == [str(tree / "m" / n) for n in ("1.2.840.113619.504", "IM0001", "y.jpeg")]
    assert all(os.path.isabs(f.display) for f in files)


def test_each_file_once_even_when_named_twice(tree: Path) -> None:
    spec = InputSpec(paths=(str(tree / "m"), str(tree / "m" / "y.jpeg"), str(tree / "m")))
    assert shown(spec) == ["1.2.840.113619.504", "IM0001", "masks/mask.png", "y.jpeg"]


def test_two_files_with_the_same_report_path_are_refused(tmp_path: Path, png_factory: Callable[..., Path]) -> None:
    png_factory(tmp_path / "siteA" / "0001.png", 1)
    png_factory(tmp_path / "siteB" / "0001.png", 2)
    spec = InputSpec(paths=(str(tmp_path / "siteA"), str(tmp_path / "siteB")))
    with pytest.raises(InputError, match=r"'0001\.png'.*--absolute-paths"):
        discover(spec)
    spec = InputSpec(paths=(str(tmp_path / "siteA"), str(tmp_path / "siteB")), absolute_paths=True)
    assert len(discover(spec).files) == 2


def test_missing_input_is_an_error(tmp_path: Path, runner: CliRunner, tiny_onnx: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        discover(InputSpec(paths=(str(tmp_path / "nope"),)))
    result = runner.invoke(main, ["classify", str(tmp_path / "nope"), "--model", str(tiny_onnx), "--out", "r.csv"])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


def test_symlink_loops_end(tmp_path: Path, png_factory: Callable[..., Path]) -> None:
    root = tmp_path / "loop"
    png_factory(root / "a" / "x.png", 1)
    (root / "a" / "back").symlink_to(root, target_is_directory=True)  # a/back -> root: a cycle
    (root / "a" / "self").symlink_to(root / "a", target_is_directory=True)
    (root / "p").symlink_to(root / "q")  # p -> q -> p: links that never resolve
    (root / "q").symlink_to(root / "p")
    (root / "gone.png").symlink_to(root / "missing.png")  # broken link named like an image
    found = discover(InputSpec(paths=(str(root),)))
    assert [f.display for f in found.files] == ["a/x.png", "gone.png"]


def test_symlinked_folder_is_walked_once(tmp_path: Path, png_factory: Callable[..., Path]) -> None:
    png_factory(tmp_path / "real" / "x.png", 1)
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    assert shown(InputSpec(paths=(str(tmp_path),))) == ["link/x.png"]


def test_read_path_list_keeps_odd_bytes_and_skips_blanks() -> None:
    data = b"a.png\r\n\n  \nb,c.png\nbad\xff.png\n"
    assert read_path_list(io.BytesIO(data)) == ["a.png", "b,c.png", os.fsdecode(b"bad\xff.png")]


def test_files_from_lists_files_and_folders(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    spec = InputSpec(listed=("b.png", "z", "does-not-exist.png"), list_dirs=True)
    # A listed path that does not exist still gets a row (an error row), so it is kept.
    assert shown(spec) == ["b.png", "deep/x.bmp", "does-not-exist.png"]
    # Without list_dirs (--files-from-dirs) a listed folder is one error row, not walked.
    assert shown(InputSpec(listed=("b.png", "z"))) == ["b.png", "z"]


def test_unreadable_subfolder_is_an_error_row_not_a_crash(
    tmp_path: Path, png_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    png_factory(tmp_path / "ok" / "x.png", 1)
    png_factory(tmp_path / "ok" / "locked" / "y.png", 1)
    real_scandir = os.scandir

    def scandir(path: str) -> object:
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = discover(InputSpec(paths=(str(tmp_path / "ok"),)))
    # The folder gets a row of its own (so the run exits 3); real permissions: test_hostile_inputs.py
    assert [(f.display, f.error) for f in found.files] == [
        ("locked/", "cannot list folder: Permission denied; its files were not classified"),
        ("x.png", None),
    ]
    assert found.warnings == []
