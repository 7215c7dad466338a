"""The SAMReg reference, run on HuggingFace transformers' own SamModel and mask-generation pipeline.

Runs in the reference venv (torch 2.14.1, torchvision 0.29.1, transformers 4.57.6: the pipeline
needs torchvision's NMS), not in samreg-rt's. Written from the reference code's algorithm
(shared/design/reference-algorithm.md sections 1-3): pipeline("mask-generation") with the given
point grid, thresholds and mask threshold, `_mask_criteria` (area 200..7000 px, near-containment
dedup at 0.9), `_roi_proto` (nearest 64x64 mask, NaN-trick masked mean), torch cosine similarity,
greedy matching at 0.8.

Image embeddings are injected (the test's model has real decoder weights but no real encoder), by
replacing `model.get_image_embeddings` for each image.

usage: python hf_reference.py HF_MODEL_DIR INPUTS.npz PARAMS.json OUT.npz
INPUTS.npz: images uint8 (N, H, W, 3), embeddings float32 (N, 256, 64, 64).
PARAMS.json: points_per_side, pred_iou_thresh, stability_score_thresh, mask_threshold.
"""
from __future__ import annotations

import json
import sys

import cv2
import numpy as np
import torch
from PIL import Image
from transformers import SamImageProcessor, SamModel, pipeline


def mask_criteria(masks: list[np.ndarray], v_min: int = 200, v_max: int = 7000) -> list[int]:
    """RoiMatching._mask_criteria: indices (into masks) of the ROIs kept."""
    kept = [i for i, m in enumerate(masks) if v_min <= m.sum() <= v_max]
    remove = set()
    for a in range(len(kept)):
        for b in range(a + 1, len(kept)):
            i, j = kept[a], kept[b]
            ai, aj = int(masks[i].sum()), int(masks[j].sum())
            inter = int(np.logical_and(masks[i], masks[j]).sum())
            if inter / min(ai, aj) >= 0.9:
                remove.add(i if ai < aj else j)
    return [i for i in kept if i not in remove]


def roi_proto(embedding: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """RoiMatching._roi_proto: masked mean via the NaN trick on a nearest 64x64 mask."""
    m64 = cv2.resize(mask.astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST)
    if m64.sum() == 0:
        return torch.zeros(embedding.shape[0])
    feat = embedding * torch.from_numpy(m64).float()[None]
    feat[feat == 0] = float("nan")
    return torch.nanmean(feat.reshape(embedding.shape[0], -1), dim=1)


def roi_match(sim: torch.Tensor, tau: float = 0.8) -> list[tuple[int, int, float]]:
    """RoiMatching._roi_match: greedy global-max one-to-one assignment above tau."""
    s = sim.clone()
    pairs = []
    while bool((s > tau).any()):
        flat = int(torch.argmax(s))
        i, j = divmod(flat, s.shape[1])
        pairs.append((i, j, float(sim[i, j])))
        s[i, :] = -1
        s[:, j] = -1
    return pairs


def main(model_dir: str, inputs: str, params_path: str, out: str) -> None:
    torch.manual_seed(0)
    data = np.load(inputs)
    params = json.loads(open(params_path).read())
    model = SamModel.from_pretrained(model_dir).eval()
    generator = pipeline("mask-generation", model=model, image_processor=SamImageProcessor(), device="cpu")
    result = {}
    protos = []
    for n, (image, embedding) in enumerate(zip(data["images"], data["embeddings"])):
        emb = torch.from_numpy(embedding)[None]
        model.get_image_embeddings = lambda pixel_values, _e=emb: _e
        with torch.no_grad():
            outputs = generator(Image.fromarray(image), points_per_batch=64, crops_n_layers=0,
                                points_per_crop=params["points_per_side"],
                                pred_iou_thresh=params["pred_iou_thresh"],
                                stability_score_thresh=params["stability_score_thresh"],
                                mask_threshold=params["mask_threshold"])
        masks = [np.asarray(m, bool) for m in outputs["masks"]]
        result[f"masks_{n}"] = np.stack(masks) if masks else np.zeros((0, *image.shape[:2]), bool)
        result[f"scores_{n}"] = outputs["scores"].numpy().astype(np.float32)
        kept = mask_criteria(masks)
        result[f"kept_{n}"] = np.array(kept, np.int64)
        p = torch.stack([roi_proto(emb[0], masks[i]) for i in kept]) if kept else torch.zeros(0, emb.shape[1])
        result[f"protos_{n}"] = p.numpy().astype(np.float32)
        protos.append(p)
    for a in range(0, len(protos), 2):
        p, q = protos[a], protos[a + 1]
        sim = torch.nn.functional.cosine_similarity(p[:, None, :], q[None, :, :], dim=-1, eps=1e-8) \
            if len(p) and len(q) else torch.zeros(len(p), len(q))
        pairs = roi_match(sim)
        result[f"pairs_{a // 2}"] = np.array([(i, j) for i, j, _ in pairs], np.int64).reshape(-1, 2)
        result[f"similarity_{a // 2}"] = np.array([s for _, _, s in pairs], np.float32)
    np.savez(out, **result)


if __name__ == "__main__":
    main(*sys.argv[1:5])
