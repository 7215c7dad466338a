"""Registering one or many pairs into an output directory: atomic files, resumable batches."""
from __future__ import annotations

import csv
import fcntl
import json
import os
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from .correspondence import overlay, write_png
from .engine import Engine
from .errors import InputError, OutputError, SamregError
from .io import atomic_write, load_image
from .pipeline import PRESETS, register
from .prompt import register_prompts

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DONE_FILE = "run.json"


def read_pairs_list(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """Read a CSV with columns ``fixed,moving[,id]`` -> [(id, fixed, moving)].

    Relative image paths are taken relative to the CSV's folder. Ids (default: the row number)
    must be plain names (letters, digits, ``._-``) so that outputs stay inside the output folder.
    """
    path = Path(path)
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read pairs list ({exc})") from None
    if not rows or not {"fixed", "moving"} <= set(rows[0]):
        raise InputError(f"{path}: a pairs list needs a header with columns fixed,moving[,id] and at least one row")
    jobs, seen = [], set()
    for n, row in enumerate(rows, start=1):
        pair_id = (row.get("id") or f"pair{n:04d}").strip()
        if not SAFE_ID.match(pair_id) or pair_id in seen:
            raise InputError(f"{path}: row {n}: id {pair_id!r} is not a unique plain name ([A-Za-z0-9._-])")
        seen.add(pair_id)
        cells = [row.get(k) for k in ("fixed", "moving")]
        if any(not isinstance(c, str) or not c.strip() for c in cells):
            raise InputError(f"{path}: row {n}: needs a fixed and a moving image path, got {cells}")
        fixed, moving = (str((path.parent / c.strip()).resolve()) for c in cells)
        jobs.append((pair_id, fixed, moving))
    return jobs


@contextmanager
def pair_lock(target: Path) -> Iterator[bool]:
    """Create the output folder ``target`` if needed and hold an exclusive lock on it (``flock`` on
    the folder itself: no lock file) while a pair is checked, registered and written. Two runs
    writing into one output folder thus never register the same pair at the same time: the second
    waits, then finds the pair complete. The kernel drops the lock when its process dies (SIGKILL
    included), so a killed run leaves no stale lock. Yields whether this call created the folder.
    """
    created = not target.exists()
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise OutputError(f"{target}: cannot create or open the output folder ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield created
    finally:
        os.close(fd)  # releases the lock


def remove_stale_temporaries(target: Path) -> list[str]:
    """Delete the temporary files (``.NAME.*.tmp`` of ``io.atomic_write``) that a killed run left
    in ``target``; call only while holding ``pair_lock(target)``. Returns their names."""
    stale = sorted(p.name for p in target.glob(".*.tmp") if p.is_file())
    for name in stale:
        (target / name).unlink(missing_ok=True)
    return stale


def is_done(out_dir: Path) -> bool:
    """True when ``out_dir`` holds a completed registration (run.json written last, and valid)."""
    try:
        record = json.loads((out_dir / DONE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return all((out_dir / name).is_file() for name in record.get("outputs", []))


def dense_field(corr, fixed_img, moving_img, preset: str = "default") -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit the dense field to the ROI pairs; return it with the warped moving image.

    Field: float64 (H, W, 2) (dy, dx) px on the fixed image's original grid (backward warp:
    warped(p) = moving(p + u(p))). Warped: RGB uint8 (H, W, 3). With no ROI pair the field is the
    identity (with a warning); so is a field that lowers the images' NCC when the preset checks it
    (``Preset.check_similarity``, with a warning). Also returns the fit's summary (folding ratio,
    iterations, convergence, ROI Dice, the NCC before/after and whether the field was kept).
    """
    from . import ddf

    shape = fixed_img.array.shape[:2]
    checked = ddf.fit_checked(corr, fixed_img.array, moving_img.array, PRESETS[preset].check_similarity)
    field = ddf.identity(shape)
    if checked.fit is None:
        warnings.warn("no ROI pairs: the dense field is the identity", stacklevel=2)
        summary = {"folding_ratio": 0.0, "iterations": 0, "converged": True, "roi_dice_mean": None}
    else:
        result = checked.fit
        summary = {"folding_ratio": float(result.folding_ratio), "iterations": int(result.iterations),
                   "converged": bool(result.converged), "roi_dice_mean": float(np.mean(result.roi_dice))}
        if checked.check is not None:
            summary.update(ncc_identity=checked.check.ncc_identity, ncc_field=checked.check.ncc_field,
                           field_kept=checked.kept)
        if checked.kept:
            field = ddf.resize_field(result.field_px, shape, moving_img.array.shape[:2])
        else:
            warnings.warn(f"{moving_img.path or 'moving'}: the fitted {checked.note} with the fixed image: "
                          "the dense field is the identity", stacklevel=2)
    moving = moving_img.array
    warped = ddf.warp(moving.astype(np.float32), field, order=1)
    if moving.dtype == np.uint8:
        warped = np.clip(np.rint(warped), 0, 255).astype(np.uint8)
    else:
        lo, hi = float(moving.min()), float(moving.max())
        warped = np.clip((warped - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(warped), 0, 255).astype(np.uint8)
    rgb = warped if warped.ndim == 3 else np.repeat(warped[:, :, None], 3, axis=2)
    return field, rgb, summary


def register_one(fixed: str, moving: str, engine: Engine, out_dir: str | os.PathLike,
                 preset: str = "default", fit_ddf: bool = False,
                 prompts: list[tuple[float, ...]] | None = None, **overrides) -> dict:
    """Register one pair and write correspondence.npz, pairs.csv, overlay.png and run.json
    (and ddf.npy + warped_moving.png with ``fit_ddf``). With ``prompts`` (points x,y or boxes
    x0,y0,x1,y1 in fixed-image pixels) the prompt mode replaces automatic mask generation.

    Each file is written atomically; run.json comes last and marks the pair as complete. The BLAS and
    OpenMP pools (numpy, FAISS, the dense field's fit) are limited to ``engine.threads``.
    """
    with threadpool_limits(engine.threads):
        return _register_one(fixed, moving, engine, out_dir, preset, fit_ddf, prompts, overrides)


def _register_one(fixed: str, moving: str, engine: Engine, out_dir: str | os.PathLike, preset: str, fit_ddf: bool,
                  prompts: list[tuple[float, ...]] | None, overrides: dict) -> dict:
    out = Path(out_dir)
    fixed_img, moving_img = load_image(fixed), load_image(moving)
    t = time.perf_counter()
    if prompts:
        corr = register_prompts(fixed_img, moving_img, engine, prompts, preset=preset)
        timings: dict[str, float] = {}
        counts = {"fixed": {"rois": len(corr.fixed.masks)}, "moving": {"rois": len(corr.moving.masks)},
                  "pairs": int(len(corr.pairs))}
    else:
        reg = register(fixed_img, moving_img, engine, preset=preset, **overrides)
        corr, timings, counts = reg.correspondence, reg.timings, reg.counts
    total = time.perf_counter() - t
    field_summary = None
    if fit_ddf:  # everything is computed before the first file is written
        t = time.perf_counter()
        field, warped, field_summary = dense_field(corr, fixed_img, moving_img, preset)
        timings["ddf"] = time.perf_counter() - t
    picture = overlay(corr, fixed_img.array, moving_img.array)
    t = time.perf_counter()
    try:
        corr.save(out / "correspondence.npz")
        corr.write_pairs_csv(out / "pairs.csv")
        write_png(out / "overlay.png", picture)
        outputs = ["correspondence.npz", "pairs.csv", "overlay.png"]
        if fit_ddf:
            from .ddf import save_field

            save_field(out / "ddf.npy", field)
            write_png(out / "warped_moving.png", warped)
            outputs += ["ddf.npy", "warped_moving.png"]
        timings["write"] = time.perf_counter() - t
        record = {"fixed": fixed, "moving": moving, "preset": preset, "model": corr.model,
                  "timings_s": {k: round(v, 4) for k, v in timings.items()}, "register_s": round(total, 4),
                  "counts": counts, "params": corr.params, "ddf": field_summary, "outputs": outputs}
        with atomic_write(out / DONE_FILE, "w") as handle:
            json.dump(record, handle, indent=1)
    except OSError as exc:  # disk full, permissions, a file where a folder should be
        raise OutputError(f"{exc.filename or out}: cannot write output ({exc.strerror or exc})") from None
    return record


def register_many(jobs: list[tuple[str, str, str]], engine: Engine, out_dir: str | os.PathLike,
                  preset: str = "default", progress: bool = True, fit_ddf: bool = False,
                  prompts: list[tuple[float, ...]] | None = None, **overrides) -> dict:
    """Register (id, fixed, moving) jobs with one engine; pairs already complete are skipped.

    A single job with an empty id writes straight into ``out_dir``. A job that fails with a
    samreg-rt error is reported and the batch goes on. Each pair is registered while holding
    ``pair_lock`` on its folder, so concurrent runs into one ``out_dir`` share the work without
    registering a pair twice; temporary files left by a killed run are removed first. A pair
    folder that is a symbolic link is refused (outputs stay inside ``out_dir``). Returns a
    summary dict.
    """
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise OutputError(f"{root}: not a directory (the output path exists as a file)")
    summary = {"out": str(root), "done": [], "skipped": [], "errors": {}}
    for pair_id, fixed, moving in tqdm(jobs, disable=not progress, desc="register", unit="pair"):
        target = root / pair_id if pair_id else root
        try:
            if pair_id and target.is_symlink():
                raise OutputError(f"{target}: pair output folder is a symbolic link; outputs stay inside {root}")
            with pair_lock(target) as created:
                if is_done(target):
                    summary["skipped"].append(pair_id or str(target))
                    continue
                remove_stale_temporaries(target)
                try:
                    record = register_one(fixed, moving, engine, target, preset=preset, fit_ddf=fit_ddf,
                                          prompts=prompts, **overrides)
                except SamregError:
                    if created and not any(target.iterdir()):
                        target.rmdir()  # leave no empty folder for a pair that failed
                    raise
        except SamregError as exc:
            summary["errors"][pair_id or str(target)] = str(exc)
            continue
        summary["done"].append({"id": pair_id or str(target), "pairs": record["counts"]["pairs"],
                                "rois": [record["counts"]["fixed"]["rois"], record["counts"]["moving"]["rois"]],
                                "register_s": record["register_s"]})
    summary["failed"] = len(summary["errors"])
    return summary
