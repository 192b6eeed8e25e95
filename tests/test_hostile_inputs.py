"""Odd and hostile inputs at a site: every valid DICOM is read (a TIFF-compatible preamble included), a
decompression bomb is refused from its header with bounded memory, manifest paths stay inside the site
folder, and bad config values and spaced CSV headers are handled, each with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicom_helpers import write_deflate_bomb, write_dicom, write_dual_personality

from mdmt.data.dicom import read_image
from mdmt.data.manifest import MANIFEST, outside_site, read_manifest, read_rejected
from mdmt.errors import ConfigError, DicomRejected
from mdmt.fed.config import RunConfig

PEAK_LIMIT_MB = 1536


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4096, (96, 80), dtype=np.uint16)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """20000 x 20000 16-bit pixels declared, about 0.8 MB on disk (800 MB once inflated)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.dcm"
    write_deflate_bomb(path)
    assert path.stat().st_size < 1_000_000
    return path


def test_a_tiff_preambled_dicom_is_read_as_dicom(tmp_path):
    path = write_dual_personality(tmp_path / "dual.dcm", _image())
    assert path.read_bytes()[:4] == b"II*\x00" and path.read_bytes()[128:132] == b"DICM"
    img, meta = read_image(path)
    assert img.shape == (96, 80) and meta["transfer_syntax"] == "Explicit VR Little Endian"
    plain, _ = read_image(write_dicom(tmp_path / "plain.dcm", _image()))
    assert np.array_equal(img, plain)


def test_a_bomb_is_refused_from_its_header(bomb, monkeypatch):
    with pytest.raises(DicomRejected, match=r"400\.0 megapixels, more than the cap of 100") as err:
        read_image(bomb)
    assert "\n" not in str(err.value) and "MDMT_MAX_MEGAPIXELS" in str(err.value)
    monkeypatch.setenv("MDMT_MAX_MEGAPIXELS", "0.001")  # the cap is configurable: 1000 pixels
    with pytest.raises(DicomRejected, match="more than the cap of 0.001"):
        read_image(write_dicom(Path(bomb).parent / "small.dcm", _image()))
    monkeypatch.setenv("MDMT_MAX_MEGAPIXELS", "lots")
    with pytest.raises(DicomRejected, match="MDMT_MAX_MEGAPIXELS='lots' is not a positive number"):
        read_image(bomb)


def test_an_oversized_png_is_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    Image.fromarray(np.zeros((200, 300), dtype=np.uint8)).save(tmp_path / "x.png")
    monkeypatch.setenv("MDMT_MAX_MEGAPIXELS", "0.05")
    with pytest.raises(DicomRejected, match=r"0\.1 megapixels, more than the cap of 0\.05"):
        read_image(tmp_path / "x.png")


@pytest.mark.parametrize(
    "image, leaves",
    [
        ("a.dcm", False),
        ("sub/../a.dcm", False),
        ("./sub/b.dcm", False),
        ("../other_study/x.dcm", True),
        ("sub/../../x.dcm", True),
        ("/etc/passwd", True),
        ("C:/data/x.dcm", True),
        ("..\\x.dcm", True),
    ],
)
def test_manifest_paths_are_judged_by_their_text(image, leaves):
    assert bool(outside_site(image)) is leaves


def test_a_spaced_header_is_read(tmp_path):
    site = tmp_path / "S"
    site.mkdir()
    (site / MANIFEST).write_text(" image ,patient_id,prognosis ,brixia,split \na.dcm,p1,MILD,,val\n")
    df = read_manifest(site)
    assert df.loc[0, "split"] == "val" and df.loc[0, "image"] == "a.dcm" and df.loc[0, "prognosis"] == "MILD"


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"lr": "nan"}, "'lr' must be a finite number, got 'nan'"),
        ({"weight-decay": float("inf")}, "'weight-decay' must be a finite number"),
        ({"round-timeout": -5}, "'round-timeout' must be > 0, got -5.0"),
        ({"local-steps": -1}, "'local-steps' must be >= 0, got -1"),
        ({"local-epochs": -2}, "'local-epochs' must be >= 0, got -2"),
        ({"min-sites": 0}, "'min-sites' must be >= 1, got 0"),
        ({"dp-delta": 1.5}, "'dp-delta' must be below 1"),
        ({"num-workers": -1}, "'num-workers' must be >= 0"),
    ],
)
def test_bad_config_numbers_are_one_line_errors(values, fragment):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_ingest_of_a_hostile_site_keeps_the_good_image_and_lists_the_rest(bomb, tmp_path):
    """A bomb, a '../' row, an absolute row, a TIFF-preambled DICOM and a plain one: `mdmt ingest` exits 0,
    caches the two valid images, and rejected.csv names the other three with their reasons. The ingest's
    processes stay under 1.5 GB."""
    outside = tmp_path / "other_study"
    outside.mkdir()
    write_dicom(outside / "x.dcm", _image(1))  # readable, but not this site's
    site = tmp_path / "fed" / "A"
    site.mkdir(parents=True)
    write_dicom(site / "good.dcm", _image(2))
    write_dual_personality(site / "dual.dcm", _image(3))
    (site / "bomb.dcm").symlink_to(bomb)  # a link inside the site folder, as the importers make
    rows = [
        ("good.dcm", "p1", "MILD"),
        ("dual.dcm", "p2", "SEVERE"),
        ("bomb.dcm", "p3", "MILD"),
        ("../../other_study/x.dcm", "p4", "SEVERE"),
        (str(outside / "x.dcm"), "p5", "MILD"),
    ]
    pd.DataFrame([{"image": i, "patient_id": p, "prognosis": g, "brixia": ""} for i, p, g in rows]).to_csv(
        site / MANIFEST, index=False
    )
    # A fresh interpreter runs the ingest, so its peak covers the ingest's processes and nothing else.
    probe = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:])\n"
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(r.returncode)\n"
    )
    mdmt = str(Path(sys.executable).parent / "mdmt")
    cmd = [sys.executable, "-c", probe, mdmt, "ingest", str(site), "--image-size", "32", "--workspace", str(tmp_path)]
    r = subprocess.run([*cmd, "--workers", "1", "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    peak_mb = int(r.stdout.split("PEAK_KB")[1].split()[0]) / 1024
    print(f"mdmt ingest of the hostile site: peak {peak_mb:.0f} MB")
    assert peak_mb < PEAK_LIMIT_MB
    rejected = read_rejected(site).set_index("source")["reason"].to_dict()
    assert set(rejected) == {"bomb.dcm", "../../other_study/x.dcm", str(outside / "x.dcm")}
    assert "megapixels, more than the cap" in rejected["bomb.dcm"]
    assert "leaves the site folder" in rejected["../../other_study/x.dcm"]
    assert "is absolute" in rejected[str(outside / "x.dcm")]
    meta = json.loads(next((tmp_path / "cache").glob("A-*/s32-lung-v*/meta.json")).read_text())
    assert meta["counts"]["cached"] == 2 and meta["counts"]["rejected"] == 3, meta
