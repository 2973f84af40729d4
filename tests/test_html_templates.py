"""The HTML report's templates (issue 22): hostile values from a report (file names, cells, true
labels, a provenance record) come out as escaped text in every page, never as markup, attributes
or ``javascript:`` links; the Jinja2 environment escapes by construction; and a plain classify
never imports Jinja2 (only ``--html`` does)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import jinja2
import pytest
from conftest import REPO, run_cli, write_png

from cxr_batch.report.html import render

#: File names a hostile folder may hold (no "/": each is one file) and their seeds.
HOSTILE_NAMES = {
    "<img src=x onerror=alert(1)>.png": 1,
    '" onmouseover="alert(2)" x=".png': 2,
    "javascript:alert(3).png": 3,
    "'><script>alert(4)</script>.png": 4,
}
HOSTILE_CELL = "<script>alert(5)</script> \" ' javascript:alert(6) &amp;"
HOSTILE_LABEL = "javascript:alert(7)"
SCHEME = re.compile(r"^\s*[a-zA-Z][a-zA-Z0-9+.-]*:")


class _Page(HTMLParser):
    """Every element, attribute and text of a page, as the browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.texts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_data(self, data: str) -> None:
        self.texts.append(data)


def _parse(page: Path) -> _Page:
    parser = _Page()
    parser.feed(page.read_text(encoding="utf-8"))
    parser.close()
    return parser


@pytest.fixture
def hostile_site(tmp_path: Path, tiny_onnx: Path) -> dict[str, Path]:
    """A real classify report over files with hostile names, extended with hostile cells, a hostile
    provenance record and hostile true labels, made into an HTML report by ``report --html``."""
    images = tmp_path / "images"
    for name, seed in HOSTILE_NAMES.items():
        write_png(images / name, seed)
    report = tmp_path / "r.csv"
    res = run_cli("classify", str(images), "--model", str(tiny_onnx), "--no-lungs", "--out", str(report), "-q")
    assert res.returncode == 0, res.stderr
    with open(report, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(HOSTILE_NAMES)
    extended = tmp_path / "x.csv"
    with open(extended, "w", newline="", encoding="utf-8") as fh:
        columns = [c for c in rows[0] if c not in ("run_id", "notes")] + ["run_id", "notes"]
        writer = csv.DictWriter(fh, columns, lineterminator="\r\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "run_id": HOSTILE_CELL, "notes": HOSTILE_CELL})
        # an error row whose message is hostile too
        writer.writerow({**rows[0], "path": "gone.png", "status": "error", "label": "", "error": HOSTILE_CELL})
    (tmp_path / "x.csv.provenance.json").write_text(json.dumps({"host": HOSTILE_CELL, "argv": [HOSTILE_CELL]}))
    truth = tmp_path / "truth.csv"  # every film "truly" of a hostile class: a misclassified gallery named by it
    with open(truth, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows([r["path"], HOSTILE_LABEL] for r in rows)
    site = tmp_path / "site"
    res = run_cli("report", str(extended), "--images", str(images), "--labels", str(truth), "--html", str(site), "-q")
    assert res.returncode == 0, res.stderr
    return {"site": site, "report": report}


def test_hostile_values_come_out_escaped(hostile_site: dict[str, Path]) -> None:
    site = hostile_site["site"]
    pages = sorted(site.glob("*.html"))
    assert len(pages) >= 8 and any(p.name.startswith("wrong-") for p in pages)
    texts: list[str] = []
    for page in pages:
        source = page.read_text(encoding="utf-8")
        assert "<script" not in source.lower() and "<img src=x" not in source, page.name
        parsed = _parse(page)
        assert "script" not in parsed.tags and "b" not in parsed.tags, page.name
        for tag, name, value in parsed.attrs:
            assert not name.startswith("on"), f"{page.name}: <{tag} {name}=...> came from a value"
            assert name not in ("x", '"', "'"), f"{page.name}: a quote in a value opened the attribute {name!r}"
            if name in ("href", "src"):
                assert value is not None and not SCHEME.match(value), f"{page.name}: {name}={value!r} is not relative"
                assert not value.startswith("/"), value
        texts += parsed.texts
        # Every thumbnail's alt text is exactly "thumbnail of <the name>": no quote ended it early.
        for tag, name, value in parsed.attrs:
            if tag == "img" and name == "alt" and value and value.startswith("thumbnail of "):
                assert value[len("thumbnail of ") :] in HOSTILE_NAMES, value
    shown = "\n".join(texts)
    for name in HOSTILE_NAMES:  # each hostile name is shown as text, exactly
        assert name in shown, name
    assert shown.count(HOSTILE_CELL) >= 2 * len(HOSTILE_NAMES) + 1  # notes, run id fact, the error, provenance
    assert f"true: {HOSTILE_LABEL} (misclassified)" in shown
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(5)&lt;/script&gt; &quot; &#x27; javascript:alert(6) &amp;amp;" in index


def test_the_environment_escapes_by_construction() -> None:
    env = render.environment()
    assert env.autoescape is True and env.undefined is jinja2.StrictUndefined
    page = env.from_string('<a title="{{ v }}" href="{{ p | href }}">{{ v }}</a>').render(
        v="<script>\"'\x1b\u202e", p="javascript:alert(1)"
    )
    assert page == (
        '<a title="&lt;script&gt;&quot;&#x27;\\x1b\\u202e" href="javascript%3Aalert%281%29">'
        "&lt;script&gt;&quot;&#x27;\\x1b\\u202e</a>"
    )
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("{{ missing }}").render()
    # Markup a template made itself (a macro) is not escaped twice.
    macro = "{% macro m(x) %}<b>{{ x }}</b>{% endmacro %}{{ m('<i>') }}"
    assert env.from_string(macro).render() == "<b>&lt;i&gt;</b>"


def test_no_template_turns_escaping_off() -> None:
    folder = Path(render.__file__).parent / render.TEMPLATES
    templates = sorted(folder.glob("*.html.j2"))
    assert {t.name for t in templates} >= {"base.html.j2", "index.html.j2", "gallery.html.j2", "macros.html.j2"}
    for template in templates:
        source = template.read_text(encoding="utf-8")
        for banned in ("|safe", "| safe", "autoescape false", "Markup", "|e ", "escape"):
            assert banned not in source, f"{template.name} holds {banned!r}"


@pytest.mark.slow
def test_plain_classify_never_imports_jinja2(tiny_onnx: Path, tmp_path: Path) -> None:
    """Jinja2 is a core dependency, but only ``--html`` loads it (a fresh interpreter's sys.modules)."""
    write_png(tmp_path / "images" / "a.png", 1)
    script = f"""
import sys
from cxr_batch.cli.main import main
def run(*extra):
    try:
        main(["classify", {str(tmp_path / "images")!r}, "--model", {str(tiny_onnx)!r}, "--no-lungs", "-q", "--overwrite", *extra])
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
run("--out", {str(tmp_path / "r.csv")!r})
assert "jinja2" not in sys.modules and "markupsafe" not in sys.modules, "classify imported jinja2"
run("--out", {str(tmp_path / "r2.csv")!r}, "--html", {str(tmp_path / "site")!r})
assert "jinja2" in sys.modules, "--html did not use jinja2"
print("JINJA-LAZY")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("JINJA-LAZY")
    assert (tmp_path / "site" / "index.html").is_file()
