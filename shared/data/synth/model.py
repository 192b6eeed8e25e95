"""Published targets and the latent disease model of the synthetic federation.

The targets are the datasets' published figures at scale 1.0 (see docs/synthetic.md); ``targets`` scales them.
The latent model: global Brixia score G, zone scores z | G, hidden factor h, and P(SEVERE | G, h).
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from itertools import product

import numpy as np
from scipy.special import expit

# --------------------------------------------------------------------------------------------------
# Published targets (scale 1.0): the datasets' published figures (see docs/synthetic.md).
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
    51,
    165,
    299,
    251,
    269,
    277,
    370,
    351,
    387,
    353,
    391,
    356,
    318,
    261,
    233,
    164,
    116,
    60,
    23,
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

# --------------------------------------------------------------------------------------------------
# Prognosis model: logit P(SEVERE) = SEVERE_SLOPE * (G - SEVERE_CENTRE) + HIDDEN_WEIGHT * h, h ~ N(0, 1)
# --------------------------------------------------------------------------------------------------
SEVERE_SLOPE = 0.35  # per Brixia point: odds x1.42 per point, x4.4 per sd (4.2 points) of G
SEVERE_CENTRE = 8.8  # makes the population SEVERE share 47% (= AIforCOVID 746/1585)
HIDDEN_WEIGHT = 1.0  # hidden factor: odds x2.7 per sd, comparable to one sd of imaging burden


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
        out[site] = {
            "MILD": scaled_count(mild, scale, PROGNOSIS_FLOOR),
            "SEVERE": scaled_count(severe, scale, PROGNOSIS_FLOOR),
        }
    out[SEVERITY_SITE] = {"global_score_counts": [scaled_count(n, scale, BRIXIA_FLOOR) for n in BRIXIA_GLOBAL_COUNTS]}
    if both_site:
        out[DUAL_SITE] = {
            "MILD": scaled_count(DUAL_COUNTS[0], scale, DUAL_FLOOR),
            "SEVERE": scaled_count(DUAL_COUNTS[1], scale, DUAL_FLOOR),
        }
    return out


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
