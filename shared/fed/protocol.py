"""The message contract between the ServerApp and the ClientApps, written down once.

One message per site and round carries every unit the site takes part in that round (units in
lockstep): unit i's global model is the ArrayRecord ``arrays`` (i = 0) or ``arrays.<i>``, its round
config the ConfigRecord ``config`` / ``config.<i>``. For each unit the site first evaluates the model it
received on the config's ``split`` (its validation rows, its test rows, or all its rows when it is held
out), then, when ``train`` is 1, trains from that model. The reply carries, per unit, ``metrics`` /
``metrics.<i>`` (the training report, and the evaluation statistics prefixed ``<split>/``) and, after
training, the update ``arrays`` / ``arrays.<i>``. So one round trip gives the validation of round r-1 and
the training of round r.

Every reply of one kind carries the same keys whether or not the site has labels for a task: absent tasks
report zero counts. Nothing here imports Flower; the adapters in server/ and client/ wrap these plain
dicts in Flower records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mdmt.ml.methods import PROGNOSIS, SEVERITY
from mdmt.ml.metrics import HIST_BINS
from mdmt.ml.outcomes import EvalResult, TrainResult

# Record names inside a Message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"

# Keys of the ConfigRecord the server sends with every train/evaluate message.
CFG_ROUND = "server-round"
CFG_UNIT = "unit-id"
CFG_METHOD = "method"
CFG_BACKBONE = "backbone"
CFG_FOLD = "fold"
CFG_SPLIT = "split"  # which of the site's rows to evaluate: comma-separated val | test | all
CFG_PROTOCOL = "protocol"  # loco | cv: which rule assigns the site's rows to train/val/test
CFG_LR = "lr"
CFG_AGGREGATION = "aggregation"  # fedavg | fedprox | fedbn
CFG_PROX_MU = "proximal-mu"
CFG_COMPRESSION = "update-compression"  # how the site encodes its update (mdmt.fed.compress)
CFG_POOL = "pool-sites"  # centralised reference only: the sites whose data one simulated site pools
CFG_TRAIN = "train"  # 1: train after evaluating; 0: evaluate only
CFG_EVAL_ROUND = "eval-round"  # the round whose model the site evaluates (the one before CFG_ROUND)


# The message contract's version. The server sends it in the QUERY message's ConfigRecord (``config``)
# under CONTRACT_VERSION_KEY; the site answers with it in its summary under the same key, and refuses a
# query that names another version. Raise it whenever a record, key or meaning of this module changes.
CONTRACT_VERSION = 2  # 2: histograms in logit bins (mdmt.ml.metrics), the split's exact AUC (AUC_KEY)
CONTRACT_VERSION_KEY = "contract-version"

# Keys that name files or folders. A site daemon (deployment) never takes them from the server: its data,
# workspace, cache and crop source come from its own site config (mdmt.fed.policy says what happens to
# each); only a simulation reads them, where every folder is the researcher's own.
RUN_PATH_KEYS = ("fed-dir", "workspace", "cache-dir", "store", "weights", "site-registry", "crop-source")
ROUND_PATH_KEYS = (CFG_POOL,)

# Error codes of a site's error replies (Flower's own codes are below 10). The reason is one scrubbed line
# (mdmt.fed.scrub): no path, no file name, no identifier.
ERR_REFUSED = 20  # the site's policy refused the message (mdmt.fed.policy)
ERR_FAILED = 21  # the site failed while serving the message
ERR_BLOCKED = 22  # the site's reply broke the contract and was withheld (mdmt.fed.audit.reply_problems)


def record_name(kind: str, unit: int) -> str:
    """The record of unit ``unit`` in a message: ``arrays``/``config``/``metrics`` for unit 0, else
    ``<kind>.<unit>`` (a message with one unit looks as it always did)."""
    return kind if unit == 0 else f"{kind}.{unit}"


def unit_indices(config_names) -> list[int]:
    """The unit indices a message carries, from the names of its config records."""
    out = []
    for name in config_names:
        if name == CONFIG:
            out.append(0)
        elif name.startswith(CONFIG + ".") and name[len(CONFIG) + 1 :].isdigit():
            out.append(int(name[len(CONFIG) + 1 :]))
    return sorted(out)


# The query reply (a site's summary) says which kind of node answered.
NODE_KIND = "node"
SIMULATION = "simulation"  # a simulated node: Flower's partition-id names its site
DEPLOYMENT = "deployment"  # a site daemon started with its own node config

NUM_EXAMPLES = "num-examples"
TRAIN_KEYS = (
    NUM_EXAMPLES,
    "n-prognosis",
    "n-severity",
    "train-loss",
    "train-loss-prognosis",
    "train-loss-severity",
    "steps",
    "seconds",
    "epsilon",
    "dp-refused",
)
EVAL_KEYS = (
    NUM_EXAMPLES,
    "n-prognosis",
    "n-severity",
    "loss-sum-prognosis",
    "loss-sum-severity",
    "cm-prognosis",
    "hist-prognosis",
    "auc-prognosis",
    "cm-severity",
)
AUC_KEY = "auc-prognosis"  # the split's exact prognosis AUC, computed by the site (NaN when a class is absent)


def train_metrics(res: TrainResult) -> dict[str, Any]:
    return {
        NUM_EXAMPLES: int(res.n_examples),
        "n-prognosis": int(res.n_task[PROGNOSIS]),
        "n-severity": int(res.n_task[SEVERITY]),
        "train-loss": float(res.loss),
        "train-loss-prognosis": float(res.loss_task[PROGNOSIS]),
        "train-loss-severity": float(res.loss_task[SEVERITY]),
        "steps": int(res.steps),
        "seconds": float(res.seconds),
        "epsilon": float(res.epsilon),
        "dp-refused": int(res.dp_refused),
    }


def eval_metrics(res: EvalResult) -> dict[str, Any]:
    return {
        NUM_EXAMPLES: int(res.n[PROGNOSIS] + res.n[SEVERITY]),
        "n-prognosis": int(res.n[PROGNOSIS]),
        "n-severity": int(res.n[SEVERITY]),
        "loss-sum-prognosis": float(res.loss_sum[PROGNOSIS]),
        "loss-sum-severity": float(res.loss_sum[SEVERITY]),
        "cm-prognosis": [int(v) for v in res.prog_cm.ravel()],
        "hist-prognosis": [int(v) for v in res.prog_hist.ravel()],
        AUC_KEY: float(res.prog_auc),
        "cm-severity": [int(v) for v in res.sev_cm.ravel()],
    }


def split_eval_metrics(results: dict[str, EvalResult]) -> dict[str, Any]:
    """One evaluate reply for several splits: every key of :func:`eval_metrics` prefixed ``<split>/``."""
    out: dict[str, Any] = {NUM_EXAMPLES: 0}
    for split, res in results.items():
        m = eval_metrics(res)
        out[NUM_EXAMPLES] += m[NUM_EXAMPLES]
        out.update({f"{split}/{k}": v for k, v in m.items()})
    return out


def step_metrics(train: TrainResult | None, evals: dict[str, EvalResult]) -> dict[str, Any]:
    """One unit's part of a reply: the evaluation statistics of the model received (``<split>/`` keys)
    and, when the site trained, its training report (whose count is then the reply's num-examples)."""
    out = split_eval_metrics(evals)
    if train is not None:
        out.update(train_metrics(train))
    return out


def read_split_evals(m: dict[str, Any], splits: list[str]) -> dict[str, SiteEval]:
    """The per-split statistics of one evaluate reply."""
    return {sp: read_eval({k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(f"{sp}/")}) for sp in splits}


@dataclass
class SiteEval:
    """What the server knows of a site's evaluation: sufficient statistics, no per-sample data."""

    n: dict[str, int]
    loss_sum: dict[str, float]
    prog_cm: np.ndarray
    prog_hist: np.ndarray
    sev_cm: np.ndarray
    prog_auc: float | None = None  # the exact AUC the site sent (None: not sent; NaN: a class has no rows)

    def mean_loss(self, task: str) -> float:
        return self.loss_sum[task] / self.n[task] if self.n[task] else float("nan")


def read_train(m: dict[str, Any]) -> TrainResult:
    """A site's training report, as the server receives it."""
    return TrainResult(
        n_examples=int(m[NUM_EXAMPLES]),
        n_task={PROGNOSIS: int(m["n-prognosis"]), SEVERITY: int(m["n-severity"])},
        loss=float(m["train-loss"]),
        loss_task={PROGNOSIS: float(m["train-loss-prognosis"]), SEVERITY: float(m["train-loss-severity"])},
        steps=int(m["steps"]),
        seconds=float(m["seconds"]),
        epsilon=float(m.get("epsilon", float("nan"))),
        dp_refused=bool(m.get("dp-refused", 0)),
    )


def read_eval(m: dict[str, Any]) -> SiteEval:
    return SiteEval(
        n={PROGNOSIS: int(m["n-prognosis"]), SEVERITY: int(m["n-severity"])},
        loss_sum={PROGNOSIS: float(m["loss-sum-prognosis"]), SEVERITY: float(m["loss-sum-severity"])},
        prog_cm=np.asarray(m["cm-prognosis"], dtype=np.int64).reshape(2, 2),
        prog_hist=np.asarray(m["hist-prognosis"], dtype=np.int64).reshape(2, HIST_BINS),
        sev_cm=np.asarray(m["cm-severity"], dtype=np.int64).reshape(4, 4),
        prog_auc=float(m[AUC_KEY]) if AUC_KEY in m else None,
    )
