"""The config schema and the `mdmt` command: bad input is one line naming the key or file, never a traceback."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mdmt.errors import ConfigError
from mdmt.fed.config import RunConfig


def test_pyproject_defaults_are_exactly_the_schema():
    """The checkout's pyproject (what `flwr run .` reads) repeats the schema's defaults, exactly."""
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    defaults = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(defaults) == set(RunConfig.keys())
    cfg = RunConfig.from_mapping(defaults)
    assert cfg.to_mapping() == RunConfig().to_mapping()


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"learning-rate": 0.1}, "unknown key 'learning-rate'"),
        ({"method": "mdmt,fedsomething"}, "'method' has unknown method 'fedsomething'"),
        ({"backbone": "vgg16"}, "'backbone' has unknown backbone 'vgg16'"),
        ({"num-rounds": "three"}, "'num-rounds' must be int"),
        ({"loss-norm": "mean"}, "'loss-norm' is 'mean'; allowed: task, batch"),
        ({"image-size": 8}, "'image-size' must be at least 32"),
    ],
)
def test_bad_values_fail_with_the_key(values, fragment):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_weights_file_is_checked_on_the_server_side_only():
    cfg = RunConfig.from_mapping({"weights": "/no/such/file.pth"})  # a site does not have it, and need not
    with pytest.raises(ConfigError, match="'weights' file not found: /no/such/file.pth"):
        cfg.check_server_files()


def _mdmt(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mdmt.ops.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_missing_federation_is_one_line(tmp_path):
    r = _mdmt("loco", "--fed", str(tmp_path / "nowhere"), "--workspace", str(tmp_path / "ws"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "nowhere" in r.stderr


def test_cli_unknown_key_is_one_line(tmp_path):
    r = _mdmt("loco", "--fed", str(tmp_path), "--set", "rounds=3")
    assert r.returncode == 2 and "unknown key 'rounds'" in r.stderr and "Traceback" not in r.stderr


def test_cli_ingest_bad_manifest_names_row(tmp_path):
    site = tmp_path / "A"
    site.mkdir()
    (site / "manifest.csv").write_text("image,patient_id,prognosis,brixia\nx.dcm,P1,MODERATE,\n")
    r = _mdmt("ingest", str(site), "--workspace", str(tmp_path / "ws"), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "manifest.csv:row 2" in r.stderr and "MODERATE" in r.stderr
