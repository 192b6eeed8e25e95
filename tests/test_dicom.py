"""read_dicom: exact pixel values for the photometric / rescale paths, one-line rejections for bad files."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_helpers import write_dicom
from pydicom.dataset import Dataset

from mdmt.data.dicom import read_dicom, read_image
from mdmt.errors import DicomRejected

KNOWN = np.array([[0, 100, 200], [300, 400, 1000]], dtype=np.uint16)


def test_monochrome2_as_stored(tmp_path):
    img, meta = read_dicom(write_dicom(tmp_path / "a.dcm", KNOWN))
    assert img.dtype == np.float32 and img.shape == (2, 3)
    np.testing.assert_array_equal(img, KNOWN.astype(np.float32))
    assert meta["photometric"] == "MONOCHROME2" and not meta["inverted"]
    assert meta["rows"] == 2 and meta["cols"] == 3 and meta["bits_stored"] == 12
    assert meta["manufacturer"] == "TESTCO" and meta["modality"] == "CR"
    assert meta["transfer_syntax"] == "Explicit VR Little Endian"


def test_monochrome1_inverted_within_image_range(tmp_path):
    img, meta = read_dicom(write_dicom(tmp_path / "m1.dcm", KNOWN, "MONOCHROME1"))
    # min + max - value, with min 0 and max 1000
    expected = np.array([[1000, 900, 800], [700, 600, 0]], dtype=np.float32)
    np.testing.assert_array_equal(img, expected)
    assert meta["photometric"] == "MONOCHROME1" and meta["inverted"]


def test_rescale_slope_intercept(tmp_path):
    path = write_dicom(tmp_path / "r.dcm", KNOWN, RescaleSlope=2, RescaleIntercept=-1024)
    img, meta = read_dicom(path)
    expected = np.array([[-1024, -824, -624], [-424, -224, 976]], dtype=np.float32)
    np.testing.assert_array_equal(img, expected)
    assert meta["rescale_slope"] == 2.0 and meta["rescale_intercept"] == -1024.0


def test_monochrome1_with_rescale(tmp_path):
    path = write_dicom(tmp_path / "mr.dcm", KNOWN, "MONOCHROME1", RescaleSlope=2, RescaleIntercept=-1024)
    img, _ = read_dicom(path)
    # rescaled: [[-1024, -824, -624], [-424, -224, 976]]; min + max = -48; inverted = -48 - value
    expected = np.array([[976, 776, 576], [376, 176, -1024]], dtype=np.float32)
    np.testing.assert_array_equal(img, expected)


def test_rgb_averaged_to_grey(tmp_path):
    rgb = np.array([[[0, 0, 0], [30, 60, 90], [255, 255, 255]], [[3, 0, 0], [10, 20, 0], [1, 2, 3]]], dtype=np.uint8)
    img, meta = read_dicom(write_dicom(tmp_path / "rgb.dcm", rgb, "RGB"))
    expected = np.array([[0, 60, 255], [1, 10, 2]], dtype=np.float32)
    np.testing.assert_array_equal(img, expected)
    assert meta["photometric"] == "RGB"


def test_ybr_full_converted_then_averaged(tmp_path):
    # Grey YBR pixels (Cb = Cr = 128) convert to R = G = B = Y
    ybr = np.zeros((2, 2, 3), dtype=np.uint8)
    ybr[..., 0] = [[10, 50], [100, 200]]
    ybr[..., 1:] = 128
    img, meta = read_dicom(write_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL"))
    np.testing.assert_allclose(img, [[10, 50], [100, 200]], atol=1)
    assert meta["photometric"] == "YBR_FULL"


def _reason(path) -> str:
    with pytest.raises(DicomRejected) as err:
        read_dicom(path)
    reason = str(err.value)
    assert reason and "\n" not in reason
    return reason


def test_truncated_file_rejected(tmp_path):
    good = write_dicom(tmp_path / "good.dcm", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    data = good.read_bytes()
    cut_pixels = tmp_path / "cut_pixels.dcm"
    cut_pixels.write_bytes(data[: len(data) - 1000])
    assert "truncated" in _reason(cut_pixels)
    cut_header = tmp_path / "cut_header.dcm"
    cut_header.write_bytes(data[:200])
    assert "truncated" in _reason(cut_header)


def test_empty_file_rejected(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    assert _reason(path) == "empty file"


def test_text_file_rejected(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("patient,outcome\nP_1,MILD\n")
    assert "not a DICOM file" in _reason(path)


def test_missing_file_rejected(tmp_path):
    assert _reason(tmp_path / "nowhere.dcm") == "file not found"


def test_no_pixel_data_rejected(tmp_path):
    path = write_dicom(tmp_path / "np.dcm", KNOWN)
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    assert _reason(path) == "no pixel data"


def test_multi_frame_rejected(tmp_path):
    frames = np.zeros((3, 8, 8), dtype=np.uint16)
    path = write_dicom(tmp_path / "mf.dcm", frames)
    assert _reason(path) == "multi-frame image (NumberOfFrames=3)"


def test_unsupported_photometric_rejected(tmp_path):
    path = write_dicom(tmp_path / "pal.dcm", KNOWN)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "HSV"
    ds.save_as(path, enforce_file_format=True)
    assert _reason(path) == "unsupported photometric interpretation HSV"


def test_read_image_png(tmp_path):
    from PIL import Image

    arr = np.array([[0, 10], [200, 255]], dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    img, meta = read_image(tmp_path / "x.png")
    np.testing.assert_array_equal(img, arr.astype(np.float32))
    # read_image sends everything that is not PNG/JPEG/TIFF to read_dicom
    img2, _ = read_image(write_dicom(tmp_path / "d.dcm", KNOWN, "MONOCHROME1"))
    assert img2[0, 0] == 1000


# ---- VOI LUT / windowing --------------------------------------------------------------------------

from dicom_helpers import (  # noqa: E402
    jpeg_bytes,
    pydicom_test_file,
    write_dicom_as,
    write_dicomdir,
    write_jpeg_baseline_dicom,
    write_non_image,
)
from pydicom import uid as _uid  # noqa: E402


def test_voi_none_is_the_default(tmp_path):
    path = write_dicom(tmp_path / "w.dcm", KNOWN, WindowCenter=500.5, WindowWidth=1001)
    img, meta = read_dicom(path)
    np.testing.assert_array_equal(img, KNOWN.astype(np.float32))
    assert meta["voi"] == "none"


def test_voi_auto_window_exact_first_of_several(tmp_path):
    # LINEAR window (PS3.3 C.11.2.1.2.1), BitsStored 12 -> output 0..4095; c = 500.5 - 0.5, w = 1001 - 1:
    # x <= 0 -> 0; x > 1000 -> 4095; else ((x - 500) / 1000 + 0.5) * 4095 = 4.095 x
    path = write_dicom(tmp_path / "w.dcm", KNOWN, WindowCenter=[500.5, 50], WindowWidth=[1001, 10])
    img, meta = read_dicom(path, voi="auto")
    expected = np.array([[0, 409.5, 819], [1228.5, 1638, 4095]], dtype=np.float32)
    np.testing.assert_array_equal(img, expected)
    assert meta["voi"] == "window"
    # a file without VOI data is left alone in "auto"
    img, meta = read_dicom(write_dicom(tmp_path / "plain.dcm", KNOWN), voi="auto")
    np.testing.assert_array_equal(img, KNOWN.astype(np.float32))
    assert meta["voi"] == "none"


def test_voi_after_rescale_then_monochrome1_inversion(tmp_path):
    # rescale first: [-1024, -824, -624, -424, -224, 976]; output range 0*2-1024 .. 4095*2-1024 (8190 wide)
    # window c = 0, w = 1000: x <= -500 -> -1024; x > 500 -> 7166; else (x / 1000 + 0.5) * 8190 - 1024
    path = write_dicom(
        tmp_path / "r.dcm", KNOWN, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=0.5, WindowWidth=1001
    )
    img, _ = read_dicom(path, voi="auto")
    expected = np.array([[-1024, -1024, -1024], [-401.56, 1236.44, 7166]], dtype=np.float32)
    np.testing.assert_array_equal(img, expected)
    # MONOCHROME1: windowed values [0, 409.5, 819, 1228.5, 1638, 4095], then min + max - value
    path = write_dicom(tmp_path / "m1.dcm", KNOWN, "MONOCHROME1", WindowCenter=500.5, WindowWidth=1001)
    img, meta = read_dicom(path, voi="auto")
    expected = np.array([[4095, 3685.5, 3276], [2866.5, 2457, 0]], dtype=np.float32)
    np.testing.assert_array_equal(img, expected)
    assert meta["inverted"] and meta["voi"] == "window"


def test_voi_lut_sequence_preferred_and_exact(tmp_path):
    from pydicom.sequence import Sequence

    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 8])  # 4096 entries of 8 bits (longer than 256)
    item.add_new("LUTData", "US", [i // 16 for i in range(4096)])
    path = write_dicom(tmp_path / "lut.dcm", KNOWN, VOILUTSequence=Sequence([item]), WindowCenter=10, WindowWidth=10)
    img, meta = read_dicom(path, voi="auto")
    np.testing.assert_array_equal(img, np.array([[0, 6, 12], [18, 25, 62]], dtype=np.float32))
    assert meta["voi"] == "lut"


def test_voi_invalid_window_is_ignored_not_rejected(tmp_path):
    path = write_dicom(tmp_path / "bad.dcm", KNOWN, WindowCenter=10, WindowWidth=0)
    img, meta = read_dicom(path, voi="auto")
    np.testing.assert_array_equal(img, KNOWN.astype(np.float32))
    assert meta["voi"].startswith("ignored (") and "\n" not in meta["voi"]


def test_unknown_voi_mode():
    with pytest.raises(ValueError, match="VOI"):
        read_dicom("x.dcm", voi="window")


# ---- transfer syntaxes and pixel representations -------------------------------------------------

SIGNED = np.array([[-1000, -1, 0], [1, 2047, -2048]], dtype=np.int16)


@pytest.mark.parametrize(
    "ts",
    [_uid.ImplicitVRLittleEndian, _uid.ExplicitVRBigEndian, _uid.DeflatedExplicitVRLittleEndian],
    ids=["implicit-le", "explicit-be", "deflated"],
)
def test_native_transfer_syntaxes_exact(tmp_path, ts):
    img, meta = read_dicom(write_dicom_as(tmp_path / "u.dcm", KNOWN, ts))
    np.testing.assert_array_equal(img, KNOWN.astype(np.float32))
    assert meta["transfer_syntax"] == ts.name
    path = write_dicom_as(tmp_path / "s.dcm", SIGNED, ts, RescaleSlope=2, RescaleIntercept=-10)
    img, meta = read_dicom(path)
    np.testing.assert_array_equal(img, SIGNED.astype(np.float32) * 2 - 10)
    assert meta["pixel_representation"] == 1


def test_big_endian_rgb_and_monochrome1(tmp_path):
    img, _ = read_dicom(write_dicom_as(tmp_path / "m1.dcm", KNOWN, _uid.ExplicitVRBigEndian, "MONOCHROME1"))
    np.testing.assert_array_equal(img, np.array([[1000, 900, 800], [700, 600, 0]], dtype=np.float32))
    rgb = np.array([[[0, 30, 60], [255, 255, 255]]], dtype=np.uint8)
    img, _ = read_dicom(write_dicom_as(tmp_path / "rgb.dcm", rgb, _uid.ExplicitVRBigEndian, "RGB"))
    np.testing.assert_array_equal(img, np.array([[30, 255]], dtype=np.float32))


def test_signed_pixel_data_with_rescale_exact(tmp_path):
    path = write_dicom(tmp_path / "s.dcm", SIGNED, RescaleSlope=0.5, RescaleIntercept=100)
    img, meta = read_dicom(path)
    expected = np.array([[-400, 99.5, 100], [100.5, 1123.5, -924]], dtype=np.float32)
    np.testing.assert_array_equal(img, expected)
    assert meta["pixel_representation"] == 1 and meta["bits_stored"] == 16
    # signed MONOCHROME1: inverted within the image's own range after rescale
    img, _ = read_dicom(write_dicom(tmp_path / "s1.dcm", SIGNED, "MONOCHROME1"))
    np.testing.assert_array_equal(img, (-2048 + 2047 - SIGNED.astype(np.float32)))


BIG = (np.arange(64 * 64).reshape(64, 64) * 7 % 4096).astype(np.uint16)  # JPEG 2000 needs >= ~32 px


def _encoder_available(ts) -> bool:
    from pydicom.pixels import get_encoder

    try:
        return get_encoder(ts).is_available
    except NotImplementedError:
        return False


def test_rle_lossless_exact(tmp_path):
    img, meta = read_dicom(write_dicom_as(tmp_path / "rle.dcm", BIG, _uid.RLELossless))
    np.testing.assert_array_equal(img, BIG.astype(np.float32))
    assert meta["transfer_syntax"] == "RLE Lossless"
    signed = (BIG.astype(np.int32) - 2048).astype(np.int16)
    img, _ = read_dicom(
        write_dicom_as(tmp_path / "rles.dcm", signed, _uid.RLELossless, RescaleSlope=2, RescaleIntercept=1)
    )
    np.testing.assert_array_equal(img, signed.astype(np.float32) * 2 + 1)
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img, _ = read_dicom(write_dicom_as(tmp_path / "rgb.dcm", rgb, _uid.RLELossless, "RGB"))
    np.testing.assert_array_equal(img, rgb.astype(np.float64).mean(axis=-1).astype(np.float32))


@pytest.mark.skipif(not _encoder_available(_uid.JPEG2000Lossless), reason="no JPEG 2000 encoder (pylibjpeg-openjpeg)")
def test_jpeg2000_lossless_exact(tmp_path):
    img, meta = read_dicom(write_dicom_as(tmp_path / "j2k.dcm", BIG, _uid.JPEG2000Lossless))
    np.testing.assert_array_equal(img, BIG.astype(np.float32))
    assert meta["transfer_syntax"] == _uid.JPEG2000Lossless.name
    signed = (BIG.astype(np.int32) - 2048).astype(np.int16)
    img, _ = read_dicom(write_dicom_as(tmp_path / "j2ks.dcm", signed, _uid.JPEG2000Lossless, "MONOCHROME1"))
    np.testing.assert_array_equal(img, float(signed.min()) + float(signed.max()) - signed.astype(np.float32))


def test_jpeg_baseline_decoded_like_pillow(tmp_path):
    import io

    from PIL import Image

    arr8 = (np.add.outer(np.arange(48), np.arange(48)) * 2.5).astype(np.uint8)
    img, meta = read_dicom(write_jpeg_baseline_dicom(tmp_path / "jpg.dcm", arr8))
    assert meta["transfer_syntax"] == _uid.JPEGBaseline8Bit.name and img.shape == (48, 48)
    ref = np.asarray(Image.open(io.BytesIO(jpeg_bytes(arr8))), dtype=np.float32)
    assert np.abs(img - ref).max() <= 2  # lossy: another JPEG library may round the IDCT differently
    assert np.abs(img - arr8).max() <= 8


def _decoder_available(ts) -> bool:
    from pydicom.pixels import get_decoder

    return get_decoder(ts).is_available


def _no_decoder(ts) -> str:
    return f"no decoder installed for transfer syntax {ts.name}; install the 'jpeg' extra"


def test_jpeg_ls_lossless_or_one_line_rejection():
    path, ref = pydicom_test_file("MR_small_jpeg_ls_lossless.dcm"), pydicom_test_file("MR_small.dcm")
    if path is None or ref is None:
        pytest.skip("pydicom's bundled test files are not installed")
    if _decoder_available(_uid.JPEGLSLossless):  # pylibjpeg-libjpeg (GPL-3, optional) or pyjpegls
        img, meta = read_dicom(path)
        expected, _ = read_dicom(ref)
        np.testing.assert_array_equal(img, expected)
        assert meta["transfer_syntax"] == _uid.JPEGLSLossless.name
    else:
        reason = _reason(path)
        assert reason.startswith(_no_decoder(_uid.JPEGLSLossless)) and "pylibjpeg-libjpeg" in reason


def test_jpeg_ls_encoded_by_pyjpegls(tmp_path):
    pytest.importorskip("jpeg_ls", reason="pyjpegls (JPEG-LS encoder) is not installed")
    if not (_encoder_available(_uid.JPEGLSLossless) and _decoder_available(_uid.JPEGLSLossless)):
        pytest.skip("no JPEG-LS encoder/decoder pair installed")
    img, _ = read_dicom(write_dicom_as(tmp_path / "jls.dcm", BIG, _uid.JPEGLSLossless))
    np.testing.assert_array_equal(img, BIG.astype(np.float32))


def test_jpeg_lossless_sv1_or_one_line_rejection():
    path, ref = pydicom_test_file("SC_rgb_jpeg_gdcm.dcm"), pydicom_test_file("SC_rgb_rle.dcm")
    if path is None or ref is None:
        pytest.skip("pydicom's bundled test files are not installed")
    if _decoder_available(_uid.JPEGLosslessSV1):
        img, _ = read_dicom(path)
        expected, _ = read_dicom(ref)  # the same RGB image, RLE-coded
        np.testing.assert_array_equal(img, expected)
    else:
        assert _reason(path).startswith(_no_decoder(_uid.JPEGLosslessSV1))


def test_jpeg_extended_12_bit_needs_libjpeg():
    path = pydicom_test_file("JPGExtended.dcm")
    if path is None:
        pytest.skip("pydicom's bundled test files are not installed")
    import importlib.util

    if importlib.util.find_spec("libjpeg") is not None:
        img, meta = read_dicom(path)
        assert img.shape == (1024, 256) and meta["bits_stored"] == 12
    else:  # Pillow reads only 8-bit JPEG: the reason names the extra that would decode it
        reason = _reason(path)
        assert reason.startswith("cannot decode pixel data (JPEG Extended") and "'jpeg' extra" in reason


def test_no_decoder_installed_is_one_line(tmp_path, monkeypatch):
    from pydicom.pixels.decoders.base import Decoder

    path = write_dicom_as(tmp_path / "rle.dcm", BIG, _uid.RLELossless)
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    reason = _reason(path)
    assert reason == (
        "no decoder installed for transfer syntax RLE Lossless; install the 'jpeg' extra "
        "(pip install 'mdmt-federation[jpeg]': pylibjpeg + pylibjpeg-rle, MIT)"
    )


# ---- objects that are not (single) images ----------------------------------------------------------


def test_non_image_objects_rejected_with_reason(tmp_path):
    sr = write_non_image(tmp_path / "sr.dcm", _uid.BasicTextSRStorage)
    assert _reason(sr) == "no pixel data (Basic Text SR Storage object, not an image)"
    pr = write_non_image(tmp_path / "pr.dcm", _uid.GrayscaleSoftcopyPresentationStateStorage)
    assert _reason(pr) == "no pixel data (Grayscale Softcopy Presentation State Storage object, not an image)"
    (tmp_path / "media").mkdir()
    dicomdir = write_dicomdir(tmp_path / "media", write_dicom(tmp_path / "x.dcm", KNOWN))
    assert _reason(dicomdir) == "DICOMDIR (a media directory index, not an image)"


def test_random_bytes_rejected(tmp_path):
    path = tmp_path / "noise.dcm"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    reason = _reason(path)
    assert "not a DICOM file" in reason or "unreadable" in reason


def test_read_image_goes_by_content_not_extension(tmp_path):
    from PIL import Image

    arr = np.array([[0, 10], [200, 255]], dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    (tmp_path / "x.png").rename(tmp_path / "png_named.dcm")
    img, meta = read_image(tmp_path / "png_named.dcm")
    np.testing.assert_array_equal(img, arr.astype(np.float32))
    path = write_dicom(tmp_path / "dicom_named.png", KNOWN, WindowCenter=500.5, WindowWidth=1001)
    img, meta = read_image(path, voi="auto")
    assert meta["voi"] == "window" and img[1, 2] == 4095
