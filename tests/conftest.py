"""Expensive fixtures, built once per test session: a small synthetic federation and one short real
Flower simulation over it (their outputs are read by several test modules)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing a test starts may touch the user's ~/.flwr, uv cache or telemetry.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# `make test TEST_WORKERS=N` spreads the files over N pytest-xdist workers. A file is one unit of work, so
# its module fixtures are built once; the modules reading `sim_run` are one unit together, so that run
# happens once. The files that take longest (measured in one process on 2 cores) are handed out first,
# and the deployment's long test runs first within its file. In one process the order is pytest's own.
SHARED_RUN = {"test_dashboard.py", "test_replies.py", "test_simulation.py"}
LONGEST_FIRST = (
    "test_deploy.py",
    "test_bench.py",
    "test_hostile_replies.py",
    "test_control_plane.py",
    "test_experiment.py",
    "test_entry_points.py",
    "test_leakage.py",
    "test_dashboard.py",
    "test_dp_training.py",
    "test_secure_run.py",
    "test_privacy.py",
    "test_layout.py",
    "test_ray_cluster.py",
    "test_cli_end_to_end.py",
)


def _unit(file_name: str) -> str:
    return "test_dashboard.py" if file_name in SHARED_RUN else file_name


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(
        key=lambda it: (
            rank.get(_unit(it.path.name), len(rank)),
            _unit(it.path.name),
            it.get_closest_marker("slow") is None,
        )
    )


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # plain pytest: one process, the same order
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:

    class _ByFile(LoadScopeScheduling):
        """Hands out whole units (see _unit) in collection order, longest first."""

        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid.split("::", 1)[0].rsplit("/", 1)[-1])

    def pytest_xdist_make_scheduler(config, log):
        config.option.loadscopereorder = False  # keep the longest-first order of the collection
        return _ByFile(config, log)


def pytest_terminal_summary(terminalreporter):
    """The figures tests recorded (``record_property("figures", ...)``), printed once at the end: tests
    running in pytest-xdist workers have no terminal of their own."""
    lines = [
        f"{rep.nodeid}: {value}"
        for rep in terminalreporter.stats.get("passed", [])
        for key, value in rep.user_properties
        if key == "figures"
    ]
    if lines:
        terminalreporter.write_sep("-", "figures")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def task_identity():
    """The run, node and task a Flower process would have, so that Messages can be made in a test."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(scope="session")
def small_federation(tmp_path_factory) -> Path:
    """All seven sites at a small scale, DICOMs of ~96 px."""
    from mdmt.data.synth import synthesize

    out = tmp_path_factory.mktemp("fed") / "federation"
    synthesize(out, scale=0.04, image_size=96, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def sim_run(small_federation, tmp_path_factory):
    """A real `flwr run` simulation through the LOCO driver: sites A, B, C and BRIXIA, A held out,
    every method, 2 rounds. Returns (config, table, printed lines)."""
    from mdmt.ops.loco import loco, prepare_config

    ws = tmp_path_factory.mktemp("ws")
    values = {
        "fed-dir": str(small_federation),
        "workspace": str(ws),
        "method": "mdmt,stl_prognosis,centralised_mdmt,stl_severity",
        "backbone": "resnet18",
        "num-rounds": 2,
        "image-size": 32,
        "holdouts": "A",
        "sites": "A,B,C,BRIXIA",
        "batch-size": 16,
        "seed": 0,
    }
    lines: list[str] = []
    table = loco(values, cpus_per_client=1.0, echo=lines.append)
    return prepare_config(values), table, lines
