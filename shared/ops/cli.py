"""The ``mdmt`` command: everything around a Flower run that is not Flower's own.

Data:
    synth        write the synthetic DICOM federation (or a dataset's published layout)
    import       aiforcovid | brixia: a published dataset folder -> federation sites
    ingest       decode, crop and cache a site or a whole federation
    splits       the federation's split file (LOCO and k-fold CV) from a seed
Runs:
    loco         leave-one-centre-out: one Flower simulation, every held-out centre, then the table
    experiment   a grid of methods x backbones x protocols x folds; resumes where it stopped
    bench        training throughput, round overhead, update bytes, ingestion and simulation scaling
Results:
    report       tables, paired tests and plots from a run store
    runs         list | export | delete units of a run store
    dashboard    the live evaluation dashboard over run stores
    predict      score new DICOMs with a checkpoint (optionally with Grad-CAM heatmaps)
Deployment:
    deploy       certs | site-key | site-config | supernode-cmd | superlink-cmd | connection | check |
                 submit | status | stop
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from mdmt.data.options import CROP_MODES, VOI_MODES, cache_root
from mdmt.errors import MDMTError
from mdmt.fed.config import RunConfig, load_toml
from mdmt.ml.options import DEVICES

DEFAULTS = RunConfig()  # every flag that sets a run-config value defaults to the schema's value


def _kv(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise MDMTError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_synth(a: argparse.Namespace) -> None:
    # deferred: the verb's dependencies (torch, pydicom, flwr) load when it runs, so mdmt --help stays fast
    from mdmt.data.synth import format_summary, synthesize

    summary = synthesize(
        a.out,
        scale=a.scale,
        image_size=a.image_size,
        seed=a.seed,
        both_site=a.both_site,
        layout=a.layout,
        progress=not a.quiet,
    )
    print(format_summary(summary))


def cmd_import(a: argparse.Namespace) -> None:
    # deferred: the verb's dependencies (torch, pydicom, flwr) load when it runs, so mdmt --help stays fast
    from mdmt.data.importers import format_import_summary, import_aiforcovid, import_brixia

    if a.dataset == "aiforcovid":
        summary = import_aiforcovid(a.src, a.out, link=not a.copy, keep_clinical=a.keep_clinical, progress=not a.quiet)
    else:
        summary = import_brixia(
            a.src,
            a.out,
            dicom_dir=a.dicom_dir,
            split_by=a.split_by,
            min_site_size=a.min_site_size,
            link=not a.copy,
            progress=not a.quiet,
        )
    print(format_import_summary(summary))


def cmd_ingest(a: argparse.Namespace) -> None:
    # deferred: the verb's dependencies (torch, pydicom, flwr) load when it runs, so mdmt --help stays fast
    from mdmt.data.ingest import ingest_federation, ingest_site

    # deferred: the verb's dependencies (torch, pydicom, flwr) load when it runs, so mdmt --help stays fast
    from mdmt.data.manifest import MANIFEST

    target = Path(a.dir)
    cache = cache_root(a.workspace, a.cache_dir or None)
    kw = dict(
        image_size=a.image_size,
        crop=a.crop,
        workers=a.workers,
        progress=not a.quiet,
        force=a.force,
        voi=a.voi,
        crop_source=a.crop_source or None,
    )
    results = (
        [ingest_site(target, cache, **kw)] if (target / MANIFEST).is_file() else ingest_federation(target, cache, **kw)
    )
    for r in results:
        print(
            f"{r['site']}: {r['cached']} cached ({r.get('decoded', 0)} decoded, {r.get('reused_images', 0)} reused), "
            f"{r['rejected']} rejected, {r.get('crop_fallbacks', 0)} crop fallbacks -> {r['cache_dir']}"
        )
        if r.get("note"):
            print(f"  note: {r['note']}")


def cmd_splits(a: argparse.Namespace) -> None:
    # deferred: the verb's dependencies (torch, pydicom, flwr) load when it runs, so mdmt --help stays fast
    from mdmt.data.manifest import list_sites, read_manifest, site_role

    # deferred: the verb's dependencies (torch, pydicom, flwr) load when it runs, so mdmt --help stays fast
    from mdmt.data.splits import federation_splits

    fed = Path(a.fed)
    tables = {s: read_manifest(fed / s) for s in list_sites(fed)}
    prog = [s for s, t in tables.items() if site_role(t) in ("prognosis", "both")]
    df = federation_splits(tables, prog, a.seed, a.val_fraction, a.folds, exclude_consensus=not a.include_consensus)
    out = Path(a.out) if a.out else fed / f"splits-seed{a.seed}.csv"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False)
    except OSError as exc:
        raise MDMTError(
            f"{out}: cannot write the split file ({exc.strerror}); choose another path with --out"
        ) from None
    counts = df.groupby(["protocol", "fold", "role"]).size().unstack("role", fill_value=0)
    print(counts.to_string())
    print(f"\nsplit file: {out} ({len(df)} rows)")


def cmd_loco(a: argparse.Namespace) -> None:
    # deferred: the verb's dependencies (torch, pydicom, flwr) load when it runs, so mdmt --help stays fast
    from mdmt.ops.loco import loco

    values: dict[str, Any] = {}
    if a.config:
        values.update(load_toml(a.config))
    flags = {
        "fed-dir": a.fed,
        "method": a.method,
        "backbone": a.backbone,
        "num-rounds": a.rounds,
        "image-size": a.image_size,
        "seed": a.seed,
        "workspace": a.workspace,
        "holdouts": a.holdouts,
        "local-epochs": a.local_epochs,
        "batch-size": a.batch_size,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    values.update(_kv(a.set or []))
    if a.rerun:
        values["rerun"] = True
    loco(values, cpus_per_client=a.cpus_per_client, wait=a.wait, gpus_per_client=a.gpus_per_client)


def cmd_experiment(a: argparse.Namespace) -> None:
    # deferred: the verb's dependencies (torch, pydicom, flwr) load when it runs, so mdmt --help stays fast
    from mdmt.ops.experiment import run_experiment

    overrides = _kv(a.set or [])
    if a.workspace:
        overrides["workspace"] = a.workspace
    if a.rerun:
        overrides["rerun"] = True
    print(
        run_experiment(
            a.config,
            overrides,
            workers=a.workers,
            cpus_per_client=a.cpus_per_client,
            wait=a.wait,
            gpus_per_client=a.gpus_per_client,
        )
    )


def _store_path(a: argparse.Namespace) -> Path:
    return Path(a.store) if a.store else Path(a.workspace) / "store.sqlite"


def cmd_report(a: argparse.Namespace) -> None:
    # deferred: the verb's dependencies (torch, pydicom, flwr) load when it runs, so mdmt --help stays fast
    from mdmt.results.report import write_report

    # deferred: the verb's dependencies (torch, pydicom, flwr) load when it runs, so mdmt --help stays fast
    from mdmt.store import RunStore

    store = RunStore(_store_path(a), readonly=True)
    try:
        out = Path(a.out) if a.out else Path(a.workspace) / "reports"
        print(write_report(store, out, n_boot=a.bootstrap, seed=a.seed))
    finally:
        store.close()


def cmd_runs(a: argparse.Namespace) -> None:
    # deferred: the verb's dependencies (torch, pydicom, flwr) load when it runs, so mdmt --help stays fast
    from mdmt.results import runs

    # deferred: the verb's dependencies (torch, pydicom, flwr) load when it runs, so mdmt --help stays fast
    from mdmt.store import RunStore

    if not _store_path(a).is_file():
        raise MDMTError(f"{_store_path(a)}: run store not found; give --store or --workspace")
    store = RunStore(_store_path(a), readonly=a.action != "delete")
    try:
        if a.action == "list":
            print(runs.format_units(runs.list_units(store, a.match)))
        elif a.action == "export":
            print(runs.export_units(store, Path(a.out), a.match))
        else:
            print(runs.delete_units(store, a.match, yes=a.yes))
    finally:
        store.close()


def cmd_predict(a: argparse.Namespace) -> None:
    # deferred: the verb's dependencies (torch, pydicom, flwr) load when it runs, so mdmt --help stays fast
    from mdmt.ops.predict import predict

    print(
        predict(
            Path(a.checkpoint),
            [Path(x) for x in a.inputs],
            out_dir=Path(a.out),
            saliency=a.saliency,
            device=a.device,
            crop_source=a.crop_source or None,
        )
    )


def cmd_dashboard(a: argparse.Namespace) -> None:
    # deferred: the verb's dependencies (torch, pydicom, flwr) load when it runs, so mdmt --help stays fast
    from mdmt.results.dashboard import run

    run(a)


def _add_run_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--rerun",
        action="store_true",
        help="run again (replacing the stored result) a done unit whose fingerprint differs from this run's; "
        "without it such a unit stops the run with a line saying what differs",
    )
    s.add_argument("--wait", action="store_true", help="wait for another run that holds the workspace")
    s.add_argument(
        "--gpus-per-client",
        type=float,
        default=None,
        help="share of a GPU each simulated site gets (default: the visible GPUs split evenly between the sites, "
        "at most one each; 0 without a GPU)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdmt", description="Federated multi-dataset multi-task learning for COVID-19 CXR prognosis"
    )
    sub = p.add_subparsers(dest="verb", required=True)

    s = sub.add_parser("synth", help="write the synthetic DICOM federation")
    s.add_argument("out")
    s.add_argument("--scale", type=float, default=1.0, help="fraction of the real datasets' counts (default 1.0)")
    s.add_argument("--image-size", type=int, default=320, help="nominal DICOM size in pixels (default 320)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--both-site", action="store_true", help="add site DUAL, which carries both labels")
    s.add_argument(
        "--layout",
        default="federation",
        choices=("federation", "aiforcovid", "brixia"),
        help="the federation format, or a dataset's published layout (default federation)",
    )
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_synth)

    s = sub.add_parser("import", help="turn a published dataset folder into federation sites")
    ds = s.add_subparsers(dest="dataset", required=True)
    for name, helptext in (
        ("aiforcovid", "AIforCOVID: imgs*/ folders + AIforCOVID*.xlsx; one site per Hospital"),
        ("brixia", "BRIXIA: dicom_clean/ + metadata_global_v2.csv"),
    ):
        d = ds.add_parser(name, help=helptext)
        d.add_argument("src", help="the dataset folder as published")
        d.add_argument("out", help="the federation folder to write")
        d.add_argument("--copy", action="store_true", help="copy images instead of linking them")
        d.add_argument("--quiet", action="store_true")
        if name == "aiforcovid":
            d.add_argument("--keep-clinical", action="store_true", help="copy the clinical columns into the manifests")
        else:
            d.add_argument("--dicom-dir", default="dicom_clean", help="DICOM folder inside SRC (default dicom_clean)")
            d.add_argument("--split-by", default="none", help="none (one site BRIXIA) or manufacturer (one site each)")
            d.add_argument(
                "--min-site-size",
                type=int,
                default=50,
                help="with --split-by manufacturer: smaller manufacturers are merged into OTHER",
            )
        d.set_defaults(fn=cmd_import)

    s = sub.add_parser("ingest", help="decode, crop and cache a site or a whole federation")
    s.add_argument("dir", help="a site folder (with manifest.csv) or a federation folder")
    s.add_argument("--image-size", type=int, default=DEFAULTS.image_size, help=f"default {DEFAULTS.image_size}")
    s.add_argument(
        "--crop",
        default=DEFAULTS.crop,
        choices=CROP_MODES,
        help="lung: built-in heuristic; boxes/masks: your lung boxes or masks (see --crop-source); none",
    )
    s.add_argument(
        "--crop-source", default="", help="box table or mask folder (default <site>/lung_boxes.csv, <site>/lung_masks/)"
    )
    s.add_argument("--voi", default=DEFAULTS.voi, choices=VOI_MODES, help="auto: apply the file's VOI LUT / window")
    s.add_argument("--workspace", default=DEFAULTS.workspace)
    s.add_argument("--cache-dir", default="", help="default: <workspace>/cache")
    s.add_argument("--workers", type=int, default=0, help="decoding processes (default 0 = all cores)")
    s.add_argument("--force", action="store_true", help="rebuild even if a valid cache exists")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_ingest)

    s = sub.add_parser(
        "splits", help="write the federation's split file (LOCO and k-fold CV), reproducible from a seed"
    )
    s.add_argument("fed", help="federation folder")
    s.add_argument("--seed", type=int, default=DEFAULTS.seed)
    s.add_argument("--folds", type=int, default=DEFAULTS.cv_folds)
    s.add_argument(
        "--val-fraction", type=float, default=DEFAULTS.val_fraction, help="LOCO validation share per training site"
    )
    s.add_argument("--include-consensus", action="store_true", help="let BRIXIA's consensus set train")
    s.add_argument("--out", default="", help="default: FED/splits-seed<K>.csv")
    s.set_defaults(fn=cmd_splits)

    s = sub.add_parser("loco", help="leave-one-centre-out: one Flower simulation per config, every held-out centre")
    s.add_argument("--fed", help="federation folder")
    s.add_argument("--method", help="comma-separated: mdmt, stl_prognosis, stl_severity, ft, local, centralised_mdmt")
    s.add_argument("--backbone")
    s.add_argument("--rounds", type=int)
    s.add_argument("--image-size", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--workspace")
    s.add_argument("--holdouts", help="comma-separated centres (default: every prognosis site)")
    s.add_argument("--local-epochs", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--config", help="TOML file of run-config keys")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="any run-config key (repeatable)")
    s.add_argument("--cpus-per-client", type=float, default=1.0)
    _add_run_flags(s)
    s.set_defaults(fn=cmd_loco)

    s = sub.add_parser(
        "experiment", help="run a grid of methods x backbones x protocols x folds; resumes where it stopped"
    )
    s.add_argument(
        "config", help="experiment TOML (run-config keys; protocol may be 'loco,cv'; optional [synth] table)"
    )
    s.add_argument("--workers", type=int, default=1, help="simulations side by side (one per backbone x protocol)")
    s.add_argument("--workspace", help="overrides the file's workspace")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="any run-config key (repeatable)")
    s.add_argument("--cpus-per-client", type=float, default=1.0)
    _add_run_flags(s)
    s.set_defaults(fn=cmd_experiment)

    s = sub.add_parser("report", help="tables, statistics and plots from a run store (markdown, CSV, LaTeX, PNG)")
    s.add_argument("--workspace", default=DEFAULTS.workspace)
    s.add_argument("--store", default="", help="default: <workspace>/store.sqlite")
    s.add_argument("--out", default="", help="default: <workspace>/reports")
    s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for AUC intervals")
    s.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("runs", help="list, export or delete units of a run store")
    s.add_argument("action", choices=("list", "export", "delete"))
    s.add_argument("match", nargs="*", help="unit-id patterns (shell-style, e.g. 'mdmt/*/loco/A/*'); default: all")
    s.add_argument("--workspace", default=DEFAULTS.workspace)
    s.add_argument("--store", default="", help="default: <workspace>/store.sqlite")
    s.add_argument("--out", default="units.csv", help="export: a .csv or .parquet file")
    s.add_argument("--yes", action="store_true", help="delete: do it (without it, only list what would go)")
    s.set_defaults(fn=cmd_runs)

    s = sub.add_parser("predict", help="score new DICOMs with a checkpoint, using the checkpoint's own preprocessing")
    s.add_argument("checkpoint", help="a best.pt / latest.pt written by a run")
    s.add_argument("inputs", nargs="+", metavar="FILE_OR_FOLDER")
    s.add_argument("--out", default="predictions", help="folder for predictions.csv and heatmaps")
    s.add_argument(
        "--saliency", action="store_true", help="write a Grad-CAM heatmap PNG per image (the 'explain' extra)"
    )
    s.add_argument("--device", default=DEFAULTS.device, choices=DEVICES)
    s.add_argument(
        "--crop-source", default="", help="box table or mask folder, for checkpoints trained with crop=boxes|masks"
    )
    s.set_defaults(fn=cmd_predict)

    # deferred: the verb's dependencies (torch, pydicom, flwr) load when it runs, so mdmt --help stays fast
    from mdmt.results.dashboard.cli import add_arguments as dashboard_arguments  # no Dash import until it runs

    s = sub.add_parser("dashboard", help="serve the evaluation dashboard over run stores (the 'dashboard' extra)")
    dashboard_arguments(s)
    s.set_defaults(fn=cmd_dashboard)

    # deferred: the verb's dependencies (torch, pydicom, flwr) load when it runs, so mdmt --help stays fast
    from mdmt.ops.deploy.cli import add_arguments as deploy_arguments  # cryptography is imported only when a verb runs

    deploy_arguments(sub)
    # deferred: the verb's dependencies (torch, pydicom, flwr) load when it runs, so mdmt --help stays fast
    from mdmt.ops.bench import add_arguments as bench_arguments

    bench_arguments(sub)
    return p


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a run like Ctrl-C: every process it started is stopped


def main(argv: list[str] | None = None) -> int:
    if callable(getattr(sys.stdout, "reconfigure", None)):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a pipe (| tee) as they are printed
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # unit-id patterns given after options (mdmt runs list --store S 'mdmt/*')
        if getattr(args, "verb", "") != "runs" or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.match = [*args.match, *extra]
    previous = (
        signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        args.fn(args)
    except MDMTError as exc:
        print(f"mdmt {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if argv is None:  # mdmt is this process's program: nothing it started outlives it
            # deferred: mdmt.ops.launch (httpx) loads only when a run is interrupted
            from mdmt.ops.launch import descendants, end_processes

            end_processes(lambda: descendants({os.getpid()}), grace=5.0)
        print(f"mdmt {args.verb}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
