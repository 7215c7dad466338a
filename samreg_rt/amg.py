"""Automatic mask generation on the decoder graph: a grid of prompts -> filtered masks.

Follows SAM's automatic mask generator and the HuggingFace ``mask-generation`` pipeline that the
reference code runs: predicted-IoU filter, stability score, binarisation at the mask threshold,
box NMS. The encoder is never run here: the caller passes the image's embedding.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from . import _ext, amg_utils, masks as mask_ops
from .engine import Engine, ImageEmbedding
from .pages import small_pages
from .preprocess import Frame
from .spec import ModelSpec

LOW_RES = 256


@dataclass(frozen=True)
class AmgParams:
    """Parameters of automatic mask generation.

    prompt_kind: ``points`` (a points_per_side^2 grid of single foreground points) or ``boxes``
    (boxes of each size in ``box_sizes``, as fractions of the image side, centred on the grid).
    mask_output: ``multimask`` uses SAM's three multimask outputs per prompt, ``single`` the
    single-mask output. stability_on: ``original`` computes the stability score on logits
    upscaled to the working grid (as SAM and the HF pipeline do); ``low_res`` on the 256x256
    logits (cheaper; opt-in). skip_covered (opt-in fast mode, off in both presets): prompts run
    coarse to fine (grid points on every 4th row and column first, then every 2nd, then the
    rest) and a prompt whose grid point lies inside a mask already kept (after the stability
    filter) is not run; its accuracy cost is measured in ``benchmarks/fast_modes.py``.
    """

    prompt_kind: str = "points"
    points_per_side: int = 32
    box_sizes: tuple[float, ...] = (0.1, 0.2, 0.4)
    mask_output: str = "multimask"
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    batch_size: int = 64
    stability_on: str = "original"
    skip_covered: bool = False

    @classmethod
    def from_spec(cls, spec: ModelSpec, **overrides) -> "AmgParams":
        """Defaults of a model: its prompt kind, mask output and thresholds."""
        base = dict(prompt_kind=spec.prompt_kind, mask_output=spec.mask_output,
                    points_per_side=spec.points_per_side, box_sizes=tuple(spec.box_sizes),
                    pred_iou_thresh=spec.pred_iou_thresh,
                    stability_score_thresh=spec.stability_score_thresh,
                    mask_threshold=spec.mask_threshold)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


@dataclass
class MaskSet:
    """Masks of one image on the working grid, sorted by predicted IoU (descending).

    masks: bool (N, H, W). iou_preds, stability: float32 (N,). boxes: float32 (N, 4) xyxy in
    working-grid pixels (inclusive max, as SAM's mask-to-box). prompt_ids: int64 (N,) index of the
    prompt that produced each mask. counts: how many candidates survived each stage.
    """

    masks: np.ndarray
    iou_preds: np.ndarray
    stability: np.ndarray
    boxes: np.ndarray
    prompt_ids: np.ndarray
    counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> "MaskSet":
        """No masks on a working grid of ``shape`` (H, W)."""
        return cls(masks=np.zeros((0, *shape), bool), iou_preds=np.zeros(0, np.float32),
                   stability=np.zeros(0, np.float32), boxes=np.zeros((0, 4), np.float32),
                   prompt_ids=np.zeros(0, np.int64), counts={"prompts": 0, "run": 0, "nms": 0})


def build_prompts(params: AmgParams, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """Prompt grid in model-frame pixels.

    Returns point_coords (B, 2, 2) and point_labels (B, 2): a foreground point plus SAM's padding
    point (label -1) for ``points``; the two corners (labels 2, 3) for ``boxes``. Prompt b sits on
    grid point ``b // prompts_per_point(params)`` of ``amg_utils.point_grid``.
    """
    h, w = frame.original_shape
    if params.prompt_kind == "points":
        pts = amg_utils.point_grid(params.points_per_side) * np.array([w, h])
        coords = np.stack([frame.to_model(pts), np.zeros_like(pts)], axis=1)
        labels = np.tile(np.array([1.0, -1.0]), (len(pts), 1))
    elif params.prompt_kind == "boxes":
        boxes = amg_utils.box_grid(params.points_per_side, params.box_sizes) * np.array([w, h, w, h])
        coords = frame.to_model(boxes.reshape(-1, 2, 2))
        labels = np.tile(np.array([2.0, 3.0]), (len(boxes), 1))
    else:
        raise ValueError(f"prompt_kind {params.prompt_kind!r}: expected 'points' or 'boxes'")
    return coords.astype(np.float32), labels.astype(np.float32)


def prompts_per_point(params: AmgParams) -> int:
    """Prompts on each grid point: 1 for points, one per box size for boxes."""
    return len(params.box_sizes) if params.prompt_kind == "boxes" else 1


def coarse_to_fine(n_per_side: int) -> np.ndarray:
    """Grid-point indices of ``point_grid(n_per_side)`` ordered coarse to fine: the points on
    every 4th row and column, then on every 2nd, then the rest (each level in grid order)."""
    i, j = np.divmod(np.arange(n_per_side * n_per_side), n_per_side)
    level = np.where((i % 4 == 0) & (j % 4 == 0), 0, np.where((i % 2 == 0) & (j % 2 == 0), 1, 2))
    return np.argsort(level, kind="stable")


def _prompt_batches(params: AmgParams, out_shape: tuple[int, int], covered: np.ndarray):
    """Indices of the prompts to run, ``params.batch_size`` at a time (see ``AmgParams.skip_covered``).

    Yields int64 arrays; with ``skip_covered``, each batch leaves out the prompts whose grid point is
    inside ``covered`` (bool, ``out_shape``), which the caller updates between batches."""
    n, per_point = params.points_per_side, prompts_per_point(params)
    if not params.skip_covered:
        total = n * n * per_point
        for start in range(0, total, params.batch_size):
            yield np.arange(start, min(start + params.batch_size, total))
        return
    grid = amg_utils.point_grid(n) * np.array(out_shape[::-1])        # (x, y) on the working grid
    cols = np.clip(grid[:, 0].astype(np.int64), 0, out_shape[1] - 1)
    rows = np.clip(grid[:, 1].astype(np.int64), 0, out_shape[0] - 1)
    pending = deque(coarse_to_fine(n).tolist())
    while pending:
        batch: list[int] = []
        while pending and len(batch) < params.batch_size:
            point = pending.popleft()
            if not covered[rows[point], cols[point]]:
                batch.extend(range(point * per_point, (point + 1) * per_point))
        if batch:
            yield np.asarray(batch, np.int64)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """float64 (n_out, n_in): bilinear resizing of one axis as a matrix (half-pixel centres, edges
    clamped: OpenCV's INTER_LINEAR and torch's ``interpolate(bilinear, align_corners=False)``)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    frac = src - lo
    hi = np.minimum(lo + 1, n_in - 1)
    out = np.zeros((n_out, n_in))
    np.add.at(out, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(out, (np.arange(n_out), hi), frac)
    return out


def upscale_matrices(frame: Frame, low_shape: tuple[int, int], out_shape: tuple[int, int]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """SAM's ``postprocess_masks`` per axis as float32 matrices Ry (H, h) and Rx (W, w): bilinear
    from the low-resolution grid to S x S, crop the padding to the resized image, bilinear to
    ``out_shape`` = (H, W). Both steps are linear, so ``Ry @ low @ Rx.T`` is their composition."""
    s = frame.input_size
    (h, w), (H, W) = frame.resized_shape, out_shape
    ry = bilinear_matrix(h, H) @ bilinear_matrix(low_shape[0], s)[:h]
    rx = bilinear_matrix(w, W) @ bilinear_matrix(low_shape[1], s)[:w]
    return ry.astype(np.float32), rx.astype(np.float32)


def low_rows_read(ry: np.ndarray, image_rows: int) -> int:
    """The low-resolution rows that mask generation upscales: the first n, a multiple of 4, that hold every row
    with a weight in ``ry`` (H, 256) (``upscale_matrices``) and the resized image's first ``image_rows`` (those
    of ``stability_on = "low_res"``); the rest lie in the image's padding (bottom), which nothing reads."""
    weighted = int(np.flatnonzero(ry.any(axis=0)).max(initial=-1)) + 1
    return min(LOW_RES, 4 * -(-max(image_rows, weighted, 1) // 4))


def upscale_logits(low: np.ndarray, frame: Frame, out_shape: tuple[int, int],
                   matrices: tuple[np.ndarray, np.ndarray] | None = None, threads: int = 0) -> np.ndarray:
    """Low-resolution logits (K, 256, 256) -> (K, H, W) float32 on the working grid.

    As SAM's ``postprocess_masks`` (bilinear to S x S, crop the padding, bilinear to ``out_shape``),
    computed as two banded matrix products per mask (``upscale_matrices``, ``_ext.resize_logits``;
    pass the matrices as ``matrices`` to reuse them across calls) instead of through the S x S
    image: equal up to float rounding. threads: at most this many threads (0: the CPUs this process
    may run on).
    """
    ry, rx = matrices or upscale_matrices(frame, low.shape[1:], tuple(out_shape))
    return _ext.resize_logits(np.ascontiguousarray(low, np.float32), ry, rx, threads=threads)


def _stable(stab: np.ndarray, params: AmgParams) -> np.ndarray:
    """bool (K,): the stability scores that pass ``params.stability_score_thresh`` (all when it is 0)."""
    return stab > params.stability_score_thresh if params.stability_score_thresh > 0 else np.ones(len(stab), bool)


def generate(engine: Engine, emb: ImageEmbedding, params: AmgParams,
             out_shape: tuple[int, int] | None = None) -> MaskSet:
    """Run the prompt grid through the decoder and filter the masks.

    emb: the image's embedding (from ``Engine.embed``); out_shape: (H, W) of the working grid
    on which masks are returned (default: the image's own shape). numpy allocates without huge pages
    meanwhile (``pages.small_pages``: each batch's fresh arrays page-fault in faster).
    """
    with small_pages():
        return _generate(engine, emb, params, out_shape)


def _generate(engine: Engine, emb: ImageEmbedding, params: AmgParams,
              out_shape: tuple[int, int] | None) -> MaskSet:
    frame = emb.frame
    out_shape = tuple(out_shape or frame.original_shape)
    coords, labels = build_prompts(params, frame)
    outputs = [1, 2, 3] if params.mask_output == "multimask" else [0]
    valid = (int(np.ceil(frame.resized_shape[0] * LOW_RES / frame.input_size)),
             int(np.ceil(frame.resized_shape[1] * LOW_RES / frame.input_size)))
    ry, rx = upscale_matrices(frame, (LOW_RES, LOW_RES), out_shape)
    low_rows = low_rows_read(ry, valid[0])           # the masks' low-resolution rows outside the padding
    upscaling = (np.ascontiguousarray(ry[:, :low_rows]), rx)
    kept_masks, kept_iou, kept_stab, kept_ids = [], [], [], []
    counts = {"prompts": len(coords), "run": 0, "candidates": 0, "pred_iou": 0, "stability": 0}
    covered = np.zeros(out_shape, bool)
    channels, h, w = emb.embedding.shape
    capacity = min(params.batch_size, len(coords))
    # the image tokens of a batch, in factored form when the kernels take them, else dense: one buffer for
    # every batch
    factors = engine.factors_buffer(capacity, coords.shape[1])
    tokens_buffer = np.empty((capacity, h * w, channels), np.float32) if factors is None else None
    embedding = engine.prepare(emb.embedding)                      # the image-only work, once for every batch
    for batch in _prompt_batches(params, out_shape, covered):
        counts["run"] += len(batch)
        iou, hyper_in, image_tokens = engine.decode_tokens(embedding, coords[batch], labels[batch],
                                                           out=tokens_buffer, mask_outputs=tuple(outputs),
                                                           factors=factors)
        iou = iou[:, outputs]                                          # (b, k)
        counts["candidates"] += iou.size
        keep = iou > params.pred_iou_thresh if params.pred_iou_thresh > 0 else np.ones(iou.shape, bool)
        counts["pred_iou"] += int(keep.sum())
        if not keep.any():
            continue
        # Upscale only the masks left: the mask upscaling is a third of the decoder.
        low = engine.decode_kept_masks(image_tokens, hyper_in, keep, low_rows)   # (m, low_rows, 256)
        iou, ids = iou[keep], np.repeat(batch, len(outputs)).reshape(keep.shape)[keep]
        if params.stability_on == "low_res":       # opt-in: the stability filter before the upscaling
            stab = mask_ops.stability_scores(np.ascontiguousarray(low[:, :valid[0], :valid[1]]),
                                             params.mask_threshold, params.stability_score_offset, engine.threads)
            keep = _stable(stab, params)
            iou, low, ids, stab = iou[keep], low[keep], ids[keep], stab[keep]
        up = upscale_logits(low, frame, out_shape, upscaling, engine.threads)
        if params.stability_on != "low_res":       # SAM's: on the logits upscaled to the working grid
            stab = mask_ops.stability_scores(up, params.mask_threshold, params.stability_score_offset, engine.threads)
            keep = _stable(stab, params)
            iou, up, ids, stab = iou[keep], up[keep], ids[keep], stab[keep]
        counts["stability"] += len(iou)
        binary = up > params.mask_threshold
        if params.skip_covered and len(binary):
            covered |= binary.any(axis=0)
        kept_masks.append(binary)
        kept_iou.append(iou)
        kept_stab.append(stab)
        kept_ids.append(ids)
    masks = np.concatenate(kept_masks) if kept_masks else np.zeros((0, *out_shape), bool)
    iou = np.concatenate(kept_iou).astype(np.float32) if kept_iou else np.zeros(0, np.float32)
    stab = np.concatenate(kept_stab).astype(np.float32) if kept_stab else np.zeros(0, np.float32)
    ids = np.concatenate(kept_ids).astype(np.int64) if kept_ids else np.zeros(0, np.int64)
    boxes = amg_utils.batched_mask_to_box(masks).astype(np.float32)
    order = mask_ops.box_nms(boxes, iou, params.box_nms_thresh)
    counts["nms"] = len(order)
    return MaskSet(masks=masks[order], iou_preds=iou[order], stability=stab[order],
                   boxes=boxes[order], prompt_ids=ids[order], counts=counts)
