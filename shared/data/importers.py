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
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mdmt.data.dicom import read_image
from mdmt.data.manifest import (
    PROGNOSIS_LABELS,
    SEVERITY_CLASS_NAMES,
    brixia_global,
    is_valid_brixia,
    read_rejected,
    severity_class,
    write_manifest,
    write_rejected,
)
from mdmt.errors import ConfigError, DataError, DicomRejected

STAGE = "import"
IMPORT_JSON = "import.json"
IMPORT_FORMAT = "mdmt-import"
UNREFERENCED = "no spreadsheet row references this file"

AIFORCOVID_COLUMNS = ("ImageFile", "Hospital", "Prognosis")
#: ``AIforCOVID.xlsx`` -> release 1 / ``imgs``; ``AIforCOVID_r<k>.xlsx`` -> release k / ``imgs_r<k>``.
_WORKBOOK_RE = re.compile(r"^aiforcovid(?:_r(\d+))?\.xlsx$", re.IGNORECASE)
_IMG_DIR_RE = re.compile(r"^imgs(?:_r(\d+))?$")
_HEADER_SEARCH_ROWS = 20  # the header is the first row (of the first 20) that names the needed columns

BRIXIA_METADATA = "metadata_global_v2.csv"
BRIXIA_REQUIRED = ("Filename", "Subject", "BrixiaScore", "BrixiaScoreGlobal")
#: metadata columns kept under their own names as extra manifest columns (empty when the metadata lacks
#: one). ``ConsensusTestset`` is what ``mdmt.data.splits.CONSENSUS_COLUMN`` reads.
BRIXIA_EXTRA = ("ConsensusTestset", "Manufacturer", "Modality", "StudyId")
BRIXIA_SITE = "BRIXIA"
_TRUE = ("1", "true", "yes")  # ConsensusTestset values counted as "in the consensus set" (as splits.py)
OTHER_SITE = "OTHER"
SPLIT_BY = ("none", "manufacturer")

#: Rejection categories (the keys of ``summary["rejected"]``).
R_NO_ID = "no image id"
R_NO_HOSPITAL = "no hospital"
R_BAD_LABEL = "label not MILD/SEVERE"
R_DUPLICATE_ROW = "duplicate row"
R_MISSING = "DICOM missing"
R_AMBIGUOUS = "ambiguous DICOM"
R_UNDECODABLE = "undecodable DICOM"
R_UNREFERENCED = "unreferenced file"
R_NO_SUBJECT = "no subject"
R_BAD_SCORE = "malformed BrixiaScore"
R_BAD_GLOBAL = "bad BrixiaScoreGlobal"
R_SUM_MISMATCH = "score/global mismatch"


@dataclass
class _Rej:
    source: str
    reason: str
    category: str
    site: str | None  # None: federation-level


_SITE_RE = re.compile(r"[A-Z0-9_-]+")


def _site_name(value: str) -> str:
    """Upper case, characters outside [A-Z0-9_-] replaced by ``_``."""
    return re.sub(r"[^A-Z0-9_-]", "_", value.strip().upper())


def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=True)


def _check_decodable(path: Path, shown: str) -> str | None:
    """None when ``read_image`` decodes the file, else the rejection reason."""
    try:
        read_image(path)
    except DicomRejected as exc:
        return f"undecodable DICOM {shown}: {exc}"
    return None


# --------------------------------------------------------------------------------------------------
# The DICOM index: file name without a '.dcm' suffix -> files below a folder
# --------------------------------------------------------------------------------------------------
def _strip_dcm(name: str) -> str:
    name = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    return name[:-4] if name.lower().endswith(".dcm") else name


def _looks_like_dicom(path: Path) -> bool:
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _index(folder: Path) -> dict[str, list[Path]]:
    """Every regular file below ``folder`` (hidden ones skipped), keyed by its name without '.dcm'."""
    idx: dict[str, list[Path]] = {}
    seen: set[str] = set()  # real paths of the folders walked: a symlinked folder loop is walked once
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = Path(root) / name
            if p.is_file():
                idx.setdefault(_strip_dcm(name), []).append(p)
    return idx


def _unreferenced(idx: dict[str, list[Path]], referenced: set[str], src: Path) -> list[_Rej]:
    out = []
    for key in sorted(idx):
        if key in referenced:
            continue
        for p in idx[key]:
            if _looks_like_dicom(p):
                out.append(_Rej(p.relative_to(src).as_posix(), UNREFERENCED, R_UNREFERENCED, None))
    return out


def _lookup(idx: dict[str, list[Path]], key: str, folder_name: str, src: Path) -> tuple[Path | None, _Rej | None]:
    """The one file of ``idx`` named ``key`` (with or without .dcm); else a rejection (source/site set later)."""
    hits = idx.get(key, [])
    if len(hits) == 1:
        return hits[0], None
    if not hits:
        return None, _Rej("", f"DICOM not found: no file {key} or {key}.dcm below {folder_name}/", R_MISSING, None)
    shown = ", ".join(p.relative_to(src).as_posix() for p in hits[:4]) + (", ..." if len(hits) > 4 else "")
    return None, _Rej("", f"ambiguous: {len(hits)} files below {folder_name}/ match {key} ({shown})",
                      R_AMBIGUOUS, None)


# --------------------------------------------------------------------------------------------------
# The output folder: import.json, idempotent replacement
# --------------------------------------------------------------------------------------------------
def _read_import_json(out: Path) -> dict:
    path = out / IMPORT_JSON
    try:
        data = json.loads(path.read_text())
        if data.get("format") != IMPORT_FORMAT or not isinstance(data.get("imports"), dict):
            raise ValueError("not an import record")
    except Exception as exc:
        raise DataError(f"{path}: unreadable import record ({exc.__class__.__name__}); "
                        "give a new or empty folder") from None
    return data


def _check_out(out: Path, src: Path, image_dirs: set[str]) -> None:
    """Refuse an OUT that is a file, or non-empty without an earlier import's record, or the source itself."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; give a new or empty folder for the federation")
    o, s = out.resolve(), src.resolve()
    if o == s or s in o.parents and o.relative_to(s).parts[0] in image_dirs:
        raise DataError(f"{out}: the output folder must not be the source folder or lie inside its image folders")
    if out.is_dir() and any(out.iterdir()):
        if not (out / IMPORT_JSON).is_file():
            raise DataError(f"{out}: folder is not empty and holds no earlier import ({IMPORT_JSON}); "
                            "give a new or empty folder")
        _read_import_json(out)


def _json_default(o):
    return str(o)


def _write_output(out: Path, importer: str, src: Path, params: dict, sites: dict[str, pd.DataFrame],
                  site_rejected: dict[str, list[_Rej]], fed_rejected: list[_Rej],
                  files: dict[str, list[tuple[Path, Path]]], link: bool) -> None:
    """Replace what ``importer`` wrote before and write the new sites.

    ``sites``: site -> manifest; ``site_rejected``: site -> rows (a site with rows but no manifest gets
    only its rejected.csv); ``files``: site -> [(source file, destination relative to the site folder)].
    """
    out.mkdir(parents=True, exist_ok=True)
    record = _read_import_json(out) if (out / IMPORT_JSON).is_file() else {"format": IMPORT_FORMAT, "version": 1,
                                                                            "imports": {}}
    prev = record["imports"].get(importer, {})
    prev_sites = set(prev.get("sites", []))
    others = {s: name for name, rec in record["imports"].items() if name != importer for s in rec.get("sites", [])}
    new_sites = sorted(set(sites) | set(site_rejected))
    for s in new_sites:
        if s in others:
            raise DataError(f"{out / s}: site {s} was written by the {others[s]} import; "
                            f"import {importer} into another folder")
        if (out / s).exists() and s not in prev_sites:
            raise DataError(f"{out / s}: exists and was not written by an earlier {importer} import; "
                            "remove it or give another folder")
    # mark as in progress first: an interrupted import is still cleaned up by the next one
    record["imports"][importer] = {**prev, "sites": sorted(prev_sites | set(new_sites)), "complete": False}
    (out / IMPORT_JSON).write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    for s in sorted(prev_sites | set(new_sites)):
        if not _SITE_RE.fullmatch(s):
            continue  # never a path: a hand-edited import.json must not make us delete outside OUT
        d = out / s
        if d.is_symlink() or d.is_file():
            d.unlink()
        elif d.is_dir():
            shutil.rmtree(d)

    for s in new_sites:
        sdir = out / s
        sdir.mkdir(parents=True)
        for srcfile, rel in files.get(s, []):
            dest = sdir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if link:
                os.symlink(srcfile.resolve(), dest)
            else:
                shutil.copyfile(srcfile, dest)
        if s in sites:
            write_manifest(sdir, sites[s])
        rows = site_rejected.get(s, [])
        if rows:
            write_rejected(sdir, STAGE, [(r.source, r.reason) for r in rows])

    # federation-level rows: keep the other importers' rows of this stage, replace ours
    other_fed = {src_ for name, rec in record["imports"].items() if name != importer
                 for src_ in rec.get("federation_rejected", [])}
    old = read_rejected(out)
    keep = [(r.source, r.reason) for r in old.itertuples(index=False)
            if r.stage == STAGE and r.source in other_fed]
    write_rejected(out, STAGE, keep + [(r.source, r.reason) for r in fed_rejected])

    record["imports"][importer] = {
        "source": str(src.resolve()),
        "parameters": params,
        "sites": new_sites,
        "federation_rejected": sorted({r.source for r in fed_rejected}),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": True,
    }
    (out / IMPORT_JSON).write_text(json.dumps(record, indent=2, default=_json_default) + "\n")


def _route_rejected(rejected: list[_Rej]) -> tuple[dict[str, list[_Rej]], list[_Rej]]:
    by_site: dict[str, list[_Rej]] = {}
    fed: list[_Rej] = []
    for r in rejected:
        if r.site:
            by_site.setdefault(r.site, []).append(r)
        else:
            fed.append(r)
    return by_site, fed


def _rejected_counts(rejected: list[_Rej]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rejected:
        out[r.category] = out.get(r.category, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


# --------------------------------------------------------------------------------------------------
# AIforCOVID
# --------------------------------------------------------------------------------------------------
def _cell_text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, _dt.datetime):
        return v.date().isoformat() if v.time() == _dt.time(0) else v.isoformat()
    if isinstance(v, (_dt.date, _dt.time)):
        return v.isoformat()
    return str(v).strip()


def _read_workbook(path: Path) -> tuple[str, list[str], list[tuple[int, dict[str, str]]], str]:
    """The sheet that holds ImageFile/Hospital/Prognosis: (sheet name, columns, [(excel row, values)], note).

    Every cell is text; the header is the first row (among the first 20) naming the three columns
    (case-insensitive); row numbers are the ones Excel shows. Raises a one-line DataError otherwise.
    """
    try:
        import openpyxl
    except ImportError:
        raise DataError(f"{path}: reading .xlsx needs the openpyxl package (pip install openpyxl)") from None
    try:
        wb = openpyxl.load_workbook(path, read_only=False, data_only=True)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as an .xlsx workbook ({exc.__class__.__name__}: "
                        f"{' '.join(str(exc).split())[:120]})") from None
    need = {c.lower(): c for c in AIFORCOVID_COLUMNS}
    best: tuple[int, str, list[str]] | None = None  # (found, sheet, missing) for the error message
    chosen = None
    skipped: list[str] = []
    for ws in wb.worksheets:
        rows = ws.iter_rows(min_row=1, values_only=True)
        for rnum, row in enumerate(rows, start=1):
            if rnum > _HEADER_SEARCH_ROWS:
                break
            names = [_cell_text(v) for v in row]
            lower = {n.lower(): i for i, n in reversed(list(enumerate(names))) if n}
            found = [k for k in need if k in lower]
            if best is None or len(found) > best[0]:
                best = (len(found), ws.title, [need[k] for k in need if k not in lower])
            if len(found) == len(need):
                if chosen is None:
                    chosen = (ws, rnum, names)
                else:
                    skipped.append(ws.title)
                break
    if chosen is None:
        missing = best[2] if best else list(AIFORCOVID_COLUMNS)
        where = f"best sheet {best[1]!r}" if best else "no sheet"
        raise DataError(f"{path}: no sheet has the column(s) {', '.join(missing)} ({where}); "
                        f"needed: {', '.join(AIFORCOVID_COLUMNS)}")
    ws, header_row, names = chosen
    # column index per name (first occurrence); canonical names for the three needed columns
    cols: dict[str, int] = {}
    for i, n in enumerate(names):
        if not n:
            continue
        key = need.get(n.lower(), n)
        cols.setdefault(key, i)
    data: list[tuple[int, dict[str, str]]] = []
    for rnum, row in enumerate(ws.iter_rows(min_row=header_row + 1, values_only=True), start=header_row + 1):
        vals = {k: (_cell_text(row[i]) if i < len(row) else "") for k, i in cols.items()}
        if any(vals.values()):
            data.append((rnum, vals))
    note = f"other sheet(s) with these columns ignored: {', '.join(skipped)}" if skipped else ""
    return ws.title, list(cols), data, note


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


def import_aiforcovid(src, out, link=True, keep_clinical=False, progress=True) -> dict:
    """Import the published AIforCOVID layout at ``src`` into the federation ``out`` (one site per hospital).

    Returns the summary rendered by :func:`format_import_summary`.
    """
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError(f"{src}: AIforCOVID source folder not found")
    books, folders = _aiforcovid_releases(src)
    _check_out(out, src, {p.name for p in folders.values()})
    if not books:
        raise DataError(f"{src}: no AIforCOVID spreadsheets (AIforCOVID.xlsx, AIforCOVID_r2.xlsx, "
                        "AIforCOVID_r3.xlsx); is this the AIforCOVID folder?")
    sheets = {}
    for release in sorted(books):
        sheets[release] = _read_workbook(books[release])

    rejected: list[_Rej] = []
    accepted: list[dict] = []  # site, release, id, path, prognosis, source, clinical
    normalised = 0
    clinical_cols: list[str] = []
    notes: list[str] = []
    referenced_total: dict[int, set[str]] = {}
    indexes = {r: _index(folders[r]) for r in sorted(folders)}
    n_rows = sum(len(s[2]) for s in sheets.values())
    bar = _bar(n_rows, "import AIforCOVID", progress)
    try:
        for release in sorted(sheets):
            book = books[release]
            sheet_name, cols, rows, note = sheets[release]
            if note:
                notes.append(f"{book.name}: {note}")
            fname = _folder_name(release)
            idx = indexes.get(release)
            if idx is None:
                notes.append(f"{book.name}: folder {fname}/ not found; its rows are rejected")
            for c in cols:
                if c not in AIFORCOVID_COLUMNS and c not in clinical_cols:
                    clinical_cols.append(c)
            referenced = referenced_total.setdefault(release, set())
            first_row: dict[str, int] = {}
            for rnum, vals in rows:
                if bar is not None:
                    bar.update(1)
                source = f"{book.name}:row {rnum}"
                hosp = vals.get("Hospital", "").strip()
                site = _site_name(hosp) if hosp else None
                raw_id = vals.get("ImageFile", "").strip()
                key = _strip_dcm(raw_id) if raw_id else ""
                if not key:
                    rejected.append(_Rej(source, "ImageFile is empty", R_NO_ID, site))
                    continue
                referenced.add(key)
                if key in first_row:
                    rejected.append(_Rej(source, f"ImageFile {key} is listed twice in this sheet "
                                                 f"(first at {book.name}:row {first_row[key]})", R_DUPLICATE_ROW, site))
                    continue
                first_row[key] = rnum
                if site is None:
                    rejected.append(_Rej(source, f"Hospital is empty (ImageFile {key})", R_NO_HOSPITAL, None))
                    continue
                raw_label = vals.get("Prognosis", "")
                label = raw_label.strip().upper()
                if label not in PROGNOSIS_LABELS:
                    shown = f"{raw_label!r}" if raw_label else "empty"
                    rejected.append(_Rej(source, f"Prognosis {shown} is not MILD or SEVERE "
                                                 "(after trimming spaces and upper-casing)", R_BAD_LABEL, site))
                    continue
                if idx is None:
                    rejected.append(_Rej(source, f"DICOM not found: folder {fname}/ does not exist",
                                         R_MISSING, site))
                    continue
                path, rej = _lookup(idx, key, fname, src)
                if rej is not None:
                    rej.source, rej.site = source, site
                    rejected.append(rej)
                    continue
                bad = _check_decodable(path, path.relative_to(src).as_posix())
                if bad:
                    rejected.append(_Rej(source, bad, R_UNDECODABLE, site))
                    continue
                if label != raw_label:
                    normalised += 1
                accepted.append({"site": site, "release": release, "id": key, "path": path, "prognosis": label,
                                 "source": source, "clinical": {c: vals.get(c, "") for c in cols
                                                                if c not in AIFORCOVID_COLUMNS}})
    finally:
        if bar is not None:
            bar.close()
    for release in sorted(indexes):
        if release not in books:
            notes.append(f"{_folder_name(release)}/: no {'AIforCOVID' if release == 1 else f'AIforCOVID_r{release}'}"
                         ".xlsx; its files are listed as unreferenced")
        rejected.extend(_unreferenced(indexes[release], referenced_total.get(release, set()), src))

    # manifests
    sites: dict[str, pd.DataFrame] = {}
    files: dict[str, list[tuple[Path, Path]]] = {}
    reserved = {"image", "patient_id", "prognosis", "brixia", "split", "source_row", "source_file"}
    clin_names = {c: (f"{c}_clinical" if c.lower() in reserved else c) for c in clinical_cols}
    for site in sorted({a["site"] for a in accepted}):
        recs = [a for a in accepted if a["site"] == site]
        rows = []
        for a in recs:
            rel = f"images/{_folder_name(a['release'])}/{a['id']}.dcm"
            files.setdefault(site, []).append((a["path"], Path(rel)))
            row = {"image": rel, "patient_id": a["id"], "prognosis": a["prognosis"], "brixia": "", "split": "",
                   "source_row": a["source"], "source_file": a["path"].relative_to(src).as_posix()}
            if keep_clinical:
                for c in clinical_cols:
                    row[clin_names[c]] = a["clinical"].get(c, "")
            rows.append(row)
        sites[site] = pd.DataFrame(rows)
    site_rej, fed_rej = _route_rejected(rejected)
    for s in site_rej:
        if s not in sites:
            notes.append(f"site {s}: every row was rejected; {s}/ holds only rejected.csv (no manifest, not a site)")

    params = {"link": bool(link), "keep_clinical": bool(keep_clinical)}
    _write_output(out, "aiforcovid", src, params, sites, site_rej, fed_rej, files, link)

    summary_sites = {}
    for s in sorted(set(sites) | set(site_rej)):
        df = sites.get(s)
        summary_sites[s] = {
            "images": 0 if df is None else len(df),
            "MILD": 0 if df is None else int((df["prognosis"] == "MILD").sum()),
            "SEVERE": 0 if df is None else int((df["prognosis"] == "SEVERE").sum()),
            "rejected": len(site_rej.get(s, [])),
        }
    return {
        "importer": "aiforcovid",
        "source": str(src),
        "out": str(out),
        "link": bool(link),
        "keep_clinical": bool(keep_clinical),
        "sheets": {books[r].name: sheets[r][0] for r in sorted(sheets)},
        "sites": summary_sites,
        "images": sum(d["images"] for d in summary_sites.values()),
        "normalised_labels": normalised,
        "rejected": _rejected_counts(rejected),
        "rejected_total": len(rejected),
        "federation_rejected": len(fed_rej),
        "notes": notes,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


# --------------------------------------------------------------------------------------------------
# BRIXIA
# --------------------------------------------------------------------------------------------------
def _read_metadata(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: BRIXIA metadata file not found")
    kw = dict(sep=";", dtype=str, keep_default_na=False, skip_blank_lines=False)
    try:
        try:
            df = pd.read_csv(path, encoding="utf-8-sig", **kw)
        except UnicodeDecodeError:
            df = pd.read_csv(path, encoding="latin-1", **kw)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as a ';'-separated CSV ({exc.__class__.__name__}: "
                        f"{' '.join(str(exc).split())[:120]})") from None
    df.columns = [str(c).strip() for c in df.columns]
    df = df.fillna("")
    missing = [c for c in BRIXIA_REQUIRED if c not in df.columns]
    if missing:
        hint = " (the separator must be ';')" if len(df.columns) == 1 else ""
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}{hint}; "
                        f"needed: {', '.join(BRIXIA_REQUIRED)}")
    for c in df.columns:
        df[c] = df[c].str.strip()
    return df


def _score_problem(score: str, glob: str) -> tuple[str, str] | None:
    """(category, reason) when the BrixiaScore/BrixiaScoreGlobal pair is unusable; None when fine."""
    if not score:
        return R_BAD_SCORE, "BrixiaScore is empty"
    if not is_valid_brixia(score):
        if len(score) != 6:
            why = f"{len(score)} characters, not 6"
        elif not score.isdigit() or not score.isascii():
            why = "characters other than digits"
        else:
            why = "a zone score above 3"
        return R_BAD_SCORE, f"BrixiaScore {score!r} is not six digits 0-3 ({why}); scores are never padded or repaired"
    m = re.fullmatch(r"(\d+)(?:\.0*)?", glob)
    if not m or int(m.group(1)) > 18:
        shown = repr(glob) if glob else "empty"
        return R_BAD_GLOBAL, f"BrixiaScoreGlobal {shown} is not a whole number 0-18"
    if brixia_global(score) != int(m.group(1)):
        return R_SUM_MISMATCH, (f"BrixiaScore {score!r} sums to {brixia_global(score)} but "
                                f"BrixiaScoreGlobal is {int(m.group(1))}")
    return None


def import_brixia(src, out, dicom_dir="dicom_clean", split_by="none", min_site_size=50, link=True,
                  progress=True) -> dict:
    """Import the published BRIXIA layout at ``src`` into the federation ``out``.

    ``split_by="none"``: one site ``BRIXIA``; ``"manufacturer"``: one site per manufacturer (upper case,
    characters outside [A-Z0-9_-] -> ``_``), those with fewer than ``min_site_size`` imported images (and
    an empty Manufacturer) merged into ``OTHER``. Returns the summary rendered by :func:`format_import_summary`.
    """
    t0 = time.perf_counter()
    if split_by not in SPLIT_BY:
        raise ConfigError(f"mdmt import brixia: split_by {split_by!r} is not supported; use one of: {', '.join(SPLIT_BY)}")
    try:
        min_site_size = int(min_site_size)
    except (TypeError, ValueError):
        raise ConfigError(f"mdmt import brixia: min_site_size {min_site_size!r} must be a whole number") from None
    if min_site_size < 0:
        raise ConfigError(f"mdmt import brixia: min_site_size {min_site_size} must be 0 or more")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError(f"{src}: BRIXIA source folder not found")
    ddir = src / dicom_dir
    if not ddir.is_dir():
        raise DataError(f"{ddir}: BRIXIA DICOM folder not found (dicom_dir={dicom_dir!r})")
    _check_out(out, src, {Path(dicom_dir).parts[0]} if Path(dicom_dir).parts else set())
    meta_path = src / BRIXIA_METADATA
    df = _read_metadata(meta_path)
    if split_by == "manufacturer" and "Manufacturer" not in df.columns:
        raise DataError(f"{meta_path}: missing column Manufacturer, needed for split_by='manufacturer'")
    notes = [f"{meta_path.name}: no column {c}; left empty" for c in BRIXIA_EXTRA if c not in df.columns]
    idx = _index(ddir)
    dname = Path(dicom_dir).as_posix().rstrip("/")

    rejected: list[tuple[str | None, _Rej]] = []  # (raw manufacturer, rejection) -> routed after sites are known
    accepted: list[dict] = []
    referenced: set[str] = set()
    first_row: dict[str, int] = {}
    bar = _bar(len(df), "import BRIXIA", progress)
    try:
        for i, row in enumerate(df.to_dict("records")):
            if bar is not None:
                bar.update(1)
            rnum = i + 2
            if not any(v for v in row.values()):
                continue  # blank line
            source = f"{meta_path.name}:row {rnum}"
            manu = row.get("Manufacturer", "")
            fname = row["Filename"]
            if not fname:
                rejected.append((manu, _Rej(source, "Filename is empty", R_NO_ID, None)))
                continue
            exact = ddir / fname
            key = _strip_dcm(fname)
            referenced.add(key)
            if key in first_row:
                rejected.append((manu, _Rej(source, f"Filename {fname} is listed twice "
                                                    f"(first at {meta_path.name}:row {first_row[key]})",
                                            R_DUPLICATE_ROW, None)))
                continue
            first_row[key] = rnum
            if not row["Subject"]:
                rejected.append((manu, _Rej(source, f"Subject is empty (Filename {fname})", R_NO_SUBJECT, None)))
                continue
            prob = _score_problem(row["BrixiaScore"], row["BrixiaScoreGlobal"])
            if prob:
                rejected.append((manu, _Rej(source, prob[1], prob[0], None)))
                continue
            if exact.is_file():
                path = exact
            else:
                path, rej = _lookup(idx, key, dname, src)
                if rej is not None:
                    rej.source = source
                    if rej.category == R_MISSING:
                        rej.reason = f"DICOM not found: {dname}/{fname}"
                    rejected.append((manu, rej))
                    continue
            bad = _check_decodable(path, path.relative_to(src).as_posix())
            if bad:
                rejected.append((manu, _Rej(source, bad, R_UNDECODABLE, None)))
                continue
            accepted.append({"row": row, "path": path, "source": source, "manufacturer": manu})
    finally:
        if bar is not None:
            bar.close()
    unref = _unreferenced(idx, referenced, src)

    # sites
    def site_of_key(name: str) -> str:
        return _site_name(name) if name.strip() else ""

    merged: list[str] = []
    if split_by == "none":
        site_of = lambda manu: BRIXIA_SITE  # noqa: E731
    else:
        counts: dict[str, int] = {}
        for a in accepted:
            k = site_of_key(a["manufacturer"])
            counts[k] = counts.get(k, 0) + 1
        big = {k for k, n in counts.items() if k and n >= min_site_size}
        merged = sorted(k or "(empty)" for k in counts if k not in big)

        def site_of(manu: str) -> str:
            k = site_of_key(manu)
            return k if k in big else OTHER_SITE

    sites: dict[str, pd.DataFrame] = {}
    files: dict[str, list[tuple[Path, Path]]] = {}
    by_site: dict[str, list[dict]] = {}
    for a in accepted:
        by_site.setdefault(site_of(a["manufacturer"]), []).append(a)
    for site in sorted(by_site):
        rows = []
        for a in by_site[site]:
            r = a["row"]
            rel = "images/" + a["path"].relative_to(ddir).as_posix()
            files.setdefault(site, []).append((a["path"], Path(rel)))
            rows.append({"image": rel, "patient_id": r["Subject"], "prognosis": "", "brixia": r["BrixiaScore"],
                         "split": "", **{c: r.get(c, "") for c in BRIXIA_EXTRA},
                         "source_row": a["source"]})
        sites[site] = pd.DataFrame(rows)
    all_rej: list[_Rej] = []
    for manu, rej in rejected:
        rej.site = site_of(manu)
        all_rej.append(rej)
    all_rej.extend(unref)
    site_rej, fed_rej = _route_rejected(all_rej)
    for s in site_rej:
        if s not in sites:
            notes.append(f"site {s}: every row was rejected; {s}/ holds only rejected.csv (no manifest, not a site)")
    if merged:
        notes.append(f"merged into {OTHER_SITE} (fewer than {min_site_size} images or no Manufacturer): "
                     f"{', '.join(merged)}")

    params = {"dicom_dir": dicom_dir, "split_by": split_by, "min_site_size": min_site_size, "link": bool(link)}
    _write_output(out, "brixia", src, params, sites, site_rej, fed_rej, files, link)

    summary_sites = {}
    for s in sorted(set(sites) | set(site_rej)):
        d = sites.get(s)
        cls = [0, 0, 0, 0]
        manus: dict[str, int] = {}
        if d is not None:
            for score in d["brixia"]:
                cls[severity_class(brixia_global(score))] += 1
            for m in d["Manufacturer"]:
                manus[m] = manus.get(m, 0) + 1
        summary_sites[s] = {
            "images": 0 if d is None else len(d),
            "patients": 0 if d is None else int(d["patient_id"].nunique()),
            "severity_classes": dict(zip(SEVERITY_CLASS_NAMES, cls)),
            "consensus_testset": 0 if d is None else int(d["ConsensusTestset"].str.lower().isin(_TRUE).sum()),
            "manufacturers": dict(sorted(manus.items())),
            "rejected": len(site_rej.get(s, [])),
        }
    return {
        "importer": "brixia",
        "source": str(src),
        "out": str(out),
        "link": bool(link),
        "split_by": split_by,
        "min_site_size": min_site_size,
        "sites": summary_sites,
        "images": sum(d["images"] for d in summary_sites.values()),
        "merged_into_other": merged,
        "normalised_labels": 0,
        "rejected": _rejected_counts(all_rej),
        "rejected_total": len(all_rej),
        "federation_rejected": len(fed_rej),
        "notes": notes,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


# --------------------------------------------------------------------------------------------------
# Summary table
# --------------------------------------------------------------------------------------------------
def format_import_summary(summary: dict) -> str:
    """A printable table of an import summary (either importer)."""
    kind = summary.get("importer", "")
    mode = "symlinks" if summary.get("link") else "copies"
    lines = [f"{kind} import {summary.get('source', '')} -> {summary.get('out', '')} ({mode})"]
    if kind == "aiforcovid":
        for book, sheet in summary.get("sheets", {}).items():
            lines.append(f"  {book}: sheet {sheet!r}")
        head = f"{'site':<10} {'images':>6} {'MILD':>5} {'SEVERE':>6} {'rejected':>8}"
        lines += [head, "-" * len(head)]
        for s, d in summary.get("sites", {}).items():
            lines.append(f"{s:<10} {d['images']:>6} {d['MILD']:>5} {d['SEVERE']:>6} {d['rejected']:>8}")
        tot = summary.get("sites", {}).values()
        lines.append("-" * len(head))
        lines.append(f"{'total':<10} {sum(d['images'] for d in tot):>6} {sum(d['MILD'] for d in tot):>5} "
                     f"{sum(d['SEVERE'] for d in tot):>6} {sum(d['rejected'] for d in tot):>8}")
        lines.append(f"labels normalised (case/spaces): {summary.get('normalised_labels', 0)}")
    else:
        lines.append(f"  split_by {summary.get('split_by')}, min_site_size {summary.get('min_site_size')}")
        names = SEVERITY_CLASS_NAMES
        head = (f"{'site':<16} {'images':>6} {'patients':>8}  " + " ".join(f"{n:>5}" for n in names)
                + f" {'consensus':>9} {'rejected':>8}")
        lines += [head, "-" * len(head)]
        for s, d in summary.get("sites", {}).items():
            cls = d["severity_classes"]
            lines.append(f"{s:<16} {d['images']:>6} {d['patients']:>8}  " + " ".join(f"{cls[n]:>5}" for n in names)
                         + f" {d['consensus_testset']:>9} {d['rejected']:>8}")
    lines.append(f"federation-level rejected: {summary.get('federation_rejected', 0)}")
    rej = summary.get("rejected", {})
    lines.append(f"rejected: {summary.get('rejected_total', 0)}" + (" (see rejected.csv files)" if rej else ""))
    for reason, n in rej.items():
        lines.append(f"  {n:>5}  {reason}")
    for note in summary.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


__all__ = ["import_aiforcovid", "import_brixia", "format_import_summary", "UNREFERENCED", "SPLIT_BY"]
