"""The package as users get it: one import package (mdmt), a wheel that works outside the checkout, and
the Flower app that every `flwr run` of the project submits."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from mdmt.fed.config import RunConfig
from mdmt.ops.flwr_app import COMPONENTS, app_manifest, flwr_app_dir

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_in_the_wheel():
    """pyproject lists the packages by hand (the folders map into mdmt): the list must match the tree."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert listed == found


def test_only_mdmt_is_importable_outside_the_checkout(tmp_path):
    code = (
        "import importlib, mdmt, mdmt.server.app, mdmt.client.app\n"
        "for name in ('shared', 'server', 'client'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        print('importable', name)\n"
        "    except ImportError:\n"
        "        pass\n"
        "print('mdmt', mdmt.__version__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"mdmt {PYPROJECT['project']['version']}"]


def test_the_app_names_the_installed_components_and_the_schema_defaults(tmp_path):
    app = flwr_app_dir(tmp_path)
    text = (app / "pyproject.toml").read_text()
    written = tomllib.loads(text)
    assert written == app_manifest()
    assert written["tool"]["flwr"]["app"]["components"] == COMPONENTS == PYPROJECT["tool"]["flwr"]["app"]["components"]
    assert written["tool"]["flwr"]["app"]["config"] == RunConfig().to_mapping()
    assert sorted(p.name for p in app.iterdir()) == ["pyproject.toml"]  # no source, no tests, no docs
    mtime = (app / "pyproject.toml").stat().st_mtime_ns
    assert flwr_app_dir(tmp_path) == app and (app / "pyproject.toml").stat().st_mtime_ns == mtime  # unchanged

    # Flower accepts it as an app: its own validation, with the components looked up as modules.
    from flwr.cli.config_utils import load_and_validate

    config, errors = load_and_validate(app / "pyproject.toml", check_module=True)
    assert config is not None and not errors


def test_the_checkout_bundle_carries_no_source_tests_or_docs():
    """`flwr run .` from the checkout ships pyproject.toml and the licence only: the code that runs is the
    installed mdmt on every machine."""
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(ROOT)
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    assert names == {"pyproject.toml", "LICENSE", ".info/CONTENT"}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_the_wheel_runs_synth_and_loco_from_an_unrelated_directory(tmp_path):
    """Build the wheel, install it into a fresh venv (its dependencies come from this environment through
    a path entry, not a reinstall), then run `mdmt synth` and a one-round `mdmt loco` from a folder that is
    neither the checkout nor under it."""
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, ROOT],
        tmp_path,
        env,
        600,
    )
    wheel = next(dist.glob("mdmt_federation-*.whl"))
    _run([sys.executable, "-m", "venv", venv], tmp_path, env, 300)
    py = venv / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp_path, env, 300)
    # The dependencies: this environment's site-packages as a path entry. Its .pth files (the editable
    # install of the checkout among them) are not processed there, so only the wheel provides mdmt.
    purelib = Path(
        subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True).strip()
    )
    (purelib / "deps-from-test.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # Flower's executables for the new interpreter (pip writes the same wrappers when it installs flwr).
    for script in Path(sys.executable).parent.iterdir():
        if script.name.startswith(("flwr", "flower-")) and not (venv / "bin" / script.name).exists():
            lines = script.read_text().splitlines(keepends=True)
            (venv / "bin" / script.name).write_text(f"#!{py}\n" + "".join(lines[1:]))
            (venv / "bin" / script.name).chmod(0o755)
    work.mkdir()
    where = _run([py, "-c", "import mdmt; print(mdmt.__file__)"], work, env, 120)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    mdmt = str(venv / "bin" / "mdmt")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    _run([mdmt, "synth", "fed", "--scale", "0.03", "--image-size", "64", "--quiet"], work, env, 600)
    r = _run(
        [
            mdmt,
            "loco",
            "--fed",
            "fed",
            "--workspace",
            "ws",
            "--method",
            "mdmt",
            "--holdouts",
            "A",
            "--rounds",
            "1",
            "--image-size",
            "32",
            "--set",
            "sites=A,B,BRIXIA",
        ],
        work,
        env,
        900,
    )
    assert "| mdmt | resnet18 | A |" in r.stdout, r.stdout[-2000:]
    assert (work / "ws" / "reports" / "loco.md").is_file()
    app = tomllib.loads((work / "ws" / "flwr" / "app" / "pyproject.toml").read_text())
    assert app["tool"]["flwr"]["app"]["components"] == COMPONENTS
