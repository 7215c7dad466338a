"""Bit-packed binary masks and the native kernels that work on them.

Thin typed wrappers over ``samreg_rt._ext``. Arguments are checked here (numpy array, dtype,
number of dimensions, C-contiguity) and again in C++; a bad argument raises ``TypeError`` (not an
array, wrong dtype) or ``samreg_rt.errors.InputError`` (a ``ValueError``: wrong shape or layout).
Nothing is converted silently.

Packed layout: ``uint64[N, ceil(H*W/64)]``; bit ``i`` of word ``w`` is pixel ``w*64 + i`` of the
row-major flattened ``H x W`` mask, and padding bits past ``H*W`` are zero.
"""
from __future__ import annotations

import numpy as np

from samreg_rt import _ext
from samreg_rt.errors import InputError


def _check(arr: object, name: str, dtype: type, ndim: int) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray of dtype {np.dtype(dtype)}, "
                        f"got {type(arr).__name__}")
    if arr.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype)}, got {arr.dtype}")
    if arr.ndim != ndim:
        raise InputError(f"{name}: expected {ndim} dimensions, got shape {arr.shape}")
    if not arr.flags.c_contiguous:
        raise InputError(f"{name}: array is not C-contiguous (pass numpy.ascontiguousarray(...))")
    return arr


def n_words(height: int, width: int) -> int:
    """Number of uint64 words per packed ``height x width`` mask."""
    return -(-(height * width) // 64)


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """Pack ``bool[N, H, W]`` masks into ``uint64[N, ceil(H*W/64)]``."""
    return _ext.pack_masks(_check(masks, "masks", np.bool_, 3))


def unpack_masks(packed: np.ndarray, height: int, width: int) -> np.ndarray:
    """Unpack ``uint64[N, ceil(H*W/64)]`` into ``bool[N, height, width]``."""
    _check(packed, "packed", np.uint64, 2)
    if packed.shape[1] != n_words(height, width):
        raise InputError(f"packed: {packed.shape[1]} words per mask, but a {height}x{width} mask "
                         f"needs {n_words(height, width)}")
    return _ext.unpack_masks(packed, int(height), int(width))


def mask_areas(packed: np.ndarray) -> np.ndarray:
    """Pixel count of each packed mask: ``uint64[N, words] -> int64[N]``."""
    return _ext.mask_areas(_check(packed, "packed", np.uint64, 2))


def _check_pair(a_packed: np.ndarray, b_packed: np.ndarray) -> None:
    _check(a_packed, "a_packed", np.uint64, 2)
    _check(b_packed, "b_packed", np.uint64, 2)
    if a_packed.shape[1] != b_packed.shape[1]:
        raise InputError(f"a_packed and b_packed have mismatched word counts: "
                         f"{a_packed.shape[1]} and {b_packed.shape[1]} (masks of different sizes?)")


def intersection_matrix(a_packed: np.ndarray, b_packed: np.ndarray) -> np.ndarray:
    """Pairwise intersection counts ``|A_i & B_j|``: ``int64[Na, Nb]``."""
    _check_pair(a_packed, b_packed)
    return _ext.intersection_matrix(a_packed, b_packed)


def iou_matrix(a_packed: np.ndarray, b_packed: np.ndarray) -> np.ndarray:
    """Pairwise IoU ``|A_i & B_j| / |A_i | B_j|``: ``float32[Na, Nb]``.

    Computed in float64 from exact counts and rounded once; 0 where both masks are empty.
    """
    _check_pair(a_packed, b_packed)
    return _ext.iou_matrix(a_packed, b_packed)


def containment_matrix(a_packed: np.ndarray, b_packed: np.ndarray) -> np.ndarray:
    """Pairwise containment ``|A_i & B_j| / min(|A_i|, |B_j|)``: ``float32[Na, Nb]``.

    Computed in float64 from exact counts and rounded once; 0 where either mask is empty.
    """
    _check_pair(a_packed, b_packed)
    return _ext.containment_matrix(a_packed, b_packed)


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_thresh: float) -> np.ndarray:
    """Non-maximum suppression of ``float32[N, 4]`` xyxy boxes with ``float32[N]`` scores.

    Same result as ``torchvision.ops.batched_nms`` with a single category (as SAM's automatic
    mask generator calls it): boxes are visited by descending score (ties in index order), box
    area is ``(x2 - x1) * (y2 - y1)``, IoU is computed in float32, and a box is suppressed when its
    IoU with a kept box is ``> iou_thresh``. Returns the kept indices, ``int64[K]``, in descending
    score order. Non-finite boxes or scores raise ``InputError``.
    """
    _check(boxes, "boxes", np.float32, 2)
    _check(scores, "scores", np.float32, 1)
    if boxes.shape[1] != 4 or scores.shape[0] != boxes.shape[0]:
        raise InputError(f"boxes {boxes.shape} and scores {scores.shape}: expected (N, 4) and (N,)")
    return _ext.box_nms(boxes, scores, float(iou_thresh))


def stability_scores(logits: np.ndarray, mask_threshold: float, offset: float, threads: int = 0) -> np.ndarray:
    """SAM's stability score of ``float32[N, H, W]`` mask logits: ``float32[N]``.

    ``|logits > t + offset| / |logits > t - offset|`` with both thresholds rounded to float32 and
    the ratio divided in float32, exactly as ``segment_anything.utils.amg.
    calculate_stability_score``. A mask with no logit above ``t - offset`` scores NaN (0/0, as in
    SAM), which fails every ``>=`` threshold test. threads: at most this many threads (0: the CPUs
    this process may run on).
    """
    return _ext.stability_scores(_check(logits, "logits", np.float32, 3), float(mask_threshold),
                                 float(offset), threads=threads)


def greedy_match(sim: np.ndarray, threshold: float, max_pairs: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """SAMReg's greedy one-to-one assignment on a ``float32[N1, N2]`` similarity matrix.

    While an entry ``> float32(threshold)`` remains, take the largest (row-major first on ties),
    record it and remove its row and column. Returns ``(int64[K, 2] pairs (i, j), float32[K]
    similarities)`` in descending similarity; ``max_pairs > 0`` keeps the first ``max_pairs``.
    """
    return _ext.greedy_match(_check(sim, "sim", np.float32, 2), float(threshold), int(max_pairs))
