"""Registration scores: Dice per label class, HD95, landmark TRE, folding, FIRE AUC, and how well
ROI pairs agree with labelled structures.

Conventions as in ``samreg_rt.ddf``: a field is float (H, W, 2) in pixels, (dy, dx), on the fixed
grid, and maps fixed pixel p to moving position p + u(p); ``spacing`` is (row, column) mm per pixel
(one value per array axis for masks of other dimensions). Landmarks are (N, 2) arrays of
``(x, y) = (column, row)`` pixel coordinates, pixel centres at integers, as in the data set's
``landmarks.csv``. Every bad input raises ``samreg_rt.errors.InputError`` naming the argument.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from scipy import ndimage

from . import masks as mask_ops
from .correspondence import Correspondence, Side
from .ddf import _check_field, jacobian_determinant
from .errors import InputError

__all__ = ["dice", "hd95", "LandmarkError", "tre", "tre_identity", "centroid_distance",
           "folding_ratio", "fire_auc", "RoiLabelScore", "roi_pair_label_score"]


def _labels(arr: object, name: str) -> np.ndarray:
    """A bool or integer label array (floats allowed when every value is a whole number)."""
    arr = np.asarray(arr)
    if arr.dtype == np.bool_ or arr.dtype.kind in "iu":
        return arr
    if arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all():
        return arr.astype(np.int64)
    raise InputError(f"{name}: expected a bool mask or an integer label map, got dtype {arr.dtype}")


def _same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise InputError(f"{names}: shapes {a.shape} and {b.shape} differ (resample labels onto the "
                         "same grid first)")


def _mask_pair(a: object, b: object, spacing: object) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Two bool masks of one shape and their spacing (``_spacing``), or ``InputError``."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != np.bool_ or b.dtype != np.bool_:
        raise InputError(f"a, b: expected bool masks, got dtypes {a.dtype} and {b.dtype}")
    _same_shape(a, b, "a and b")
    return a, b, _spacing(spacing, a.ndim)


def _spacing(spacing: object, ndim: int, name: str = "spacing") -> np.ndarray | None:
    if spacing is None:
        return None
    sp = np.asarray(spacing, dtype=np.float64).ravel()
    if sp.shape != (ndim,) or not np.isfinite(sp).all() or (sp <= 0).any():
        raise InputError(f"{name}: expected {ndim} positive finite numbers (mm per pixel along each "
                         f"array axis, rows first), got {spacing!r}")
    return sp


def dice(a_labels: np.ndarray, b_labels: np.ndarray, classes: Iterable[int] | None = None
         ) -> dict[int, float]:
    """Dice ``2 |A & B| / (|A| + |B|)`` of every label class, never merging classes.

    a_labels, b_labels: label arrays of one shape (any dimension), integer or bool; a bool mask is
    class 1. classes: the classes to score; default the non-zero values found in either array
    (``(1,)`` for bool masks). Returns {class: Dice}; NaN for a class absent from both arrays.
    """
    a = _labels(a_labels, "a_labels")
    b = _labels(b_labels, "b_labels")
    _same_shape(a, b, "a_labels and b_labels")
    binary = a.dtype == np.bool_ and b.dtype == np.bool_
    a, b = a.astype(np.int64, copy=False), b.astype(np.int64, copy=False)
    if classes is None:
        found = np.union1d(np.unique(a), np.unique(b))
        classes = [1] if binary else found[found != 0]
    out = {}
    for c in classes:
        ma, mb = a == c, b == c
        total = int(ma.sum()) + int(mb.sum())
        out[int(c)] = 2.0 * int((ma & mb).sum()) / total if total else float("nan")
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    """Pixels of a mask with a face-neighbour outside it (or on the array's border)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(a: np.ndarray, b: np.ndarray, spacing: object = None) -> float:
    """95th-percentile symmetric Hausdorff distance between the surfaces of two binary masks.

    Surfaces are the mask pixels with a face-neighbour outside the mask (4-connectivity in 2-D; the
    array's border counts as outside). For each surface pixel of one mask, the Euclidean distance to
    the nearest surface pixel of the other (``scipy.ndimage.distance_transform_edt``); the result is
    the larger of the two directed 95th percentiles (numpy's linear interpolation), as in MedPy and
    MONAI. a, b: bool arrays of one shape (any dimension). spacing: mm per pixel along each axis
    (rows first) for a result in mm, else pixels. NaN when either mask is empty.
    """
    a, b, sp = _mask_pair(a, b, spacing)
    if not a.any() or not b.any():
        return float("nan")
    sa, sb = _surface(a), _surface(b)
    d_ab = ndimage.distance_transform_edt(~sb, sampling=sp)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=sp)[sb]
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def centroid_distance(a: np.ndarray, b: np.ndarray, spacing: object = None) -> float:
    """Distance between the centroids of two binary masks (what the reference code calls "TRE").

    a, b: bool arrays of one shape. spacing: mm per pixel along each axis (rows first) for mm, else
    pixels. NaN when either mask is empty.
    """
    a, b, sp = _mask_pair(a, b, spacing)
    if not a.any() or not b.any():
        return float("nan")
    diff = np.argwhere(a).mean(axis=0) - np.argwhere(b).mean(axis=0)
    return float(np.linalg.norm(diff if sp is None else diff * sp))


@dataclass
class LandmarkError:
    """Per-landmark target registration error: px (N,) in pixels, mm (N,) in mm or None."""

    px: np.ndarray
    mm: np.ndarray | None


def _points(pts: object, name: str) -> np.ndarray:
    pts = np.asarray(pts, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise InputError(f"{name}: expected an (N, 2) array of (x, y) pixel coordinates, got shape {pts.shape}")
    bad = np.flatnonzero(~np.isfinite(pts).all(axis=1))
    if len(bad):
        raise InputError(f"{name}: landmark(s) {bad.tolist()} have NaN or infinite coordinates")
    return pts


def _pairs(fixed_xy: object, moving_xy: object) -> tuple[np.ndarray, np.ndarray]:
    f, m = _points(fixed_xy, "fixed_xy"), _points(moving_xy, "moving_xy")
    if len(f) != len(m):
        raise InputError(f"fixed_xy and moving_xy: {len(f)} and {len(m)} landmarks, expected pairs")
    return f, m


def _error(diff_xy: np.ndarray, spacing: object) -> LandmarkError:
    sp = _spacing(spacing, 2)
    px = np.hypot(diff_xy[:, 0], diff_xy[:, 1])
    mm = None if sp is None else np.hypot(diff_xy[:, 0] * sp[1], diff_xy[:, 1] * sp[0])
    return LandmarkError(px=px, mm=mm)


def tre(fixed_xy: object, moving_xy: object, field: np.ndarray, spacing: object = None) -> LandmarkError:
    """Landmark target registration error after registration.

    fixed_xy, moving_xy: (N, 2) corresponding landmarks (x, y) in pixels of the field's grid (the
    moving image taken on a grid of the same shape, see ``ddf``; ``ddf.resize_field`` brings a
    field to the original images). field: (H, W, 2) px, (dy, dx). The moving point predicted for a
    fixed landmark p is ``p + u(p)``, u interpolated bilinearly (border values extended over the
    outer half pixel); TRE = ||prediction - moving landmark||. spacing: (row, column) mm per pixel
    for ``mm``. Landmarks must lie in the image, ``-0.5 <= x <= W - 0.5`` and ``-0.5 <= y <= H -
    0.5``.
    """
    field = _check_field(field)
    f, m = _pairs(fixed_xy, moving_xy)
    h, w = field.shape[:2]
    for name, pts in (("fixed_xy", f), ("moving_xy", m)):
        out = np.flatnonzero((pts[:, 0] < -0.5) | (pts[:, 0] > w - 0.5) | (pts[:, 1] < -0.5) | (pts[:, 1] > h - 0.5))
        if len(out):
            raise InputError(f"{name}: landmark(s) {out.tolist()} lie outside the {h}x{w} image "
                             f"(first: {pts[out[0]].tolist()})")
    y = np.clip(f[:, 1], 0.0, h - 1.0)
    x = np.clip(f[:, 0], 0.0, w - 1.0)
    i0 = np.minimum(np.floor(y).astype(np.intp), h - 2)
    j0 = np.minimum(np.floor(x).astype(np.intp), w - 2)
    fy, fx = (y - i0)[:, None], (x - j0)[:, None]
    u = ((1 - fy) * (1 - fx) * field[i0, j0] + (1 - fy) * fx * field[i0, j0 + 1]
         + fy * (1 - fx) * field[i0 + 1, j0] + fy * fx * field[i0 + 1, j0 + 1])
    predicted = f + u[:, ::-1]                    # (dy, dx) -> (dx, dy) to add to (x, y)
    return _error(predicted - m, spacing)


def tre_identity(fixed_xy: object, moving_xy: object, spacing: object = None) -> LandmarkError:
    """Landmark error before registration: ||moving - fixed|| per pair, (N, 2) (x, y) px inputs;
    spacing (row, column) mm per pixel for ``mm``."""
    f, m = _pairs(fixed_xy, moving_xy)
    return _error(m - f, spacing)


def folding_ratio(field: np.ndarray) -> float:
    """Fraction of pixels where the map ``p -> p + u(p)`` folds (Jacobian determinant <= 0)."""
    return float((jacobian_determinant(field) <= 0).mean())


def fire_auc(mean_tre_per_pair: Iterable[float], thresholds: Iterable[float] = range(1, 26)) -> float:
    """FIRE score: success rate averaged over error thresholds.

    mean_tre_per_pair: one mean landmark TRE (px) per image pair; NaN (a failed registration)
    counts as a failure. A pair succeeds at threshold t when its error is < t (as in the usual FIRE
    evaluation code); the result is the mean over ``thresholds`` (default 1..25 px) of the
    fraction of successful pairs, in [0, 1].
    """
    err = np.asarray(list(mean_tre_per_pair), dtype=np.float64)
    t = np.asarray(list(thresholds), dtype=np.float64)
    if err.ndim != 1 or len(err) == 0:
        raise InputError(f"mean_tre_per_pair: expected a non-empty list of errors, got shape {err.shape}")
    if t.ndim != 1 or len(t) == 0 or not np.isfinite(t).all():
        raise InputError("thresholds: expected a non-empty list of finite thresholds")
    err = np.where(np.isnan(err), np.inf, err)
    return float((err[None, :] < t[:, None]).mean())


@dataclass
class RoiLabelScore:
    """How paired ROIs agree with labelled structures, without any field.

    classes: (C,) the label classes scored. fixed_dice, moving_dice: (K, C) Dice of each pair's
    fixed (moving) ROI with each class of the fixed (moving) label map. matched_class: (K,) the
    class whose smaller of the two Dice values is largest, 0 where no class reaches ``min_dice``
    in both images. agree: (K,) bool, the pair's ROIs overlap the same structure with Dice >=
    ``min_dice`` in both images. fraction: mean of ``agree`` (NaN without pairs).
    """

    classes: np.ndarray
    fixed_dice: np.ndarray
    moving_dice: np.ndarray
    matched_class: np.ndarray
    agree: np.ndarray
    fraction: float


def _nearest_resize(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling with pixel-centre alignment: output pixel i takes input pixel
    ``floor((i + 0.5) * n_in / n_out)`` along each axis."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(np.intp), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(np.intp), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def _on_work_grid(labels: object, side: Side, name: str) -> np.ndarray:
    arr = _labels(labels, name)
    if arr.shape == tuple(side.work_shape):
        return arr
    if arr.shape != tuple(side.original_shape):
        raise InputError(f"{name}: shape {arr.shape} matches neither the image {tuple(side.original_shape)} "
                         f"nor its working grid {tuple(side.work_shape)}")
    return _nearest_resize(arr, side.work_shape)


def roi_pair_label_score(corr: Correspondence, fixed_labels: np.ndarray, moving_labels: np.ndarray,
                         min_dice: float = 0.5) -> RoiLabelScore:
    """Score the ROI pairs themselves against labels: do both ROIs of a pair cover the same structure?

    fixed_labels, moving_labels: integer label maps (a bool mask is class 1) of the fixed and moving
    image, at the original image size (resampled to the working grid by nearest neighbour with
    pixel-centre alignment, so classes never blend) or already on the working grid. Every non-zero
    class found in either map is scored; for each pair (i, j) and class c, Dice(fixed ROI i,
    fixed_labels == c) and Dice(moving ROI j, moving_labels == c). A pair agrees when some class
    reaches ``min_dice`` in both images. See ``RoiLabelScore``.
    """
    corr.validate()
    fl = _on_work_grid(fixed_labels, corr.fixed, "fixed_labels")
    ml = _on_work_grid(moving_labels, corr.moving, "moving_labels")
    found = np.union1d(np.unique(fl.astype(np.int64)), np.unique(ml.astype(np.int64)))
    classes = found[found != 0]

    def side_dice(side: Side, lab: np.ndarray, rois: np.ndarray) -> np.ndarray:
        roi_masks = side.masks[rois]
        class_masks = mask_ops.pack_masks(np.ascontiguousarray(lab.astype(np.int64)[None] == classes[:, None, None]))
        inter = mask_ops.intersection_matrix(roi_masks, class_masks).astype(np.float64)
        total = mask_ops.mask_areas(roi_masks)[:, None] + mask_ops.mask_areas(class_masks)[None, :]
        return np.divide(2.0 * inter, total, out=np.zeros_like(inter), where=total > 0)

    fd = side_dice(corr.fixed, fl, corr.pairs[:, 0])
    md = side_dice(corr.moving, ml, corr.pairs[:, 1])
    both = np.minimum(fd, md)
    agree = (both >= min_dice).any(axis=1) if len(classes) else np.zeros(len(corr.pairs), bool)
    matched = np.where(agree, classes[both.argmax(axis=1)] if len(classes) else 0, 0)
    return RoiLabelScore(classes=classes, fixed_dice=fd, moving_dice=md, matched_class=matched,
                         agree=agree, fraction=float(agree.mean()) if len(agree) else float("nan"))
