"""The summary of a synthetic federation (synth.json) and its human-readable table."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from mdmt.data.manifest import SEVERITY_CLASS_NAMES, severity_class
from mdmt.data.synth.looks import BRIXIA_LOOKS, SITE_LOOKS, look_for
from mdmt.data.synth.model import (
    BRIXIA_FLOOR,
    BRIXIA_IMAGES_PER_PATIENT,
    BRIXIA_MANUFACTURER_COUNTS,
    DUAL_FLOOR,
    DUAL_SITE,
    HIDDEN_WEIGHT,
    PROGNOSIS_FLOOR,
    PROGNOSIS_SITES,
    SEVERE_CENTRE,
    SEVERE_SLOPE,
    SEVERITY_SITE,
    model_zone_means,
    zone_model,
)
from mdmt.data.synth.oracle import generated_ceiling, oracle_ceiling


def build_summary(plans, tg, scale, image_size, seed, both_site, layout) -> dict:
    """The content of synth.json: parameters, model, targets, per-site counts, the oracle ceiling, the looks."""
    sites = {}
    for site, recs in plans.items():
        look = look_for(site, recs[0]["manufacturer"] if recs else None)
        d = {
            "role": "severity" if site == SEVERITY_SITE else ("both" if site == DUAL_SITE else "prognosis"),
            "images": len(recs),
            "patients": len({r["patient_id"] for r in recs}),
        }
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
        ceiling["generated"] = generated_ceiling(g, y)
    theta, _, _ = zone_model()
    return {
        "generator": "mdmt synth",
        "format_version": 1,
        "parameters": {
            "scale": scale,
            "image_size": image_size,
            "seed": seed,
            "both_site": bool(both_site),
            "layout": layout,
        },
        "model": {
            "severe_slope": SEVERE_SLOPE,
            "severe_centre": SEVERE_CENTRE,
            "hidden_weight": HIDDEN_WEIGHT,
            "zone_log_weights": [round(float(v), 4) for v in theta],
            "zone_means_model": [round(float(v), 4) for v in model_zone_means()],
            "brixia_images_per_patient": list(BRIXIA_IMAGES_PER_PATIENT),
            "floors": {
                "prognosis_per_class": PROGNOSIS_FLOOR,
                "brixia_per_global_score": BRIXIA_FLOOR,
                "dual_per_class": DUAL_FLOOR,
            },
        },
        "targets": tg,
        "sites": sites,
        "total_images": sum(len(v) for v in plans.values()),
        "ceiling": ceiling,
        "looks": {
            **{s: asdict(SITE_LOOKS[s]) for s in plans if s != SEVERITY_SITE},
            **{f"BRIXIA/{k or '(none)'}": asdict(v) for k, v in BRIXIA_LOOKS.items()},
        },
    }


def format_summary(summary: dict) -> str:
    """A short human-readable table of a ``synthesize`` summary."""
    p = summary.get("parameters", {})
    lines = [
        f"synthetic federation{(' ' + summary['out_dir']) if 'out_dir' in summary else ''}: "
        f"scale {p.get('scale')}, image_size {p.get('image_size')}, seed {p.get('seed')}"
    ]
    head = f"{'site':<7} {'role':<9} {'images':>6} {'patients':>8} {'MILD':>5} {'SEVERE':>6}  " + " ".join(
        f"{n:>5}" for n in SEVERITY_CLASS_NAMES
    )
    lines += [head, "-" * len(head)]
    for site, d in summary.get("sites", {}).items():
        cls = d.get("severity_classes")
        cls_txt = " ".join(f"{cls[n] if cls else '-':>5}" for n in SEVERITY_CLASS_NAMES)
        lines.append(
            f"{site:<7} {d['role']:<9} {d['images']:>6} {d['patients']:>8} "
            f"{d.get('MILD', '-'):>5} {d.get('SEVERE', '-'):>6}  {cls_txt}"
        )
    lines.append(f"total images: {summary.get('total_images')}")
    c = summary.get("ceiling", {})
    if c:
        ex, mc, gen = c.get("exact", {}), c.get("mc", {}), c.get("generated", {})
        lines.append("oracle ceiling (reads the exact global score, not the hidden factor):")
        lines.append(f"  model exact:        ACC {ex.get('acc'):.3f}  AUC {ex.get('auc'):.3f}")
        lines.append(f"  model MC (n={mc.get('n'):,}): ACC {mc.get('acc_bayes'):.3f}  AUC {mc.get('auc'):.3f}")
        if gen:
            lines.append(
                f"  generated A-F (n={gen.get('n')}): "
                f"ACC {gen.get('acc_best_threshold'):.3f} (best threshold), "
                f"{gen.get('acc_bayes'):.3f} (Bayes rule)  AUC {gen.get('auc'):.3f}"
            )
    if "wall_s" in summary:
        lines.append(f"wall time {summary['wall_s']} s ({summary.get('images_per_s')} images/s)")
    return "\n".join(lines)
