"""Issue 12, outputs and process: model identity, locks, heatmap safety, CSV formula cells,
terminal escaping, full disks, signals, evaluate's labels, BOMs.

On real files: X-rays from ../shared/data, the shipped model (export/cxr-resnet18*.onnx), real
symbolic links, real signals sent to real subprocesses, /dev/full and small tmpfs mounts (as root;
those tests skip with a reason where mounting is not allowed).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO, sigint_default, strip_run_ids
from PIL import Image

from cxr_batch.cli.main import main
from cxr_batch.engine.classifier import find_default_model
from cxr_batch.report.cells import escape_cell, unescape_cell
from cxr_batch.text import markup, shown

ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


# --------------------------------------------------------------------------- helpers


def cli(*args: str) -> tuple[int, str]:
    """Run the CLI in this process; a Python exception other than SystemExit (a traceback) fails the test."""
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"traceback instead of a message: {result.exception!r}\n{result.output}")
    return result.exit_code, result.stderr


def spawn(*args: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "cxr_batch.cli", *args]
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, cwd=REPO, preexec_fn=sigint_default
    )


def wait_for_rows(out: Path, proc: subprocess.Popen[bytes], rows: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= rows + 1:
            return
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"the run ended before it could be interrupted (rc {proc.returncode}): {err}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no {rows} rows in {out} after {timeout} s")


def read_rows(path: Path) -> list[dict[str, str]]:
    """The report as cxr-batch means it: formula-neutralised cells read back."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return [{k: unescape_cell(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def real_xrays(shared: Path, folder: Path, n: int, classes: tuple[str, ...] = ("normal", "covid")) -> list[Path]:
    """Copy ``n`` real X-rays per class into ``folder/<class>/``."""
    out = []
    for label in classes:
        src = sorted((shared / "covid19-radiography" / label).glob("*.png"))[:n]
        (folder / label).mkdir(parents=True, exist_ok=True)
        for f in src:
            out.append(Path(shutil.copy(f, folder / label / f.name)))
    return out


@pytest.fixture
def xrays(shared_data: Path, tmp_path: Path) -> Path:
    """Four real X-rays: normal/ (2) and covid/ (2)."""
    root = tmp_path / "xrays"
    real_xrays(shared_data, root, 2)
    return root


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[object]:
    """``mount_tmpfs(name, size)`` mounts a small tmpfs (a disk that really fills up); unmounted after."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount_read_only(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)


def fill(where: Path, leave: int = 0) -> None:
    """Fill the file system at ``where`` until at most ``leave`` bytes are free."""
    with open(where / "filler", "ab", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            st = os.statvfs(where)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                break
            fh.write(b"\0" * min(4096, free - leave))


# --------------------------------------------------------------------------- 4: model identity


def shipped_version() -> str:
    import onnxruntime as ort

    from cxr_batch.contract import read_contract

    sess = ort.InferenceSession(str(REPO / "export" / "cxr-resnet18.onnx"), providers=["CPUExecutionProvider"])
    return read_contract(sess).version


@pytest.mark.slow
def test_rows_name_the_model_file_and_precision_and_resume_refuses_another(xrays: Path, tmp_path: Path) -> None:
    int8, fp32 = find_default_model("int8"), find_default_model("fp32")
    out = tmp_path / "r.csv"
    assert cli("classify", str(xrays), "--out", str(out), "--precision", "int8", "-q")[0] == 0
    rows = read_rows(out)
    assert len(rows) == 4
    assert {(r["model"], r["model_sha256"], r["precision"]) for r in rows} == {
        (f"cxr-resnet18@{shipped_version()}", sha256(int8), "int8")
    }
    # Drop two rows (an interrupted run), then resume with the fp32 model of the same name@version.
    lines = out.read_bytes().split(b"\r\n")
    out.write_bytes(b"\r\n".join(lines[:3]) + b"\r\n")
    before = out.read_bytes()
    code, err = cli("classify", str(xrays), "--out", str(out), "--precision", "fp32", "--resume", "-q")
    assert code == 1
    assert sha256(int8) in err and sha256(fp32) in err and "int8" in err and "fp32" in err
    assert out.read_bytes() == before  # nothing mixed in
    code, _ = cli("classify", str(xrays), "--out", str(out), "--precision", "int8", "--resume", "-q")
    assert code == 0 and len(read_rows(out)) == 4

    # A report of an older cxr-batch (no model_sha256, precision) is refused, not trusted by name@version.
    old = tmp_path / "old.csv"
    with open(out, newline="") as fh:
        records = list(csv.reader(fh))
    keep = [i for i, c in enumerate(records[0]) if c not in ("model_sha256", "precision")]
    with open(old, "w", newline="") as fh:
        csv.writer(fh, lineterminator="\r\n").writerows([[rec[i] for i in keep] for rec in records[:3]])
    code, err = cli("classify", str(xrays), "--out", str(old), "--precision", "int8", "--resume", "-q")
    assert code == 1 and "older cxr-batch" in err and "model_sha256" in err


@pytest.mark.slow
def test_merge_refuses_parts_of_another_model_file_or_precision(xrays: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "p0.csv", tmp_path / "p1.csv"
    assert cli("classify", str(xrays), "--out", str(a), "--shard", "0/2", "--precision", "int8", "-q")[0] == 0
    assert cli("classify", str(xrays), "--out", str(b), "--shard", "1/2", "--precision", "fp32", "-q")[0] == 0
    assert read_rows(a) and read_rows(b)
    code, err = cli("merge", str(a), str(b), "--out", str(tmp_path / "m.csv"), "--expect", "2")
    assert code == 1 and "int8" in err and "fp32" in err
    assert sha256(find_default_model("int8")) in err and sha256(find_default_model("fp32")) in err
    assert not (tmp_path / "m.csv").exists()


# --------------------------------------------------------------------------- 5: one writer at a time


@pytest.mark.slow
def test_a_second_writer_of_the_report_or_heatmaps_is_refused(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "covid19-radiography" / "normal"  # 2,200 images: still running when checked
    out, heat = tmp_path / "r.csv", tmp_path / "heat"
    first = spawn("classify", str(folder), "--out", str(out), "--heatmaps", str(heat),
                  "--precision", "fp32", "--threads", "1", "--batch-size", "1", "-q")  # fmt: skip
    try:
        wait_for_rows(out, first, 2)
        for args in (["--out", str(out), "--resume"], ["--out", str(out), "--overwrite"]):
            code, err = cli("classify", str(folder), *args, "-q")
            assert code == 1 and "being written by another cxr-batch run" in err and str(out) in err
        assert out.read_bytes().count(b"\n") >= 3  # --overwrite did not truncate the running report
        code, err = cli("classify", str(folder), "--out", str(tmp_path / "other.csv"), "--heatmaps", str(heat), "-q")
        assert code == 1 and "heatmap folder" in err and "another cxr-batch run" in err
        assert not (tmp_path / "other.csv").exists()
        assert first.poll() is None, "the first run must still be running during the checks"
    finally:
        first.kill()
        first.wait(60)
    # The lock goes with the process, even after kill -9.
    code, err = cli("classify", str(folder / "Normal-10004.png"), "--out", str(out), "--resume", "--precision", "fp32")
    assert code == 0 and "resumed: kept" in err


# --------------------------------------------------------------------------- 8: heatmaps atomic, checked, redone


def test_unwritable_heatmap_folder_is_fatal_before_the_run(xrays: Path, tmp_path: Path, mount_tmpfs: object) -> None:
    ro = mount_tmpfs("ro", "64k")  # type: ignore[operator]
    remount_read_only(ro)
    out = tmp_path / "r.csv"
    code, err = cli("classify", str(xrays), "--out", str(out), "--heatmaps", str(ro), "-q")
    assert code == 1 and "not writable" in err and "Read-only file system" in err
    assert not out.exists()  # nothing classified


@pytest.mark.slow
def test_full_disk_keeps_earlier_heatmaps_and_leaves_no_partial_file(
    xrays: Path, tmp_path: Path, mount_tmpfs: object
) -> None:
    disk = mount_tmpfs("heat", "2m")  # type: ignore[operator]
    heat = disk / "h"
    out = tmp_path / "r.csv"
    assert cli("classify", str(xrays), "--out", str(out), "--heatmaps", str(heat), "-q")[0] == 0
    good = {p: p.read_bytes() for p in heat.rglob("*.png")}
    assert len(good) == 4 and all(good.values())
    fill(disk, leave=8192)  # room for the writability probe, not for a heatmap
    code, err = cli("classify", str(xrays), "--out", str(out), "--overwrite", "--heatmaps", str(heat), "-q")
    assert code == 0 and "No space left on device" in err  # a warning per heatmap; the rows stand
    assert len(read_rows(out)) == 4
    assert {p: p.read_bytes() for p in heat.rglob("*.png")} == good  # earlier heatmaps intact
    assert [p.name for p in heat.rglob("*") if p.is_file() and not p.name.endswith(".png")] == []  # no temp left


@pytest.mark.slow
def test_resume_makes_missing_and_empty_heatmaps_again(xrays: Path, tmp_path: Path) -> None:
    out, heat = tmp_path / "r.csv", tmp_path / "heat"
    assert cli("classify", str(xrays), "--out", str(out), "--heatmaps", str(heat), "-q")[0] == 0
    maps = sorted(heat.rglob("*.png"))
    assert len(maps) == 4
    maps[0].write_bytes(b"")  # what kill -9 left with the old in-place writes
    maps[1].unlink()
    report = out.read_bytes()
    code, err = cli("classify", str(xrays), "--out", str(out), "--resume", "--heatmaps", str(heat))
    assert code == 0 and "making 2 missing or empty heatmap(s)" in err
    assert out.read_bytes() == report  # rows kept as they were
    for m in maps:
        with Image.open(m) as im:
            assert im.size[0] > 0 and im.format == "PNG"


# --------------------------------------------------------------------------- 10: resume across path styles


@pytest.mark.slow
def test_resume_with_absolute_paths_on_a_relative_report(xrays: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    assert cli("classify", str(xrays), "--out", str(out), "-q")[0] == 0
    full = read_rows(out)
    lines = out.read_bytes().split(b"\r\n")
    out.write_bytes(b"\r\n".join(lines[:3]) + b"\r\n")  # interrupted after 2 rows
    code, err = cli("classify", str(xrays), "--out", str(out), "--resume", "--absolute-paths")
    assert code == 0 and "written with relative paths" in err
    rows = read_rows(out)
    assert [r["path"] for r in rows] == [r["path"] for r in full]  # one row per file, one style
    assert cli("classify", str(xrays), "--out", str(out), "--resume", "--absolute-paths", "-q")[0] == 0
    assert len(read_rows(out)) == 4


# --------------------------------------------------------------------------- 11: links in the heatmap folder


@pytest.mark.slow
def test_links_in_the_heatmap_folder_are_never_followed(xrays: Path, tmp_path: Path) -> None:
    heat = tmp_path / "heat"
    (heat / "normal").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    name = sorted((xrays / "normal").iterdir())[0].name + ".png"
    (heat / "normal" / name).symlink_to(victim)  # a link named like a heatmap
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (heat / "covid").symlink_to(elsewhere, target_is_directory=True)  # a linked sub-folder
    code, err = cli("classify", str(xrays), "--out", str(tmp_path / "r.csv"), "--heatmaps", str(heat), "-q")
    assert code == 0
    assert victim.read_text() == "precious"
    link = heat / "normal" / name
    assert not link.is_symlink() and link.stat().st_size > 0  # the link itself was replaced
    assert list(elsewhere.iterdir()) == []  # nothing written outside the folder
    assert err.count("is a symbolic link; nothing is written through links") == 2
    assert (heat / "covid").is_symlink()


# --------------------------------------------------------------------------- 12: CSV formula cells

FORMULA_NAMES = ["=HYPERLINK(1).png", "+1.png", "-2.png", "@sum.png", "\tt.png", "\rr.png", "'q.png", "plain.png"]


@pytest.mark.slow
def test_formula_leading_names_are_neutralised_and_round_trip(shared_data: Path, tmp_path: Path) -> None:
    src = sorted((shared_data / "covid19-radiography" / "covid").glob("*.png"))
    root = tmp_path / "names"
    root.mkdir()
    for name, f in zip(FORMULA_NAMES, src, strict=False):
        shutil.copy(f, root / name)
    out = tmp_path / "r.csv"
    assert cli("classify", str(root), "--out", str(out), "-q")[0] == 0
    with open(out, newline="") as fh:
        raw = [row[0] for row in csv.reader(fh)][1:]
    assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in raw)
    assert "'=HYPERLINK(1).png" in raw and "''q.png" in raw and "plain.png" in raw
    names = [r["path"] for r in read_rows(out)]
    assert sorted(names) == sorted(FORMULA_NAMES)
    # resume reads them back exactly: after an interruption, one row per file
    lines = out.read_bytes().split(b"\r\n")
    out.write_bytes(b"\r\n".join(lines[:5]) + b"\r\n")
    assert cli("classify", str(root), "--out", str(out), "--resume", "-q")[0] == 0
    assert sorted(r["path"] for r in read_rows(out)) == sorted(FORMULA_NAMES)
    # merge reads them back exactly: shards merge to the same bytes as one run
    parts = [tmp_path / f"p{k}.csv" for k in range(3)]
    for k, p in enumerate(parts):
        assert cli("classify", str(root), "--out", str(p), "--shard", f"{k}/3", "-q")[0] == 0
    whole, merged = tmp_path / "whole.csv", tmp_path / "merged.csv"
    assert cli("classify", str(root), "--out", str(whole), "-q")[0] == 0
    assert cli("merge", *map(str, parts), "--out", str(merged), "--expect", "3", "-q")[0] == 0
    assert strip_run_ids(merged.read_bytes()) == strip_run_ids(whole.read_bytes())
    # JSON lines are left alone
    jsonl = tmp_path / "r.jsonl"
    assert cli("classify", str(root), "--out", str(jsonl), "-q")[0] == 0
    assert sorted(json.loads(line)["path"] for line in jsonl.read_text().splitlines()) == sorted(FORMULA_NAMES)


def test_cell_escaping_is_reversible() -> None:
    for text in ["", "a", "'", "''x", "=1+1", "-", "\t", "normal", "a=b"]:
        assert unescape_cell(escape_cell(text)) == text
    assert escape_cell("=1") == "'=1" and escape_cell("'a") == "''a" and escape_cell("a") == "a"


# --------------------------------------------------------------------------- 13: control characters


@pytest.mark.slow
def test_control_characters_in_names_are_escaped_on_the_terminal(shared_data: Path, tmp_path: Path) -> None:
    evil = "evil\x1b[2J\x07[bold]x\u202e.png"
    data = tmp_path / "data"
    real_xrays(shared_data, data, 1)
    (data / "normal" / evil).write_bytes(b"not an image")
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\nnormal/{evil},normal\n{next((data / 'covid').iterdir()).relative_to(data)},covid\n")
    code, err = cli("evaluate", str(data), "--labels", str(labels), "--out", str(tmp_path / "m.json"))
    assert code == 3
    assert "\x1b" not in err and "\x07" not in err and "\u202e" not in err
    assert "evil\\x1b[2J\\x07[bold]x\\u202e.png" in err  # shown, escaped, rich markup printed literally
    # a heatmap warning (a real image under the evil name, its heatmap folder a link) and an Error: line
    shutil.copy(next((data / "covid").iterdir()), data / "normal" / evil)
    heat = tmp_path / "heat"
    heat.mkdir()
    (heat / "normal").symlink_to(tmp_path, target_is_directory=True)
    code, err = cli("classify", str(data), "--out", str(tmp_path / "r.csv"), "-q", "--heatmaps", str(heat))
    assert code == 0 and "no heatmap for normal/evil" in err
    assert "\x1b" not in err and "\x07" not in err and "evil\\x1b[2J\\x07[bold]x\\u202e.png" in err
    bad_out = tmp_path / "s\x1b]0;pwned\x07"
    bad_out.mkdir()
    code, err = cli("classify", str(data), "--out", str(bad_out))
    assert code == 1 and "\x1b" not in err and "\x07" not in err and "s\\x1b]0;pwned\\x07" in err


def test_shown_escapes_every_control_and_format_character() -> None:
    raw = "a\x00\x1b\x7f\x85\n\r\t\u200b\u2066\ufeff" + os.fsdecode(b"\xff") + "z"
    assert shown(raw) == "a\\x00\\x1b\\x7f\\x85\\n\\r\\t\\u200b\\u2066\\ufeff\\xffz"
    assert markup("[red]x") == "\\[red]x"
    assert shown("é中 ok") == "é中 ok"


# --------------------------------------------------------------------------- 14: full disk, read-only, lists


@pytest.mark.slow
def test_full_disk_under_the_report_is_an_error_naming_it(xrays: Path, tmp_path: Path, mount_tmpfs: object) -> None:
    code, err = cli("classify", str(xrays), "--out", "/dev/full", "--overwrite", "-q")
    assert code == 1 and "Error: cannot write the report /dev/full: No space left on device" in err
    disk = mount_tmpfs("rep", "4k")  # type: ignore[operator]
    out = disk / "r.csv"
    fill(disk, leave=0)
    os.unlink(disk / "filler")
    fill(disk, leave=0)  # the header fits nowhere either
    code, err = cli("classify", str(xrays), "--out", str(out), "-q")
    assert code == 1 and f"cannot write the report {out}" in err and "No space left on device" in err


@pytest.mark.slow
def test_full_disk_rows_written_are_kept_and_resume_finishes(
    shared_data: Path, tmp_path: Path, mount_tmpfs: object
) -> None:
    root = tmp_path / "many"
    real_xrays(shared_data, root, 15)  # 30 rows: more than the 4 KiB disk holds
    disk = mount_tmpfs("rep", "4k")  # type: ignore[operator]
    out = disk / "r.csv"
    # the provenance record goes elsewhere: this test fills the disk with report rows only
    prov = tmp_path / "r.provenance.json"
    code, err = cli("classify", str(root), "--out", str(out), "--batch-size", "4", "-q", "--provenance", str(prov))
    assert code == 1 and f"cannot write the report {out}: No space left on device" in err and "--resume" in err
    kept = out.read_bytes()
    assert kept.count(b"\r\n") >= 2
    moved = tmp_path / "r.csv"
    moved.write_bytes(kept)  # more room elsewhere; resume finishes
    assert cli("classify", str(root), "--out", str(moved), "--resume", "-q")[0] == 0
    assert sorted(r["path"] for r in read_rows(moved)) == sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*.png")
    )


@pytest.mark.slow
def test_full_disk_for_predictions_merge_and_metrics(xrays: Path, tmp_path: Path, mount_tmpfs: object) -> None:
    code, err = cli("evaluate", str(xrays), "--out", str(tmp_path / "m.json"), "--predictions", "/dev/full",
                    "--overwrite")  # fmt: skip
    assert code == 1 and "cannot write the report /dev/full: No space left on device" in err
    parts = [tmp_path / f"p{k}.csv" for k in range(2)]
    for k, p in enumerate(parts):
        assert cli("classify", str(xrays), "--out", str(p), "--shard", f"{k}/2", "-q")[0] == 0
    disk = mount_tmpfs("full", "64k")  # type: ignore[operator]
    fill(disk, leave=0)
    code, err = cli("merge", *map(str, parts), "--out", str(disk / "m.csv"))
    assert code == 1 and f"cannot write {disk / 'm.csv'}" in err and "No space left on device" in err
    code, err = cli("evaluate", str(xrays), "--out", str(disk / "metrics.json"), "-q")
    assert code == 1 and f"cannot write {disk / 'metrics.json'}" in err
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no 0-byte .tmp left behind


@pytest.mark.slow
def test_read_only_report_under_resume(xrays: Path, tmp_path: Path, mount_tmpfs: object) -> None:
    disk = mount_tmpfs("ro", "256k")  # type: ignore[operator]
    out = disk / "r.csv"
    assert cli("classify", str(xrays / "normal"), "--out", str(out), "-q")[0] == 0
    with open(out, "ab") as fh:
        fh.write(b"covid/COVID-1.png,o")  # the partial last row a killed run leaves
    remount_read_only(disk)
    code, err = cli("classify", str(xrays / "normal"), str(xrays / "covid"), "--out", str(out), "--resume", "-q")
    assert code == 1 and f"cannot write the report {out}: Read-only file system" in err


@pytest.mark.slow
def test_files_from_nul_separated_and_unbounded_input(xrays: Path, tmp_path: Path) -> None:
    find = subprocess.run(["find", str(xrays), "-name", "*.png", "-print0"], capture_output=True, check=True)
    assert find.stdout.count(b"\0") == 4
    out = tmp_path / "r.csv"
    result = CliRunner().invoke(main, ["classify", "--files-from", "-", "--out", str(out), "-q"], input=find.stdout)
    assert result.exit_code == 0, result.output
    assert sorted(r["path"] for r in read_rows(out)) == sorted(os.fsdecode(p) for p in find.stdout.split(b"\0") if p)
    # /dev/zero: a clear error at once, not a memory leak or a hang (a real subprocess, bounded in time)
    proc = subprocess.run(
        [sys.executable, "-m", "cxr_batch.cli", "classify", "--files-from", "/dev/zero", "--out",
         str(tmp_path / "z.csv")], capture_output=True, env=ENV, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and b"Error: --files-from: empty record" in proc.stderr
    assert b"Traceback" not in proc.stderr
    # a binary file read as lines: a bounded record, a clear error
    junk = tmp_path / "junk"
    junk.write_bytes(b"x" * 100_000)
    code, err = cli("classify", "--files-from", str(junk), "--out", str(tmp_path / "j.csv"))
    assert code == 1 and "longer than 4096 bytes" in err


@pytest.mark.slow
def test_merge_of_a_hand_edited_part_names_file_and_line(xrays: Path, tmp_path: Path) -> None:
    parts = [tmp_path / f"p{k}.csv" for k in range(2)]
    for k, p in enumerate(parts):
        assert cli("classify", str(xrays), "--out", str(p), "--shard", f"{k}/2", "-q")[0] == 0
    edited = next(p for p in parts if read_rows(p))
    with open(edited, newline="") as fh:
        records = list(csv.reader(fh))
    records[1][records[0].index("prob_covid")] = "abc"
    with open(edited, "w", newline="") as fh:
        csv.writer(fh, lineterminator="\r\n").writerows(records)
    code, err = cli("merge", *map(str, parts), "--out", str(tmp_path / "m.csv"))
    assert code == 1 and f"Error: {edited} line 2: prob_covid is 'abc', not a number" in err
    # JSON lines: a string where a number belongs
    jparts = [tmp_path / f"p{k}.jsonl" for k in range(2)]
    for k, p in enumerate(jparts):
        assert cli("classify", str(xrays), "--out", str(p), "--shard", f"{k}/2", "-q")[0] == 0
    jedited = next(p for p in jparts if p.read_text())
    rows = [json.loads(line) for line in jedited.read_text().splitlines()]
    rows[0]["confidence"] = "high"
    jedited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = cli("merge", *map(str, jparts), "--out", str(tmp_path / "m.jsonl"))
    assert code == 1 and f"{jedited} line 1: confidence is 'high', not a number" in err


# --------------------------------------------------------------------------- 17: SIGTERM, evaluate Ctrl-C


@pytest.mark.slow
def test_sigterm_is_an_interruption_and_resume_finishes(shared_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "many"
    real_xrays(shared_data, root, 20)
    out = tmp_path / "r.csv"
    args = [
        "classify",
        str(root),
        "--out",
        str(out),
        "--precision",
        "fp32",
        "--threads",
        "1",
        "--batch-size",
        "1",
        "-q",
    ]
    proc = spawn(*args)
    try:
        wait_for_rows(out, proc, 3)
        proc.send_signal(signal.SIGTERM)  # what Slurm sends at the time limit
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert b"Interrupted (SIGTERM): the rows written so far are kept; rerun with --resume" in err
    assert b"Traceback" not in err
    kept = read_rows(out)
    assert 3 <= len(kept) < 40
    resumed = spawn(*args, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    rows = read_rows(out)
    assert len(rows) == 40 and len({r["path"] for r in rows}) == 40 and rows[: len(kept)] == kept


@pytest.mark.slow
def test_evaluate_ctrl_c_exits_130(shared_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    real_xrays(shared_data, data, 20)
    pred = tmp_path / "p.csv"
    proc = spawn("evaluate", str(data), "--out", str(tmp_path / "m.json"), "--predictions", str(pred),
                 "--precision", "fp32", "--threads", "1", "--batch-size", "1", "-q")  # fmt: skip
    try:
        wait_for_rows(pred, proc, 2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert b"Aborted!" not in err and b"Interrupted" in err and b"Traceback" not in err
    assert not (tmp_path / "m.json").exists() and read_rows(pred)


# --------------------------------------------------------------------------- 9: evaluate --labels


@pytest.mark.slow
def test_evaluate_labels_one_file_one_spelling(xrays: Path, tmp_path: Path) -> None:
    n1, n2 = sorted(p.name for p in (xrays / "normal").iterdir())
    c1, c2 = sorted(p.name for p in (xrays / "covid").iterdir())
    labels = tmp_path / "labels.csv"
    labels.write_text(
        f"path,label\n./normal/{n1},normal\nnormal//{n2},normal\nx/../covid/{c1},covid\n{xrays}/covid/{c2},covid\n"
    )
    pred = tmp_path / "p.csv"
    code, err = cli("evaluate", str(xrays), "--labels", str(labels), "--out", str(tmp_path / "m.json"),
                    "--predictions", str(pred), "-q")  # fmt: skip
    assert code == 0, err
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["files"] == 4 and doc["n"] == 4
    assert sorted(r["path"] for r in read_rows(pred)) == sorted(
        [f"normal/{n1}", f"normal/{n2}", f"covid/{c1}", f"covid/{c2}"]
    )

    def refused(text: str) -> str:
        labels.write_text(text)
        code, err = cli("evaluate", str(xrays), "--labels", str(labels), "--out", str(tmp_path / "x.json"))
        assert code == 1 and not (tmp_path / "x.json").exists()
        return err

    err = refused(f"path,label\nnormal/{n1},normal\ncovid/{c1},covid\n./normal//{n1},covid\n")
    assert "lines 2 ('normal/" in err and "and 4 ('./normal//" in err and "'normal' and 'covid'" in err
    shutil.copy(xrays / "normal" / n1, tmp_path / "outside.png")  # a real image, next to DATA_DIR
    err = refused(f"path,label\nnormal/{n1},normal\nnormal/../../outside.png,normal\n")
    assert "is outside DATA_DIR" in err and "line 3" in err
    err = refused(f"path,label\n{tmp_path / 'outside.png'},normal\n")
    assert "is outside DATA_DIR" in err
    # --out and --predictions the same file
    same = tmp_path / "same.json"
    code, err = cli("evaluate", str(xrays), "--out", str(same), "--predictions", str(same))
    assert code == 1 and "name the same file" in err and not same.exists()


# --------------------------------------------------------------------------- 19: BOM


@pytest.mark.slow
def test_merge_accepts_a_part_saved_with_a_bom(xrays: Path, tmp_path: Path) -> None:
    parts = [tmp_path / f"p{k}.csv" for k in range(2)]
    for k, p in enumerate(parts):
        assert cli("classify", str(xrays), "--out", str(p), "--shard", f"{k}/2", "-q")[0] == 0
    parts[0].write_bytes(b"\xef\xbb\xbf" + parts[0].read_bytes())  # as Excel's "CSV UTF-8" saves it
    whole, merged = tmp_path / "whole.csv", tmp_path / "m.csv"
    assert cli("classify", str(xrays), "--out", str(whole), "-q")[0] == 0
    code, err = cli("merge", *map(str, parts), "--out", str(merged), "--expect", "2", "-q")
    assert code == 0, err
    assert strip_run_ids(merged.read_bytes()) == strip_run_ids(whole.read_bytes())
    jparts = [tmp_path / f"p{k}.jsonl" for k in range(2)]
    for k, p in enumerate(jparts):
        assert cli("classify", str(xrays), "--out", str(p), "--shard", f"{k}/2", "-q")[0] == 0
    jparts[1].write_bytes(b"\xef\xbb\xbf" + jparts[1].read_bytes())
    assert cli("merge", *map(str, jparts), "--out", str(tmp_path / "m.jsonl"), "-q")[0] == 0


def test_locked_report_file_mode_is_unchanged(xrays: Path, tmp_path: Path) -> None:
    """Opening through os.open keeps the usual permissions (umask applies) and a regular file."""
    out = tmp_path / "r.csv"
    assert cli("classify", str(xrays), "--out", str(out), "-q")[0] == 0
    mode = stat.S_IMODE(out.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
