"""The published layouts (layout="aiforcovid" / "brixia"): same images and labels, the datasets' own files."""

from __future__ import annotations

import datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pandas as pd

from mdmt.data.synth.looks import look_for
from mdmt.data.synth.model import BRIXIA_FLOOR, PROGNOSIS_SITES, SEVERITY_SITE, scaled_count
from mdmt.data.synth.writer import patient, write_image
from mdmt.errors import ConfigError
from mdmt.seeding import derive_seed

#: ``federation``: the federation format; ``aiforcovid`` / ``brixia``: the datasets' published layouts
#: (A-F resp. BRIXIA only), for the importers of ``mdmt.data.importers``.
LAYOUTS = ("federation", "aiforcovid", "brixia")
#: layout="brixia": the published consensus test set (150 images at scale 1), scaled like BRIXIA's buckets.
CONSENSUS_TESTSET_COUNT = 150
CONSENSUS_FLOOR = BRIXIA_FLOOR
#: layout="aiforcovid": share of the A-F images in release 1, 2, 3 (imgs/, imgs_r2/, imgs_r3/). ASSUMPTION:
#: the real releases' sizes are not in our notes.
AIFORCOVID_RELEASE_SHARES = (0.5, 0.3, 0.2)
AIFORCOVID_NO_SUFFIX_SHARE = 0.25  # DICOM files written without the .dcm suffix
AIFORCOVID_IMAGEFILE_DCM_SHARE = 0.5  # ImageFile cells written with the .dcm suffix
#: File and folder names of the published layouts.
AIFORCOVID_WORKBOOKS = ("AIforCOVID.xlsx", "AIforCOVID_r2.xlsx", "AIforCOVID_r3.xlsx")
AIFORCOVID_IMG_DIRS = ("imgs", "imgs_r2", "imgs_r3")
BRIXIA_DICOM_DIR = "dicom_clean"
BRIXIA_METADATA = "metadata_global_v2.csv"
BRIXIA_METADATA_COLUMNS = (
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
)
AIFORCOVID_SHEET_COLUMNS = ("ImageFile", "Hospital", "Age", "Sex", "Fever", "Cough", "Prognosis")
PUBLISHED_DIRS = AIFORCOVID_IMG_DIRS + (BRIXIA_DICOM_DIR,)
PUBLISHED_FILES = AIFORCOVID_WORKBOOKS + (BRIXIA_METADATA,)
_LEGEND = {
    "ImageFile": "image id (file name in the release's imgs folder, with or without .dcm)",
    "Hospital": "centre letter A-F",
    "Age": "age in years at admission",
    "Sex": "M or F",
    "Fever": "fever at admission (1 yes, 0 no)",
    "Cough": "cough at admission (1 yes, 0 no)",
    "Prognosis": "MILD or SEVERE",
}


def need_openpyxl() -> None:
    try:
        import openpyxl  # noqa: F401  # deferred: openpyxl (optional; checked before anything is written)
    except ImportError:
        raise ConfigError(
            "synth layout 'aiforcovid' writes .xlsx workbooks and needs openpyxl (pip install openpyxl)"
        ) from None


def _round_half_up(x: float) -> int:
    return int(Decimal(repr(float(x))).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _aiforcovid_files(plans: dict, seed: int) -> list[dict]:
    """Where each A-F image goes in the AIforCOVID layout: release, image id, file path, ImageFile cell,
    clinical columns. Seeded by name, independent of the rendering streams."""
    rng = np.random.default_rng(derive_seed(seed, "synth", "aiforcovid", "layout"))
    pooled = [(s, k, rec) for s in PROGNOSIS_SITES for k, rec in enumerate(plans[s])]
    n = len(pooled)
    order = rng.permutation(n)
    n1 = _round_half_up(n * AIFORCOVID_RELEASE_SHARES[0])
    n2 = _round_half_up(n * AIFORCOVID_RELEASE_SHARES[1])
    release = np.full(n, 3)
    release[order[:n1]] = 1
    release[order[n1 : n1 + n2]] = 2
    rank = np.empty(n, int)
    rank[order] = np.arange(n)  # row order in the workbooks (shuffled)
    no_suffix = rng.random(n) < AIFORCOVID_NO_SUFFIX_SHARE
    with_dcm = rng.random(n) < AIFORCOVID_IMAGEFILE_DCM_SHARE
    nested = rng.random(n) < 0.5
    age = np.clip(np.rint(rng.normal(63, 15, n)), 18, 99).astype(int)
    fever = (rng.random(n) < 0.7).astype(int)
    cough = (rng.random(n) < 0.5).astype(int)
    n_r1, n_h = 0, {s: 0 for s in PROGNOSIS_SITES}
    out = []
    for i, (site, k, rec) in enumerate(pooled):
        r = int(release[i])
        h = PROGNOSIS_SITES.index(site) + 1
        if r == 1:
            n_r1 += 1
            image_id = f"P_{n_r1}"
            folder = AIFORCOVID_IMG_DIRS[0]
        else:
            n_h[site] += 1
            image_id = f"P_{h}_{n_h[site]}"
            if r == 2:
                folder = f"{AIFORCOVID_IMG_DIRS[1]}/{site}"
            else:
                folder = f"{AIFORCOVID_IMG_DIRS[2]}/part_2/{site}" if nested[i] else AIFORCOVID_IMG_DIRS[2]
        fname = image_id if no_suffix[i] else f"{image_id}.dcm"
        out.append(
            {
                "site": site,
                "k": k,
                "rec": rec,
                "release": r,
                "rank": int(rank[i]),
                "image_id": image_id,
                "path": f"{folder}/{fname}",
                "cells": {
                    "ImageFile": f"{image_id}.dcm" if with_dcm[i] else image_id,
                    "Hospital": site,
                    "Age": int(age[i]),
                    "Sex": patient(seed, site, rec["patient_id"])[1],
                    "Fever": int(fever[i]),
                    "Cough": int(cough[i]),
                    "Prognosis": rec["prognosis"],
                },
            }
        )
    return out


def _write_workbooks(out: Path, files: list[dict]) -> dict[str, int]:
    import openpyxl  # deferred: openpyxl (optional; only layout 'aiforcovid' writes workbooks)

    rows_per_book = {}
    for r, book in enumerate(AIFORCOVID_WORKBOOKS, start=1):
        wb = openpyxl.Workbook()
        wb.properties.creator = "mdmt synth"
        wb.properties.created = datetime.datetime(2020, 6, 1)
        ws = wb.active
        if r == 2:  # an extra sheet first: the importer must pick the sheet that has the needed columns
            ws.title = "Legend"
            ws.append(["Column", "Description"])
            for k in AIFORCOVID_SHEET_COLUMNS:
                ws.append([k, _LEGEND[k]])
            ws = wb.create_sheet("Data")
        else:
            ws.title = "AIforCOVID" if r == 1 else "Sheet1"
        ws.append(list(AIFORCOVID_SHEET_COLUMNS))
        recs = sorted((f for f in files if f["release"] == r), key=lambda f: f["rank"])
        for f in recs:
            ws.append([f["cells"][c] for c in AIFORCOVID_SHEET_COLUMNS])
        wb.save(out / book)
        rows_per_book[book] = len(recs)
    return rows_per_book


def _published_truth(row: dict, image: str, patient_id: str, image_id: str) -> dict:
    """A truth row of a published layout: ``image`` and ``patient_id`` as the importer will see them."""
    fed_image, fed_pid = row["image"], row["patient_id"]
    return {
        **row,
        "image": image,
        "patient_id": patient_id,
        "image_id": image_id,
        "federation_image": fed_image,
        "federation_patient_id": fed_pid,
    }


def write_published(out: Path, layout: str, plans: dict, seed: int, scale: float, image_size: int, bar) -> dict:
    """Write the images and tables of a published layout; return its description plus the truth rows."""
    truth: list[dict] = []
    if layout == "aiforcovid":
        files = _aiforcovid_files(plans, seed)
        for f in files:
            dest = out / f["path"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            row = write_image(out / f["site"], f["site"], f["k"], f["rec"], seed, image_size, dest=dest)
            truth.append(_published_truth(row, f["path"], f["image_id"], f["image_id"]))
            if bar is not None:
                bar.update(1)
        for d in AIFORCOVID_IMG_DIRS:
            (out / d).mkdir(exist_ok=True)
        books = _write_workbooks(out, files)
        return {
            "layout": "aiforcovid",
            "workbooks": books,
            "releases": {d: sum(f["release"] == r for f in files) for r, d in enumerate(AIFORCOVID_IMG_DIRS, 1)},
            "files_without_dcm_suffix": sum(not f["path"].endswith(".dcm") for f in files),
            "nested_files": sum(f["path"].count("/") > 1 for f in files),
            "imagefile_with_dcm": sum(f["cells"]["ImageFile"].endswith(".dcm") for f in files),
            "truth": truth,
        }
    # brixia
    recs = plans[SEVERITY_SITE]
    n = len(recs)
    consensus = consensus_flags(n, scale, seed)
    ddir = out / BRIXIA_DICOM_DIR
    ddir.mkdir(parents=True, exist_ok=True)
    meta_rows = []
    for k, rec in enumerate(recs):
        fname = Path(rec["image"]).name
        row = write_image(out / SEVERITY_SITE, SEVERITY_SITE, k, rec, seed, image_size, dest=ddir / fname)
        truth.append(_published_truth(row, f"{BRIXIA_DICOM_DIR}/{fname}", rec["patient_id"], fname))
        look = look_for(SEVERITY_SITE, rec["manufacturer"])
        arng = np.random.default_rng(derive_seed(seed, "synth", SEVERITY_SITE, "age", rec["patient_id"]))
        age5 = int(np.clip(5 * np.rint(arng.normal(65, 14) / 5), 20, 95))
        meta_rows.append(
            {
                "Filename": fname,
                "Subject": rec["patient_id"],
                "StudyId": str(k + 1),
                "Sex": patient(seed, SEVERITY_SITE, rec["patient_id"])[1],
                "AgeAtStudyDateFiveYear": str(age5),
                "Manufacturer": rec["manufacturer"],
                "Modality": look.modality,
                "PhotometricInterpretation": look.photometric,
                "BrixiaScore": rec["brixia"],
                "BrixiaScoreGlobal": str(rec["g"]),
                "ConsensusTestset": "1" if consensus[k] else "0",
                "Rows": str(row["rows"]),
                "Columns": str(row["columns"]),
            }
        )
        if bar is not None:
            bar.update(1)
    meta = pd.DataFrame(meta_rows, columns=list(BRIXIA_METADATA_COLUMNS), dtype=str)
    meta.to_csv(out / BRIXIA_METADATA, sep=";", index=False)
    return {
        "layout": "brixia",
        "dicom_dir": BRIXIA_DICOM_DIR,
        "metadata": BRIXIA_METADATA,
        "images": n,
        "consensus_testset": int(consensus.sum()),
        "truth": truth,
    }


def consensus_flags(n: int, scale: float, seed: int) -> np.ndarray:
    """Which BRIXIA images form the consensus test set (the published 150, scaled)."""
    n_cons = min(n, scaled_count(CONSENSUS_TESTSET_COUNT, scale, CONSENSUS_FLOOR))
    crng = np.random.default_rng(derive_seed(seed, "synth", SEVERITY_SITE, "consensus"))
    consensus = np.zeros(n, bool)
    consensus[crng.choice(n, size=n_cons, replace=False)] = True
    return consensus
