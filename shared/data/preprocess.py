"""From a decoded chest X-ray (float, bright = attenuation) to the uint8 square the cache stores.

Steps (see docs/data-format.md):

1. Intensity: clip to the image's 2nd-98th percentile and min-max scale to [0, 1].
2. Crop, ``crop="lung"``: a lung-field bounding box found without a learned model (the paper used a
   U-Net lung mask; we use a documented classical rule, :func:`find_lung_box`):

   a. work on a copy shrunk to at most ``WORK_SIZE`` pixels on its long side, Gaussian-smoothed;
   b. *body*: Otsu threshold on the whole image; the dark connected regions that touch the image border
      are the air outside the patient; everything else (holes filled) is the body;
   c. *lungs*: a second Otsu threshold computed on body pixels only; dark body pixels, opened to cut thin
      bridges, split into connected components; components touching the image border, smaller than
      ``MIN_LUNG_AREA`` of the image, or spanning ``MAX_SPAN`` (90%) of its height or width (the ring of
      air inside a bright collimation frame) are dropped;
   d. the largest component is one lung; the second largest is the other lung when it is at least
      ``SECOND_LUNG_RATIO`` of the first's area and its centre lies on the other side of the body's
      midline; with only one lung found (e.g. a white-out lung) its box is mirrored about the body's
      vertical midline so the other side is kept too;
   e. the result must be plausible, else the *fallback* is used: the lungs' mean is at least
      ``MIN_CONTRAST`` below the mean of the brighter body pixels (so texture or noise is not taken for
      lungs), the lungs cover at most ``MAX_LUNG_AREA`` of the image, and their union box spans at least
      ``MIN_BOX_FRACTION`` of the image's height and width;
   f. the box is widened by ``LUNG_MARGIN`` (5%) of its height/width on every side, clipped to the image,
      and made square with real image content: the shorter side is extended around its centre and the
      square shifted to lie inside the image; zero padding only where the image itself is too small.

   Fallback (no plausible lung region): the whole image made square by centre padding, as in ``"none"``.
   ``crop="none"``: the whole image made square by centre padding with zeros (the darkest value).
   ``crop="boxes"`` / ``crop="masks"``: a lung box supplied by the user (a bounding-box table, or the
   bounding box of a binary lung mask, e.g. from a U-Net as in the paper) replaces step a-e; step f is the
   same. A missing or invalid box / mask falls back to the whole image made square.
3. Resize to ``size`` x ``size`` with Pillow's anti-aliased bicubic filter (its support widens with the
   reduction factor), clip to [0, 1] and store as uint8 ``round(255 * x)``.

The ImageNet normalisation and the 3-channel replication happen at training time, not here.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu

from mdmt.data.options import CROP_MODES

CLIP_PERCENTILES = (2.0, 98.0)
WORK_SIZE = 128
SMOOTH_SIGMA = 1.5  # pixels of the work image
LUNG_MARGIN = 0.05  # of the box height/width, on every side
MIN_LUNG_AREA = 0.02  # of the work image area, per component
MAX_LUNG_AREA = 0.60  # of the work image area, both lungs together
SECOND_LUNG_RATIO = 0.15
MIN_BOX_FRACTION = (0.20, 0.25)  # (height, width) of the image
MIN_CONTRAST = 0.15  # mean of the brighter body minus mean of the lungs, on the [0, 1] scale
MAX_SPAN = 0.90  # a lung component spans less than this share of the image height and width


def normalise(img: np.ndarray) -> np.ndarray:
    """Clip to the 2nd-98th percentile and scale to [0, 1] (float32); a flat image becomes zeros."""
    x = np.asarray(img, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        x = np.nan_to_num(x, nan=float(np.nanmin(x)) if np.isfinite(x).any() else 0.0, posinf=0.0, neginf=0.0)
    lo, hi = np.percentile(x, CLIP_PERCENTILES)
    if not hi > lo:
        return np.zeros(x.shape, dtype=np.float32)
    out = (np.clip(x, lo, hi) - np.float32(lo)) / np.float32(hi - lo)
    return out.astype(np.float32, copy=False)


def _resize(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Anti-aliased resize of a float image to (rows, cols) with Pillow."""
    if x.shape == shape:
        return x.astype(np.float32, copy=True)
    im = Image.fromarray(np.ascontiguousarray(x, dtype=np.float32), mode="F")
    return np.asarray(im.resize((shape[1], shape[0]), Image.Resampling.BICUBIC), dtype=np.float32)


def _otsu(values: np.ndarray) -> float | None:
    """Otsu threshold (scikit-image) of a 1-D sample; None when the values are (almost) constant."""

    if not float(values.max()) - float(values.min()) > 1e-6:
        return None
    return float(threshold_otsu(values, nbins=256))


def _touches_border(labels: np.ndarray) -> set[int]:
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return set(int(v) for v in np.unique(edge) if v)


def find_lung_box(x: np.ndarray) -> tuple[tuple[int, int, int, int] | None, str]:
    """The lung bounding box ``(top, left, bottom, right)`` (half-open, image pixels) of a [0,1] image.

    Returns ``(None, reason)`` when no plausible lung region is found.
    """
    H, W = x.shape
    scale = WORK_SIZE / max(H, W)
    if scale < 1:
        h, w = max(8, round(H * scale)), max(8, round(W * scale))
        small = _resize(x, (h, w))
    else:
        h, w = H, W
        small = x.astype(np.float32, copy=False)
    if min(h, w) < 16:
        return None, "image too small"
    s = ndimage.gaussian_filter(small, SMOOTH_SIGMA)

    t1 = _otsu(s.ravel())
    if t1 is None:
        return None, "flat image"
    lab, _ = ndimage.label(s < t1)
    outside = np.isin(lab, list(_touches_border(lab)))
    body = ndimage.binary_fill_holes(~outside)
    if body.sum() < 0.10 * h * w:
        body = np.ones_like(body)

    t2 = _otsu(s[body])
    if t2 is None:
        return None, "flat body region"
    dark = body & (s < t2)
    dark = ndimage.binary_opening(dark, structure=np.ones((3, 3), bool), iterations=1)
    lab, n = ndimage.label(dark)
    if n == 0:
        return None, "no dark region inside the body"
    areas = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    border = _touches_border(lab)
    spans = ndimage.find_objects(lab)
    cands = [
        (float(areas[k - 1]), k)
        for k in range(1, n + 1)
        if k not in border
        and areas[k - 1] >= MIN_LUNG_AREA * h * w
        # a ring of air inside a bright collimation frame spans (almost) the whole image: not a lung
        and spans[k - 1][0].stop - spans[k - 1][0].start < MAX_SPAN * h
        and spans[k - 1][1].stop - spans[k - 1][1].start < MAX_SPAN * w
    ]
    if not cands:
        return None, "no dark region inside the body that stays off the image border"
    cands.sort(key=lambda t: (-t[0], t[1]))
    cols_of_body = np.nonzero(body.any(axis=0))[0]
    mid = (cols_of_body[0] + cols_of_body[-1] + 1) / 2 if cols_of_body.size else w / 2

    def box_of(k: int) -> tuple[int, int, int, int]:
        rr, cc = np.nonzero(lab == k)
        return int(rr.min()), int(cc.min()), int(rr.max()) + 1, int(cc.max()) + 1

    a1, k1 = cands[0]
    b1 = box_of(k1)
    c1 = (b1[1] + b1[3]) / 2
    boxes = [b1]
    total = a1
    second, k2 = None, 0
    for a2, k in cands[1:]:
        if a2 < SECOND_LUNG_RATIO * a1:
            break
        b2 = box_of(k)
        c2 = (b2[1] + b2[3]) / 2
        if (c1 - mid) * (c2 - mid) < 0 and abs(c2 - c1) >= 0.10 * w:
            second, k2 = b2, k
            total += a2
            break
    if second is not None:
        boxes.append(second)
    else:  # one lung found: keep its mirror image about the body midline as well
        boxes.append((b1[0], max(0, int(np.floor(2 * mid - b1[3]))), b1[2], min(w, int(np.ceil(2 * mid - b1[1])))))
    top = min(b[0] for b in boxes)
    left = min(b[1] for b in boxes)
    bottom = max(b[2] for b in boxes)
    right = max(b[3] for b in boxes)
    chosen = np.isin(lab, [k1] + ([k2] if second is not None else []))
    rest = body & ~dark
    contrast = float(s[rest].mean() - s[chosen].mean()) if rest.any() else 0.0
    if contrast < MIN_CONTRAST:
        return None, f"dark region not distinct from the body (contrast {contrast:.2f} < {MIN_CONTRAST})"
    if total > MAX_LUNG_AREA * h * w:
        return None, "dark region too large to be lungs"
    if bottom - top < MIN_BOX_FRACTION[0] * h or right - left < MIN_BOX_FRACTION[1] * w:
        return None, "lung box too small"
    fy, fx = H / h, W / w
    box = (
        max(0, int(np.floor(top * fy))),
        max(0, int(np.floor(left * fx))),
        min(H, int(np.ceil(bottom * fy))),
        min(W, int(np.ceil(right * fx))),
    )
    return box, ""


def _square_in_image(box: tuple[int, int, int, int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Widen the shorter side of ``box`` to a square, shifted to lie inside the image when it fits."""
    H, W = shape
    t, l, b, r = box
    side = max(b - t, r - l)

    def place(lo: int, hi: int, n: int) -> int:
        start = int(np.floor((lo + hi) / 2 - side / 2))
        if side <= n:
            return min(max(start, 0), n - side)
        return -((side - n) // 2)  # centred, padded on both sides

    t0, l0 = place(t, b, H), place(l, r, W)
    return t0, l0, t0 + side, l0 + side


def _extract(x: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The region ``box`` of ``x``; parts outside the image are zeros."""
    t, l, b, r = box
    H, W = x.shape
    out = np.zeros((b - t, r - l), dtype=np.float32)
    st, sl, sb, sr = max(t, 0), max(l, 0), min(b, H), min(r, W)
    if sb > st and sr > sl:
        out[st - t : sb - t, sl - l : sr - l] = x[st:sb, sl:sr]
    return out


def whole_image_square(shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The square that holds the whole image, centred (padded on the short side)."""
    H, W = shape
    side = max(H, W)
    t, l = -((side - H) // 2), -((side - W) // 2)
    return t, l, t + side, l + side


def check_box(box, shape: tuple[int, int]) -> tuple[tuple[int, int, int, int] | None, str]:
    """A user-supplied lung box ``(top, left, bottom, right)`` in pixels of the original image (bottom and
    right exclusive, like slices; fractions are widened outwards to whole pixels). Returns the integer
    box, or ``(None, reason)`` when it is not a non-empty box inside the image."""
    H, W = shape
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        return None, f"invalid box {box!r}: four numbers expected"
    if len(vals) != 4 or not all(np.isfinite(vals)):
        return None, f"invalid box {box!r}: four finite numbers expected"
    t, l = int(np.floor(vals[0])), int(np.floor(vals[1]))
    b, r = int(np.ceil(vals[2])), int(np.ceil(vals[3]))
    text = f"({_fmt(vals[0])}, {_fmt(vals[1])}, {_fmt(vals[2])}, {_fmt(vals[3])})"
    if not (t < b and l < r):
        return None, f"invalid box {text}: top < bottom and left < right required"
    if t < 0 or l < 0 or b > H or r > W:
        return None, f"invalid box {text}: outside the {H}x{W} image"
    return (t, l, b, r), ""


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def box_from_mask(mask: np.ndarray, shape: tuple[int, int]) -> tuple[tuple[int, int, int, int] | None, str]:
    """The bounding box (half-open) of the non-zero pixels of a lung mask the size of the image (a colour
    mask counts a pixel when any channel is non-zero). ``(None, reason)`` for a wrong size or empty mask."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.any(axis=-1)
    if m.ndim != 2:
        return None, f"mask has shape {m.shape}, not a 2-D image"
    if m.shape != tuple(shape):
        return None, f"mask size {m.shape[0]}x{m.shape[1]} does not match the image {shape[0]}x{shape[1]}"
    rows = np.nonzero(m.any(axis=1))[0]
    if rows.size == 0:
        return None, "mask is empty"
    cols = np.nonzero(m.any(axis=0))[0]
    return (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1), ""


def lung_square(lung: tuple[int, int, int, int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The crop square of a lung box: widened by ``LUNG_MARGIN`` of its height/width on every side,
    clipped to the image, made square with real image content (:func:`_square_in_image`)."""
    t, l, b, r = lung
    my, mx = LUNG_MARGIN * (b - t), LUNG_MARGIN * (r - l)
    wide = (
        max(0, int(np.floor(t - my))),
        max(0, int(np.floor(l - mx))),
        min(shape[0], int(np.ceil(b + my))),
        min(shape[1], int(np.ceil(r + mx))),
    )
    return _square_in_image(wide, shape)


def preprocess_with_info(
    img: np.ndarray,
    size: int = 256,
    crop: str = "lung",
    box=None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """:func:`preprocess` plus ``info``: ``crop_box`` (top, left, bottom, right) of the square taken from
    the image (may reach outside it where padded), ``lung_box`` (the detected or supplied box before
    widening, or None), ``fallback`` (True when no usable lung box was found or given) and ``reason``.

    ``box`` (``crop="boxes"``): the user's lung box (top, left, bottom, right) in pixels of ``img``;
    ``mask`` (``crop="masks"``): a lung mask the size of ``img``, its non-zero pixels' bounding box is used.
    Missing or invalid ones fall back to the whole image made square (``reason`` says why)."""
    if crop not in CROP_MODES:
        raise ValueError(f"unknown crop mode {crop!r}; choose one of {', '.join(CROP_MODES)}")
    img = np.asarray(img)
    if img.ndim != 2 or min(img.shape) < 1:
        raise ValueError(f"preprocess needs a 2-D image, got shape {img.shape}")
    if int(size) < 1:
        raise ValueError(f"image size must be positive, got {size}")
    x = normalise(img)
    info: dict = {"crop_box": None, "lung_box": None, "fallback": False, "reason": ""}
    if crop == "none":
        square = whole_image_square(x.shape)
    else:
        if crop == "lung":
            lung, reason = find_lung_box(x)
        elif crop == "boxes":
            lung, reason = (None, "no lung box given") if box is None else check_box(box, x.shape)
        else:
            lung, reason = (None, "no lung mask given") if mask is None else box_from_mask(mask, x.shape)
        if lung is None:
            info["fallback"], info["reason"] = True, reason
            square = whole_image_square(x.shape)
        else:
            info["lung_box"] = tuple(int(v) for v in lung)
            square = lung_square(lung, x.shape)
    info["crop_box"] = tuple(int(v) for v in square)
    out = _resize(_extract(x, square), (int(size), int(size)))
    return np.rint(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8), info


def preprocess(
    img: np.ndarray, size: int = 256, crop: str = "lung", box=None, mask: np.ndarray | None = None
) -> np.ndarray:
    """A decoded X-ray -> uint8 (size, size): percentile clip, lung (or whole-image) square crop, resize."""
    return preprocess_with_info(img, size, crop, box=box, mask=mask)[0]
