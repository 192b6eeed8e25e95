"""The synthetic hospital federation: procedural chest X-ray DICOMs with known latent disease.

``synthesize(out_dir, ...)`` writes a federation in the format of ``mdmt.data.manifest``:

* prognosis hospitals ``A``..``F`` (MILD/SEVERE, the AIforCOVID centres' exact class counts at scale 1),
* the severity hospital ``BRIXIA`` (six zone scores, the published global-score distribution at scale 1),
* optionally ``DUAL``: a hospital that records both labels for each image,

plus, at the federation root, ``synth.json`` (parameters, counts, the oracle ceiling) and
``synth_truth.csv`` (per image: latent zone scores, burden, hidden factor, P(SEVERE)).

``layout="aiforcovid"`` / ``"brixia"`` write the same A-F / BRIXIA images and labels (byte-identical DICOMs)
in the datasets' published layouts instead, as input for ``mdmt.data.importers`` (docs/synthetic.md).

The generative model (every constant is documented in docs/synthetic.md):

1. Global Brixia score G (0..18) ~ the published BRIXIA distribution (``BRIXIA_GLOBAL_COUNTS``).
2. Zone scores z_A..z_F (each 0..3, sum G) ~ P(z | G) proportional to prod_k w_k ** z_k; the weights are
   fitted so that the mean zone profile over the published G distribution equals ``BRIXIA_ZONE_MEANS``.
3. Hidden non-image factor h ~ N(0, 1) (age / comorbidity stand-in, never rendered into the image).
4. logit P(SEVERE) = SEVERE_SLOPE * (G - SEVERE_CENTRE) + HIDDEN_WEIGHT * h.
5. Prognosis hospitals draw patients from 1-4 and accept them while their class quota is open, so the
   labels remain a faithful function of the latents; BRIXIA draws z | G for its exact G counts.
6. The image renders the anatomy of the patient and opacities whose density rises with each zone's score,
   then the site's (BRIXIA: the manufacturer's) acquisition look.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter
from scipy.special import expit

from mdmt.data.manifest import (
    BRIXIA_ZONES,
    SEVERITY_CLASS_NAMES,
    severity_class,
    write_manifest,
)
from mdmt.errors import ConfigError
from mdmt.seeding import derive_seed

# --------------------------------------------------------------------------------------------------
# Published targets (scale 1.0). See /work/shared/design/method-and-data.md.
# --------------------------------------------------------------------------------------------------
PROGNOSIS_SITES = ("A", "B", "C", "D", "E", "F")
SEVERITY_SITE = "BRIXIA"
DUAL_SITE = "DUAL"

#: AIforCOVID per-centre counts (MILD, SEVERE).
PROGNOSIS_COUNTS: dict[str, tuple[int, int]] = {
    "A": (35, 85),
    "B": (59, 45),
    "C": (70, 81),
    "D": (76, 63),
    "E": (55, 46),
    "F": (544, 426),
}
#: BRIXIA images per global score 0..18 (sum 4,695).
BRIXIA_GLOBAL_COUNTS: tuple[int, ...] = (
    51, 165, 299, 251, 269, 277, 370, 351, 387, 353, 391, 356, 318, 261, 233, 164, 116, 60, 23,
)
#: Published mean zone scores A..F.
BRIXIA_ZONE_MEANS: tuple[float, ...] = (0.85, 1.55, 1.85, 0.65, 1.53, 1.87)
#: Published BRIXIA manufacturer counts (sum 4,694; the 4,695th image has no Manufacturer: ``""``).
BRIXIA_MANUFACTURER_COUNTS: dict[str, int] = {
    "SIEMENS": 2196,
    "CARESTREAM": 1805,
    "AGFA": 576,
    "KODAK": 73,
    "VSM": 28,
    "FUJIFILM": 15,
    "DIGITEC": 1,
    "": 1,
}
#: DUAL (both labels) at scale 1: 150 images split like pooled AIforCOVID (839/746 -> 79/71).
DUAL_COUNTS: tuple[int, int] = (79, 71)

#: Floors of the scaling rule (see ``scaled_count``).
PROGNOSIS_FLOOR = 5  # per class (MILD, SEVERE) per site: 5-fold CV stratified by class x centre stays possible
BRIXIA_FLOOR = 2  # per global-score bucket 0..18: each 4-class bucket keeps >= 8 images (15-18 has 4 buckets)
DUAL_FLOOR = 5  # per class

#: BRIXIA images per patient (ASSUMPTION: subject count not in our notes). P(k images), k = 1..6; mean 2.03.
BRIXIA_IMAGES_PER_PATIENT: tuple[float, ...] = (0.50, 0.22, 0.13, 0.08, 0.04, 0.03)
#: sd of the noise added to G before grouping sorted images into patients (serial images stay similar).
BRIXIA_PATIENT_GROUPING_SD = 2.0

#: layout="brixia": the published consensus test set (150 images at scale 1), scaled like BRIXIA's buckets.
CONSENSUS_TESTSET_COUNT = 150
CONSENSUS_FLOOR = BRIXIA_FLOOR
#: layout="aiforcovid": share of the A-F images in release 1, 2, 3 (imgs/, imgs_r2/, imgs_r3/). ASSUMPTION:
#: the real releases' sizes are not in our notes.
AIFORCOVID_RELEASE_SHARES = (0.5, 0.3, 0.2)
AIFORCOVID_NO_SUFFIX_SHARE = 0.25  # DICOM files written without the .dcm suffix
AIFORCOVID_IMAGEFILE_DCM_SHARE = 0.5  # ImageFile cells written with the .dcm suffix

# --------------------------------------------------------------------------------------------------
# Prognosis model: logit P(SEVERE) = SEVERE_SLOPE * (G - SEVERE_CENTRE) + HIDDEN_WEIGHT * h, h ~ N(0, 1)
# --------------------------------------------------------------------------------------------------
SEVERE_SLOPE = 0.35  # per Brixia point: odds x1.42 per point, x4.4 per sd (4.2 points) of G
SEVERE_CENTRE = 8.8  # makes the population SEVERE share 47% (= AIforCOVID 746/1585)
HIDDEN_WEIGHT = 1.0  # hidden factor: odds x2.7 per sd, comparable to one sd of imaging burden
CEILING_MC_SAMPLES = 200_000
#: The documented range the oracle AUC (model, exact) must fall in.
CEILING_AUC_RANGE = (0.75, 0.85)

#: ``federation``: the federation format; ``aiforcovid`` / ``brixia``: the datasets' published layouts
#: (A-F resp. BRIXIA only), for the importers of ``mdmt.data.importers``.
LAYOUTS = ("federation", "aiforcovid", "brixia")
_MM_PER_UNIT = 200.0  # anatomy unit (thorax half-width ~0.8) in mm, for PixelSpacing
_FIELD_UNITS = 2.2  # anatomy units across the shorter image side at zoom 1


# --------------------------------------------------------------------------------------------------
# Scaling rule
# --------------------------------------------------------------------------------------------------
def scaled_count(n_real: int, scale: float, floor: int) -> int:
    """``max(floor, round_half_up(n_real * scale))``, computed in decimal so 0.5 rounds up exactly."""
    if n_real <= 0:
        return 0
    n = int((Decimal(int(n_real)) * Decimal(repr(float(scale)))).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    return max(int(floor), n)


def targets(scale: float = 1.0, both_site: bool = False) -> dict:
    """The per-site target counts at ``scale``: {site: {"MILD": n, "SEVERE": n}} and BRIXIA's 19 buckets."""
    out: dict = {}
    for site in PROGNOSIS_SITES:
        mild, severe = PROGNOSIS_COUNTS[site]
        out[site] = {"MILD": scaled_count(mild, scale, PROGNOSIS_FLOOR),
                     "SEVERE": scaled_count(severe, scale, PROGNOSIS_FLOOR)}
    out[SEVERITY_SITE] = {"global_score_counts": [scaled_count(n, scale, BRIXIA_FLOOR) for n in BRIXIA_GLOBAL_COUNTS]}
    if both_site:
        out[DUAL_SITE] = {"MILD": scaled_count(DUAL_COUNTS[0], scale, DUAL_FLOOR),
                          "SEVERE": scaled_count(DUAL_COUNTS[1], scale, DUAL_FLOOR)}
    return out


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


# --------------------------------------------------------------------------------------------------
# Latent disease model
# --------------------------------------------------------------------------------------------------
def global_prior() -> np.ndarray:
    c = np.asarray(BRIXIA_GLOBAL_COUNTS, dtype=float)
    return c / c.sum()


@lru_cache(maxsize=1)
def zone_model() -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Fitted log-weights theta (6,), and per global score G the zone vectors summing to G and P(z | G)."""
    Z = np.array(list(product(range(4), repeat=6)), dtype=np.int64)  # 4096 x 6
    gsum = Z.sum(1)
    prior = global_prior()
    target = np.asarray(BRIXIA_ZONE_MEANS)
    theta = np.zeros(6)

    def cond(th):
        lw = Z @ th
        probs = np.empty(len(Z))
        for g in range(19):
            m = gsum == g
            e = np.exp(lw[m] - lw[m].max())
            probs[m] = e / e.sum()
        return probs

    for _ in range(500):
        probs = cond(theta)
        mean = (Z * (probs * prior[gsum])[:, None]).sum(0)
        step = np.log(target / mean)
        theta = theta + 0.8 * step
        theta -= theta.mean()
        if np.abs(step).max() < 1e-10:
            break
    probs = cond(theta)
    vecs = [Z[gsum == g] for g in range(19)]
    ps = [probs[gsum == g] for g in range(19)]
    return theta, vecs, ps


def model_zone_means() -> np.ndarray:
    """Mean zone profile implied by the fitted zone model under the published G distribution."""
    _, vecs, ps = zone_model()
    prior = global_prior()
    return sum(prior[g] * (ps[g][:, None] * vecs[g]).sum(0) for g in range(19))


def sample_zones(rng: np.random.Generator, g: int) -> np.ndarray:
    _, vecs, ps = zone_model()
    return vecs[g][rng.choice(len(ps[g]), p=ps[g])]


def p_severe(g, h) -> np.ndarray:
    g, h = np.asarray(g, dtype=float), np.asarray(h, dtype=float)
    return expit(SEVERE_SLOPE * (g - SEVERE_CENTRE) + HIDDEN_WEIGHT * h)


def p_severe_given_g() -> np.ndarray:
    """P(SEVERE | G) for G = 0..18, integrating the hidden factor out (Gauss-Hermite, 80 nodes)."""
    x, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    return np.array([(w * p_severe(g, x)).sum() for g in range(19)])


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half."""
    from scipy.stats import rankdata

    y = np.asarray(y, bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _best_threshold_acc(score: np.ndarray, y: np.ndarray) -> float:
    y = np.asarray(y, bool)
    best = 0.0
    for t in np.unique(score):
        for pred in (score >= t, score > t):
            best = max(best, float((pred == y).mean()))
    return best


def oracle_ceiling(seed: int = 0, n_mc: int = CEILING_MC_SAMPLES) -> dict:
    """Best ACC/AUC of an oracle that reads the exact global score G but not the hidden factor.

    ``exact``: from the model's joint distribution of (G, label); ``mc``: n_mc Monte Carlo patients.
    """
    prior = global_prior()
    pg = p_severe_given_g()
    acc = float((prior * np.maximum(pg, 1 - pg)).sum())
    ps, pm = prior * pg, prior * (1 - pg)
    ps_n, pm_n = ps / ps.sum(), pm / pm.sum()
    cm = np.cumsum(pm_n)  # P(G_mild <= g)
    below = np.concatenate([[0.0], cm[:-1]])
    auc = float((ps_n * (below + 0.5 * pm_n)).sum())
    rng = np.random.default_rng(derive_seed(seed, "synth", "ceiling"))
    g = rng.choice(19, size=n_mc, p=prior)
    h = rng.standard_normal(n_mc)
    y = rng.random(n_mc) < p_severe(g, h)
    bayes = pg[g] > 0.5
    return {
        "exact": {"acc": round(acc, 4), "auc": round(auc, 4), "severe_share": round(float(ps.sum()), 4)},
        "mc": {"n": int(n_mc), "acc_bayes": round(float((bayes == y).mean()), 4), "auc": round(_auc(g, y), 4),
               "severe_share": round(float(y.mean()), 4)},
        "hidden_known": {"auc": round(_auc(SEVERE_SLOPE * g + HIDDEN_WEIGHT * h, y), 4)},
    }


def _generated_ceiling(g: np.ndarray, y: np.ndarray) -> dict:
    pg = p_severe_given_g()
    return {"n": int(len(y)), "auc": round(_auc(g, y), 4),
            "acc_bayes": round(float(((pg[g] > 0.5) == y).mean()), 4) if len(y) else float("nan"),
            "acc_best_threshold": round(_best_threshold_acc(g, y), 4) if len(y) else float("nan")}


# --------------------------------------------------------------------------------------------------
# Acquisition looks
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Look:
    manufacturer: str
    modality: str  # CR or DX
    photometric: str  # MONOCHROME1 (stored values inverted) or MONOCHROME2
    bits: int  # BitsStored
    slope: float  # RescaleSlope
    intercept: float  # RescaleIntercept
    gamma: float  # display-intensity exponent
    noise: float  # sd of additive noise, in display units (0..1)
    blur: float  # Gaussian sigma in pixels at a 320-pixel side
    zoom: float  # >1: body larger in the frame
    offset: tuple[float, float]  # (x, y) shift of the frame centre, anatomy units (x: image right, y: down)
    size: tuple[float, float]  # (rows, cols) as multiples of image_size
    lo: float = 0.04  # fraction of the stored range used for display 0
    hi: float = 0.92  # ... and display 1
    collimation: float = 0.0  # unexposed border (white in display), fraction of each side
    marker: str = ""  # lead marker corner: tl, tr, bl, br or ""


SITE_LOOKS: dict[str, Look] = {
    "A": Look("GE Healthcare", "DX", "MONOCHROME2", 12, 1.0, 0.0, 1.00, 0.010, 0.6, 1.00, (0.00, 0.00), (1.0, 1.0), marker="tr"),
    "B": Look("Philips Medical Systems", "DX", "MONOCHROME2", 14, 1.0, 0.0, 0.80, 0.015, 0.8, 1.08, (0.00, 0.04), (1.2, 1.0)),
    "C": Look("FUJIFILM Corporation", "CR", "MONOCHROME1", 10, 1.0, 0.0, 1.25, 0.025, 1.2, 0.92, (0.04, -0.03), (1.0, 1.0), collimation=0.04),
    "D": Look("SIEMENS", "DX", "MONOCHROME2", 16, 1.0, -1024.0, 0.90, 0.008, 0.5, 1.04, (-0.03, 0.00), (0.9, 1.1)),
    "E": Look("Carestream Health", "CR", "MONOCHROME1", 12, 2.0, 0.0, 1.10, 0.020, 1.0, 0.96, (0.00, 0.02), (1.1, 0.9), marker="tl"),
    "F": Look("Agfa", "CR", "MONOCHROME1", 14, 1.0, 0.0, 0.95, 0.014, 0.9, 1.00, (0.02, 0.00), (1.25, 1.0), lo=0.10, hi=0.85),
    "DUAL": Look("Canon Inc.", "DX", "MONOCHROME2", 12, 1.0, -1024.0, 1.05, 0.012, 0.7, 1.02, (0.00, 0.00), (1.0, 1.0)),
}
BRIXIA_LOOKS: dict[str, Look] = {
    "SIEMENS": Look("SIEMENS", "CR", "MONOCHROME1", 12, 1.0, 0.0, 1.10, 0.018, 1.0, 0.95, (0.00, 0.00), (1.0, 1.0)),
    "CARESTREAM": Look("CARESTREAM", "DX", "MONOCHROME2", 14, 1.0, 0.0, 0.85, 0.010, 0.6, 1.05, (0.00, 0.03), (1.2, 1.0)),
    "AGFA": Look("AGFA", "CR", "MONOCHROME1", 12, 2.0, -1024.0, 1.00, 0.020, 1.1, 0.92, (0.03, 0.00), (1.0, 1.2)),
    "KODAK": Look("KODAK", "CR", "MONOCHROME1", 12, 1.0, 0.0, 1.30, 0.022, 1.3, 0.98, (-0.02, -0.02), (1.2, 1.0), collimation=0.05),
    "VSM": Look("VSM", "DX", "MONOCHROME2", 14, 1.0, 0.0, 0.90, 0.012, 0.7, 1.10, (0.00, 0.05), (1.0, 1.0), marker="br"),
    "FUJIFILM": Look("FUJIFILM", "CR", "MONOCHROME1", 10, 1.0, 0.0, 1.20, 0.028, 1.2, 0.90, (0.00, 0.00), (1.0, 1.0)),
    "DIGITEC": Look("DIGITEC", "DX", "MONOCHROME2", 16, 1.0, 0.0, 1.00, 0.008, 0.5, 1.00, (0.00, 0.00), (1.1, 1.1)),
    "": Look("", "DX", "MONOCHROME2", 12, 1.0, 0.0, 1.00, 0.015, 0.8, 1.00, (0.00, 0.00), (1.0, 1.0)),
}


def look_for(site: str, manufacturer: str | None = None) -> Look:
    if site == SEVERITY_SITE:
        return BRIXIA_LOOKS[manufacturer or ""]
    return SITE_LOOKS[site]


def image_shape(look: Look, image_size: int) -> tuple[int, int]:
    return max(16, int(round(image_size * look.size[0]))), max(16, int(round(image_size * look.size[1])))


# --------------------------------------------------------------------------------------------------
# Renderer
# --------------------------------------------------------------------------------------------------
def _sm(d, e):
    """Smooth step 0 -> 1 around d = 0 with half-width e (cubic Hermite, cheap)."""
    r = np.clip(d * (0.5 / e) + 0.5, 0.0, 1.0)
    return r * r * (3.0 - 2.0 * r)


def _ramp(d, e):
    """Linear ramp 0 -> 1 around d = 0 with half-width e (cheaper than ``_sm``; for soft edges)."""
    return np.clip(d * (0.5 / e) + 0.5, 0.0, 1.0)


def _fourier_field(rng, x, y, n, lam_min, lam_max):
    """Smooth random field (unit variance) on the separable grid x (cols), y (rows): random Fourier features.

    sum_m cos(kx_m x + ky_m y + phi_m) = [cos(ky y), -sin(ky y)] @ [cos(kx x + phi), sin(kx x + phi)]^T
    """
    lam = rng.uniform(lam_min, lam_max, n)
    ang = rng.uniform(0, 2 * np.pi, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    k = 2 * np.pi / lam
    ax_ = np.outer(x, k * np.cos(ang)) + phase
    ay_ = np.outer(y, k * np.sin(ang))
    left = np.concatenate([np.cos(ay_), -np.sin(ay_)], 1).astype(np.float32)
    right = np.concatenate([np.cos(ax_), np.sin(ax_)], 1).astype(np.float32) * np.float32(math.sqrt(2.0 / n))
    return left @ right.T


def _anatomy(rng: np.random.Generator) -> dict:
    """Per-patient body geometry (anatomy units: x in [-1, 1] image left -> right, y top -> bottom)."""
    dome_r = rng.uniform(0.30, 0.42)  # patient's right hemidiaphragm (image left) sits higher
    a = {
        "W": rng.uniform(0.74, 0.84),  # lateral extent of the lungs
        "wall": rng.uniform(0.07, 0.12),  # chest wall thickness
        "top": rng.uniform(-0.80, -0.68),  # lung apices
        "dome_r": dome_r,
        "dome_l": dome_r + rng.uniform(0.03, 0.08),
        "med_r": rng.uniform(0.09, 0.13),
        "med_l": rng.uniform(0.11, 0.15),
        "heart_cx": rng.uniform(0.12, 0.19),
        "heart_rx": rng.uniform(0.32, 0.40),
        "heart_ry": rng.uniform(0.22, 0.28),
        "rib_sp": rng.uniform(0.135, 0.165),
        "rib_curv": rng.uniform(0.45, 0.62),
        "rib_phase": rng.uniform(0, 1),
        "soft": rng.uniform(0.50, 0.60),
        "air": rng.uniform(0.30, 0.38),
        "clav_y": rng.uniform(-0.78, -0.66),
    }
    return {k: float(v) for k, v in a.items()}


def _band(y: np.ndarray, lo: float, hi: float) -> slice:
    """Rows whose y lies in [lo, hi] (y increases with the row index)."""
    return slice(int(np.searchsorted(y, lo)), int(np.searchsorted(y, hi, side="right")))


def render(anat: dict, zones, look: Look, rows: int, cols: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Display intensity (0 = black, 1 = white; dense tissue bright) of one chest radiograph, float32.

    Returns the image and the pixel size in mm. Full-frame work is kept to a few passes; the lungs, ribs,
    heart and clavicles are computed only on the row band they occupy.
    """
    f32 = np.float32
    zoom = look.zoom * rng.uniform(0.96, 1.04)
    ox = look.offset[0] + rng.uniform(-0.03, 0.03)
    oy = look.offset[1] + rng.uniform(-0.03, 0.03)
    px = _FIELD_UNITS / (zoom * min(rows, cols))
    x = ((np.arange(cols) + 0.5 - cols / 2) * px + ox).astype(f32)
    y = ((np.arange(rows) + 0.5 - rows / 2) * px + oy).astype(f32)
    ax = np.abs(x)
    a = anat
    W, top, dome_r, dome_l = a["W"], a["top"], a["dome_r"], a["dome_l"]

    # body: soft tissue inside the outline (chest wall, shoulders at the top, neck above), thicker medially
    wb = np.full_like(y, W + a["wall"])
    wb += 0.14 * _sm(-0.72 - y, 0.10)
    wb = 0.24 + (wb - 0.24) * _sm(y + 1.02, 0.06)
    img = _ramp(wb[:, None] - ax[None, :], 0.02)
    img *= (a["soft"] * (0.88 + 0.12 * np.clip(1 - (x / (W + a["wall"])) ** 2, 0, 1)))[None, :]
    # mediastinum and spine (separable)
    img += np.outer(0.10 * _sm(dome_l + 0.1 - y, 0.05), _ramp(0.12 - np.abs(x - 0.02), 0.03))
    img += np.outer(0.85 + 0.15 * np.cos(2 * np.pi * y / 0.11) ** 2, 0.10 * _ramp(0.065 - ax, 0.015))

    # thorax band: lungs, heart, ribs, vessels, opacities
    tb = _band(y, top - 0.05, max(dome_r, dome_l) + 0.30)
    yt = y[tb]
    Yt = yt[:, None]
    nt = len(yt)
    z = [float(v) for v in zones]
    lung = np.zeros((nt, cols), f32)
    S = np.zeros((nt, cols), f32)
    for side, med, dome, zs in ((-1, a["med_r"], dome_r, z[0:3]), (1, a["med_l"], dome_l, z[3:6])):
        cs = slice(0, int(np.searchsorted(x, 0.0))) if side < 0 else slice(int(np.searchsorted(x, 0.0)), cols)
        u = (side * x[cs]).astype(f32)  # distance from the midline on this lung's side
        t = np.clip((yt - top) / (dome - top + 0.15), 0, 1)
        lat = W * (0.42 + 0.58 * np.sqrt(t))  # lateral edge widens downwards
        uc, hw = (med + W) / 2, (W - med) / 2
        q = ((u - uc) / hw) ** 2
        apex = top + 0.22 * q  # rounded apex
        base = dome + 0.16 * q + 0.05 * np.clip((u - uc) / hw, 0, None) ** 2  # dome, deep costophrenic recess
        m = _ramp(lat[:, None] - u[None, :], 0.02)
        m *= _ramp(u - med, 0.02)[None, :]
        m *= _ramp(Yt - apex[None, :], 0.025)
        m *= _ramp(base[None, :] - Yt, 0.02)
        lung[:, cs] = m
        if any(zs):  # Brixia zones: thirds of the lung height (upper / middle / lower), blended at borders
            tz = (yt - top) / (dome - top)
            upper = 1 - _sm(tz - 1 / 3, 0.04)
            lower = _sm(tz - 2 / 3, 0.04)
            prof = zs[0] * upper + zs[1] * np.clip(1 - upper - lower, 0, 1) + zs[2] * lower
            S[:, cs] = m * prof[:, None]

    # opacities replace a fraction o of the lung's air: ground glass from score 1, consolidation from score 2
    f_ggo = _fourier_field(rng, x, yt, 24, 0.25, 0.6)  # drawn even when healthy: same rng stream either way
    f_con = _fourier_field(rng, x, yt, 24, 0.18, 0.4)
    if any(z):
        o = (0.15 + 0.08 * S) * np.minimum(S, 1) * _sm(f_ggo - (0.8 - 0.5 * S), 0.9)
        o += (0.35 * np.clip(S - 1, 0, 2)) * _sm(f_con - (1.4 - 0.5 * S), 0.8)
        np.minimum(o, 0.9, out=o)
        o = 1 - o
    else:
        o = 1.0

    hcy = dome_l - 0.45 * a["heart_ry"]
    hd = ((x - a["heart_cx"]) / a["heart_rx"])[None, :] ** 2 + ((Yt - hcy) / a["heart_ry"]) ** 2
    heart = _sm(1 - hd, 0.15)
    air = lung * (1 - 0.85 * heart)
    air *= o
    air *= np.float32(a["air"])
    body_t = img[tb]
    body_t -= air

    # posterior ribs (curving down laterally) inside the thorax
    thorax = np.outer(_ramp(dome_l + 0.12 - yt, 0.05), _ramp(W + 0.03 - ax, 0.03) * _ramp(ax - 0.08, 0.04))
    ph = (Yt - (a["rib_curv"] * ax * ax)[None, :]) * (1 / a["rib_sp"]) + a["rib_phase"]
    ribs = np.cos(2 * np.pi * ph)
    ribs += 1
    ribs *= 0.5
    ribs **= 6
    ribs *= thorax
    body_t += 0.09 * ribs

    # vessels: ridges of a random field, stronger near the hila
    vf = _fourier_field(rng, x, yt, 32, 0.05, 0.12)
    hil = np.outer(np.exp(-(((yt - (top + 0.5 * (dome_r - top))) / 0.45) ** 2)), np.exp(-(((ax - 0.2) / 0.35) ** 2)))
    vf *= 1 / 0.3
    vf **= 2
    np.exp(-vf, out=vf)
    vf *= 0.35 + 0.65 * hil
    vf *= lung
    body_t += 0.045 * vf
    img[tb] = body_t

    # clavicles
    cb = _band(y, a["clav_y"] - 0.08, a["clav_y"] + 0.12)
    if cb.stop > cb.start:
        yc = a["clav_y"] + 0.12 * (ax - 0.35) ** 2
        clav = _sm(0.028 - np.abs(y[cb][:, None] - yc[None, :]), 0.012)
        clav *= (_ramp(0.62 - ax, 0.04) * _ramp(ax - 0.06, 0.02))[None, :]
        img[cb] += 0.08 * clav

    # acquisition look: exposure, grey-level gamma, blur, collimation, marker, noise
    gain, bias = rng.uniform(0.94, 1.06), rng.uniform(-0.02, 0.02)
    img *= f32(gain / 0.9)
    img += f32(bias)
    np.clip(img, 0, 1, out=img)
    if look.gamma != 1.0:
        img **= f32(look.gamma)
    sigma = look.blur * min(rows, cols) / 320.0
    if sigma > 0.25:
        img = gaussian_filter(img, sigma, mode="nearest", truncate=3.0)
    if look.collimation > 0:
        b_r, b_c = int(round(rows * look.collimation)), int(round(cols * look.collimation))
        img[:b_r], img[rows - b_r:], img[:, :b_c], img[:, cols - b_c:] = 1.0, 1.0, 1.0, 1.0
    if look.marker:
        m = max(3, min(rows, cols) // 16)
        r0 = 2 * m // 3 if look.marker[0] == "t" else rows - 2 * m // 3 - m
        c0 = 2 * m // 3 if look.marker[1] == "l" else cols - 2 * m // 3 - m
        img[r0:r0 + m, c0:c0 + m] = 1.0
        img[r0 + m // 4:r0 + m - m // 4, c0 + m // 3:c0 + m - m // 4] = 0.75
    img += rng.standard_normal(img.shape, dtype=f32) * f32(look.noise)
    return img, px * _MM_PER_UNIT


def to_stored(img: np.ndarray, look: Look) -> tuple[np.ndarray, float, float]:
    """Stored uint16 values for display intensity ``img``; returns (stored, window centre, width) in modality units."""
    maxv = (1 << look.bits) - 1
    v = img if look.photometric == "MONOCHROME2" else 1.0 - img
    stored = np.clip(np.rint(maxv * (look.lo + (look.hi - look.lo) * v)), 0, maxv).astype(np.uint16)
    lo_m = look.intercept + look.slope * maxv * look.lo
    hi_m = look.intercept + look.slope * maxv * look.hi
    return stored, (lo_m + hi_m) / 2, hi_m - lo_m


# --------------------------------------------------------------------------------------------------
# DICOM writing
# --------------------------------------------------------------------------------------------------
def _ds(v: float) -> str:
    s = f"{v:.6g}"
    return s if len(s) <= 16 else f"{v:.4e}"


def write_dicom(path: Path, stored: np.ndarray, look: Look, meta: dict) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    ent = [str(meta["seed"]), meta["site"], meta["image"]]
    sop_class = ComputedRadiographyImageStorage if look.modality == "CR" else DigitalXRayImageStorageForPresentation
    sop_uid = generate_uid(entropy_srcs=ent + ["sop"])
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=ent + ["study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=ent + ["series"])
    ds.StudyDate = meta["date"]
    ds.StudyID = meta["study_id"]
    ds.AccessionNumber = ""
    ds.Modality = look.modality
    ds.Manufacturer = look.manufacturer
    ds.InstitutionName = f"Synthetic hospital {meta['site']}"
    ds.PatientName = meta["patient_id"]
    ds.PatientID = meta["patient_id"]
    ds.PatientBirthDate = ""
    ds.PatientSex = meta["sex"]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = meta["view"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if look.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ["L", "F"]  # displayed as usual: the patient's right on the image left
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = look.photometric
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = look.bits
    ds.HighBit = look.bits - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = _ds(look.slope)
    ds.RescaleIntercept = _ds(look.intercept)
    ds.RescaleType = "US"
    ds.PixelSpacing = [_ds(meta["spacing"]), _ds(meta["spacing"])]
    ds.WindowCenter = _ds(meta["wc"])
    ds.WindowWidth = _ds(meta["ww"])
    ds.PixelData = stored.astype("<u2", copy=False).tobytes()
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------------------------------
# Sites
# --------------------------------------------------------------------------------------------------
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


def _plan_prognosis(site: str, seed: int, n_mild: int, n_severe: int, both: bool) -> list[dict]:
    rng = np.random.default_rng(derive_seed(seed, "synth", site, "latent"))
    pats = _quota_patients(rng, n_mild, n_severe)
    n = len(pats)
    rows = []
    for i, rec in enumerate(pats, start=1):
        brixia = "".join(str(int(v)) for v in rec["zones"])
        rows.append({
            "site": site, "image": f"images/{_name(site, i, n)}.dcm", "patient_id": _name(f"{site}_P", i, n, sep=""),
            "prognosis": "SEVERE" if rec["severe"] else "MILD", "brixia": brixia if both else "",
            "zones": rec["zones"], "g": rec["g"], "hidden": rec["hidden"], "p": rec["p"],
            "manufacturer": SITE_LOOKS[site].manufacturer,
        })
    return rows


def _plan_brixia(seed: int, counts: list[int]) -> list[dict]:
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
            rows.append({
                "site": SEVERITY_SITE, "image": f"images/{_name(SEVERITY_SITE, i, n)}.dcm", "patient_id": pid,
                "prognosis": "", "brixia": "".join(str(int(v)) for v in zones), "zones": zones, "g": gi,
                "hidden": float(hidden[pi - 1]), "p": float(p_severe(gi, hidden[pi - 1])),
                "manufacturer": str(manus[i - 1]),
            })
    return rows


def _single_thread_blas():
    """Keep BLAS (the random-field matmuls) on one thread: the matrices are small, and a multi-threaded
    OpenBLAS on a busy machine is 5-10x slower than one thread. threadpoolctl comes with scikit-learn;
    without it this is a no-op."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _clean(out: Path, sites: list[str]) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; give a new or empty folder for the federation")
    if out.is_dir() and any(out.iterdir()) and not (out / "synth.json").is_file():
        raise ConfigError(f"{out}: folder is not empty and holds no synthetic federation (synth.json); "
                          "give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    for s in sorted(set(sites) | set(PROGNOSIS_SITES) | {SEVERITY_SITE, DUAL_SITE}) + list(_PUBLISHED_DIRS):
        if (out / s).is_dir():
            shutil.rmtree(out / s)
    for f in ("synth.json", "synth_truth.csv") + _PUBLISHED_FILES:
        if (out / f).is_file():
            (out / f).unlink()


def _patient(seed: int, site: str, patient_id: str) -> tuple[dict, str]:
    """A patient's anatomy and sex (seeded by the patient id)."""
    pat_rng = np.random.default_rng(derive_seed(seed, "synth", site, "patient", patient_id))
    anat = _anatomy(pat_rng)
    return anat, ("M" if pat_rng.random() < 0.6 else "F")


def _write_image(sdir: Path, site: str, k: int, rec: dict, seed: int, image_size: int,
                 dest: Path | None = None) -> dict:
    """Render and write one planned image (to ``sdir / rec["image"]``, or ``dest``); return its truth row.

    Pixels, tags and UIDs depend only on (seed, site, rec), never on ``dest``: every layout writes the
    same bytes for the same image.
    """
    look = look_for(site, rec["manufacturer"])
    rows, cols = image_shape(look, image_size)
    anat, sex = _patient(seed, site, rec["patient_id"])
    img_rng = np.random.default_rng(derive_seed(seed, "synth", site, "image", rec["image"]))
    view = "AP" if img_rng.random() < (0.7 if site == SEVERITY_SITE else 0.4) else "PA"
    img, spacing = render(anat, rec["zones"], look, rows, cols, img_rng)
    stored, wc, ww = to_stored(img, look)
    write_dicom(dest if dest is not None else sdir / rec["image"], stored, look, {
        "seed": seed, "site": site, "image": rec["image"], "patient_id": rec["patient_id"],
        "date": f"2020{3 + k % 3:02d}{1 + k % 28:02d}", "study_id": str(k + 1), "sex": sex, "view": view,
        "spacing": spacing, "wc": wc, "ww": ww,
    })
    return {
        "site": site, "image": rec["image"], "patient_id": rec["patient_id"],
        **{f"zone_{zn}": int(v) for zn, v in zip(BRIXIA_ZONES, rec["zones"])},
        "brixia_latent": "".join(str(int(v)) for v in rec["zones"]),
        "global_score": rec["g"], "severity_class": severity_class(rec["g"]),
        "hidden": round(rec["hidden"], 6), "p_severe": round(rec["p"], 6),
        "prognosis": rec["prognosis"], "brixia": rec["brixia"],
        "manufacturer": look.manufacturer, "photometric": look.photometric,
        "rows": rows, "columns": cols,
    }


# --------------------------------------------------------------------------------------------------
# The published layouts (layout="aiforcovid" / "brixia"): same images and labels, the datasets' own files
# --------------------------------------------------------------------------------------------------
AIFORCOVID_WORKBOOKS = ("AIforCOVID.xlsx", "AIforCOVID_r2.xlsx", "AIforCOVID_r3.xlsx")
AIFORCOVID_IMG_DIRS = ("imgs", "imgs_r2", "imgs_r3")
BRIXIA_DICOM_DIR = "dicom_clean"
BRIXIA_METADATA = "metadata_global_v2.csv"
BRIXIA_METADATA_COLUMNS = ("Filename", "Subject", "StudyId", "Sex", "AgeAtStudyDateFiveYear", "Manufacturer",
                           "Modality", "PhotometricInterpretation", "BrixiaScore", "BrixiaScoreGlobal",
                           "ConsensusTestset", "Rows", "Columns")
AIFORCOVID_SHEET_COLUMNS = ("ImageFile", "Hospital", "Age", "Sex", "Fever", "Cough", "Prognosis")
_PUBLISHED_DIRS = AIFORCOVID_IMG_DIRS + (BRIXIA_DICOM_DIR,)
_PUBLISHED_FILES = AIFORCOVID_WORKBOOKS + (BRIXIA_METADATA,)
_LEGEND = {
    "ImageFile": "image id (file name in the release's imgs folder, with or without .dcm)",
    "Hospital": "centre letter A-F",
    "Age": "age in years at admission",
    "Sex": "M or F",
    "Fever": "fever at admission (1 yes, 0 no)",
    "Cough": "cough at admission (1 yes, 0 no)",
    "Prognosis": "MILD or SEVERE",
}


def _need_openpyxl() -> None:
    try:
        import openpyxl  # noqa: F401
    except ImportError:
        raise ConfigError("synth layout 'aiforcovid' writes .xlsx workbooks and needs openpyxl "
                          "(pip install openpyxl)") from None


def _round_half_up(x: float) -> int:
    return int(Decimal(repr(float(x))).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _aiforcovid_files(plans: dict, seed: int) -> list[dict]:
    """Where each A-F image goes in the AIforCOVID layout: release, image id, file path, ImageFile cell,
    clinical columns. Seeded by name, independent of the rendering streams."""
    rng = np.random.default_rng(derive_seed(seed, "synth", "aiforcovid", "layout"))
    pooled = [(s, k, rec) for s in PROGNOSIS_SITES for k, rec in enumerate(plans[s])]
    n = len(pooled)
    order = rng.permutation(n)
    n1 = _round_half_up(n * AIFORCOVID_RELEASE_SHARES[0])
    n2 = _round_half_up(n * AIFORCOVID_RELEASE_SHARES[1])
    release = np.full(n, 3)
    release[order[:n1]] = 1
    release[order[n1:n1 + n2]] = 2
    rank = np.empty(n, int)
    rank[order] = np.arange(n)  # row order in the workbooks (shuffled)
    no_suffix = rng.random(n) < AIFORCOVID_NO_SUFFIX_SHARE
    with_dcm = rng.random(n) < AIFORCOVID_IMAGEFILE_DCM_SHARE
    nested = rng.random(n) < 0.5
    age = np.clip(np.rint(rng.normal(63, 15, n)), 18, 99).astype(int)
    fever = (rng.random(n) < 0.7).astype(int)
    cough = (rng.random(n) < 0.5).astype(int)
    n_r1, n_h = 0, {s: 0 for s in PROGNOSIS_SITES}
    out = []
    for i, (site, k, rec) in enumerate(pooled):
        r = int(release[i])
        h = PROGNOSIS_SITES.index(site) + 1
        if r == 1:
            n_r1 += 1
            image_id = f"P_{n_r1}"
            folder = AIFORCOVID_IMG_DIRS[0]
        else:
            n_h[site] += 1
            image_id = f"P_{h}_{n_h[site]}"
            if r == 2:
                folder = f"{AIFORCOVID_IMG_DIRS[1]}/{site}"
            else:
                folder = f"{AIFORCOVID_IMG_DIRS[2]}/part_2/{site}" if nested[i] else AIFORCOVID_IMG_DIRS[2]
        fname = image_id if no_suffix[i] else f"{image_id}.dcm"
        out.append({
            "site": site, "k": k, "rec": rec, "release": r, "rank": int(rank[i]), "image_id": image_id,
            "path": f"{folder}/{fname}",
            "cells": {"ImageFile": f"{image_id}.dcm" if with_dcm[i] else image_id, "Hospital": site,
                      "Age": int(age[i]), "Sex": _patient(seed, site, rec["patient_id"])[1],
                      "Fever": int(fever[i]), "Cough": int(cough[i]), "Prognosis": rec["prognosis"]},
        })
    return out


def _write_workbooks(out: Path, files: list[dict]) -> dict[str, int]:
    import datetime

    import openpyxl

    rows_per_book = {}
    for r, book in enumerate(AIFORCOVID_WORKBOOKS, start=1):
        wb = openpyxl.Workbook()
        wb.properties.creator = "mdmt synth"
        wb.properties.created = datetime.datetime(2020, 6, 1)
        ws = wb.active
        if r == 2:  # an extra sheet first: the importer must pick the sheet that has the needed columns
            ws.title = "Legend"
            ws.append(["Column", "Description"])
            for k in AIFORCOVID_SHEET_COLUMNS:
                ws.append([k, _LEGEND[k]])
            ws = wb.create_sheet("Data")
        else:
            ws.title = "AIforCOVID" if r == 1 else "Sheet1"
        ws.append(list(AIFORCOVID_SHEET_COLUMNS))
        recs = sorted((f for f in files if f["release"] == r), key=lambda f: f["rank"])
        for f in recs:
            ws.append([f["cells"][c] for c in AIFORCOVID_SHEET_COLUMNS])
        wb.save(out / book)
        rows_per_book[book] = len(recs)
    return rows_per_book


def _published_truth(row: dict, image: str, patient_id: str, image_id: str) -> dict:
    """A truth row of a published layout: ``image`` and ``patient_id`` as the importer will see them."""
    fed_image, fed_pid = row["image"], row["patient_id"]
    return {**row, "image": image, "patient_id": patient_id, "image_id": image_id,
            "federation_image": fed_image, "federation_patient_id": fed_pid}


def _write_published(out: Path, layout: str, plans: dict, seed: int, scale: float, image_size: int, bar) -> dict:
    """Write the images and tables of a published layout; return its description plus the truth rows."""
    truth: list[dict] = []
    if layout == "aiforcovid":
        files = _aiforcovid_files(plans, seed)
        for f in files:
            dest = out / f["path"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            row = _write_image(out / f["site"], f["site"], f["k"], f["rec"], seed, image_size, dest=dest)
            truth.append(_published_truth(row, f["path"], f["image_id"], f["image_id"]))
            if bar is not None:
                bar.update(1)
        for d in AIFORCOVID_IMG_DIRS:
            (out / d).mkdir(exist_ok=True)
        books = _write_workbooks(out, files)
        return {
            "layout": "aiforcovid", "workbooks": books,
            "releases": {d: sum(f["release"] == r for f in files) for r, d in enumerate(AIFORCOVID_IMG_DIRS, 1)},
            "files_without_dcm_suffix": sum(not f["path"].endswith(".dcm") for f in files),
            "nested_files": sum(f["path"].count("/") > 1 for f in files),
            "imagefile_with_dcm": sum(f["cells"]["ImageFile"].endswith(".dcm") for f in files),
            "truth": truth,
        }
    # brixia
    recs = plans[SEVERITY_SITE]
    n = len(recs)
    consensus = _consensus_flags(n, scale, seed)
    ddir = out / BRIXIA_DICOM_DIR
    ddir.mkdir(parents=True, exist_ok=True)
    meta_rows = []
    for k, rec in enumerate(recs):
        fname = Path(rec["image"]).name
        row = _write_image(out / SEVERITY_SITE, SEVERITY_SITE, k, rec, seed, image_size, dest=ddir / fname)
        truth.append(_published_truth(row, f"{BRIXIA_DICOM_DIR}/{fname}", rec["patient_id"], fname))
        look = look_for(SEVERITY_SITE, rec["manufacturer"])
        arng = np.random.default_rng(derive_seed(seed, "synth", SEVERITY_SITE, "age", rec["patient_id"]))
        age5 = int(np.clip(5 * np.rint(arng.normal(65, 14) / 5), 20, 95))
        meta_rows.append({
            "Filename": fname, "Subject": rec["patient_id"], "StudyId": str(k + 1),
            "Sex": _patient(seed, SEVERITY_SITE, rec["patient_id"])[1], "AgeAtStudyDateFiveYear": str(age5),
            "Manufacturer": rec["manufacturer"], "Modality": look.modality,
            "PhotometricInterpretation": look.photometric, "BrixiaScore": rec["brixia"],
            "BrixiaScoreGlobal": str(rec["g"]), "ConsensusTestset": "1" if consensus[k] else "0",
            "Rows": str(row["rows"]), "Columns": str(row["columns"]),
        })
        if bar is not None:
            bar.update(1)
    meta = pd.DataFrame(meta_rows, columns=list(BRIXIA_METADATA_COLUMNS), dtype=str)
    meta.to_csv(out / BRIXIA_METADATA, sep=";", index=False)
    return {"layout": "brixia", "dicom_dir": BRIXIA_DICOM_DIR, "metadata": BRIXIA_METADATA, "images": n,
            "consensus_testset": int(consensus.sum()), "truth": truth}


def _consensus_flags(n: int, scale: float, seed: int) -> np.ndarray:
    """Which BRIXIA images form the consensus test set (the published 150, scaled)."""
    n_cons = min(n, scaled_count(CONSENSUS_TESTSET_COUNT, scale, CONSENSUS_FLOOR))
    crng = np.random.default_rng(derive_seed(seed, "synth", SEVERITY_SITE, "consensus"))
    consensus = np.zeros(n, bool)
    consensus[crng.choice(n, size=n_cons, replace=False)] = True
    return consensus


def synthesize(out_dir, scale=1.0, image_size=320, seed=0, both_site=False, layout="federation", progress=True) -> dict:
    """Write a synthetic federation under ``out_dir`` and return its summary (see ``format_summary``)."""
    t0 = time.perf_counter()
    if layout not in LAYOUTS:
        raise ConfigError(f"synth layout {layout!r} is not supported; use one of: {', '.join(LAYOUTS)}")
    if both_site and layout != "federation":
        raise ConfigError(f"synth: both_site (site DUAL) exists only in layout 'federation', not {layout!r}")
    try:
        scale = float(scale)
        image_size = int(image_size)
        seed = int(seed)
    except (TypeError, ValueError):
        raise ConfigError("synth: scale must be a number, image_size and seed integers") from None
    if not (scale > 0 and math.isfinite(scale)):
        raise ConfigError(f"synth scale {scale} must be a positive number (1.0 = the real datasets' sizes)")
    if not 32 <= image_size <= 4096:
        raise ConfigError(f"synth image_size {image_size} must be between 32 and 4096 pixels")
    out = Path(out_dir)
    tg = targets(scale, both_site)
    if layout == "aiforcovid":
        sites = list(PROGNOSIS_SITES)
    elif layout == "brixia":
        sites = [SEVERITY_SITE]
    else:
        sites = list(PROGNOSIS_SITES) + [SEVERITY_SITE] + ([DUAL_SITE] if both_site else [])
    if layout == "aiforcovid":
        _need_openpyxl()
    _clean(out, sites)

    plans: dict[str, list[dict]] = {}
    for s in PROGNOSIS_SITES:
        if s in sites:
            plans[s] = _plan_prognosis(s, seed, tg[s]["MILD"], tg[s]["SEVERE"], both=False)
    if SEVERITY_SITE in sites:
        plans[SEVERITY_SITE] = _plan_brixia(seed, tg[SEVERITY_SITE]["global_score_counts"])
    if both_site:
        plans[DUAL_SITE] = _plan_prognosis(DUAL_SITE, seed, tg[DUAL_SITE]["MILD"], tg[DUAL_SITE]["SEVERE"], both=True)

    total = sum(len(v) for v in plans.values())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="synth", unit="img", leave=True)
    truth_rows = []
    if layout != "federation":
        try:
            with _single_thread_blas():
                published = _write_published(out, layout, plans, seed, scale, image_size, bar)
        finally:
            if bar is not None:
                bar.close()
        truth = pd.DataFrame(published.pop("truth"))
        truth.to_csv(out / "synth_truth.csv", index=False)
        summary = _summary(plans, tg, scale, image_size, seed, both_site, layout)
        summary["published_layout"] = published
        (out / "synth.json").write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
        summary["out_dir"] = str(out)
        summary["wall_s"] = round(time.perf_counter() - t0, 2)
        summary["images_per_s"] = round(total / max(summary["wall_s"], 1e-9), 1)
        return summary
    try:
        with _single_thread_blas():
            for site in sites:
                if bar is not None:
                    bar.set_postfix_str(site)
                sdir = out / site
                (sdir / "images").mkdir(parents=True, exist_ok=True)
                for k, rec in enumerate(plans[site]):
                    truth_rows.append(_write_image(sdir, site, k, rec, seed, image_size))
                    if bar is not None:
                        bar.update(1)
                man = pd.DataFrame({
                    "image": [r["image"] for r in plans[site]],
                    "patient_id": [r["patient_id"] for r in plans[site]],
                    "prognosis": [r["prognosis"] for r in plans[site]],
                    "brixia": [r["brixia"] for r in plans[site]],
                    "split": "",
                    "manufacturer": [look_for(site, r["manufacturer"]).manufacturer for r in plans[site]],
                })
                if site == SEVERITY_SITE:
                    man["ConsensusTestset"] = np.where(_consensus_flags(len(man), scale, seed), "1", "0")
                write_manifest(sdir, man)
    finally:
        if bar is not None:
            bar.close()

    truth = pd.DataFrame(truth_rows)
    truth.to_csv(out / "synth_truth.csv", index=False)

    summary = _summary(plans, tg, scale, image_size, seed, both_site, layout)
    (out / "synth.json").write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    summary["out_dir"] = str(out)
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    summary["images_per_s"] = round(total / max(summary["wall_s"], 1e-9), 1)
    return summary


def _summary(plans, tg, scale, image_size, seed, both_site, layout) -> dict:
    sites = {}
    for site, recs in plans.items():
        look = look_for(site, recs[0]["manufacturer"] if recs else None)
        d = {"role": "severity" if site == SEVERITY_SITE else ("both" if site == DUAL_SITE else "prognosis"),
             "images": len(recs), "patients": len({r["patient_id"] for r in recs})}
        if site != SEVERITY_SITE:
            d["MILD"] = sum(r["prognosis"] == "MILD" for r in recs)
            d["SEVERE"] = sum(r["prognosis"] == "SEVERE" for r in recs)
            d["manufacturer"] = look.manufacturer
            d["photometric"] = look.photometric
            d["bits_stored"] = look.bits
        if site in (SEVERITY_SITE, DUAL_SITE):
            cls = [0, 0, 0, 0]
            for r in recs:
                cls[severity_class(r["g"])] += 1
            d["severity_classes"] = dict(zip(SEVERITY_CLASS_NAMES, cls))
        if site == SEVERITY_SITE:
            d["global_score_counts"] = [sum(r["g"] == g for r in recs) for g in range(19)]
            mc: dict[str, int] = {}
            for r in recs:
                mc[r["manufacturer"]] = mc.get(r["manufacturer"], 0) + 1
            d["manufacturers"] = {k: mc[k] for k in BRIXIA_MANUFACTURER_COUNTS if k in mc}
            zs = np.array([r["zones"] for r in recs])
            d["mean_zone_scores"] = [round(float(v), 3) for v in zs.mean(0)]
        sites[site] = d
    prog = [r for s in PROGNOSIS_SITES for r in plans.get(s, [])]
    g = np.array([r["g"] for r in prog])
    y = np.array([r["prognosis"] == "SEVERE" for r in prog])
    ceiling = oracle_ceiling(seed)
    if prog:
        ceiling["generated"] = _generated_ceiling(g, y)
    theta, _, _ = zone_model()
    return {
        "generator": "mdmt synth",
        "format_version": 1,
        "parameters": {"scale": scale, "image_size": image_size, "seed": seed, "both_site": bool(both_site),
                       "layout": layout},
        "model": {
            "severe_slope": SEVERE_SLOPE, "severe_centre": SEVERE_CENTRE, "hidden_weight": HIDDEN_WEIGHT,
            "zone_log_weights": [round(float(v), 4) for v in theta],
            "zone_means_model": [round(float(v), 4) for v in model_zone_means()],
            "brixia_images_per_patient": list(BRIXIA_IMAGES_PER_PATIENT),
            "floors": {"prognosis_per_class": PROGNOSIS_FLOOR, "brixia_per_global_score": BRIXIA_FLOOR,
                       "dual_per_class": DUAL_FLOOR},
        },
        "targets": tg,
        "sites": sites,
        "total_images": sum(len(v) for v in plans.values()),
        "ceiling": ceiling,
        "looks": {**{s: asdict(SITE_LOOKS[s]) for s in plans if s != SEVERITY_SITE},
                  **{f"BRIXIA/{k or '(none)'}": asdict(v) for k, v in BRIXIA_LOOKS.items()}},
    }


def format_summary(summary: dict) -> str:
    """A short human-readable table of a ``synthesize`` summary."""
    p = summary.get("parameters", {})
    lines = [f"synthetic federation{(' ' + summary['out_dir']) if 'out_dir' in summary else ''}: "
             f"scale {p.get('scale')}, image_size {p.get('image_size')}, seed {p.get('seed')}"]
    head = (f"{'site':<7} {'role':<9} {'images':>6} {'patients':>8} {'MILD':>5} {'SEVERE':>6}  "
            + " ".join(f"{n:>5}" for n in SEVERITY_CLASS_NAMES))
    lines += [head, "-" * len(head)]
    for site, d in summary.get("sites", {}).items():
        cls = d.get("severity_classes")
        cls_txt = " ".join(f"{cls[n] if cls else '-':>5}" for n in SEVERITY_CLASS_NAMES)
        lines.append(f"{site:<7} {d['role']:<9} {d['images']:>6} {d['patients']:>8} "
                     f"{d.get('MILD', '-'):>5} {d.get('SEVERE', '-'):>6}  {cls_txt}")
    lines.append(f"total images: {summary.get('total_images')}")
    c = summary.get("ceiling", {})
    if c:
        ex, mc, gen = c.get("exact", {}), c.get("mc", {}), c.get("generated", {})
        lines.append("oracle ceiling (reads the exact global score, not the hidden factor):")
        lines.append(f"  model exact:        ACC {ex.get('acc'):.3f}  AUC {ex.get('auc'):.3f}")
        lines.append(f"  model MC (n={mc.get('n'):,}): ACC {mc.get('acc_bayes'):.3f}  AUC {mc.get('auc'):.3f}")
        if gen:
            lines.append(f"  generated A-F (n={gen.get('n')}): "
                         f"ACC {gen.get('acc_best_threshold'):.3f} (best threshold), "
                         f"{gen.get('acc_bayes'):.3f} (Bayes rule)  AUC {gen.get('auc'):.3f}")
    if "wall_s" in summary:
        lines.append(f"wall time {summary['wall_s']} s ({summary.get('images_per_s')} images/s)")
    return "\n".join(lines)
