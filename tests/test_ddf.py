"""ROI -> DDF fitting, warping, Jacobians and field files, on synthetic data with known answers."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from samreg_rt import ddf
from samreg_rt.correspondence import Correspondence, Side
from samreg_rt.errors import InputError
from samreg_rt.masks import pack_masks

N = 128


def _shapes(scale: float = 1.0):
    """Eight analytic ROIs f(y, x) -> bool (ellipses and rectangles) covering much of a 128^2 image."""
    out = []
    for cy, cx, ry, rx in [(30, 30, 16, 20), (30, 90, 14, 14), (70, 25, 12, 18), (95, 95, 18, 14), (100, 40, 12, 12)]:
        out.append(lambda y, x, cy=cy, cx=cx, ry=ry, rx=rx: ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1)
    for y0, y1, x0, x1 in [(50, 80, 55, 80), (5, 15, 50, 110), (112, 124, 60, 120)]:
        out.append(lambda y, x, y0=y0, y1=y1, x0=x0, x1=x1: (y >= y0) & (y <= y1) & (x >= x0) & (x <= x1))
    return [lambda y, x, f=f: f(y * scale, x * scale) for f in out]


def _true_field(n: int = N) -> np.ndarray:
    """A smooth deformation, max |u| ~ 3.8 px: sinusoids plus a 1 px shift."""
    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    u = np.empty((n, n, 2))
    u[..., 0] = 3.5 * np.sin(2 * np.pi * xx / n) * np.cos(np.pi * yy / n)
    u[..., 1] = 2.8 * np.cos(2 * np.pi * yy / n + 0.5) + 1.0
    return u


def _pair(moving_shape: tuple[int, int] = (N, N)):
    """fixed_k(p) = shape_k(p + u(p)) on the 128^2 fixed grid; moving_k = shape_k on a grid of
    ``moving_shape`` covering the same field of view (pixel-centre aligned)."""
    u = _true_field()
    yy, xx = np.mgrid[:N, :N].astype(np.float64)
    my = (np.arange(moving_shape[0]) + 0.5) * N / moving_shape[0] - 0.5
    mx = (np.arange(moving_shape[1]) + 0.5) * N / moving_shape[1] - 0.5
    fixed = np.stack([f(yy + u[..., 0], xx + u[..., 1]) for f in _shapes()])
    moving = np.stack([f(my[:, None], mx[None, :]) for f in _shapes()])
    return fixed, moving, u


@pytest.fixture(scope="module")
def synthetic():
    fixed, moving, u = _pair()
    return fixed, moving, u, ddf.fit(fixed, moving)


def _epe(field, truth, where):
    return np.linalg.norm(field - truth, axis=-1)[where]


def test_fit_recovers_known_deformation(synthetic):
    fixed, moving, u, res = synthetic
    inside = fixed.any(axis=0)
    assert 0.3 < inside.mean() < 0.7 and np.abs(u).max() < 4
    assert _epe(ddf.identity((N, N)), u, inside).mean() > 2.0           # the problem is not trivial
    assert _epe(res.field_px, u, inside).mean() < 1.0
    assert res.folding_ratio == 0 and res.jacobian_det.min() > 0
    assert res.field_px.shape == (N, N, 2) and res.field_mm is None
    assert res.converged and 0 < res.iterations <= 3 * 200 and len(res.levels) == 3
    assert res.roi_dice.shape == (8,) and res.roi_dice.min() > 0.9
    assert res.loss == pytest.approx(res.dice_loss + 1e-2 * res.bending + 1.0 * res.membrane)
    # the warped moving masks land on the fixed ones
    warped = np.stack([ddf.warp_labels(m, res.field_px) for m in moving])
    before = [2 * (f & m).sum() / (f.sum() + m.sum()) for f, m in zip(fixed, moving)]
    after = [2 * (f & m).sum() / (f.sum() + m.sum()) for f, m in zip(fixed, warped)]
    assert np.mean(after) > 0.95 > np.mean(before)


def test_fit_moving_masks_on_another_grid_and_spacing():
    fixed, moving, u = _pair(moving_shape=(96, 112))
    res = ddf.fit(fixed, moving, spacing=(0.5, 2.0))
    assert _epe(res.field_px, u, fixed.any(axis=0)).mean() < 1.0 and res.folding_ratio == 0
    assert np.array_equal(res.field_mm, res.field_px * np.array([0.5, 2.0]))


def test_fit_is_deterministic_and_affine_init_finds_a_translation():
    yy, xx = np.mgrid[:64, :64]
    fixed = np.stack([(yy - 20) ** 2 + (xx - 20) ** 2 <= 64, (yy - 40) ** 2 + (xx - 44) ** 2 <= 49,
                      (abs(yy - 45) <= 6) & (abs(xx - 15) <= 9)])
    moving = np.roll(fixed, (3, -2), axis=(1, 2))                  # moving(p) = fixed(p - (3, -2))
    a = ddf.fit(fixed, moving, levels=(16, 8))
    b = ddf.fit(fixed, moving, levels=(16, 8))
    assert np.array_equal(a.field_px, b.field_px) and a.iterations == b.iterations
    assert np.allclose(a.affine[:2, :2], np.eye(2), atol=1e-9)
    assert np.allclose(a.affine[:2, 2], [3, -2], atol=1e-9)
    inside = fixed.any(axis=0)
    assert np.abs(a.field_px[inside] - [3, -2]).max() < 0.5


def test_affine_init_ignores_a_wrong_pair_and_rejects_reflections():
    fixed, moving, _ = _pair()
    clean = ddf._centroid_affine(fixed, moving)
    swapped = moving.copy()
    swapped[[0, 3]] = swapped[[3, 0]]                               # two ROIs paired wrongly
    robust = ddf._centroid_affine(fixed, swapped)
    assert np.abs(robust[:2, :2] - clean[:2, :2]).max() < 0.05 and np.abs(robust[:2, 2] - clean[:2, 2]).max() < 4
    mirrored = fixed[:, :, ::-1]                                    # a reflection is never an initialisation
    reflection = ddf._centroid_affine(fixed, mirrored)
    assert np.array_equal(reflection[:2, :2], np.eye(2))


def test_objective_gradient_matches_finite_differences():
    fixed, moving, u = _pair()
    fixed, moving, u = fixed[:, ::2, ::2], moving[:, ::2, ::2], u[::2, ::2] / 2     # 64^2, fast
    by, bx = ddf._Basis.make(64, 8.0), ddf._Basis.make(64, 11.0)
    smooth = lambda m: ndimage.gaussian_filter(m.astype(np.float64), (0, 1.5, 1.5))
    objective = ddf._Objective(smooth(fixed), ddf._pad(smooth(moving), 0.0), by, bx, bending_weight=0.05)
    theta = ddf._project(0.7 * u.transpose(2, 0, 1), by.b, bx.b).ravel()    # a point off the optimum
    loss, grad = objective(theta)
    eps = 1e-6
    rng = np.random.default_rng(0)
    for i in rng.choice(theta.size, 15, replace=False):
        step = np.zeros_like(theta)
        step[i] = eps
        fd = (objective(theta + step)[0] - objective(theta - step)[0]) / (2 * eps)
        assert grad[i] == pytest.approx(fd, rel=1e-4, abs=1e-9)
    direction = rng.standard_normal(theta.size)
    fd = (objective(theta + eps * direction)[0] - objective(theta - eps * direction)[0]) / (2 * eps)
    assert grad @ direction == pytest.approx(fd, rel=1e-5)


def test_bilinear_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    image = ddf._pad(rng.random((3, 9, 7)), 0.0)
    py, px = rng.uniform(-1.5, 9.5, 200), rng.uniform(-1.5, 7.5, 200)
    sampler = ddf._Bilinear(image)
    _, dy, dx = sampler(py, px, grad=True)
    eps = 1e-7
    fd_y = (sampler(py + eps, px, False)[0] - sampler(py - eps, px, False)[0]) / (2 * eps)
    fd_x = (sampler(py, px + eps, False)[0] - sampler(py, px - eps, False)[0]) / (2 * eps)
    assert np.allclose(dy, fd_y, atol=1e-6) and np.allclose(dx, fd_x, atol=1e-6)


@pytest.mark.parametrize("n, amplitude, wavelength, spacing", [(128, 4, 64, 8), (256, 8, 128, 16), (100, 2, 100, 8)])
def test_bending_energy_has_the_documented_size_independent_value(n, amplitude, wavelength, spacing):
    yy = np.mgrid[:n, :n][0].astype(np.float64)
    dense = np.stack([np.zeros((n, n)), amplitude * np.sin(2 * np.pi * yy / wavelength)])
    basis = ddf._Basis.make(n, spacing)
    objective = ddf._Objective(np.zeros((1, n, n)), np.zeros((1, n + 2, n + 2)), basis, basis, 1.0)
    energy, _ = objective.bending(ddf._project(dense, basis.b, basis.b))
    documented = 8 * np.pi ** 4 * (amplitude / wavelength) ** 2 * (n / wavelength) ** 2
    assert energy == pytest.approx(documented, rel=0.01)
    # an affine field is reproduced exactly by the spline and costs nothing
    affine = ddf._affine_field(np.array([[1.1, 0.2, 3.0], [-0.1, 0.9, -2.0], [0, 0, 1]]), (n, n), (1.0, 1.0))
    c = ddf._project(affine, basis.b, basis.b)
    assert np.abs(ddf._upsample(c, basis.b, basis.b) - affine).max() < 1e-9
    assert abs(objective.bending(c)[0]) < 1e-9


def test_halving_the_control_spacing_reproduces_the_spline_exactly():
    rng = np.random.default_rng(2)
    coarse, fine = ddf._Basis.make(100, 16.0), ddf._Basis.make(100, 8.0)
    dense = ddf._upsample(rng.standard_normal((2, coarse.b.shape[1], coarse.b.shape[1])), coarse.b, coarse.b)
    again = ddf._upsample(ddf._project(dense, fine.b, fine.b), fine.b, fine.b)
    assert np.abs(again - dense).max() < 1e-9


def test_identity_warp_is_bit_exact():
    rng = np.random.default_rng(3)
    zero = ddf.identity((17, 23))
    images = [rng.integers(0, 256, (17, 23), dtype=np.uint8), rng.standard_normal((17, 23, 3)).astype(np.float32),
              rng.standard_normal((17, 23)), rng.integers(-500, 500, (17, 23), dtype=np.int16)]
    for image in images:
        for order in (0, 1):
            out = ddf.warp(image, zero, order=order)
            assert out.dtype == image.dtype and np.array_equal(out, image)
    for labels in (rng.integers(0, 5, (17, 23)).astype(np.uint8), rng.random((17, 23)) > 0.5,
                   rng.integers(0, 1000, (17, 23))):
        out = ddf.warp_labels(labels, zero)
        assert out.dtype == labels.dtype and np.array_equal(out, labels)


def test_warp_translations():
    image = np.arange(30, dtype=np.float64).reshape(5, 6)
    field = np.zeros((5, 6, 2))
    field[..., 0], field[..., 1] = 1.0, -2.0                       # out(i, j) = image(i + 1, j - 2)
    out = ddf.warp(image, field, cval=-1.0)
    expected = np.full((5, 6), -1.0)
    expected[:4, 2:] = image[1:, :4]
    assert np.array_equal(out, expected)
    assert np.array_equal(ddf.warp(image, field, order=0, cval=-1.0), expected)
    field[..., 0], field[..., 1] = 0.0, 0.5
    half = ddf.warp(image, field)
    assert np.allclose(half[:, :5], (image[:, :5] + image[:, 1:]) / 2)
    assert np.allclose(half[:, 5], image[:, 5] / 2)                # blends towards cval = 0 outside
    rgb = np.stack([image, 2 * image, 3 * image], axis=-1).astype(np.uint8)
    assert np.array_equal(ddf.warp(rgb, field)[..., 1], np.rint(2 * half).astype(np.uint8))


def test_warp_labels_is_per_class_linear_then_argmax():
    labels = np.array([[1, 1, 3, 3, 0]] * 3, dtype=np.uint8)
    field = np.zeros((3, 5, 2))
    field[..., 1] = 0.6                                              # samples 60% towards the right
    assert np.array_equal(ddf.warp_labels(labels, field)[0], [1, 3, 3, 0, 0])
    field[..., 1] = 0.5                                              # ties go to the smaller label
    assert np.array_equal(ddf.warp_labels(labels, field)[0], [1, 1, 3, 0, 0])
    field[..., 1] = 1.5                                              # last column samples outside
    assert np.array_equal(ddf.warp_labels(labels, field, fill=7)[0], [1, 3, 0, 0, 7])
    # a smooth field never creates labels that are not there (linear on values would give 2)
    rng = np.random.default_rng(4)
    big = rng.choice(np.array([0, 1, 3], np.int32), (40, 40))
    smooth = ndimage.gaussian_filter(rng.standard_normal((40, 40, 2)), (4, 4, 0)) * 20
    assert set(np.unique(ddf.warp_labels(big, smooth))) <= {0, 1, 3}


def test_jacobian_determinant_and_folding():
    yy, xx = np.mgrid[:20, :30].astype(np.float64)
    a = np.array([[1.2, 0.3], [-0.1, 0.8]])
    field = np.stack([(a[0, 0] - 1) * yy + a[0, 1] * xx, a[1, 0] * yy + (a[1, 1] - 1) * xx], axis=-1)
    assert np.allclose(ddf.jacobian_determinant(field), np.linalg.det(a))
    folded = np.zeros((20, 30, 2))
    folded[..., 1] = -2.0 * xx                                       # x -> -x: det = -1
    assert np.allclose(ddf.jacobian_determinant(folded), -1.0)


def test_resize_field_keeps_the_mapping():
    field = np.zeros((50, 40, 2))
    field[..., 0], field[..., 1] = 1.5, -2.0
    up = ddf.resize_field(field, (100, 120))
    assert np.allclose(up[..., 0], 3.0) and np.allclose(up[..., 1], -6.0)
    assert np.allclose(ddf.resize_field(ddf.identity((50, 40)), (100, 120)), 0.0)
    # into a moving image of another size: zero field on the fixed grid = the centre-aligned scaling
    scaled = ddf.resize_field(ddf.identity((50, 40)), (50, 40), moving_shape=(25, 80))
    yy, xx = np.mgrid[:50, :40]
    assert np.allclose(scaled[..., 0], (yy + 0.5) / 2 - 0.5 - yy)
    assert np.allclose(scaled[..., 1], (xx + 0.5) * 2 - 0.5 - xx)


@pytest.mark.parametrize("name", ["f.npy", "f.nii", "f.nii.gz"])
def test_save_field_round_trip(tmp_path, name):
    field = np.random.default_rng(5).standard_normal((12, 9, 2))
    affine = np.diag([0.7, 0.7, 1.0, 1.0])
    ddf.save_field(tmp_path / name, field, affine=affine)
    assert [p.name for p in tmp_path.iterdir()] == [name]           # no temporary file left
    back = ddf.load_field(tmp_path / name)
    assert back.dtype == np.float64 and np.array_equal(back, field)
    if name.endswith((".nii", ".nii.gz")):
        img = nib.load(tmp_path / name)
        assert img.shape == (12, 9, 1, 1, 2) and img.header.get_intent()[0] == "vector"
        assert np.allclose(img.affine, affine)
    if name.endswith(".gz"):
        assert gzip.decompress((tmp_path / name).read_bytes())[344:348] == b"n+1\x00"


def test_fit_correspondence_uses_pairs_and_working_spacing():
    fixed, moving, _ = _pair(moving_shape=(64, 64))
    corr = Correspondence(
        fixed=Side(pack_masks(np.ascontiguousarray(fixed[::-1])), (N, N), (2 * N, 4 * N), (0.25, 0.5)),
        moving=Side(pack_masks(np.ascontiguousarray(moving[:4])), (64, 64), (64, 64)),
        pairs=np.array([[7, 0], [6, 1], [5, 2], [4, 3]], np.int64), similarity=np.ones(4, np.float32))
    res = ddf.fit_correspondence(corr, levels=(16,), max_iter=5)
    direct = ddf.fit(fixed[:4], moving[:4], spacing=(0.5, 2.0), levels=(16,), max_iter=5)
    assert np.array_equal(res.field_px, direct.field_px)
    assert np.array_equal(res.field_mm, res.field_px * np.array([0.5, 2.0]))
    corr.pairs, corr.similarity = np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    with pytest.raises(InputError, match="no ROI pairs"):
        ddf.fit_correspondence(corr)


def test_bad_inputs_raise_input_error(tmp_path):
    nan_field = ddf.identity((8, 8))
    nan_field[3, 4, 1] = np.nan
    image = np.zeros((8, 8))
    for call in (lambda: ddf.warp(image, nan_field), lambda: ddf.warp_labels(image.astype(int), nan_field),
                 lambda: ddf.jacobian_determinant(nan_field), lambda: ddf.save_field(tmp_path / "f.npy", nan_field)):
        with pytest.raises(InputError, match="NaN"):
            call()
    with pytest.raises(InputError, match="does not match"):
        ddf.warp(np.zeros((8, 9)), ddf.identity((8, 8)))
    with pytest.raises(InputError, match="does not match"):
        ddf.warp_labels(np.zeros((9, 8), int), ddf.identity((8, 8)))
    with pytest.raises(InputError, match=r"\(H, W, 2\)"):
        ddf.warp(image, np.zeros((8, 8, 3)))
    with pytest.raises(InputError, match="unknown field format"):
        ddf.save_field(tmp_path / "f.png", ddf.identity((8, 8)))
    masks = np.zeros((2, 16, 16), bool)
    masks[:, 4:8, 4:8] = True
    with pytest.raises(InputError, match="2 fixed and 3 moving"):
        ddf.fit(masks, np.concatenate([masks, masks[:1]]))
    empty = masks.copy()
    empty[1] = False
    with pytest.raises(InputError, match=r"moving_masks: mask\(s\) \[1\] are empty"):
        ddf.fit(masks, empty)
    with pytest.raises(InputError, match="bool"):
        ddf.fit(masks.astype(np.uint8), masks)
    with pytest.raises(InputError, match="no ROI pairs"):
        ddf.fit(masks[:0], masks[:0])
    with pytest.raises(InputError, match="spacing"):
        ddf.fit(masks, masks, spacing=(1.0, -1.0))
    with pytest.raises(InputError, match="no such field file"):
        ddf.load_field(tmp_path / "missing.npy")


def test_membrane_energy_keeps_the_field_within_the_rois_displacements():
    """ROIs on the left third, stretched in x (u_x = 0.12 (x - 32): -1.5..+1.6 px on them). With the
    bending energy alone the affine trend runs on across the ROI-free right side (an affine field
    has no bending energy); the membrane energy keeps it within the range seen on the ROIs."""
    n = 128
    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    centres = [(20, 20), (60, 35), (100, 22), (40, 45)]

    def shapes(dx):
        return np.stack([((yy - cy) / 12) ** 2 + ((xx + dx - cx) / 9) ** 2 <= 1 for cy, cx in centres])

    fixed, moving = shapes(0.12 * (xx - 32)), shapes(0.0)
    inside = fixed.any(axis=0)
    bending_only = ddf.fit(fixed, moving, membrane_weight=0.0)
    membrane = ddf.fit(fixed, moving, membrane_weight=1.0)
    for res in (bending_only, membrane):
        assert res.roi_dice.min() > 0.95 and res.folding_ratio == 0
    on_rois = np.abs(membrane.field_px[..., 1][inside]).max()
    assert np.abs(bending_only.field_px[:, 100:, 1]).max() > 8.0                 # 0.12 * (127 - 32)
    assert np.abs(membrane.field_px[:, 100:, 1]).max() <= on_rois
    assert membrane.membrane > 0 and membrane.loss == pytest.approx(
        membrane.dice_loss + 1e-2 * membrane.bending + 1.0 * membrane.membrane)


def test_three_pairs_initialise_with_a_translation_not_an_exact_affine():
    """Three centroids fit any affine exactly: centroid noise would become a shear across the image."""
    yy, xx = np.mgrid[:128, :128]
    fixed = np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 <= 64 for cy, cx in [(30, 30), (40, 60), (52, 90)]])
    moving = np.stack([np.roll(m, shift, axis=(0, 1)) for m, shift in zip(fixed, [(2, 1), (-3, 0), (4, -2)])])
    a = ddf._centroid_affine(fixed, moving)
    assert np.array_equal(a[:2, :2], np.eye(2)) and np.allclose(a[:2, 2], [2, 0])   # median shift


def test_ncc_hand_values():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert ddf.ncc(a, a) == pytest.approx(1.0)
    assert ddf.ncc(a, -a) == pytest.approx(-1.0)
    assert ddf.ncc(a, np.array([[1.0, 3.0], [2.0, 4.0]])) == pytest.approx(0.8)   # centred: (-1.5,-.5,.5,1.5)·(-1.5,.5,-.5,1.5)/5
    assert ddf.ncc(a, np.full((2, 2), 7.0)) == 0.0


def _blob_images(shift: int):
    """A textured fixed image and the moving image with its content moved ``shift`` px right."""
    rng = np.random.default_rng(0)
    fixed = ndimage.gaussian_filter(rng.normal(size=(96, 96)), 3)
    moving = np.roll(fixed, shift, axis=1)
    return (255 * (fixed - fixed.min()) / np.ptp(fixed)).astype(np.uint8), (255 * (moving - fixed.min()) / np.ptp(fixed)).astype(np.uint8)


def test_similarity_check_accepts_the_true_field_and_rejects_the_opposite():
    fixed, moving = _blob_images(4)
    right = np.zeros((96, 96, 2))
    right[..., 1] = 4.0                      # warped(p) = moving(p + (0, 4)) = fixed(p)
    good = ddf.similarity_check(fixed, moving, right)
    bad = ddf.similarity_check(fixed, moving, -right)
    assert good.accepted and good.ncc_field > 0.95 > good.ncc_identity
    assert not bad.accepted and bad.ncc_field < bad.ncc_identity
    # images of another size are resized to the field's grid: the same answer on a half-size field
    half = ddf.similarity_check(fixed, moving, right[::2, ::2] / 2)
    assert half.accepted and half.ncc_field > half.ncc_identity


def _wrong_pair(pairs: np.ndarray) -> Correspondence:
    """A blob in a 96x96 fixed image and a blob elsewhere in the moving one, with ``pairs`` (k, 2)."""
    yy, xx = np.mgrid[:96, :96]
    here = (yy - 30) ** 2 + (xx - 30) ** 2 <= 100
    there = (yy - 60) ** 2 + (xx - 62) ** 2 <= 100
    side = lambda m: Side(pack_masks(m[None]), (96, 96), (96, 96))  # noqa: E731
    return Correspondence(fixed=side(here), moving=side(there), pairs=pairs,
                          similarity=np.ones(len(pairs), np.float32))


def test_dense_field_falls_back_to_identity_when_the_pairs_lower_the_ncc():
    """One wrong ROI pair (a blob paired with a blob elsewhere in an identical moving image): the
    default preset keeps the identity, the reference preset (no check) keeps the fitted field."""
    import warnings

    from samreg_rt.batch import dense_field
    from samreg_rt.io import Image

    fixed, _ = _blob_images(0)
    corr = _wrong_pair(np.array([[0, 0]], np.int64))
    image = Image(array=fixed, spacing=None, path="same.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        field, _, summary = dense_field(corr, image, image, preset="default")
    assert not summary["field_kept"] and summary["ncc_identity"] == pytest.approx(1.0)
    assert np.array_equal(field, ddf.identity((96, 96)))
    assert any("lowers the NCC" in str(w.message) for w in caught)
    field, _, summary = dense_field(corr, image, image, preset="reference")
    assert "field_kept" not in summary and np.abs(field).max() > 5


def test_fit_checked_reports_why_the_field_is_the_identity():
    """No pair -> no fit ("empty correspondence"); a wrong pair on identical images -> fitted but
    rejected by the check (note gives both NCCs); the same pair unchecked -> kept."""
    fixed, _ = _blob_images(0)
    wrong, empty = _wrong_pair(np.array([[0, 0]], np.int64)), _wrong_pair(np.zeros((0, 2), np.int64))
    none = ddf.fit_checked(empty, fixed, fixed, check_similarity=True)
    assert none.fit is None and none.check is None and not none.kept and none.note == "empty correspondence"
    rejected = ddf.fit_checked(wrong, fixed, fixed, check_similarity=True)
    assert rejected.fit is not None and not rejected.kept
    assert rejected.check.ncc_identity == pytest.approx(1.0) and rejected.check.ncc_field < 1.0
    assert rejected.note.startswith("field lowers the NCC (1.000 -> ")
    unchecked = ddf.fit_checked(wrong, fixed, fixed, check_similarity=False)
    assert unchecked.kept and unchecked.check is None and unchecked.note == ""
    np.testing.assert_array_equal(unchecked.fit.field_px, rejected.fit.field_px)
