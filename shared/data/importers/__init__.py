"""Importers: the two datasets as published -> the federation format of ``mdmt.data.manifest``.

``import_aiforcovid(src, out, ...)`` reads the AIforCOVID layout (DICOM folders ``imgs/``, ``imgs_r2/``,
``imgs_r3/`` and the workbooks ``AIforCOVID.xlsx``, ``AIforCOVID_r2.xlsx``, ``AIforCOVID_r3.xlsx``) and
writes one site per hospital. ``import_brixia(src, out, ...)`` reads the BRIXIA layout (``dicom_clean/``
and ``metadata_global_v2.csv``) and writes the site ``BRIXIA`` or one site per manufacturer.

Both follow the same contract (docs/importers.md):

* a bad input row or file never stops an import: it is listed in ``rejected.csv`` (stage ``import``) with
  a one-line reason, in its site's folder or, when it belongs to no site, in the federation folder;
* images are symlinked (absolute links to the resolved source file) or copied into
  ``OUT/<site>/images/...``; manifest image paths are relative to the site folder;
* ``OUT/import.json`` records what each importer wrote: a re-import replaces exactly that (idempotent),
  the other importer's sites are kept (both datasets can share one federation folder), and a non-empty
  ``OUT`` without ``import.json`` is refused;
* the returned summary (per-site counts, rejected counts by reason) is rendered by
  :func:`format_import_summary`.

``common`` holds what both share (spreadsheet/CSV reading, the DICOM index, the output folder, the
summary); ``aiforcovid`` and ``brixia`` hold one importer each.
"""

from mdmt.data.importers.aiforcovid import import_aiforcovid
from mdmt.data.importers.brixia import SPLIT_BY, import_brixia
from mdmt.data.importers.common import UNREFERENCED, format_import_summary

__all__ = ["import_aiforcovid", "import_brixia", "format_import_summary", "UNREFERENCED", "SPLIT_BY"]
