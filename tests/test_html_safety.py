"""The HTML report against hostile reports and folders (issue 21): it reads only under --images,
never blocks on a FIFO or reads a device, stops on SIGTERM, rebuilds after a killed build, and
never writes through a planted link (style.css, pages, thumbnails, thumbs/)."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SAMPLE_IMAGES, run_cli

from cxr_batch.cli.main import main

REPO = Path(__file__).resolve().parents[1]
XRAYS = sorted(p for p in SAMPLE_IMAGES.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))

pytestmark = pytest.mark.skipif(len(XRAYS) < 3, reason=f"needs the sample X-rays in {SAMPLE_IMAGES}")


cli = run_cli


def cli_process(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The CLI in a new process, for a run that could hang (a FIFO, a device): the timeout fails the test."""
    return subprocess.run(
        [sys.executable, "-m", "cxr_batch.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def _classified(tmp_path: Path, n: int = 2) -> tuple[Path, Path]:
    """(images folder with ``n`` real X-rays, the report classify wrote for it)."""
    images = tmp_path / "images"
    images.mkdir()
    for src in XRAYS[:n]:
        shutil.copy(src, images / src.name)
    report = tmp_path / "r.csv"
    res = CliRunner().invoke(main, ["classify", str(images), "--out", str(report), "-q"])
    assert res.exit_code == 0, res.output
    return images, report


def _add_rows(report: Path, paths: list[str]) -> None:
    """Rows naming ``paths``, otherwise copies of the report's first row (what a hostile report holds)."""
    with open(report, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with open(report, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        for path in paths:
            writer.writerow({**rows[0], "path": path})


def _thumbs(site: Path) -> list[Path]:
    return [p for p in (site / "thumbs").rglob("*.jpg")]


def _pages(site: Path) -> str:
    return "".join(p.read_text(encoding="utf-8") for p in site.glob("*.html"))


# --------------------------------------------------------------------------- 7: reads outside the images


def test_report_paths_outside_the_images_are_never_read(tmp_path: Path) -> None:
    images, report = _classified(tmp_path)
    secret = tmp_path / "secret"
    secret.mkdir()
    shutil.copy(XRAYS[2], secret / "private.png")  # a real image: it would make a thumbnail
    (images / "link.png").symlink_to(secret / "private.png")
    _add_rows(report, [str(secret / "private.png"), "../secret/private.png", "link.png"])
    site = tmp_path / "site"
    res = cli("report", str(report), "--images", str(images), "--html", str(site))
    assert res.returncode == 0, res.stderr
    assert len(_thumbs(site)) == 2  # the two images under --images, nothing of the secret folder
    assert _pages(site).count("outside the image folders") == 3


def test_classify_html_shows_named_files_but_not_others(tmp_path: Path) -> None:
    """``classify a.png --html``: the file named on the command line is shown (it was named)."""
    named = tmp_path / "named.png"
    shutil.copy(XRAYS[0], named)
    res = cli("classify", str(named), "--out", str(tmp_path / "r.csv"), "--html", str(tmp_path / "site"), "-q")
    assert res.returncode == 0, res.stderr
    assert len(_thumbs(tmp_path / "site")) == 1


# --------------------------------------------------------------------------- 11: hangs


@pytest.mark.slow
def test_a_fifo_and_a_link_to_dev_zero_never_hang_the_report(tmp_path: Path) -> None:
    images, report = _classified(tmp_path)
    os.mkfifo(images / "fifo.png")
    (images / "zero.png").symlink_to("/dev/zero")
    _add_rows(report, ["fifo.png", "zero.png"])
    site = tmp_path / "site"
    res = cli_process("report", str(report), "--images", str(images), "--html", str(site), timeout=60)
    assert res.returncode == 0, res.stderr
    pages = _pages(site)
    assert "not a regular file: fifo" in pages
    assert "outside the image folders" in pages  # the link leads out of --images: not even looked at
    # With /dev among the image folders, the device is looked at, and refused as one.
    res = cli_process(
        "report", str(report), "--images", str(images), "--images", "/dev", "--html", str(site), timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert "not a regular file: character device" in _pages(site)


@pytest.mark.slow
def test_classify_html_with_a_fifo_in_the_folder_finishes(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(XRAYS[0], images / XRAYS[0].name)
    os.mkfifo(images / "fifo.png")
    site = tmp_path / "site"
    res = cli_process("classify", str(images), "--out", str(tmp_path / "r.csv"), "--html", str(site), "-q", timeout=90)
    assert res.returncode == 3, res.stderr  # the FIFO's error row
    assert (site / "index.html").is_file()


@pytest.mark.slow
def test_sigterm_stops_the_build_and_the_next_run_rebuilds(tmp_path: Path) -> None:
    images, report = _classified(tmp_path, n=1)
    # 400 distinct real images (each a copy with its own trailing byte): a build of some seconds.
    data = XRAYS[0].read_bytes()
    names = []
    for i in range(400):
        (images / f"c{i:03d}{XRAYS[0].suffix}").write_bytes(data + i.to_bytes(2, "big"))
        names.append(f"c{i:03d}{XRAYS[0].suffix}")
    _add_rows(report, names)
    site = tmp_path / "site"
    args = [sys.executable, "-m", "cxr_batch.cli", "report", str(report), "--images", str(images), "--html", str(site)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        deadline = time.time() + 60
        while not (site / "thumbs" / "unavailable.png").exists() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=20)  # a SIGTERM ends the build within seconds
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"the build ignored {sig.name}")
        if sig == signal.SIGTERM:
            assert proc.returncode == 130, err
            assert b"Interrupted (SIGTERM)" in err
        assert not (site / "index.html").exists() or len(_thumbs(site)) < 401  # it really stopped early
    res = cli("report", str(report), "--images", str(images), "--html", str(site))
    assert res.returncode == 0, res.stderr  # the killed build's folder is rebuilt, not refused
    assert len(_thumbs(site)) == 401
    assert not [p for p in site.rglob("*.tmp")]


def test_a_folder_left_by_an_older_killed_build_is_rebuilt(tmp_path: Path) -> None:
    """Before the marker was written first, a killed build left thumbs/ and no marker."""
    images, report = _classified(tmp_path)
    site = tmp_path / "site"
    (site / "thumbs" / "ab").mkdir(parents=True)
    shutil.copy(REPO / "sample_images" / "README.md", site / "thumbs" / "ab" / "x.jpg")
    (site / "thumbs" / "unavailable.png").write_bytes(b"\x89PNG")
    (site / "style.css").write_text("x")
    res = cli("report", str(report), "--images", str(images), "--html", str(site))
    assert res.returncode == 0, res.stderr
    # A folder with anything else in it is still refused.
    other = tmp_path / "other"
    (other / "thumbs").mkdir(parents=True)
    (other / "thumbs" / "unavailable.png").write_bytes(b"\x89PNG")
    (other / "notes.txt").write_text("mine")
    res = cli("report", str(report), "--images", str(images), "--html", str(other))
    assert res.returncode == 1 and "other files" in res.stderr


# --------------------------------------------------------------------------- 2: links in the report folder


def test_planted_links_in_the_report_folder_are_replaced_never_followed(tmp_path: Path) -> None:
    images, report = _classified(tmp_path)
    site = tmp_path / "site"
    args = ("report", str(report), "--images", str(images), "--html", str(site))
    assert cli(*args).returncode == 0
    victims = {}
    digest = hashlib.sha256((images / XRAYS[0].name).read_bytes()).hexdigest()
    thumb = site / "thumbs" / digest[:2] / f"{digest[:32]}.jpg"
    assert thumb.is_file()
    for name, where in {
        "style": site / "style.css",
        "index": site / "index.html",
        "thumb": thumb,
        "placeholder": site / "thumbs" / "unavailable.png",
    }.items():
        victim = tmp_path / f"victim-{name}.txt"
        victim.write_text(f"precious {name}")
        victims[victim] = victim.read_text()
        where.unlink()
        where.symlink_to(victim)
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    for victim, content in victims.items():
        assert victim.read_text() == content, victim
    for where in (site / "style.css", site / "index.html", thumb, site / "thumbs" / "unavailable.png"):
        assert where.is_file() and not where.is_symlink(), where
    assert thumb.read_bytes()[:2] == b"\xff\xd8"  # a JPEG again, made anew (the link was not "reused")


def test_a_linked_thumbs_folder_is_refused(tmp_path: Path) -> None:
    images, report = _classified(tmp_path)
    site = tmp_path / "site"
    args = ("report", str(report), "--images", str(images), "--html", str(site))
    assert cli(*args).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(site / "thumbs")
    (site / "thumbs").symlink_to(elsewhere, target_is_directory=True)
    res = cli(*args)
    assert res.returncode == 1
    assert "symbolic link" in res.stderr and "Traceback" not in res.stderr
    assert list(elsewhere.iterdir()) == []


def test_a_linked_thumbnail_sub_folder_gets_a_card_not_a_write(tmp_path: Path) -> None:
    images, report = _classified(tmp_path, n=1)
    site = tmp_path / "site"
    args = ("report", str(report), "--images", str(images), "--html", str(site))
    assert cli(*args).returncode == 0
    digest = hashlib.sha256((images / XRAYS[0].name).read_bytes()).hexdigest()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(site / "thumbs" / digest[:2])
    (site / "thumbs" / digest[:2]).symlink_to(elsewhere, target_is_directory=True)
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    assert list(elsewhere.iterdir()) == []
    assert "symbolic link" in _pages(site)
