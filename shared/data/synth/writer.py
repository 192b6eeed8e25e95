"""DICOM writing: one planned image rendered and saved with pydicom, and its row of the truth table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mdmt.data.manifest import BRIXIA_ZONES, severity_class
from mdmt.data.synth.looks import Look, image_shape, look_for
from mdmt.data.synth.model import SEVERITY_SITE
from mdmt.data.synth.renderer import anatomy, render, to_stored
from mdmt.seeding import derive_seed


def _ds(v: float) -> str:
    s = f"{v:.6g}"
    return s if len(s) <= 16 else f"{v:.4e}"


def write_dicom(path: Path, stored: np.ndarray, look: Look, meta: dict) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset  # deferred: pydicom
    from pydicom.uid import (
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    ent = [str(meta["seed"]), meta["site"], meta["image"]]
    sop_class = ComputedRadiographyImageStorage if look.modality == "CR" else DigitalXRayImageStorageForPresentation
    sop_uid = generate_uid(entropy_srcs=ent + ["sop"])
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=ent + ["study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=ent + ["series"])
    ds.StudyDate = meta["date"]
    ds.StudyID = meta["study_id"]
    ds.AccessionNumber = ""
    ds.Modality = look.modality
    ds.Manufacturer = look.manufacturer
    ds.InstitutionName = f"Synthetic hospital {meta['site']}"
    ds.PatientName = meta["patient_id"]
    ds.PatientID = meta["patient_id"]
    ds.PatientBirthDate = ""
    ds.PatientSex = meta["sex"]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = meta["view"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if look.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ["L", "F"]  # displayed as usual: the patient's right on the image left
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = look.photometric
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = look.bits
    ds.HighBit = look.bits - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = _ds(look.slope)
    ds.RescaleIntercept = _ds(look.intercept)
    ds.RescaleType = "US"
    ds.PixelSpacing = [_ds(meta["spacing"]), _ds(meta["spacing"])]
    ds.WindowCenter = _ds(meta["wc"])
    ds.WindowWidth = _ds(meta["ww"])
    ds.PixelData = stored.astype("<u2", copy=False).tobytes()
    ds.save_as(path, enforce_file_format=True)


def patient(seed: int, site: str, patient_id: str) -> tuple[dict, str]:
    """A patient's anatomy and sex (seeded by the patient id)."""
    pat_rng = np.random.default_rng(derive_seed(seed, "synth", site, "patient", patient_id))
    anat = anatomy(pat_rng)
    return anat, ("M" if pat_rng.random() < 0.6 else "F")


def write_image(sdir: Path, site: str, k: int, rec: dict, seed: int, image_size: int, dest: Path | None = None) -> dict:
    """Render and write one planned image (to ``sdir / rec["image"]``, or ``dest``); return its truth row.

    Pixels, tags and UIDs depend only on (seed, site, rec), never on ``dest``: every layout writes the
    same bytes for the same image.
    """
    look = look_for(site, rec["manufacturer"])
    rows, cols = image_shape(look, image_size)
    anat, sex = patient(seed, site, rec["patient_id"])
    img_rng = np.random.default_rng(derive_seed(seed, "synth", site, "image", rec["image"]))
    view = "AP" if img_rng.random() < (0.7 if site == SEVERITY_SITE else 0.4) else "PA"
    img, spacing = render(anat, rec["zones"], look, rows, cols, img_rng)
    stored, wc, ww = to_stored(img, look)
    write_dicom(
        dest if dest is not None else sdir / rec["image"],
        stored,
        look,
        {
            "seed": seed,
            "site": site,
            "image": rec["image"],
            "patient_id": rec["patient_id"],
            "date": f"2020{3 + k % 3:02d}{1 + k % 28:02d}",
            "study_id": str(k + 1),
            "sex": sex,
            "view": view,
            "spacing": spacing,
            "wc": wc,
            "ww": ww,
        },
    )
    return {
        "site": site,
        "image": rec["image"],
        "patient_id": rec["patient_id"],
        **{f"zone_{zn}": int(v) for zn, v in zip(BRIXIA_ZONES, rec["zones"])},
        "brixia_latent": "".join(str(int(v)) for v in rec["zones"]),
        "global_score": rec["g"],
        "severity_class": severity_class(rec["g"]),
        "hidden": round(rec["hidden"], 6),
        "p_severe": round(rec["p"], 6),
        "prognosis": rec["prognosis"],
        "brixia": rec["brixia"],
        "manufacturer": look.manufacturer,
        "photometric": look.photometric,
        "rows": rows,
        "columns": cols,
    }
