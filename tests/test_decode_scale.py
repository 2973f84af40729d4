"""Decoding at the scale the model needs (issue 24, item 1) gives the labels of the full-size path.

``decode(path, target)`` hands on images reduced to no less than twice the model's input size
(box filter by an integer factor, JPEG ``draft`` for JPEG files); ``decode(path, None)`` is the
full-size path. Both go through the same ``prepare`` and the shipped model: the labels must be
identical and the probabilities within :data:`TOLERANCE`.

Measured on these files (fp32 model, AVX2 CPU): max |Δp| 0.0109 (RG1_UNCI/RG1_J2KI, whose window
clips: averaging before clipping differs next to the window's edges), at most 0.0082 on the
RSNA 1024² JPEG-baseline DICOMs, 0.0032 on the sample JPEGs, 0 on the pool PNGs (256², not
reduced).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from cxr_batch.engine.classifier import Classifier, EngineConfig
from cxr_batch.engine.postprocess import softmax
from cxr_batch.io.preprocess import REDUCED_SCALE, decode, prepare, reduction_factor

#: Largest |Δp| allowed between the reduced-scale and the full-size path (measured: 0.0109).
TOLERANCE = 0.02


def test_reduction_factor_keeps_twice_the_target() -> None:
    assert reduction_factor((1024, 1024), (224, 224)) == 2
    assert reduction_factor((3000, 2500), (224, 224)) == 5  # 2500 // 448
    assert reduction_factor((447, 4000), (224, 224)) == 1
    assert reduction_factor((256, 256), (224, 224)) == 1
    assert reduction_factor((4000, 4000), None) == 1
    for side in (448, 895, 896, 1024, 1841, 3000):
        k = reduction_factor((side, side), (224, 224))
        assert side // k >= REDUCED_SCALE * 224


def _copy_files(shared: Path, tmp: Path) -> list[Path]:
    dicom = shared / "dicom"
    wanted = sorted((dicom / "rsna-pneumonia-challenge_lungbox").glob("*/*.dcm"))
    wanted += [dicom / "pydicom-data" / "other" / "RG1_UNCI.dcm", dicom / "pydicom-data" / "other" / "RG1_J2KI.dcm"]
    wanted += sorted(p for p in (shared / "samples").glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for label in ("normal", "viral", "covid"):
        wanted += sorted((shared / "covid19-radiography" / label).glob("*.png"))[:2]
    out = []
    for i, src in enumerate(wanted):
        dst = tmp / f"{i:03d}-{src.name}"
        shutil.copyfile(src, dst)
        out.append(dst)
    return out


@pytest.mark.slow
def test_reduced_scale_gives_the_full_size_labels(shared_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    pytest.importorskip("openjpeg", reason="RG1_J2KI.dcm needs pylibjpeg-openjpeg")
    files = _copy_files(shared_data, tmp_path)
    # A large PNG of real pixels, for Pillow's reduce on a non-JPEG file: the RSNA film as 8-bit.
    film = decode(files[0], None).grey
    big_png = tmp_path / "rsna-1024.png"
    Image.fromarray(np.round(film * 255).astype(np.uint8), "L").save(big_png)
    files.append(big_png)

    classifier = Classifier.from_config(EngineConfig(model=str(REPO / "export" / "cxr-resnet18.onnx")))
    spec = classifier.meta.spec
    full_x, reduced_x = [], []
    reduced_files = 0
    for path in files:
        full, reduced = decode(path, None), decode(path, spec.input_size)
        assert (full.width, full.height) == (reduced.width, reduced.height)
        assert full.grey.shape == (full.height, full.width)  # target None: the full-size path
        # Never below twice the model's input on a side (unless the image itself is smaller).
        for axis in (0, 1):
            assert reduced.grey.shape[axis] >= min(full.grey.shape[axis], REDUCED_SCALE * spec.input_size[axis])
        if reduced.grey.size < full.grey.size:
            reduced_files += 1
        full_x.append(prepare(full.grey, spec))
        reduced_x.append(prepare(reduced.grey, spec))
    # The RSNA films, RG1 x2, the 2000² sample JPEGs and the large PNG at least were reduced.
    assert reduced_files >= 16 + 2 + 3 + 1

    p_full = softmax(classifier.logits(np.stack(full_x)))
    p_reduced = softmax(classifier.logits(np.stack(reduced_x)))
    assert (p_full.argmax(axis=1) == p_reduced.argmax(axis=1)).all(), [
        (f.name, a, b)
        for f, a, b in zip(files, p_full.round(4), p_reduced.round(4), strict=True)
        if a.argmax() != b.argmax()
    ]
    delta = np.abs(p_full - p_reduced).max(axis=1)
    assert delta.max() < TOLERANCE, dict(zip((f.name for f in files), delta.round(4), strict=True))
    # The pool's 256² PNGs are not reduced: exactly the same input, the same probabilities.
    pool = [i for i, f in enumerate(files) if f.name[4:].startswith(("Normal-", "Viral Pneumonia-", "COVID-"))]
    assert len(pool) == 6
    for i in pool:
        assert np.array_equal(full_x[i], reduced_x[i])
        assert delta[i] == 0.0
