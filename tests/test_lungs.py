"""The lung stage: the shipped segmenter on real films and masks, the verdict, the crop, classify's columns."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, build_model, contract
from PIL import Image

from cxr_batch.cli.main import main
from cxr_batch.contract import file_sha256
from cxr_batch.engine.classifier import Classifier
from cxr_batch.engine.lungs import DEFAULT_LUNGS_FILE, LungSegmenter, pair_dice
from cxr_batch.errors import ModelError
from cxr_batch.io.lungs import (
    assess,
    components,
    crop_box,
    crop_square,
    crop_to_lungs,
    lung_view,
    preprocess_file_lungs,
)
from cxr_batch.io.preprocess import decode, normalise, resize_grey

SEGMENTER = REPO / "export" / DEFAULT_LUNGS_FILE
#: Shenzhen pairs the Dice test reads (the segmenter never saw a Shenzhen mask).
SHENZHEN_PAIRS = ("CHNCXR_0001_0", "CHNCXR_0107_0", "CHNCXR_0248_0", "CHNCXR_0470_1", "CHNCXR_0598_1")


@pytest.fixture(scope="module")
def segmenter() -> LungSegmenter:
    if not SEGMENTER.is_file():
        pytest.skip(f"{SEGMENTER} is not built")
    return LungSegmenter(SEGMENTER)


def copy(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(src, dst_dir / src.name))


def lateral_like(film: Path, out: Path) -> Path:
    """The left half of a frontal film stretched to the full width (a proxy for a lateral view)."""
    g = decode(film).grey
    half = g[:, : g.shape[1] // 2]
    img = Image.fromarray((half * 255).astype(np.uint8)).resize((g.shape[1], g.shape[0]), Image.Resampling.BILINEAR)
    img.save(out)
    return out


# --------------------------------------------------------------------------- the verdict's rules


def two_fields(shape: tuple[int, int] = (128, 128)) -> np.ndarray:
    m = np.zeros(shape, np.float32)
    m[20:100, 15:55] = 0.95
    m[25:105, 70:115] = 0.95
    return m


def test_components_match_a_flood_fill() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) < 0.45
    comps = components(mask)
    # flood fill, 8-connected, as the reference
    seen = np.zeros_like(mask)
    areas = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        stack, n = [(y, x)], 0
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            n += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < 40 and 0 <= nx < 50 and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        areas.append(n)
    assert sorted((c.pixels for c in comps), reverse=True) == sorted(areas, reverse=True)


def test_verdict_rules() -> None:
    v = assess(two_fields())
    assert v.assessable and v.note is None and v.box is not None
    assert v.lung_fraction == pytest.approx((80 * 40 + 80 * 45) / 128**2)
    one = two_fields()
    one[:, 60:] = 0
    assert assess(one).note == "one lung field" and not assess(one).assessable
    assert assess(np.zeros((128, 128), np.float32)).note == "no lung fields found"
    tiny = np.zeros((128, 128), np.float32)
    tiny[50:64, 30:40] = tiny[50:64, 80:90] = 0.9
    assert assess(tiny).note == "lung fields too small"
    stacked = np.zeros((128, 128), np.float32)
    stacked[10:50, 30:100] = stacked[70:120, 30:100] = 0.9  # one above the other
    assert not assess(stacked).assessable


def test_crop_box_square_inside_or_padded() -> None:
    top, left, side = crop_box((0.2, 0.1, 0.8, 0.9), 1000, 500, margin=0.0)
    assert side == 600 and top == 200 and left == -50  # wider than the film: centred, padded
    grey = np.random.default_rng(1).random((1000, 500), dtype=np.float32)
    out = crop_square(grey, top, left, side)
    assert out.shape == (600, 600)
    assert np.array_equal(out[:, 50:550], grey[200:800]) and not out[:, :50].any() and not out[:, 550:].any()
    top, left, side = crop_box((0.0, 0.0, 0.3, 0.3), 1000, 1000, margin=0.1)
    assert (top, left) == (0, 0) and side == 360  # moved inside the film, not padded
    assert crop_to_lungs(grey, None) is grey


# --------------------------------------------------------------------------- the shipped segmenter


def test_dice_on_shenzhen(segmenter: LungSegmenter, shared_data: Path) -> None:
    folder = shared_data / "lung-masks" / "shenzhen"
    scores = [
        pair_dice(segmenter, folder / "images" / f"{n}.png", folder / "masks" / f"{n}.png") for n in SHENZHEN_PAIRS
    ]
    assert min(scores) >= 0.85 or float(np.mean(scores)) >= 0.9, scores


def test_segmenter_contract(segmenter: LungSegmenter, tiny_onnx: Path) -> None:
    meta = segmenter.meta
    assert meta.kind == "lung-segmenter" and meta.preprocessing["channels"] == 1
    assert 0 < segmenter.threshold < 1 and meta.metrics["unseen_dice"]["shenzhen"]["pairs"] == 564
    assert "shenzhen" not in meta.training_data["sources"]  # non-commercial masks: never trained on
    with pytest.raises(ModelError, match="lung-segmenter model, not a classifier"):
        Classifier(SEGMENTER, device="cpu", lungs=False)
    with pytest.raises(ModelError, match="classifier model, not a lung-segmenter"):
        LungSegmenter(tiny_onnx)


def test_frontal_films_assessable(segmenter: LungSegmenter, shared_data: Path) -> None:
    films = [
        shared_data / "lung-masks" / "montgomery" / "images" / "MCUCXR_0001_0.png",
        shared_data / "lung-masks" / "shenzhen" / "images" / "CHNCXR_0001_0.png",
        shared_data / "dicom" / "pydicom-data" / "other" / "RG1_UNCI.dcm",
    ]
    for film in films:
        v = segmenter.read(decode(film).grey)
        assert v.assessable, (film.name, v.note)
        assert 0.08 < v.lung_fraction < 0.6


def test_ct_and_lateral_like_not_assessable(segmenter: LungSegmenter, shared_data: Path, tmp_path: Path) -> None:
    ct = shared_data / "dicom" / "pydicom-testfiles" / "other" / "CT_small.dcm"
    assert not segmenter.read(decode(ct).grey).assessable  # the pixels alone, without the header
    film = shared_data / "lung-masks" / "montgomery" / "images" / "MCUCXR_0001_0.png"
    lateral = lateral_like(film, tmp_path / "lateral.png")
    assert not segmenter.read(decode(lateral).grey).assessable


# --------------------------------------------------------------------------- classify


def test_classify_columns_label_and_provenance(segmenter: LungSegmenter, shared_data: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    copy(shared_data / "dicom" / "pydicom-testfiles" / "other" / "CT_small.dcm", inputs)
    copy(shared_data / "lung-masks" / "montgomery" / "images" / "MCUCXR_0001_0.png", inputs)
    lateral_like(shared_data / "lung-masks" / "montgomery" / "images" / "MCUCXR_0002_0.png", inputs / "lateral.png")
    out = tmp_path / "r.csv"
    result = CliRunner().invoke(main, ["classify", str(inputs), "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    film, ct, lat = rows["MCUCXR_0001_0.png"], rows["CT_small.dcm"], rows["lateral.png"]
    assert film["assessable"] == "true" and film["label"] != "" and float(film["lung_fraction"]) > 0.08
    for row in (ct, lat):
        assert row["status"] == "ok" and row["assessable"] == "false" and row["label"] == ""
        assert row["confidence"] == "" and row["prob_covid"] != ""  # probabilities kept
        assert "not assessable: " in row["notes"]
    assert "2 images not assessable" in result.stderr
    record = json.loads((tmp_path / "r.csv.provenance.json").read_text())
    assert record["runs"][-1]["lung_segmenter"]["sha256"] == file_sha256(SEGMENTER)


def test_no_crop_model_unchanged_by_the_stage(segmenter: LungSegmenter, tiny_onnx: Path, shared_data: Path) -> None:
    films = [
        shared_data / "lung-masks" / "montgomery" / "images" / n for n in ("MCUCXR_0001_0.png", "MCUCXR_0002_0.png")
    ]
    plain = list(Classifier(tiny_onnx, device="cpu", threads=1, lungs=False).classify(films))
    staged = list(Classifier(tiny_onnx, device="cpu", threads=1, lungs_model=SEGMENTER).classify(films))
    for a, b in zip(plain, staged, strict=True):
        assert a.probs == b.probs and b.assessable is True and a.assessable is None
        assert a.label == b.label


def test_crop_round_trip_training_equals_inference(
    segmenter: LungSegmenter, models_dir: Path, shared_data: Path
) -> None:
    """A classifier whose contract asks for the lung crop: the tensor training caches (lung_view,
    resize_grey, then normalise) is the tensor classify feeds the model, and classify's
    probabilities are the model's on it."""
    pre = {"grey": "bt601_luma", "resize": "bilinear", "channels": 3, "crop": "lungs"}
    model = build_model(models_dir / "crop.onnx", meta=contract(preprocessing=pre))
    clf = Classifier(model, device="cpu", threads=1, lungs_model=SEGMENTER)
    assert clf.meta.crop == "lungs"
    film = shared_data / "lung-masks" / "shenzhen" / "images" / "CHNCXR_0001_0.png"
    spec = clf.meta.spec
    # training's path: decode, the lung view, resize (cached), normalise
    grey, verdict = lung_view(decode(film, spec.input_size).grey, segmenter.read, "lungs")
    trained = normalise(resize_grey(grey, spec.input_size, spec.resize), spec.mean, spec.std)
    inferred, _, verdict2 = preprocess_file_lungs(film, spec, segmenter.read, clf.meta.crop)
    assert np.array_equal(trained, inferred)
    assert verdict is not None and verdict2 is not None and verdict.box == verdict2.box
    assert grey.shape[0] == grey.shape[1] and grey.shape[0] < decode(film).grey.shape[0]  # really cropped
    (r,) = list(clf.classify([film]))
    logits = clf.logits(trained[None])[0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert list(r.probs.values()) == pytest.approx(p.tolist(), abs=1e-6)


def test_a_crop_classifier_without_the_lung_stage_still_crops(
    segmenter: LungSegmenter, models_dir: Path, shared_data: Path
) -> None:
    """lungs=False (--no-lungs) with a classifier trained on lung crops: no verdict and no withheld
    label, but the same crop and so the same probabilities; the segmenter that ran is named."""
    pre = {"grey": "bt601_luma", "resize": "bilinear", "channels": 3, "crop": "lungs"}
    model = build_model(models_dir / "crop-nolungs.onnx", meta=contract(preprocessing=pre))
    film = shared_data / "lung-masks" / "shenzhen" / "images" / "CHNCXR_0001_0.png"
    with_stage = Classifier(model, device="cpu", threads=1, lungs_model=SEGMENTER)
    without = Classifier(model, device="cpu", threads=1, lungs=False, lungs_model=SEGMENTER)
    (a,) = list(with_stage.classify([film]))
    (b,) = list(without.classify([film]))
    assert without.lungs is None and without.segmenter is not None and without.segmenter.path == SEGMENTER
    assert b.assessable is None and a.assessable is not None
    assert b.probs == a.probs
    plain = Classifier(build_model(models_dir / "whole.onnx", meta=contract()), device="cpu", threads=1, lungs=False)
    assert plain.segmenter is None  # a whole-film classifier without the lung stage runs no segmenter


def test_heatmap_draws_the_lung_outline() -> None:
    from cxr_batch.io.lungs import outline
    from cxr_batch.report.heatmap import LUNG_OUTLINE, draw_lung_outline

    mask = two_fields() > 0.5
    rgb = np.zeros((128, 128, 3), np.uint8)
    draw_lung_outline(rgb, mask)
    cyan = np.all(rgb == LUNG_OUTLINE, axis=-1)
    assert np.array_equal(cyan, outline(mask)) and cyan.sum() == (2 * 80 + 2 * 40 - 4) + (2 * 80 + 2 * 45 - 4)


@pytest.mark.slow
def test_train_lungs_resumes_refuses_a_changed_schedule_and_exports(shared_data: Path, tmp_path: Path) -> None:
    """A tiny real run: checkpoints are plain data (weights_only), --resume with another schedule is
    an Error line (no traceback), and export-lungs writes a segmenter that loads with its contract."""
    pytest.importorskip("torch")
    roots = [str(shared_data / "lung-masks" / n) for n in ("montgomery", "covid19-radiography-viral")]
    run = tmp_path / "run"
    common = ["--out", str(run), "--image-size", "32", "--threads", "1"]
    res = CliRunner().invoke(main, ["train-lungs", *roots, *common, "--epochs", "1"])
    assert res.exit_code == 0, res.output
    assert {"best.pt", "last.pt", "config.json", "history.json", "split.csv"} <= {p.name for p in run.iterdir()}
    res = CliRunner().invoke(main, ["train-lungs", *roots, *common, "--epochs", "2", "--resume"])
    assert res.exit_code == 1 and "same --epochs" in res.output and "Traceback" not in res.output, res.output
    out = tmp_path / "seg.onnx"
    res = CliRunner().invoke(main, ["export-lungs", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    seg = LungSegmenter(out)
    assert seg.meta.kind == "lung-segmenter"
