"""Ingestion into the uint8 cache, rejected.csv, cache reuse/rebuild, read-only sites, preprocessing."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pandas as pd
import pytest
from dicom_helpers import write_dicom

from mdmt.data import cache as cache_mod
from mdmt.data import ingest as ingest_mod
from mdmt.data import worker as worker_mod
from mdmt.data.cache import cache_dir_for, load_site
from mdmt.data.ingest import ingest_and_load_site, ingest_federation, ingest_site
from mdmt.data.manifest import read_rejected, write_rejected
from mdmt.data.options import CROP_MODES
from mdmt.data.preprocess import preprocess, preprocess_with_info
from mdmt.data.records import Journal
from mdmt.errors import DataError

SIZE = 64


def chest(h=96, w=96, seed=0, noise=0.03):
    """Chest-like image: dark air, a bright elliptic body, two dark elliptic lungs. Returns (img, lung masks)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.full((h, w), 0.05)
    body = ((yy - h * 0.55) / (h * 0.48)) ** 2 + ((xx - w / 2) / (w * 0.42)) ** 2 <= 1
    img[body] = 0.75
    lungs = []
    for cx in (0.33, 0.67):
        m = ((yy - h * 0.5) / (h * 0.25)) ** 2 + ((xx - w * cx) / (w * 0.12)) ** 2 <= 1
        img[m] = 0.3
        lungs.append(m)
    img = img + rng.normal(0, noise, img.shape)
    return np.clip(img * 4000, 0, 4095).astype(np.uint16), lungs


ROWS = [  # image, patient_id, prognosis, brixia, split
    ("imgs/a.dcm", "P1", "MILD", "", ""),
    ("imgs/b.dcm", "P2", "SEVERE", "", ""),
    ("imgs/c.dcm", "P3", "", "001223", ""),
    ("imgs/d.dcm", "P3", "", "333333", "test"),
    ("imgs/e.dcm", "P4", "MILD", "000000", ""),
    ("imgs/bad.dcm", "P5", "SEVERE", "", ""),  # truncated
    ("imgs/gone.dcm", "P6", "MILD", "", ""),  # missing
    ("imgs/f.dcm", "P7", "", "", ""),  # unlabelled
]
GOOD = ["imgs/a.dcm", "imgs/b.dcm", "imgs/c.dcm", "imgs/d.dcm", "imgs/e.dcm"]
BAD = {"imgs/bad.dcm": "truncated", "imgs/gone.dcm": "file not found", "imgs/f.dcm": "no label"}


def write_manifest_rows(site, rows):
    pd.DataFrame(rows, columns=["image", "patient_id", "prognosis", "brixia", "split"]).to_csv(
        site / "manifest.csv", index=False
    )


def make_site(root, name="hospA", rows=ROWS):
    site = root / name
    (site / "imgs").mkdir(parents=True)
    for k, (image, *_rest) in enumerate(rows):
        if image == "imgs/gone.dcm":
            continue
        arr, _ = chest(seed=k)
        write_dicom(site / image, arr, "MONOCHROME1" if k % 2 else "MONOCHROME2")
    data = (site / "imgs/bad.dcm").read_bytes() if (site / "imgs/bad.dcm").exists() else None
    if data is not None:
        (site / "imgs/bad.dcm").write_bytes(data[: len(data) // 2])
    write_manifest_rows(site, rows)
    return site


@pytest.fixture
def site(tmp_path):
    return make_site(tmp_path / "fed")


def test_ingest_caches_good_and_lists_rejected(site, tmp_path):
    cache_root = tmp_path / "cache"
    s = ingest_site(site, cache_root, image_size=SIZE, progress=False)
    assert (s["site"], s["cached"], s["rejected"], s["reused"]) == ("hospA", 5, 3, False)
    cdir = cache_dir_for(site, cache_root, SIZE, "lung")
    assert s["cache_dir"] == str(cdir) and cdir.parent.name.startswith("hospA-")
    assert cdir.name == f"s{SIZE}-lung-v{cache_mod.CACHE_VERSION}"
    images = np.load(cdir / "images.npy", mmap_mode="r")
    assert images.shape == (5, SIZE, SIZE) and images.dtype == np.uint8
    index = pd.read_csv(cdir / "index.csv", dtype=str, keep_default_na=False)
    assert list(index["image"]) == GOOD
    meta = json.loads((cdir / "meta.json").read_text())
    assert meta["counts"] == {"manifest_rows": 8, "cached": 5, "rejected": 3}
    assert meta["image_size"] == SIZE and meta["crop"] == "lung"

    rej = read_rejected(site)
    assert list(rej["source"]) == list(BAD) and set(rej["stage"]) == {"ingest"}
    for src, reason in zip(rej["source"], rej["reason"]):
        assert BAD[src] in reason and "\n" not in reason
    assert s["rejected_file"] == str(site / "rejected.csv") and not s["rejected_in_cache_dir"]
    # a copy of the list lives in the cache
    assert list(pd.read_csv(cdir / "rejected.csv")["source"]) == list(BAD)

    data = load_site(site, cache_root, SIZE, "lung")
    assert data.role == "both" and data.images.shape == (5, SIZE, SIZE)
    assert list(data.table["y_prog"]) == [0, 1, -1, -1, 0]
    assert list(data.table["y_sev"]) == [-1, -1, 1, 3, 0]  # 001223 -> 8 -> class 1; 333333 -> 18 -> 3
    assert list(data.table["split"]) == ["", "", "", "test", ""]
    np.testing.assert_array_equal(np.asarray(data.images), images)


def test_reuse_rebuild_and_other_stages_kept(site, tmp_path):
    cache_root = tmp_path / "cache"
    write_rejected(site, "import", [("AIforCOVID.xlsx:row 9", "no image file")])
    first = ingest_site(site, cache_root, image_size=SIZE, progress=False)
    assert not first["reused"]
    second = ingest_site(site, cache_root, image_size=SIZE, progress=False)
    assert second["reused"] and second["cached"] == 5 and second["rejected"] == 3
    rej = read_rejected(site)
    assert sorted(rej["stage"]) == ["import", "ingest", "ingest", "ingest"]

    # editing the manifest (drop the unlabelled row, relabel one) triggers a rebuild
    rows = [r for r in ROWS if r[0] != "imgs/f.dcm"]
    rows[0] = ("imgs/a.dcm", "P1", "SEVERE", "", "")
    write_manifest_rows(site, rows)
    third = ingest_site(site, cache_root, image_size=SIZE, progress=False)
    assert not third["reused"] and third["cached"] == 5 and third["rejected"] == 2
    rej = read_rejected(site)
    assert "AIforCOVID.xlsx:row 9" in set(rej["source"]) and "imgs/f.dcm" not in set(rej["source"])
    assert load_site(site, cache_root, SIZE).table["y_prog"].iat[0] == 1

    # another size or crop is another cache; force rebuilds
    other = ingest_site(site, cache_root, image_size=32, crop="none", progress=False)
    assert not other["reused"] and other["cache_dir"] != third["cache_dir"]
    assert not ingest_site(site, cache_root, image_size=SIZE, progress=False, force=True)["reused"]


def test_interrupted_ingest_never_looks_valid(site, tmp_path, monkeypatch):
    cache_root = tmp_path / "cache"
    ingest_site(site, cache_root, image_size=SIZE, progress=False)
    cdir = cache_dir_for(site, cache_root, SIZE, "lung")
    calls = {"n": 0}
    real = Journal.add

    def dies_midway(self, slot, key, res):  # the ingesting process is interrupted at the third result
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, slot, key, res)

    monkeypatch.setattr(Journal, "add", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ingest_site(site, cache_root, image_size=SIZE, workers=1, progress=False, force=True)
    assert not (cdir / "meta.json").exists()
    assert not [p.name for p in cdir.iterdir() if ".tmp-" in p.name]
    with pytest.raises(DataError, match="no up-to-date cache"):
        load_site(site, cache_root, SIZE)
    monkeypatch.setattr(Journal, "add", real)
    # resumed: the two images decoded before the interruption come from its journal
    s = ingest_site(site, cache_root, image_size=SIZE, workers=1, progress=False)
    assert (s["decoded"], s["reused_images"]) == (6 - 2, 2)
    assert not [p.name for p in cdir.iterdir() if p.name.startswith("partial-")]
    assert ingest_and_load_site(site, cache_root, SIZE).images.shape == (5, SIZE, SIZE)


def _assert_readonly_ingest(site, cache_root):
    s = ingest_site(site, cache_root, image_size=SIZE, progress=False)
    cdir = cache_dir_for(site, cache_root, SIZE, "lung")
    assert s["cached"] == 5 and s["rejected_in_cache_dir"]
    assert s["rejected_file"] == str(cdir / "rejected.csv") and "not writable" in s["note"]
    assert not (site / "rejected.csv").exists()
    assert list(pd.read_csv(cdir / "rejected.csv")["source"]) == list(BAD)
    assert ingest_site(site, cache_root, image_size=SIZE, progress=False)["reused"]


def test_read_only_site_folder(site, tmp_path):
    mode = site.stat().st_mode
    os.chmod(site, stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(site, os.W_OK):
            pytest.skip("chmod does not make the folder read-only here (running as root)")
        _assert_readonly_ingest(site, tmp_path / "cache")
    finally:
        os.chmod(site, mode)


def test_unwritable_site_logic(site, tmp_path, monkeypatch):
    # the same path as the chmod test, independent of the user id
    monkeypatch.setattr(ingest_mod, "_site_writable", lambda _d: False)
    _assert_readonly_ingest(site, tmp_path / "cache")


def test_all_rejected_raises(tmp_path):
    rows = [("imgs/bad.dcm", "P1", "MILD", "", ""), ("imgs/gone.dcm", "P2", "SEVERE", "", "")]
    site = make_site(tmp_path / "fed", "hospZ", rows)
    with pytest.raises(DataError, match=r"hospZ.*rejected\.csv"):
        ingest_site(site, tmp_path / "cache", image_size=SIZE, progress=False)
    assert len(read_rejected(site)) == 2


def test_bad_manifest_is_one_line_data_error(site, tmp_path):
    (site / "manifest.csv").write_text("image,patient_id,prognosis,brixia\nimgs/a.dcm,P1,GOOD,\n")
    with pytest.raises(DataError) as err:
        ingest_site(site, tmp_path / "cache", image_size=SIZE, progress=False)
    assert "\n" not in str(err.value) and "prognosis" in str(err.value)


def test_workers_identical_bytes(site, tmp_path):
    one = ingest_site(site, tmp_path / "c1", image_size=SIZE, workers=1, progress=False)
    two = ingest_site(site, tmp_path / "c2", image_size=SIZE, workers=2, progress=False)
    a = (tmp_path / "c1").joinpath(*os.path.relpath(one["cache_dir"], tmp_path / "c1").split(os.sep))
    b = (tmp_path / "c2").joinpath(*os.path.relpath(two["cache_dir"], tmp_path / "c2").split(os.sep))
    for name in ("images.npy", "index.csv", "rejected.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_ingest_federation(tmp_path):
    fed = tmp_path / "fed"
    make_site(fed, "a_site")
    shutil.copytree(fed / "a_site", fed / "b_site")
    out = ingest_federation(fed, tmp_path / "cache", image_size=SIZE, progress=False)
    assert [s["site"] for s in out] == ["a_site", "b_site"] and all(s["cached"] == 5 for s in out)
    assert out[0]["cache_dir"] != out[1]["cache_dir"]


def test_preprocess_output_and_modes():
    img, _ = chest(120, 100)
    assert CROP_MODES == ("lung", "none", "boxes", "masks")
    for crop in CROP_MODES:
        out = preprocess(img.astype(np.float32), size=48, crop=crop)
        assert out.dtype == np.uint8 and out.shape == (48, 48)
    whole = preprocess(img.astype(np.float32), size=48, crop="none")
    assert whole.min() == 0 and whole.max() == 255
    _, info = preprocess_with_info(img.astype(np.float32), 48, "none")
    assert info["crop_box"] == (0, -10, 120, 110) and not info["fallback"]
    with pytest.raises(ValueError):
        preprocess(img, crop="heart")


def test_lung_crop_contains_both_lungs():
    h, w = 320, 320
    img, lungs = chest(h, w)
    out, info = preprocess_with_info(img.astype(np.float32), 256, "lung")
    assert not info["fallback"]
    t, l, b, r = info["crop_box"]
    assert b - t == r - l  # square
    for m in lungs:
        rr, cc = np.nonzero(m)
        assert t <= rr.min() and rr.max() < b and l <= cc.min() and cc.max() < r
    air = img < 0.15 * 4000  # the background outside the body
    inside = np.zeros_like(air)
    inside[max(t, 0) : b, max(l, 0) : r] = True
    assert (air & inside).sum() < 0.25 * air.sum()  # most of the background is cut away
    assert (b - t) * (r - l) < 0.6 * h * w


def test_lung_crop_fallback_when_no_lungs():
    flat_noise = np.random.default_rng(1).random((80, 60)).astype(np.float32)
    out, info = preprocess_with_info(flat_noise, 32, "lung")
    assert info["fallback"] and info["reason"] and out.shape == (32, 32)
    assert info["crop_box"] == (0, -10, 80, 70)  # whole image, made square by centre padding


# ---- parallel, incremental and resumable ingestion ------------------------------------------------


def _cache_files(summary):
    from pathlib import Path

    cdir = Path(summary["cache_dir"])
    return {name: (cdir / name).read_bytes() for name in ("images.npy", "index.csv", "rejected.csv")}


def test_workers_zero_means_one_per_core(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert worker_mod.resolve_workers(0) == 3 and worker_mod.resolve_workers(2) == 2
    with pytest.raises(worker_mod.ConfigError):
        worker_mod.resolve_workers(-1)


def test_incremental_second_run_decodes_only_changes(site, tmp_path):
    cache_root = tmp_path / "cache"
    first = ingest_site(site, cache_root, image_size=SIZE, workers=2, progress=False)
    assert (first["decoded"], first["reused_images"], first["reused"]) == (6, 0, False)  # 5 good + truncated
    cdir = cache_dir_for(site, cache_root, SIZE, "lung")
    records = pd.read_csv(cdir / "records.csv", dtype=str, keep_default_na=False)
    assert list(records["image"]) == GOOD + ["imgs/bad.dcm"]  # every decoded file, manifest order
    assert list(records["status"]) == ["ok"] * 5 + ["rejected"]
    assert {"file_size", "file_mtime_ns", "crop_input", "prognosis", "brixia", "status"} <= set(records.columns)

    # nothing changed: nothing decoded, nothing written
    mtime = (cdir / "images.npy").stat().st_mtime_ns
    again = ingest_site(site, cache_root, image_size=SIZE, progress=False)
    assert (again["reused"], again["decoded"], again["reused_images"]) == (True, 0, 6)
    assert (cdir / "images.npy").stat().st_mtime_ns == mtime

    # change: two rows added, one removed, one relabelled, one image file rewritten
    rows = [r for r in ROWS if r[0] != "imgs/c.dcm"]
    rows[0] = ("imgs/a.dcm", "P1", "SEVERE", "", "")
    rows += [("imgs/new1.dcm", "P8", "MILD", "", ""), ("imgs/new2.dcm", "P9", "", "012012", "")]
    for k, name in enumerate(["imgs/new1.dcm", "imgs/new2.dcm", "imgs/b.dcm"]):
        write_dicom(site / name, chest(seed=40 + k)[0])
    write_manifest_rows(site, rows)
    third = ingest_site(site, cache_root, image_size=SIZE, workers=2, progress=False)
    assert third["decoded"] == 3  # new1, new2 and the rewritten b; a (relabelled), d, e, bad reused
    assert third["reused_images"] == 4 and third["relabelled"] == 1 and not third["reused"]
    assert third["cached"] == 6 and third["rejected"] == 3

    # byte-identical to a from-scratch ingest
    scratch = ingest_site(site, tmp_path / "scratch", image_size=SIZE, workers=1, progress=False)
    assert scratch["decoded"] == 7
    assert _cache_files(third) == _cache_files(scratch)
    table = load_site(site, cache_root, SIZE).table
    assert table["y_prog"].iat[0] == 1 and "imgs/c.dcm" not in set(table["image"])


def test_crop_and_voi_are_cache_keys(site, tmp_path):
    a = cache_dir_for(site, tmp_path, SIZE, "lung")
    b = cache_dir_for(site, tmp_path, SIZE, "lung", voi="auto")
    c = cache_dir_for(site, tmp_path, SIZE, "boxes")
    assert (
        a.name.endswith(f"lung-v{cache_mod.CACHE_VERSION}")
        and b.name == f"s{SIZE}-lung-voiauto-v{cache_mod.CACHE_VERSION}"
    )
    assert len({a, b, c, cache_dir_for(site, tmp_path, SIZE, "masks")}) == 4
    s = ingest_site(site, tmp_path / "cache", image_size=SIZE, voi="auto", progress=False)
    assert (
        s["cached"] == 5
        and json.loads((cache_dir_for(site, tmp_path / "cache", SIZE, "lung", "auto") / "meta.json").read_text())["voi"]
        == "auto"
    )
    with pytest.raises(cache_mod.ConfigError):
        ingest_site(site, tmp_path / "cache", image_size=SIZE, voi="window", progress=False)


# ---- user-supplied lung boxes and masks ---------------------------------------------------------------

BOX = (100, 60, 260, 200)  # top, left, bottom, right in the 320 x 320 original
# widened by 5%: (92, 53, 268, 207), 176 x 154 -> square of 176 centred on the columns: left 130 - 88 = 42
BOX_SQUARE = (92, 42, 268, 218)


def test_crop_box_from_a_given_box_and_mask():
    img, _ = chest(320, 320)
    x = img.astype(np.float32)
    out, info = preprocess_with_info(x, 64, "boxes", box=BOX)
    assert info["crop_box"] == BOX_SQUARE and info["lung_box"] == BOX and not info["fallback"]
    mask = np.zeros((320, 320), np.uint8)
    mask[100:260, 60:200] = 255
    out2, info2 = preprocess_with_info(x, 64, "masks", mask=mask)
    assert info2["crop_box"] == BOX_SQUARE and info2["lung_box"] == BOX
    np.testing.assert_array_equal(out, out2)
    # two lung blobs: the mask's bounding box covers both
    two = np.zeros((320, 320), bool)
    two[100:260, 60:120] = two[110:250, 150:200] = True
    assert preprocess_with_info(x, 64, "masks", mask=two)[1]["lung_box"] == BOX
    # a box near the edge is squared with real content: shifted inside the image, no padding
    _, info = preprocess_with_info(x, 64, "boxes", box=(0, 250, 100, 320))
    t, l, b, r = info["crop_box"]
    assert b - t == r - l and l >= 0 and r <= 320 and t >= 0


@pytest.mark.parametrize(
    "box, why",
    [
        (None, "no lung box given"),
        ((10, 10, 5, 50), "top < bottom"),
        ((0, 0, 400, 100), "outside the 320x300 image"),
        (("a", 1, 2, 3), "four numbers"),
    ],
)
def test_invalid_box_falls_back_to_whole_image(box, why):
    img, _ = chest(320, 300)
    _, info = preprocess_with_info(img.astype(np.float32), 32, "boxes", box=box)
    assert info["fallback"] and why in info["reason"] and info["crop_box"] == (0, -10, 320, 310)


def test_invalid_masks_fall_back():
    img = chest(320, 320)[0].astype(np.float32)
    assert "mask is empty" in preprocess_with_info(img, 32, "masks", mask=np.zeros((320, 320)))[1]["reason"]
    info = preprocess_with_info(img, 32, "masks", mask=np.ones((100, 100)))[1]
    assert info["fallback"] and "does not match the image 320x320" in info["reason"]


def _box_site(root):
    site = root / "boxsite"
    (site / "imgs").mkdir(parents=True)
    rows = []
    for k in range(4):
        write_dicom(site / f"imgs/{k}.dcm", chest(320, 320, seed=k)[0])
        rows.append((f"imgs/{k}.dcm", f"P{k}", "MILD", "", ""))
    write_manifest_rows(site, rows)
    return site


def test_ingest_with_box_table(tmp_path):
    site = _box_site(tmp_path)
    pd.DataFrame(
        [("imgs/0.dcm", *BOX), ("imgs/1.dcm", 10, 10, 5, 50), ("imgs/2.dcm", *BOX)],
        columns=["image", "top", "left", "bottom", "right"],
    ).to_csv(site / "lung_boxes.csv", index=False)
    s = ingest_site(site, tmp_path / "cache", image_size=SIZE, crop="boxes", progress=False)
    assert s["cached"] == 4 and s["crop_fallbacks"] == 2  # imgs/1 invalid, imgs/3 has no row
    data = load_site(site, tmp_path / "cache", SIZE, "boxes")
    t = data.table
    assert list(t["crop_fallback"]) == [0, 1, 0, 1]
    assert t["crop_note"].iat[0] == "" and "top < bottom" in t["crop_note"].iat[1]
    assert t["crop_note"].iat[3] == "no row for this image in lung_boxes.csv"
    from mdmt.data.dicom import read_dicom

    img, _ = read_dicom(site / "imgs/0.dcm")
    np.testing.assert_array_equal(data.images[0], preprocess(img, SIZE, "boxes", box=BOX))
    img, _ = read_dicom(site / "imgs/3.dcm")
    np.testing.assert_array_equal(data.images[3], preprocess(img, SIZE, "none"))

    # editing one box re-decodes that image only
    pd.DataFrame(
        [("imgs/0.dcm", *BOX), ("imgs/1.dcm", *BOX), ("imgs/2.dcm", *BOX)],
        columns=["image", "top", "left", "bottom", "right"],
    ).to_csv(site / "lung_boxes.csv", index=False)
    s = ingest_site(site, tmp_path / "cache", image_size=SIZE, crop="boxes", progress=False)
    assert (s["decoded"], s["reused_images"], s["crop_fallbacks"]) == (1, 3, 1)

    # crop_source: another table, relative to the site folder or absolute
    pd.DataFrame([("imgs/3.dcm", *BOX)], columns=["image", "top", "left", "bottom", "right"]).to_csv(
        site / "other.csv", index=False
    )
    s = ingest_site(site, tmp_path / "c2", image_size=SIZE, crop="boxes", crop_source="other.csv", progress=False)
    assert s["crop_fallbacks"] == 3
    s = ingest_site(
        site, tmp_path / "c3", image_size=SIZE, crop="boxes", crop_source=site / "other.csv", progress=False
    )
    assert s["crop_fallbacks"] == 3
    with pytest.raises(cache_mod.ConfigError, match="crop_source"):
        ingest_site(site, tmp_path / "c4", image_size=SIZE, crop="lung", crop_source="other.csv", progress=False)


def test_bad_box_table_is_one_line_data_error(tmp_path):
    site = _box_site(tmp_path)
    (site / "lung_boxes.csv").write_text("image,top,left,bottom\nimgs/0.dcm,1,2,3\n")
    with pytest.raises(DataError, match="missing column.*right"):
        ingest_site(site, tmp_path / "cache", image_size=SIZE, crop="boxes", progress=False)
    (site / "lung_boxes.csv").write_text("image,top,left,bottom,right\nimgs/0.dcm,1,2,3,4\nimgs/0.dcm,1,2,3,4\n")
    with pytest.raises(DataError, match=r"row 3.*listed twice"):
        ingest_site(site, tmp_path / "cache", image_size=SIZE, crop="boxes", progress=False)


def test_missing_crop_source_falls_back_with_a_note(tmp_path):
    site = _box_site(tmp_path)
    s = ingest_site(site, tmp_path / "cache", image_size=SIZE, crop="masks", progress=False)
    assert s["crop_fallbacks"] == 4 and "not found" in s["note"]


def test_ingest_with_mask_folder(tmp_path):
    from PIL import Image

    site = _box_site(tmp_path)
    mask = np.zeros((320, 320), np.uint8)
    mask[100:260, 60:200] = 255
    (site / "lung_masks/imgs").mkdir(parents=True)
    Image.fromarray(mask).save(site / "lung_masks/imgs/0.dcm.png")  # <image>.png
    Image.fromarray(mask).save(site / "lung_masks/imgs/1.png")  # extension replaced
    Image.fromarray(mask[:100]).save(site / "lung_masks/imgs/2.png")  # wrong size
    s = ingest_site(site, tmp_path / "cache", image_size=SIZE, crop="masks", progress=False)
    assert s["crop_fallbacks"] == 2
    t = load_site(site, tmp_path / "cache", SIZE, "masks").table
    assert list(t["crop_fallback"]) == [0, 0, 1, 1]
    assert (
        "does not match" in t["crop_note"].iat[2] and t["crop_note"].iat[3] == "no mask file lung_masks/imgs/3.dcm.png"
    )
    data = load_site(site, tmp_path / "cache", SIZE, "masks")
    from mdmt.data.dicom import read_dicom

    img, _ = read_dicom(site / "imgs/1.dcm")
    np.testing.assert_array_equal(data.images[1], preprocess(img, SIZE, "boxes", box=BOX))
    # a changed mask file re-decodes that image only
    Image.fromarray(mask).save(site / "lung_masks/imgs/2.png")
    s = ingest_site(site, tmp_path / "cache", image_size=SIZE, crop="masks", progress=False)
    assert (s["decoded"], s["crop_fallbacks"]) == (1, 1)
