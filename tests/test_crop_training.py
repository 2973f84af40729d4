"""Training on lung crops (train --crop lungs): the cache, the test report, export, adapt and classify
all see the same pixels, through one function (cxr_batch.engine.lungs.preprocess_for)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED
from rich.console import Console

from cxr_batch.engine.lungs import preprocess_for
from cxr_batch.errors import ModelError
from cxr_batch.io.preprocess import PreprocessSpec, preprocess_file

torch = pytest.importorskip("torch", reason="the train extra (torch) is not installed")
pytest.importorskip("onnx", reason="the train extra (onnx) is not installed")

POOL = SHARED / "covid19-radiography"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _films(n: int) -> list[Path]:
    if not POOL.is_dir():
        pytest.skip("../shared/data/covid19-radiography is absent")
    return [p for label in ("normal", "covid") for p in sorted((POOL / label).iterdir())[:n]]


def test_the_training_cache_is_what_inference_feeds_the_model() -> None:
    """_load_cache(crop='lungs') then the training normalisation == preprocess_for(path, crop spec)."""
    from cxr_batch.training.train import _load_cache

    films = _films(2)
    crop = PreprocessSpec((224, 224), IMAGENET_MEAN, IMAGENET_STD, "bilinear", "lungs")
    whole = PreprocessSpec((224, 224), IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    items = [(p, "normal") for p in films]
    console = Console(stderr=True, quiet=True)
    cached, _, errors, _ = _load_cache(items, ["normal", "covid"], 224, "bilinear", console, "t", 1, crop="lungs")
    whole_cache, _, _, _ = _load_cache(items, ["normal", "covid"], 224, "bilinear", console, "t", 1)
    assert not errors and cached.shape == (len(films), 224, 224)
    for i, path in enumerate(films):
        x, _ = preprocess_for(path, crop)
        grey = x[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # undo channel 0's normalisation
        assert np.abs(grey - cached[i].astype(np.float32)).max() < 2e-3  # float16 cache
        # the crop changed the pixels: the model sees the lungs, not the film
        assert np.abs(cached[i].astype(np.float32) - whole_cache[i].astype(np.float32)).mean() > 0.01
        np.testing.assert_array_equal(preprocess_for(path, whole)[0], preprocess_file(path, whole)[0])
    with pytest.raises(ModelError, match="lung crops"):
        preprocess_file(films[0], crop)  # never silently the whole film


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxr_batch.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_train_on_lung_crops_export_and_classify(tmp_path: Path) -> None:
    """train --crop lungs --no-test-report → export records the crop → classify crops the same way,
    and refuses --no-lungs for this model."""
    import onnxruntime as ort

    pool = tmp_path / "pool"
    for label in ("normal", "viral", "covid"):
        (pool / label).mkdir(parents=True)
        if not POOL.is_dir():
            pytest.skip("../shared/data/covid19-radiography is absent")
        for src in sorted((POOL / label).iterdir())[:8]:
            (pool / label / src.name).write_bytes(src.read_bytes())
    run = tmp_path / "run"
    proc = _cli("train", str(pool), "--out", str(run), "--epochs", "1", "--image-size", "64", "--batch-size", "8",
                "--threads", "2", "--crop", "lungs", "--no-test-report")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "config.json").read_text())["crop"] == "lungs"
    assert not (run / "metrics.json").exists()  # the test split was not read

    model = tmp_path / "crop.onnx"
    proc = _cli("export", str(run / "best.ckpt"), "--out", str(model), "--ood-fit-images", "100")
    assert proc.returncode == 0, proc.stderr
    from cxr_batch.training.onnx_file import read_contract_file

    meta = read_contract_file(model)[1]
    assert meta.crop == "lungs" and meta.spec.crop == "lungs"
    assert meta.extra["recipe"]["crop"] == "lungs"

    films = sorted((pool / "covid").iterdir())[:3]
    out = tmp_path / "r.csv"
    proc = _cli("classify", *map(str, films), "--model", str(model), "--out", str(out), "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open(newline="", encoding="utf-8"))}
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for film in films:
        x = preprocess_for(film, meta.spec)[0][None]
        logits = sess.run(["logits"], {meta.input_name: x})[0][0]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        got = [float(rows[film.name][f"prob_{label}"]) for label in meta.labels]
        assert np.abs(np.asarray(got) - p).max() < 1e-4, (film.name, got, p)

    # --no-lungs: no verdict and no withheld label, but the crop is still made (the model needs it)
    out_n = tmp_path / "n.csv"
    proc = _cli("classify", *map(str, films), "--model", str(model), "--out", str(out_n), "--precision", "fp32",
                "--no-lungs")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plain = {Path(r["path"]).name: r for r in csv.DictReader(out_n.open(newline="", encoding="utf-8"))}
    for film in films:
        for label in meta.labels:
            assert plain[film.name][f"prob_{label}"] == rows[film.name][f"prob_{label}"]
        assert not plain[film.name].get("assessable") and rows[film.name]["assessable"] in ("true", "false")
    record = json.loads(Path(str(out_n) + ".provenance.json").read_text())
    assert record["runs"][-1]["lung_segmenter"]["sha256"]  # the segmenter that made the crop is named
