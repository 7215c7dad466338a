"""The native kernels (samreg_rt._ext) against their numpy twins (tests/twins.py), against
SAM's own helpers where torch is installed, argument validation, and samreg_rt.amg_utils."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import twins
from tests.cpu_build import run_capped
from tests.threadcount import most_threads_during
from samreg_rt import _ext, amg_utils, masks
from samreg_rt.errors import InputError

MASK_SHAPES = [(0, 5, 7), (1, 1, 1), (3, 8, 8), (4, 13, 17), (2, 1, 65), (3, 0, 5), (5, 64, 64),
               (2, 256, 256), (3, 200, 200)]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def sam_amg():
    """segment_anything/utils/amg.py loaded on its own (the package __init__ needs torchvision)."""
    torch = pytest.importorskip("torch")
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("segment-anything is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "amg.py"
    module_spec = importlib.util.spec_from_file_location("_sam_amg", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module, torch


def random_masks(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Masks with varied density, including an empty and a full one when there is room."""
    n = shape[0]
    density = rng.uniform(0, 1, size=(n, 1, 1))
    masks_ = rng.uniform(size=shape) < density
    if n >= 3:
        masks_[0] = False
        masks_[1] = True
    return masks_


# ------------------------------------------------------------------------------------------------
# Packing, areas, overlap matrices

@pytest.mark.parametrize("shape", MASK_SHAPES)
def test_pack_unpack_match_twin(rng, shape):
    m = random_masks(rng, shape)
    packed = _ext.pack_masks(m)
    np.testing.assert_array_equal(packed, twins.pack_masks(m))
    assert packed.dtype == np.uint64 and packed.shape == (shape[0], -(-shape[1] * shape[2] // 64))
    np.testing.assert_array_equal(_ext.unpack_masks(packed, shape[1], shape[2]), m)
    np.testing.assert_array_equal(twins.unpack_masks(packed, shape[1], shape[2]), m)


def test_pack_bit_layout():
    m = np.zeros((1, 3, 50), dtype=bool)  # 150 pixels -> 3 words
    m[0, 0, 0] = m[0, 1, 14] = m[0, 2, 49] = True  # pixels 0, 64, 149
    packed = _ext.pack_masks(m)
    np.testing.assert_array_equal(packed, np.array([[1, 1, 1 << 21]], dtype=np.uint64))


def test_pack_treats_any_nonzero_byte_as_true():
    raw = np.array([[[0, 1, 2, 255, 128, 0, 7, 0, 1]]], dtype=np.uint8)
    m = raw.view(bool)
    np.testing.assert_array_equal(_ext.pack_masks(m), [[0b101011110]])


@pytest.mark.parametrize("shape", MASK_SHAPES)
def test_overlap_kernels_match_twins(rng, shape):
    a = _ext.pack_masks(random_masks(rng, shape))
    b = _ext.pack_masks(random_masks(rng, (shape[0] + 1,) + shape[1:]))
    np.testing.assert_array_equal(_ext.mask_areas(a), twins.mask_areas(a))
    for name in ("intersection_matrix", "iou_matrix", "containment_matrix"):
        got, want = getattr(_ext, name)(a, b), getattr(twins, name)(a, b)
        assert got.dtype == want.dtype and got.shape == (len(a), len(b))
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_overlap_values_by_hand():
    a = np.zeros((3, 4, 5), dtype=bool)
    a[0, :2] = True             # 10 px
    a[1, :1, :2] = True         # 2 px, inside a[0]
    b = np.zeros((2, 4, 5), dtype=bool)
    b[0, 1:3] = True            # 10 px, 5 shared with a[0]
    pa, pb = _ext.pack_masks(a), _ext.pack_masks(b)
    np.testing.assert_array_equal(_ext.mask_areas(pa), [10, 2, 0])
    np.testing.assert_array_equal(_ext.intersection_matrix(pa, pb), [[5, 0], [0, 0], [0, 0]])
    iou = _ext.iou_matrix(pa, pb)
    assert iou[0, 0] == np.float32(5 / 15) and iou[2, 1] == 0.0  # empty vs empty -> 0
    cont = _ext.containment_matrix(pa, pa)
    assert cont[0, 1] == 1.0 and cont[1, 0] == 1.0 and cont[2, 2] == 0.0


def test_overlap_of_empty_sets():
    empty = np.zeros((0, 3), dtype=np.uint64)
    some = np.ones((2, 3), dtype=np.uint64)
    assert _ext.iou_matrix(empty, some).shape == (0, 2)
    assert _ext.containment_matrix(some, empty).shape == (2, 0)
    assert _ext.intersection_matrix(empty, empty).shape == (0, 0)
    assert _ext.mask_areas(empty).shape == (0,)


# ------------------------------------------------------------------------------------------------
# NMS

def random_boxes(rng: np.random.Generator, n: int, tie_levels: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    xy = rng.uniform(0, 200, size=(n, 2))
    wh = rng.uniform(1, 80, size=(n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    if tie_levels:
        scores = rng.integers(0, tie_levels, size=n).astype(np.float32) / tie_levels
    else:
        scores = rng.uniform(size=n).astype(np.float32)
    return boxes, scores


@pytest.mark.parametrize("n", [0, 1, 2, 10, 300, 2000])
@pytest.mark.parametrize("thresh", [0.0, 0.3, 0.7, 1.0])
def test_nms_matches_twin(rng, n, thresh):
    for tie_levels in (None, 3):
        boxes, scores = random_boxes(rng, n, tie_levels)
        got = _ext.box_nms(boxes, scores, thresh)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, twins.box_nms(boxes, scores, thresh))


def test_nms_by_hand():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]],
                     dtype=np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.9], dtype=np.float32)
    # visit order 1, 3 (tie: index order), 0, 2; IoU(1, 3) = IoU(1, 0) = 81 / 119
    np.testing.assert_array_equal(_ext.box_nms(boxes, scores, 0.5), [1, 2])
    np.testing.assert_array_equal(_ext.box_nms(boxes, scores, 0.99), [1, 3, 2])


def test_nms_suppresses_strictly_above_threshold():
    boxes = np.array([[0, 0, 2, 1], [1, 0, 3, 1]], dtype=np.float32)  # IoU exactly 1/3
    scores = np.array([0.5, 0.4], dtype=np.float32)
    np.testing.assert_array_equal(_ext.box_nms(boxes, scores, np.float32(1 / 3)), [0, 1])
    np.testing.assert_array_equal(_ext.box_nms(boxes, scores, 0.3), [0])
    # float32 IoU 0.33333334 against the float64 threshold 0.333...: above it, as in torchvision
    np.testing.assert_array_equal(_ext.box_nms(boxes, scores, 1 / 3), [0])
    np.testing.assert_array_equal(twins.box_nms(boxes, scores, 1 / 3), [0])


def test_nms_zero_area_boxes_are_never_suppressed():
    boxes = np.array([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 10, 0]], dtype=np.float32)
    scores = np.array([0.3, 0.2, 0.1], dtype=np.float32)  # IoU 0/0 = NaN is not > thresh
    np.testing.assert_array_equal(_ext.box_nms(boxes, scores, 0.0), [0, 1, 2])
    np.testing.assert_array_equal(twins.box_nms(boxes, scores, 0.0), [0, 1, 2])


# ------------------------------------------------------------------------------------------------
# Stability score

@pytest.mark.parametrize("shape", [(0, 4, 4), (1, 1, 1), (5, 37, 41), (8, 256, 256)])
@pytest.mark.parametrize("threshold, offset", [(0.0, 1.0), (0.1, 0.3), (-0.7, 0.05)])
def test_stability_matches_twin(rng, shape, threshold, offset):
    logits = rng.normal(0, 3, size=shape).astype(np.float32)
    if shape[0]:
        logits[0] = -10.0  # empty at both thresholds: 0/0
    got = _ext.stability_scores(logits, threshold, offset)
    np.testing.assert_array_equal(got, twins.stability_scores(logits, threshold, offset))
    if shape[0]:
        assert np.isnan(got[0])


def test_stability_is_strict_and_rounds_thresholds_to_float32():
    # 0.1 + 0.3 = 0.4000000000000001 < float(float32(0.4)): compared in float64 the float32(0.4)
    # logit would pass the upper threshold; in float32 (as torch does) it does not (strict >).
    assert float(np.float32(0.4)) > 0.1 + 0.3
    logits = np.array([[[np.float32(0.4), 1.0, -1.0, 0.0]]], dtype=np.float32)
    assert _ext.stability_scores(logits, 0.1, 0.3)[0] == np.float32(1) / np.float32(3)


def test_stability_matches_sam(rng, sam_amg):
    amg, torch = sam_amg
    logits = rng.normal(0, 2, size=(6, 64, 64)).astype(np.float32)
    logits[2] = -5
    logits[3, :3, :3] = 1.0  # exactly at the upper threshold
    for t, off in [(0.0, 1.0), (0.2, 0.7)]:
        want = amg.calculate_stability_score(torch.from_numpy(logits), t, off).numpy()
        np.testing.assert_array_equal(_ext.stability_scores(logits, t, off), want)


# ------------------------------------------------------------------------------------------------
# Greedy matching

def reference_greedy(sim: np.ndarray, threshold: float, num_pair: int, torch) -> np.ndarray:
    """SAMReg RoiMatching._roi_match, torch, as in the reference (blanking with -1)."""
    matrix = torch.from_numpy(sim.copy())
    pairs = []
    while torch.any(matrix > threshold):
        max_idx = torch.argmax(matrix)
        i, j = int(max_idx // matrix.shape[1]), int(max_idx % matrix.shape[1])
        if matrix[i, j] > threshold:
            pairs.append((i, j))
        matrix[i, :] = -1
        matrix[:, j] = -1
    if num_pair > 0 and len(pairs) >= num_pair:
        pairs = pairs[:num_pair]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (4, 0), (1, 1), (7, 3), (3, 7), (60, 60)])
@pytest.mark.parametrize("max_pairs", [0, 1, 2, 100])
def test_greedy_matches_twin(rng, shape, max_pairs):
    for quantised in (False, True):  # quantised: many exact ties
        sim = rng.uniform(-1, 1, size=shape)
        if quantised:
            sim = np.round(sim * 4) / 4
        sim = sim.astype(np.float32)
        for thr in (-1.0, 0.0, 0.5, 0.8):
            pairs, values = _ext.greedy_match(sim, thr, max_pairs)
            want_pairs, want_values = twins.greedy_match(sim, thr, max_pairs)
            np.testing.assert_array_equal(pairs, want_pairs)
            np.testing.assert_array_equal(values, want_values)
            assert pairs.dtype == np.int64 and values.dtype == np.float32
            np.testing.assert_array_equal(values, sim[pairs[:, 0], pairs[:, 1]])
            assert np.all(np.diff(values) <= 0)


def test_greedy_ties_take_row_major_first():
    sim = np.array([[0.5, 0.9, 0.9], [0.9, 0.9, 0.1], [0.2, 0.3, 0.9]], dtype=np.float32)
    pairs, values = _ext.greedy_match(sim, 0.4, 0)
    np.testing.assert_array_equal(pairs, [[0, 1], [1, 0], [2, 2]])
    np.testing.assert_array_equal(values, np.float32([0.9, 0.9, 0.9]))


def test_greedy_threshold_compared_in_float32():
    sim = np.array([[0.8, 0.81]], dtype=np.float32)
    pairs, _ = _ext.greedy_match(sim, 0.8, 0)  # float32(0.8) is not > float32(0.8)
    np.testing.assert_array_equal(pairs, [[0, 1]])
    pairs, _ = _ext.greedy_match(sim[:, :1].copy(), 0.8, 0)
    assert pairs.shape == (0, 2)


def test_greedy_matches_reference_loop(rng, sam_amg):
    _, torch = sam_amg
    for _ in range(20):
        sim = (np.round(rng.uniform(-1, 1, size=(rng.integers(1, 30), rng.integers(1, 30))) * 8)
               / 8).astype(np.float32)
        for thr, num_pair in [(0.8, 0), (0.25, 0), (0.0, 3)]:
            pairs, _ = _ext.greedy_match(sim, thr, num_pair)
            np.testing.assert_array_equal(pairs, reference_greedy(sim, thr, num_pair, torch))


# ------------------------------------------------------------------------------------------------
# Property tests on random shapes

@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 6), h=st.integers(0, 40), w=st.integers(0, 40),
       seed=st.integers(0, 2**32 - 1))
def test_property_packing_and_overlaps(n, h, w, seed):
    rng = np.random.default_rng(seed)
    m = rng.uniform(size=(n, h, w)) < rng.uniform()
    packed = _ext.pack_masks(m)
    np.testing.assert_array_equal(packed, twins.pack_masks(m))
    np.testing.assert_array_equal(_ext.unpack_masks(packed, h, w), m)
    np.testing.assert_array_equal(_ext.mask_areas(packed), m.sum(axis=(1, 2)))
    np.testing.assert_array_equal(_ext.iou_matrix(packed, packed), twins.iou_matrix(packed, packed))
    np.testing.assert_array_equal(_ext.containment_matrix(packed, packed),
                                  twins.containment_matrix(packed, packed))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 60), levels=st.integers(1, 5), thresh=st.floats(0, 1),
       seed=st.integers(0, 2**32 - 1))
def test_property_nms(n, levels, thresh, seed):
    boxes, scores = random_boxes(np.random.default_rng(seed), n, levels)
    np.testing.assert_array_equal(_ext.box_nms(boxes, scores, thresh),
                                  twins.box_nms(boxes, scores, thresh))


@settings(max_examples=100, deadline=None)
@given(n1=st.integers(0, 12), n2=st.integers(0, 12), levels=st.integers(1, 6),
       thresh=st.floats(-1, 1), max_pairs=st.integers(-1, 5), seed=st.integers(0, 2**32 - 1))
def test_property_greedy(n1, n2, levels, thresh, max_pairs, seed):
    rng = np.random.default_rng(seed)
    sim = (rng.integers(-levels, levels + 1, size=(n1, n2)) / levels).astype(np.float32)
    got = _ext.greedy_match(sim, thresh, max_pairs)
    want = twins.greedy_match(sim, thresh, max_pairs)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    rows, cols = got[0].T
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 5), h=st.integers(1, 30), w=st.integers(1, 30),
       threshold=st.floats(-2, 2), offset=st.floats(0, 2), seed=st.integers(0, 2**32 - 1))
def test_property_stability(n, h, w, threshold, offset, seed):
    logits = np.random.default_rng(seed).normal(0, 2, size=(n, h, w)).astype(np.float32)
    np.testing.assert_array_equal(_ext.stability_scores(logits, threshold, offset),
                                  twins.stability_scores(logits, threshold, offset))


# ------------------------------------------------------------------------------------------------
# Argument validation, in C++ and in the Python wrappers

def _calls(packed: np.ndarray):
    return {
        "pack_masks": lambda x: _ext.pack_masks(x),
        "unpack_masks": lambda x: _ext.unpack_masks(x, 4, 4),
        "mask_areas": lambda x: _ext.mask_areas(x),
        "iou_matrix": lambda x: _ext.iou_matrix(x, packed),
        "containment_matrix": lambda x: _ext.containment_matrix(packed, x),
        "intersection_matrix": lambda x: _ext.intersection_matrix(x, packed),
        "stability_scores": lambda x: _ext.stability_scores(x, 0.0, 1.0),
        "greedy_match": lambda x: _ext.greedy_match(x, 0.5, 0),
    }


GOOD = {
    "pack_masks": np.zeros((2, 4, 4), bool), "unpack_masks": np.zeros((2, 1), np.uint64),
    "mask_areas": np.zeros((2, 1), np.uint64), "iou_matrix": np.zeros((2, 1), np.uint64),
    "containment_matrix": np.zeros((2, 1), np.uint64),
    "intersection_matrix": np.zeros((2, 1), np.uint64),
    "stability_scores": np.zeros((2, 4, 4), np.float32),
    "greedy_match": np.zeros((4, 4), np.float32),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_kernels_reject_bad_arrays(name):
    call = _calls(np.zeros((3, 1), np.uint64))[name]
    good = GOOD[name]
    call(good)  # accepted
    wrong_dtype = good.astype(np.float64 if good.dtype != np.float64 else np.float32)
    with pytest.raises(TypeError, match="dtype"):
        call(wrong_dtype)
    with pytest.raises(TypeError, match="ndarray"):
        call(good.tolist())
    with pytest.raises(ValueError, match="dimensions"):
        call(good[None])
    strided = np.repeat(good, 2, axis=-1)[..., ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        call(strided)
    if good.dtype.itemsize > 1:
        with pytest.raises(TypeError, match="dtype"):
            call(good.astype(good.dtype.newbyteorder()))


def test_kernels_reject_bad_shapes_and_values():
    a, b = np.zeros((2, 3), np.uint64), np.zeros((2, 4), np.uint64)
    for fn in (_ext.iou_matrix, _ext.containment_matrix, _ext.intersection_matrix):
        with pytest.raises(ValueError, match="mismatched word counts"):
            fn(a, b)
    with pytest.raises(ValueError, match="needs 2"):
        _ext.unpack_masks(np.zeros((1, 3), np.uint64), 10, 10)
    with pytest.raises(ValueError, match=">= 0"):
        _ext.unpack_masks(np.zeros((1, 0), np.uint64), -1, 0)
    boxes = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="one per box"):
        _ext.box_nms(boxes, np.zeros(2, np.float32), 0.5)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        _ext.box_nms(np.zeros((3, 5), np.float32), np.zeros(3, np.float32), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        _ext.box_nms(boxes, np.array([0, np.nan, 1], np.float32), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        _ext.greedy_match(np.array([[np.nan]], np.float32), 0.5, 0)
    with pytest.raises(TypeError, match="dtype"):
        _ext.box_nms(boxes.astype(np.float64), np.zeros(3, np.float32), 0.5)


def test_kernels_reject_unaligned_data():
    unaligned = np.zeros(17, np.uint8)[1:].view(np.uint64).reshape(2, 1)
    assert unaligned.flags.c_contiguous and not unaligned.flags.aligned
    with pytest.raises(ValueError, match="not aligned"):
        _ext.mask_areas(unaligned)


def test_wrappers_validate_with_named_arguments():
    with pytest.raises(TypeError, match="masks: expected dtype bool"):
        masks.pack_masks(np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(InputError, match="C-contiguous"):
        masks.mask_areas(np.zeros((2, 4), np.uint64)[:, ::2])
    with pytest.raises(InputError, match="mismatched word counts"):
        masks.iou_matrix(np.zeros((1, 2), np.uint64), np.zeros((1, 3), np.uint64))
    with pytest.raises(InputError, match="needs 2"):
        masks.unpack_masks(np.zeros((1, 3), np.uint64), 10, 10)
    with pytest.raises(InputError, match=r"\(N, 4\)"):
        masks.box_nms(np.zeros((2, 4), np.float32), np.zeros(3, np.float32), 0.5)
    with pytest.raises(InputError, match="3 dimensions"):
        masks.stability_scores(np.zeros((4, 4), np.float32), 0.0, 1.0)
    with pytest.raises(TypeError, match="sim"):
        masks.greedy_match(np.zeros((2, 2)), 0.5)


def test_wrappers_forward_to_kernels(rng):
    m = random_masks(rng, (4, 9, 11))
    p = masks.pack_masks(m)
    np.testing.assert_array_equal(masks.unpack_masks(p, 9, 11), m)
    np.testing.assert_array_equal(masks.iou_matrix(p, p), twins.iou_matrix(p, p))
    np.testing.assert_array_equal(masks.containment_matrix(p, p), twins.containment_matrix(p, p))
    np.testing.assert_array_equal(masks.intersection_matrix(p, p), twins.intersection_matrix(p, p))
    assert masks.n_words(9, 11) == p.shape[1] == 2


# ------------------------------------------------------------------------------------------------
# amg_utils: SAM's mask-generator helpers

def test_point_grid(sam_amg):
    amg, _ = sam_amg
    for n in (1, 4, 32):
        np.testing.assert_array_equal(amg_utils.point_grid(n), amg.build_point_grid(n))
    grid = amg_utils.point_grid(2)
    np.testing.assert_array_equal(grid, [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    with pytest.raises(ValueError):
        amg_utils.point_grid(0)


def test_box_grid_layout_and_clipping():
    boxes = amg_utils.box_grid(2, [0.2, 1.0])
    assert boxes.shape == (8, 4)
    np.testing.assert_allclose(boxes[0], [0.15, 0.15, 0.35, 0.35])   # centre (0.25, 0.25), 0.2
    np.testing.assert_allclose(boxes[1], [0.0, 0.0, 0.75, 0.75])     # same centre, clipped
    np.testing.assert_allclose(boxes[2], [0.65, 0.15, 0.85, 0.35])   # centre (0.75, 0.25)
    assert boxes.min() >= 0 and boxes.max() <= 1
    with pytest.raises(ValueError):
        amg_utils.box_grid(2, [])
    with pytest.raises(ValueError):
        amg_utils.box_grid(2, [0.1, -0.1])


def test_batched_mask_to_box(rng, sam_amg):
    amg, torch = sam_amg
    m = random_masks(rng, (3, 17, 23)) & (rng.uniform(size=(3, 17, 23)) < 0.1)
    m[0] = False
    m = np.stack([m, m[::-1]])  # (2, 3, H, W)
    want = amg.batched_mask_to_box(torch.from_numpy(m)).numpy()
    got = amg_utils.batched_mask_to_box(m)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[0, 0], [0, 0, 0, 0])
    one = np.zeros((5, 6), bool)
    one[1:3, 2:5] = True
    np.testing.assert_array_equal(amg_utils.batched_mask_to_box(one), [2, 1, 4, 2])
    assert amg_utils.batched_mask_to_box(np.zeros((0, 4, 4), bool)).shape == (0, 4)


def test_rle_roundtrip_and_sam_parity(rng, sam_amg):
    amg, torch = sam_amg
    m = random_masks(rng, (5, 13, 7))
    m[2] = False
    m[2, 0, 0] = True
    rles = amg_utils.mask_to_rle(m)
    assert rles == amg.mask_to_rle_pytorch(torch.from_numpy(m))
    for mask, rle in zip(m, rles):
        np.testing.assert_array_equal(amg_utils.rle_to_mask(rle), mask)
        np.testing.assert_array_equal(amg_utils.rle_to_mask(rle), amg.rle_to_mask(rle))
        assert amg_utils.area_from_rle(rle) == mask.sum()
    assert rles[0]["counts"] == [13 * 7] and rles[1]["counts"] == [0, 13 * 7]
    with pytest.raises(ValueError, match="sum"):
        amg_utils.rle_to_mask({"size": [2, 2], "counts": [1, 2]})


def test_amg_stability_wrapper_defaults(rng):
    logits = rng.normal(size=(3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(amg_utils.stability_scores(logits),
                                  twins.stability_scores(logits, 0.0, 1.0))


# ------------------------------------------------------------------------------------------------
# Resizing logits with banded matrices

@pytest.mark.parametrize("low_shape,out_shape", [((3, 256, 256), (200, 200)), ((2, 64, 48), (216, 256)),
                                                 ((0, 16, 16), (8, 8)), ((1, 5, 7), (1, 1))])
def test_resize_logits_matches_twin(rng, low_shape, out_shape):
    from samreg_rt.amg import bilinear_matrix
    low = rng.normal(0, 4, low_shape).astype(np.float32)
    ry = bilinear_matrix(low_shape[1], out_shape[0]).astype(np.float32)          # banded
    rx = rng.normal(0, 1, (out_shape[1], low_shape[2])).astype(np.float32)      # dense
    rx[0] = 0.0                                                                  # an all-zero row: output 0
    got = _ext.resize_logits(low, ry, rx)
    want = twins.resize_logits(low, ry, rx)
    assert got.shape == want.shape == (low_shape[0], *out_shape) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max(initial=0))))
    assert not got[:, :, 0].any()


def test_resize_logits_rejects_mismatched_matrices(rng):
    low = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(ValueError, match="columns"):
        _ext.resize_logits(low, np.zeros((4, 7), np.float32), np.zeros((4, 8), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        _ext.resize_logits(low, np.zeros((4, 8)), np.zeros((4, 8), np.float32))


# ------------------------------------------------------------------------------------------------
# Fused mask upscaling

# the builds this CPU can run of a kernel with an AVX2 build (every CPU with AVX-512 has AVX2 and FMA)
KERNEL_ISAS = ["auto", "generic"] + (["avx2"] if _ext.mask_upscaling_isa() != "generic" else [])

@pytest.mark.parametrize("counts,height,width", [([3, 0, 1, 4], 16, 32), ([1], 64, 64), ([0, 0], 16, 16),
                                                 ([2, 3], 8, 48)])
@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_mask_upscaling_matches_twin(rng, counts, height, width, isa):
    args = twins.upscaling_inputs(rng, counts, height, width)
    got = _ext.mask_upscaling(**args, isa=isa)
    want = twins.mask_upscaling(**args)
    assert got.shape == want.shape == (sum(counts), 4 * height, 4 * width) and got.dtype == np.float32
    # float32 accumulation and a rational erf (5e-7) against float64 with the exact erf
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max(1.0, float(np.abs(want).max(initial=0))))
    assert _ext.mask_upscaling_isa() in ("avx512", "avx2", "generic")


@pytest.mark.skipif(_ext.mask_upscaling_isa() != "avx512", reason="compares the AVX2 build with the AVX-512 one")
@pytest.mark.parametrize("factored", [False, True])
def test_mask_upscaling_avx2_equals_avx512(rng, factored):
    """The AVX2 build (8 pixels per vector) does each pixel's operations in the AVX-512 build's order (16 per
    vector): the same logits to the bit, factored inputs (in blocks of 16 pixels) included."""
    if factored:
        args = twins.upscaling_factored_inputs(rng, [3, 0, 2], 8, 48, 56, 8)
        run = _ext.mask_upscaling_factored
    else:
        args = twins.upscaling_inputs(rng, [3, 0, 2], 8, 48)
        run = _ext.mask_upscaling
    np.testing.assert_array_equal(run(**args, isa="avx2"), run(**args, isa="auto"))


def _with_cpu_build(cap: str, code: str) -> str:
    """The output of ``code`` run by a fresh interpreter with SAMREG_RT_CPU_BUILD=cap (read when _ext loads)."""
    done = run_capped(cap, code)
    assert done.returncode == 0 or "Error" in done.stderr, done.stderr
    return done.stdout.strip() if done.returncode == 0 else done.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(_ext.mask_upscaling_isa() == "generic", reason="caps a CPU with AVX2 or AVX-512")
def test_cpu_build_cap():
    """SAMREG_RT_CPU_BUILD caps the builds that isa 'auto' runs (and that mask_upscaling_isa reports): 'avx2' runs
    the AVX2 builds (bit-equal results where they are tested so), no AVX-512 kernel and no bfloat16 one; 'generic'
    the portable builds; 'avx512' changes nothing; any other value fails the import, naming the variable."""
    probe = ("import numpy as np; from samreg_rt import _ext; from tests import twins; "
             "rng = np.random.default_rng(0); x = rng.normal(size=(9, 40)).astype(np.float32); "
             "w = rng.normal(size=(40, 70)).astype(np.float32); b = rng.normal(size=70).astype(np.float32); "
             "args = twins.two_way_inputs(rng, 2, True, 100, 8, 8, 2); keys = _ext.two_way_pass(**args)[0]; "
             "print(_ext.mask_upscaling_isa(), _ext.has_avx512_bf16(), "
             "np.array_equal(_ext.linear(x, w, b), _ext.linear(x, w, b, isa='avx2')), "
             "np.array_equal(_ext.linear(x, w, b), _ext.linear(x, w, b, isa='generic')), "
             "np.array_equal(keys, _ext.two_way_pass(**args, isa='avx2')[0]), "
             "np.array_equal(keys, _ext.two_way_pass(**args, isa='generic')[0]))")
    assert _with_cpu_build("avx2", probe) == "avx2 False True False True False"
    assert _with_cpu_build("generic", probe) == "generic False False True False True"
    assert _with_cpu_build("avx512", probe).split()[:2] == [_ext.mask_upscaling_isa(), str(_ext.has_avx512_bf16())]
    message = _with_cpu_build("sse2", probe)
    assert message.startswith("ImportError") and "SAMREG_RT_CPU_BUILD: expected 'avx512', 'avx2' or 'generic'" in message


def test_mask_upscaling_layout(rng):
    """Each input pixel's 16 outputs land in its own 4x4 block: a change at one input pixel moves
    only that block of the logits."""
    args = twins.upscaling_inputs(rng, [2], 16, 16)
    base = _ext.mask_upscaling(**args)
    args["tokens"][1, 5 * 16 + 7] += rng.normal(0, 1, 256).astype(np.float32)  # input pixel (i, j) = (5, 7)
    changed = np.abs(_ext.mask_upscaling(**args) - base) > 0
    assert changed[:, 20:24, 28:32].all() and changed.sum() == 2 * 16


def test_mask_upscaling_rejects_bad_arguments(rng):
    good = twins.upscaling_inputs(rng, [2, 1], 16, 16)
    cases = [
        (dict(width=24), "multiple of 16"),
        (dict(width=0), "multiple of 16"),
        (dict(eps=0.0), "eps"),
        (dict(mask_start=np.array([0, 2, 2], np.int64)), "end at hyper's 3 rows"),
        (dict(mask_start=np.array([0, 5, 5], np.int64), hyper=good["hyper"][[0, 1, 2, 0, 1]]), "prompt 0 has 5 masks"),
        (dict(mask_start=np.array([0, 2], np.int64)), r"mask_start: expected shape \(3\)"),
        (dict(w2=good["w2"][:, :64].copy()), r"w2: expected shape \(64, 128\)"),
        (dict(tokens=good["tokens"][:, :, :128].copy()), r"tokens: expected shape"),
        (dict(rows=np.array([1, 3], np.int64)), "rows: 3 is not a prompt of the batch"),
        (dict(out=np.zeros((3, 64, 64), np.float32)[:, ::2]), "C-contiguous"),
        (dict(hyper=good["hyper"].astype(np.float64)), "dtype"),
        (dict(isa="avx512"), "isa must be 'auto', 'avx2' or 'generic'"),
        (dict(isa="AUTO"), "isa must be 'auto', 'avx2' or 'generic'"),
    ]
    for change, message in cases:
        error = TypeError if message == "dtype" else ValueError
        with pytest.raises(error, match=message):
            _ext.mask_upscaling(**{**good, **change})


@pytest.mark.parametrize("counts,height,width,tokens,heads", [
    ([3, 1, 2], 64, 64, 56, 8),      # SAM's point prompts on a 64x64 embedding
    ([2], 16, 16, 7, 1),             # one head
    ([1, 0, 3], 4, 32, 16, 4),       # a prompt without masks; 2J + 2 not a multiple of the tile
    ([4], 1, 16, 127, 1),            # the most tokens: 2J + 2 = 256
])
@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_mask_upscaling_factored_matches_twin(rng, counts, height, width, tokens, heads, isa):
    args = twins.upscaling_factored_inputs(rng, counts, height, width, tokens, heads)
    got = _ext.mask_upscaling_factored(**args, isa=isa)
    want = twins.mask_upscaling_factored(**args)
    assert got.shape == (sum(counts), 4 * height, 4 * width)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(np.abs(want).max()))


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_mask_upscaling_grid_rows(rng, factored, isa):
    """grid_rows g upscales the grid's first g rows only: the first 4g rows of the whole logits, to the bit (each
    grid row makes its own 4 rows), and the twin's; -1 is all; other values and an out of the whole shape are
    refused."""
    if factored:
        args, run, twin = (twins.upscaling_factored_inputs(rng, [2, 0, 1], 8, 32, 9, 3), _ext.mask_upscaling_factored,
                           twins.mask_upscaling_factored)
    else:
        args, run, twin = twins.upscaling_inputs(rng, [2, 0, 1], 8, 32), _ext.mask_upscaling, twins.mask_upscaling
    whole = run(**args, isa=isa)
    np.testing.assert_array_equal(run(**args, grid_rows=-1, isa=isa), whole)
    for g in (1, 3, 8):
        got = run(**args, grid_rows=g, isa=isa)
        assert got.shape == (3, 4 * g, 128)
        np.testing.assert_array_equal(got, whole[:, :4 * g])
        want = twin(**args, grid_rows=g)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * float(np.abs(want).max()))
    out = np.full((3, 12, 128), np.nan, np.float32)
    assert run(**args, grid_rows=3, out=out, isa=isa) is out and np.isfinite(out).all()
    for bad in (0, 9, -2):
        with pytest.raises(ValueError, match=f"grid_rows {bad} must be -1 or 1..8"):
            run(**args, grid_rows=bad, isa=isa)
    with pytest.raises(ValueError, match=r"out: expected shape \(3, 12, 128\)"):
        run(**args, grid_rows=3, out=np.zeros((3, 32, 128), np.float32), isa=isa)


def test_mask_upscaling_factored_equals_mask_upscaling_of_its_tokens(rng):
    """Factors whose z is that of given tokens (first = [0; 0; 0; b1] plus the tokens' product folded into e_t
    with unit scales) upscale to mask_upscaling's logits of those tokens."""
    args = twins.upscaling_inputs(rng, [2, 3], 16, 16)
    tokens, w1, b1 = args.pop("tokens"), args.pop("w1"), args.pop("b1")
    b, hw = tokens.shape[:2]
    e = tokens[2] @ w1                                          # the rows upscaled are 2 then 1: the same e for both
    tokens[1] = tokens[2]
    first = np.zeros((b, 2 * 8 + 2, 256), np.float32)
    first[:, -1] = b1
    factored = _ext.mask_upscaling_factored(
        e_t=np.ascontiguousarray(e.reshape(hw // 16, 16, 256).transpose(0, 2, 1)),
        probs1=np.zeros((b, hw // 16, 8, 16), np.float32), rstd1=np.ones((b, hw), np.float32),
        probs2=np.zeros((b, hw // 16, 8, 16), np.float32), rstd2=np.ones((b, hw), np.float32), first=first, **args)
    np.testing.assert_allclose(factored, _ext.mask_upscaling(tokens=tokens, w1=w1, b1=b1, **args), rtol=0,
                               atol=1e-5 * float(np.abs(factored).max()))


def test_mask_upscaling_factored_rejects_bad_arguments(rng):
    good = twins.upscaling_factored_inputs(rng, [2, 1], 16, 16, 8, 2)
    cases = [
        (dict(e_t=good["e_t"][:, :128].copy()), r"e_t: expected shape \(16, 256, 16\)"),
        (dict(probs1=good["probs1"][:, :, :7].copy()), r"probs2: expected shape \(3, 16, 7, 16\)"),
        (dict(probs2=good["probs2"][:2].copy()), r"probs2: expected shape \(3, 16, 8, 16\)"),
        (dict(rstd1=good["rstd1"][:, :255].copy()), r"rstd1: expected shape \(3, 256\)"),
        (dict(first=good["first"][:, :17].copy()), r"first: expected shape \(3, 18, 256\)"),
        (dict(probs1=np.zeros((3, 16, 128, 16), np.float32)), "probs1: 128 tokens; expected 1..127"),
        (dict(rows=np.array([1, 3], np.int64)), "rows: 3 is not a prompt of the batch"),
        (dict(width=24), "mask_upscaling_factored: width 24 must be a positive multiple of 16"),
        (dict(rstd2=good["rstd2"].astype(np.float64)), "rstd2: expected dtype float32"),
        (dict(isa="avx512"), "isa must be 'auto', 'avx2' or 'generic'"),
    ]
    _ext.mask_upscaling_factored(**good)
    for change, message in cases:
        error = TypeError if "dtype" in message else ValueError
        with pytest.raises(error, match=message):
            _ext.mask_upscaling_factored(**{**good, **change})


# ------------------------------------------------------------------------------------------------
# Two-way attention pass (image side of a layer of SAM's two-way transformer)

TWO_WAY_CASES = [  # batch, shared keys, pixels, J, J2, heads, logit std
    (1, True, 100, 56, 56, 8, 3.0),
    (5, False, 100, 56, 40, 8, 3.0),
    (5, True, 4096, 56, 56, 8, 3.0),
    (1, False, 4096, 16, 24, 4, 3.0),
    (5, False, 100, 16, 16, 4, 30.0),    # large logits: both softmaxes far from uniform
    (2, True, 4096, 56, 56, 8, 30.0),
    (3, True, 1, 64, 64, 64, 3.0),       # one pixel; one token per head (attention weights all 1)
    (2, False, 47, 8, 1, 1, 3.0),        # fewer pixels than one block, one pooled token
]


def _assert_two_way_close(got, want):
    keys_out, pooled = got
    want_keys, want_pooled = want
    assert keys_out.dtype == pooled.dtype == np.float32
    assert keys_out.shape == want_keys.shape and pooled.shape == want_pooled.shape
    # float32 products over 256 channels and a polynomial exp against float64
    np.testing.assert_allclose(keys_out, want_keys, rtol=1e-4, atol=1e-4 * float(np.abs(want_keys).max()))
    np.testing.assert_allclose(pooled, want_pooled, rtol=1e-4, atol=1e-4 * float(np.abs(want_pooled).max()))


@pytest.mark.parametrize("batch,shared,pixels,tokens,tokens2,heads,logit_std", TWO_WAY_CASES)
@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_two_way_pass_matches_twin(rng, batch, shared, pixels, tokens, tokens2, heads, logit_std, isa):
    args = twins.two_way_inputs(rng, batch, shared, pixels, tokens, tokens2, heads, logit_std)
    got = _ext.two_way_pass(**args, isa=isa)
    want = twins.two_way_pass(**args)
    _assert_two_way_close(got, want)
    keys_out, pooled = got
    assert keys_out.shape == (batch, pixels, 256) and pooled.shape == (batch, tokens2, 256)
    # LayerNorm output: per pixel, (z - ln_bias) / ln_weight has mean 0 and variance 1 (up to eps)
    unit = (keys_out.astype(np.float64) - args["ln_bias"]) / args["ln_weight"]
    np.testing.assert_allclose(unit.mean(axis=-1), 0, atol=1e-4)
    np.testing.assert_allclose(unit.var(axis=-1), 1, atol=1e-3)
    if pixels > 1 and logit_std > 10:  # peaked pooling: far from the plain mean over the pixels
        assert np.abs(pooled - keys_out.mean(axis=1, keepdims=True)).max() > 0.1


def test_two_way_pass_out_buffer(rng):
    args = twins.two_way_inputs(rng, 3, True, 200, 56, 56, 8)
    keys_out, pooled = _ext.two_way_pass(**args)
    out = np.full((3, 200, 256), np.nan, np.float32)
    got_keys, got_pooled = _ext.two_way_pass(**args, out=out)
    assert got_keys is out
    np.testing.assert_array_equal(out, keys_out)       # the same code path: identical
    np.testing.assert_array_equal(got_pooled, pooled)
    assert not np.shares_memory(got_pooled, out)


def test_two_way_pass_shared_keys_equal_repeated_keys(rng):
    """Bk = 1 (keys transposed once for all prompts, prompts taken in groups of 4 per block) gives what
    the same keys repeated per prompt (one prompt per work item) give, bit for bit, in both modes and
    with a partial last group."""
    args = twins.two_way_inputs(rng, 6, True, 300, 56, 56, 8)
    shared = _ext.two_way_pass(**args)
    repeated = _ext.two_way_pass(**{**args, "keys": np.repeat(args["keys"], 6, axis=0)})
    np.testing.assert_array_equal(shared[0], repeated[0])
    np.testing.assert_array_equal(shared[1], repeated[1])
    args = twins.two_way_qproj_inputs(rng, 6, True, 300, 56, 56, 8, 16)
    shared = _ext.two_way_pass(**args)
    repeated = _ext.two_way_pass(**{**args, "keys": np.repeat(args["keys"], 6, axis=0)})
    np.testing.assert_array_equal(shared[0], repeated[0])
    np.testing.assert_array_equal(shared[1], repeated[1])

# ------------------------------------------------------------------------------------------------
# Factored second pass (two_way_factored)

def _at_offset(shape: tuple[int, ...], offset: int) -> np.ndarray:
    """An uninitialised float32 array whose data starts `offset` bytes past a 64-byte boundary."""
    size = int(np.prod(shape))
    raw = np.empty(size + 32, np.float32)
    start = (-raw.ctypes.data % 64 + offset) // 4
    out = raw[start:start + size].reshape(shape)
    assert out.ctypes.data % 64 == offset
    return out


@pytest.mark.parametrize("batch,pixels,tokens,tokens2,heads,head_dim", [
    (5, 4096, 56, 16, 8, 16),     # LiteMedSAM's box prompts, single-mask output
    (9, 112, 48, 32, 8, 16),      # point prompts, multimask outputs; a partial last block
    (3, 80, 6, 4, 2, 32),
    (1, 16, 64, 64, 1, 64),       # the largest J (K = 129) and d
])
@pytest.mark.parametrize("first", [False, True], ids=["second layer", "first layer"])
@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("offset", [0, 32, 16], ids=["probs2 aligned", "probs2 32-byte aligned", "probs2 unaligned"])
def test_two_way_factored_matches_twin(rng, batch, pixels, tokens, tokens2, heads, head_dim, first, isa, offset):
    # (probs2 aligned to a vector, 64 bytes for AVX-512 and 32 for AVX2: the kernel writes it with non-temporal
    # stores, else with plain ones)
    args = twins.two_way_factored_inputs(rng, batch, pixels, tokens, tokens2, heads, head_dim, first)
    probs2 = _at_offset((batch, pixels // 16, tokens, 16), offset)
    probs2[...] = np.nan
    rstd2 = np.full((batch, pixels), np.nan, np.float32)
    pooled = _ext.two_way_factored(**args, probs2=probs2, rstd2=rstd2, isa=isa)
    want, want_probs, want_rstd = twins.two_way_factored(**args, pixels=pixels)
    rows = tokens if first else 2 * tokens + 1
    assert pooled.shape == (batch, tokens2, head_dim + rows) and pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
    np.testing.assert_allclose(probs2, want_probs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(rstd2, want_rstd, rtol=1e-5)
    # each head's weights sum to 1 over its tokens; the pooled coefficients of the constant row (the first
    # layer: the sum of a head's weights) are weighted means of r2, between its extremes
    np.testing.assert_allclose(probs2.reshape(batch, pixels // 16, heads, -1, 16).sum(axis=3), 1, atol=1e-5)
    last = pooled[..., head_dim:head_dim + tokens // heads].sum(axis=-1) if first else pooled[..., head_dim + 2 * tokens]
    assert np.all(last >= rstd2.min(axis=1, keepdims=True) * (1 - 1e-5))
    assert np.all(last <= rstd2.max(axis=1, keepdims=True) * (1 + 1e-5))


@pytest.mark.skipif(_ext.mask_upscaling_isa() == "generic", reason="the AVX2 build needs AVX2 and FMA")
@pytest.mark.parametrize("first", [False, True], ids=["second layer", "first layer"])
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_two_way_factored_avx2_matches_auto(rng, first, threads):
    """The AVX2 build (8 pixels per vector, smaller register tiles) gives the best build's results within float32
    rounding, for any split of the work (400 pixels: 8 full blocks of 48 and a partial one of 16; T = 5 tokens
    per head, not a whole register tile)."""
    args = twins.two_way_factored_inputs(rng, 6, 400, 20, 12, 4, 32, first)
    runs = {}
    for isa, n in (("auto", 0), ("avx2", threads)):
        probs2, rstd2 = np.empty((6, 25, 20, 16), np.float32), np.empty((6, 400), np.float32)
        runs[isa] = _ext.two_way_factored(**args, probs2=probs2, rstd2=rstd2, isa=isa, threads=n), probs2, rstd2
    for got, want in zip(runs["avx2"], runs["auto"]):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(np.abs(want).max()))


def test_two_way_factored_rejects_bad_arguments(rng):
    good = twins.two_way_factored_inputs(rng, 3, 64, 8, 4, 2)
    outs = dict(probs2=np.empty_like(good["probs1"]), rstd2=np.empty_like(good["rstd1"]))
    _ext.two_way_factored(**good, **outs)
    misaligned = np.empty(good["image"].size + 1, np.float32)[1:].reshape(good["image"].shape)
    misaligned[...] = good["image"]
    read_only = outs["rstd2"].copy()
    read_only.flags.writeable = False
    cases = [
        (dict(image=np.zeros((2, 227, 48), np.float32)), r"image: expected shape \(2, 228, 48\)", ValueError),
        (dict(image=misaligned), "image: must be 64-byte aligned", ValueError),
        (dict(gram=good["gram"][:, :-1].copy()), r"gram: expected shape \(3, 17, 17\)", ValueError),
        (dict(mf=good["mf"].astype(np.float64)), "mf: expected dtype float32", TypeError),
        (dict(heads=3), "heads 3 must be >= 1 and divide", ValueError),
        (dict(k=good["k"][..., :8].copy(), vh1=good["vh1"][..., :8].copy(), vh2=good["vh2"][..., :8].copy(),
              qf=good["qf"][..., :8].copy()), "k: head dimension 8; expected a multiple of 16", ValueError),
        (dict(eps=0.0), "eps must be positive", ValueError),
        (dict(rstd2=read_only), "rstd2: array is read-only", ValueError),
        (dict(probs2=good["probs1"]), "probs2: must not overlap probs1", ValueError),
        (dict(rstd2=outs["probs2"].reshape(-1)[:192].reshape(3, 64)), "rstd2: must not overlap probs2", ValueError),
        (dict(isa="avx512"), "two_way_factored: isa must be 'auto', 'avx2' or 'generic', got 'avx512'", ValueError),
        (dict(isa="AUTO"), "two_way_factored: isa must be 'auto', 'avx2' or 'generic'", ValueError),
    ]
    for change, message, error in cases:
        with pytest.raises(error, match=message):
            _ext.two_way_factored(**{**good, **outs, **change})
    with pytest.raises(ValueError, match="rstd2: 40 pixels; expected a positive multiple of 16"):
        _ext.two_way_factored(**good, probs2=outs["probs2"], rstd2=outs["rstd2"][:, :40].copy())
    with pytest.raises(ValueError, match="probs1, rstd1, vh1, n and m1 go together"):
        _ext.two_way_factored(**{**good, **outs, "n": None})
    first = twins.two_way_factored_inputs(rng, 3, 64, 8, 4, 2, first=True)
    with pytest.raises(ValueError, match=r"gram: expected shape \(3, 8, 8\)"):
        _ext.two_way_factored(**{**first, **outs, "gram": good["gram"]})


def test_two_way_pass_prompts_are_independent(rng):
    """One prompt alone (its pixels split into many chunks merged at the end) gives what it gives
    inside a batch of 20 (one chunk per prompt)."""
    args = twins.two_way_inputs(rng, 20, False, 4096, 56, 56, 8, logit_std=10.0)
    batch_keys, batch_pooled = _ext.two_way_pass(**args)
    for b in (0, 13):
        one = {k: (v[b:b + 1] if k in ("keys", "kq", "koff", "vwo", "qk") else v) for k, v in args.items()}
        keys_out, pooled = _ext.two_way_pass(**one)
        np.testing.assert_array_equal(keys_out[0], batch_keys[b])
        np.testing.assert_allclose(pooled[0], batch_pooled[b], rtol=1e-5, atol=1e-5 * float(np.abs(pooled).max()))


def test_two_way_pass_isa_builds_agree(rng):
    args = twins.two_way_inputs(rng, 2, False, 500, 56, 48, 8)
    auto, generic = _ext.two_way_pass(**args, isa="auto"), _ext.two_way_pass(**args, isa="generic")
    for a, g in zip(auto, generic):
        np.testing.assert_allclose(a, g, rtol=1e-5, atol=1e-5 * float(np.abs(g).max()))


@pytest.mark.skipif(_ext.mask_upscaling_isa() == "generic", reason="the AVX2 build needs AVX2 and FMA")
@pytest.mark.parametrize("shared,qproj", [(True, False), (False, False), (True, True)],
                         ids=["shared keys", "keys per prompt", "projected logits"])
@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("offset", [0, 32, 4], ids=["out aligned", "out 32-byte aligned", "out unaligned"])
def test_two_way_pass_avx2_matches_auto(rng, shared, qproj, threads, offset):
    """The AVX2 build (8 pixels per vector, smaller register tiles) gives the best build's image tokens to the bit
    (each pixel's sums in the same order) and its pooled rows within float32 rounding (the sums over the pixels
    in another order), for any split of the work (400 pixels: 8 full blocks of 48 and a partial one of 16) and
    wherever out lies (non-temporal stores from its first vector-aligned float)."""
    args = (twins.two_way_qproj_inputs(rng, 6, shared, 400, 56, 48, 8, 16) if qproj
            else twins.two_way_inputs(rng, 6, shared, 400, 56, 48, 8))
    runs = {}
    for isa, n in (("auto", 0), ("avx2", threads)):
        out = _at_offset((6, 400, 256), offset)
        runs[isa] = _ext.two_way_pass(**args, out=out, isa=isa, threads=n)
        assert np.shares_memory(runs[isa][0], out)
    np.testing.assert_array_equal(runs["avx2"][0], runs["auto"][0])
    pooled = runs["auto"][1]
    np.testing.assert_allclose(runs["avx2"][1], pooled, rtol=0, atol=2e-6 * float(np.abs(pooled).max()))
    if not shared:   # in place: out is keys itself
        keys = args["keys"].copy()
        got = _ext.two_way_pass(**{**args, "keys": keys}, out=keys, isa="avx2", threads=threads)
        np.testing.assert_array_equal(got[0], runs["auto"][0])


def test_two_way_pass_extreme_logits_stay_finite(rng):
    """Logits of std 1000 (exp overflows float32 without the max subtraction): the pooling
    picks each token's best pixel, as the float64 twin does."""
    args = twins.two_way_inputs(rng, 2, True, 1000, 56, 56, 8, logit_std=1000.0)
    keys_out, pooled = _ext.two_way_pass(**args)
    assert np.isfinite(keys_out).all() and np.isfinite(pooled).all()
    want_keys, want_pooled = twins.two_way_pass(**args)
    np.testing.assert_allclose(keys_out, want_keys, rtol=0, atol=1e-3 * float(np.abs(want_keys).max()))
    np.testing.assert_allclose(pooled, want_pooled, rtol=0, atol=1e-3 * float(np.abs(want_pooled).max()))


def _assert_rejects(kernel, good, cases):
    """kernel(**good) runs; kernel(**good with each change) raises with the message (TypeError for a
    wrong dtype or type, ValueError otherwise)."""
    kernel(**good)
    for change, message in cases:
        error = TypeError if ("dtype" in message or "ndarray" in message) else ValueError
        with pytest.raises(error, match=message):
            kernel(**{**good, **change})


def test_two_way_pass_rejects_bad_arguments(rng):
    good = twins.two_way_inputs(rng, 3, False, 20, 16, 8, 4)
    f64 = {k: v.astype(np.float64) for k, v in good.items() if isinstance(v, np.ndarray)}
    read_only = np.zeros((3, 20, 256), np.float32)
    read_only.flags.writeable = False
    cases = [
        *((dict(**{name: arr}), f"{name}: expected dtype float32") for name, arr in f64.items()),
        (dict(keys=good["keys"].tolist()), "keys: expected a numpy.ndarray"),
        (dict(keys=good["keys"][0]), "keys: expected 3 dimensions"),
        (dict(keys=good["keys"][:, :, :128].copy()), r"keys: expected shape \(3, 20, 256\)"),
        (dict(keys=good["keys"][:2]), "keys: 2 prompts; expected 1 .shared. or kq's 3"),
        (dict(keys=good["keys"][:, :0], pe=good["pe"][:0]), "at least one pixel"),
        (dict(keys=np.repeat(good["keys"], 2, axis=2)[:, :, ::2]), "keys: array is not C-contiguous"),
        (dict(pe=good["pe"][:19].copy()), r"pe: expected shape \(20, 256\)"),
        (dict(kq=good["kq"][:, :, :255].copy()), r"kq: expected shape \(3, 16, 256\)"),
        (dict(koff=good["koff"][:, :15].copy()), r"koff: expected shape \(3, 16\)"),
        (dict(vwo=good["vwo"][:2].copy()), r"vwo: expected shape \(3, 16, 256\)"),
        (dict(ln_weight=good["ln_weight"][:64].copy()), r"ln_weight: expected shape \(256\)"),
        (dict(ln_bias=good["ln_bias"][None]), "ln_bias: expected 1 dimensions"),
        (dict(qk=good["qk"][:1].copy()), r"qk: expected shape \(3, 8, 256\)"),
        (dict(kq=np.zeros((3, 72, 256), np.float32), koff=np.zeros((3, 72), np.float32),
              vwo=np.zeros((3, 72, 256), np.float32)), r"kq: 72 tokens; expected 1\.\.64"),
        (dict(kq=np.zeros((3, 0, 256), np.float32), koff=np.zeros((3, 0), np.float32),
              vwo=np.zeros((3, 0, 256), np.float32)), r"kq: 0 tokens"),
        (dict(qk=np.zeros((3, 65, 256), np.float32)), r"qk: 65 tokens; expected 1\.\.64"),
        (dict(heads=3), "heads 3 must be >= 1 and divide kq's 16 tokens"),
        (dict(heads=0), "heads 0 must be >= 1"),
        (dict(heads=-4), "heads -4 must be >= 1"),
        (dict(eps=0.0), "eps must be positive"),
        (dict(eps=-1e-5), "eps must be positive"),
        (dict(eps=float("nan")), "eps must be positive"),
        (dict(out=read_only), "out: array is read-only"),
        (dict(out=np.zeros((3, 20, 128), np.float32)), r"out: expected shape \(3, 20, 256\)"),
        (dict(out=np.zeros((3, 20, 256), np.float64)), "out: expected dtype float32"),
        (dict(out=np.zeros((3, 20, 512), np.float32)[:, :, ::2]), "out: array is not C-contiguous"),
        (dict(out=np.zeros((3, 20, 256), np.float32).reshape(-1)[:256 * 20].reshape(1, 20, 256)),
         r"out: expected shape \(3, 20, 256\)"),
        (dict(isa="avx512"), "two_way_pass: isa must be 'auto', 'avx2' or 'generic', got 'avx512'"),
        (dict(isa=""), "two_way_pass: isa must be 'auto', 'avx2' or 'generic'"),
    ]
    _assert_rejects(_ext.two_way_pass, good, cases)
    assert good["keys"].shape[0] == 3                    # per-prompt keys: out may be keys itself (in place)
    want = _ext.two_way_pass(**{**good, "keys": good["keys"].copy()})
    in_place = good["keys"].copy()
    got = _ext.two_way_pass(**{**good, "keys": in_place, "out": in_place})
    assert got[0] is in_place
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    buffer = np.zeros(2 * 3 * 20 * 256, np.float32)
    keys = buffer[:3 * 20 * 256].reshape(3, 20, 256)
    with pytest.raises(ValueError, match="out: must not overlap keys"):  # overlapping by one row
        _ext.two_way_pass(**{**good, "keys": keys, "out": buffer[256:256 + 3 * 20 * 256].reshape(3, 20, 256)})
    with pytest.raises(ValueError, match="out: must not overlap pe"):
        _ext.two_way_pass(**{**good, "pe": buffer[:20 * 256].reshape(20, 256), "out": buffer.reshape(2, 3, 20, 256)[0]})
    _ext.two_way_pass(**{**good, "keys": keys, "out": buffer[3 * 20 * 256:].reshape(3, 20, 256)})  # adjacent: fine


# ------------------------------------------------------------------------------------------------
# Linear layer (token side of SAM's decoder)

LINEAR_SHAPES = [  # M, K, N
    (448, 256, 2048), (448, 2048, 256), (448, 256, 256), (448, 256, 128), (64, 256, 32), (448, 16, 4096),
    (448, 4096, 17),                                  # N not a multiple of 16, K over several blocks
    (1, 1, 1), (1, 256, 1), (7, 1, 70), (5, 3, 16), (13, 300, 65), (6, 512, 64), (11, 257, 48), (2, 33, 33),
    (100, 769, 130),                                  # ragged rows, columns and blocks of k
]


def _linear_inputs(rng, m, k, n):
    x = rng.normal(0, 1, (m, k)).astype(np.float32)
    weight_t = rng.normal(0, 1 / np.sqrt(k), (k, n)).astype(np.float32)
    bias = rng.normal(0, 1, n).astype(np.float32)
    return x, weight_t, bias


def _assert_linear_close(got, want, k):
    assert got.dtype == np.float32 and got.shape == want.shape
    # float32 sums of k products of unit-scale terms against float64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.sqrt(k))


@pytest.mark.parametrize("m,k,n", LINEAR_SHAPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_linear_matches_twin(rng, m, k, n, relu, isa):
    x, weight_t, bias = _linear_inputs(rng, m, k, n)
    got = _ext.linear(x, weight_t, bias, relu=relu, isa=isa)
    _assert_linear_close(got, twins.linear(x, weight_t, bias, relu), k)
    assert (got >= 0).all() if relu else (m * n < 64 or (got < 0).any())
    if relu and m * n >= 64:
        assert (got == 0).any()


def test_linear_out_buffer_and_empty_shapes(rng):
    x, weight_t, bias = _linear_inputs(rng, 37, 300, 90)
    want = _ext.linear(x, weight_t, bias, relu=True)
    out = np.full((37, 90), np.nan, np.float32)
    assert _ext.linear(x, weight_t, bias, relu=True, out=out) is out
    np.testing.assert_array_equal(out, want)                # the same code path: identical
    assert _ext.linear(x[:0], weight_t, bias).shape == (0, 90)
    assert _ext.linear(x, weight_t[:, :0], bias[:0]).shape == (37, 0)
    np.testing.assert_array_equal(_ext.linear(x[:, :0], weight_t[:0], bias), np.broadcast_to(bias, (37, 90)))


def test_linear_rows_are_independent(rng):
    """Each row of out depends only on its row of x: a row computed alone (one thread, a one-row tile)
    equals the same row inside a large product (many threads, full tiles)."""
    x, weight_t, bias = _linear_inputs(rng, 448, 512, 200)
    full = _ext.linear(x, weight_t, bias)
    for r in (0, 5, 6, 447):
        np.testing.assert_array_equal(_ext.linear(x[r:r + 1], weight_t, bias)[0], full[r])


def test_linear_isa_builds_agree(rng):
    x, weight_t, bias = _linear_inputs(rng, 50, 700, 100)
    auto, generic = _ext.linear(x, weight_t, bias, isa="auto"), _ext.linear(x, weight_t, bias, isa="generic")
    np.testing.assert_allclose(auto, generic, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(_ext.mask_upscaling_isa() != "avx512", reason="compares the AVX2 build with the AVX-512 one")
@pytest.mark.parametrize("m,k,n,relu", [(50, 700, 100, False), (7, 256, 2048, True), (13, 3, 17, True)])
def test_linear_avx2_equals_avx512(rng, m, k, n, relu):
    """Both builds sum each element with fused multiply-adds from the bias over k in ascending order (the AVX2
    build in panels of 16 columns instead of 64, ragged ones included): the same result to the bit."""
    x, weight_t, bias = _linear_inputs(rng, m, k, n)
    np.testing.assert_array_equal(_ext.linear(x, weight_t, bias, relu=relu, isa="avx2"),
                                  _ext.linear(x, weight_t, bias, relu=relu, isa="auto"))


def test_linear_rejects_bad_arguments(rng):
    x, weight_t, bias = _linear_inputs(rng, 6, 20, 24)
    good = dict(x=x, weight_t=weight_t, bias=bias)
    read_only = np.zeros((6, 24), np.float32)
    read_only.flags.writeable = False
    cases = [
        *((dict(**{name: arr.astype(np.float64)}), f"{name}: expected dtype float32") for name, arr in good.items()),
        (dict(x=x.tolist()), "x: expected a numpy.ndarray"),
        (dict(x=x[None]), "x: expected 2 dimensions"),
        (dict(weight_t=weight_t[None]), "weight_t: expected 2 dimensions"),
        (dict(bias=bias[None]), "bias: expected 1 dimensions"),
        (dict(x=np.repeat(x, 2, axis=1)[:, ::2]), "x: array is not C-contiguous"),
        (dict(weight_t=np.ascontiguousarray(weight_t.T)), r"weight_t: expected shape \(20, N\).*got \(24, 20\)"),
        (dict(weight_t=weight_t.T), "weight_t: array is not C-contiguous"),
        (dict(bias=bias[:23].copy()), r"bias: expected shape \(24\)"),
        (dict(out=read_only), "out: array is read-only"),
        (dict(out=np.zeros((6, 23), np.float32)), r"out: expected shape \(6, 24\)"),
        (dict(out=np.zeros((6, 24), np.float64)), "out: expected dtype float32"),
        (dict(out=np.zeros(24, np.float32)), "out: expected 2 dimensions"),
        (dict(out=np.zeros((6, 48), np.float32)[:, ::2]), "out: array is not C-contiguous"),
        (dict(isa="avx512"), "linear: isa must be 'auto', 'avx2' or 'generic'"),
    ]
    _assert_rejects(_ext.linear, good, cases)
    buffer = np.zeros(6 * 24 + 6 * 20, np.float32)
    with pytest.raises(ValueError, match="out: must not overlap x"):
        _ext.linear(buffer[:6 * 20].reshape(6, 20), weight_t, bias, out=buffer[6 * 20 - 1:-1].reshape(6, 24))
    square_w = rng.normal(0, 1, (24, 24)).astype(np.float32)
    for name in ("weight_t", "bias"):
        args = dict(x=np.zeros((24, 24), np.float32), weight_t=square_w, bias=bias)
        out = args[name] if name == "weight_t" else np.zeros((1, 24), np.float32)
        if name == "bias":
            args = dict(x=np.zeros((1, 24), np.float32), weight_t=square_w, bias=out[0])
        with pytest.raises(ValueError, match=f"out: must not overlap {name}"):
            _ext.linear(**args, out=out)
    _ext.linear(buffer[:6 * 20].reshape(6, 20), weight_t, bias, out=buffer[6 * 20:].reshape(6, 24))  # adjacent


# ------------------------------------------------------------------------------------------------
# Shared-key attention (the first token->image attention of the two-way transformer)

SHARED_ATTENTION_CASES = [  # rows, heads, d, pixels, logit std
    (448, 8, 16, 4096, 3.0),    # SAM's decoder: 64 prompts x 7 tokens, 8 heads of d 16, a 64x64 embedding
    (13, 8, 16, 4096, 30.0),    # large logits (a peaked softmax); rows not a multiple of the 8-row blocks
    (5, 3, 7, 37, 3.0),         # d and pixels not multiples of 16
    (17, 2, 40, 100, 3.0),      # three value vectors per row
    (9, 1, 64, 16, 3.0),        # the largest head dimension; one pixel vector
    (3, 4, 33, 1, 3.0),         # one key: every weight is 1
    (1, 1, 1, 1, 3.0),
]


def _shared_attention_inputs(rng, rows, heads, d, pixels, logit_std):
    q = rng.normal(0, logit_std / np.sqrt(d), (rows, heads, d)).astype(np.float32)
    k = rng.normal(0, 1, (pixels, heads, d)).astype(np.float32)
    v = rng.normal(0, 1, (pixels, heads, d)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("rows,heads,d,pixels,logit_std", SHARED_ATTENTION_CASES)
@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_shared_attention_matches_twin(rng, rows, heads, d, pixels, logit_std, isa):
    q, k, v = _shared_attention_inputs(rng, rows, heads, d, pixels, logit_std)
    got = _ext.shared_attention(q, k, v, isa=isa)
    want = twins.shared_attention(q, k, v)
    assert got.dtype == np.float32 and got.shape == (rows, heads, d)
    # convex combinations of unit-scale values: float32 sums and a ~1-ulp exp against float64; a logit's
    # float32 rounding (a few ulp of its magnitude) changes its weight by as much, relatively
    largest_logit = np.abs(np.einsum("rhc,phc->rhp", q, k)).max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 + 4 * np.finfo(np.float32).eps * largest_logit)
    if pixels == 1:
        np.testing.assert_array_equal(got, np.broadcast_to(v, got.shape))


@pytest.mark.parametrize("rows,heads,d,kh,kw", [
    (4096, 12, 64, 64, 64),     # SAM ViT-B's global attention at 1024 px
    (37, 2, 32, 16, 32),        # rows not a multiple of the 8-row blocks
    (29, 3, 64, 4, 16),         # nor of the 12-row blocks of a 64-wide head
    (9, 1, 20, 3, 16),
])
def test_shared_attention_with_relative_positions_matches_twin(rng, rows, heads, d, kh, kw):
    q, k, v = _shared_attention_inputs(rng, rows, heads, d, kh * kw, 3.0)
    rel_h, rel_w = (rng.normal(0, 1, (rows, heads, n)).astype(np.float32) for n in (kh, kw))
    want = twins.shared_attention(q, k, v, rel_h, rel_w)
    for isa in KERNEL_ISAS if rows < 4096 else ("auto",):
        got = _ext.shared_attention(q, k, v, rel_h, rel_w, isa=isa)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    assert np.abs(want - twins.shared_attention(q, k, v)).max() > 0.05    # the terms matter


def test_shared_attention_rejects_bad_relative_positions(rng):
    q, k, v = _shared_attention_inputs(rng, 6, 2, 8, 64, 3.0)
    rel_h, rel_w = np.zeros((6, 2, 4), np.float32), np.zeros((6, 2, 16), np.float32)
    _ext.shared_attention(q, k, v, rel_h, rel_w)
    cases = [
        (dict(rel_h=rel_h, rel_w=None), "rel_h and rel_w go together"),
        (dict(rel_h=rel_h[:, :, :3].copy(), rel_w=rel_w), r"a key grid of 3 x 16; expected kh \* kw = 64"),
        (dict(rel_h=np.zeros((6, 2, 8), np.float32), rel_w=np.zeros((6, 2, 8), np.float32)), "kw a multiple of 16"),
        (dict(rel_h=rel_h[:5].copy(), rel_w=rel_w), r"rel_h: expected shape \(6, 2, 4\)"),
        (dict(rel_h=rel_h, rel_w=rel_w.astype(np.float64)), "rel_w: expected dtype float32"),
    ]
    for change, message in cases:
        error = TypeError if "dtype" in message else ValueError
        with pytest.raises(error, match=message):
            _ext.shared_attention(q, k, v, **change)


@pytest.mark.parametrize("d", [16, 64])      # work items of 8 and of 12 rows
@pytest.mark.parametrize("isa", [isa for isa in KERNEL_ISAS if isa != "generic"])   # AVX2: logits of 4 rows at a time
def test_shared_attention_rows_are_independent(rng, d, isa):
    """A row's output depends only on its own query: the same row alone (a padded one-row block) and inside
    a full batch are bit-identical, and so are heads computed in another order of work items."""
    q, k, v = _shared_attention_inputs(rng, 448, 8, d, 4096, 3.0)
    full = _ext.shared_attention(q, k, v, isa=isa)
    for r in (0, 3, 4, 7, 8, 11, 12, 447):
        np.testing.assert_array_equal(_ext.shared_attention(q[r:r + 1].copy(), k, v, isa=isa)[0], full[r])
    np.testing.assert_array_equal(
        _ext.shared_attention(q[:, 3:5].copy(), k[:, 3:5].copy(), v[:, 3:5].copy(), isa=isa), full[:, 3:5])


@pytest.mark.parametrize("isa", [isa for isa in KERNEL_ISAS if isa != "auto"])
@pytest.mark.parametrize("pixels", [1000, 4100])       # 4100: a last 16-key vector of 4 keys (a masked AVX2 half)
def test_shared_attention_isa_builds_agree(rng, isa, pixels):
    q, k, v = _shared_attention_inputs(rng, 40, 8, 16, pixels, 3.0)
    np.testing.assert_allclose(_ext.shared_attention(q, k, v, isa="auto"),
                               _ext.shared_attention(q, k, v, isa=isa), rtol=1e-5, atol=1e-6)


def test_shared_attention_rejects_bad_arguments(rng):
    q, k, v = _shared_attention_inputs(rng, 6, 2, 8, 20, 3.0)
    good = dict(q=q, k=k, v=v)
    cases = [
        *((dict(**{name: arr.astype(np.float64)}), f"{name}: expected dtype float32") for name, arr in good.items()),
        (dict(q=q.tolist()), "q: expected a numpy.ndarray"),
        (dict(k=k[None]), "k: expected 3 dimensions"),
        (dict(v=v[0]), "v: expected 3 dimensions"),
        (dict(k=np.repeat(k, 2, axis=2)[:, :, ::2]), "k: array is not C-contiguous"),
        (dict(k=k[:, :1].copy()), r"k: expected shape \(20, 2, 8\), got \(20, 1, 8\)"),
        (dict(v=v[:19].copy()), r"v: expected shape \(20, 2, 8\), got \(19, 2, 8\)"),
        (dict(v=v[:, :, :7].copy()), r"v: expected shape \(20, 2, 8\)"),
        (dict(q=np.zeros((6, 2, 65), np.float32)), r"q: expected \[R, heads >= 1, d\] with 1 <= d <= 64"),
        (dict(q=np.zeros((6, 0, 8), np.float32)), "q: expected"),
        (dict(k=k[:0].copy(), v=v[:0].copy()), "k: expected at least one key"),
        (dict(isa="avx512"), "shared_attention: isa must be 'auto', 'avx2' or 'generic'"),
    ]
    _assert_rejects(_ext.shared_attention, good, cases)
    assert _ext.shared_attention(q[:0].copy(), k, v).shape == (0, 2, 8)


# ------------------------------------------------------------------------------------------------
# Shared-key attention in bfloat16 on AMX tiles or with AVX512-BF16

ATTENTION_ISAS = [
    pytest.param("amx", marks=pytest.mark.skipif(not _ext.has_amx_bf16(), reason="no AMX-BF16 tiles on this CPU")),
    pytest.param("avx512", marks=pytest.mark.skipif(not _ext.has_avx512_bf16(), reason="no AVX512-BF16 on this CPU")),
]


def _assert_bf16_attention_close(got, q, k, v, rel_h=None, rel_w=None, bias=None):
    """got against twins.shared_attention_bf16. The logits differ from the twin's by float32 rounding (the tile
    unit's order), so a weight within that of a bfloat16 rounding boundary may round the other way: most elements
    agree to float32 rounding of the logits, and every element within one bfloat16 step of a full weight."""
    want = twins.shared_attention_bf16(q, k, v, rel_h, rel_w, bias)
    assert got.dtype == np.float32 and got.shape == want.shape
    err = np.abs(got - want)
    largest_logit = np.abs(np.einsum("rhc,phc->rhp", q, k)).max()
    assert np.quantile(err, 0.99) <= 1e-5 + 8 * np.finfo(np.float32).eps * largest_logit
    assert err.max() <= 2.0 ** -8 * np.abs(v).max()
    return want


@pytest.mark.parametrize("isa", ATTENTION_ISAS)
@pytest.mark.parametrize("rows,heads,d,pixels,logit_std", SHARED_ATTENTION_CASES)
def test_shared_attention_bf16_matches_twin(rng, isa, rows, heads, d, pixels, logit_std):
    q, k, v = _shared_attention_inputs(rng, rows, heads, d, pixels, logit_std)
    got = _ext.shared_attention_bf16(q, k, v, isa=isa)
    want = _assert_bf16_attention_close(got, q, k, v)
    if pixels == 1:     # one weight, 1 up to the exp polynomial's error
        np.testing.assert_allclose(got, np.broadcast_to(twins.bf16(v), got.shape), rtol=3e-6)
    if pixels >= 16:    # the bfloat16 rounding shows against float32 attention: the comparison above can fail
        assert np.quantile(np.abs(want - twins.shared_attention(q, k, v)), 0.99) > 1e-3


@pytest.mark.parametrize("isa", ATTENTION_ISAS)
@pytest.mark.parametrize("rows,heads,d,kh,kw", [
    (4096, 12, 64, 64, 64),     # SAM ViT-B's global attention at 1024 px (the twin on a sample of rows)
    (37, 2, 32, 16, 32),        # rows not a multiple of the 16-row work items
    (29, 3, 48, 4, 16),         # three value tiles per row
    (9, 1, 20, 3, 16),          # key blocks of 48 pixels: the last 16 of the 64 padded ones carry no keys
])
def test_shared_attention_bf16_with_relative_positions_matches_twin(rng, isa, rows, heads, d, kh, kw):
    q, k, v = _shared_attention_inputs(rng, rows, heads, d, kh * kw, 3.0)
    rel_h, rel_w = (rng.normal(0, 1, (rows, heads, n)).astype(np.float32) for n in (kh, kw))
    got = _ext.shared_attention_bf16(q, k, v, rel_h, rel_w, isa=isa)
    sample = np.sort(rng.choice(rows, min(rows, 64), replace=False))   # rows are independent
    _assert_bf16_attention_close(got[sample], q[sample], k, v, rel_h[sample], rel_w[sample])
    assert np.abs(got - _ext.shared_attention_bf16(q, k, v, isa=isa)).max() > 0.05    # the terms matter


@pytest.mark.parametrize("isa", ATTENTION_ISAS)
def test_shared_attention_bf16_is_close_to_float32(rng, isa):
    """At SAM ViT-B's scale the bfloat16 core stays within a few bfloat16 steps of the float32 kernel."""
    q, k, v = _shared_attention_inputs(rng, 512, 12, 64, 4096, 3.0)
    rel_h, rel_w = (rng.normal(0, 1, (512, 12, 64)).astype(np.float32) for _ in range(2))
    got = _ext.shared_attention_bf16(q, k, v, rel_h, rel_w, threads=2, isa=isa)
    want = _ext.shared_attention(q, k, v, rel_h, rel_w)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 2.0 ** -6 * scale
    np.testing.assert_array_equal(_ext.shared_attention_bf16(q, k, v, rel_h, rel_w, threads=1, isa=isa), got)


def _heads_first(a: np.ndarray) -> np.ndarray:
    """[R, H, ...] <-> [H, R, ...], C-contiguous."""
    return np.ascontiguousarray(a.swapaxes(0, 1))


@pytest.mark.parametrize("isa", ATTENTION_ISAS)
@pytest.mark.parametrize("heads,rows,d,kh,kw", [
    (300, 196, 64, 14, 14),     # SAM ViT-B's windowed blocks: 25 windows x 12 heads of 14 x 14 tokens (a sample)
    (6, 25, 16, 5, 5),          # a key grid narrower than a block of 16 keys
    (3, 40, 32, 2, 20),         # rows not a multiple of 16, grid rows wider than a block
    (2, 300, 48, 20, 15),       # more rows than a head work item takes: the heads' layout shared by the threads
])
def test_shared_attention_bf16_heads_first(rng, isa, heads, rows, d, kh, kw):
    """heads_first (q, k, v, the terms and the result [H, R, ...]) with a scale of q: the token-major call on the
    swapped arrays with q scaled beforehand, value for value; any key grid kh x kw, against the twin."""
    q, k, v = _shared_attention_inputs(rng, rows, heads, d, kh * kw, 3.0)
    rel_h, rel_w = (rng.normal(0, 1, (rows, heads, n)).astype(np.float32) for n in (kh, kw))
    scale = np.float32(0.125)
    q = q / scale
    got = _ext.shared_attention_bf16(*map(_heads_first, (q, k, v, rel_h, rel_w)), threads=2, scale=scale,
                                     heads_first=True, isa=isa)
    scaled = q * scale
    token_major = _ext.shared_attention_bf16(scaled, k, v, rel_h, rel_w, threads=2, isa=isa)
    np.testing.assert_array_equal(got, _heads_first(token_major))
    some = np.sort(rng.choice(heads, min(heads, 4), replace=False))
    _assert_bf16_attention_close(token_major[:, some], scaled[:, some], k[:, some], v[:, some], rel_h[:, some],
                                 rel_w[:, some])
    no_terms = _ext.shared_attention_bf16(scaled, k, v, threads=2, isa=isa)
    assert np.abs(token_major - no_terms).max() > 0.05   # the terms matter
    if rows > 256:  # each row as when its head is one work item (the first 256 rows alone)
        first = _ext.shared_attention_bf16(scaled[:256], k, v, rel_h[:256], rel_w[:256], threads=2, isa=isa)
        np.testing.assert_array_equal(token_major[:256], first)


@pytest.mark.parametrize("isa", ATTENTION_ISAS)
def test_shared_attention_bf16_writes_into_out(rng, isa):
    q, k, v = _shared_attention_inputs(rng, 20, 2, 16, 40, 3.0)
    out = np.full((2, 20, 16), np.nan, np.float32)
    got = _ext.shared_attention_bf16(_heads_first(q), _heads_first(k), _heads_first(v), heads_first=True, out=out,
                                     isa=isa)
    assert np.shares_memory(got, out)
    np.testing.assert_array_equal(out, _heads_first(_ext.shared_attention_bf16(q, k, v, isa=isa)))


def _window_inputs(rng, b, qh, qw, g, d):
    """A window-batched qkv [B, L, 3, G, d] (L = qh qw), relative-position tables [qh, qh, d] and [qw, qw, d], and
    the heads-first q, k, v and terms [B G, L, ...] they mean (the terms in float64, rounded to float32)."""
    length = qh * qw
    qkv = rng.normal(0, 1, (b, length, 3, g, d)).astype(np.float32)
    qkv[:, :, 1] *= np.float32(3 / np.sqrt(d))
    table_h, table_w = (rng.normal(0, 0.3, (n, n, d)).astype(np.float32) for n in (qh, qw))
    q, k, v = (np.ascontiguousarray(qkv[:, :, s].transpose(0, 2, 1, 3)).reshape(b * g, length, d) for s in range(3))
    grid = q.reshape(b * g, qh, qw, d).astype(np.float64)
    rel_h = np.einsum("nijc,iac->nija", grid, table_h).astype(np.float32).reshape(b * g, length, qh)
    rel_w = np.einsum("nijc,jbc->nijb", grid, table_w).astype(np.float32).reshape(b * g, length, qw)
    return qkv, table_h, table_w, (q, k, v, rel_h, rel_w)


@pytest.mark.parametrize("isa", ATTENTION_ISAS)
@pytest.mark.parametrize("b,qh,qw,g,d", [
    (25, 14, 14, 12, 64),       # SAM ViT-B's windowed blocks (a sample of the heads against the twin)
    (3, 5, 5, 2, 16),           # a key grid narrower than a block of 16 keys
    (2, 4, 16, 3, 32),          # grid rows of 16 keys: the blocks' terms without the rows' term buffer
    (1, 20, 15, 2, 48),         # 300 tokens: the heads' layout shared by the threads
])
def test_window_attention_bf16(rng, isa, b, qh, qw, g, d):
    """window_attention_bf16 from the qkv product and the tables: shared_attention_bf16 (heads first) on q, k, v
    and the terms computed apart, to float32 rounding of the terms (a weight may round to the other bfloat16),
    the result token-major per window; against the twin."""
    qkv, table_h, table_w, (q, k, v, rel_h, rel_w) = _window_inputs(rng, b, qh, qw, g, d)
    length = qh * qw
    got = _ext.window_attention_bf16(qkv, table_h, table_w, scale=0.125, threads=2, isa=isa)
    assert got.shape == (b, length, g, d) and got.dtype == np.float32
    heads = got.transpose(0, 2, 1, 3).reshape(b * g, length, d)
    apart = _ext.shared_attention_bf16(q, k, v, rel_h, rel_w, scale=0.125, heads_first=True, threads=2, isa=isa)
    err = np.abs(heads - apart)
    assert np.quantile(err, 0.99) <= 1e-5 and err.max() <= 2.0 ** -8 * np.abs(v).max()
    some = np.sort(rng.choice(b * g, min(b * g, 4), replace=False))
    swap = _heads_first
    _assert_bf16_attention_close(swap(heads[some]), swap(q[some] * np.float32(0.125)), swap(k[some]), swap(v[some]),
                                 swap(rel_h[some]), swap(rel_w[some]))
    out = np.full_like(got, np.nan)
    assert np.shares_memory(_ext.window_attention_bf16(qkv, table_h, table_w, scale=0.125, out=out, isa=isa), out)
    one_thread = _ext.window_attention_bf16(qkv, table_h, table_w, scale=0.125, threads=1, isa=isa)
    np.testing.assert_array_equal(out, one_thread)


def test_window_attention_bf16_rejects_bad_arguments(rng):
    qkv, table_h, table_w, _ = _window_inputs(rng, 2, 3, 4, 2, 8)
    good = dict(qkv=qkv, table_h=table_h, table_w=table_w)
    cases = [
        (dict(qkv=qkv[0]), "qkv: expected 5 dimensions"),
        (dict(qkv=np.ascontiguousarray(qkv[:, :, :2])), r"qkv: expected \[B, L, 3, heads >= 1, d\]"),
        (dict(table_h=table_h[:, :, :4].copy()), r"table_h: expected shape \(3, 3, 8\), got \(3, 3, 4\)"),
        (dict(table_w=np.zeros((3, 3, 8), np.float32)), "a query grid of 3 x 3 and a key grid of 3 x 3; expected both "
                                                        "of L = 12 tokens"),
        (dict(scale=float("nan")), "window_attention_bf16: scale must be finite"),
        (dict(out=np.zeros((2, 12, 2, 4), np.float32)), r"out: expected shape \(2, 12, 2, 8\)"),
        (dict(threads=-1), "threads"),
        (dict(isa="avx2"), "window_attention_bf16: isa must be 'auto', 'amx' or 'avx512', got 'avx2'"),
    ]
    if _ext.has_avx512_bf16():
        _ext.window_attention_bf16(**good)
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            _ext.window_attention_bf16(**{**good, **change})


def test_shared_attention_bf16_rejects_bad_arguments(rng):
    """The float32 kernel's argument checks (they run before the tiles are asked for, on any CPU)."""
    q, k, v = _shared_attention_inputs(rng, 6, 2, 8, 64, 3.0)
    good = dict(q=q, k=k, v=v)
    cases = [
        (dict(q=q.astype(np.float64)), "q: expected dtype float32"),
        (dict(v=v[:19].copy()), r"v: expected shape \(64, 2, 8\), got \(19, 2, 8\)"),
        (dict(q=np.zeros((6, 2, 65), np.float32)), r"q: expected \[R, heads >= 1, d\] with 1 <= d <= 64"),
        (dict(rel_h=np.zeros((6, 2, 4), np.float32)), "shared_attention_bf16: rel_h and rel_w go together"),
        (dict(rel_h=np.zeros((6, 2, 3), np.float32), rel_w=np.zeros((6, 2, 16), np.float32)),
         r"a key grid of 3 x 16; expected kh \* kw = 64"),
        (dict(threads=-1), "threads"),
        (dict(scale=float("inf")), "shared_attention_bf16: scale must be finite, got inf"),
        (dict(heads_first=True), r"k: expected shape \(6, 2, 8\), got \(64, 2, 8\)"),
        (dict(q=_heads_first(q), k=_heads_first(k), v=v, heads_first=True),
         r"v: expected shape \(2, 64, 8\), got \(64, 2, 8\)"),
        (dict(out=np.zeros((6, 2, 8))), "out: expected dtype float32"),
        (dict(out=np.zeros((2, 6, 8), np.float32)), r"out: expected shape \(6, 2, 8\), got \(2, 6, 8\)"),
        (dict(out=q), "out: must not overlap q"),
        (dict(out=np.zeros((6, 2, 8), np.float32)[::-1]), "out: array is not C-contiguous"),
        (dict(isa="tiles"), "shared_attention_bf16: isa must be 'auto', 'amx' or 'avx512', got 'tiles'"),
    ]
    read_only = np.zeros((6, 2, 8), np.float32)
    read_only.flags.writeable = False
    cases.append((dict(out=read_only), "out: array is read-only"))
    if _ext.has_avx512_bf16():
        _ext.shared_attention_bf16(**good)
    for change, message in cases:
        with pytest.raises(TypeError if "dtype" in message else ValueError, match=message):
            _ext.shared_attention_bf16(**{**good, **change})


@pytest.mark.skipif(_ext.has_amx_bf16(), reason="this CPU has AMX-BF16 tiles")
def test_bf16_attention_refuses_amx_without_the_tiles(rng):
    q, k, v = _shared_attention_inputs(rng, 6, 2, 8, 64, 3.0)
    with pytest.raises(RuntimeError, match="shared_attention_bf16: this CPU or operating system gives no AMX-BF16"):
        _ext.shared_attention_bf16(q, k, v, isa="amx")
    qkv, bias = _biased_inputs(rng, 2, 9, 2, 8)
    with pytest.raises(RuntimeError, match="biased_attention_bf16: this CPU or operating system gives no AMX-BF16"):
        _ext.biased_attention_bf16(qkv, bias, isa="amx")


@pytest.mark.skipif(_ext.has_avx512_bf16(), reason="this CPU has AVX512-BF16")
def test_bf16_attention_refuses_without_avx512_bf16(rng):
    q, k, v = _shared_attention_inputs(rng, 6, 2, 8, 64, 3.0)
    with pytest.raises(RuntimeError, match=r"shared_attention_bf16: this CPU has no AVX512-BF16"):
        _ext.shared_attention_bf16(q, k, v)


def _biased_inputs(rng, b, length, g, d):
    """TinyViT-like biased_attention_bf16 inputs: qkv [B, L, G, 3, d] with logits of a standard deviation about 3
    and attention biases [G, L, L] of about 1."""
    qkv = rng.normal(0, 1, (b, length, g, 3, d)).astype(np.float32)
    qkv[:, :, :, 1] *= np.float32(3 / np.sqrt(d))
    return qkv, rng.normal(0, 1, (g, length, length)).astype(np.float32)


@pytest.mark.parametrize("isa", ATTENTION_ISAS)
@pytest.mark.parametrize("b,length,g,d", [
    (25, 196, 5, 32),          # LiteMedSAM's third stage: 14 x 14 windows, 5 heads (a sample of windows)
    (361, 49, 4, 32),          # its second stage: 7 x 7 windows, 4 heads
    (3, 20, 2, 16),            # one key block and a half
    (2, 300, 3, 48),           # more rows than a head work item takes: the heads' layout shared by the threads
])
def test_biased_attention_bf16(rng, isa, b, length, g, d):
    """biased_attention_bf16 from TinyViT's qkv product [B, L, G, 3, d] and the heads' biases: each window as the
    twin's token-major attention of its q scale, k, v with the bias added to the logits; out=, threads."""
    qkv, bias = _biased_inputs(rng, b, length, g, d)
    scale = np.float32(d ** -0.5)
    got = _ext.biased_attention_bf16(qkv, bias, scale=scale, threads=2, isa=isa)
    assert got.shape == (b, length, g, d) and got.dtype == np.float32
    for w in np.sort(rng.choice(b, min(b, 3), replace=False)):
        q, k, v = (qkv[w, :, :, s] for s in range(3))
        _assert_bf16_attention_close(got[w], q * scale, k, v, bias=bias.transpose(1, 0, 2))
    unbiased = _ext.biased_attention_bf16(qkv, np.zeros_like(bias), scale=scale, threads=2, isa=isa)
    assert np.abs(got - unbiased).max() > 0.05    # the bias matters
    out = np.full_like(got, np.nan)
    assert np.shares_memory(_ext.biased_attention_bf16(qkv, bias, scale=scale, out=out, isa=isa), out)
    np.testing.assert_array_equal(out, _ext.biased_attention_bf16(qkv, bias, scale=scale, threads=1, isa=isa))


def test_biased_attention_bf16_rejects_bad_arguments(rng):
    qkv, bias = _biased_inputs(rng, 2, 9, 2, 8)
    good = dict(qkv=qkv, bias=bias)
    cases = [
        (dict(qkv=qkv[0]), "qkv: expected 5 dimensions"),
        (dict(qkv=np.ascontiguousarray(qkv[:, :, :, :2])), r"qkv: expected \[B, L, heads >= 1, 3, d\]"),
        (dict(qkv=np.zeros((2, 9, 2, 3, 65), np.float32)), r"with 1 <= d <= 64"),
        (dict(bias=bias[:, :, :8].copy()), r"bias: expected shape \(2, 9, 9\), got \(2, 9, 8\)"),
        (dict(scale=float("nan")), "biased_attention_bf16: scale must be finite"),
        (dict(out=np.zeros((2, 9, 2, 4), np.float32)), r"out: expected shape \(2, 9, 2, 8\)"),
        (dict(out=qkv.reshape(-1)[:2 * 9 * 2 * 8].reshape(2, 9, 2, 8)), "out: must not overlap qkv"),
        (dict(threads=-1), "threads"),
        (dict(isa="amx512"), "biased_attention_bf16: isa must be 'auto', 'amx' or 'avx512', got 'amx512'"),
    ]
    if _ext.has_avx512_bf16():
        _ext.biased_attention_bf16(**good)
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            _ext.biased_attention_bf16(**{**good, **change})


def test_bf16_twin_rounds_to_nearest_even():
    x = np.array([1.0, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 + 2.0 ** -7, -2.5, 1 + 2.0 ** -9], np.float32)
    np.testing.assert_array_equal(twins.bf16(x), np.array([1.0, 1.0, 1 + 2.0 ** -6, 1 + 2.0 ** -7, -2.5, 1.0],
                                                          np.float32))


# ------------------------------------------------------------------------------------------------
# Two-way pass, projected logits mode (qproj)

TWO_WAY_QPROJ_CASES = [  # batch, shared keys, pixels, J, J2, heads, d, logit std
    (1, True, 100, 56, 56, 8, 16, 3.0),
    (5, True, 4096, 56, 56, 8, 16, 3.0),     # SAM's first layer: 8 heads of 7 tokens, d 16
    (3, False, 200, 56, 40, 8, 16, 3.0),     # keys per prompt
    (2, True, 4096, 56, 56, 8, 16, 30.0),    # large logits
    (2, True, 300, 64, 64, 4, 32, 3.0),      # 16 tokens per head: two token tiles each
    (3, True, 1, 64, 64, 64, 4, 3.0),        # one pixel; one token per head
    (2, True, 47, 12, 1, 3, 5, 3.0),         # d 5, D 15 (not a multiple of 16), one pooled token
    (2, True, 130, 16, 8, 1, 256, 3.0),      # one head over all 256 columns
    (2, True, 100, 9, 9, 1, 1, 3.0),         # d 1
]


@pytest.mark.parametrize("batch,shared,pixels,tokens,tokens2,heads,d,logit_std", TWO_WAY_QPROJ_CASES)
@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_two_way_pass_qproj_matches_twin(rng, batch, shared, pixels, tokens, tokens2, heads, d, logit_std, isa):
    args = twins.two_way_qproj_inputs(rng, batch, shared, pixels, tokens, tokens2, heads, d, logit_std)
    got = _ext.two_way_pass(**args, isa=isa)
    _assert_two_way_close(got, twins.two_way_pass(**args))
    assert got[0].shape == (batch, pixels, 256) and got[1].shape == (batch, tokens2, 256)


def test_two_way_pass_qproj_one_head_equals_full_mode(rng):
    """With one head and qproj = keys + pe (D = d = 256), the projected mode computes what the full mode does."""
    args = twins.two_way_inputs(rng, 3, True, 500, 24, 16, 1)
    full = _ext.two_way_pass(**args)
    projected = _ext.two_way_pass(**args, qproj=args["keys"][0] + args["pe"])
    for f, q in zip(full, projected):
        np.testing.assert_allclose(q, f, rtol=1e-5, atol=1e-5 * float(np.abs(f).max()))


def test_two_way_pass_qproj_ignores_pe_in_the_logits(rng):
    """In qproj mode the first logits do not use keys + pe: keys_out does not depend on pe (only the second
    logits, z + pe, and so the pooled rows do)."""
    args = twins.two_way_qproj_inputs(rng, 2, True, 300, 56, 56, 8, 16)
    a_keys, a_pooled = _ext.two_way_pass(**args)
    b_keys, b_pooled = _ext.two_way_pass(**{**args, "pe": args["pe"] * 2})
    np.testing.assert_array_equal(a_keys, b_keys)
    assert np.abs(a_pooled - b_pooled).max() > 1e-3


def test_two_way_pass_qproj_isa_builds_agree_and_out(rng):
    args = twins.two_way_qproj_inputs(rng, 2, True, 500, 56, 48, 8, 16)
    auto, generic = _ext.two_way_pass(**args, isa="auto"), _ext.two_way_pass(**args, isa="generic")
    for a, g in zip(auto, generic):
        np.testing.assert_allclose(a, g, rtol=1e-5, atol=1e-5 * float(np.abs(g).max()))
    out = np.full((2, 500, 256), np.nan, np.float32)
    keys_out, pooled = _ext.two_way_pass(**args, out=out)
    assert keys_out is out
    np.testing.assert_array_equal(out, auto[0])
    np.testing.assert_array_equal(pooled, auto[1])


def test_two_way_pass_qproj_rejects_bad_arguments(rng):
    good = twins.two_way_qproj_inputs(rng, 3, True, 20, 16, 8, 4, 8)  # D 32, d 8
    cases = [
        (dict(qproj=good["qproj"].astype(np.float64)), "qproj: expected dtype float32", TypeError),
        (dict(qproj=good["qproj"].tolist()), "qproj: expected a numpy.ndarray", TypeError),
        (dict(qproj=good["qproj"][None]), "qproj: expected 2 dimensions", ValueError),
        (dict(qproj=good["qproj"][:19].copy()), r"qproj: expected shape \(20, 32\), got \(19, 32\)", ValueError),
        (dict(qproj=np.repeat(good["qproj"], 2, axis=1)[:, ::2]), "qproj: array is not C-contiguous", ValueError),
        (dict(qproj=good["qproj"][:, :30].copy()), "qproj: 30 columns; expected a multiple of heads 4", ValueError),
        (dict(qproj=good["qproj"][:, :0].copy()), "qproj: 0 columns", ValueError),
        (dict(qproj=np.zeros((20, 260), np.float32)), r"qproj: 260 columns; expected a multiple of heads 4 in 1\.\.256",
         ValueError),
        (dict(kq=good["kq"][:, :, :7].copy()), r"kq: expected shape \(3, 16, 8\)", ValueError),
        (dict(kq=np.zeros((3, 16, 256), np.float32)), r"kq: expected shape \(3, 16, 8\)", ValueError),
        (dict(heads=3), "heads 3 must be >= 1 and divide kq's 16 tokens", ValueError),
        (dict(out=good["qproj"].reshape(1, 20, 32)), r"out: expected shape", ValueError),
    ]
    _ext.two_way_pass(**good)  # accepted
    for change, message, error in cases:
        with pytest.raises(error, match=message):
            _ext.two_way_pass(**{**good, **change})
    buffer = np.zeros(3 * 20 * 256 + 20 * 32, np.float32)
    with pytest.raises(ValueError, match="out: must not overlap qproj"):
        _ext.two_way_pass(**{**good, "qproj": buffer[:20 * 32].reshape(20, 32),
                             "out": buffer[20 * 32 - 1:-1].reshape(3, 20, 256)})
    _ext.two_way_pass(**{**good, "qproj": buffer[:20 * 32].reshape(20, 32), "out": buffer[20 * 32:].reshape(3, 20, 256)})


# ------------------------------------------------------------------------------------------------
# Thread limits of the multi-threaded kernels


def _threaded_calls(rng) -> dict:
    """name -> call(threads) of each kernel that takes a thread limit, on inputs big enough to start threads."""
    two_way = twins.two_way_inputs(rng, 8, True, 4096, 56, 56, 8)
    two_way_q = twins.two_way_qproj_inputs(rng, 8, True, 4096, 56, 40, 8, 16)
    upscaling = twins.upscaling_inputs(rng, [3, 1, 2, 3], 64, 64)
    factored = twins.upscaling_factored_inputs(rng, [3, 1, 2, 3], 64, 64)
    x, w, b = (rng.normal(0, 1, s).astype(np.float32) for s in ((448, 256), (256, 2048), (2048,)))
    logits = rng.normal(0, 4, (64, 256, 256)).astype(np.float32)
    ry = rng.uniform(0, 1, (200, 256)).astype(np.float32)
    rx = rng.uniform(0, 1, (200, 256)).astype(np.float32)
    shared = _shared_attention_inputs(rng, 448, 8, 16, 4096, 3.0)
    return {
        "two_way_pass": lambda threads: _ext.two_way_pass(**two_way, threads=threads),
        "two_way_pass qproj": lambda threads: _ext.two_way_pass(**two_way_q, threads=threads),
        "mask_upscaling": lambda threads: _ext.mask_upscaling(**upscaling, threads=threads),
        "mask_upscaling_factored": lambda threads: _ext.mask_upscaling_factored(**factored, threads=threads),
        "linear": lambda threads: _ext.linear(x, w, b, relu=True, threads=threads),
        "shared_attention": lambda threads: _ext.shared_attention(*shared, threads=threads),
        "stability_scores": lambda threads: _ext.stability_scores(logits, 0.0, 1.0, threads=threads),
        "resize_logits": lambda threads: _ext.resize_logits(logits, ry, rx, threads=threads),
    }


def test_kernels_give_the_same_results_on_any_number_of_threads(rng):
    """The work split depends on the inputs, not on the threads: bit-identical results for every limit."""
    for name, call in _threaded_calls(rng).items():
        want = call(0)
        for threads in (1, 2, 3):
            got = call(threads)
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                assert np.array_equal(a, b, equal_nan=True), (name, threads)


def test_kernels_reject_negative_threads(rng):
    for name, call in _threaded_calls(rng).items():
        kernel = name.split()[0]
        with pytest.raises(ValueError, match=f"{kernel}: threads must be >= 0"):
            call(-1)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or not hasattr(os, "sched_setaffinity"),
                    reason="counts threads in /proc (Linux)")
def test_threads_limit_the_threads_started(rng):
    """threads=1 starts no thread; threads=n starts at most n - 1 beside the caller's (even beyond the CPUs); 0
    means one per CPU of the process's affinity mask, so a process pinned to one CPU starts none. Seeing more
    threads than exist is impossible, so the upper bounds are exact; that threads do start is seen when the
    poller runs while they live (at least one of them, on a busy or slow machine)."""
    if any("libasan" in line for line in Path("/proc/self/maps").read_text().splitlines()):
        pytest.skip("under tests/test_sanitizers.py's ASan build, threads the kernel did not start appear "
                    "during the calls (seen: 4 new threads with the limit at one CPU)")
    args = twins.two_way_inputs(rng, 8, False, 4096, 56, 56, 8)     # 16 work items: 8 prompts x 2 chunks

    def call(threads):
        return _ext.two_way_pass(**args, threads=threads)

    assert most_threads_during(lambda: call(1)) == 1
    assert 2 <= most_threads_during(lambda: call(3)) <= 3
    cpus = os.sched_getaffinity(0)
    limit = min(len(cpus), 16)
    assert min(limit, 2) <= most_threads_during(lambda: call(0)) <= limit
    try:
        os.sched_setaffinity(0, {min(cpus)})            # this thread's mask, which the helper inherits
        assert most_threads_during(lambda: call(0)) == 1
    finally:
        os.sched_setaffinity(0, cpus)
