"""PyTorch SAM -> ``encoder.onnx`` and ``decoder.onnx`` (graph contract: docs/contracts.md).

Both graphs are traced with the TorchScript exporter (``torch.onnx.export(dynamo=False)``), checked
with ``onnx.checker``, simplified with onnxslim, checked again and held to an operator allow-list.

Operator allow-list (``PORTABLE_OPS``): the operators of the standard ONNX domain that all three
execution providers this project targets run natively:

- TensorRT 10: onnx/onnx-tensorrt ``docs/operators.md`` (commit 96e7811, "TensorRT 10.0 supports
  operators in the inclusive range of opset 9 to opset 20"), rows marked ``Y``;
- ONNX Runtime CPU and CUDA: microsoft/onnxruntime ``docs/OperatorKernels.md``: every operator
  below has a kernel for float and float16 on both (LayerNormalization and Erf included).

It is not every op those lists support: it is the ops SAM ViT, TinyViT and the decoder wrapper
actually produce at opset 17, so a new op (for example after an exporter upgrade) fails the check
and has to be looked up and added on purpose. Int8 graphs add ``INT8_CPU_OPS``: ONNX Runtime's
dynamic quantization operators, which TensorRT does not parse (``DynamicQuantizeLinear`` and
``MatMulInteger`` are ``N`` in its table) and which ONNX Runtime CUDA runs only in part, so the
int8 variant is meant for the CPU execution provider.
"""
from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import onnxslim
import torch
import torch.nn.functional as F
from torch import nn

from samreg_rt.errors import ModelError
from samreg_rt.split_encoder import PART_INPUTS, PART_OUTPUTS

from .modeling.image_encoder import EncoderPart, global_blocks

MIN_OPSET = 17
ENCODER_IO = (["image"], ["image_embeddings"])
DECODER_IO = (["image_embeddings", "point_coords", "point_labels"], ["iou_predictions", "low_res_masks"])
DECODER_DYNAMIC_AXES = {
    "point_coords": {0: "B", 1: "N"},
    "point_labels": {0: "B", 1: "N"},
    "iou_predictions": {0: "B"},
    "low_res_masks": {0: "B"},
}
# The decoder split in two at the mask upscaling, so that the runtime upscales only the prompts whose
# predicted IoU passes its threshold (docs/contracts.md): decoder_tokens + decoder_masks = decoder.
DECODER_TOKENS_IO = (["image_embeddings", "point_coords", "point_labels"],
                     ["iou_predictions", "hyper_in", "image_tokens"])
DECODER_TOKENS_DYNAMIC_AXES = {
    "point_coords": {0: "B", 1: "N"},
    "point_labels": {0: "B", 1: "N"},
    "iou_predictions": {0: "B"},
    "hyper_in": {0: "B"},
    "image_tokens": {0: "B"},
}
DECODER_MASKS_IO = (["image_tokens", "hyper_in"], ["low_res_masks"])
DECODER_MASKS_DYNAMIC_AXES = {"image_tokens": {0: "B"}, "hyper_in": {0: "B", 1: "K"}, "low_res_masks": {0: "B", 1: "K"}}
# Queries per chunk of a ViT encoder's global attention in the export (``export_encoder``): chosen by
# benchmarks/global_attention_chunks.py (smaller chunks stay in the caches through the attention's
# additions and softmax; smaller still makes the graph's session slower to create).
GLOBAL_ATTENTION_QUERIES = 128
# Protobuf cannot serialise a message over 2 GiB: larger graphs keep their weights in one
# external-data file beside the graph (SAM ViT-H's fp32 encoder).
PROTOBUF_LIMIT = 2**31 - 1

PORTABLE_OPS = frozenset({
    "Add", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Div",
    "Equal", "Erf", "Expand", "Flatten", "Gather", "Gemm", "Identity", "LayerNormalization",
    "MatMul", "Mul", "Neg", "Pad", "Pow", "Range", "ReduceMean", "Relu", "Reshape", "Resize", "Shape",
    "Sigmoid", "Sin", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile",
    "Transpose", "Unsqueeze", "Where",
})
INT8_CPU_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "QuantizeLinear", "DequantizeLinear"})


class GraphCheckError(ModelError):
    """An exported graph that fails ``onnx.checker``, has a too-old opset or an op off the allow-list."""


class PromptDecoder(nn.Module):
    """SAM prompt encoder + mask decoder for ONNX export, batched over prompts.

    ``forward(image_embeddings [1,C,h,w], point_coords [B,N,2], point_labels [B,N])`` ->
    ``iou_predictions [B,K]``, ``low_res_masks [B,K,4h,4w]`` with K = 4 mask tokens (index 0 the
    single-mask output, 1..3 the multimask outputs). Coordinates are pixels of the S x S model frame;
    labels -1 padding, 0 background, 1 foreground, 2 / 3 box corners. There is no mask input: the
    dense prompt is SAM's ``no_mask_embed``.

    The function of Meta's ``PromptEncoder`` + ``MaskDecoder.predict_masks``, computed in an order
    that costs less per prompt (equal up to float rounding; ``samreg_export.parity`` holds every
    export to Meta's order):

    - the image embedding is never repeated per prompt: the first layer's image-side projections
      run once per call and broadcast over B (which also keeps B dynamic);
    - attention between the T prompt tokens and the hw image tokens never projects the image
      tokens per prompt. A token-to-image head's logits ``q_h W_k,h x^T`` are computed as
      ``(q_h W_k,h) x^T`` and its values as ``(A_h x) W_v,h^T``; an image-to-token head's logits
      as ``x (W_q,h^T k_h^T)`` and its output projection as ``A_h (v_h W_o,h^T)``. With 8 heads and
      T = 7 tokens these products have inner width 8T = 56 instead of the projections' 128
      (``_token_to_image``, ``_image_to_token``);
    - the stride-2, kernel-2 transposed convolutions of the mask upscaling, whose output pixels do
      not overlap, are matrix products on channel-last tokens (``masks``);
    - the dense positional encoding is a constant.
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        height, width = self.prompt_encoder.input_image_size
        if height != width:
            raise ValueError(f"model frame must be square, got {height}x{width}")
        self.input_size = float(height)
        with torch.no_grad():
            dense_pe = self.prompt_encoder.get_dense_pe()  # [1, C, h, w]
        self.embedding_hw = tuple(dense_pe.shape[-2:])
        self.register_buffer("image_pe", dense_pe.flatten(2).transpose(1, 2).contiguous())  # [1, hw, C]
        self.register_buffer("no_mask", self.prompt_encoder.no_mask_embed.weight.detach().reshape(1, -1, 1, 1))
        heads = self.mask_decoder.transformer.layers[0].cross_attn_image_to_token.num_heads
        self.register_buffer("head_eye", torch.eye(heads).reshape(1, heads, 1, heads, 1))

    def embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        """[B,N,2] pixels, [B,N] labels -> sparse prompt embeddings [B,N,C]."""
        coords = (point_coords + 0.5) / self.input_size
        embedding = self.prompt_encoder.pe_layer._pe_encoding(coords)
        labels = point_labels.unsqueeze(-1)
        embedding = torch.where(labels == -1, self.prompt_encoder.not_a_point_embed.weight, embedding)
        for i, point_embedding in enumerate(self.prompt_encoder.point_embeddings):
            embedding = embedding + point_embedding.weight * (labels == i)
        return embedding

    def forward(
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        iou_predictions, hyper_in, image_tokens = self.tokens(image_embeddings, point_coords, point_labels)
        return iou_predictions, self.masks(image_tokens, hyper_in)

    def tokens(
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything before the mask upscaling: -> ``iou_predictions [B,K]``, the hypernetwork
        outputs ``hyper_in [B,K,C/8]`` and the transformer's image tokens ``image_tokens [B,hw,C]``."""
        decoder = self.mask_decoder
        sparse = self.embed_points(point_coords, point_labels)
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)
        image = (image_embeddings + self.no_mask).flatten(2).transpose(1, 2)  # [1, hw, C]
        queries, keys = self._two_way_transformer(image, tokens)  # [B, T, C], [B, hw, C]
        num_masks = decoder.num_mask_tokens
        iou_predictions = decoder.iou_prediction_head(queries[:, 0, :])
        mask_tokens = queries[:, 1 : 1 + num_masks, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
        )  # [B, K, C/8]
        return iou_predictions, hyper_in, keys

    def masks(self, image_tokens: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
        """Mask upscaling: ``image_tokens [B,hw,C]``, ``hyper_in [B,K,C/8]`` (any K of the mask
        tokens' rows) -> low-resolution mask logits ``[B,K,4h,4w]``.

        Meta's ``output_upscaling`` (ConvTranspose 2x2/2, LayerNorm2d, GELU, ConvTranspose 2x2/2,
        GELU) on channel-last pixels: each transposed convolution maps every input pixel to its own
        2x2 output pixels, i.e. one matrix product with the kernel as a [C_in, 2*2*C_out] matrix;
        the pixel order (i, j, di, dj, di2, dj2) is undone once, on the K mask logits."""
        h, w = self.embedding_hw
        conv1, norm, _, conv2, _ = self.mask_decoder.output_upscaling
        x = _stride2_transposed_conv(image_tokens, conv1, h * w)     # [B, 4hw, C/4]
        x = F.gelu(F.layer_norm(x, (int(norm.weight.shape[0]),), norm.weight, norm.bias, norm.eps))
        x = F.gelu(_stride2_transposed_conv(x, conv2, 4 * h * w))    # [B, 16hw, C/8]
        logits = hyper_in @ x.transpose(1, 2)                         # [B, K, 16hw]
        logits = logits.unflatten(-1, (h, w, 2, 2, 2, 2))             # (i, j, di, dj, di2, dj2)
        return logits.permute(0, 1, 2, 4, 6, 3, 5, 7).flatten(2).unflatten(-1, (4 * h, 4 * w))

    def _two_way_transformer(self, keys: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta's ``TwoWayTransformer.forward`` on keys [1, hw, C] broadcast against tokens [B, T, C]."""
        transformer = self.mask_decoder.transformer
        key_pe, query_pe, queries = self.image_pe, tokens, tokens
        for i, layer in enumerate(transformer.layers):
            if layer.skip_first_layer_pe:
                queries = _attention(layer.self_attn, queries, queries, queries)
            else:
                q = queries + query_pe
                queries = queries + _attention(layer.self_attn, q, q, queries)
            queries = layer.norm1(queries)
            q, k = queries + query_pe, keys + key_pe
            # The first layer's image tokens are the image's alone: projected once per call.
            to_image = _attention if i == 0 else _token_to_image
            queries = layer.norm2(queries + to_image(layer.cross_attn_token_to_image, q, k, keys))
            queries = layer.norm3(queries + layer.mlp(queries))
            q, k = queries + query_pe, keys + key_pe
            if i == 0:
                update = _image_to_token_projected(layer.cross_attn_image_to_token, k, q, queries, self.head_eye)
            else:
                update = _image_to_token(layer.cross_attn_image_to_token, k, q, queries)
            keys = layer.norm4(keys + update)
        q, k = queries + query_pe, keys + key_pe
        update = _token_to_image(transformer.final_attn_token_to_image, q, k, keys)
        queries = transformer.norm_final_attn(queries + update)
        return queries, keys


def _attention(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Meta's SAM ``Attention.forward`` with batch axes that broadcast ([1,...] against [B,...])."""
    heads = attn.num_heads
    head_dim = attn.q_proj.out_features // heads
    q, k, v = (
        proj(x).unflatten(-1, (heads, head_dim)).transpose(1, 2)  # [b, heads, n, head_dim]
        for proj, x in ((attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v))
    )
    weights = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(head_dim), dim=-1)
    return attn.out_proj((weights @ v).transpose(1, 2).flatten(2))


def _heads(linear: nn.Linear, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A projection's weight [heads*d, C] and bias [heads*d] as [heads, d, C] and [heads, d]."""
    return linear.weight.unflatten(0, (heads, -1)), linear.bias.unflatten(0, (heads, -1))


def _token_to_image(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``attn(q=tokens [B,T,C], k=image [B,hw,C], v=image [B,hw,C])`` without projecting the image.

    Head h: logits ``(q_h W_k,h) k^T`` (the bias term ``q_h b_k,h`` is the same for every image token,
    so softmax drops it), values ``(A_h v) W_v,h^T + b_v,h`` (softmax rows sum to one)."""
    heads = attn.num_heads
    head_dim = attn.q_proj.out_features // heads
    w_k, _ = _heads(attn.k_proj, heads)
    w_v, b_v = _heads(attn.v_proj, heads)
    q = attn.q_proj(q).unflatten(-1, (heads, head_dim)).transpose(1, 2)       # [B, heads, T, d]
    q = (q @ w_k / math.sqrt(head_dim)).flatten(1, 2)                          # [B, heads*T, C]
    weights = torch.softmax(q @ k.transpose(1, 2), dim=-1)                     # [B, heads*T, hw]
    pooled = (weights @ v).unflatten(1, (heads, -1))                           # [B, heads, T, C]
    values = pooled @ w_v.transpose(1, 2) + b_v.unsqueeze(1)                   # [B, heads, T, d]
    return attn.out_proj(values.transpose(1, 2).flatten(2))


def _image_to_token(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``attn(q=image [B,hw,C], k=tokens [B,T,C], v=tokens [B,T,C])`` without projecting the image.

    Head h: logits ``q (W_q,h^T k_h^T) + b_q,h k_h^T``, output ``sum_h A_h (v_h W_o,h^T) + b_o``."""
    heads = attn.num_heads
    head_dim = attn.q_proj.out_features // heads
    w_q, b_q = _heads(attn.q_proj, heads)
    k = attn.k_proj(k).unflatten(-1, (heads, head_dim)).transpose(1, 2)       # [B, heads, T, d]
    keys = (k @ w_q / math.sqrt(head_dim)).flatten(1, 2)                       # [B, heads*T, C]
    offset = (k @ b_q.unsqueeze(-1) / math.sqrt(head_dim)).flatten(1)         # [B, heads*T]
    logits = q @ keys.transpose(1, 2) + offset.unsqueeze(1)                    # [B, hw, heads*T]
    return _image_to_token_output(attn, logits, v)


def _image_to_token_projected(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              head_eye: torch.Tensor) -> torch.Tensor:
    """``attn(q=image [1,hw,C], k=tokens [B,T,C], v=tokens [B,T,C])`` with the image shared by all B
    prompts: its query projection runs once and every head's logits come from one product with a
    block-diagonal [heads*d, heads*T] matrix of the prompts' keys; output as ``_image_to_token``."""
    heads = attn.num_heads
    head_dim = attn.q_proj.out_features // heads
    k = attn.k_proj(k).unflatten(-1, (heads, head_dim))                       # [B, T, heads, d]
    blocks = k.permute(0, 2, 3, 1).unsqueeze(3) * head_eye                     # [B, heads, d, heads, T]
    blocks = blocks.flatten(3, 4).flatten(1, 2) / math.sqrt(head_dim)         # [B, heads*d, heads*T]
    logits = attn.q_proj(q) @ blocks                                           # [B, hw, heads*T]
    return _image_to_token_output(attn, logits, v)


def _image_to_token_output(attn: nn.Module, logits: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax over each head's T tokens of ``logits [B,hw,heads*T]``, then ``sum_h A_h (v_h W_o,h^T) + b_o``,
    with ``b_o / heads`` added to every row of ``v_h W_o,h^T`` instead (each head's weights sum to one)."""
    heads = attn.num_heads
    head_dim = attn.q_proj.out_features // heads
    weights = torch.softmax(logits.unflatten(-1, (heads, -1)), dim=-1).flatten(2)   # [B, hw, heads*T]
    v = attn.v_proj(v).unflatten(-1, (heads, head_dim)).transpose(1, 2)            # [B, heads, T, d]
    w_o = attn.out_proj.weight.unflatten(1, (heads, head_dim)).permute(1, 2, 0)    # [heads, d, C]
    return weights @ ((v @ w_o).flatten(1, 2) + attn.out_proj.bias / heads)       # [B, hw, C]


def _stride2_transposed_conv(x: torch.Tensor, conv: nn.ConvTranspose2d, pixels: int) -> torch.Tensor:
    """``conv`` (kernel 2, stride 2) on channel-last pixels [B, P, C_in] (P = ``pixels``) ->
    [B, 4P, C_out], the four output pixels of input pixel p at rows 4p..4p+3 in (di, dj) order.
    One 2-D product with the bias added in it (a Gemm), not a batched MatMul and an Add."""
    c_in, c_out = conv.weight.shape[:2]
    weight = conv.weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out)             # [C_in, (di, dj, C_out)]
    out = torch.addmm(conv.bias.repeat(4), x.flatten(0, 1), weight)               # [B*P, 4*C_out]
    return out.unflatten(0, (-1, pixels)).unflatten(-1, (4, c_out)).flatten(1, 2)


def export_encoder(sam: nn.Module, path: str | Path, opset: int = MIN_OPSET) -> onnx.ModelProto:
    """Trace ``sam.image_encoder`` ([1,3,S,S] -> [1,C,h,w]), simplify, check, save; return the graph.

    A ViT's global-attention blocks are traced with ``query_rows`` set so that they attend for about
    ``GLOBAL_ATTENTION_QUERIES`` queries at a time: the same values, without holding the attention
    matrix of all queries (805 MB for ViT-B at 1024 px) and its relative-position sums at once."""
    size = int(sam.prompt_encoder.input_image_size[0])
    image = torch.zeros(1, 3, size, size)
    global_attention = [blk.attn for blk in getattr(sam.image_encoder, "blocks", ())
                        if getattr(blk, "window_size", None) == 0]
    try:
        for attn in global_attention:
            width = size // int(sam.image_encoder.patch_embed.proj.kernel_size[0])   # token grid width
            attn.query_rows = max(1, GLOBAL_ATTENTION_QUERIES // width)
        model = _trace(sam.image_encoder, (image,), *ENCODER_IO, None, opset)
    finally:
        for attn in global_attention:
            attn.query_rows = None
    embedding_shape = [1, sam.prompt_encoder.embed_dim, *sam.prompt_encoder.image_embedding_size]
    _set_static_shape(model.graph.output[0], embedding_shape)
    return _finish(model, path, PORTABLE_OPS)


def encoder_parts_supported(sam: nn.Module) -> bool:
    """Whether ``export_encoder_parts`` applies: a ViT encoder with global attention whose token grid width
    is a multiple of 16 and whose heads have at most 64 channels (``_ext.shared_attention``)."""
    encoder = sam.image_encoder
    blocks = global_blocks(encoder)
    if not blocks:
        return False
    attn = encoder.blocks[blocks[0]].attn
    head_dim = attn.qkv.out_features // 3 // attn.num_heads
    return encoder.embedding_size % 16 == 0 and head_dim <= 64


def export_encoder_parts(sam: nn.Module, directory: str | Path, opset: int = MIN_OPSET) -> list[Path]:
    """Trace a ViT encoder cut at each global block's attention core (``EncoderPart``) into
    ``encoder_part<i>.onnx`` in ``directory`` (one more part than global blocks); [] when
    ``encoder_parts_supported`` is false. ``samreg_rt.split_encoder.run_encoder_parts`` runs them."""
    if not encoder_parts_supported(sam):
        return []
    encoder = sam.image_encoder
    cuts: list[int | None] = [None, *global_blocks(encoder), None]
    size = int(sam.prompt_encoder.input_image_size[0])
    inputs: tuple[torch.Tensor, ...] = (torch.zeros(1, 3, size, size),)
    paths = []
    for i, (start, stop) in enumerate(zip(cuts[:-1], cuts[1:])):
        part = EncoderPart(encoder, start, stop).eval()
        names = (list(PART_INPUTS[0 if start is None else 1]), list(PART_OUTPUTS[0 if stop is not None else 1]))
        model = _trace(part, inputs, *names, None, opset)
        path = Path(directory) / f"encoder_part{i}.onnx"
        _finish(model, path, PORTABLE_OPS)
        paths.append(path)
        if stop is not None:
            with torch.no_grad():
                tokens, q = part(*inputs)[:2]
            inputs = (tokens, torch.zeros_like(q))
    return paths


def export_decoder(sam: nn.Module, path: str | Path, opset: int = MIN_OPSET) -> onnx.ModelProto:
    """Trace ``PromptDecoder(sam)`` with dynamic B and N, simplify, check, save; return the graph."""
    wrapper = PromptDecoder(sam).eval()
    model = _trace(wrapper, _decoder_example(wrapper), *DECODER_IO, DECODER_DYNAMIC_AXES, opset)
    return _finish(model, path, PORTABLE_OPS)


def export_decoder_tokens(sam: nn.Module, path: str | Path, opset: int = MIN_OPSET) -> onnx.ModelProto:
    """Trace ``PromptDecoder(sam).tokens`` (the decoder up to the mask upscaling) with dynamic B and N."""
    wrapper = PromptDecoder(sam).eval()
    model = _trace(_Method(wrapper, "tokens"), _decoder_example(wrapper), *DECODER_TOKENS_IO,
                   DECODER_TOKENS_DYNAMIC_AXES, opset)
    return _finish(model, path, PORTABLE_OPS)


def export_decoder_masks(sam: nn.Module, path: str | Path, opset: int = MIN_OPSET) -> onnx.ModelProto:
    """Trace ``PromptDecoder(sam).masks`` (the mask upscaling) with dynamic B and K."""
    wrapper = PromptDecoder(sam).eval()
    (h, w), channels = wrapper.embedding_hw, sam.prompt_encoder.embed_dim
    hyper_dim = sam.mask_decoder.output_hypernetworks_mlps[0].layers[-1].out_features
    args = (torch.zeros(2, h * w, channels), torch.zeros(2, 3, hyper_dim))
    model = _trace(_Method(wrapper, "masks"), args, *DECODER_MASKS_IO, DECODER_MASKS_DYNAMIC_AXES, opset)
    return _finish(model, path, PORTABLE_OPS)


def export_mask_upscaling(sam: nn.Module, path: str | Path) -> Path:
    """Write the mask upscaling's weights channel-last to ``path`` (.npz, atomically) for the runtime's
    CPU kernel (``samreg_rt.upscaling``): w1 [C, (di, dj, C1)], b1, ln_weight, ln_bias, eps,
    w2 [C1, (di2, dj2, C2)], b2, as ``PromptDecoder.masks`` uses them."""
    conv1, norm, _, conv2, _ = sam.mask_decoder.output_upscaling
    arrays = {}
    for name, conv in (("1", conv1), ("2", conv2)):
        c_in, c_out = conv.weight.shape[:2]
        arrays["w" + name] = conv.weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out)
        arrays["b" + name] = conv.bias.repeat(4)
    arrays.update(ln_weight=norm.weight, ln_bias=norm.bias, eps=torch.tensor(float(norm.eps)))
    path = Path(path)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        np.savez(f, **{k: v.detach().float().numpy() for k, v in arrays.items()})
    os.replace(f.name, path)
    return path


def export_two_way(sam: nn.Module, path: str | Path) -> Path:
    """Write the weights of the prompt encoder (points) and of the mask decoder up to the mask upscaling
    to ``path`` (.npz, atomically) for the runtime's CPU decoder (``samreg_rt.two_way``): the decoder's
    parameters by Meta's names (all but ``output_upscaling``), each LayerNorm's eps as ``<name>.eps``,
    and ``image_pe``, ``no_mask``, ``pe_gaussian``, ``point_embeddings``, ``not_a_point``,
    ``output_tokens``, ``input_size``, ``num_heads``, ``depth``."""
    wrapper = PromptDecoder(sam)
    decoder, prompt = sam.mask_decoder, sam.prompt_encoder
    arrays = {k: v for k, v in decoder.state_dict().items()
              if not k.startswith(("output_upscaling.", "iou_token.", "mask_tokens."))}
    arrays.update({f"{name}.eps": torch.tensor(float(m.eps)) for name, m in decoder.named_modules()
                   if isinstance(m, nn.LayerNorm)})
    transformer = decoder.transformer
    arrays.update(
        image_pe=wrapper.image_pe[0], no_mask=prompt.no_mask_embed.weight[0],
        pe_gaussian=prompt.pe_layer.positional_encoding_gaussian_matrix,
        point_embeddings=torch.cat([e.weight for e in prompt.point_embeddings]),
        not_a_point=prompt.not_a_point_embed.weight[0],
        output_tokens=torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight]),
        input_size=torch.tensor(wrapper.input_size),
        num_heads=torch.tensor(float(transformer.layers[0].cross_attn_image_to_token.num_heads)),
        depth=torch.tensor(float(len(transformer.layers))),
    )
    path = Path(path)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        np.savez(f, **{k: v.detach().float().numpy() for k, v in arrays.items()})
    os.replace(f.name, path)
    return path


class _Method(nn.Module):
    """One method of a module as a module's ``forward``, for tracing."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, *args: torch.Tensor):
        return getattr(self.module, self.method)(*args)


def _decoder_example(wrapper: PromptDecoder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tracing inputs of the prompt graphs: 2 prompts of 3 points (B, N not 1, so they stay dynamic)."""
    channels = wrapper.prompt_encoder.embed_dim
    h, w = wrapper.embedding_hw
    return (
        torch.zeros(1, channels, h, w),
        torch.full((2, 3, 2), 8.0),
        torch.tensor([[1.0, 0.0, -1.0], [2.0, 3.0, 1.0]]),
    )


def _trace(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]] | None,
    opset: int,
) -> onnx.ModelProto:
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} < {MIN_OPSET} (LayerNormalization needs 17)")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings (Meta's encoder turns traced sizes into Python numbers: static for a fixed
        # S; unfoldable strided Slice) and the TorchScript exporter's deprecation notice.
        warnings.simplefilter("ignore")
        path = Path(tmp) / "graph.onnx"
        torch.onnx.export(
            module.eval(), args, str(path), dynamo=False, opset_version=opset,
            input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
        return onnx.load(str(path))


def _set_static_shape(value: onnx.ValueInfoProto, shape: list[int]) -> None:
    """Pin a graph output's shape (the tracer leaves some encoder outputs' batch axis symbolic)."""
    dims = value.type.tensor_type.shape.dim
    del dims[:]
    for size in shape:
        dims.add().dim_value = int(size)


def _finish(model: onnx.ModelProto, path: str | Path, allowed: Iterable[str]) -> onnx.ModelProto:
    """Check, simplify with onnxslim, check against ``allowed``, save."""
    # The raw trace still computes static shapes at run time (Mod, Shape arithmetic); the
    # allow-list applies to the simplified graph, which folds them.
    check_graph(model, allowed=None)
    model = onnxslim.slim(model)
    check_graph(model, allowed)
    save_model(model, path)
    return model


def op_types(model: onnx.ModelProto) -> set[str]:
    """Operator types of the main graph and of every subgraph (``If``/``Loop`` bodies)."""
    found: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            found.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    visit(sub)

    visit(model.graph)
    return found


def onnx_opset(model: onnx.ModelProto) -> int:
    """Opset version of the default ONNX domain."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def check_graph(model: onnx.ModelProto, allowed: Iterable[str] | None = PORTABLE_OPS) -> set[str]:
    """Run ``onnx.checker`` (full, with shape inference), require opset >= 17 and every op in
    ``allowed`` (``None``: any op); return the op types. Raises ``GraphCheckError``."""
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            onnx.checker.check_model(model, full_check=True)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                save_model(model, Path(tmp) / "check.onnx")
                onnx.checker.check_model(str(Path(tmp) / "check.onnx"), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise GraphCheckError(f"graph {model.graph.name!r} fails onnx.checker: {e}") from e
    opset = onnx_opset(model)
    if opset < MIN_OPSET:
        raise GraphCheckError(f"graph {model.graph.name!r}: opset {opset} < {MIN_OPSET}")
    ops = op_types(model)
    unexpected = ops - set(ops if allowed is None else allowed)
    if unexpected:
        raise GraphCheckError(
            f"graph {model.graph.name!r} uses operators outside the allow-list: {sorted(unexpected)} "
            "(see samreg_export.onnx_export for how the list was made)"
        )
    return ops


def save_model(model: onnx.ModelProto, path: str | Path) -> list[Path]:
    """Write ``model`` to ``path`` atomically (temp files in the same directory + ``os.replace``).

    A graph over the protobuf limit keeps its weights in ``<name>.data`` beside it. Returns the
    files written (graph first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = model.ByteSize() >= PROTOBUF_LIMIT
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp:
        staged = Path(tmp) / path.name
        if external:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, str(staged))
        written = [staged] + ([Path(tmp) / (path.name + ".data")] if external else [])
        finals = [path.parent / f.name for f in written]
        for src, dst in reversed(list(zip(written, finals))):  # weights before the graph naming them
            os.replace(src, dst)
    stale = path.parent / (path.name + ".data")
    if not external and stale.exists():
        stale.unlink()
    return finals


def graph_files(path: str | Path) -> list[Path]:
    """A saved graph and, if it has one, its external-data file (as ``save_model`` returns them)."""
    path = Path(path)
    data = path.parent / (path.name + ".data")
    return [path, data] if data.exists() else [path]


def graph_io(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """Names, shapes (ints, or dim names for dynamic axes) and dtypes of the graph inputs/outputs."""

    def describe(values: Iterable[onnx.ValueInfoProto]) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
            out.append({"name": v.name, "shape": shape, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name})
        return out

    initializers = {i.name for i in model.graph.initializer}
    return {
        "inputs": describe(v for v in model.graph.input if v.name not in initializers),
        "outputs": describe(model.graph.output),
    }
