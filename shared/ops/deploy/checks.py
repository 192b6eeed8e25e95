"""``mdmt deploy check``: what a site checks before joining (coordinator reachable over TLS against the CA,
the systemd unit's network drop-in, key pair, data, workspace, device); the report ends READY or NOT READY
with the reasons."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mdmt.data.cache import META, cache_dir_for
from mdmt.data.dicom import read_image
from mdmt.data.manifest import (
    MANIFEST,
    SEVERITY_CLASS_NAMES,
    brixia_global,
    manifest_hash,
    outside_site,
    read_manifest,
    read_rejected,
    severity_class,
    site_role,
)
from mdmt.errors import DataError, DicomRejected, MDMTError
from mdmt.ops.deploy.network import SYSTEMD_UNIT_DIR, check_dropin
from mdmt.ops.deploy.siteconfig import SiteConfig, format_address, parse_address

OK, WARN, FAIL, INFO = "ok", "warn", "FAIL", "info"


@dataclass
class CheckReport:
    site: str
    items: list[tuple[str, str, str]] = field(default_factory=list)  # (status, topic, detail)

    def add(self, status: str, topic: str, detail: str) -> None:
        self.items.append((status, topic, detail))

    @property
    def problems(self) -> list[str]:
        return [f"{topic}: {detail}" for status, topic, detail in self.items if status == FAIL]

    @property
    def ready(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        return "READY" if self.ready else "NOT READY: " + "; ".join(self.problems)

    def lines(self) -> list[str]:
        return [f"  {status:<5} {topic:<12} {detail}" for status, topic, detail in self.items] + [self.verdict]


def check_coordinator(cfg: SiteConfig, report: CheckReport, timeout: float = 5.0) -> None:
    host, port = parse_address(cfg.coordinator)
    where = format_address(host, port)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        report.add(FAIL, "coordinator", f"cannot resolve {host} ({exc.strerror or exc})")
        return
    except OSError as exc:
        report.add(
            FAIL,
            "coordinator",
            f"cannot reach {where} ({exc.strerror or exc.__class__.__name__}); "
            "check the address, the SuperLink and the firewalls between",
        )
        return
    if not cfg.ca.is_file():
        sock.close()
        report.add(FAIL, "coordinator", f"{where} reachable, but the CA file {cfg.ca} is not found")
        return
    try:
        ctx = ssl.create_default_context(cafile=str(cfg.ca))
    except (ssl.SSLError, ValueError) as exc:
        sock.close()
        report.add(FAIL, "coordinator", f"{cfg.ca}: not a PEM CA certificate ({exc})")
        return
    try:
        with ctx.wrap_socket(sock, server_hostname=host) as tls:
            version = tls.version()
    except ssl.SSLCertVerificationError as exc:
        report.add(
            FAIL,
            "coordinator",
            f"{where}: the TLS certificate does not verify against {cfg.ca} "
            f"({exc.verify_message or exc.reason}); get the federation's current ca.pem",
        )
        return
    except (ssl.SSLError, OSError) as exc:
        report.add(
            FAIL,
            "coordinator",
            f"{where}: TLS handshake failed ({exc.__class__.__name__}: "
            f"{getattr(exc, 'reason', None) or exc}); is this a TLS SuperLink?",
        )
        return
    detail = f"{where} reachable; {version} certificate verified against {cfg.ca} for {host}"
    try:
        import httpx  # deferred: httpx (about 0.4 s to import; only this /health probe uses it)

        r = httpx.get(f"https://{where}/health", verify=ctx, timeout=timeout)
        detail += f"; /health {r.status_code}"
    except Exception as exc:  # an older SuperLink without /health is still a valid coordinator
        detail += f"; /health not answered ({exc.__class__.__name__})"
    report.add(OK, "coordinator", detail)


def check_key(cfg: SiteConfig, report: CheckReport) -> None:
    from mdmt.ops.deploy.pki import check_key_pair  # deferred: cryptography (pki imports it; only this check needs it)

    try:
        report.add(OK, "site key", check_key_pair(cfg.key))
    except MDMTError as exc:
        report.add(FAIL, "site key", str(exc))
        return
    try:
        mode = cfg.key.stat().st_mode & 0o077
    except OSError:
        mode = 0
    if mode:
        report.add(
            WARN,
            "site key",
            f"{cfg.key} is readable by other users (mode {oct(cfg.key.stat().st_mode & 0o777)}); chmod 600 {cfg.key}",
        )


def _label_counts(df) -> tuple[str, str]:
    prog = df["prognosis"][df["prognosis"] != ""].value_counts()
    prog_txt = ", ".join(f"{int(prog.get(k, 0))} {k}" for k in ("MILD", "SEVERE")) if len(prog) else "none"
    sev = df["brixia"][df["brixia"] != ""].map(lambda s: severity_class(brixia_global(s))).value_counts()
    sev_txt = (
        ", ".join(f"{int(sev.get(k, 0))} in {name}" for k, name in enumerate(SEVERITY_CLASS_NAMES))
        if len(sev)
        else "none"
    )
    return prog_txt, sev_txt


def check_data(cfg: SiteConfig, report: CheckReport, sample: int = 5) -> None:
    d = cfg.data_dir
    if not d.is_dir():
        report.add(
            FAIL,
            "data-dir",
            f"{d} not found (or not a folder); set 'data-dir' in {cfg.source} to the site folder holding manifest.csv",
        )
        return
    try:
        df = read_manifest(d)
    except DataError as exc:
        report.add(FAIL, "manifest", str(exc))
        return
    except OSError as exc:
        report.add(FAIL, "manifest", f"{d / MANIFEST}: cannot be read ({exc.strerror or exc})")
        return
    if not len(df):
        report.add(FAIL, "manifest", f"{d / MANIFEST} has no rows")
        return
    try:
        role = site_role(df)
    except DataError:
        report.add(FAIL, "labels", f"{d / MANIFEST}: no row has a prognosis or brixia label")
        return
    report.add(
        OK, "manifest", f"{d / MANIFEST}: {len(df)} images of {df['patient_id'].nunique()} patients, role {role}"
    )
    prog_txt, sev_txt = _label_counts(df)
    report.add(INFO, "labels", f"prognosis: {prog_txt}; severity (brixia global): {sev_txt}")
    escaping = [img for img in df["image"] if outside_site(img)]
    if escaping:
        report.add(
            WARN,
            "images",
            f"{len(escaping)} image path(s) leave the site folder (first: {escaping[0]!r}); "
            "ingestion rejects them row by row",
        )
    paths = [d / img for img in df["image"] if not outside_site(img)]
    if not paths:
        report.add(FAIL, "images", "no image path stays inside data-dir; 'image' paths are relative to data-dir")
        return
    missing = [p for p in paths if not p.is_file()]
    if len(missing) == len(paths):
        report.add(
            FAIL,
            "images",
            f"none of the {len(paths)} image files exists (first: {missing[0]}); "
            "'image' paths are relative to data-dir",
        )
        return
    if missing:
        report.add(
            WARN,
            "images",
            f"{len(missing)} of {len(paths)} image files missing (first: {missing[0]}); "
            "ingestion will list them in rejected.csv",
        )
    rejected = read_rejected(d)
    if len(rejected):
        report.add(INFO, "rejected", f"{len(rejected)} rows in {d / 'rejected.csv'} from earlier imports/ingests")
    _check_images(report, [p for p in paths if p.is_file()], sample)
    _check_cache(cfg, report, manifest_hash(d))


def _check_images(report: CheckReport, files: list[Path], sample: int) -> None:
    if sample <= 0 or not files:
        return
    picks = [files[int(i)] for i in np.unique(np.linspace(0, len(files) - 1, min(sample, len(files))).round())]
    stats, failed = [], []
    for f in picks:
        try:
            arr, meta = read_image(f)
        except DicomRejected as exc:
            failed.append(f"{f.name}: {exc}")
            continue
        stats.append(
            (
                arr.shape,
                float(arr.min()),
                float(arr.max()),
                float(arr.mean()),
                float(arr.std()),
                str(meta.get("photometric", "?")),
            )
        )
    if stats:
        shapes = sorted({f"{s[0][1]}x{s[0][0]}" for s in stats})
        flat = sum(1 for s in stats if s[4] == 0.0)
        report.add(
            OK if not flat else WARN,
            "images",
            f"{len(stats)} of {len(picks)} sampled decoded: sizes {', '.join(shapes)}; "
            f"value range {min(s[1] for s in stats):.0f}..{max(s[2] for s in stats):.0f}, "
            f"mean {sum(s[3] for s in stats) / len(stats):.1f}; photometric "
            f"{', '.join(sorted({s[5] for s in stats}))}" + (f"; {flat} constant (blank) image(s)" if flat else ""),
        )
    if failed and not stats:
        report.add(FAIL, "images", f"none of {len(picks)} sampled images decodes ({failed[0]})")
    elif failed:
        report.add(WARN, "images", f"{len(failed)} of {len(picks)} sampled images do not decode ({failed[0]})")


def _check_cache(cfg: SiteConfig, report: CheckReport, mhash: str) -> None:
    site_root = cache_dir_for(cfg.data_dir, cfg.cache_root, 32, "none").parent
    metas = sorted(site_root.glob(f"*/{META}")) if site_root.is_dir() else []
    if not metas:
        report.add(
            INFO,
            "cache",
            f"none yet under {cfg.cache_root}; the first run ingests the images "
            f"('mdmt ingest {cfg.data_dir} --cache-dir {cfg.cache_root} --image-size N', N = the runs' "
            "image-size, prepares it ahead)",
        )
        return
    for m in metas:
        try:
            meta = json.loads(m.read_text())
            cached, rejected = int(meta["counts"]["cached"]), int(meta["counts"]["rejected"])
            fresh = meta.get("manifest_sha256") == mhash
        except (OSError, ValueError, KeyError, TypeError) as exc:
            report.add(WARN, "cache", f"{m}: unreadable ({exc.__class__.__name__}); delete {m.parent} and ingest again")
            continue
        state = "up to date" if fresh else "stale (the manifest changed; the next run re-ingests what changed)"
        report.add(
            OK if fresh else INFO, "cache", f"{m.parent.name}: {cached} images cached, {rejected} rejected, {state}"
        )


def check_workspace(cfg: SiteConfig, report: CheckReport) -> None:
    ws = cfg.workspace
    try:
        ws.mkdir(parents=True, exist_ok=True)
        probe = ws / f".mdmt-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        report.add(FAIL, "workspace", f"{ws} is not writable ({exc.strerror or exc}); the SuperNode's user must own it")
        return
    free = shutil.disk_usage(ws).free / 2**30
    report.add(OK if free >= 1 else WARN, "workspace", f"{ws} writable, {free:.1f} GiB free")


def check_compute(cfg: SiteConfig, report: CheckReport) -> None:
    import torch  # deferred: torch (only the device check needs it)

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.device == "cpu":
        report.add(OK, "device", "cpu (GPUs hidden from training)")
    elif cfg.device == "auto":
        report.add(OK, "device", f"auto: {'cuda (' + str(n) + ' GPU(s))' if n else 'cpu (no GPU visible)'}")
    elif n == 0:
        report.add(
            FAIL,
            "device",
            f'{cfg.device} requested but no CUDA GPU is visible; set device = "cpu" or '
            '"auto" in the site config, or install the GPU driver',
        )
    elif cfg.device.startswith("cuda:") and int(cfg.device.split(":")[1]) >= n:
        report.add(FAIL, "device", f"{cfg.device} requested but only {n} GPU(s) are visible (0..{n - 1})")
    else:
        report.add(
            OK,
            "device",
            f"{cfg.device} ({torch.cuda.get_device_name(int(cfg.device.split(':')[1]) if ':' in cfg.device else 0)})",
        )


def check_network(cfg: SiteConfig, report: CheckReport, unit_dir: str | Path, resolve: bool = True) -> None:
    """The SuperNode unit's network drop-in (where the unit is installed): it must allow the coordinator."""
    found = check_dropin(cfg, unit_dir, resolve)
    if found is not None:
        report.add(OK if found[0] else FAIL, "network", found[1])


def check_site(
    cfg: SiteConfig,
    network: bool = True,
    timeout: float = 5.0,
    sample: int = 5,
    compute: bool = True,
    unit_dir: str | Path = SYSTEMD_UNIT_DIR,
) -> CheckReport:
    """Everything a site can check before joining; the report's verdict is READY or NOT READY: reasons."""
    report = CheckReport(cfg.site)
    if network:
        check_coordinator(cfg, report, timeout)
    else:
        report.add(INFO, "coordinator", "not checked (--offline)")
    check_network(cfg, report, unit_dir, resolve=network)
    check_key(cfg, report)
    check_data(cfg, report, sample)
    check_workspace(cfg, report)
    if compute:
        check_compute(cfg, report)
    return report
