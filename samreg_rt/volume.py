"""3-D NIfTI volumes registered slice by slice with the 2-D pipeline.

Geometry. A ``Volume`` keeps the array exactly as stored (nibabel's axis order i, j, k), the voxel
sizes from the header (``pixdim``, what ITK reads) and the header's 4x4 affine. The ACDC headers
carry an affine whose columns have length 1 mm although ``pixdim`` says 1.37 x 1.37 x 10 mm: the
affine is trusted for directions and origin only, and the voxel sizes come from ``pixdim``
(``Volume.world`` is the affine rebuilt that way).

Slice-wise registration (``register_volume``), in the spirit of the reference's 3-D scripts but
on the arrays themselves (no rendering, no resampling to a target spacing):

- slices are taken along one array axis, by default the one with the largest voxel size (the
  through-plane axis of a stack of 2-D acquisitions); a slice is the 2-D array of the two other
  axes in their stored order (rows = the lower axis index), with their spacing;
- intensities are mapped to uint8 once per volume (percentiles 0.5 and 99.5), so every slice of a
  volume shares one window;
- each fixed slice is matched to the moving slice nearest to it in physical position along the
  fixed slice normal (``Volume.world``); with identical geometry that is the same index. A fixed
  slice with no moving slice within half a moving slice spacing gets no partner;
- every pair of slices is registered with ``pipeline.register`` (one encoder pass per slice, one
  loaded engine for all of them) and a 2-D field is fitted with ``ddf.fit_correspondence``;
- the 3-D field is assembled from the per-slice 2-D fields: in-plane components from the slice's
  field (resized to the slice's original grid), through-plane component the constant offset to the
  matched moving slice (0 with identical geometry).

Limitation: this is 2.5-D. There is no through-plane deformation and no coupling between slices, so
neighbouring slices can move inconsistently, and motion across slices (e.g. the base of the heart
moving towards the apex between ED and ES) cannot be recovered. A slice whose correspondence is
empty (no ROI survived, or nothing paired) keeps an identity in-plane field (with a warning).
As in ``samreg_rt.ddf``, a moving slice with another in-plane shape is taken on the fixed slice's
grid (both assumed to cover the same field of view).
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field as dc_field
from pathlib import Path

import cv2
import numpy as np

from . import ddf
from .engine import Engine
from .errors import InputError, SamregError
from .io import Image, open_nifti, read_nifti_data
from .pipeline import PRESETS, Registration, register

log = logging.getLogger("samreg_rt")
MAX_VOXELS = 1 << 28  # refuse larger volumes from the header, before reading them (1 GiB as float32)

__all__ = ["Volume", "load_volume", "SliceResult", "VolumeRegistration", "register_volume",
           "default_axis", "to_uint8", "match_slices", "resize_labels", "jacobian_determinant_3d",
           "warp_volume", "warp_labels_volume"]


@dataclass(frozen=True)
class Volume:
    """A 3-D image as stored in its NIfTI file.

    array: (I, J, K) in the file's axis order, any real dtype, finite. spacing_mm: voxel size along
    each array axis in mm (header pixdim). affine: the header's 4x4 voxel -> world (mm) matrix as
    nibabel reports it (sform, else qform). axcodes: the anatomical direction of each array axis
    (nibabel's ``aff2axcodes``, RAS+ world, e.g. ('L', 'P', 'S')). path: the file.
    """

    array: np.ndarray
    spacing_mm: tuple[float, float, float]
    affine: np.ndarray
    axcodes: tuple[str, str, str]
    path: str

    @property
    def direction(self) -> np.ndarray:
        """(3, 3) unit direction of each array axis in world space, one per column."""
        a = self.affine[:3, :3]
        return a / np.linalg.norm(a, axis=0)

    @property
    def world(self) -> np.ndarray:
        """(4, 4) voxel index -> world mm with the header's directions and origin and the pixdim
        voxel sizes (differs from ``affine`` when the two disagree, as in ACDC)."""
        out = np.eye(4)
        out[:3, :3] = self.direction * np.asarray(self.spacing_mm)
        out[:3, 3] = self.affine[:3, 3]
        return out

    def slice(self, axis: int, index: int) -> np.ndarray:
        """The 2-D slice ``index`` along ``axis``: the two other axes in stored order."""
        return np.take(self.array, index, axis=axis)

    def slice_spacing(self, axis: int) -> tuple[float, float]:
        """(row, column) mm per pixel of a slice along ``axis``."""
        rest = [s for a, s in enumerate(self.spacing_mm) if a != axis]
        return float(rest[0]), float(rest[1])


def load_volume(path: str | os.PathLike) -> Volume:
    """Read a 3-D NIfTI (``.nii`` / ``.nii.gz``); trailing axes of length 1 are dropped.

    Raises ``InputError`` naming the file when it is missing or unreadable, is not 3-D (e.g. a 4-D
    time series), has more than ``MAX_VOXELS`` voxels (checked on the header, before reading),
    has non-finite values, non-positive or non-finite voxel sizes (as stored: a zero pixdim is not
    taken as 1), or a singular or non-finite affine.
    """
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    img, zooms = open_nifti(p)
    voxels = int(np.prod(img.shape, dtype=np.float64))
    if voxels > MAX_VOXELS:  # from the header, before the data is read
        raise InputError(f"{p}: volume of shape {tuple(img.shape)} ({voxels} voxels) exceeds the limit of "
                         f"{MAX_VOXELS} voxels")
    try:
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel cannot build an affine from a broken header
        raise InputError(f"{p}: cannot read the NIfTI affine ({type(exc).__name__}: {exc})") from None
    array = read_nifti_data(img, p)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(f"{p}: NIfTI of shape {array.shape} is not a 3-D volume (4-D and 2-D files "
                         "are not supported here)")
    if array.dtype.kind not in "biuf":
        raise InputError(f"{p}: unsupported data type {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{p}: volume contains NaN or infinite values")
    spacing = zooms[:3]
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"{p}: voxel sizes (pixdim) {spacing} must be positive and finite")
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InputError(f"{p}: affine is not a finite 4x4 matrix")
    lin = affine[:3, :3]
    norms = np.linalg.norm(lin, axis=0)
    if (norms <= 0).any() or abs(np.linalg.det(lin / np.where(norms > 0, norms, 1.0))) < 1e-6:
        raise InputError(f"{p}: affine is singular (its voxel axes do not span 3-D space)")
    return Volume(array=array, spacing_mm=(spacing[0], spacing[1], spacing[2]), affine=affine,
                  axcodes=tuple(nib.aff2axcodes(affine)), path=str(p))


def _as_volume(item: Volume | str | os.PathLike) -> Volume:
    return item if isinstance(item, Volume) else load_volume(item)


def default_axis(volume: Volume) -> int:
    """The slice axis: the array axis with the largest voxel size (the first on ties)."""
    return int(np.argmax(volume.spacing_mm))


def to_uint8(array: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map a volume to uint8 with one window for all its voxels: the ``low`` and ``high``
    percentiles go to 0 and 255 (clipped). A constant volume becomes zeros."""
    x = array.astype(np.float32)
    lo, hi = np.percentile(x, [low, high])
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    return np.clip(np.rint((x - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def match_slices(fixed: Volume, moving: Volume, axis: int) -> np.ndarray:
    """For each fixed slice along ``axis``, the index of the moving slice nearest to it in physical
    position along the fixed slice normal, or -1 when none lies within half a moving slice spacing.

    Raises ``InputError`` when the two volumes' ``axis`` directions are not parallel (the slices
    would not be parallel planes).
    """
    n = fixed.direction[:, axis]
    dm = moving.direction[:, axis]
    if abs(float(n @ dm)) < 0.99:
        raise InputError(f"{fixed.path} and {moving.path}: slice axis {axis} points in different "
                         f"directions ({fixed.axcodes[axis]} vs {moving.axcodes[axis]}); resample one "
                         "volume onto the other's grid first")
    pos_f = n @ fixed.world[:3, 3] + np.arange(fixed.array.shape[axis]) * fixed.spacing_mm[axis] * float(n @ fixed.direction[:, axis])
    pos_m = n @ moving.world[:3, 3] + np.arange(moving.array.shape[axis]) * moving.spacing_mm[axis] * float(n @ dm)
    dist = np.abs(pos_f[:, None] - pos_m[None, :])
    best = dist.argmin(axis=1)
    tol = 0.5 * moving.spacing_mm[axis] + 1e-3
    return np.where(dist[np.arange(len(best)), best] <= tol, best, -1).astype(np.int64)


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of a 2-D label map with pixel-centre alignment (classes never
    blend): output pixel i takes input pixel ``floor((i + 0.5) * n_in / n_out)`` per axis."""
    if labels.shape == tuple(shape):
        return labels
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(np.intp), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(np.intp), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def _resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == tuple(shape):
        return image
    interp = cv2.INTER_AREA if shape[0] * shape[1] < image.shape[0] * image.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(image.astype(np.float32), (shape[1], shape[0]), interpolation=interp)


@dataclass
class SliceResult:
    """One fixed slice: ``fixed_index`` along the slice axis, ``moving_index`` its partner (-1:
    none), ``registration`` and ``fit`` (None when not run or when the correspondence is empty),
    ``field`` the in-plane (H, W, 2) px field on the fixed slice's grid (module docstring),
    ``note`` why the field is the identity ('' otherwise), ``time_s`` seconds spent."""

    fixed_index: int
    moving_index: int
    registration: Registration | None
    fit: ddf.FieldResult | None
    field: np.ndarray
    note: str
    time_s: float


@dataclass
class VolumeRegistration:
    """Result of ``register_volume``.

    axis: the slice axis. slices: one ``SliceResult`` per fixed slice (registered or not).
    field: float64 (I, J, K, 3) displacement in voxels on the fixed grid, components in array-axis
    order: fixed voxel p maps to moving voxel p + field(p), the moving volume taken with the fixed
    slice shape in-plane. registered: fixed slice indices that were registered.
    """

    fixed: Volume
    moving: Volume
    axis: int
    slices: list[SliceResult]
    field: np.ndarray
    registered: list[int] = dc_field(default_factory=list)

    @property
    def time_s(self) -> float:
        """Seconds spent registering and fitting, all slices."""
        return float(sum(s.time_s for s in self.slices))

    def _moving_slice(self, array: np.ndarray, s: SliceResult) -> np.ndarray:
        return np.take(array, s.moving_index, axis=self.axis)

    def warp(self, moving_array: np.ndarray | None = None, order: int = 1) -> np.ndarray:
        """The moving volume (default: ``moving.array``; any array of the moving volume's shape)
        warped slice by slice onto the fixed grid (``ddf.warp``, bilinear or nearest), float32.
        Fixed slices without a moving partner are zero."""
        src = self.moving.array if moving_array is None else np.asarray(moving_array)
        self._check_moving(src, "moving_array")
        out = np.zeros(self.fixed.array.shape, np.float32)
        for s in self.slices:
            if s.moving_index < 0:
                continue
            m = _resize_image(self._moving_slice(src, s).astype(np.float32), s.field.shape[:2])
            _put(out, self.axis, s.fixed_index, ddf.warp(m, s.field, order=order))
        return out

    def warp_labels(self, moving_labels: np.ndarray) -> np.ndarray:
        """A label volume of the moving image warped slice by slice onto the fixed grid
        (``ddf.warp_labels``: per-class interpolation, classes never merge); background (0) where a
        fixed slice has no moving partner. Returns an array of the fixed shape and the input dtype."""
        lab = np.asarray(moving_labels)
        self._check_moving(lab, "moving_labels")
        out = np.zeros(self.fixed.array.shape, lab.dtype)
        for s in self.slices:
            if s.moving_index < 0:
                continue
            m = resize_labels(self._moving_slice(lab, s), s.field.shape[:2])
            _put(out, self.axis, s.fixed_index, ddf.warp_labels(m, s.field))
        return out

    def folding_ratio(self) -> float:
        """Fraction of fixed voxels where the map folds. With in-plane fields constant through the
        slice (no through-plane derivative) the 3-D Jacobian determinant equals the slice's 2-D one."""
        return float(np.mean([(ddf.jacobian_determinant(s.field) <= 0).mean() for s in self.slices]))

    def _check_moving(self, array: np.ndarray, name: str) -> None:
        if array.shape != self.moving.array.shape:
            raise InputError(f"{name}: shape {array.shape} differs from the moving volume "
                             f"{self.moving.array.shape} ({self.moving.path})")


def _put(volume: np.ndarray, axis: int, index: int, plane: np.ndarray) -> None:
    idx = [slice(None)] * volume.ndim
    idx[axis] = index
    volume[tuple(idx)] = plane


def _put_field(field: np.ndarray, axis: int, index: int, flat: np.ndarray) -> None:
    """Write a slice's in-plane (H, W, 2) field into the (I, J, K, 3) volume field."""
    inplane = [a for a in range(3) if a != axis]
    idx = [slice(None)] * 3
    idx[axis] = index
    plane = field[tuple(idx)]
    plane[..., inplane[0]] = flat[..., 0]
    plane[..., inplane[1]] = flat[..., 1]


def register_volume(fixed: Volume | str | os.PathLike, moving: Volume | str | os.PathLike,
                    engine: Engine, axis: int | None = None, preset: str = "default",
                    slices: list[int] | None = None, fit_options: dict | None = None,
                    **amg_overrides) -> VolumeRegistration:
    """Register a moving volume to a fixed volume slice by slice (module docstring).

    fixed, moving: NIfTI paths or ``Volume``. engine: one loaded ``Engine`` used for every slice.
    axis: slice axis (default ``default_axis(fixed)``). preset, amg_overrides: as in
    ``pipeline.register`` (e.g. ``points_per_side=8``). slices: fixed slice indices to register
    (default all); the others keep an identity in-plane field. fit_options: keywords for
    ``ddf.fit_correspondence``. Empty correspondences warn and give identity fields; so does a
    slice whose field lowers the slices' NCC when the preset checks it (``Preset.check_similarity``;
    the slice's note says so).
    """
    fv, mv = _as_volume(fixed), _as_volume(moving)
    axis = default_axis(fv) if axis is None else int(axis)
    if axis not in (0, 1, 2):
        raise InputError(f"axis: expected 0, 1 or 2, got {axis!r}")
    partner = match_slices(fv, mv, axis)
    n = fv.array.shape[axis]
    todo = list(range(n)) if slices is None else sorted({int(k) for k in slices})
    bad = [k for k in todo if not 0 <= k < n]
    if bad:
        raise InputError(f"slices: {bad} out of range for {n} slices along axis {axis} of {fv.path}")
    fixed8, moving8 = to_uint8(fv.array), to_uint8(mv.array)
    shape = tuple(d for a, d in enumerate(fv.array.shape) if a != axis)
    field = np.zeros((*fv.array.shape, 3))
    results = []
    for k in range(n):
        m = int(partner[k])
        flat = ddf.identity(shape)
        if k not in todo:
            results.append(SliceResult(k, m, None, None, flat, "not requested", 0.0))
            continue
        if m < 0:
            warnings.warn(f"{fv.path}: fixed slice {k} (axis {axis}) has no moving slice within half a "
                          "slice spacing; identity field", stacklevel=2)
            results.append(SliceResult(k, m, None, None, flat, "no moving slice", 0.0))
            continue
        t = time.perf_counter()
        fimg = Image(array=np.take(fixed8, k, axis=axis), spacing=fv.slice_spacing(axis), path=f"{fv.path}[{axis}:{k}]")
        mimg = Image(array=np.take(moving8, m, axis=axis), spacing=mv.slice_spacing(axis), path=f"{mv.path}[{axis}:{m}]")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the empty-correspondence warning is re-issued below per slice
            reg = register(fimg, mimg, engine, preset=preset, **amg_overrides)
        fit, note = None, ""
        try:
            checked = ddf.fit_checked(reg.correspondence, fimg.array, mimg.array, PRESETS[preset].check_similarity,
                                      **(fit_options or {}))
            fit, note = checked.fit, checked.note
            if checked.kept:
                flat = ddf.resize_field(fit.field_px, shape)
            elif fit is None:
                warnings.warn(f"{fv.path}: slice {k} (axis {axis}): no ROI pairs (fixed {reg.counts['fixed']['rois']}, "
                              f"moving {reg.counts['moving']['rois']} ROIs); identity field for this slice", stacklevel=2)
            else:
                log.info("slice %d: %s; identity field", k, note)
        except SamregError as exc:
            note = f"fit failed: {exc}"
            warnings.warn(f"{fv.path}: slice {k}: {note}; identity field", stacklevel=2)
        _put_field(field, axis, k, flat)
        results.append(SliceResult(k, m, reg, fit, flat, note, time.perf_counter() - t))
        log.info("slice %d/%d: %d pairs, %.1f s", k + 1, n, len(reg.correspondence.pairs), results[-1].time_s)
    offset = np.where(partner >= 0, partner - np.arange(n), 0).astype(np.float64)
    field[..., axis] = offset.reshape([-1 if a == axis else 1 for a in range(3)])
    return VolumeRegistration(fixed=fv, moving=mv, axis=axis, slices=results, field=field,
                              registered=[s.fixed_index for s in results if s.registration is not None])


def jacobian_determinant_3d(field: np.ndarray) -> np.ndarray:
    """Jacobian determinant of ``p -> p + u(p)`` for an (I, J, K, 3) field in voxels (array-axis
    order), float64 (I, J, K); derivatives by ``numpy.gradient`` per voxel (zero along an axis of
    length 1). The determinant does not depend on the voxel size. ``det <= 0`` marks folding."""
    u = np.asarray(field, dtype=np.float64)
    if u.ndim != 4 or u.shape[3] != 3:
        raise InputError(f"field: expected an (I, J, K, 3) field, got shape {u.shape}")
    jac = np.zeros(u.shape[:3] + (3, 3))
    for c in range(3):
        for a in range(3):
            if u.shape[a] > 1:
                jac[..., c, a] = np.gradient(u[..., c], axis=a)
        jac[..., c, c] += 1.0
    return np.linalg.det(jac)


def _sample_coords(field: np.ndarray) -> np.ndarray:
    u = np.asarray(field, dtype=np.float64)
    if u.ndim != 4 or u.shape[3] != 3 or not np.isfinite(u).all():
        raise InputError(f"field: expected a finite (I, J, K, 3) field, got shape {u.shape}")
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in u.shape[:3]], indexing="ij")
    return np.stack([g + u[..., a] for a, g in enumerate(grid)])


def warp_volume(image: np.ndarray, field: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Backward-warp a moving volume (I, J, K) with a 3-D field (I, J, K, 3) in voxels, array-axis
    order: ``out(p) = image(p + field(p))``, trilinear (order 1) or nearest (0), blending towards
    ``cval`` over the outer half voxel (as ``ddf.warp`` in 2-D). Returns float32; a zero field
    returns the image unchanged."""
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float32)
    if img.shape != np.shape(field)[:3]:
        raise InputError(f"image: shape {img.shape} does not match the field's grid {np.shape(field)[:3]}")
    return ndimage.map_coordinates(img, _sample_coords(field), order=order, mode="grid-constant",
                                   cval=cval).astype(np.float32)


def warp_labels_volume(labels: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Backward-warp an integer label volume with a 3-D field: every class's one-hot mask is
    interpolated trilinearly and each voxel takes the class of largest weight (ties to the smaller
    label), so classes never blend or merge; background (0) where the sample lies outside. Returns
    the input's shape and dtype; a zero field returns the labels unchanged."""
    from scipy import ndimage

    lab = np.asarray(labels)
    if lab.dtype != np.bool_ and lab.dtype.kind not in "iu":
        raise InputError(f"labels: expected a bool or integer label volume, got dtype {lab.dtype}")
    if lab.shape != np.shape(field)[:3]:
        raise InputError(f"labels: shape {lab.shape} does not match the field's grid {np.shape(field)[:3]}")
    coords = _sample_coords(field)
    classes = np.union1d(np.unique(lab), [0]).astype(lab.dtype)
    weights = np.stack([ndimage.map_coordinates((lab == c).astype(np.float32), coords, order=1,
                                                mode="grid-constant", cval=0.0) for c in classes])
    best = weights.argmax(axis=0)
    out = classes[best]
    out[weights.max(axis=0) <= 0] = 0
    return out.astype(lab.dtype)
