"""Heatmaps: the ONNX class activation map equals torch's, it follows the image, files and errors.

The ResNet-18 tests need the train extra (torch, torchvision, onnx) to build a checkpoint; the
rest use the tiny onnx.helper models with the ``cam`` output added by :mod:`cxr_batch.training.cam`.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import LABELS, SAMPLE_IMAGES, SHARED, build_model, contract
from PIL import Image

from cxr_batch.cli import main as cli_main
from cxr_batch.cli.main import main
from cxr_batch.contract import ModelMeta
from cxr_batch.engine.classifier import Classifier, find_default_model
from cxr_batch.errors import ModelError
from cxr_batch.io.preprocess import preprocess_file
from cxr_batch.report.heatmap import (
    PARENT_DIR_NAME,
    blend,
    class_map,
    colormap,
    heatmap_relpath,
    normalise,
    overlay_size,
    upsample,
)
from cxr_batch.training.cam import CAM_ROLE, add_cam_output, add_cam_to_file, verify_cam

POOL = SHARED / "covid19-radiography"


def real_xrays(n: int = 6) -> list[Path]:
    """A few real X-rays: from the shared pool when present, else the sample images."""
    if POOL.is_dir():
        return [sorted((POOL / label).iterdir())[i] for i in range(n // 3) for label in LABELS]
    found = sorted(p for p in SAMPLE_IMAGES.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not found:
        pytest.skip("no real X-rays here (../shared/data or sample_images)")
    return found[:n]


# ---------------------------------------------------------------- tiny models (no torch)


@pytest.fixture(scope="module")
def tiny_cam(models_dir: Path) -> Path:
    """The tiny 32×32 model with the ``cam`` output added (through the command-line entry point)."""
    src = build_model(models_dir / "tiny-nocam.onnx", meta=contract(), seed=2)
    out = models_dir / "tiny-cam.onnx"
    result = CliRunner().invoke(cli_main, ["add-cam", str(src), str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_cam_output_decomposes_the_logits(tiny_cam: Path) -> None:
    clf = Classifier(tiny_cam, "cpu")
    assert clf.meta.outputs[CAM_ROLE] == CAM_ROLE
    assert verify_cam(tiny_cam, clf.meta) < 1e-5
    assert add_cam_to_file(tiny_cam) == tiny_cam  # already there: left as it is


def test_add_cam_refuses_a_head_without_average_pooling(models_dir: Path) -> None:
    import onnx

    path = build_model(models_dir / "rank3.onnx", meta=contract(), input_rank=3)
    proto = onnx.load(str(path))
    meta = ModelMeta.from_dict(contract())
    with pytest.raises(ModelError, match="does not come from a global average pool"):
        add_cam_output(proto, meta)


def test_classify_writes_heatmaps_under_the_report_paths(
    tiny_cam: Path, image_dir: Path, png_factory: Any, runner: CliRunner, tmp_path: Path
) -> None:
    png_factory(image_dir / "a.jpg", 4, size=(60, 30), mode="RGB")  # same stem as a.png: must not collide
    (image_dir / "sub" / "broken.png").write_bytes(b"not an image")
    heat = tmp_path / "heat"
    result = runner.invoke(
        main,
        [
            "classify",
            str(image_dir),
            "--model",
            str(tiny_cam),
            "--out",
            str(tmp_path / "r.csv"),
            "--heatmaps",
            str(heat),
            "--no-lungs",  # synthetic images show no lungs: with the lung stage they get no label, no heatmap
        ],
    )
    assert result.exit_code == 3, result.output  # broken.png
    written = sorted(p.relative_to(heat).as_posix() for p in heat.rglob("*") if p.is_file())
    assert written == ["a.jpg.png", "a.png.png", "b.png.png", "sub/c.png.png"]
    with Image.open(heat / "a.jpg.png") as img:
        assert img.mode == "RGB" and img.size == (60, 30)  # the original's size and aspect
    with Image.open(heat / "a.png.png") as img:
        assert img.size == (48, 40)
    assert f"heatmaps: 4 written under {heat}" in result.stderr
    with open(tmp_path / "r.csv", newline="") as fh:
        rows = {r["path"]: r["status"] for r in csv.DictReader(fh)}
    assert rows["sub/broken.png"] == "error" and sum(s == "ok" for s in rows.values()) == 4


def test_model_without_cam_says_so_before_the_run(
    tiny_onnx: Path, image_dir: Path, runner: CliRunner, tmp_path: Path
) -> None:
    out, heat = tmp_path / "r.csv", tmp_path / "heat"
    args = ["classify", str(image_dir), "--model", str(tiny_onnx), "--out", str(out)]
    result = runner.invoke(main, [*args, "--heatmaps", str(heat)])
    assert result.exit_code == 1
    assert "the model has no 'cam' output" in result.stderr
    assert "so it can't make heatmaps (it still classifies without --heatmaps)" in result.stderr
    assert "cxr-batch add-cam MODEL.onnx" in result.stderr
    assert not out.exists() and not heat.exists()
    assert runner.invoke(main, args).exit_code == 0  # it still classifies


def test_heatmap_paths_stay_under_the_folder() -> None:
    assert heatmap_relpath("covid/a.jpg") == Path("covid/a.jpg.png")
    assert heatmap_relpath("/data/x/a.dcm") == Path("data/x/a.dcm.png")
    assert heatmap_relpath("../up/./b.png") == Path(PARENT_DIR_NAME, "up", "b.png.png")
    assert heatmap_relpath("1.2.840.113") == Path("1.2.840.113.png")


def test_map_helpers() -> None:
    assert np.array_equal(normalise(np.full((3, 3), 7.0)), np.zeros((3, 3)))
    m = normalise(np.array([[1.0, 3.0], [2.0, 5.0]]))
    assert m.dtype == np.float32 and m.min() == 0.0 and m.max() == 1.0
    cam = np.stack([np.eye(2), -np.eye(2)])
    assert np.array_equal(class_map(cam, 1), np.array([[0, 1], [1, 0]], np.float32))
    up = upsample(np.array([[1.0, 0.0], [0.0, 0.0]], np.float32), 40, 20)
    assert up.shape == (20, 40) and up[0, 0] == 1.0 and up[-1, -1] == 0.0  # the hot corner stays top-left
    rgb = colormap(np.array([0.0, 0.5, 1.0]))
    assert rgb.shape == (3, 3) and rgb.dtype == np.uint8
    assert rgb[2, 0] > rgb[2, 2] and rgb[0, 2] > rgb[0, 0]  # hot is red, cold is blue-violet
    out = blend(np.full((2, 2), 0.5, np.float32), np.array([[0.0, 1.0], [0.0, 1.0]], np.float32))
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert overlay_size(4000, 3000) == (1024, 768) and overlay_size(200, 100) == (200, 100)


# ---------------------------------------------------------------- ResNet-18 checkpoints (torch)


def _export_resnet(folder: Path, size: int, symmetric: bool) -> tuple[Path, dict[str, Any]]:
    """A random-weight ResNet-18 checkpoint (train's format) exported by ``cxr-batch export``'s code."""
    torch = pytest.importorskip("torch", reason="the train extra (torch) is not installed")
    pytest.importorskip("onnx", reason="the train extra (onnx) is not installed")
    from cxr_batch.training.export import ExportConfig, export_checkpoint
    from cxr_batch.training.train import build_model as build_resnet

    torch.manual_seed(0)
    state = build_resnet(len(LABELS)).state_dict()
    if symmetric:  # mirror-symmetric kernels: the network commutes with a left-right flip
        state = {k: (v + v.flip(-1)) / 2 if v.ndim == 4 else v for k, v in state.items()}
    ckpt = {
        "model": state,
        "labels": list(LABELS),
        "config": {
            "image_size": size,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "resize": "bilinear",
        },
    }
    folder.mkdir(parents=True)
    torch.save(ckpt, folder / "best.ckpt")
    from rich.console import Console

    out = export_checkpoint(
        ExportConfig(checkpoint=str(folder / "best.ckpt"), out=str(folder / "model.onnx")), Console(quiet=True)
    )
    add_cam_to_file(out)  # a no-op once export adds the output itself
    return out, ckpt


@pytest.fixture(scope="module")
def resnet64(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return _export_resnet(tmp_path_factory.mktemp("r18") / "run", 64, symmetric=False)


@pytest.fixture(scope="module")
def resnet_mirror(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    # 65 px: every stride-2 stage sees an odd size, so its sampling grid is itself mirror-symmetric
    # (65 → 33 → 17 → 9 → 5 → 3), and with symmetric kernels the maps flip exactly with the input.
    return _export_resnet(tmp_path_factory.mktemp("r18sym") / "run", 65, symmetric=True)


def _torch_cams(ckpt: dict[str, Any], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits and CAMs straight from the checkpoint in torch: layer4's maps weighted by fc.weight."""
    import torch

    from cxr_batch.training.train import build_model as build_resnet

    model = build_resnet(len(LABELS))
    model.load_state_dict(ckpt["model"])
    model.eval()
    maps: dict[str, Any] = {}
    model.layer4.register_forward_hook(lambda _m, _i, out: maps.update(f=out))
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        cam = torch.einsum("nkhw,ck->nchw", maps["f"], model.fc.weight)
    return logits.numpy(), cam.numpy()


@pytest.mark.slow
def test_onnx_heatmap_equals_torch(resnet64: tuple[Path, dict[str, Any]], runner: CliRunner, tmp_path: Path) -> None:
    path, ckpt = resnet64
    files = real_xrays()
    data = tmp_path / "data"
    data.mkdir()
    for f in files:
        shutil.copyfile(f, data / f.name)
    clf = Classifier(path, "cpu", extra_outputs=[CAM_ROLE], lungs=False)  # synthetic images: no lungs
    results = list(clf.classify([str(data / f.name) for f in files]))
    x = np.stack([preprocess_file(f, clf.meta.spec)[0] for f in files])
    logits, cams = _torch_cams(ckpt, x)
    assert cams.shape == (len(files), 3, 2, 2)
    heat = tmp_path / "heat"
    result = runner.invoke(
        main,
        [
            "classify",
            str(data),
            "--model",
            str(path),
            "--out",
            str(tmp_path / "r.csv"),
            "--heatmaps",
            str(heat),
            "--no-lungs",
        ],
    )
    assert result.exit_code == 0, result.output
    checked = 0
    for f, r, lt, ct in zip(files, results, logits, cams, strict=True):
        assert r.ok and r.label == LABELS[int(np.argmax(lt))]
        index = LABELS.index(r.label)
        ours, theirs = class_map(r.outputs[CAM_ROLE], index), normalise(ct[index])
        assert np.abs(ours - theirs).max() < 1e-4
        assert np.abs(ours - 0.5).max() > 0.4  # not flat: the comparison means something
        w, h = r.width or 0, r.height or 0
        assert np.abs(upsample(ours, w, h) - upsample(theirs, w, h)).max() < 1e-4
        if f.suffix == ".png" and max(w, h) <= 1024:
            # The PNG written by classify, against the torch map laid over the image by hand.
            with Image.open(f) as img:
                grey = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            expected = blend(grey, upsample(theirs, w, h)).astype(np.int16)
            with Image.open(heat / f"{f.name}.png") as written:
                assert np.abs(np.asarray(written, dtype=np.int16) - expected).max() <= 2
            checked += 1
    assert checked or not POOL.is_dir()


@pytest.mark.slow
def test_heatmap_flips_with_the_image(
    resnet_mirror: tuple[Path, dict[str, Any]], runner: CliRunner, tmp_path: Path
) -> None:
    path, _ = resnet_mirror
    src = real_xrays()[0]
    data = tmp_path / "data"
    data.mkdir()
    with Image.open(src) as img:
        grey = img.convert("L")
        width = grey.width
        # Move the content: the X-ray in the left two thirds of a black canvas, then mirrored.
        canvas = Image.new("L", (grey.width * 3 // 2, grey.height))
        canvas.paste(grey, (0, 0))
    canvas.save(data / "left.png")
    canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(data / "right.png")

    clf = Classifier(path, "cpu", extra_outputs=[CAM_ROLE], lungs=False)  # synthetic images: no lungs
    left, right = clf.classify([str(data / "left.png"), str(data / "right.png")])
    assert left.label == right.label
    index = LABELS.index(left.label or "")
    m_left, m_right = class_map(left.outputs[CAM_ROLE], index), class_map(right.outputs[CAM_ROLE], index)
    assert np.abs(m_right - np.fliplr(m_left)).max() < 1e-4  # the map flips with the image
    assert np.abs(m_right - m_left).max() > 0.2  # and so the hot region moved
    hot_left = np.unravel_index(np.argmax(m_left), m_left.shape)
    hot_right = np.unravel_index(np.argmax(m_right), m_right.shape)
    assert hot_right == (hot_left[0], m_left.shape[1] - 1 - hot_left[1])

    heat = tmp_path / "heat"
    result = runner.invoke(
        main,
        [
            "classify",
            str(data),
            "--model",
            str(path),
            "--out",
            str(tmp_path / "r.csv"),
            "--heatmaps",
            str(heat),
            "--no-lungs",
        ],
    )
    assert result.exit_code == 0, result.output
    with Image.open(heat / "left.png.png") as a, Image.open(heat / "right.png.png") as b:
        png_left, png_right = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    # The overlay keeps the image's aspect, its longer side capped (the sample X-rays are large).
    out_w, out_h = overlay_size(canvas.width, canvas.height)
    assert png_left.shape == (out_h, out_w, 3) and canvas.width > width
    assert np.abs(png_right - png_left[:, ::-1]).max() <= 1  # the overlay too, to the rounding of a level
    assert np.abs(png_right - png_left).max() > 50


@pytest.mark.slow
def test_default_model_makes_heatmaps(sample_images: Path, runner: CliRunner, tmp_path: Path) -> None:
    try:
        default = find_default_model("fp32")
    except ModelError:
        pytest.skip("no default model is installed (export/cxr-resnet18.onnx)")
    heat = tmp_path / "heat"
    result = runner.invoke(
        main, ["classify", str(sample_images), "--out", str(tmp_path / "r.csv"), "--heatmaps", str(heat)]
    )
    assert result.exit_code == 0, f"{default}: {result.output}"
    assert len([p for p in heat.rglob("*.png") if p.is_file()]) == 9


def test_cam_added_to_a_copy(tiny_onnx: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m.onnx"
    shutil.copyfile(tiny_onnx, copy)
    assert add_cam_to_file(copy) == copy
    assert CAM_ROLE in Classifier(copy, "cpu").meta.outputs
    assert CAM_ROLE not in Classifier(tiny_onnx, "cpu").meta.outputs


def test_a_heatmap_that_cannot_be_made_is_recorded(tmp_path: Path) -> None:
    from cxr_batch.engine.classifier import Result
    from cxr_batch.report.heatmap import HeatmapWriter

    def result(name: str, **outputs: np.ndarray) -> Result:
        return Result(path=name, file=str(tmp_path / name), status="ok", model="m", label="viral", outputs=outputs)

    writer = HeatmapWriter(tmp_path / "heat", LABELS)
    try:
        writer.write([result("gone.png", cam=np.ones((3, 2, 2))), result("no-cam.png")])
    finally:
        writer.close()
    assert writer.written == 0
    assert writer.failures == [
        ("no-cam.png", "the model returned no 'cam' output"),
        ("gone.png", "cannot decode the image again: cannot open file: No such file or directory"),
    ]


def test_cam_added_to_an_int8_model(models_dir: Path, tmp_path: Path) -> None:
    """A shipped int8 model (QDQ) gets the output too: the head is found through the Q/DQ pairs."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src = build_model(models_dir / "tiny-fp32-for-int8.onnx", meta=contract(), seed=2)
    rng = np.random.default_rng(0)
    batches = iter([{"input": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)} for _ in range(4)])

    class Reader:
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    int8 = tmp_path / "int8.onnx"
    quantize_static(
        str(src),
        str(int8),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    proto = onnx.load(str(int8))
    assert any(n.op_type == "DequantizeLinear" for n in proto.graph.node)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = "cxr_batch", ModelMeta.from_dict(contract(precision="int8")).to_json()
    onnx.save(proto, str(int8))

    add_cam_to_file(int8)
    clf = Classifier(int8, "cpu", extra_outputs=[CAM_ROLE])
    r = clf.classify_file(str(real_xrays()[0]))
    assert r.ok and r.outputs[CAM_ROLE].shape == (3, 16, 16)


def test_heatmaps_need_the_local_engine(tiny_cam: Path, image_dir: Path, runner: CliRunner, tmp_path: Path) -> None:
    args = ["classify", str(image_dir), "--model", str(tiny_cam), "--out", str(tmp_path / "r.csv")]
    result = runner.invoke(main, [*args, "--heatmaps", str(tmp_path / "h"), "--engine", "ray"])
    assert result.exit_code == 2 and "--heatmaps needs --engine local" in result.stderr
