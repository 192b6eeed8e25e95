"""Score new chest X-rays with a checkpoint, through the checkpoint's own preprocessing.

``mdmt predict CHECKPOINT FILE_OR_FOLDER...`` (see docs/predict.md). Every file is decoded and cropped
by the ingestion worker (:func:`mdmt.data.worker.decode_one`: :func:`mdmt.data.dicom.read_image` +
:func:`mdmt.data.preprocess.preprocess_with_info`) with the image size, crop mode and VOI mode stored
in the checkpoint's run config, so a prediction sees exactly the uint8 image training would have cached
for that file; the model then runs on it as in evaluation (:class:`mdmt.ml.train.Feeder`).
"""

from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from mdmt.data.crop_source import BOX_COLUMNS, crop_input, read_lung_boxes
from mdmt.data.manifest import SEVERITY_CLASS_NAMES
from mdmt.data.options import CROP_MODES, MIN_IMAGE_SIZE, USER_CROP_MODES, VOI_MODES
from mdmt.data.worker import decode_results, resolve_workers
from mdmt.errors import ConfigError, DataError, MDMTError
from mdmt.fed.checkpoint import load_checkpoint
from mdmt.ml.backbones import get_backbone_spec
from mdmt.ml.methods import METHODS, PROGNOSIS, SEVERITY
from mdmt.ml.model import build_model
from mdmt.ml.train import Feeder, autocast, resolve_device

PREDICTIONS = "predictions.csv"
HEATMAPS = "heatmaps"
BATCH_SIZE = 32
DEFAULT_THRESHOLD = 0.5
EXPLAIN_HINT = "install the 'explain' extra: pip install 'mdmt-federation[explain]'"


def _severity_names() -> tuple[str, ...]:

    return tuple(SEVERITY_CLASS_NAMES)


def csv_columns() -> list[str]:
    """The columns of predictions.csv, in order."""
    return (
        ["file", "status", "reason", "p_severe", "prognosis", "threshold", "severity_class"]
        + [f"p_severity_{n}" for n in _severity_names()]
        + ["crop_note", "heatmap"]
    )


# ---- the checkpoint ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """What ingestion did to every training image, as recorded in the checkpoint's run config."""

    image_size: int
    crop: str
    voi: str


@dataclass
class Predictor:
    path: Path
    model: nn.Module
    backbone: str
    prep: Preprocessing
    threshold: float
    threshold_source: str
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _short(exc: BaseException) -> str:
    text = " ".join((str(exc).strip() or exc.__class__.__name__).split())
    return f"{exc.__class__.__name__}: {text[:160]}"


def _read_checkpoint(path: Path) -> dict[str, Any]:

    if not path.exists():
        raise MDMTError(f"checkpoint {path}: file not found")
    if not path.is_file():
        raise MDMTError(f"checkpoint {path}: not a file; give a best.pt or latest.pt written by a run")
    try:
        ckpt = load_checkpoint(path)
    except Exception as exc:
        raise MDMTError(
            f"checkpoint {path}: not a PyTorch checkpoint ({_short(exc)}); give a best.pt or latest.pt written by a run"
        ) from None
    if not (
        isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict) and isinstance(ckpt.get("config"), dict)
    ):
        raise MDMTError(
            f"checkpoint {path}: not an MDMT checkpoint (no state_dict and run config); "
            "give a best.pt or latest.pt written by a run"
        )
    return ckpt


def _preprocessing(cfg: dict, path: Path) -> Preprocessing:

    missing = [k for k in ("image-size", "crop") if k not in cfg]
    if missing:
        raise MDMTError(
            f"checkpoint {path}: its run config has no {', '.join(repr(k) for k in missing)}; "
            "it was not written by an MDMT run"
        )
    try:
        size = int(cfg["image-size"])
    except (TypeError, ValueError):
        size = -1
    if size < MIN_IMAGE_SIZE or str(size) != str(cfg["image-size"]).strip():
        raise MDMTError(f"checkpoint {path}: run config 'image-size' is {cfg['image-size']!r}, not an image size")
    crop, voi = str(cfg["crop"]), str(cfg.get("voi", "none"))
    if crop not in CROP_MODES:
        raise MDMTError(f"checkpoint {path}: run config 'crop' is {crop!r}; known: {', '.join(CROP_MODES)}")
    if voi not in VOI_MODES:
        raise MDMTError(f"checkpoint {path}: run config 'voi' is {voi!r}; known: {', '.join(VOI_MODES)}")
    return Preprocessing(size, crop, voi)


def _threshold(ckpt: dict, path: Path) -> tuple[float, str]:
    """The prognosis decision threshold: the checkpoint's ``threshold``, else a fixed number in its run
    config's ``threshold``, else 0.5."""
    if ckpt.get("threshold") is not None:
        raw, source = ckpt["threshold"], "checkpoint"
    else:
        raw, source = ckpt["config"].get("threshold"), "run config"
        try:
            float(raw)
        except (TypeError, ValueError):
            return DEFAULT_THRESHOLD, "default; the checkpoint carries none"
    try:
        t = float(raw)
    except (TypeError, ValueError):
        t = math.nan
    if not 0.0 < t < 1.0:
        raise MDMTError(f"checkpoint {path}: 'threshold' is {raw!r}; expected a number between 0 and 1")
    return t, source


def load_predictor(path: str | Path) -> Predictor:
    """The checkpoint's model (on the CPU, eval mode), preprocessing and decision threshold; a one-line
    :class:`MDMTError` naming the file when it is missing or not an MDMT checkpoint."""

    path = Path(path)
    ckpt = _read_checkpoint(path)
    cfg = ckpt["config"]
    backbone = str(cfg.get("backbone", "")).strip()
    if not backbone or "," in backbone:
        raise MDMTError(f"checkpoint {path}: run config 'backbone' is {cfg.get('backbone')!r}, not one backbone name")
    try:
        get_backbone_spec(backbone)
    except ConfigError as exc:
        raise MDMTError(f"checkpoint {path}: {exc}") from None
    prep = _preprocessing(cfg, path)
    threshold, source = _threshold(ckpt, path)
    model = build_model(backbone)
    try:
        state = {k: torch.as_tensor(v) for k, v in ckpt["state_dict"].items()}
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise MDMTError(f"checkpoint {path}: its weights do not fit backbone {backbone} ({_short(exc)})") from None
    model.eval()
    notes = []
    method = METHODS.get(str(cfg.get("method", "")))
    if method is not None:
        for task, what in ((PROGNOSIS, "P(SEVERE) and the prognosis label"), (SEVERITY, "the severity columns")):
            if task not in method.tasks:
                notes.append(f"method {method.name} does not train the {task} head: ignore {what}")
    info = {k: ckpt.get(k) for k in ("round", "unit_id")}
    return Predictor(path, model, backbone, prep, threshold, source, info, notes)


# ---- inputs ----------------------------------------------------------------------------------------------


@dataclass
class _Item:
    path: Path
    keys: list[str]  # names under which a box table / mask folder may list the file
    row: dict = field(default_factory=dict)
    image: np.ndarray | None = None


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def collect_inputs(inputs: list[Path], skip: Path | None = None) -> tuple[list[_Item], list[str]]:
    """Files given directly, plus every file below the folders given (walked recursively in name order;
    names starting with '.' and the folder ``skip`` are left out). Which of them are DICOM is decided by
    their content when they are read. Returns (items, notes)."""
    skip = skip.resolve() if skip is not None else None
    items: list[_Item] = []
    notes: list[str] = []
    seen: set[Path] = set()

    def add(p: Path, keys: list[str]) -> None:
        real = p.resolve()
        if real in seen:
            return
        seen.add(real)
        items.append(_Item(p, list(dict.fromkeys(keys)), {"file": str(p)}))

    for arg in inputs:
        arg = Path(arg)
        if arg.is_dir():
            n0 = len(items)
            found = []
            for root, dirs, files in os.walk(arg):
                dirs[:] = [d for d in dirs if not d.startswith(".") and not _inside(Path(root, d), skip)]
                found += [Path(root, name) for name in files if not name.startswith(".")]
            for p in sorted(found, key=lambda q: q.relative_to(arg).parts):
                add(p, [p.relative_to(arg).as_posix(), p.name])
            if len(items) == n0:
                notes.append(f"folder {arg}: no files")
        else:
            add(arg, [arg.name, arg.as_posix()])
    return items, notes


# ---- preprocessing (the ingestion worker) -----------------------------------------------------------------


def _crop_source(crop: str, crop_source: str | Path | None, checkpoint: Path) -> tuple[Path | None, dict | None]:
    """The box table (read) or mask folder for ``crop`` boxes/masks; a one-line error when it is needed
    and missing, or given for a checkpoint that does not use one."""
    given = crop_source not in (None, "")
    if crop not in USER_CROP_MODES:
        if given:
            raise ConfigError(
                f"crop source {crop_source}: checkpoint {checkpoint} was trained with crop {crop!r}, "
                "which takes no box table or mask folder; leave --crop-source out"
            )
        return None, None
    what = (
        f"a lung box table (CSV with columns {', '.join(BOX_COLUMNS)}; 'image' = the file's path below the "
        "folder given, or its name)"
        if crop == "boxes"
        else "a lung mask folder (<image>.png per file, 'image' = the file's path below the folder given, or its name)"
    )
    if not given:
        raise ConfigError(f"checkpoint {checkpoint} was trained with crop {crop!r}: give {what} with --crop-source")
    src = Path(crop_source)
    if crop == "boxes":
        if not src.is_file():
            raise ConfigError(f"crop source {src}: file not found; give {what}")
        return src, read_lung_boxes(src)
    if not src.is_dir():
        raise ConfigError(f"crop source {src}: folder not found; give {what}")
    return src, None


def _task(item: _Item, prep: Preprocessing, src: Path | None, boxes: dict | None) -> tuple:
    """The ingestion worker's task for one file; the crop input is looked up under each of the file's keys."""
    found = [crop_input(prep.crop, key, src, boxes)[1:] for key in item.keys]
    box, mask, note = next((f for f in found if f[0] is not None or f[1] is not None), found[0])
    return (str(item.path), prep.image_size, prep.crop, prep.voi, box, mask, note)


# ---- saliency --------------------------------------------------------------------------------------------


def _import_grad_cam():
    try:
        # deferred: grad-cam (the explain extra) loads only for --saliency
        from pytorch_grad_cam import GradCAM

        # deferred: grad-cam (the explain extra) loads only for --saliency
        from pytorch_grad_cam.utils.image import show_cam_on_image

        # deferred: grad-cam (the explain extra) loads only for --saliency
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise MDMTError(f"saliency needs the grad-cam package (pytorch_grad_cam); {EXPLAIN_HINT}") from None
    return GradCAM, ClassifierOutputTarget, show_cam_on_image


MIN_MAP_SIDE = 4  # a Grad-CAM map smaller than 4x4 is too coarse to show where the model looked


def saliency_target_layer(backbone: nn.Module, image_size: int) -> nn.Module:
    return target_layer_and_map(backbone, image_size)[0]


def target_layer_and_map(backbone: nn.Module, image_size: int) -> tuple[nn.Module, tuple[int, int]]:
    """The backbone's last convolutional block: the last module, in execution order, that returns a
    feature map (N, C, H, W) and is not a pooling layer, i.e. the feature map that global pooling reduces
    (ResNet ``layer4``, DenseNet / MobileNet ``features``, timm EfficientNet ``bn2``). Found by running
    one blank image of the model's input size through it."""
    done: list[tuple[nn.Module, tuple[int, int]]] = []

    def hook(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.ndim == 4 and "Pool" not in type(module).__name__:
            done.append((module, (int(output.shape[2]), int(output.shape[3]))))

    handles = [m.register_forward_hook(hook) for m in backbone.modules() if m is not backbone]
    was_training = backbone.training
    try:
        backbone.eval()
        p = next(backbone.parameters())
        with torch.no_grad():
            backbone(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)
    if not done:
        raise MDMTError(f"{type(backbone).__name__}: no convolutional feature map found for Grad-CAM")
    return done[-1]


def _copy_output(_module, _inputs, output):
    return output.clone() if isinstance(output, torch.Tensor) else None


class _SevereLogit(nn.Module):
    """The MDMT network reduced to its prognosis logits, the output Grad-CAM explains."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


class Saliency:
    """Grad-CAM (pytorch_grad_cam) of the prognosis SEVERE logit at the backbone's last convolutional block."""

    def __init__(self, model: nn.Module, image_size: int):
        GradCAM, Target, self._overlay = _import_grad_cam()
        self.layer, self.map_size = target_layer_and_map(model.backbone, image_size)
        self.image_size = image_size
        self.cam = GradCAM(model=_SevereLogit(model), target_layers=[self.layer])
        # Registered after Grad-CAM's own hooks: the rest of the network gets a copy of the feature map, so
        # an in-place operation after the block (DenseNet's ReLU) cannot change the activations Grad-CAM
        # kept, and the map is that of the block's output on every device.
        self._copy = self.layer.register_forward_hook(_copy_output)
        self.target = Target(1)  # class 1 of the prognosis head: SEVERE

    def coarse_note(self, backbone: str) -> str:
        """A warning when the map is smaller than 4x4 (a flat heatmap), naming the smallest useful size."""
        side = min(self.map_size)
        if side >= MIN_MAP_SIDE:
            return ""
        stride = self.image_size / max(side, 1)
        useful = int(np.ceil(MIN_MAP_SIDE * stride / 32) * 32)
        return (
            f"saliency: {backbone}'s last feature map is {self.map_size[0]}x{self.map_size[1]} at image-size "
            f"{self.image_size}, so the heatmaps are nearly flat; a model trained at image-size {useful} or more "
            f"gives a map of at least {MIN_MAP_SIDE}x{MIN_MAP_SIDE}"
        )

    def maps(self, x: torch.Tensor) -> np.ndarray:
        """(N, S, S) float maps in [0, 1] for a normalised input batch."""
        with torch.enable_grad():
            return self.cam(input_tensor=x, targets=[self.target] * len(x))

    def overlay(self, image: np.ndarray, cam: np.ndarray) -> np.ndarray:
        """The map in colour over the preprocessed uint8 image: (S, S, 3) uint8."""
        grey = np.repeat((image.astype(np.float32) / 255.0)[..., None], 3, axis=-1)
        return self._overlay(grey, cam, use_rgb=True)

    def close(self) -> None:
        self._copy.remove()
        self.cam.activations_and_grads.release()


# ---- prediction ------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:

    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not one of auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA device is available; use --device auto or cpu")
    return resolve_device(name)


def _safe_name(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    return keep.strip("._")[:120] or "image"


def _score(
    batch: list[_Item],
    model: nn.Module,
    feed,
    device: torch.device,
    threshold: float,
    saliency: Saliency | None,
    heat_dir: Path | None,
    counter: list[int],
) -> None:

    names = _severity_names()
    images = np.stack([it.image for it in batch])
    x = feed(images)
    with torch.no_grad(), autocast(device):
        lp, ls = model(x)
    p_severe = torch.softmax(lp.float(), 1)[:, 1].cpu().numpy()
    p_sev = torch.softmax(ls.float(), 1).cpu().numpy()
    cams = saliency.maps(x.float()) if saliency is not None else None
    for k, it in enumerate(batch):
        p = float(p_severe[k])
        it.row.update(
            status="ok",
            p_severe=f"{p:.6f}",
            prognosis="SEVERE" if p >= threshold else "MILD",
            threshold=f"{threshold:g}",
            severity_class=names[int(p_sev[k].argmax())],
            **{f"p_severity_{n}": f"{float(v):.6f}" for n, v in zip(names, p_sev[k])},
        )
        if cams is not None and heat_dir is not None:
            counter[0] += 1
            out = heat_dir / f"{counter[0]:04d}-{_safe_name(it.path.name)}.png"
            Image.fromarray(saliency.overlay(it.image, cams[k])).save(out)
            it.row["heatmap"] = str(out)
        it.image = None


def _write_csv(path: Path, items: list[_Item]) -> None:
    cols = csv_columns()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for it in items:
            w.writerow({c: it.row.get(c, "") for c in cols})
    os.replace(tmp, path)


def _format(
    pred: Predictor,
    items: list[_Item],
    notes: list[str],
    csv_path: Path,
    heat_dir: Path | None,
    device: torch.device,
    n_ok: int,
) -> str:
    p = pred.prep
    head = (
        f"checkpoint {pred.path}: {pred.backbone}"
        + (f", unit {pred.info['unit_id']}" if pred.info.get("unit_id") else "")
        + (f", round {pred.info['round']}" if pred.info.get("round") is not None else "")
        + f"; preprocessing: image-size {p.image_size}, crop {p.crop}, voi {p.voi}; "
        f"threshold {pred.threshold:g} ({pred.threshold_source}); device {device.type}"
    )
    width = min(60, max([len("file")] + [len(str(it.path)) for it in items]))
    lines = [head] + [f"note: {n}" for n in pred.notes + notes]
    lines.append(f"{'file':<{width}}  {'P(SEVERE)':>9}  {'prognosis':<9}  severity (Brixia global)")
    for it in items:
        r = it.row
        name = str(it.path)
        if r.get("status") == "ok":
            p_cls = r[f"p_severity_{r['severity_class']}"]
            cls = f"{r['severity_class']} (p {float(p_cls):.3f})"
            text = f"{name:<{width}}  {r['p_severe']:>9.9}  {r['prognosis']:<9}  {cls}"
            if r.get("crop_note"):
                text += f"  [crop fallback: {r['crop_note']}]"
        else:
            text = f"{name:<{width}}  {'-':>9}  rejected: {r.get('reason', '')}"
        lines.append(text)
    n_bad = len(items) - n_ok
    tail = f"scored {n_ok} of {len(items)} files" + (f" ({n_bad} rejected)" if n_bad else "") + f"; wrote {csv_path}"
    if heat_dir is not None:
        tail += f" and {n_ok} Grad-CAM heatmaps in {heat_dir}"
    lines.append(tail)
    return "\n".join(lines)


def predict(
    checkpoint: Path,
    inputs: list[Path],
    out_dir: Path,
    saliency: bool = False,
    device: str = "auto",
    crop_source: str | Path | None = None,
    workers: int = 0,
) -> str:
    """Score every file in ``inputs`` (files, or folders walked recursively) with ``checkpoint``.

    Writes ``out_dir/predictions.csv`` (one row per file, :func:`csv_columns`) and, with ``saliency``,
    one Grad-CAM PNG per scored image in ``out_dir/heatmaps``. Files that cannot be read or preprocessed
    are listed with their reason. ``workers``: decoding processes (0 = one per CPU core). Returns the
    printout. Raises a one-line :class:`MDMTError` for a bad checkpoint, a missing crop source, no
    input files, or when no file could be scored."""

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if saliency:
        _import_grad_cam()
    dev = _device(device)
    pred = load_predictor(checkpoint)
    src, boxes = _crop_source(pred.prep.crop, crop_source, checkpoint)
    items, notes = collect_inputs([Path(p) for p in inputs], skip=out_dir)
    if not items:
        raise DataError(
            f"no files found in {', '.join(str(p) for p in inputs)}; give DICOM files or folders holding them"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        heat_dir = out_dir / HEATMAPS if saliency else None
        if heat_dir is not None:
            heat_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"output folder {out_dir} cannot be written ({_short(exc)}); choose another with --out"
        ) from None

    tasks = [_task(it, pred.prep, src, boxes) for it in items]
    n_workers = resolve_workers(workers)

    n_ok, counter = 0, [0]
    with decode_results(tasks, n_workers) as results:  # decoding processes start before CUDA is touched
        model = pred.model.to(dev)
        feed = Feeder(dev)
        cam = Saliency(model, pred.prep.image_size) if saliency else None
        if cam is not None and cam.coarse_note(pred.backbone):
            notes.append(cam.coarse_note(pred.backbone))
            print(f"mdmt predict: warning: {cam.coarse_note(pred.backbone)}", file=sys.stderr)
        batch: list[_Item] = []
        try:
            with tqdm(total=len(items), desc="predict", unit="img", disable=None, file=sys.stderr) as bar:
                for it, res in zip(items, results):
                    if res[0] == "ok":
                        it.image, it.row["crop_note"] = res[1], res[3] if res[2] else ""
                        batch.append(it)
                        n_ok += 1
                    else:
                        it.row.update(status="rejected", reason=res[1])
                    if len(batch) == BATCH_SIZE:
                        _score(batch, model, feed, dev, pred.threshold, cam, heat_dir, counter)
                        batch = []
                    bar.update(1)
                if batch:
                    _score(batch, model, feed, dev, pred.threshold, cam, heat_dir, counter)
        finally:
            if cam is not None:
                cam.close()
    csv_path = out_dir / PREDICTIONS
    try:
        _write_csv(csv_path, items)
    except OSError as exc:
        raise DataError(f"{csv_path} cannot be written ({_short(exc)}); choose another folder with --out") from None
    if n_ok == 0:
        first = items[0].row.get("reason", "")
        raise DataError(
            f"none of the {len(items)} files could be scored (e.g. {items[0].path}: {first}); reasons in {csv_path}"
        )
    return _format(pred, items, notes, csv_path, heat_dir, dev, n_ok)
