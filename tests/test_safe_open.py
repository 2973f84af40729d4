"""The one input opener: regular files only, size-bounded reads, JSON parsed with a depth limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cxr_batch.errors import CxrBatchError
from cxr_batch.io.safe_open import (
    DamagedFileError,
    FileTooLargeError,
    NotRegularFileError,
    iter_lines,
    open_bounded,
    parse_json,
    read_bounded,
    read_json,
)


def test_read_bounded_refuses_a_sparse_file_over_the_cap_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "sparse.bin"
    with open(big, "wb") as fh:
        fh.truncate(4 << 30)  # 4 GB of holes: reading it would cost 4 GB of memory
    with pytest.raises(FileTooLargeError, match="too large") as info:
        read_bounded(big, 1 << 20, what="the record")
    assert isinstance(info.value, CxrBatchError) and isinstance(info.value, OSError)
    assert str(info.value).startswith("the record is too large (4,294,967,296 bytes")
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 100)
    assert read_bounded(small, 100) == b"x" * 100
    with pytest.raises(FileTooLargeError):
        read_bounded(small, 99)


def test_links_to_devices_fifos_and_directories_are_refused_without_blocking(tmp_path: Path) -> None:
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    folder = tmp_path / "dir.json"
    folder.mkdir()
    for path, kind in ((zero, "character device"), (fifo, "fifo"), (folder, "directory")):
        with pytest.raises(NotRegularFileError, match=kind):
            read_json(path)
        with pytest.raises(NotRegularFileError):
            open_bounded(path, 10)


def test_deep_nesting_is_damaged_not_a_recursion_error(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DamagedFileError, match="the record is damaged: nested more than 64"):
        read_json(deep, what="the record")
    # brackets inside strings do not count
    assert parse_json('{"a": "' + "[" * 1000 + '"}') == {"a": "[" * 1000}
    assert parse_json("[" * 64 + "]" * 64) == parse_json("[" * 64 + "]" * 64)
    with pytest.raises(DamagedFileError):
        parse_json("[" * 65 + "]" * 65)


@pytest.mark.parametrize("text", ['{"confidence": NaN}', '{"c": Infinity}', '{"c": -Infinity}', "{", b'"\xff"'])
def test_nan_broken_json_and_bad_utf8_are_damaged(text: str | bytes) -> None:
    with pytest.raises(DamagedFileError, match="is damaged"):
        parse_json(text)


def test_nan_is_allowed_only_when_asked() -> None:
    import math

    assert math.isnan(parse_json('{"c": NaN}', allow_nan=True)["c"])


def test_iter_lines_bounds_each_line(tmp_path: Path) -> None:
    p = tmp_path / "rows.jsonl"
    p.write_bytes(b"a\n" + b"b" * 5000 + b"\nc")
    with open_bounded(p, 1 << 20) as fh:
        it = iter_lines(fh, p, max_bytes=1000, what="a row")
        assert next(it) == b"a\n"
        with pytest.raises(FileTooLargeError, match="a row is too large"):
            next(it)
    with open_bounded(p, 1 << 20) as fh:
        assert list(iter_lines(fh, p)) == [b"a\n", b"b" * 5000 + b"\n", b"c"]
