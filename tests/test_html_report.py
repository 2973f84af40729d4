"""The HTML report (``cxr-batch report --html`` and ``classify --html``), checked in headless Chromium.

Real images (sample_images, the shared DICOM files), the shipped model, real reports written by
classify, merge and evaluate. The browser checks open every page from disk (``file://``) and use
a probe: a copy of the page with a script added (the pages themselves have none and need none)
that records, once the page has loaded, each ``<img>``'s ``naturalWidth``, the number of
``<script>`` elements and the text of every file name; ``--dump-dom`` brings that back. The
browser tests skip with a reason where Chromium is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import SAMPLE_IMAGES, SHARED
from PIL import Image

from cxr_batch.cli.main import main
from cxr_batch.report.html import href, text

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "Chromium is not installed (apt-get install -y chromium; .ci/run does)"
DICOM_DIR = SHARED / "dicom"


def need_chromium() -> None:
    """Skip without Chromium; fail instead where CI asks for the browser test (.ci/run)."""
    if CHROMIUM is None:
        if os.environ.get("CXR_BATCH_REQUIRE_CHROMIUM"):
            pytest.fail(f"{NO_CHROMIUM}, and CXR_BATCH_REQUIRE_CHROMIUM is set")
        pytest.skip(NO_CHROMIUM)


#: Hostile file names (a "/" makes a sub-folder, so the report path holds a whole <script> tag)
#: and the text a reader must see for each: controls, bidi overrides and bytes that are not
#: UTF-8 as visible escapes, everything else verbatim.
HOSTILE = {
    "<script>alert(1)</script>.png": "<script>alert(1)</script>.png",
    "<img src=x onerror=alert(2)>.png": "<img src=x onerror=alert(2)>.png",
    "\"quoted\" & 'single' &amp;.png": "\"quoted\" & 'single' &amp;.png",
    '=1+2 HYPERLINK("example.invalid").png': '=1+2 HYPERLINK("example.invalid").png',
    "@SUM(A1).png": "@SUM(A1).png",
    "+plus.png": "+plus.png",
    "ctrl-\x1b[31m-esc.png": "ctrl-\\x1b[31m-esc.png",
    "tab\tnew\nline.png": "tab\\x09new\\x0aline.png",
    "rtl-\u202egnp.exe.png": "rtl-\\u202egnp.exe.png",
    os.fsdecode(b"latin1-\xe9.png"): "latin1-\\xe9.png",
}

CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]

PROBE = """<script>
window.addEventListener("load", function () {
  var r = {
    imgs: Array.from(document.images).map(function (i) { return [i.getAttribute("src"), i.complete, i.naturalWidth]; }),
    scripts: document.scripts.length,
    names: Array.from(document.querySelectorAll(".name")).map(function (e) { return e.textContent; }),
    counts: Array.from(document.querySelectorAll("[data-count]")).map(function (e) {
      return [e.getAttribute("data-count"), e.textContent]; }),
    links: Array.from(document.links).map(function (a) { return a.getAttribute("href"); })
  };
  var p = document.createElement("pre");
  p.id = "cxr-probe";
  p.textContent = JSON.stringify(r);
  document.body.appendChild(p);
});
</script>"""


def chromium(tmp: Path, *args: str, javascript: bool = True, timeout: int = 90) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium with a fresh profile; ``javascript=False`` blocks scripts on every page
    (a content setting in the profile: headless Chromium has no working command-line switch for it)."""
    assert CHROMIUM is not None
    profile = tmp / f"chromium-profile-{len(list(tmp.glob('chromium-profile-*')))}"
    if not javascript:
        (profile / "Default").mkdir(parents=True)
        settings = {"profile": {"default_content_setting_values": {"javascript": 2}}}
        (profile / "Default" / "Preferences").write_text(json.dumps(settings))
    return subprocess.run(
        [CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def probe(page: Path, tmp: Path) -> dict[str, Any]:
    """Load a copy of ``page`` (same folder, so its relative links hold) with the probe script
    added and the page's no-script policy taken out; returns what the probe saw."""
    source = page.read_text(encoding="utf-8")
    assert "<script" not in source.lower(), f"{page.name} holds a script"
    source = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", source)
    copy = page.with_name(f".probe-{page.name}")
    copy.write_text(source.replace("</head>", PROBE + "</head>", 1), encoding="utf-8")
    try:
        done = chromium(tmp, "--dump-dom", copy.as_uri())
    finally:
        copy.unlink()
    m = re.search(r'<pre id="cxr-probe">(.*?)</pre>', done.stdout, re.S)
    assert m, f"the probe did not run on {page.name}: {done.stdout[-400:]} {done.stderr[-400:]}"
    result: dict[str, Any] = json.loads(html.unescape(m.group(1)))
    return result


class _Counts(HTMLParser):
    """The ``data-count`` cells of a page, from its HTML (no browser)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, str] = {}
        self._key: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        key = dict(attrs).get("data-count")
        if key is not None:
            self._key = key
            self.counts[key] = ""

    def handle_data(self, data: str) -> None:
        if self._key is not None:
            self.counts[self._key] += data

    def handle_endtag(self, tag: str) -> None:
        self._key = None


def page_counts(page: Path) -> dict[str, int]:
    parser = _Counts()
    parser.feed(page.read_text(encoding="utf-8"))
    return {k: int(v) for k, v in parser.counts.items()}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [
            {k: ("" if v is None else str(v).lower() if isinstance(v, bool) else str(v)) for k, v in r.items()}
            for r in rows
        ]
    return read_csv(path)


def expected_counts(
    rows: list[dict[str, Any]], labels: tuple[str, ...] = ("normal", "viral", "covid")
) -> dict[str, int]:
    """The summary's numbers, computed here from the report rows independently of the library."""
    ok = [r for r in rows if r["status"] == "ok" and r["label"]]
    out = {f"label:{lab}": sum(r["label"] == lab for r in ok) for lab in labels}
    out["total"] = len(rows)
    for status, n in Counter(r["status"] for r in rows).items():
        out[f"status:{status}"] = n
    out["ood:flagged"] = sum(r.get("in_distribution") == "false" for r in ok)
    out["ood:in distribution"] = sum(r.get("in_distribution") == "true" for r in ok)
    out["ood:no verdict"] = sum(r.get("in_distribution", "") == "" for r in ok)
    for r in rows:
        if r["status"] == "ok" and r.get("assessable") == "false":  # the lung stage: no label, not an error
            out["not assessable"] = out.get("not assessable", 0) + 1
        elif not (r["status"] == "ok" and r["label"]):
            key = "error:" + (r["error"] or "error").split(": ", 1)[0]
            out[key] = out.get(key, 0) + 1
    return out


def invoke(runner: CliRunner, *args: str) -> Any:
    return runner.invoke(main, list(args), catch_exceptions=False)


# --------------------------------------------------------------------------- escaping, no browser


def test_text_escapes_markup_and_shows_hidden_characters() -> None:
    assert text("<script>alert('x')</script>") == "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;"
    assert text('a "b" & c') == "a &quot;b&quot; &amp; c"
    for name, shown in HOSTILE.items():
        assert html.unescape(text(name)) == shown
        assert "<" not in text(name) and '"' not in text(name)
    assert text("\x00\x7f\x85\u200b\ufeff") == "\\x00\\x7f\\x85\\u200b\\ufeff"
    text(os.fsdecode(b"\xff\xfe")).encode("utf-8")  # lone surrogates never reach the UTF-8 page


def test_href_is_relative_and_percent_encoded() -> None:
    assert href("thumbs/ab/cd.jpg") == "thumbs/ab/cd.jpg"
    assert href("javascript:alert(1)") == "javascript%3Aalert%281%29"
    assert href('../hm/a b?#"<>.png') == "../hm/a%20b%3F%23%22%3C%3E.png"
    assert href(os.fsdecode(b"../hm/\xe9.png")) == "../hm/%E9.png"


# --------------------------------------------------------------------------- a real run, in the browser


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """sample_images plus copies of a real X-ray under hostile names, classified with the shipped
    model (CSV, heatmaps) and turned into an HTML report by ``classify --html``."""
    if not any(SAMPLE_IMAGES.rglob("*.jp*g")):
        pytest.skip(f"{SAMPLE_IMAGES} holds no sample X-rays")
    tmp = tmp_path_factory.mktemp("html")
    images = tmp / "images"
    shutil.copytree(SAMPLE_IMAGES, images, ignore=shutil.ignore_patterns("*.md", "*.csv"))
    source = images / "covid" / "thnov10p5641g006-c.png"
    for name in HOSTILE:
        target = images / "hostile" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    runner = CliRunner()
    report = tmp / "results.csv"
    res = runner.invoke(
        main,
        ["classify", str(images), "--out", str(report), "--heatmaps", str(tmp / "hm"), "--html", str(tmp / "site")],
    )
    assert res.exit_code == 3, res.output  # broken.png is an error row
    assert "html report:" in res.output
    return {"tmp": tmp, "images": images, "report": report, "site": tmp / "site", "heatmaps": tmp / "hm"}


@pytest.mark.slow
def test_summary_counts_equal_the_report(hostile_run: dict[str, Path]) -> None:
    rows = read_csv(hostile_run["report"])
    want = expected_counts(rows)
    got = page_counts(hostile_run["site"] / "index.html")
    assert {k: got[k] for k in want} == want
    assert got["gallery:errors"] == 1 and want["status:error"] == 1
    assert len(rows) == 9 + len(HOSTILE) + 1


@pytest.mark.slow
@pytest.mark.chromium
def test_every_page_in_chromium(hostile_run: dict[str, Path], tmp_path: Path) -> None:
    need_chromium()
    site = hostile_run["site"]
    rows = read_csv(hostile_run["report"])
    pages = sorted(site.glob("*.html"))
    assert {p.name for p in pages} >= {"index.html", "errors-1.html", "flagged-1.html", "low-confidence-1.html"}
    seen_names: list[str] = []
    images = 0
    for page in pages:
        seen = probe(page, tmp_path)
        assert seen["scripts"] == 1, f"{page.name}: a file name became a script"  # the probe's own only
        for src, complete, width in seen["imgs"]:
            assert complete and width > 0, f"{page.name}: broken image {src}"
        images += len(seen["imgs"])
        for link in seen["links"]:
            assert "://" not in link and not link.startswith("/"), f"{page.name}: link {link!r} is not relative"
            assert (site / link.split("#")[0]).exists() or link.startswith("../"), link
        seen_names += seen["names"]
        if page.name == "index.html":
            shown = {k: int(v) for k, v in seen["counts"]}
            want = expected_counts(rows)
            assert {k: shown[k] for k in want} == want
    ok = sum(r["status"] == "ok" for r in rows)
    assert images >= 2 * ok + (len(rows) - ok)  # each card: its thumbnail, and its heatmap when classified
    for shown in HOSTILE.values():
        assert "hostile/" + shown in seen_names, f"{shown!r} is not shown as text"
    assert "broken.png" in seen_names


@pytest.mark.slow
@pytest.mark.chromium
def test_probe_sees_a_broken_image(tmp_path: Path) -> None:
    """The browser check can fail: a page with a missing image is reported as broken."""
    need_chromium()
    page = tmp_path / "p.html"
    page.write_text('<!DOCTYPE html><html><head></head><body><img src="nothing-here.jpg"></body></html>')
    seen = probe(page, tmp_path)
    assert seen["imgs"] == [["nothing-here.jpg", True, 0]]


@pytest.mark.slow
@pytest.mark.chromium
def test_screenshot_and_pages_without_javascript(hostile_run: dict[str, Path], tmp_path: Path) -> None:
    need_chromium()
    site = hostile_run["site"]
    shot = tmp_path / "index.png"
    done = chromium(tmp_path, "--window-size=1200,900", f"--screenshot={shot}", (site / "index.html").as_uri())
    assert shot.is_file(), done.stderr[-400:]
    with Image.open(shot) as img:
        grey = img.convert("L")
        assert grey.size == (1200, 900)
        lo, hi = grey.getextrema()
        assert hi - lo > 100  # a rendered page, not a blank one
    gallery = next(site.glob("label-2-covid-1.html"))
    shot2 = tmp_path / "covid.png"
    chromium(tmp_path, "--window-size=1200,900", f"--screenshot={shot2}", gallery.as_uri())
    with Image.open(shot2) as img:
        # thumbnails and heatmaps: many distinct colours, not only the page's few
        assert len(img.convert("RGB").getcolors(1 << 20) or []) > 1000
    # With JavaScript off the pages render the same, pixel for pixel. (Control: a script that
    # paints the page red runs with JavaScript on, and does not with it off.)
    control = tmp_path / "control.html"
    control.write_text("<!DOCTYPE html><html><body><script>document.body.style.background='red'</script></body></html>")
    for javascript in (True, False):
        out = tmp_path / f"control-{javascript}.png"
        chromium(tmp_path, "--window-size=200,200", f"--screenshot={out}", control.as_uri(), javascript=javascript)
        with Image.open(out) as img:
            assert (img.convert("RGB").getpixel((100, 100)) == (255, 0, 0)) is javascript
    for page, on in ((site / "index.html", shot), (gallery, shot2)):
        same = False
        for attempt in range(3):  # on a loaded machine a screenshot can be taken before every image is painted
            if attempt:
                chromium(tmp_path, "--window-size=1200,900", f"--screenshot={on}", page.as_uri())
            off = tmp_path / f"nojs-{page.stem}-{attempt}.png"
            chromium(tmp_path, "--window-size=1200,900", f"--screenshot={off}", page.as_uri(), javascript=False)
            with Image.open(on) as a, Image.open(off) as b:
                same = a.convert("RGB").tobytes() == b.convert("RGB").tobytes()
            if same:
                break
        assert same, f"{page.name} renders differently with JavaScript off"


@pytest.mark.slow
def test_cards_show_probabilities_heatmaps_and_errors(hostile_run: dict[str, Path]) -> None:
    site = hostile_run["site"]
    rows = {r["path"]: r for r in read_csv(hostile_run["report"])}
    errors = (site / "errors-1.html").read_text(encoding="utf-8")
    assert "broken.png" in errors and text(rows["broken.png"]["error"]) in errors
    covid = (site / "label-2-covid-1.html").read_text(encoding="utf-8")
    # sorted by confidence, most confident first
    order = re.findall(r'<div class="name">(.*?)</div>', covid)
    confs = [float(rows[html.unescape(n)]["confidence"]) for n in order if "\\x" not in n and "\\u" not in n]
    assert confs == sorted(confs, reverse=True)
    assert covid.count('title="open the full heatmap"') == sum(
        r["label"] == "covid" for r in rows.values() if r["status"] == "ok"
    )
    link = re.search(r'<a href="([^"]+)" title="open the full heatmap">', covid)
    assert link and link.group(1).startswith("../hm/") and (site / html.unescape(link.group(1))).is_file()
    for thumb in (site / "thumbs").rglob("*.jpg"):
        with Image.open(thumb) as img:
            assert max(img.size) <= 256 and img.format == "JPEG"


@pytest.mark.slow
def test_missing_image_gets_a_placeholder_and_a_note(hostile_run: dict[str, Path], tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(hostile_run["images"] / "viral", images / "viral")
    report = tmp_path / "r.csv"
    res = invoke(CliRunner(), "classify", str(images), "--out", str(report), "-q")
    assert res.exit_code == 0, res.output
    gone = sorted((images / "viral").iterdir())[0]
    gone.unlink()
    res = invoke(CliRunner(), "report", str(report), "--images", str(images), "--html", str(tmp_path / "site"))
    assert res.exit_code == 0, res.output
    assert "could not be shown" in res.output
    page = (tmp_path / "site" / "label-1-viral-1.html").read_text(encoding="utf-8")
    assert "image not found at report time" in page
    assert page.count('src="thumbs/unavailable.png"') == 1
    if CHROMIUM is not None:
        seen = probe(tmp_path / "site" / "label-1-viral-1.html", tmp_path)
        assert all(complete and width > 0 for _, complete, width in seen["imgs"])


# --------------------------------------------------------------------------- report formats and runs


@pytest.mark.slow
def test_jsonl_shards_and_merged_give_the_same_counts(tmp_path: Path, sample_images: Path) -> None:
    runner = CliRunner()
    parts = []
    for k in range(2):
        part = tmp_path / f"part-{k}.jsonl"
        res = invoke(runner, "classify", str(sample_images), "--out", str(part), "--shard", f"{k}/2", "-q")
        assert res.exit_code == 0, res.output
        parts.append(part)
    merged = tmp_path / "merged.jsonl"
    assert invoke(runner, "merge", *map(str, parts), "--out", str(merged), "--expect", "2", "-q").exit_code == 0
    res = invoke(runner, "report", *map(str, parts), "--images", str(sample_images), "--html", str(tmp_path / "a"))
    assert res.exit_code == 0, res.output
    res = invoke(runner, "report", str(merged), "--images", str(sample_images), "--html", str(tmp_path / "b"), "-q")
    assert res.exit_code == 0 and res.output == ""
    want = expected_counts(read_rows(merged))
    for site in ("a", "b"):
        got = page_counts(tmp_path / site / "index.html")
        assert {k: got[k] for k in want} == want
    # the same thumbnails: content-named, so the two folders hold the same files
    names = {p.name for p in (tmp_path / "a" / "thumbs").rglob("*.jpg")}
    assert names == {p.name for p in (tmp_path / "b" / "thumbs").rglob("*.jpg")} and len(names) == 9
    # a part and the merged report together: every path twice
    res = invoke(runner, "report", str(parts[0]), str(merged), "--html", str(tmp_path / "c"))
    assert res.exit_code == 1 and "appears in both" in res.output


@pytest.mark.slow
def test_evaluate_report_shows_metrics(tmp_path: Path, sample_images: Path) -> None:
    runner = CliRunner()
    metrics, preds = tmp_path / "m.json", tmp_path / "p.csv"
    res = invoke(runner, "evaluate", str(sample_images), "--out", str(metrics), "--predictions", str(preds), "-q")
    assert res.exit_code == 0, res.output
    # no --images: the metrics file's data folder is where the paths point
    res = invoke(runner, "report", str(preds), "--metrics", str(metrics), "--html", str(tmp_path / "site"))
    assert res.exit_code == 0, res.output
    doc = json.loads(metrics.read_text())
    got = page_counts(tmp_path / "site" / "index.html")
    for i, row in enumerate(doc["confusion_matrix"]):
        for j, n in enumerate(row):
            assert got[f"cm:{i}:{j}"] == n
    assert got["metrics:n"] == doc["n"]
    page = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert page.count("<svg") == 1
    assert page.count('fill-opacity="0.75"') == sum(1 for b in doc["reliability"] if b["n"])
    assert f"{doc['accuracy']:.3f}" in page and doc["model_sha256"] in page
    assert "unavailable.png" not in page
    assert "image not found" not in (tmp_path / "site" / "label-2-covid-1.html").read_text(encoding="utf-8")


@pytest.mark.skipif(not DICOM_DIR.is_dir(), reason=f"the shared DICOM files are not here ({DICOM_DIR})")
def test_dicom_thumbnails_are_pixels_only(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    src = [
        DICOM_DIR / "pydicom-data" / "other" / "RG1_UNCI.dcm",
        DICOM_DIR / "pydicom-testfiles" / "other" / "CT_small.dcm",
        *sorted((DICOM_DIR / "rsna-pneumonia-challenge_lungbox" / "normal").glob("*.dcm"))[:2],
    ]
    folder = tmp_path / "dicom"
    folder.mkdir()
    for s in src:
        shutil.copyfile(s, folder / s.name)
    report = tmp_path / "d.jsonl"
    res = invoke(CliRunner(), "classify", str(folder), "--out", str(report), "-q")
    assert res.exit_code in (0, 3), res.output
    res = invoke(CliRunner(), "report", str(report), "--images", str(folder), "--html", str(tmp_path / "site"))
    assert res.exit_code == 0, res.output
    assert "could not be shown" not in res.output
    thumbs = sorted((tmp_path / "site" / "thumbs").rglob("*.jpg"))
    assert len(thumbs) == len(src)
    private: set[str] = set()
    for s in src:
        ds = pydicom.dcmread(s, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "ReferringPhysicianName"):
            value = str(ds.get(keyword, "") or "").strip()
            if len(value) > 3 and value not in s.name:  # RSNA's files are named by their patient ID
                private.add(value)
    assert private  # pydicom's CT test file carries (made-up) patient data
    pages = [p.read_text(encoding="utf-8") for p in (tmp_path / "site").glob("*.html")]
    for value in private:
        assert all(value not in page for page in pages), value
    for thumb in thumbs:
        data = thumb.read_bytes()
        assert all(value.encode() not in data for value in private)
        with Image.open(thumb) as img:
            assert img.mode == "L" and not img.getexif() and "comment" not in img.info


def test_partial_last_row_and_bad_inputs(tmp_path: Path, sample_images: Path) -> None:
    runner = CliRunner()
    report = tmp_path / "r.csv"
    assert invoke(runner, "classify", str(sample_images / "viral"), "--out", str(report), "-q").exit_code == 0
    data = report.read_bytes()
    last = data.rstrip(b"\r\n").rfind(b"\n") + 1
    report.write_bytes(data[: last + (len(data) - last) // 3])  # a run killed a third of the way into its last row
    res = invoke(runner, "report", str(report), "--images", str(sample_images / "viral"), "--html", str(tmp_path / "s"))
    assert res.exit_code == 0, res.output
    assert "row 3 is incomplete or damaged; left out" in res.output
    assert page_counts(tmp_path / "s" / "index.html")["total"] == 2

    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    res = invoke(runner, "report", str(other), "--html", str(tmp_path / "t"))
    assert res.exit_code == 1 and "not a cxr-batch report (no path, status, label" in res.output

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    res = invoke(runner, "report", str(report), "--html", str(foreign))
    assert res.exit_code == 1 and "with other files in it" in res.output
    assert (foreign / "keep.txt").read_text() == "mine"

    res = invoke(runner, "classify", str(sample_images), "--out", "-", "--html", str(tmp_path / "u"))
    assert res.exit_code == 2 and "--html needs a report file" in res.output


@pytest.mark.slow
def test_rerun_updates_the_folder_and_reuses_thumbnails(tmp_path: Path, sample_images: Path) -> None:
    runner = CliRunner()
    report = tmp_path / "r.csv"
    assert invoke(runner, "classify", str(sample_images), "--out", str(report), "-q").exit_code == 0
    site = tmp_path / "site"
    args = ["report", str(report), "--images", str(sample_images), "--html", str(site)]
    res = invoke(runner, *args, "--per-page", "2")
    assert "9 thumbnails made (0 reused)" in res.output
    pages = {p.name for p in site.glob("*.html")}
    assert {"label-2-covid-1.html", "label-2-covid-2.html", "label-2-covid-3.html"} <= pages
    second = (site / "label-2-covid-2.html").read_text(encoding="utf-8")
    assert 'href="label-2-covid-1.html" rel="prev"' in second and 'href="label-2-covid-3.html" rel="next"' in second
    res = invoke(runner, *args)
    assert "0 thumbnails made (9 reused)" in res.output
    assert not (site / "label-2-covid-2.html").exists()  # the old pages went, the new ones came


@pytest.mark.slow
def test_provenance_columns_and_neutralised_formula_names(tmp_path: Path, sample_images: Path) -> None:
    """Columns other features add (read by name) and a provenance file are shown, escaped; CSV cells
    the writer neutralised with a leading "'" (names starting with = + - @ or ') round-trip."""
    images = tmp_path / "images"
    images.mkdir()
    shutil.copyfile(sample_images / "viral" / "person1612_virus_2797.jpeg", images / "=1+2.jpeg")
    shutil.copyfile(sample_images / "viral" / "person1669_virus_2884.jpeg", images / "'quoted.jpeg")
    report = tmp_path / "r.csv"
    assert invoke(CliRunner(), "classify", str(images), "--out", str(report), "-q").exit_code == 0
    rows = read_csv(report)
    assert {r["path"] for r in rows} == {"'=1+2.jpeg", "''quoted.jpeg"}  # as the CSV writer neutralises them
    extended = tmp_path / "x.csv"
    with open(extended, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, [*rows[0], "model_sha256", "precision", "run_id"], lineterminator="\r\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "model_sha256": "ab" * 32, "precision": "int8", "run_id": "run-<b>7</b>"})
    (tmp_path / "x.csv.provenance.json").write_text(json.dumps({"host": "<i>node1</i>", "argv": ["classify", "x"]}))
    res = invoke(CliRunner(), "report", str(extended), "--images", str(images), "--html", str(tmp_path / "site"))
    assert res.exit_code == 0, res.output
    assert "could not be shown" not in res.output  # the neutralised names found their files
    index = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert "ab" * 32 in index and ">int8<" in index
    assert "run-&lt;b&gt;7&lt;/b&gt;" in index and "<b>7" not in index
    assert "&lt;i&gt;node1&lt;/i&gt;" in index and "<i>" not in index
    gallery = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "site").glob("label-*.html"))
    names = re.findall(r'<div class="name">(.*?)</div>', gallery)
    assert sorted(map(html.unescape, names)) == ["'quoted.jpeg", "=1+2.jpeg"]
    assert "unavailable.png" not in gallery


# --------------------------------------------------------------------------- true labels: the mistakes


@pytest.mark.slow
@pytest.mark.chromium
def test_misclassified_galleries_in_chromium(tmp_path: Path, sample_images: Path) -> None:
    """evaluate's predictions carry the true labels: one "misclassified" gallery per true → predicted
    pair, linked from the confusion matrix, cards that say the true label; report --labels on a
    classify report gives the same galleries; the nav says "unreadable", not "errors"."""
    need_chromium()
    runner = CliRunner()
    metrics, preds = tmp_path / "m.json", tmp_path / "p.csv"
    res = invoke(runner, "evaluate", str(sample_images), "--out", str(metrics), "--predictions", str(preds), "-q")
    assert res.exit_code == 0, res.output
    rows = read_csv(preds)
    labels = ("normal", "viral", "covid")
    wrong: dict[tuple[str, str], set[str]] = {}
    for r in rows:  # by hand, from the report's own columns
        assert r["correct"] == ("true" if r["label"] == r["true_label"] else "false")
        if r["correct"] == "false":
            wrong.setdefault((r["true_label"], r["label"]), set()).add(r["path"])
    assert wrong, "the sample images gave no mistake to show"
    site = tmp_path / "site"
    res = invoke(runner, "report", str(preds), "--metrics", str(metrics), "--html", str(site))
    assert res.exit_code == 0, res.output
    pages = {(t, p): f"wrong-{labels.index(t)}-{labels.index(p)}-1.html" for t, p in wrong}
    assert {p.name for p in site.glob("wrong-*.html")} == set(pages.values())

    index = probe(site / "index.html", tmp_path)
    for (t, p), page in pages.items():  # the confusion matrix's cell links to its gallery
        assert page in index["links"]
        cell = dict(index["counts"])[f"cm:{labels.index(t)}:{labels.index(p)}"]
        assert int(cell) == len(wrong[(t, p)])
    for (t, p), page in pages.items():
        seen = probe(site / page, tmp_path)
        assert set(seen["names"]) == wrong[(t, p)]
        for _, complete, width in seen["imgs"]:
            assert complete and width > 0
        source = (site / page).read_text(encoding="utf-8")
        assert source.count(f"true: {t} (misclassified)") == len(wrong[(t, p)])
        assert f"{t} \u2192 {p} ({len(wrong[(t, p)])})" in source  # the nav names the pair and its count
        assert ">unreadable (" in source and ">errors (" not in source
    right = next(r for r in rows if r["correct"] == "true")
    label_page = next(site.glob(f"label-{labels.index(right['label'])}-*-1.html")).read_text(encoding="utf-8")
    assert f"true: {right['true_label']}</div>" in label_page

    # The same from a classify report and a labels file.
    plain = tmp_path / "c.csv"
    assert invoke(runner, "classify", str(sample_images), "--out", str(plain), "-q").exit_code == 0
    truth = tmp_path / "truth.csv"
    truth.write_text("path,label\n" + "".join(f"{r['path']},{r['true_label']}\n" for r in rows), encoding="utf-8")
    site2 = tmp_path / "site2"
    res = invoke(
        runner, "report", str(plain), "--labels", str(truth), "--images", str(sample_images), "--html", str(site2)
    )
    assert res.exit_code == 0, res.output
    assert {p.name for p in site2.glob("wrong-*.html")} == set(pages.values())
    seen = probe(site2 / "index.html", tmp_path)
    assert set(pages.values()) <= set(seen["links"])
    for (t, p), page in pages.items():
        assert set(probe(site2 / page, tmp_path)["names"]) == wrong[(t, p)]
