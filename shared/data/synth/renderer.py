"""The radiograph renderer: a patient's anatomy and zone scores to display intensities, then stored values."""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter

from mdmt.data.synth.looks import Look

_MM_PER_UNIT = 200.0  # anatomy unit (thorax half-width ~0.8) in mm, for PixelSpacing
_FIELD_UNITS = 2.2  # anatomy units across the shorter image side at zoom 1


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


def anatomy(rng: np.random.Generator) -> dict:
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
        img[:b_r], img[rows - b_r :], img[:, :b_c], img[:, cols - b_c :] = 1.0, 1.0, 1.0, 1.0
    if look.marker:
        m = max(3, min(rows, cols) // 16)
        r0 = 2 * m // 3 if look.marker[0] == "t" else rows - 2 * m // 3 - m
        c0 = 2 * m // 3 if look.marker[1] == "l" else cols - 2 * m // 3 - m
        img[r0 : r0 + m, c0 : c0 + m] = 1.0
        img[r0 + m // 4 : r0 + m - m // 4, c0 + m // 3 : c0 + m - m // 4] = 0.75
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
