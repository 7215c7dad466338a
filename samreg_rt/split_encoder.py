"""A ViT encoder run as ONNX graphs around the native global-attention kernel.

ONNX Runtime runs SAM ViT's global attention (every token to all 4096, with decomposed relative
position terms) as a product, two broadcast additions over the 12 x 4096 x 4096 logits, a softmax and
a second product: the additions and the softmax are memory-bound passes (benchmarks/isa_profile.md,
performance.md). The export cuts the encoder at each global block's attention core
(``samreg_export.modeling.image_encoder.EncoderPart``: ``encoder_part0.onnx`` ...); here the parts run
in turn and ``samreg_rt._ext.shared_attention`` computes each core (logits, terms, softmax and weighted
values per block of 8 queries, in the caches). Same embedding up to float rounding (tests/test_engine.py).
int8, bf16 and bf16x2 engines on CPUs with AVX512-BF16 run the cores in bfloat16 instead
(``_ext.shared_attention_bf16``: AMX tiles, else VDPBF16PS; ``Engine.load``'s ``encoder_attention``).
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from samreg_rt import _ext

PART_INPUTS = (("image",), ("tokens", "attention"))
PART_OUTPUTS = (("next_tokens", "q", "k", "v", "rel_h", "rel_w"), ("image_embeddings",))


ATTENTION_KERNELS = {"fp32": _ext.shared_attention, "bf16": _ext.shared_attention_bf16}


def run_encoder_parts(parts: list[ort.InferenceSession], image: np.ndarray, threads: int = 0,
                      attention: str = "fp32") -> np.ndarray:
    """image (1, 3, S, S) float32 -> the embedding (1, C, h, w): part 0 on the image, then for each global
    block its attention core and the next part on (tokens, attention). ``attention``: "fp32"
    (``_ext.shared_attention``) or "bf16" (``_ext.shared_attention_bf16``: AMX tiles or VDPBF16PS)."""
    core = ATTENTION_KERNELS[attention]
    out = parts[0].run(None, {"image": image})
    for part in parts[1:]:
        tokens, q, k, v, rel_h, rel_w = out
        out = part.run(None, {"tokens": tokens, "attention": core(q, k, v, rel_h, rel_w, threads=threads)})
    return out[0]
