"""Helpers shared by the tests: real DICOM files written with pydicom."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def _dataset(sop_class, modality):
    """An empty dataset with file meta (Explicit VR Little Endian) and fresh instance UIDs."""
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    return ds


def write_dicom(path, arr, photometric="MONOCHROME2", bits_stored=None, modality="CR", **elements):
    """A real DICOM file (preamble + file meta) written by pydicom's dcmwrite."""
    ds = _dataset(SecondaryCaptureImageStorage, modality)
    ds.Manufacturer = "TESTCO"
    arr = np.asarray(arr)
    if bits_stored is None:
        bits_stored = 12 if arr.dtype == np.uint16 else arr.dtype.itemsize * 8
    ds.set_pixel_data(arr, photometric, bits_stored=bits_stored)
    for k, v in elements.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_as(path, arr, transfer_syntax, photometric="MONOCHROME2", bits_stored=None, modality="CR", **elements):
    """A DICOM file in another transfer syntax: Implicit VR Little Endian, Explicit VR Big Endian (pixel
    bytes swapped by hand: pydicom does not convert endianness), Deflated, or a compressed syntax encoded
    by pydicom's own encoders (``Dataset.compress``: RLE Lossless, JPEG 2000 Lossless via pylibjpeg-openjpeg)."""
    import pydicom
    from pydicom import uid

    path = write_dicom(path, arr, photometric, bits_stored, modality, **elements)
    ds = pydicom.dcmread(path)
    ts = uid.UID(transfer_syntax)
    if ts == uid.ExplicitVRBigEndian:
        big = Dataset()
        big.update(ds)  # a plain Dataset: FileDataset.save_as refuses to change endianness
        big.file_meta = ds.file_meta
        big.file_meta.TransferSyntaxUID = ts
        a = np.asarray(arr)
        big.PixelData = a.astype(a.dtype.newbyteorder(">")).tobytes()
        big["PixelData"].VR = "OW" if a.dtype.itemsize > 1 else "OB"
        big.save_as(path, enforce_file_format=True)
    elif ts.is_compressed:
        ds.compress(ts)
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.file_meta.TransferSyntaxUID = ts
        ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_bytes(arr8, quality=95):
    """Baseline JPEG bytes of a uint8 grey image, encoded by Pillow."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr8, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_jpeg_baseline_dicom(path, arr8, quality=95):
    """A JPEG Baseline (Process 1) DICOM file: Pillow's JPEG bytes encapsulated by pydicom."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    path = write_dicom(path, arr8, "MONOCHROME2", bits_stored=8)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([jpeg_bytes(arr8, quality)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(path, enforce_file_format=True)
    return path


def write_non_image(path, sop_class):
    """A DICOM object without pixel data, e.g. a structured report or a presentation state."""
    ds = _dataset(sop_class, "SR")
    ds.PatientID = "P1"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicomdir(folder, image_path):
    """A DICOMDIR file (media directory) in ``folder`` indexing a copy of ``image_path``; returns its path."""
    import pydicom
    from pydicom.fileset import FileSet

    ds = pydicom.dcmread(image_path)
    ds.PatientID = "P1"
    ds.PatientName = "Test^Patient"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = "20200101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = "1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    fs = FileSet()
    fs.add(ds)
    fs.write(folder)
    return folder / "DICOMDIR"


def pydicom_test_file(name):
    """Path of a test file that ships inside the pydicom wheel (never downloaded), or None."""
    from pydicom.data import get_testdata_file

    try:
        return get_testdata_file(name, download=False)
    except Exception:
        return None


def write_dual_personality(path, arr, **elements):
    """A valid DICOM file whose 128-byte preamble starts with a TIFF header (a "dual-personality" file, as
    some archives write them so that TIFF viewers can open them too)."""
    import pydicom

    write_dicom(path, arr, **elements)
    ds = pydicom.dcmread(path)
    ds.preamble = b"II*\x00" + bytes(124)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_deflate_bomb(path, rows=20000, cols=20000):
    """A Deflated Explicit VR Little Endian DICOM that declares rows x cols 16-bit pixels, all zero: under
    1 MB on disk, rows x cols x 2 bytes once inflated. Written by streaming zeros through zlib, so writing
    it takes no more memory than a chunk."""
    import io
    import struct
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = _dataset(SecondaryCaptureImageStorage, "CR")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    n = rows * cols * 2
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n)
    meta = io.BytesIO()
    meta.write(bytes(128) + b"DICM")
    meta_fp = DicomBytesIO()
    meta_fp.is_little_endian, meta_fp.is_implicit_VR = True, False
    write_file_meta_info(meta_fp, ds.file_meta, enforce_standard=True)
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    with open(path, "wb") as fh:
        fh.write(meta.getvalue() + meta_fp.getvalue())
        fh.write(deflater.compress(body.getvalue() + pixel_header))
        left = n
        while left:
            k = min(left, len(zeros))
            fh.write(deflater.compress(zeros[:k]))
            left -= k
        fh.write(deflater.flush())
    return path
