"""Classical intensity-based baselines run from Python: elastix (affine then B-spline, mutual
information, ``itk-elastix``) and ANTs SyN (``antspyx``).

Both return a displacement field in samreg-rt's convention (``samreg_rt.ddf``): on the FIXED grid,
in pixels (voxels), components in array-axis order ((dy, dx) in 2-D), ``warped(p) = moving(p +
u(p))``. Conversion from ITK: the images are handed over with zero origin and identity direction,
so a pixel's physical point is its index times the spacing (no LPS flips, no file orientation: the
moving image is assumed to be on a grid of the fixed image's shape covering the same field of
view, as everywhere in samreg-rt). Both tools' transforms map fixed physical points to moving
physical points (the direction needed to warp moving onto fixed), so the field is ``T(p) - p``,
converted from physical units to pixels per axis. ITK orders vector components x, y(, z), with x
the LAST numpy axis for ``itk`` images (components reversed here) but the FIRST numpy axis for
``ants`` images (``ants.from_numpy`` keeps numpy's axis order: no reversal).

Threads are pinned to one: itk-elastix 0.25.4 crashed (segfault) at the start of its default
B-spline stage with two threads, and ANTs with two threads gave different results run to run.
Large 2-D images are registered on a copy area-downsampled to at most ``max_side`` pixels per side
and the field is resized back (``ddf.resize_field``). Inputs are taken as grey (the mean of RGB)
and min-max scaled to [0, 1]; ``highpass`` optionally removes slow illumination changes (needed
on fundus photographs, where otherwise the static circular field of view dominates the metric).

Install: ``pip install itk-elastix==0.25.4`` and ``pip install --no-deps antspyx==0.6.3`` plus its
runtime dependencies (antspyx declares numpy<2.4 and scipy<1.16, which samreg-rt's pins exceed; it
imports and runs with numpy 2.4.6 and scipy 1.17.1).
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field as dc_field
from pathlib import Path

import cv2
import numpy as np

from . import ddf
from .errors import InputError, SamregError

__all__ = ["BaselineResult", "BaselineUnavailable", "METHODS", "available", "elastix", "ants_syn",
           "run_baseline"]

THREADS = 1


class BaselineUnavailable(SamregError):
    """A baseline whose package is not installed (or fails to import)."""


@dataclass
class BaselineResult:
    """field: float64 (H, W, 2) or (I, J, K, 3) displacement on the fixed grid in pixels (voxels),
    array-axis order (module docstring). time_s: wall seconds of registration and conversion.
    params: the settings used (working shape, tool parameters)."""

    method: str
    field: np.ndarray
    time_s: float
    params: dict = dc_field(default_factory=dict)


def _grey(image: np.ndarray, name: str, ndim: int) -> np.ndarray:
    """(H, W), (H, W, 3|4) or (I, J, K) -> float32 grey scaled to [0, 1]."""
    x = np.asarray(image)
    if x.dtype.kind not in "biuf":
        raise InputError(f"{name}: expected a numeric image, got dtype {x.dtype}")
    if ndim == 2 and x.ndim == 3 and x.shape[2] in (3, 4):
        x = x[..., :3].astype(np.float32).mean(axis=2)
    if x.ndim != ndim:
        raise InputError(f"{name}: expected a {ndim}-D image, got shape {x.shape}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise InputError(f"{name}: image contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _prepare(fixed: np.ndarray, moving: np.ndarray, spacing: object, max_side: int,
             highpass: float | None = None
             ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], tuple[int, ...]]:
    """Grey inputs on the working grid (minus their Gaussian blur of ``highpass`` working pixels
    when given), the working spacing and the original fixed shape."""
    f0 = np.asarray(fixed)
    ndim = 3 if f0.ndim == 3 and f0.shape[2] not in (3, 4) else 2
    f, m = _grey(fixed, "fixed", ndim), _grey(moving, "moving", ndim)
    if f.shape != m.shape:
        raise InputError(f"fixed and moving: shapes {f.shape} and {m.shape} differ (take the moving "
                         "image on the fixed grid first)")
    sp = (1.0,) * ndim if spacing is None else tuple(float(s) for s in np.ravel(spacing))
    if len(sp) != ndim or not all(np.isfinite(s) and s > 0 for s in sp):
        raise InputError(f"spacing: expected {ndim} positive numbers per array axis, got {spacing!r}")
    shape = f.shape
    if ndim == 2 and max(shape) > max_side:
        scale = max_side / max(shape)
        small = (max(2, round(shape[0] * scale)), max(2, round(shape[1] * scale)))
        f = cv2.resize(f, small[::-1], interpolation=cv2.INTER_AREA)
        m = cv2.resize(m, small[::-1], interpolation=cv2.INTER_AREA)
        sp = (sp[0] * shape[0] / small[0], sp[1] * shape[1] / small[1])
    if highpass:
        from scipy import ndimage

        # rescaled to [0, 1] again: ANTs initialises by the intensity centre of mass
        f, m = (_grey(x - ndimage.gaussian_filter(x, float(highpass)), name, ndim)
                for x, name in ((f, "fixed"), (m, "moving")))
    return f, m, sp, shape


def _finish(field_work: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    field_work = np.asarray(field_work, dtype=np.float64)
    if field_work.shape[:-1] == tuple(shape):
        return field_work
    return ddf.resize_field(field_work, shape)


def available(names: tuple[str, ...] | list[str] = ("elastix", "ants")) -> dict[str, str | None]:
    """Baseline name -> None when it can run here, else why not (the import error). Only the
    baselines in ``names`` are imported."""
    modules = {"elastix": "itk", "ants": "ants"}
    out: dict[str, str | None] = {}
    for name in names:
        if name not in modules:
            raise InputError(f"baseline {name!r}: expected one of {sorted(modules)}")
        try:
            if name == "ants":
                os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(THREADS)
            module = __import__(modules[name])
            if name == "elastix":
                module.ElastixRegistrationMethod  # noqa: B018  (lazy attribute: loads elastix)
            out[name] = None
        except Exception as exc:  # ImportError, or a binary module failing to load
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def elastix(fixed: np.ndarray, moving: np.ndarray, spacing: object = None, max_side: int = 512,
            highpass: float | None = None, iterations: int = 256, grid_spacing: float = 10.0) -> BaselineResult:
    """elastix: affine then cubic B-spline (elastix's default maps: 4 resolutions,
    AdvancedMattesMutualInformation, the B-spline stage adds a bending-energy penalty), one thread.

    fixed, moving: (H, W[, 3]) images or (I, J, K) volumes of one shape. spacing: mm (or any unit)
    per array axis, default 1. max_side: 2-D working size limit (px). highpass: subtract a Gaussian
    blur of this sigma (working px) from both images first (background/illumination removal, e.g.
    for fundus photographs); None: off. iterations: per resolution
    and stage. grid_spacing: final B-spline control spacing in physical units of the working grid.
    """
    try:
        import itk
    except ImportError as exc:
        raise BaselineUnavailable(f"elastix needs itk-elastix ({exc}); pip install itk-elastix==0.25.4") from None
    t = time.perf_counter()
    f, m, sp, shape = _prepare(fixed, moving, spacing, max_side, highpass)
    images = []
    for arr in (f, m):
        img = itk.image_from_array(np.ascontiguousarray(arr))
        img.SetSpacing([float(s) for s in sp[::-1]])        # ITK order: x = last numpy axis
        images.append(img)
    po = itk.ParameterObject.New()
    for kind in ("affine", "bspline"):
        pm = po.GetDefaultParameterMap(kind)
        pm["MaximumNumberOfIterations"] = [str(int(iterations))]
        if kind == "bspline":
            pm["FinalGridSpacingInPhysicalUnits"] = [str(float(grid_spacing))]
        po.AddParameterMap(pm)
    # transformix writes deformationField.nii into its output directory (the current one if unset)
    with tempfile.TemporaryDirectory(prefix="samreg_elastix_") as tmp:
        try:
            _, tp = itk.elastix_registration_method(images[0], images[1], parameter_object=po,
                                                    log_to_console=False, number_of_threads=THREADS)
            df = itk.transformix_deformation_field(images[1], tp, output_directory=tmp,
                                                   log_to_console=False)
        except RuntimeError as exc:
            raise SamregError(f"elastix failed: {str(exc).strip().splitlines()[-1][:300]}") from None
        phys = np.asarray(itk.array_from_image(df), dtype=np.float64)     # (..., ndim) in x, y(, z)
    field = phys[..., ::-1] / np.asarray(sp)
    return BaselineResult("elastix", _finish(field, shape), time.perf_counter() - t,
                          {"working_shape": list(f.shape), "spacing": list(sp), "iterations": iterations,
                           "grid_spacing": grid_spacing, "highpass": highpass, "threads": THREADS,
                           "stages": "affine + bspline, AdvancedMattesMutualInformation"})


def ants_syn(fixed: np.ndarray, moving: np.ndarray, spacing: object = None, max_side: int = 512,
             highpass: float | None = None, seed: int = 1) -> BaselineResult:
    """ANTs ``SyN`` (ANTsPy's preset: affine then symmetric diffeomorphic normalisation, mutual
    information), one thread, fixed random seed. Arguments as ``elastix``."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(THREADS)
    try:
        import ants
    except ImportError as exc:
        raise BaselineUnavailable(f"ANTs needs antspyx ({exc}); pip install --no-deps antspyx==0.6.3") from None
    t = time.perf_counter()
    f, m, sp, shape = _prepare(fixed, moving, spacing, max_side, highpass)
    fi = ants.from_numpy(np.ascontiguousarray(f), spacing=tuple(float(s) for s in sp))
    mi = ants.from_numpy(np.ascontiguousarray(m), spacing=tuple(float(s) for s in sp))
    with tempfile.TemporaryDirectory(prefix="samreg_ants_") as tmp:
        try:
            # the seed is read from ants.config (``ants.set_ants_deterministic`` would also reseed
            # numpy's global generator); ``registration`` ignores a random_seed keyword
            ants.config._random_seed = int(seed)
            reg = ants.registration(fi, mi, type_of_transform="SyN", outprefix=str(Path(tmp) / "reg_"))
            composite = ants.apply_transforms(fi, mi, reg["fwdtransforms"], compose=str(Path(tmp) / "fwd_"))
            phys = np.asarray(ants.image_read(composite).numpy(), dtype=np.float64)   # (..., ndim), numpy axis order
        except (RuntimeError, ValueError) as exc:
            raise SamregError(f"ANTs SyN failed: {str(exc).strip().splitlines()[-1][:300]}") from None
    field = phys / np.asarray(sp)
    return BaselineResult("ants", _finish(field, shape), time.perf_counter() - t,
                          {"working_shape": list(f.shape), "spacing": list(sp), "seed": seed, "highpass": highpass,
                           "threads": THREADS, "type_of_transform": "SyN"})


METHODS = {"elastix": elastix, "ants": ants_syn}


def run_baseline(name: str, fixed: np.ndarray, moving: np.ndarray, spacing: object = None,
                 max_side: int = 512, highpass: float | None = None) -> BaselineResult:
    """Run baseline ``name`` (``elastix`` or ``ants``); see those functions."""
    if name not in METHODS:
        raise InputError(f"baseline {name!r}: expected one of {sorted(METHODS)}")
    return METHODS[name](fixed, moving, spacing=spacing, max_side=max_side, highpass=highpass)
