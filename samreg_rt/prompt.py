"""Prompt mode (early PromptReg): ROIs prompted in the fixed image -> counterparts in the moving.

As the reference's ``get_prompt_roi``, made deterministic and total:
1. each prompt (a point (x, y) or a box (x0, y0, x1, y1), in fixed-image pixels) goes through the
   decoder on the fixed embedding; the output with the highest predicted IoU is the fixed ROI;
2. its prototype (masked average of the fixed embedding) is compared with every cell of the
   moving embedding; the most similar cell inside the moving image (never the padding) is the
   peak;
3. the moving ROI is the decoder's answer on the moving embedding to up to ``n_points`` points
   drawn without replacement, with a seeded generator, from the pixels of the peak cell (all of
   them when fewer exist), or, for a box prompt, to a box of the same relative size centred on
   the peak.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import amg, roi
from .correspondence import Correspondence, Side
from .engine import Engine, ImageEmbedding
from .errors import InputError
from .masks import pack_masks
from .pipeline import Preset, PRESETS, _as_image, embedding_weights, work_shape, working_image


@dataclass(frozen=True)
class PromptParams:
    """n_points: points drawn in the moving peak region; seed: their generator's seed."""

    n_points: int = 5
    seed: int = 0


def _best_mask(engine: Engine, emb: ImageEmbedding, coords: np.ndarray, labels: np.ndarray,
               shape: tuple[int, int]) -> np.ndarray:
    """The decoder's most confident mask for one prompt, on the working grid, bool (H, W)."""
    iou, low = engine.decode(emb.embedding, coords[None].astype(np.float32), labels[None].astype(np.float32))
    outputs = [1, 2, 3] if engine.spec.mask_output == "multimask" else [0]
    best = outputs[int(np.argmax(iou[0, outputs]))]
    return amg.upscale_logits(low[0, best][None], emb.frame, shape)[0] > engine.spec.mask_threshold


def _prompt_arrays(prompt: np.ndarray, emb: ImageEmbedding) -> tuple[np.ndarray, np.ndarray]:
    if prompt.shape == (2,):
        return np.stack([emb.frame.to_model(prompt), [0.0, 0.0]]), np.array([1.0, -1.0])
    return emb.frame.to_model(prompt.reshape(2, 2)), np.array([2.0, 3.0])


def peak_cell(proto: np.ndarray, emb: ImageEmbedding) -> tuple[int, int]:
    """(row, col) of the embedding cell most similar (cosine) to ``proto``, outside the padding."""
    e = emb.embedding
    g = e.shape[-1]
    valid_h = int(np.ceil(emb.frame.resized_shape[0] * g / emb.frame.input_size))
    valid_w = int(np.ceil(emb.frame.resized_shape[1] * g / emb.frame.input_size))
    cells = e[:, :valid_h, :valid_w].reshape(e.shape[0], -1)
    sim = proto @ cells / (np.linalg.norm(cells, axis=0) * max(np.linalg.norm(proto), 1e-8) + 1e-12)
    r, c = divmod(int(np.argmax(sim)), valid_w)
    return r, c


def register_prompts(fixed, moving, engine: Engine, prompts: list[tuple[float, ...]],
                     preset: str = "default", params: PromptParams = PromptParams()) -> Correspondence:
    """Prompted ROIs in ``fixed`` and their counterparts in ``moving``.

    prompts: points (x, y) or boxes (x0, y0, x1, y1) in fixed-image pixels. Returns a
    correspondence with one pair per prompt (fixed ROI k <-> moving ROI k) and the cosine of
    the two ROIs' prototypes as similarity.
    """
    if preset not in PRESETS:
        raise InputError(f"preset {preset!r}: expected one of {sorted(PRESETS)}")
    p: Preset = PRESETS[preset]
    images = {"fixed": _as_image(fixed, "fixed"), "moving": _as_image(moving, "moving")}
    arrays = {k: working_image(v, p) for k, v in images.items()}
    embs = {k: engine.embed(a, name=images[k].path or k) for k, a in arrays.items()}
    shapes = {k: work_shape(a.shape[:2], p) for k, a in arrays.items()}
    fh, fw = arrays["fixed"].shape[:2]
    mh, mw = arrays["moving"].shape[:2]
    sy, sx = fh / images["fixed"].array.shape[0], fw / images["fixed"].array.shape[1]
    rng = np.random.default_rng(params.seed)
    fixed_rois, moving_rois, sims = [], [], []
    for n, raw in enumerate(prompts):
        prompt = np.asarray(raw, np.float64)
        if prompt.shape not in ((2,), (4,)) or not np.isfinite(prompt).all():
            raise InputError(f"prompt {n}: expected x,y or x0,y0,x1,y1 (finite), got {raw!r}")
        xs, ys = prompt[0::2], prompt[1::2]
        if xs.min() < 0 or ys.min() < 0 or xs.max() > images["fixed"].array.shape[1] or ys.max() > images["fixed"].array.shape[0]:
            raise InputError(f"prompt {n}: {raw!r} lies outside the fixed image "
                             f"({images['fixed'].array.shape[1]}x{images['fixed'].array.shape[0]} px)")
        prompt = prompt * np.tile([sx, sy], len(prompt) // 2)  # into working-image pixels
        coords, labels = _prompt_arrays(prompt, embs["fixed"])
        f_mask = _best_mask(engine, embs["fixed"], coords, labels, shapes["fixed"])
        proto = roi.prototypes(embs["fixed"].embedding, embedding_weights(f_mask[None], embs["fixed"], p.pooling))[0]
        r, c = peak_cell(proto, embs["moving"])
        frame = embs["moving"].frame
        cell = frame.input_size / embs["moving"].embedding.shape[-1]
        y0, y1 = r * cell / frame.scale[0], (r + 1) * cell / frame.scale[0]
        x0, x1 = c * cell / frame.scale[1], (c + 1) * cell / frame.scale[1]
        if prompt.shape == (2,):
            ys_, xs_ = np.mgrid[int(np.floor(y0)):max(int(np.ceil(y1)), int(np.floor(y0)) + 1),
                                int(np.floor(x0)):max(int(np.ceil(x1)), int(np.floor(x0)) + 1)]
            cand = np.stack([xs_.ravel(), ys_.ravel()], 1).astype(np.float64)
            cand = cand[(cand[:, 0] < mw) & (cand[:, 1] < mh)]
            pick = cand[rng.choice(len(cand), size=min(params.n_points, len(cand)), replace=False)]
            m_coords = np.concatenate([frame.to_model(pick), [[0.0, 0.0]]])
            m_labels = np.concatenate([np.ones(len(pick)), [-1.0]])
        else:
            half = (prompt[2:] - prompt[:2]) / 2 * np.array([mw / fw, mh / fh])
            centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
            box = np.clip(np.concatenate([centre - half, centre + half]), 0, [mw, mh, mw, mh])
            m_coords, m_labels = frame.to_model(box.reshape(2, 2)), np.array([2.0, 3.0])
        m_mask = _best_mask(engine, embs["moving"], m_coords, m_labels, shapes["moving"])
        m_proto = roi.prototypes(embs["moving"].embedding, embedding_weights(m_mask[None], embs["moving"], p.pooling))[0]
        sims.append(float(proto @ m_proto / max(np.linalg.norm(proto) * np.linalg.norm(m_proto), 1e-8)))
        fixed_rois.append(f_mask)
        moving_rois.append(m_mask)
    k = len(fixed_rois)
    sides = [Side(masks=pack_masks(np.stack(rois) if rois else np.zeros((0, *shapes[name]), bool)),
                  work_shape=shapes[name], original_shape=images[name].array.shape[:2],
                  spacing=images[name].spacing, path=images[name].path)
             for name, rois in (("fixed", fixed_rois), ("moving", moving_rois))]
    return Correspondence(fixed=sides[0], moving=sides[1], pairs=np.stack([np.arange(k)] * 2, 1).astype(np.int64),
                          similarity=np.array(sims, np.float32),
                          params={"preset": asdict(p), "prompt": {"prompts": [list(map(float, q)) for q in prompts], **asdict(params)}},
                          model={"name": engine.manifest.get("name"), "manifest_sha256": engine.manifest_sha256,
                                 "provider": engine.provider, "precision": engine.precision,
                                 "trained": bool(engine.manifest.get("source", {}).get("trained", True))})
