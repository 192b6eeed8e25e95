"""``mdmt bench``'s warm section: the same LOCO units run three ways in one bench run, cold (every message
rebuilds the site's data and model, one unit at a time), warm (``site-cache``), and warm with the units in
lockstep (``concurrent-units``), and the server's overhead per unit-round of each:

    (run wall time - sum over round trips of the slowest site's training) / unit-rounds

where the run wall time is the ServerApp's, from the first unit's start to the last unit's end, and a round
trip's slowest site is the one whose training (all units it trained in that trip) took longest. In a
simulation with units in lockstep, a site's units are separate messages that the workers serve side by
side, so the slowest site's summed training can exceed the trip's wall time and the overhead can be
negative; the training summed over every site, per unit-round, is printed beside it. A fourth run takes
one optimiser step per site and round, so its wall time per unit-round is nearly all machinery.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from mdmt.ops.bench.common import Bench, fed_label, short_device
from mdmt.ops.bench.simulation import simulate
from mdmt.store import RunStore

MODES = (
    ("cold", {"site-cache": False, "concurrent-units": 1}),
    ("warm", {"site-cache": True, "concurrent-units": 1}),
    ("warm + lockstep", {"site-cache": True}),
    # the same trips with one optimiser step per site and round: what the machinery (messages, weights
    # through Ray, model loads, evaluation, aggregation, checkpoints, the store) costs per unit-round when
    # training is next to nothing, the piece that a faster device does not shrink
    ("warm + lockstep, 1 local step", {"site-cache": True, "local-steps": 1}),
)


def overhead(store_path: Path) -> tuple[float, float, int, float]:
    """(run wall seconds, sum over round trips of the slowest site's training, unit-rounds, training summed
    over every site and trip) of a store."""
    store = RunStore(store_path, readonly=True)
    try:
        units = store.units()
        wall = max(u["ended"] for u in units) - min(u["started"] for u in units)
        trips: dict[tuple[int, float], dict[str, float]] = defaultdict(lambda: defaultdict(float))
        unit_rounds = 0
        for u in units:
            rows = store.metrics(u["unit_id"])
            trip = {m["round"]: round(m["value"], 6) for m in rows if m["site"] == "*" and m["split"] == "round"}
            unit_rounds += len(trip)
            for m in rows:
                if m["site"] != "*" and m["split"] == "train" and m["name"] == "seconds":
                    trips[(m["round"], trip[m["round"]])][m["site"]] += m["value"]
    finally:
        store.close()
    total = sum(sum(per.values()) for per in trips.values())
    return wall, sum(max(per.values()) for per in trips.values()), unit_rounds, total


def section_warm(b: Bench, fed: Path) -> None:
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.data.manifest import list_sites, read_manifest, site_role

    s = b.settings
    sites = list_sites(fed)
    holdouts = [x for x in sites if site_role(read_manifest(fed / x)) in ("prognosis", "both")]
    holdouts = holdouts[: s.warm_units or len(holdouts)]
    dev = f"Flower simulation on {short_device(s)}"
    cfg = (
        f"{len(sites)}-site simulation of {fed_label(fed)}, {len(holdouts)} LOCO units of mdmt, {s.backbone} "
        f"{s.sim_image_size} px, {s.rounds} rounds of 1 local epoch"
    )
    per: dict[str, float] = {}
    for name, over in MODES:
        over = over | ({"concurrent-units": len(holdouts)} if "concurrent-units" not in over else {})
        store, _, _ = simulate(
            s,
            fed,
            "warm-" + "-".join(re.findall(r"[a-z0-9]+", name)),
            sites,
            ",".join(holdouts),
            s.backbone,
            s.sim_image_size,
            s.rounds,
            min(s.batch_size, 32),
            b.echo,
            over,
        )
        wall, compute, unit_rounds, total = overhead(store)
        per[name] = (wall - compute) / unit_rounds
        b.add("warm", f"{name}: wall per unit-round", wall / unit_rounds, "s", dev, cfg)
        b.add("warm", f"{name}: training summed over sites per unit-round", total / unit_rounds, "s", dev, cfg)
        b.add(
            "warm",
            f"{name}: overhead per unit-round",
            per[name],
            "s",
            dev,
            cfg,
            note="(run wall - sum of each round trip's slowest site training) / unit-rounds",
        )
    b.add("warm", "warm + lockstep overhead / cold overhead", per["warm + lockstep"] / per["cold"], "", dev, cfg)
