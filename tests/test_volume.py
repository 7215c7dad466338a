"""3-D volumes: NIfTI reading keeps spacing and orientation, bad files fail with the file's name,
slice matching, 3-D label warping, and slice-wise registration of the ACDC pair with LiteMedSAM."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samreg_rt import metrics, volume
from samreg_rt.errors import InputError
from samreg_rt.models import cache_dir

ACDC = "cardiac_mr/acdc_patient067_ed_es_3d"
# read at import, before conftest points SAMREG_RT_CACHE at the session's temporary cache
USER_LITEMEDSAM = cache_dir() / "litemedsam"


def litemedsam_model_dir() -> Path:
    """LiteMedSAM (real weights, fp32): the user's exported model when there is one (only read; the
    engine verifies every graph's sha256), else exported once per test session into the session
    cache (``python -m samreg_export``, fp32 only, about 2 minutes; skipped without torch)."""
    if (USER_LITEMEDSAM / "manifest.json").is_file():
        return USER_LITEMEDSAM
    target = Path(os.environ["SAMREG_RT_CACHE"]) / "litemedsam-fp32"
    if not (target / "manifest.json").is_file():
        pytest.importorskip("torch")
        subprocess.run([sys.executable, "-m", "samreg_export", "--model", "litemedsam", "--out", str(target),
                        "--name", "litemedsam", "--precision", "fp32"], check=True, capture_output=True)
    return target


@pytest.fixture(scope="module")
def engine():
    from samreg_rt.engine import Engine

    return Engine.load(litemedsam_model_dir(), threads=2)


def _write(path: Path, data: np.ndarray, affine: np.ndarray, zooms: tuple | None = None) -> Path:
    img = nib.Nifti1Image(data, affine)
    if zooms is not None:
        img.header.set_zooms(zooms)
    nib.save(img, str(path))
    return path


def test_acdc_volume_keeps_spacing_and_orientation(data_dir: Path) -> None:
    v = volume.load_volume(data_dir / ACDC / "fixed.nii.gz")
    assert v.array.shape == (256, 216, 10)
    assert v.spacing_mm == pytest.approx((1.3671875, 1.3671875, 10.0))
    assert v.axcodes == ("L", "P", "S")
    assert volume.default_axis(v) == 2
    # the header's affine says 1 mm voxels; the world matrix uses its directions with pixdim sizes
    assert np.allclose(np.abs(np.diag(v.affine)[:3]), 1.0)
    assert np.allclose(v.world[:3, :3], np.diag([-1.3671875, -1.3671875, 10.0]))
    assert v.slice_spacing(2) == pytest.approx((1.3671875, 1.3671875))


def test_pixdim_wins_over_affine_scale_and_orientation_is_kept(tmp_path: Path) -> None:
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])   # i -> +y, j -> -x
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = [10.0, -5.0, 3.0]
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = _write(tmp_path / "oblique.nii.gz", data, affine, zooms=(0.5, 0.7, 4.0))
    v = volume.load_volume(path)
    assert np.array_equal(v.array, data)
    assert v.spacing_mm == pytest.approx((0.5, 0.7, 4.0))
    assert v.axcodes == ("A", "L", "S")
    assert np.allclose(v.direction, rot)
    assert np.allclose(v.world[:3, :3], rot * np.array([0.5, 0.7, 4.0]))
    assert np.allclose(v.world[:3, 3], [10.0, -5.0, 3.0])
    assert volume.default_axis(v) == 2


def test_bad_volumes_name_the_file(tmp_path: Path) -> None:
    four_d = _write(tmp_path / "series.nii.gz", np.zeros((4, 4, 3, 2), np.float32), np.eye(4))
    with pytest.raises(InputError, match="series.nii.gz.*not a 3-D volume"):
        volume.load_volume(four_d)
    for name, row in (("singular.nii", [0.0, 0.0, 0.0, 0.0]), ("nan_affine.nii", [np.nan, 0.0, 1.0, 0.0])):
        hdr = nib.Nifti1Header()                           # the sform alone says where voxels are
        hdr.set_data_dtype(np.float32)
        hdr.set_data_shape((4, 4, 3))
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], row
        hdr["sform_code"], hdr["qform_code"] = 1, 0
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), None, header=hdr), str(tmp_path / name))
        with pytest.raises(InputError, match=name):
            volume.load_volume(tmp_path / name)
    nan_data = _write(tmp_path / "nan_data.nii", np.full((4, 4, 3), np.nan, np.float32), np.eye(4))
    with pytest.raises(InputError, match="nan_data.nii.*NaN"):
        volume.load_volume(nan_data)
    with pytest.raises(InputError, match="missing.nii.gz"):
        volume.load_volume(tmp_path / "missing.nii.gz")
    # a trailing axis of length 1 is not a 4th dimension
    assert volume.load_volume(_write(tmp_path / "t1.nii", np.zeros((4, 4, 3, 1), np.float32), np.eye(4))).array.shape == (4, 4, 3)


def test_slices_are_matched_by_physical_position(tmp_path: Path) -> None:
    aff = np.diag([1.0, 1.0, 5.0, 1.0])
    fixed = volume.load_volume(_write(tmp_path / "f.nii", np.zeros((4, 4, 6), np.float32), aff))
    shifted = aff.copy()
    shifted[2, 3] = 10.0                                   # moving slice 0 sits at fixed slice 2
    moving = volume.load_volume(_write(tmp_path / "m.nii", np.zeros((4, 4, 6), np.float32), shifted))
    assert volume.match_slices(fixed, fixed, 2).tolist() == list(range(6))
    assert volume.match_slices(fixed, moving, 2).tolist() == [-1, -1, 0, 1, 2, 3]
    tilted = np.eye(4)
    tilted[:3, :3] = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    other = volume.load_volume(_write(tmp_path / "t.nii", np.zeros((4, 4, 6), np.float32), tilted))
    with pytest.raises(InputError, match="different directions"):
        volume.match_slices(fixed, other, 2)


def test_label_volume_warp_keeps_classes() -> None:
    lab = np.zeros((8, 9, 3), np.uint8)
    lab[2:5, 3:6, :] = 1
    lab[5:7, 3:6, 1] = 3
    zero = np.zeros((8, 9, 3, 3))
    assert np.array_equal(volume.warp_labels_volume(lab, zero), lab)
    shift = zero.copy()
    shift[..., 0] = 1.0                                    # out(p) = lab(p + e_0)
    out = volume.warp_labels_volume(lab, shift)
    assert np.array_equal(out[1:7], lab[2:8]) and set(np.unique(out)) <= {0, 1, 3}
    half = zero.copy()
    half[..., 1] = 0.5
    assert set(np.unique(volume.warp_labels_volume(lab, half))) <= {0, 1, 3}
    assert np.array_equal(volume.warp_volume(lab.astype(np.float32), zero), lab)
    assert (volume.jacobian_determinant_3d(shift) == 1.0).all()


def test_acdc_slicewise_registration_end_to_end(data_dir: Path, engine) -> None:
    """One mid-ventricular slice, a 3x3 box grid: the 3-D path runs, per-class Dice per structure."""
    d = data_dir / ACDC
    fixed_lab = volume.load_volume(d / "fixed_label.nii.gz").array
    moving_lab = volume.load_volume(d / "moving_label.nii.gz").array
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                   # slices with empty correspondences warn
        vr = volume.register_volume(d / "fixed.nii.gz", d / "moving.nii.gz", engine, slices=[5],
                                    points_per_side=3, pred_iou_thresh=0.8)
    assert vr.axis == 2 and vr.registered == [5]
    assert vr.field.shape == (256, 216, 10, 3)
    assert (vr.field[..., 2] == 0).all()                  # same geometry: no through-plane offset
    assert (vr.field[:, :, [0, 1, 2, 3, 4, 6, 7, 8, 9], :] == 0).all()
    for s in vr.slices:
        if s.fixed_index == 5:
            assert s.registration is not None and s.field.shape == (256, 216, 2)
            assert (s.fit is None) == bool(s.note)
    warped = vr.warp_labels(moving_lab)
    assert warped.dtype == moving_lab.dtype and set(np.unique(warped)) <= {0, 1, 2, 3}
    assert np.array_equal(warped[:, :, 0], moving_lab[:, :, 0])        # identity where not registered
    sub = np.s_[:, :, 5]
    after = metrics.dice(fixed_lab[sub], warped[sub], classes=[1, 2, 3])
    before = metrics.dice(fixed_lab[sub], moving_lab[sub], classes=[1, 2, 3])
    print("ACDC slice 5 Dice per class before", before, "after", after)
    assert set(after) == {1, 2, 3} and all(0.0 <= v <= 1.0 for v in after.values())
    assert 0.0 <= vr.folding_ratio() <= 1.0
    assert vr.warp().shape == fixed_lab.shape
