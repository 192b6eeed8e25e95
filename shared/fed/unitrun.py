"""One federated unit on the server, round by round, with no Flower types.

Each round is one round trip. The sites receive the global model of the round before: the validation
sites evaluate it (so the validation of round r-1 comes back with the training of round r), the training
sites then train from it, and the held-out centre (and the training sites' test rows) evaluate it every
``holdout-eval-every`` rounds. When the last round is trained, an evaluate-only round trip brings its
validation; the selected model is then evaluated on the held-out and test rows unless that already
happened at its round. So the LOCO table always reads the held-out metrics at the selected round, and
model selection and early stopping see exactly the rounds they always saw. The learning rate a round
trains with comes from the validations known when it is sent (one round behind a separate evaluation).

Every round the unit logs its rows, checkpoints ``latest.pt`` (server state included, so an interrupted
unit continues after its last complete round) and ``best.pt`` when the selection improves.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from mdmt.fed import protocol as P
from mdmt.fed.checkpoint import arrays_digest, load_checkpoint, save_checkpoint
from mdmt.fed.config import RunConfig
from mdmt.fed.plan import SiteInfo, UnitPlan, unit_rounds
from mdmt.fed.rows import eval_rows, monitored_val_loss, round_config, train_rows
from mdmt.fed.selection import Selection, ServerLR
from mdmt.fed.steps import SiteTask, StepResult, UnitStep
from mdmt.ml.metrics import edge_bin
from mdmt.ml.outcomes import TrainResult
from mdmt.store import UNKNOWN_FINGERPRINT, RunStore, UnitKey

log = logging.getLogger("mdmt")

VAL = "val"


class UnitRun:
    """A unit in progress: :meth:`next_step` says what its sites do next, :meth:`absorb` takes what came
    back; :attr:`done` once its result is stored."""

    def __init__(
        self,
        cfg: RunConfig,
        plan: UnitPlan,
        sites: dict[str, SiteInfo],
        store: RunStore,
        arrays: dict[str, np.ndarray],
        starts_from: str,
        flwr_run_id: str = "",
        fingerprint: str = UNKNOWN_FINGERPRINT,
        recipe: dict[str, Any] | None = None,
    ):
        self.cfg, self.plan, self.store, self.key = cfg, plan, store, plan.key
        self.hashes = {s: sites[s].manifest_hash for s in plan.train_sites}
        self.ckpt_dir = cfg.workspace_path / "checkpoints" / self.key.slug
        self.sel, self.lr = Selection(cfg.patience, cfg.select_after), ServerLR(cfg)
        self.n_rounds = unit_rounds(cfg, self.key)
        self.arrays = arrays  # the global model after ``trained`` rounds
        self.trained = self.evaluated = 0  # rounds trained; rounds whose validation is known
        self.thresholds: dict[int, int] = {}  # round -> decision-threshold bin chosen on its validation
        self.reported: set[int] = set()  # rounds whose held-out / test rows were evaluated
        self.refused: list[str] = []  # sites out of privacy budget
        self.absent: set[str] = set()  # training sites that missed the last round they were asked to train
        self.stopping = False
        self.done = False
        self.conf = cfg.to_mapping() | {
            "method": self.key.method,
            "backbone": self.key.backbone,
            "fold": self.key.fold,
            "num-rounds": self.n_rounds,
            "starts-from": starts_from,
        }
        resumed = resume_state(self.key, store, self.ckpt_dir / "latest.pt", fingerprint)
        if resumed is None:
            store.start_unit(
                self.key,
                plan.train_sites,
                {s: ",".join(sp) for s, sp in plan.eval_splits.items()},
                self.conf,
                self.hashes,
                flwr_run_id,
                fingerprint,
                recipe,
            )
        else:
            self._restore(resumed)
        log.info(
            "unit %s: train on %s, evaluate %s",
            self.key.unit_id,
            ",".join(plan.train_sites),
            ",".join(f"{s}:{'+'.join(sp)}" for s, sp in plan.eval_splits.items()),
        )

    # ---- what the sites do next -------------------------------------------------------------------
    def _training(self) -> bool:
        return not self.stopping and self.trained < self.n_rounds and bool(self.plan.train_messages)

    def _report_due(self, rnd: int) -> bool:
        return rnd >= 1 and rnd not in self.reported and rnd % self.cfg.holdout_eval_every == 0

    def next_step(self) -> UnitStep:
        """Train (and validate the model before), validate the last model, or report the selected one."""
        t = self.trained
        if self._training() or self.evaluated < t and not self.stopping:
            train = self._training()
            arrays, rnd = self.arrays, t
            # the last round's validation trip also scores it on the held-out and test rows: it is often the
            # selected one, and then no further trip is needed
            report = self._report_due(t) or (not train and t >= 1)
            splits = {
                s: self._splits(sp, val=t >= 1 and self.evaluated < t, report=report)
                for s, sp in self.plan.eval_splits.items()
            }
        else:  # the selected model on the held-out and test rows, at its round
            train, rnd = False, int(self.sel.best_round or t)
            arrays = self._best_arrays()
            splits = {s: self._splits(sp, val=False, report=True) for s, sp in self.plan.eval_splits.items()}
        tasks = {s: SiteTask(True, splits.get(s, ()), dict(x)) for s, x in self.plan.train_messages.items() if train}
        tasks |= {s: SiteTask(False, sp) for s, sp in splits.items() if sp and s not in tasks}
        config = round_config(self.cfg, self.key, t + 1 if train else rnd, self.lr.lr) | {P.CFG_EVAL_ROUND: rnd}
        self._sent = (arrays, rnd)
        return UnitStep(self.key, self.plan, arrays, config, tasks)

    @staticmethod
    def _splits(available: tuple[str, ...], val: bool, report: bool) -> tuple[str, ...]:
        return tuple(sp for sp in available if (sp == VAL and val) or (sp != VAL and report))

    def _best_arrays(self) -> dict[str, np.ndarray]:
        if self.sel.best_round in (None, self.trained):
            return self.arrays
        state = load_checkpoint(self.ckpt_dir / "best.pt")["state_dict"]
        return {k: v.numpy().copy() for k, v in state.items()}

    # ---- what came back ---------------------------------------------------------------------------
    def absorb(self, step: UnitStep, res: StepResult, seconds: float) -> None:
        arrays_sent, rnd = self._sent
        key = self.key
        if any(VAL in sp for sp in res.evals.values()) or (step.trains and rnd >= 1 and self.evaluated < rnd):
            self._validated(rnd, res, arrays_sent)
        elif res.evals:  # held-out / test rows of a round validated before
            metrics, stats = eval_rows(self.plan, res.evals, self.cfg.threshold, k=self.thresholds.get(rnd))
            self.store.log_round(key, rnd, metrics, stats, self._participation(res, evaluate_only=True))
            self.reported.add(rnd)
        if step.trains:
            self._trained(res, seconds)
        if not self._training() and not self.stopping and self.evaluated >= self.trained:
            self.stopping = True  # every round trained and validated
        if self.stopping and (self.sel.best_round is None or int(self.sel.best_round) in self.reported):
            self.store.finish_unit(key, "done", self.sel.best_round)
            self.done = True
        self._checkpoint()

    def _validated(self, rnd: int, res: StepResult, arrays_sent: dict[str, np.ndarray]) -> None:
        """The validation of round ``rnd`` (and its held-out / test rows when they were due)."""
        key = self.key
        metrics, stats = eval_rows(self.plan, res.evals, self.cfg.threshold)
        self.thresholds[rnd] = edge_bin(_threshold_value(metrics))
        val_loss = monitored_val_loss(self.plan, res.evals)
        metrics.append(("*", self.plan.method.monitor, "val", "monitored_loss", val_loss))
        improved = self.sel.update(rnd, val_loss)
        self.lr.step(val_loss)
        self.store.log_round(key, rnd, metrics, stats, self._participation(res, evaluate_only=not res.trained))
        self.evaluated = rnd
        if any(sp != VAL for per in res.evals.values() for sp in per):
            self.reported.add(rnd)
        if improved:
            meta = dict(round=rnd, unit_id=key.unit_id, config=self.conf, manifest_hashes=self.hashes)
            save_checkpoint(
                self.ckpt_dir / "best.pt", arrays_sent, **meta, extra={"threshold": _threshold_value(metrics)}
            )
        log.info(
            "unit %s round %d: monitored val loss %.4f%s", key.unit_id, rnd, val_loss, " (best)" if improved else ""
        )
        if self.sel.should_stop(rnd):
            log.info("unit %s: early stop after round %d (best %s)", key.unit_id, rnd, self.sel.best_round)
            self.stopping = True

    def _trained(self, res: StepResult, seconds: float) -> None:
        """The training of round trained + 1: k-of-n, privacy refusals, the new global model, its rows."""
        key, rnd, cfg = self.key, self.trained + 1, self.cfg
        missing = {s: st for s, st in res.train_status.items() if s not in res.trained}
        if len(res.trained) < max(1, min(cfg.min_sites, len(self.plan.train_messages))):
            msg = (
                f"round {rnd}: only {len(res.trained)} of {len(self.plan.train_messages)} sites trained (min-sites "
                f"{cfg.min_sites}); missing: {', '.join(f'{s} ({st})' for s, st in missing.items())}"
            )
            self.store.finish_unit(key, "failed", self.sel.best_round, msg)
            raise RuntimeError(msg)
        self._note_absences(rnd, missing, res.trained)
        status = dict(res.train_status)
        for s, t in res.trained.items():
            if t.dp_refused:  # its privacy budget is spent: evaluate-only from now on
                self.plan.train_messages.pop(s, None)
                self.refused.append(s)
                status[s] = f"refused: privacy budget (epsilon {t.epsilon:.3f} of {cfg.dp_epsilon_budget})"
                log.info("unit %s round %d: site %s stops training: %s", key.unit_id, rnd, s, status[s])
        if res.arrays is not None:
            self.arrays = res.arrays
        self.trained = rnd
        metrics = train_rows(res) + [("*", "all", "train", "lr", self.lr.lr), ("*", "all", "round", "seconds", seconds)]
        self.store.log_round(key, rnd, metrics, [], [(s, "train", st, "") for s, st in status.items()])
        if not self.plan.train_messages:
            log.info("unit %s: every training site has spent its privacy budget after round %d", key.unit_id, rnd)

    def _participation(self, res: StepResult, evaluate_only: bool) -> list[tuple[str, str, str, str]]:
        done = {s: ",".join(sorted(per)) for s, per in res.evals.items()}
        rows = [(s, "evaluate", st, done.get(s, "")) for s, st in res.eval_status.items()]
        if not evaluate_only:  # sites that evaluated before training report in their train reply
            rows += [(s, "evaluate", "ok", sp) for s, sp in done.items() if s in res.trained]
        return rows

    def _note_absences(self, rnd: int, missing: dict[str, str], trained: dict[str, TrainResult]) -> None:
        """k-of-n rounds: a round goes on without the sites that did not answer in time; log who left and
        who came back (the participation rows hold every round's status as well)."""
        for s, st in sorted(missing.items()):
            log.warning(
                "unit %s round %d: site %s missing (%s); the round goes on with %d site(s)",
                self.key.unit_id,
                rnd,
                s,
                st,
                len(trained),
            )
            if s not in self.absent:
                self.store.log_event(self.key, rnd, "missing", f"{s}: {st}")
            self.absent.add(s)
        for s in sorted(self.absent & set(trained)):
            log.info("unit %s round %d: site %s rejoined", self.key.unit_id, rnd, s)
            self.store.log_event(self.key, rnd, "rejoined", s)
            self.absent.discard(s)

    # ---- resume -----------------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        """latest.pt: the global model after the last trained round and every piece of server state."""
        meta = dict(round=self.trained, unit_id=self.key.unit_id, config=self.conf, manifest_hashes=self.hashes)
        extra = {
            "selection": self.sel.state(),
            "lr": self.lr.state(),
            "refused": list(self.refused),
            "evaluated": self.evaluated,
            "thresholds": {str(k): v for k, v in self.thresholds.items()},
            "reported": sorted(self.reported),
            "stopping": self.stopping,
        }
        save_checkpoint(self.ckpt_dir / "latest.pt", self.arrays, **meta, extra=extra)

    def _restore(self, resumed: dict[str, Any]) -> None:
        self.arrays, self.trained = resumed["arrays"], resumed["round"]
        self.sel.restore(resumed["selection"])
        self.lr.restore(resumed["lr"])
        self.evaluated = int(resumed.get("evaluated", self.trained))
        self.thresholds = {int(k): int(v) for k, v in resumed.get("thresholds", {}).items()}
        self.reported = {int(r) for r in resumed.get("reported", range(1, self.evaluated + 1))}
        self.stopping = bool(resumed.get("stopping", False))
        for s in resumed["refused"]:
            self.plan.train_messages.pop(s, None)
        self.refused = list(resumed["refused"])
        latest = self.ckpt_dir / "latest.pt"
        detail = f"from {latest} (round {self.trained}, arrays sha256 {arrays_digest(self.arrays)})"
        self.store.resume_unit(self.key, self.trained, detail)
        log.info("unit %s: resumed after round %d %s", self.key.unit_id, self.trained, detail)


def resume_state(key: UnitKey, store: RunStore, latest: Path, fingerprint: str) -> dict[str, Any] | None:
    """What an interrupted unit continues from: its last complete round's checkpoint (global arrays,
    selection, early-stopping and learning-rate state, sites out of privacy budget), when the store marks
    the unit running or interrupted with this fingerprint, the checkpoint is that unit's, and the store
    logged exactly that round. None = start from round 1."""
    row = store.unit(key)
    if row is None or row["status"] not in ("running", "interrupted") or not latest.is_file():
        return None
    if row["fingerprint"] != fingerprint:
        log.info("unit %s: the interrupted run had another fingerprint; starting again", key.unit_id)
        return None
    ck = load_checkpoint(latest)
    if ck.get("unit_id") != key.unit_id or "selection" not in ck or int(row["rounds_done"]) < int(ck["round"]):
        return None
    return {
        "arrays": {k: v.numpy().copy() for k, v in ck["state_dict"].items()},
        "round": int(ck["round"]),
        "selection": ck["selection"],
        "lr": ck["lr"],
        "refused": ck.get("refused", []),
        "evaluated": ck.get("evaluated", int(ck["round"])),
        "thresholds": ck.get("thresholds", {}),
        "reported": ck.get("reported", list(range(1, int(ck["round"]) + 1))),
        "stopping": ck.get("stopping", False),
    }


def _threshold_value(metrics: list[tuple[str, str, str, str, float]]) -> float:
    return next(float(v) for s, _, _, name, v in metrics if s == "*" and name == "threshold")
