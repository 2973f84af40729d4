"""DICOM input: the shared real files, and variants of them made here with pydicom."""

from __future__ import annotations

import csv
import logging
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cxr_batch.errors import ImageError
from cxr_batch.io.dicom import read_dicom
from cxr_batch.io.preprocess import PreprocessSpec, decode, prepare, reduction_factor, to_grey

DICOM_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
RG1_UNCI = DICOM_DIR / "pydicom-data" / "other" / "RG1_UNCI.dcm"
RG1_J2KI = DICOM_DIR / "pydicom-data" / "other" / "RG1_J2KI.dcm"
CT_SMALL = DICOM_DIR / "pydicom-testfiles" / "other" / "CT_small.dcm"
MR_SMALL = DICOM_DIR / "pydicom-testfiles" / "other" / "MR_small.dcm"
RSNA = sorted((DICOM_DIR / "rsna-pneumonia-challenge_lungbox").glob("*/*.dcm"))
RSNA_ONE = DICOM_DIR / "rsna-pneumonia-challenge_lungbox" / "normal" / "009eb222-eabc-4150-8121-d5a6d06b8ebf.dcm"

needs_data = pytest.mark.skipif(
    not DICOM_DIR.is_dir(), reason=f"shared DICOM test files not found at {DICOM_DIR} (a checkout without shared/)"
)

SPEC = PreprocessSpec(input_size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

#: Patient data put into test files; none of it may come out of the reader.
PHI = {
    "PatientName": "Doe^Jane^Secretname",
    "PatientID": "PHI-ID-424242",
    "PatientBirthDate": "19010203",
    "OtherPatientIDs": "OTHER-ID-777",
    "AccessionNumber": "ACC-31337",
    "InstitutionName": "Saint Phi Hospital",
    "ReferringPhysicianName": "Dr^Whoknows",
}


@pytest.fixture(scope="module")
def pydicom() -> Any:
    return pytest.importorskip("pydicom")


def _load(pydicom: Any, src: Path) -> Any:
    """A full dataset (pixels decoded to a native array) ready to be modified and saved."""
    ds = pydicom.dcmread(src)
    return ds, ds.pixel_array.copy()


def _save_native(pydicom: Any, ds: Any, arr: np.ndarray, path: Path, **elements: Any) -> Path:
    """Write ``ds`` with ``arr`` as uncompressed Explicit VR Little Endian pixel data."""
    from pydicom.uid import ExplicitVRLittleEndian

    for keyword, value in elements.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def _window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window to [0, 1], written out independently of pydicom."""
    x = x.astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _assert_same_input(a: Path | np.ndarray, b: Path | np.ndarray, atol: float = 1e-3) -> None:
    xa = prepare(decode(a).grey if isinstance(a, Path) else a, SPEC)
    xb = prepare(decode(b).grey if isinstance(b, Path) else b, SPEC)
    np.testing.assert_allclose(xa, xb, atol=atol, rtol=0)


# --- the shared real files ------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("path", [RG1_UNCI, RG1_J2KI, *RSNA], ids=lambda p: p.name[:16])
def test_shared_chest_radiographs_decode(pydicom: Any, path: Path) -> None:
    header = pydicom.dcmread(path, stop_before_pixels=True)
    d = decode(path, SPEC.input_size)
    assert d.grey.dtype == np.float32
    # Box-reduced by an integer factor for the model (issue 24): still at least twice its input.
    k = reduction_factor((header.Columns, header.Rows), SPEC.input_size)
    assert k >= 2
    assert d.grey.shape == (-(-header.Rows // k), -(-header.Columns // k))
    assert decode(path).grey.shape == (header.Rows, header.Columns)
    assert (d.width, d.height) == (header.Columns, header.Rows)
    assert 0.0 <= d.grey.min() < 0.2 and 0.8 < d.grey.max() <= 1.0
    assert d.fields == {
        "modality": "CR",
        "view_position": header.ViewPosition,
        "sop_instance_uid": header.SOPInstanceUID,
        "study_instance_uid": header.StudyInstanceUID,
    }
    assert d.fields["view_position"] in {"PA", "AP"}
    assert d.not_radiograph is None
    assert d.notes == []


@pytest.mark.slow
@needs_data
def test_rg1_follows_the_dicom_display_pipeline(pydicom: Any) -> None:
    """RG1 is MONOCHROME1, 15 bits stored, window 15000/30000: window first, then invert."""
    stored = pydicom.dcmread(RG1_UNCI).pixel_array
    expected = 1.0 - _window(stored, 15000, 30000)
    got = read_dicom(RG1_UNCI).grey
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # Inverting before windowing would give a visibly different picture.
    wrong = _window(32767 - stored.astype(np.int64), 15000, 30000)
    assert np.abs(got - wrong).mean() > 0.05
    # Lungs (dark on a chest film) are darker than the spine column.
    h, w = got.shape
    lungs = got[h // 3 : h // 2, w // 5 : w // 3].mean()
    spine = got[h // 3 : h // 2, w // 2 - 20 : w // 2 + 20].mean()
    assert lungs < spine


@pytest.mark.slow
@needs_data
def test_jpeg2000_decodes_to_the_uncompressed_image(pydicom: Any) -> None:
    """Lossless here: identical whichever plugin decodes it (pylibjpeg-openjpeg or Pillow)."""
    np.testing.assert_array_equal(read_dicom(RG1_J2KI).grey, read_dicom(RG1_UNCI).grey)


@needs_data
@pytest.mark.parametrize(("path", "modality"), [(CT_SMALL, "CT"), (MR_SMALL, "MR")])
def test_ct_and_mr_are_flagged_as_not_radiographs(path: Path, modality: str) -> None:
    d = decode(path)
    assert d.fields["modality"] == modality
    assert d.not_radiograph == f"DICOM modality {modality} is not a radiograph (expected CR, DX or RG)"
    assert d.grey.dtype == np.float32 and d.grey.min() >= 0.0 and d.grey.max() <= 1.0


@needs_data
@pytest.mark.parametrize(
    ("modality", "flagged"),
    [
        ("CR", False),
        ("DX", False),
        ("RG", False),
        ("dx", False),
        ("", False),
        ("OT", False),
        ("SC", False),
        ("MG", True),
        ("US", True),
        ("XA", True),
        ("PX", True),
        ("NM", True),
    ],
)
def test_modality_decides_not_radiograph(pydicom: Any, tmp_path: Path, modality: str, flagged: bool) -> None:
    ds = pydicom.dcmread(RSNA_ONE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lower-case "dx" is invalid CS, which is the point
        ds.Modality = modality
    ds.save_as(tmp_path / "m.dcm")
    d = read_dicom(tmp_path / "m.dcm")
    assert d.fields["modality"] == modality.upper()
    assert (d.not_radiograph is not None) == flagged
    if flagged:
        assert modality in (d.not_radiograph or "")


# --- variants made with pydicom -------------------------------------------------------------------


@needs_data
def test_monochrome1_with_inverted_pixels_matches_monochrome2(pydicom: Any, tmp_path: Path) -> None:
    ds, arr = _load(pydicom, RSNA_ONE)  # MONOCHROME2, 8 bits, no window
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    mono2 = _save_native(pydicom, ds, arr, tmp_path / "mono2.dcm")
    mono1 = _save_native(pydicom, ds, 255 - arr, tmp_path / "mono1.dcm", PhotometricInterpretation="MONOCHROME1")
    _assert_same_input(mono1, mono2)
    _assert_same_input(mono2, RSNA_ONE)  # re-encoding as uncompressed changes nothing


@needs_data
def test_monochrome1_with_window_matches_inverted_monochrome2(pydicom: Any, tmp_path: Path) -> None:
    """The real MONOCHROME1 file against a MONOCHROME2 copy with inverted values and window."""
    ds, arr = _load(pydicom, RG1_UNCI)
    top = 2**ds.BitsStored - 1
    # x' = top - x maps the LINEAR window's centre c to top - c + 1 (PS3.3 C.11.2.1.2.1).
    mono2 = _save_native(
        pydicom,
        ds,
        (top - arr.astype(np.int64)).astype(np.uint16),
        tmp_path / "mono2.dcm",
        PhotometricInterpretation="MONOCHROME2",
        WindowCenter=top - 15000 + 1,
        WindowWidth=30000,
    )
    _assert_same_input(RG1_UNCI, mono2)


@pytest.mark.slow
@needs_data
def test_rescale_slope_and_intercept_give_the_same_image(pydicom: Any, tmp_path: Path) -> None:
    ds, arr = _load(pydicom, RG1_UNCI)  # values 803..26512, window 15000/30000 in output units
    stored = ((arr.astype(np.int64) - 100) * 2).astype(np.uint16)  # 0.5 * stored + 100 == original
    variant = _save_native(
        pydicom,
        ds,
        stored,
        tmp_path / "rescaled.dcm",
        BitsStored=16,
        HighBit=15,
        RescaleSlope=0.5,
        RescaleIntercept=100,
        RescaleType="US",
    )
    _assert_same_input(variant, RG1_UNCI)
    np.testing.assert_allclose(read_dicom(variant).grey, read_dicom(RG1_UNCI).grey, atol=1e-5)


@needs_data
def test_modality_lut_is_applied_before_the_window(pydicom: Any, tmp_path: Path) -> None:
    ds, arr = _load(pydicom, RSNA_ONE)
    path = _save_native(
        pydicom,
        ds,
        arr,
        tmp_path / "w.dcm",
        RescaleSlope=4,
        RescaleIntercept=-200,
        WindowCenter=300,
        WindowWidth=400,
    )
    expected = _window(arr.astype(np.float64) * 4 - 200, 300, 400)
    np.testing.assert_allclose(read_dicom(path).grey, expected, atol=1e-6)


@needs_data
def test_the_first_of_several_windows_is_used(pydicom: Any, tmp_path: Path) -> None:
    ds, arr = _load(pydicom, RSNA_ONE)
    path = _save_native(pydicom, ds, arr, tmp_path / "w.dcm", WindowCenter=[100, 30], WindowWidth=[80, 10])
    d = read_dicom(path)
    np.testing.assert_allclose(d.grey, _window(arr, 100, 80), atol=1e-6)
    assert d.notes == []
    # and it is not the full-range picture of the same file
    assert np.abs(d.grey - read_dicom(RSNA_ONE).grey).mean() > 0.05


@needs_data
def test_no_window_uses_the_full_range_of_values(pydicom: Any, tmp_path: Path) -> None:
    ds, arr = _load(pydicom, RSNA_ONE)
    narrow = (arr.astype(np.uint16) // 4 + 1000).astype(np.uint16)  # 1000..1063 in a 16-bit container
    path = _save_native(pydicom, ds, narrow, tmp_path / "n.dcm", BitsAllocated=16, BitsStored=16, HighBit=15)
    lo, hi = narrow.min(), narrow.max()
    np.testing.assert_allclose(read_dicom(path).grey, (narrow - lo) / (hi - lo), atol=1e-6)


@needs_data
def test_unusable_window_falls_back_to_full_range_with_a_note(pydicom: Any, tmp_path: Path) -> None:
    ds, arr = _load(pydicom, RSNA_ONE)
    path = _save_native(pydicom, ds, arr, tmp_path / "w.dcm", WindowCenter=100, WindowWidth=0)
    d = read_dicom(path)
    assert any(n.startswith("DICOM window ignored") for n in d.notes)
    np.testing.assert_allclose(d.grey, (arr - arr.min()) / (arr.max() - arr.min()), atol=1e-6)


@needs_data
def test_voi_lut_sequence_is_used_and_scaled_by_the_bits_its_entries_need(pydicom: Any, tmp_path: Path) -> None:
    from pydicom.dataset import Dataset

    ds, arr = _load(pydicom, RSNA_ONE)
    item = Dataset()
    # An inverting LUT declared as 16 bits per entry whose entries only need 12 (a common quirk).
    item.LUTDescriptor = [256, 0, 16]
    item.LUTData = [(255 - i) * 16 for i in range(256)]
    item["LUTDescriptor"].VR = "US"
    item["LUTData"].VR = "US"
    path = _save_native(
        pydicom,
        ds,
        arr,
        tmp_path / "voi.dcm",
        VOILUTSequence=[item],
        WindowCenter=10,
        WindowWidth=20,
    )
    expected = (255 - arr.astype(np.float64)) * 16 / 4095
    np.testing.assert_allclose(read_dicom(path).grey, expected, atol=1e-6)  # the LUT wins over the window


@needs_data
@pytest.mark.parametrize("rle", [False, True], ids=["native", "rle"])
def test_multi_frame_uses_frame_one_and_says_so(pydicom: Any, tmp_path: Path, rle: bool) -> None:
    from pydicom.uid import RLELossless

    ds, arr = _load(pydicom, RSNA_ONE)
    frames = np.stack([arr, 255 - arr, np.zeros_like(arr)])
    path = _save_native(pydicom, ds, frames, tmp_path / "multi.dcm", NumberOfFrames=3)
    if rle:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == RLELossless
    d = read_dicom(path)
    assert d.notes == ["multi-frame DICOM: used frame 1 of 3"]
    assert (d.width, d.height) == (arr.shape[1], arr.shape[0])
    np.testing.assert_allclose(d.grey, read_dicom(RSNA_ONE).grey, atol=1e-6)


@needs_data
def test_enhanced_multi_frame_rescale_and_window_come_from_functional_groups(pydicom: Any, tmp_path: Path) -> None:
    from pydicom.dataset import Dataset

    ds, arr = _load(pydicom, RSNA_ONE)
    transform, voi, shared = Dataset(), Dataset(), Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 4, -200, "US"
    voi.WindowCenter, voi.WindowWidth = 300, 400
    shared.PixelValueTransformationSequence = [transform]
    shared.FrameVOILUTSequence = [voi]
    path = _save_native(
        pydicom,
        ds,
        np.stack([arr, arr]),
        tmp_path / "enh.dcm",
        NumberOfFrames=2,
        SharedFunctionalGroupsSequence=[shared],
    )
    d = read_dicom(path)
    np.testing.assert_allclose(d.grey, _window(arr.astype(np.float64) * 4 - 200, 300, 400), atol=1e-6)
    assert d.notes == ["multi-frame DICOM: used frame 1 of 2"]


@needs_data
def test_colour_dicom_becomes_bt601_grey(pydicom: Any, tmp_path: Path) -> None:
    from pydicom.pixels import convert_color_space

    ds, arr = _load(pydicom, RSNA_ONE)
    rgb = np.stack([arr, 255 - arr, arr // 2], axis=-1).astype(np.uint8)
    common = {"SamplesPerPixel": 3, "PlanarConfiguration": 0}
    rgb_path = _save_native(pydicom, ds, rgb, tmp_path / "rgb.dcm", PhotometricInterpretation="RGB", **common)
    expected = to_grey(Image.fromarray(rgb, "RGB"))  # the PNG path's conversion
    np.testing.assert_allclose(read_dicom(rgb_path).grey, expected, atol=1e-6)

    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ybr_path = _save_native(pydicom, ds, ybr, tmp_path / "ybr.dcm", PhotometricInterpretation="YBR_FULL", **common)
    np.testing.assert_allclose(read_dicom(ybr_path).grey, expected, atol=2 / 255)


@needs_data
def test_palette_colour_dicom_is_looked_up_then_made_grey(pydicom: Any, tmp_path: Path) -> None:
    ds, arr = _load(pydicom, RSNA_ONE)
    ramp = np.arange(256, dtype=np.uint16)
    luts = {"Red": (255 - ramp) * 257, "Green": (255 - ramp) * 257, "Blue": ramp * 257}  # 16-bit entries
    for colour, lut in luts.items():
        ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
        ds.add_new(f"{colour}PaletteColorLookupTableData", "OW", lut.astype("<u2").tobytes())
    path = _save_native(pydicom, ds, arr, tmp_path / "palette.dcm", PhotometricInterpretation="PALETTE COLOR")
    x = arr.astype(np.float64)
    expected = (0.299 + 0.587) * (255 - x) / 255 + 0.114 * x / 255
    np.testing.assert_allclose(read_dicom(path).grey, expected, atol=1e-6)


@needs_data
def test_huge_frame_is_refused_before_decoding(pydicom: Any, tmp_path: Path) -> None:
    ds = pydicom.dcmread(RSNA_ONE)
    ds.Rows = ds.Columns = 40000  # 1.6 gigapixels claimed by a tiny JPEG
    ds.save_as(tmp_path / "bomb.dcm")
    with pytest.raises(ImageError, match=r"^image too large \(decompression-bomb guard\): 40000×40000 pixels"):
        decode(tmp_path / "bomb.dcm")


@needs_data
def test_deflated_transfer_syntax(pydicom: Any, tmp_path: Path) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds, arr = _load(pydicom, RSNA_ONE)
    path = _save_native(pydicom, ds, arr, tmp_path / "plain.dcm")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm")
    np.testing.assert_array_equal(read_dicom(tmp_path / "deflated.dcm").grey, read_dicom(path).grey)


# --- detection ------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("name", ["1.2.840.113619.2.55.3", "IMG0001"])
def test_dicm_marker_is_detected_without_a_dcm_extension(tmp_path: Path, name: str) -> None:
    target = tmp_path / name
    shutil.copyfile(RSNA_ONE, target)
    d = decode(target)  # the dispatch in preprocess, not read_dicom directly
    assert d.fields["modality"] == "CR"
    np.testing.assert_array_equal(d.grey, read_dicom(RSNA_ONE).grey)


@needs_data
def test_dataset_without_file_meta_is_read_by_extension(pydicom: Any, tmp_path: Path) -> None:
    """Bare datasets (no preamble, no ``DICM``) still decode when named ``.dcm``."""
    ds, arr = _load(pydicom, RSNA_ONE)
    plain = _save_native(pydicom, ds, arr, tmp_path / "plain.dcm")
    ds = pydicom.dcmread(plain)
    bare = tmp_path / "bare.dcm"
    ds.preamble = None
    del ds.file_meta
    ds.save_as(bare, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert bare.read_bytes()[128:132] != b"DICM"
    d = decode(bare)
    np.testing.assert_array_equal(d.grey, read_dicom(plain).grey)
    assert d.fields["sop_instance_uid"] == ds.SOPInstanceUID


def test_dcm_file_that_is_not_dicom_is_an_error_row(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    path = tmp_path / "photo.dcm"
    Image.new("L", (8, 8), 128).save(path, format="PNG")
    with pytest.raises(ImageError, match="not a valid DICOM file"):
        decode(path)


@needs_data
def test_dicom_without_pixel_data_is_an_error_row(pydicom: Any, tmp_path: Path) -> None:
    ds = pydicom.dcmread(RSNA_ONE)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(ImageError, match=r"^DICOM file has no pixel data$"):
        decode(tmp_path / "nopix.dcm")
    # and the same for a bare dataset (the dcmread fallback)
    ds.preamble = None
    del ds.file_meta
    ds.save_as(tmp_path / "bare.dcm", implicit_vr=True, little_endian=True, enforce_file_format=False)
    with pytest.raises(ImageError, match=r"^DICOM file has no pixel data$"):
        decode(tmp_path / "bare.dcm")


# --- missing dependencies and broken compression ----------------------------------------------------


def test_without_pydicom_dicom_files_get_the_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [m for m in sys.modules if m == "pydicom" or m.startswith("pydicom.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # also when it was never imported
    path = tmp_path / "x.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    with pytest.raises(ImageError) as info:
        decode(path)
    assert str(info.value) == 'DICOM input needs pydicom: pip install "cxr-batch[dicom]"'


@needs_data
def test_missing_plugin_names_the_package_to_install(pydicom: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pydicom's own JPEG 2000 decoder have no plugins, as on an install without them."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000

    decoder = get_decoder(JPEG2000)
    # remove_plugin() is pydicom's API; saving the registries lets monkeypatch restore them.
    monkeypatch.setattr(decoder, "_available", dict(decoder._available))
    monkeypatch.setattr(decoder, "_unavailable", dict(decoder._unavailable))
    for label in decoder.available_plugins:
        decoder.remove_plugin(label)
    assert not decoder.is_available
    with pytest.raises(ImageError) as info:
        decode(RG1_J2KI)
    message = str(info.value)
    assert message == (
        "DICOM pixel data is compressed as JPEG 2000 Image Compression and no installed plugin decodes it: "
        "pip install pylibjpeg pylibjpeg-openjpeg"
    )
    # the uncompressed file is unaffected
    assert decode(RG1_UNCI).grey.shape == (1955, 1841)


@needs_data
def test_unsupported_transfer_syntax_is_an_error_row(pydicom: Any, tmp_path: Path) -> None:
    ds = pydicom.dcmread(RSNA_ONE)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    ds.save_as(tmp_path / "mpeg.dcm")
    with pytest.raises(ImageError, match=r"^DICOM transfer syntax MPEG2 .* is not supported$"):
        decode(tmp_path / "mpeg.dcm")


@needs_data
def test_corrupt_compressed_pixel_data_is_an_error_row(pydicom: Any, tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(RG1_J2KI)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 300])
    ds.save_as(tmp_path / "broken.dcm")
    # 300 zero bytes after SIZ: a codestream of 0×0 pixels, refused before the decoder runs
    with pytest.raises(ImageError, match=r"^damaged JPEG 2000 pixel data: its codestream says the image is 0×0"):
        decode(tmp_path / "broken.dcm")


# --- protected health information -------------------------------------------------------------------


def _with_phi(pydicom: Any, src: Path, dst: Path, change: Callable[[Any], None] | None = None) -> Path:
    ds = pydicom.dcmread(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
        # An invalid date too: pydicom would warn with the value if it ever parsed it.
        ds.PatientBirthTime = "PHI-TIME-99"
    if change is not None:
        change(ds)
    ds.save_as(dst)
    return dst


def _assert_no_phi(*texts: str) -> None:
    blob = "\n".join(texts)
    for value in [*PHI.values(), "PHI-TIME-99", "Secretname", "Doe"]:
        assert value not in blob


@needs_data
def test_patient_data_never_reaches_fields_notes_or_logs(
    pydicom: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _with_phi(pydicom, RSNA_ONE, tmp_path / "phi.dcm", lambda ds: setattr(ds, "NumberOfFrames", 1))
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # making the file logged pydicom's own complaints about the values
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = decode(path)
    assert d.fields["modality"] == "CR"
    _assert_no_phi(
        repr(d.fields), repr(d.notes), repr(d.not_radiograph), caplog.text, *(str(w.message) for w in caught)
    )


@needs_data
@pytest.mark.parametrize("breakage", ["no pixels", "corrupt", "ct"])
def test_patient_data_never_reaches_error_messages(pydicom: Any, tmp_path: Path, breakage: str) -> None:
    from pydicom.encaps import encapsulate

    def change(ds: Any) -> None:
        if breakage == "no pixels":
            del ds.PixelData
        elif breakage == "corrupt":
            ds.PixelData = encapsulate([b"\xff\xd8\xff" + b"\x00" * 50])
        else:
            ds.Modality = "CT"

    path = _with_phi(pydicom, RSNA_ONE, tmp_path / "phi.dcm", change)
    if breakage == "ct":
        d = decode(path)
        _assert_no_phi(repr(d.fields), repr(d.notes), repr(d.not_radiograph))
        return
    with pytest.raises(ImageError) as info:
        decode(path)
    _assert_no_phi(str(info.value))


def _classify(runner: CliRunner, model: Path, folder: Path, out: Path) -> tuple[dict[str, dict[str, str]], Any]:
    """Run ``cxr-batch classify`` in-process; the report's rows by file name, and the result."""
    from cxr_batch.cli.main import main

    result = runner.invoke(main, ["classify", str(folder), "--model", str(model), "--out", str(out)])
    assert out.exists(), result.output
    with out.open(newline="", encoding="utf-8") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    return rows, result


@pytest.mark.slow
@needs_data
def test_classify_gives_monochrome1_and_inverted_monochrome2_the_same_probabilities(
    pydicom: Any, runner: CliRunner, tiny_onnx: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    ds, arr = _load(pydicom, RSNA_ONE)
    _save_native(pydicom, ds, arr, folder / "mono2.dcm")
    _save_native(pydicom, ds, 255 - arr, folder / "mono1.dcm", PhotometricInterpretation="MONOCHROME1")
    shutil.copyfile(RG1_UNCI, folder / "rg1-mono1.dcm")
    ds, arr = _load(pydicom, RG1_UNCI)
    _save_native(
        pydicom,
        ds,
        (32767 - arr.astype(np.int64)).astype(np.uint16),
        folder / "rg1-mono2.dcm",
        PhotometricInterpretation="MONOCHROME2",
        WindowCenter=32767 - 15000 + 1,
        WindowWidth=30000,
    )
    rows, result = _classify(runner, tiny_onnx, folder, tmp_path / "out.csv")
    assert result.exit_code == 0, result.output
    probs = {name: np.array([float(r[f"prob_{k}"]) for k in ("normal", "viral", "covid")]) for name, r in rows.items()}
    np.testing.assert_allclose(probs["mono1.dcm"], probs["mono2.dcm"], atol=1e-3)
    np.testing.assert_allclose(probs["rg1-mono1.dcm"], probs["rg1-mono2.dcm"], atol=1e-3)
    # the two pictures differ, so equal probabilities are not an accident of the model
    assert np.abs(probs["mono1.dcm"] - probs["rg1-mono1.dcm"]).max() > 1e-3
    assert rows["rg1-mono1.dcm"]["modality"] == "CR" and rows["rg1-mono1.dcm"]["view_position"] == "PA"


@needs_data
def test_patient_data_never_reaches_the_classify_report(
    pydicom: Any, runner: CliRunner, tiny_onnx: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _with_phi(pydicom, RSNA_ONE, folder / "ok.dcm")
    _with_phi(pydicom, RSNA_ONE, folder / "nopix.dcm", lambda ds: delattr(ds, "PixelData"))
    _with_phi(pydicom, RSNA_ONE, folder / "ct.dcm", lambda ds: setattr(ds, "Modality", "CT"))
    _with_phi(pydicom, RSNA_ONE, folder / "IMG0001", lambda ds: setattr(ds, "ViewPosition", "AP"))
    out = tmp_path / "out.csv"
    rows, result = _classify(runner, tiny_onnx, folder, out)
    assert result.exit_code == 3, result.output  # finished, with error rows
    header = pydicom.dcmread(RSNA_ONE, stop_before_pixels=True)
    assert rows["ok.dcm"]["status"] == "ok"
    assert rows["ok.dcm"]["sop_instance_uid"] == header.SOPInstanceUID
    assert rows["ok.dcm"]["study_instance_uid"] == header.StudyInstanceUID
    assert (rows["IMG0001"]["status"], rows["IMG0001"]["view_position"]) == ("ok", "AP")
    assert rows["nopix.dcm"]["error"] == "DICOM file has no pixel data"
    # a CT is classified, but flagged out of distribution from its header, and says why
    assert (rows["ct.dcm"]["status"], rows["ct.dcm"]["in_distribution"]) == ("ok", "false")
    assert "DICOM modality CT" in rows["ct.dcm"]["notes"]
    _assert_no_phi(out.read_text(encoding="utf-8"), result.stdout, result.stderr)
