"""``mdmt bench``'s run loop (every chosen section in turn, a skipped one with its reason, the figures' JSON)
and its argparse subcommand."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from mdmt.errors import ConfigError
from mdmt.ops.bench.common import SECTIONS, Bench, Settings, device_name, federation
from mdmt.ops.bench.data import section_ingest
from mdmt.ops.bench.deploy import section_deploy
from mdmt.ops.bench.simulation import section_round, section_scaling
from mdmt.ops.bench.train import section_bytes, section_train
from mdmt.ops.bench.warm import section_warm


def run_bench(
    settings: Settings,
    sections: tuple[str, ...] = SECTIONS,
    command: str = "mdmt bench",
    echo: Callable[[str], None] = print,
) -> Bench:
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.train import resolve_device

    s = settings
    s.workspace = Path(s.workspace).resolve()
    s.workspace.mkdir(parents=True, exist_ok=True)
    device = resolve_device(s.device)
    b = Bench(s, command, echo)
    echo(f"{command}   (python {platform.python_version()}, {device_name(device)}; workspace {s.workspace})")
    echo(f"{'section':8} {'figure':44} {'value':>18}   device; settings")
    t0 = time.perf_counter()
    fed, missing = None, ""
    for name in sections:
        start = time.perf_counter()
        try:
            if name == "train":
                section_train(b, device)
            elif name == "bytes":
                section_bytes(b)
            elif missing:  # the synthetic federation could not be made
                b.add(name, "section skipped", None, "", "-", "-", note=f"needs {missing}")
            else:
                try:
                    fed = fed or federation(s)
                except ImportError as exc:
                    missing = exc.name or str(exc)
                    raise
                sections_on_fed = {
                    "ingest": section_ingest,
                    "round": section_round,
                    "warm": section_warm,
                    "scaling": section_scaling,
                    "deploy": section_deploy,
                }
                sections_on_fed[name](b, fed)
        except ImportError as exc:  # a GPU machine without Flower or pydicom
            b.add(name, "section skipped", None, "", "-", "-", note=f"needs {exc.name}")
        echo(f"{'':8} ({name}: {time.perf_counter() - start:.0f} s)")
    echo(f"bench wall time {time.perf_counter() - t0:.0f} s")
    out = s.workspace / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "command": command,
                "settings": {k: str(v) for k, v in asdict(s).items()},
                "figures": [asdict(f) for f in b.figures],
            },
            indent=1,
        )
    )
    echo(f"figures: {out}")
    return b


def cmd_bench(a) -> None:

    sections = tuple(x.strip() for x in a.sections.split(",") if x.strip())
    bad = [x for x in sections if x not in SECTIONS]
    if bad:
        raise ConfigError(f"--sections: unknown '{bad[0]}'; choose from {', '.join(SECTIONS)}")
    sites = tuple(int(x) for x in a.scaling_sites.split(",")) if a.scaling_sites else None
    s = Settings.for_mode(
        a.quick,
        device=a.device,
        backbone=a.backbone,
        image_size=a.image_size,
        sim_image_size=a.sim_image_size,
        batch_size=a.batch_size,
        steps=a.steps,
        compile=a.compile,
        scale=a.scale,
        workspace=Path(a.workspace),
        scaling_sites=sites,
        fed_dir=Path(a.fed_dir) if a.fed_dir else None,
        deploy_rounds=a.deploy_rounds,
        deploy_baseline_rounds=a.deploy_baseline_rounds,
    )
    run_bench(s, sections, command="mdmt " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "mdmt bench")


def add_arguments(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure training throughput vs the raw step, round overhead, update "
        "bytes, ingestion and simulation scaling",
    )
    p.add_argument("--quick", action="store_true", help="small settings that run on a CPU in a few minutes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--backbone", default=None, help="default resnet18")
    p.add_argument("--image-size", type=int, default=None, help="train section image side (default 256; quick 64)")
    p.add_argument(
        "--sim-image-size",
        type=int,
        default=None,
        help="image side of the round and warm simulations (default 64; quick 32)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default 128; quick 32")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 50; quick 6)")
    p.add_argument(
        "--compile",
        default=None,
        choices=("auto", "on", "off"),
        help="torch.compile in the train section (auto: eager and compiled on a GPU, eager on a CPU)",
    )
    p.add_argument("--scale", type=float, default=None, help="synthetic federation scale (default 1.0; quick 0.04)")
    p.add_argument("--fed-dir", default=None, help="use this synthetic federation instead of making one at --scale")
    p.add_argument("--scaling-sites", default="", help="virtual site counts (default 2,7,20,50)")
    p.add_argument(
        "--deploy-rounds", type=int, default=None, help="rounds of the deploy section's job (default 20; quick 3)"
    )
    p.add_argument(
        "--deploy-baseline-rounds",
        type=int,
        default=None,
        help="rounds of the same job with one Flower Array per tensor, before packing (default 3; quick 0 = skip)",
    )
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    p.add_argument("--workspace", default="runs/bench", help="federations, caches and the figures' JSON")
    p.set_defaults(fn=cmd_bench)
