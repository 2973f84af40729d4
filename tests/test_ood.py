"""The out-of-distribution guard: fitting, the graph output, calibration and the report columns."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import SHARED, build_model, contract

from cxr_batch.cli.main import main
from cxr_batch.contract import read_contract
from cxr_batch.io.labelled import find_labelled, make_split
from cxr_batch.training.ood import embeddings, fit, fit_model, score

pytest.importorskip("onnx", reason="fitting the guard needs onnx (train or test extra)")
POOL = SHARED / "covid19-radiography"
DICOM = SHARED / "dicom"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not POOL.is_dir():
        pytest.skip(f"the shared X-ray pool is not here ({POOL})")
    root = tmp_path_factory.mktemp("labelled")
    for label in ("normal", "viral", "covid"):
        (root / label).mkdir()
        for src in sorted((POOL / label).iterdir())[:40]:
            shutil.copy(src, root / label / src.name)
    return root


@pytest.fixture(scope="module")
def guarded(labelled: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object], Path]:
    model = build_model(tmp_path_factory.mktemp("ood") / "tiny.onnx", meta=contract())
    split = make_split(find_labelled(labelled), seed=0)
    record = fit_model(model, labelled, split)
    split_file = model.parent / "split.csv"
    split.write(split_file)
    return model, record, split_file


def test_graph_score_equals_numpy(guarded: tuple[Path, dict[str, object], Path], labelled: Path) -> None:
    from cxr_batch.io.labelled import Split

    model, record, split_file = guarded
    split = Split.read(split_file)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    meta = read_contract(sess)
    assert meta.outputs["ood_score"] == "ood_score"
    assert meta.ood is not None and meta.ood["threshold"] == record["threshold"]
    labels = list(meta.labels)
    e_train, y_train = embeddings(model, split.paths(labelled, "train"), meta.spec, labels)
    means, precision = fit(e_train, y_train, len(labels))
    items = split.paths(labelled, "test")
    e_test, _ = embeddings(model, items, meta.spec, labels)
    ref = score(e_test, means, precision)
    from cxr_batch.io.preprocess import preprocess_file

    x = np.stack([preprocess_file(p, meta.spec)[0] for p, _ in items])
    got = sess.run(["ood_score"], {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)


def test_threshold_passes_95_percent_of_validation(guarded: tuple[Path, dict[str, object], Path]) -> None:
    _, record, _ = guarded
    assert record["n_calibration"] == 18
    assert 0.94 <= float(record["val_pass_rate"]) <= 1.0  # type: ignore[arg-type]
    # 95% of 18 images: at most one may be above the threshold
    assert round((1 - float(record["val_pass_rate"])) * 18) <= 1  # type: ignore[arg-type]


def test_report_has_ood_columns_and_noise_scores_higher(
    guarded: tuple[Path, dict[str, object], Path], labelled: Path, tmp_path: Path
) -> None:
    model = guarded[0]
    folder = tmp_path / "in"
    folder.mkdir()
    for src in sorted((labelled / "covid").iterdir())[:3]:
        shutil.copy(src, folder / src.name)
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(folder / "zz-noise.png")
    out = tmp_path / "r.csv"
    result = CliRunner().invoke(main, ["classify", str(folder), "--model", str(model), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open(newline="", encoding="utf-8")))
    assert all(r["ood_score"] != "" and r["in_distribution"] in ("true", "false") for r in rows)
    scores = {r["path"]: float(r["ood_score"]) for r in rows}
    assert scores["zz-noise.png"] > max(v for k, v in scores.items() if k != "zz-noise.png")


@pytest.mark.skipif(not (DICOM / "pydicom-testfiles").is_dir(), reason="the shared DICOM files are not here")
def test_ct_and_mr_are_flagged_whatever_the_score(
    guarded: tuple[Path, dict[str, object], Path], tmp_path: Path
) -> None:
    pytest.importorskip("pydicom")
    model = guarded[0]
    out = tmp_path / "r.csv"
    result = CliRunner().invoke(
        main, ["classify", str(DICOM / "pydicom-testfiles"), "--model", str(model), "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open(newline="", encoding="utf-8")))
    assert {Path(r["path"]).name for r in rows} == {"CT_small.dcm", "MR_small.dcm"}
    for r in rows:
        assert r["status"] == "ok" and r["in_distribution"] == "false"
        assert "is not a radiograph" in r["notes"]
        assert r["modality"] in ("CT", "MR")


@pytest.mark.skipif(not (DICOM / "pydicom-testfiles").is_dir(), reason="the shared DICOM files are not here")
def test_drop_ood_leaves_flagged_rows_out_of_the_label_counts(
    guarded: tuple[Path, dict[str, object], Path], labelled: Path, tmp_path: Path
) -> None:
    pytest.importorskip("pydicom")
    folder = tmp_path / "in"
    shutil.copytree(DICOM / "pydicom-testfiles", folder / "dicom")
    for src in sorted((labelled / "viral").iterdir())[:2]:
        shutil.copy(src, folder / src.name)
    runs = {}
    for flag in ([], ["--drop-ood"]):
        out = tmp_path / f"r{len(flag)}.csv"
        result = CliRunner().invoke(
            main, ["classify", str(folder), "--model", str(guarded[0]), "--out", str(out), *flag], terminal_width=200
        )
        assert result.exit_code == 0, result.output
        runs[bool(flag)] = (result.stderr, list(csv.DictReader(out.open(newline="", encoding="utf-8"))))
    (plain_err, plain_rows), (drop_err, drop_rows) = runs[False], runs[True]
    assert len(plain_rows) == len(drop_rows) == 4  # the flagged rows stay in the report
    assert "2 images flagged out of distribution" in plain_err
    assert "out of distribution (dropped)" in drop_err and "left out of the label counts" in drop_err
    assert "out of distribution (dropped)" not in plain_err
