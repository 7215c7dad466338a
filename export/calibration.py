"""Calibrated rounding of the int8 weights (GPTQ: Frantar et al., "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023, arXiv:2210.17323).

The dynamic int8 recipe (``quantize.to_int8``) keeps ONNX Runtime's per-channel scales and run-time activation
quantization; only the rounding of each weight to its int8 grid changes. Round-to-nearest treats every weight
alone; GPTQ rounds the input channels one after another and spreads each rounding error over the channels not
yet rounded, weighted by the correlations of the layer's inputs on calibration images (``H = X^T X``), so that
the layer's output on those inputs moves least. It costs nothing at run time: the graph is the same, with other
int8 values.

Measured on LiteMedSAM's encoder, embedding cosine to fp32 on 18 images (the fixed and moving images of every
second labelled 2-D pair of ../shared/data; scratch measurements, ``benchmarks/int8_accuracy.py`` measures the
export as it is):

| int8 encoder | round to nearest | GPTQ, 4 synthetic phantoms (the default) | GPTQ, 24 images of the unlabelled pairs |
|---|---:|---:|---:|
| weights only (activations float) | 0.99834 | 0.99936 (8 phantoms) | 0.99967 |
| weights and activations (the export) | 0.99693 | 0.99800 | 0.99828 |

What is left is the activations' per-tensor quantization at run time. SmoothQuant-style channel scaling did not
help it (TinyViT's activation channels have no outliers: largest / median channel range 2-4): alpha 0.5 on every
product gave 0.99630 round to nearest, 0.99803 with GPTQ.
Most of that error comes from the MLPs' second products (fc2), whose input is the GELU output: quantizing one
product at a time (scratch: the rest float, round to nearest, 12 images of the labelled pairs; mean 1 - cosine), the ten
fc2 give 2.0e-3 of the whole encoder's 3.1e-3, each fc1 about 5e-5, qkv and proj 1e-5 to 5e-5. The GELU outputs
span [-0.17, 1.2..3.4] with 99% of them below 0.07..0.45, so one uint8 scale per tensor leaves them few levels.
Leaving every fc2 float (scratch; ``benchmarks/int8_accuracy.py`` with a patched quantizer) raised the embedding
cosine to 0.99891 and the mean best ROI IoU to 0.949, but kept only 70% of the fp32 pairs (issue 6 asks 90%): not
adopted, as it costs a third of a ViT's weight products. (ONNX Runtime's quantizer renames a Gemm to
``<name>_MatMul`` before it reads ``nodes_to_exclude``: exclude a Gemm by that name.)

Layout: a weight is keyed by the SHA-1 of its float32 bytes as [K, N] (input channels x output channels), so
the Hessians measured on the whole fp32 encoder also serve the encoder's parts (the same weights, cut into
other graphs).
"""
from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

DAMPING = 0.01   # of the mean diagonal of H, added to its diagonal (GPTQ's default)
BLOCK = 128      # input channels rounded per block before the trailing update


@dataclass
class Calibration:
    """GPTQ's input statistics for one model's weights (``input_hessians``), what they were measured on, and the
    roundings made from them, memoised per weight and range (the encoder's parts share its weights)."""

    hessians: dict[str, np.ndarray]
    label: str
    rounded: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def round(self, w: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``gptq_round`` of a [K, N] weight, or None for a weight the statistics do not cover."""
        key = weight_key(w)
        if key not in self.hessians:
            return None
        if (key, qmax) not in self.rounded:
            self.rounded[key, qmax] = gptq_round(w, self.hessians[key], qmax)
        return self.rounded[key, qmax]


def weight_key(w: np.ndarray) -> str:
    """SHA-1 of a [K, N] weight's float32 bytes (C order)."""
    return hashlib.sha1(np.ascontiguousarray(w, np.float32).tobytes()).hexdigest()


def weight_products(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """The MatMul/Gemm nodes whose second input is a 2-D initializer (the products int8 quantizes), each with the
    name of that initializer. Gemm with transA is not one of them."""
    weights = {init.name for init in model.graph.initializer if len(init.dims) == 2}
    out = []
    for node in model.graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in weights and not attrs.get("transA", 0):
            out.append((node, node.input[1]))
    return out


def as_kn(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """A product's weight as [K, N] (a Gemm with transB stores it as [N, K])."""
    transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    return w.T if transposed else w


def input_hessians(model_path: str | Path, inputs: Iterable[np.ndarray], input_name: str = "image",
                   threads: int = 2) -> dict[str, np.ndarray]:
    """``X^T X`` (float64 [K, K]) of every weight product's input X over ``inputs`` (model inputs as the fp32 graph
    at ``model_path`` takes them), keyed by ``weight_key`` of the product's [K, N] weight."""
    model = onnx.load(str(model_path))
    values = {init.name: init for init in model.graph.initializer}
    products = weight_products(model)
    keys = [weight_key(as_kn(node, numpy_helper.to_array(values[w]))) for node, w in products]
    probed = [node.input[0] for node, _ in products]
    graph_outputs = {o.name for o in model.graph.output}
    model.graph.output.extend([helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                               for name in dict.fromkeys(probed) if name not in graph_outputs])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    hessians: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:   # weights in a side file: graphs past protobuf's 2 GiB too
        probe = Path(tmp) / "probe.onnx"
        onnx.save_model(model, str(probe), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="probe.data")
        session = ort.InferenceSession(str(probe), options, providers=["CPUExecutionProvider"])
        for x in inputs:
            acts = dict(zip(probed, session.run(probed, {input_name: x})))
            for key, name in zip(keys, probed):
                a = acts[name].reshape(-1, acts[name].shape[-1])
                h = (a.T @ a).astype(np.float64)
                hessians[key] = hessians[key] + h if key in hessians else h
    return hessians


def gptq_round(w: np.ndarray, h: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Round a [K, N] weight to symmetric per-output-channel int8 on the grid round-to-nearest uses
    (scale = max |w[:, n]| / ``qmax``), in GPTQ's order with ``h`` ([K, K], the inputs' ``X^T X``).

    Returns (q int8 [K, N] in [-qmax, qmax], scale float32 [N]). Each channel keeps one value at +-qmax (its
    largest weight, rounded first in its column's turn, its error spread like any other), so that a quantizer
    given ``q * scale`` finds the same scale and the same q. With a diagonal ``h`` this is round-to-nearest, and so
    it is for the weights of inputs that are zero throughout ``h``.
    """
    w = np.array(w, np.float64)   # a copy: the updates below work on it
    k, n = w.shape
    absmax = np.abs(w).max(axis=0)
    scale = np.where(absmax > 0, absmax / qmax, 1.0)
    pinned_row = np.abs(w).argmax(axis=0)
    pinned_sign = np.sign(w[pinned_row, np.arange(n)])
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0     # inputs that never fired in calibration: rounded to nearest (they may fire later)
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += DAMPING * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T            # upper: inv(h) = u.T @ u
    q = np.zeros((k, n))
    for start in range(0, k, BLOCK):
        stop = min(start + BLOCK, k)
        block, errors = w[start:stop].copy(), np.zeros((stop - start, n))
        for i in range(stop - start):
            row = start + i
            qi = np.clip(np.round(block[i] / scale), -qmax, qmax)
            qi = np.where(pinned_row == row, pinned_sign * qmax, qi)
            q[row] = qi
            errors[i] = (block[i] - qi * scale) / u[row, row]
            block[i + 1:] -= np.outer(u[row, row + 1:stop], errors[i])
        w[stop:] -= u[start:stop, stop:].T @ errors
    return q.astype(np.int8), scale.astype(np.float32)
