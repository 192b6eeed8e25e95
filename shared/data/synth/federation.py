"""``synthesize``: plan the sites, then write the federation (or a published layout) with its truth and summary."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from mdmt.data.manifest import write_manifest
from mdmt.data.synth.layouts import (
    LAYOUTS,
    PUBLISHED_DIRS,
    PUBLISHED_FILES,
    consensus_flags,
    need_openpyxl,
    write_published,
)
from mdmt.data.synth.looks import look_for
from mdmt.data.synth.model import DUAL_SITE, PROGNOSIS_SITES, SEVERITY_SITE, targets
from mdmt.data.synth.plans import plan_brixia, plan_prognosis
from mdmt.data.synth.summary import build_summary
from mdmt.data.synth.writer import write_image
from mdmt.errors import ConfigError


def _single_thread_blas():
    """Keep BLAS (the random-field matmuls) on one thread: the matrices are small, and a multi-threaded
    OpenBLAS on a busy machine is 5-10x slower than one thread. threadpoolctl comes with scikit-learn;
    without it this is a no-op."""
    try:
        from threadpoolctl import threadpool_limits  # deferred: threadpoolctl (optional)
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _clean(out: Path, sites: list[str]) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; give a new or empty folder for the federation")
    if out.is_dir() and any(out.iterdir()) and not (out / "synth.json").is_file():
        raise ConfigError(
            f"{out}: folder is not empty and holds no synthetic federation (synth.json); give a new or empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    for s in sorted(set(sites) | set(PROGNOSIS_SITES) | {SEVERITY_SITE, DUAL_SITE}) + list(PUBLISHED_DIRS):
        if (out / s).is_dir():
            shutil.rmtree(out / s)
    for f in ("synth.json", "synth_truth.csv") + PUBLISHED_FILES:
        if (out / f).is_file():
            (out / f).unlink()


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
        need_openpyxl()
    _clean(out, sites)

    plans: dict[str, list[dict]] = {}
    for s in PROGNOSIS_SITES:
        if s in sites:
            plans[s] = plan_prognosis(s, seed, tg[s]["MILD"], tg[s]["SEVERE"], both=False)
    if SEVERITY_SITE in sites:
        plans[SEVERITY_SITE] = plan_brixia(seed, tg[SEVERITY_SITE]["global_score_counts"])
    if both_site:
        plans[DUAL_SITE] = plan_prognosis(DUAL_SITE, seed, tg[DUAL_SITE]["MILD"], tg[DUAL_SITE]["SEVERE"], both=True)

    total = sum(len(v) for v in plans.values())
    bar = None
    if progress:
        bar = tqdm(total=total, desc="synth", unit="img", leave=True)
    truth_rows = []
    if layout != "federation":
        try:
            with _single_thread_blas():
                published = write_published(out, layout, plans, seed, scale, image_size, bar)
        finally:
            if bar is not None:
                bar.close()
        truth = pd.DataFrame(published.pop("truth"))
        truth.to_csv(out / "synth_truth.csv", index=False)
        summary = build_summary(plans, tg, scale, image_size, seed, both_site, layout)
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
                    truth_rows.append(write_image(sdir, site, k, rec, seed, image_size))
                    if bar is not None:
                        bar.update(1)
                man = pd.DataFrame(
                    {
                        "image": [r["image"] for r in plans[site]],
                        "patient_id": [r["patient_id"] for r in plans[site]],
                        "prognosis": [r["prognosis"] for r in plans[site]],
                        "brixia": [r["brixia"] for r in plans[site]],
                        "split": "",
                        "manufacturer": [look_for(site, r["manufacturer"]).manufacturer for r in plans[site]],
                    }
                )
                if site == SEVERITY_SITE:
                    man["ConsensusTestset"] = np.where(consensus_flags(len(man), scale, seed), "1", "0")
                write_manifest(sdir, man)
    finally:
        if bar is not None:
            bar.close()

    truth = pd.DataFrame(truth_rows)
    truth.to_csv(out / "synth_truth.csv", index=False)

    summary = build_summary(plans, tg, scale, image_size, seed, both_site, layout)
    (out / "synth.json").write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    summary["out_dir"] = str(out)
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    summary["images_per_s"] = round(total / max(summary["wall_s"], 1e-9), 1)
    return summary
