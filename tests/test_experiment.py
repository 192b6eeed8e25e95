"""`mdmt experiment`: a grid run as real Flower simulations. Killed midway, a rerun finishes only the
missing units, the interrupted unit continues after its last complete round, every process the killed
sweep started is gone, and the final models equal those of an uninterrupted run bit for bit."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mdmt.errors import ConfigError
from mdmt.fed.plan import training_code_digest
from mdmt.ml.backbones import BACKBONES
from mdmt.ops.experiment import plan_groups, read_experiment, restore_sources, seeds_of
from mdmt.store import RunStore, UnitKey

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _write_config(path: Path, fed: Path, ws: Path) -> Path:
    path.write_text(
        f'fed-dir = "{fed}"\nworkspace = "{ws}"\nsites = "A,B,BRIXIA"\nmethod = "stl_prognosis,mdmt"\n'
        'backbone = "resnet18"\nprotocol = "loco"\nholdouts = "A,B"\nimage-size = 32\nnum-rounds = 3\n'
        "batch-size = 16\nselect-after = 0\npatience = 0\nlr-patience = 0\nseed = 0\n"
        "concurrent-units = 1\n"  # one unit after another: the kill lands between a done unit and a running one
    )
    return path


def _units(store: Path) -> dict[str, tuple[str, float, int]]:
    if not store.is_file():
        return {}
    db = sqlite3.connect(store, timeout=30)
    try:
        return {
            u: (st, started, n)
            for u, st, started, n in db.execute("SELECT unit_id, status, started, rounds_done FROM units")
        }
    except sqlite3.OperationalError:  # the store file exists but its tables are not written yet
        return {}
    finally:
        db.close()


def _marked(marker: str) -> list[int]:
    needle = f"MDMT_TEST_MARK={marker}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
                state = (entry / "stat").read_text().split(") ", 1)[1][0]
            except OSError:
                continue
            if needle in environ and state != "Z":
                out.append(int(entry.name))
    return out


def _describe(pids: list[int]) -> list[str]:
    """PID, state, parent and command line of each process, for a failure message."""
    out = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out.append(f"{pid} state {stat[0]} parent {stat[1]}: {cmd[:200]}")
    return out


def test_killed_sweep_resumes_with_only_the_missing_units(small_federation, tmp_path):
    ws = tmp_path / "ws"
    cfg = _write_config(tmp_path / "grid.toml", small_federation, ws)
    store = ws / "store.sqlite"
    marker = uuid.uuid4().hex
    env = os.environ | {"MDMT_TEST_MARK": marker, "FLWR_TELEMETRY_ENABLED": "0"}
    cmd = [sys.executable, "-m", "mdmt.ops.cli", "experiment", str(cfg)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            units = _units(store).values()
            if any(st == "done" for st, _, _ in units) and any(st == "running" and n >= 1 for st, _, n in units):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    deadline = time.monotonic() + 30
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _marked(marker)
    assert left == [], f"processes of the interrupted sweep are still running: {_describe(left)}"

    before = _units(store)
    done_before = {u: started for u, (st, started, _) in before.items() if st == "done"}
    interrupted = {u: n for u, (st, _, n) in before.items() if st == "interrupted"}
    assert "running" not in {st for st, _, _ in before.values()}  # marked on the way out
    assert 1 <= len(done_before) < 4 and len(interrupted) == 1

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"4 units in 1 group(s), {4 - len(done_before)} to run" in rerun.stdout
    after = _units(store)
    assert sorted(after) == sorted(
        [
            "stl_prognosis/resnet18/loco/A/seed0",
            "stl_prognosis/resnet18/loco/B/seed0",
            "mdmt/resnet18/loco/A/seed0",
            "mdmt/resnet18/loco/B/seed0",
        ]
    )
    assert all(st == "done" and n == 3 for st, _, n in after.values())
    # Units finished before the kill were not run again; the interrupted one went on after its last round.
    assert {u: after[u][1] for u in done_before} == done_before
    ((unit, rounds_before),) = interrupted.items()
    assert f"unit {unit}: resumed after round {rounds_before}" in rerun.stdout
    assert (ws / "reports").is_dir()
    assert _marked(marker) == []
    # Each sitting is a row beside the store: the killed one and the one that finished, same training code.
    sittings = list(csv.DictReader(open(ws / "experiments.csv")))
    assert [(r["outcome"], r["units"], r["to_run"]) for r in sittings] == [
        ("stopped", "4", "4"),
        ("finished", "4", str(4 - len(done_before))),
    ]
    assert sittings[0]["training_code"] == sittings[1]["training_code"] == training_code_digest()
    assert all(float(r["wall_s"]) > 0 for r in sittings)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert {r["commit"].removesuffix("+changes") for r in sittings} == {head.stdout.strip()}

    # The same grid without interruption gives the same final and selected models, bit for bit.
    ref_ws = tmp_path / "ref"
    ref_cfg = _write_config(tmp_path / "ref.toml", small_federation, ref_ws)
    ref = subprocess.run(
        [sys.executable, "-m", "mdmt.ops.cli", "experiment", str(ref_cfg)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stdout + ref.stderr
    import torch

    for uid in after:
        slug = uid.replace("/", "__")
        for name in ("latest.pt", "best.pt"):
            got = torch.load(ws / "checkpoints" / slug / name, weights_only=True)
            want = torch.load(ref_ws / "checkpoints" / slug / name, weights_only=True)
            assert got["round"] == want["round"], (uid, name)
            assert all(torch.equal(got["state_dict"][k], want["state_dict"][k]) for k in want["state_dict"]), (
                uid,
                name,
            )


def test_groups_split_by_backbone_and_protocol_with_workers(small_federation, tmp_path):
    cfg = _write_config(tmp_path / "grid.toml", small_federation, tmp_path / "ws")
    values, _ = read_experiment(cfg, {"backbone": "resnet18,mobilenet_v2", "protocol": "loco,cv"})
    groups = plan_groups(values, workers=2)
    assert [(g.protocol, g.backbone) for g in groups] == [
        ("loco", "resnet18"),
        ("loco", "mobilenet_v2"),
        ("cv", "resnet18"),
        ("cv", "mobilenet_v2"),
    ]
    assert len(plan_groups(values, workers=1)) == 2


def test_experiment_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('method = "mdmt"\n[synth]\nscales = 1\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[synth\]: scales"):
        read_experiment(bad)


def test_seeds_and_a_base_file_make_the_groups(small_federation, tmp_path):
    base = _write_config(tmp_path / "base.toml", small_federation, tmp_path / "ws")
    child = tmp_path / "sub" / "seeds.toml"
    child.parent.mkdir()
    child.write_text('extends = "../base.toml"\nmethod = "mdmt"\nseed = [0, 1, 2]\n[synth]\nscale = 0.05\n')
    values, synth = read_experiment(child)
    assert values["method"] == "mdmt" and values["image-size"] == 32 and "extends" not in values
    assert synth == {"scale": 0.05}
    assert [(g.seed, g.backbone) for g in plan_groups(values, workers=1)] == [
        (0, "resnet18"),
        (1, "resnet18"),
        (2, "resnet18"),
    ]
    values, _ = read_experiment(base, {"seed": "3,5", "backbone": "resnet18,mobilenet_v2"})
    assert [(g.seed, g.backbone) for g in plan_groups(values, workers=2)] == [
        (3, "resnet18"),
        (3, "mobilenet_v2"),
        (5, "resnet18"),
        (5, "mobilenet_v2"),
    ]
    for bad, message in (("seed = [1, 1]", "each once"), ('seed = "a,b"', "not a seed")):
        child.write_text(f'extends = "../base.toml"\n{bad}\n')
        with pytest.raises(ConfigError, match=message):
            plan_groups(read_experiment(child)[0], workers=1)
    loop = tmp_path / "loop.toml"
    loop.write_text('extends = "loop.toml"\n')
    with pytest.raises(ConfigError, match="comes back to this file"):
        read_experiment(loop)


def test_a_phase_one_unit_without_its_checkpoint_runs_again_for_ft(small_federation, tmp_path):
    cfg_file = _write_config(tmp_path / "ft.toml", small_federation, tmp_path / "ws")
    values, _ = read_experiment(cfg_file, {"method": "ft", "holdouts": "A"})
    (cfg,) = plan_groups(values, workers=1)
    store = RunStore(cfg.store_path)
    phase1, ft = UnitKey("stl_severity", "resnet18", "loco", "-", 0), UnitKey("ft", "resnet18", "loco", "A", 0)
    for key in (phase1, ft):
        store.start_unit(key, "BRIXIA", {}, {}, {}, "", "fp", {})
    store.finish_unit(phase1, "done", 2)
    lines = []
    assert restore_sources(cfg, store, lines.append) == [phase1.unit_id]  # no checkpoint in the workspace
    assert store.unit_status(phase1) is None and "runs again for ft/resnet18/loco/A/seed0" in lines[0]
    store.start_unit(phase1, "BRIXIA", {}, {}, {}, "", "fp", {})
    store.finish_unit(phase1, "done", 2)
    ckpt = cfg.workspace_path / "checkpoints" / phase1.slug / "best.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"kept")
    assert restore_sources(cfg, store, lines.append) == []  # its checkpoint is there
    ckpt.unlink()
    store.finish_unit(ft, "done", 2)
    assert restore_sources(cfg, store, lines.append) == []  # nothing left starts from it
    assert store.unit_status(phase1) == "done"


def test_the_evidence_files_share_one_recipe_and_cover_the_questions():
    sim = ROOT / "simulations"
    base, base_synth = read_experiment(sim / "evidence.toml")
    files = {q: read_experiment(sim / f"evidence_{q}.toml") for q in ("loco", "centralised", "local", "cv")}
    asked = {"method", "backbone", "protocol", "seed"}
    for q, (values, synth) in files.items():
        assert synth == base_synth and values["store"] == base["store"], q
        assert {k: v for k, v in values.items() if k not in asked} == {k: v for k, v in base.items() if k not in asked}
        assert seeds_of(values) == ([0] if q == "cv" else [0, 1, 2]), q
    loco = files["loco"][0]["backbone"].split(",")
    assert set(loco) <= set(BACKBONES) and len(loco) >= 5
    families = {b.split("_")[0].rstrip("0123456789") for b in loco}
    assert len(families) == len(loco), families  # one backbone per family
    assert set(files["loco"][0]["method"].split(",")) == {"stl_prognosis", "ft", "mdmt"}
    for q, method in (("centralised", "centralised_mdmt"), ("local", "local")):
        values = files[q][0]
        assert values["method"] == method and len(values["backbone"].split(",")) >= 2
        assert set(values["backbone"].split(",")) <= set(loco), q  # paired with federated MDMT units
    assert files["cv"][0]["protocol"] == "cv" and files["cv"][0]["backbone"] in loco
