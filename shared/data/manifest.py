"""The federation format: the contract every importer, the generator and the trainer share.

A federation is a folder with one sub-folder per site. A site folder holds ``manifest.csv`` with
columns ``image, patient_id, prognosis, brixia, split`` (extra columns are kept) and, when anything
was turned away, ``rejected.csv`` with columns ``source, stage, reason``. Inputs that belong to no
site go to the federation-level ``rejected.csv``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pandas as pd

from mdmt.errors import DataError

MANIFEST = "manifest.csv"
REJECTED = "rejected.csv"
REQUIRED_COLUMNS = ("image", "patient_id", "prognosis", "brixia")
OPTIONAL_COLUMNS = ("split",)
REJECTED_COLUMNS = ("source", "stage", "reason")
PROGNOSIS_LABELS = ("MILD", "SEVERE")
SPLITS = ("train", "val", "test")
BRIXIA_ZONES = "ABCDEF"
_BRIXIA_RE = re.compile(r"^[0-3]{6}$")

# The paper's brixia_Global head: 4 classes of the global score 0-18.
SEVERITY_CLASS_EDGES = (4, 9, 14)  # <=4, 5-9, 10-14, >=15
SEVERITY_CLASS_NAMES = ("0-4", "5-9", "10-14", "15-18")


def brixia_global(score: str) -> int:
    """Sum of the six zone scores of a Brixia string such as ``"001223"``."""
    return sum(int(c) for c in score)


def severity_class(global_score: int) -> int:
    """The brixia_Global class (0..3) of a global score 0..18."""
    for k, edge in enumerate(SEVERITY_CLASS_EDGES):
        if global_score <= edge:
            return k
    return len(SEVERITY_CLASS_EDGES)


def outside_site(image: str) -> str | None:
    """Why a manifest's image path would leave the site folder, judged by its text alone (absolute, a drive,
    or more '..' than folders); None when it stays inside. Links inside the site folder that point
    elsewhere (the importers link to the dataset as published) are fine: the path itself stays inside."""
    text = image.replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        return f"path {image!r} is absolute; give the image path relative to the site folder"
    depth = 0
    for part in text.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return f"path {image!r} leaves the site folder; give the image path relative to the site folder"
        elif part not in ("", "."):
            depth += 1
    return None


def is_valid_brixia(score: str) -> bool:
    return bool(_BRIXIA_RE.match(score))


def read_manifest(site_dir: str | Path) -> pd.DataFrame:
    """Read and validate a site's manifest; every value is text, empty cells are ``""``.

    Raises DataError with a one-line message naming the file, row and column on bad content.
    """
    path = Path(site_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest.csv; a site folder needs one (see docs/data-format.md)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many types for malformed CSV
        raise DataError(f"{path}: cannot be read as CSV ({exc.__class__.__name__}: {exc})") from None
    df = df.rename(columns=lambda c: str(c).strip())  # 'split ' is the split column
    if df.columns.duplicated().any():
        dup = df.columns[df.columns.duplicated()][0]
        raise DataError(f"{path}: column {dup!r} appears twice (headers are compared without spaces)")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; required: {', '.join(REQUIRED_COLUMNS)}")
    if "split" not in df.columns:
        df["split"] = ""
    for col in ("image", "patient_id", "prognosis", "brixia", "split"):
        df[col] = df[col].str.strip()
    for i, row in enumerate(df.itertuples(index=False), start=2):  # row 1 is the header
        where = f"{path}:row {i}"
        if not row.image:
            raise DataError(f"{where}: empty 'image'; give the image path relative to the site folder")
        if not row.patient_id:
            raise DataError(f"{where}: empty 'patient_id'; every image needs its patient's id")
        if row.prognosis and row.prognosis not in PROGNOSIS_LABELS:
            raise DataError(f"{where}: prognosis {row.prognosis!r} is not MILD, SEVERE or empty")
        if row.brixia and not is_valid_brixia(row.brixia):
            raise DataError(f"{where}: brixia {row.brixia!r} is not six digits 0-3 (zones A..F) or empty")
        if row.split and row.split not in SPLITS:
            raise DataError(f"{where}: split {row.split!r} is not train, val, test or empty")
    dup = df["image"].duplicated()
    if dup.any():
        first = int(dup.idxmax()) + 2
        raise DataError(f"{path}:row {first}: image {df['image'][dup.idxmax()]!r} is listed twice")
    return df


def write_manifest(site_dir: str | Path, df: pd.DataFrame) -> Path:
    path = Path(site_dir) / MANIFEST
    cols = list(REQUIRED_COLUMNS) + ["split"] + [c for c in df.columns if c not in REQUIRED_COLUMNS + ("split",)]
    out = df.copy()
    if "split" not in out.columns:
        out["split"] = ""
    out[cols].to_csv(path, index=False)
    return path


def unlabelled(df: pd.DataFrame) -> pd.Series:
    """Rows with neither label: ingestion lists them in rejected.csv instead of caching them."""
    return (df["prognosis"] == "") & (df["brixia"] == "")


def site_role(df: pd.DataFrame) -> str:
    """``prognosis``, ``severity`` or ``both``, from the labels present."""
    has_p = bool((df["prognosis"] != "").any())
    has_s = bool((df["brixia"] != "").any())
    if has_p and has_s:
        return "both"
    if has_p:
        return "prognosis"
    if has_s:
        return "severity"
    raise DataError("a site without any label has no role")


def manifest_hash(site_dir: str | Path) -> str:
    """sha256 of the manifest bytes: stored with caches and checkpoints."""
    return hashlib.sha256((Path(site_dir) / MANIFEST).read_bytes()).hexdigest()


def list_sites(fed_dir: str | Path) -> list[str]:
    """Site names (sub-folders holding a manifest.csv) of a federation, sorted."""
    fed = Path(fed_dir)
    if not fed.is_dir():
        raise DataError(f"{fed}: federation folder not found")
    sites = sorted(p.name for p in fed.iterdir() if (p / MANIFEST).is_file())
    if not sites:
        raise DataError(f"{fed}: no site folders with a manifest.csv; run 'mdmt synth {fed}' or an importer")
    return sites


def dispatch_order(fed_dir: str | Path, sites: list[str] | None = None) -> list[str]:
    """The sites (default: all of the federation) in the order a simulation numbers its nodes: most
    images first, then by name.

    Flower's simulation hands each round's messages to its workers in partition-id order. With fewer
    workers than sites (two on a 2-core machine), a site waits for a free worker behind the sites before
    it, so the longest message, the largest site's, goes first. The order decides nothing else: a site's
    seed follows its name, and aggregation does not depend on the order of the replies.
    """
    fed = Path(fed_dir)
    names = list_sites(fed) if sites is None else list(sites)
    size = {s: _manifest_rows(fed / s) for s in names}
    return sorted(names, key=lambda s: (-size[s], s))


_ROWS: dict[tuple[str, int, int], int] = {}


def _manifest_rows(site_dir: Path) -> int:
    """Rows of a site's manifest, read once per process while the file keeps its size and mtime (a
    simulation worker asks for the order on every message)."""
    path = site_dir / MANIFEST
    try:
        st = path.stat()
    except OSError:
        return len(read_manifest(site_dir))  # names the missing file in one line
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _ROWS:
        _ROWS[key] = len(read_manifest(site_dir))
    return _ROWS[key]


def write_rejected(dir_: str | Path, stage: str, rows: list[tuple[str, str]]) -> Path:
    """Rewrite this stage's rows of ``dir_/rejected.csv``, keeping other stages' rows.

    ``rows`` are ``(source, reason)``; source is a site-relative path or ``file.xlsx:row N``.
    """
    path = Path(dir_) / REJECTED
    if path.is_file():
        old = pd.read_csv(path, dtype=str, keep_default_na=False)
        old = old[old["stage"] != stage]
    else:
        old = pd.DataFrame(columns=list(REJECTED_COLUMNS))
    new = pd.DataFrame([(s, stage, r) for s, r in rows], columns=list(REJECTED_COLUMNS))
    both = pd.concat([old, new], ignore_index=True)
    if both.empty:
        if path.is_file():
            path.unlink()
        return path
    both.to_csv(path, index=False)
    return path


def read_rejected(dir_: str | Path) -> pd.DataFrame:
    path = Path(dir_) / REJECTED
    if not path.is_file():
        return pd.DataFrame(columns=list(REJECTED_COLUMNS))
    return pd.read_csv(path, dtype=str, keep_default_na=False)
