"""A folder of odd DICOM objects ingested as one site: nothing crashes, and every manifest row ends up
either in the cache or in rejected.csv with its reason."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicom_helpers import (
    pydicom_test_file,
    write_dicom,
    write_dicom_as,
    write_dicomdir,
    write_jpeg_baseline_dicom,
    write_non_image,
)
from pydicom import uid

from mdmt.data.cache import load_site
from mdmt.data.ingest import ingest_site
from mdmt.data.manifest import read_rejected

SIZE = 32


def _chest(h, w, dtype=np.uint16, top=4000, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w), 0.05)
    img[((yy - h * 0.55) / (h * 0.48)) ** 2 + ((xx - w / 2) / (w * 0.42)) ** 2 <= 1] = 0.75
    for cx in (0.33, 0.67):
        img[((yy - h * 0.5) / (h * 0.25)) ** 2 + ((xx - w * cx) / (w * 0.12)) ** 2 <= 1] = 0.3
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    return (img * top).astype(dtype)


def _encoder_available(ts) -> bool:
    from pydicom.pixels import get_encoder

    try:
        return get_encoder(ts).is_available
    except NotImplementedError:
        return False


def _decoder_available(ts) -> bool:
    from pydicom.pixels import get_decoder

    return get_decoder(ts).is_available


def build_odd_site(site):
    """Writes the odd objects; returns (good images, {bad image: expected text in its reason}, rows)."""
    d = site / "odd"
    d.mkdir(parents=True)
    good: list[str] = []
    bad: dict[str, str] = {}
    c16 = _chest(96, 96)

    def ok(name):
        good.append(f"odd/{name}")

    write_dicom(d / "mono2_16bit.dcm", _chest(96, 96, top=60000), bits_stored=16)
    ok("mono2_16bit.dcm")
    write_dicom(d / "mono2_8bit.dcm", _chest(96, 96, np.uint8, 250), bits_stored=8)
    ok("mono2_8bit.dcm")
    write_dicom(d / "mono1_window.dcm", 4095 - c16, "MONOCHROME1", WindowCenter=[2000, 1000], WindowWidth=[3000, 500])
    ok("mono1_window.dcm")
    rgb = np.repeat(_chest(64, 80, np.uint8, 250)[..., None], 3, axis=-1)
    write_dicom(d / "rgb.dcm", rgb, "RGB")
    ok("rgb.dcm")
    ybr = np.zeros((64, 80, 3), np.uint8)
    ybr[..., 0], ybr[..., 1:] = _chest(64, 80, np.uint8, 250), 128
    write_dicom(d / "ybr_full.dcm", ybr, "YBR_FULL")
    ok("ybr_full.dcm")
    write_dicom(d / "tiny_1x1.dcm", np.array([[7]], np.uint16))
    ok("tiny_1x1.dcm")
    write_dicom(d / "huge_2000x1500.dcm", _chest(2000, 1500))
    ok("huge_2000x1500.dcm")
    write_dicom_as(d / "implicit_le.dcm", c16, uid.ImplicitVRLittleEndian)
    ok("implicit_le.dcm")
    write_dicom_as(d / "big_endian.dcm", c16, uid.ExplicitVRBigEndian)
    ok("big_endian.dcm")
    write_dicom(
        d / "signed_rescale.dcm", (c16.astype(np.int32) - 2048).astype(np.int16), RescaleSlope=2, RescaleIntercept=-1024
    )
    ok("signed_rescale.dcm")
    write_dicom_as(d / "rle.dcm", c16, uid.RLELossless)
    ok("rle.dcm")
    if _encoder_available(uid.JPEG2000Lossless):
        write_dicom_as(d / "j2k_lossless.dcm", c16, uid.JPEG2000Lossless)
        ok("j2k_lossless.dcm")
    write_jpeg_baseline_dicom(d / "jpeg_baseline.dcm", _chest(64, 64, np.uint8, 250))
    ok("jpeg_baseline.dcm")
    jls = pydicom_test_file("MR_small_jpeg_ls_lossless.dcm")
    if jls is not None:
        shutil.copy(jls, d / "jpeg_ls.dcm")
        if _decoder_available(uid.JPEGLSLossless):
            ok("jpeg_ls.dcm")
        else:
            bad["odd/jpeg_ls.dcm"] = (
                "no decoder installed for transfer syntax JPEG-LS Lossless Image Compression; install the 'jpeg' extra"
            )
    write_dicom(d / "dicom_named.png", c16)  # a DICOM file with the wrong extension
    ok("dicom_named.png")
    write_dicom(d / "no_extension", c16)
    ok("no_extension")
    from PIL import Image

    Image.fromarray(_chest(64, 64, np.uint8, 250)).save(d / "x.png")
    (d / "x.png").rename(d / "png_named.dcm")  # a PNG with a DICOM name
    ok("png_named.dcm")
    ds = pydicom.dcmread(write_dicom(d / "tmp.dcm", c16))
    pydicom.dcmwrite(d / "no_preamble.dcm", ds, implicit_vr=False, little_endian=True, force_encoding=True)
    (d / "tmp.dcm").unlink()
    ok("no_preamble.dcm")

    (d / "zero.dcm").write_bytes(b"")
    bad["odd/zero.dcm"] = "empty file"
    (d / "random.dcm").write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    bad["odd/random.dcm"] = "not a DICOM file"
    (d / "notes.txt").write_text("not an image\n")
    bad["odd/notes.txt"] = "not a DICOM file"
    data = write_dicom(d / "cut.dcm", c16).read_bytes()
    (d / "cut.dcm").write_bytes(data[: len(data) - 5000])
    bad["odd/cut.dcm"] = "truncated file: pixel data incomplete"
    write_dicom(d / "multi.dcm", np.zeros((3, 16, 16), np.uint16))
    bad["odd/multi.dcm"] = "multi-frame image (NumberOfFrames=3)"
    write_non_image(d / "sr.dcm", uid.BasicTextSRStorage)
    bad["odd/sr.dcm"] = "no pixel data (Basic Text SR Storage object, not an image)"
    write_non_image(d / "pr.dcm", uid.GrayscaleSoftcopyPresentationStateStorage)
    bad["odd/pr.dcm"] = "no pixel data (Grayscale Softcopy Presentation State Storage object"
    (d / "media").mkdir()
    write_dicomdir(d / "media", write_dicom(d / "media_src.dcm", c16))
    (d / "media_src.dcm").unlink()
    bad["odd/media/DICOMDIR"] = "DICOMDIR (a media directory index, not an image)"
    pal = pydicom.dcmread(write_dicom(d / "palette.dcm", c16))
    pal.PhotometricInterpretation = "HSV"
    pal.save_as(d / "palette.dcm", enforce_file_format=True)
    bad["odd/palette.dcm"] = "unsupported photometric interpretation HSV"
    (d / "a_folder.dcm").mkdir()
    bad["odd/a_folder.dcm"] = "not a regular file"
    bad["odd/missing.dcm"] = "file not found"
    write_dicom(d / "unlabelled.dcm", c16)
    bad["odd/unlabelled.dcm"] = "no label"

    rows = []
    for k, image in enumerate(good + list(bad)):
        unl = image == "odd/unlabelled.dcm"
        rows.append((image, f"P{k}", "" if unl else ("MILD", "SEVERE")[k % 2], "" if unl or k % 3 else "012321", ""))
    pd.DataFrame(rows, columns=["image", "patient_id", "prognosis", "brixia", "split"]).to_csv(
        site / "manifest.csv", index=False
    )
    return good, bad, rows


@pytest.mark.parametrize("voi, workers", [("none", 2), ("auto", 1)])
def test_odd_folder_every_row_cached_or_rejected(tmp_path, voi, workers):
    site = tmp_path / "oddsite"
    good, bad, rows = build_odd_site(site)
    s = ingest_site(site, tmp_path / "cache", image_size=SIZE, workers=workers, voi=voi, progress=False)
    assert s["cached"] + s["rejected"] == len(rows)
    data = load_site(site, tmp_path / "cache", SIZE, voi=voi)
    rej = read_rejected(site)
    assert len(data.table) == s["cached"] == len(data.images) and len(rej) == s["rejected"]
    assert sorted(list(data.table["image"]) + list(rej["source"])) == sorted(r[0] for r in rows)
    assert list(data.table["image"]) == good
    reasons = dict(zip(rej["source"], rej["reason"]))
    assert set(reasons) == set(bad)
    for image, expected in bad.items():
        assert expected in reasons[image], (image, reasons[image])
        assert "\n" not in reasons[image] and len(reasons[image]) <= 300
    assert data.images.dtype == np.uint8 and data.images.shape[1:] == (SIZE, SIZE)
    tiny = list(data.table["image"]).index("odd/tiny_1x1.dcm")
    assert data.table["crop_fallback"].iat[tiny] == 1 and data.table["crop_note"].iat[tiny]

    again = ingest_site(site, tmp_path / "cache", image_size=SIZE, workers=workers, voi=voi, progress=False)
    assert again["reused"] and again["decoded"] == 0
