"""Parity of exported graphs against the PyTorch model they came from.

The reference is Meta's own code path (``image_encoder``; ``prompt_encoder`` + ``mask_decoder
.predict_masks``), not the export wrapper, so the figures also check the wrapper. Figures per
precision (all against PyTorch fp32):

- ``encoder``: ``max_abs`` and ``cosine`` of the image embedding;
- ``decoder``: the graph fed the PyTorch embedding, for 64 point prompts (one foreground point +
  SAM's padding point) and 64 box prompts: ``iou_max_abs``, ``mask_max_abs`` (low-res logits),
  ``mask_cosine``, and ``mask_iou_mean`` / ``mask_iou_min``: IoU of the masks binarised at 0
  over all prompts x 4 mask outputs (both empty counts as 1);
- ``decoder_split``: the same figures for ``decoder_tokens`` + ``decoder_masks`` (the decoder split
  at the mask upscaling, which the runtime's mask generation uses) run one after the other;
- ``end_to_end`` (fp16 and int8 only; for fp32 it equals ``decoder`` up to float rounding): the
  same mask IoUs with the graph's own encoder embedding as decoder input.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from samreg_rt.spec import ModelSpec
from samreg_rt.split_encoder import run_encoder_parts

PROMPT_COUNT = 64
CHUNK = 16  # prompts per decoder call: bounds the memory of B x 32 x 256 x 256 upscaling buffers


def synthetic_image(size: int = 512, seed: int = 0) -> np.ndarray:
    """Deterministic grey phantom [size, size, 3] uint8: smooth background, 12 ellipses, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = 40 + 50 * xx + 30 * yy
    for _ in range(12):
        cy, cx = rng.uniform(0.1, 0.9, 2)
        ry, rx = rng.uniform(0.04, 0.25, 2)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        image[inside] = rng.uniform(0, 255)
    image = cv2.GaussianBlur(image, (0, 0), 2.0) + rng.normal(0, 4, image.shape)
    return np.repeat(np.clip(image, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def model_input(image: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """HxW or HxWxC (C = 1, 3 or 4) image -> normalised float32 [1, 3, S, S] per the model spec
    (resize-longest-side + zero padding bottom/right after normalising, or stretch)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[..., None]
    image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3]
    size = spec.input_size
    h, w = image.shape[:2]
    if spec.resize == "stretch":
        new_h, new_w = size, size
    else:
        scale = size / max(h, w)
        new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    if spec.normalization == "imagenet":
        image = (image - np.float32(spec.pixel_mean)) / np.float32(spec.pixel_std)
    elif spec.normalization == "minmax":
        image = (image - image.min()) / max(float(image.max() - image.min()), 1e-8)
    elif image.max() > 1.0:
        image = image / 255.0
    out = np.zeros((1, 3, size, size), np.float32)
    out[0, :, :new_h, :new_w] = image.transpose(2, 0, 1)
    return out


def point_prompts(count: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` single foreground points + SAM's padding point: coords [count,2,2], labels [count,2]."""
    rng = np.random.default_rng(seed)
    coords = np.zeros((count, 2, 2), np.float32)
    coords[:, 0] = rng.uniform(0, size - 1, (count, 2))
    labels = np.tile(np.float32([1, -1]), (count, 1))
    return coords, labels


def box_prompts(count: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` boxes as corner pairs labelled 2, 3: coords [count,2,2], labels [count,2]."""
    rng = np.random.default_rng(seed + 1)
    a, b = rng.uniform(0, size - 1, (2, count, 2))
    coords = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1).astype(np.float32)
    labels = np.tile(np.float32([2, 3]), (count, 1))
    return coords, labels


@torch.no_grad()
def torch_embedding(sam: nn.Module, image: np.ndarray) -> np.ndarray:
    """PyTorch image encoder: [1,3,S,S] -> [1,C,h,w]."""
    return sam.image_encoder(torch.from_numpy(image)).numpy()


@torch.no_grad()
def torch_decoder(
    sam: nn.Module, embedding: np.ndarray, coords: np.ndarray, labels: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """Meta's prompt path on prompts made by ``point_prompts`` (kind "points", whose last point is
    the padding SAM adds itself) or ``box_prompts`` ("boxes"): -> iou [B,4], low-res logits [B,4,H,W]."""
    pe = sam.prompt_encoder
    ious, masks = [], []
    for start in range(0, len(coords), CHUNK):
        c, l = coords[start : start + CHUNK], labels[start : start + CHUNK]
        if kind == "points":
            sparse, dense = pe(points=(torch.from_numpy(c[:, :-1]), torch.from_numpy(l[:, :-1])), boxes=None, masks=None)
        else:
            sparse, dense = pe(points=None, boxes=torch.from_numpy(c.reshape(-1, 4)), masks=None)
        m, iou = sam.mask_decoder.predict_masks(
            image_embeddings=torch.from_numpy(embedding), image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        )
        ious.append(iou.numpy())
        masks.append(m.numpy())
    return np.concatenate(ious), np.concatenate(masks)


def onnx_decoder(
    decoder: ort.InferenceSession, embedding: np.ndarray, coords: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The decoder graph on [B,N,2] / [B,N] prompts in chunks: -> iou [B,4], logits [B,4,H,W]."""
    outputs = [
        decoder.run(None, {"image_embeddings": embedding, "point_coords": coords[start : start + CHUNK],
                           "point_labels": labels[start : start + CHUNK]})
        for start in range(0, len(coords), CHUNK)
    ]
    return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])


def onnx_split_decoder(
    tokens: ort.InferenceSession, masks: ort.InferenceSession, embedding: np.ndarray, coords: np.ndarray,
    labels: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """``decoder_tokens`` then ``decoder_masks`` on [B,N,2] / [B,N] prompts: -> iou [B,4], logits [B,4,H,W]."""
    ious, logits = [], []
    for start in range(0, len(coords), CHUNK):
        iou, hyper_in, image_tokens = tokens.run(None, {
            "image_embeddings": embedding, "point_coords": coords[start : start + CHUNK],
            "point_labels": labels[start : start + CHUNK]})
        ious.append(iou)
        logits.append(masks.run(None, {"image_tokens": image_tokens, "hyper_in": hyper_in})[0])
    return np.concatenate(ious), np.concatenate(logits)


def run_decoder(section: str, paths: dict[str, Path], embedding: np.ndarray, coords: np.ndarray,
                labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``decoder`` (one graph) or ``decoder_split`` (tokens + masks graphs) of ``paths`` on prompts."""
    if section == "decoder":
        return onnx_decoder(session(paths["decoder"]), embedding, coords, labels)
    return onnx_split_decoder(session(paths["decoder_tokens"]), session(paths["decoder_masks"]), embedding, coords, labels)


def decoder_figures(ref_iou: np.ndarray, ref_masks: np.ndarray, iou: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Figures of one decoder output against PyTorch's (see the module docstring)."""
    ious = mask_iou(ref_masks, masks)
    return {
        "iou_max_abs": max_abs(ref_iou, iou),
        "mask_max_abs": max_abs(ref_masks, masks),
        "mask_cosine": cosine(ref_masks, masks),
        "mask_iou_mean": float(ious.mean()),
        "mask_iou_min": float(ious.min()),
    }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def mask_iou(reference: np.ndarray, other: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """IoU per mask of logits [..., H, W] binarised at ``threshold``; 1 where both are empty."""
    a, b = reference > threshold, other > threshold
    inter = (a & b).sum(axis=(-2, -1))
    union = (a | b).sum(axis=(-2, -1))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    """CPU ONNX Runtime session (``threads`` 0: ORT's default) without the memory arena, so that
    memory goes back after each run (ViT-B's global attention maps are 0.8 GB each)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(
    sam: nn.Module,
    graphs: dict[str, dict[str, Path]],
    image: np.ndarray,
    prompt_count: int = PROMPT_COUNT,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Parity figures per precision for ``graphs`` = {precision: {graph role: path}} (encoder, decoder,
    decoder_tokens, decoder_masks)
    on one normalised image [1,3,S,S] (see the module docstring for the keys)."""
    size = image.shape[-1]
    reference_embedding = torch_embedding(sam, image)
    prompts = {"points": point_prompts(prompt_count, size, seed), "boxes": box_prompts(prompt_count, size, seed)}
    reference = {kind: torch_decoder(sam, reference_embedding, *p, kind) for kind, p in prompts.items()}
    results: dict[str, dict[str, Any]] = {}
    shared: dict[Path, dict[str, Any]] = {}  # precisions sharing a decoder file share its figures
    for precision, paths in graphs.items():
        embedding = session(paths["encoder"]).run(None, {"image": image})[0]
        entry: dict[str, Any] = {
            "encoder": {"max_abs": max_abs(reference_embedding, embedding), "cosine": cosine(reference_embedding, embedding)},
        }
        parts = [paths[f"encoder_part{i}"] for i in range(len(paths)) if f"encoder_part{i}" in paths]
        if parts:      # the encoder cut at its global attention, the cores in the native kernel
            embedding = run_encoder_parts([session(path) for path in parts], image)
            entry["encoder_parts"] = {"max_abs": max_abs(reference_embedding, embedding),
                                      "cosine": cosine(reference_embedding, embedding)}
        for section, key in (("decoder", "decoder"), ("decoder_split", "decoder_tokens")):
            known = shared.get(Path(paths[key]))
            entry[section] = dict(known or {})
            for kind, (coords, labels) in prompts.items():
                if known is None:
                    outputs = run_decoder(section, paths, reference_embedding, coords, labels)
                    entry[section][kind] = decoder_figures(*reference[kind], *outputs)
                if precision != "fp32" and section == "decoder":
                    _, masks = run_decoder(section, paths, embedding, coords, labels)
                    ious = mask_iou(reference[kind][1], masks)
                    entry.setdefault("end_to_end", {})[kind] = {
                        "mask_iou_mean": float(ious.mean()), "mask_iou_min": float(ious.min())}
            shared[Path(paths[key])] = entry[section]
        results[precision] = entry
    return results


# Documented parity bounds, each against PyTorch fp32. Keys are "<section>_<figure>" with section
# encoder, decoder or end_to_end (decoder and end_to_end bounds hold for both prompt kinds);
# "*_max_abs" are upper bounds, all others lower bounds. fp32 must match PyTorch up to float
# rounding. fp16 and int8 are held to the embedding direction and to what the runtime uses, the
# binarised masks. The int8 variant's decoder is the fp32 graph (quantize.CONVERTED_GRAPHS); its
# end-to-end bound is low because LiteMedSAM, box-trained, answers point prompts with masks of a
# few hundred pixels, whose IoU moves with every boundary pixel (0.80 measured; boxes 0.95).
BOUNDS: dict[str, dict[str, float]] = {
    "fp32": {"encoder_max_abs": 1e-3, "encoder_cosine": 0.9999, "encoder_parts_max_abs": 1e-3,
             "encoder_parts_cosine": 0.9999, "decoder_iou_max_abs": 1e-3,
             "decoder_mask_max_abs": 1e-3, "decoder_mask_cosine": 0.9999, "decoder_mask_iou_mean": 0.999,
             "decoder_split_iou_max_abs": 1e-3, "decoder_split_mask_max_abs": 1e-3,
             "decoder_split_mask_cosine": 0.9999, "decoder_split_mask_iou_mean": 0.999},
    "fp16": {"encoder_cosine": 0.9999, "decoder_mask_cosine": 0.9999, "decoder_mask_iou_mean": 0.95,
             "decoder_split_mask_cosine": 0.9999, "decoder_split_mask_iou_mean": 0.95,
             "end_to_end_mask_iou_mean": 0.95},
    "int8": {"encoder_cosine": 0.99, "encoder_parts_cosine": 0.99, "decoder_mask_cosine": 0.9999, "decoder_mask_iou_mean": 0.999,
             "decoder_split_mask_cosine": 0.9999, "decoder_split_mask_iou_mean": 0.999,
             "end_to_end_mask_iou_mean": 0.75},
}
SECTIONS = ("end_to_end", "encoder_parts", "encoder", "decoder_split", "decoder")  # longest prefix first


def check_bounds(precision: str, figures: dict[str, Any]) -> list[str]:
    """Descriptions of the ``BOUNDS[precision]`` that ``figures`` (one precision of ``measure``) miss."""
    failures = []
    for key, bound in BOUNDS[precision].items():
        section, figure = next((s, key.removeprefix(s + "_")) for s in SECTIONS if key.startswith(s + "_"))
        if section == "encoder_parts" and section not in figures:    # only ViT encoders have them
            continue
        if section in ("encoder", "encoder_parts"):
            values = {section: figures[section][figure]}
        else:
            values = {f"{section}.{kind}": f[figure] for kind, f in figures[section].items()}
        upper = figure.endswith("max_abs")
        for where, value in values.items():
            if (value > bound) if upper else (value < bound):
                failures.append(f"{where} {figure} {value:.6g} {'>' if upper else '<'} {bound:g}")
    return failures


def setup_description(image: str, seed: int, prompt_count: int = PROMPT_COUNT) -> dict[str, Any]:
    """How ``measure`` was run, for the manifest."""
    return {
        "reference": f"PyTorch {torch.__version__} fp32 on CPU (image_encoder; prompt_encoder + mask_decoder.predict_masks)",
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "image": image,
        "prompts": {"points": prompt_count, "boxes": prompt_count, "seed": seed},
        "bounds": BOUNDS,
        "note": "fp16 graphs measured on the CPU execution provider, which runs nodes without a float16 "
                "kernel in float32 between casts; CUDA/TensorRT compute in float16 throughout",
    }
