"""SAM's ViT image encoder (ViTDet backbone with windowed and global attention blocks).

Same math and parameter names as Meta's ``segment_anything.modeling.image_encoder``; every width is
a constructor argument so that pruned variants (SlimSAM) and small test models can be built.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock


class ImageEncoderViT(nn.Module):
    """ViT encoder: ``B x in_chans x img_size x img_size`` -> ``B x out_chans x E x E``.

    ``E = img_size // patch_size`` (64 for SAM). Blocks whose index is in
    ``global_attn_indexes`` attend over all ``E x E`` tokens, the others within
    ``window_size x window_size`` windows (the token grid is zero-padded to a multiple of the
    window). ``attn_dim`` is the width of each of q, k and v (``embed_dim`` unless pruned).
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_dim: int | None = None,
        attn_dim: int | None = None,
        out_chans: int = 256,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.embedding_size = img_size // patch_size
        grid = (self.embedding_size, self.embedding_size)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, *grid, embed_dim))

        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim if mlp_dim is not None else 4 * embed_dim,
                attn_dim=attn_dim if attn_dim is not None else embed_dim,
                qkv_bias=qkv_bias,
                layer_norm_eps=layer_norm_eps,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=grid,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x S x S`` normalised image -> ``B x out_chans x E x E`` embedding."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: ``B x C x H x W`` -> ``B x H/p x W/p x embed_dim``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block on a ``B x H x W x dim`` token grid; ``window_size`` 0 = global."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        attn_dim: int,
        qkv_bias: bool,
        layer_norm_eps: float,
        use_rel_pos: bool,
        window_size: int,
        input_size: tuple[int, int],
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            attn_dim=attn_dim,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=mlp_dim, act=nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x dim`` -> ``B x H x W x dim``."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head self-attention with decomposed relative position embeddings (MViTv2).

    ``qkv`` projects ``dim -> 3 * attn_dim``; ``rel_pos_h``/``rel_pos_w`` are
    ``(2 * size - 1) x head_dim`` tables for the ``input_size`` the block attends over.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attn_dim: int,
        qkv_bias: bool,
        use_rel_pos: bool,
        input_size: tuple[int, int],
    ) -> None:
        super().__init__()
        if attn_dim % num_heads:
            raise ValueError(f"attention width {attn_dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        head_dim = attn_dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(attn_dim, dim)
        self.use_rel_pos = use_rel_pos
        self.query_rows: int | None = None
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x dim`` -> ``B x H x W x dim``.

        With ``query_rows`` set (the ONNX export sets it on global-attention blocks), the queries are
        processed ``query_rows`` grid rows at a time: the same values, but the attention matrix is
        never held for all queries at once (12 x 4096 x 4096 floats, 805 MB, for ViT-B at 1024 px).
        """
        b, h, w, _ = x.shape
        # 3 x B x heads x HW x head_dim
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # each (B * heads) x HW x head_dim
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
        rel = rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w)) if self.use_rel_pos else None
        rows = self.query_rows or h
        chunks = []
        for r0 in range(0, h, rows):
            r1 = min(r0 + rows, h)
            attn = (q[:, r0 * w:r1 * w] * self.scale) @ k.transpose(-2, -1)
            if rel is not None:
                attn = add_rel_pos_terms(attn, rel[0][:, r0:r1], rel[1][:, r0:r1], (h, w))
            chunks.append(attn.softmax(dim=-1) @ v)
        out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
        x = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(x)


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``B x H x W x C`` -> (``B*nW x ws x ws x C`` windows, padded ``(Hp, Wp)``); zero-pads H, W."""
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: windows -> ``B x H x W x C`` with the padding cut off."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position table ``L x C`` -> ``q_size x k_size x C`` gathered per (query, key) pair.

    The table is linearly resized when its length is not ``2 * max(q_size, k_size) - 1``.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative_coords.long()]


def rel_pos_terms(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decomposed relative position terms of queries ``q`` ``B x (q_h*q_w) x C``:
    ``rel_h`` ``B x q_h x q_w x k_h`` and ``rel_w`` ``B x q_h x q_w x k_w``."""
    q_h, q_w = q_size
    k_h, k_w = k_size
    rh = get_rel_pos(q_h, k_h, rel_pos_h)
    rw = get_rel_pos(q_w, k_w, rel_pos_w)
    b, _, dim = q.shape
    r_q = q.reshape(b, q_h, q_w, dim)
    # Batched products rather than einsum("bhwc,hkc->bhwk") / einsum("bhwc,wkc->bhwk"): the same sums, which
    # ONNX Runtime runs faster as MatMul than as Einsum.
    rel_h = torch.matmul(r_q, rh.transpose(1, 2))
    by_column = r_q.permute(2, 0, 1, 3).reshape(q_w, b * q_h, dim)
    rel_w = torch.matmul(by_column, rw.transpose(1, 2)).reshape(q_w, b, q_h, k_w).permute(1, 2, 0, 3)
    return rel_h, rel_w


def add_rel_pos_terms(attn: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, k_size: tuple[int, int]) -> torch.Tensor:
    """``attn`` ``B x (rows*q_w) x (k_h*k_w)`` plus the terms of ``rel_pos_terms`` for those query rows
    (``rel_h`` ``B x rows x q_w x k_h``, ``rel_w`` ``B x rows x q_w x k_w``). Returns ``attn``'s shape."""
    b, rows, q_w, _ = rel_h.shape
    k_h, k_w = k_size
    attn = attn.view(b, rows, q_w, k_h, k_w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return attn.view(b, rows * q_w, k_h * k_w)



class EncoderPart(nn.Module):
    """The part of a ViT encoder between two global-attention cores, for an encoder run as ONNX graphs
    around a native attention kernel (``samreg_rt._ext.shared_attention``; batch 1).

    ``start``: the global block whose attention core output this part takes (None: the part takes the
    image); ``stop``: the global block whose attention core inputs it returns (None: it returns the
    embedding). Inputs: ``image`` (1 x 3 x S x S), or ``tokens`` (1 x h x w x dim, the residual stream
    before block ``start``) and ``attention`` (hw x heads x head_dim, its attention core's output).
    Outputs: the embedding, or ``next_tokens`` (before block ``stop``) and block ``stop``'s core inputs:
    ``q`` (scaled), ``k``, ``v`` (hw x heads x head_dim) and ``rel_h``, ``rel_w`` (hw x heads x h and
    hw x heads x w, the decomposed relative position terms of the unscaled queries).
    """

    def __init__(self, encoder: ImageEncoderViT, start: int | None, stop: int | None) -> None:
        super().__init__()
        self.encoder, self.start, self.stop = encoder, start, stop

    def forward(self, *inputs: torch.Tensor):
        enc = self.encoder
        if self.start is None:
            (image,) = inputs
            x = enc.patch_embed(image)
            if enc.pos_embed is not None:
                x = x + enc.pos_embed
            first = 0
        else:
            x, attention = inputs
            blk = enc.blocks[self.start]
            x = x + blk.attn.proj(attention.reshape(x.shape[0], x.shape[1], x.shape[2], -1))
            x = x + blk.mlp(blk.norm2(x))
            first = self.start + 1
        for blk in enc.blocks[first:len(enc.blocks) if self.stop is None else self.stop]:
            x = blk(x)
        if self.stop is None:
            return enc.neck(x.permute(0, 3, 1, 2))
        attn = enc.blocks[self.stop].attn
        _, h, w, _ = x.shape
        qkv = attn.qkv(enc.blocks[self.stop].norm1(x)).reshape(h * w, 3, attn.num_heads, -1)
        q, k, v = qkv.unbind(1)                                            # each hw x heads x head_dim
        rel_h, rel_w = rel_pos_terms(q.permute(1, 0, 2), attn.rel_pos_h, attn.rel_pos_w, (h, w), (h, w))
        return (x, q * attn.scale, k, v, rel_h.reshape(attn.num_heads, h * w, -1).permute(1, 0, 2),
                rel_w.reshape(attn.num_heads, h * w, -1).permute(1, 0, 2))


def global_blocks(encoder: nn.Module) -> list[int]:
    """Indices of a ViT encoder's global-attention blocks with relative positions ([] for other encoders)."""
    return [i for i, blk in enumerate(getattr(encoder, "blocks", ()))
            if getattr(blk, "window_size", None) == 0 and getattr(blk.attn, "use_rel_pos", False)]
