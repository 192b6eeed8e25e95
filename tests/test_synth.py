"""The synthetic federation generator: counts, DICOM tags, labels, determinism, opacities, ceiling."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from mdmt.data import synth
from mdmt.data.manifest import brixia_global, list_sites, read_manifest, severity_class
from mdmt.errors import ConfigError

# Published counts, typed here independently of synth.py (see docs/synthetic.md).
PUB_PROGNOSIS = {"A": (35, 85), "B": (59, 45), "C": (70, 81), "D": (76, 63), "E": (55, 46), "F": (544, 426)}
PUB_BRIXIA_GLOBAL = [51, 165, 299, 251, 269, 277, 370, 351, 387, 353, 391, 356, 318, 261, 233, 164, 116, 60, 23]
PUB_ZONE_MEANS = [0.85, 1.55, 1.85, 0.65, 1.53, 1.87]
DOC_AUC_RANGE = (0.75, 0.85)  # the oracle ceiling's documented range (docs/synthetic.md)

SCALE, SIZE = 0.05, 96
SITES = ["A", "B", "BRIXIA", "C", "D", "DUAL", "E", "F"]


def _gen(out: Path, seed: int = 0) -> dict:
    return synth.synthesize(out, scale=SCALE, image_size=SIZE, seed=seed, both_site=True, progress=False)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "fed"
    return out, _gen(out)


def _display(path: Path) -> np.ndarray:
    """Modality values with MONOCHROME1 inverted (bright = dense), min-max over the 2nd-98th percentile."""
    ds = pydicom.dcmread(path)
    v = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        v = -v
    lo, hi = np.percentile(v, [2, 98])
    return np.clip((v - lo) / (hi - lo), 0, 1)


# ---------------------------------------------------------------------------------------------- counts
def test_scaled_count_rule():
    assert synth.scaled_count(35, 0.1, 0) == 4  # 3.5 rounds half up
    assert synth.scaled_count(45, 0.1, 0) == 5  # 4.5
    assert synth.scaled_count(370, 0.05, 0) == 19  # 18.5
    assert synth.scaled_count(544, 0.05, 0) == 27  # 27.2
    assert synth.scaled_count(35, 0.05, 5) == 5  # floor
    assert synth.scaled_count(23, 1.0, 2) == 23
    assert synth.scaled_count(23, 2.0, 2) == 46


def test_scale_one_targets_are_the_published_counts():
    t = synth.targets(1.0, both_site=True)
    for site, (mild, severe) in PUB_PROGNOSIS.items():
        assert (t[site]["MILD"], t[site]["SEVERE"]) == (mild, severe)
    assert t["BRIXIA"]["global_score_counts"] == PUB_BRIXIA_GLOBAL
    assert sum(t["BRIXIA"]["global_score_counts"]) == 4695
    assert sum(t[s]["MILD"] + t[s]["SEVERE"] for s in PUB_PROGNOSIS) == 1585
    assert 100 <= t["DUAL"]["MILD"] + t["DUAL"]["SEVERE"] <= 200


def test_manifests_and_files_match_scaled_counts(fed):
    out, summary = fed
    assert list_sites(out) == SITES
    for site, (mild, severe) in PUB_PROGNOSIS.items():
        df = read_manifest(out / site)
        assert (df["prognosis"] == "MILD").sum() == synth.scaled_count(mild, SCALE, synth.PROGNOSIS_FLOOR)
        assert (df["prognosis"] == "SEVERE").sum() == synth.scaled_count(severe, SCALE, synth.PROGNOSIS_FLOOR)
        assert (df["brixia"] == "").all() and (df["split"] == "").all()
        assert df["patient_id"].is_unique  # one image per patient
        dcms = sorted(p.relative_to(out / site).as_posix() for p in (out / site).rglob("*.dcm"))
        assert dcms == sorted(df["image"]) and all(re.fullmatch(rf"images/{site}_\d{{4}}\.dcm", i) for i in dcms)
    br = read_manifest(out / "BRIXIA")
    assert (br["prognosis"] == "").all() and (br["brixia"] != "").all()
    g = br["brixia"].map(brixia_global)
    want = [synth.scaled_count(n, SCALE, synth.BRIXIA_FLOOR) for n in PUB_BRIXIA_GLOBAL]
    assert [int((g == k).sum()) for k in range(19)] == want
    assert len(list((out / "BRIXIA").rglob("*.dcm"))) == len(br) == sum(want)
    classes = g.map(severity_class).value_counts()
    assert all(classes.get(c, 0) >= 4 for c in range(4))
    dual = read_manifest(out / "DUAL")
    assert (dual["prognosis"] != "").all() and (dual["brixia"] != "").all()
    # federation-level files at the root, none inside a site folder
    assert (out / "synth.json").is_file() and (out / "synth_truth.csv").is_file()
    for site in SITES:
        assert sorted(p.name for p in (out / site).iterdir()) == ["images", "manifest.csv"]
    assert summary["sites"]["F"]["MILD"] == synth.scaled_count(544, SCALE, synth.PROGNOSIS_FLOOR)


def test_brixia_strings_keep_leading_zeros_and_patients_repeat(fed):
    out, _ = fed
    df = pd.read_csv(out / "BRIXIA" / "manifest.csv", dtype=str, keep_default_na=False)
    assert df["brixia"].str.fullmatch(r"[0-3]{6}").all()
    assert df["brixia"].str.startswith("0").any()  # leading zeros preserved on disk
    per_patient = df.groupby("patient_id").size()
    assert per_patient.max() > 1 and (per_patient == 1).any()
    truth = pd.read_csv(out / "synth_truth.csv", dtype=str, keep_default_na=False)
    t = truth[truth["site"] == "BRIXIA"].set_index("image")
    assert (t.loc[df["image"], "brixia"].values == df["brixia"].values).all()


# ---------------------------------------------------------------------------------------------- DICOM
def test_dicom_tags_and_pixel_ranges(fed):
    out, _ = fed
    photometric, slopes, intercepts, bits, manufacturers, shapes = set(), set(), set(), set(), set(), set()
    for site in SITES:
        df = read_manifest(out / site)
        for _, row in df.iloc[:: max(1, len(df) // 6)].iterrows():
            ds = pydicom.dcmread(out / site / row["image"])
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            cls = {
                "CR": pydicom.uid.ComputedRadiographyImageStorage,
                "DX": pydicom.uid.DigitalXRayImageStorageForPresentation,
            }[ds.Modality]
            assert ds.SOPClassUID == cls == ds.file_meta.MediaStorageSOPClassUID
            assert ds.PatientID == row["patient_id"]
            assert len({ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}) == 3
            assert ds.Manufacturer == row["manufacturer"]
            assert (ds.BitsAllocated, ds.PixelRepresentation, ds.SamplesPerPixel) == (16, 0, 1)
            assert ds.HighBit == ds.BitsStored - 1
            arr = ds.pixel_array
            assert arr.shape == (ds.Rows, ds.Columns)
            assert int(arr.max()) < 2**ds.BitsStored and int(arr.min()) >= 0
            assert len(ds.PixelSpacing) == 2 and float(ds.PixelSpacing[0]) > 0
            assert float(ds.WindowWidth) > 0
            photometric.add((site, ds.PhotometricInterpretation))
            slopes.add(float(ds.RescaleSlope))
            intercepts.add(float(ds.RescaleIntercept))
            bits.add(int(ds.BitsStored))
            manufacturers.add((site, ds.Manufacturer))
            shapes.add(arr.shape)
    assert {p for _, p in photometric} == {"MONOCHROME1", "MONOCHROME2"}
    assert ("A", "MONOCHROME2") in photometric and ("C", "MONOCHROME1") in photometric
    assert 2.0 in slopes and -1024.0 in intercepts
    assert {10, 12, 14, 16} <= bits
    assert len({m for _, m in manufacturers}) >= 7
    assert len({m for s, m in manufacturers if s == "BRIXIA"}) >= 2
    assert any(r != c for r, c in shapes)


def test_rescale_gives_the_intended_values():
    # stored values map back onto the same display scale whatever the slope, intercept and photometric
    rng = np.random.default_rng(0)
    img = rng.random((20, 30)).astype(np.float32)
    for look in list(synth.SITE_LOOKS.values()) + list(synth.BRIXIA_LOOKS.values()):
        stored, wc, ww = synth.to_stored(img, look)
        assert stored.max() < 2**look.bits
        v = stored * look.slope + look.intercept
        d = (v - (wc - ww / 2)) / ww
        if look.photometric == "MONOCHROME1":
            d = 1 - d
        assert np.abs(d - img).max() < 2.0 / (2**look.bits) / (look.hi - look.lo) + 1e-6


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_is_byte_identical_and_other_seed_differs(fed, tmp_path):
    out, _ = fed
    again = tmp_path / "again"
    _gen(again, seed=0)
    for site in SITES:
        assert (again / site / "manifest.csv").read_bytes() == (out / site / "manifest.csv").read_bytes()
    assert (again / "synth_truth.csv").read_bytes() == (out / "synth_truth.csv").read_bytes()
    assert (again / "synth.json").read_bytes() == (out / "synth.json").read_bytes()
    for rel in ["A/images/A_0001.dcm", "F/images/F_0007.dcm", "BRIXIA/images/BRIXIA_0011.dcm"]:
        a, b = pydicom.dcmread(out / rel), pydicom.dcmread(again / rel)
        assert a.PixelData == b.PixelData and a.SOPInstanceUID == b.SOPInstanceUID
        assert (out / rel).read_bytes() == (again / rel).read_bytes()
    other = tmp_path / "other"
    _gen(other, seed=1)
    assert (other / "BRIXIA" / "manifest.csv").read_bytes() != (out / "BRIXIA" / "manifest.csv").read_bytes()
    assert (other / "synth_truth.csv").read_bytes() != (out / "synth_truth.csv").read_bytes()
    rel = "A/images/A_0001.dcm"
    assert pydicom.dcmread(other / rel).PixelData != pydicom.dcmread(out / rel).PixelData
    assert pydicom.dcmread(other / rel).SOPInstanceUID != pydicom.dcmread(out / rel).SOPInstanceUID


def test_rerun_into_a_synthetic_federation_replaces_it_and_refuses_other_folders(tmp_path):
    fed = tmp_path / "f"
    synth.synthesize(fed, scale=0.01, image_size=32, both_site=True, progress=False)
    assert "DUAL" in list_sites(fed)
    synth.synthesize(fed, scale=0.01, image_size=32, both_site=False, progress=False)
    assert "DUAL" not in list_sites(fed) and not (fed / "DUAL").exists()
    (tmp_path / "x.txt").write_text("not a federation")
    with pytest.raises(ConfigError):
        synth.synthesize(tmp_path, scale=0.01, image_size=32, progress=False)
    with pytest.raises(ConfigError):
        synth.synthesize(tmp_path / "f", layout="per-manufacturer", progress=False)
    with pytest.raises(ConfigError):
        synth.synthesize(tmp_path / "f", scale=0, progress=False)


# ---------------------------------------------------------------------------------------------- the model
def test_zone_model_matches_the_published_profile():
    np.testing.assert_allclose(synth.model_zone_means(), PUB_ZONE_MEANS, atol=0.01)
    rng = np.random.default_rng(0)
    for g in range(19):
        z = synth.sample_zones(rng, g)
        assert z.sum() == g and z.min() >= 0 and z.max() <= 3


def test_labels_follow_the_latent_burden(fed):
    out, _ = fed
    t = pd.read_csv(out / "synth_truth.csv", keep_default_na=False)
    prog = t[t["site"].isin(list(PUB_PROGNOSIS))]
    mean_g = prog.groupby("prognosis")["global_score"].mean()
    assert mean_g["SEVERE"] > mean_g["MILD"] + 1
    zone_sum = prog[[f"zone_{z}" for z in "ABCDEF"]].sum(axis=1)
    assert (zone_sum == prog["global_score"]).all()
    np.testing.assert_allclose(prog["p_severe"], synth.p_severe(prog["global_score"], prog["hidden"]), atol=1e-5)


def test_oracle_ceiling_in_documented_range(fed):
    out, summary = fed
    c = summary["ceiling"]
    assert DOC_AUC_RANGE[0] <= c["exact"]["auc"] <= DOC_AUC_RANGE[1]
    assert abs(c["mc"]["auc"] - c["exact"]["auc"]) < 0.01 and c["mc"]["n"] >= 200_000
    assert 0.65 <= c["exact"]["acc"] <= 0.80
    assert abs(c["exact"]["severe_share"] - 746 / 1585) < 0.02
    assert json.loads((out / "synth.json").read_text())["ceiling"] == c
    assert "BRIXIA" in synth.format_summary(summary) and "AUC" in synth.format_summary(summary)


# ---------------------------------------------------------------------------------------------- opacities
def test_opacity_raises_the_zone_density_in_the_renderer():
    look = synth.SITE_LOOKS["A"]
    anat = synth.anatomy(np.random.default_rng(3))
    base, _ = synth.render(anat, (0, 0, 0, 0, 0, 0), look, 128, 128, np.random.default_rng(4))
    sick, _ = synth.render(anat, (0, 0, 3, 0, 0, 0), look, 128, 128, np.random.default_rng(4))
    diff = sick - base
    # zone C = patient's right lower zone = IMAGE LEFT, lower lung
    c_box = diff[70:90, 20:50]
    d_box = diff[30:50, 80:110]  # left upper zone, score 0
    assert c_box.mean() > 0.1 and abs(d_box).max() < 1e-4


def test_high_burden_images_are_denser_in_the_lungs(fed):
    out, _ = fed
    t = pd.read_csv(out / "synth_truth.csv", keep_default_na=False)
    t = t[t["site"] == "BRIXIA"]
    lows = t[t["global_score"] <= 3]["image"].tolist()[:15]
    highs = t[t["global_score"] >= 14]["image"].tolist()[:15]
    assert len(lows) >= 8 and len(highs) >= 8

    def lung_mean(rel):
        d = _display(out / "BRIXIA" / rel)
        r, c = d.shape
        return np.concatenate(
            [
                d[int(0.35 * r) : int(0.65 * r), int(0.18 * c) : int(0.36 * c)].ravel(),
                d[int(0.35 * r) : int(0.65 * r), int(0.64 * c) : int(0.82 * c)].ravel(),
            ]
        ).mean()

    lo, hi = np.array([lung_mean(i) for i in lows]), np.array([lung_mean(i) for i in highs])
    assert hi.mean() - lo.mean() > 0.06


# ---------------------------------------------------------------------------------------------- published layouts
def test_aiforcovid_layout_holds_the_federation_images_and_labels(fed, tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    out_fed, _ = fed
    out = tmp_path / "aic"
    summary = synth.synthesize(out, scale=SCALE, image_size=SIZE, seed=0, layout="aiforcovid", progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "AIforCOVID.xlsx",
            "AIforCOVID_r2.xlsx",
            "AIforCOVID_r3.xlsx",
            "imgs",
            "imgs_r2",
            "imgs_r3",
            "synth.json",
            "synth_truth.csv",
        ]
    )
    assert json.loads((out / "synth.json").read_text())["parameters"]["layout"] == "aiforcovid"
    truth = pd.read_csv(out / "synth_truth.csv", dtype=str, keep_default_na=False)
    n = sum(
        synth.scaled_count(m, SCALE, synth.PROGNOSIS_FLOOR) + synth.scaled_count(s, SCALE, synth.PROGNOSIS_FLOOR)
        for m, s in PUB_PROGNOSIS.values()
    )
    assert len(truth) == n and set(truth["site"]) == set(PUB_PROGNOSIS)
    files = [p for p in out.rglob("*") if p.is_file() and p.parts[len(out.parts)].startswith("imgs")]
    assert sorted(p.relative_to(out).as_posix() for p in files) == sorted(truth["image"])
    assert any(not p.name.endswith(".dcm") for p in files) and any(p.name.endswith(".dcm") for p in files)
    assert any(len(p.relative_to(out).parts) > 2 for p in files)  # nested folders
    assert all(re.fullmatch(r"P_\d+(_\d+)?", i) for i in truth["image_id"])
    assert truth["image_id"].is_unique
    # same images (byte-identical DICOMs) and labels as the federation layout for the same seed
    fed_truth = pd.read_csv(out_fed / "synth_truth.csv", dtype=str, keep_default_na=False)
    fed_truth = fed_truth[fed_truth["site"].isin(list(PUB_PROGNOSIS))].set_index("image")
    assert sorted(truth["federation_image"]) == sorted(fed_truth.index)
    assert (fed_truth.loc[truth["federation_image"], "prognosis"].values == truth["prognosis"].values).all()
    for _, row in truth.iloc[:: max(1, len(truth) // 8)].iterrows():
        assert (out / row["image"]).read_bytes() == (out_fed / row["site"] / row["federation_image"]).read_bytes()
    # the workbooks: one per release, an extra sheet in r2, ImageFile with and without .dcm
    cells = []
    books = ["AIforCOVID.xlsx", "AIforCOVID_r2.xlsx", "AIforCOVID_r3.xlsx"]
    for book, rel in zip(books, ["imgs", "imgs_r2", "imgs_r3"]):
        wb = openpyxl.load_workbook(out / book)
        if book == "AIforCOVID_r2.xlsx":
            assert wb.sheetnames == ["Legend", "Data"]
        ws = wb.worksheets[-1]
        rows = list(ws.iter_rows(values_only=True))
        assert {"ImageFile", "Hospital", "Prognosis", "Age", "Sex"} <= set(rows[0])
        body = [dict(zip(rows[0], r)) for r in rows[1:]]
        assert len(body) == summary["published_layout"]["releases"][rel] > 0
        by_id = truth.set_index("image_id")
        assert all(by_id.loc[r["ImageFile"].removesuffix(".dcm"), "image"].startswith(rel + "/") for r in body)
        cells += body
    assert len(cells) == n
    with_dcm = [c["ImageFile"].endswith(".dcm") for c in cells]
    assert any(with_dcm) and not all(with_dcm)
    t = truth.set_index("image_id")
    assert all(t.loc[c["ImageFile"].removesuffix(".dcm"), "prognosis"] == c["Prognosis"] for c in cells)
    assert all(t.loc[c["ImageFile"].removesuffix(".dcm"), "site"] == c["Hospital"] for c in cells)


def test_brixia_layout_metadata_keeps_scores_as_text(fed, tmp_path):
    out_fed, _ = fed
    out = tmp_path / "bx"
    summary = synth.synthesize(out, scale=SCALE, image_size=SIZE, seed=0, layout="brixia", progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "dicom_clean",
        "metadata_global_v2.csv",
        "synth.json",
        "synth_truth.csv",
    ]
    assert (out / "metadata_global_v2.csv").read_text().splitlines()[0] == (
        "Filename;Subject;StudyId;Sex;AgeAtStudyDateFiveYear;Manufacturer;Modality;PhotometricInterpretation;"
        "BrixiaScore;BrixiaScoreGlobal;ConsensusTestset;Rows;Columns"
    )
    meta = pd.read_csv(out / "metadata_global_v2.csv", sep=";", dtype=str, keep_default_na=False)
    assert meta["BrixiaScore"].str.fullmatch(r"[0-3]{6}").all() and meta["BrixiaScore"].str.startswith("0").any()
    assert (meta["BrixiaScore"].map(brixia_global).astype(str) == meta["BrixiaScoreGlobal"]).all()
    assert int((meta["ConsensusTestset"] == "1").sum()) == synth.scaled_count(150, SCALE, synth.CONSENSUS_FLOOR)
    assert set(meta["ConsensusTestset"]) == {"0", "1"}
    assert set(meta["Manufacturer"]) <= set(synth.BRIXIA_MANUFACTURER_COUNTS)
    assert sorted(p.name for p in (out / "dicom_clean").iterdir()) == sorted(meta["Filename"])
    fed_man = read_manifest(out_fed / "BRIXIA").set_index("image")
    keys = "images/" + meta["Filename"]
    assert (fed_man.loc[keys, "brixia"].values == meta["BrixiaScore"].values).all()
    assert (fed_man.loc[keys, "patient_id"].values == meta["Subject"].values).all()
    for f in meta["Filename"].iloc[::40]:
        assert (out / "dicom_clean" / f).read_bytes() == (out_fed / "BRIXIA" / "images" / f).read_bytes()
    assert summary["published_layout"]["consensus_testset"] == int((meta["ConsensusTestset"] == "1").sum())


def test_published_layouts_rerun_and_errors(tmp_path):
    out = tmp_path / "p"
    synth.synthesize(out, scale=0.01, image_size=32, layout="brixia", progress=False)
    synth.synthesize(out, scale=0.01, image_size=32, layout="aiforcovid", progress=False)
    assert not (out / "dicom_clean").exists() and not (out / "metadata_global_v2.csv").exists()
    assert (out / "AIforCOVID.xlsx").is_file()
    synth.synthesize(out, scale=0.01, image_size=32, progress=False)  # back to the federation layout
    assert not (out / "imgs").exists() and not (out / "AIforCOVID.xlsx").exists()
    assert "A" in list_sites(out)
    with pytest.raises(ConfigError):
        synth.synthesize(tmp_path / "q", scale=0.01, layout="aiforcovid", both_site=True, progress=False)
