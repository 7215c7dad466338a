"""SAM's mask decoder: image embedding + prompt embeddings -> mask logits and IoU predictions.

Same math and parameter names as Meta's ``segment_anything.modeling.mask_decoder``.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import MLP, LayerNorm2d
from .transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """Predicts ``num_multimask_outputs + 1`` masks per prompt with a two-way transformer.

    Mask 0 is SAM's single-mask output, masks 1.. the multimask (ambiguity-resolving) outputs.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`predict_masks`, keeping masks 1.. (``multimask_output``) or mask 0 only.

        Returns masks ``B x M x 4H x 4W`` and IoU predictions ``B x M``.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice], iou_pred[:, mask_slice]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask outputs for a batch of B prompts on one image.

        ``image_embeddings`` ``1 x C x H x W`` (or ``B x ...``, one per prompt), ``image_pe``
        ``1 x C x H x W``, ``sparse_prompt_embeddings`` ``B x N x C``, ``dense_prompt_embeddings``
        ``B x C x H x W`` -> masks ``B x (num_multimask_outputs+1) x 4H x 4W`` (logits) and IoU
        predictions ``B x (num_multimask_outputs+1)``.
        """
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = output_tokens.unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

        src = image_embeddings.expand(b, -1, -1, -1) + dense_prompt_embeddings
        pos_src = image_pe.expand(b, -1, -1, -1)
        c, h, w = src.shape[1:]

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]

        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = self.output_upscaling(src)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        c, h, w = upscaled.shape[1:]
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred
