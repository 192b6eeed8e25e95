"""``mdmt bench``'s train section (local training img/s against a raw train step) and bytes section (a
site's update size per round, per encoding)."""

from __future__ import annotations

import os
import time

import numpy as np

from mdmt.ops.bench.common import Bench, device_name


def _sync(device) -> None:
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_data(n: int, size: int, seed: int = 0):
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.taskdata import TaskData

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    y_prog = rng.integers(0, 2, n)
    y_sev = np.where(rng.random(n) < 0.5, rng.integers(0, 4, n), -1)
    y_prog = np.where(y_sev >= 0, -1, y_prog)  # like the federation: one task per image
    return TaskData(images, y_prog.astype(np.int64), y_sev.astype(np.int64), [])


def raw_step_rate(backbone: str, size: int, batch: int, steps: int, device, compile_model: bool) -> float:
    """img/s of forward + masked two-task loss + backward + Adam on a batch already on the device, with the
    dtype and memory format local training uses there."""
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    import torch

    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.loss import mdmt_loss

    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.model import build_model

    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.train import autocast

    model = build_model(backbone, seed=0).to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile_model else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-5)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device, generator=gen)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y_prog = torch.randint(0, 2, (batch,), device=device, generator=gen)
    y_sev = torch.where(
        torch.rand(batch, device=device, generator=gen) < 0.5,
        torch.randint(0, 4, (batch,), device=device, generator=gen),
        -1,
    )
    y_prog = torch.where(y_sev >= 0, -1, y_prog)

    def step() -> None:
        with autocast(device):
            lp, ls = forward(x)
        loss = mdmt_loss(lp, ls, y_prog, y_sev).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def _one_thread_rate(backbone: str, size: int, batch: int, steps: int) -> float:
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    import torch

    torch.set_num_threads(1)
    return raw_step_rate(backbone, size, batch, steps, torch.device("cpu"), False)


def side_by_side_rate(backbone: str, size: int, batch: int, steps: int, processes: int) -> list[float]:
    """img/s of each of ``processes`` single-thread processes running the raw step at once: what a CPU
    simulation gets from its workers (one thread each, one per core) at the arithmetic's limit."""
    # deferred: multiprocessing only here
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as pool:
        jobs = [pool.submit(_one_thread_rate, backbone, size, batch, steps) for _ in range(processes)]
        return [j.result() for j in jobs]


def local_train_rate(
    backbone: str, size: int, batch: int, steps: int, device, compile_model: bool, augment: str
) -> float:
    """img/s of the project's local training call (``train_local``), timed whole: cache upload, feeding,
    on-device augmentation, optimiser, the end-of-round loss read-out."""
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.augment import get_augment

    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.model import build_model

    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.train import train_local

    data = _random_data(batch * min(steps, 16), size)
    model = build_model(backbone, seed=0)
    kw = dict(batch_size=batch, device=device, augment=get_augment(augment), compile_model=compile_model)
    train_local(model, data, steps=3, **kw)  # warm-up: kernels, allocator, compilation
    _sync(device)
    res = train_local(model, data, steps=steps, **kw)
    return steps * batch / res.seconds


def section_train(b: Bench, device) -> None:
    s = b.settings
    dev = device_name(device)
    compiles = (
        [False, True]
        if (s.compile == "auto" and device.type == "cuda")
        else [s.compile == "on"]
        if s.compile != "auto"
        else [False]
    )
    dtype = "bf16 autocast, channels_last" if device.type == "cuda" else "fp32"
    for comp in compiles:
        cfg = (
            f"{s.backbone} {s.image_size} px, batch {s.batch_size}, {s.steps} steps, {dtype}, "
            f"{'torch.compile' if comp else 'eager'}"
        )
        raw = raw_step_rate(s.backbone, s.image_size, s.batch_size, s.steps, device, comp)
        b.add("train", "raw step (batch on the device)", raw, "img/s", dev, cfg)
        for aug in ("paper", "none"):
            local = local_train_rate(s.backbone, s.image_size, s.batch_size, s.steps, device, comp, aug)
            b.add("train", f"local training, augment {aug}", local, "img/s", dev, cfg)
            b.add("train", f"local / raw, augment {aug}", local / raw, "x", dev, cfg)
    if device.type == "cpu":
        procs = os.cpu_count() or 1
        rates = side_by_side_rate(s.backbone, s.image_size, s.batch_size, s.steps, procs)
        cfg = f"{s.backbone} {s.image_size} px, batch {s.batch_size}, {s.steps} steps, fp32, eager"
        b.add(
            "train",
            f"raw step, {procs} 1-thread processes at once",
            sum(rates),
            "img/s",
            dev,
            cfg,
            note="sum; each " + ", ".join(f"{r:.0f}" for r in rates),
        )


# ---- bytes -------------------------------------------------------------------------------------


def update_bytes(backbone: str) -> dict[str, int]:
    """Bytes a site sends per round for this backbone's update, per encoding."""
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.fed.compress import encode_update, payload_bytes

    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.model import build_model

    model = build_model(backbone, seed=0)
    base = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    local = {k: v + rng.normal(0, 1e-3, v.shape).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in base.items()}
    return {mode: payload_bytes(encode_update(local, base, mode)) for mode in ("none", "fp16", "int8")}


def section_bytes(b: Bench) -> None:
    s = b.settings
    sizes = update_bytes(s.backbone)
    for mode, label in (("none", "fp32 weights"), ("fp16", "fp16 update"), ("int8", "8-bit update")):
        b.add(
            "bytes",
            f"per site per round, {label}",
            sizes[mode] / 2**20,
            "MiB",
            "-",
            f"{s.backbone} arrays, before message framing",
            note=f"{sizes[mode] / sizes['none']:.3f} of fp32",
        )
