"""Local training and evaluation on a site's uint8 cache: plain PyTorch, no Flower types.

Images stay uint8 on the host; each batch is gathered, moved to the device and normalised there.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
import torch

from mdmt.errors import ConfigError
from mdmt.ml.loss import mdmt_loss
from mdmt.ml.methods import PROGNOSIS, SEVERITY
from mdmt.ml.metrics import exact_auc, score_histogram
from mdmt.ml.model import IMAGENET_MEAN, IMAGENET_STD
from mdmt.ml.naming import NUM_CLASSES
from mdmt.ml.options import CLASS_WEIGHTS, DEVICES
from mdmt.ml.outcomes import EvalResult, TrainResult
from mdmt.ml.privacy import DPRound
from mdmt.ml.taskdata import TaskData
from mdmt.seeding import derive_seed


def resolve_device(name: str = "auto") -> torch.device:
    """``name`` is one of mdmt.ml.options.DEVICES."""
    if name not in DEVICES:
        raise ConfigError(f"device '{name}' is not one of {', '.join(DEVICES)}")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class Feeder:
    """uint8 images -> normalised 3-channel float batches on the device.

    ``feed(images)`` converts a host batch. ``feed.take(idx)`` gathers a batch of ``images`` given at
    construction: on a GPU the whole uint8 set is copied there once, from pinned memory, when it fits
    (a 256 px image is 64 KiB), so a batch is a gather on the device; otherwise the batch is gathered on
    the host, pinned and copied without blocking. Normalisation and augmentation run on the device.
    """

    def __init__(self, device: torch.device, images: np.ndarray | None = None):
        self.device = device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.pin = device.type == "cuda"
        self.images = images
        self.resident: torch.Tensor | None = None
        if images is not None and self.pin and images.nbytes <= _resident_budget(device):
            host = torch.from_numpy(np.ascontiguousarray(images)).pin_memory()
            self.resident = host.to(device, non_blocking=True)

    def __call__(self, images: np.ndarray, augment=None, gen: torch.Generator | None = None) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images))
        if self.pin:
            x = x.pin_memory()
        return self._prepare(x.to(self.device, non_blocking=True), augment, gen)

    def take(self, idx: np.ndarray, augment=None, gen: torch.Generator | None = None) -> torch.Tensor:
        if self.resident is not None:
            return self._prepare(self.resident[torch.from_numpy(idx).to(self.device, non_blocking=True)], augment, gen)
        return self(self.images[idx], augment, gen)

    def _prepare(self, x: torch.Tensor, augment, gen) -> torch.Tensor:
        x = x.unsqueeze(1).float().div_(255.0)
        if augment is not None:
            x = augment(x, gen)
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x


def _resident_budget(device: torch.device) -> int:
    """Bytes of uint8 images a site may keep on the GPU: a quarter of its free memory, at most 4 GiB."""
    free, _ = torch.cuda.mem_get_info(device)
    return min(free // 4, 4 << 30)


def _batches(n: int, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    chunks = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:  # BatchNorm cannot train on a single sample
        last = chunks.pop()
        chunks[-1] = np.concatenate([chunks[-1], last])
    return chunks


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on a GPU; full precision on the CPU (and wherever ``enabled`` is false)."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def balanced_class_weights(data: TaskData) -> dict[str, torch.Tensor]:
    """Per task, scikit-learn's 'balanced' weights (n / (k x count)) of the classes present; absent
    classes weigh 1."""
    # deferred: scikit-learn (slow to import; only class-weight balanced needs it)
    from sklearn.utils.class_weight import compute_class_weight

    out = {}
    for task, y in ((PROGNOSIS, data.y_prog), (SEVERITY, data.y_sev)):
        y = y[y >= 0]
        w = np.ones(NUM_CLASSES[task], dtype=np.float32)
        if len(y):
            present = np.unique(y)
            w[present] = compute_class_weight("balanced", classes=present, y=y)
        out[task] = torch.from_numpy(w)
    return out


@torch.no_grad()
def adapt_bn(
    model: torch.nn.Module, data: TaskData, *, batch_size: int = 64, device: torch.device | str = "cpu"
) -> None:
    """Re-estimate BatchNorm statistics on ``data`` (no labels used): how a site without FedBN statistics
    of its own (a held-out centre) evaluates a FedBN model."""
    device = torch.device(device) if isinstance(device, str) else device
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or len(data) == 0:
        return
    model.to(device)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    feed = Feeder(device, data.images)
    for idx in _batches(len(data), batch_size, None):
        with autocast(device):
            model(feed.take(idx))
    model.eval()
    for m, momentum in zip(bns, momenta):  # the model may train again later in this process
        m.momentum = momentum


def trainable_parameters(model: torch.nn.Module, tasks: Iterable[str]) -> list[torch.nn.Parameter]:
    """The backbone's parameters and those of the heads of ``tasks`` (the tasks with labels at a site):
    weight decay would otherwise move a head that receives no gradient."""
    tasks = set(tasks)
    return [p for name, p in model.named_parameters() if not name.startswith("heads.") or name.split(".")[1] in tasks]


def _epoch_batches(n: int, batch_size: int, rng: np.random.Generator, private) -> Iterator[np.ndarray]:
    """One epoch's batches of row indices: shuffled chunks, or under DP-SGD Opacus' Poisson batches
    (of varying size, possibly empty)."""
    if private is None:
        yield from _batches(n, batch_size, rng)
    else:
        for (idx,) in private.loader:
            yield idx.numpy()


def _schedule(
    n: int, batch_size: int, rng: np.random.Generator, private, epochs: int, steps: int
) -> Iterator[np.ndarray]:
    """The batches of one round: ``epochs`` epochs, or exactly ``steps`` steps when ``steps`` > 0."""
    done = epoch = 0
    while True:
        for idx in _epoch_batches(n, batch_size, rng, private):
            yield idx
            done += 1
            if steps > 0 and done >= steps:
                return
        epoch += 1
        if steps <= 0 and epoch >= epochs:
            return


def train_local(
    model: torch.nn.Module,
    data: TaskData,
    *,
    epochs: int = 1,
    steps: int = 0,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    loss_norm: str = "task",
    device: torch.device | str = "cpu",
    seed: int = 0,
    augment=None,
    class_weight: str = "none",
    prox_mu: float = 0.0,
    compile_model: bool = False,
    forward=None,
    dp: DPRound | None = None,
) -> TrainResult:
    """Train in place with Adam on the samples that carry a used label; ``steps`` > 0 overrides epochs.

    ``augment``: a batch transform (mdmt.ml.augment) applied on the device; ``class_weight``: none or
    balanced; ``prox_mu`` > 0 adds FedProx's (mu/2)||w - w_global||^2 with w_global the weights received;
    ``compile_model``: run the forward pass through ``torch.compile`` (pays off when a round has many steps:
    each new process compiles once); ``forward``: an already compiled forward of ``model`` to use instead.
    Losses stay on the device until the round ends (no per-step sync).

    ``dp``: DP-SGD (mdmt.ml.privacy). Opacus wraps the model and the optimiser: Poisson batches, per-sample
    clipping, Gaussian noise, the batch-normalised loss its clipping bound assumes, full precision. The
    site's accountant history is continued and saved; a round that would take epsilon past the budget is
    refused before any step. ``model`` must be built for DP (no BatchNorm).
    """
    device = torch.device(device) if isinstance(device, str) else device
    if class_weight not in CLASS_WEIGHTS:
        raise ConfigError(f"class-weight '{class_weight}' is not one of {', '.join(CLASS_WEIGHTS)}")
    t0 = time.perf_counter()
    data = data.labelled()
    n = len(data)
    model.to(device).train()
    if device.type == "cuda" and dp is None:
        model.to(memory_format=torch.channels_last)
    if n == 0:
        return TrainResult.untrained()
    present = {t for t, c in data.counts().items() if c > 0}
    params = trainable_parameters(model, present)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    private = dp.wrap(model, opt, n_samples=n, batch_size=batch_size, seed=seed) if dp is not None else None
    if private is not None:
        opt = private.optimizer  # clips per sample and adds the noise before Adam's step
        if private.would_exceed(steps if steps > 0 else epochs * len(private.loader)):
            return TrainResult.untrained(epsilon=dp.refuse(private), refused=True)
    anchor = [p.detach().clone() for p in params] if prox_mu > 0 else None
    weights = {k: v.to(device) for k, v in balanced_class_weights(data).items()} if class_weight == "balanced" else None
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(
        seed if private is None else derive_seed(seed, "dp", "augment")
    )
    feed = Feeder(device, data.images)
    if private is not None:
        forward = private.model
    elif forward is None:
        forward = torch.compile(model) if compile_model else model
    norm = "batch" if private is not None else loss_norm  # Opacus' per-sample clipping assumes a batch mean
    y_prog = torch.from_numpy(data.y_prog).to(device)
    y_sev = torch.from_numpy(data.y_sev).to(device)
    done = stepped = 0
    sums = torch.zeros(3, device=device)  # total, prognosis and severity loss, summed over steps
    with warnings.catch_warnings():
        # DP-SGD: the first layer's input never requires a gradient; Opacus only needs the output gradient there.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        for idx in _schedule(n, batch_size, rng, private, epochs, steps):
            done += 1
            if len(idx) == 0:  # an empty Poisson batch: a noise-only step, which the accountant counts
                private.noise_step()
                continue
            x = feed.take(idx, augment, gen)
            tidx = torch.from_numpy(idx).to(device)
            with autocast(device, enabled=private is None):
                lp, ls = forward(x)
            loss = mdmt_loss(lp, ls, y_prog[tidx], y_sev[tidx], norm=norm, class_weights=weights)
            objective = loss.total
            if anchor is not None:
                objective = objective + 0.5 * prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()
            stepped += 1
            sums += torch.stack([loss.total.detach(), loss.prognosis.detach(), loss.severity.detach()]).float()
    total, prog, sev = (sums / max(stepped, 1)).tolist()
    epsilon = dp.finish(private) if private is not None else float("nan")
    return TrainResult(
        n_examples=n,
        n_task=data.counts(),
        loss=total,
        loss_task={PROGNOSIS: prog, SEVERITY: sev},
        steps=done,
        seconds=time.perf_counter() - t0,
        epsilon=epsilon,
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: TaskData, *, batch_size: int = 64, device: torch.device | str = "cpu"
) -> EvalResult:
    device = torch.device(device) if isinstance(device, str) else device
    model.to(device).eval()
    feed = Feeder(device, data.images)
    p_severe, sev_prob = [], []
    for idx in _batches(len(data), batch_size, None):
        with autocast(device):
            lp, ls = model(feed.take(idx))
        p_severe.append(torch.softmax(lp.float(), 1)[:, 1].cpu())
        sev_prob.append(torch.softmax(ls.float(), 1).cpu())
    ps = torch.cat(p_severe).numpy() if p_severe else np.zeros(0)
    sp = torch.cat(sev_prob).numpy() if sev_prob else np.zeros((0, NUM_CLASSES[SEVERITY]))
    eps = 1e-7
    mp, ms = data.y_prog >= 0, data.y_sev >= 0
    yp, ys = data.y_prog[mp], data.y_sev[ms]
    prog_pred = (ps >= 0.5).astype(int)
    sev_pred = sp.argmax(1) if len(sp) else np.zeros(0, dtype=int)
    loss_p = float(-np.log(np.clip(np.where(yp == 1, ps[mp], 1 - ps[mp]), eps, 1)).sum())
    loss_s = float(-np.log(np.clip(sp[ms, ys] if len(ys) else np.zeros(0), eps, 1)).sum())
    hist = score_histogram(yp, ps[mp])
    prog_cm = np.zeros((2, 2), dtype=np.int64)
    np.add.at(prog_cm, (yp, prog_pred[mp]), 1)
    sev_cm = np.zeros((4, 4), dtype=np.int64)
    np.add.at(sev_cm, (ys, sev_pred[ms]), 1)
    preds = pd.DataFrame(
        {
            "image": data.ids if data.ids else np.arange(len(data)),
            "y_prog": data.y_prog,
            "p_severe": ps,
            "y_sev": data.y_sev,
            "sev_pred": sev_pred,
        }
    )
    return EvalResult(
        n={PROGNOSIS: int(mp.sum()), SEVERITY: int(ms.sum())},
        loss_sum={PROGNOSIS: loss_p, SEVERITY: loss_s},
        prog_cm=prog_cm,
        prog_hist=hist,
        sev_cm=sev_cm,
        predictions=preds,
        prog_auc=exact_auc(yp, ps[mp]),
    )
