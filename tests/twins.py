"""Numpy twins of the kernels in ``samreg_rt._ext``.

Each twin is a direct, unoptimised statement of what its kernel computes, including the float
widths and comparison precisions, so tests can demand bit-identical results. The kernels'
argument validation is not repeated here. The random-input builders at the end (SAM-like scales) are
shared by tests/test_ext.py and benchmarks/kernels.py.
"""
from __future__ import annotations

import numpy as np
from scipy import special


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """bool[N, H, W] -> uint64[N, ceil(H*W/64)]; bit i of word w is pixel w*64+i (row-major)."""
    n = masks.shape[0]
    pixels = masks.shape[1] * masks.shape[2]
    words = -(-pixels // 64)
    flat = np.zeros((n, words * 64), dtype=bool)
    flat[:, :pixels] = masks.reshape(n, pixels)
    packed = np.packbits(flat, axis=1, bitorder="little")
    return packed.view("<u8").astype(np.uint64).reshape(n, words)


def unpack_masks(packed: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint64[N, ceil(H*W/64)] -> bool[N, H, W]."""
    return _bits(packed)[:, : height * width].reshape(packed.shape[0], height, width)


def _bits(packed: np.ndarray) -> np.ndarray:
    """uint64[N, words] -> bool[N, words*64], padding bits included."""
    n, words = packed.shape
    as_bytes = packed.astype("<u8").view(np.uint8).reshape(n, words * 8)
    return np.unpackbits(as_bytes, axis=1, bitorder="little").astype(bool)


def mask_areas(packed: np.ndarray) -> np.ndarray:
    """uint64[N, words] -> int64[N] pixel counts."""
    return _bits(packed).sum(axis=1, dtype=np.int64)


def intersection_matrix(a_packed: np.ndarray, b_packed: np.ndarray) -> np.ndarray:
    """-> int64[Na, Nb] of |A_i & B_j|."""
    a = _bits(a_packed).astype(np.int64)
    b = _bits(b_packed).astype(np.int64)
    return a @ b.T


def iou_matrix(a_packed: np.ndarray, b_packed: np.ndarray) -> np.ndarray:
    """-> float32[Na, Nb]: float32(inter / union) in float64; 0 where the union is empty."""
    inter = intersection_matrix(a_packed, b_packed)
    union = mask_areas(a_packed)[:, None] + mask_areas(b_packed)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union.astype(np.float64), 0.0)
    return iou.astype(np.float32)


def containment_matrix(a_packed: np.ndarray, b_packed: np.ndarray) -> np.ndarray:
    """-> float32[Na, Nb]: float32(inter / min(|A_i|, |B_j|)) in float64; 0 if either is empty."""
    inter = intersection_matrix(a_packed, b_packed)
    small = np.minimum(mask_areas(a_packed)[:, None], mask_areas(b_packed)[None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(small > 0, inter / small.astype(np.float64), 0.0)
    return ratio.astype(np.float32)


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_thresh: float) -> np.ndarray:
    """torchvision.ops.nms (CPU kernel) in float32: stable descending sort by score, area
    (x2-x1)*(y2-y1), suppress float32 IoU > iou_thresh compared in float64. -> int64[K]."""
    x1, y1, x2, y2 = (boxes[:, k].astype(np.float32) for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(scores), dtype=bool)
    keep = []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[pos + 1:]
        rest = rest[~suppressed[rest]]
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):
            ovr = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[ovr.astype(np.float64) > iou_thresh]] = True
    return np.asarray(keep, dtype=np.int64)


def stability_scores(logits: np.ndarray, mask_threshold: float, offset: float) -> np.ndarray:
    """float32[N, H, W] -> float32[N]: |x > t+off| / |x > t-off|, thresholds rounded to float32,
    division in float32 (NaN for 0/0), as SAM's calculate_stability_score."""
    hi = np.float32(mask_threshold + offset)
    lo = np.float32(mask_threshold - offset)
    n_hi = (logits > hi).sum(axis=(1, 2)).astype(np.float32)
    n_lo = (logits > lo).sum(axis=(1, 2)).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (n_hi / n_lo).astype(np.float32)


def greedy_match(sim: np.ndarray, threshold: float, max_pairs: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The reference loop: while any entry > float32(threshold), take the row-major first argmax,
    record it and remove its row and column. -> (int64[K, 2], float32[K])."""
    s = sim.astype(np.float32).copy()
    thr = np.float32(threshold)
    pairs, values = [], []
    while s.size and np.any(s > thr):
        if max_pairs > 0 and len(pairs) >= max_pairs:
            break
        i, j = np.unravel_index(np.argmax(s), s.shape)
        pairs.append((i, j))
        values.append(sim[i, j])
        s[i, :] = -np.inf
        s[:, j] = -np.inf
    return (np.asarray(pairs, dtype=np.int64).reshape(-1, 2),
            np.asarray(values, dtype=np.float32))


def mask_upscaling(tokens: np.ndarray, rows: np.ndarray, w1: np.ndarray, b1: np.ndarray, ln_weight: np.ndarray,
                   ln_bias: np.ndarray, eps: float, w2: np.ndarray, b2: np.ndarray, hyper: np.ndarray,
                   mask_start: np.ndarray, width: int, grid_rows: int = -1) -> np.ndarray:
    """SAM's mask upscaling of the prompts ``tokens[rows]``, in float64 with the exact erf (the kernel
    approximates erf to 5e-7 and computes in float32: compare with a tolerance).

    tokens float32[B, hw, C] (pixels row-major on an h x width grid) -> @ w1 [C, (di, dj, c1)] + b1,
    LayerNorm over c1, GELU -> @ w2 [C1, (di2, dj2, c2)] + b2, GELU -> logits of mask m (of prompt
    rows[r] when mask_start[r] <= m < mask_start[r+1]) = activations . hyper[m], at output pixel
    (4i + 2di + di2, 4j + 2dj + dj2) -> float32[M, 4h, 4w], or its first 4 grid_rows rows (-1: all)."""
    z = tokens[rows].astype(np.float64) @ w1 + b1
    return _upscale_first_output(z, ln_weight, ln_bias, eps, w2, b2, hyper, mask_start, width, grid_rows)


def mask_upscaling_factored(e_t: np.ndarray, probs1: np.ndarray, rstd1: np.ndarray, probs2: np.ndarray,
                            rstd2: np.ndarray, first: np.ndarray, rows: np.ndarray, ln_weight: np.ndarray,
                            ln_bias: np.ndarray, eps: float, w2: np.ndarray, b2: np.ndarray, hyper: np.ndarray,
                            mask_start: np.ndarray, width: int, grid_rows: int = -1) -> np.ndarray:
    """mask_upscaling with the first convolution's output z given by factors, in float64: for prompt
    b = rows[r] and pixel p, x = [rstd1 rstd2 a1, rstd2 a2, rstd2, 1] (a1 = probs1[b, p // 16, :, p % 16], a2
    likewise, rstd1 and rstd2 of [b, p]) and z = x @ first[b] + rstd1 rstd2 e_t[p // 16, :, p % 16]."""
    batch, groups, tokens, lanes = probs1.shape
    e = e_t.astype(np.float64).transpose(0, 2, 1).reshape(groups * lanes, -1)         # [hw, 256]
    a1, a2 = (p.astype(np.float64).transpose(0, 1, 3, 2).reshape(batch, -1, tokens) for p in (probs1, probs2))
    r1, r2 = (r.astype(np.float64)[..., None] for r in (rstd1, rstd2))              # [B, hw, 1]
    x = np.concatenate([r1 * r2 * a1, r2 * a2, r2, np.ones_like(r2)], axis=-1)      # [B, hw, 2J + 2]
    z = np.einsum("bpk,bkc->bpc", x[rows], first[rows].astype(np.float64)) + (r1 * r2)[rows] * e
    return _upscale_first_output(z, ln_weight, ln_bias, eps, w2, b2, hyper, mask_start, width, grid_rows)


def _upscale_first_output(z: np.ndarray, ln_weight: np.ndarray, ln_bias: np.ndarray, eps: float, w2: np.ndarray,
                          b2: np.ndarray, hyper: np.ndarray, mask_start: np.ndarray, width: int,
                          grid_rows: int) -> np.ndarray:
    """The mask upscaling after the first convolution's output z float64[R, hw, (di, dj, c1)]: the logits' first
    4 grid_rows rows (-1: all)."""
    from scipy.special import erf

    def gelu(x: np.ndarray) -> np.ndarray:
        return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))

    rows, hw = z.shape[:2]
    c1, c2 = ln_weight.shape[0], hyper.shape[1]
    height = hw // width
    x = z.reshape(rows, hw, 4, c1)                                                  # [R, p, s1, c1]
    x = (x - x.mean(axis=-1, keepdims=True)) / np.sqrt(x.var(axis=-1, keepdims=True) + eps)
    x = gelu(x * ln_weight + ln_bias)
    y = gelu(x @ w2.astype(np.float64) + b2).reshape(rows, hw, 4, 4, c2)            # [R, p, s1, s2, c2]
    prompt_of = np.repeat(np.arange(rows), np.diff(mask_start))
    logits = np.einsum("mpstc,mc->mpst", y[prompt_of], hyper.astype(np.float64))  # [M, p, s1, s2]
    logits = logits.reshape(-1, height, width, 2, 2, 2, 2)                        # (i, j, di, dj, di2, dj2)
    out = logits.transpose(0, 1, 3, 5, 2, 4, 6).reshape(-1, 4 * height, 4 * width)
    return out[:, :4 * (height if grid_rows == -1 else grid_rows)].astype(np.float32)


def upscaling_factored_inputs(rng: np.random.Generator, counts: list[int], height: int, width: int,
                               tokens: int = 56, heads: int = 8) -> dict:
    """Random mask_upscaling_factored inputs with SAM-like scales: factors of len(counts) + 1 prompts of which
    all but the first are upscaled (in reverse order): attention weights summing to 1 within each head of
    tokens // heads, LayerNorm scales 0.5..2, first rows ~ N(0, 0.25^2), e_t ~ N(0, 1)."""
    prompts, hw = len(counts) + 1, height * width
    args = upscaling_inputs(rng, counts, height, width)
    del args["tokens"], args["w1"], args["b1"]

    def probs():
        logits = rng.normal(0, 2, (prompts, hw // 16, heads, tokens // heads, 16))
        a = np.exp(logits) / np.exp(logits).sum(axis=3, keepdims=True)
        return a.reshape(prompts, hw // 16, tokens, 16).astype(np.float32)

    return dict(e_t=rng.normal(0, 1, (hw // 16, 256, 16)).astype(np.float32),
                probs1=probs(), rstd1=rng.uniform(0.5, 2, (prompts, hw)).astype(np.float32),
                probs2=probs(), rstd2=rng.uniform(0.5, 2, (prompts, hw)).astype(np.float32),
                first=rng.normal(0, 0.25, (prompts, 2 * tokens + 2, 256)).astype(np.float32), **args)


def resize_logits(low: np.ndarray, ry: np.ndarray, rx: np.ndarray) -> np.ndarray:
    """float32[N, h, w] -> float32[N, H, W]: ry [H, h] @ low[n] @ rx.T [w, W], computed here in float64
    (the kernel sums in float32 over each weight row's non-zero band: compare with a tolerance)."""
    return np.matmul(ry.astype(np.float64), np.matmul(low.astype(np.float64), rx.T.astype(np.float64))).astype(np.float32)


def two_way_pass(keys: np.ndarray, pe: np.ndarray, kq: np.ndarray, koff: np.ndarray, vwo: np.ndarray,
                 ln_weight: np.ndarray, ln_bias: np.ndarray, eps: float, qk: np.ndarray, heads: int,
                 qproj: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The image side of one layer of SAM's two-way transformer, in float64 (the kernel computes in
    float32 with a polynomial exp and online softmax: compare with a tolerance).

    keys [Bk, P, C] (Bk 1: shared by the B prompts), pe [P, C], kq [B, J, C], koff [B, J], vwo [B, J, C],
    qk [B, J2, C]: x = keys + pe; logits x @ kq[b].T + koff[b], softmax within each of ``heads`` groups
    of J / heads consecutive tokens; y = keys + attention @ vwo[b]; z = LayerNorm(y) over C (biased
    variance); s = (z + pe) @ qk[b].T; pooled[b, j] = softmax over the P pixels of s[b, :, j] times z.
    -> (keys_out float32[B, P, C] = z, pooled float32[B, J2, C]).

    Projected logits mode, qproj [P, D] given (d = D / heads, kq [B, J, d]): the logit of token j (head
    h = j // (J / heads)) is qproj[p, h d:(h + 1) d] . kq[b, j] + koff[b, j] instead."""
    batch, tokens, _ = kq.shape
    k = np.broadcast_to(keys.astype(np.float64), (batch, *keys.shape[1:]))           # [B, P, C]
    pe64 = pe.astype(np.float64)
    if qproj is None:
        logits = np.einsum("bpc,bjc->bpj", k + pe64, kq.astype(np.float64)) + koff[:, None, :]
    else:
        q = qproj.astype(np.float64).reshape(qproj.shape[0], heads, -1)                # [P, heads, d]
        kqh = kq.astype(np.float64).reshape(batch, heads, tokens // heads, -1)         # [B, heads, T, d]
        logits = np.einsum("phc,bhtc->bpht", q, kqh).reshape(batch, -1, tokens) + koff[:, None, :]
    logits = logits.reshape(batch, -1, heads, tokens // heads)
    attn = np.exp(logits - logits.max(axis=-1, keepdims=True))
    attn = (attn / attn.sum(axis=-1, keepdims=True)).reshape(batch, -1, tokens)      # [B, P, J]
    y = k + attn @ vwo.astype(np.float64)
    z = (y - y.mean(axis=-1, keepdims=True)) / np.sqrt(y.var(axis=-1, keepdims=True) + eps)
    z = z * ln_weight.astype(np.float64) + ln_bias.astype(np.float64)
    s = np.einsum("bpc,bjc->bjp", z + pe64, qk.astype(np.float64))                   # [B, J2, P]
    weights = np.exp(s - s.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return z.astype(np.float32), (weights @ z).astype(np.float32)


def linear(x: np.ndarray, weight_t: np.ndarray, bias: np.ndarray, relu: bool = False) -> np.ndarray:
    """x [M, K] @ weight_t [K, N] + bias [N], then max(., 0) when ``relu``, in float64 (the kernel sums in
    float32: compare with a tolerance) -> float32 [M, N]."""
    y = x.astype(np.float64) @ weight_t.astype(np.float64) + bias.astype(np.float64)
    if relu:
        y = np.maximum(y, 0.0)
    return y.astype(np.float32)


def shared_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, rel_h: np.ndarray | None = None,
                     rel_w: np.ndarray | None = None) -> np.ndarray:
    """Softmax attention of query rows to keys shared by all of them, per head, in float64 (the kernel
    computes in float32 with a polynomial exp: compare with a tolerance): q [R, H, d], k and v [P, H, d] ->
    float32 [R, H, d], out[r, h] = sum_p softmax_p(q[r, h] . k[p, h] (+ rel_h[r, h, p // kw] +
    rel_w[r, h, p % kw] with rel_h [R, H, kh], rel_w [R, H, kw], P = kh kw)) v[p, h]."""
    logits = np.einsum("rhc,phc->rhp", q.astype(np.float64), k.astype(np.float64))
    if rel_h is not None:
        grid = rel_h.astype(np.float64)[..., :, None] + rel_w.astype(np.float64)[..., None, :]   # [R, H, kh, kw]
        logits += grid.reshape(logits.shape)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("rhp,phc->rhc", weights, v.astype(np.float64)).astype(np.float32)


def bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest even, as VCVTNEPS2BF16 for finite values), as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def linear_bf16(x: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """_ext.linear_bf16's product: bf16(x) [M, K] @ bf16(w) [K, N] + bias [N] in float64 (the tile unit sums the
    exact products in float32: compare with a tolerance) -> float32 [M, N]."""
    return linear(bf16(x), bf16(w), bias)


def linear_bf16_split(x: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """_ext.linear_bf16 with a split packing: bf16(x) @ (hi + lo) + bias, hi = bf16(w), lo = bf16(w - hi), in
    float64 -> float32 [M, N]."""
    hi = bf16(w)
    return linear(bf16(x), hi.astype(np.float64) + bf16(w - hi), bias)


def int8_parts(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 v (in [-127, 127]) -> int64 (hi, lo): hi = round(v), lo = round(256 (v - hi)) clipped to
    [-128, 127], nearest even, in float32."""
    v = np.asarray(v, np.float32)
    hi = np.rint(v)
    return hi.astype(np.int64), np.clip(np.rint((v - hi) * np.float32(256)), -128, 127).astype(np.int64)


def linear_int8x3(x: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """_ext.linear_int8x3's product of x [M, K] and the float32 weight W [K, N]: W's columns with scales
    s_w = max |W[:, n]| / 127 and x's rows with s = max |x[m]| / 127 (1 where all zero; float32), each as two
    int8 parts of v / scale; bias + s s_w (hi w_hi + (hi w_lo + lo w_hi) / 256) with the integer sums exact
    (float64 products of integers: every partial sum below 2^53) and the rest in float64 (the kernel combines and
    scales in float32: compare with a tolerance) -> float32 [M, N]."""
    x, w = np.asarray(x, np.float32), np.asarray(w, np.float32)
    s_w = np.abs(w).max(axis=0) / np.float32(127)
    s_w[s_w == 0] = 1
    s = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    s[s == 0] = 1
    w_hi, w_lo = (p.astype(np.float64) for p in int8_parts(w / s_w))
    hi, lo = (p.astype(np.float64) for p in int8_parts(x / s))
    whole, part = hi @ w_hi, hi @ w_lo + lo @ w_hi
    y = (whole + part / 256) * s.astype(np.float64) * s_w.astype(np.float64) + bias
    return y.astype(np.float32)


EXP_COEFFICIENTS = (0.00957007, 0.05591777, 0.24024744, 0.69312185, 0.9999993)   # 2^f on [-0.5, 0.5], f^4 first


def _fma32(a: np.ndarray, b: np.ndarray | float, c: np.ndarray | float) -> np.ndarray:
    """float32 a * b + c rounded once (the product of two float32 is exact in float64)."""
    return (np.asarray(a, np.float64) * np.float64(np.float32(b)) + np.asarray(c, np.float32)).astype(np.float32)


def exp_weights(logits: np.ndarray, top: np.ndarray) -> np.ndarray:
    """shared_attention_bf16's exp(logits - top) in float32: t = fma(logits, log2 e, -top log2 e), n = round(t),
    2^n p(t - n) with p the degree-4 polynomial EXP_COEFFICIENTS (relative error 2.7e-6)."""
    log2e = np.float32(1.44269504088896341)
    t = _fma32(logits, log2e, (-top * log2e).astype(np.float32))
    n = np.rint(t)
    f = (t - n).astype(np.float32)
    p = np.full_like(f, EXP_COEFFICIENTS[0])
    for c in EXP_COEFFICIENTS[1:]:
        p = _fma32(p, f, np.float32(c))
    return np.ldexp(p.astype(np.float64), np.maximum(n, -1000).astype(np.int64)).astype(np.float32)


def shared_attention_bf16(q: np.ndarray, k: np.ndarray, v: np.ndarray, rel_h: np.ndarray | None = None,
                          rel_w: np.ndarray | None = None, bias: np.ndarray | None = None) -> np.ndarray:
    """shared_attention with bfloat16 operands: l = float32(bf16(q) . bf16(k)) (+ the terms, or + ``bias`` [R, H,
    P] as biased_attention_bf16 adds it, in float32),
    e = exp_weights(l, max l), out = (sum_p bf16(e_p) bf16(v[p])) / sum_p e_p, the sums in float64 (the kernel
    sums in float32 in the tile unit's order: a weight within rounding of a bfloat16 rounding boundary may round
    the other way there) -> float32 [R, H, d]."""
    logits = np.einsum("rhc,phc->rhp", bf16(q).astype(np.float64), bf16(k).astype(np.float64)).astype(np.float32)
    if rel_h is not None:
        grid = rel_h[..., :, None] + rel_w[..., None, :]                                  # [R, H, kh, kw] float32
        logits = logits + grid.reshape(logits.shape)
    if bias is not None:
        logits = logits + bias
    weights = exp_weights(logits, logits.max(axis=-1, keepdims=True))
    sums = weights.astype(np.float64).sum(axis=-1, keepdims=True)
    return (np.einsum("rhp,phc->rhc", bf16(weights).astype(np.float64), bf16(v).astype(np.float64))
            / sums).astype(np.float32)


def two_way_qproj_inputs(rng: np.random.Generator, batch: int, shared: bool, pixels: int, tokens: int,
                         tokens2: int, heads: int, head_dim: int, logit_std: float = 3.0) -> dict:
    """two_way_inputs for the projected logits mode: qproj [P, heads * head_dim] ~ N(0, 1) and kq [B, J, head_dim]
    scaled so that the logits have a standard deviation of about ``logit_std``."""
    args = two_way_inputs(rng, batch, shared, pixels, tokens, tokens2, heads, logit_std)
    args["qproj"] = rng.normal(0, 1, (pixels, heads * head_dim)).astype(np.float32)
    args["kq"] = rng.normal(0, logit_std / np.sqrt(head_dim), (batch, tokens, head_dim)).astype(np.float32)
    return args


def upscaling_inputs(rng: np.random.Generator, counts: list[int], height: int, width: int) -> dict:
    """Random mask_upscaling inputs with SAM-like scales: tokens of len(counts) + 1 prompts [B, h*w, 256] of
    which all but the first are upscaled (in reverse order), weights, hyper rows per ``counts``."""
    prompts = len(counts)
    return dict(
        tokens=rng.normal(0, 1, (prompts + 1, height * width, 256)).astype(np.float32),
        rows=np.arange(prompts, 0, -1, dtype=np.int64),
        w1=rng.normal(0, 1 / 16, (256, 256)).astype(np.float32),
        b1=rng.normal(0, 0.1, 256).astype(np.float32),
        ln_weight=rng.normal(1, 0.1, 64).astype(np.float32),
        ln_bias=rng.normal(0, 0.1, 64).astype(np.float32),
        eps=1e-6,
        w2=rng.normal(0, 1 / 8, (64, 128)).astype(np.float32),
        b2=rng.normal(0, 0.1, 128).astype(np.float32),
        hyper=rng.normal(0, 1, (int(sum(counts)), 32)).astype(np.float32),
        mask_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        width=width,
    )


def two_way_inputs(rng: np.random.Generator, batch: int, shared: bool, pixels: int, tokens: int, tokens2: int,
                   heads: int, logit_std: float = 3.0) -> dict:
    """Random two_way_pass inputs with SAM-like scales: keys and pe ~ N(0, 1) (keys [1, P, 256] when
    ``shared``, else [batch, P, 256]), kq and qk scaled so that the logits have a standard deviation
    of about ``logit_std``, value rows and LayerNorm parameters near SAM's."""
    c = 256
    w_std = logit_std / np.sqrt(2 * c)  # x = keys + pe (and z + pe) has variance about 2 per channel
    return dict(
        keys=rng.normal(0, 1, (1 if shared else batch, pixels, c)).astype(np.float32),
        pe=rng.normal(0, 1, (pixels, c)).astype(np.float32),
        kq=rng.normal(0, w_std, (batch, tokens, c)).astype(np.float32),
        koff=rng.normal(0, 1, (batch, tokens)).astype(np.float32),
        vwo=rng.normal(0, 0.5, (batch, tokens, c)).astype(np.float32),
        ln_weight=rng.normal(1, 0.1, c).astype(np.float32),
        ln_bias=rng.normal(0, 0.1, c).astype(np.float32),
        eps=1e-5,
        qk=rng.normal(0, w_std, (batch, tokens2, c)).astype(np.float32),
        heads=heads,
    )


def two_way_factored(image: np.ndarray, probs1: np.ndarray | None, rstd1: np.ndarray | None, k: np.ndarray,
                     vh1: np.ndarray | None, vh2: np.ndarray, qf: np.ndarray, n: np.ndarray | None,
                     m1: np.ndarray | None, gram: np.ndarray, mf: np.ndarray, eps: float, heads: int, pixels: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_ext.two_way_factored`` in float64 (see its docstring for the formulas; the kernel computes in float32
    with a polynomial exp and online softmax: compare with a tolerance); probs1 None: the first layer (no
    r1 a1 nor constant row in c) -> (pooled float32[B, J2, d + K], probs2 float32[B, P/16, J, 16],
    rstd2 float32[B, P])."""
    batch = k.shape[0]
    tokens, tokens2, d = k.shape[1], qf.shape[1], k.shape[2]
    big_d = heads * d
    feats = image.astype(np.float64).transpose(0, 2, 1).reshape(-1, image.shape[1])[:pixels]      # [P, F]
    q, qp, r1f, r2f, kf, kpf, v = (feats[:, i * big_d:(i + 1) * big_d].reshape(pixels, heads, d) for i in range(7))
    e2, sigma, s1, s0 = feats[:, 7 * big_d:].T

    def hd(x, u):   # x [P, heads, d], u [B, J, d] -> [B, P, J]: each token's head
        per_head = u.shape[1] // heads
        return np.einsum("phc,bhtc->bpht", x, u.astype(np.float64).reshape(batch, heads, per_head, d)).reshape(
            batch, pixels, -1)

    if probs1 is None:
        r1 = np.ones((batch, pixels, 1))
        logits = hd(q, k).reshape(batch, pixels, heads, -1)       # the first layer reads no QP
    else:
        a1 = probs1.astype(np.float64).transpose(0, 1, 3, 2).reshape(batch, pixels, tokens)
        r1 = rstd1.astype(np.float64)[..., None]
        ra = r1 * a1
        logits = (r1 * hd(q, k) + hd(qp, k) + ra @ n.astype(np.float64)).reshape(batch, pixels, heads, -1)
    a2 = np.exp(logits - logits.max(axis=-1, keepdims=True))
    a2 = (a2 / a2.sum(axis=-1, keepdims=True)).reshape(batch, pixels, tokens)
    cx = (a2 * hd(r2f, vh2)).sum(-1) + s0 + (0 if probs1 is None else r1[..., 0] * s1)
    if probs1 is None:
        c = a2
    else:
        c = np.concatenate([ra, a2, np.ones((batch, pixels, 1))], axis=-1)
        cx += (ra * (hd(r1f, vh1) - sigma[:, None] * m1.astype(np.float64)[:, None, :])).sum(-1)
    sq = r1[..., 0] ** 2 * e2 + 2 * r1[..., 0] * cx + np.einsum("bpk,bkl,bpl->bp", c, gram.astype(np.float64), c)
    r2 = 1 / np.sqrt(np.maximum(sq, 0) / 256 + eps)
    s = r1 * r2[..., None] * hd(kf, qf) + hd(kpf, qf) + r2[..., None] * (c @ mf.astype(np.float64))   # [B, P, J2]
    weights = np.exp(s - s.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    own = v[:, np.repeat(np.arange(heads), tokens2 // heads)]                                      # [P, J2, d]
    pooled = np.concatenate([np.einsum("bpj,bp,pjc->bjc", weights, (r1[..., 0] * r2), own),
                             np.einsum("bpj,bp,bpk->bjk", weights, r2, c)], axis=-1)
    probs2 = a2.reshape(batch, pixels // 16, 16, tokens).transpose(0, 1, 3, 2)
    return pooled.astype(np.float32), probs2.astype(np.float32), r2.astype(np.float32)


def two_way_factored_inputs(rng: np.random.Generator, batch: int, pixels: int, tokens: int, tokens2: int, heads: int,
                            head_dim: int = 16, first: bool = False) -> dict:
    """Random two_way_factored inputs with the structure SAM gives them: features of a random image and
    value rows, probs1 a softmax within each head, rstd1 near 1, gram = R R^T of random rows R, logits of
    a few units; ``first``: the first layer's (probs1, rstd1, vh1, n and m1 None)."""
    big_d, k_rows = heads * head_dim, tokens if first else 2 * tokens + 1
    blocks = -(-pixels // 48)
    feats = np.zeros((blocks * 48, 7 * big_d + 4), np.float32)
    feats[:pixels, :7 * big_d] = rng.normal(0, 1, (pixels, 7 * big_d))
    feats[:pixels, 7 * big_d:] = np.stack([rng.uniform(200, 300, pixels), rng.normal(0, 3, pixels),
                                           rng.normal(0, 3, pixels), rng.normal(0, 3, pixels)], axis=1)
    image = feats.reshape(blocks, 48, -1).transpose(0, 2, 1)
    aligned = np.empty(image.size + 16, np.float32)
    start = (-aligned.ctypes.data % 64) // 4
    aligned = aligned[start:start + image.size].reshape(image.shape)
    aligned[...] = image
    logits = rng.normal(0, 2, (batch, pixels // 16, heads, tokens // heads, 16))
    probs1 = np.exp(logits) / np.exp(logits).sum(axis=3, keepdims=True)
    rows = rng.normal(0, 0.5, (batch, k_rows, 64))
    scale = 1 / np.sqrt(head_dim)
    args = dict(image=aligned, probs1=probs1.reshape(batch, pixels // 16, tokens, 16).astype(np.float32),
                rstd1=rng.uniform(0.5, 1.5, (batch, pixels)).astype(np.float32),
                k=rng.normal(0, scale, (batch, tokens, head_dim)).astype(np.float32),
                vh1=rng.normal(0, 0.5, (batch, tokens, head_dim)).astype(np.float32),
                vh2=rng.normal(0, 0.5, (batch, tokens, head_dim)).astype(np.float32),
                qf=rng.normal(0, scale, (batch, tokens2, head_dim)).astype(np.float32),
                n=rng.normal(0, 0.3, (batch, tokens, tokens)).astype(np.float32),
                m1=rng.normal(0, 0.1, (batch, tokens)).astype(np.float32),
                gram=(rows @ rows.transpose(0, 2, 1)).astype(np.float32),
                mf=rng.normal(0, 0.3, (batch, k_rows, tokens2)).astype(np.float32), eps=1e-5, heads=heads)
    return {**args, **dict(probs1=None, rstd1=None, vh1=None, n=None, m1=None)} if first else args


def gelu(y: np.ndarray) -> np.ndarray:
    """GELU(y) = y (1 + erf(y / sqrt 2)) / 2 = y erfc(-y / sqrt 2) / 2 in float64 (scipy's erfc: no cancellation
    in the negative tail): what linear_bf16(activation='gelu') applies to its float32 results."""
    y = np.asarray(y, dtype=np.float64)
    return 0.5 * y * special.erfc(-y / np.sqrt(2))
