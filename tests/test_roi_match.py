"""ROI filtering, de-duplication and prototypes (samreg_rt.roi) and pairing (samreg_rt.match),
against literal ports of the SAMReg reference and hand computations."""
from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest

from samreg_rt import masks, match, roi
from samreg_rt.errors import InputError


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(99)


def reference_mask_criteria(mask_list: list[np.ndarray], v_min: float, v_max: float
                            ) -> list[int]:
    """SAMReg RoiMatching._mask_criteria, verbatim apart from returning kept indices."""
    remove_list = set()
    for _i, mask in enumerate(mask_list):
        if mask.sum() < v_min or mask.sum() > v_max:
            remove_list.add(_i)
    index = [idx for idx in range(len(mask_list)) if idx not in remove_list]
    ms = [mask_list[idx] for idx in index]
    n = len(ms)
    remove_list = set()
    for i in range(n):
        for j in range(i + 1, n):
            mask1, mask2 = ms[i], ms[j]
            intersection = (mask1 & mask2).sum()
            smaller_mask_area = min(ms[i].sum(), ms[j].sum())
            if smaller_mask_area > 0 and (intersection / smaller_mask_area) >= 0.9:
                if mask1.sum() < mask2.sum():
                    remove_list.add(i)
                else:
                    remove_list.add(j)
    return [index[k] for k in range(n) if k not in remove_list]


def rect_masks(rng: np.random.Generator, n: int, size: int = 40) -> np.ndarray:
    """Random rectangles, some nested in or duplicating earlier ones."""
    out = np.zeros((n, size, size), dtype=bool)
    for k in range(n):
        if k and rng.uniform() < 0.4:  # shrink or copy an earlier mask
            src = out[rng.integers(k)]
            ys, xs = np.nonzero(src)
            if len(ys):
                y0, x0 = ys.min() + rng.integers(0, 2), xs.min() + rng.integers(0, 2)
                out[k, y0:ys.max() + 1, x0:xs.max() + 1] = True
                continue
        y0, x0 = rng.integers(0, size - 2, size=2)
        out[k, y0:rng.integers(y0 + 1, size + 1), x0:rng.integers(x0 + 1, size + 1)] = True
    return out


# ------------------------------------------------------------------------------------------------
# Filtering and de-duplication

def test_filter_area_is_inclusive():
    areas = np.array([199, 200, 5000, 7000, 7001, 0])
    np.testing.assert_array_equal(roi.filter_area(areas, 200, 7000), [1, 2, 3])
    assert roi.filter_area(np.zeros(0, np.int64), 200, 7000).shape == (0,)
    with pytest.raises(InputError):
        roi.filter_area(np.zeros((2, 2)), 0, 1)


def _dedup(m: np.ndarray) -> np.ndarray:
    return roi.containment_dedup(masks.pack_masks(m))


def test_dedup_equal_areas_removes_the_later():
    m = np.zeros((3, 10, 10), dtype=bool)
    m[0, :5] = m[1, :5] = True        # identical: j=1 goes
    m[2, 5:, :5] = True               # disjoint, same area: stays
    np.testing.assert_array_equal(_dedup(m), [0, 2])


def test_dedup_keeps_the_larger_whatever_the_order():
    m = np.zeros((2, 10, 10), dtype=bool)
    m[0, 2:4, 2:4] = True             # small, first
    m[1, :5, :5] = True               # contains it
    np.testing.assert_array_equal(_dedup(m), [1])
    np.testing.assert_array_equal(_dedup(m[::-1].copy()), [0])


def test_dedup_nested_chain_does_not_cascade():
    # B is 90% inside A (removed by A), C is inside B but only 50% inside A. Without cascading B
    # still removes C; a sequential filter that dropped B first would keep C.
    m = np.zeros((3, 20, 20), dtype=bool)
    m[0, :10, :10] = True                       # A: 100 px
    m[1, :10, 9:11] = True                      # B: 20 px, 10 inside A... widen to reach 0.9
    m[1] = False
    m[1, :9, :10] = True
    m[1, 9, 10:11] = True                       # B: 91 px, 90 inside A -> 0.989
    m[2] = False
    m[2, 8:9, 5:10] = True
    m[2, 9, 10] = True                          # C: 6 px, all inside B, 5 inside A (0.83)
    pa = masks.pack_masks(m)
    cont = masks.containment_matrix(pa, pa)
    assert cont[0, 1] >= 0.9 and cont[1, 2] >= 0.9 and cont[0, 2] < 0.9
    np.testing.assert_array_equal(roi.containment_dedup(pa), [0])
    assert reference_mask_criteria(list(m), 0, 1e9) == [0]


def test_dedup_threshold_is_inclusive():
    m = np.zeros((3, 10, 10), dtype=bool)
    m[0, :5] = True                   # 50 px
    m[1, 0, :10] = True               # 10 px, 9 inside m[0]: exactly 0.9
    m[1, 0, 9] = False
    m[1, 5, 0] = True
    m[2, 4:6, 5:10] = True            # 10 px, 5 inside m[0]
    np.testing.assert_array_equal(_dedup(m), [0, 2])
    np.testing.assert_array_equal(roi.containment_dedup(masks.pack_masks(m), thresh=0.91),
                                  [0, 1, 2])


def test_dedup_empty_single_and_blank_masks():
    assert roi.containment_dedup(np.zeros((0, 2), np.uint64)).shape == (0,)
    np.testing.assert_array_equal(roi.containment_dedup(np.ones((1, 2), np.uint64)), [0])
    blank = np.zeros((3, 4, 4), dtype=bool)  # min area 0: never near-contained
    np.testing.assert_array_equal(_dedup(blank), [0, 1, 2])


def test_dedup_rejects_mismatched_areas():
    with pytest.raises(InputError, match="one area per packed mask"):
        roi.containment_dedup(np.zeros((3, 2), np.uint64), np.zeros(2, np.int64))


@pytest.mark.parametrize("seed", range(8))
def test_select_rois_matches_reference(seed):
    rng = np.random.default_rng(seed)
    m = rect_masks(rng, 40)
    v_min, v_max = 20, 900
    got = roi.select_rois(masks.pack_masks(m), v_min, v_max)
    assert got.dtype == np.int64
    assert got.tolist() == reference_mask_criteria(list(m), v_min, v_max)


# ------------------------------------------------------------------------------------------------
# Mask -> embedding grid, prototypes

def test_downsample_nearest_is_the_reference_cv2_call(rng):
    m = rng.uniform(size=(3, 200, 200)) < 0.3
    got = roi.downsample_nearest(m, (64, 64))
    assert got.dtype == np.float32 and got.shape == (3, 64, 64)
    for k in range(3):
        want = cv2.resize(m[k].astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(got[k], want.astype(bool))
    assert roi.downsample_nearest(m[0], (64, 32)).shape == (64, 32)


def test_downsample_area_fractions(rng):
    m = rng.uniform(size=(2, 256, 256)) < 0.5
    got = roi.downsample_area(m, (64, 64))
    blocks = m.reshape(2, 64, 4, 64, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(got, blocks, atol=1e-6)
    # Non-integer factor: mass is preserved and a lone pixel is not erased.
    one = np.zeros((200, 200), dtype=bool)
    one[101, 57] = True
    small = roi.downsample_area(one, (64, 64))
    assert small.sum() * (200 / 64) ** 2 == pytest.approx(1.0, rel=1e-5)
    assert roi.downsample_nearest(one, (64, 64)).sum() == 0
    with pytest.raises(InputError):
        roi.downsample_area(one, (300, 300))


def test_prototypes_by_hand():
    emb = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)  # C=2, 2x3 grid
    w = np.zeros((3, 2, 3), dtype=np.float32)
    w[0, 0, 0] = w[0, 1, 2] = 1.0        # cells 0 and 5
    w[1, 0, 1] = 0.25                    # cell 1 with weight 0.25, cell 4 with 0.75
    w[1, 1, 1] = 0.75
    protos = roi.prototypes(emb, w)      # w[2] is empty
    np.testing.assert_array_equal(protos, np.float32([[2.5, 8.5], [3.25, 9.25], [0, 0]]))
    assert protos.dtype == np.float32


def test_prototypes_match_reference_nanmean(rng):
    emb = rng.normal(size=(256, 64, 64)).astype(np.float32)   # no exact zeros
    m = rng.uniform(size=(5, 64, 64)) < 0.2
    m[3] = False
    protos = roi.prototypes(emb, m.astype(np.float32))
    for k in range(5):
        prod = emb * m[k]
        prod[prod == 0] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slice of the empty mask
            want = np.nanmean(prod.astype(np.float64), axis=(1, 2))
        want[np.isnan(want)] = 0
        np.testing.assert_allclose(protos[k], want, rtol=1e-6, atol=1e-7)


def test_prototypes_validation():
    with pytest.raises(InputError, match="same grid"):
        roi.prototypes(np.zeros((4, 8, 8), np.float32), np.zeros((2, 8, 7), np.float32))
    with pytest.raises(InputError, match="non-negative"):
        roi.prototypes(np.zeros((4, 8, 8), np.float32), -np.ones((2, 8, 8), np.float32))
    assert roi.prototypes(np.zeros((4, 8, 8), np.float32), np.zeros((0, 8, 8))).shape == (0, 4)


def test_centroids():
    m = np.zeros((2, 5, 6), dtype=bool)
    m[0, 1:3, 2:5] = True
    c = roi.centroids(m)
    np.testing.assert_array_equal(c[0], [3.0, 1.5])
    assert np.all(np.isnan(c[1]))


# ------------------------------------------------------------------------------------------------
# Similarity

def test_cosine_matrix_matches_torch(rng):
    torch = pytest.importorskip("torch")
    p = rng.normal(size=(7, 256)).astype(np.float32)
    q = rng.normal(size=(5, 256)).astype(np.float32)
    p[2] = 0.0
    want = torch.nn.functional.cosine_similarity(
        torch.from_numpy(p)[:, None, :], torch.from_numpy(q)[None, :, :], dim=-1).numpy()
    got = match.cosine_matrix(p, q)
    assert got.dtype == np.float32 and got.shape == (7, 5)
    np.testing.assert_allclose(got, want, atol=2e-7)
    np.testing.assert_array_equal(got[2], 0.0)


def test_faiss_top1_is_argmax_of_cosine(rng):
    p = rng.normal(size=(40, 256)).astype(np.float32)
    q = rng.normal(size=(30, 256)).astype(np.float32)
    sim = match.cosine_matrix(p, q)
    top_sim, top_idx = match.knn(p, q, 1)
    np.testing.assert_array_equal(top_idx[:, 0], np.argmax(sim, axis=1))
    np.testing.assert_allclose(top_sim[:, 0], sim.max(axis=1), atol=1e-6)
    sims5, idx5 = match.knn(p, q, 5)
    assert idx5.shape == (40, 5) and np.all(np.diff(sims5, axis=1) <= 0)
    np.testing.assert_array_equal(idx5, np.argsort(-sim, axis=1, kind="stable")[:, :5])
    assert match.knn(p, q, 100)[1].shape == (40, 30)
    assert match.knn(p, q[:0], 3)[1].shape == (40, 0)
    assert match.knn(p[:0], q, 3)[1].shape == (0, 3)


# ------------------------------------------------------------------------------------------------
# Assignment strategies

EMPTY_SIMS = [np.zeros((0, 0), np.float32), np.zeros((0, 4), np.float32),
              np.zeros((3, 0), np.float32), np.full((3, 4), -0.5, np.float32)]


@pytest.mark.parametrize("strategy", match.STRATEGIES)
@pytest.mark.parametrize("sim", EMPTY_SIMS, ids=["0x0", "0x4", "3x0", "below"])
def test_strategies_on_empty_inputs(strategy, sim):
    result = match.pair(sim, 0.0, strategy)
    assert result.pairs.shape == (0, 2) and result.pairs.dtype == np.int64
    assert result.similarity.shape == (0,) and result.similarity.dtype == np.float32


def test_greedy_strategy_is_the_kernel(rng):
    sim = rng.uniform(-1, 1, size=(20, 25)).astype(np.float32)
    result = match.pair(sim, 0.3, "greedy")
    pairs, values = masks.greedy_match(sim, 0.3, 0)
    np.testing.assert_array_equal(result.pairs, pairs)
    np.testing.assert_array_equal(result.similarity, values)


def test_strategies_differ_where_they_should():
    sim = np.array([[0.90, 0.85], [0.85, 0.10]], dtype=np.float32)
    greedy = match.pair(sim, 0.5, "greedy")
    np.testing.assert_array_equal(greedy.pairs, [[0, 0]])
    hung = match.pair(sim, 0.5, "hungarian")       # 0.85 + 0.85 beats 0.90 alone
    np.testing.assert_array_equal(hung.pairs, [[0, 1], [1, 0]])
    np.testing.assert_array_equal(hung.similarity, np.float32([0.85, 0.85]))
    mnn = match.pair(sim, 0.5, "mutual_nn")
    np.testing.assert_array_equal(mnn.pairs, [[0, 0]])


def test_mutual_nn_requires_both_directions_and_threshold():
    sim = np.array([[0.9, 0.6, 0.0],      # row 0 prefers col 0, which prefers row 1
                    [0.95, 0.1, 0.0],
                    [0.1, 0.7, 0.6]], dtype=np.float32)
    pairs, values = match.mutual_nn(sim, 0.5)
    np.testing.assert_array_equal(pairs, [[1, 0], [2, 1]])
    np.testing.assert_array_equal(values, np.float32([0.95, 0.7]))
    pairs, _ = match.mutual_nn(sim, 0.75)
    np.testing.assert_array_equal(pairs, [[1, 0]])


def test_mutual_nn_ties_take_the_first_index():
    sim = np.array([[0.9, 0.9], [0.9, 0.9]], dtype=np.float32)
    pairs, _ = match.mutual_nn(sim, 0.5)
    np.testing.assert_array_equal(pairs, [[0, 0]])


def test_hungarian_never_keeps_pairs_at_or_below_threshold(rng):
    for _ in range(20):
        sim = rng.uniform(-1, 1, size=(rng.integers(1, 12), rng.integers(1, 12))).astype(np.float32)
        pairs, values = match.hungarian(sim, 0.2)
        assert np.all(values > np.float32(0.2))
        assert len(set(pairs[:, 0])) == len(pairs) and len(set(pairs[:, 1])) == len(pairs)
        assert np.all(np.diff(values) <= 0)
        # at least as much total (sim - thr) as greedy
        g_pairs, g_values = match.greedy(sim, 0.2)
        assert (values - np.float32(0.2)).sum() >= (g_values - np.float32(0.2)).sum() - 1e-6


def test_num_pairs_truncates_and_reports():
    sim = np.diag(np.float32([0.9, 0.95, 0.85, 0.99]))
    result = match.pair(sim, 0.5, "greedy", num_pairs=2)
    np.testing.assert_array_equal(result.pairs, [[3, 3], [1, 1]])
    np.testing.assert_array_equal(result.dropped["num_pairs"], [[0, 0], [2, 2]])
    assert result.dropped["geometry"].shape == (0, 2)
    assert result.transform is None


def test_pair_validation():
    with pytest.raises(InputError, match="strategy"):
        match.pair(np.zeros((2, 2), np.float32), 0.5, "best")
    with pytest.raises(TypeError, match="float32"):
        match.pair(np.zeros((2, 2)), 0.5, "hungarian")
    with pytest.raises(InputError, match="NaN"):
        match.pair(np.array([[np.nan]], np.float32), 0.5, "mutual_nn")
    with pytest.raises(InputError, match="centroids"):
        match.pair(np.eye(2, dtype=np.float32), 0.5, geometry="similarity")


# ------------------------------------------------------------------------------------------------
# Geometric check

def similarity_transform(xy: np.ndarray, angle: float, scale: float, shift: tuple[float, float]
                         ) -> np.ndarray:
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return xy @ np.array([[c, s], [-s, c]]) + np.asarray(shift)


@pytest.mark.parametrize("model", match.GEOMETRIC_MODELS)
def test_geometric_check_drops_a_planted_outlier(rng, model):
    n = 10
    fixed_xy = rng.uniform(0, 200, size=(n, 2))
    moving_xy = similarity_transform(fixed_xy, 0.2, 1.1, (5.0, -8.0)) + rng.normal(0, 0.5, (n, 2))
    moving_xy[6] += (60.0, -45.0)                      # ROI 6 is paired with the wrong region
    sim = np.full((n, n), 0.1, np.float32)
    np.fill_diagonal(sim, np.linspace(0.99, 0.9, n).astype(np.float32))
    result = match.pair(sim, 0.8, "greedy", fixed_xy=fixed_xy, moving_xy=moving_xy,
                        geometry=model, reproj_thresh=5.0)
    np.testing.assert_array_equal(result.dropped["geometry"], [[6, 6]])
    assert len(result.pairs) == n - 1 and 6 not in result.pairs[:, 0]
    np.testing.assert_array_equal(result.similarity, sim[result.pairs[:, 0], result.pairs[:, 1]])
    c, s = np.cos(0.2) * 1.1, np.sin(0.2) * 1.1
    np.testing.assert_allclose(result.transform[:, :2], [[c, -s], [s, c]], atol=0.02)


def test_geometric_check_min_pairs_rule(rng):
    src = rng.uniform(0, 100, size=(3, 2))
    dst = src + 5.0
    dst[0] += 40.0
    # 3 < 2 + 2 pairs: the translation fallback drops the pair displaced by 40 px more
    inliers, transform = match.geometric_inliers(src, dst, "similarity")
    np.testing.assert_array_equal(inliers, [False, True, True])
    assert transform is None
    inliers, transform = match.geometric_inliers(src, dst, "affine", min_pairs=4)
    np.testing.assert_array_equal(inliers, [False, True, True])
    inliers, _ = match.geometric_inliers(src[:1], dst[:1], "similarity")   # one pair: nothing to check
    assert inliers.all()
    src4 = np.vstack([src, [[50.0, 10.0]]])
    dst4 = src4 + 5.0
    dst4[0] += 40.0
    inliers, transform = match.geometric_inliers(src4, dst4, "similarity", reproj_thresh=3.0)
    np.testing.assert_array_equal(inliers, [False, True, True, True])
    with pytest.raises(InputError, match="min_pairs"):
        match.geometric_inliers(src, dst, "affine", min_pairs=3)


def test_translation_fallback_keeps_the_more_similar_of_two_disagreeing_pairs():
    src = np.array([[239.0, 83.0], [341.0, 94.0]])      # lung CT case001_slice_s100, measured pairs
    dst = np.array([[240.0, 78.0], [372.0, 248.0]])     # the second is another part of the lung
    np.testing.assert_array_equal(match.translation_inliers(src, dst, 28.0), [True, False])
    np.testing.assert_array_equal(match.translation_inliers(src[::-1], dst[::-1], 28.0), [True, False])
    np.testing.assert_array_equal(match.translation_inliers(src, src + 3.0, 28.0), [True, True])
    sim = np.array([[0.93, 0.1], [0.1, 0.85]], np.float32)
    result = match.pair(sim, 0.5, "mutual_nn", fixed_xy=src, moving_xy=dst, geometry="similarity",
                        reproj_thresh=28.0)
    np.testing.assert_array_equal(result.pairs, [[0, 0]])
    np.testing.assert_array_equal(result.dropped["geometry"], [[1, 1]])
    with pytest.raises(InputError, match="NaN"):
        match.geometric_inliers(np.full((4, 2), np.nan), np.zeros((4, 2)))
    with pytest.raises(InputError, match="model"):
        match.geometric_inliers(src, dst, "projective")


def test_min_support_drops_pairs_that_nothing_confirms():
    sim = np.array([[0.9, 0.1], [0.1, 0.8]], np.float32)
    src = np.array([[10.0, 10.0], [80.0, 60.0]])
    agree, disagree = src + 4.0, src + [[4.0, 4.0], [60.0, -50.0]]
    for moving_xy, kept in ((agree, 2), (disagree, 0)):
        result = match.pair(sim, 0.5, "mutual_nn", fixed_xy=src, moving_xy=moving_xy, geometry="similarity",
                            reproj_thresh=10.0, min_support=2)
        assert len(result.pairs) == kept and len(result.dropped["geometry"]) == 2 - kept
    lone = match.pair(sim[:1, :1], 0.5, "mutual_nn", fixed_xy=src[:1], moving_xy=agree[:1],
                      geometry="similarity", min_support=2)
    assert len(lone.pairs) == 0 and len(match.pair(sim[:1, :1], 0.5, "mutual_nn").pairs) == 1
