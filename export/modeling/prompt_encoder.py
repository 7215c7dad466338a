"""SAM's prompt encoder: points, boxes and masks -> sparse and dense prompt embeddings.

Same math and parameter names as Meta's ``segment_anything.modeling.prompt_encoder``. Point
embedding is written with ``torch.where`` instead of boolean-mask assignment so that it traces to
ONNX, and it accepts every SAM label: -1 padding (``not_a_point_embed``), 0 background,
1 foreground, 2 box top-left and 3 box bottom-right (``point_embeddings[label]``). A box given as
two points labelled 2 and 3 embeds exactly as the same box given to ``forward(boxes=...)``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    ``image_embedding_size`` is the ``(H, W)`` of the image embedding (64 x 64 for SAM);
    ``input_image_size`` the ``(H, W)`` of the padded model input that prompt coordinates refer
    to (pixels, x = column, y = row).
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)

        self.num_point_embeddings = 4  # background, foreground, box top-left, box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)

        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the embedding grid, ``1 x embed_dim x H x W``."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """Points ``B x N x 2`` (x, y pixels) with labels ``B x N`` -> ``B x N' x embed_dim``.

        With ``pad`` a point (0, 0) labelled -1 is appended (N' = N + 1), as SAM does when no box
        is given.
        """
        points = points + 0.5  # centre of the pixel
        if pad:
            points = torch.cat([points, torch.zeros_like(points[:, :1])], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels.unsqueeze(-1)
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight, embedding)
        for i, point_embedding in enumerate(self.point_embeddings):
            embedding = torch.where(labels == i, embedding + point_embedding.weight, embedding)
        return embedding

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes ``B x 4`` (x0, y0, x1, y1 pixels) -> corner embeddings ``B x 2 x embed_dim``."""
        boxes = boxes + 0.5  # centre of the pixel
        coords = boxes.reshape(-1, 2, 2)
        corners = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        return corners + torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])

    def embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Mask logits ``B x 1 x 4H x 4W`` -> dense embedding ``B x embed_dim x H x W``."""
        return self.mask_downscaling(masks)

    def no_mask_dense(self, batch_size: int) -> torch.Tensor:
        """Dense embedding when no mask is given: ``no_mask_embed`` broadcast to ``B x embed_dim x H x W``."""
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            batch_size, -1, self.image_embedding_size[0], self.image_embedding_size[1]
        )

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed any of points ``(B x N x 2, B x N)``, boxes ``B x 4`` and masks ``B x 1 x 4H x 4W``.

        Returns the sparse embeddings ``B x N' x embed_dim`` (points, then box corners) and the
        dense embeddings ``B x embed_dim x H x W``.
        """
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        device = self.no_mask_embed.weight.device
        sparse = torch.empty((bs, 0, self.embed_dim), device=device)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self.embed_points(coords, labels, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self.embed_boxes(boxes)], dim=1)
        dense = self.embed_masks(masks) if masks is not None else self.no_mask_dense(bs)
        return sparse, dense


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (Fourier features).

    ``positional_encoding_gaussian_matrix`` is ``2 x num_pos_feats``; encodings have
    ``2 * num_pos_feats`` channels (sin then cos).
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """Coordinates ``... x 2`` normalised to [0, 1] -> ``... x 2*num_pos_feats``."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an ``H x W`` grid: ``2*num_pos_feats x H x W``."""
        h, w = size
        grid = torch.ones((h, w), device=self.positional_encoding_gaussian_matrix.device, dtype=torch.float32)
        y_embed = (grid.cumsum(dim=0) - 0.5) / h
        x_embed = (grid.cumsum(dim=1) - 0.5) / w
        pe = self._pe_encoding(torch.stack([x_embed, y_embed], dim=-1))
        return pe.permute(2, 0, 1)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Pixel coordinates ``B x N x 2`` (x, y) in an ``(H, W)`` image -> ``B x N x 2*num_pos_feats``."""
        h, w = image_size
        size = torch.tensor([w, h], dtype=torch.float32, device=coords_input.device)
        return self._pe_encoding(coords_input.to(torch.float32) / size)
