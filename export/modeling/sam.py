"""The SAM container, the named architectures and their builders.

An architecture is a flat dict of constructor arguments: ``encoder`` ("vit" or "tiny_vit") and that
encoder's arguments, plus the prompt encoder / mask decoder arguments of ``DECODER_DEFAULTS``.
State-dict keys are Meta's (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .common import LayerNorm2d
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PositionEmbeddingRandom, PromptEncoder
from .tiny_vit import TinyViT
from .transformer import TwoWayTransformer

DECODER_DEFAULTS: dict[str, Any] = {
    "prompt_embed_dim": 256,
    "mask_in_chans": 16,
    "decoder_depth": 2,
    "decoder_mlp_dim": 2048,
    "decoder_num_heads": 8,
    "attention_downsample_rate": 2,
    "decoder_layer_norm_eps": 1e-5,
    "num_multimask_outputs": 3,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
}

_SAM_VIT = {"encoder": "vit", "img_size": 1024, "patch_size": 16, "window_size": 14}
_TINY_VIT = {"encoder": "tiny_vit", "embed_dims": (64, 128, 160, 320), "depths": (2, 2, 6, 2),
             "num_heads": (2, 4, 5, 10), "window_sizes": (7, 7, 14, 7), "merge_strides": (2, 2, 1)}

ARCHS: dict[str, dict[str, Any]] = {
    "vit_b": {**_SAM_VIT, "embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {**_SAM_VIT, "embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {**_SAM_VIT, "embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
    "litemedsam": {**_TINY_VIT, "img_size": 256, "patch_kernel": 1, "patch_stride": 1},
    "mobilesam": {**_TINY_VIT, "img_size": 1024, "patch_kernel": 3, "patch_stride": 2, "num_classes": 1000},
    # a small SAM ViT for fast tests: 256 px, patch 4 -> the usual 64 x 64 x 256 embedding
    "tiny": {"encoder": "vit", "img_size": 256, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2,
             "window_size": 8, "global_attn_indexes": (1,)},
}

_LAYOUT_KEYS = ("encoder", "img_size", "patch_size", "depth", "window_size", "global_attn_indexes",
                "patch_kernel", "patch_stride", "depths")


class Sam(nn.Module):
    """Image encoder, prompt encoder and mask decoder of one SAM model.

    ``img_size`` is the side S of the square model input; the image embedding is
    ``1 x 256 x 64 x 64`` for every architecture here.
    """

    def __init__(self, image_encoder: ImageEncoderViT | TinyViT, prompt_encoder: PromptEncoder,
                 mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.img_size = image_encoder.img_size

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """The encoder of docs/contracts.md: normalised image ``1 x 3 x S x S`` -> image embedding ``1 x 256 x 64 x 64``."""
        return self.image_encoder(image)

    def decode(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor,
               point_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder of docs/contracts.md: one image embedding ``1 x 256 x 64 x 64``, points
        ``B x N x 2`` (pixels of the S x S frame) with labels ``B x N`` (1, 0, -1 padding, 2/3 box
        corners; no padding point is added) -> (IoU predictions ``B x 4``, mask logits
        ``B x 4 x 256 x 256``); index 0 is the single-mask output, 1..3 the multimask outputs."""
        sparse = self.prompt_encoder.embed_points(point_coords, point_labels, pad=False)
        dense = self.prompt_encoder.no_mask_dense(point_coords.shape[0])
        masks, iou = self.mask_decoder.predict_masks(
            image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense
        )
        return iou, masks


def build_sam(arch: str, **overrides: Any) -> Sam:
    """Build the named architecture of ``ARCHS`` (randomly initialised, eval mode).

    ``overrides`` replace entries of the architecture or of ``DECODER_DEFAULTS``.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown SAM architecture {arch!r}; known: {', '.join(ARCHS)}")
    return build_sam_from_config({**ARCHS[arch], **overrides})


def build_sam_from_config(config: dict[str, Any]) -> Sam:
    """Build a SAM from a flat architecture dict (see ``ARCHS``; missing decoder entries take
    ``DECODER_DEFAULTS``). The model is randomly initialised and in eval mode."""
    config = {**DECODER_DEFAULTS, **config}
    decoder = {key: config.pop(key) for key in DECODER_DEFAULTS}
    kind = config.pop("encoder")
    image_encoder: ImageEncoderViT | TinyViT
    if kind == "vit":
        image_encoder = ImageEncoderViT(**config, out_chans=decoder["prompt_embed_dim"])
    elif kind == "tiny_vit":
        image_encoder = TinyViT(**config, out_chans=decoder["prompt_embed_dim"])
    else:
        raise ValueError(f"unknown image encoder kind {kind!r}; expected 'vit' or 'tiny_vit'")
    grid = image_encoder.embedding_size
    prompt_encoder = PromptEncoder(
        embed_dim=decoder["prompt_embed_dim"],
        image_embedding_size=(grid, grid),
        input_image_size=(image_encoder.img_size, image_encoder.img_size),
        mask_in_chans=decoder["mask_in_chans"],
    )
    mask_decoder = MaskDecoder(
        transformer_dim=decoder["prompt_embed_dim"],
        transformer=TwoWayTransformer(
            depth=decoder["decoder_depth"],
            embedding_dim=decoder["prompt_embed_dim"],
            num_heads=decoder["decoder_num_heads"],
            mlp_dim=decoder["decoder_mlp_dim"],
            attention_downsample_rate=decoder["attention_downsample_rate"],
            layer_norm_eps=decoder["decoder_layer_norm_eps"],
        ),
        num_multimask_outputs=decoder["num_multimask_outputs"],
        iou_head_depth=decoder["iou_head_depth"],
        iou_head_hidden_dim=decoder["iou_head_hidden_dim"],
    )
    return Sam(image_encoder, prompt_encoder, mask_decoder).eval()


def arch_name(config: dict[str, Any]) -> str:
    """Name of the ``ARCHS`` entry whose layout (encoder kind, input size, patching, depth,
    attention pattern) ``config`` has; widths may differ (SlimSAM's pruned ViT-B is ``vit_b``).
    ``vit_custom`` / ``tiny_vit_custom`` when none has it."""
    def layout(c: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(tuple(c[k]) if isinstance(c.get(k), (list, tuple)) else c.get(k) for k in _LAYOUT_KEYS)

    for name, known in ARCHS.items():
        if layout(known) == layout(config):
            return name
    return f"{config['encoder']}_custom"


@torch.no_grad()
def init_random_weights_(model: nn.Module, seed: int) -> None:
    """Seeded random weights at a realistic scale, in place (the global RNG is left untouched).

    Linear and convolution weights normal with std ``fan_in ** -0.5`` (variance preserving)
    and zero bias; LayerNorm and BatchNorm weight 1 / bias 0 with running mean 0 / var 1;
    embeddings and the Fourier-feature matrix N(0, 1); any other parameter (positional,
    relative-position and attention-bias tables) std 0.02; normals are truncated at 2 std. Image embeddings, IoU
    predictions and mask logits then come out O(1).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        done: set[int] = set()
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                _trunc_normal_(module.weight, std=_fan_in(module) ** -0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, LayerNorm2d, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
                if isinstance(module, nn.BatchNorm2d):
                    module.reset_running_stats()
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight)
            elif isinstance(module, PositionEmbeddingRandom):
                module.positional_encoding_gaussian_matrix.normal_()
            else:
                continue
            done.update(id(p) for p in module.parameters(recurse=False))
        for param in model.parameters():
            if id(param) not in done:
                _trunc_normal_(param, std=0.02)


def _trunc_normal_(tensor: torch.Tensor, std: float) -> None:
    """Fill with N(0, std) truncated to +-2 std, by inverse-CDF sampling (one pass, unlike
    ``nn.init.trunc_normal_``'s rejection loop, which takes seconds on large tensors)."""
    bound = math.erf(2 / math.sqrt(2))  # erf-space image of +-2 std
    tensor.uniform_(-bound, bound).erfinv_().mul_(std * math.sqrt(2)).clamp_(-2 * std, 2 * std)


def _fan_in(module: nn.Linear | nn.Conv2d | nn.ConvTranspose2d) -> int:
    """Inputs summed into one output value of a linear or (transposed) convolution layer."""
    w = module.weight
    if isinstance(module, nn.Linear):
        return w.shape[1]
    if isinstance(module, nn.Conv2d):
        return w[0].numel()
    kernel = w.shape[2] * w.shape[3]
    stride = module.stride[0] * module.stride[1]
    return max(1, w.shape[0] * kernel // stride)
