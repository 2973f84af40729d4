"""The report: columns, odd names that must round-trip, overwrite protection and resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LABELS, contract

from cxr_batch.cli.main import main
from cxr_batch.engine.classifier import Result
from cxr_batch.errors import OutputError
from cxr_batch.report.writer import ReportConfig, columns, open_report, read_existing

EXPECTED_COLUMNS = [
    "path", "status", "label", "confidence", "prob_normal", "prob_viral", "prob_covid",
    "width", "height", "error", "model", "model_sha256", "precision",
    "notes", "modality", "view_position", "sop_instance_uid", "study_instance_uid", "ood_score", "in_distribution",
    "lung_fraction", "assessable", "covid_screen", "run_id",
]  # fmt: skip


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="ascii").splitlines()]


def classify(runner: CliRunner, model: Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(main, ["classify", *args, "--model", str(model), "--threads", "1"])
    return result.exit_code, result.stdout, result.stderr


def test_columns_in_order() -> None:
    assert columns(LABELS) == EXPECTED_COLUMNS


def test_csv_and_jsonl_rows(runner: CliRunner, tiny_onnx: Path, image_dir: Path, tmp_path: Path) -> None:
    # Without the lung stage: its columns stay empty, every row gets the top label.
    code, _, _ = classify(runner, tiny_onnx, str(image_dir), "--out", str(tmp_path / "r.csv"), "--no-lungs")
    assert code == 0
    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as fh:
        assert next(csv.reader(fh)) == EXPECTED_COLUMNS
    rows = read_csv(tmp_path / "r.csv")
    assert [r["path"] for r in rows] == ["a.png", "b.png", "sub/c.png"]
    for r in rows:
        probs = [float(r[f"prob_{label}"]) for label in LABELS]
        assert r["status"] == "ok" and r["model"] == "tiny@1" and (r["width"], r["height"]) == ("48", "40")
        assert r["label"] == LABELS[probs.index(max(probs))]
        assert float(r["confidence"]) == max(probs)
        assert r["ood_score"] == "" and r["in_distribution"] == "" and r["modality"] == ""
        assert r["lung_fraction"] == "" and r["assessable"] == ""

    # With it (the default): these synthetic images show no lungs, so no label, same probabilities.
    code, _, _ = classify(runner, tiny_onnx, str(image_dir), "--out", str(tmp_path / "r.jsonl"))
    assert code == 0
    js = read_jsonl(tmp_path / "r.jsonl")
    assert [list(j) for j in js] == [EXPECTED_COLUMNS] * 3
    for j, r in zip(js, rows, strict=True):
        assert j["path"] == r["path"] and j["width"] == 48 and j["error"] is None
        assert j["prob_covid"] == pytest.approx(float(r["prob_covid"]), abs=1e-6)
        assert j["assessable"] is False and j["label"] is None and j["confidence"] is None
        assert isinstance(j["lung_fraction"], float) and "not assessable: " in str(j["notes"])


def test_stdout_report(runner: CliRunner, tiny_onnx: Path, image_dir: Path) -> None:
    code, out, err = classify(runner, tiny_onnx, str(image_dir), "--out", "-", "--quiet")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == ",".join(EXPECTED_COLUMNS) and len(lines) == 4
    code, out, _ = classify(runner, tiny_onnx, str(image_dir), "--out", "-", "--format", "jsonl", "--quiet")
    assert code == 0
    assert [json.loads(line)["path"] for line in out.splitlines()] == ["a.png", "b.png", "sub/c.png"]


ODD_NAMES = [
    b"comma, here.png",
    b'double "quote".png',
    b"new\nline.png",
    b"carriage\rreturn.png",
    b"not utf8 \xff\xfe.png",
    "unicode é 中.png".encode(),
]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_odd_file_names_round_trip(
    runner: CliRunner, tiny_onnx: Path, tmp_path: Path, png_factory: Callable[..., Path], suffix: str
) -> None:
    root = tmp_path / "odd"
    root.mkdir()
    for i, name in enumerate(ODD_NAMES):
        png_factory(Path(os.fsdecode(bytes(root) + b"/" + name)), i)
    out = tmp_path / f"r{suffix}"
    code, _, err = classify(runner, tiny_onnx, str(root), "--out", str(out))
    assert code == 0, err
    rows = read_csv(out) if suffix == ".csv" else read_jsonl(out)
    got = sorted(os.fsencode(str(r["path"])) for r in rows)
    assert got == sorted(ODD_NAMES)
    assert all(r["status"] == "ok" for r in rows)
    # Every reported path opens the file it names.
    for r in rows:
        assert (root / str(r["path"])).is_file()
    if suffix == ".jsonl":
        out.read_bytes().decode("ascii")  # pure ASCII: valid JSON for every reader
    # Resume recognises every odd name as done: nothing is classified twice.
    before = out.read_bytes()
    code, _, err = classify(runner, tiny_onnx, str(root), "--out", str(out), "--resume")
    assert code == 0, err
    assert out.read_bytes() == before


# --------------------------------------------------------------------------- overwrite / resume


def test_existing_report_is_never_overwritten_silently(
    runner: CliRunner, tiny_onnx: Path, image_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r.csv"
    out.write_text("precious\n")
    code, _, err = classify(runner, tiny_onnx, str(image_dir), "--out", str(out))
    assert code == 1
    assert "already exists" in err and "--overwrite" in err and "--resume" in err
    assert out.read_text() == "precious\n"
    code, _, _ = classify(runner, tiny_onnx, str(image_dir), "--out", str(out), "--overwrite")
    assert code == 0
    assert len(read_csv(out)) == 3


def test_usage_errors(runner: CliRunner, tiny_onnx: Path, image_dir: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "r.csv")
    assert classify(runner, tiny_onnx, str(image_dir), "--out", out, "--overwrite", "--resume")[0] == 2
    assert classify(runner, tiny_onnx, str(image_dir), "--out", "-", "--resume")[0] == 2
    assert classify(runner, tiny_onnx, "--out", out)[0] == 2
    assert classify(runner, tiny_onnx, str(image_dir), "--out", out, "--batch-size", "0")[0] == 2
    assert classify(runner, tiny_onnx, str(image_dir), "--out", out, "--device", "tpu")[0] == 2
    assert not Path(out).exists()


def test_unwritable_output_is_fatal(runner: CliRunner, tiny_onnx: Path, image_dir: Path, tmp_path: Path) -> None:
    code, _, err = classify(runner, tiny_onnx, str(image_dir), "--out", str(tmp_path))
    assert code == 1 and "is a folder" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = classify(runner, tiny_onnx, str(image_dir), "--out", str(blocker / "r.csv"))
    assert code == 1 and "cannot create the folder" in err


@pytest.fixture
def many_images(tmp_path: Path, png_factory: Callable[..., Path]) -> Path:
    root = tmp_path / "many"
    for i in range(12):
        png_factory(root / f"img{i:02d}.png", i)
    (root / "broken.png").write_bytes(b"nope")
    return root


def _cut_inside_row(path: Path, row: int) -> bytes:
    """Truncate the file in the middle of data row ``row`` (1-based); returns what was cut."""
    data = path.read_bytes()
    starts = [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    cut = starts[row - 1] + 7  # 7 bytes into that row
    path.write_bytes(data[:cut])
    return data[cut:]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_after_a_partial_last_row(
    runner: CliRunner, tiny_onnx: Path, many_images: Path, tmp_path: Path, suffix: str
) -> None:
    full = tmp_path / f"full{suffix}"
    assert classify(runner, tiny_onnx, str(many_images), "--out", str(full))[0] == 3
    part = tmp_path / f"part{suffix}"
    part.write_bytes(full.read_bytes())
    _cut_inside_row(part, 6 if suffix == ".csv" else 5)  # 5 complete data rows survive
    code, _, err = classify(runner, tiny_onnx, str(many_images), "--out", str(part), "--resume")
    assert code == 3  # the broken file's error row makes the whole report partial
    assert "removed a partial last row" in err
    read = read_csv if suffix == ".csv" else read_jsonl
    resumed, whole = read(part), read(full)
    ids = [r.pop("run_id") for r in resumed]
    first = {r.pop("run_id") for r in whole}
    assert resumed == whole  # same rows, same order, each file exactly once
    # The 5 kept rows keep the first run's id; the rest carry the resumed run's.
    assert set(ids[:5]) == first and len(set(ids[5:])) == 1 and ids[5] not in first


def test_resume_keeps_existing_rows_and_skips_their_files(
    runner: CliRunner, tiny_onnx: Path, many_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r.csv"
    assert classify(runner, tiny_onnx, str(many_images / "img00.png"), "--out", str(out))[0] == 0
    rows = read_csv(out)
    rows[0]["confidence"] = "0.123"  # a marker: a kept row is not classified again
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, EXPECTED_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    code, _, err = classify(runner, tiny_onnx, str(many_images), "--out", str(out), "--resume")
    assert code == 3
    # img00.png was given as a file first (path "…/img00.png"), now found in the folder as "img00.png":
    # a different report path, which resume warns about.
    assert f"1 row(s) of {out} are not among this run's inputs" in err and "not among this run's inputs" in err
    again = read_csv(out)
    assert again[0]["confidence"] == "0.123"
    assert len(again) == 1 + 13
    code, _, _ = classify(runner, tiny_onnx, str(many_images), "--out", str(out), "--resume")
    assert code == 3
    assert read_csv(out) == again  # nothing left to do: nothing added


def test_resume_of_a_complete_report_with_no_errors_exits_0(
    runner: CliRunner, tiny_onnx: Path, image_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r.csv"
    assert classify(runner, tiny_onnx, str(image_dir), "--out", str(out))[0] == 0
    before = out.read_bytes()
    assert classify(runner, tiny_onnx, str(image_dir), "--out", str(out), "--resume")[0] == 0
    assert out.read_bytes() == before


def test_resume_refuses_another_model_or_other_columns(
    runner: CliRunner,
    tiny_onnx: Path,
    other_onnx: Path,
    make_model: Callable[..., Path],
    image_dir: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "r.csv"
    assert classify(runner, tiny_onnx, str(image_dir / "a.png"), "--out", str(out))[0] == 0
    before = out.read_bytes()
    code, _, err = classify(runner, other_onnx, str(image_dir), "--out", str(out), "--resume")
    assert code == 1 and "written by model 'tiny@1', this run uses 'tiny@2'" in err
    relabelled = make_model("relabelled.onnx", meta=contract(labels=["normal", "viral", "other"]))
    code, _, err = classify(runner, relabelled, str(image_dir), "--out", str(out), "--resume")
    assert code == 1 and "columns differ" in err and "prob_other" in err
    assert out.read_bytes() == before


def test_resume_refuses_a_file_damaged_before_its_end(tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    cols = columns(LABELS)
    out.write_text(",".join(cols) + "\n" + "a.png,ok\n" + "b.png," + ",".join([""] * (len(cols) - 2)) + "\n")
    with pytest.raises(OutputError, match="row 2 is incomplete but more data follows"):
        read_existing(out, "csv", cols, "tiny@1")
    assert out.read_text().count("\n") == 3  # untouched


def test_resume_of_an_empty_or_header_only_file(tmp_path: Path) -> None:
    cols = columns(LABELS)
    out = tmp_path / "r.csv"
    out.write_text(",".join(cols)[:20])  # killed while writing the header
    existing = read_existing(out, "csv", cols, "tiny@1")
    assert existing.rows == 0 and not existing.has_header and out.read_bytes() == b""
    writer, existing = open_report(ReportConfig(out=str(out), resume=True), LABELS, "tiny@1")
    writer.write([Result(path="x.png", file="x.png", status="error", model="tiny@1", error="e")])
    writer.close()
    assert read_csv(out)[0]["path"] == "x.png"


@pytest.mark.slow
def test_resume_after_kill_9(
    tiny_onnx: Path, make_model: Callable[..., Path], tmp_path: Path, png_factory: Callable[..., Path]
) -> None:
    """A real ``kill -9`` in the middle of a run, then --resume: exactly one row per file."""
    slow = make_model("slow.onnx", meta=contract(), slow_layers=400)
    root = tmp_path / "kill"
    for i in range(80):
        png_factory(root / f"img{i:03d}.png", i)
    out = tmp_path / "r.csv"
    cmd = [sys.executable, "-m", "cxr_batch.cli", "classify", str(root), "--model", str(slow), "--out", str(out),
           "--batch-size", "1", "--threads", "1", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= 4:  # header + 3 rows
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {proc.stderr.read() if proc.stderr else ''!r}")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    written = read_csv(out)
    assert 3 <= len(written) < 80

    result = CliRunner().invoke(
        main, ["classify", str(root), "--model", str(slow), "--out", str(out), "--resume", "--threads", "1", "-q"]
    )
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    assert [r["path"] for r in rows] == [f"img{i:03d}.png" for i in range(80)]
    assert all(r["status"] == "ok" for r in rows)
    assert rows[: len(written)] == written


def test_ctrl_c_keeps_written_rows_and_resume_finishes(
    runner: CliRunner, tiny_onnx: Path, many_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxr_batch.engine.classifier import Classifier

    real = Classifier.iter_batches

    def interrupted(self: Classifier, paths: object) -> object:
        batches = real(self, paths)  # type: ignore[arg-type]
        yield next(batches)
        batches.close()
        raise KeyboardInterrupt

    out = tmp_path / "r.csv"
    with monkeypatch.context() as m:
        m.setattr(Classifier, "iter_batches", interrupted)
        result = runner.invoke(
            main, ["classify", str(many_images), "--model", str(tiny_onnx), "--out", str(out), "--batch-size", "5"]
        )
    assert result.exit_code == 130
    assert "rerun with --resume" in result.stderr
    assert [r["path"] for r in read_csv(out)] == ["broken.png"] + [f"img{i:02d}.png" for i in range(4)]
    assert classify(runner, tiny_onnx, str(many_images), "--out", str(out), "--resume")[0] == 3
    assert len(read_csv(out)) == 13
