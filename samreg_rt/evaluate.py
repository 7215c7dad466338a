"""``samreg-rt eval``: register every pair of a data manifest with every method and score it.

Methods: ``identity`` (no registration: the scores before registration), ``reference`` and
``default`` (samreg-rt presets: ROI correspondence, then a field fitted with
``ddf.fit_correspondence``), ``elastix`` and ``ants`` (``samreg_rt.baselines``). 3-D pairs go
through ``samreg_rt.volume`` (slice-wise samreg-rt; the baselines run in 3-D).

Scoring, on the FIXED image's original grid: the moving labels are taken on the fixed grid
(nearest neighbour, pixel-centre aligned, when the shapes differ), warped with the method's field
(``ddf.warp_labels``: per-class interpolation, classes never merge) and compared with the fixed
labels per class (Dice; HD95 in px for 2-D pairs, in mm for 3-D pairs, averaged over the classes);
landmarks (x, y px of the original images) give TRE in px and, for retina pairs, the FIRE AUC;
folding is the fraction of pixels (voxels) with a non-positive Jacobian determinant. The ROI pairs
of samreg-rt are also scored directly against the labels (``metrics.roi_pair_label_score``).

Outputs in ``--out``: ``results.json`` (one record per pair and method with exactly the keys of
``RESULT_KEYS``, null where a figure does not apply), ``results.csv``, ``results.md``,
``per_pair.png`` and ``overlays/<pair>.png``; per record, ``records/<pair>/<method>.json`` and a
small ``.npz`` for the overlay, which let an interrupted run resume (records made with other
settings are recomputed). Every file is written atomically.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from . import baselines, ddf, metrics, volume
from .engine import Engine
from .errors import InputError, SamregError
from .io import atomic_write, load_image
from .pipeline import PRESETS, register

log = logging.getLogger("samreg_rt")

__all__ = ["RESULT_KEYS", "METHODS", "PairSpec", "EvalSettings", "load_pairs", "read_labels",
           "read_landmarks", "evaluate_pair", "run_eval", "write_reports", "run_command"]

RESULT_KEYS = ("pair", "application", "method", "dice", "dice_per_class", "hd95", "tre_mean",
               "tre_max", "fire_auc", "folding", "time_s")
METHODS = ("identity", "reference", "default", "elastix", "ants")
SAMREG_METHODS = ("reference", "default")
BASELINE_METHODS = ("elastix", "ants")
OVERLAY_SIDE = 320
FIELD_MODULES = ("amg", "amg_utils", "ddf", "engine", "masks", "match", "pipeline", "preprocess", "roi",
                 "volume")
# What the intensity-based baselines see, per application (default: the mean of RGB). Fundus
# photographs get the usual preparation (green channel, slow illumination removed by a high-pass of
# 8 working px): without it both baselines align the static circular field of view and stay at the
# identity TRE on fire_A01.
BASELINE_INPUT = {"retina": {"channel": 1, "highpass": 8.0}}


@dataclass(frozen=True)
class PairSpec:
    """One manifest entry with absolute paths. label_classes: {pixel value: structure name};
    landmarks: CSV path or None; spacing_mm: voxel size of 3-D pairs or None."""

    id: str
    application: str
    dim: int
    fixed: Path
    moving: Path
    fixed_label: Path | None
    moving_label: Path | None
    label_classes: dict[int, str]
    label_format: str
    landmarks: Path | None
    spacing_mm: tuple[float, ...] | None
    subject: str


@dataclass(frozen=True)
class EvalSettings:
    """Settings shared by every record of a run. amg: overrides for ``pipeline.register`` (e.g.
    points_per_side); baseline_max_side: 2-D working size limit of the baselines (px)."""

    amg: dict
    baseline_max_side: int = 512

    def signature(self, method: str, model: dict) -> dict:
        """What a stored record must match to be reused: for samreg-rt records also the source of
        the modules that make the field (a code change recomputes them)."""
        if method in SAMREG_METHODS:      # the decoder batch size changes memory, not results
            amg = {k: list(v) if isinstance(v, tuple) else v for k, v in self.amg.items() if k != "batch_size"}
            return {"amg": amg, "model": model.get("manifest_sha256"), "code": _code_sha256()}
        if method in BASELINE_METHODS:
            return {"baseline_max_side": self.baseline_max_side, "input": BASELINE_INPUT}
        return {}


def _code_sha256() -> str:
    """sha256 over the source of the samreg-rt modules between an image pair and its field."""
    digest = hashlib.sha256()
    for name in FIELD_MODULES:
        digest.update((Path(__file__).parent / f"{name}.py").read_bytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ inputs

def load_pairs(manifest_or_dir: str | os.PathLike) -> list[PairSpec]:
    """Read a data manifest (``manifest.json`` or the folder holding it; format of the shared data
    set's manifest) -> its pairs, paths made absolute. ``InputError`` naming the file on problems."""
    path = Path(manifest_or_dir)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        data = json.loads(path.read_text())
        entries = data["pairs"]
    except FileNotFoundError:
        raise InputError(f"{path}: no such manifest") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a data manifest ({type(exc).__name__}: {exc})") from None
    root = path.parent
    pairs = []
    for n, e in enumerate(entries):
        try:
            opt = lambda key: root / e[key] if e.get(key) else None  # noqa: E731
            pairs.append(PairSpec(
                id=str(e["id"]), application=str(e["application"]), dim=int(e["dim"]),
                fixed=root / e["fixed"], moving=root / e["moving"], fixed_label=opt("fixed_label"),
                moving_label=opt("moving_label"),
                label_classes={int(k): str(v) for k, v in (e.get("label_classes") or {}).items()},
                label_format=str(e.get("label_format") or ""), landmarks=opt("landmarks"),
                spacing_mm=tuple(float(s) for s in e["spacing_mm"]) if e.get("spacing_mm") else None,
                subject=str(e.get("subject") or "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: pair {n}: bad entry ({type(exc).__name__}: {exc})") from None
        if pairs[-1].dim not in (2, 3):
            raise InputError(f"{path}: pair {pairs[-1].id}: dim {pairs[-1].dim}, expected 2 or 3")
    ids = [p.id for p in pairs]
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: pair ids are not unique")
    return pairs


def read_labels(path: Path, pair: PairSpec, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Label map of a pair as int64 with the manifest's class values.

    3-D: the NIfTI values as stored (e.g. ACDC 0..3). 2-D with the single class 255 (0/255 masks,
    and matplotlib renders whose edges hold grey values): the first channel binarised at >= 128,
    foreground 255. Other 2-D labels: the first channel's values as they are, which must be
    non-negative integers. ``shape``: the shape of the image the labels belong to; a label map of
    another shape is an ``InputError`` (as are non-integer or negative values), never resampled.
    """
    if pair.dim == 3:
        arr = volume.load_volume(path).array
    else:
        arr = load_image(path).array
        arr = arr[..., 0] if arr.ndim == 3 else arr
        if set(pair.label_classes) == {255}:
            arr = np.where(arr >= 128, 255, 0)
    if shape is not None and arr.shape != tuple(shape):
        raise InputError(f"{path}: label map has shape {arr.shape}, its image has shape {tuple(shape)}")
    if arr.dtype.kind == "f" and not (arr == np.round(arr)).all():
        raise InputError(f"{path}: label map has non-integer values")
    if arr.size and arr.min() < 0:
        raise InputError(f"{path}: label map has negative values (min {arr.min()})")
    return arr.astype(np.int64)


LANDMARK_COLUMNS = ("fixed_x", "fixed_y", "moving_x", "moving_y")


def read_landmarks(path: Path, fixed_shape: tuple[int, int] | None = None,
                   moving_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CSV ``fixed_x,fixed_y,moving_x,moving_y`` -> (fixed (N, 2), moving (N, 2)) as (x, y) px.

    ``InputError`` naming the file (and the row) for missing columns, values that are not finite
    numbers, no rows, or, given the images' (H, W), a point outside its image (pixel centres at
    integers: x in [-0.5, W - 0.5], y in [-0.5, H - 0.5]).
    """
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [k for k in LANDMARK_COLUMNS if k not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: not a landmark CSV: columns {missing} missing (needs "
                                 f"{','.join(LANDMARK_COLUMNS)}, has {reader.fieldnames})")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read landmark CSV ({exc})") from None
    if not rows:
        raise InputError(f"{path}: no landmarks (only a header)")
    pts = np.zeros((len(rows), 4))
    for n, row in enumerate(rows, start=1):
        try:
            pts[n - 1] = [float(row[k]) for k in LANDMARK_COLUMNS]
        except (TypeError, ValueError):
            raise InputError(f"{path}: row {n}: {[row.get(k) for k in LANDMARK_COLUMNS]} are not four numbers "
                             f"({','.join(LANDMARK_COLUMNS)})") from None
        if not np.isfinite(pts[n - 1]).all():
            raise InputError(f"{path}: row {n}: landmark {pts[n - 1].tolist()} is not finite")
        for side, shape, xy in (("fixed", fixed_shape, pts[n - 1, :2]), ("moving", moving_shape, pts[n - 1, 2:])):
            if shape is not None and not (-0.5 <= xy[0] <= shape[1] - 0.5 and -0.5 <= xy[1] <= shape[0] - 0.5):
                raise InputError(f"{path}: row {n}: {side} landmark (x, y) = {tuple(xy.tolist())} lies outside "
                                 f"the {side} image ({shape[0]}x{shape[1]} px)")
    return pts[:, :2], pts[:, 2:]


def _grey(image: np.ndarray) -> np.ndarray:
    x = image.astype(np.float32)
    return x[..., :3].mean(axis=2) if x.ndim == 3 else x


def _baseline_input(image: np.ndarray, prep: dict) -> np.ndarray:
    """(H, W) float32 for a baseline: the RGB channel ``prep['channel']`` if set, else grey."""
    if "channel" in prep and image.ndim == 3:
        return image[..., prep["channel"]].astype(np.float32)
    return _grey(image)


def _on_grid(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A 2-D image (float) on a grid of ``shape`` (area when shrinking, bilinear otherwise)."""
    if image.shape[:2] == tuple(shape):
        return image
    interp = cv2.INTER_AREA if shape[0] * shape[1] < image.shape[0] * image.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(image, (shape[1], shape[0]), interpolation=interp)


# ------------------------------------------------------------------------------------ scoring

def _nan_to_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _label_scores(fixed_lab: np.ndarray, warped: np.ndarray, classes: list[int],
                  spacing: tuple[float, ...] | None) -> dict:
    per = metrics.dice(fixed_lab, warped, classes=classes)
    hd = [metrics.hd95(fixed_lab == c, warped == c, spacing=spacing) for c in classes]
    hd = [h for h in hd if not math.isnan(h)]
    vals = [v for v in per.values() if not math.isnan(v)]
    return {"dice": float(np.mean(vals)) if vals else None,
            "dice_per_class": {str(c): _nan_to_none(v) for c, v in per.items()},
            "hd95": float(np.mean(hd)) if hd else None}


def _roi_score(corrs: list, fixed_labs: list[np.ndarray], moving_labs: list[np.ndarray]) -> dict:
    """ROI pairs vs labels over one or more correspondences (slices): pairs, agreeing pairs."""
    total, agree = 0, 0
    for corr, fl, ml in zip(corrs, fixed_labs, moving_labs):
        if len(corr.pairs) == 0 or not (fl.any() or ml.any()):
            total += len(corr.pairs)
            continue
        s = metrics.roi_pair_label_score(corr, fl, ml)
        total += len(corr.pairs)
        agree += int(s.agree.sum())
    return {"roi_pairs": total, "roi_agree": agree}


def _display(fixed: np.ndarray, warped_moving: np.ndarray, fixed_lab: np.ndarray | None,
             warped_lab: np.ndarray | None) -> dict:
    """Small copies for the overlay PNG: at most OVERLAY_SIDE px per side."""
    h, w = fixed.shape[:2]
    scale = min(1.0, OVERLAY_SIDE / max(h, w))
    shape = (max(2, round(h * scale)), max(2, round(w * scale)))

    def img8(x: np.ndarray) -> np.ndarray:
        x = _on_grid(x.astype(np.float32), shape)
        lo, hi = np.percentile(x, [0.5, 99.5])
        return np.clip((x - lo) * 255.0 / max(hi - lo, 1e-6), 0, 255).astype(np.uint8)

    out = {"fixed": img8(fixed), "warped": img8(warped_moving)}
    if fixed_lab is not None and warped_lab is not None:
        out["fixed_label"] = volume.resize_labels(fixed_lab, shape).astype(np.int16)
        out["warped_label"] = volume.resize_labels(warped_lab, shape).astype(np.int16)
    return out


def evaluate_pair(pair: PairSpec, method: str, engine: Engine | None, settings: EvalSettings) -> tuple[dict, dict, dict]:
    """Register one pair with one method and score it.

    Returns (record with exactly ``RESULT_KEYS``, extras (ROI-pair scores, counts, notes),
    display arrays for the overlay). ``engine`` is needed for the samreg-rt methods only.
    """
    if method not in METHODS:
        raise InputError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    if method in SAMREG_METHODS and engine is None:
        raise InputError(f"method {method!r} needs a model (engine)")
    run = _evaluate_3d if pair.dim == 3 else _evaluate_2d
    scores, extras, display = run(pair, method, engine, settings)
    record = {"pair": pair.id, "application": pair.application, "method": method, "dice": None,
              "dice_per_class": None, "hd95": None, "tre_mean": None, "tre_max": None,
              "fire_auc": None, "folding": None, "time_s": None}
    record.update(scores)
    return {k: record[k] for k in RESULT_KEYS}, extras, display


def _samreg_field_2d(fixed_img, moving_img, method: str, engine: Engine, settings: EvalSettings,
                     shape: tuple[int, int]) -> tuple[np.ndarray, object, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # an empty correspondence is reported in the note
        reg = register(fixed_img, moving_img, engine, preset=method, **settings.amg)
    corr = reg.correspondence
    extras = {"rois": [reg.counts["fixed"]["rois"], reg.counts["moving"]["rois"]], "note": ""}
    checked = ddf.fit_checked(corr, fixed_img.array, moving_img.array, PRESETS[method].check_similarity)
    if checked.fit is not None:
        extras["fit_converged"] = checked.fit.converged
    if checked.check is not None:
        extras["ncc"] = [round(checked.check.ncc_identity, 4), round(checked.check.ncc_field, 4)]
    if not checked.kept:
        extras["note"] = f"{checked.note}: identity field"
        return ddf.identity(shape), corr, extras
    return ddf.resize_field(checked.fit.field_px, shape), corr, extras


def _evaluate_2d(pair: PairSpec, method: str, engine: Engine | None,
                 settings: EvalSettings) -> tuple[dict, dict, dict]:
    fixed_img, moving_img = load_image(pair.fixed), load_image(pair.moving)
    shape = fixed_img.array.shape[:2]
    mshape = moving_img.array.shape[:2]
    moving_grey = _on_grid(_grey(moving_img.array), shape)
    extras: dict = {"note": ""}
    corr = None
    t = time.perf_counter()
    if method == "identity":
        field = ddf.identity(shape)
    elif method in SAMREG_METHODS:
        field, corr, extras = _samreg_field_2d(fixed_img, moving_img, method, engine, settings, shape)
    else:
        prep = BASELINE_INPUT.get(pair.application, {})
        res = baselines.run_baseline(method, _baseline_input(fixed_img.array, prep),
                                     _on_grid(_baseline_input(moving_img.array, prep), shape),
                                     max_side=settings.baseline_max_side, highpass=prep.get("highpass"))
        field = res.field
    elapsed = 0.0 if method == "identity" else time.perf_counter() - t
    scores: dict = {"time_s": round(elapsed, 3), "folding": metrics.folding_ratio(field)}
    fixed_lab = warped_lab = None
    if pair.fixed_label and pair.moving_label:
        fixed_lab = read_labels(pair.fixed_label, pair, shape)
        moving_lab = read_labels(pair.moving_label, pair, mshape)
        warped_lab = ddf.warp_labels(volume.resize_labels(moving_lab, shape), field)
        classes = sorted(pair.label_classes) or sorted(set(np.unique(fixed_lab)) - {0})
        scores.update(_label_scores(fixed_lab, warped_lab, classes, None))
        if corr is not None:
            extras.update(_roi_score([corr], [fixed_lab], [moving_lab]))
    if pair.landmarks:
        fxy, mxy = read_landmarks(pair.landmarks, shape, mshape)
        mxy = (mxy + 0.5) * np.array([shape[1] / mshape[1], shape[0] / mshape[0]]) - 0.5
        err = metrics.tre(fxy, mxy, field).px
        scores["tre_mean"], scores["tre_max"] = float(err.mean()), float(err.max())
        if pair.application == "retina":
            scores["fire_auc"] = metrics.fire_auc([scores["tre_mean"]])
    disp_shape = _display_shape(shape)
    small_field = ddf.resize_field(field, disp_shape)
    warped_small = ddf.warp(_on_grid(moving_grey, disp_shape), small_field)
    display = _display(_grey(fixed_img.array), warped_small, fixed_lab, warped_lab)
    return scores, extras, display


def _display_shape(shape: tuple[int, int]) -> tuple[int, int]:
    scale = min(1.0, OVERLAY_SIDE / max(shape))
    return max(2, round(shape[0] * scale)), max(2, round(shape[1] * scale))


def _evaluate_3d(pair: PairSpec, method: str, engine: Engine | None,
                 settings: EvalSettings) -> tuple[dict, dict, dict]:
    fv, mv = volume.load_volume(pair.fixed), volume.load_volume(pair.moving)
    if fv.array.shape != mv.array.shape and method != "identity" and method not in SAMREG_METHODS:
        raise InputError(f"{pair.id}: fixed {fv.array.shape} and moving {mv.array.shape} volumes differ "
                         "in shape; the baselines need them on one grid")
    spacing = fv.spacing_mm
    extras: dict = {"note": ""}
    t = time.perf_counter()
    vr = None
    if method == "identity":
        field3 = np.zeros((*fv.array.shape, 3))
    elif method in SAMREG_METHODS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vr = volume.register_volume(fv, mv, engine, preset=method, **settings.amg)
        field3 = vr.field
        empty = [s.fixed_index for s in vr.slices if s.note]
        extras["note"] = f"identity in-plane field on slices {empty}" if empty else ""
        extras["warnings"] = [str(w.message) for w in caught]
        extras["rois"] = [sum(s.registration.counts["fixed"]["rois"] for s in vr.slices if s.registration),
                          sum(s.registration.counts["moving"]["rois"] for s in vr.slices if s.registration)]
    else:
        field3 = baselines.run_baseline(method, volume.to_uint8(fv.array), volume.to_uint8(mv.array),
                                        spacing=spacing).field
    elapsed = 0.0 if method == "identity" else time.perf_counter() - t
    det = volume.jacobian_determinant_3d(field3)
    scores: dict = {"time_s": round(elapsed, 3), "folding": float((det <= 0).mean())}
    if vr is not None:
        warped = vr.warp(order=1)
    else:
        warped = volume.warp_volume(mv.array.astype(np.float32), field3, order=1)
    fixed_lab = warped_lab = None
    if pair.fixed_label and pair.moving_label:
        fixed_lab = read_labels(pair.fixed_label, pair, fv.array.shape)
        moving_lab = read_labels(pair.moving_label, pair, mv.array.shape)
        warped_lab = vr.warp_labels(moving_lab) if vr is not None else volume.warp_labels_volume(moving_lab, field3)
        classes = sorted(pair.label_classes) or sorted(set(np.unique(fixed_lab)) - {0})
        scores.update(_label_scores(fixed_lab, warped_lab, classes, spacing))
        if vr is not None:
            done = [s for s in vr.slices if s.registration is not None]
            axis = vr.axis
            extras.update(_roi_score([s.registration.correspondence for s in done],
                                     [np.take(fixed_lab, s.fixed_index, axis=axis) for s in done],
                                     [np.take(moving_lab, s.moving_index, axis=axis) for s in done]))
    axis = volume.default_axis(fv)
    if fixed_lab is not None:
        k = int(np.argmax((np.moveaxis(fixed_lab, axis, 0) > 0).sum(axis=(1, 2))))
    else:
        k = fv.array.shape[axis] // 2
    display = _display(np.take(fv.array, k, axis=axis).astype(np.float32), np.take(warped, k, axis=axis),
                       None if fixed_lab is None else np.take(fixed_lab, k, axis=axis),
                       None if warped_lab is None else np.take(warped_lab, k, axis=axis))
    display["slice"] = np.array([axis, k])
    return scores, extras, display


# ------------------------------------------------------------------------------------ running

def _model_info(engine: Engine | None, model: str | None) -> dict:
    if engine is None:
        return {"name": model, "trained": None, "manifest_sha256": None}
    return {"name": engine.manifest.get("name", model), "manifest_sha256": engine.manifest_sha256,
            "trained": bool(engine.manifest.get("source", {}).get("trained", True)),
            "provider": engine.provider, "precision": engine.precision}


def _save_npz(path: Path, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with atomic_write(path) as handle:
        handle.write(buf.getvalue())


def run_eval(manifest_or_dir: str | os.PathLike, out_dir: str | os.PathLike, engine: Engine | None,
             methods: tuple[str, ...] = METHODS, pair_ids: list[str] | None = None,
             settings: EvalSettings | None = None, command: str = "", model: str | None = None,
             progress: bool = True) -> list[dict]:
    """Evaluate ``methods`` on the (selected) pairs of a manifest and write every report.

    engine: a loaded engine (needed when a samreg-rt method is asked for). pair_ids: subset of
    pair ids (default all). command: the command line, quoted at the top of results.md.
    Records already in ``out_dir/records`` with the same settings are reused. Returns the records
    (``RESULT_KEYS`` each), in manifest order then method order.
    """
    from tqdm import tqdm

    settings = settings or EvalSettings(amg={})
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"methods {unknown or '(none)'}: expected some of {', '.join(METHODS)}")
    pairs = load_pairs(manifest_or_dir)
    if pair_ids:
        missing = sorted(set(pair_ids) - {p.id for p in pairs})
        if missing:
            raise InputError(f"--pairs: unknown pair ids {missing} (not in {manifest_or_dir})")
        pairs = [p for p in pairs if p.id in set(pair_ids)]
    out = Path(out_dir)
    info = _model_info(engine, model)
    missing_tools = {m: why for m, why in baselines.available([m for m in methods if m in BASELINE_METHODS]).items() if why}
    records, extras_all = [], {}
    jobs = [(p, m) for p in pairs for m in methods if m not in missing_tools]
    for pair, method in tqdm(jobs, disable=not progress, desc="eval", unit="run"):
        rec_path = out / "records" / pair.id / f"{method}.json"
        sig = settings.signature(method, info)
        try:
            stored = json.loads(rec_path.read_text())
            done = stored["record"]["time_s"] is not None            # failed runs are retried
            if done and stored.get("signature") == sig and rec_path.with_suffix(".npz").is_file():
                records.append(stored["record"])
                extras_all[(pair.id, method)] = stored["extras"]
                continue
        except (OSError, ValueError, KeyError):
            pass
        log.info("%s / %s", pair.id, method)
        try:
            record, extras, display = evaluate_pair(pair, method, engine, settings)
        except SamregError as exc:
            log.warning("%s / %s failed: %s", pair.id, method, exc)
            record = {k: None for k in RESULT_KEYS}
            record.update(pair=pair.id, application=pair.application, method=method)
            extras, display = {"note": f"failed: {exc}"}, {}
        _save_npz(rec_path.with_suffix(".npz"), display)
        with atomic_write(rec_path, "w") as handle:
            json.dump({"signature": sig, "record": record, "extras": extras}, handle, indent=1)
        records.append(record)
        extras_all[(pair.id, method)] = extras
    write_reports(out, pairs, records, extras_all, methods, info, settings, command, missing_tools)
    return records


# ------------------------------------------------------------------------------------ reports

def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    import onnxruntime as ort
    return (f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, onnxruntime {ort.__version__}, no GPU used")


def _fmt(x: object, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


def _label(method: str, info: dict) -> str:
    name = {"identity": "identity (before registration)", "reference": "samreg-rt reference",
            "default": "samreg-rt default", "elastix": "elastix (affine + B-spline, MI)",
            "ants": "ANTs SyN"}[method]
    if method in SAMREG_METHODS and info.get("trained") is False:
        name += " (UNTRAINED model)"
    return name


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_reports(out: Path, pairs: list[PairSpec], records: list[dict], extras: dict,
                  methods: tuple[str, ...], info: dict, settings: EvalSettings, command: str,
                  missing_tools: dict | None = None) -> None:
    """results.json, results.csv, results.md, per_pair.png and overlays/<pair>.png."""
    out = Path(out)
    _write_text(out / "results.json", json.dumps(records, indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(RESULT_KEYS)
    for r in records:
        writer.writerow(["" if r[k] is None else json.dumps(r[k]) if isinstance(r[k], dict) else r[k]
                         for k in RESULT_KEYS])
    _write_text(out / "results.csv", buf.getvalue())
    _write_text(out / "results.md", _markdown(pairs, records, extras, methods, info, settings, command,
                                              missing_tools or {}))
    _plot_per_pair(out / "per_pair.png", pairs, records, methods, info)
    for pair in pairs:
        _plot_overlay(out, pair, methods, info)


def _markdown(pairs: list[PairSpec], records: list[dict], extras: dict, methods: tuple[str, ...],
              info: dict, settings: EvalSettings, command: str, missing_tools: dict) -> str:
    by = {(r["pair"], r["method"]): r for r in records}
    pps = settings.amg.get("points_per_side")
    trained = {True: "trained", False: "UNTRAINED (random weights: samreg-rt rows are meaningless)",
               None: "not loaded"}[info.get("trained")]
    lines = ["# samreg-rt evaluation", "",
             f"Command: `{command or 'samreg-rt eval'}`", "",
             f"Machine: {_machine()}.", "",
             f"Model: **{info.get('name')}** ({trained}), manifest sha256 "
             f"`{(info.get('manifest_sha256') or '')[:12]}`, provider {info.get('provider', '–')}, "
             f"precision {info.get('precision', '–')}.", "",
             f"samreg-rt settings: AMG overrides {json.dumps(settings.amg) if settings.amg else 'none'}"
             + (f" (a {pps}x{pps} prompt grid; LiteMedSAM prompts boxes of 3 sizes per grid point, "
                f"{3 * pps * pps} prompts per image)" if pps else "")
             + "; field: ``ddf.fit_correspondence`` defaults. 3-D pairs: slice by slice along the axis "
             "with the largest spacing (2.5-D, no through-plane motion).", "",
             f"Baselines: elastix (itk-elastix, default affine + B-spline maps, Mattes MI, 256 iterations "
             f"per resolution) and ANTs SyN (antspyx, type_of_transform='SyN'), one thread each, 2-D "
             f"images registered at most {settings.baseline_max_side} px per side; 3-D in 3-D with the "
             f"voxel sizes. Baseline input per application: {json.dumps(BASELINE_INPUT)} (channel index "
             "of RGB, high-pass sigma in working px); otherwise the mean of RGB.", "",
             "Units: Dice per class (classes never merged); HD95 mean over classes, px of the fixed image "
             "for 2-D pairs and mm for 3-D pairs; TRE px of the original images; FIRE AUC = success "
             "rate averaged over thresholds 1..25 px; folding = fraction of pixels with det J <= 0; "
             "time = wall seconds per pair (registration + field fit, this machine). '–' = does not apply.", ""]
    if missing_tools:
        for m, why in missing_tools.items():
            lines.append(f"**{m} skipped**: not available here ({why}).")
        lines.append("")
    lines += ["Data: the shared SAMReg example set (see data/manifest.json for sources and the required "
              "citations, e.g. ACDC: Bernard et al., IEEE TMI 2018; FIRE; AMOS).", ""]
    apps = list(dict.fromkeys(p.application for p in pairs))
    lines += ["## Summary: mean Dice (labelled applications) / mean TRE px (landmarks)", "",
              "| application | " + " | ".join(_label(m, info) for m in methods) + " |",
              "|---|" + "---|" * len(methods)]
    for app in apps:
        app_pairs = [p for p in pairs if p.application == app]
        cells = []
        for m in methods:
            rs = [by[(p.id, m)] for p in app_pairs if (p.id, m) in by]
            d, t = _mean([r["dice"] for r in rs]), _mean([r["tre_mean"] for r in rs])
            cells.append(" / ".join(x for x in (_fmt(d) if d is not None else "", _fmt(t, 1) if t is not None else "") if x) or "–")
        lines.append(f"| {app} | " + " | ".join(cells) + " |")
    lines.append("")
    for app in apps:
        app_pairs = [p for p in pairs if p.application == app]
        classes = sorted({c for p in app_pairs for c in p.label_classes})
        has_lab = any(p.fixed_label for p in app_pairs)
        has_lm = any(p.landmarks for p in app_pairs)
        names = {c: next(p.label_classes[c] for p in app_pairs if c in p.label_classes) for c in classes}
        lines += [f"## {app}", "", f"{len(app_pairs)} pair(s): " + ", ".join(
            f"{p.id} ({p.dim}-D, {p.subject}{', labels' if p.fixed_label else ''}{', landmarks' if p.landmarks else ''})"
            for p in app_pairs), ""]
        head = ["method", "n"]
        if has_lab:
            head += [f"Dice {names[c]}" for c in classes] + ["Dice mean", "HD95"]
        if has_lm:
            head += ["TRE mean", "TRE max"]
            if app == "retina":
                head += ["FIRE AUC"]
        head += ["folding", "time s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in methods:
            rs = [by[(p.id, m)] for p in app_pairs if (p.id, m) in by]
            if not rs:
                continue
            row = [_label(m, info), str(len(rs))]
            if has_lab:
                row += [_fmt(_mean([(r["dice_per_class"] or {}).get(str(c)) for r in rs])) for c in classes]
                row += [_fmt(_mean([r["dice"] for r in rs])), _fmt(_mean([r["hd95"] for r in rs]), 2)]
            if has_lm:
                row += [_fmt(_mean([r["tre_mean"] for r in rs]), 2), _fmt(_mean([r["tre_max"] for r in rs]), 2)]
                if app == "retina":
                    tre = [r["tre_mean"] for p, r in zip(app_pairs, rs) if p.landmarks]
                    row.append(_fmt(metrics.fire_auc([np.nan if v is None else v for v in tre])) if tre else "–")
            row += [_fmt(_mean([r["folding"] for r in rs]), 4), _fmt(_mean([r["time_s"] for r in rs]), 1)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        if has_lab or has_lm:
            lines += ["<details><summary>per pair</summary>", "", "| pair | method | Dice per class | Dice | HD95 | TRE mean | folding | time s | note |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for p in app_pairs:
                for m in methods:
                    r = by.get((p.id, m))
                    if r is None:
                        continue
                    dpc = ", ".join(f"{names.get(int(c), c)[:12]} {_fmt(v)}" for c, v in (r["dice_per_class"] or {}).items())
                    note = extras.get((p.id, m), {}).get("note", "")
                    lines.append(f"| {p.id} | {m} | {dpc or '–'} | {_fmt(r['dice'])} | {_fmt(r['hd95'], 2)} | "
                                 f"{_fmt(r['tre_mean'], 2)} | {_fmt(r['folding'], 4)} | {_fmt(r['time_s'], 1)} | {note} |")
            lines += ["", "</details>", ""]
        roi_rows = []
        for m in SAMREG_METHODS:
            ex = [extras.get((p.id, m), {}) for p in app_pairs if p.fixed_label]
            ex = [e for e in ex if "roi_pairs" in e]
            if ex:
                total = sum(e["roi_pairs"] for e in ex)
                agree = sum(e["roi_agree"] for e in ex)
                rois = [e.get("rois") for e in ex if e.get("rois")]
                roi_rows.append(f"| {_label(m, info)} | {len(ex)} | {total} | {agree} | "
                                f"{_fmt(agree / total if total else None)} | "
                                f"{_fmt(float(np.mean([r[0] for r in rois])), 1) if rois else '–'} / "
                                f"{_fmt(float(np.mean([r[1] for r in rois])), 1) if rois else '–'} |")
        if roi_rows:
            lines += ["ROI pairs scored directly against the labels (no field): a pair agrees when both of "
                      "its ROIs overlap the same labelled structure with Dice >= 0.5 "
                      "(``metrics.roi_pair_label_score``).", "",
                      "| method | pairs scored | ROI pairs | agreeing | fraction | ROIs per image (fixed / moving) |",
                      "|---|---|---|---|---|---|", *roi_rows, ""]
    lines += ["Plots: `per_pair.png` (per-pair Dice and TRE), `overlays/<pair>.png` (fixed in magenta, warped "
              "moving in green; fixed label contours white, warped moving label contours yellow).", ""]
    return "\n".join(lines)


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with atomic_write(path) as handle:
        handle.write(buf.getvalue())


def _plot_per_pair(path: Path, pairs: list[PairSpec], records: list[dict], methods: tuple[str, ...],
                   info: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["pair"], r["method"]): r for r in records}
    panels = [("dice", "Dice (mean over classes)", [p for p in pairs if p.fixed_label]),
              ("tre_mean", "landmark TRE mean (px, log)", [p for p in pairs if p.landmarks]),
              ("time_s", "time per pair (s, log)", pairs)]
    panels = [pnl for pnl in panels if pnl[2]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.45 * len(pairs) + 3), 3.2 * len(panels)),
                             squeeze=False)
    width = 0.8 / len(methods)
    for ax, (key, title, sel) in zip(axes[:, 0], panels):
        x = np.arange(len(sel))
        for i, m in enumerate(methods):
            vals = [by.get((p.id, m), {}).get(key) for p in sel]
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, [np.nan if v is None else v for v in vals],
                   width, label=_label(m, info))
        ax.set_xticks(x, [p.id for p in sel], rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        if key != "dice" and any((by.get((p.id, m), {}).get(key) or 0) > 0 for p in sel for m in methods):
            ax.set_yscale("log")
    axes[0, 0].legend(fontsize=7, ncol=min(len(methods), 3))
    fig.tight_layout()
    _save_fig(fig, path)


def _plot_overlay(out: Path, pair: PairSpec, methods: tuple[str, ...], info: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = []
    for m in methods:
        f = out / "records" / pair.id / f"{m}.npz"
        if f.is_file():
            with np.load(f) as z:
                if "fixed" in z.files:
                    shown.append((m, {k: z[k] for k in z.files}))
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(2.6 * (len(shown) + 1), 2.9), squeeze=False)
    first = shown[0][1]
    axes[0, 0].imshow(first["fixed"], cmap="gray")
    axes[0, 0].set_title("fixed" + (f" (slice {first['slice'][1]})" if "slice" in first else ""), fontsize=8)
    for ax, (m, d) in zip(axes[0, 1:], shown):
        f8, w8 = d["fixed"].astype(np.float32) / 255, d["warped"].astype(np.float32) / 255
        ax.imshow(np.stack([f8, w8, f8], axis=2))
        if "fixed_label" in d:
            for lab, colour in ((d["fixed_label"], "white"), (d["warped_label"], "yellow")):
                for c in np.unique(lab[lab > 0]):
                    ax.contour((lab == c).astype(float), levels=[0.5], colors=colour, linewidths=0.7)
        ax.set_title(_label(m, info).replace(" (", "\n("), fontsize=7)
    for ax in axes[0]:
        ax.axis("off")
    fig.suptitle(pair.id, fontsize=9)
    fig.tight_layout()
    _save_fig(fig, out / "overlays" / f"{pair.id}.png")


# ------------------------------------------------------------------------------------ CLI

def run_command(args: argparse.Namespace) -> int:
    """``samreg-rt eval`` (its arguments: ``samreg_rt.cli.build_parser``): run, report, print a summary.

    Returns the exit status: 0, or 1 when a pair's method failed.
    """
    methods = METHODS if args.methods is None else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"--methods {args.methods!r}: expected a comma-separated subset of {','.join(METHODS)}")
    box_sizes = tuple(args.box_sizes) if args.box_sizes else None
    amg = {k: v for k, v in (("points_per_side", args.points_per_side), ("box_sizes", box_sizes),
                             ("pred_iou_thresh", args.pred_iou_thresh),
                             ("stability_score_thresh", args.stability_thresh), ("batch_size", args.batch_size),
                             ("skip_covered", args.skip_covered))
           if v is not None}
    engine = None
    if any(m in SAMREG_METHODS for m in methods):
        engine = Engine.load(args.model, providers=args.provider, threads=args.threads, precision=args.precision)
        if not engine.manifest.get("source", {}).get("trained", True):
            print("WARNING: model is UNTRAINED (random weights); samreg-rt rows are meaningless", file=sys.stderr)
    settings = EvalSettings(amg=amg, baseline_max_side=args.baseline_max_side)
    command = "samreg-rt " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else "samreg-rt eval"
    records = run_eval(args.manifest, args.out, engine, methods=methods, pair_ids=args.pairs,
                       settings=settings, command=command, model=args.model)
    failed = [f"{r['pair']}/{r['method']}" for r in records if r["time_s"] is None]
    print(json.dumps({"out": str(args.out), "records": len(records), "failed": failed}, indent=1))
    return 0 if not failed else 1
