"""Dense displacement fields (DDF) from paired ROIs: fitting, warping, Jacobians, saving.

Conventions, used by every function here and in ``samreg_rt.metrics``:

- A field ``u`` is a float64 array ``(H, W, 2)`` on the FIXED grid, in pixels, with components in
  array-axis order: ``u[..., 0] = dy`` (rows, down) and ``u[..., 1] = dx`` (columns, right). This is
  the same order as ``spacing = (row, column)`` in mm per pixel everywhere in samreg-rt. (Landmarks
  in ``metrics`` are ``(x, y) = (column, row)``, as in the data set's CSV files.)
- Pixel centres sit at integer coordinates: pixel ``(i, j)`` is the point ``(y, x) = (i, j)``.
- Backward warp: ``warped(i, j) = moving(i + dy(i, j), j + dx(i, j))``, so the field maps each fixed
  pixel to where it lies in the moving image; ``warped`` is on the fixed grid.
- The moving image is taken on a grid of the same shape ``(H, W)`` as the fixed one: when the two
  working grids differ, the moving masks or image are resized to the fixed shape first (both images
  are assumed to cover the same field of view). ``resize_field`` turns a field into one between
  grids of other sizes, e.g. the original images.
- Sampling is bilinear with a constant outside the image (0 for masks): values at pixel ``-1`` and
  ``H`` are the constant, like ``grid_sample(padding_mode="zeros", align_corners=True)`` in pixels.
- ``field_mm = field_px * spacing`` per component, with the fixed grid's spacing; this is a physical
  displacement when both images share one physical frame and spacing.

Fitting (``fit``): the field is a cubic B-spline free-form deformation, fitted coarse to fine on
control grids of ``levels`` px spacing. A level with spacing s runs on the masks area-downsampled by
``s / levels[-1]`` (the last level at full resolution), and starts from the previous level's field,
projected by least squares onto its control grid (exact when the spacings halve: the spline spaces
are nested). At each level L-BFGS-B minimises

    loss = (1 - mean_k softDice(warp(M_k), F_k)) + bending_weight * E + membrane_weight * D

where ``F_k`` and ``M_k`` are the k-th fixed and moving masks smoothed by a Gaussian of
``smooth_sigma`` px of the level's grid, ``softDice(a, b) = 2 sum(a b) / (sum(a) + sum(b))``, every
ROI pair counts equally (not by area), and

    E = sum over pixels and both components of (u_yy^2 + 2 u_xy^2 + u_xx^2)

is the bending energy with the field and its derivatives in pixels (analytic B-spline
derivatives at the pixel centres). In 2-D this sum is dimensionless and does not change when the
same deformation is sampled at another resolution, so ``bending_weight`` means the same at every
image size: it is the mean-Dice gain one unit of bending energy must buy. For scale, a sinusoidal
displacement of amplitude ``a`` and wavelength ``L`` across a whole ``N x N`` image has
``E = 8 pi^4 (a/L)^2 (N/L)^2``, e.g. ``E ~ 12`` for a 4 px wave of wavelength N/2 and ``E ~ 0.3``
for a 2 px wave of wavelength N = 100 px. Affine fields have ``E = 0``, so with the bending energy
alone a field extrapolates the linear trend of the ROIs' displacements across the parts of the
image that no ROI covers. The membrane (diffusion) energy

    D = mean over pixels and both components of (u_y^2 + u_x^2)

(dimensionless, also independent of the image size) penalises every non-constant part, affine
included: its minimisers are harmonic away from the ROIs, and harmonic fields take their extremes
on the ROIs (maximum principle), so the displacement between and beyond the ROIs stays within the
range of the displacements on them. The gradients (of the bilinear sampling, the B-spline
upsampling and both energies) are analytic.
"""
from __future__ import annotations

import gzip
import io
import itertools
import math
import os
from dataclasses import dataclass, field as dc_field
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage, optimize, sparse

from .correspondence import Correspondence
from .errors import InputError
from .io import atomic_write

__all__ = ["FieldResult", "fit", "fit_correspondence", "identity", "warp", "warp_labels",
           "jacobian_determinant", "resize_field", "save_field", "load_field"]


# ----------------------------------------------------------------------------------------- checks

def _check_field(field: np.ndarray, name: str = "field") -> np.ndarray:
    field = np.asarray(field)
    if field.ndim != 3 or field.shape[2] != 2 or field.shape[0] < 2 or field.shape[1] < 2:
        raise InputError(f"{name}: expected an (H, W, 2) displacement field with H, W >= 2, "
                         f"got shape {field.shape}")
    if field.dtype.kind not in "iuf":
        raise InputError(f"{name}: expected a real-valued field, got dtype {field.dtype}")
    field = field.astype(np.float64, copy=False)
    if not np.isfinite(field).all():
        raise InputError(f"{name}: field contains NaN or infinite values")
    return field


def _check_spacing(spacing: object, name: str = "spacing") -> tuple[float, float] | None:
    if spacing is None:
        return None
    sp = np.asarray(spacing, dtype=np.float64).ravel()
    if sp.shape != (2,) or not np.isfinite(sp).all() or (sp <= 0).any():
        raise InputError(f"{name}: expected two positive finite numbers (row, column) in mm per "
                         f"pixel, got {spacing!r}")
    return float(sp[0]), float(sp[1])


def _check_masks(masks: object, name: str) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.dtype != np.bool_:
        raise InputError(f"{name}: expected bool masks, got dtype {masks.dtype}")
    if masks.ndim != 3 or masks.shape[1] < 2 or masks.shape[2] < 2:
        raise InputError(f"{name}: expected a (K, H, W) stack of masks with H, W >= 2, got shape "
                         f"{masks.shape}")
    empty = np.flatnonzero(~masks.any(axis=(1, 2)))
    if len(empty):
        raise InputError(f"{name}: mask(s) {empty.tolist()} are empty (no pixel set)")
    return masks


# ------------------------------------------------------------------------------------ sampling

class _Bilinear:
    """Bilinear interpolation of a multi-channel image, with derivatives, at many points.

    padded: (C, H + 2, W + 2) float image with a one-pixel border of the outside constant. The four
    bilinear coefficients of every cell are tabulated once, so that at a point with fractional
    offsets (fy, fx) in its cell, value = a + b fx + c fy + d fx fy.
    """

    def __init__(self, padded: np.ndarray):
        c, self.hp, self.wp = padded.shape
        v = np.pad(padded, ((0, 0), (0, 1), (0, 1)), mode="edge")
        v00, v01, v10, v11 = v[:, :-1, :-1], v[:, :-1, 1:], v[:, 1:, :-1], v[:, 1:, 1:]
        self.coef = [m.reshape(c, -1) for m in (v00, v01 - v00, v10 - v00, v11 - v10 - v01 + v00)]

    def __call__(self, py: np.ndarray, px: np.ndarray, grad: bool
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Values (C, P) at the (P,) float64 points (py, px), in pixels of the unpadded image, and
        with ``grad`` their derivatives d/dy and d/dx (C, P), 0 beyond the border (where the value
        is the constant)."""
        hp, wp = self.hp, self.wp
        y = np.clip(py + 1.0, 0.0, hp - 1.0)
        x = np.clip(px + 1.0, 0.0, wp - 1.0)
        i0 = np.minimum(np.floor(y), hp - 2).astype(np.intp)
        j0 = np.minimum(np.floor(x), wp - 2).astype(np.intp)
        dtype = self.coef[0].dtype
        fy = (y - i0).astype(dtype)
        fx = (x - j0).astype(dtype)
        idx = i0 * wp + j0
        a, b, c, d = (np.take(m, idx, axis=1) for m in self.coef)
        c += d * fx                                      # d value / dy = c + d fx
        value = c * fy
        value += a
        b_fx = b * fx
        value += b_fx
        if not grad:
            return value, None, None
        d *= fy
        d += b                                           # d value / dx = b + d fy
        c *= ((py > -1.0) & (py < hp - 2.0)).astype(dtype)
        d *= ((px > -1.0) & (px < wp - 2.0)).astype(dtype)
        return value, c, d


def _pad(image: np.ndarray, cval: float) -> np.ndarray:
    """(C, H, W) -> (C, H + 2, W + 2) with a border of ``cval``."""
    return np.pad(image, ((0, 0), (1, 1), (1, 1)), constant_values=cval)


def _sample_points(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flattened sample coordinates ``(i + dy, j + dx)`` of an (H, W, 2) field."""
    h, w = field.shape[:2]
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    return (yy + field[..., 0]).ravel(), (xx + field[..., 1]).ravel()


def identity(shape: tuple[int, int]) -> np.ndarray:
    """The zero displacement field, float64 ``(H, W, 2)``, for ``shape = (H, W)``."""
    return np.zeros((int(shape[0]), int(shape[1]), 2))


def warp(image: np.ndarray, field: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Backward-warp a moving image onto the fixed grid: ``out(p) = image(p + field(p))``.

    image: (H, W) or (H, W, C), numeric (not bool: use ``warp_labels``), on a grid of the field's
    shape. field: (H, W, 2) px, (dy, dx). order: 1 bilinear, 0 nearest pixel. cval: value outside
    the image (bilinear blends towards it over the last half pixel).
    Returns the warped image with the input's shape and dtype (integer types are rounded and
    clipped to their range). A zero field returns the image unchanged, bit for bit.
    """
    field = _check_field(field)
    image = np.asarray(image)
    if image.dtype == np.bool_ or image.dtype.kind not in "iuf":
        raise InputError(f"image: expected a numeric image, got dtype {image.dtype} "
                         "(use warp_labels for masks and label maps)")
    if image.ndim not in (2, 3) or image.shape[:2] != field.shape[:2]:
        raise InputError(f"image: shape {image.shape} does not match the field's grid "
                         f"{field.shape[:2]} (expected (H, W) or (H, W, C))")
    if order not in (0, 1):
        raise InputError(f"order: expected 0 (nearest) or 1 (bilinear), got {order!r}")
    h, w = field.shape[:2]
    data = image.reshape(h, w, -1).astype(np.float64)
    py, px = _sample_points(field)
    if order == 1:
        out, _, _ = _Bilinear(_pad(data.transpose(2, 0, 1), cval))(py, px, grad=False)
        out = out.T
    else:
        iy, ix = np.floor(py + 0.5).astype(np.intp), np.floor(px + 0.5).astype(np.intp)
        inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
        out = np.full((h * w, data.shape[2]), float(cval))
        out[inside] = data[iy[inside], ix[inside]]
    out = out.reshape(image.shape)
    if image.dtype.kind in "iu":
        info = np.iinfo(image.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(image.dtype)


def warp_labels(labels: np.ndarray, field: np.ndarray, fill: int = 0) -> np.ndarray:
    """Backward-warp an integer label map (or a bool mask) onto the fixed grid.

    Per-class linear interpolation then argmax: each output pixel takes the label with the largest
    bilinear weight among the (up to four) pixels around its sample point, which equals bilinearly
    warping every class's one-hot mask and taking the argmax, without the per-class memory; labels
    never blend into values that do not exist, and a binary mask is thresholded at 0.5. Ties go to
    the smaller label. Pixels whose sample point lies wholly outside the image get ``fill``.

    labels: (H, W) bool or integer, on a grid of the field's shape. field: (H, W, 2) px, (dy, dx).
    Returns an array of the input's shape and dtype; a zero field returns it unchanged.
    """
    field = _check_field(field)
    labels = np.asarray(labels)
    if labels.dtype != np.bool_ and labels.dtype.kind not in "iu":
        raise InputError(f"labels: expected a bool or integer label map, got dtype {labels.dtype}")
    if labels.shape != field.shape[:2]:
        raise InputError(f"labels: shape {labels.shape} does not match the field's grid {field.shape[:2]}")
    h, w = labels.shape
    py, px = _sample_points(field)
    i0, j0 = np.floor(py).astype(np.intp), np.floor(px).astype(np.intp)
    fy, fx = py - i0, px - j0
    corners = [(0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)]
    lab = np.zeros((4, h * w), dtype=labels.dtype)
    wgt = np.zeros((4, h * w))
    for n, (di, dj, weight) in enumerate(corners):
        ii, jj = i0 + di, j0 + dj
        inside = (ii >= 0) & (ii < h) & (jj >= 0) & (jj < w) & (weight > 0)
        lab[n, inside] = labels[ii[inside], jj[inside]]
        wgt[n, inside] = weight[inside]
    # score of each corner's label = total weight of the corners that carry the same label
    same = lab[:, None, :] == lab[None, :, :]
    score = (same * wgt[None, :, :]).sum(axis=1)
    score[wgt == 0] = -1.0
    # best score, ties to the smaller label: sort corners by label, argmax takes the first maximum
    order = np.argsort(lab, axis=0, kind="stable")
    score_sorted = np.take_along_axis(score, order, axis=0)
    best = np.take_along_axis(order, score_sorted.argmax(axis=0)[None], axis=0)[0]
    out = lab[best, np.arange(h * w)]
    out[(wgt > 0).sum(axis=0) == 0] = fill
    return out.reshape(h, w)


def jacobian_determinant(field: np.ndarray) -> np.ndarray:
    """Jacobian determinant of the map ``p -> p + field(p)``, float64 (H, W).

    det [[1 + d(dy)/dy, d(dy)/dx], [d(dx)/dy, 1 + d(dx)/dx]] with derivatives from ``numpy.gradient``
    (central differences in pixels, one-sided at the border). ``det <= 0`` marks folding.
    """
    field = _check_field(field)
    dyy, dyx = np.gradient(field[..., 0])
    dxy, dxx = np.gradient(field[..., 1])
    return (1.0 + dyy) * (1.0 + dxx) - dyx * dxy


def resize_field(field: np.ndarray, shape: tuple[int, int],
                 moving_shape: tuple[int, int] | None = None) -> np.ndarray:
    """The same mapping on other grids: a field on a fixed grid of ``shape`` pointing into a moving
    grid of ``moving_shape`` (default ``shape``).

    ``field`` (h, w, 2) px maps fixed pixel p to moving pixel p + field(p), both on (h, w) grids
    (see the module conventions). Grids are related by pixel-centre alignment, ``x_small = (X + 0.5)
    * w / W - 0.5`` per axis (cv2/PIL resize convention); the field is interpolated bilinearly with
    its border values extended. Returns float64 (H, W, 2) px, e.g. to warp the original moving
    image, or to score landmarks given in original pixels.
    """
    field = _check_field(field)
    h, w = field.shape[:2]
    H, W = int(shape[0]), int(shape[1])
    Hm, Wm = (H, W) if moving_shape is None else (int(moving_shape[0]), int(moving_shape[1]))
    if min(H, W, Hm, Wm) < 1:
        raise InputError(f"resize_field: shapes must be positive, got {shape} and {moving_shape}")
    small = cv2.resize(field, (W, H), interpolation=cv2.INTER_LINEAR) if (H, W) != (h, w) else field
    Y = np.arange(H, dtype=np.float64)[:, None]
    X = np.arange(W, dtype=np.float64)[None, :]
    y = (Y + 0.5) * h / H - 0.5
    x = (X + 0.5) * w / W - 0.5
    out = np.empty((H, W, 2))
    out[..., 0] = (y + small[..., 0] + 0.5) * Hm / h - 0.5 - Y
    out[..., 1] = (x + small[..., 1] + 0.5) * Wm / w - 0.5 - X
    return out


@dataclass(frozen=True)
class SimilarityCheck:
    """Normalised cross-correlation (NCC) of the fixed image with the moving image before and after
    warping by a fitted field; ``accepted`` when the field does not lower it."""

    ncc_identity: float
    ncc_field: float

    @property
    def accepted(self) -> bool:
        return self.ncc_field >= self.ncc_identity


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two images of one shape (0.0 when either is constant)."""
    a = np.asarray(a, np.float64).ravel() - np.mean(a)
    b = np.asarray(b, np.float64).ravel() - np.mean(b)
    norm = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / norm if norm > 0 else 0.0


def similarity_check(fixed: np.ndarray, moving: np.ndarray, field: np.ndarray) -> SimilarityCheck:
    """Does warping by ``field`` make the moving image more like the fixed one than no warping?

    fixed, moving: (H, W) or (H, W, C) numeric images of any size (channels averaged), resized
    bilinearly to the field's grid. field: (h, w, 2) px on the fixed working grid, pointing into
    the moving image resized to that grid (``fit_correspondence``'s convention). Both NCCs are taken
    over the pixels the field maps inside the moving image (a field that maps most of them outside
    is not accepted). The comparison is intensity NCC, so it assumes both images show the same
    modality. Returns a ``SimilarityCheck``.
    """
    field = _check_field(field)
    h, w = field.shape[:2]

    def on_grid(image: np.ndarray) -> np.ndarray:
        grey = np.asarray(image, np.float32)
        grey = grey.mean(axis=2) if grey.ndim == 3 else grey
        return cv2.resize(grey, (w, h), interpolation=cv2.INTER_LINEAR) if grey.shape != (h, w) else grey

    f, m = on_grid(fixed), on_grid(moving)
    py, px = _sample_points(field)
    inside = ((py >= 0) & (py <= h - 1) & (px >= 0) & (px <= w - 1)).reshape(h, w)
    if inside.mean() < 0.5:
        return SimilarityCheck(ncc_identity=ncc(f, m), ncc_field=-1.0)
    warped = warp(m, field, order=1)
    return SimilarityCheck(ncc_identity=ncc(f[inside], m[inside]), ncc_field=ncc(f[inside], warped[inside]))


# ------------------------------------------------------------------------------------ saving

def save_field(path: str | os.PathLike, field: np.ndarray, affine: np.ndarray | None = None) -> None:
    """Write a field atomically (temporary file, then ``os.replace``).

    ``.npy``: the float64 (H, W, 2) array as is. ``.nii`` / ``.nii.gz``: a NIfTI-1 vector image of
    shape (H, W, 1, 1, 2) (intent VECTOR, axes in array order: i = row, j = column; components
    (dy, dx) in the units of the field passed, px or mm) with the 4x4 ``affine`` (identity if None).
    """
    field = _check_field(field)
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".npy"):
        buf = io.BytesIO()
        np.save(buf, field)
        data = buf.getvalue()
    elif name.endswith(".nii") or name.endswith(".nii.gz"):
        import nibabel as nib
        aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        if aff.shape != (4, 4) or not np.isfinite(aff).all():
            raise InputError(f"affine: expected a finite 4x4 matrix, got shape {aff.shape}")
        img = nib.Nifti1Image(field[:, :, None, None, :], aff)
        img.header.set_intent("vector")
        data = img.to_bytes()
        if name.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
    else:
        raise InputError(f"{path}: unknown field format (use .npy, .nii or .nii.gz)")
    with atomic_write(path) as handle:
        handle.write(data)


def load_field(path: str | os.PathLike) -> np.ndarray:
    """Read a field written by ``save_field``: float64 (H, W, 2)."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith(".npy"):
            field = np.load(path, allow_pickle=False)
        elif name.endswith(".nii") or name.endswith(".nii.gz"):
            import nibabel as nib
            field = np.asarray(nib.load(path).dataobj)
            if field.ndim == 5 and field.shape[2:4] == (1, 1):
                field = field[:, :, 0, 0, :]
        else:
            raise InputError(f"{path}: unknown field format (use .npy, .nii or .nii.gz)")
    except FileNotFoundError:
        raise InputError(f"{path}: no such field file") from None
    except InputError:
        raise
    except Exception as exc:  # numpy and nibabel errors for truncated or foreign files
        raise InputError(f"{path}: not a readable field file ({type(exc).__name__}: {exc})") from None
    return _check_field(field, str(path))


# ------------------------------------------------------------------------------------ B-splines

def _bspline(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cubic B-spline kernel and its first two derivatives at t (in control spacings)."""
    a = np.abs(t)
    s = np.sign(t)
    inner, outer = a < 1.0, (a >= 1.0) & (a < 2.0)
    b0 = np.where(inner, 2.0 / 3.0 - a ** 2 + 0.5 * a ** 3, np.where(outer, (2.0 - a) ** 3 / 6.0, 0.0))
    b1 = np.where(inner, s * (-2.0 * a + 1.5 * a ** 2), np.where(outer, -s * (2.0 - a) ** 2 / 2.0, 0.0))
    b2 = np.where(inner, -2.0 + 3.0 * a, np.where(outer, 2.0 - a, 0.0))
    return b0, b1, b2


@dataclass
class _Basis:
    """Cubic B-spline basis along one axis of n pixels with control spacing s px.

    Control points sit at ``(n - 1) / 2 + m s`` for ``m = -M..M`` (centred, so halving the spacing
    gives a nested, finer space), enough that every pixel has its full four-point support.
    b, d1, d2: (len(coords), 2M + 1) values and first/second derivatives (per px) at ``coords``
    (default: the pixel centres 0..n-1).
    """

    b: np.ndarray
    d1: np.ndarray
    d2: np.ndarray

    @classmethod
    def make(cls, n: int, s: float, coords: np.ndarray | None = None) -> "_Basis":
        m = int(np.ceil((n - 1) / (2.0 * s))) + 1
        nodes = (n - 1) / 2.0 + s * np.arange(-m, m + 1)
        coords = np.arange(n, dtype=np.float64) if coords is None else coords
        b0, b1, b2 = _bspline((coords[:, None] - nodes[None, :]) / s)
        return cls(b0, b1 / s, b2 / s ** 2)


def _upsample(c: np.ndarray, by, bx) -> np.ndarray:
    """``by @ c[k] @ bx.T`` for k = 0, 1: controls (2, ny, nx) -> dense field (2, H, W).

    by (H, ny) and bx (W, nx) are dense or sparse matrices; with the transposed bases this is also
    the adjoint, dense gradient (2, H, W) -> control gradient (2, ny, nx). Sparse B-spline bases
    (four non-zeros a row) keep the product cheap and out of BLAS, whose thread start-up dominates
    such small products on a busy machine.
    """
    _, ny, nx = c.shape
    t = by @ c.transpose(1, 0, 2).reshape(ny, 2 * nx)                  # (H, 2 nx)
    t = t.reshape(-1, 2, nx).transpose(1, 0, 2).reshape(-1, nx)        # (2 H, nx)
    return (bx @ t.T).T.reshape(2, by.shape[0], bx.shape[0])


def _project(dense: np.ndarray, by: np.ndarray, bx: np.ndarray) -> np.ndarray:
    """Least-squares controls (2, ny, nx) whose B-spline best reproduces a dense (2, H, W) field."""
    return np.linalg.pinv(by) @ dense @ np.linalg.pinv(bx).T


class _Objective:
    """Loss and analytic gradient of one fitting level, as a function of the flattened controls.

    fixed: (K, H, W) smoothed fixed masks; moving: (K, H + 2, W + 2) smoothed moving masks with a
    zero border; both of one float dtype, which sets the precision of the sampling.
    by, bx: bases of the level. loss = 1 - mean_k softDice_k + bending_weight * E (module docstring).
    """

    def __init__(self, fixed: np.ndarray, moving: np.ndarray, by: _Basis, bx: _Basis,
                 bending_weight: float, membrane_weight: float = 0.0):
        k, h, w = fixed.shape
        self.fixed = fixed.reshape(k, h * w)
        self.moving = _Bilinear(moving)
        self.bending_weight = bending_weight
        self.membrane_weight = membrane_weight
        self.pixels = h * w
        self.fixed_sum = self.fixed.sum(axis=1).astype(np.float64)
        yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
        self.grid_y, self.grid_x = yy.ravel(), xx.ravel()
        # Gram matrices: E = sum_k <c_k, Gy2 c_k Gx0> + 2 <c_k, Gy1 c_k Gx1> + <c_k, Gy0 c_k Gx2>
        self.gy = [m.T @ m for m in (by.b, by.d1, by.d2)]
        self.gx = [m.T @ m for m in (bx.b, bx.d1, bx.d2)]
        self.up = (sparse.csr_array(by.b), sparse.csr_array(bx.b))
        self.down = (sparse.csr_array(by.b.T), sparse.csr_array(bx.b.T))
        self.shape = (2, by.b.shape[1], bx.b.shape[1])

    def bending(self, c: np.ndarray) -> tuple[float, np.ndarray]:
        """Bending energy E of controls c (2, ny, nx) and its gradient (2, ny, nx)."""
        gy, gx = self.gy, self.gx
        h = _upsample(c, gy[2], gx[0]) + 2.0 * _upsample(c, gy[1], gx[1]) + _upsample(c, gy[0], gx[2])
        return float((c * h).sum()), 2.0 * h

    def membrane(self, c: np.ndarray) -> tuple[float, np.ndarray]:
        """Membrane energy D of controls c (2, ny, nx) (mean over pixels of u_y^2 + u_x^2, both
        components) and its gradient (2, ny, nx)."""
        gy, gx = self.gy, self.gx
        h = (_upsample(c, gy[1], gx[0]) + _upsample(c, gy[0], gx[1])) / self.pixels
        return float((c * h).sum()), 2.0 * h

    def dice(self, c: np.ndarray, grad: bool) -> tuple[float, np.ndarray, np.ndarray | None]:
        """(1 - mean soft Dice, per-ROI soft Dice (K,), dense gradient (2, H, W) or None)."""
        u = _upsample(c, *self.up)
        value, dy, dx = self.moving(self.grid_y + u[0].ravel(), self.grid_x + u[1].ravel(), grad)
        inter = (value * self.fixed).sum(axis=1).astype(np.float64)       # pairwise summation
        denom = value.sum(axis=1).astype(np.float64) + self.fixed_sum + 1e-8
        dice = 2.0 * inter / denom
        loss = 1.0 - float(dice.mean())
        if not grad:
            return loss, dice, None
        # d loss / d warped_k(p) = -(2 / K) (F_k(p) - dice_k / 2) / denom_k
        g_value = self.fixed - (0.5 * dice).astype(value.dtype)[:, None]
        g_value *= (-2.0 / len(dice) / denom).astype(value.dtype)[:, None]
        g = np.stack([np.einsum("kp,kp->p", g_value, dy), np.einsum("kp,kp->p", g_value, dx)])
        return loss, dice, g.reshape(u.shape).astype(np.float64)

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        c = theta.reshape(self.shape)
        loss, _, g_dense = self.dice(c, grad=True)
        grad = _upsample(g_dense, *self.down)
        if self.bending_weight:
            energy, g_energy = self.bending(c)
            loss += self.bending_weight * energy
            grad += self.bending_weight * g_energy
        if self.membrane_weight:
            energy, g_energy = self.membrane(c)
            loss += self.membrane_weight * energy
            grad += self.membrane_weight * g_energy
        return loss, grad.ravel()


# ------------------------------------------------------------------------------------ fitting

@dataclass
class FieldResult:
    """A fitted field and how the fit went.

    field_px: float64 (H, W, 2) displacement in pixels, (dy, dx), on the fixed grid (module
    conventions). field_mm: the same times the fixed grid's (row, column) spacing, or None.
    jacobian_det: (H, W) determinant of ``p -> p + u(p)``; folding_ratio: fraction of pixels with
    ``det <= 0``. roi_dice: (K,) hard Dice per ROI pair after warping (moving masks warped
    bilinearly and thresholded at 0.5, against the fixed masks). dice_loss, bending, membrane, loss:
    final terms of the finest level (1 - mean soft Dice of the smoothed masks, bending energy E,
    membrane energy D, total).
    iterations: L-BFGS-B iterations over all levels. converged: every level stopped on ``ftol`` or
    ``gtol``, not on ``max_iter`` or a line-search failure. affine: (3, 3) the initial homogeneous
    map of (y, x) pixel coordinates fixed -> moving (identity without ``affine_init``). levels: per
    level, the control spacing and grid shape, iterations, evaluations, loss and the optimiser's
    message.
    """

    field_px: np.ndarray
    field_mm: np.ndarray | None
    jacobian_det: np.ndarray
    folding_ratio: float
    roi_dice: np.ndarray
    dice_loss: float
    bending: float
    membrane: float
    loss: float
    iterations: int
    converged: bool
    affine: np.ndarray
    levels: list[dict] = dc_field(default_factory=list)


def _resize_stack(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(K, h, w) masks -> float32 (K, H, W) in [0, 1]: area averaging when shrinking an axis,
    bilinear otherwise (cv2, pixel-centre aligned); a plain cast when the shape is already right."""
    masks = masks.astype(np.float32)
    if masks.shape[1:] == tuple(shape):
        return masks
    interp = cv2.INTER_AREA if shape[0] < masks.shape[1] or shape[1] < masks.shape[2] else cv2.INTER_LINEAR
    return np.stack([cv2.resize(m, (shape[1], shape[0]), interpolation=interp) for m in masks])


_MAX_TRIPLETS = 20000
_MIN_SPREAD = 0.05   # fraction of the longer image side (see _centroid_affine)


def _centroid_affine(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """(3, 3) homogeneous map of (y, x) ROI centroids fixed -> moving, both (K, H, W) on one grid,
    robust to a minority of wrongly paired ROIs.

    With four or more pairs: least median of squares over the affine maps through every triplet of
    pairs (a fixed pseudo-random subset of 20000 triplets beyond that), then least squares on the
    inliers (residual <= max(2.5 robust sigma, 1 px)). The affine is kept only if at least four
    pairs are inliers (three centroids fit any affine exactly, so a few pixels of centroid noise
    become a shear across the image), their centroids spread over at least ``_MIN_SPREAD`` of the
    image side in every direction (standard deviation along the thinner principal axis), and its
    linear part has a positive determinant and singular values in [0.5, 2]; otherwise (fewer than
    four pairs, clustered or collinear centroids) the median translation.
    """
    def centroids(m: np.ndarray) -> np.ndarray:
        ys, xs = np.arange(m.shape[1]), np.arange(m.shape[2])
        area = m.sum(axis=(1, 2))
        return np.stack([(m.sum(axis=2) @ ys) / area, (m.sum(axis=1) @ xs) / area], axis=1)

    cf, cm = centroids(fixed), centroids(moving)
    k = len(cf)
    design = np.hstack([cf, np.ones((k, 1))])
    translation = np.eye(3)
    translation[:2, 2] = np.median(cm - cf, axis=0)
    min_spread = _MIN_SPREAD * max(fixed.shape[1:])
    if k < 4:
        return translation
    inliers = np.arange(k)
    if k >= 4:
        if math.comb(k, 3) <= _MAX_TRIPLETS:
            triplets = np.array(list(itertools.combinations(range(k), 3)))
        else:
            draws = np.random.default_rng(0).integers(0, k, (2 * _MAX_TRIPLETS, 3))
            distinct = (draws[:, 0] != draws[:, 1]) & (draws[:, 0] != draws[:, 2]) & (draws[:, 1] != draws[:, 2])
            triplets = draws[distinct][:_MAX_TRIPLETS]
        d = design[triplets]                                             # (T, 3, 3)
        ok = np.abs(np.linalg.det(d)) > (1e-3 * max(fixed.shape[1:])) ** 2
        if ok.any():
            maps = np.linalg.solve(d[ok], cm[triplets[ok]])               # (T, 3, 2)
            sq = ((design[None] @ maps - cm[None]) ** 2).sum(axis=2)       # (T, K)
            med = np.median(sq, axis=1)
            best = int(np.argmin(med))
            sigma = 1.4826 * (1.0 + 5.0 / (k - 3)) * np.sqrt(med[best])
            inliers = np.flatnonzero(np.sqrt(sq[best]) <= max(2.5 * sigma, 1.0))
    spread = np.linalg.svd(cf[inliers] - cf[inliers].mean(axis=0), compute_uv=False)[-1] / np.sqrt(len(inliers))
    if len(inliers) < 4 or spread < min_spread:
        return translation
    sol, *_ = np.linalg.lstsq(design[inliers], cm[inliers], rcond=None)
    a = np.eye(3)
    a[:2, :] = sol.T
    sv = np.linalg.svd(a[:2, :2], compute_uv=False)
    return a if np.linalg.det(a[:2, :2]) > 0 and sv.min() >= 0.5 and sv.max() <= 2.0 else translation


def _affine_field(affine: np.ndarray, shape: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """Displacement (2, h, w) of an affine map of fixed-grid (y, x) px, on a grid of ``shape``
    whose pixels are ``scale`` fixed pixels (pixel-centre aligned), in that grid's pixels."""
    y = (np.arange(shape[0], dtype=np.float64)[:, None] + 0.5) * scale[0] - 0.5
    x = (np.arange(shape[1], dtype=np.float64)[None, :] + 0.5) * scale[1] - 0.5
    dy = (affine[0, 0] - 1.0) * y + affine[0, 1] * x + affine[0, 2]
    dx = affine[1, 0] * y + (affine[1, 1] - 1.0) * x + affine[1, 2]
    return np.stack([dy / scale[0], dx / scale[1]])


def fit(fixed_masks: np.ndarray, moving_masks: np.ndarray, *,
        spacing: tuple[float, float] | None = None, smooth_sigma: float = 1.0,
        bending_weight: float = 1e-2, membrane_weight: float = 1.0, levels: tuple[float, ...] = (32, 16, 8),
        affine_init: bool = True, max_iter: int = 200, ftol: float = 1e-6,
        gtol: float = 1e-7) -> FieldResult:
    """Fit a smooth field that maps each moving ROI onto its fixed ROI.

    fixed_masks: bool (K, H, W), the fixed ROIs on the fixed grid. moving_masks: bool (K, Hm, Wm),
    the paired moving ROIs (pair k = (fixed_masks[k], moving_masks[k])); when (Hm, Wm) != (H, W)
    they are resized to (H, W) (area averaging when shrinking, bilinear otherwise, kept soft), i.e.
    the moving image is assumed to cover the same field of view. No mask may be empty.
    spacing: (row, column) mm per fixed pixel, for ``field_mm``; the fit itself is in pixels.
    smooth_sigma: Gaussian sigma (px) of the mask smoothing. bending_weight, membrane_weight:
    weights of the bending and membrane energies (module docstring; independent of the image size). levels: control-point spacings in
    fixed px, coarse to fine; level l runs on the masks area-downsampled by ``f = levels[l] /
    levels[-1]`` (at least 16 px per axis kept) and smoothed by ``smooth_sigma`` px of that grid,
    i.e. about ``f * smooth_sigma`` fixed px; the last level runs at full resolution.
    affine_init: start from an affine map of the paired ROI centroids, least squares on the pairs
    that a least-median-of-squares fit keeps (robust to a minority of wrong pairs; the median
    translation with fewer than four pairs, clustered or collinear centroids, or an implausible
    affine: a reflection or a scale outside [0.5, 2]). max_iter, ftol, gtol: L-BFGS-B limits
    per level (iterations; relative loss decrease; largest gradient component).
    Deterministic: the same inputs give the same field. Returns a ``FieldResult``.
    """
    fixed_masks = _check_masks(fixed_masks, "fixed_masks")
    moving_masks = _check_masks(moving_masks, "moving_masks")
    if len(fixed_masks) != len(moving_masks):
        raise InputError(f"fixed_masks and moving_masks: {len(fixed_masks)} fixed and "
                         f"{len(moving_masks)} moving ROIs, expected one moving ROI per fixed ROI")
    if len(fixed_masks) == 0:
        raise InputError("fixed_masks: no ROI pairs to fit")
    spacing = _check_spacing(spacing)
    levels = tuple(float(s) for s in np.atleast_1d(np.asarray(levels, dtype=np.float64)))
    if not levels or not all(np.isfinite(s) and s > 0 for s in levels):
        raise InputError(f"levels: expected positive control spacings in px, got {levels!r}")
    for name, value in (("smooth_sigma", smooth_sigma), ("bending_weight", bending_weight)):
        if not np.isfinite(value) or value < 0:
            raise InputError(f"{name}: expected a finite number >= 0, got {value!r}")
    if int(max_iter) < 1:
        raise InputError(f"max_iter: expected a positive number of iterations, got {max_iter!r}")

    k, h, w = fixed_masks.shape
    moving_full = _resize_stack(moving_masks, (h, w))
    affine = _centroid_affine(fixed_masks, moving_full) if affine_init else np.eye(3)
    info: list[dict] = []
    converged, iterations = True, 0
    prev = None                                  # (grid shape, bases, controls) of the last level
    for s in levels:
        f = max(1.0, min(s / levels[-1], h / 16.0, w / 16.0))
        shape = (max(2, round(h / f)), max(2, round(w / f)))
        scale = (h / shape[0], w / shape[1])
        by, bx = _Basis.make(shape[0], s / scale[0]), _Basis.make(shape[1], s / scale[1])
        if prev is None:
            dense = _affine_field(affine, shape, scale)
        else:
            # the previous spline evaluated at this grid's pixel centres, in this grid's pixels
            (ph, pw), (psy, psx), pc, pscale = prev
            qy = _Basis.make(ph, psy, (np.arange(shape[0]) + 0.5) * ph / shape[0] - 0.5).b
            qx = _Basis.make(pw, psx, (np.arange(shape[1]) + 0.5) * pw / shape[1] - 0.5).b
            dense = _upsample(pc, qy, qx) * np.array([pscale[0] / scale[0], pscale[1] / scale[1]])[:, None, None]
        fixed = _resize_stack(fixed_masks, shape)
        moving = _resize_stack(moving_full, shape)
        if smooth_sigma > 0:
            fixed = ndimage.gaussian_filter(fixed, (0, smooth_sigma, smooth_sigma), mode="constant")
            moving = ndimage.gaussian_filter(moving, (0, smooth_sigma, smooth_sigma), mode="constant")
        objective = _Objective(fixed, _pad(moving, 0.0), by, bx, bending_weight, membrane_weight)
        res = optimize.minimize(objective, _project(dense, by.b, bx.b).ravel(), jac=True,
                                method="L-BFGS-B",
                                options={"maxiter": int(max_iter), "ftol": ftol, "gtol": gtol})
        c = res.x.reshape(objective.shape)
        prev = (shape, (s / scale[0], s / scale[1]), c, scale)
        iterations += int(res.nit)
        converged &= bool(res.success)
        info.append({"spacing": s, "shape": shape, "iterations": int(res.nit),
                     "evaluations": int(res.nfev), "loss": float(res.fun), "message": str(res.message)})
    dice_loss, _, _ = objective.dice(c, grad=False)
    energy, _ = objective.bending(c)
    membrane, _ = objective.membrane(c)
    u = _upsample(c, by.b, bx.b).transpose(1, 2, 0).copy()

    warped, _, _ = _Bilinear(_pad(moving_full, 0.0))(*_sample_points(u), grad=False)
    hard = warped >= 0.5
    ref = fixed_masks.reshape(k, -1)
    roi_dice = 2.0 * (hard & ref).sum(axis=1) / (hard.sum(axis=1) + ref.sum(axis=1))
    det = jacobian_determinant(u)
    return FieldResult(field_px=u, field_mm=None if spacing is None else u * np.asarray(spacing),
                       jacobian_det=det, folding_ratio=float((det <= 0).mean()), roi_dice=roi_dice,
                       dice_loss=dice_loss, bending=energy, membrane=membrane,
                       loss=dice_loss + bending_weight * energy + membrane_weight * membrane,
                       iterations=iterations, converged=converged, affine=affine, levels=info)


def fit_correspondence(corr: Correspondence, **kw) -> FieldResult:
    """``fit`` on the ROI pairs of a correspondence: a field on the fixed working grid.

    Pair ``(i, j)`` contributes fixed ROI i and moving ROI j, unpacked on their working grids; when
    the moving working grid has another shape, its masks are resized to the fixed working grid
    (see ``fit``), so the field points into the moving image resized to the fixed working shape
    (``resize_field`` maps it to the original images). Unless ``spacing`` is given, it is the fixed
    image's spacing converted to working pixels (``spacing * original_shape / work_shape`` per
    axis), or None. Other keywords go to ``fit``. ``InputError`` without pairs.
    """
    corr.validate()
    if len(corr.pairs) == 0:
        raise InputError("correspondence: no ROI pairs, nothing to fit a field to")
    if "spacing" not in kw and corr.fixed.spacing is not None:
        side = corr.fixed
        kw["spacing"] = tuple(sp * o / n for sp, o, n in zip(side.spacing, side.original_shape, side.work_shape))
    fixed = corr.fixed.unpacked()[corr.pairs[:, 0]]
    moving = corr.moving.unpacked()[corr.pairs[:, 1]]
    return fit(fixed, moving, **kw)


@dataclass(frozen=True)
class CheckedFit:
    """``fit_correspondence`` behind the do-no-harm check: ``fit`` is None without ROI pairs;
    ``check`` is None when not asked for (or without pairs). ``kept``: use ``fit.field_px``;
    otherwise the field is the identity, for the reason in ``note``."""

    fit: FieldResult | None
    check: SimilarityCheck | None

    @property
    def kept(self) -> bool:
        return self.fit is not None and (self.check is None or self.check.accepted)

    @property
    def note(self) -> str:
        if self.fit is None:
            return "empty correspondence"
        if not self.kept:
            return f"field lowers the NCC ({self.check.ncc_identity:.3f} -> {self.check.ncc_field:.3f})"
        return ""


def fit_checked(corr: Correspondence, fixed: np.ndarray, moving: np.ndarray, check_similarity: bool,
                **kw) -> CheckedFit:
    """The dense field as the runtime makes it: ``fit_correspondence(corr, **kw)`` when there are ROI
    pairs, and, when ``check_similarity`` (``Preset.check_similarity``), ``similarity_check`` of the
    fixed and moving images (arrays as ``similarity_check`` takes them) with the fitted field."""
    if len(corr.pairs) == 0:
        return CheckedFit(fit=None, check=None)
    result = fit_correspondence(corr, **kw)
    return CheckedFit(fit=result, check=similarity_check(fixed, moving, result.field_px) if check_similarity else None)
