"""Acquisition looks: each site's (BRIXIA: each manufacturer's) modality, grey levels, geometry and noise."""

from __future__ import annotations

from dataclasses import dataclass

from mdmt.data.synth.model import SEVERITY_SITE


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
    "A": Look(
        "GE Healthcare",
        "DX",
        "MONOCHROME2",
        12,
        1.0,
        0.0,
        1.00,
        0.010,
        0.6,
        1.00,
        (0.00, 0.00),
        (1.0, 1.0),
        marker="tr",
    ),
    "B": Look(
        "Philips Medical Systems", "DX", "MONOCHROME2", 14, 1.0, 0.0, 0.80, 0.015, 0.8, 1.08, (0.00, 0.04), (1.2, 1.0)
    ),
    "C": Look(
        "FUJIFILM Corporation",
        "CR",
        "MONOCHROME1",
        10,
        1.0,
        0.0,
        1.25,
        0.025,
        1.2,
        0.92,
        (0.04, -0.03),
        (1.0, 1.0),
        collimation=0.04,
    ),
    "D": Look("SIEMENS", "DX", "MONOCHROME2", 16, 1.0, -1024.0, 0.90, 0.008, 0.5, 1.04, (-0.03, 0.00), (0.9, 1.1)),
    "E": Look(
        "Carestream Health",
        "CR",
        "MONOCHROME1",
        12,
        2.0,
        0.0,
        1.10,
        0.020,
        1.0,
        0.96,
        (0.00, 0.02),
        (1.1, 0.9),
        marker="tl",
    ),
    "F": Look(
        "Agfa", "CR", "MONOCHROME1", 14, 1.0, 0.0, 0.95, 0.014, 0.9, 1.00, (0.02, 0.00), (1.25, 1.0), lo=0.10, hi=0.85
    ),
    "DUAL": Look("Canon Inc.", "DX", "MONOCHROME2", 12, 1.0, -1024.0, 1.05, 0.012, 0.7, 1.02, (0.00, 0.00), (1.0, 1.0)),
}
BRIXIA_LOOKS: dict[str, Look] = {
    "SIEMENS": Look("SIEMENS", "CR", "MONOCHROME1", 12, 1.0, 0.0, 1.10, 0.018, 1.0, 0.95, (0.00, 0.00), (1.0, 1.0)),
    "CARESTREAM": Look(
        "CARESTREAM", "DX", "MONOCHROME2", 14, 1.0, 0.0, 0.85, 0.010, 0.6, 1.05, (0.00, 0.03), (1.2, 1.0)
    ),
    "AGFA": Look("AGFA", "CR", "MONOCHROME1", 12, 2.0, -1024.0, 1.00, 0.020, 1.1, 0.92, (0.03, 0.00), (1.0, 1.2)),
    "KODAK": Look(
        "KODAK", "CR", "MONOCHROME1", 12, 1.0, 0.0, 1.30, 0.022, 1.3, 0.98, (-0.02, -0.02), (1.2, 1.0), collimation=0.05
    ),
    "VSM": Look(
        "VSM", "DX", "MONOCHROME2", 14, 1.0, 0.0, 0.90, 0.012, 0.7, 1.10, (0.00, 0.05), (1.0, 1.0), marker="br"
    ),
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
