"""read_dicom: exact pixel values for the photometric / rescale paths, one-line rejections for bad files."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from shared.data.dicom import read_dicom, read_image
from shared.errors import DicomRejected
from dicom_helpers import write_dicom


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
    rgb = np.array(
        [[[0, 0, 0], [30, 60, 90], [255, 255, 255]], [[3, 0, 0], [10, 20, 0], [1, 2, 3]]], dtype=np.uint8
    )
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
