"""Registration scores against values computed by hand on small arrays."""
from __future__ import annotations

import numpy as np
import pytest

from samreg_rt import metrics
from samreg_rt.correspondence import Correspondence, Side
from samreg_rt.errors import InputError
from samreg_rt.masks import pack_masks


def test_dice_per_class_never_merges_classes():
    a = np.array([[1, 1, 0], [2, 2, 0]])
    b = np.array([[1, 0, 0], [2, 2, 2]])
    assert metrics.dice(a, b) == {1: pytest.approx(2 / 3), 2: pytest.approx(4 / 5)}
    scores = metrics.dice(a, b, classes=[2, 3])
    assert scores[2] == pytest.approx(0.8) and np.isnan(scores[3])
    # merged foreground would score 1; each class scores 0
    assert metrics.dice(np.array([1, 2]), np.array([2, 1])) == {1: 0.0, 2: 0.0}
    # bool masks are class 1, also when empty
    assert metrics.dice(np.array([True, True, False]), np.array([True, False, False])) == {1: pytest.approx(2 / 3)}
    assert np.isnan(metrics.dice(np.zeros(3, bool), np.zeros(3, bool))[1])
    # integral float labels (as read from NIfTI) are accepted
    assert metrics.dice(a.astype(np.float32), b)[1] == pytest.approx(2 / 3)


def test_hd95_by_hand():
    a = np.zeros((1, 7), bool)
    b = np.zeros((1, 7), bool)
    a[0, 0] = True
    b[0, [1, 5]] = True
    # a -> b: [1]; b -> a: [1, 5], 95th percentile 1 + 0.95 * 4 = 4.8
    assert metrics.hd95(a, b) == pytest.approx(4.8)
    assert metrics.hd95(b, a) == pytest.approx(4.8)
    assert metrics.hd95(a, b, spacing=(3.0, 0.5)) == pytest.approx(2.4)
    c = np.zeros((4, 4), bool)
    d = np.zeros((4, 4), bool)
    c[0, 0], d[3, 0] = True, True
    assert metrics.hd95(c, d) == pytest.approx(3.0)
    assert metrics.hd95(c, d, spacing=(2.0, 0.5)) == pytest.approx(6.0)
    square = np.zeros((9, 9), bool)
    square[2:7, 2:7] = True
    assert metrics.hd95(square, square) == 0.0
    assert np.isnan(metrics.hd95(square, np.zeros_like(square)))
    assert np.isnan(metrics.hd95(np.zeros_like(square), np.zeros_like(square)))


def test_centroid_distance():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[0:2, 0:2] = True                                  # centroid (0.5, 0.5)
    b[3:5, 4:6] = True                                  # centroid (3.5, 4.5)
    assert metrics.centroid_distance(a, b) == pytest.approx(5.0)
    assert metrics.centroid_distance(a, b, spacing=(2.0, 0.5)) == pytest.approx(np.hypot(6.0, 2.0))
    assert np.isnan(metrics.centroid_distance(a, np.zeros_like(a)))


def test_tre_with_a_field_and_anisotropic_spacing():
    field = np.zeros((10, 12, 2))
    field[..., 0], field[..., 1] = 1.0, 2.0            # every fixed point maps to (x + 2, y + 1)
    fixed = np.array([[3.0, 4.0], [0.0, 0.0], [5.0, 5.0]])        # (x, y)
    moving = np.array([[8.0, 5.0], [2.0, 5.0], [7.0, 6.0]])
    err = metrics.tre(fixed, moving, field, spacing=(2.0, 0.5))   # rows 2 mm, columns 0.5 mm
    # predictions (5, 5), (2, 1), (7, 6): errors (3, 0), (0, -4), (0, 0) in (x, y) px
    assert np.allclose(err.px, [3.0, 4.0, 0.0])
    assert np.allclose(err.mm, [1.5, 8.0, 0.0])
    assert metrics.tre(fixed, moving, field).mm is None
    # before registration: plain landmark distance
    before = metrics.tre_identity(fixed, moving, spacing=(2.0, 0.5))
    assert np.allclose(before.px, np.hypot(moving[:, 0] - fixed[:, 0], moving[:, 1] - fixed[:, 1]))
    assert np.allclose(before.mm, np.hypot((moving[:, 0] - fixed[:, 0]) * 0.5, (moving[:, 1] - fixed[:, 1]) * 2.0))
    zero = metrics.tre(fixed, moving, np.zeros((10, 12, 2)))
    assert np.allclose(zero.px, before.px)


def test_tre_interpolates_the_field_bilinearly():
    yy, xx = np.mgrid[:6, :8].astype(np.float64)
    field = np.stack([0.5 * yy, xx], axis=-1)           # dy = y / 2, dx = x: linear, so exact
    fixed = np.array([[2.5, 1.25], [7.0, 5.0], [-0.4, 5.3]])
    moving = np.array([[5.0, 1.875], [7.0, 5.0], [-0.4, 5.0]])
    err = metrics.tre(fixed, moving, field)
    # predictions (5, 1.875), (14, 7.5) and, in the outer half pixel, the border value u(0, 5) =
    # (dy 2.5, dx 0): (-0.4, 7.8)
    assert np.allclose(err.px, [0.0, np.hypot(7.0, 2.5), 2.8])


def test_tre_errors():
    field = np.zeros((10, 12, 2))
    ok = np.array([[1.0, 1.0]])
    with pytest.raises(InputError, match=r"fixed_xy: landmark\(s\) \[1\] lie outside the 10x12 image"):
        metrics.tre(np.array([[1.0, 1.0], [12.0, 3.0]]), np.array([[1.0, 1.0], [2.0, 2.0]]), field)
    with pytest.raises(InputError, match="moving_xy: .* outside"):
        metrics.tre(ok, np.array([[1.0, -0.6]]), field)
    with pytest.raises(InputError, match="NaN"):
        metrics.tre(np.array([[np.nan, 1.0]]), ok, field)
    with pytest.raises(InputError, match="NaN"):
        metrics.tre_identity(ok, np.array([[1.0, np.inf]]))
    with pytest.raises(InputError, match="1 and 2 landmarks"):
        metrics.tre(ok, np.array([[1.0, 1.0], [2.0, 2.0]]), field)
    with pytest.raises(InputError, match=r"\(N, 2\)"):
        metrics.tre(np.array([1.0, 1.0]), ok, field)
    bad = field.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        metrics.tre(ok, ok, bad)
    with pytest.raises(InputError, match="spacing"):
        metrics.tre(ok, ok, field, spacing=(1.0,))


def test_shape_and_type_errors():
    with pytest.raises(InputError, match="shapes"):
        metrics.dice(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(InputError, match="shapes"):
        metrics.hd95(np.zeros((4, 4), bool), np.zeros((5, 4), bool))
    with pytest.raises(InputError, match="bool"):
        metrics.hd95(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(InputError, match="integer label map"):
        metrics.dice(np.full((2, 2), 0.5), np.zeros((2, 2), int))


def test_folding_ratio():
    field = np.zeros((10, 10, 2))
    assert metrics.folding_ratio(field) == 0.0
    field[:, 5:, 1] = -3.0                             # columns 5.. jump back: the map folds at the step
    ratio = metrics.folding_ratio(field)
    assert ratio == pytest.approx(0.2)                 # columns 4 and 5 (central differences)


def test_fire_auc():
    # 0.5 px succeeds at every threshold 1..25 (25), 3 px at 4..25 (22), 30 px never
    assert metrics.fire_auc([0.5, 3.0, 30.0]) == pytest.approx(47 / 75)
    assert metrics.fire_auc([0.5, 3.0, np.nan]) == pytest.approx(47 / 75)      # NaN = failure
    assert metrics.fire_auc([1.0], thresholds=[1, 2]) == pytest.approx(0.5)     # strict <
    with pytest.raises(InputError):
        metrics.fire_auc([])


def _side(masks: np.ndarray, original) -> Side:
    return Side(pack_masks(np.ascontiguousarray(masks)), masks.shape[1:], original)


def test_roi_pair_label_score():
    # labels at 40x40 (original images); ROIs on a 20x20 working grid
    fixed_labels = np.zeros((40, 40), np.uint8)
    fixed_labels[0:20, 0:20] = 1
    fixed_labels[20:40, 20:40] = 2
    moving_labels = np.zeros((40, 40), np.uint8)
    moving_labels[4:24, 4:24] = 1
    moving_labels[24:40, 0:16] = 2
    f = np.zeros((2, 20, 20), bool)
    f[0, 0:10, 0:10] = True                            # class 1 exactly
    f[1, 10:20, 10:20] = True                          # class 2 exactly
    m = np.zeros((2, 20, 20), bool)
    m[0, 2:12, 2:11] = True                            # class 1: Dice 2*90/(90+100) = 0.947
    m[1, 2:12, 2:12] = True                            # class 1 again: pair 1 disagrees
    corr = Correspondence(fixed=_side(f, (40, 40)), moving=_side(m, (40, 40)),
                          pairs=np.array([[0, 0], [1, 1]], np.int64), similarity=np.ones(2, np.float32))
    score = metrics.roi_pair_label_score(corr, fixed_labels, moving_labels)
    assert score.classes.tolist() == [1, 2]
    assert np.allclose(score.fixed_dice, [[1.0, 0.0], [0.0, 1.0]])
    assert np.allclose(score.moving_dice, [[180 / 190, 0.0], [1.0, 0.0]])
    assert score.agree.tolist() == [True, False] and score.matched_class.tolist() == [1, 0]
    assert score.fraction == 0.5
    # labels already on the working grid give the same answer
    same = metrics.roi_pair_label_score(corr, fixed_labels[::2, ::2], moving_labels[::2, ::2])
    assert same.fraction == 0.5 and np.allclose(same.moving_dice, score.moving_dice)
    with pytest.raises(InputError, match="moving_labels: shape"):
        metrics.roi_pair_label_score(corr, fixed_labels, moving_labels[:30])
