"""Issue 21's output and terminal items on real files: writers never follow planted links (plots,
provenance, the report itself), reports are CSV or JSON lines only by name, merge's report follows
the umask, evaluate reports a FIFO in a class folder, train's --split stays inside its roots,
a killed run's heatmap temporaries are cleaned, and `info` escapes a hostile model's name."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import contract, run_cli

from cxr_batch.cli.main import main

REPO = Path(__file__).resolve().parents[1]


cli = run_cli


def cli_process(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The CLI in a new process, for a run that could hang (a FIFO): the timeout fails the test."""
    return subprocess.run(
        [sys.executable, "-m", "cxr_batch.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.fixture
def labelled(tmp_path: Path, png_factory: Callable[..., Path]) -> Path:
    root = tmp_path / "labelled"
    for i, label in enumerate(("normal", "viral", "covid")):
        for j in range(3):
            png_factory(root / label / f"{label}{j}.png", 10 * i + j)
    return root


def _victim(tmp_path: Path, name: str = "victim.txt") -> Path:
    victim = tmp_path / name
    victim.write_text("precious")
    return victim


# --------------------------------------------------------------------------- item 2: links


@pytest.mark.slow
def test_evaluate_plots_replace_planted_links(labelled: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plots extra (matplotlib) is not installed")
    plots = tmp_path / "plots"
    plots.mkdir()
    victim = _victim(tmp_path)
    (plots / "confusion_matrix.png").symlink_to(victim)
    res = cli(
        "evaluate", str(labelled), "--model", str(tiny_onnx), "--out", str(tmp_path / "m.json"), "--plots", str(plots)
    )
    assert res.returncode == 0, res.stderr
    assert victim.read_text() == "precious"
    assert not (plots / "confusion_matrix.png").is_symlink()
    assert (plots / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_the_provenance_record_replaces_a_planted_link(image_dir: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    victim = _victim(tmp_path)
    Path(f"{out}.provenance.json").symlink_to(victim)
    res = CliRunner().invoke(main, ["classify", str(image_dir), "--model", str(tiny_onnx), "--out", str(out), "-q"])
    # The record exists as a link: like an existing record, it is refused, or replaced; never written through.
    assert victim.read_text() == "precious", res.output


def test_the_report_is_never_written_through_a_link(image_dir: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    victim = _victim(tmp_path)
    out.symlink_to(victim)
    for flag in ("--overwrite", "--resume"):
        res = cli("classify", str(image_dir), "--model", str(tiny_onnx), "--out", str(out), flag, "-q")
        assert res.returncode == 1 and "symbolic link" in res.stderr, res.stderr
        assert victim.read_text() == "precious"


# --------------------------------------------------------------------------- item 15: small ones


@pytest.mark.parametrize("name", ["r.json", "r.txt", "r.xlsx"])
def test_an_unknown_report_suffix_is_refused_not_written_as_csv(
    image_dir: Path, tiny_onnx: Path, tmp_path: Path, name: str
) -> None:
    res = cli("classify", str(image_dir), "--model", str(tiny_onnx), "--out", str(tmp_path / name), "-q")
    assert res.returncode == 1 and ".csv or .jsonl" in res.stderr, res.stderr
    assert not (tmp_path / name).exists()
    # Asked for on purpose, the format is written under that name.
    res = cli("classify", str(image_dir), "--model", str(tiny_onnx), "--out", str(tmp_path / name), "--format", "jsonl")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / name).read_text().startswith("{")


def test_merge_writes_its_report_with_the_umask_mode(image_dir: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    parts = []
    for k in (0, 1):
        part = tmp_path / f"p{k}.csv"
        args = ["classify", str(image_dir), "--model", str(tiny_onnx), "--shard", f"{k}/2", "--out", str(part), "-q"]
        assert runner.invoke(main, args).exit_code == 0
        parts.append(str(part))
    old = os.umask(0o022)
    try:
        res = runner.invoke(main, ["merge", *parts, "--out", str(tmp_path / "m.csv"), "--expect", "2", "-q"])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE((tmp_path / "m.csv").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "m.csv.provenance.json").stat().st_mode) == 0o644


@pytest.mark.slow
def test_evaluate_reports_a_fifo_in_a_class_folder(labelled: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    os.mkfifo(labelled / "viral" / "pipe.png")
    res = cli_process(
        "evaluate", str(labelled), "--model", str(tiny_onnx), "--out", str(tmp_path / "m.json"), timeout=60
    )
    assert res.returncode == 3, res.stderr  # an unreadable file: exit 3, as for classify
    assert "viral/pipe.png" in res.stderr and "not a regular file: fifo" in res.stderr
    assert "class folders (class folders)" not in res.stderr


def test_train_split_paths_outside_the_roots_are_refused(labelled: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the train extra (torch) is not installed")
    from cxr_batch.errors import DataError
    from cxr_batch.io.labelled import Split

    outside = tmp_path / "outside.png"
    outside.write_bytes((labelled / "normal" / "normal0.png").read_bytes())
    for bad in ("../outside.png", str(outside), "normal/../../outside.png"):
        split = Split([(bad, "normal", "train", "", ""), ("normal/normal1.png", "normal", "val", "", "")])
        with pytest.raises(DataError, match="outside its data folder"):
            split.items(labelled, "train")
    ok = Split([("normal/normal1.png", "normal", "train", "", "")])
    assert ok.items(labelled, "train") == [(labelled / "normal/normal1.png", "normal", "")]


def test_a_killed_runs_heatmap_temporaries_are_cleaned(
    image_dir: Path, make_model: Callable[..., Path], tmp_path: Path
) -> None:
    pytest.importorskip("onnx", reason="add-cam needs onnx")
    cam = tmp_path / "cam.onnx"
    res = cli("add-cam", str(make_model("plain.onnx", meta=contract(), seed=2)), str(cam))
    assert res.returncode == 0, res.stderr
    heat = tmp_path / "heat"
    (heat / "sub").mkdir(parents=True)
    left = [heat / ".cxr-heatmap-0123456789ab.tmp", heat / "sub" / ".c.png.png.a1b2c3d4e5f6.tmp"]
    for p in left:
        p.write_bytes(b"")
    keep = heat / "notes.tmp"
    keep.write_text("not ours")
    res = cli(
        "classify", str(image_dir), "--model", str(cam), "--out", str(tmp_path / "r.csv"), "--heatmaps", str(heat), "-q"
    )
    assert res.returncode == 0, res.stderr
    assert not any(p.exists() for p in left) and keep.exists()


def test_info_escapes_a_hostile_model_name(make_model: Callable[..., Path]) -> None:
    evil = "evil\x1b]0;owned\x07\x1b[2J\u202ename"
    model = make_model("evil.onnx", meta=contract(name=evil))
    res = cli("info", str(model))
    assert res.returncode == 0, res.stderr
    assert "\x1b" not in res.stdout and "\x07" not in res.stdout and "\u202e" not in res.stdout
    assert "evil\\x1b]0;owned\\x07" in res.stdout
