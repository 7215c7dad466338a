"""Time each samreg_rt._ext kernel against its numpy twin (tests/twins.py) on realistic sizes.

Run from the repository root: ``python benchmarks/kernels.py [--out benchmarks/results]``. Prints
a table of the best of a few runs in milliseconds and the speed-up, and writes it with the machine
to ``kernels.md`` and ``kernels.json`` in ``--out``; checks that both give identical results (the
float kernels resize_logits, mask_upscaling (both forms), linear, two_way_pass (both modes), two_way_factored
(both layers), shared_attention and linear_bf16, each in every build this CPU runs (the AVX2 builds of
mask_upscaling, linear, shared_attention, two_way_pass and two_way_factored where AVX-512 is the default; linear_bf16 with
plain and split weights, without and with its GELU epilogue, its twin rounding x and W to bfloat16 and summing in
float64, then GELU by scipy's erfc; linear_int8x3, precision int8x3's product, where the CPU has AVX512-VNNI), whose
twins compute in
float64: within 2e-5 of
the largest value; shared_attention_bf16 (a ViT-B global block's and, heads first, its windowed blocks'),
window_attention_bf16 (those blocks from their qkv product) and biased_attention_bf16 (LiteMedSAM's TinyViT blocks
from theirs), in each build this CPU runs (AMX tiles, AVX512-BF16): 99% of the values within 2e-5 of the largest,
all within a bfloat16 step). mask_upscaling, linear, linear_bf16, two_way_pass, two_way_factored and
shared_attention also get their achieved GFLOP/s. The kernels run on every CPU
this process may use (``threads=0``). Takes about two minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samreg_rt import _ext  # noqa: E402
from samreg_rt.amg import upscale_matrices  # noqa: E402
from samreg_rt.bf16_graph import aligned_empty, pack_bf16_weight, pack_int8x3_weight  # noqa: E402
from samreg_rt.preprocess import Frame  # noqa: E402
from samreg_rt.two_way import ImageTokenFactors  # noqa: E402
from tests import twins  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402  (benchmarks/common.py)

# the rows of a misaligned packed weight and of a misaligned output
MISALIGNED = ("linear_bf16 split amx, W 16 B off 64-B alignment", "linear_bf16 amx, out 16 B off 64-B alignment")


def shifted_copy(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` whose data starts 16 bytes past a 64-byte boundary."""
    out = aligned_empty((a.nbytes + 16,), np.uint8)[16:].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls, in milliseconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def sam_like_boxes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` boxes in a 1024 px frame, clustered round 32x32 grid centres as SAM's candidates are
    (several overlapping masks per prompt), scores rounded to 3 decimals (ties happen)."""
    centres = (np.stack(np.meshgrid(np.arange(32), np.arange(32)), -1).reshape(-1, 2) + 0.5) * 32
    c = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 4, (n, 2))
    half = rng.uniform(8, 120, (n, 2))
    boxes = np.clip(np.concatenate([c - half, c + half], axis=1), 0, 1024).astype(np.float32)
    scores = np.round(rng.uniform(0.8, 1.0, n), 3).astype(np.float32)
    return boxes, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    masks = rng.uniform(size=(100, 256, 256)) < rng.uniform(0.02, 0.3, size=(100, 1, 1))
    packed = _ext.pack_masks(masks)
    other = _ext.pack_masks(rng.uniform(size=(100, 256, 256)) < 0.1)
    boxes, scores = sam_like_boxes(rng, 6000)
    logits = rng.normal(0, 3, size=(1024, 256, 256)).astype(np.float32)
    sim = rng.uniform(-1, 1, size=(60, 60)).astype(np.float32)
    upscaling = twins.upscaling_inputs(rng, [3] * 8, 64, 64)  # 8 prompts of a 64x64 embedding, 3 masks each
    factored = twins.upscaling_factored_inputs(rng, [3] * 8, 64, 64)  # the same from factors (J 56)
    # products per prompt (not LayerNorm and GELU): the two convolutions on 4096 and 4 x 4096 pixels, the logits
    upscaling_flop = 8 * (4096 * 2 * 256 * 256 + 4 * 4096 * 2 * 64 * 128 + 16 * 4096 * 2 * 32 * 3)
    factored_up_flop = 8 * (4096 * 2 * 114 * 256 + 4 * 4096 * 2 * 64 * 128 + 16 * 4096 * 2 * 32 * 3)
    two_way = twins.two_way_inputs(rng, 8, True, 4096, 56, 56, 8)  # 8 prompts, shared 64x64 keys, 8 heads x 7
    two_way_out = np.empty((8, 4096, 256), np.float32)
    two_way_flop = 8 * 4096 * 4 * 2 * 256 * 56  # four products of 2 C J FLOPs per pixel and prompt
    # projected logits mode (SAM's first layer): 64 prompts, shared keys, qproj of 8 heads x d 16
    two_way_q = twins.two_way_qproj_inputs(rng, 64, True, 4096, 56, 56, 8, 16)
    two_way_q_out = np.empty((64, 4096, 256), np.float32)
    two_way_q_flop = 64 * 4096 * 2 * (56 * 16 + 3 * 56 * 256)  # logits J d, then three products of C J
    # the same layers on factors (two_way_factored) as mask generation runs them: 8 prompts of a point and the
    # padding point (J 56 = 8 heads x 7), a multimask final attention (J2 32), d 16; probs2 64-byte aligned as
    # ImageTokenFactors.empty allocates it (the kernel then streams it)
    factored_in = {first: twins.two_way_factored_inputs(rng, 8, 4096, 56, 56 if first else 32, 8, 16, first)
                   for first in (True, False)}
    factored_out = (ImageTokenFactors.empty(8, 4096, 56).probs[0], np.empty((8, 4096), np.float32))

    def factored_flop(first: bool) -> float:
        """Multiply-adds of two_way_factored per pixel and prompt (the Gram product's upper triangle), x 2."""
        j, j2, d = 56, 56 if first else 32, 16
        k = j if first else 2 * j + 1
        per_pixel = (2 if first else 4) * j * d + (0 if first else j * j) + k * (k + 1) / 2 + 2 * j2 * d + \
            k * j2 + j2 * (d + k)
        return 8 * 4096 * 2 * per_pixel

    lin_x = rng.normal(0, 1, (448, 256)).astype(np.float32)     # 7 prompts x 64 tokens through a 256 -> 2048 MLP
    lin_w = rng.normal(0, 1 / 16, (256, 2048)).astype(np.float32)
    lin_b = rng.normal(0, 1, 2048).astype(np.float32)
    lin_out = np.empty((448, 2048), np.float32)
    lin_flop = 2 * 448 * 256 * 2048
    # SAM's first token->image attention: 64 prompts x 7 tokens to a 64x64 embedding, 8 heads of d 16
    sa_q = rng.normal(0, 0.75, (448, 8, 16)).astype(np.float32)
    sa_k, sa_v = (rng.normal(0, 1, (4096, 8, 16)).astype(np.float32) for _ in range(2))
    sa_flop = 2 * 448 * 8 * 4096 * 2 * 16  # logits and weighted values: 2 d FLOPs each per row, head and key
    # a ViT-B global attention (64x64 tokens, 12 heads of d 64, relative-position terms), 512 of its 4096 queries
    vit_q = rng.normal(0, 0.125, (512, 12, 64)).astype(np.float32)
    vit_k, vit_v = (rng.normal(0, 1, (4096, 12, 64)).astype(np.float32) for _ in range(2))
    vit_rel_h, vit_rel_w = (rng.normal(0, 1, (512, 12, 64)).astype(np.float32) for _ in range(2))
    vit_flop = 2 * 512 * 12 * 4096 * 2 * 64
    # ViT-B's windowed blocks: 25 windows x 12 heads of 14 x 14 tokens, heads first, q scaled in the kernel
    win_q, win_k, win_v = (rng.normal(0, 1, (300, 196, 64)).astype(np.float32) for _ in range(3))
    win_rel_h, win_rel_w = (rng.normal(0, 1, (300, 196, 14)).astype(np.float32) for _ in range(2))
    win_out = np.empty_like(win_q)
    win_flop = 300 * 196 * 196 * 2 * 2 * 64

    def heads_first(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.swapaxes(0, 1))

    # the same blocks straight from their qkv product [25, 196, 3, 12, 64], the terms from the 14 x 14 x 64 tables
    qkv = rng.normal(0, 1, (25, 196, 3, 12, 64)).astype(np.float32)
    table_h, table_w = (rng.normal(0, 0.2, (14, 14, 64)).astype(np.float32) for _ in range(2))
    qkv_out = np.empty((25, 196, 12, 64), np.float32)

    def window_twin() -> np.ndarray:
        """window_attention_bf16's twin: q, k, v heads first, the terms in float64, shared_attention_bf16's twin."""
        q, k, v = (qkv[:, :, s].transpose(0, 2, 1, 3).reshape(300, 196, 64) for s in range(3))
        grid = q.reshape(300, 14, 14, 64).astype(np.float64)
        rel_h = np.einsum("nijc,iac->nija", grid, table_h).astype(np.float32).reshape(300, 196, 14)
        rel_w = np.einsum("nijc,jbc->nijb", grid, table_w).astype(np.float32).reshape(300, 196, 14)
        got = twins.shared_attention_bf16(*(heads_first(a) for a in (q * np.float32(0.125), k, v, rel_h, rel_w)))
        return heads_first(got).reshape(25, 12, 196, 64).transpose(0, 2, 1, 3)
    # LiteMedSAM's TinyViT attention blocks from their qkv product [B, L, G, 3, d] with the attention biases [G, L, L]:
    # its second stage (361 windows of 7 x 7 tokens, 4 heads) and third (25 windows of 14 x 14, 5 heads)
    tiny_vit = {shape: (rng.normal(0, 1, (*shape, 3, 32)).astype(np.float32),
                        rng.normal(0, 1, (shape[2], shape[1], shape[1])).astype(np.float32))
                for shape in ((361, 49, 4), (25, 196, 5))}

    def biased_twin(qkv: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """biased_attention_bf16's twin: each window as shared_attention_bf16's twin, token-major, with the bias."""
        q = qkv[:, :, :, 0] * np.float32(32 ** -0.5)
        return np.stack([twins.shared_attention_bf16(q[w], qkv[w, :, :, 1], qkv[w, :, :, 2], bias=bias.swapaxes(0, 1))
                         for w in range(len(qkv))])
    # a ViT-B MLP's first product (4096 tokens, 768 -> 3072), weights packed as the bf16 precisions pack them
    mlp_x = rng.normal(0, 1, (4096, 768)).astype(np.float32)
    mlp_w = (rng.normal(0, 1, (768, 3072)) / np.sqrt(768)).astype(np.float32)
    mlp_b, mlp_out = rng.normal(0, 1, 3072).astype(np.float32), aligned_empty((4096, 3072), np.float32)
    mlp_packed = {split: pack_bf16_weight(mlp_w, split) for split in (False, True)}
    mlp_flop = 2 * 4096 * 768 * 3072
    # the same split weight and an output 16 bytes off a 64-byte boundary (as numpy places large arrays): tile rows
    # across two lines
    mlp_shifted, mlp_out_shifted = (shifted_copy(a) for a in (mlp_packed[True], mlp_out))
    # the second MLP layer's shape (K 3072): its split weight is 3 MiB, more than a core's L2
    fc2_x = rng.normal(0, 1, (4096, 3072)).astype(np.float32)
    fc2_w = (rng.normal(0, 1, (3072, 768)) / np.sqrt(3072)).astype(np.float32)
    fc2_b, fc2_out = rng.normal(0, 1, 768).astype(np.float32), aligned_empty((4096, 768), np.float32)
    fc2_packed = {split: pack_bf16_weight(fc2_w, split) for split in (False, True)}
    frame = Frame((200, 200), (1024, 1024), 1024)              # the reference preset's working grid
    ry, rx = upscale_matrices(frame, (256, 256), (200, 200))

    cases: list[tuple[str, str, Callable[[], object], Callable[[], object], int]] = [
        ("pack_masks", "100x256x256",
         lambda: _ext.pack_masks(masks), lambda: twins.pack_masks(masks), 5),
        ("unpack_masks", "100x256x256",
         lambda: _ext.unpack_masks(packed, 256, 256),
         lambda: twins.unpack_masks(packed, 256, 256), 5),
        ("mask_areas", "100x256x256",
         lambda: _ext.mask_areas(packed), lambda: twins.mask_areas(packed), 5),
        ("intersection_matrix", "100x100, 256x256",
         lambda: _ext.intersection_matrix(packed, other),
         lambda: twins.intersection_matrix(packed, other), 3),
        ("iou_matrix", "100x100, 256x256",
         lambda: _ext.iou_matrix(packed, other), lambda: twins.iou_matrix(packed, other), 3),
        ("containment_matrix", "100x100, 256x256",
         lambda: _ext.containment_matrix(packed, packed),
         lambda: twins.containment_matrix(packed, packed), 3),
        ("box_nms", "6000 boxes, IoU 0.7",
         lambda: _ext.box_nms(boxes, scores, 0.7), lambda: twins.box_nms(boxes, scores, 0.7), 3),
        ("stability_scores", "1024x256x256",
         lambda: _ext.stability_scores(logits, 0.0, 1.0),
         lambda: twins.stability_scores(logits, 0.0, 1.0), 3),
        ("greedy_match", "60x60, tau 0",
         lambda: _ext.greedy_match(sim, 0.0, 0), lambda: twins.greedy_match(sim, 0.0, 0), 20),
        ("resize_logits", "1024x256x256 -> 200x200",
         lambda: _ext.resize_logits(logits, ry, rx), lambda: twins.resize_logits(logits, ry, rx), 3),
        ("shared_attention ViT", "512 rows, 12 heads, d 64",
         lambda: _ext.shared_attention(vit_q, vit_k, vit_v, vit_rel_h, vit_rel_w),
         lambda: twins.shared_attention(vit_q, vit_k, vit_v, vit_rel_h, vit_rel_w), 3),
    ]
    # the kernels with an AVX2 build, native(isa): each in the CPU's best build ("auto") and, where it differs
    # (on AVX-512 CPUs), in its AVX2 build, the rows named "<kernel> avx2"
    with_avx2 = [
        ("mask_upscaling", "8 prompts x 3 masks",
         lambda isa: _ext.mask_upscaling(**upscaling, isa=isa), lambda: twins.mask_upscaling(**upscaling), 3),
        ("mask_upscaling_factored", "8 prompts x 3 masks",
         lambda isa: _ext.mask_upscaling_factored(**factored, isa=isa),
         lambda: twins.mask_upscaling_factored(**factored), 3),
        ("two_way_pass", "8 prompts, 4096 px, J 56",
         lambda isa: _ext.two_way_pass(**two_way, out=two_way_out, isa=isa), lambda: twins.two_way_pass(**two_way), 5),
        ("two_way_pass qproj", "64 prompts, d 16",
         lambda isa: _ext.two_way_pass(**two_way_q, out=two_way_q_out, isa=isa), lambda: twins.two_way_pass(**two_way_q),
         3),
        ("linear", "448x256 -> 2048, ReLU",
         lambda isa: _ext.linear(lin_x, lin_w, lin_b, relu=True, out=lin_out, isa=isa),
         lambda: twins.linear(lin_x, lin_w, lin_b, relu=True), 30),
        *((f"two_way_factored {layer}", f"8 prompts, J 56, J2 {56 if first else 32}",
           lambda isa, first=first: _ext.two_way_factored(**factored_in[first], probs2=factored_out[0],
                                                          rstd2=factored_out[1], isa=isa),
           lambda first=first: twins.two_way_factored(**factored_in[first], pixels=4096)[0], 3)
          for layer, first in (("first", True), ("second", False))),
        ("shared_attention", "448 rows, 8 heads, d 16",
         lambda isa: _ext.shared_attention(sa_q, sa_k, sa_v, isa=isa), lambda: twins.shared_attention(sa_q, sa_k, sa_v),
         10),
    ]
    builds = {"auto": ""} | ({"avx2": " avx2"} if _ext.mask_upscaling_isa() == "avx512" else {})
    cases += [(name + suffix, size, lambda native=native, isa=isa: native(isa), twin, repeats)
              for name, size, native, twin, repeats in with_avx2 for isa, suffix in builds.items()]
    isas = [isa for isa, has in (("amx", _ext.has_amx_bf16()), ("avx512", _ext.has_avx512_bf16())) if has]
    for isa in isas:    # each build of linear_bf16 that this CPU runs (precisions bf16 and bf16x2)
        cases += [(f"linear_bf16 {isa}", "4096x768 -> 3072",
                   lambda isa=isa: _ext.linear_bf16(mlp_x, mlp_packed[False], mlp_b, out=mlp_out, isa=isa),
                   lambda: twins.linear_bf16(mlp_x, mlp_w, mlp_b), 5),
                  (f"linear_bf16 split {isa}", "4096x768 -> 3072",
                   lambda isa=isa: _ext.linear_bf16(mlp_x, mlp_packed[True], mlp_b, out=mlp_out, isa=isa),
                   lambda: twins.linear_bf16_split(mlp_x, mlp_w, mlp_b), 5)]
        cases += [(f"linear_bf16{split} gelu {isa}", "4096x768 -> 3072",
                   lambda isa=isa, packed=mlp_packed[bool(split)]: _ext.linear_bf16(
                       mlp_x, packed, mlp_b, out=mlp_out, isa=isa, activation="gelu"),
                   lambda twin=twin: twins.gelu(twin(mlp_x, mlp_w, mlp_b)), 5)
                  for split, twin in (("", twins.linear_bf16), (" split", twins.linear_bf16_split))]
        cases += [(f"linear_bf16{split} {isa}", "4096x3072 -> 768",
                   lambda isa=isa, packed=fc2_packed[bool(split)]: _ext.linear_bf16(fc2_x, packed, fc2_b, out=fc2_out,
                                                                                    isa=isa),
                   lambda twin=twin: twin(fc2_x, fc2_w, fc2_b), 5)
                  for split, twin in (("", twins.linear_bf16), (" split", twins.linear_bf16_split))]
    int8x3 = ("linear_int8x3", "linear_int8x3 gelu", "linear_int8x3 fc2") if _ext.has_avx512_vnni() else ()
    if int8x3:          # precision int8x3's product (AVX512-VNNI)
        mlp_int8x3, fc2_int8x3 = pack_int8x3_weight(mlp_w), pack_int8x3_weight(fc2_w)
        cases += [(int8x3[0], "4096x768 -> 3072",
                   lambda: _ext.linear_int8x3(mlp_x, *mlp_int8x3, mlp_b, out=mlp_out),
                   lambda: twins.linear_int8x3(mlp_x, mlp_w, mlp_b), 5),
                  (int8x3[1], "4096x768 -> 3072",
                   lambda: _ext.linear_int8x3(mlp_x, *mlp_int8x3, mlp_b, out=mlp_out, activation="gelu"),
                   lambda: twins.gelu(twins.linear_int8x3(mlp_x, mlp_w, mlp_b)), 5),
                  (int8x3[2], "4096x3072 -> 768",
                   lambda: _ext.linear_int8x3(fc2_x, *fc2_int8x3, fc2_b, out=fc2_out),
                   lambda: twins.linear_int8x3(fc2_x, fc2_w, fc2_b), 5)]
    if _ext.has_amx_bf16():
        cases += [(MISALIGNED[0], "4096x768 -> 3072",
                   lambda: _ext.linear_bf16(mlp_x, mlp_shifted, mlp_b, out=mlp_out, isa="amx"),
                   lambda: twins.linear_bf16_split(mlp_x, mlp_w, mlp_b), 5),
                  (MISALIGNED[1], "4096x768 -> 3072",
                   lambda: _ext.linear_bf16(mlp_x, mlp_packed[False], mlp_b, out=mlp_out_shifted, isa="amx"),
                   lambda: twins.linear_bf16(mlp_x, mlp_w, mlp_b), 5)]
    for isa in isas:    # the bfloat16 attention kernels in each build this CPU runs
        cases += [(f"shared_attention_bf16 ViT {isa}", "512 rows, 12 heads, d 64",
                   lambda isa=isa: _ext.shared_attention_bf16(vit_q, vit_k, vit_v, vit_rel_h, vit_rel_w, isa=isa),
                   lambda: twins.shared_attention_bf16(vit_q, vit_k, vit_v, vit_rel_h, vit_rel_w), 3),
                  (f"shared_attention_bf16 windows {isa}", "300 heads x 196 rows, d 64",
                   lambda isa=isa: _ext.shared_attention_bf16(win_q, win_k, win_v, win_rel_h, win_rel_w, scale=0.125,
                                                              heads_first=True, out=win_out, isa=isa),
                   lambda: heads_first(twins.shared_attention_bf16(
                       *(heads_first(a) for a in (win_q * np.float32(0.125), win_k, win_v, win_rel_h, win_rel_w)))),
                   3),
                  (f"window_attention_bf16 {isa}", "25 windows x 196 tokens x 12 heads, d 64",
                   lambda isa=isa: _ext.window_attention_bf16(qkv, table_h, table_w, scale=0.125, out=qkv_out, isa=isa),
                   window_twin, 3)]
        cases += [(f"biased_attention_bf16 {shape[0]}x{shape[1]} {isa}",
                   f"{shape[0]} windows x {shape[1]} tokens x {shape[2]} heads, d 32",
                   lambda isa=isa, shape=shape: _ext.biased_attention_bf16(*tiny_vit[shape], scale=32 ** -0.5, isa=isa),
                   lambda shape=shape: biased_twin(*tiny_vit[shape]), 3)
                  for shape in tiny_vit]
    upscaling_formula = "R (P 2 C 4C1 + 4P 2 C1 4C2 + 16P 2 C2 M), C 256, C1 64, C2 32"
    factored_formula = "R (P 2 (2J + 2) 4C1 + 4P 2 C1 4C2 + 16P 2 C2 M)"
    gflops = {"mask_upscaling": (upscaling_flop, upscaling_formula),
              "mask_upscaling_factored": (factored_up_flop, factored_formula),
              "linear": (lin_flop, "2 M K N"), "two_way_pass": (two_way_flop, "B P 4 2 C J"),
              "two_way_pass qproj": (two_way_q_flop, "B P 2 (J d + 3 C J)"),
              "two_way_factored first": (factored_flop(True),
                                         "B P 2 (2 J d + K(K+1)/2 + 2 J2 d + K J2 + J2 (d + K)), K = J"),
              "two_way_factored second": (factored_flop(False),
                                          "B P 2 (4 J d + J J + K(K+1)/2 + 2 J2 d + K J2 + J2 (d + K)), K = 2J + 1"),
              "shared_attention": (sa_flop, "R H P 2 2 d; and R H P exps"),
              "shared_attention ViT": (vit_flop, "R H P 2 2 d; and R H P exps"),
              **{f"shared_attention_bf16 ViT {isa}": (vit_flop, "R H P 2 2 d; and R H P exps") for isa in isas},
              **{f"shared_attention_bf16 windows {isa}": (win_flop, "H R P 2 2 d; and H R P exps") for isa in isas},
              **{f"window_attention_bf16 {isa}": (win_flop, "H R P 2 2 d; and H R P exps (the terms' H R 2 (kh + kw) d "
                                                            "not)") for isa in isas},
              **{f"biased_attention_bf16 {b}x{n} {isa}": (b * g * n * n * 2 * 2 * 32, "B G L L 2 2 d; and B G L L exps")
                 for isa in isas for b, n, g in tiny_vit},
              **{f"linear_bf16 {isa}": (mlp_flop, "2 M K N") for isa in isas},
              **{f"linear_bf16 split {isa}": (mlp_flop, "2 M K N (the product's: twice that run, W's two parts)")
                 for isa in isas},
              **{f"linear_bf16{split} gelu {isa}": (mlp_flop, "2 M K N (the product's; the GELU uncounted)")
                 for isa in isas for split in ("", " split")},
              **{name: (mlp_flop, "2 M K N (the product's: three int8 products run" + (", the GELU uncounted)"
                                                                                         if "gelu" in name else ")"))
                 for name in int8x3},
              MISALIGNED[0]: (mlp_flop, "2 M K N (the product's: twice that run, W's two parts)"),
              MISALIGNED[1]: (mlp_flop, "2 M K N")}
    gflops |= {name + suffix: gflops[name] for name, *_ in with_avx2 for suffix in builds.values()}
    float_kernels = ("resize_logits", "shared_attention ViT",
                     *(name + suffix for name, *_ in with_avx2 for suffix in builds.values()),
                     *(f"linear_bf16{split}{gelu} {isa}" for isa in isas for split in ("", " split")
                       for gelu in ("", " gelu")), *MISALIGNED, *int8x3)
    bf16_kernels = tuple(f"{name} {isa}" for isa in isas for name in (
        "shared_attention_bf16 ViT", "shared_attention_bf16 windows", "window_attention_bf16",
        *(f"biased_attention_bf16 {b}x{n}" for b, n, _ in tiny_vit)))

    info = machine()
    print(f"machine: {info}")
    print(f"{'kernel':<24} {'size':<24} {'C++ ms':>10} {'numpy ms':>10} {'speed-up':>9}")
    rows = []
    for name, size, native, twin, repeats in cases:
        got, want = native(), twin()
        for g, w in zip(got if isinstance(got, tuple) else (got,),
                        want if isinstance(want, tuple) else (want,)):
            if name in float_kernels:
                np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * float(np.abs(w).max()), err_msg=name)
            elif name in bf16_kernels:      # a weight may round to the other bfloat16 (tests/test_ext.py)
                err, scale = np.abs(g - w), float(np.abs(w).max())
                assert np.quantile(err, 0.99) <= 2e-5 * scale and err.max() <= 2.0 ** -8 * scale, name
            else:
                np.testing.assert_array_equal(g, w, err_msg=name)
        t_native = best_ms(native, repeats)
        t_twin = best_ms(twin, repeats)
        row = {"kernel": name, "size": size, "native_ms": t_native, "numpy_ms": t_twin, "speedup": t_twin / t_native}
        print(f"{name:<24} {size:<24} {t_native:>10.3f} {t_twin:>10.2f} {t_twin / t_native:>8.1f}x")
        if name in gflops:
            flop, formula = gflops[name]
            row.update(gflop_s=flop / t_native / 1e6, flops=formula)
            print(f"{'':<24} {'':<24} {row['gflop_s']:>10.1f} GFLOP/s (FLOPs = {formula})")
        rows.append(row)
    write_results(args.out, info, rows)


def write_results(out: Path, info: dict, rows: list[dict]) -> None:
    """kernels.md (the table, with the machine and the command) and kernels.json in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# samreg_rt._ext kernels against their numpy twins (tests/twins.py)", "",
             f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, SIMD {' '.join(info['simd_flags'])}; "
             f"fp32 kernels' build {info['fp32_kernels']}; Python {info['python']}, numpy {info['numpy']}. "
             "Command: `python benchmarks/kernels.py`. "
             "Best of a few runs each; the kernels on every CPU of the process, the twins in numpy (float64 for "
             "the float kernels, whose results agree within 2e-5 of the largest value; the others identical).", "",
             "| kernel | size | C++ ms | numpy ms | speed-up | GFLOP/s | FLOPs |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        gf = f"{r['gflop_s']:.1f}" if "gflop_s" in r else ""
        lines.append(f"| {r['kernel']} | {r['size']} | {r['native_ms']:.3f} | {r['numpy_ms']:.2f} | "
                     f"{r['speedup']:.1f}x | {gf} | {r.get('flops', '')} |")
    (out / "kernels.md").write_text("\n".join(lines) + "\n")
    (out / "kernels.json").write_text(json.dumps({"machine": info, "kernels": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
