"""What a new user meets in the first hour (issue 23): the short ``info``, shipped contracts without
machine paths, the grouped ``classify --help``, ``--version``, ``doctor``, progress in a pipeline,
filters and ``--dry-run``, shell completion."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO

from cxr_batch.cli.main import main

SHIPPED = sorted((REPO / "export").glob("*.onnx"))
#: An absolute path of a machine: what a shipped contract must never hold.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:root|home|work|tmp)(?:/|\b)")


# --------------------------------------------------------------------------- item 2: info, machine paths


def _contract_text(path: Path) -> str:
    import onnxruntime as ort

    from cxr_batch.contract import CONTRACT_KEY

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return str(session.get_modelmeta().custom_metadata_map[CONTRACT_KEY])


@pytest.mark.parametrize("model", SHIPPED, ids=[p.name for p in SHIPPED])
def test_no_machine_path_in_a_shipped_contract(model: Path) -> None:
    text = _contract_text(model)
    json.loads(text)  # a whole contract, not a fragment
    found = MACHINE_PATH.findall(text)
    assert not found, f"{model.name}: machine paths in the contract: {found}"


def test_the_pattern_sees_machine_paths() -> None:
    assert MACHINE_PATH.search('"command": "x /work/shared/data"') and MACHINE_PATH.search("a /root/x")
    assert not MACHINE_PATH.search("../shared/data runs/sweep ~/data http://host/tmpl")


def test_export_records_a_portable_command(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from cxr_batch.training.run_facts import _selection, portable_command

    base = str(tmp_path / "repo")
    command = f"python s.py {tmp_path}/shared/data/a --out {base}/runs/sweep --x /opt/other/place/f.json"
    assert portable_command(command, base) == "python s.py ../shared/data/a --out runs/sweep --x <...>/f.json"
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"chosen": "scanner", "rule": "r", "command": f"go /work/x/{tmp_path.name}/y"}))
    assert not MACHINE_PATH.search(json.dumps(_selection(str(sweep))))


def test_rewriting_a_contract_keeps_the_weights(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from conftest import build_model, contract

    from cxr_batch.training.onnx_file import read_contract_file, rewrite_contract

    model = build_model(tmp_path / "m.onnx", meta=contract(extra={"selection": {"command": "x /work/a"}}))
    graph = onnx.load(str(model)).graph.SerializeToString()
    rewrite_contract(model, lambda m: m.with_updates(extra={"selection": {"command": "x a"}}))
    assert onnx.load(str(model)).graph.SerializeToString() == graph
    assert read_contract_file(model)[1].extra == {"selection": {"command": "x a"}}


@pytest.mark.slow
def test_info_is_short_and_names_the_card(runner: CliRunner) -> None:
    fp32 = REPO / "export" / "cxr-resnet18.onnx"
    if not fp32.is_file():
        pytest.skip("the shipped model is not in export/")
    result = runner.invoke(main, ["info", str(fp32)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) <= 15, result.stdout
    facts = dict(line.split(": ", 1) for line in lines)
    assert facts["model"].startswith("cxr-resnet18@") and facts["model card"].endswith("cxr-resnet18.md")
    assert facts["self-check"].startswith("passed: fp32 gives the same label as fp32 on all 4 reference images")
    assert "FAILED" not in result.stdout


# --------------------------------------------------------------------------- item 3: grouped help, one precision rule


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_classify_help_is_in_sections(runner: CliRunner) -> None:
    result = runner.invoke(main, ["classify", "--help"], terminal_width=100)
    assert result.exit_code == 0
    text = result.stdout
    titles = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert titles[:5] == [
        "Everyday options",
        "Output",
        "DICOM and DICOMweb",
        "DICOM Structured Reports (research use only)",
        "Engine, shards and Ray",
    ]

    def section(title: str) -> str:
        return text.split(f"\n{title}:\n", 1)[1].split("\n\n", 1)[0]

    assert "--out FILE" in section("Everyday options") and "--resume" in section("Everyday options")
    assert "--dicomweb URL" not in section("Everyday options") and "--sr DIR" not in section("Everyday options")
    assert "--ray-address" in section("Engine, shards and Ray") and "--engine" in section("Engine, shards and Ray")
    assert "--auth-file" in section("DICOM and DICOMweb") and "--stow" in section(
        "DICOM Structured Reports (research use only)"
    )
    assert "Other options" not in text  # every classify option has its section
    assert text.count("$CXR_BATCH_DICOMWEB_TOKEN") == 1  # the credentials paragraph, once
    assert "[INPUTS]..." in text.splitlines()[0]


def test_an_option_without_a_section_is_still_listed() -> None:
    import click

    from cxr_batch.cli.options import SectionedCommand

    @click.command(cls=SectionedCommand, sections=(("Main", "A note.", ("--a",)),))
    @click.option("--a", help="first")
    @click.option("--b/--no-b", help="second")
    def cmd(a: str, b: bool) -> None: ...

    text = CliRunner().invoke(cmd, ["--help"]).stdout
    assert "Main:\n  A note.\n  --a TEXT" in text and "Other options:\n  --b / --no-b" in text


def test_one_precision_rule_in_help_and_readme(runner: CliRunner) -> None:
    from cxr_batch.engine.cpu import PRECISION_AUTO_RULE

    for command in ("classify", "evaluate", "info"):
        text = runner.invoke(main, [command, "--help"]).stdout
        assert PRECISION_AUTO_RULE in _flat(text), command
    readme = (REPO / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `--precision"))
    assert PRECISION_AUTO_RULE in row


# --------------------------------------------------------------------------- item 4: --version, doctor


@pytest.mark.slow
def test_version_names_model_runtime_python_extras_and_precision(runner: CliRunner) -> None:
    import platform

    from cxr_batch import __version__
    from cxr_batch.engine.cpu import int8_choice
    from cxr_batch.engine.environment import version_of

    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    facts = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert facts["cxr-batch"] == __version__
    assert facts["onnxruntime"] == version_of("onnxruntime")
    assert facts["python"].startswith(platform.python_version())
    assert facts["cpu precision"] == int8_choice()[1]
    assert "extras installed" in facts
    assert facts["default model"].startswith(("cxr-resnet18@", "none ("))


@pytest.mark.slow
def test_doctor_says_what_to_install(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cxr_batch.engine import environment

    if environment.extras() is None:
        pytest.skip("cxr-batch is not installed here (its extras are read from the installed metadata)")
    real = environment.version_of
    monkeypatch.setattr(environment, "version_of", lambda d: None if d in ("matplotlib", "torch") else real(d))
    monkeypatch.setenv("PATH", str(tmp_path))  # no Orthanc, Chromium or dciodvfy on this PATH
    result = runner.invoke(main, ["doctor"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "missing  plots" in out and 'pip install "cxr-batch[plots]"' in out
    assert "missing  train" in out and "torch missing" in out
    assert "torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu" in out
    assert "missing  Chromium" in out and "apt-get install -y chromium" in out
    assert "apt-get install -y orthanc orthanc-dicomweb" in out and "apt-get install -y dicom3tools" in out
    assert "providers: " in out and "CPUExecutionProvider" in out and "cpu: " in out
    doc = json.loads(runner.invoke(main, ["doctor", "--json"]).stdout)
    assert doc["extras"]["plots"]["installed"] is False and doc["programs"]["dciodvfy"]["path"] is None
    assert "CPUExecutionProvider" in doc["providers"]


# --------------------------------------------------------------------------- item 6: filters, --dry-run


@pytest.fixture
def mixed(tmp_path: Path, png_factory: Callable[..., Path]) -> Path:
    root = tmp_path / "mixed"
    png_factory(root / "a.png", 1)
    png_factory(root / "B.PNG", 2)
    png_factory(root / "sub" / "c.jpg", 3)
    png_factory(root / ".hidden.png", 4)
    (root / "notes.txt").write_text("not an image")
    (root / "scan.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"x")
    (root / "UID.1.2.3").write_bytes(b"\0" * 128 + b"DICM" + b"x")
    os.mkfifo(root / "pipe.png")
    return root


def test_include_ignores_case(mixed: Path) -> None:
    from cxr_batch.io.inputs import InputSpec, discover

    found = discover(InputSpec(paths=(str(mixed),), include=("*.png",)))
    assert [f.display for f in found.files] == ["B.PNG", "a.png", "pipe.png"]
    assert found.skipped["files not matching --include"] == 4 and found.skipped["hidden files and folders"] == 1
    found = discover(InputSpec(paths=(str(mixed),), exclude=("*.PNG", "SUB")))
    assert [f.display for f in found.files] == ["UID.1.2.3", "scan.dcm"]
    assert found.skipped["folders matching --exclude"] == 1 and found.skipped["files matching --exclude"] == 3


def test_no_input_files_says_what_was_left_out(runner: CliRunner, mixed: Path, tmp_path: Path) -> None:
    result = runner.invoke(main, ["classify", str(mixed), "--include", "*.gif", "--out", str(tmp_path / "r.csv")])
    assert result.exit_code == 1
    message = " ".join(result.stderr.split())
    assert "no input files found" in message and "left out: 7 files not matching --include '*.gif'" in message
    assert "1 hidden files and folders" in message and not (tmp_path / "r.csv").exists()


def test_dry_run_lists_counts_and_loads_no_model(runner: CliRunner, mixed: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    args = ["classify", str(mixed), "--out", str(out), "--model", str(tmp_path / "no-such-model.onnx"), "--dry-run"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["B.PNG", "UID.1.2.3", "a.png", "pipe.png", "scan.dcm", "sub/c.jpg"]
    err = result.stderr
    assert "dry run: 6 file(s) would be classified: 2 dicom, 2 png, 1 jpeg" in err
    assert "1 would be error rows without being decoded:\n  pipe.png: not a regular file: fifo" in err
    assert "left out: 1 files that are not images or DICOM, 1 hidden files and folders" in err
    assert "no model loaded, nothing written" in err
    assert not out.exists() and not (tmp_path / "r.csv.provenance.json").exists()

    out.write_text("path\n")
    again = runner.invoke(main, [*args, "--include", "*.PNG", "--shard", "0/1", "-q"])
    assert again.exit_code == 0 and again.stdout.splitlines() == ["B.PNG", "a.png", "pipe.png"]
    assert again.stderr == ""
    told = runner.invoke(main, args)
    assert "the run would stop: " in told.stderr and "already exists" in told.stderr


@pytest.mark.slow
@pytest.mark.orthanc
def test_dry_run_over_dicomweb_lists_instances_without_retrieving(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from orthanc_server import PASSWORD, USER, orthanc_or_skip, start_orthanc

    orthanc_or_skip()
    dicoms = sorted((REPO.parent / "shared" / "data" / "dicom" / "rsna-pneumonia-challenge_lungbox").glob("*/*.dcm"))
    if len(dicoms) < 3:
        pytest.skip("needs the shared RSNA chest DICOMs (../shared/data/dicom)")
    server = start_orthanc(tmp_path / "orthanc", dicoms[:3])
    try:
        monkeypatch.setenv("CXR_BATCH_DICOMWEB_USER", USER)
        monkeypatch.setenv("CXR_BATCH_DICOMWEB_PASSWORD", PASSWORD)
        args = ["classify", "--dicomweb", server.dicomweb, "--query", "Modality=CR", "-o", str(tmp_path / "r.csv")]
        result = runner.invoke(main, [*args, "--dry-run"])
        assert result.exit_code == 0, result.output
        listed = result.stdout.splitlines()
        assert len(listed) == 3 and all(line.startswith("dicomweb:") for line in listed)
        assert "dry run: 3 file(s) would be classified: 3 dicomweb instance" in result.stderr
        none = runner.invoke(main, [*args[:4], "Modality=MR", "-o", str(tmp_path / "r.csv"), "--dry-run"])
        assert none.exit_code == 1 and "no image instances found" in none.stderr
        assert not (tmp_path / "r.csv").exists()
    finally:
        server.stop()


# --------------------------------------------------------------------------- item 5: progress in a pipeline, summary

PROGRESS = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ classify: (\d+)/(\d+) \(\d+\.\d%\), (?:--|\d+\.\d) img/s, "
    r"elapsed \d+:\d\d:\d\d, ETA (?:--|\d+:\d\d:\d\d)$",
    re.MULTILINE,
)


def test_no_rate_before_the_minimum_time() -> None:
    from cxr_batch.report.progress import MIN_RATE_SECONDS, rate

    assert rate(32, 0.0066) is None  # two batches at once: 4,800 img/s would be noise
    assert rate(0, 10.0) is None
    assert rate(100, MIN_RATE_SECONDS * 2) == pytest.approx(50 / MIN_RATE_SECONDS)


def test_log_lines_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import time

    from rich.console import Console

    from cxr_batch.report import progress

    monkeypatch.setenv(progress.INTERVAL_ENV, "0.02")
    monkeypatch.setattr(progress, "MIN_RATE_SECONDS", 0.01)
    sink = io.StringIO()
    console = Console(file=sink, force_terminal=False, width=40)
    with progress.progress_bar(console, 100, False, "classify", "img/s", log=True) as advance:
        for _ in range(5):
            time.sleep(0.03)
            advance(10)
    lines = sink.getvalue().splitlines()
    assert len(lines) >= 3 and all(PROGRESS.match(line) for line in lines), lines  # one line each, never wrapped
    assert "-- img/s" not in lines[-1] and "ETA --" not in lines[-1]
    sink = io.StringIO()
    console = Console(file=sink, force_terminal=False, width=40)
    with progress.progress_bar(console, 100, False, log=False) as advance:  # --quiet
        time.sleep(0.03)
        advance(10)
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")  # off
    with progress.progress_bar(console, 100, False, log=True) as advance:
        time.sleep(0.03)
        advance(10)
    assert sink.getvalue() == ""


@pytest.mark.slow
def test_a_pipeline_gets_progress_lines_and_the_summary_says_where(
    tiny_onnx: Path, tmp_path: Path, png_factory: Callable[..., Path]
) -> None:
    import subprocess
    import sys

    for i in range(24):
        png_factory(tmp_path / "in" / f"{i:02d}.png", i)
    out = tmp_path / "r.csv"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CXR_BATCH_PROGRESS_INTERVAL": "0.001"}
    args = [sys.executable, "-m", "cxr_batch.cli", "classify", str(tmp_path / "in"), "--model", str(tiny_onnx)]
    args += ["--out", str(out), "--batch-size", "2", "--threads", "1"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)  # stderr: a pipe
    assert done.returncode == 0, done.stderr
    found = PROGRESS.findall(done.stderr)
    assert found and all(total == "24" for _, total in found), done.stderr
    assert [int(n) for n, _ in found] == sorted(int(n) for n, _ in found)
    assert f"report: {out}; provenance record: {out}.provenance.json" in done.stderr
    quiet = subprocess.run([*args, "--overwrite", "-q"], capture_output=True, text=True, env=env, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == ""


# --------------------------------------------------------------------------- item 1: report's heatmap folder


@pytest.mark.slow
def test_report_without_its_heatmap_folder_warns_and_finds_one_beside(
    runner: CliRunner, tiny_onnx: Path, image_dir: Path, tmp_path: Path
) -> None:
    report = tmp_path / "results.csv"
    done = runner.invoke(main, ["classify", str(image_dir), "--model", str(tiny_onnx), "-o", str(report), "-q"])
    assert done.exit_code == 0, done.output
    args = ["report", str(report), "--images", str(image_dir)]
    missing = runner.invoke(main, [*args, "--heatmaps", str(tmp_path / "heatmaps"), "--html", str(tmp_path / "a")])
    assert missing.exit_code == 0, missing.output
    assert f"warning: no heatmap folder {tmp_path / 'heatmaps'}: the report shows no heatmaps" in missing.stderr
    assert (tmp_path / "a" / "index.html").is_file()

    heat = tmp_path / "heatmaps"
    (heat / "sub").mkdir(parents=True)
    (heat / "sub" / "c.png.png").write_bytes((image_dir / "sub" / "c.png").read_bytes())  # a PNG as c's heatmap
    found = runner.invoke(main, [*args, "--html", str(tmp_path / "b")])
    assert found.exit_code == 0, found.output
    assert f"note: showing the heatmaps in {heat}, found beside {report}" in found.stderr
    pages = "".join(p.read_text() for p in (tmp_path / "b").rglob("*.html"))
    assert "c.png.png" in pages
    quiet = runner.invoke(main, [*args, "--html", str(tmp_path / "c"), "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    (tmp_path / "file").write_text("x")
    refused = runner.invoke(main, [*args, "--heatmaps", str(tmp_path / "file"), "--html", str(tmp_path / "d")])
    assert refused.exit_code == 2 and "is a file" in refused.stderr  # a file is still a usage error


# --------------------------------------------------------------------------- items 1, 8: the README runs as pasted

RUN_IN_ORDER = "<!-- run-in-order -->"


def readme_blocks() -> list[str]:
    """The README's code blocks marked ``<!-- run-in-order -->``, in order."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(re.escape(RUN_IN_ORDER) + r"\s*\n```bash\n(.*?)\n```", text, re.DOTALL)
    return blocks


def test_the_readme_marks_its_runnable_examples() -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 4
    assert (REPO / "README.md").read_text().count(RUN_IN_ORDER) == len(blocks)  # every marker is on a block
    assert "pip install ." in blocks[0] and "--html report/" in blocks[0]  # the quick start ends with a report


@pytest.mark.slow
def test_the_readme_examples_run_as_pasted_twice(tmp_path: Path, sample_images: Path) -> None:
    """The quick start and the examples after it, pasted in order into bash in a fresh folder,
    then pasted again: every command succeeds both times. ``pip install`` is skipped (the package
    under test is this tree); ``cxr-batch`` is this tree's command line."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(sample_images, tmp_path / "sample_images")
    prelude = (
        'pip() { echo "skipped in the test: pip $*"; }\n'
        f'cxr-batch() {{ PYTHONPATH={str(REPO)!r} {sys.executable!r} -m cxr_batch.cli "$@"; }}\n'
    )
    script = prelude + "\n".join(f"echo '== block {i}'\n{b}" for i, b in enumerate(readme_blocks()))
    env = {**os.environ, "CXR_BATCH_PROGRESS_INTERVAL": "0"}
    env.pop("CXR_BATCH_MODEL", None)
    for attempt in (1, 2):
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        assert done.returncode == 0, f"attempt {attempt}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert (tmp_path / "report" / "index.html").is_file() and (tmp_path / "report-eval" / "index.html").is_file()
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 10
    assert "warning" not in done.stderr.lower(), done.stderr[-3000:]


@pytest.mark.slow
def test_shell_completion_script() -> None:
    import subprocess
    import sys

    env = {**os.environ, "_CXR_BATCH_COMPLETE": "bash_source", "PYTHONPATH": str(REPO)}
    code = "from cxr_batch.cli.main import main; main(prog_name='cxr-batch')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "_cxr_batch_completion()" in done.stdout and "complete " in done.stdout and "cxr-batch" in done.stdout
    env |= {"_CXR_BATCH_COMPLETE": "bash_complete", "COMP_WORDS": "cxr-batch cl", "COMP_CWORD": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert "plain,classify" in done.stdout.splitlines()
    readme = (REPO / "README.md").read_text()
    assert "_CXR_BATCH_COMPLETE=bash_source cxr-batch" in readme
