"""classify end to end: real X-rays, the Python API, determinism, bounded memory, exit codes, torch-free."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import LABELS, REPO, contract
from rich.console import Console

from cxr_batch.classify import ClassifyConfig, run_classify
from cxr_batch.cli.main import main
from cxr_batch.engine.classifier import Classifier, EngineConfig
from cxr_batch.io.inputs import InputSpec
from cxr_batch.report.writer import ReportConfig


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def invoke(runner: CliRunner, *args: str, **kwargs: object) -> tuple[int, str, str]:
    result = runner.invoke(main, ["classify", *args, "--threads", "1"], **kwargs)  # type: ignore[arg-type]
    return result.exit_code, result.stdout, result.stderr


# --------------------------------------------------------------------------- real X-rays


def test_shared_xrays(runner: CliRunner, tiny_onnx: Path, shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "covid19-radiography"
    out = tmp_path / "r.csv"
    code, _, err = invoke(
        runner,
        str(root),
        "--include",
        "*-1.png",
        "--include",
        "*-4.png",
        "--include",
        "Normal-3.png",
        "--model",
        str(tiny_onnx),
        "--out",
        str(out),
    )
    assert code == 0, err
    rows = read_csv(out)
    assert [r["path"] for r in rows] == [
        "covid/COVID-1.png", "covid/COVID-4.png", "normal/Normal-3.png", "normal/Normal-4.png",
        "viral/Viral Pneumonia-1.png", "viral/Viral Pneumonia-4.png",
    ]  # fmt: skip
    for r in rows:
        assert r["status"] == "ok" and (r["width"], r["height"]) == ("256", "256")
        assert abs(sum(float(r[f"prob_{label}"]) for label in LABELS) - 1) < 1e-4
    # The summary on stderr: per label, totals, speed, provider and model.
    assert "total" in err and "images/s" in err and "CPUExecutionProvider" in err and "tiny@1" in err


def test_sample_images(runner: CliRunner, tiny_onnx: Path, sample_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    code, _, err = invoke(runner, str(sample_images), "--model", str(tiny_onnx), "--out", str(out))
    assert code == 0, err
    rows = read_csv(out)
    expected = sorted(
        p.relative_to(sample_images).as_posix()
        for p in sample_images.rglob("*")
        if p.suffix.lower() in (".png", ".jpg", ".jpeg")
    )
    assert [r["path"] for r in rows] == expected
    assert all(r["status"] == "ok" and int(r["width"]) > 0 for r in rows)


def test_shared_dicom_gets_a_row(runner: CliRunner, tiny_onnx: Path, shared_data: Path, tmp_path: Path) -> None:
    dcm = shared_data / "dicom" / "pydicom-testfiles" / "other" / "CT_small.dcm"
    if not dcm.exists():
        pytest.skip(f"{dcm} is not here")
    out = tmp_path / "r.csv"
    code, _, _ = invoke(runner, str(dcm), "--model", str(tiny_onnx), "--out", str(out))
    (row,) = read_csv(out)
    try:
        import pydicom  # noqa: F401
    except ImportError:  # without the dicom extra: an error row that says what to install
        assert code == 3
        assert row["status"] == "error" and 'pip install "cxr-batch[dicom]"' in row["error"]
        return
    # with it: classified, but flagged out of distribution from the header (a CT is not a radiograph)
    assert code == 0
    assert row["status"] == "ok" and row["modality"] == "CT" and row["in_distribution"] == "false"
    assert "not a radiograph" in row["notes"]


# --------------------------------------------------------------------------- the Python API


def test_python_api(tiny_onnx: Path, image_dir: Path) -> None:
    import cxr_batch

    assert cxr_batch.Classifier is Classifier
    clf = cxr_batch.Classifier(model=tiny_onnx, device="cpu", threads=1, lungs=False)
    paths = [image_dir / "b.png", image_dir / "missing.png", image_dir / "a.png"]
    results = list(clf.classify(paths))
    assert [r.path for r in results] == [str(p) for p in paths]
    assert [r.status for r in results] == ["ok", "error", "ok"]
    ok = results[0]
    assert ok.assessable is None and ok.lung_fraction is None  # lungs=False: no lung stage
    with_lungs = cxr_batch.Classifier(model=tiny_onnx, device="cpu", threads=1).classify_file(paths[0])
    assert with_lungs.probs == ok.probs and with_lungs.assessable is False and with_lungs.label is None
    assert ok.label in LABELS and ok.confidence == max(ok.probs.values()) and list(ok.probs) == list(LABELS)
    assert (ok.width, ok.height, ok.error, ok.model) == (48, 40, None, "tiny@1")
    assert results[1].label is None and "No such file" in (results[1].error or "")
    assert clf.classify_file(image_dir / "b.png").probs == ok.probs


def test_extra_outputs(tiny_onnx: Path, image_dir: Path) -> None:
    clf = Classifier(tiny_onnx, device="cpu", threads=1, extra_outputs=["embedding"])
    (r,) = list(clf.classify([image_dir / "a.png"]))
    assert r.outputs["embedding"].shape == (4,)
    with pytest.raises(Exception, match="no 'features' output"):
        Classifier(tiny_onnx, device="cpu", extra_outputs=["features"])


def test_ood_output_fills_its_columns(
    runner: CliRunner, make_model: Callable[..., Path], image_dir: Path, tmp_path: Path
) -> None:
    outputs = {"logits": "logits", "embedding": "embedding", "ood_score": "ood_score"}
    probe = make_model("ood-probe.onnx", meta=contract(outputs=outputs), ood=True)  # no threshold yet
    results = list(Classifier(probe, device="cpu", threads=1).classify(sorted(image_dir.rglob("*.png"))))
    assert all(r.ood_score is not None and r.in_distribution is None for r in results)
    threshold = float(np.median([r.ood_score for r in results if r.ood_score is not None]))
    model = make_model("ood.onnx", ood=True, meta=contract(outputs=outputs, ood={"threshold": threshold}))
    out = tmp_path / "r.csv"
    assert invoke(runner, str(image_dir), "--model", str(model), "--out", str(out))[0] == 0
    rows = read_csv(out)
    for r in rows:
        score = float(r["ood_score"])
        assert r["in_distribution"] == ("true" if score <= threshold else "false")
    assert {r["in_distribution"] for r in rows} == {"true", "false"}


# --------------------------------------------------------------------------- determinism


@pytest.fixture
def varied_dir(tmp_path: Path, png_factory: Callable[..., Path]) -> Path:
    root = tmp_path / "varied"
    sizes = [(48, 40), (100, 80), (33, 77), (256, 256), (20, 20)]
    for i in range(23):
        png_factory(root / f"f{i:02d}.png", i, size=sizes[i % len(sizes)], mode="RGB" if i % 3 else "L")
    (root / "f05.png").write_bytes(b"broken")
    return root


@pytest.mark.slow
def test_same_rows_and_probabilities_across_batch_sizes_threads_and_workers(tiny_onnx: Path, varied_dir: Path) -> None:
    paths = sorted(varied_dir.iterdir())
    runs = []
    for batch_size, threads, workers in [(1, 1, 1), (4, 2, 2), (7, 1, 3), (64, 2, 1)]:
        clf = Classifier(tiny_onnx, device="cpu", batch_size=batch_size, threads=threads, decode_workers=workers)
        runs.append(list(clf.classify(paths)))
    base = runs[0]
    assert [r.path for r in base] == [str(p) for p in paths]
    assert [r.status for r in base].count("error") == 1
    for other in runs[1:]:
        assert [(r.path, r.status, r.label, r.width, r.height) for r in other] == [
            (r.path, r.status, r.label, r.width, r.height) for r in base
        ]
        for a, b in zip(base, other, strict=True):
            for label in LABELS:
                assert abs(a.probs.get(label, 0.0) - b.probs.get(label, 0.0)) < 1e-5


def test_cli_reports_match_across_batch_sizes(
    runner: CliRunner, tiny_onnx: Path, varied_dir: Path, tmp_path: Path
) -> None:
    reports = []
    for i, (bs, threads) in enumerate([("1", "1"), ("5", "2")]):
        out = tmp_path / f"r{i}.csv"
        result = runner.invoke(
            main, ["classify", str(varied_dir), "--model", str(tiny_onnx), "--out", str(out),
                   "--batch-size", bs, "--threads", threads, "-q"],
        )  # fmt: skip
        assert result.exit_code == 3
        reports.append(read_csv(out))
    assert [r["path"] for r in reports[0]] == [r["path"] for r in reports[1]]
    for a, b in zip(*reports, strict=True):
        for label in LABELS:
            pa, pb = a[f"prob_{label}"], b[f"prob_{label}"]
            assert (pa == pb == "") or abs(float(pa) - float(pb)) < 1e-5


@pytest.mark.slow
def test_decoding_stays_a_bounded_distance_ahead(tiny_onnx: Path, varied_dir: Path) -> None:
    """Files in flight (queued or decoded, not yet returned) stay under 3 × batch + workers: flat memory."""
    paths = sorted(varied_dir.iterdir()) * 6  # 138 files: the pipeline fills many times over
    pulled = 0

    def lazy() -> Iterator[Path]:
        nonlocal pulled
        for p in paths:
            pulled += 1
            yield p

    batch_size, workers = 4, 2
    clf = Classifier(tiny_onnx, device="cpu", batch_size=batch_size, threads=1, decode_workers=workers)
    gap = 0
    for done, _ in enumerate(clf.classify(lazy()), start=1):
        gap = max(gap, pulled - done)
    assert done == len(paths)
    assert 2 * batch_size < gap <= 3 * batch_size + workers  # it does decode ahead, but boundedly


# --------------------------------------------------------------------------- CLI behaviour


def test_exit_codes(runner: CliRunner, tiny_onnx: Path, image_dir: Path, tmp_path: Path) -> None:
    assert invoke(runner, str(image_dir), "--model", str(tiny_onnx), "--out", str(tmp_path / "a.csv"))[0] == 0
    (image_dir / "bad.png").write_bytes(b"")
    assert invoke(runner, str(image_dir), "--model", str(tiny_onnx), "--out", str(tmp_path / "b.csv"))[0] == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    code, _, err = invoke(runner, str(empty), "--model", str(tiny_onnx), "--out", str(tmp_path / "c.csv"))
    assert code == 1 and "no input files found" in err
    assert not (tmp_path / "c.csv").exists()


def test_files_from_stdin(runner: CliRunner, tiny_onnx: Path, image_dir: Path, tmp_path: Path) -> None:
    listing = f"{image_dir / 'b.png'}\n{image_dir / 'sub'}\n{image_dir / 'gone.png'}\n".encode()
    out = tmp_path / "r.csv"
    args = ("--files-from", "-", "--model", str(tiny_onnx), "--out", str(out))
    code, _, _ = invoke(runner, *args, "--files-from-dirs", input=listing)
    assert code == 3
    rows = read_csv(out)
    assert [r["path"] for r in rows] == [str(image_dir / "b.png"), "c.png", str(image_dir / "gone.png")]
    assert [r["status"] for r in rows] == ["ok", "ok", "error"]
    # Without --files-from-dirs the folder a list names is an error row, not walked.
    code, _, _ = invoke(runner, *args, "--overwrite", input=listing)
    rows = read_csv(out)
    assert code == 3 and [r["path"] for r in rows] == [str(image_dir / p) for p in ("b.png", "sub", "gone.png")]
    assert [r["status"] for r in rows] == ["ok", "error", "error"]


def test_quiet_and_summary(runner: CliRunner, tiny_onnx: Path, image_dir: Path, tmp_path: Path) -> None:
    (image_dir / "bad.png").write_bytes(b"")
    code, out, err = invoke(runner, str(image_dir), "--model", str(tiny_onnx), "--out", str(tmp_path / "a.csv"), "-q")
    assert code == 3 and out == "" and err == ""
    code, out, err = invoke(runner, str(image_dir), "--model", str(tiny_onnx), "--out", str(tmp_path / "b.csv"))
    assert out == ""
    rows = read_csv(tmp_path / "b.csv")
    table = [[cell.strip() for cell in line.split("│")[1:-1]] for line in err.splitlines() if "│" in line]
    for label in LABELS:
        n = sum(r["label"] == label for r in rows)
        assert [label, str(n), f"{100 * n / 4:.1f}"] in [row[:3] for row in table], err
    assert ["error: empty file (0 bytes)", "1", "25.0", ""] in table
    assert ["total", "4", "100.0", ""] in table
    assert "error: empty file (0 bytes)" in err
    assert "4 images in" in err


def _run_with_console(tiny_onnx: Path, image_dir: Path, out: Path, terminal: bool, quiet: bool = False) -> str:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=terminal, width=100, color_system=None)
    config = ClassifyConfig(
        inputs=InputSpec(paths=(str(image_dir),)),
        engine=EngineConfig(model=str(tiny_onnx), device="cpu", threads=1),
        report=ReportConfig(out=str(out)),
        quiet=quiet,
    )
    stats = run_classify(config, console=console)
    assert stats.total == 3 and stats.all_errors == 0
    return buf.getvalue()


def test_progress_bar_only_on_a_terminal(tiny_onnx: Path, image_dir: Path, tmp_path: Path) -> None:
    on_tty = _run_with_console(tiny_onnx, image_dir, tmp_path / "a.csv", terminal=True)
    assert "img/s" in on_tty and "3/3" in on_tty  # the bar: count and rate
    piped = _run_with_console(tiny_onnx, image_dir, tmp_path / "b.csv", terminal=False)
    assert "img/s" not in piped and "images/s" in piped  # summary only
    quiet = _run_with_console(tiny_onnx, image_dir, tmp_path / "c.csv", terminal=True, quiet=True)
    assert quiet == ""


def test_help_for_every_command(runner: CliRunner) -> None:
    for command in ("classify", "info"):
        result = runner.invoke(main, [command, "--help"])
        assert result.exit_code == 0
        assert "Example: cxr-batch" in result.stdout


@pytest.mark.slow
def test_import_help_and_classify_never_import_torch(tiny_onnx: Path, image_dir: Path, tmp_path: Path) -> None:
    script = f"""
import sys
import cxr_batch
assert "torch" not in sys.modules and "onnxruntime" not in sys.modules and "numpy" not in sys.modules
from cxr_batch.cli.main import main
try:
    main(["--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
assert "torch" not in sys.modules, "--help imported torch"
assert "onnxruntime" not in sys.modules, "--help imported onnxruntime"
try:
    main(["classify", {str(image_dir)!r}, "--model", {str(tiny_onnx)!r}, "--out", {str(tmp_path / "r.csv")!r},
          "--threads", "1", "-q"])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
from cxr_batch import Classifier
assert "onnxruntime" in sys.modules
assert "torch" not in sys.modules, "classify imported torch"
print("TORCH-FREE")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("TORCH-FREE")
    assert len(read_csv(tmp_path / "r.csv")) == 3


def test_info_json_is_valid_for_the_tiny_model(runner: CliRunner, tiny_onnx: Path) -> None:
    result = runner.invoke(main, ["info", str(tiny_onnx), "--json"])
    assert json.loads(result.stdout)["model"] == "tiny@1"
