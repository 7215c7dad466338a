"""One pair of images -> ROI correspondence: the SAMReg pipeline, top-down in ``register``."""
from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
from threadpoolctl import threadpool_limits

from . import amg, masks as mask_ops, match, roi
from .correspondence import Correspondence, Side
from .engine import Engine, ImageEmbedding
from .errors import InputError
from .io import Image, load_image, validate_image

log = logging.getLogger("samreg_rt")


@dataclass(frozen=True)
class Preset:
    """How ROIs are filtered, embedded and paired.

    squash: when set, both images are resized to squash x squash (aspect ratio lost) before
    anything else, as the reference does (Pillow bicubic); otherwise images keep their shape and
    the working grid is the image scaled so its longest side is at most ``max_side``.
    area_min/area_max: ROI area limits, in pixels of the working grid (``area_unit="px"``) or as
    fractions of its area (``"fraction"``). pooling: ``nearest`` (reference: the mask resized to
    the embedding grid with nearest neighbour) or ``area`` (exact area weights in the model frame,
    padding aware). strategy/threshold/geometry/num_pairs: see ``match.pair``; the geometric check's
    RANSAC inlier distance is ``reproj_frac`` of the moving image's diagonal; ``min_support``: fewer
    geometrically consistent pairs than this leave no pair (``match.pair``). check_similarity: a
    dense field fitted to the pairs is replaced by the identity when it lowers the images' intensity
    NCC (``ddf.similarity_check``; same-modality pairs).
    """

    name: str
    squash: int | None
    max_side: int
    area_min: float
    area_max: float
    area_unit: str
    dedup_thresh: float
    pooling: str
    strategy: str
    threshold: float
    geometry: str | None
    num_pairs: int = 0
    reproj_frac: float = 0.05
    min_support: int = 1
    check_similarity: bool = False


PRESETS = {
    "reference": Preset("reference", squash=200, max_side=200, area_min=200, area_max=7000, area_unit="px",
                        dedup_thresh=0.9, pooling="nearest", strategy="greedy", threshold=0.8, geometry=None),
    "default": Preset("default", squash=None, max_side=512, area_min=0.005, area_max=0.175,
                      area_unit="fraction", dedup_thresh=0.9, pooling="area", strategy="mutual_nn",
                      threshold=0.5, geometry="similarity", min_support=2, check_similarity=True),
}


@dataclass
class Registration:
    """Result of ``register``: the correspondence plus what it took to get it.

    timings: seconds per stage; counts: masks per stage per image and pairs; match: the pairing
    step's result (which pairs each step dropped).
    """

    correspondence: Correspondence
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, object] = field(default_factory=dict)
    match: match.MatchResult | None = None


def working_image(image: Image, preset: Preset) -> np.ndarray:
    """The array the encoder sees: the image itself, or the reference's squashed RGB copy."""
    if preset.squash is None:
        return image.array
    from PIL import Image as PILImage

    rgb = image.array
    if rgb.dtype != np.uint8:
        lo, hi = float(rgb.min()), float(rgb.max())
        rgb = ((rgb.astype(np.float64) - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros(rgb.shape)).round()
        rgb = rgb.astype(np.uint8)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    pil = PILImage.fromarray(rgb).resize((preset.squash, preset.squash), PILImage.Resampling.BICUBIC)
    return np.asarray(pil)


def work_shape(shape: tuple[int, int], preset: Preset) -> tuple[int, int]:
    """(H, W) of the working grid for an image of ``shape`` (after squashing, if any)."""
    h, w = shape
    scale = min(1.0, preset.max_side / max(h, w))
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def embedding_weights(masks: np.ndarray, emb: ImageEmbedding, pooling: str) -> np.ndarray:
    """ROI masks on the working grid (N, H, W) -> weights on the embedding grid (N, g, g).

    ``nearest``: the reference's ``cv2.resize(mask, (g, g), INTER_NEAREST)`` of the working-grid
    mask, exact when the model frame has no padding (square images). ``area``: the mask is placed
    in the model frame (resized to the image's resized shape, zero padding bottom/right) and each
    embedding cell gets the fraction of its footprint that the mask covers.
    """
    g = emb.embedding.shape[-1]
    if pooling == "nearest":
        return roi.downsample_nearest(masks, (g, g))
    frame = emb.frame
    s, (h, w) = frame.input_size, frame.resized_shape
    out = np.zeros((len(masks), g, g), np.float32)
    for k, m in enumerate(masks):
        canvas = np.zeros((s, s), np.float32)
        interp = cv2.INTER_AREA if h * w <= m.size else cv2.INTER_LINEAR
        canvas[:h, :w] = cv2.resize(m.astype(np.float32), (w, h), interpolation=interp)
        out[k] = canvas.reshape(g, s // g, g, s // g).mean(axis=(1, 3))
    return out


def _as_image(item: Image | np.ndarray | str | os.PathLike, name: str) -> Image:
    if isinstance(item, Image):
        return item
    if isinstance(item, np.ndarray):
        return Image(array=validate_image(item, name), spacing=None, path="")
    return load_image(item)


def keep_rois(packed: np.ndarray, preset: Preset, shape: tuple[int, int]) -> np.ndarray:
    """Indices of the masks (packed, on a working grid of ``shape`` (H, W)) that the preset keeps as
    ROIs: its area filter (pixels, or fractions of the grid) and near-containment dedup."""
    scale = 1.0 if preset.area_unit == "px" else shape[0] * shape[1]
    return roi.select_rois(packed, preset.area_min * scale, preset.area_max * scale, preset.dedup_thresh)


def pair_rois(protos: dict[str, np.ndarray], centres: dict[str, np.ndarray], preset: Preset,
              moving_shape: tuple[int, int]) -> match.MatchResult:
    """The preset's pairing of the fixed and moving ROIs: cosine similarity of their prototypes
    (``protos[side]`` float32 (N, C)), the assignment strategy, and with ``preset.geometry`` the
    consistency check on their centroids (``centres[side]`` (N, 2) px) at a reprojection threshold
    of ``preset.reproj_frac`` of the moving image's diagonal (``moving_shape`` (H, W) px)."""
    sim = match.cosine_matrix(protos["fixed"], protos["moving"])
    return match.pair(sim, threshold=preset.threshold, strategy=preset.strategy, num_pairs=preset.num_pairs,
                      fixed_xy=centres["fixed"] if preset.geometry else None,
                      moving_xy=centres["moving"] if preset.geometry else None, geometry=preset.geometry,
                      reproj_thresh=preset.reproj_frac * float(np.hypot(*moving_shape)),
                      min_support=preset.min_support)


def register(fixed: Image | np.ndarray | str | os.PathLike, moving: Image | np.ndarray | str | os.PathLike,
             engine: Engine, preset: str = "default", **amg_overrides) -> Registration:
    """Register ``moving`` to ``fixed`` by ROI correspondence.

    fixed, moving: image paths, ``io.Image`` or arrays (HxW or HxWxC). engine: a loaded
    ``Engine``. preset: ``default`` or ``reference`` (see ``PRESETS``). amg_overrides: fields of
    ``amg.AmgParams`` (e.g. points_per_side, pred_iou_thresh, prompt_kind); the model spec gives
    the rest. Returns a ``Registration`` whose correspondence maps fixed ROIs to moving ROIs.

    The BLAS and OpenMP pools it uses (numpy, FAISS) are limited to ``engine.threads``, as the engine's
    own sessions and kernels are.
    """
    with threadpool_limits(engine.threads):
        return _register(fixed, moving, engine, preset, amg_overrides)


def _register(fixed: Image | np.ndarray | str | os.PathLike, moving: Image | np.ndarray | str | os.PathLike,
              engine: Engine, preset: str, amg_overrides: dict) -> Registration:
    if preset not in PRESETS:
        raise InputError(f"preset {preset!r}: expected one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    params = amg.AmgParams.from_spec(engine.spec, **amg_overrides)
    timings: dict[str, float] = {}
    counts: dict[str, object] = {}
    images = {"fixed": _as_image(fixed, "fixed"), "moving": _as_image(moving, "moving")}
    if (images["fixed"].array.ndim == 3) != (images["moving"].array.ndim == 3):
        log.info("fixed and moving differ in colour (one grey, one RGB); both are fed as 3 channels")

    sides, protos, centres = {}, {}, {}
    for name, image in images.items():
        t = time.perf_counter()
        array = working_image(image, p)
        emb = engine.embed(array, name=image.path or name)
        timings[f"encode_{name}"] = time.perf_counter() - t

        t = time.perf_counter()
        shape = work_shape(array.shape[:2], p)
        if float(array.min()) == float(array.max()):
            # SAM still "segments" a constant image (box-shaped masks from a box grid): no ROI there
            warnings.warn(f"{image.path or name}: constant image, no structure to segment", stacklevel=2)
            masks = amg.MaskSet.empty(shape)
        else:
            masks = amg.generate(engine, emb, params, out_shape=shape)
        timings[f"amg_{name}"] = time.perf_counter() - t

        t = time.perf_counter()
        packed = mask_ops.pack_masks(np.ascontiguousarray(masks.masks))
        kept = keep_rois(packed, p, shape)
        rois = masks.masks[kept]
        timings[f"filter_{name}"] = time.perf_counter() - t

        t = time.perf_counter()
        protos[name] = roi.prototypes(emb.embedding, embedding_weights(rois, emb, p.pooling))
        side = Side(masks=packed[kept], work_shape=shape, original_shape=image.array.shape[:2],
                    spacing=image.spacing, path=image.path)
        centres[name] = side.centroids()
        sides[name] = side
        timings[f"embed_rois_{name}"] = time.perf_counter() - t
        counts[name] = {**masks.counts, "rois": int(len(kept))}

    t = time.perf_counter()
    result = pair_rois(protos, centres, p, images["moving"].array.shape[:2])
    timings["match"] = time.perf_counter() - t
    counts["pairs"] = int(len(result.pairs))
    counts["dropped"] = {k: int(len(v)) for k, v in result.dropped.items()}
    if counts["fixed"]["rois"] == 0 or counts["moving"]["rois"] == 0:
        warnings.warn(f"no ROI survived the filters (fixed {counts['fixed']['rois']}, moving "
                      f"{counts['moving']['rois']}): the correspondence is empty", stacklevel=2)

    corr = Correspondence(
        fixed=sides["fixed"], moving=sides["moving"], pairs=result.pairs, similarity=result.similarity,
        params={"preset": asdict(p), "amg": asdict(params)},
        model={"name": engine.manifest.get("name"), "manifest_sha256": engine.manifest_sha256,
               "provider": engine.provider, "precision": engine.precision,
               "trained": bool(engine.manifest.get("source", {}).get("trained", True))},
    )
    return Registration(correspondence=corr, timings=timings, counts=counts, match=result)
