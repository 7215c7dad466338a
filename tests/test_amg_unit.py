"""Automatic mask generation pieces that need no model: prompt grids, logit upscaling, pooling
weights in the padded model frame, and the generator on a scripted decoder."""
from __future__ import annotations

import numpy as np
from numpy._core import multiarray
import pytest
import torch
import torch.nn.functional as F

from samreg_rt import amg
from samreg_rt.engine import ImageEmbedding
from samreg_rt.pages import small_pages
from samreg_rt.pipeline import embedding_weights
from samreg_rt.preprocess import Frame


def test_point_prompts_in_model_frame_with_padding_point():
    frame = Frame((200, 400), (512, 1024), 1024)
    coords, labels = amg.build_prompts(amg.AmgParams(points_per_side=4), frame)
    assert coords.shape == (16, 2, 2) and labels.shape == (16, 2)
    assert np.all(labels[:, 0] == 1) and np.all(labels[:, 1] == -1) and np.all(coords[:, 1] == 0)
    np.testing.assert_allclose(coords[0, 0], [0.125 * 1024, 0.125 * 512])


def test_box_prompts_corners():
    frame = Frame((100, 100), (256, 256), 256)
    coords, labels = amg.build_prompts(amg.AmgParams(prompt_kind="boxes", points_per_side=2, box_sizes=(0.2,)), frame)
    assert coords.shape == (4, 2, 2) and np.all(labels == [2, 3])
    np.testing.assert_allclose(coords[0], [[0.15 * 256, 0.15 * 256], [0.35 * 256, 0.35 * 256]], atol=1e-4)


def test_upscale_matches_sam_postprocess():
    """SAM/HF post_process_masks: bilinear to SxS, crop padding, bilinear to the original size."""
    rng = np.random.default_rng(0)
    low = rng.normal(size=(300, 256, 256)).astype(np.float32)  # more than OpenCV's channel limit
    frame = Frame((216, 256), (864, 1024), 1024)
    ours = amg.upscale_logits(low, frame, (216, 256))
    t = F.interpolate(torch.from_numpy(low)[None], (1024, 1024), mode="bilinear", align_corners=False)
    t = F.interpolate(t[..., :864, :1024], (216, 256), mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(ours, t, atol=1e-4)


def test_area_weights_respect_padding():
    frame = Frame((100, 200), (128, 256), 256)  # bottom half of the model frame is padding
    emb = ImageEmbedding(np.zeros((4, 64, 64), np.float32), frame)
    full = np.ones((1, 100, 200), bool)
    w = embedding_weights(full, emb, "area")
    assert w.shape == (1, 64, 64)
    np.testing.assert_allclose(w[0, :32], 1.0)
    np.testing.assert_allclose(w[0, 32:], 0.0)
    left = np.zeros((1, 100, 200), bool)
    left[:, :, :100] = True
    np.testing.assert_allclose(embedding_weights(left, emb, "area").sum(), 32 * 32, rtol=1e-6)


class _ScriptedEngine:
    """Two-step decoder that returns a disk per prompt whose IoU we choose; counts the prompts upscaled."""

    threads = 0     # the kernels' thread limit amg passes on (Engine.threads)

    def __init__(self, ious, radius=12):
        self.ious = np.asarray(ious, np.float32)
        self.radius = radius
        self.calls = 0
        self.upscaled = 0
        self.seen = []

    def factors_buffer(self, capacity, points):
        return None             # no factored image tokens: decode_tokens returns the "tokens" below

    def prepare(self, embedding):
        return embedding

    def decode_tokens(self, embedding, coords, labels, out=None, mask_outputs=(0, 1, 2, 3), factors=None):
        assert factors is None
        b = len(coords)
        boxes = (labels[:, :1] == 2)[..., None]
        centres = np.where(boxes, coords.mean(axis=1, keepdims=True), coords[:, :1]) * 256 / 1024
        self.seen.extend(centres[:, 0].tolist())
        iou = np.repeat(self.ious[self.calls:self.calls + b, None], 4, axis=1)
        self.calls += b
        centres = centres.astype(np.float32)                             # "image tokens": the disk centre
        return iou, np.ones((b, len(mask_outputs), 1), np.float32), centres

    def decode_masks(self, image_tokens, hyper_in):
        yy, xx = np.mgrid[:256, :256]
        low = np.empty((len(image_tokens), hyper_in.shape[1], 256, 256), np.float32)
        for i, ((cx, cy),) in enumerate(image_tokens):
            low[i] = 10.0 * (self.radius ** 2 - (xx - cx) ** 2 - (yy - cy) ** 2) / self.radius ** 2
        self.upscaled += len(image_tokens)
        return low

    def decode_kept_masks(self, image_tokens, hyper_in, keep, low_rows=256):
        rows = keep.any(axis=1)
        return self.decode_masks(image_tokens[rows], hyper_in[rows])[keep[rows]][:, :low_rows]


def test_generate_filters_and_nms():
    frame = Frame((256, 256), (1024, 1024), 1024)
    emb = ImageEmbedding(np.zeros((256, 64, 64), np.float32), frame)
    params = amg.AmgParams(points_per_side=2, mask_output="single", pred_iou_thresh=0.5,
                           stability_score_thresh=0.5, batch_size=3)
    ious = [0.9, 0.4, 0.95, 0.7]
    engine = _ScriptedEngine(ious)
    out = amg.generate(engine, emb, params)
    assert out.counts["prompts"] == 4 and out.counts["pred_iou"] == 3
    assert engine.upscaled == 3                          # the prompt below the IoU threshold is not upscaled
    assert list(out.prompt_ids) == [2, 0, 3]           # sorted by predicted IoU, disjoint disks
    assert out.masks.shape == (3, 256, 256) and out.masks.dtype == bool
    assert np.all(np.diff(out.iou_preds) <= 0)


@pytest.mark.parametrize("original,resized,size,out_shape", [
    ((216, 256), (216, 256), 256, (216, 256)),        # LiteMedSAM, landscape: 216 of 256 rows
    ((85, 512), (43, 256), 256, (85, 512)),           # a strip: 44 rows
    ((256, 216), (256, 216), 256, (256, 216)),        # portrait: the padding is on the right, all rows read
    ((440, 517), (871, 1024), 1024, (200, 200)),      # ViT at 1024, the reference preset's working grid
    ((200, 200), (1024, 1024), 1024, (200, 200)),     # square
    ((3, 500), (6, 1024), 1024, (3, 500)),            # a row or two of the low-resolution grid
])
def test_low_rows_read(original, resized, size, out_shape):
    """low_rows_read: a multiple of 4 past every row that ``upscale_matrices`` weighs and every row of the resized
    image, and the least such."""
    frame = Frame(original, resized, size)
    ry, _ = amg.upscale_matrices(frame, (256, 256), out_shape)
    image_rows = int(np.ceil(resized[0] * 256 / size))
    n = amg.low_rows_read(ry, image_rows)
    assert n % 4 == 0 and 4 <= n <= 256 and n >= image_rows
    assert not ry[:, n:].any()
    assert n == 4 or ry[:, n - 4:].any() or image_rows > n - 4        # the least
    assert (n == 256) == (image_rows > 252)


def test_coarse_to_fine_order():
    order = amg.coarse_to_fine(8)
    assert sorted(order.tolist()) == list(range(64))
    assert order[:4].tolist() == [0, 4, 32, 36]                        # every 4th row and column
    assert order[4:16].tolist() == [2, 6, 16, 18, 20, 22, 34, 38, 48, 50, 52, 54]   # then every 2nd
    assert amg.coarse_to_fine(1).tolist() == [0]


@pytest.mark.parametrize("kind", ["points", "boxes"])
def test_skip_covered_runs_coarse_first_and_skips_points_inside_kept_masks(kind):
    frame = Frame((256, 256), (1024, 1024), 1024)
    emb = ImageEmbedding(np.zeros((256, 64, 64), np.float32), frame)
    base = dict(prompt_kind=kind, box_sizes=(0.1,), points_per_side=8, mask_output="single",
                pred_iou_thresh=0.5, stability_score_thresh=0.5, batch_size=4)
    full_engine = _ScriptedEngine(np.full(64, 0.9), radius=40)
    full = amg.generate(full_engine, emb, amg.AmgParams(**base))
    assert full.counts["run"] == 64
    engine = _ScriptedEngine(np.full(64, 0.9), radius=40)
    fast = amg.generate(engine, emb, amg.AmgParams(**base, skip_covered=True))
    assert fast.counts["prompts"] == 64 and 4 <= fast.counts["run"] < 64
    grid = amg.amg_utils.point_grid(8) * 256
    centres = np.array(engine.seen)          # disk centres: low-res px = image px here
    assert len(centres) == fast.counts["run"]
    np.testing.assert_allclose(centres[:4], grid[[0, 4, 32, 36]], atol=1e-3)   # the coarse level ran first
    ran = {int(np.argmin(np.hypot(*(grid - c).T))) for c in centres}
    assert len(ran) == len(centres)                                  # no prompt ran twice
    for point in set(range(64)) - ran:            # each one left out lies in the disk of one that ran
        assert np.min(np.hypot(*(grid[sorted(ran)] - grid[point]).T)) < 40
    assert set(fast.prompt_ids.tolist()) <= ran


def _huge_pages() -> bool:
    """numpy's current huge-page setting (read by setting it and setting it back)."""
    previous = multiarray._set_madvise_hugepage(True)
    multiarray._set_madvise_hugepage(previous)
    return previous


@pytest.mark.parametrize("before", [True, False])
def test_small_pages_restores_the_setting(before, monkeypatch):
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    previous = multiarray._set_madvise_hugepage(before)
    try:
        with small_pages():
            assert _huge_pages() is False
        assert _huge_pages() is before
        with pytest.raises(RuntimeError):
            with small_pages():
                raise RuntimeError("inside")
        assert _huge_pages() is before
    finally:
        multiarray._set_madvise_hugepage(previous)


def test_small_pages_leaves_the_users_choice(monkeypatch):
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")     # numpy's own switch, set by the user
    previous = multiarray._set_madvise_hugepage(True)
    try:
        with small_pages():
            assert _huge_pages() is True
    finally:
        multiarray._set_madvise_hugepage(previous)


def test_generate_runs_without_huge_pages(monkeypatch):
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    frame = Frame((256, 256), (1024, 1024), 1024)
    emb = ImageEmbedding(np.zeros((256, 64, 64), np.float32), frame)
    params = amg.AmgParams(points_per_side=2, mask_output="single", pred_iou_thresh=0.5,
                           stability_score_thresh=0.5, batch_size=3)
    seen = []

    class Recording(_ScriptedEngine):
        def decode_kept_masks(self, image_tokens, hyper_in, keep, low_rows=256):
            seen.append(_huge_pages())
            return super().decode_kept_masks(image_tokens, hyper_in, keep, low_rows)

    previous = multiarray._set_madvise_hugepage(True)
    try:
        amg.generate(Recording([0.9, 0.4, 0.95, 0.7]), emb, params)
        assert seen and not any(seen)           # every batch's masks allocated without huge pages
        assert _huge_pages() is True            # and the setting is back after
    finally:
        multiarray._set_madvise_hugepage(previous)
