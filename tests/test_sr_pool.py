"""SRs off the critical path (issue 24, item 2): the SR pool writes the same report as SRs built
in the run's own thread, rows in the same order, failures in the notes and the counts."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pydicom
import pytest
from conftest import REPO, SHARED
from rich.console import Console

from cxr_batch.classify import ClassifyConfig, run_classify
from cxr_batch.engine.classifier import EngineConfig
from cxr_batch.io.inputs import InputSpec
from cxr_batch.report.writer import ReportConfig

RSNA = sorted((SHARED / "dicom" / "rsna-pneumonia-challenge_lungbox").glob("*/*.dcm"))
MODEL = REPO / "export" / "cxr-resnet18.onnx"

pytestmark = [
    pytest.mark.skipif(not RSNA or not MODEL.is_file(), reason=f"needs the shared RSNA DICOMs ({SHARED}) and {MODEL}"),
    pytest.mark.slow,
]


def _inputs(tmp_path: Path) -> Path:
    """Ten real DICOMs and two PNGs (no SR), interleaved in the walk order."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i, src in enumerate(RSNA[:10]):
        shutil.copy(src, folder / f"{i:02d}-{src.name}")
    pool_png = sorted((SHARED / "covid19-radiography" / "normal").glob("*.png"))[:2]
    for i, src in zip((3, 7), pool_png, strict=True):
        shutil.copy(src, folder / f"{i:02d}-z.png")
    return folder


def _block(srs: Path, names: list[str]) -> None:
    """Folders where these SR files should go: writing those SRs fails."""
    for name in names:
        (srs / f"{name}.sr.dcm").mkdir(parents=True)


def _run(folder: Path, out: Path, srs: Path, workers: int) -> tuple[list[dict[str, str]], str, object]:
    console = Console(file=io.StringIO(), width=200)
    config = ClassifyConfig(
        inputs=InputSpec(paths=(str(folder),)),
        engine=EngineConfig(
            model=str(MODEL), batch_size=1, lungs=False
        ),  # one image a batch: many in flight; every film gets an SR
        report=ReportConfig(out=str(out)),
        sr=str(srs),
        sr_workers=workers,
        record_provenance=False,
    )
    stats = run_classify(config, console=console)
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert isinstance(console.file, io.StringIO)
    return rows, console.file.getvalue(), stats


def test_sr_pool_writes_the_report_of_the_inline_path(tmp_path: Path) -> None:
    folder = _inputs(tmp_path)
    names = sorted(p.name for p in folder.iterdir())
    blocked = [names[1], names[6]]
    reports = {}
    for workers in (0, 2):  # 0: SRs in the run's thread, before each batch's rows (the old way)
        srs = tmp_path / f"sr{workers}"
        _block(srs, blocked)
        rows, output, _ = _run(folder, tmp_path / f"r{workers}.csv", srs, workers)
        reports[workers] = [{**r, "notes": r["notes"].replace(str(srs), "SRS")} for r in rows]
        # The walk's order, every file once.
        assert [r["path"] for r in rows] == names
        by_path = {r["path"]: r for r in rows}
        for name in names:
            notes = by_path[name]["notes"]
            if name.endswith(".png"):
                assert "SR" not in notes
            elif name in blocked:
                assert by_path[name]["status"] == "ok" and "cannot write" in notes
            else:
                uid = pydicom.dcmread(srs / f"{name}.sr.dcm").SOPInstanceUID
                assert f"SR {uid} written" in notes
        assert f"SRs: 8 written under {srs}" in output
        assert sum(f"SR of {name}" in output for name in blocked) == 2
    assert reports[0] == reports[2]


def test_sr_pool_holds_a_bounded_number_of_batches_and_keeps_their_order(tmp_path: Path) -> None:
    from cxr_batch.contract import file_sha256
    from cxr_batch.engine.classifier import Classifier
    from cxr_batch.report.sr import ModelIdent, SRWriter
    from cxr_batch.report.sr_pool import SRPool

    folder = _inputs(tmp_path)
    classifier = Classifier.from_config(EngineConfig(model=str(MODEL), batch_size=1, lungs=False))
    writer = SRWriter(tmp_path / "sr", ModelIdent.of(classifier.meta, file_sha256(classifier.model_path)))
    pool = SRPool(writer, workers=1, max_pending=2)
    out: list[str] = []
    most = 0
    try:
        for batch in classifier.iter_batches(sorted(str(p) for p in folder.iterdir())):
            pool.submit(batch)
            for done in pool.ready():
                out.extend(r.file for r in done)
            most = max(most, len(pool._pending))
        for done in pool.ready(wait_all=True):
            out.extend(r.file for r in done)
    finally:
        pool.close()
    assert out == sorted(str(p) for p in folder.iterdir())
    assert most <= 2
    assert writer.stats.written == 10 and not writer.stats.failures
