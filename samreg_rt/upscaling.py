"""SAM's mask upscaling on the CPU without ONNX Runtime: one fused kernel for the kept masks.

``decoder_masks.onnx`` computes, per prompt, two stride-2 transposed convolutions (with a
LayerNorm and two GELUs) from the 64x64 image tokens to 32 channels at 256x256, then each mask's
product with its hypernetwork row. ONNX Runtime writes every intermediate tensor to memory (8 MB
per prompt after the second convolution) and runs the second convolution as a product of inner
width 64, which is memory-bound. ``samreg_rt._ext.mask_upscaling`` does all of it for 16 input
pixels at a time in registers (8 in its AVX2 build, for CPUs without AVX-512), for the kept masks only
(its time against the graph's: benchmarks/results/performance.md, section 2, and for each build
benchmarks/results/upscaling_builds.md). Results equal the graph's up to float rounding
(the kernel's erf is a rational approximation, absolute error below 5e-7).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samreg_rt import _ext
from samreg_rt.errors import InputError, ModelError
from samreg_rt.two_way import ImageTokenFactors

C, C1, C2 = 256, 64, 32  # image-token channels, after the first and after the second transposed convolution
ARRAYS = ("w1", "b1", "ln_weight", "ln_bias", "eps", "w2", "b2")


@dataclass(frozen=True)
class UpscalingWeights:
    """Weights of the mask upscaling, channel-last (the export writes them, ``mask_upscaling.npz``).

    w1 float32 (C, 4*C1): first transposed convolution's kernel, columns (di, dj, c1); b1 (4*C1,)
    its bias repeated per (di, dj); ln_weight, ln_bias (C1,) and eps: the LayerNorm over c1;
    w2 (C1, 4*C2) and b2 (4*C2,): the second transposed convolution, columns (di2, dj2, c2).
    """

    w1: np.ndarray
    b1: np.ndarray
    ln_weight: np.ndarray
    ln_bias: np.ndarray
    eps: float
    w2: np.ndarray
    b2: np.ndarray

    @classmethod
    def from_bytes(cls, data: bytes, path: Path) -> "UpscalingWeights":
        """Read the .npz written by the export; ``ModelError`` naming ``path`` when it is not one
        or has missing or mis-shaped arrays."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: np.array(npz[k], np.float32, order="C") for k in ARRAYS}
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{path}: not a mask-upscaling weights file ({exc})") from None
        shapes = {"w1": (C, 4 * C1), "b1": (4 * C1,), "ln_weight": (C1,), "ln_bias": (C1,), "eps": (),
                  "w2": (C1, 4 * C2), "b2": (4 * C2,)}
        wrong = [f"{k} {arrays[k].shape} (expected {v})" for k, v in shapes.items() if arrays[k].shape != v]
        if wrong:
            raise ModelError(f"{path}: mask-upscaling weights of the wrong shape: {', '.join(wrong)}")
        return cls(eps=float(arrays.pop("eps")), **arrays)


def upscale_kept(image_tokens: np.ndarray, hyper_in: np.ndarray, keep: np.ndarray,
                 weights: UpscalingWeights, width: int, threads: int = 0, grid_rows: int = -1) -> np.ndarray:
    """Low-resolution logits of the kept masks.

    image_tokens: float32 (B, hw, C) and hyper_in (B, K, C2), from ``Engine.decode_tokens`` (hyper_in
    any K <= 4 of its rows); keep: bool (B, K); width: of the token grid (hw = h * width); threads: the
    kernel's thread limit (0: the CPUs this process may run on); grid_rows: upscale only the token grid's first
    grid_rows rows (-1: all h), each of which makes 4 rows of the logits.
    Returns float32 (M, 4g, 4w), M = keep.sum(), g = grid_rows (h for -1), in the row-major order of ``keep``:
    equal to ``Engine.decode_masks(image_tokens, hyper_in)[keep][:, :4g]`` up to float rounding.
    """
    tokens = np.asarray(image_tokens, np.float32)
    hyper = np.asarray(hyper_in, np.float32)
    keep = np.asarray(keep, bool)                # (B, K) like hyper_in's: Engine.decode_kept_masks checks it
    if tokens.ndim != 3 or tokens.shape[0] != keep.shape[0]:
        raise InputError(f"upscale_kept: expected image_tokens (B, hw, C) for keep (B, K) = {keep.shape}; "
                         f"got {tokens.shape}")
    rows = np.flatnonzero(keep.any(axis=1))
    mask_start = np.concatenate([[0], np.cumsum(keep[rows].sum(axis=1))]).astype(np.int64)
    return _ext.mask_upscaling(np.ascontiguousarray(tokens), rows.astype(np.int64), weights.w1, weights.b1,
                               weights.ln_weight, weights.ln_bias, weights.eps, weights.w2, weights.b2,
                               np.ascontiguousarray(hyper[keep]), mask_start, int(width), grid_rows, threads=threads)


def upscale_kept_factored(factors: ImageTokenFactors, hyper_in: np.ndarray, keep: np.ndarray,
                          weights: UpscalingWeights, width: int, threads: int = 0, grid_rows: int = -1) -> np.ndarray:
    """``upscale_kept`` of image tokens in factored form (``two_way.decode_tokens(factors=...)``).

    The first convolution z = x2 @ w1 + b1 is linear in x2 = LN_2(x1 + a2 V2), x1 = LN_1(e + a1 V1)
    (``ImageTokenFactors``); with the centring of each LayerNorm folded into the weights,
    M2 = (I - 11'/C) diag(g2) w1 and M1 = (I - 11'/C) diag(g1) M2:
    z = r1 r2 (e M1) + r1 r2 a1 (V1 M1) + r2 a2 (V2 M2) + r2 (beta1 M2) + (beta2 w1 + b1),
    r = each LayerNorm's 1 / sqrt(var + eps). e M1 is computed once per call, V M per kept prompt, and the
    kernel (``_ext.mask_upscaling_factored``) runs products of inner width 2J + 2 (114 for SAM's point
    prompts) instead of C = 256 per pixel. Returns what ``upscale_kept`` returns for ``factors.dense()``,
    up to float rounding.
    """
    hyper = np.asarray(hyper_in, np.float32)
    keep = np.asarray(keep, bool)
    b, hw = len(factors), factors.keys.shape[0]
    if keep.shape[0] != b or len(factors.norms) != 2:
        raise InputError(f"upscale_kept_factored: factors of {b} prompts and {len(factors.norms)} layers for keep "
                         f"(B, K) = {keep.shape}; expected the same B and 2 layers")
    (g1, beta1, _), (g2, beta2, _) = factors.norms
    m2 = g2[:, None] * weights.w1
    m2 -= m2.mean(axis=0)
    m1 = g1[:, None] * m2
    m1 -= m1.mean(axis=0)
    zeros = np.zeros(4 * C1, np.float32)
    e_t = _ext.linear(factors.keys, m1, zeros, threads=threads)
    e_t = np.ascontiguousarray(e_t.reshape(hw // 16, 16, 4 * C1).transpose(0, 2, 1))
    rows = np.flatnonzero(keep.any(axis=1))
    tokens = factors.values.shape[2]
    first = np.empty((b, 2 * tokens + 2, 4 * C1), np.float32)       # rows not kept are never read
    for layer, m in enumerate((m1, m2)):
        values = np.ascontiguousarray(factors.values[layer, rows]).reshape(-1, C)
        first[rows, layer * tokens:(layer + 1) * tokens] = \
            _ext.linear(values, m, zeros, threads=threads).reshape(len(rows), tokens, -1)
    first[:, 2 * tokens] = beta1 @ m2
    first[:, 2 * tokens + 1] = beta2 @ weights.w1 + weights.b1
    mask_start = np.concatenate([[0], np.cumsum(keep[rows].sum(axis=1))]).astype(np.int64)
    return _ext.mask_upscaling_factored(e_t, factors.probs[0], factors.rstd[0], factors.probs[1], factors.rstd[1],
                                        first, rows.astype(np.int64), weights.ln_weight, weights.ln_bias,
                                        weights.eps, weights.w2, weights.b2, np.ascontiguousarray(hyper[keep]),
                                        mask_start, int(width), grid_rows, threads=threads)
