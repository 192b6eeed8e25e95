"""``mdmt bench``: every figure is measured (real training calls, real Flower simulations, real DICOM
decoding) and has the form its definition gives."""

from __future__ import annotations

import json
import math
import os

import pytest

from mdmt.ops.bench import SECTIONS, Settings, run_bench


@pytest.mark.slow
def test_bench_measures_every_section(tmp_path, small_federation):
    lines = []
    s = Settings.for_mode(
        True,
        fed_dir=small_federation,
        workspace=tmp_path / "bench",
        steps=2,
        batch_size=8,
        image_size=32,
        scaling_sites=(2, 3),
        device="cpu",
    )
    b = run_bench(s, SECTIONS, command="mdmt bench --quick (test)", echo=lines.append)
    fig = {(f.section, f.name): f for f in b.figures}
    for f in b.figures:
        assert f.value is not None and math.isfinite(f.value), f
        # an overhead is wall time less training, and in lockstep a site's units train side by side
        assert f.value > 0 or "overhead" in f.name or ("resubmitted" in f.name and f.value >= 0), f
    # train: the local call and the raw step of the same configuration
    for aug in ("paper", "none"):
        local, raw = fig[("train", f"local training, augment {aug}")], fig[("train", "raw step (batch on the device)")]
        assert fig[("train", f"local / raw, augment {aug}")].value == pytest.approx(local.value / raw.value)
        assert local.settings == raw.settings and "resnet18 32 px, batch 8" in raw.settings
    # on a CPU, one single-thread raw step per core at once: the sum of the rates shown in the note
    (side,) = [f for f in b.figures if f.name.endswith("1-thread processes at once")]
    each = [float(r) for r in side.note.removeprefix("sum; each ").split(", ")]
    assert len(each) == os.cpu_count() and side.value == pytest.approx(sum(each), abs=len(each))
    # bytes: fp16 halves the float arrays, 8-bit quarters them (integer buffers are a few bytes)
    fp32, fp16, int8 = (
        fig[("bytes", f"per site per round, {m}")].value for m in ("fp32 weights", "fp16 update", "8-bit update")
    )
    assert fp16 / fp32 == pytest.approx(0.5, abs=1e-3) and int8 / fp32 == pytest.approx(0.25, abs=1e-3)
    # round: a 7-site simulation; what Flower carried matches the fp16 payload
    assert "7-site simulation of federation" in fig[("round", "round overhead ratio")].settings
    assert 0 < fig[("round", "round overhead ratio")].value < 1
    assert fig[("round", "slowest site's training")].value < fig[("round", "round wall time")].value
    assert fig[("round", "bytes up per site per round (fp16)")].value == pytest.approx(fp16, rel=0.02)
    # ingest: both paths decoded the same files, on 1 core and on all
    for label in ("1 core",):
        assert fig[("ingest", f"mdmt ingest / bare decode, {label}")].value == pytest.approx(
            fig[("ingest", f"mdmt ingest, {label}")].value / fig[("ingest", f"bare pydicom decode, {label}")].value
        )
    # warm: the same units cold, warm and in lockstep; each overhead per unit-round is measured
    assert "2 LOCO units of mdmt" in fig[("warm", "cold: overhead per unit-round")].settings
    for mode in ("cold", "warm", "warm + lockstep", "warm + lockstep, 1 local step"):
        wall = fig[("warm", f"{mode}: wall per unit-round")].value
        assert fig[("warm", f"{mode}: overhead per unit-round")].value < wall
        assert 0 < fig[("warm", f"{mode}: training summed over sites per unit-round")].value
    one_step = fig[("warm", "warm + lockstep, 1 local step: training summed over sites per unit-round")].value
    assert one_step < fig[("warm", "warm + lockstep: training summed over sites per unit-round")].value
    ratio = fig[("warm", "warm + lockstep overhead / cold overhead")].value
    assert ratio == pytest.approx(
        fig[("warm", "warm + lockstep: overhead per unit-round")].value
        / fig[("warm", "cold: overhead per unit-round")].value
    )
    # scaling: round time and memory per site count
    for n in (2, 3):
        assert fig[("scaling", f"{n} sites: peak memory (PSS, all processes)")].value > 100  # MiB: Python + torch
        assert fig[("scaling", f"{n} sites: round wall time")].value > 0
    # deploy: a TLS deployment on loopback, six units in lockstep, packed arrays (quick: no per-tensor job)
    dep = {name.removeprefix("packed: "): f for (sec, name), f in fig.items() if sec == "deploy"}
    assert not any(name.startswith("one Array per tensor") for (sec, name) in fig if sec == "deploy")
    assert "TLS SuperLink + 3 SuperNodes (A, B, BRIXIA)" in dep["overhead per unit-round, rounds 2 on"].settings
    wall = dep["wall per unit-round, rounds 2 on"].value
    assert 0 < dep["slowest site's training per unit-round"].value < wall
    assert dep["overhead per unit-round, rounds 2 on"].value < wall
    parts = {n.removeprefix("per trip: "): f.value for n, f in dep.items() if n.startswith("per trip: ")}
    assert (
        len(parts) == 9
        and parts["site: train"] > 0
        and parts["process start: Python, Flower, the app, the message pulled"] > 0
    )
    assert all(v >= 0 for v in parts.values()), parts
    # the site that trains all six units gets every model in one message: the three backbones, twice
    from mdmt.fed.packing import pack_arrays
    from mdmt.ml.model import build_model
    from mdmt.ops.bench.deploy import BACKBONES

    models = sum(pack_arrays({k: v.numpy() for k, v in build_model(b).state_dict().items()}).nbytes for b in BACKBONES)
    message = dep["message to the site training 6 units"].value
    assert message == pytest.approx(2 * models / 2**20, rel=0.01)
    # the coordinator's state is bounded by what is in flight: a round's models and updates, and the WAL
    peak = dep["coordinator state, peak from round 2"].value
    assert 0 < peak < 4 * message + 64, (peak, message)
    halves = [f.value for n, f in dep.items() if n.startswith("coordinator state, peak in") and "trips" in n]
    assert len(halves) == 2 and max(halves) == peak, halves
    assert dep["coordinator state at the end"].value <= max(peak, dep["coordinator state, peak in round 1"].value)
    saved = json.loads(next((tmp_path / "bench").glob("bench-*.json")).read_text())
    assert len(saved["figures"]) == len(b.figures) and saved["command"] == "mdmt bench --quick (test)"
    assert any(line.startswith("bench wall time") for line in lines)


def test_bench_rejects_an_unknown_section(capsys):
    from mdmt.ops.cli import main

    assert main(["bench", "--sections", "train,warp"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown 'warp'" in err and len(err.splitlines()) == 1
