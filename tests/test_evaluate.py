"""evaluate: same numbers as a user gets from the classify CSV, labels CSV, skipped labels, errors, plots."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import LABELS, REPO, contract
from PIL import Image
from rich.console import Console

from cxr_batch.cli.main import main
from cxr_batch.engine.classifier import EngineConfig
from cxr_batch.errors import MissingExtraError
from cxr_batch.evaluation.evaluate import EvaluateConfig, json_safe, run_evaluate
from cxr_batch.evaluation.metrics import (
    classification_metrics,
    expected_calibration_error,
    reliability_bins,
    roc_auc,
    roc_curve,
)
from cxr_batch.evaluation.tables import print_metrics

PER_CLASS = 8
#: The keys of classification_metrics: evaluate's JSON must hold exactly what it returns.
METRIC_KEYS = (
    "n",
    "labels",
    "accuracy",
    "accuracy_ci95",
    "macro_f1",
    "per_class",
    "confusion_matrix",
    "ece",
    "ci_method",
)


@pytest.fixture(scope="module")
def eval_model(models_dir: Path) -> Path:
    """A tiny model (32×32) whose predictions on real X-rays are not all one class."""
    from conftest import build_model

    return build_model(models_dir / "eval-tiny.onnx", meta=contract(), seed=3)


@pytest.fixture
def labelled(shared_data: Path, tmp_path: Path) -> Path:
    """Real X-rays in class folders (copied from the shared pool), plus two unreadable files and a
    folder whose label the model doesn't know."""
    root = tmp_path / "labelled"
    for label in LABELS:
        (root / label).mkdir(parents=True)
        for src in sorted((shared_data / "covid19-radiography" / label).iterdir())[:PER_CLASS]:
            shutil.copyfile(src, root / label / src.name)
    (root / "covid" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "viral" / "empty.png").write_bytes(b"")
    (root / "pneumonia").mkdir()
    for src in sorted((shared_data / "covid19-radiography" / "normal").iterdir())[-2:]:
        shutil.copyfile(src, root / "pneumonia" / src.name)
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def metrics_from_classify_csv(rows: list[dict[str, str]], truth: dict[str, str]) -> dict[str, Any]:
    """What a user computes from a classify report and their own labels, with the shared metric code."""
    ok = [r for r in rows if r["status"] == "ok" and r["path"] in truth]
    y = np.array([LABELS.index(truth[r["path"]]) for r in ok])
    probs = np.array([[float(r[f"prob_{label}"]) for label in LABELS] for r in ok])
    return classification_metrics(y, probs, LABELS)


@pytest.mark.slow
def test_evaluate_equals_metrics_from_the_classify_csv(
    labelled: Path, eval_model: Path, runner: CliRunner, tmp_path: Path
) -> None:
    classify = runner.invoke(
        main, ["classify", str(labelled), "--model", str(eval_model), "--out", str(tmp_path / "c.csv")]
    )
    assert classify.exit_code == 3, classify.output  # the two unreadable files
    out = tmp_path / "metrics.json"
    result = runner.invoke(
        main,
        [
            "evaluate",
            str(labelled),
            "--model",
            str(eval_model),
            "--out",
            str(out),
            "--predictions",
            str(tmp_path / "p.csv"),
        ],
    )
    assert result.exit_code == 3, result.output
    doc = json.loads(out.read_text())

    rows = read_csv(tmp_path / "c.csv")
    truth = {r["path"]: r["path"].split("/")[0] for r in rows if r["path"].split("/")[0] in LABELS}
    mine = json_safe(metrics_from_classify_csv(rows, truth))
    assert {k: doc[k] for k in METRIC_KEYS} == mine  # identical, not approximately equal
    assert doc["n"] == 3 * PER_CLASS
    assert len({r["label"] for r in rows if r["status"] == "ok"}) > 1  # the numbers mean something

    # By hand, from the label column: accuracy and the confusion matrix.
    ok = [r for r in rows if r["status"] == "ok" and r["path"] in truth]
    assert doc["accuracy"] == sum(r["label"] == truth[r["path"]] for r in ok) / len(ok)
    cm = [[sum(1 for r in ok if truth[r["path"]] == t and r["label"] == p) for p in LABELS] for t in LABELS]
    assert doc["confusion_matrix"] == cm

    # Unreadable files: counted and listed, with classify's messages; the unknown folder: listed, skipped.
    errors = {r["path"]: r["error"] for r in rows if r["status"] == "error"}
    assert doc["error_count"] == 2
    assert {e["path"]: e["error"] for e in doc["errors"]} == errors
    assert {e["path"]: e["label"] for e in doc["errors"]} == {"covid/broken.png": "covid", "viral/empty.png": "viral"}
    assert doc["skipped"] == [
        {"label": "pneumonia", "folder": "pneumonia", "files": 2, "reason": "the model has no such label"}
    ]
    assert doc["files"] == 3 * PER_CLASS + 2

    # --predictions is the classify report of the evaluated files, row for row (but for the run id:
    # evaluate writes no provenance record, so its run_id column is empty).
    predictions = {r["path"]: r for r in read_csv(tmp_path / "p.csv")}
    assert {r.pop("run_id") for r in predictions.values()} == {""}
    # ... with the true label and whether the model got it right (empty on unreadable rows).
    for path, r in predictions.items():
        true, correct = r.pop("true_label"), r.pop("correct")
        assert true == path.split("/")[0]
        assert correct == ("" if r["status"] != "ok" else "true" if r["label"] == true else "false")
    assert sum(r["correct"] == "true" for r in read_csv(tmp_path / "p.csv")) == round(doc["accuracy"] * doc["n"])
    classified = {r["path"]: {k: v for k, v in r.items() if k != "run_id"} for r in rows}
    assert predictions == {p: r for p, r in classified.items() if not p.startswith("pneumonia/")}

    # stderr: the tables (with intervals), the unreadable files and the skipped folder; stdout stays clean.
    assert result.stdout == ""
    for text in (
        "confusion matrix",
        "95% CI",
        "recall (sensitivity)",
        "covid/broken.png",
        "viral/empty.png",
        "pneumonia",
    ):
        assert text in result.stderr
    assert doc["model"] == "tiny@1" and len(doc["model_sha256"]) == 64


def test_labels_csv(labelled: Path, eval_model: Path, tmp_path: Path) -> None:
    lines = ["path,label,note"]
    for label, alias in (("normal", "Normal"), ("viral", "Viral Pneumonia"), ("covid", "COVID-19")):
        for p in sorted((labelled / label).glob("*.png"))[:3]:
            lines.append(f"{p.relative_to(labelled).as_posix()},{alias},x")
    lines += ["pneumonia/x.png,lung opacity,", "pneumonia/y.png,lung opacity,", "normal/missing.png,normal,", ""]
    labels_file = tmp_path / "labels.csv"
    labels_file.write_text("\n".join(lines), encoding="utf-8")
    console = Console(file=io.StringIO(), width=100, color_system=None)
    config = EvaluateConfig(
        data_dir=str(labelled),
        out=str(tmp_path / "m.json"),
        engine=EngineConfig(model=str(eval_model)),
        labels_file=str(labels_file),
        predictions=str(tmp_path / "p.jsonl"),
    )
    evaluation = run_evaluate(config, console=console)
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc == evaluation.document
    assert doc["skipped"] == [{"label": "lung opacity", "files": 2, "reason": "the model has no such label"}]
    assert doc["error_count"] == 1 and doc["errors"][0]["path"] == "normal/missing.png"
    assert doc["n"] == 9 and [m["support"] for m in doc["per_class"].values()] == [3, 3, 3]
    assert doc["data"]["source"] == f"labels file {labels_file}"
    paths = [json.loads(line)["path"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(paths) == 10 and paths[-1] == "normal/missing.png"  # as the CSV writes them, in its order


def test_labels_csv_problems_are_fatal(labelled: Path, eval_model: Path, runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.png,normal\n")
    args = ["evaluate", str(labelled), "--model", str(eval_model), "--out", str(tmp_path / "m.json"), "--labels"]
    result = runner.invoke(main, [*args, str(bad)])
    assert result.exit_code == 1
    assert "needs a header with the columns path,label" in result.stderr
    bad.write_text("path,label\nnormal/a.png,normal\nnormal/a.png,covid\n")
    result = runner.invoke(main, [*args, str(bad)])
    assert (
        result.exit_code == 1 and "lines 2 ('normal/a.png') and 3 ('normal/a.png') both name the file" in result.stderr
    )
    assert not (tmp_path / "m.json").exists()


def test_no_folder_the_model_knows(tmp_path: Path, eval_model: Path, runner: CliRunner, png_factory: Any) -> None:
    png_factory(tmp_path / "data" / "cats" / "a.png", 1)
    png_factory(tmp_path / "data" / "dogs" / "b.png", 2)
    result = runner.invoke(
        main, ["evaluate", str(tmp_path / "data"), "--model", str(eval_model), "--out", str(tmp_path / "m.json")]
    )
    assert result.exit_code == 1
    assert "none of its class folders (cats, dogs) is a label of the model (normal, viral, covid)" in result.stderr


def test_existing_outputs_are_kept(labelled: Path, eval_model: Path, runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    out.write_text("{}")
    args = ["evaluate", str(labelled), "--model", str(eval_model), "--out", str(out), "-q"]
    result = runner.invoke(main, args)
    assert result.exit_code == 1 and "already exists; pass --overwrite" in result.stderr
    assert out.read_text() == "{}"
    result = runner.invoke(main, [*args, "--overwrite"])
    assert result.exit_code == 3 and result.stderr == ""  # quiet: no tables
    assert json.loads(out.read_text())["n"] == 3 * PER_CLASS


@pytest.mark.slow
def test_plots(labelled: Path, eval_model: Path, runner: CliRunner, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plots extra (matplotlib) is not installed")
    plots = tmp_path / "plots"
    result = runner.invoke(
        main,
        [
            "evaluate",
            str(labelled),
            "--model",
            str(eval_model),
            "--out",
            str(tmp_path / "m.json"),
            "--plots",
            str(plots),
        ],
    )
    assert result.exit_code == 3, result.output
    for name in ("confusion_matrix.png", "roc_curves.png", "reliability.png"):
        with Image.open(plots / name) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 300
        assert f"wrote {plots / name}" in result.stderr


def test_plots_without_matplotlib(
    labelled: Path, eval_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    config = EvaluateConfig(
        data_dir=str(labelled),
        out=str(tmp_path / "m.json"),
        engine=EngineConfig(model=str(eval_model)),
        plots=str(tmp_path / "plots"),
    )
    with pytest.raises(MissingExtraError, match=r'pip install "cxr-batch\[plots\]"'):
        run_evaluate(config, console=Console(file=io.StringIO()))
    assert not (tmp_path / "m.json").exists()  # refused before anything ran


@pytest.mark.slow
def test_evaluate_imports_neither_torch_nor_matplotlib() -> None:
    code = (
        "import sys, cxr_batch.evaluation.evaluate, cxr_batch.report.heatmap, cxr_batch.cli.main; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib', 'onnx')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------- metric helpers


def test_roc_curve_area_is_roc_auc() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(200), 1)  # many ties
    positive = rng.random(200) < scores
    fpr, tpr = roc_curve(scores, positive)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert math.isclose(area, roc_auc(scores, positive), abs_tol=1e-12)


def test_reliability_bins_add_up_to_ece() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (300, 3))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 3, 300)
    bins = reliability_bins(probs, y)
    assert sum(b["n"] for b in bins) == 300
    ece = sum(b["n"] / 300 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["n"])
    assert math.isclose(ece, expected_calibration_error(probs, y), abs_tol=1e-12)


def test_print_metrics_shows_intervals() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.8 + 0.2 / 3
    metrics = classification_metrics(y, probs, LABELS)
    console = Console(file=io.StringIO(), width=80, color_system=None)
    print_metrics(metrics, console, title="test")
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "test: n=6, accuracy 0.6667 [0.300, 0.903]" in text
    assert "[0.095, 0.905]" in text  # a recall interval: Wilson, 1 of 2
    assert max(len(line) for line in text.splitlines()) <= 80
