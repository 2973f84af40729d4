"""DICOM SR output (classify --sr): real chest DICOMs in, Comprehensive SRs out, read back with
pydicom and highdicom and checked by dciodvfy (dicom3tools) when it is installed."""

from __future__ import annotations

import csv
import shutil
import subprocess
import warnings
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner

from cxr_batch.cli import main
from cxr_batch.contract import file_sha256
from cxr_batch.engine.classifier import Classifier
from cxr_batch.report.sr import SCHEME, ModelIdent, SRWriter, describe_sr, sr_relpath

REPO = Path(__file__).resolve().parents[1]
DICOM_DIR = REPO.parent / "shared" / "data" / "dicom"
RG1_UNCI = DICOM_DIR / "pydicom-data" / "other" / "RG1_UNCI.dcm"
CT_SMALL = DICOM_DIR / "pydicom-testfiles" / "other" / "CT_small.dcm"
RSNA = sorted((DICOM_DIR / "rsna-pneumonia-challenge_lungbox").glob("*/*.dcm"))
MODEL = REPO / "export" / "cxr-resnet18.onnx"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"

pytestmark = pytest.mark.skipif(
    not RSNA or not RG1_UNCI.is_file() or not MODEL.is_file(),
    reason=f"needs the shared chest DICOMs ({DICOM_DIR}) and the shipped model ({MODEL})",
)

#: Patient data in a test copy of RG1: the first block must reach the SR (the SR IOD needs it to
#: sit in the patient's study), the second never (not required), and none of it the report.
REQUIRED = {
    "PatientName": "Doe^Jane^Secretname",
    "PatientID": "PHI-ID-424242",
    "PatientBirthDate": "19010203",
    "PatientSex": "F",
    "AccessionNumber": "ACC-31337",
    "ReferringPhysicianName": "Dr^Whoknows",
    "StudyID": "STUDY-9",
}
NOT_COPIED = {
    "OtherPatientIDs": "OTHER-ID-777",
    "InstitutionName": "Saint Phi Hospital",
    "PatientAddress": "1 Secret Road",
    "StudyDescription": "Private study text",
    "PatientComments": "private comment",
}


@pytest.fixture
def phi_copy(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(RG1_UNCI)
    for key, value in {**REQUIRED, **NOT_COPIED}.items():
        setattr(ds, key, value)
    path = tmp_path / "in" / "rg1-phi.dcm"
    path.parent.mkdir()
    ds.save_as(path)
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _dciodvfy(path: Path) -> list[str]:
    """dciodvfy's error lines for one file (its warnings are about the source's own values)."""
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.slow
def test_classify_writes_one_valid_sr_per_dicom_image(tmp_path: Path, phi_copy: Path, runner: CliRunner) -> None:
    inputs = tmp_path / "in"
    for src in [*RSNA[:3], CT_SMALL]:
        shutil.copy(src, inputs / src.name)
    png = REPO / "sample_images"
    pngs = sorted(png.rglob("*.png"))[:1]
    for p in pngs:
        shutil.copy(p, inputs / p.name)
    out, srs = tmp_path / "r.csv", tmp_path / "sr"
    result = runner.invoke(main, ["classify", str(inputs), "--model", str(MODEL), "--out", str(out), "--sr", str(srs)])
    assert result.exit_code == 0, result.output
    rows = {r["path"]: r for r in _rows(out)}
    written = sorted(srs.rglob("*"))
    written = [p for p in written if p.is_file()]
    dicom_rows = [r for r in rows.values() if r["sop_instance_uid"]]
    assessable = [r for r in dicom_rows if r["assessable"] == "true"]
    assert rows[CT_SMALL.name]["assessable"] == "false"  # the CT slice: no label, so no SR
    # the PNG gets no SR: it has no study to join; nor do rows the lung stage left without a label
    assert len(dicom_rows) == 5 and len(written) == len(assessable) >= 3
    sha = file_sha256(MODEL)
    for path, row in rows.items():
        target = srs / sr_relpath(path)
        if not row["sop_instance_uid"] or row["assessable"] == "false":
            assert not target.exists()
            assert row["assessable"] != "false" or "no SR written: not assessable" in row["notes"]
            continue
        assert f"SR {pydicom.dcmread(target).SOPInstanceUID} written" in row["notes"]
        ds = pydicom.dcmread(target)
        source = pydicom.dcmread(inputs / path, stop_before_pixels=True)
        assert ds.SOPClassUID == COMPREHENSIVE_SR and ds.Modality == "SR"
        assert ds.StudyInstanceUID == source.StudyInstanceUID  # in the image's study
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert str(ds.PatientID) == str(source.PatientID) and str(ds.PatientName) == str(source.PatientName)
        evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert evidence.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert [item.CodingSchemeDesignator for item in ds.CodingSchemeIdentificationSequence] == [SCHEME]
        assert "research use only" in ds.SeriesDescription.lower()
        summary = describe_sr(ds)  # highdicom reads it back as a TID 1500 measurement report
        assert summary["source image"] == source.SOPInstanceUID
        meaning = {"normal": "Normal", "viral": "Viral pneumonia", "covid": "COVID-19"}[row["label"]]
        assert summary["finding"].startswith(meaning)
        for label in ("normal", "viral", "covid"):
            assert abs(float(summary[f"Probability of {label}"]) - float(row[f"prob_{label}"])) < 1e-5
        verdict = {"true": "Yes", "false": "No", "": "Unknown"}[row["in_distribution"]]
        assert summary["Within the model's training distribution"] == verdict
        assert summary["Intended use"] == "Research use only, not for diagnosis"
        assert summary["algorithm name"] == "cxr-resnet18"
        assert f"sha256={sha}" in summary["algorithm parameters"]
        if shutil.which("dciodvfy"):
            assert _dciodvfy(target) == [], target
    ct = rows["CT_small.dcm"]
    assert ct["in_distribution"] == "false" and ct["label"] == "" and not (srs / "CT_small.dcm.sr.dcm").exists()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed (apt-get install -y dicom3tools)")
@pytest.mark.slow
def test_dciodvfy_finds_no_error_in_the_sr_of_each_rsna_image(tmp_path: Path) -> None:
    clf = Classifier(MODEL, "cpu", lungs=False)  # an SR for every image, whatever the lung stage would say
    writer = SRWriter(tmp_path, ModelIdent.of(clf.meta, file_sha256(MODEL)))
    for batch in clf.iter_batches([str(p) for p in RSNA]):
        writer.write(batch)
    assert writer.stats.written == len(RSNA) and not writer.stats.failures
    for sr in tmp_path.rglob("*.sr.dcm"):
        assert _dciodvfy(sr) == [], sr


@pytest.mark.slow
def test_patient_data_only_in_the_sr_and_only_what_it_needs(tmp_path: Path, phi_copy: Path, runner: CliRunner) -> None:
    out, srs = tmp_path / "r.csv", tmp_path / "sr"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = runner.invoke(
            main, ["classify", str(phi_copy), "--model", str(MODEL), "--out", str(out), "--sr", str(srs)]
        )
    assert result.exit_code == 0, result.output
    ds = pydicom.dcmread(srs / sr_relpath(str(phi_copy)))
    for key, value in REQUIRED.items():
        assert str(ds.get(key)) == value, key  # copied as they are
    dumped = str(ds)
    for key, value in NOT_COPIED.items():
        assert key not in ds and value not in dumped, key
    report = out.read_text()
    messages = result.output + "".join(str(w.message) for w in caught)
    for value in [*REQUIRED.values(), *NOT_COPIED.values()]:
        if value in ("F",):
            continue
        assert value not in report and value not in messages, value


@pytest.mark.slow
def test_source_without_patient_elements_gives_empty_ones_not_made_up(tmp_path: Path) -> None:
    ds = pydicom.dcmread(RG1_UNCI)
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        delattr(ds, key)
    src = tmp_path / "bare.dcm"
    ds.save_as(src)
    clf = Classifier(MODEL, "cpu")
    writer = SRWriter(tmp_path / "sr", ModelIdent.of(clf.meta, file_sha256(MODEL)))
    [batch] = list(clf.iter_batches([str(src)]))
    writer.write(batch)
    assert writer.stats.written == 1, writer.stats.failures
    sr = pydicom.dcmread(next((tmp_path / "sr").rglob("*.sr.dcm")))
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        assert key in sr and str(sr.get(key) or "") == "", key  # present (type 2) and empty
    if shutil.which("dciodvfy"):
        assert _dciodvfy(next((tmp_path / "sr").rglob("*.sr.dcm"))) == []


@pytest.mark.slow
def test_sr_uids_are_stable_for_the_same_image_and_model(tmp_path: Path, runner: CliRunner) -> None:
    uids = []
    for n in range(2):
        out, srs = tmp_path / f"r{n}.csv", tmp_path / f"sr{n}"
        result = runner.invoke(
            main, ["classify", str(RG1_UNCI), "--model", str(MODEL), "--out", str(out), "--sr", str(srs)]
        )
        assert result.exit_code == 0, result.output
        ds = pydicom.dcmread(next(srs.rglob("*.sr.dcm")))
        uids.append((ds.SOPInstanceUID, ds.SeriesInstanceUID))
    assert uids[0] == uids[1]


@pytest.mark.slow
def test_an_sr_that_cannot_be_written_keeps_the_row(tmp_path: Path, runner: CliRunner) -> None:
    blocker = tmp_path / "sr"
    blocker.mkdir()
    (blocker / "RG1_UNCI.dcm.sr.dcm").mkdir()  # a folder where the SR file should go
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(RG1_UNCI, inputs / "RG1_UNCI.dcm")
    out = tmp_path / "r.csv"
    result = runner.invoke(
        main, ["classify", str(inputs), "--model", str(MODEL), "--out", str(out), "--sr", str(blocker)]
    )
    assert result.exit_code == 3, result.output  # the row stands, the exit status says an SR failed
    [row] = _rows(out)
    assert row["status"] == "ok" and "cannot write" in row["notes"]
    assert "warning:" in result.output and "SR of RG1_UNCI.dcm" in result.output


def test_sr_needs_the_local_engine(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(
        main, ["classify", str(RG1_UNCI), "--out", str(tmp_path / "r.csv"), "--sr", str(tmp_path), "--engine", "ray"]
    )
    assert result.exit_code == 2 and "--sr needs --engine local" in result.output
