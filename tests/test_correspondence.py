"""Correspondence data: exact save/load round trip, typed errors, pairs.csv, overlay."""
from __future__ import annotations

import csv
import json
import zipfile

import numpy as np
import pytest

from samreg_rt.correspondence import Correspondence, Side, overlay
from samreg_rt.errors import InputError
from samreg_rt.masks import pack_masks


def _disk(shape, cx, cy, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r ** 2


def _corr():
    fixed = np.stack([_disk((60, 80), 20, 20, 8), _disk((60, 80), 50, 30, 10)])
    moving = np.stack([_disk((30, 40), 26, 15, 5), _disk((30, 40), 10, 10, 4), _disk((30, 40), 30, 25, 3)])
    return Correspondence(
        fixed=Side(pack_masks(fixed), (60, 80), (120, 160), (0.5, 0.5), "f.png"),
        moving=Side(pack_masks(moving), (30, 40), (30, 40), None, "m.png"),
        pairs=np.array([[1, 0], [0, 1]], np.int64), similarity=np.array([0.9, 0.85], np.float32),
        params={"preset": {"name": "default"}}, model={"name": "x", "trained": False})


def test_round_trip_is_exact(tmp_path):
    corr = _corr()
    corr.save(tmp_path / "c.npz")
    back = Correspondence.load(tmp_path / "c.npz")
    for a, b in ((corr.fixed, back.fixed), (corr.moving, back.moving)):
        assert np.array_equal(a.masks, b.masks) and a.masks.dtype == b.masks.dtype
        assert (a.work_shape, a.original_shape, a.spacing, a.path) == (b.work_shape, b.original_shape, b.spacing, b.path)
    assert np.array_equal(corr.pairs, back.pairs) and np.array_equal(corr.similarity, back.similarity)
    assert back.params == corr.params and back.model == corr.model
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temp file left


def test_centroids_in_original_pixels():
    corr = _corr()
    c = corr.fixed.centroids()  # working grid is half the original: (x + 0.5) * 2 - 0.5
    np.testing.assert_allclose(c[0], [20 * 2 + 0.5, 20 * 2 + 0.5], atol=1e-9)
    np.testing.assert_allclose(corr.moving.centroids()[1], [10, 10], atol=1e-9)


def test_pairs_csv(tmp_path):
    corr = _corr()
    corr.write_pairs_csv(tmp_path / "pairs.csv")
    rows = list(csv.DictReader(open(tmp_path / "pairs.csv")))
    assert [r["fixed_id"] for r in rows] == ["1", "0"]
    assert list(rows[0]) == ["fixed_id", "moving_id", "similarity", "fixed_cx", "fixed_cy", "moving_cx", "moving_cy"]
    assert float(rows[1]["moving_cx"]) == pytest.approx(10.0)


def test_wrong_version_and_truncated(tmp_path):
    corr = _corr()
    corr.save(tmp_path / "c.npz")
    data = dict(np.load(tmp_path / "c.npz"))
    meta = json.loads(bytes(data["meta"]).decode())
    meta["format_version"] = 99
    data["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tmp_path / "v.npz", **data)
    with pytest.raises(InputError, match="v.npz.*format_version 99"):
        Correspondence.load(tmp_path / "v.npz")
    raw = (tmp_path / "c.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="t.npz"):
        Correspondence.load(tmp_path / "t.npz")
    with pytest.raises(InputError, match="no such"):
        Correspondence.load(tmp_path / "missing.npz")


def test_pair_index_out_of_range(tmp_path):
    corr = _corr()
    corr.pairs = np.array([[5, 0]], np.int64)
    corr.similarity = np.array([0.9], np.float32)
    with pytest.raises(InputError, match="does not exist"):
        corr.validate()


def test_overlay_colours_pairs_alike():
    corr = _corr()
    fixed = np.zeros((120, 160), np.uint8)
    moving = np.zeros((30, 40, 3), np.uint8)
    img = overlay(corr, fixed, moving, height=120)
    assert img.dtype == np.uint8 and img.shape[0] == 120 and img.shape[2] == 3
    left = img[:, :160]
    right = img[:, 168:]
    # fixed ROI 1 (centre 50,30 on the 60x80 grid -> 100,60 at height 120) pairs with moving ROI 0
    # (centre 26,15 on 30x40 -> 104,60): same colour at both centres
    assert np.array_equal(left[60, 100], right[60, 104]) and left[60, 100].any()
