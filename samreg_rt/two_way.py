"""SAM's prompt encoder and two-way transformer on the CPU without ONNX Runtime (``decoder_tokens``).

``decoder_tokens.onnx`` spends much of its time in memory-bound passes over the prompts' image
tokens (B x 4096 x 256 floats: residual adds, LayerNorms, the image-to-token softmax; its op types
in benchmarks/results/performance.md, section 2). Here the small token side (self-attention, MLPs,
LayerNorms and heads of the 5 + N prompt tokens) runs in numpy with its products in
``samreg_rt._ext.linear``, and each layer's image side per prompt is one fused pass of
``samreg_rt._ext.two_way_pass`` over the image tokens: the image-to-token attention update,
residual and LayerNorm, then the next token-to-image attention's softmax pooling over the new image
tokens. The first layer's token-to-image attention, whose image tokens are the image's own, is one
``samreg_rt._ext.shared_attention`` call on the image tokens projected once per image (``shared_image``,
which every prompt batch of the image reuses). The image tokens are never projected per prompt, as in
the exported graph (``samreg_export.onnx_export.PromptDecoder``); the first layer's have their query
projection computed once per image too (the pass's ``qproj``):

- token-to-image head h: logits ``(q_h W_k,h) x^T`` and pooled values ``(A_h x) W_v,h^T + b_v,h``;
- image-to-token head h: logits ``x (W_q,h^T k_h^T) + b_q,h k_h^T`` and output
  ``sum_h A_h (v_h W_o,h^T) + b_o``.

When ``decode_tokens`` returns the image tokens factored (``factors``, a two-layer transformer), the
image side of each layer runs on factors instead (``_factored_pass``, ``samreg_rt._ext.two_way_factored``):
a layer's image tokens lie, per pixel, in the span of the image's own token and at most 2J + 1 rows
of the prompt (J = heads x tokens), so every product with a prompt's vectors is a per-image feature
(``factored_image``, once per image) times a head's d-vector, plus products of inner width J or 2J + 1
with the attention weights; no image token of C channels is formed per prompt.

Outputs equal the graph's up to float rounding (tests/test_engine.py). Weights: ``two_way.npz``,
written by the export (``samreg_export.onnx_export.export_two_way``).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from samreg_rt import _ext
from samreg_rt.errors import InputError, ModelError

C = 256            # transformer width
MAX_TOKENS = 8     # the fused pass takes heads x tokens <= 64 (5 output tokens + up to 3 prompt points)


@dataclass(frozen=True)
class TwoWayWeights:
    """Weights of SAM's prompt encoder (points only) and mask decoder up to the mask upscaling.

    arrays: float32 arrays by Meta's parameter names under ``transformer.``, ``iou_prediction_head.``
    and ``output_hypernetworks_mlps.``, plus ``image_pe`` (hw, C), ``no_mask`` (C,), ``pe_gaussian``
    (2, C/2), ``point_embeddings`` (4, C), ``not_a_point`` (C,), ``output_tokens`` (5, C) (IoU
    token, then the 4 mask tokens) and the scalars ``input_size``, ``num_heads``, ``depth`` and each
    LayerNorm's ``<name>.eps``; digest: the sha256 of the .npz they were read from (a ``SharedImage``
    records it: ``decode_tokens`` rejects one prepared with other weights).
    """

    arrays: dict[str, np.ndarray]
    digest: str

    @classmethod
    def from_bytes(cls, data: bytes, path: Path) -> "TwoWayWeights":
        """Read the .npz written by the export; ``ModelError`` naming ``path`` when it is not one or
        lacks an array."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: np.array(npz[k], np.float32, order="C") for k in npz.files}
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: not a two-way transformer weights file ({exc})") from None
        needed = ["image_pe", "no_mask", "pe_gaussian", "point_embeddings", "not_a_point", "output_tokens",
                  "input_size", "num_heads", "depth"]
        missing = [k for k in needed if k not in arrays]
        if not missing:
            missing = [k for k in _parameter_names(int(arrays["depth"]), len(arrays["output_tokens"]) - 1)
                       if k not in arrays]
        if missing or arrays.get("image_pe", np.zeros((0, 0))).shape[1:] != (C,):
            raise ModelError(f"{path}: two-way transformer weights lack {missing or ['image_pe (hw, 256)']}")
        # each Linear's weight also transposed, (in, out), as _ext.linear takes it
        arrays.update({k + "_t": np.ascontiguousarray(v.T) for k, v in list(arrays.items())
                       if k.endswith(".weight") and v.ndim == 2})
        return cls(arrays, hashlib.sha256(data).hexdigest())

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def num_heads(self) -> int:
        return int(self.arrays["num_heads"])


@dataclass(frozen=True)
class ImageTokenFactors:
    """The final image tokens x2 of B prompts in factored form, for SAM's two-layer two-way transformer:
    ``y1 = keys + a1 @ values[0]``, ``x1 = LayerNorm_1(y1)``, ``y2 = x1 + a2 @ values[1]``,
    ``x2 = LayerNorm_2(y2)``. It is all the mask upscaling's first (linear) convolution needs
    (``upscaling.upscale_kept_factored``): its product with x2 then costs two products of inner width J
    instead of one of width C.

    keys: (hw, C), the image's own tokens (embedding plus the no-mask embedding), shared by the prompts;
    values: (2, B, J, C), each layer's image-to-token value rows (J = heads x tokens, the output
    projection folded in); probs: (2, B, hw/16, J, 16), the attention weights a (probs[l, b, p // 16, j,
    p % 16] = a_l[b, p, j]); rstd: (2, B, hw), each LayerNorm's 1 / sqrt(var + eps) per pixel; norms:
    each LayerNorm's (weight (C,), bias (C,), eps). ``empty`` makes a buffer for ``decode_tokens``.
    """

    keys: np.ndarray
    values: np.ndarray
    probs: np.ndarray
    rstd: np.ndarray
    norms: tuple[tuple[np.ndarray, np.ndarray, float], ...]

    @classmethod
    def empty(cls, capacity: int, hw: int, tokens: int) -> "ImageTokenFactors":
        """Buffers for up to ``capacity`` prompts of ``tokens`` (J) image-to-token keys on hw pixels (probs
        64-byte aligned: ``_ext.two_way_factored`` then streams its writes past the caches)."""
        if hw % 16:
            raise InputError(f"ImageTokenFactors: {hw} pixels; expected a multiple of 16")
        return cls(keys=np.empty((hw, C), np.float32), values=np.empty((2, capacity, tokens, C), np.float32),
                   probs=_aligned_empty((2, capacity, hw // 16, tokens, 16)),
                   rstd=np.empty((2, capacity, hw), np.float32), norms=())

    def __len__(self) -> int:
        return int(self.values.shape[1])

    def dense(self) -> np.ndarray:
        """x2 (B, hw, C) float32 from the factors (for the mask-upscaling graph; equal to the fused
        decoder's image tokens up to float rounding)."""
        b, hw = len(self), self.keys.shape[0]
        x = self.keys[None]
        for layer, (weight, bias, eps) in enumerate(self.norms):
            a = self.probs[layer].transpose(0, 1, 3, 2).reshape(b, hw, -1)
            y = x + a @ self.values[layer]
            mean = y.mean(axis=-1, keepdims=True)
            x = (y - mean) * self.rstd[layer][..., None] * weight + bias
        return np.ascontiguousarray(x, np.float32)


@dataclass(frozen=True)
class SharedImage:
    """What the first layer of the two-way transformer computes from the image alone, for every prompt
    batch of one image (``shared_image``; ``decode_tokens`` takes it in place of the embedding).

    embedding: (1, C, h, w), as given; keys: (1, hw, C) the image tokens (embedding plus the no-mask
    embedding); t2i_keys, t2i_values: (hw, heads, d) the first token-to-image attention's keys (scaled by
    1/sqrt(d)) and values; i2t_queries: (hw, heads*d) the first image-to-token attention's queries;
    features: for a two-layer transformer, ``factored_image``'s per-pixel features of each layer (None
    otherwise); weights_digest: the ``TwoWayWeights.digest`` of the weights they were computed with.
    """

    embedding: np.ndarray
    keys: np.ndarray
    t2i_keys: np.ndarray
    t2i_values: np.ndarray
    i2t_queries: np.ndarray
    weights_digest: str
    features: tuple[np.ndarray, np.ndarray] | None = None


def shared_image(w: TwoWayWeights, embedding: np.ndarray, threads: int = 0, factored: bool = True) -> SharedImage:
    """The image-only projections of the first layer for embedding (1, C, h, w) float32 (C-contiguous):
    computed once per image instead of once per ``decode_tokens`` call. threads: the products' thread
    limit (0: the CPUs this process may run on). factored: also the features that factored image tokens
    need (``factored_image``, for a two-layer transformer; ``decode_tokens`` with ``factors``)."""
    if embedding.ndim != 4 or embedding.shape[:2] != (1, C) or \
            embedding.shape[2] * embedding.shape[3] != len(w["image_pe"]):
        raise InputError(f"embedding: expected (1, {C}, h, w) with h*w = {len(w['image_pe'])}, got {embedding.shape}")
    heads, pe = w.num_heads, w["image_pe"]
    keys = np.ascontiguousarray((embedding.reshape(C, -1).T + w["no_mask"])[None])    # (1, hw, C)
    name = "transformer.layers.0"
    t2i_keys = _linear(w, f"{name}.cross_attn_token_to_image.k_proj", keys[0] + pe, threads=threads)
    t2i_keys = t2i_keys.reshape(len(pe), heads, -1)
    t2i_keys /= np.sqrt(t2i_keys.shape[-1], dtype=np.float32)
    t2i_values = _linear(w, f"{name}.cross_attn_token_to_image.v_proj", keys[0], threads=threads)
    i2t_queries = _linear(w, f"{name}.cross_attn_image_to_token.q_proj", keys[0] + pe, threads=threads)
    features = factored_image(w, keys[0], i2t_queries, threads) if factored and int(w["depth"]) == 2 else None
    return SharedImage(embedding=embedding, keys=keys, t2i_keys=t2i_keys,
                       t2i_values=t2i_values.reshape(len(pe), heads, -1), i2t_queries=i2t_queries,
                       weights_digest=w.digest, features=features)


def factored_image(w: TwoWayWeights, keys: np.ndarray, i2t_queries: np.ndarray, threads: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The per-image features that ``_ext.two_way_factored`` takes for each layer of a two-layer transformer,
    for image tokens keys (hw, C) and the first image-to-token attention's queries i2t_queries (hw, D): the
    image side then runs on factors (``_factored_pass``).

    With e the image tokens centred over the channels, ``eg = e * g1`` and ``et = eg - mean(eg)`` (g1, b1
    and g2, b2: the two layers' final LayerNorms), per pixel (D = heads * d columns each, zero where a layer
    has no such term):

    - first layer: Q = i2t_queries, R2 = e W_o1 (its output projection, transposed), Kf = eg W_k^T and
      KPf = (pe + b1) W_k^T, V = eg W_v^T (the second layer's token-to-image keys and values), E2 = |e|^2,
      s0 = e . b_o1;
    - second layer: Q = eg W_q2^T and QP = (pe + b1) W_q2^T + b_q2 (its image-to-token queries),
      R1 = (et * g1) W_o1, R2 = et W_o2, Kf = (et * g2) W_kf^T, KPf = (pe + b2) W_kf^T and
      V = (et * g2) W_vf^T (the final attention's keys and values), E2 = |et|^2, sigma = sum(et * g1),
      s1 = (et * g1) . b_o1 and s0 = et . (b_o2 + b1).

    -> two float32 arrays (blocks, 7 D + 4, 48), 64-byte aligned: feature f of pixel 48 i + l at [i, f, l],
    zero past hw."""
    l0, l1, fa = "transformer.layers.0", "transformer.layers.1", "transformer.final_attn_token_to_image"
    g1, b1 = w[f"{l0}.norm4.weight"], w[f"{l0}.norm4.bias"]
    g2, b2 = w[f"{l1}.norm4.weight"], w[f"{l1}.norm4.bias"]
    pe = w["image_pe"]
    e = keys - keys.mean(axis=-1, keepdims=True)
    eg = e * g1
    et = eg - eg.mean(axis=-1, keepdims=True)
    i2t1, i2t2, t2i2 = f"{l0}.cross_attn_image_to_token", f"{l1}.cross_attn_image_to_token", f"{l1}.cross_attn_token_to_image"
    none = np.zeros(i2t_queries.shape, np.float32)

    def product(x: np.ndarray, weight_t: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        bias = np.zeros(weight_t.shape[1], np.float32) if bias is None else bias
        return _ext.linear(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(weight_t), bias, threads=threads)

    e64, etg64, et64 = (x.astype(np.float64) for x in (e, et * g1, et))
    first = [i2t_queries, none, none, product(e, w[f"{i2t1}.out_proj.weight"]),
             product(eg, w[f"{t2i2}.k_proj.weight_t"]), product(pe + b1, w[f"{t2i2}.k_proj.weight_t"]),
             product(eg, w[f"{t2i2}.v_proj.weight_t"]),
             np.stack([np.square(e64).sum(axis=-1), np.zeros(len(e)), np.zeros(len(e)),
                       e64 @ w[f"{i2t1}.out_proj.bias"]], axis=1)]
    second = [product(eg, w[f"{i2t2}.q_proj.weight_t"]),
              product(pe + b1, w[f"{i2t2}.q_proj.weight_t"], w[f"{i2t2}.q_proj.bias"]),
              product(et * g1, w[f"{i2t1}.out_proj.weight"]), product(et, w[f"{i2t2}.out_proj.weight"]),
              product(et * g2, w[f"{fa}.k_proj.weight_t"]), product(pe + b2, w[f"{fa}.k_proj.weight_t"]),
              product(et * g2, w[f"{fa}.v_proj.weight_t"]),
              np.stack([np.square(et64).sum(axis=-1), etg64.sum(axis=-1), etg64 @ w[f"{i2t1}.out_proj.bias"],
                        et64 @ (w[f"{i2t2}.out_proj.bias"].astype(np.float64) + b1)], axis=1)]
    return _blocks(first), _blocks(second)


def _blocks(columns: list[np.ndarray]) -> np.ndarray:
    """Per-pixel columns [(hw, n_i)] -> float32 (blocks, sum n_i, 48), 64-byte aligned, zero past hw."""
    features = np.concatenate([c.astype(np.float32) for c in columns], axis=1)
    blocks = -(-len(features) // 48)
    padded = np.zeros((blocks * 48, features.shape[1]), np.float32)
    padded[:len(features)] = features
    out = _aligned_empty((blocks, features.shape[1], 48))
    out[...] = padded.reshape(blocks, 48, -1).transpose(0, 2, 1)
    return out


def _aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised float32 array of this shape whose data is 64-byte aligned."""
    size = int(np.prod(shape))
    raw = np.empty(size + 16, np.float32)
    start = (-raw.ctypes.data % 64) // 4
    return raw[start:start + size].reshape(shape)


def _parameter_names(depth: int, masks: int) -> list[str]:
    """The decoder parameters ``decode_tokens`` reads, for ``depth`` layers and ``masks`` mask tokens."""
    attentions = ["self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"]
    linears = [f"transformer.layers.{i}.{a}.{p}_proj" for i in range(depth) for a in attentions for p in "qkvo"]
    linears += [f"transformer.layers.{i}.mlp.lin{j}" for i in range(depth) for j in (1, 2)]
    linears += [f"transformer.final_attn_token_to_image.{p}_proj" for p in "qkvo"]
    linears += ["iou_prediction_head.layers.0"] + [f"output_hypernetworks_mlps.{k}.layers.0" for k in range(masks)]
    norms = [f"transformer.layers.{i}.norm{j}" for i in range(depth) for j in (1, 2, 3, 4)]
    norms += ["transformer.norm_final_attn"]
    return [f"{n}.{p}".replace(".o_proj", ".out_proj") for n in linears for p in ("weight", "bias")] + \
        [f"{n}.{p}" for n in norms for p in ("weight", "bias", "eps")]


def _linear(w: TwoWayWeights, name: str, x: np.ndarray, relu: bool = False, *, threads: int) -> np.ndarray:
    """PyTorch's Linear ``name`` (then ReLU when ``relu``) over the last axis of x, as one 2-D product
    (``_ext.linear``: two threads without leaving spinning BLAS workers behind)."""
    weight_t = w[name + ".weight_t"]
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), np.float32)
    out = _ext.linear(x2, weight_t, w[name + ".bias"], relu=relu, threads=threads)
    return out.reshape(*x.shape[:-1], weight_t.shape[1])


def _layer_norm(w: TwoWayWeights, name: str, x: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + w[name + ".eps"]) * w[name + ".weight"] + w[name + ".bias"]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _heads(x: np.ndarray, heads: int) -> np.ndarray:
    """(B, T, heads*d) -> (B, heads, T, d)."""
    b, t, c = x.shape
    return x.reshape(b, t, heads, c // heads).transpose(0, 2, 1, 3)


def _attention(w: TwoWayWeights, name: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, threads: int) -> np.ndarray:
    """Meta's ``Attention`` among the prompt tokens: q, k, v (B, T, C) -> (B, T, C)."""
    heads = w.num_heads
    q, k, v = (_heads(_linear(w, f"{name}.{p}_proj", x, threads=threads), heads)
               for p, x in (("q", q), ("k", k), ("v", v)))
    a = _softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1], dtype=np.float32))
    out = (a @ v).transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1)
    return _linear(w, f"{name}.out_proj", out, threads=threads)


def _head_weights(w: TwoWayWeights, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A projection's weight (heads*d, C) and bias as (heads, d, C) and (heads, d)."""
    heads = w.num_heads
    weight, bias = w[name + ".weight"], w[name + ".bias"]
    return weight.reshape(heads, -1, weight.shape[1]), bias.reshape(heads, -1)


def _token_to_shared_image(w: TwoWayWeights, name: str, q: np.ndarray, image: "SharedImage", *,
                           threads: int) -> np.ndarray:
    """Token-to-image attention of tokens q (B, T, C) to the image's own tokens (the first layer's),
    projected once per image (``SharedImage``): every head of every token attends to them in one
    ``_ext.shared_attention`` call. -> (B, T, C)."""
    heads = w.num_heads
    b, t, _ = q.shape
    qh = _linear(w, f"{name}.q_proj", q, threads=threads).reshape(b * t, heads, -1)        # (B*T, heads, d)
    out = _ext.shared_attention(qh, image.t2i_keys, image.t2i_values, threads=threads)     # (B*T, heads, d)
    return _linear(w, f"{name}.out_proj", out.reshape(b, t, -1), threads=threads)


def _token_to_image_rows(w: TwoWayWeights, name: str, q: np.ndarray, *, threads: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Token-to-image logits rows: tokens q (B, T, C) -> (B, heads*T, C), row (h, t) = q_h W_k,h / sqrt(d)
    (the key bias adds the same to every image token's logit, which softmax drops), and the scaled head
    queries q_h / sqrt(d) (B, heads*T, d)."""
    heads = w.num_heads
    qh = _heads(_linear(w, f"{name}.q_proj", q, threads=threads), heads)    # (B, heads, T, d)
    scale = np.sqrt(qh.shape[-1], dtype=np.float32)
    w_k, _ = _head_weights(w, f"{name}.k_proj")
    rows = qh @ w_k / scale                                                  # (B, heads, T, C)
    b = q.shape[0]
    return (np.ascontiguousarray(rows.reshape(b, -1, q.shape[2])),
            np.ascontiguousarray((qh / scale).reshape(b, -1, qh.shape[-1])))


def _token_to_image_output(w: TwoWayWeights, name: str, pooled: np.ndarray, *, threads: int) -> np.ndarray:
    """Softmax-pooled image tokens (B, heads*T, C) -> the attention's output (B, T, C)."""
    heads = w.num_heads
    w_v, b_v = _head_weights(w, f"{name}.v_proj")
    b = pooled.shape[0]
    pooled = pooled.reshape(b, heads, -1, pooled.shape[-1])                  # (B, heads, T, C)
    return _head_output(w, name, pooled @ w_v.transpose(0, 2, 1) + b_v[:, None, :], threads=threads)


def _head_output(w: TwoWayWeights, name: str, values: np.ndarray, *, threads: int) -> np.ndarray:
    """An attention's head values (B, heads, T, d) -> its output (B, T, C)."""
    b, _, t, _ = values.shape
    return _linear(w, f"{name}.out_proj", values.transpose(0, 2, 1, 3).reshape(b, t, -1), threads=threads)


def _image_to_token_rows(w: TwoWayWeights, name: str, k: np.ndarray, v: np.ndarray, projected: bool, *,
                         threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Image-to-token attention with tokens k, v (B, T, C) as keys and values -> the fused pass's
    kq (B, heads*T, C) and koff (B, heads*T) (logits ``x . kq + koff`` of image token x) and vwo
    (B, heads*T, C) (output ``sum_j A_j vwo_j``, the output bias split evenly over the heads).
    ``projected``: for image tokens whose query projection the caller computes (the pass's ``qproj``):
    kq (B, heads*T, d) = k_h / sqrt(d) and koff 0. Also returns k_h / sqrt(d) and v_h, (B, heads*T, d) each."""
    heads = w.num_heads
    kh = _heads(_linear(w, f"{name}.k_proj", k, threads=threads), heads)    # (B, heads, T, d)
    scale = np.sqrt(kh.shape[-1], dtype=np.float32)
    k_scaled = kh / scale
    if projected:
        kq, koff = k_scaled, np.zeros(kh.shape[:3], np.float32)
    else:
        w_q, b_q = _head_weights(w, f"{name}.q_proj")
        kq = kh @ w_q / scale                                                # (B, heads, T, C)
        koff = np.einsum("bhtd,hd->bht", kh, b_q) / scale
    vh = _heads(_linear(w, f"{name}.v_proj", v, threads=threads), heads)    # (B, heads, T, d)
    w_o = w[f"{name}.out_proj.weight"]                                       # (C, heads*d)
    w_o = w_o.reshape(w_o.shape[0], heads, -1).transpose(1, 2, 0)            # (heads, d, C)
    vwo = vh @ w_o + w[f"{name}.out_proj.bias"] / heads                      # (B, heads, T, C)
    b, d = k.shape[0], kh.shape[-1]
    return (np.ascontiguousarray(kq.reshape(b, -1, kq.shape[-1])), np.ascontiguousarray(koff.reshape(b, -1)),
            np.ascontiguousarray(vwo.reshape(b, -1, C)), np.ascontiguousarray(k_scaled.reshape(b, -1, d)),
            np.ascontiguousarray(vh.reshape(b, -1, d)))


def embed_points(w: TwoWayWeights, point_coords: np.ndarray, point_labels: np.ndarray) -> np.ndarray:
    """Sparse prompt embeddings (B, N, C) of points (B, N, 2) in model-frame pixels with labels (B, N)."""
    coords = (point_coords + 0.5) / w["input_size"]
    coords = (2 * coords - 1) @ w["pe_gaussian"] * np.float32(2 * np.pi)
    emb = np.concatenate([np.sin(coords), np.cos(coords)], axis=-1)
    labels = point_labels[..., None]
    emb = np.where(labels == -1, w["not_a_point"], emb)
    for i, point in enumerate(w["point_embeddings"]):
        emb = emb + point * (labels == i)
    return emb.astype(np.float32)


def decode_tokens(w: TwoWayWeights, embedding: np.ndarray | SharedImage, point_coords: np.ndarray,
                  point_labels: np.ndarray,
                  out: np.ndarray | None = None, mask_outputs: tuple[int, ...] = (0, 1, 2, 3), threads: int = 0,
                  factors: ImageTokenFactors | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | ImageTokenFactors]:
    """``decoder_tokens`` of B prompts: embedding (1, C, h, w) float32 C-contiguous, or its ``shared_image``
    (which spares each call the first layer's image-only projections), point_coords (B, N, 2) and point_labels
    (B, N) float32 (N <= 3) -> iou_predictions (B, 4), hyper_in (B, K, C/8) of the K = len(mask_outputs)
    mask outputs asked for (0 single-mask, 1..3 multimask; distinct, in the order given), image_tokens
    (B, hw, C).

    Only the IoU token and the asked-for mask tokens leave the final token-to-image attention (the
    others' outputs are never read), so it pools for 1 + K of the 5 + N tokens: a quarter less work
    in the second pass for SAM's multimask outputs, a third for the single-mask one.

    out: optional float32 (B', hw, C), B' >= B, C-contiguous: image_tokens are computed in ``out[:B]``
    (and returned as that view), so that a caller decoding batch after batch reuses one buffer
    instead of page-faulting in a fresh 4 MB per prompt each time.

    threads: the kernels' thread limit (0: the CPUs this process may run on).

    factors: an ``ImageTokenFactors.empty`` buffer of at least B prompts (J = heads x (5 + N)): the image
    tokens are returned in factored form instead, views of its first B prompts, computed from factors
    throughout (``_factored_pass``: no image token of C channels is formed, and ``out`` is not written).

    numpy's BLAS runs on one thread here: its idle worker threads keep spinning for a while after a
    multithreaded product and would halve the speed of the two-thread passes that follow."""
    image = embedding if isinstance(embedding, SharedImage) else \
        shared_image(w, embedding, threads, factored=factors is not None)
    if image.weights_digest != w.digest:
        raise InputError(f"embedding: prepared with other weights (two-way transformer {image.weights_digest[:12]}), "
                         f"not these ({w.digest[:12]}): prepare it with this engine")
    b, hw = point_coords.shape[0], image.keys.shape[1]
    if out is None:
        out = np.empty((b if factors is None else 0, hw, C), np.float32)   # (not written with factors)
    elif out.dtype != np.float32 or out.ndim != 3 or out.shape[0] < b or out.shape[1:] != (hw, C) \
            or not out.flags.c_contiguous:
        raise InputError(f"out: expected a C-contiguous float32 buffer of at least ({b}, {hw}, {C}), got "
                         f"{out.dtype} {out.shape}")
    if factors is not None:
        tokens = w.num_heads * (5 + point_coords.shape[1])
        if int(w["depth"]) != 2 or len(factors) < b or factors.probs.shape[2:] != (hw // 16, tokens, 16):
            raise InputError(f"factors: expected a two-layer transformer and buffers of at least {b} prompts of "
                             f"{tokens} tokens on {hw} pixels, got {factors.probs.shape[1:]} (depth {int(w['depth'])})")
        if image.features is None:
            raise InputError("embedding: a SharedImage without the factored features (shared_image computes them) "
                             "cannot give factored image tokens")
    masks = w["output_tokens"].shape[0] - 1
    if not mask_outputs or len(set(mask_outputs)) != len(mask_outputs) or \
            not all(isinstance(k, (int, np.integer)) and 0 <= k < masks for k in mask_outputs):
        raise InputError(f"mask_outputs: expected distinct mask output indices in 0..{masks - 1}, got {mask_outputs}")
    with threadpool_limits(1, user_api="blas"):
        return _decode_tokens(w, image, point_coords, point_labels, out[:b], [int(k) for k in mask_outputs],
                              threads=threads, factors=factors)


def _decode_tokens(w: TwoWayWeights, image: SharedImage, point_coords: np.ndarray,
                   point_labels: np.ndarray, image_tokens: np.ndarray, mask_outputs: list[int], *,
                   threads: int, factors: ImageTokenFactors | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | ImageTokenFactors]:
    heads = w.num_heads
    b = point_coords.shape[0]
    if point_coords.shape[1] + 5 > MAX_TOKENS:
        raise InputError(f"prompts: the CPU decoder takes at most {MAX_TOKENS - 5} points per prompt")
    sparse = embed_points(w, point_coords, point_labels)
    tokens = np.concatenate([np.broadcast_to(w["output_tokens"], (b, *w["output_tokens"].shape)), sparse], axis=1)
    pe = w["image_pe"]
    keys = image.keys                                         # (1, hw, C): shared by the prompts
    if factors is not None:
        factors.keys[...] = keys[0]
    query_pe = tokens
    outputs = [0] + [1 + k for k in mask_outputs]          # the tokens read after the final attention
    depth = int(w["depth"])
    queries = _self_attention(w, 0, tokens, query_pe, threads=threads)
    # with factors each layer's image side runs on factors (_factored_pass), which returns the next
    # token-to-image attention's head values instead of its pooled image tokens
    values = first = None
    for i in range(depth):
        layer = f"transformer.layers.{i}"
        if i == 0:
            update = _token_to_shared_image(w, f"{layer}.cross_attn_token_to_image", queries + query_pe, image,
                                            threads=threads)
        elif factors is not None:
            update = _head_output(w, f"{layer}.cross_attn_token_to_image", values, threads=threads)
        else:        # the pass before pooled the image tokens for it
            update = _token_to_image_output(w, f"{layer}.cross_attn_token_to_image", pooled, threads=threads)
        queries = _layer_norm(w, f"{layer}.norm2", queries + update)
        mlp = _linear(w, f"{layer}.mlp.lin1", queries, relu=True, threads=threads)
        queries = _layer_norm(w, f"{layer}.norm3", queries + _linear(w, f"{layer}.mlp.lin2", mlp, threads=threads))
        # The first layer's image tokens are the image's alone: their query projection runs once per image.
        i2t = f"{layer}.cross_attn_image_to_token"
        qproj = image.i2t_queries if i == 0 else None
        kq, koff, vwo, k_heads, v_heads = _image_to_token_rows(w, i2t, queries + query_pe, queries,
                                                               projected=i == 0, threads=threads)
        # The next token-to-image attention's queries do not depend on the image tokens: the next
        # layer's self-attention runs now, so that one pass over the image tokens serves both.
        if i + 1 < depth:
            queries = _self_attention(w, i + 1, queries, query_pe, threads=threads)
            next_attention = f"transformer.layers.{i + 1}.cross_attn_token_to_image"
        else:        # the final attention: the IoU token and the asked-for mask tokens only
            queries, query_pe = queries[:, outputs], query_pe[:, outputs]
            next_attention = "transformer.final_attn_token_to_image"
        qk, q_heads = _token_to_image_rows(w, next_attention, queries + query_pe, threads=threads)
        if factors is not None:   # the attention weights and LayerNorm scales instead of image tokens
            factors.values[i, :b] = vwo
            means = vwo.mean(axis=-1, keepdims=True)
            centred = vwo - means
            values = _factored_pass(w, image.features[i], factors, i, b, k_heads, v_heads, centred, qk, q_heads,
                                    next_attention, first, kq, threads=threads)
            first = (v_heads, centred, means)
        else:                     # every layer writes its image tokens into image_tokens (the later ones in place)
            norm = (w[f"{layer}.norm4.weight"], w[f"{layer}.norm4.bias"], float(w[f"{layer}.norm4.eps"]))
            keys, pooled = _ext.two_way_pass(keys, pe, kq, koff, vwo, *norm, qk, heads, out=image_tokens,
                                             qproj=qproj, threads=threads)
    final = "transformer.final_attn_token_to_image"
    update = _head_output(w, final, values, threads=threads) if factors is not None else \
        _token_to_image_output(w, final, pooled, threads=threads)
    queries = _layer_norm(w, "transformer.norm_final_attn", queries + update)
    iou = _mlp_head(w, "iou_prediction_head", queries[:, 0], threads=threads)
    hyper = np.stack([_mlp_head(w, f"output_hypernetworks_mlps.{k}", queries[:, 1 + j], threads=threads)
                      for j, k in enumerate(mask_outputs)], axis=1)
    if factors is None:
        return iou.astype(np.float32), hyper.astype(np.float32), keys
    norms = tuple((w[f"transformer.layers.{i}.norm4.weight"], w[f"transformer.layers.{i}.norm4.bias"],
                   float(w[f"transformer.layers.{i}.norm4.eps"])) for i in range(depth))
    view = ImageTokenFactors(keys=factors.keys, values=factors.values[:, :b], probs=factors.probs[:, :b],
                             rstd=factors.rstd[:, :b], norms=norms)
    return iou.astype(np.float32), hyper.astype(np.float32), view


def _factored_pass(w: TwoWayWeights, features: np.ndarray, factors: ImageTokenFactors, i: int, b: int,
                   k_heads: np.ndarray, v_heads: np.ndarray, centred: np.ndarray, q_rows: np.ndarray,
                   q_heads: np.ndarray, next_attention: str,
                   first: tuple[np.ndarray, np.ndarray, np.ndarray] | None, kq: np.ndarray, *, threads: int
                   ) -> np.ndarray:
    """Layer i's image side (image-to-token attention, residual, LayerNorm) and the next token-to-image
    attention's pooling for B prompts, the image tokens in factored form (``_ext.two_way_factored`` on
    ``features``, layer i's ``factored_image`` features); fills layer i's probs and rstd in ``factors``
    (and reads layer 0's when i = 1) -> the next attention's head values (B, heads, T, d).

    k_heads, v_heads: the image-to-token keys / sqrt(d) and values per head (B, J, d) (centred: its value rows
    (B, J, C) minus each row's mean); q_rows, q_heads: the next attention's logit rows (B, J2, C) and
    queries / sqrt(d) per head; for i = 1, first: the first layer's (v_heads, centred, row means (B, J, 1)),
    and kq: the second's dense logit rows (B, J, C).

    Layer 0: y1 = e + a1 V1 minus its mean is e - mean(e) + c R with c = a1 and the rows R = V1 - mean;
    layer 1: x1 = r1 (e + a1 V1 - mean) * g1 + b1, so y2 = x1 + a2 V2 minus its mean is r1 et + c R with
    c = [r1 a1, a2, 1] and R = [centred (V1 - mean) * g1; V2 - mean; b1 - mean] (K = 2J + 1 rows). The
    kernel takes the Gram matrix R R^T and the rows' products with the logit rows (after LayerNorm i's
    weight g); the pooled coefficients of R go through the next attention's value projection here."""
    heads, tokens = w.num_heads, centred.shape[1]
    norm = f"transformer.layers.{i}.norm4"
    g = w[f"{norm}.weight"]
    previous = dict(probs1=None, rstd1=None, vh1=None, n=None, m1=None)
    rows = centred
    if i == 1:
        g1, b1 = w["transformer.layers.0.norm4.weight"], w["transformer.layers.0.norm4.bias"]
        first_v_heads, first_centred, first_means = first
        w1 = first_centred * g1
        rows = np.empty((b, 2 * tokens + 1, C), np.float32)
        np.subtract(w1, w1.mean(axis=-1, keepdims=True), out=rows[:, :tokens])
        rows[:, tokens:2 * tokens] = centred
        rows[:, 2 * tokens] = b1 - b1.mean()
        previous = dict(probs1=factors.probs[0, :b], rstd1=factors.rstd[0, :b], vh1=first_v_heads,
                        n=w1 @ kq.transpose(0, 2, 1), m1=first_means[..., 0])
    pooled = _ext.two_way_factored(features, k=k_heads, vh2=v_heads, qf=q_heads, gram=rows @ rows.transpose(0, 2, 1),
                                   mf=rows @ (q_rows * g).transpose(0, 2, 1), eps=float(w[f"{norm}.eps"]),
                                   heads=heads, probs2=factors.probs[i, :b], rstd2=factors.rstd[i, :b],
                                   threads=threads, **previous)
    d = q_heads.shape[-1]
    w_v, b_v = _head_weights(w, f"{next_attention}.v_proj")                                # (heads, d, C), (heads, d)
    pooled_rows = ((pooled[..., d:] @ rows) * g + w[f"{norm}.bias"]).reshape(b, heads, -1, C)   # (B, heads, T, C)
    # each token's own head of the value projection: one product per head
    own_head = pooled_rows.transpose(1, 0, 2, 3).reshape(heads, -1, C) @ w_v.transpose(0, 2, 1)  # (heads, B*T, d)
    own_head = own_head.reshape(heads, b, -1, d).transpose(1, 0, 2, 3) + b_v[:, None, :]
    return (pooled[..., :d].reshape(b, heads, -1, d) + own_head).astype(np.float32)


def _self_attention(w: TwoWayWeights, i: int, queries: np.ndarray, query_pe: np.ndarray, *,
                    threads: int) -> np.ndarray:
    """Layer i's self-attention among the tokens and its LayerNorm (the first layer's without the
    tokens' positional encoding and residual, as Meta's ``skip_first_layer_pe``)."""
    name = f"transformer.layers.{i}"
    if i == 0:
        queries = _attention(w, f"{name}.self_attn", queries, queries, queries, threads=threads)
    else:
        q = queries + query_pe
        queries = queries + _attention(w, f"{name}.self_attn", q, q, queries, threads=threads)
    return _layer_norm(w, f"{name}.norm1", queries)


def _mlp_head(w: TwoWayWeights, name: str, x: np.ndarray, *, threads: int) -> np.ndarray:
    """Meta's ``MLP``: linear layers ``name.layers.i`` with ReLU between them."""
    i = 0
    while f"{name}.layers.{i + 1}.weight" in w.arrays:
        x = _linear(w, f"{name}.layers.{i}", x, relu=True, threads=threads)
        i += 1
    return _linear(w, f"{name}.layers.{i}", x, threads=threads)
