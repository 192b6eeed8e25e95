"""The AIforCOVID and BRIXIA importers: planted faults, exact counts, rejections, links, idempotency,
and round trips through the synthetic published layouts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.uid import ExplicitVRBigEndian, RLELossless

from mdmt.data import synth
from mdmt.data.importers import (
    UNREFERENCED,
    format_import_summary,
    import_aiforcovid,
    import_brixia,
)
from mdmt.data.manifest import list_sites, read_manifest, read_rejected
from mdmt.errors import ConfigError, DataError
from tests.dicom_helpers import write_dicom, write_dicom_as

try:
    import openpyxl
except ImportError:  # the BRIXIA tests need no .xlsx support
    openpyxl = None
needs_xlsx = pytest.mark.skipif(openpyxl is None, reason="openpyxl is not installed (needed for .xlsx)")


def _dcm(path: Path, seed: int = 0, photometric: str = "MONOCHROME2") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 4000, (16, 16)).astype(np.uint16)
    return write_dicom(path, arr, photometric=photometric)


def _dcm_as(path: Path, syntax, seed: int = 0) -> Path:
    """A DICOM in another transfer syntax (compressed or big-endian): it must import like any other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 4000, (16, 16)).astype(np.uint16)
    return write_dicom_as(path, arr, syntax)


def _truncated(path: Path) -> Path:
    _dcm(path, seed=99)
    data = path.read_bytes()
    path.write_bytes(data[:-200])
    return path


def _not_dicom(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is not an image\n")
    return path


def _xlsx(path: Path, sheets: list[tuple[str, list[list]]]) -> None:
    wb = openpyxl.Workbook()
    wb.remove(wb.active)
    for title, rows in sheets:
        ws = wb.create_sheet(title)
        for r in rows:
            ws.append(r)
    wb.save(path)


# ---------------------------------------------------------------------------------------------- fixtures
# AIforCOVID.xlsx (sheet 'Foglio1'): header row 1, a blank row 8.
AIC_R1 = [
    ["ImageFile", "Hospital", "Age", "Sex", "Prognosis"],
    ["P_1", "A", 70, "M", "MILD"],  # row 2: imgs/P_1.dcm
    ["P_2.dcm", "A", 64, "F", "SEVERE"],  # row 3: nested imgs/sub/P_2.dcm
    ["P_3", "A", 81, "M", " severe"],  # row 4: file without suffix; label normalised
    ["P_4", "B", 55, "F", "Mild "],  # row 5: label normalised
    ["P_5", "B", 47, "M", "MODERATE"],  # row 6: bad label
    ["P_6", None, 60, "F", "MILD"],  # row 7: no hospital -> federation level
    [],  # row 8: blank
    ["P_7", "B", 52, "M", "SEVERE"],  # row 9: DICOM missing
    ["P_8.dcm", "B", 49, "F", "MILD"],  # row 10: truncated DICOM
    ["P_9", "C", 77, "M", "SEVERE"],  # row 11: text file named P_9.dcm
    ["P_10", "C", 58, "F", "MILD"],  # row 12: two files match (ambiguous)
    ["P_1.dcm", "A", 70, "M", "SEVERE"],  # row 13: duplicate id
    ["P_11", "C", 66, "M", "SEVERE"],  # row 14: MONOCHROME1, fine
    [None, "C", 40, "F", "MILD"],  # row 15: no ImageFile
    ["P_12", "E", 50, "M", "unknown"],  # row 16: E's only row, rejected -> E/ holds only rejected.csv
]
# AIforCOVID_r2.xlsx: an extra sheet first; a title row above the header (header on row 2).
AIC_R2 = [
    ["AIforCOVID release 2"],
    ["ImageFile", "Hospital", "Prognosis", "Age"],
    ["P_1_7.dcm", "C", "MILD", 71],  # row 3: imgs_r2/C/P_1_7 (no suffix, nested)
    ["P_1_8", "D", "SEVERE", 59],  # row 4: imgs_r2/P_1_8.dcm
    ["P_1_9", " d", "MILD", 62],  # row 5: hospital ' d' -> D, deep nesting
]
AIC_EXPECT = {"A": (1, 2), "B": (1, 0), "C": (1, 1), "D": (1, 1)}  # (MILD, SEVERE)
AIC_LABELS = {
    "P_1": "MILD",
    "P_2": "SEVERE",
    "P_3": "SEVERE",
    "P_4": "MILD",
    "P_11": "SEVERE",
    "P_1_7": "MILD",
    "P_1_8": "SEVERE",
    "P_1_9": "MILD",
}
AIC_REJECTED = {  # site ("" = federation) -> {source: reason substring}
    "A": {"AIforCOVID.xlsx:row 13": "listed twice"},
    "B": {
        "AIforCOVID.xlsx:row 6": "'MODERATE' is not MILD or SEVERE",
        "AIforCOVID.xlsx:row 9": "DICOM not found",
        "AIforCOVID.xlsx:row 10": "truncated",
    },
    "E": {"AIforCOVID.xlsx:row 16": "'unknown' is not MILD or SEVERE"},
    "C": {
        "AIforCOVID.xlsx:row 11": "not a DICOM file",
        "AIforCOVID.xlsx:row 12": "ambiguous: 2 files",
        "AIforCOVID.xlsx:row 15": "ImageFile is empty",
    },
    "": {
        "AIforCOVID.xlsx:row 7": "Hospital is empty",
        "imgs/P_99.dcm": UNREFERENCED,
        "imgs_r3/P_3_45.dcm": UNREFERENCED,
    },
}


@pytest.fixture(scope="module")
def aic_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("aic") / "AIforCOVID"
    i = src / "imgs"
    _dcm(i / "P_1.dcm", 1)
    _dcm(i / "sub" / "P_2.dcm", 2)
    _dcm(i / "P_3", 3)
    _dcm_as(i / "P_4.dcm", ExplicitVRBigEndian, 4)  # big-endian
    _dcm(i / "P_5.dcm", 5)
    _dcm(i / "P_6.dcm", 6)
    _truncated(i / "P_8.dcm")
    _not_dicom(i / "P_9.dcm")
    _dcm(i / "P_10.dcm", 10)
    _dcm(i / "deep" / "P_10.dcm", 11)
    _dcm(i / "P_11.dcm", 12, photometric="MONOCHROME1")
    _dcm(i / "P_12.dcm", 14)
    _dcm(i / "P_99.dcm", 13)  # no row references it
    (i / "notes.txt").write_text("not a DICOM and not listed\n")
    _dcm(src / "imgs_r2" / "C" / "P_1_7", 20)
    _dcm_as(src / "imgs_r2" / "P_1_8.dcm", RLELossless, 21)  # compressed (RLE)
    _dcm(src / "imgs_r2" / "x" / "y" / "P_1_9.dcm", 22)
    _dcm(src / "imgs_r3" / "P_3_45.dcm", 30)  # release 3 has no workbook
    _xlsx(src / "AIforCOVID.xlsx", [("Foglio1", AIC_R1)])
    _xlsx(
        src / "AIforCOVID_r2.xlsx",
        [("Legend", [["Column", "Description"], ["ImageFile", "image id"]]), ("Dati", AIC_R2)],
    )
    return src


@pytest.fixture(scope="module")
def aic(aic_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("aic_out") / "fed"
    return out, import_aiforcovid(aic_src, out, progress=False)


# BRIXIA metadata (header row 1) and the expected outcome with split_by='manufacturer', min_site_size=3.
BX_HEADER = [
    "Filename",
    "Subject",
    "StudyId",
    "Sex",
    "AgeAtStudyDateFiveYear",
    "Manufacturer",
    "Modality",
    "PhotometricInterpretation",
    "BrixiaScore",
    "BrixiaScoreGlobal",
    "ConsensusTestset",
    "Rows",
    "Columns",
]
BX_ROWS = [  # Filename, Subject, Manufacturer, BrixiaScore, BrixiaScoreGlobal, ConsensusTestset
    ("1.dcm", "0017", "SIEMENS", "000000", "0", "1"),  # row 2
    ("2.dcm", "0017", "SIEMENS", "000102", "3", "0"),  # row 3
    ("3.dcm", "0018", "SIEMENS", "00102", "3", "0"),  # row 4: 5 characters
    ("4.dcm", "0019", "SIEMENS", "0001a2", "3", "0"),  # row 5: a letter
    ("5.dcm", "0020", "CARESTREAM", "000402", "6", "0"),  # row 6: digit > 3
    ("6.dcm", "0021", "CARESTREAM", "001223", "9", "0"),  # row 7: sums to 8
    ("7.dcm", "0022", "CARESTREAM", "111111", "6", "0"),  # row 8: file missing
    ("8.dcm", "0023", "CARESTREAM", "222222", "12", "0"),  # row 9: truncated
    ("9.dcm", "0024", "SIEMENS", "333333", "18", "1"),  # row 10
    ("10.dcm", "0025", "CARESTREAM", "012012", "6", "0"),  # row 11
    ("11.dcm", "0025", "CARESTREAM", "001001", "2", "0"),  # row 12
    ("12.dcm", "0026", "CARESTREAM", "100000", "1", "0"),  # row 13
    ("13.dcm", "0027", "KODAK", "000001", "1", "0"),  # row 14: small manufacturer -> OTHER
    ("14.dcm", "0028", "", "000010", "1", "0"),  # row 15: no manufacturer -> OTHER
    ("15.dcm", "0029", "Philips Medical", "010000", "1", "0"),  # row 16
    ("16.dcm", "0029", "Philips Medical", "020000", "2", "0"),  # row 17
    ("17.dcm", "0030", "Philips Medical", "030000", "3", "0"),  # row 18
    ("18.dcm", "0031", "AGFA", "300000", "3", "0"),  # row 19: small -> OTHER
]
BX_SITES = {
    "CARESTREAM": ["10.dcm", "11.dcm", "12.dcm"],
    "OTHER": ["13.dcm", "14.dcm", "18.dcm"],
    "PHILIPS_MEDICAL": ["15.dcm", "16.dcm", "17.dcm"],
    "SIEMENS": ["1.dcm", "2.dcm", "9.dcm"],
}
BX_REJECTED = {
    "SIEMENS": {
        "metadata_global_v2.csv:row 4": "'00102' is not six digits 0-3 (5 characters",
        "metadata_global_v2.csv:row 5": "'0001a2' is not six digits 0-3 (characters other than digits",
    },
    "CARESTREAM": {
        "metadata_global_v2.csv:row 6": "'000402' is not six digits 0-3 (a zone score above 3",
        "metadata_global_v2.csv:row 7": "sums to 8 but BrixiaScoreGlobal is 9",
        "metadata_global_v2.csv:row 8": "DICOM not found: dicom_clean/7.dcm",
        "metadata_global_v2.csv:row 9": "truncated",
    },
    "": {"dicom_clean/99.dcm": UNREFERENCED},
}


@pytest.fixture(scope="module")
def bx_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("bx") / "BRIXIA"
    d = src / "dicom_clean"
    rows = []
    for k, (fname, subj, manu, score, glob, cons) in enumerate(BX_ROWS):
        if fname == "8.dcm":
            _truncated(d / fname)
        elif fname != "7.dcm":
            _dcm(d / fname, 100 + k, photometric="MONOCHROME1" if manu == "SIEMENS" else "MONOCHROME2")
        rows.append([fname, subj, str(5000 + k), "M", "65", manu, "CR", "MONOCHROME2", score, glob, cons, "16", "16"])
    _dcm(d / "99.dcm", 7)  # unreferenced
    pd.DataFrame(rows, columns=BX_HEADER, dtype=str).to_csv(src / "metadata_global_v2.csv", sep=";", index=False)
    return src


@pytest.fixture(scope="module")
def bx(bx_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("bx_out") / "fed"
    return out, import_brixia(bx_src, out, split_by="manufacturer", min_site_size=3, progress=False)


def _rejected_map(d: Path) -> dict[str, str]:
    df = read_rejected(d)
    assert (df["stage"] == "import").all()
    assert not df["reason"].str.contains("\n").any()
    return dict(zip(df["source"], df["reason"]))


def _assert_rejected(out: Path, expected: dict[str, dict[str, str]]) -> None:
    for site, want in expected.items():
        got = _rejected_map(out / site if site else out)
        assert sorted(got) == sorted(want), site
        for source, sub in want.items():
            assert sub in got[source], (source, got[source])


# ---------------------------------------------------------------------------------------------- AIforCOVID
@needs_xlsx
def test_aiforcovid_sites_counts_and_labels(aic, aic_src):
    out, summary = aic
    assert list_sites(out) == ["A", "B", "C", "D"]
    for site, (mild, severe) in AIC_EXPECT.items():
        df = read_manifest(out / site)
        assert ((df["prognosis"] == "MILD").sum(), (df["prognosis"] == "SEVERE").sum()) == (mild, severe)
        assert summary["sites"][site]["MILD"] == mild and summary["sites"][site]["SEVERE"] == severe
        assert (df["brixia"] == "").all() and (df["split"] == "").all()
        assert (df["patient_id"] == df["image"].str.extract(r"/([^/]+)\.dcm$")[0]).all()  # one CXR per patient
        assert list(df.columns) == ["image", "patient_id", "prognosis", "brixia", "split", "source_row", "source_file"]
        for rel in df["image"]:
            assert (out / site / rel).is_file()
    labels = {}
    for site in AIC_EXPECT:
        df = read_manifest(out / site)
        labels.update(dict(zip(df["patient_id"], df["prognosis"])))
    assert labels == AIC_LABELS
    c = read_manifest(out / "C")
    assert set(c["image"]) == {"images/imgs/P_11.dcm", "images/imgs_r2/P_1_7.dcm"}
    assert dict(zip(c["patient_id"], c["source_row"])) == {
        "P_11": "AIforCOVID.xlsx:row 14",
        "P_1_7": "AIforCOVID_r2.xlsx:row 3",
    }
    assert read_manifest(out / "A").set_index("patient_id").loc["P_3", "source_file"] == "imgs/P_3"
    assert summary["sheets"] == {"AIforCOVID.xlsx": "Foglio1", "AIforCOVID_r2.xlsx": "Dati"}


@needs_xlsx
def test_aiforcovid_rejections_normalisation_and_summary(aic):
    out, summary = aic
    _assert_rejected(out, AIC_REJECTED)
    assert summary["normalised_labels"] == 2
    assert summary["rejected"] == {
        "label not MILD/SEVERE": 2,
        "undecodable DICOM": 2,
        "unreferenced file": 2,
        "DICOM missing": 1,
        "ambiguous DICOM": 1,
        "duplicate row": 1,
        "no hospital": 1,
        "no image id": 1,
    }
    assert summary["rejected_total"] == 11 and summary["federation_rejected"] == 3
    assert {s: d["rejected"] for s, d in summary["sites"].items()} == {"A": 1, "B": 3, "C": 3, "D": 0, "E": 1}
    assert summary["sites"]["E"]["images"] == 0 and sorted(p.name for p in (out / "E").iterdir()) == ["rejected.csv"]
    assert any("AIforCOVID_r3.xlsx" in n for n in summary["notes"])
    text = format_import_summary(summary)
    assert "labels normalised (case/spaces): 2" in text and "Dati" in text
    lines = text.splitlines()
    assert any(line.split() == ["A", "3", "1", "2", "1"] for line in lines)
    assert any(line.split() == ["total", "8", "4", "4", "8"] for line in lines)


@needs_xlsx
def test_aiforcovid_links_resolve_to_the_source(aic, aic_src):
    out, _ = aic
    for site in AIC_EXPECT:
        df = read_manifest(out / site)
        for rel, srcrel in zip(df["image"], df["source_file"]):
            p = out / site / rel
            assert p.is_symlink() and os.path.isabs(os.readlink(p))
            assert p.resolve() == (aic_src / srcrel).resolve()


@needs_xlsx
def test_aiforcovid_copy_and_keep_clinical(aic_src, tmp_path):
    out = tmp_path / "copy"
    import_aiforcovid(aic_src, out, link=False, keep_clinical=True, progress=False)
    df = read_manifest(out / "A")
    assert {"Age", "Sex"} <= set(df.columns)
    assert not {"Prognosis", "Hospital", "ImageFile"} & set(df.columns)
    assert dict(zip(df["patient_id"], df["Age"])) == {"P_1": "70", "P_2": "64", "P_3": "81"}
    c = read_manifest(out / "C").set_index("patient_id")
    assert c.loc["P_1_7", "Age"] == "71" and c.loc["P_1_7", "Sex"] == ""  # r2 has no Sex column
    for site in AIC_EXPECT:
        m = read_manifest(out / site)
        for rel, srcrel in zip(m["image"], m["source_file"]):
            p = out / site / rel
            assert p.is_file() and not p.is_symlink()
            assert p.read_bytes() == (aic_src / srcrel).read_bytes()


@needs_xlsx
def test_aiforcovid_reimport_is_idempotent_and_refuses_foreign_folders(aic_src, tmp_path):
    out = tmp_path / "fed"
    first = import_aiforcovid(aic_src, out, progress=False)
    snap = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.csv"))}
    (out / "A" / "stale.txt").write_text("left by hand")
    second = import_aiforcovid(aic_src, out, progress=False)
    assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.csv"))} == snap
    assert not (out / "A" / "stale.txt").exists()
    for s in (first, second):
        s.pop("wall_s")
    assert first == second
    # a copy re-import replaces the links
    import_aiforcovid(aic_src, out, link=False, progress=False)
    assert not any(p.is_symlink() for p in (out / "A").rglob("*"))

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("mine")
    with pytest.raises(DataError) as e:
        import_aiforcovid(aic_src, foreign, progress=False)
    assert "holds no earlier import" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in foreign.iterdir()) == ["x.txt"]


@needs_xlsx
def test_aiforcovid_malformed_sources(aic_src, tmp_path):
    empty = tmp_path / "nosheets"
    (empty / "imgs").mkdir(parents=True)
    with pytest.raises(DataError, match="no AIforCOVID spreadsheets"):
        import_aiforcovid(empty, tmp_path / "o1", progress=False)
    bad = tmp_path / "badsheet"
    (bad / "imgs").mkdir(parents=True)
    _xlsx(bad / "AIforCOVID.xlsx", [("S", [["ImageFile", "Hospital", "Outcome"], ["P_1", "A", "MILD"]])])
    with pytest.raises(DataError) as e:
        import_aiforcovid(bad, tmp_path / "o2", progress=False)
    msg = str(e.value)
    assert "AIforCOVID.xlsx" in msg and "Prognosis" in msg and "\n" not in msg
    assert not (tmp_path / "o2").exists()


# ---------------------------------------------------------------------------------------------- BRIXIA
def test_brixia_split_by_manufacturer(bx):
    out, summary = bx
    assert list_sites(out) == sorted(BX_SITES)
    scores = {r[0]: r[3] for r in BX_ROWS}
    for site, files in BX_SITES.items():
        df = read_manifest(out / site)
        assert sorted(df["image"]) == sorted(f"images/{f}" for f in files)
        assert dict(zip(df["image"], df["brixia"])) == {f"images/{f}": scores[f] for f in files}
        assert (df["prognosis"] == "").all()
        assert list(df.columns) == [
            "image",
            "patient_id",
            "prognosis",
            "brixia",
            "split",
            "ConsensusTestset",
            "Manufacturer",
            "Modality",
            "StudyId",
            "source_row",
        ]
        assert summary["sites"][site]["images"] == len(files)
    s = read_manifest(out / "SIEMENS").set_index("image")
    assert s.loc["images/1.dcm", "brixia"] == "000000" and s.loc["images/2.dcm", "brixia"] == "000102"
    assert s.loc["images/1.dcm", "patient_id"] == "0017" and s.loc["images/1.dcm", "ConsensusTestset"] == "1"
    raw = (out / "SIEMENS" / "manifest.csv").read_text()
    assert ",000000," in raw and ",000102," in raw  # on disk as text, leading zeros kept
    assert sorted(read_manifest(out / "OTHER")["Manufacturer"]) == ["", "AGFA", "KODAK"]
    assert summary["merged_into_other"] == ["(empty)", "AGFA", "KODAK"]
    assert summary["sites"]["SIEMENS"]["consensus_testset"] == 2 and summary["sites"]["SIEMENS"]["patients"] == 2
    _assert_rejected(out, BX_REJECTED)
    assert summary["rejected"] == {
        "malformed BrixiaScore": 3,
        "DICOM missing": 1,
        "score/global mismatch": 1,
        "undecodable DICOM": 1,
        "unreferenced file": 1,
    }
    text = format_import_summary(summary)
    assert "PHILIPS_MEDICAL" in text and "malformed BrixiaScore" in text


def test_brixia_single_site_copy_and_reimport(bx_src, tmp_path):
    out = tmp_path / "fed"
    first = import_brixia(bx_src, out, link=False, progress=False)
    assert list_sites(out) == ["BRIXIA"]
    df = read_manifest(out / "BRIXIA")
    assert len(df) == 12 and first["sites"]["BRIXIA"]["images"] == 12
    assert all((out / "BRIXIA" / p).is_file() and not (out / "BRIXIA" / p).is_symlink() for p in df["image"])
    assert len(read_rejected(out / "BRIXIA")) == 6
    snap = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.csv"))}
    import_brixia(bx_src, out, link=False, progress=False)
    assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.csv"))} == snap
    # switching to split_by manufacturer replaces the BRIXIA site
    import_brixia(bx_src, out, split_by="manufacturer", min_site_size=3, progress=False)
    assert list_sites(out) == sorted(BX_SITES) and not (out / "BRIXIA").exists()


def test_brixia_bad_arguments(bx_src, tmp_path):
    with pytest.raises(ConfigError) as e:
        import_brixia(bx_src, tmp_path / "o", split_by="vendor", progress=False)
    assert "split_by" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="DICOM folder not found"):
        import_brixia(bx_src, tmp_path / "o", dicom_dir="dicom", progress=False)
    bad = tmp_path / "bad"
    (bad / "dicom_clean").mkdir(parents=True)
    (bad / "metadata_global_v2.csv").write_text("Filename,Subject,BrixiaScore\n1.dcm,1,000000\n")
    with pytest.raises(DataError) as e:
        import_brixia(bad, tmp_path / "o", progress=False)
    assert "metadata_global_v2.csv" in str(e.value) and "separator" in str(e.value)


@needs_xlsx
def test_both_datasets_share_one_federation(aic_src, bx_src, tmp_path):
    out = tmp_path / "fed"
    import_aiforcovid(aic_src, out, progress=False)
    import_brixia(bx_src, out, progress=False)
    assert list_sites(out) == ["A", "B", "BRIXIA", "C", "D"]
    fed_rows = set(read_rejected(out)["source"])
    assert {"imgs/P_99.dcm", "dicom_clean/99.dcm"} <= fed_rows
    import_aiforcovid(aic_src, out, progress=False)  # re-import keeps the other importer's site and rows
    assert list_sites(out) == ["A", "B", "BRIXIA", "C", "D"]
    assert set(read_rejected(out)["source"]) == fed_rows


# ---------------------------------------------------------------------------------------------- synthetic layouts
SYN_SCALE, SYN_SIZE = 0.02, 32


@needs_xlsx
def test_synthetic_aiforcovid_layout_imports_to_the_target_counts(tmp_path):
    src = tmp_path / "aic"
    synth.synthesize(src, scale=SYN_SCALE, image_size=SYN_SIZE, seed=3, layout="aiforcovid", progress=False)
    out = tmp_path / "fed"
    summary = import_aiforcovid(src, out, progress=False)
    tg = synth.targets(SYN_SCALE)
    assert list_sites(out) == list(synth.PROGNOSIS_SITES)
    for site in synth.PROGNOSIS_SITES:
        df = read_manifest(out / site)
        got = {"MILD": int((df["prognosis"] == "MILD").sum()), "SEVERE": int((df["prognosis"] == "SEVERE").sum())}
        assert got == tg[site]
    assert summary["rejected_total"] == 0 and summary["normalised_labels"] == 0
    truth = pd.read_csv(src / "synth_truth.csv", dtype=str, keep_default_na=False)
    man = pd.concat([read_manifest(out / s).assign(site=s) for s in synth.PROGNOSIS_SITES])
    t = truth.set_index("image_id")
    assert (t.loc[man["patient_id"], "prognosis"].values == man["prognosis"].values).all()
    assert (t.loc[man["patient_id"], "site"].values == man["site"].values).all()


def test_synthetic_brixia_layout_imports_the_exact_scores(tmp_path):
    src = tmp_path / "bx"
    synth.synthesize(src, scale=SYN_SCALE, image_size=SYN_SIZE, seed=3, layout="brixia", progress=False)
    out = tmp_path / "fed"
    summary = import_brixia(src, out, progress=False)
    assert summary["rejected_total"] == 0
    df = read_manifest(out / "BRIXIA")
    truth = pd.read_csv(src / "synth_truth.csv", dtype=str, keep_default_na=False).set_index("federation_image")
    assert len(df) == len(truth) == sum(synth.targets(SYN_SCALE)["BRIXIA"]["global_score_counts"])
    assert (truth.loc[df["image"], "brixia"].values == df["brixia"].values).all()
    assert (truth.loc[df["image"], "federation_patient_id"].values == df["patient_id"].values).all()
    assert df["brixia"].str.startswith("0").any()
    assert int((df["ConsensusTestset"] == "1").sum()) == synth.scaled_count(150, SYN_SCALE, synth.CONSENSUS_FLOOR)
    by_manu = import_brixia(src, tmp_path / "fed2", split_by="manufacturer", min_site_size=10, progress=False)
    assert sum(d["images"] for d in by_manu["sites"].values()) == len(df)
    assert "OTHER" in by_manu["sites"] and "SIEMENS" in by_manu["sites"]
