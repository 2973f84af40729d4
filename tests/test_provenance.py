"""The provenance record: real runs of the shipped model on real X-rays, checked against their reports.

Every run here is a real ``cxr-batch`` process (so the recorded command line is the real one), on
the sample images and, when ../shared/data is here, a few real files from it (PNG X-rays, a chest
DICOM and a CT slice). What the record says is checked against the report and recomputed
independently: the counts, the run ids, the model file's sha256, the input-list hash.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, SAMPLE_IMAGES, SHARED, run_cli, sigint_default

jsonschema = pytest.importorskip("jsonschema", reason="the schema tests need jsonschema (the test extra)")

SCHEMA = json.loads((REPO / "docs" / "provenance.schema.json").read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
CLI = [sys.executable, "-m", "cxr_batch.cli"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in this process (the Ctrl-C test below starts a real one)."""
    return run_cli(*args, cwd=cwd, env={"CXR_BATCH_MODEL": None})


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return doc


def errors_of(doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(doc)]


def input_hash(paths: list[str]) -> str:
    """The input-list hash, computed here from the report's paths as docs/provenance.md defines it."""
    total = sum(int.from_bytes(hashlib.sha256(p.encode("utf-8", "surrogateescape")).digest(), "big") for p in paths)
    return f"{total % 2**256:064x}"


def report_counts(rows: list[dict[str, str]]) -> dict[str, Any]:
    """The counts section recomputed from report rows."""
    ok = [r for r in rows if r["status"] == "ok"]
    return {
        "rows": len(rows),
        "status": dict(Counter(r["status"] for r in rows)),
        "labels": dict(Counter(r["label"] for r in ok if r["label"])),
        "out_of_distribution": sum(r["in_distribution"] == "false" for r in ok),
        "not_assessable": sum(r["label"] == "" for r in ok),  # the lung stage: ok rows without a label
        "errors": dict(Counter(r["error"].split(": ", 1)[0] for r in rows if r["status"] != "ok")),
    }


def nonzero(counts: dict[str, Any]) -> dict[str, Any]:
    """A record's counts without its zero entries (the record lists every label and both statuses)."""
    out = dict(counts)
    for key in ("status", "labels", "errors"):
        out[key] = {k: v for k, v in counts[key].items() if v}
    return out


def parse_time(text: str) -> datetime:
    assert text.endswith("Z")
    return datetime.fromisoformat(text[:-1] + "+00:00")


@pytest.fixture
def real_folder(tmp_path: Path) -> Path:
    """The nine sample X-rays, a few real files from ../shared/data when it is here (three PNG X-rays,
    the pydicom chest CR, a CT slice the guard must flag) and one empty file (an error row)."""
    if not any(SAMPLE_IMAGES.rglob("*.jp*g")):
        pytest.skip(f"{SAMPLE_IMAGES} holds no sample X-rays")
    root = tmp_path / "xrays"
    shutil.copytree(SAMPLE_IMAGES, root, ignore=shutil.ignore_patterns("*.md", "*.csv"))
    extra = [
        *sorted((SHARED / "covid19-radiography" / "covid").glob("*.png"))[:2],
        *sorted((SHARED / "kermany-normal" / "normal").glob("*.png"))[:1],
        SHARED / "dicom" / "pydicom-data" / "other" / "RG1_UNCI.dcm",
        SHARED / "dicom" / "pydicom-testfiles" / "other" / "CT_small.dcm",
    ]
    (root / "shared").mkdir()
    for src in extra:
        if src.is_file():
            shutil.copyfile(src, root / "shared" / src.name)
    (root / "broken").mkdir()
    (root / "broken" / "empty.png").write_bytes(b"")
    return root


def check_against_report(doc: dict[str, Any], report: Path) -> None:
    """One run that wrote the whole report: its counts, run id and input hash must match the report."""
    rows = read_rows(report)
    assert errors_of(doc) == []
    (run,) = doc["runs"]
    assert {r["run_id"] for r in rows} == {run["run_id"]}
    assert uuid.UUID(run["run_id"]).version == 7
    assert nonzero(run["counts"]) == report_counts(rows)
    assert run["inputs"]["count"] == len(rows)
    assert run["inputs"]["sha256"] == input_hash([r["path"] for r in rows])


# --------------------------------------------------------------------------- one real run


@pytest.mark.slow
def test_record_of_a_real_run_matches_its_report(real_folder: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    import cxr_batch
    from cxr_batch.engine.classifier import CUDA, find_default_model, model_info

    out = tmp_path / "results.csv"
    before = time.time()
    args = ["classify", str(real_folder), "--out", str(out), "--batch-size", "4", "-q"]
    done = cli(*args)
    after = time.time()
    rows = read_rows(out)
    assert done.returncode == 3, done.stderr  # the empty file's error row
    record = Path(str(out) + ".provenance.json")
    doc = load(record)
    assert doc["schema_version"] == 1 and doc["report"] == str(out)
    check_against_report(doc, out)
    (run,) = doc["runs"]
    assert run["status"] == "finished" and run["interrupted"] is False and run["error"] is None
    assert run["counts"]["status"]["error"] == 1 and run["counts"]["errors"] == {"empty file (0 bytes)": 1}
    if (real_folder / "shared" / "CT_small.dcm").exists():
        assert run["counts"]["out_of_distribution"] >= 1  # the CT slice is flagged whatever its score

    # When, and the command line: this process's own.
    started, ended = parse_time(run["started"]), parse_time(run["ended"])
    assert before - 0.5 <= started.timestamp() <= ended.timestamp() <= after + 0.5
    assert abs(run["duration_s"] - (ended - started).total_seconds()) < 0.01
    assert run["argv"][1:] == args

    # The model: the embedded default for this machine, its file's sha256 computed here.
    cuda = CUDA in ort.get_available_providers()
    model_file = find_default_model("auto", cuda=cuda)
    # by name and content: the source tree (export/) and an installed copy (cxr_batch/models/)
    # hold the same embedded default in two places
    assert Path(run["model"]["path"]).name == model_file.name
    assert run["model"]["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    contract = model_info(model_file)["contract"]
    assert (run["model"]["name"], run["model"]["version"]) == (contract["name"], contract["version"])
    from cxr_batch.engine.cpu import int8_choice

    cpu_default = "int8" if int8_choice()[0] else "fp32"  # what --precision auto takes on this CPU
    assert (
        run["model"]["precision"] == contract["precision"] == (cpu_default if not cuda else run["model"]["precision"])
    )
    assert {r["model"] for r in rows} == {f"{contract['name']}@{contract['version']}"}
    assert run["preprocessing"] == {
        "input_size": contract["input_size"],
        "mean": contract["mean"],
        "std": contract["std"],
        "steps": contract["preprocessing"],
    }
    assert run["ood"]["threshold"] == contract["ood"]["threshold"]

    # Versions, provider, machine, settings.
    assert run["versions"]["onnxruntime"] == ort.__version__ and run["versions"]["cxr_batch"] == cxr_batch.__version__
    assert run["execution"]["provider"] in ort.get_available_providers()
    if not cuda:
        assert run["execution"]["provider"] == "CPUExecutionProvider" and run["execution"]["gpu"] is None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text()
        flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
        assert set(run["execution"]["cpu"]["isa_flags"]) <= flags
        assert ("avx2" in flags) == ("avx2" in run["execution"]["cpu"]["isa_flags"])
        assert run["execution"]["cpu"]["model"] in text
    assert run["settings"]["batch_size"] == 4 and run["settings"]["threads_requested"] == 0
    assert run["shard"] is None and run["resumed"] is False and run["kept_rows"] == 0


@pytest.mark.slow
def test_jsonl_report_and_provenance_elsewhere(sample_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    record = tmp_path / "records" / "run.json"
    done = cli("classify", str(sample_images), "--out", str(out), "--provenance", str(record), "-q")
    assert done.returncode == 0, done.stderr
    assert not Path(str(out) + ".provenance.json").exists()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    doc = load(record)
    assert errors_of(doc) == []
    assert {r["run_id"] for r in rows} == {doc["runs"][0]["run_id"]} and list(rows[0])[-1] == "run_id"
    assert doc["runs"][0]["counts"]["rows"] == len(rows) == 9


@pytest.mark.slow
def test_stdout_report_has_a_record_only_when_asked(sample_images: Path, tmp_path: Path) -> None:
    done = cli("classify", str(sample_images), "--out", "-", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing beside a report that is not a file
    assert {r["run_id"] for r in csv.DictReader(done.stdout.splitlines())} == {""}

    done = cli("classify", str(sample_images), "--out", "-", "--provenance", "p.json", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    doc = load(tmp_path / "p.json")
    assert errors_of(doc) == [] and doc["report"] == "-"
    ids = {r["run_id"] for r in csv.DictReader(done.stdout.splitlines())}
    assert ids == {doc["runs"][0]["run_id"]}


@pytest.mark.slow
def test_an_existing_record_is_never_overwritten_silently(sample_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    record = Path(str(out) + ".provenance.json")
    record.write_text('{"left": "by an earlier report"}')
    done = cli("classify", str(sample_images), "--out", str(out), "-q")
    assert done.returncode == 1 and "already exists" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and record.read_text() == '{"left": "by an earlier report"}'
    done = cli("classify", str(sample_images), "--out", str(out), "--overwrite", "-q")
    assert done.returncode == 0, done.stderr
    check_against_report(load(record), out)
    # --resume onto a damaged record: refused before anything runs, the report untouched.
    record.write_text("{not json")
    before = out.read_bytes()
    done = cli("classify", str(sample_images), "--out", str(out), "--resume", "-q")
    assert done.returncode == 1 and "not a valid provenance record" in done.stderr
    assert out.read_bytes() == before


# --------------------------------------------------------------------------- resume, interruption, merge


@pytest.mark.slow
def test_resume_appends_a_run(sample_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    assert cli("classify", str(sample_images), "--out", str(out), "-q").returncode == 0
    record = Path(str(out) + ".provenance.json")
    first = load(record)["runs"][0]
    lines = out.read_bytes().split(b"\r\n")
    out.write_bytes(b"\r\n".join(lines[:5]) + b"\r\n")  # header and 4 rows: as if stopped there
    done = cli("classify", str(sample_images), "--out", str(out), "--resume", "-q")
    assert done.returncode == 0, done.stderr
    doc = load(record)
    assert errors_of(doc) == []
    assert len(doc["runs"]) == 2 and doc["runs"][0] == first  # the earlier run is kept as it was
    second = doc["runs"][1]
    assert second["run_id"] != first["run_id"] and parse_time(second["started"]) >= parse_time(first["ended"])
    assert second["resumed"] is True and second["kept_rows"] == 4
    rows = read_rows(out)
    assert [r["run_id"] for r in rows] == [first["run_id"]] * 4 + [second["run_id"]] * 5
    assert nonzero(second["counts"]) == report_counts(rows[4:])
    assert second["inputs"] == first["inputs"]  # same input list, so the same hash

    # Nothing left to do: the run is still recorded, with no rows.
    assert cli("classify", str(sample_images), "--out", str(out), "--resume", "-q").returncode == 0
    third = load(record)["runs"][2]
    assert third["counts"]["rows"] == 0 and third["kept_rows"] == 9 and third["status"] == "finished"


@pytest.mark.slow
def test_ctrl_c_leaves_a_valid_record_and_resume_completes_it(tmp_path: Path) -> None:
    """A real SIGINT to a real run of the shipped model on 200 real X-rays, then --resume."""
    source = SHARED / "covid19-radiography"
    if not source.is_dir():
        pytest.skip(f"the shared X-ray data is not here ({SHARED}); this test needs ../shared/data")
    files = [*sorted((source / "normal").glob("*.png"))[:100], *sorted((source / "covid").glob("*.png"))[:100]]
    listing = tmp_path / "files.txt"
    listing.write_text("".join(f"{f}\n" for f in files))
    out = tmp_path / "r.csv"
    record = Path(str(out) + ".provenance.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = ["classify", "--files-from", str(listing), "--out", str(out), "--precision", "fp32",
            "--batch-size", "1", "--threads", "1", "-q"]  # fmt: skip
    proc = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=sigint_default
    )
    running: dict[str, Any] | None = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= 4 and record.exists():
                running = load(record)  # written atomically: always a whole document
                break
            if proc.poll() is not None:
                pytest.fail(
                    f"the run ended before it could be interrupted: {proc.stderr.read() if proc.stderr else ''}"
                )
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "rerun with --resume" in err and "Traceback" not in err
    # While it ran, the record already held the run, as running.
    assert running is not None and errors_of(running) == []
    assert running["runs"][0]["status"] == "running" and running["runs"][0]["ended"] is None

    doc = load(record)
    assert errors_of(doc) == []
    (run,) = doc["runs"]
    assert run["status"] == "interrupted" and run["interrupted"] is True and run["ended"] is not None
    assert run["run_id"] == running["runs"][0]["run_id"]
    rows = read_rows(out)
    assert 3 <= len(rows) < len(files)
    assert {r["run_id"] for r in rows} == {run["run_id"]}
    assert nonzero(run["counts"]) == report_counts(rows)  # what was done, exactly
    assert run["inputs"]["count"] == len(files)
    assert run["inputs"]["sha256"] == input_hash([str(f) for f in files])

    done = cli("classify", "--files-from", str(listing), "--out", str(out), "--precision", "fp32", "-q", "--resume")
    assert done.returncode == 0, done.stderr
    doc = load(record)
    assert errors_of(doc) == []
    first, second = doc["runs"]
    assert first == run and second["status"] == "finished" and second["kept_rows"] == len(rows)
    rows = read_rows(out)
    assert len(rows) == len(files) and sum(r["counts"]["rows"] for r in doc["runs"]) == len(files)
    for r in (first, second):
        assert nonzero(r["counts"]) == report_counts([row for row in rows if row["run_id"] == r["run_id"]])


@pytest.mark.slow
def test_merge_combines_the_shards_records(real_folder: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole.csv"
    assert cli("classify", str(real_folder), "--out", str(whole), "-q").returncode == 3
    parts = []
    for k in range(2):
        part = tmp_path / "parts" / f"part-{k}.csv"
        done = cli("classify", str(real_folder), "--shard", f"{k}/2", "--out", str(part), "-q")
        assert done.returncode in (0, 3), done.stderr
        parts.append(part)
    merged = tmp_path / "merged.csv"
    done = cli("merge", *map(str, parts), "--out", str(merged), "--expect", "2", "-q")
    assert done.returncode == 3, done.stderr
    doc = load(Path(str(merged) + ".provenance.json"))
    assert errors_of(doc) == []
    part_docs = [load(Path(str(p) + ".provenance.json")) for p in parts]
    # Every run of every part, each saying which part it came from.
    assert doc["runs"] == [{**run, "part": str(p)} for p, d in zip(parts, part_docs, strict=True) for run in d["runs"]]
    assert [run["shard"] for run in doc["runs"]] == [{"index": 0, "count": 2}, {"index": 1, "count": 2}]
    by_id = {run["run_id"]: run for run in doc["runs"]}
    rows = read_rows(merged)
    for p in parts:
        for row in read_rows(p):
            assert by_id[row["run_id"]]["part"] == str(p)
    assert {r["run_id"] for r in rows} == set(by_id)
    # merged_from: one entry per part, with its rows, shard, run ids and counts.
    for entry, p, d in zip(doc["merged_from"], parts, part_docs, strict=True):
        part_rows = read_rows(p)
        assert entry["part"] == str(p) and entry["record"] == str(p) + ".provenance.json"
        assert entry["rows"] == len(part_rows) and entry["run_ids"] == [d["runs"][0]["run_id"]]
        assert entry["unrecorded_run_ids"] == [] and nonzero(entry["counts"]) == report_counts(part_rows)
    assert sorted(e["shard"] for e in doc["merged_from"]) == [0, 1]
    # The merge: the counts of the whole, and the same input-list hash as the unsharded run.
    m = doc["merge"]
    assert nonzero(m["counts"]) == report_counts(rows) and m["parts"] == 2 and m["expect"] == 2
    assert m["inputs"]["sha256"] == load(Path(str(whole) + ".provenance.json"))["runs"][0]["inputs"]["sha256"]
    assert m["inputs"]["sha256"] == input_hash([r["path"] for r in rows])
    assert m["argv"][1:] == ["merge", *map(str, parts), "--out", str(merged), "--expect", "2", "-q"]

    # A part without its record still merges, with a warning and the runs it can't account for.
    Path(str(parts[1]) + ".provenance.json").unlink()
    again = tmp_path / "again.csv"
    done = cli("merge", *map(str, parts), "--out", str(again))
    assert done.returncode == 3 and "has no provenance record" in done.stderr
    doc = load(Path(str(again) + ".provenance.json"))
    assert errors_of(doc) == []
    assert doc["merged_from"][1]["record"] is None
    assert doc["merged_from"][1]["unrecorded_run_ids"] == sorted({r["run_id"] for r in read_rows(parts[1])})
    assert [run["part"] for run in doc["runs"]] == [str(parts[0])]


# --------------------------------------------------------------------------- the schema


@pytest.mark.slow
def test_schema_is_valid_and_rejects_broken_records(sample_images: Path, tmp_path: Path) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    out = tmp_path / "r.csv"
    assert cli("classify", str(sample_images), "--out", str(out), "-q").returncode == 0
    good = load(Path(str(out) + ".provenance.json"))
    assert errors_of(good) == []

    def broken(change: Any) -> list[str]:
        doc = copy.deepcopy(good)
        change(doc, doc["runs"][0])
        return errors_of(doc)

    cases = {
        "no run id": lambda d, r: r.pop("run_id"),
        "run id not a UUID": lambda d, r: r.update(run_id="run-1"),
        "schema_version as a string": lambda d, r: d.update(schema_version="1"),
        "an unknown schema_version": lambda d, r: d.update(schema_version=2),
        "model sha256 cut short": lambda d, r: r["model"].update(sha256=r["model"]["sha256"][:12]),
        "no model precision": lambda d, r: r["model"].pop("precision"),
        "a local time, no Z": lambda d, r: r.update(started="2026-12-01 10:00:00"),
        "a negative count": lambda d, r: r["counts"].update(rows=-1),
        "a count as text": lambda d, r: r["counts"]["labels"].update(covid="5"),
        "finished but no end": lambda d, r: r.update(ended=None),
        "interrupted without the flag": lambda d, r: r.update(status="interrupted", error="x"),
        "an unknown status": lambda d, r: r.update(status="done"),
        "no input hash": lambda d, r: r["inputs"].pop("sha256"),
        "no provider": lambda d, r: r["execution"].pop("provider"),
        "merged_from without merge": lambda d, r: d.update(merged_from=[]),
    }
    for name, change in cases.items():
        assert broken(change), f"the schema accepted a record with {name}"


@pytest.mark.slow
def test_the_library_api_records_another_input_source(sample_images: Path, tmp_path: Path) -> None:
    """What a pipeline (or the DICOMweb source) does: Classifier + open_report + RunRecorder."""
    from cxr_batch.engine.classifier import Classifier, EngineConfig
    from cxr_batch.report import provenance
    from cxr_batch.report.writer import ReportConfig, open_report

    engine = EngineConfig(threads=1)
    clf = Classifier.from_config(engine)
    files = sorted(str(p) for p in sample_images.rglob("*.jp*g"))
    out = tmp_path / "r.csv"
    record = provenance.record_path(str(out), None)
    assert record == str(out) + ".provenance.json"
    run_id = provenance.new_run_id()
    writer, _ = open_report(ReportConfig(out=str(out)), clf.labels, clf.meta.ident, run_id=run_id)
    recorder = provenance.RunRecorder.start(
        record,
        run_id=run_id,
        report=str(out),
        report_format="csv",
        model=provenance.model_facts(clf.meta, clf.model_path, clf.model_origin),
        provider=clf.provider,
        settings=provenance.engine_settings(clf, engine),
        preprocessing=provenance.preprocessing_facts(clf.meta),
        ood=provenance.ood_facts(clf.meta),
        inputs=files,
        source={"kind": "dicomweb", "url": "https://pacs.example/dicom-web", "studies": ["1.2.3"]},
        argv=["cxr-batch", "classify", "--dicomweb", "https://user:hunter2@pacs.example/dicom-web?access_token=abc"],
    )
    try:
        for batch in clf.iter_batches(files):
            writer.write(batch)
            recorder.add(batch)
    finally:
        writer.close()
        assert recorder.close() is None
    doc = load(Path(record))
    check_against_report(doc, out)
    run = doc["runs"][0]
    assert run["source"]["kind"] == "dicomweb" and run["settings"]["threads_requested"] == 1
    assert "hunter2" not in json.dumps(doc) and "abc" not in run["argv"][-1]


def test_redact_argv() -> None:
    from cxr_batch.report.provenance import REDACTED, redact_argv

    argv = [
        "cxr-batch", "classify", "--dicomweb", "https://alice:s3cret@pacs.example:8042/dicom-web?x=1&access_token=tok1",
        "--token", "tok2", "--password=pw3", "--api-key", "k4", "--query", "Modality=CR",
        "--query", "Password=pw5", "--token-file", "/run/secrets/pacs", "--auth-env", "PACS_TOKEN",
        "Bearer abc.def", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln", "--out", "r.csv",
    ]  # fmt: skip
    red = redact_argv(argv)
    text = " ".join(red)
    for secret in ("s3cret", "alice", "tok1", "tok2", "pw3", "k4", "pw5", "abc.def", "eyJhbGci"):
        assert secret not in text, secret
    # every query value and the fragment go: the names of secret parameters are not a closed list
    assert red[3] == f"https://{REDACTED}@pacs.example:8042/dicom-web?x={REDACTED}&access_token={REDACTED}"
    assert red[4:10] == ["--token", REDACTED, f"--password={REDACTED}", "--api-key", REDACTED, "--query"]
    # Kept: ordinary values, and options that say where a secret is rather than what it is.
    assert "Modality=CR" in red and f"Password={REDACTED}" in red
    assert (
        red[red.index("--token-file") + 1] == "/run/secrets/pacs" and red[red.index("--auth-env") + 1] == "PACS_TOKEN"
    )
    assert red[-2:] == ["--out", "r.csv"]
