"""`mdmt predict`: a real checkpoint scores real DICOMs through the training preprocessing."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mdmt.data.dicom import read_image
from mdmt.data.ingest import ingest_site
from mdmt.data.manifest import SEVERITY_CLASS_NAMES
from mdmt.data.preprocess import preprocess_with_info
from mdmt.errors import ConfigError, MDMTError
from mdmt.fed.checkpoint import save_checkpoint
from mdmt.ml.model import IMAGENET_MEAN, IMAGENET_STD, build_model
from mdmt.ops.predict import Saliency, csv_columns, predict, saliency_target_layer

SIZE = 64
CONFIG = {
    "backbone": "resnet18",
    "image-size": SIZE,
    "crop": "lung",
    "crop-source": "",
    "voi": "none",
    "method": "mdmt",
    "threshold": "val",
}
SEV_COLS = [f"p_severity_{n}" for n in SEVERITY_CLASS_NAMES]


def _model(backbone: str = "resnet18") -> torch.nn.Module:
    model = build_model(backbone, seed=0)
    with torch.no_grad():  # spread the untrained heads' outputs so that images get clearly different scores
        model.heads["prognosis"][-1].weight.mul_(20.0)
        model.heads["severity"][-1].weight.mul_(20.0)
    return model.eval()


def _save(path: Path, model: torch.nn.Module, config: dict, **extra) -> Path:
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    save_checkpoint(
        path,
        arrays,
        round=3,
        unit_id="mdmt/resnet18/loco/A/seed0",
        config=config,
        manifest_hashes={"B": "0" * 64},
        extra=extra or None,
    )
    return path


def _reference(model: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P(SEVERE) and severity probabilities of uint8 (N, S, S) images, normalised by hand."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0)[:, None].expand(-1, 3, -1, -1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        lp, ls = model.eval()(x)
    return torch.softmax(lp, 1)[:, 1].numpy(), torch.softmax(ls, 1).numpy()


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == csv_columns()
        return list(reader)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Site A of a tiny synthetic federation, its training cache, a checkpoint and an input folder holding
    the site's DICOMs (one without a suffix), a text file, a truncated DICOM and a hidden file."""
    from mdmt.data.synth import synthesize

    root = tmp_path_factory.mktemp("predict")
    synthesize(root / "fed", scale=0.02, image_size=96, seed=0, progress=False)
    site = root / "fed" / "A"
    ingest_site(site, root / "cache", image_size=SIZE, crop="lung", workers=1, progress=False)
    cdir = next((root / "cache").glob("A-*/*"))
    images = np.load(cdir / "images.npy")
    index = list(csv.DictReader(open(cdir / "index.csv", newline="")))
    cached = {Path(r["image"]).name: images[k] for k, r in enumerate(index)}
    assert len(cached) >= 5

    inputs = root / "inputs"
    scans = inputs / "scans" / "day1"
    scans.mkdir(parents=True)
    for f in sorted((site / "images").iterdir()):
        shutil.copy2(f, scans / f.name)
    first = sorted(cached)[0]
    shutil.copy2(site / "images" / first, inputs / "IMG0001")  # a DICOM without a suffix
    cached["IMG0001"] = cached[first]
    data = (site / "images" / first).read_bytes()
    (inputs / "cut.dcm").write_bytes(data[: int(len(data) * 0.6)])
    (inputs / "notes.txt").write_text("not an image\n")
    (inputs / ".DS_Store").write_bytes(b"\0\1junk")

    model = _model()
    ckpt = _save(root / "best.pt", model, CONFIG)
    return {"root": root, "inputs": inputs, "cached": cached, "model": model, "ckpt": ckpt, "n_files": len(cached) + 2}


def test_scores_equal_the_model_on_the_ingested_images(world, tmp_path):
    text = predict(
        world["ckpt"],
        [world["inputs"]],
        out_dir=tmp_path / "out",
        saliency=False,
        device="cpu",
        crop_source=None,
        workers=1,
    )
    rows = _rows(tmp_path / "out" / "predictions.csv")
    assert len(rows) == world["n_files"]  # every file but the hidden one, folders walked recursively
    ok = [r for r in rows if r["status"] == "ok"]
    assert sorted(Path(r["file"]).name for r in ok) == sorted(world["cached"])

    names = [Path(r["file"]).name for r in ok]
    p_ref, sev_ref = _reference(world["model"], np.stack([world["cached"][n] for n in names]))
    p = np.array([float(r["p_severe"]) for r in ok])
    sev = np.array([[float(r[c]) for c in SEV_COLS] for r in ok])
    assert np.ptp(p) > 0.05  # the images really get different scores
    np.testing.assert_allclose(p, p_ref, atol=2e-6)
    np.testing.assert_allclose(sev, sev_ref, atol=2e-6)
    assert [r["severity_class"] for r in ok] == [SEVERITY_CLASS_NAMES[k] for k in sev_ref.argmax(1)]
    assert [r["prognosis"] for r in ok] == ["SEVERE" if v >= 0.5 else "MILD" for v in p_ref]
    assert {r["threshold"] for r in ok} == {"0.5"}

    bad = {Path(r["file"]).name: r for r in rows if r["status"] != "ok"}
    assert set(bad) == {"cut.dcm", "notes.txt"}
    assert all(r["status"] == "rejected" and r["p_severe"] == "" for r in bad.values())
    assert "truncated" in bad["cut.dcm"]["reason"]
    assert "not a DICOM file" in bad["notes.txt"]["reason"]

    assert "threshold 0.5 (default" in text and "crop lung" in text and "image-size 64" in text
    assert f"scored {len(ok)} of {len(rows)} files (2 rejected)" in text
    for r in ok:
        line = next(ln for ln in text.splitlines() if ln.startswith(r["file"] + " "))
        assert r["p_severe"] in line and r["prognosis"] in line and r["severity_class"] in line
    assert any(ln.startswith(bad["cut.dcm"]["file"]) and "rejected: truncated" in ln for ln in text.splitlines())


def test_threshold_from_the_checkpoint(world, tmp_path):
    p_ref, _ = _reference(world["model"], np.stack(list(world["cached"].values())))
    ranked = np.sort(p_ref)  # a threshold between two scores: the CSV's 6 decimals cannot move a row across it
    t = float((ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2]) / 2)
    ckpt = _save(tmp_path / "t.pt", world["model"], CONFIG, threshold=t)
    text = predict(
        ckpt,
        [world["inputs"] / "scans"],
        out_dir=tmp_path / "out",
        saliency=False,
        device="cpu",
        crop_source=None,
        workers=1,
    )
    rows = _rows(tmp_path / "out" / "predictions.csv")
    labels = {r["prognosis"] for r in rows}
    assert labels == {"SEVERE", "MILD"}
    assert all(r["prognosis"] == ("SEVERE" if float(r["p_severe"]) >= t else "MILD") for r in rows)
    assert f"threshold {t:g} (checkpoint)" in text


def test_saliency_writes_one_heatmap_per_scored_image(world, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    text = predict(
        world["ckpt"], [world["inputs"]], out_dir=out, saliency=True, device="cpu", crop_source=None, workers=1
    )
    # resnet18 at 64 px ends on a 2x2 map: the user is told, with the size that gives at least 4x4
    assert "last feature map is 2x2 at image-size 64" in text and "image-size 128 or more" in text
    rows = _rows(out / "predictions.csv")
    ok = [r for r in rows if r["status"] == "ok"]
    pngs = sorted((out / "heatmaps").glob("*.png"))
    assert len(pngs) == len(ok) == len(world["cached"])
    assert sorted(Path(r["heatmap"]) for r in ok) == pngs
    assert all(r["heatmap"] == "" for r in rows if r["status"] != "ok")
    for r in ok:
        with Image.open(r["heatmap"]) as im:
            assert im.size == (SIZE, SIZE) and im.mode == "RGB"
            rgb = np.asarray(im).astype(int)
        assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 0  # a colour map over the grey image


def _grad_cam_by_hand(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Grad-CAM of the prognosis SEVERE logit at ``layer``, upsampled to the input as pytorch_grad_cam does."""
    import cv2

    kept = {}

    def hook(_m, _i, out):
        out.retain_grad()
        kept["a"] = out
        return out.clone()

    h = layer.register_forward_hook(hook)
    try:
        model.zero_grad()
        model(x)[0][:, 1].sum().backward()
    finally:
        h.remove()
    a, g = kept["a"], kept["a"].grad
    cam = torch.relu((g.mean((2, 3))[:, :, None, None] * a).sum(1)).detach().numpy()
    out = []
    for c in cam:
        c = (c - c.min()) / (1e-7 + (c - c.min()).max())
        c = cv2.resize(np.float32(c), (x.shape[-1], x.shape[-2]))
        out.append((c - c.min()) / (1e-7 + c.max() - c.min()))
    return np.stack(out)


@pytest.mark.parametrize(
    "backbone, layer_name",
    [
        ("resnet18", "layer4"),
        ("densenet121", "features"),
        ("efficientnet_b0", "bn2"),
        ("mobilenet_v2", "features"),
    ],
)
def test_grad_cam_at_the_last_convolutional_block(backbone, layer_name):
    model = _model(backbone)
    layer = saliency_target_layer(model.backbone, SIZE)
    assert layer is model.backbone.get_submodule(layer_name)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    sal = Saliency(model, SIZE)
    try:
        maps = sal.maps(x)
    finally:
        sal.close()
    assert maps.shape == (2, SIZE, SIZE) and np.isfinite(maps).all()
    np.testing.assert_allclose(maps, _grad_cam_by_hand(model, layer, x), atol=1e-4)


def test_cli_scores_a_folder_and_skips_its_own_output(world, capsys):
    from mdmt.ops.cli import main

    out = world["inputs"] / "predictions"  # inside the folder it scores
    argv = ["predict", str(world["ckpt"]), str(world["inputs"]), "--out", str(out), "--device", "cpu", "--saliency"]
    try:
        assert main(argv) == 0
        printed = capsys.readouterr().out
        assert f"scored {len(world['cached'])} of {world['n_files']} files" in printed
        assert main(argv) == 0  # its CSV and heatmaps are not taken for inputs the second time
        rows = _rows(out / "predictions.csv")
        assert len(rows) == world["n_files"]
        assert len(list((out / "heatmaps").glob("*.png"))) == len(world["cached"])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_crop_boxes_uses_the_given_box_table(world, tmp_path, capsys):
    from mdmt.ops.cli import main

    ckpt = _save(tmp_path / "boxes.pt", world["model"], CONFIG | {"crop": "boxes"})
    scans = world["inputs"] / "scans"
    files = sorted((scans / "day1").iterdir())
    argv = ["predict", str(ckpt), str(scans), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "crop 'boxes'" in err and "--crop-source" in err

    boxed = files[0]
    table = tmp_path / "boxes.csv"
    table.write_text(f"image,top,left,bottom,right\nday1/{boxed.name},10,12,80,70\n")
    assert main(argv + ["--crop-source", str(table)]) == 0
    rows = {Path(r["file"]).name: r for r in _rows(tmp_path / "out" / "predictions.csv")}
    assert len(rows) == len(files)
    assert rows[boxed.name]["crop_note"] == ""
    assert all("no row for this image" in rows[f.name]["crop_note"] for f in files[1:])

    expect = []
    for f, box in [(boxed, ("10", "12", "80", "70")), (files[1], None)]:
        img, _ = read_image(f)
        expect.append(preprocess_with_info(img, SIZE, "boxes", box=box)[0])
    p_ref, _ = _reference(world["model"], np.stack(expect))
    got = [float(rows[f.name]["p_severe"]) for f in (boxed, files[1])]
    np.testing.assert_allclose(got, p_ref, atol=2e-6)


def test_one_line_errors(world, tmp_path, capsys, monkeypatch):
    from mdmt.ops.cli import main

    def err_of(*argv) -> str:
        assert main(["predict", *map(str, argv), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        return err

    missing = tmp_path / "nope.pt"
    err = err_of(missing, world["inputs"])
    assert str(missing) in err and "file not found" in err
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    err = err_of(junk, world["inputs"])
    assert str(junk) in err and "not a PyTorch checkpoint" in err
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    assert "not an MDMT checkpoint" in err_of(other, world["inputs"])

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "a.txt").write_text("x")
    assert "none of the 1 files could be scored" in err_of(world["ckpt"], only_bad)
    assert _rows(tmp_path / "out" / "predictions.csv")[0]["status"] == "rejected"
    (tmp_path / "empty").mkdir()
    assert "no files found" in err_of(world["ckpt"], tmp_path / "empty")
    assert (
        "file not found" in _rows(tmp_path / "out" / "predictions.csv")[0]["reason"]
        if main(["predict", str(world["ckpt"]), str(tmp_path / "missing.dcm"), "--out", str(tmp_path / "out")]) == 2
        else False
    )
    capsys.readouterr()

    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    with pytest.raises(MDMTError, match="'explain' extra"):
        predict(world["ckpt"], [world["inputs"]], out_dir=tmp_path / "o", saliency=True, device="cpu", crop_source=None)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            predict(
                world["ckpt"],
                [world["inputs"]],
                out_dir=tmp_path / "o",
                saliency=False,
                device="cuda",
                crop_source=None,
            )
