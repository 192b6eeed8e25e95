"""Site plans: which patients and images each synthetic site holds, with their latents and labels."""

from __future__ import annotations

import math

import numpy as np

from mdmt.data.synth.looks import SITE_LOOKS
from mdmt.data.synth.model import (
    BRIXIA_IMAGES_PER_PATIENT,
    BRIXIA_MANUFACTURER_COUNTS,
    BRIXIA_PATIENT_GROUPING_SD,
    SEVERITY_SITE,
    global_prior,
    p_severe,
    sample_zones,
)
from mdmt.seeding import derive_seed


def _apportion(total: int, weights: dict[str, int]) -> dict[str, int]:
    """Largest-remainder apportionment of ``total`` over ``weights`` (exact when total == sum)."""
    wsum = sum(weights.values())
    quotas = {k: total * w / wsum for k, w in weights.items()}
    base = {k: int(math.floor(q)) for k, q in quotas.items()}
    left = total - sum(base.values())
    order = sorted(weights, key=lambda k: (-(quotas[k] - base[k]), -weights[k], k))
    for k in order[:left]:
        base[k] += 1
    return base


def _name(prefix: str, i: int, n: int, sep: str = "_") -> str:
    return f"{prefix}{sep}{i:0{max(4, len(str(n)))}d}"


def _quota_patients(rng: np.random.Generator, n_mild: int, n_severe: int) -> list[dict]:
    """Draw patients from the model; accept each while its class quota is open (conditional sampling)."""
    need = {False: n_mild, True: n_severe}
    prior = global_prior()
    out: list[dict] = []
    while need[False] > 0 or need[True] > 0:
        g = rng.choice(19, size=256, p=prior)
        h = rng.standard_normal(256)
        p = p_severe(g, h)
        y = rng.random(256) < p
        for gi, hi, pi, yi in zip(g, h, p, y):
            if need[bool(yi)] > 0:
                need[bool(yi)] -= 1
                out.append({"g": int(gi), "hidden": float(hi), "p": float(pi), "severe": bool(yi)})
            if need[False] == 0 and need[True] == 0:
                break
    for rec in out:
        rec["zones"] = sample_zones(rng, rec["g"])
    return out


def plan_prognosis(site: str, seed: int, n_mild: int, n_severe: int, both: bool) -> list[dict]:
    rng = np.random.default_rng(derive_seed(seed, "synth", site, "latent"))
    pats = _quota_patients(rng, n_mild, n_severe)
    n = len(pats)
    rows = []
    for i, rec in enumerate(pats, start=1):
        brixia = "".join(str(int(v)) for v in rec["zones"])
        rows.append(
            {
                "site": site,
                "image": f"images/{_name(site, i, n)}.dcm",
                "patient_id": _name(f"{site}_P", i, n, sep=""),
                "prognosis": "SEVERE" if rec["severe"] else "MILD",
                "brixia": brixia if both else "",
                "zones": rec["zones"],
                "g": rec["g"],
                "hidden": rec["hidden"],
                "p": rec["p"],
                "manufacturer": SITE_LOOKS[site].manufacturer,
            }
        )
    return rows


def plan_brixia(seed: int, counts: list[int]) -> list[dict]:
    rng = np.random.default_rng(derive_seed(seed, "synth", SEVERITY_SITE, "latent"))
    g = np.repeat(np.arange(19), counts)
    n = len(g)
    # group images into patients: similar scores (serial images of one patient) share a patient
    order = np.argsort(g + rng.normal(0, BRIXIA_PATIENT_GROUPING_SD, n), kind="stable")
    sizes = []
    ipp = np.asarray(BRIXIA_IMAGES_PER_PATIENT) / sum(BRIXIA_IMAGES_PER_PATIENT)
    while sum(sizes) < n:
        sizes.append(int(rng.choice(len(ipp), p=ipp)) + 1)
    sizes[-1] -= sum(sizes) - n
    groups = np.split(order, np.cumsum(sizes)[:-1])
    perm = rng.permutation(len(groups))
    groups = [rng.permutation(groups[k]) for k in perm]
    # manufacturers: published shares, apportioned and assigned at random to images
    mcount = _apportion(n, BRIXIA_MANUFACTURER_COUNTS)
    manus = rng.permutation(np.repeat(np.array(list(mcount), dtype=object), list(mcount.values())))
    hidden = rng.standard_normal(len(groups))
    rows, i = [], 0
    for pi, grp in enumerate(groups, start=1):
        pid = _name(f"{SEVERITY_SITE}_S", pi, len(groups), sep="")
        for idx in grp:
            i += 1
            gi = int(g[idx])
            zones = sample_zones(rng, gi)
            rows.append(
                {
                    "site": SEVERITY_SITE,
                    "image": f"images/{_name(SEVERITY_SITE, i, n)}.dcm",
                    "patient_id": pid,
                    "prognosis": "",
                    "brixia": "".join(str(int(v)) for v in zones),
                    "zones": zones,
                    "g": gi,
                    "hidden": float(hidden[pi - 1]),
                    "p": float(p_severe(gi, hidden[pi - 1])),
                    "manufacturer": str(manus[i - 1]),
                }
            )
    return rows
