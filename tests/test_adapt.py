"""``cxr-batch adapt`` on real films with the shipped model; its warnings; export's refusal to overwrite."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO
from PIL import Image

from cxr_batch.cli.main import main

pytest.importorskip("torch", reason="the train extra (torch) is not installed")
pytest.importorskip("onnx", reason="the train extra (onnx) is not installed")

BASE = REPO / "export" / "cxr-resnet18.onnx"
PER_CLASS = 14


def need_base() -> None:
    if not BASE.is_file():
        pytest.skip(f"the shipped model {BASE} is not here")


@pytest.fixture
def site(shared_data: Path, tmp_path: Path) -> Path:
    """A two-class site: adult normal films (Montgomery) and pediatric viral films, 14 each, plus an
    exact copy of one normal film under another name (the split must keep the two together)."""
    root = tmp_path / "site"
    for label, folder, pattern in (
        ("normal", shared_data / "lung-masks" / "montgomery" / "images", "*_0.png"),
        ("viral", shared_data / "lung-masks" / "covid19-radiography-viral" / "images", "*.png"),
    ):
        (root / label).mkdir(parents=True)
        for p in sorted(folder.glob(pattern))[:PER_CLASS]:
            shutil.copyfile(p, root / label / p.name)
    first = sorted((root / "normal").iterdir())[0]
    shutil.copyfile(first, root / "normal" / "zz-copy-of-first.png")
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def contract_of(path: Path) -> dict[str, object]:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    doc: dict[str, object] = json.loads(props["cxr_batch"])
    return doc


@pytest.mark.slow
def test_adapt_two_class_site(site: Path, tmp_path: Path) -> None:
    """One real adapt run (1 epoch, 1 view): the model knows what it is, and the before/after numbers
    in its contract are the ones a hand count over the test predictions gives."""
    need_base()
    from cxr_batch.contract import file_sha256
    from cxr_batch.io.labelled import Split

    out = tmp_path / "site.onnx"
    runner = CliRunner()
    args = ["adapt", str(site), "--out", str(out), "--epochs", "1", "--views", "1", "--no-int8", "--threads", "2"]
    res = runner.invoke(main, [*args, "--model", str(BASE), "--site", "Test Hospital"])
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and "fewer than 20" in res.output  # 15 and 14 films
    assert "base (95% CI)" in res.output

    doc = contract_of(out)
    base = contract_of(BASE)
    assert doc["name"] == f"{base['name']}-site" and doc["version"] == f"{base['version']}+site.1"
    a = doc["extra"]["adaptation"]  # type: ignore[index]
    assert a["base"] == {
        "name": base["name"],
        "version": base["version"],
        "sha256": file_sha256(BASE),
        "file": BASE.name,
    }
    assert a["site"] == "Test Hospital" and a["local_data"]["classes"] == ["normal", "viral"]
    run = tmp_path / "site-run"
    split = Split.read(run / "split.csv")
    assert a["local_data"]["split_sha256"] == split.fingerprint()
    sides = {r[2] for r in split.rows if r[3] == file_sha256(site / "normal" / "zz-copy-of-first.png")}
    assert len(sides) == 1  # identical content, one side
    assert doc["ood"]["classes_fitted"] == ["normal", "viral"]  # type: ignore[index]
    anchors = a["recipe"]["anchor_distillation"]  # every class of the base, covid too, though no local film
    assert anchors["classes"] == ["normal", "viral", "covid"] and anchors["per_class"] > 0 and anchors["weight"] > 0

    # Before and after, by hand, from the test predictions (one row per test film of split.csv).
    rows = read_csv(run / "test_predictions.csv")
    test_rows = {(r[4], r[0]) for r in split.rows if r[2] == "test"}
    assert {(r["source"], r["path"]) for r in rows} == test_rows
    for key, column in (("before", "base_label"), ("after", "adapted_label")):
        m = a[key]
        assert m["n"] == len(rows)
        assert m["accuracy"] == sum(r[column] == r["true_label"] for r in rows) / len(rows)
        for label in ("normal", "viral"):
            mine = [r for r in rows if r["true_label"] == label]
            assert m["per_class"][label]["support"] == len(mine)
            assert m["per_class"][label]["recall"] == sum(r[column] == label for r in mine) / len(mine)
        labels = ["normal", "viral", "covid"]
        cm = [[sum(r["true_label"] == t and r[column] == p for r in rows) for p in labels] for t in labels]
        assert m["confusion_matrix"] == cm
    assert doc["metrics"]["accuracy"] == a["after"]["accuracy"]  # type: ignore[index]

    # The adapted model classifies like any other, under its own name; the card says what it is.
    card = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "Adapted to the films of Test Hospital" in card and file_sha256(BASE) in card
    assert "synthetic classifier inputs drawn from the base model's Gaussian model" in card
    report = tmp_path / "r.csv"
    first = sorted((site / "viral").iterdir())[0]
    res = runner.invoke(main, ["classify", str(first), "--model", str(out), "--out", str(report), "-q"])
    assert res.exit_code == 0, res.output
    assert read_csv(report)[0]["model"] == f"{base['name']}-site@{base['version']}+site.1"

    # A second run on the same --out is refused, the model untouched; --overwrite is needed.
    digest = file_sha256(out)
    res = runner.invoke(main, args)
    assert res.exit_code == 1 and "already exists; pass --overwrite" in res.output
    assert file_sha256(out) == digest


@pytest.mark.slow
def test_adapt_refuses_existing_output_at_once(site: Path, tmp_path: Path) -> None:
    need_base()
    out = tmp_path / "site.onnx"
    out.write_bytes(b"someone's model")
    res = CliRunner().invoke(main, ["adapt", str(site), "--out", str(out)])
    assert res.exit_code == 1 and "already exists; pass --overwrite" in res.output
    assert out.read_bytes() == b"someone's model"
    assert not (tmp_path / "site-run").exists()
    copy = tmp_path / "copy.onnx"  # the base model under another name: still the base model
    shutil.copyfile(BASE, copy)
    res = CliRunner().invoke(main, ["adapt", str(site), "--model", str(BASE), "--out", str(copy), "--overwrite"])
    assert res.exit_code == 1 and "is the base model" in res.output
    assert copy.read_bytes() == BASE.read_bytes()


@pytest.mark.slow
def test_adapt_refuses_a_class_the_model_lacks(site: Path, tmp_path: Path, shared_data: Path) -> None:
    need_base()
    (site / "tuberculosis").mkdir()
    src = next((shared_data / "lung-masks" / "montgomery" / "images").glob("*_1.png"))
    shutil.copyfile(src, site / "tuberculosis" / src.name)
    res = CliRunner().invoke(main, ["adapt", str(site), "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 1 and "['tuberculosis'] are not classes of the model" in res.output


def test_export_refuses_to_overwrite(tmp_path: Path) -> None:
    """export used to replace an existing model silently."""
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"not read: the refusal comes first")
    out = tmp_path / "mine.onnx"
    out.write_bytes(b"an earlier export")
    res = CliRunner().invoke(main, ["export", str(ckpt), "--out", str(out)])
    assert res.exit_code == 1 and "already exists; pass --overwrite" in res.output
    assert out.read_bytes() == b"an earlier export"
    res = CliRunner().invoke(main, ["export", str(ckpt), "--out", str(out), "--overwrite"])
    assert res.exit_code == 1 and "not a cxr-batch checkpoint" in res.output  # past the check, to the file
    help_text = CliRunner().invoke(main, ["export", "--help"]).output
    flat = "".join(help_text.split())  # click wraps the help, at hyphens too
    assert "[default:cxr-resnet18-custom]" in flat and "[default:0.0.0+local]" in flat


# --------------------------------------------------------------------------- warnings


def test_scanner_shortcut_and_small_class_warnings(shared_data: Path, tmp_path: Path) -> None:
    """Normal films as 8-bit 256² PNGs, viral films as 16-bit 1024² PNGs of real X-rays: the class
    folders differ in size and bit depth, and each class has fewer than 20 films."""
    from rich.console import Console

    from cxr_batch.io.labelled import find_labelled
    from cxr_batch.training.adapt import data_warnings

    root = tmp_path / "site"
    (root / "normal").mkdir(parents=True)
    (root / "viral").mkdir()
    films = sorted((shared_data / "lung-masks" / "montgomery" / "images").glob("*_0.png"))[:6]
    for p in films[:3]:
        shutil.copyfile(p, root / "normal" / p.name)
    for p in films[3:]:
        grey = np.asarray(Image.open(p).convert("L").resize((1024, 1024)), dtype=np.uint16) * 257
        Image.fromarray(grey).save(root / "viral" / p.name)  # uint16: mode I;16
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)  # noqa: SIM115
    warnings = data_warnings([find_labelled(root)], console)
    text = " ".join(warnings)
    assert "class 'normal' has 3 films" in text and "class 'viral' has 3 films" in text
    assert "films differ from the other classes' in size" in text
    assert "films differ from the other classes' in bit depth" in text
    assert "photometric" not in text  # both grey: no warning about that

    # The same films in both classes: no scanner warning.
    for p in films[3:]:
        shutil.copyfile(p, root / "viral" / p.name)
    assert not [w for w in data_warnings([find_labelled(root)], console) if "differ" in w]


def test_gain_within_the_interval_is_flagged() -> None:
    from cxr_batch.evaluation.metrics import wilson_interval
    from cxr_batch.training.adapt import gain_warnings

    lo, hi = wilson_interval(16, 20)
    rows = [
        {"metric": "accuracy", "n": 20, "before": 0.8, "before_ci95": [lo, hi], "after": 0.85, "after_ci95": [0, 1]},
        {
            "metric": "normal recall",
            "n": 20,
            "before": 0.8,
            "before_ci95": [lo, hi],
            "after": 1.0,
            "after_ci95": [0, 1],
        },
    ]
    got = gain_warnings(rows)
    assert hi < 1.0 and len(got) == 1 and got[0].startswith("accuracy: the change 0.800 → 0.850")


def test_ood_fit_without_a_class() -> None:
    from cxr_batch.training.ood import fit, score

    rng = np.random.default_rng(0)
    emb = np.concatenate([rng.normal(0, 1, (20, 8)), rng.normal(5, 1, (20, 8))])
    y = np.repeat([0, 2], 20)  # no image of class 1
    means, precision = fit(emb, y, 3)
    assert means.shape == (2, 8) and np.isfinite(means).all() and np.isfinite(precision).all()
    assert np.isfinite(score(emb, means, precision)).all()


def test_labels_file_paths_stay_under_the_root(tmp_path: Path) -> None:
    from cxr_batch.errors import DataError
    from cxr_batch.training.adapt import read_labels_file

    (tmp_path / "a.png").write_bytes(b"x")
    good = tmp_path / "good.csv"
    good.write_text("path,label\na.png,Normal\n", encoding="utf-8")
    assert read_labels_file(good, tmp_path) == [(tmp_path / "a.png", "normal")]
    for body, message in (
        ("path,label\n../a.png,normal\n", "without '..'"),
        ("path,label\nmissing.png,normal\n", "is not a file"),
        ("file,what\na.png,normal\n", "needs the columns path,label"),
    ):
        bad = tmp_path / "bad.csv"
        bad.write_text(body, encoding="utf-8")
        with pytest.raises(DataError, match=message):
            read_labels_file(bad, tmp_path)
