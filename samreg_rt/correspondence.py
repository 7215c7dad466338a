"""The ROI correspondence as data: paired masks of the two images, saved and loaded exactly."""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from . import masks as mask_ops
from .errors import InputError
from .io import atomic_write

FORMAT_VERSION = 1


@dataclass
class Side:
    """One image of the pair.

    masks: packed ROI masks, uint64 (N, words) (see ``masks.pack_masks``) on the working grid.
    work_shape: (H, W) of the working grid; original_shape: (H, W) of the image file.
    spacing: (row, column) mm per original pixel, or None. path: the image file.
    """

    masks: np.ndarray
    work_shape: tuple[int, int]
    original_shape: tuple[int, int]
    spacing: tuple[float, float] | None = None
    path: str = ""

    def unpacked(self) -> np.ndarray:
        """bool (N, H, W) masks on the working grid."""
        return mask_ops.unpack_masks(self.masks, *self.work_shape)

    def centroids(self) -> np.ndarray:
        """(N, 2) ROI centroids (x, y) in pixels of the original image (pixel centres at integers)."""
        m = self.unpacked()
        out = np.full((len(m), 2), np.nan)
        if len(m) == 0:
            return out
        area = m.sum(axis=(1, 2))
        ys, xs = np.arange(m.shape[1]), np.arange(m.shape[2])
        cy = (m.sum(axis=2) * ys).sum(axis=1) / np.maximum(area, 1)
        cx = (m.sum(axis=1) * xs).sum(axis=1) / np.maximum(area, 1)
        sy = self.original_shape[0] / self.work_shape[0]
        sx = self.original_shape[1] / self.work_shape[1]
        out[:, 0] = (cx + 0.5) * sx - 0.5
        out[:, 1] = (cy + 0.5) * sy - 0.5
        out[area == 0] = np.nan
        return out


@dataclass
class Correspondence:
    """Paired ROIs: ``pairs[k] = (i, j)`` says fixed ROI i corresponds to moving ROI j.

    pairs: int64 (K, 2); similarity: float32 (K,) cosine of the ROI prototypes.
    params: the parameters that produced it; model: name, manifest sha256, provider, trained.
    """

    fixed: Side
    moving: Side
    pairs: np.ndarray
    similarity: np.ndarray
    params: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write a versioned .npz atomically."""
        meta = {"format_version": FORMAT_VERSION, "params": self.params, "model": self.model}
        for name, side in (("fixed", self.fixed), ("moving", self.moving)):
            meta[name] = {"work_shape": list(side.work_shape), "original_shape": list(side.original_shape),
                          "spacing": list(side.spacing) if side.spacing else None, "path": side.path}
        buf = io.BytesIO()
        np.savez_compressed(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                            fixed_masks=self.fixed.masks, moving_masks=self.moving.masks,
                            pairs=self.pairs.astype(np.int64), similarity=self.similarity.astype(np.float32))
        with atomic_write(path) as handle:
            handle.write(buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Correspondence":
        """Read a .npz written by ``save``; ``InputError`` naming the file on any problem."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            meta = json.loads(bytes(data["meta"]).decode())
        except FileNotFoundError:
            raise InputError(f"{path}: no such correspondence file") from None
        except Exception as exc:  # zipfile, json and numpy errors for truncated or foreign files
            raise InputError(f"{path}: not a readable correspondence file ({type(exc).__name__}: {exc})") from None
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise InputError(f"{path}: correspondence format_version {version!r}, this samreg-rt reads {FORMAT_VERSION}")
        try:
            sides = []
            for name in ("fixed", "moving"):
                m = meta[name]
                sides.append(Side(masks=data[f"{name}_masks"], work_shape=tuple(m["work_shape"]),
                                  original_shape=tuple(m["original_shape"]),
                                  spacing=tuple(m["spacing"]) if m["spacing"] else None, path=m["path"]))
            corr = cls(fixed=sides[0], moving=sides[1], pairs=data["pairs"], similarity=data["similarity"],
                       params=meta["params"], model=meta["model"])
        except KeyError as exc:
            raise InputError(f"{path}: correspondence file lacks {exc}") from None
        corr.validate(str(path))
        return corr

    def validate(self, name: str = "correspondence") -> None:
        """Check shapes and that every pair indexes an existing ROI."""
        for side_name, side in (("fixed", self.fixed), ("moving", self.moving)):
            words = -(-side.work_shape[0] * side.work_shape[1] // 64)
            if side.masks.dtype != np.uint64 or side.masks.ndim != 2 or side.masks.shape[1] != words:
                raise InputError(f"{name}: {side_name} masks have shape {side.masks.shape} "
                                 f"dtype {side.masks.dtype}, expected (N, {words}) uint64")
        p = self.pairs
        if p.ndim != 2 or p.shape[1] != 2 or len(self.similarity) != len(p):
            raise InputError(f"{name}: pairs {p.shape} and similarity {self.similarity.shape} do not agree")
        if len(p) and (p.min() < 0 or p[:, 0].max() >= len(self.fixed.masks) or p[:, 1].max() >= len(self.moving.masks)):
            raise InputError(f"{name}: a pair indexes a ROI that does not exist")

    def write_pairs_csv(self, path: str | os.PathLike) -> None:
        """pairs.csv: fixed_id, moving_id, similarity, centroids (px of the original images)."""
        fc, mc = self.fixed.centroids(), self.moving.centroids()
        with atomic_write(path, "w") as handle:
            w = csv.writer(handle)
            w.writerow(["fixed_id", "moving_id", "similarity", "fixed_cx", "fixed_cy", "moving_cx", "moving_cy"])
            for (i, j), s in zip(self.pairs, self.similarity):
                w.writerow([int(i), int(j), f"{float(s):.6f}", f"{fc[i, 0]:.3f}", f"{fc[i, 1]:.3f}",
                            f"{mc[j, 0]:.3f}", f"{mc[j, 1]:.3f}"])


def _palette(k: int) -> np.ndarray:
    hues = (np.arange(k) * 180 * 0.618034) % 180
    hsv = np.stack([hues, np.full(k, 220), np.full(k, 255)], axis=1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0] if k else np.zeros((0, 3), np.uint8)


def _to_rgb8(image: np.ndarray) -> np.ndarray:
    x = image.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    x = x.astype(np.uint8)
    return np.repeat(x[:, :, None], 3, axis=2) if x.ndim == 2 else x


def overlay(corr: Correspondence, fixed_image: np.ndarray, moving_image: np.ndarray,
            height: int = 400) -> np.ndarray:
    """Fixed and moving image side by side, each paired ROI filled in the same colour on both.

    Returns an RGB uint8 image of the given height.
    """
    colours = _palette(len(corr.pairs))
    panels = []
    for side, image, col in ((corr.fixed, fixed_image, 0), (corr.moving, moving_image, 1)):
        rgb = cv2.resize(_to_rgb8(image), (side.work_shape[1], side.work_shape[0]), interpolation=cv2.INTER_AREA)
        masks = side.unpacked()
        paint = rgb.astype(np.float32)
        for k, pair in enumerate(corr.pairs):
            m = masks[pair[col]]
            paint[m] = 0.45 * paint[m] + 0.55 * colours[k]
        panel = paint.astype(np.uint8)
        for k, pair in enumerate(corr.pairs):
            contours, _ = cv2.findContours(masks[pair[col]].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(panel, contours, -1, tuple(int(c) for c in colours[k]), 1)
        scale = height / panel.shape[0]
        panels.append(cv2.resize(panel, (max(1, round(panel.shape[1] * scale)), height), interpolation=cv2.INTER_NEAREST))
    gap = np.full((height, 8, 3), 255, np.uint8)
    return np.concatenate([panels[0], gap, panels[1]], axis=1)


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG atomically."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise InputError(f"{path}: could not encode PNG")
    with atomic_write(path) as handle:
        handle.write(buf.tobytes())
