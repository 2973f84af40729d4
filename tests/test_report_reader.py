"""The one report reader (cxr_batch.report.reader), the format (report.format) and the one tally
(report.tally), on reports written by real classify runs: real X-rays from ../shared/data, the
shipped lung model, a tiny ONNX model with an out-of-distribution output, broken files for error
rows, and names a spreadsheet would run as formulas. Then the hostile cases: a BOM, a last row cut
by a killed run, damaged rows, cells of the wrong type, another set of prob_ columns, the line cap.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import LABELS, SHARED, build_model, contract, run_cli
from rich.console import Console

from cxr_batch.classify import ClassifyConfig, run_classify
from cxr_batch.engine.classifier import Classifier, EngineConfig
from cxr_batch.engine.types import Result
from cxr_batch.errors import OutputError
from cxr_batch.io.inputs import InputSpec
from cxr_batch.io.safe_open import MAX_LINE_BYTES, FileTooLargeError, NotRegularFileError
from cxr_batch.report.format import columns, csv_cell, csv_text, escape_cell, labels_of, unescape_cell
from cxr_batch.report.provenance import count_report_rows, read_record
from cxr_batch.report.reader import ReportError, ReportReader, ReportRow, RowProblem, read_report
from cxr_batch.report.tally import Tally
from cxr_batch.report.writer import ReportConfig, RunStats, read_existing

#: Names that start a spreadsheet formula (and one that starts with the quote itself), plus a
#: name the csv module must quote (a comma, a quote).
ODD_NAMES = ["=HYPERLINK(1).png", "-2.png", "'q.png", 'a, "b".png']


def _summary(t: Tally) -> dict[str, Any]:
    return {
        "rows": t.rows,
        "per_label": dict(t.per_label),
        "errors": dict(t.errors),
        "flagged": t.flagged,
        "not_assessable": t.not_assessable,
        "assessable": t.assessable,
        "assessable_flagged": t.assessable_flagged,
        "status": dict(t.status),
    }


@pytest.fixture(scope="module")
def ood_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[Path]], Path]:
    """A tiny model with an ``ood_score`` output whose threshold is the median score of ``files``
    (so about half of them are flagged out of distribution)."""
    folder = tmp_path_factory.mktemp("ood-models")
    outputs = {"logits": "logits", "embedding": "embedding", "ood_score": "ood_score"}

    def make(files: list[Path]) -> Path:
        probe = build_model(folder / "probe.onnx", meta=contract(outputs=outputs), ood=True)
        scores = [r.ood_score for r in Classifier(probe, device="cpu", threads=1).classify(files) if r.ood_score]
        threshold = float(np.median(scores))
        return build_model(folder / "ood.onnx", meta=contract(outputs=outputs, ood={"threshold": threshold}), ood=True)

    return make


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, ood_model: Callable[[list[Path]], Path]) -> dict[str, Any]:
    """A real classify run into CSV and JSON lines over real X-rays (some under formula-leading
    names), a random non-X-ray picture (not assessable), an empty file and a broken one (error rows);
    the lung stage on, an OOD threshold in the model. Returns the reports and the run's own stats.
    Tests copy the reports before changing them."""
    if not (SHARED / "covid19-radiography").is_dir():
        pytest.skip(f"the shared X-ray data is not here ({SHARED}); these tests need ../shared/data")
    tmp_path = tmp_path_factory.mktemp("run")
    images = tmp_path / "images"
    images.mkdir()
    xrays = sorted((SHARED / "covid19-radiography" / "covid").glob("*.png"))[:3]
    xrays += sorted((SHARED / "covid19-radiography" / "normal").glob("*.png"))[:3]
    for src, name in zip(xrays, [*ODD_NAMES, "n1.png", "n2.png"], strict=False):
        shutil.copy(src, images / name)
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L").save(images / "noise.png")
    (images / "empty.png").write_bytes(b"")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    model = ood_model(sorted(images.glob("*.png")))
    out: dict[str, Any] = {"images": images, "model": model}
    for suffix in (".csv", ".jsonl"):
        report = tmp_path / f"r{suffix}"
        config = ClassifyConfig(
            inputs=InputSpec(paths=(str(images),)),
            engine=EngineConfig(model=str(model), device="cpu", threads=1),
            report=ReportConfig(out=str(report), format="jsonl" if suffix == ".jsonl" else "csv"),
            quiet=True,
        )
        stats = run_classify(config, console=Console(file=io.StringIO()))
        out[suffix] = report
        out[f"stats{suffix}"] = stats
    return out


@pytest.mark.slow
def test_a_real_report_reads_back_as_written(run: dict[str, Any]) -> None:
    csv_report, jsonl_report = read_report(run[".csv"]), read_report(run[".jsonl"])
    for report in (csv_report, jsonl_report):
        assert report.columns == tuple(columns(LABELS)) and report.labels == LABELS
        assert not report.problems and not report.bom
        assert len(report.rows) == 9 and [r.number for r in report.rows] == list(range(1, 10))
    # The neutralised names come back as they are on disk; the CSV record keeps them neutralised.
    names = {r.path for r in csv_report.rows}
    assert set(ODD_NAMES) <= names and names == {p.name for p in run["images"].iterdir()}
    by_path = {r.path: r for r in csv_report.rows}
    assert by_path["=HYPERLINK(1).png"].record[0] == "'=HYPERLINK(1).png"
    assert by_path["'q.png"].record[0] == "''q.png"
    # CSV and JSON lines give the same typed values (the runs differ only in their run_id).
    for c, j in zip(csv_report.rows, jsonl_report.rows, strict=True):
        assert {k: v for k, v in c.values.items() if k != "run_id"} == {
            k: v for k, v in j.values.items() if k != "run_id"
        }
    # Against the file as the csv module reads it (text cells unescaped, numbers parsed).
    with open(run[".csv"], newline="", encoding="utf-8", errors="surrogateescape") as fh:
        raw = list(csv.DictReader(fh))
    for row, cells in zip(csv_report.rows, raw, strict=True):
        assert row.path == unescape_cell(cells["path"])
        assert row.status == cells["status"] and (row.label or "") == cells["label"]
        if cells["confidence"]:
            assert row.confidence == float(cells["confidence"])
        assert row.probs(LABELS) == {k: float(cells[f"prob_{k}"]) if cells[f"prob_{k}"] else None for k in LABELS}
        assert row.in_distribution == {"true": True, "false": False, "": None}[cells["in_distribution"]]
        assert row.identity.model == "tiny@1" and len(row.identity.model_sha256) == 64
    with open(run[".jsonl"], encoding="ascii") as fh:
        objs = [json.loads(line) for line in fh]
    assert [dict(r.values) for r in jsonl_report.rows] == objs
    # The run's mix: error rows, a film that is not assessable, flagged ones, labelled ones.
    statuses = {r.path: (r.status, r.error_reason) for r in csv_report.rows if not r.ok}
    assert set(statuses) == {"empty.png", "broken.png"}
    assert any(r.ok and r.assessable is False and r.label is None for r in csv_report.rows)
    assert any(r.in_distribution is False for r in csv_report.rows)
    assert any(r.ok and r.label for r in csv_report.rows)


@pytest.mark.slow
def test_one_tally_counts_rows_read_back_as_the_run_counted_its_results(run: dict[str, Any]) -> None:
    """The summary's stats (Results, as the run made them), the tally of the rows read back and the
    provenance record's counts are the same numbers: one tally, whatever it counts."""
    for suffix in (".csv", ".jsonl"):
        stats: RunStats = run[f"stats{suffix}"]
        rows = read_report(run[suffix])
        assert _summary(rows.tally) == _summary(stats)
        for label in LABELS:  # means from the rows' 6 significant digits
            mean, from_rows = stats.mean_confidence(label), rows.tally.mean_confidence(label)
            assert (mean is None and from_rows is None) or abs((mean or 0) - (from_rows or 0)) < 1e-5
        record = read_record(f"{run[suffix]}.provenance.json")
        (entry,) = record["runs"]
        assert rows.tally.to_dict(LABELS) == entry["counts"]
        assert count_report_rows(run[suffix], suffix[1:], entry["run_id"]).to_dict(LABELS) == entry["counts"]
        assert count_report_rows(run[suffix], suffix[1:], "another-run").rows == 0
        dropped = Tally.of(rows.rows, drop_ood=True)
        assert sum(dropped.per_label.values()) == sum(stats.per_label.values()) - sum(
            1 for r in rows.rows if r.ok and r.label and r.assessable is not False and r.in_distribution is False
        )


@pytest.mark.slow
def test_a_bom_is_skipped_by_every_reader(run: dict[str, Any], tmp_path: Path) -> None:
    for suffix in (".csv", ".jsonl"):
        plain = read_report(run[suffix])
        saved = tmp_path / f"bom{suffix}"
        saved.write_bytes(b"\xef\xbb\xbf" + run[suffix].read_bytes())  # as Excel's "CSV UTF-8" saves it
        shutil.copy(f"{run[suffix]}.provenance.json", f"{saved}.provenance.json")
        with_bom = read_report(saved)
        assert with_bom.bom and with_bom.columns == plain.columns and not with_bom.problems
        assert [r.values for r in with_bom.rows] == [r.values for r in plain.rows]
        assert [r.end - r.start for r in with_bom.rows] == [r.end - r.start for r in plain.rows]
        assert with_bom.rows[0].start == plain.rows[0].start + 3
        run_id = plain.rows[0].run_id
        assert run_id is not None
        assert count_report_rows(saved, suffix[1:], run_id).to_dict(LABELS) == plain.tally.to_dict(LABELS)
        # resume keeps every row and the BOM (nothing to cut)
        before = saved.read_bytes()
        existing = read_existing(saved, suffix[1:], columns(LABELS), plain.rows[0].identity)
        assert existing.rows == 9 and existing.errors == 2 and existing.truncated == 0
        assert saved.read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_cut_last_row_is_partial_and_resume_cuts_it(run: dict[str, Any], tmp_path: Path, suffix: str) -> None:
    data = run[suffix].read_bytes()
    whole = read_report(run[suffix])
    last = whole.rows[-1]
    for cut in (last.start + 1, (last.start + last.end) // 2, last.end - 1):  # a run killed inside its last row
        part = tmp_path / f"cut{suffix}"
        part.write_bytes(data[:cut])
        report = read_report(part)
        assert [r.values for r in report.rows] == [r.values for r in whole.rows[:-1]]
        (problem,) = report.problems
        assert problem.partial and problem.last and problem.number == last.number and problem.start == last.start
        assert report.tally.rows == whole.tally.rows - 1
        with ReportReader(part) as reader:
            assert not reader.complete
        existing = read_existing(part, suffix[1:], columns(LABELS), last.identity)
        assert existing.rows == 8 and existing.truncated == cut - last.start
        assert part.read_bytes() == data[: last.start]


def test_a_quoted_field_cut_by_the_end_is_partial(tmp_path: Path) -> None:
    cols = columns(LABELS)
    report = tmp_path / "r.csv"
    row = ['a, "b".png', "error", *[""] * (len(cols) - 2)]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows([cols, row, row])
    text = buf.getvalue()
    report.write_text(text[: text.rindex('"b"') + 1], encoding="utf-8")  # the end cuts the second row's quotes
    read = read_report(report)
    assert [r.path for r in read.rows] == ['a, "b".png']
    (problem,) = read.problems
    assert problem.kind == "cut" and problem.partial and problem.line == 3


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_row_damaged_before_the_end_is_named_and_reading_goes_on(
    tiny_onnx: Path, image_dir: Path, tmp_path: Path, suffix: str
) -> None:
    report = tmp_path / f"r{suffix}"
    assert run_cli("classify", str(image_dir), "--model", str(tiny_onnx), "--out", str(report), "-q").returncode == 0
    lines = report.read_bytes().splitlines(keepends=True)
    first = 1 if suffix == ".csv" else 0  # the first row's line
    lines[first + 1] = b"b.png,ok\r\n" if suffix == ".csv" else b'{"path": "b.png", "status": NaN}\n'
    report.write_bytes(b"".join(lines))
    read = read_report(report)
    assert [r.path for r in read.rows] == ["a.png", "sub/c.png"]
    (problem,) = read.problems
    assert not problem.partial and not problem.last and problem.number == 2 and problem.line == first + 2
    if suffix == ".csv":
        assert problem.kind == "fields" and problem.detail == f"2 fields, the header has {len(columns(LABELS))}"
        with pytest.raises(OutputError, match="row 3 is incomplete but more data follows"):
            read_existing(report, "csv", columns(LABELS), read.rows[0].identity)
    else:
        assert problem.kind == "json" and problem.detail == "NaN is not a JSON number"
        with pytest.raises(OutputError, match="line 2 is a damaged row: NaN is not a JSON number"):
            read_existing(report, "jsonl", columns(LABELS), read.rows[0].identity)


@pytest.mark.parametrize(
    ("column", "cell", "detail"),
    [
        ("prob_covid", "abc", "prob_covid is 'abc', not a number"),
        ("status", "maybe", "status is 'maybe', not ok or error"),
        ("in_distribution", "yes", "in_distribution is 'yes', not true, false or empty"),
    ],
)
def test_a_cell_of_the_wrong_type_is_a_damaged_row_for_every_reader(
    tiny_onnx: Path, image_dir: Path, tmp_path: Path, column: str, cell: str, detail: str
) -> None:
    report = tmp_path / "r.csv"
    assert run_cli("classify", str(image_dir), "--model", str(tiny_onnx), "--out", str(report), "-q").returncode == 0
    with open(report, newline="", encoding="utf-8") as fh:
        records = list(csv.reader(fh))
    records[1][records[0].index(column)] = cell
    with open(report, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\r\n").writerows(records)
    read = read_report(report)
    (problem,) = read.problems
    assert problem.kind == "value" and problem.detail == detail and problem.line == 2
    assert len(read.rows) == 2
    with pytest.raises(OutputError, match=f"row 2 is a damaged row: {detail}"):
        read_existing(report, "csv", columns(LABELS), read.rows[0].identity)
    parts = tmp_path / "m.csv"
    proc = run_cli("merge", str(report), "--out", str(parts))
    assert proc.returncode == 1 and f"{report} line 2: {detail}" in proc.stderr


def test_another_set_of_prob_columns_reads_by_name(
    make_model: Callable[..., Path], image_dir: Path, tmp_path: Path
) -> None:
    labels = ("normal", "pneumonia")
    model = make_model("two.onnx", meta=contract(labels=list(labels)), n_classes=2)
    report = tmp_path / "r.csv"
    assert run_cli("classify", str(image_dir), "--model", str(model), "--out", str(report), "-q").returncode == 0
    read = read_report(report)
    assert read.labels == labels and read.columns == tuple(columns(labels)) and labels_of(read.columns) == labels
    for row in read.rows:
        probs = row.probs(labels)
        assert all(p is not None for p in probs.values()) and abs(sum(probs.values()) - 1) < 1e-4
        assert row.probs(LABELS)["covid"] is None  # a label the report has no column for
    assert read.missing(["path", "prob_covid"]) == ["prob_covid"]
    # The same rows with the columns in another order (a spreadsheet's re-save): read by name.
    with open(report, newline="", encoding="utf-8") as fh:
        records = list(csv.reader(fh))
    order = list(reversed(range(len(records[0]))))
    shuffled = tmp_path / "shuffled.csv"
    with open(shuffled, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\r\n").writerows([[r[i] for i in order] for r in records])
    again = read_report(shuffled)
    assert again.labels == tuple(reversed(labels))
    assert [dict(r.values) for r in again.rows] == [dict(r.values) for r in read.rows]
    # resume refuses it: this run's columns differ (another model's labels)
    with pytest.raises(OutputError, match="columns differ"):
        read_existing(report, "csv", columns(LABELS), read.rows[0].identity)


def test_not_a_report_and_the_caps(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(ReportError, match="empty"):
        read_report(empty)
    header = tmp_path / "header.csv"
    header.write_text('path,"status\n', encoding="utf-8")  # a quote never closed
    with ReportReader(header) as reader:
        assert reader.columns is None and reader.header_problem is None and not list(reader.rows())
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    with pytest.raises(NotRegularFileError):
        read_report(fifo)
    huge = tmp_path / "huge.jsonl"
    huge.write_bytes(b'{"path": "' + b"x" * MAX_LINE_BYTES + b'"}\n')
    with pytest.raises(FileTooLargeError, match="a line of the part is too large"):
        read_report(huge, what="a line of the part")


def test_rows_start_at_an_offset(tiny_onnx: Path, image_dir: Path, tmp_path: Path) -> None:
    """What the provenance recount does after a resume: read only the rows appended from an offset."""
    for suffix in (".csv", ".jsonl"):
        report = tmp_path / f"r{suffix}"
        assert (
            run_cli("classify", str(image_dir), "--model", str(tiny_onnx), "--out", str(report), "-q").returncode == 0
        )
        whole = read_report(report)
        with ReportReader(report) as reader:
            tail = [r for r in reader.rows(whole.rows[1].start) if isinstance(r, ReportRow)]
            assert [r.path for r in tail] == ["b.png", "sub/c.png"]
            assert [r.end for r in tail] == [r.end for r in whole.rows[1:]]
            assert [r.path for r in reader.rows(0) if isinstance(r, ReportRow)] == ["a.png", "b.png", "sub/c.png"]


def test_csv_cell_inverts_the_writer() -> None:
    for column, value in [
        ("path", "=1+1.png"),
        ("path", "'x"),
        ("confidence", 0.123457),
        ("width", 48),
        ("in_distribution", False),
        ("correct", True),
        ("label", None),
        ("status", "ok"),
    ]:
        assert csv_cell(column, csv_text(value)) == value
    assert csv_cell("path", escape_cell("-2.png")) == "-2.png"
    with pytest.raises(ValueError, match="status is '', not ok or error"):
        csv_cell("status", "")


def test_tally_counts_a_result_and_its_row_alike() -> None:
    results = [
        Result(path="a", file="a", status="ok", model="m", label="covid", confidence=0.9, in_distribution=False),
        Result(path="b", file="b", status="ok", model="m", label=None, assessable=False, in_distribution=False),
        Result(path="c", file="c", status="ok", model="m", label="normal", confidence=0.6, assessable=True),
        Result(path="d", file="d", status="error", model="m", error="cannot decode: truncated"),
        Result(path="e", file="e", status="error", model="m", error=None),
    ]
    tally = Tally.of(results)
    assert tally.to_dict(LABELS) == {
        "rows": 5,
        "status": {"ok": 3, "error": 2},
        "labels": {"normal": 1, "viral": 0, "covid": 1},
        "out_of_distribution": 2,
        "not_assessable": 1,
        "errors": {"cannot decode": 1, "error": 1},
    }
    assert (tally.assessable, tally.assessable_flagged, tally.error_count) == (1, 0, 2)
    dropped = Tally.of(results, drop_ood=True)
    assert dict(dropped.per_label) == {"normal": 1} and dropped.flagged == 2
    both = Tally()
    both.update(tally)
    both.update(tally)
    assert both.rows == 10 and both.per_label["covid"] == 2 and both.confidence_sum["covid"] == pytest.approx(1.8)
    # a problem is not a row: nothing to count
    assert not isinstance(RowProblem(1, 1, "cut", "", True, 0, 1), ReportRow)


@pytest.mark.slow
def test_evaluate_predictions_read_back_with_their_truth_columns(
    shared_data: Path, tiny_onnx: Path, tmp_path: Path
) -> None:
    """``evaluate --predictions`` writes the report format plus ``true_label, correct``: both
    formats read back with no damaged row (``correct`` is a boolean, in JSON lines too)."""
    from cxr_batch.evaluation.evaluate import EvaluateConfig, run_evaluate

    root = tmp_path / "labelled"
    for label in LABELS:
        (root / label).mkdir(parents=True)
        for src in sorted((shared_data / "covid19-radiography" / label).glob("*.png"))[:2]:
            shutil.copyfile(src, root / label / src.name)
    (root / "covid" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    reads = []
    for suffix in (".csv", ".jsonl"):
        config = EvaluateConfig(
            data_dir=str(root),
            out=str(tmp_path / f"m{suffix}.json"),
            engine=EngineConfig(model=str(tiny_onnx), threads=1),
            predictions=str(tmp_path / f"p{suffix}"),
        )
        run_evaluate(config, console=Console(file=io.StringIO()))
        read = read_report(tmp_path / f"p{suffix}")
        assert not read.problems and read.columns == tuple(columns(LABELS, truth=True)) and read.labels == LABELS
        assert len(read.rows) == 7 and {r.text("true_label") for r in read.rows} == set(LABELS)
        for r in read.rows:
            assert r.flag("correct") == (None if not r.ok else r.label == r.text("true_label"))
        reads.append([{k: v for k, v in r.values.items() if k != "run_id"} for r in read.rows])
    assert reads[0] == reads[1]
