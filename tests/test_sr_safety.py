"""Hostile sources and folders for ``classify --sr`` (issue 21): patient values never quoted in
messages, SRs written atomically and never through links, SRs refused from sources whose UIDs fail
the report's check, unique private codes, an empty first SpecificCharacterSet value."""

from __future__ import annotations

import csv
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from conftest import run_cli

from cxr_batch.contract import file_sha256
from cxr_batch.engine.classifier import Classifier
from cxr_batch.engine.types import Result
from cxr_batch.report.sr import ModelIdent, SRWriter, build_sr, describe_sr, label_key, read_source, sr_relpath

REPO = Path(__file__).resolve().parents[1]
DICOM_DIR = REPO.parent / "shared" / "data" / "dicom"
RG1_UNCI = DICOM_DIR / "pydicom-data" / "other" / "RG1_UNCI.dcm"
MODEL = REPO / "export" / "cxr-resnet18.onnx"

pytestmark = pytest.mark.skipif(
    not RG1_UNCI.is_file() or not MODEL.is_file(),
    reason=f"needs the shared chest DICOMs ({DICOM_DIR}) and the shipped model ({MODEL})",
)


def _copy(tmp_path: Path, name: str = "rg1.dcm", **elements: object) -> Path:
    ds = pydicom.dcmread(RG1_UNCI)
    for key, value in elements.items():
        setattr(ds, key, value)
    path = tmp_path / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def _classify(*args: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess[bytes]:
    """``classify ARGS`` with the shipped model: in this process, or, with ``limit_bytes`` (a file
    size limit, which must not hit pytest's own writes), in a new process."""
    if limit_bytes is None:
        done = run_cli("classify", *args, "--model", str(MODEL))
        return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.encode(), done.stderr.encode())
    size = limit_bytes

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return subprocess.run(
        [sys.executable, "-m", "cxr_batch.cli", "classify", *args, "--model", str(MODEL)],
        capture_output=True,
        timeout=300,
        cwd=REPO,
        preexec_fn=limit,
    )


def _rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(data.decode("utf-8").splitlines()))


@pytest.mark.slow
def test_a_bad_patient_value_is_named_never_quoted(tmp_path: Path) -> None:
    src = _copy(tmp_path, PatientBirthDate="1970-01-01", PatientID="ID-998877")
    out, srs = tmp_path / "r.csv", tmp_path / "sr"
    proc = _classify(str(src), "--out", str(out), "--sr", str(srs))
    assert proc.returncode == 3, proc.stderr  # the SR failed: the exit status says so
    [row] = _rows(out.read_bytes())
    assert row["status"] == "ok"
    assert "PatientBirthDate (0010,0030)" in row["notes"] and "cannot build the SR" in row["notes"]
    everything = out.read_bytes() + proc.stdout + proc.stderr
    everything += b"".join(p.read_bytes() for p in tmp_path.rglob("*.json"))
    for value in (b"1970-01-01", b"19700101", b"ID-998877"):
        assert value not in everything, value
    # The year alone, as a token: not inside a hash, a run id, a timing, a probability or the process
    # id the record keeps, where four random digits may spell it (that made this test fail by chance).
    scrubbed = re.sub(rb'"pid": [0-9]+', b'"pid": 0', everything)
    assert not re.search(rb"(?<![0-9A-Za-z.:_-])1970(?![0-9A-Za-z.])", scrubbed)
    assert b"PatientBirthDate (0010,0030)" in proc.stderr
    assert not list(srs.rglob("*.sr.dcm")) if srs.exists() else True


@pytest.mark.slow
def test_an_sr_replaces_a_planted_link_and_never_writes_through_it(tmp_path: Path) -> None:
    _copy(tmp_path)
    srs = tmp_path / "sr"
    srs.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (srs / "rg1.dcm.sr.dcm").symlink_to(victim)
    proc = _classify(str(tmp_path / "in"), "--out", str(tmp_path / "r.csv"), "--sr", str(srs))
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "precious"
    target = srs / "rg1.dcm.sr.dcm"
    assert not target.is_symlink() and pydicom.dcmread(target).Modality == "SR"


@pytest.mark.slow
def test_an_sr_is_never_written_into_a_linked_sub_folder(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    shutil.copy(RG1_UNCI, inputs / "sub" / "rg1.dcm")
    srs, elsewhere = tmp_path / "sr", tmp_path / "elsewhere"
    srs.mkdir()
    elsewhere.mkdir()
    (srs / "sub").symlink_to(elsewhere, target_is_directory=True)
    out = tmp_path / "r.csv"
    proc = _classify(str(inputs), "--out", str(out), "--sr", str(srs))
    assert proc.returncode == 3, proc.stderr
    assert list(elsewhere.iterdir()) == []
    [row] = _rows(out.read_bytes())
    assert row["status"] == "ok" and "cannot write" in row["notes"]


@pytest.mark.slow
def test_a_full_disk_leaves_no_empty_sr_under_its_final_name(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes every write past 4 KiB fail with EFBIG, as a full disk fails with ENOSPC;
    the report goes to stdout (no provenance record), so only the SR (~10 KiB) hits the limit."""
    src = _copy(tmp_path)
    srs = tmp_path / "sr"
    proc = _classify(str(src), "--out", "-", "--sr", str(srs), limit_bytes=4096)
    assert proc.returncode == 3, proc.stderr
    [row] = _rows(proc.stdout)
    assert row["status"] == "ok" and "cannot write" in row["notes"]
    assert [p for p in srs.rglob("*") if not p.is_dir()] == []  # no 0-byte .sr.dcm, no temporary file left


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("SeriesInstanceUID", "1.2.3?x=1#frag"),
        pytest.param("StudyInstanceUID", "1.2/../3", marks=pytest.mark.slow),  # the same check, another UID
        pytest.param("SOPClassUID", "1.2.abc", marks=pytest.mark.slow),
    ],
)
@pytest.mark.slow
def test_no_sr_from_a_source_whose_uids_fail_the_reports_check(tmp_path: Path, keyword: str, value: str) -> None:
    src = _copy(tmp_path, **{keyword: value})
    out, srs = tmp_path / "r.csv", tmp_path / "sr"
    proc = _classify(str(src), "--out", str(out), "--sr", str(srs))
    assert proc.returncode == 3, proc.stderr
    [row] = _rows(out.read_bytes())
    assert f"{keyword} (" in row["notes"] and "not a valid UID" in row["notes"]
    assert value not in row["notes"] and value.encode() not in proc.stderr
    assert not srs.exists() or not list(srs.rglob("*.sr.dcm"))


@pytest.mark.slow
@pytest.mark.parametrize("charset", [["", "ISO 2022 IR 100"], "", ["", "ISO 2022 IR 6"]])
def test_an_empty_first_specific_character_set_value_still_gives_an_sr(tmp_path: Path, charset: object) -> None:
    src = _copy(tmp_path, SpecificCharacterSet=charset)
    clf = Classifier(MODEL, "cpu")
    writer = SRWriter(tmp_path / "sr", ModelIdent.of(clf.meta, file_sha256(MODEL)))
    [batch] = list(clf.iter_batches([str(src)]))
    writer.write(batch)
    writer.close()
    assert writer.stats.written == 1, writer.stats.failures
    ds = pydicom.dcmread(next((tmp_path / "sr").rglob("*.sr.dcm")))
    assert "" not in list(ds.get("SpecificCharacterSet") or ["x"])[:1]


@pytest.mark.slow
def test_labels_that_differ_in_case_or_after_14_characters_get_different_codes(tmp_path: Path) -> None:
    labels = ("covid", "Covid", "COVID", "pneumonia-bacterial", "pneumonia-bacteriaX", "pneumonia-bacteriay", "a b")
    keys = [label_key(x) for x in labels]
    assert len(set(keys)) == len(labels), keys
    assert all(len(k) <= 14 for k in keys)
    assert label_key("normal") == "NORMAL"  # plain labels keep their readable code
    # And in a real SR: one distinct probability concept per label, each label its finding code.
    src = _copy(tmp_path)
    probs = {x: 1.0 / len(labels) for x in labels}
    model = ModelIdent("m", "1", "0" * 64, "fp32", labels)
    codes = set()
    for label in labels:
        result = Result(path="rg1.dcm", file=str(src), status="ok", model="m", label=label, probs=probs)
        sr = build_sr(read_source(src), result, model)
        codes.add(describe_sr(sr)["finding"])
    assert len(codes) == len(labels), codes
    dumped = str(sr)
    for key in keys:
        assert f"P-{key}" in dumped  # each label's probability has its own code


@pytest.mark.slow
def test_no_temporary_file_is_left_when_an_sr_fails(tmp_path: Path) -> None:
    src = _copy(tmp_path)
    srs = tmp_path / "sr"
    blocker = srs / sr_relpath(str(src))
    blocker.mkdir(parents=True)  # a folder where the SR should go: the rename fails
    clf = Classifier(MODEL, "cpu")
    writer = SRWriter(srs, ModelIdent.of(clf.meta, file_sha256(MODEL)))
    [batch] = list(clf.iter_batches([str(src)]))
    writer.write(batch)
    writer.close()
    assert writer.stats.failures
    assert [p.name for p in blocker.parent.iterdir()] == [blocker.name]  # no .tmp left beside it
    assert os.listdir(blocker) == []
