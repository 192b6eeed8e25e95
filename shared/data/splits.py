"""Per-site train/val assignment: deterministic, patient-grouped, class-stratified.

Rule (see docs/data-format.md):

* A row whose manifest ``split`` is set keeps it (the user's override; this is the only way a row becomes
  ``test``). Rows of a patient who already has overridden rows follow that patient's override (its most
  frequent value, ties in the order train, val, test), so a patient never straddles two splits.
* The other rows are split train/val by patient. Stratum of a row: its prognosis (``MILD``/``SEVERE``)
  where present, else its brixia_Global class (``b0``..``b3``); a row with both gets the combined label
  (``MILD|b2``). A stratum with fewer patients than folds is merged into a coarser one: combined ->
  prognosis only, then any still-rare stratum -> ``rare``.
* ``StratifiedGroupKFold(n_splits=round(1/val_fraction), shuffle=True,
  random_state=site_seed(seed, site, "val"))`` over patients; the fold whose size is nearest to
  ``val_fraction`` of the rows (lowest index on ties) becomes ``val``.
* Small sites (fewer patients than folds): the patients are sorted, shuffled with the same seed and
  ``max(1, round(val_fraction * n_patients))`` of them (at most all but one) become ``val``.
  A site with one free patient keeps it in ``train``, unless other patients are overridden to ``train``
  and no row is ``val``: then it becomes ``val``. Nothing ever raises for size.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from mdmt.data.manifest import SPLITS, brixia_global, severity_class
from mdmt.seeding import site_seed


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    if name not in df.columns:
        return pd.Series([""] * len(df), index=df.index, dtype=object)
    return df[name].fillna("").astype(str).str.strip()


def stratum_labels(df: pd.DataFrame) -> pd.Series:
    """The fine stratum of each row: ``MILD``, ``SEVERE``, ``b0``..``b3``, ``MILD|b2``..., or ``none``."""
    prog = _col(df, "prognosis")
    brix = _col(df, "brixia")
    out = []
    for p, b in zip(prog, brix):
        s = f"b{severity_class(brixia_global(b))}" if b else ""
        out.append("|".join(v for v in (p, s) if v) or "none")
    return pd.Series(out, index=df.index, dtype=object)


def _merge_rare(labels: np.ndarray, groups: np.ndarray, n_splits: int) -> np.ndarray:
    """Coarsen strata that hold fewer patients than folds (combined -> prognosis -> 'rare')."""

    def rare_set(lab: np.ndarray) -> set[str]:
        counts = pd.DataFrame({"l": lab, "g": groups}).groupby("l")["g"].nunique()
        return set(counts.index[counts < n_splits])

    lab = labels.astype(object).copy()
    rare = rare_set(lab)
    lab = np.array([v.split("|")[0] if (v in rare and "|" in v) else v for v in lab], dtype=object)
    rare = rare_set(lab)
    lab = np.array(["rare" if v in rare else v for v in lab], dtype=object)
    return lab


def _patient_split(free: pd.DataFrame, seed: int, val_fraction: float) -> dict[str, str]:
    """patient_id -> 'train' | 'val' for the rows without an override."""
    groups = free["patient_id"].astype(str).to_numpy()
    patients = np.unique(groups)  # sorted: independent of row order
    n_pat = len(patients)
    if n_pat == 0:
        return {}
    if n_pat < 2 or val_fraction <= 0:
        return {p: "train" for p in patients}
    n_splits = max(2, int(round(1.0 / min(val_fraction, 0.5))))
    if n_pat < n_splits:
        rng = np.random.default_rng(seed)
        order = rng.permutation(n_pat)
        n_val = min(max(1, int(round(val_fraction * n_pat))), n_pat - 1)
        val = set(patients[order[:n_val]])
        return {p: ("val" if p in val else "train") for p in patients}

    # deferred: scikit-learn (slow to import; only the CV protocol needs it)
    from sklearn.model_selection import StratifiedGroupKFold

    labels = _merge_rare(stratum_labels(free).to_numpy(), groups, n_splits)
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    target = val_fraction * len(free)
    best = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "least populated class has only k members"
        for k, (_, test_idx) in enumerate(sgkf.split(np.zeros(len(free)), labels, groups)):
            n_val_pat = len(np.unique(groups[test_idx]))
            if n_val_pat == 0 or n_val_pat == n_pat:
                continue
            score = abs(len(test_idx) - target)
            if best is None or score < best[0]:
                best = (score, k, test_idx)
    if best is None:  # cannot happen with >= 2 patients, kept as a guard
        return {p: ("val" if i == 0 else "train") for i, p in enumerate(patients)}
    val = set(groups[best[2]])
    return {p: ("val" if p in val else "train") for p in patients}


def assign_splits(df: pd.DataFrame, site: str, seed: int, val_fraction: float = 0.1) -> pd.Series:
    """``train`` / ``val`` / ``test`` for each row of ``df`` (aligned with its index); see the module doc."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if "patient_id" not in df.columns:
        raise ValueError("assign_splits needs a 'patient_id' column")
    override = _col(df, "split")
    bad = sorted(set(override) - set(SPLITS) - {""})
    if bad:
        raise ValueError(f"split value(s) {', '.join(map(repr, bad))} are not train, val, test or empty")
    out = override.copy()
    pid = df["patient_id"].astype(str)

    # free rows of a patient with overrides follow that patient's override
    set_rows = out != ""
    if set_rows.any():
        rank = {s: i for i, s in enumerate(SPLITS)}
        follow = {}
        for p, vals in out[set_rows].groupby(pid[set_rows]):
            counts = vals.value_counts()
            follow[p] = sorted(counts.index, key=lambda s: (-counts[s], rank[s]))[0]
        inherit = (~set_rows) & pid.isin(follow.keys())
        out[inherit] = pid[inherit].map(follow)

    free = out == ""
    if free.any():
        mapping = _patient_split(df.loc[free].assign(patient_id=pid[free]), site_seed(seed, site, "val"), val_fraction)
        out[free] = pid[free].map(mapping)
        # one free patient beside overridden train rows and no val anywhere: that patient is val
        if not (out == "val").any() and len(mapping) == 1 and (override == "train").any():
            out[free] = "val"
    return out.rename("split").astype(object)


def split_counts(df: pd.DataFrame, splits: pd.Series) -> pd.DataFrame:
    """A table for printing: per split, images, patients and the count of each label."""
    splits = pd.Series(splits, index=df.index)
    prog = _col(df, "prognosis")
    brix = _col(df, "brixia")
    sev = brix.map(lambda b: f"b{severity_class(brixia_global(b))}" if b else "")
    rows = []
    for s in SPLITS:
        m = splits == s
        row = {
            "split": s,
            "images": int(m.sum()),
            "patients": int(df.loc[m, "patient_id"].nunique()) if "patient_id" in df.columns else 0,
            "MILD": int((prog[m] == "MILD").sum()),
            "SEVERE": int((prog[m] == "SEVERE").sum()),
        }
        for k in range(4):
            row[f"b{k}"] = int((sev[m] == f"b{k}").sum())
        rows.append(row)
    return pd.DataFrame(rows).set_index("split")


# ---- protocols: the split file of a federation ---------------------------------------------------------

CONSENSUS_COLUMN = "ConsensusTestset"  # BRIXIA's 150 images scored by 5 radiologists
SPLIT_FILE_COLUMNS = ("site", "image", "protocol", "fold", "role")


def consensus_rows(df: pd.DataFrame) -> pd.Series:
    """Rows of BRIXIA's consensus test set (``ConsensusTestset`` = 1/true) and every other image of
    the same patients, so no consensus patient is seen in training; False where the column is absent."""
    flagged = _col(df, CONSENSUS_COLUMN).str.lower().isin(["1", "true", "yes"])
    if not flagged.any():
        return flagged
    pid = df["patient_id"].astype(str)
    return pid.isin(set(pid[flagged]))


def site_splits(
    df: pd.DataFrame, site: str, seed: int, val_fraction: float = 0.1, exclude_consensus: bool = True
) -> pd.Series:
    """A training site's rows under LOCO: :func:`assign_splits`, and by default the consensus set
    kept out of training as the severity test set."""
    out = assign_splits(df, site, seed, val_fraction)
    if exclude_consensus:
        out[consensus_rows(df)] = "test"
    return out


def _cv_strata(df: pd.DataFrame, site: str) -> np.ndarray:
    """class x centre for prognosis rows; severity class x manufacturer x centre for severity-only rows."""
    prog = _col(df, "prognosis")
    manu = _col(df, "manufacturer") if "manufacturer" in df.columns else _col(df, "Manufacturer")
    fine = stratum_labels(df)
    return np.array([f"{p}|{site}" if p else f"{s}|{m}|{site}" for p, s, m in zip(prog, fine, manu)], dtype=object)


def site_cv_folds(df: pd.DataFrame, site: str, seed: int, n_folds: int = 5) -> np.ndarray:
    """Patient-level k-fold assignment of one site's rows, stratified by class (x manufacturer for severity
    rows): the fold index of each row. Computed from the site's own manifest only, so a site daemon and
    ``mdmt splits`` agree without seeing other sites; stratifying each centre by class stratifies the
    federation by class x centre. A site with fewer patients than folds deals its patients round-robin."""
    # deferred: scikit-learn (slow to import; only the CV protocol needs it)
    from sklearn.model_selection import StratifiedGroupKFold

    groups = df["patient_id"].astype(str).to_numpy()
    fold = np.zeros(len(df), dtype=int)
    patients = np.unique(groups)
    if len(patients) < n_folds:
        order = np.random.default_rng(site_seed(seed, site, "cv")).permutation(patients)
        pos = {p: i % n_folds for i, p in enumerate(order)}
        return np.array([pos[g] for g in groups], dtype=int)
    labels = _merge_rare(_cv_strata(df, site), groups, n_folds)
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=site_seed(seed, site, "cv"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, (_, idx) in enumerate(sgkf.split(np.zeros(len(df)), labels, groups)):
            fold[idx] = k
    return fold


def cv_roles(
    df: pd.DataFrame, site: str, seed: int, fold: int, n_folds: int = 5, exclude_consensus: bool = True
) -> pd.Series:
    """A site's rows in CV fold ``fold``: test = fold k, validation = fold k+1, training = the rest; the
    manifest's ``split = test`` rows and (by default) BRIXIA's consensus set are always ``test``."""
    if not 0 <= fold < n_folds:
        raise ValueError(f"CV fold {fold} is outside 0..{n_folds - 1}")
    k = site_cv_folds(df, site, seed, n_folds)
    role = np.where(k == fold, "test", np.where(k == (fold + 1) % n_folds, "val", "train")).astype(object)
    fixed = (_col(df, "split") == "test").to_numpy()
    if exclude_consensus:
        fixed = fixed | consensus_rows(df).to_numpy()
    role[fixed] = "test"
    return pd.Series(role, index=df.index, dtype=object)


def federation_splits(
    tables: dict[str, pd.DataFrame],
    prognosis_sites: list[str],
    seed: int,
    val_fraction: float = 0.1,
    n_folds: int = 5,
    exclude_consensus: bool = True,
) -> pd.DataFrame:
    """Every (site, image, protocol, fold, role) of a federation, reproducible from the seed.

    - ``loco``: one fold per prognosis centre; that centre's rows are ``test``; the other sites' rows follow
      :func:`site_splits` (validation drawn only from the training centres).
    - ``cv``: patient-level ``n_folds``-fold CV stratified by class x centre (x manufacturer for severity
      rows); in fold k, test = fold k, validation = fold k+1, training = the rest.
    In both, the manifest's ``split = test`` rows and (by default) BRIXIA's consensus set are ``test``.
    """
    rows = []
    base = {s: site_splits(t, s, seed, val_fraction, exclude_consensus) for s, t in tables.items()}
    for holdout in prognosis_sites:
        for s, t in sorted(tables.items()):
            role = ["test"] * len(t) if s == holdout else base[s].to_numpy()
            rows.append(
                pd.DataFrame(
                    {"site": s, "image": t["image"].to_numpy(), "protocol": "loco", "fold": holdout, "role": role}
                )
            )
    for k in range(n_folds):
        for s, t in sorted(tables.items()):
            rows.append(
                pd.DataFrame(
                    {
                        "site": s,
                        "image": t["image"].to_numpy(),
                        "protocol": "cv",
                        "fold": str(k),
                        "role": cv_roles(t, s, seed, k, n_folds, exclude_consensus).to_numpy(),
                    }
                )
            )
    return pd.concat(rows, ignore_index=True)[list(SPLIT_FILE_COLUMNS)]
