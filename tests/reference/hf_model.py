"""HF ``SamModel`` directories built from Meta-key weights, for the reference side of the parity
test and of ``benchmarks/pipeline.py``.

Runs in samreg-rt's venv (transformers + samreg_export). The HF model is filled key by key through
samreg_export's own HF -> Meta key mapping (``_hf_key_to_meta``), so a model saved here and
exported back by samreg-rt's HF loader holds the same tensors on both sides.

LiteMedSAM is the only real SAM decoder on this project's machines. It was trained with boxes and
its three multimask outputs were never trained (from point prompts they are empty: stability 0,
predicted IoU ~0.15), while transformers' mask-generation pipeline always uses the multimask
outputs; ``litemedsam_multimask`` therefore copies the trained single-mask slot 0 (mask token,
hypernetwork and IoU-head row) into slots 1..3, which makes every candidate a real mask (the three
copies are identical and NMS keeps one).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

from samreg_export.checkpoints import _hf_key_to_meta


def litemedsam_multimask(lite_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of LiteMedSAM's state dict (Meta keys) with multimask slots 1..3 = the single-mask
    slot 0."""
    state = {k: v.clone() for k, v in lite_state.items()}
    for k in (1, 2, 3):
        state["mask_decoder.mask_tokens.weight"][k] = state["mask_decoder.mask_tokens.weight"][0]
        for name in [n for n in state if n.startswith("mask_decoder.output_hypernetworks_mlps.0.")]:
            state[name.replace(".0.", f".{k}.", 1)] = state[name].clone()
        for part in ("weight", "bias"):
            head = state[f"mask_decoder.iou_prediction_head.layers.2.{part}"]
            head[k] = head[0]
    return state


def hf_sam_model(meta_state: dict[str, torch.Tensor], vision_config: dict | None = None,
                 seed: int = 0) -> SamModel:
    """An HF ``SamModel`` (``SamConfig(vision_config=...)``; None: SAM ViT-B) holding ``meta_state``.

    Every HF key whose Meta name is in ``meta_state`` takes that tensor. The others must be
    vision-encoder keys (an encoder the caller never runs because it injects embeddings): seeded
    N(0, 0.02) for matrices, SamModel's own init for vectors.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = SamModel(SamConfig(vision_config=vision_config or {}))
        iou_depth = hf.config.mask_decoder_config.iou_head_depth
        state = {}
        for key, value in hf.state_dict().items():
            meta = _hf_key_to_meta(key, iou_depth)
            if meta in meta_state:
                state[key] = meta_state[meta].clone()
            elif key.startswith("vision_encoder."):
                state[key] = torch.randn_like(value) * 0.02 if value.ndim > 1 else value
            else:
                raise KeyError(f"{key} ({meta}): not in the given weights")
    hf.load_state_dict(state)
    return hf.eval()


def save_hf_dir(model: SamModel, directory: Path) -> Path:
    """Save ``model`` with a default ``SamProcessor``, as ``SamModel/SamProcessor.from_pretrained``
    and ``pipeline("mask-generation", model=directory)`` load a hub repository. Returns directory."""
    model.save_pretrained(directory)
    SamProcessor(SamImageProcessor()).save_pretrained(directory)
    return directory
