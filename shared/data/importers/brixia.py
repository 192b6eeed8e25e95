"""The BRIXIA importer: ``dicom_clean/`` and ``metadata_global_v2.csv`` -> the site ``BRIXIA`` or one site
per manufacturer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
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
    read_csv_table,
    rejected_counts,
    rejected_only_notes,
    route_rejected,
    site_name,
    strip_dcm,
    unreferenced_files,
    write_output,
)
from mdmt.data.manifest import SEVERITY_CLASS_NAMES, brixia_global, is_valid_brixia, severity_class
from mdmt.errors import ConfigError, DataError

BRIXIA_METADATA = "metadata_global_v2.csv"
BRIXIA_REQUIRED = ("Filename", "Subject", "BrixiaScore", "BrixiaScoreGlobal")
#: metadata columns kept under their own names as extra manifest columns (empty when the metadata lacks
#: one). ``ConsensusTestset`` is what ``mdmt.data.splits.CONSENSUS_COLUMN`` reads.
BRIXIA_EXTRA = ("ConsensusTestset", "Manufacturer", "Modality", "StudyId")
BRIXIA_SITE = "BRIXIA"
_TRUE = ("1", "true", "yes")  # ConsensusTestset values counted as "in the consensus set" (as splits.py)
OTHER_SITE = "OTHER"
SPLIT_BY = ("none", "manufacturer")

#: Rejection categories of this importer (besides the shared ones).
R_NO_SUBJECT = "no subject"
R_BAD_SCORE = "malformed BrixiaScore"
R_BAD_GLOBAL = "bad BrixiaScoreGlobal"
R_SUM_MISMATCH = "score/global mismatch"


def _read_metadata(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: BRIXIA metadata file not found")
    return read_csv_table(path, BRIXIA_REQUIRED)


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
        return R_SUM_MISMATCH, (
            f"BrixiaScore {score!r} sums to {brixia_global(score)} but BrixiaScoreGlobal is {int(m.group(1))}"
        )
    return None


def _check_params(split_by: str, min_site_size) -> int:
    """``min_site_size`` as an int; a ConfigError for an unknown ``split_by`` or a bad size."""
    if split_by not in SPLIT_BY:
        raise ConfigError(
            f"mdmt import brixia: split_by {split_by!r} is not supported; use one of: {', '.join(SPLIT_BY)}"
        )
    try:
        min_site_size = int(min_site_size)
    except (TypeError, ValueError):
        raise ConfigError(f"mdmt import brixia: min_site_size {min_site_size!r} must be a whole number") from None
    if min_site_size < 0:
        raise ConfigError(f"mdmt import brixia: min_site_size {min_site_size} must be 0 or more")
    return min_site_size


def _open_source(src: Path, out: Path, dicom_dir: str, split_by: str) -> tuple[Path, pd.DataFrame, list[str]]:
    """Check the folders and read the metadata: (DICOM folder, metadata, notes on missing extra columns)."""
    if not src.is_dir():
        raise DataError(f"{src}: BRIXIA source folder not found")
    ddir = src / dicom_dir
    if not ddir.is_dir():
        raise DataError(f"{ddir}: BRIXIA DICOM folder not found (dicom_dir={dicom_dir!r})")
    check_out(out, src, {Path(dicom_dir).parts[0]} if Path(dicom_dir).parts else set())
    meta_path = src / BRIXIA_METADATA
    df = _read_metadata(meta_path)
    if split_by == "manufacturer" and "Manufacturer" not in df.columns:
        raise DataError(f"{meta_path}: missing column Manufacturer, needed for split_by='manufacturer'")
    notes = [f"{meta_path.name}: no column {c}; left empty" for c in BRIXIA_EXTRA if c not in df.columns]
    return ddir, df, notes


def _check_row(
    row: dict[str, str],
    rnum: int,
    ddir: Path,
    dname: str,
    idx: dict[str, list[Path]],
    src: Path,
    referenced: set[str],
    first_row: dict[str, int],
) -> Rejection | Path:
    """One metadata row: its rejection (site set later), or the DICOM file it names."""
    source = f"{BRIXIA_METADATA}:row {rnum}"
    fname = row["Filename"]
    if not fname:
        return Rejection(source, "Filename is empty", R_NO_ID, None)
    exact = ddir / fname
    key = strip_dcm(fname)
    referenced.add(key)
    if key in first_row:
        return Rejection(
            source,
            f"Filename {fname} is listed twice (first at {BRIXIA_METADATA}:row {first_row[key]})",
            R_DUPLICATE_ROW,
            None,
        )
    first_row[key] = rnum
    if not row["Subject"]:
        return Rejection(source, f"Subject is empty (Filename {fname})", R_NO_SUBJECT, None)
    prob = _score_problem(row["BrixiaScore"], row["BrixiaScoreGlobal"])
    if prob:
        return Rejection(source, prob[1], prob[0], None)
    if exact.is_file():
        path = exact
    else:
        path, rej = lookup(idx, key, dname, src)
        if rej is not None:
            rej.source = source
            if rej.category == R_MISSING:
                rej.reason = f"DICOM not found: {dname}/{fname}"
            return rej
    bad = check_decodable(path, path.relative_to(src).as_posix())
    if bad:
        return Rejection(source, bad, R_UNDECODABLE, None)
    return path


def _scan_rows(
    df: pd.DataFrame, ddir: Path, dname: str, idx: dict[str, list[Path]], src: Path, progress: bool
) -> tuple[list[dict], list[tuple[str, Rejection]], set[str]]:
    """Every metadata row checked (with a progress bar): (accepted, [(raw manufacturer, rejection)], referenced)."""
    rejected: list[tuple[str, Rejection]] = []  # routed to sites once the sites are known
    accepted: list[dict] = []
    referenced: set[str] = set()
    first_row: dict[str, int] = {}
    bar = progress_bar(len(df), "import BRIXIA", progress)
    try:
        for i, row in enumerate(df.to_dict("records")):
            if bar is not None:
                bar.update(1)
            rnum = i + 2
            if not any(v for v in row.values()):
                continue  # blank line
            manu = row.get("Manufacturer", "")
            got = _check_row(row, rnum, ddir, dname, idx, src, referenced, first_row)
            if isinstance(got, Rejection):
                rejected.append((manu, got))
                continue
            accepted.append({"row": row, "path": got, "source": f"{BRIXIA_METADATA}:row {rnum}", "manufacturer": manu})
    finally:
        if bar is not None:
            bar.close()
    return accepted, rejected, referenced


def _manufacturer_key(name: str) -> str:
    return site_name(name) if name.strip() else ""


def _site_assignment(accepted: list[dict], split_by: str, min_site_size: int) -> tuple[Callable[[str], str], list[str]]:
    """(raw manufacturer -> site, manufacturers merged into OTHER); manufacturers with fewer than
    ``min_site_size`` accepted images, and an empty Manufacturer, go to ``OTHER``."""
    if split_by == "none":
        return (lambda manu: BRIXIA_SITE), []
    counts: dict[str, int] = {}
    for a in accepted:
        k = _manufacturer_key(a["manufacturer"])
        counts[k] = counts.get(k, 0) + 1
    big = {k for k, n in counts.items() if k and n >= min_site_size}
    merged = sorted(k or "(empty)" for k in counts if k not in big)

    def site_of(manu: str) -> str:
        k = _manufacturer_key(manu)
        return k if k in big else OTHER_SITE

    return site_of, merged


def _build_manifests(accepted: list[dict], site_of: Callable[[str], str], ddir: Path):
    """(site -> manifest, site -> [(source file, destination in the site folder)]) of the accepted images."""
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
            rows.append(
                {
                    "image": rel,
                    "patient_id": r["Subject"],
                    "prognosis": "",
                    "brixia": r["BrixiaScore"],
                    "split": "",
                    **{c: r.get(c, "") for c in BRIXIA_EXTRA},
                    "source_row": a["source"],
                }
            )
        sites[site] = pd.DataFrame(rows)
    return sites, files


def _place_rejections(rejected: list[tuple[str, Rejection]], site_of: Callable[[str], str]) -> list[Rejection]:
    """The row rejections, each given the site its raw manufacturer maps to."""
    for manu, rej in rejected:
        rej.site = site_of(manu)
    return [rej for _, rej in rejected]


def _merged_notes(merged: list[str], min_site_size: int) -> list[str]:
    if not merged:
        return []
    return [f"merged into {OTHER_SITE} (fewer than {min_site_size} images or no Manufacturer): {', '.join(merged)}"]


def _site_summaries(sites: dict[str, pd.DataFrame], site_rej: dict[str, list[Rejection]]) -> dict[str, dict]:
    out = {}
    for s in sorted(set(sites) | set(site_rej)):
        d = sites.get(s)
        cls = [0, 0, 0, 0]
        manus: dict[str, int] = {}
        if d is not None:
            for score in d["brixia"]:
                cls[severity_class(brixia_global(score))] += 1
            for m in d["Manufacturer"]:
                manus[m] = manus.get(m, 0) + 1
        out[s] = {
            "images": 0 if d is None else len(d),
            "patients": 0 if d is None else int(d["patient_id"].nunique()),
            "severity_classes": dict(zip(SEVERITY_CLASS_NAMES, cls)),
            "consensus_testset": 0 if d is None else int(d["ConsensusTestset"].str.lower().isin(_TRUE).sum()),
            "manufacturers": dict(sorted(manus.items())),
            "rejected": len(site_rej.get(s, [])),
        }
    return out


def import_brixia(
    src, out, dicom_dir="dicom_clean", split_by="none", min_site_size=50, link=True, progress=True
) -> dict:
    """Import the published BRIXIA layout at ``src`` into the federation ``out``.

    ``split_by="none"``: one site ``BRIXIA``; ``"manufacturer"``: one site per manufacturer (upper case,
    characters outside [A-Z0-9_-] -> ``_``), those with fewer than ``min_site_size`` imported images (and
    an empty Manufacturer) merged into ``OTHER``. Returns the summary rendered by :func:`format_import_summary`.
    """
    t0 = time.perf_counter()
    min_site_size = _check_params(split_by, min_site_size)
    src, out = Path(src), Path(out)
    ddir, df, notes = _open_source(src, out, dicom_dir, split_by)
    idx = index_files(ddir)
    dname = Path(dicom_dir).as_posix().rstrip("/")
    accepted, rejected, referenced = _scan_rows(df, ddir, dname, idx, src, progress)
    unref = unreferenced_files(idx, referenced, src)
    site_of, merged = _site_assignment(accepted, split_by, min_site_size)
    sites, files = _build_manifests(accepted, site_of, ddir)
    all_rej = _place_rejections(rejected, site_of) + unref
    site_rej, fed_rej = route_rejected(all_rej)
    notes += rejected_only_notes(site_rej, sites) + _merged_notes(merged, min_site_size)
    params = {"dicom_dir": dicom_dir, "split_by": split_by, "min_site_size": min_site_size, "link": bool(link)}
    write_output(out, "brixia", src, params, sites, site_rej, fed_rej, files, link)
    summary_sites = _site_summaries(sites, site_rej)
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
        "rejected": rejected_counts(all_rej),
        "rejected_total": len(all_rej),
        "federation_rejected": len(fed_rej),
        "notes": notes,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
