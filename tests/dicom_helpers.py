"""Helpers shared by the tests: real DICOM files written with pydicom."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def write_dicom(path, arr, photometric="MONOCHROME2", bits_stored=None, modality="CR", **elements):
    """A real DICOM file (preamble + file meta) written by pydicom's dcmwrite."""
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Manufacturer = "TESTCO"
    arr = np.asarray(arr)
    if bits_stored is None:
        bits_stored = 12 if arr.dtype == np.uint16 else arr.dtype.itemsize * 8
    ds.set_pixel_data(arr, photometric, bits_stored=bits_stored)
    for k, v in elements.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return path
