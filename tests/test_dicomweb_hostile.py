"""DICOMweb against a hostile server (a real HTTP server on 127.0.0.1, tests/hostile_dicomweb.py)
and the one redactor: secrets in URLs, patient values in --query, cross-origin redirects,
401/429 mid-run, drip-feed, ignored offset, huge answers, gzip bombs, endless bodies, bad UIDs,
the wrong instance, unconfirmed stores, malformed JSON, terminal escapes from the server."""

from __future__ import annotations

import base64
import csv
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from hostile_dicomweb import (
    Behaviour,
    HostileServer,
    Instance,
    drip,
    endless,
    gzip_bomb,
    redirect_to,
    status_after,
)

from cxr_batch.cli import main
from cxr_batch.errors import InputError
from cxr_batch.io.dicomweb import (
    DicomwebConfig,
    DicomwebError,
    DicomwebSource,
    auth_headers,
    check_url,
    load_credentials,
)
from cxr_batch.io.inputs import InputFile
from cxr_batch.redact import REDACTED, redact_argv, redact_query, redact_record, redact_text, redact_url

REPO = Path(__file__).resolve().parents[1]
DICOM_DIR = REPO.parent / "shared" / "data" / "dicom"
RSNA = sorted((DICOM_DIR / "rsna-pneumonia-challenge_lungbox").glob("*/*.dcm"))
MODEL = REPO / "export" / "cxr-resnet18.onnx"

needs_files = pytest.mark.skipif(
    len(RSNA) < 4 or not MODEL.is_file(),
    reason=f"needs the shared chest DICOMs ({DICOM_DIR}) and the shipped model ({MODEL})",
)

SECRET_URLS = [
    "https://pacs.example/dicom-web?access_token=TOPSECRET1",
    "https://pacs.example/dicom-web?sig=TOPSECRET2&se=2030",
    "https://bucket.example/dicom-web?X-Amz-Signature=TOPSECRET3&X-Amz-Credential=x",
    "https://pacs.example/dicom-web?key=TOPSECRET4",
    "https://pacs.example/dicom-web#access_token=TOPSECRET5",
]


@pytest.fixture
def no_creds(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CXR_BATCH_DICOMWEB_USER", "CXR_BATCH_DICOMWEB_PASSWORD", "CXR_BATCH_DICOMWEB_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def instances() -> list[Instance]:
    if len(RSNA) < 4:
        pytest.skip(f"needs the shared chest DICOMs ({DICOM_DIR})")
    return [Instance.of(p) for p in RSNA[:4]]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _classify(runner: CliRunner, url: str, out: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(
        main, ["classify", "--model", str(MODEL), "--dicomweb", url, "--query", "Modality=CR", "--out", str(out), *args]
    )
    return result.exit_code, result.output


def _retrieve(source: DicomwebSource, refs: list[str]) -> list[InputFile]:
    return list(source.retrieve([InputFile("", r) for r in refs]))


def _display(i: Instance) -> str:
    return f"dicomweb:{i.study}/{i.series}/{i.sop}"


# --------------------------------------------------------------------------- the redactor (items 3, 4)


def test_urls_with_secrets_are_refused_and_never_recorded_or_shown(
    no_creds: None, tmp_path: Path, runner: CliRunner
) -> None:
    for url in SECRET_URLS:
        with pytest.raises(InputError, match=r"query|fragment") as info:
            check_url(url)
        assert "TOPSECRET" not in str(info.value)
        assert "TOPSECRET" not in redact_url(url) and "TOPSECRET" not in redact_text(f"failed on {url} (x)")
        assert "pacs.example" in redact_url(url) or "bucket.example" in redact_url(url)
        assert "TOPSECRET" not in " ".join(redact_argv(["cxr-batch", "classify", "--dicomweb", url]))
        code, output = _classify(runner, url, tmp_path / "r.csv")
        assert code == 1 and "TOPSECRET" not in output and "Traceback" not in output, output
    # A recorded URL (a record written by an older version) is redacted when shown.
    doc = {"runs": [{"source": {"url": SECRET_URLS[4], "query": {}}, "argv": ["x", SECRET_URLS[0]]}]}
    assert "TOPSECRET" not in json.dumps(redact_record(doc))


def test_patient_values_in_query_are_redacted_everywhere(tmp_path: Path) -> None:
    query = [("Modality", "CR"), ("PatientName", "DOE^JANE"), ("PatientID", "MRN-1234"), ("StudyDate", "20240101-")]
    assert redact_query(query) == {
        "Modality": "CR",
        "PatientName": REDACTED,
        "PatientID": REDACTED,
        "StudyDate": "20240101-",
    }
    argv = ["cxr-batch", "classify", "--query", "PatientName=DOE^JANE", "--query=PatientBirthDate=19700101",
            "--query", "00100020=MRN-1234", "--query", "Modality=CR"]  # fmt: skip
    text = " ".join(redact_argv(argv))
    for value in ("DOE^JANE", "19700101", "MRN-1234"):
        assert value not in text
    assert "PatientName=" in text and "Modality=CR" in text
    doc = {"runs": [{"argv": argv, "source": {"kind": "dicomweb", "query": dict(query)}}]}
    shown = json.dumps(redact_record(doc))
    assert "DOE^JANE" not in shown and "MRN-1234" not in shown and "StudyDate" in shown


@needs_files
@pytest.mark.slow
def test_query_values_stay_out_of_the_record_and_the_html_report(
    instances: list[Instance], no_creds: None, tmp_path: Path, runner: CliRunner
) -> None:
    out = tmp_path / "r.csv"
    with HostileServer(instances) as server:
        code, output = _classify(runner, server.url, out, "--query", "PatientName=DOE^JANE", "--quiet")
    assert code == 0, output
    record = (tmp_path / "r.csv.provenance.json").read_text()
    assert "DOE^JANE" not in record
    source = json.loads(record)["runs"][0]["source"]
    assert source["query"] == {"Modality": "CR", "PatientName": REDACTED} and source["kind"] == "dicomweb"
    html = tmp_path / "html"
    result = runner.invoke(main, ["report", str(out), "--html", str(html)])
    assert result.exit_code == 0, result.output
    page = "".join(p.read_text(errors="replace") for p in html.rglob("*.html"))
    assert "PatientName" in page and "DOE^JANE" not in page and "DOE^JANE" not in result.output


def test_a_non_latin1_password_works_and_is_never_quoted(
    instances: list[Instance], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CXR_BATCH_DICOMWEB_TOKEN", raising=False)
    monkeypatch.setenv("CXR_BATCH_DICOMWEB_USER", "ärzt")
    monkeypatch.setenv("CXR_BATCH_DICOMWEB_PASSWORD", "pw-€-秘密")
    creds = load_credentials()
    header = auth_headers(creds)["Authorization"]
    assert base64.b64decode(header.split()[1]).decode("utf-8") == "ärzt:pw-€-秘密"
    with HostileServer(instances[:1]) as server, DicomwebSource(DicomwebConfig(url=server.url)) as source:
        found = source.find()
        assert len(found.refs) == 1
        assert server.requests[0][2]["Authorization"] == header  # sent, as UTF-8 basic auth
    with pytest.raises(InputError) as info:
        load_credentials(environ={"CXR_BATCH_DICOMWEB_TOKEN": "tok-€-secret"})
    assert "€" not in str(info.value) and "secret" not in str(info.value)


# --------------------------------------------------------------------------- redirects (item 5)


@needs_files
@pytest.mark.slow
def test_stow_never_follows_a_redirect_to_another_port(
    instances: list[Instance], no_creds: None, tmp_path: Path, runner: CliRunner
) -> None:
    with HostileServer(instances[:1]) as elsewhere:
        behaviour = Behaviour(stow_redirect=f"{elsewhere.url}/studies")
        with HostileServer(instances[:1], behaviour) as server:
            out = tmp_path / "r.csv"
            code, output = _classify(runner, server.url, out, "--sr", str(tmp_path / "sr"), "--stow", "--quiet")
            assert len(server.posts()) == 1
        assert elsewhere.posts() == []  # the SR (patient data) never reached the other origin
    [row] = _rows(out)
    assert row["status"] == "ok" and "another origin" in row["notes"] and "stored" not in row["notes"].split(";")[0]
    assert code == 3, output  # an SR not stored is a failed output: exit 3


@pytest.mark.slow
@needs_files
def test_wado_follows_no_redirect_to_another_port(instances: list[Instance], no_creds: None) -> None:
    with HostileServer(instances[:1]) as elsewhere:
        with (
            HostileServer(instances[:1], Behaviour(wado=redirect_to(f"http://127.0.0.1:{elsewhere.port}"))) as server,
            DicomwebSource(DicomwebConfig(url=server.url)) as source,
        ):
            [item] = _retrieve(source, [_display(instances[0])])
        assert item.error is not None and "another origin" in item.error
        assert elsewhere.requests == []


# --------------------------------------------------------------------------- 401 / 429 mid-run (item 8)


@pytest.mark.slow
@needs_files
def test_a_401_mid_run_is_fatal_and_resume_retries_the_rest(
    instances: list[Instance], no_creds: None, tmp_path: Path, runner: CliRunner
) -> None:
    out = tmp_path / "r.csv"
    behaviour = Behaviour(wado=status_after(2, 401))
    with HostileServer(instances, behaviour) as server:
        code, output = _classify(runner, server.url, out, "--quiet", "--batch-size", "1", "--dicomweb-workers", "1")
        assert code == 1 and "HTTP 401" in output and "--resume" in output and "Traceback" not in output, output
        rows = _rows(out)
        assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)  # no permanent error rows
        behaviour.wado = None  # the token was renewed
        code, output = _classify(runner, server.url, out, "--quiet", "--resume")
    assert code == 0, output
    final = _rows(out)
    assert final[:2] == rows and {r["path"] for r in final} == {_display(i) for i in instances}


@needs_files
@pytest.mark.slow
def test_429_is_retried_and_then_treated_like_a_5xx(instances: list[Instance], no_creds: None) -> None:
    # Two 429s, then the answer: retried (with backoff), the instance is retrieved.
    with (
        HostileServer(instances[:1], Behaviour(wado=status_after(0, 429, times=2))) as server,
        DicomwebSource(DicomwebConfig(url=server.url)) as source,
    ):
        [item] = _retrieve(source, [_display(instances[0])])
        assert item.error is None and source.fatal is None
    # Always 429: no error rows, the run stops for --resume, like a server that went away.
    with (
        HostileServer(instances, Behaviour(wado=status_after(0, 429))) as server,
        DicomwebSource(DicomwebConfig(url=server.url, workers=1)) as source,
    ):
        items = _retrieve(source, [_display(i) for i in instances])
        assert items == [] and source.fatal is not None and "HTTP 429" in source.fatal


# --------------------------------------------------------------------------- unbounded servers (item 9)


@pytest.mark.slow
@needs_files
def test_a_drip_feeding_server_is_cut_off_at_the_deadline(instances: list[Instance], no_creds: None) -> None:
    with HostileServer(instances[:1], Behaviour(wado=drip)) as server:
        config = DicomwebConfig(url=server.url, timeout=2, deadline=3)
        with DicomwebSource(config) as source:
            start = time.monotonic()
            items = _retrieve(source, [_display(instances[0])])
            took = time.monotonic() - start
            fatal = source.fatal
    # a transport failure is never a row (--resume retries it): the run stops, saying why
    assert items == [] and fatal is not None and "deadline" in fatal and "--resume" in fatal, (items, fatal)
    assert took < 8, took  # the per-read timeout alone never fires: a byte comes every 0.3 s


@pytest.mark.slow
@needs_files
def test_a_server_that_ignores_offset_does_not_page_forever(instances: list[Instance], no_creds: None) -> None:
    with HostileServer(instances, Behaviour(ignore_offset=True)) as server:
        with (
            DicomwebSource(DicomwebConfig(url=server.url, page_size=2)) as source,
            pytest.raises(DicomwebError, match="ignores 'offset'"),
        ):
            source.find()
        assert len(server.requests) == 2
    with (
        HostileServer(instances) as server,
        DicomwebSource(DicomwebConfig(url=server.url, page_size=2)) as source,
    ):  # the same paging against a server that honours offset
        assert [r.sop for r in source.find().refs] == [i.sop for i in instances]


@needs_files
@pytest.mark.slow
def test_huge_answers_gzip_bombs_and_endless_bodies_are_capped(
    instances: list[Instance], no_creds: None, tmp_path: Path
) -> None:
    huge = json.dumps([instances[0].record()] * 20000).encode()  # about 6 MB
    with (
        HostileServer(instances, Behaviour(qido_body=huge)) as server,
        DicomwebSource(DicomwebConfig(url=server.url, max_answer_bytes=1 << 20)) as source,
        pytest.raises(DicomwebError, match="larger than"),
    ):
        source.find()
    for behaviour in (gzip_bomb(64 << 20), endless):
        with HostileServer(instances[:1], Behaviour(wado=behaviour)) as server:
            config = DicomwebConfig(url=server.url, max_instance_bytes=4 << 20, spool_parent=str(tmp_path))
            with DicomwebSource(config) as source:
                [item] = _retrieve(source, [_display(instances[0])])
                spooled = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
        assert item.error is not None and "larger than" in item.error, item.error
        assert spooled <= 4 << 20
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- what the server says (item 10)


@needs_files
def test_bad_uids_from_qido_are_skipped_never_put_in_a_url(instances: list[Instance], no_creds: None) -> None:
    bad = [
        {**instances[0].record(), "00080018": {"vr": "UI", "Value": ["1.2.3/../../x"]}},
        {**instances[0].record(), "00080018": {"vr": "UI", "Value": ["1.2.3?x=1#frag"]}},
        {
            **instances[0].record(),
            "00080018": {"vr": "UI", "Value": ["1.2.3.4"]},
            "0020000E": {"vr": "UI", "Value": [{"not": "a string"}]},
        },
        {**instances[0].record(), "00080018": {"vr": "UI", "Value": ["1." + "2" * 80]}},
    ]
    with HostileServer(instances[:1], Behaviour(qido_extra=bad)) as server:
        with DicomwebSource(DicomwebConfig(url=server.url)) as source:
            found = source.find()
            assert [r.sop for r in found.refs] == [instances[0].sop]
            assert any("skipped 4 search result(s)" in w for w in found.warnings)
            items = _retrieve(source, [r.display for r in found.refs])
            # a report path with a bad UID (a hand-edited report, a resumed one) is never fetched
            items += _retrieve(source, ["dicomweb:1.2/1.3/1.4?x=1#frag"])
        assert items[0].error is None and items[1].error is not None
        assert not any("x=1" in path or "frag" in path or ".." in path for _, path, _, _ in server.requests)


@needs_files
def test_the_retrieved_instance_must_be_the_one_asked_for(instances: list[Instance], no_creds: None) -> None:
    with (
        HostileServer(instances[:2], Behaviour(wrong_instance=instances[0])) as server,
        DicomwebSource(DicomwebConfig(url=server.url)) as source,
    ):
        first, second = _retrieve(source, [_display(instances[0]), _display(instances[1])])
    assert first.error is None
    assert second.error is not None and "another instance" in second.error


@needs_files
@pytest.mark.slow
def test_a_stow_answer_that_lists_nothing_is_not_a_store(
    instances: list[Instance], no_creds: None, tmp_path: Path, runner: CliRunner
) -> None:
    for body in (b"{}", b"[]", b"not json"):
        out = tmp_path / "r.csv"
        with HostileServer(instances[:1], Behaviour(stow_body=body)) as server:
            code, output = _classify(
                runner, server.url, out, "--sr", str(tmp_path / "sr"), "--stow", "--quiet", "--overwrite"
            )
            assert len(server.posts()) == 1
        [row] = _rows(out)
        assert code == 3, output  # an SR not stored is a failed output: exit 3
        assert "and stored" not in row["notes"] and "stored" in row["notes"], row["notes"]


@pytest.mark.slow
@needs_files
def test_a_malformed_qido_answer_is_a_clear_error(
    instances: list[Instance], no_creds: None, tmp_path: Path, runner: CliRunner
) -> None:
    for body, message in (
        (b'{"0020000D": {}}', "not a list of DICOM JSON objects"),
        (b"[1, 2, 3]", "not a list of DICOM JSON objects"),
        (b"<html>oops</html>", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ):
        with HostileServer(instances[:1], Behaviour(qido_body=body)) as server:
            code, output = _classify(runner, server.url, tmp_path / "r.csv")
        assert code == 1 and message in output and "Traceback" not in output, output


# --------------------------------------------------------------------------- terminal escapes (item 6)


@pytest.mark.slow
@needs_files
def test_what_the_server_says_reaches_the_terminal_escaped(
    instances: list[Instance], no_creds: None, tmp_path: Path, runner: CliRunner
) -> None:
    evil = "299 - \x1b]0;pwned\x07\x1b[2J"
    record = {**instances[0].record(), "0008103E": {"vr": "LO", "Value": ["desc\x1b[31mred\ttab"]}}
    with HostileServer(instances[:1], Behaviour(warning=evil, qido_body=json.dumps([record]).encode())) as server:
        code, output = _classify(runner, server.url, tmp_path / "r.csv")
        listed = runner.invoke(main, ["dicomweb-list", server.url, "--query", "Modality=CR"])
    assert code == 0, output
    assert "\x1b" not in output and "\\x1b]0;pwned" in output
    assert listed.exit_code == 0, listed.output
    assert "\x1b" not in listed.output and "desc\\x1b[31mred\\ttab" in listed.output


# --------------------------------------------------------------------------- the nightly run (issue 23, item 10)


@needs_files
@pytest.mark.slow
def test_a_nightly_window_that_overlaps_skips_what_is_done_without_retrieving_it(
    instances: list[Instance], no_creds: None, tmp_path: Path, runner: CliRunner
) -> None:
    """The README's cron recipe: each night a date window that overlaps the previous one, --resume
    into the same report: what is done is skipped by SOP instance UID and never retrieved again."""
    dated = [replace(i, date="20240101") for i in instances[:2]] + [replace(i, date="20240102") for i in instances[2:]]
    out = tmp_path / "nightly.csv"
    with HostileServer(dated) as server:
        code, output = _classify(runner, server.url, out, "--query", "StudyDate=20231231-20240101", "--resume")
        assert code == 0, output
        first = server.wado_paths()
        assert len(first) == 2
        code, output = _classify(runner, server.url, out, "--query", "StudyDate=20240101-20240102", "--resume")
        assert code == 0, output
        second = server.wado_paths()[len(first) :]
    assert sorted(p.rsplit("/", 1)[1] for p in second) == sorted(i.sop for i in dated[2:])  # only the new ones
    rows = _rows(out)
    assert [r["path"] for r in rows] == [_display(i) for i in dated] and all(r["status"] == "ok" for r in rows)
    runs = json.loads((tmp_path / "nightly.csv.provenance.json").read_text())["runs"]
    assert [r["source"]["query"]["StudyDate"] for r in runs] == ["20231231-20240101", "20240101-20240102"]
