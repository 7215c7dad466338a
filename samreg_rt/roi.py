"""ROI candidates: area filtering, containment de-duplication, and prototypes (masked average
pooling of an image embedding), following SAMReg's ``RoiMatching._mask_criteria`` and
``_roi_proto`` (reference-algorithm.md sections 2 and 3).

Masks are ``bool[N, H, W]`` on the working grid, or bit-packed (see :mod:`samreg_rt.masks`).
Functions that select masks return ``int64`` indices into their input, in input order.
"""
from __future__ import annotations

import cv2
import numpy as np

from samreg_rt import masks as _masks
from samreg_rt.errors import InputError


def filter_area(areas: np.ndarray, v_min: float, v_max: float) -> np.ndarray:
    """Indices of the masks with ``v_min <= area <= v_max`` (pixels), ``int64[K]``."""
    areas = np.asarray(areas)
    if areas.ndim != 1:
        raise InputError(f"areas: expected shape (N,), got {areas.shape}")
    return np.flatnonzero((areas >= v_min) & (areas <= v_max)).astype(np.int64)


def containment_dedup(packed: np.ndarray, areas: np.ndarray | None = None, thresh: float = 0.9
                      ) -> np.ndarray:
    """Indices of the masks kept by SAMReg's near-containment rule, ``int64[K]``.

    Over every pair ``i < j`` (input order) whose smaller mask is non-empty, if
    ``|M_i & M_j| / min(|M_i|, |M_j|) >= thresh`` (float64, as numpy divides the reference's integer
    counts) the smaller mask is marked for removal, ``j`` on equal areas. All pairs are tested
    against the full input (a removed mask still removes others: no cascading), then the marked
    masks are dropped.

    ``packed``: ``uint64[N, words]`` packed masks; ``areas``: their pixel counts ``int64[N]``
    (computed when omitted).
    """
    inter = _masks.intersection_matrix(packed, packed)
    n = packed.shape[0]
    areas = _masks.mask_areas(packed) if areas is None else np.asarray(areas, dtype=np.int64)
    if areas.shape != (n,):
        raise InputError(f"areas: expected one area per packed mask, shape ({n},), got "
                         f"{areas.shape}")
    i, j = np.triu_indices(n, k=1)
    small = np.minimum(areas[i], areas[j])
    hit = small > 0
    i, j = i[hit], j[hit]
    near = inter[i, j] / small[hit].astype(np.float64) >= thresh
    i, j = i[near], j[near]
    removed = np.where(areas[i] < areas[j], i, j)
    return np.setdiff1d(np.arange(n, dtype=np.int64), removed)


def select_rois(packed: np.ndarray, v_min: float, v_max: float, thresh: float = 0.9
                ) -> np.ndarray:
    """SAMReg's ``_mask_criteria``: area filter, then containment de-duplication of the masks that
    passed it. Returns indices into ``packed``, ``int64[K]``, in input order."""
    areas = _masks.mask_areas(packed)
    kept = filter_area(areas, v_min, v_max)
    sub = np.ascontiguousarray(packed[kept])
    return kept[containment_dedup(sub, areas[kept], thresh)]


def downsample_nearest(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour downsampling of ``[H, W]`` or ``[N, H, W]`` masks to ``size = (h, w)``.

    Exactly the reference's ``cv2.resize(m.astype(uint8), (w, h), interpolation=INTER_NEAREST)``;
    returns ``float32`` 0/1 weights of shape ``[h, w]`` or ``[N, h, w]``. Small or thin ROIs can
    vanish (see :func:`downsample_area`).
    """
    return _resize_masks(masks, size, cv2.INTER_NEAREST, np.uint8)


def downsample_area(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-weighted downsampling of ``[H, W]`` or ``[N, H, W]`` masks to ``size = (h, w)``.

    Each output cell holds the fraction of its footprint (``H/h`` by ``W/w`` input pixels,
    fractional pixels weighted by overlap) covered by the mask, ``float32`` in [0, 1]
    (``cv2.INTER_AREA`` on float32). Only downsampling (``h <= H``, ``w <= W``) is allowed.
    """
    return _resize_masks(masks, size, cv2.INTER_AREA, np.float32)


def _resize_masks(masks: np.ndarray, size: tuple[int, int], interpolation: int,
                  work_dtype: type) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim not in (2, 3):
        raise InputError(f"masks: expected shape (H, W) or (N, H, W), got {masks.shape}")
    h, w = (int(v) for v in size)
    big_h, big_w = masks.shape[-2:]
    if not (0 < h <= big_h and 0 < w <= big_w):
        raise InputError(f"size {size}: expected 0 < (h, w) <= mask size {(big_h, big_w)}")
    stack = masks.reshape((-1, big_h, big_w)).astype(work_dtype)
    out = np.empty((stack.shape[0], h, w), dtype=np.float32)
    for k, m in enumerate(stack):
        out[k] = cv2.resize(m, (w, h), interpolation=interpolation)
    return out.reshape(masks.shape[:-2] + (h, w))


def prototypes(embedding: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Masked average pooling: ``p_n = sum_u E[:, u] m_n(u) / sum_u m_n(u)``.

    ``embedding``: ``float32[C, h, w]`` image embedding; ``weights``: ``[N, h, w]`` non-negative
    mask weights on the embedding grid (0/1 from :func:`downsample_nearest` or fractions from
    :func:`downsample_area`). Accumulates in float64 and returns ``float32[N, C]``; a mask with zero
    total weight gets the zero vector.
    """
    embedding = np.asarray(embedding)
    weights = np.asarray(weights)
    if embedding.ndim != 3 or weights.ndim != 3 or embedding.shape[1:] != weights.shape[1:]:
        raise InputError(f"embedding {embedding.shape} and weights {weights.shape}: expected "
                         f"(C, h, w) and (N, h, w) on the same grid")
    if not np.issubdtype(embedding.dtype, np.floating):
        raise TypeError(f"embedding: expected a float array, got {embedding.dtype}")
    cells = weights.shape[1] * weights.shape[2]
    m = weights.reshape(weights.shape[0], cells).astype(np.float64)
    if np.any(m < 0) or not np.all(np.isfinite(m)):
        raise InputError("weights: must be finite and non-negative")
    e = embedding.reshape(embedding.shape[0], cells).astype(np.float64)
    total = m.sum(axis=1)
    pooled = m @ e.T
    nonzero = total > 0
    pooled[nonzero] /= total[nonzero, None]
    pooled[~nonzero] = 0.0
    return pooled.astype(np.float32)


def centroids(masks: np.ndarray) -> np.ndarray:
    """Centroids ``(x, y)`` in pixels (x = column, y = row) of ``bool[N, H, W]`` masks,
    ``float64[N, 2]``; NaN for an empty mask."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise InputError(f"masks: expected shape (N, H, W), got {masks.shape}")
    n, h, w = masks.shape
    area = masks.sum(axis=(1, 2)).astype(np.float64)
    xs = masks.sum(axis=1) @ np.arange(w, dtype=np.float64)
    ys = masks.sum(axis=2) @ np.arange(h, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([xs / area, ys / area], axis=1).reshape(n, 2)
