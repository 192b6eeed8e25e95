"""ServerApp: discover which node is which site, then run every unit of the config (method x backbone x
held-out centre) in this one Flower run, skipping units the store holds as done with the same fingerprint,
and write the LOCO table (``<workspace>/reports``) at the end."""

from __future__ import annotations

import logging
import signal
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from mdmt.data.manifest import list_sites
from mdmt.errors import MDMTError, ProtocolError
from mdmt.fed import protocol as P
from mdmt.fed.config import RunConfig
from mdmt.fed.identity import check_claim, load_registry
from mdmt.fed.plan import SiteInfo, expected_sites, map_sites, secagg_count_scale
from mdmt.fed.secagg import SecAggSpec
from mdmt.fed.steps import SiteReply, StepResult, UnitStep, assemble, entry_config, site_messages
from mdmt.fed.units import run_units
from mdmt.fed.validate import Rejected, check_metrics, count_limits, status_of
from mdmt.fed.workspace import WorkspaceLock
from mdmt.logs import log_to_workspace, setup_logging
from mdmt.results.report.loco import report_run
from mdmt.server.secagg import secure_train_round
from mdmt.server.strategy import collect, collect_by_message, from_record, to_record
from mdmt.store import RunStore

app = ServerApp()
log = logging.getLogger("mdmt")


class FlowerRounds:
    """mdmt.fed.steps.Rounds over a Flower Grid: every unit in lockstep, one round trip per round (one
    message per site, or per site and unit for simulated sites: mdmt.fed.steps.site_messages). Under
    secure aggregation, each unit's training goes through its own SecAgg+ round first (the sites'
    statistics of the model they received come back beside the masked vector)."""

    def __init__(
        self,
        grid: Grid,
        node_of: dict[str, int],
        timeout: float,
        cfg: RunConfig | None = None,
        sites: dict[str, SiteInfo] | None = None,
    ):
        self.grid, self.node_of, self.timeout = grid, node_of, timeout
        self.cfg, self.sites = cfg, sites if sites is not None else {}
        self.silent: set[int] = set()  # nodes that did not say which site they serve
        self.refused: dict[int, SiteInfo] = {}  # nodes that claimed a site another online node serves

    def refresh(self) -> None:
        """Map nodes that came online since the last round: a site daemon restarted without a registered
        key gets a new node id, and a site that joined late takes part from the next unit. A node that
        claims a site whose node is still online is refused (logged, never used) while that node stays
        online; once it has gone, the claimant takes its place."""
        online = set(self.grid.get_node_ids())
        for node, info in sorted(self.refused.items()):
            if node in online and self.node_of.get(info.site) not in online:
                del self.refused[node]
                self._map(info, node)
        unknown = sorted(online - set(self.node_of.values()) - self.silent - set(self.refused))
        if not unknown:
            return
        try:
            found, status = query_sites(self.grid, unknown, min(self.timeout, 60.0))
        except Exception as exc:  # a node that joins mid-run cannot stop the run: it is left out
            log.warning("nodes %s: %s; they are not used", ", ".join(map(str, unknown)), " ".join(str(exc).split()))
            self.silent |= set(unknown)
            return
        self.silent |= {n for n, st in status.items() if st != "ok"}
        for info, node in found:
            serving = self.node_of.get(info.site)
            if serving is not None and serving != node and serving in online:
                log.warning(
                    "node %d claims site %s, which node %d serves and is still online; node %d is refused",
                    node,
                    info.site,
                    serving,
                    node,
                )
                self.refused[node] = info
                continue
            self._map(info, node)

    def _map(self, info: SiteInfo, node: int) -> None:
        if info.site in self.node_of:
            log.info("site %s is back as node %d (was %d)", info.site, node, self.node_of[info.site])
        else:
            log.info("site %s joined as node %d; it takes part from the next unit", info.site, node)
            self.sites[info.site] = info
        self.node_of[info.site] = node

    def step(self, steps: list[UnitStep]) -> list[StepResult]:
        self.refresh()
        secure = {i for i, st in enumerate(steps) if self._secure(st)}
        secured = {i: self._secure_train(steps[i]) for i in sorted(secure)}
        plain = [
            UnitStep(
                st.key,
                st.plan,
                st.arrays,
                st.config,
                {s: t for s, t in st.tasks.items() if not (i in secure and t.train)},
            )
            for i, st in enumerate(steps)
        ]
        declared = {s: info.counts for s, info in self.sites.items()}
        bound = self.cfg.update_norm_bound if self.cfg else 0.0
        results = assemble(plain, self._send(plain), declared, bound)
        for i, res in secured.items():  # the secure training, with the evaluations of the plain messages
            res.evals |= results[i].evals
            res.eval_status |= results[i].eval_status
            results[i] = res
        return results

    def _secure(self, step: UnitStep) -> bool:
        return bool(self.cfg and self.cfg.secure_aggregation and sum(t.train for t in step.tasks.values()) >= 2)

    def _send(self, steps: list[UnitStep]) -> dict[tuple[str, int], SiteReply]:
        """The round trip's messages (mdmt.fed.steps.site_messages); the replies, per (site, unit)."""
        packed = bool(self.cfg and self.cfg.pack_arrays)
        records = [to_record(st.arrays, packed) for st in steps]
        simulated = {s for s, info in self.sites.items() if info.simulated}
        layout, msgs = site_messages(steps, simulated), []
        for site, entries in layout:
            content = RecordDict()
            for j, (i, task) in enumerate(entries):
                content[P.record_name(P.ARRAYS, j)] = records[i]
                content[P.record_name(P.CONFIG, j)] = ConfigRecord(entry_config(steps[i], task))
            kind = MessageType.TRAIN if any(t.train for _, t in entries) else MessageType.EVALUATE
            msgs.append(Message(content, dst_node_id=self.node_of[site], message_type=kind))
        good, status = collect_by_message(self.grid.send_and_receive(msgs, timeout=self.timeout), msgs)
        out = {}
        for m, (site, entries) in enumerate(layout):
            for j, (i, _) in enumerate(entries):
                down = int(records[i].count_bytes())
                if m not in good:
                    out[(site, i)] = SiteReply(status[m], bytes_down=down)
                    continue
                try:
                    out[(site, i)] = _site_reply(good[m].content, site, j, down)
                except Exception as exc:  # whatever one reply holds, only that reply is lost
                    out[(site, i)] = SiteReply(status_of(f"unreadable ({type(exc).__name__}: {exc})"), bytes_down=down)
        return out

    @property
    def site_of(self) -> dict[int, str]:
        return {n: s for s, n in self.node_of.items()}

    def _secure_train(self, step: UnitStep) -> StepResult:
        cfg, plan = self.cfg, step.plan
        train = {s: t for s, t in step.tasks.items() if t.train}
        site_of = {self.node_of[s]: s for s in train}
        spec = SecAggSpec(
            clip=cfg.secagg_clip, count_scale=cfg.secagg_count_scale or secagg_count_scale(plan, self.sites)
        )
        res = secure_train_round(
            self.grid,
            list(site_of),
            step.arrays,
            step.config,
            spec=spec,
            timeout=self.timeout,
            extra={self.node_of[s]: entry_config(step, t) | {P.CFG_COMPRESSION: "none"} for s, t in train.items()},
        )
        # The server learns only the summed counts; per-site reports carry none. A report that fails its
        # checks leaves that site's status rejected (the masked sum itself was checked by SecAgg+).
        status = {site_of[n]: st for n, st in res.status.items()}
        trained, evals = {}, {}
        for n, m in res.metrics.items():
            site = site_of.get(n)
            if site is None or status.get(site) != "ok":
                continue
            report = dict(m) | {P.NUM_EXAMPLES: 0, "n-prognosis": 0, "n-severity": 0}
            splits = train[site].splits
            try:
                limits = count_limits({s: i.counts for s, i in self.sites.items()}, site, protocol=step.key.protocol)
                check_metrics(report, train=True, splits=splits, limits=limits)
                trained[site] = P.read_train(report)
                if splits:
                    evals[site] = P.read_split_evals(report, list(splits))
            except Exception as exc:  # Rejected, or anything else one report provokes
                status[site] = status_of(str(exc) if isinstance(exc, Rejected) else f"unreadable ({exc})")
                trained.pop(site, None)
        down = int(to_record(step.arrays).count_bytes())
        sizes = {site_of[n]: (down, res.bytes_up.get(n, 0)) for n in site_of}
        return StepResult(res.arrays, trained, status, evals, {}, sizes, totals=dict(res.counts))


def _site_reply(content: RecordDict, site: str, j: int, down: int) -> SiteReply:
    """Unit ``j``'s part of one site's reply as plain data (checked later by mdmt.fed.steps.assemble)."""
    mname, aname = P.record_name(P.METRICS, j), P.record_name(P.ARRAYS, j)
    if mname not in content.metric_records:
        return SiteReply(status_of(f"the reply has no {mname}"), bytes_down=down)
    arrays = content.array_records.get(aname)
    up = int(arrays.count_bytes()) if arrays is not None else 0
    try:
        update = from_record(arrays, f"site {site}'s {aname}") if arrays is not None else None
    except ProtocolError as exc:
        return SiteReply(status_of(str(exc)), bytes_down=down, bytes_up=up)
    return SiteReply("ok", dict(content[mname]), update, down, up)


def query_sites(
    grid: Grid, nodes: list[int], timeout: float, registry: Mapping[int, str] | None = None
) -> tuple[list[tuple[SiteInfo, int]], dict[int, str]]:
    """Ask nodes which site they serve (a QUERY round): (site, node) for each answer, and every node's status.
    A node whose ClientApp fails (its data folder is wrong, say) stops the run with that node's error. With
    a site registry (``registry``, or the one :func:`discover_sites` loaded for this grid), a deployed node
    whose claimed site is not the site its key was registered for is refused and logged (status
    ``refused: ...``), and the run goes on without it."""
    msgs = [
        Message(
            RecordDict({P.CONFIG: ConfigRecord({P.CONTRACT_VERSION_KEY: P.CONTRACT_VERSION})}),
            dst_node_id=n,
            message_type=MessageType.QUERY,
        )
        for n in nodes
    ]
    replies, status = collect(grid.send_and_receive(msgs, timeout=timeout), {}, [])
    errors = {s: st for s, st in status.items() if st.startswith("error")}
    if errors:
        raise RuntimeError("site discovery failed: " + "; ".join(f"{s}: {st}" for s, st in errors.items()))
    found, refused = [], {}
    for m in replies.values():  # a summary that breaks the contract (another version, say) refuses that node only
        node = m.metadata.src_node_id
        try:
            found.append((SiteInfo.from_summary(dict(m.content[P.SITE])), node))
        except (ProtocolError, KeyError, TypeError, ValueError) as exc:
            why = " ".join(str(exc).split())[:300]
            log.warning("node %d refused: %s", node, why)
            refused[node] = f"refused: {why}"
    registry = _REGISTRIES.get(grid) if registry is None else registry
    if registry is not None:
        for info, node in found:
            why = None if info.simulated else check_claim(registry, node, info.site)
            if why:
                log.warning("refused: %s; the run goes on without it", why)
                refused[node] = f"refused: {why}"
        found = [(info, node) for info, node in found if node not in refused]
    answered = {node for _, node in found}
    return found, {n: refused.get(n) or ("ok" if n in answered else "no reply") for n in nodes}


# The site registry of each grid's run (node id -> site of its registered key), loaded by discover_sites so
# that every later query of the run (FlowerRounds.refresh) checks the claims too.
_REGISTRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def discover_sites(grid: Grid, cfg: RunConfig, wait_s: float = 120.0) -> tuple[dict[str, SiteInfo], dict[str, int]]:
    """Which node is which site; start order plays no part. Every configured site must answer. Simulated
    nodes are all there from the start, so a simulation short of nodes stops at once; site daemons get up
    to ``wait_s`` to connect. With ``site-registry`` (a deployment), a node's claim must match its key's site."""
    expected = expected_sites(cfg, list_sites)
    if cfg.site_registry:
        _REGISTRIES[grid] = load_registry(cfg.site_registry)
    start = time.monotonic()
    deadline = start + wait_s
    found: list[tuple[SiteInfo, int]] = []
    asked: set[int] = set()
    while True:
        new = sorted(set(grid.get_node_ids()) - asked)
        if new:
            answers, _ = query_sites(grid, new, cfg.round_timeout)
            found += answers
            asked |= set(new)
        have = {info.site for info, _ in found}
        simulated = any(info.simulated for info, _ in found)
        if expected <= have or simulated or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    return map_sites(found, expected, time.monotonic() - start)


def _stop_on_sigterm() -> None:
    """SIGTERM (a stopped run, an operator's stop) raises in the main thread, so the unit in progress is
    marked interrupted on the way out."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    try:
        run(grid, context)
    except MDMTError as exc:  # bad input, a busy workspace, a missing site: one line, no traceback
        log.error("%s", exc)


def run(grid: Grid, context: Context) -> None:
    # Configuration: one schema, validated before any message is sent; one writer per workspace.
    cfg = RunConfig.from_mapping(context.run_config)
    cfg.check_server_files()
    _stop_on_sigterm()
    log.info(
        "fed-dir %s, workspace %s (relative paths resolve against %s)", cfg.fed_path, cfg.workspace_path, Path.cwd()
    )
    with WorkspaceLock(cfg.workspace_path).acquire() as lock:
        log_to_workspace(cfg.workspace_path, "serverapp")
        store = RunStore(cfg.store_path)
        try:
            if lock.held_here:  # started by flwr run directly: no driver wrote the config or cleared stale units
                cfg.write_toml(cfg.workspace_path / "configs" / f"serverapp-{time.strftime('%Y%m%d-%H%M%S')}.toml")
                for unit in store.mark_interrupted(message="its run ended without a word (the workspace was free)"):
                    log.info("unit %s: left running by a run that is gone; marked interrupted", unit)
            # Discovery, then every unit of the config, decided from the store before anything trains.
            sites, node_of = discover_sites(grid, cfg)
            rounds = FlowerRounds(grid, node_of, cfg.round_timeout, cfg, sites)
            run_units(cfg, sites, rounds, store, flwr_run_id=str(context.run_id))
            if cfg.protocol == "loco":
                _, table = report_run(store, cfg.workspace_path, cfg.methods, cfg.backbones)
                log.info("LOCO table:\n%s", table)
        finally:
            store.close()
