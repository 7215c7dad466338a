"""TinyViT image encoder as used by MobileSAM and LiteMedSAM.

Parameter names follow the ``tiny_vit_sam.py`` of those projects (``patch_embed.seq.0.c``,
``layers.N.blocks.M.attn.attention_biases``, ``neck.0`` ...) so their checkpoints load strictly.
Stage 0 is convolutional (MBConv); stages 1.. are windowed attention blocks with a learned
per-offset attention bias. The SAM variants keep a 64 x 64 grid in the last two stages (the last
patch merging has stride 1) and end in SAM's 256-channel neck.

The two released variants differ only in the patch embedding:

* MobileSAM (``img_size`` 1024): two 3x3 stride-2 convolutions, 1024 -> 256 px grid;
* LiteMedSAM (``img_size`` 256): two 1x1 stride-1 convolutions, the grid stays 256 px.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d


class Conv2dBN(nn.Sequential):
    """Bias-free ``Conv2d`` (``c``) followed by ``BatchNorm2d`` (``bn``)."""

    def __init__(
        self, in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_chans))


class PatchEmbed(nn.Module):
    """``B x in_chans x S x S`` -> ``B x embed_dim x S/s² x S/s²`` with two ``Conv2dBN`` of stride s."""

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, kernel_size, stride, pad),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, kernel_size, stride, pad),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU.

    ``B x C x H x W`` -> ``B x C x H x W``.
    """

    def __init__(self, chans: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(chans * expand_ratio)
        self.conv1 = Conv2dBN(chans, hidden, kernel_size=1)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, kernel_size=3, stride=1, padding=1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, chans, kernel_size=1)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        y = self.conv3(y)
        return self.act3(x + y)


class PatchMerging(nn.Module):
    """Channel change (and downsampling by ``stride``) between stages.

    Input ``B x C x H x W`` or tokens ``B x (H*W) x C`` at ``input_resolution``; output tokens
    ``B x (H/stride * W/stride) x out_dim``.
    """

    def __init__(self, input_resolution: tuple[int, int], dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim, kernel_size=1)
        self.conv2 = Conv2dBN(out_dim, out_dim, kernel_size=3, stride=stride, padding=1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    """Stage 0: ``depth`` MBConv blocks on ``B x dim x H x W``, then an optional PatchMerging."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class Mlp(nn.Module):
    """Pre-norm MLP: ``fc2(gelu(fc1(norm(x))))``, ``B x N x dim`` -> ``B x N x dim``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Pre-norm multi-head attention over one ``resolution`` window with a learned bias per
    (head, |dy|, |dx|) offset.

    ``qkv`` output is laid out per head as ``[q | k | v]`` (``head_dim`` each). The bias table
    ``attention_biases`` (``heads x offsets``) is expanded to ``heads x N x N`` by indexing with the
    constant ``attention_bias_idxs`` buffer, which traces to a single Gather.
    """

    def __init__(self, dim: int, num_heads: int, resolution: tuple[int, int]) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

        points = list(itertools.product(range(resolution[0]), range(resolution[1])))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(offset, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer(
            "attention_bias_idxs", torch.tensor(idxs, dtype=torch.long).view(len(points), len(points)),
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x N x dim`` (N = window area) -> ``B x N x dim``."""
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.head_dim, dim=3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj(x)


class TinyViTBlock(nn.Module):
    """Windowed attention, 3x3 depthwise ``local_conv``, then MLP; ``B x (H*W) x dim`` in and out."""

    def __init__(
        self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int,
        mlp_ratio: float, local_conv_size: int,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, (window_size, window_size))
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        b, n, c = x.shape
        ws = self.window_size
        if h == ws and w == ws:
            attn = self.attn(x)
        else:
            y = x.view(b, h, w, c)
            pad_b = (ws - h % ws) % ws
            pad_r = (ws - w % ws) % ws
            if pad_b > 0 or pad_r > 0:
                y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
            ph, pw = h + pad_b, w + pad_r
            nh, nw = ph // ws, pw // ws
            y = y.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
            y = self.attn(y)
            y = y.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
            attn = y[:, :h, :w].reshape(b, n, c)
        x = x + attn
        x = x.transpose(1, 2).reshape(b, c, h, w)
        x = self.local_conv(x)
        x = x.view(b, c, n).transpose(1, 2)
        return x + self.mlp(x)


class BasicLayer(nn.Module):
    """Attention stage: ``depth`` TinyViT blocks, then an optional PatchMerging."""

    def __init__(
        self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int, window_size: int,
        mlp_ratio: float, local_conv_size: int, downsample: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, input_resolution, num_heads, window_size, mlp_ratio, local_conv_size)
            for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class TinyViT(nn.Module):
    """TinyViT-5M for SAM: ``B x 3 x img_size x img_size`` -> ``B x out_chans x E x E``.

    ``patch_kernel``/``patch_stride`` configure the patch embedding (3/2 for MobileSAM, 1/1 for
    LiteMedSAM); ``merge_strides`` are the strides of the patch mergings between stages. With
    ``num_classes`` > 0 the (unused) classifier head ``norm_head``/``head`` of MobileSAM's
    checkpoint is present so that checkpoint loads strictly; it takes no part in ``forward``.
    """

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        merge_strides: Sequence[int] = (2, 2, 1),
        patch_kernel: int = 1,
        patch_stride: int = 1,
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if not len(embed_dims) == len(depths) == len(num_heads) == len(window_sizes) == len(merge_strides) + 1:
            raise ValueError("embed_dims, depths, num_heads, window_sizes need one entry per stage and "
                             "merge_strides one fewer")
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], patch_kernel, patch_stride)
        res = img_size // (patch_stride * patch_stride)

        self.layers = nn.ModuleList()
        for i, dim in enumerate(embed_dims):
            downsample = None
            if i < len(merge_strides):
                downsample = PatchMerging((res, res), dim, embed_dims[i + 1], merge_strides[i])
            if i == 0:
                layer: nn.Module = ConvLayer(dim, depths[i], mbconv_expand_ratio, downsample)
            else:
                layer = BasicLayer(dim, (res, res), depths[i], num_heads[i], window_sizes[i], mlp_ratio,
                                   local_conv_size, downsample)
            self.layers.append(layer)
            if i < len(merge_strides):
                res = (res - 1) // merge_strides[i] + 1
        self.embedding_size = res

        if num_classes > 0:
            self.norm_head = nn.LayerNorm(embed_dims[-1])
            self.head = nn.Linear(embed_dims[-1], num_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x S x S`` normalised image -> ``B x out_chans x E x E`` embedding."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, self.embedding_size, self.embedding_size, c).permute(0, 3, 1, 2)
        return self.neck(x)
