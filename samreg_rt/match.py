"""ROI pairing: prototype similarity, one-to-one assignment and an optional geometric check.

The reference (SAMReg ``RoiMatching._roi_match``) is ``strategy="greedy"`` with no geometric
check: greedy global-max assignment on the raw cosine matrix, then the first ``num_pairs``.
``mutual_nn`` and ``hungarian`` are stricter or globally optimal alternatives; the geometric check
drops pairs whose ROI centroids disagree with a robust similarity or affine fit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import faiss
import numpy as np

from samreg_rt import masks as _masks
from samreg_rt.errors import InputError

STRATEGIES = ("greedy", "mutual_nn", "hungarian")
GEOMETRIC_MODELS = ("similarity", "affine")
_MIN_SAMPLE = {"similarity": 2, "affine": 3}


@dataclass
class MatchResult:
    """Pairs of ROIs, fixed index ``i`` with moving index ``j``.

    ``pairs``: ``int64[K, 2]`` rows ``(i, j)`` in descending similarity;
    ``similarity``: ``float32[K]``; ``dropped``: for each post-assignment step (``"geometry"``,
    ``"num_pairs"``) the ``int64[k, 2]`` pairs that step removed; ``transform``: the
    ``float64[2, 3]`` fixed -> moving centroid transform fitted by the geometric check, ``None``
    when it did not run or could not fit.
    """

    pairs: np.ndarray
    similarity: np.ndarray
    dropped: dict[str, np.ndarray] = field(default_factory=dict)
    transform: np.ndarray | None = None


def cosine_matrix(p: np.ndarray, q: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """``S[i, j] = p_i . q_j / (max(||p_i||, eps) * max(||q_j||, eps))``, ``float32[N1, N2]``.

    ``torch.nn.functional.cosine_similarity``'s definition (eps 1e-8), computed in float64 from
    ``p: [N1, C]`` and ``q: [N2, C]`` prototypes; a zero prototype has similarity 0 to everything.
    """
    p64, q64 = _prototype_pair(p, q)
    norm_p = np.maximum(np.linalg.norm(p64, axis=1), eps)
    norm_q = np.maximum(np.linalg.norm(q64, axis=1), eps)
    return ((p64 @ q64.T) / (norm_p[:, None] * norm_q[None, :])).astype(np.float32)


def knn(p: np.ndarray, q: np.ndarray, k: int, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` neighbours in ``q`` of each row of ``p`` by cosine similarity (FAISS).

    Both sets are L2-normalised (norms clamped at ``eps``) and searched exactly with
    ``faiss.IndexFlatIP``. Returns ``(float32[N1, k'] similarities, int64[N1, k'] indices into q)``
    in descending similarity, ``k' = min(k, N2)``. Similarities agree with :func:`cosine_matrix` to
    float32 rounding (FAISS sums in float32).
    """
    p64, q64 = _prototype_pair(p, q)
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    k = min(k, q64.shape[0])
    if p64.shape[0] == 0 or k == 0:
        return np.zeros((p64.shape[0], k), np.float32), np.zeros((p64.shape[0], k), np.int64)
    index = faiss.IndexFlatIP(p64.shape[1])
    index.add(_unit_rows(q64, eps))
    sim, idx = index.search(_unit_rows(p64, eps), k)
    return sim.astype(np.float32), idx.astype(np.int64)


def _unit_rows(x: np.ndarray, eps: float) -> np.ndarray:
    norm = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    return np.ascontiguousarray(x / norm, dtype=np.float32)


def _prototype_pair(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p64 = np.asarray(p, dtype=np.float64)
    q64 = np.asarray(q, dtype=np.float64)
    if p64.ndim != 2 or q64.ndim != 2 or p64.shape[1] != q64.shape[1]:
        raise InputError(f"prototypes {p64.shape} and {q64.shape}: expected (N1, C) and (N2, C)")
    if not (np.all(np.isfinite(p64)) and np.all(np.isfinite(q64))):
        raise InputError("prototypes contain NaN or infinity")
    return p64, q64


def _check_sim(sim: np.ndarray) -> np.ndarray:
    if not isinstance(sim, np.ndarray) or sim.dtype != np.float32 or sim.ndim != 2:
        raise TypeError(f"sim: expected a float32[N1, N2] numpy array, got "
                        f"{getattr(sim, 'dtype', type(sim).__name__)} {getattr(sim, 'shape', '')}")
    if np.isnan(sim).any():
        raise InputError("sim: contains NaN")
    return sim


def _sorted_pairs(rows: np.ndarray, cols: np.ndarray, sim: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs in descending similarity, ties in the order given."""
    values = sim[rows, cols]
    order = np.argsort(-values, kind="stable")
    pairs = np.stack([rows[order], cols[order]], axis=1).astype(np.int64).reshape(-1, 2)
    return pairs, values[order].astype(np.float32)


def greedy(sim: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The reference's greedy global-max one-to-one assignment (C++ kernel).

    Repeatedly takes the largest remaining entry ``> float32(threshold)`` (row-major first on ties)
    and removes its row and column. Returns ``(int64[K, 2], float32[K])`` in descending similarity.
    """
    return _masks.greedy_match(np.ascontiguousarray(_check_sim(sim)), threshold, 0)


def mutual_nn(sim: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)`` that are each other's best match (first index on ties) with
    ``sim[i, j] > float32(threshold)``. Returns ``(int64[K, 2], float32[K])`` in descending
    similarity, ties by ``i``."""
    sim = _check_sim(sim)
    if sim.size == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    best_j = np.argmax(sim, axis=1)
    best_i = np.argmax(sim, axis=0)
    rows = np.arange(sim.shape[0])
    keep = (best_i[best_j] == rows) & (sim[rows, best_j] > np.float32(threshold))
    return _sorted_pairs(rows[keep], best_j[keep], sim)


def hungarian(sim: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-weight one-to-one assignment over the entries ``> float32(threshold)``.

    ``scipy.optimize.linear_sum_assignment`` maximises ``sum(sim - threshold)`` over those entries
    (others weigh 0 and are not kept), so no pair above the threshold is traded for one below it.
    Returns ``(int64[K, 2], float32[K])`` in descending similarity, ties by ``i``.
    """
    from scipy.optimize import linear_sum_assignment  # half a second to import; only this strategy needs it

    sim = _check_sim(sim)
    thr = np.float32(threshold)
    above = sim > thr
    weight = np.where(above, sim.astype(np.float64) - np.float64(thr), 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    keep = above[rows, cols]
    return _sorted_pairs(rows[keep], cols[keep], sim)


def geometric_inliers(src_xy: np.ndarray, dst_xy: np.ndarray, model: str = "similarity",
                      reproj_thresh: float = 10.0, min_pairs: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """RANSAC fit of ``dst ~ T(src)`` to paired ROI centroids and the pairs consistent with it.

    ``src_xy``, ``dst_xy``: ``[K, 2]`` centroids ``(x, y)`` in pixels of the fixed and moving
    images. ``model``: ``"similarity"`` (rotation, uniform scale, translation;
    ``cv2.estimateAffinePartial2D``) or ``"affine"`` (``cv2.estimateAffine2D``). A pair is an
    inlier when its reprojection error is ``<= reproj_thresh`` pixels.

    Min-pairs rule: a minimal sample is 2 pairs (similarity) or 3 (affine); an outlier can only be
    out-voted with at least ``minimal + 2`` pairs, the default ``min_pairs``. With 2 to
    ``min_pairs - 1`` pairs, when no model can be fitted, or when no pair beyond a minimal sample
    supports the best model, the check falls back to a translation (:func:`translation_inliers`),
    whose minimal sample is one pair; one pair is always kept. The transform is ``None`` unless the
    similarity or affine model was accepted.
    Returns ``(bool[K] inliers, float64[2, 3] transform or None)``.
    """
    if model not in GEOMETRIC_MODELS:
        raise InputError(f"model {model!r}: expected one of {GEOMETRIC_MODELS}")
    minimal = _MIN_SAMPLE[model]
    min_pairs = minimal + 2 if min_pairs is None else int(min_pairs)
    if min_pairs < minimal + 1:
        raise InputError(f"min_pairs {min_pairs}: a {model} check needs at least {minimal + 1}")
    src = np.asarray(src_xy, dtype=np.float64)
    dst = np.asarray(dst_xy, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape:
        raise InputError(f"centroids {src.shape} and {dst.shape}: expected two (K, 2) arrays")
    if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
        raise InputError("centroids contain NaN or infinity (an empty ROI mask?)")
    if len(src) < min_pairs:
        return translation_inliers(src, dst, reproj_thresh), None
    estimate = cv2.estimateAffinePartial2D if model == "similarity" else cv2.estimateAffine2D
    transform, inliers = estimate(src.astype(np.float32), dst.astype(np.float32),
                                  method=cv2.RANSAC, ransacReprojThreshold=float(reproj_thresh),
                                  maxIters=2000, confidence=0.999)
    if transform is None or inliers.sum() <= minimal:
        # no model, or one that only its own minimal sample supports (any 2 pairs fit a similarity)
        return translation_inliers(src, dst, reproj_thresh), None
    return inliers.reshape(-1).astype(bool), transform


def translation_inliers(src_xy: np.ndarray, dst_xy: np.ndarray, reproj_thresh: float = 10.0) -> np.ndarray:
    """Pairs whose centroid displacement agrees with the best-supported pair's, for few pairs.

    ``src_xy``, ``dst_xy``: ``[K, 2]`` centroids in pixels, rows in descending similarity. Every
    pair's displacement ``dst - src`` is a hypothesis; the one within ``reproj_thresh`` pixels of
    the most displacements wins (ties: the earlier, more similar pair), and those pairs are the
    inliers. With two pairs that disagree, the more similar one is kept: one wrongly paired ROI
    among a handful would otherwise drag the fitted field across the image. ``bool[K]``.
    """
    d = np.asarray(dst_xy, dtype=np.float64) - np.asarray(src_xy, dtype=np.float64)
    if len(d) < 2:
        return np.ones(len(d), dtype=bool)
    close = np.linalg.norm(d[:, None, :] - d[None, :, :], axis=2) <= float(reproj_thresh)
    return close[int(np.argmax(close.sum(axis=1)))].copy()


def pair(sim: np.ndarray, threshold: float = 0.8, strategy: str = "greedy", num_pairs: int = 0,
         fixed_xy: np.ndarray | None = None, moving_xy: np.ndarray | None = None,
         geometry: str | None = None, reproj_thresh: float = 10.0, min_pairs: int | None = None,
         min_support: int = 1) -> MatchResult:
    """Pair fixed and moving ROIs from their ``float32[N1, N2]`` similarity matrix.

    Steps: assignment by ``strategy`` (see :data:`STRATEGIES`) over entries ``> threshold``; then,
    when ``geometry`` is ``"similarity"`` or ``"affine"``, :func:`geometric_inliers` on the
    centroids ``fixed_xy[i]``, ``moving_xy[j]`` (``[N1, 2]``, ``[N2, 2]`` pixels) of the pairs;
    then the first ``num_pairs`` pairs when ``num_pairs > 0``. ``strategy="greedy"``, no geometry
    is the reference. ``min_support`` (with ``geometry``): fewer geometrically consistent pairs than
    this drop them all, so a pair nothing confirms (a lone pair, or the survivor of two that
    disagree) cannot drive a field on its own. Each step's removals are reported in
    ``MatchResult.dropped``.
    """
    if strategy not in STRATEGIES:
        raise InputError(f"strategy {strategy!r}: expected one of {STRATEGIES}")
    assign = {"greedy": greedy, "mutual_nn": mutual_nn, "hungarian": hungarian}[strategy]
    pairs, values = assign(sim, threshold)
    dropped = {"geometry": np.zeros((0, 2), np.int64), "num_pairs": np.zeros((0, 2), np.int64)}
    transform = None
    if geometry is not None:
        if fixed_xy is None or moving_xy is None:
            raise InputError("geometry check needs fixed_xy and moving_xy centroids")
        fixed_xy = np.asarray(fixed_xy, dtype=np.float64)
        moving_xy = np.asarray(moving_xy, dtype=np.float64)
        if fixed_xy.shape != (sim.shape[0], 2) or moving_xy.shape != (sim.shape[1], 2):
            raise InputError(f"centroids {fixed_xy.shape} and {moving_xy.shape}: expected "
                             f"({sim.shape[0]}, 2) and ({sim.shape[1]}, 2)")
        inliers, transform = geometric_inliers(fixed_xy[pairs[:, 0]], moving_xy[pairs[:, 1]],
                                               geometry, reproj_thresh, min_pairs)
        if inliers.sum() < min_support:
            inliers[:], transform = False, None
        dropped["geometry"] = pairs[~inliers]
        pairs, values = pairs[inliers], values[inliers]
    if num_pairs > 0:
        dropped["num_pairs"] = pairs[num_pairs:]
        pairs, values = pairs[:num_pairs], values[:num_pairs]
    return MatchResult(pairs, values, dropped, transform)
