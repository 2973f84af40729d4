"""The one output writer (cxr_batch.io.safe_write): atomic, never through a link, never outside."""

from __future__ import annotations

import os
import stat

import pytest

from cxr_batch.io.safe_write import LinkRefused, OutputDir, atomic_file, write_file_atomic


def test_writes_atomically_and_replaces_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "page.html").symlink_to(victim)
    with OutputDir(out) as d:
        d.write_text("page.html", "<p>new</p>")
    assert victim.read_text() == "keep me"
    assert not (out / "page.html").is_symlink()
    assert (out / "page.html").read_text() == "<p>new</p>"
    assert [p.name for p in out.iterdir()] == ["page.html"]  # no temporary file left


def test_refuses_linked_subfolder_and_escapes(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "thumbs").symlink_to(elsewhere, target_is_directory=True)
    with OutputDir(out) as d:
        with pytest.raises(LinkRefused):
            d.write_bytes("thumbs/a.png", b"x")
        for bad in ("../x", "/etc/x", "a/../../x", ""):
            with pytest.raises(LinkRefused):
                d.write_bytes(bad, b"x")
        d.write_bytes("deep/er/a.bin", b"ok")
    assert list(elsewhere.iterdir()) == []
    assert (out / "deep/er/a.bin").read_bytes() == b"ok"


def test_error_leaves_the_earlier_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as fh:
        fh.write(b"half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv"]


def test_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_file_atomic(tmp_path / "a.csv", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.csv").stat().st_mode) == 0o644
