"""Checks of one unit's part of one site's reply, before anything of it is read or aggregated.

A reply comes from the other side of a network: a faulty or hostile site may send anything Flower can
carry. What the server accepts:

- metrics: every key of the contract (mdmt.fed.protocol: the training report when the site trained, the
  ``<split>/`` statistics of every split it was asked to evaluate), whole numbers for counts, finite
  numbers for losses and times, no count above what the site declared at discovery (a pooled unit: the
  pooled sites' sum), confusion matrices and histograms of the contract's lengths whose entries lie in
  [0, n] and add up to n; the split's exact prognosis AUC (``auc-prognosis``) NaN when a class has no
  rows, else a finite number in [0, 1] that the split's own histogram allows (between the AUC with every
  tie inside a bin counted as a loss and as a win);
- update: exactly the global model's tensors (plus the int8 scales), each of its shape and of a numeric
  kind that fits the tensor (a scalar for a matrix is refused, never broadcast), every value finite after
  decoding, and the L2 norm of (site weights - global weights) over the floating-point tensors within the
  run's ``update-norm-bound``. Integer buffers (BatchNorm's ``num_batches_tracked``) are kept out of the
  norm but must be whole numbers in [0, 2**53).

Every check reads lengths and shapes before it converts anything, so no claimed count or length ever
decides how much memory is taken. A failed check is one short line (:class:`Rejected`); the server
records the site as having missed the round with status ``rejected: <reason>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mdmt.fed import protocol as P
from mdmt.fed.compress import SCALE, decode_update
from mdmt.ml.methods import PROGNOSIS, SEVERITY, TASKS
from mdmt.ml.metrics import HIST_BINS

REJECTED = "rejected"  # the status prefix of a reply the server refused: "rejected: <reason>"
INT_BUFFER_MAX = 2**53  # integer buffers stay exact through the float64 average
COUNT_MAX = 10**9  # counts of a site whose declared counts are unknown (no site holds a billion images)
REASON_CHARS = 200

# The statistics of one split (mdmt.fed.protocol.eval_metrics): list key -> its length; losses.
_EVAL_LISTS = {"cm-prognosis": 4, "hist-prognosis": 2 * HIST_BINS, "cm-severity": 16}
_EVAL_LOSSES = ("loss-sum-prognosis", "loss-sum-severity")
_TRAIN_LOSSES = ("train-loss", "train-loss-prognosis", "train-loss-severity", "seconds")


class Rejected(ValueError):
    """A reply the server refuses; its text is the one-line reason."""


def status_of(reason: str) -> str:
    """The status a rejected reply leaves in the store: ``rejected: <reason>`` on one line."""
    return f"{REJECTED}: {' '.join(str(reason).split())[:REASON_CHARS]}"


# ---- metrics --------------------------------------------------------------------------------------------


def _whole(m: Mapping[str, Any], key: str, limit: int | None = None) -> int:
    if key not in m:
        raise Rejected(f"metrics lack '{key}'")
    v = m[key]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise Rejected(f"'{key}' must be a whole number, got {_show(v)}")
    v = int(v)
    if v < 0:
        raise Rejected(f"'{key}' is negative ({v})")
    if limit is not None and v > limit:
        raise Rejected(f"'{key}' is {v}, above the {limit} the site declared")
    return v


def _number(m: Mapping[str, Any], key: str, allow_nan: bool = False) -> float:
    if key not in m:
        raise Rejected(f"metrics lack '{key}'")
    v = m[key]
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise Rejected(f"'{key}' must be a number, got {_show(v)}")
    v = float(v)
    if allow_nan and math.isnan(v):
        return v
    if not math.isfinite(v) or v < 0:
        raise Rejected(f"'{key}' must be a finite number >= 0, got {v}")
    return v


def _counts_list(m: Mapping[str, Any], key: str, length: int, n: int) -> None:
    """A confusion matrix or histogram: ``length`` whole numbers in [0, n] that add up to n."""
    if key not in m:
        raise Rejected(f"metrics lack '{key}'")
    v = m[key]
    if not isinstance(v, (list, tuple)):
        raise Rejected(f"'{key}' must be a list of {length} counts, got {_show(v)}")
    if len(v) != length:
        raise Rejected(f"'{key}' has {len(v)} entries; the contract has {length}")
    if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in v):
        raise Rejected(f"'{key}' must hold whole numbers")
    if any(x < 0 or x > n for x in v):
        raise Rejected(f"'{key}' has an entry outside [0, {n}] (its count)")
    if sum(int(x) for x in v) != n:
        raise Rejected(f"'{key}' adds up to {sum(int(x) for x in v)}, its count is {n}")


def _split_auc(sub: Mapping[str, Any]) -> None:
    """The site's exact AUC against its (already checked) confusion counts and histogram."""
    v = _number(sub, P.AUC_KEY, allow_nan=True)
    per_class = np.asarray(sub["cm-prognosis"], dtype=np.int64).reshape(2, 2).sum(axis=1)
    if not per_class.all():
        if not math.isnan(v):
            raise Rejected(f"'{P.AUC_KEY}' is {v} but a prognosis class has no rows; it must be NaN")
        return
    if math.isnan(v) or v > 1:
        raise Rejected(f"'{P.AUC_KEY}' must be a number in [0, 1] when both prognosis classes have rows, got {v}")
    hist = np.asarray(sub["hist-prognosis"], dtype=np.int64).reshape(2, HIST_BINS)
    pairs = float(per_class[0] * per_class[1])
    wins = float((hist[1] * (np.cumsum(hist[0]) - hist[0])).sum()) / pairs  # ties inside a bin counted as losses
    ties = float((hist[1] * hist[0]).sum()) / pairs
    if not wins - 1e-9 <= v <= wins + ties + 1e-9:
        raise Rejected(f"'{P.AUC_KEY}' is {v:.6f}; the split's histogram allows [{wins:.6f}, {wins + ties:.6f}] only")


def check_eval(m: Mapping[str, Any], split: str, declared: Mapping[str, int] | None) -> int:
    """The ``<split>/`` statistics of one split; returns the split's number of scored rows."""
    sub = {k.split("/", 1)[1]: v for k, v in m.items() if isinstance(k, str) and k.startswith(f"{split}/")}
    try:
        n = {
            t: _whole(sub, f"n-{t}", None if declared is None else int(declared.get(t, 0)))
            for t in (PROGNOSIS, SEVERITY)
        }
        total = _whole(sub, P.NUM_EXAMPLES)
        if total != n[PROGNOSIS] + n[SEVERITY]:
            raise Rejected(f"'{P.NUM_EXAMPLES}' is {total}, not n-prognosis + n-severity")
        for key in _EVAL_LOSSES:
            _number(sub, key)
        _counts_list(sub, "cm-prognosis", _EVAL_LISTS["cm-prognosis"], n[PROGNOSIS])
        _counts_list(sub, "hist-prognosis", _EVAL_LISTS["hist-prognosis"], n[PROGNOSIS])
        _counts_list(sub, "cm-severity", _EVAL_LISTS["cm-severity"], n[SEVERITY])
        _split_auc(sub)
    except Rejected as exc:
        raise Rejected(f"split {split}: {exc}") from None
    return total


def check_train(m: Mapping[str, Any], declared: Mapping[str, int] | None) -> None:
    """The training report."""
    n = {t: _whole(m, f"n-{t}", None if declared is None else int(declared.get(t, 0))) for t in TASKS}
    total = _whole(m, P.NUM_EXAMPLES)
    if not max(n.values()) <= total <= sum(n.values()):
        raise Rejected(f"'{P.NUM_EXAMPLES}' is {total}; a training row carries one or both labels ({n})")
    for key in _TRAIN_LOSSES:
        _number(m, key)
    _whole(m, "steps")
    _number(m, "epsilon", allow_nan=True)  # NaN: no DP-SGD at this site
    if _whole(m, "dp-refused") > 1:
        raise Rejected("'dp-refused' must be 0 or 1")


def check_metrics(
    m: Any,
    *,
    train: bool,
    splits: tuple[str, ...] | list[str],
    limits: Mapping[str, Mapping[str, int]] | None = None,
) -> None:
    """One unit's metrics; ``limits``: split -> task -> the most rows the site may report (None: only
    :data:`COUNT_MAX`). Raises :class:`Rejected`."""
    if not isinstance(m, Mapping):
        raise Rejected(f"metrics must be a record, got {_show(m)}")
    bad = [k for k in m if not isinstance(k, str)]
    if bad:
        raise Rejected(f"metric key {_show(bad[0])} is not a name")
    cap = {t: COUNT_MAX for t in TASKS}
    for split in splits:
        check_eval(m, split, (limits or {}).get(split, cap))
    if train:
        check_train(m, (limits or {}).get("train", cap))


def count_limits(
    declared: Mapping[str, Mapping[str, int]], site: str, pooled: list[str] | None = None, protocol: str = "loco"
) -> dict[str, dict[str, int]] | None:
    """split -> task -> the most rows a site may report, from the counts the sites declared at discovery
    (``declared``: site -> {"<split>-<task>": n}). A pooled unit trains on the pooled sites' sum; ``all`` is
    the site's whole labelled data; under cv every split is a part of ``all``. None: the site declared
    nothing (only :data:`COUNT_MAX` applies)."""
    if site not in declared:
        return None

    def of(s: str, split: str, task: str) -> int:
        c = declared.get(s, {})
        if split == "all" and f"all-{task}" not in c:
            return sum(int(c.get(f"{sp}-{task}", 0)) for sp in ("train", "val", "test"))
        return int(c.get(f"{split}-{task}", 0))

    own = {sp: {t: of(site, "all" if protocol == "cv" else sp, t) for t in TASKS} for sp in ("val", "test", "all")}
    train_split = "all" if protocol == "cv" else "train"
    trainers = [s for s in (pooled or [site]) if s in declared] or [site]
    own["train"] = {t: sum(of(s, train_split, t) for s in trainers) for t in TASKS}
    return own


# ---- update ---------------------------------------------------------------------------------------------


def check_update(
    update: Any,
    model: Mapping[str, np.ndarray],
    compression: str,
    norm_bound: float,
) -> tuple[dict[str, np.ndarray], float]:
    """The site's weights from its update, checked; returns (weights, the L2 norm of weights - model over
    the floating-point tensors). ``norm_bound`` <= 0: no norm bound. Raises :class:`Rejected`."""
    if not isinstance(update, Mapping) or not update:
        raise Rejected("the reply carries no update")
    int8 = compression == "int8"
    allowed = set(model) | ({k + SCALE for k, v in model.items() if v.dtype.kind == "f"} if int8 else set())
    extra = sorted(str(k) for k in update if k not in allowed)
    if extra:
        raise Rejected(f"the update has {len(extra)} tensor(s) the model has not, e.g. '{extra[0][:60]}'")
    missing = [k for k in model if k not in update]
    if missing:
        raise Rejected(f"the update lacks {len(missing)} tensor(s), e.g. '{missing[0][:60]}'")
    for name, ref in model.items():
        _check_tensor(name, update[name], ref, compression, update.get(name + SCALE) if int8 else None)
    # A one-value tensor may travel as shape () or (1,) (a checkpoint keeps a 0-d buffer as (1,)): the
    # model's shape is taken, with nothing broadcast.
    update = {
        k: v.reshape(model[k].shape) if k in model and v.shape != model[k].shape else v for k, v in update.items()
    }
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow shows as Inf, refused below
            weights = decode_update(update, model, compression)
    except (ValueError, TypeError) as exc:  # ProtocolError is a ValueError
        raise Rejected(f"the update cannot be decoded ({exc})") from None
    total = 0.0
    for name, ref in model.items():
        w = weights[name]
        if ref.dtype.kind != "f":
            continue
        if not np.isfinite(w).all():
            raise Rejected(f"'{name}' is not finite once decoded")
        with np.errstate(over="ignore"):
            total += float(np.square(w.astype(np.float64) - ref.astype(np.float64)).sum())
    norm = math.sqrt(total)
    if not math.isfinite(norm) or (norm_bound > 0 and norm > norm_bound):
        raise Rejected(f"the update's norm {norm:.4g} is above update-norm-bound {norm_bound:g}")
    return weights, norm


def _check_tensor(name: str, v: Any, ref: np.ndarray, compression: str, scale: Any) -> None:
    if not isinstance(v, np.ndarray):
        raise Rejected(f"'{name}' is not an array")
    if v.shape != ref.shape and not (v.size == ref.size == 1 and v.ndim <= 1 and ref.ndim <= 1):
        raise Rejected(f"'{name}' has shape {v.shape}; the model's is {ref.shape}")
    if ref.dtype.kind != "f":  # an integer buffer travels as it is
        if v.dtype.kind not in "iu":
            raise Rejected(f"'{name}' has dtype {v.dtype}; the model's is {ref.dtype}")
        if v.size and (int(v.min()) < 0 or int(v.max()) >= INT_BUFFER_MAX):
            raise Rejected(f"'{name}' holds a value outside [0, 2**53)")
        return
    kinds = "f" if compression == "none" else ("fi" if compression == "int8" else "f")
    if v.dtype.kind not in kinds or (v.dtype.kind == "i" and v.dtype != np.int8):
        raise Rejected(f"'{name}' has dtype {v.dtype}; expected a float tensor")
    if v.dtype.kind == "f" and not np.isfinite(v).all():
        raise Rejected(f"'{name}' is not finite")
    if v.dtype == np.int8:
        if not isinstance(scale, np.ndarray) or scale.shape != (1,) or scale.dtype.kind != "f":
            raise Rejected(f"'{name}' is int8 without a float scale of shape (1,)")
        if not np.isfinite(scale).all():
            raise Rejected(f"the scale of '{name}' is not finite")


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
