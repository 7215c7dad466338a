"""Numpy helpers of SAM's automatic mask generator (``segment_anything.utils.amg``).

Prompt grids are in normalised image coordinates: x = column, y = row, both in [0, 1]; multiply
by the frame's width and height to get pixels. Boxes are ``(x1, y1, x2, y2)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from samreg_rt import masks as _masks


def point_grid(n_per_side: int) -> np.ndarray:
    """``float64[n*n, 2]`` points ``(x, y)`` at ``((i + 0.5) / n, (j + 0.5) / n)``.

    Identical to SAM's ``build_point_grid``: x varies fastest (row-major over the grid).
    """
    if n_per_side < 1:
        raise ValueError(f"n_per_side must be >= 1, got {n_per_side}")
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def box_grid(n_per_side: int, sizes: Sequence[float]) -> np.ndarray:
    """``float64[n*n*len(sizes), 4]`` boxes ``(x1, y1, x2, y2)`` centred on ``point_grid(n)``.

    ``sizes`` are box side lengths as fractions of the image side (a size ``s`` box spans
    ``s * W`` by ``s * H`` pixels before clipping). Boxes are clipped to [0, 1]. Row
    ``c * len(sizes) + k`` is the box of size ``sizes[k]`` around grid point ``c``.
    """
    sizes_arr = np.asarray(sizes, dtype=np.float64).reshape(-1)
    if sizes_arr.size == 0 or np.any(~(sizes_arr > 0)):
        raise ValueError(f"sizes must be a non-empty list of positive fractions, got {sizes!r}")
    centres = point_grid(n_per_side)
    half = np.repeat(sizes_arr[None, :] / 2, len(centres), axis=0).reshape(-1, 1)
    c = np.repeat(centres, len(sizes_arr), axis=0)
    boxes = np.concatenate([c - half, c + half], axis=1)
    return np.clip(boxes, 0.0, 1.0)


def stability_scores(logits: np.ndarray, mask_threshold: float = 0.0, offset: float = 1.0
                     ) -> np.ndarray:
    """SAM's stability score of ``float32[N, H, W]`` logits: ``float32[N]`` (NaN for masks empty at
    ``mask_threshold - offset``). See :func:`samreg_rt.masks.stability_scores`."""
    return _masks.stability_scores(logits, mask_threshold, offset)


def batched_mask_to_box(masks: np.ndarray) -> np.ndarray:
    """Tight ``(x1, y1, x2, y2)`` boxes, inclusive pixel indices, of ``bool[..., H, W]`` masks.

    Returns ``int64[..., 4]``; an empty mask gives ``[0, 0, 0, 0]`` (SAM's ``batched_mask_to_box``).
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim < 2:
        raise ValueError(f"masks: expected shape (..., H, W), got {masks.shape}")
    out = np.zeros(masks.shape[:-2] + (4,), dtype=np.int64)
    if masks.size == 0:
        return out
    h, w = masks.shape[-2:]
    rows = masks.any(axis=-1)
    cols = masks.any(axis=-2)
    out[..., 0] = np.argmax(cols, axis=-1)
    out[..., 1] = np.argmax(rows, axis=-1)
    out[..., 2] = w - 1 - np.argmax(cols[..., ::-1], axis=-1)
    out[..., 3] = h - 1 - np.argmax(rows[..., ::-1], axis=-1)
    out[~rows.any(axis=-1)] = 0
    return out


def mask_to_rle(masks: np.ndarray) -> list[dict[str, Any]]:
    """Uncompressed COCO RLE of ``bool[N, H, W]`` masks, as SAM's ``mask_to_rle_pytorch``.

    Each entry is ``{"size": [H, W], "counts": [...]}``; counts run over the column-major
    (Fortran-order) pixels and start with a run of zeros (``0`` when the first pixel is set).
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks: expected shape (N, H, W), got {masks.shape}")
    n, h, w = masks.shape
    flat = masks.transpose(0, 2, 1).reshape(n, h * w)
    out = []
    for m in flat:
        if m.size == 0:
            out.append({"size": [h, w], "counts": []})
            continue
        change = np.flatnonzero(m[1:] != m[:-1]) + 1
        bounds = np.concatenate([[0], change, [h * w]])
        counts = [] if not m[0] else [0]
        counts.extend(np.diff(bounds).tolist())
        out.append({"size": [h, w], "counts": counts})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Decode an uncompressed RLE (see :func:`mask_to_rle`) into a ``bool[H, W]`` mask."""
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if np.any(counts < 0) or counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())} (or are negative) for a "
                         f"{h}x{w} mask")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(w, h).T.copy()


def area_from_rle(rle: dict[str, Any]) -> int:
    """Pixel count of an uncompressed RLE mask."""
    return int(sum(rle["counts"][1::2]))
