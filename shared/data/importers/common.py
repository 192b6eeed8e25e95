"""What both importers share: spreadsheet/CSV reading, the DICOM file index, the federation output folder
(``import.json``, linked or copied images, manifests, ``rejected.csv``) and the import summary.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mdmt.data.dicom import read_image
from mdmt.data.manifest import SEVERITY_CLASS_NAMES, read_rejected, write_manifest, write_rejected
from mdmt.errors import DataError, DicomRejected

STAGE = "import"
IMPORT_JSON = "import.json"
IMPORT_FORMAT = "mdmt-import"
UNREFERENCED = "no spreadsheet row references this file"
_HEADER_SEARCH_ROWS = 20  # the header is the first row (of the first 20) that names the needed columns

#: Rejection categories both importers use (the keys of ``summary["rejected"]``).
R_NO_ID = "no image id"
R_DUPLICATE_ROW = "duplicate row"
R_MISSING = "DICOM missing"
R_AMBIGUOUS = "ambiguous DICOM"
R_UNDECODABLE = "undecodable DICOM"
R_UNREFERENCED = "unreferenced file"


@dataclass
class Rejection:
    source: str
    reason: str
    category: str
    site: str | None  # None: federation-level


_SITE_RE = re.compile(r"[A-Z0-9_-]+")


def site_name(value: str) -> str:
    """Upper case, characters outside [A-Z0-9_-] replaced by ``_``."""
    return re.sub(r"[^A-Z0-9_-]", "_", value.strip().upper())


def progress_bar(total: int, desc: str, progress: bool):
    """A tqdm bar over ``total`` images, or None when ``progress`` is off."""
    if not progress:
        return None
    from tqdm import tqdm  # deferred: tqdm, only needed when a progress bar is shown

    return tqdm(total=total, desc=desc, unit="img", leave=True)


def check_decodable(path: Path, shown: str) -> str | None:
    """None when ``read_image`` decodes the file, else the rejection reason."""
    try:
        read_image(path)
    except DicomRejected as exc:
        return f"undecodable DICOM {shown}: {exc}"
    return None


# --------------------------------------------------------------------------------------------------
# Spreadsheets and CSVs: every cell as text
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


def _load_workbook(path: Path):
    try:
        import openpyxl  # deferred: openpyxl, only needed for .xlsx sources
    except ImportError:
        raise DataError(f"{path}: reading .xlsx needs the openpyxl package (pip install openpyxl)") from None
    try:
        return openpyxl.load_workbook(path, read_only=False, data_only=True)
    except Exception as exc:
        raise DataError(
            f"{path}: cannot be read as an .xlsx workbook ({exc.__class__.__name__}: "
            f"{' '.join(str(exc).split())[:120]})"
        ) from None


def _find_header(wb, path: Path, columns: tuple[str, ...]):
    """(sheet, header row, header cells, other sheets with the columns) of the first sheet naming ``columns``."""
    need = {c.lower(): c for c in columns}
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
        missing = best[2] if best else list(columns)
        where = f"best sheet {best[1]!r}" if best else "no sheet"
        raise DataError(
            f"{path}: no sheet has the column(s) {', '.join(missing)} ({where}); needed: {', '.join(columns)}"
        )
    return (*chosen, skipped)


def read_workbook(path: Path, columns: tuple[str, ...]) -> tuple[str, list[str], list[tuple[int, dict[str, str]]], str]:
    """The sheet that holds ``columns``: (sheet name, columns, [(excel row, values)], note).

    Every cell is text; the header is the first row (among the first 20) naming all of ``columns``
    (case-insensitive); row numbers are the ones Excel shows. Raises a one-line DataError otherwise.
    """
    wb = _load_workbook(path)
    ws, header_row, names, skipped = _find_header(wb, path, columns)
    need = {c.lower(): c for c in columns}
    # column index per name (first occurrence); canonical names for the needed columns
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


def read_csv_table(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """A ';'-separated CSV as stripped text cells (UTF-8, else Latin-1); a one-line DataError when it lacks
    one of the ``required`` columns."""
    kw = dict(sep=";", dtype=str, keep_default_na=False, skip_blank_lines=False)
    try:
        try:
            df = pd.read_csv(path, encoding="utf-8-sig", **kw)
        except UnicodeDecodeError:
            df = pd.read_csv(path, encoding="latin-1", **kw)
    except Exception as exc:
        raise DataError(
            f"{path}: cannot be read as a ';'-separated CSV ({exc.__class__.__name__}: "
            f"{' '.join(str(exc).split())[:120]})"
        ) from None
    df.columns = [str(c).strip() for c in df.columns]
    df = df.fillna("")
    missing = [c for c in required if c not in df.columns]
    if missing:
        hint = " (the separator must be ';')" if len(df.columns) == 1 else ""
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}{hint}; needed: {', '.join(required)}")
    for c in df.columns:
        df[c] = df[c].str.strip()
    return df


# --------------------------------------------------------------------------------------------------
# The DICOM index: file name without a '.dcm' suffix -> files below a folder
# --------------------------------------------------------------------------------------------------
def strip_dcm(name: str) -> str:
    """The file name of ``name`` (a path with / or \\) without a '.dcm' suffix."""
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


def index_files(folder: Path) -> dict[str, list[Path]]:
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
                idx.setdefault(strip_dcm(name), []).append(p)
    return idx


def unreferenced_files(idx: dict[str, list[Path]], referenced: set[str], src: Path) -> list[Rejection]:
    """A federation-level rejection for every DICOM-looking file of ``idx`` whose key no row referenced."""
    out = []
    for key in sorted(idx):
        if key in referenced:
            continue
        for p in idx[key]:
            if _looks_like_dicom(p):
                out.append(Rejection(p.relative_to(src).as_posix(), UNREFERENCED, R_UNREFERENCED, None))
    return out


def lookup(idx: dict[str, list[Path]], key: str, folder_name: str, src: Path) -> tuple[Path | None, Rejection | None]:
    """The one file of ``idx`` named ``key`` (with or without .dcm); else a rejection (source/site set later)."""
    hits = idx.get(key, [])
    if len(hits) == 1:
        return hits[0], None
    if not hits:
        return None, Rejection("", f"DICOM not found: no file {key} or {key}.dcm below {folder_name}/", R_MISSING, None)
    shown = ", ".join(p.relative_to(src).as_posix() for p in hits[:4]) + (", ..." if len(hits) > 4 else "")
    return None, Rejection(
        "", f"ambiguous: {len(hits)} files below {folder_name}/ match {key} ({shown})", R_AMBIGUOUS, None
    )


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
        raise DataError(
            f"{path}: unreadable import record ({exc.__class__.__name__}); give a new or empty folder"
        ) from None
    return data


def check_out(out: Path, src: Path, image_dirs: set[str]) -> None:
    """Refuse an OUT that is a file, or non-empty without an earlier import's record, or the source itself."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; give a new or empty folder for the federation")
    o, s = out.resolve(), src.resolve()
    if o == s or s in o.parents and o.relative_to(s).parts[0] in image_dirs:
        raise DataError(f"{out}: the output folder must not be the source folder or lie inside its image folders")
    if out.is_dir() and any(out.iterdir()):
        if not (out / IMPORT_JSON).is_file():
            raise DataError(
                f"{out}: folder is not empty and holds no earlier import ({IMPORT_JSON}); give a new or empty folder"
            )
        _read_import_json(out)


def _json_default(o):
    return str(o)


def _save_record(out: Path, record: dict) -> None:
    (out / IMPORT_JSON).write_text(json.dumps(record, indent=2, default=_json_default) + "\n")


def _check_site_owners(out: Path, importer: str, record: dict, prev_sites: set[str], new_sites: list[str]) -> None:
    """Refuse a site another importer wrote, or a folder of that name no earlier import of ours wrote."""
    others = {s: name for name, rec in record["imports"].items() if name != importer for s in rec.get("sites", [])}
    for s in new_sites:
        if s in others:
            raise DataError(
                f"{out / s}: site {s} was written by the {others[s]} import; import {importer} into another folder"
            )
        if (out / s).exists() and s not in prev_sites:
            raise DataError(
                f"{out / s}: exists and was not written by an earlier {importer} import; "
                "remove it or give another folder"
            )


def _remove_sites(out: Path, names: set[str]) -> None:
    for s in sorted(names):
        if not _SITE_RE.fullmatch(s):
            continue  # never a path: a hand-edited import.json must not make us delete outside OUT
        d = out / s
        if d.is_symlink() or d.is_file():
            d.unlink()
        elif d.is_dir():
            shutil.rmtree(d)


def _write_site(
    sdir: Path, files: list[tuple[Path, Path]], manifest: pd.DataFrame | None, rejected: list[Rejection], link: bool
) -> None:
    """A new site folder: its images (symlinks to the resolved source, or copies), manifest and rejected.csv."""
    sdir.mkdir(parents=True)
    for srcfile, rel in files:
        dest = sdir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if link:
            os.symlink(srcfile.resolve(), dest)
        else:
            shutil.copyfile(srcfile, dest)
    if manifest is not None:
        write_manifest(sdir, manifest)
    if rejected:
        write_rejected(sdir, STAGE, [(r.source, r.reason) for r in rejected])


def _write_federation_rejected(out: Path, importer: str, record: dict, fed_rejected: list[Rejection]) -> None:
    """Federation-level rows: keep the other importers' rows of this stage, replace ours."""
    other_fed = {
        src_
        for name, rec in record["imports"].items()
        if name != importer
        for src_ in rec.get("federation_rejected", [])
    }
    old = read_rejected(out)
    keep = [(r.source, r.reason) for r in old.itertuples(index=False) if r.stage == STAGE and r.source in other_fed]
    write_rejected(out, STAGE, keep + [(r.source, r.reason) for r in fed_rejected])


def write_output(
    out: Path,
    importer: str,
    src: Path,
    params: dict,
    sites: dict[str, pd.DataFrame],
    site_rejected: dict[str, list[Rejection]],
    fed_rejected: list[Rejection],
    files: dict[str, list[tuple[Path, Path]]],
    link: bool,
) -> None:
    """Replace what ``importer`` wrote before and write the new sites.

    ``sites``: site -> manifest; ``site_rejected``: site -> rows (a site with rows but no manifest gets
    only its rejected.csv); ``files``: site -> [(source file, destination relative to the site folder)].
    """
    out.mkdir(parents=True, exist_ok=True)
    record = (
        _read_import_json(out)
        if (out / IMPORT_JSON).is_file()
        else {"format": IMPORT_FORMAT, "version": 1, "imports": {}}
    )
    prev = record["imports"].get(importer, {})
    prev_sites = set(prev.get("sites", []))
    new_sites = sorted(set(sites) | set(site_rejected))
    _check_site_owners(out, importer, record, prev_sites, new_sites)
    # mark as in progress first: an interrupted import is still cleaned up by the next one
    record["imports"][importer] = {**prev, "sites": sorted(prev_sites | set(new_sites)), "complete": False}
    _save_record(out, record)
    _remove_sites(out, prev_sites | set(new_sites))
    for s in new_sites:
        _write_site(out / s, files.get(s, []), sites.get(s), site_rejected.get(s, []), link)
    _write_federation_rejected(out, importer, record, fed_rejected)
    record["imports"][importer] = {
        "source": str(src.resolve()),
        "parameters": params,
        "sites": new_sites,
        "federation_rejected": sorted({r.source for r in fed_rejected}),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "complete": True,
    }
    _save_record(out, record)


# --------------------------------------------------------------------------------------------------
# The import summary
# --------------------------------------------------------------------------------------------------
def route_rejected(rejected: list[Rejection]) -> tuple[dict[str, list[Rejection]], list[Rejection]]:
    """(site -> its rejections, federation-level rejections)."""
    by_site: dict[str, list[Rejection]] = {}
    fed: list[Rejection] = []
    for r in rejected:
        if r.site:
            by_site.setdefault(r.site, []).append(r)
        else:
            fed.append(r)
    return by_site, fed


def rejected_counts(rejected: list[Rejection]) -> dict[str, int]:
    """Rejections per category, most frequent first."""
    out: dict[str, int] = {}
    for r in rejected:
        out[r.category] = out.get(r.category, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def rejected_only_notes(site_rejected: dict[str, list[Rejection]], sites: dict[str, pd.DataFrame]) -> list[str]:
    """A note for each site whose every row was rejected."""
    return [
        f"site {s}: every row was rejected; {s}/ holds only rejected.csv (no manifest, not a site)"
        for s in site_rejected
        if s not in sites
    ]


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
        lines.append(
            f"{'total':<10} {sum(d['images'] for d in tot):>6} {sum(d['MILD'] for d in tot):>5} "
            f"{sum(d['SEVERE'] for d in tot):>6} {sum(d['rejected'] for d in tot):>8}"
        )
        lines.append(f"labels normalised (case/spaces): {summary.get('normalised_labels', 0)}")
    else:
        lines.append(f"  split_by {summary.get('split_by')}, min_site_size {summary.get('min_site_size')}")
        names = SEVERITY_CLASS_NAMES
        head = (
            f"{'site':<16} {'images':>6} {'patients':>8}  "
            + " ".join(f"{n:>5}" for n in names)
            + f" {'consensus':>9} {'rejected':>8}"
        )
        lines += [head, "-" * len(head)]
        for s, d in summary.get("sites", {}).items():
            cls = d["severity_classes"]
            lines.append(
                f"{s:<16} {d['images']:>6} {d['patients']:>8}  "
                + " ".join(f"{cls[n]:>5}" for n in names)
                + f" {d['consensus_testset']:>9} {d['rejected']:>8}"
            )
    lines.append(f"federation-level rejected: {summary.get('federation_rejected', 0)}")
    rej = summary.get("rejected", {})
    lines.append(f"rejected: {summary.get('rejected_total', 0)}" + (" (see rejected.csv files)" if rej else ""))
    for reason, n in rej.items():
        lines.append(f"  {n:>5}  {reason}")
    for note in summary.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
