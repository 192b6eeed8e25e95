"""The AIforCOVID importer: DICOM folders ``imgs/``, ``imgs_r2/``, ``imgs_r3/`` and the workbooks
``AIforCOVID.xlsx``, ``AIforCOVID_r2.xlsx``, ``AIforCOVID_r3.xlsx`` -> one site per hospital.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mdmt.data.importers.common import (
    R_DUPLICATE_ROW,
    R_MISSING,
    R_NO_ID,
    R_UNDECODABLE,
    Rejection,
    check_decodable,
    check_out,
    index_files,
    lookup,
    progress_bar,
    read_workbook,
    rejected_counts,
    rejected_only_notes,
    route_rejected,
    site_name,
    strip_dcm,
    unreferenced_files,
    write_output,
)
from mdmt.data.manifest import PROGNOSIS_LABELS
from mdmt.errors import DataError

AIFORCOVID_COLUMNS = ("ImageFile", "Hospital", "Prognosis")
#: ``AIforCOVID.xlsx`` -> release 1 / ``imgs``; ``AIforCOVID_r<k>.xlsx`` -> release k / ``imgs_r<k>``.
_WORKBOOK_RE = re.compile(r"^aiforcovid(?:_r(\d+))?\.xlsx$", re.IGNORECASE)
_IMG_DIR_RE = re.compile(r"^imgs(?:_r(\d+))?$")
_RESERVED = {"image", "patient_id", "prognosis", "brixia", "split", "source_row", "source_file"}

#: Rejection categories of this importer (besides the shared ones).
R_NO_HOSPITAL = "no hospital"
R_BAD_LABEL = "label not MILD/SEVERE"


@dataclass
class _Source:
    """The published layout: workbooks and image folders by release, the sheets read, the folder indexes."""

    books: dict[int, Path]
    folders: dict[int, Path]
    sheets: dict[int, tuple] = field(default_factory=dict)
    indexes: dict[int, dict[str, list[Path]]] = field(default_factory=dict)


@dataclass
class _Scan:
    """What the spreadsheet rows gave: accepted images, rejections, and what the summary reports."""

    rejected: list[Rejection] = field(default_factory=list)
    accepted: list[dict] = field(default_factory=list)  # site, release, id, path, prognosis, source, clinical
    normalised: int = 0
    clinical_cols: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    referenced: dict[int, set[str]] = field(default_factory=dict)


def _aiforcovid_releases(src: Path) -> tuple[dict[int, Path], dict[int, Path]]:
    books: dict[int, Path] = {}
    for p in sorted(src.iterdir()):
        m = _WORKBOOK_RE.match(p.name)
        if m and p.is_file() and not p.name.startswith("~$"):
            books[int(m.group(1) or 1)] = p
    folders: dict[int, Path] = {}
    for p in sorted(src.iterdir()):
        m = _IMG_DIR_RE.match(p.name)
        if m and p.is_dir():
            folders[int(m.group(1) or 1)] = p
    return books, folders


def _folder_name(release: int) -> str:
    return "imgs" if release == 1 else f"imgs_r{release}"


def _open_source(src: Path, out: Path) -> _Source:
    """Check ``src`` and ``out``, read every workbook and index every image folder."""
    if not src.is_dir():
        raise DataError(f"{src}: AIforCOVID source folder not found")
    books, folders = _aiforcovid_releases(src)
    check_out(out, src, {p.name for p in folders.values()})
    if not books:
        raise DataError(
            f"{src}: no AIforCOVID spreadsheets (AIforCOVID.xlsx, AIforCOVID_r2.xlsx, "
            "AIforCOVID_r3.xlsx); is this the AIforCOVID folder?"
        )
    source = _Source(books, folders)
    for release in sorted(books):
        source.sheets[release] = read_workbook(books[release], AIFORCOVID_COLUMNS)
    source.indexes = {r: index_files(folders[r]) for r in sorted(folders)}
    return source


def _check_row(
    vals: dict[str, str],
    rnum: int,
    book: str,
    folder: str,
    idx: dict[str, list[Path]] | None,
    src: Path,
    referenced: set[str],
    first_row: dict[str, int],
) -> Rejection | dict:
    """One spreadsheet row: its rejection, or the accepted image (site, id, path, prognosis, source)."""
    source = f"{book}:row {rnum}"
    hosp = vals.get("Hospital", "").strip()
    site = site_name(hosp) if hosp else None
    raw_id = vals.get("ImageFile", "").strip()
    key = strip_dcm(raw_id) if raw_id else ""
    if not key:
        return Rejection(source, "ImageFile is empty", R_NO_ID, site)
    referenced.add(key)
    if key in first_row:
        return Rejection(
            source,
            f"ImageFile {key} is listed twice in this sheet (first at {book}:row {first_row[key]})",
            R_DUPLICATE_ROW,
            site,
        )
    first_row[key] = rnum
    if site is None:
        return Rejection(source, f"Hospital is empty (ImageFile {key})", R_NO_HOSPITAL, None)
    raw_label = vals.get("Prognosis", "")
    label = raw_label.strip().upper()
    if label not in PROGNOSIS_LABELS:
        shown = f"{raw_label!r}" if raw_label else "empty"
        return Rejection(
            source,
            f"Prognosis {shown} is not MILD or SEVERE (after trimming spaces and upper-casing)",
            R_BAD_LABEL,
            site,
        )
    if idx is None:
        return Rejection(source, f"DICOM not found: folder {folder}/ does not exist", R_MISSING, site)
    path, rej = lookup(idx, key, folder, src)
    if rej is not None:
        rej.source, rej.site = source, site
        return rej
    bad = check_decodable(path, path.relative_to(src).as_posix())
    if bad:
        return Rejection(source, bad, R_UNDECODABLE, site)
    return {"site": site, "id": key, "path": path, "prognosis": label, "source": source}


def _scan_release(scan: _Scan, source: _Source, release: int, src: Path, bar) -> None:
    """Check every row of one release's sheet against that release's image folder."""
    book = source.books[release]
    sheet_name, cols, rows, note = source.sheets[release]
    if note:
        scan.notes.append(f"{book.name}: {note}")
    fname = _folder_name(release)
    idx = source.indexes.get(release)
    if idx is None:
        scan.notes.append(f"{book.name}: folder {fname}/ not found; its rows are rejected")
    for c in cols:
        if c not in AIFORCOVID_COLUMNS and c not in scan.clinical_cols:
            scan.clinical_cols.append(c)
    referenced = scan.referenced.setdefault(release, set())
    first_row: dict[str, int] = {}
    for rnum, vals in rows:
        if bar is not None:
            bar.update(1)
        got = _check_row(vals, rnum, book.name, fname, idx, src, referenced, first_row)
        if isinstance(got, Rejection):
            scan.rejected.append(got)
            continue
        if got["prognosis"] != vals.get("Prognosis", ""):
            scan.normalised += 1
        scan.accepted.append(
            {**got, "release": release, "clinical": {c: vals.get(c, "") for c in cols if c not in AIFORCOVID_COLUMNS}}
        )


def _scan_rows(source: _Source, src: Path, progress: bool) -> _Scan:
    """Every sheet row checked (with a progress bar), then the image files no row referenced."""
    scan = _Scan()
    bar = progress_bar(sum(len(s[2]) for s in source.sheets.values()), "import AIforCOVID", progress)
    try:
        for release in sorted(source.sheets):
            _scan_release(scan, source, release, src, bar)
    finally:
        if bar is not None:
            bar.close()
    for release in sorted(source.indexes):
        if release not in source.books:
            scan.notes.append(
                f"{_folder_name(release)}/: no "
                f"{'AIforCOVID' if release == 1 else f'AIforCOVID_r{release}'}"
                ".xlsx; its files are listed as unreferenced"
            )
        scan.rejected.extend(unreferenced_files(source.indexes[release], scan.referenced.get(release, set()), src))
    return scan


def _build_manifests(scan: _Scan, src: Path, keep_clinical: bool):
    """(site -> manifest, site -> [(source file, destination in the site folder)]) of the accepted images."""
    sites: dict[str, pd.DataFrame] = {}
    files: dict[str, list[tuple[Path, Path]]] = {}
    clin_names = {c: (f"{c}_clinical" if c.lower() in _RESERVED else c) for c in scan.clinical_cols}
    for site in sorted({a["site"] for a in scan.accepted}):
        rows = []
        for a in [a for a in scan.accepted if a["site"] == site]:
            rel = f"images/{_folder_name(a['release'])}/{a['id']}.dcm"
            files.setdefault(site, []).append((a["path"], Path(rel)))
            row = {
                "image": rel,
                "patient_id": a["id"],
                "prognosis": a["prognosis"],
                "brixia": "",
                "split": "",
                "source_row": a["source"],
                "source_file": a["path"].relative_to(src).as_posix(),
            }
            if keep_clinical:
                for c in scan.clinical_cols:
                    row[clin_names[c]] = a["clinical"].get(c, "")
            rows.append(row)
        sites[site] = pd.DataFrame(rows)
    return sites, files


def _site_summaries(sites: dict[str, pd.DataFrame], site_rej: dict[str, list[Rejection]]) -> dict[str, dict]:
    out = {}
    for s in sorted(set(sites) | set(site_rej)):
        df = sites.get(s)
        out[s] = {
            "images": 0 if df is None else len(df),
            "MILD": 0 if df is None else int((df["prognosis"] == "MILD").sum()),
            "SEVERE": 0 if df is None else int((df["prognosis"] == "SEVERE").sum()),
            "rejected": len(site_rej.get(s, [])),
        }
    return out


def import_aiforcovid(src, out, link=True, keep_clinical=False, progress=True) -> dict:
    """Import the published AIforCOVID layout at ``src`` into the federation ``out`` (one site per hospital).

    Returns the summary rendered by :func:`format_import_summary`.
    """
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    source = _open_source(src, out)
    scan = _scan_rows(source, src, progress)
    sites, files = _build_manifests(scan, src, keep_clinical)
    site_rej, fed_rej = route_rejected(scan.rejected)
    notes = scan.notes + rejected_only_notes(site_rej, sites)
    params = {"link": bool(link), "keep_clinical": bool(keep_clinical)}
    write_output(out, "aiforcovid", src, params, sites, site_rej, fed_rej, files, link)
    summary_sites = _site_summaries(sites, site_rej)
    return {
        "importer": "aiforcovid",
        "source": str(src),
        "out": str(out),
        "link": bool(link),
        "keep_clinical": bool(keep_clinical),
        "sheets": {source.books[r].name: source.sheets[r][0] for r in sorted(source.sheets)},
        "sites": summary_sites,
        "images": sum(d["images"] for d in summary_sites.values()),
        "normalised_labels": scan.normalised,
        "rejected": rejected_counts(scan.rejected),
        "rejected_total": len(scan.rejected),
        "federation_rejected": len(fed_rej),
        "notes": notes,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
