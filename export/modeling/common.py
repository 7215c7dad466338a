"""Building blocks shared by the SAM encoders and decoder.

Module and parameter names follow Meta's ``segment_anything.modeling.common`` so that Meta
checkpoints load into these modules unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a ``B x C x H x W`` tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x C x H x W`` -> ``B x C x H x W``, each pixel's channels normalised."""
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """Two-layer perceptron ``lin2(act(lin1(x)))`` of the transformer blocks."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``... x embedding_dim`` -> ``... x embedding_dim``."""
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the mask decoder's heads).

    Parameters are named ``layers.0`` .. ``layers.{num_layers - 1}`` as in Meta's ``MLP``.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``... x input_dim`` -> ``... x output_dim``."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == last else F.relu(layer(x))
        return x
