"""Decoding real and broken files: pixel modes, bit depths, orientation, frames, and bad inputs.

Every bad file must become an error row with a reason, never stop the run.
"""

from __future__ import annotations

import csv
import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cxr_batch.cli.main import main
from cxr_batch.errors import ImageError
from cxr_batch.io.preprocess import decode


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A PNG whose header claims side × side pixels (a few bytes on disk)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
    )
    return path


def png_bytes(seed: int = 0, size: tuple[int, int] = (64, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def exif_rotated_jpeg(path: Path, size: tuple[int, int] = (40, 20), orientation: int = 6) -> Path:
    """Stored size × with the left half white; orientation 6 = rotate 90° clockwise to display."""
    w, h = size
    arr = np.zeros((h, w), np.uint8)
    arr[:, : w // 2] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, "JPEG", exif=exif.tobytes(), quality=95)
    return path


# --------------------------------------------------------------------------- decode()


def test_16_bit_png_is_scaled_by_65535_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 256, 32768, 65535]], np.uint16).repeat(4, axis=0)
    Image.fromarray(arr).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    d = decode(tmp_path / "16.png")
    np.testing.assert_allclose(d.grey[0], arr[0] / 65535.0, atol=1e-6)
    assert d.grey[0, 1] < 0.01  # 256 would be 1.0 if clipped to 8 bits


def test_8_bit_grey_rgb_palette_rgba_la_and_cmyk(tmp_path: Path) -> None:
    Image.new("L", (4, 4), 51).save(tmp_path / "l.png")
    assert decode(tmp_path / "l.png").grey == pytest.approx(np.full((4, 4), 0.2), abs=1e-6)

    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "rgb.png")
    assert decode(tmp_path / "rgb.png").grey == pytest.approx(np.full((4, 4), 0.299), abs=1e-6)

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)  # index 1 = pure green
    pal.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert decode(tmp_path / "p.png").grey == pytest.approx(np.full((4, 4), 0.587), abs=1e-6)

    Image.new("RGBA", (4, 4), (255, 255, 255, 102)).save(tmp_path / "rgba.png")  # 40% opaque white
    assert decode(tmp_path / "rgba.png").grey == pytest.approx(np.full((4, 4), 0.4), abs=1e-6)

    Image.new("LA", (4, 4), (255, 51)).save(tmp_path / "la.png")
    assert decode(tmp_path / "la.png").grey == pytest.approx(np.full((4, 4), 0.2), abs=1e-6)

    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(tmp_path / "white.jpg")
    Image.new("CMYK", (16, 16), (0, 0, 0, 255)).save(tmp_path / "black.jpg")
    assert Image.open(tmp_path / "white.jpg").mode == "CMYK"
    assert decode(tmp_path / "white.jpg").grey.mean() > 0.97
    assert decode(tmp_path / "black.jpg").grey.mean() < 0.03


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    d = decode(exif_rotated_jpeg(tmp_path / "rot.jpg"))
    assert (d.width, d.height) == (20, 40)
    assert d.grey.shape == (40, 20)
    assert d.grey[:20].mean() > 0.9 and d.grey[20:].mean() < 0.1  # the white left half is now on top


def test_reported_size_is_the_file_size_even_when_jpeg_is_drafted(tmp_path: Path) -> None:
    """decode() with a target lets libjpeg downscale; width/height must still be the file's own."""
    path = exif_rotated_jpeg(tmp_path / "big.jpg", size=(800, 400))
    d = decode(path, (32, 32))
    assert (d.width, d.height) == (400, 800)
    assert d.grey.shape[0] < 800  # it really was decoded at a reduced scale


@pytest.mark.parametrize("fmt", ["TIFF", "GIF"])
def test_multi_frame_uses_the_first_frame(tmp_path: Path, fmt: str) -> None:
    frames = [Image.new("L", (8, 8), v) for v in (20, 120, 220)]
    path = tmp_path / f"multi.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:])
    d = decode(path)
    assert d.grey.mean() == pytest.approx(20 / 255, abs=0.02)
    assert d.notes == ["multi-frame file: used frame 1 of 3"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.png", b"", "empty file (0 bytes)"),
        ("text.png", b"this is not an image\n" * 10, "not a recognised image file"),
        ("truncated.png", png_bytes()[:300], "truncated"),
    ],
)
def test_bad_files_raise_image_error_with_a_reason(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=re.escape(message)):
        decode(path)


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="decompression-bomb guard"):
        decode(bomb_png(tmp_path / "bomb.png"))


# --------------------------------------------------------------------------- through classify


def test_bad_inputs_become_error_rows_and_the_run_goes_on(runner: CliRunner, tiny_onnx: Path, tmp_path: Path) -> None:
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("hello")
    (d / "truncated.png").write_bytes(png_bytes()[:300])
    bomb_png(d / "bomb.png")
    (d / "good.png").write_bytes(png_bytes(1))
    arr16 = (np.random.default_rng(0).integers(0, 65536, (50, 60))).astype(np.uint16)
    Image.fromarray(arr16).save(d / "deep16.png")
    Image.new("CMYK", (30, 20), (10, 20, 30, 40)).save(d / "cmyk.jpg")
    Image.new("RGBA", (30, 20), (200, 100, 50, 128)).save(d / "rgba.png")
    Image.new("P", (30, 20), 3).save(d / "palette.png")
    exif_rotated_jpeg(d / "rotated.jpg")
    frames = [Image.new("L", (8, 8), v) for v in (20, 120)]
    frames[0].save(d / "frames.tif", save_all=True, append_images=frames[1:])
    (d / "scan.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)  # DICOM marker, no data set
    out = tmp_path / "r.csv"
    result = runner.invoke(main, ["classify", str(d), "--model", str(tiny_onnx), "--out", str(out), "--threads", "1"])
    assert result.exit_code == 3, result.output
    with open(out, newline="", encoding="utf-8") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    assert sorted(rows) == sorted(p.name for p in d.iterdir())
    errors = {p: r["error"] for p, r in rows.items() if r["status"] == "error"}
    assert set(errors) == {"empty.png", "text.png", "truncated.png", "bomb.png", "scan.dcm"}
    assert errors["empty.png"] == "empty file (0 bytes)"
    assert errors["text.png"].startswith("not a recognised image file")
    assert "truncated" in errors["truncated.png"]
    assert "decompression-bomb guard" in errors["bomb.png"]
    assert errors["scan.dcm"]  # whatever the DICOM reader says, it says something
    for name in ("good.png", "deep16.png", "cmyk.jpg", "rgba.png", "palette.png", "rotated.jpg", "frames.tif"):
        row = rows[name]
        assert row["status"] == "ok" and row["error"] == ""
        # a label, unless the lung stage found no lung fields in these synthetic images (then none)
        assert row["label"] in ("normal", "viral", "covid") if row["assessable"] != "false" else row["label"] == ""
        assert abs(sum(float(row[f"prob_{k}"]) for k in ("normal", "viral", "covid")) - 1) < 1e-4
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == ("20", "40")
    assert (rows["deep16.png"]["width"], rows["deep16.png"]["height"]) == ("60", "50")
    assert rows["frames.tif"]["notes"].split("; ")[0] == "multi-frame file: used frame 1 of 2"  # then the lung stage's
    # The summary groups the errors by reason.
    assert "empty file (0 bytes)" in result.stderr
    assert "decompression-bomb guard" in result.stderr or "image too large" in result.stderr
