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


def test_read_existing_never_follows_links_and_is_bounded(tmp_path):
    victim = tmp_path / "secret.txt"
    victim.write_text("secret")
    out = tmp_path / "out"
    (out / "thumbs").mkdir(parents=True)
    (out / "thumbs" / "a.jpg").write_bytes(b"jpeg")
    (out / "thumbs" / "link.jpg").symlink_to(victim)
    os.mkfifo(out / "thumbs" / "pipe.jpg")
    with OutputDir(out) as d:
        assert d.read_existing("thumbs/a.jpg", 100) == b"jpeg"
        assert d.read_existing("thumbs/a.jpg", 3) is None  # larger than the bound
        assert d.read_existing("thumbs/link.jpg", 100) is None
        assert d.read_existing("thumbs/pipe.jpg", 100) is None  # never blocks on a FIFO
        assert d.read_existing("thumbs/missing.jpg", 100) is None
        d.unlink("thumbs/link.jpg")
    assert victim.read_text() == "secret" and not (out / "thumbs" / "link.jpg").exists()


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".x.png.0123456789ab.tmp").write_bytes(b"")
    (out / "linked").symlink_to(elsewhere, target_is_directory=True)
    stale = [out / ".a.png.0123456789ab.tmp", out / "sub" / ".cxr-heatmap-a1b2c3d4e5f6.tmp"]
    for p in stale:
        p.write_bytes(b"")
    keep = [out / "notes.tmp", out / ".hidden", out / "a.png"]
    for p in keep:
        p.write_bytes(b"x")
    with OutputDir(out) as d:
        assert d.remove_stale_temporaries() == 2
        d.check_writable()
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert (elsewhere / ".x.png.0123456789ab.tmp").exists()  # never through a link
    assert sorted(p.name for p in out.iterdir()) == sorted([".hidden", "a.png", "linked", "notes.tmp", "sub"])
