"""An fp32 ONNX graph whose weight products run in bfloat16 (AMX tiles or AVX512-BF16), the rest in ONNX Runtime.

ONNX Runtime has no x86 bfloat16 GEMM, and its int8 products lose too much of LiteMedSAM's embedding for the
accuracy bounds of issue 6 (benchmarks/results/int8_accuracy.md: about 0.002 of embedding cosine, most of it the
weights' 8-bit rounding, benchmarks/results/int8_per_token.md; bfloat16 products keep it near 0.9999). ``Bf16Graph`` cuts a float32 graph at each product
of an activation with a constant weight (``Gemm``, or ``MatMul`` with its bias ``Add``), runs the pieces between
the cuts as ONNX Runtime sessions and each product with ``_ext.linear_bf16`` (weights rounded and packed once,
``pack_bf16_weight``). A GELU that follows a product (the erf form torch exports, directly or after a Reshape) runs
in the product's kernel, on each block of results while it is in the L1 cache, instead of as a pass of ONNX
Runtime over the MLP's widest tensor. With ``attention=True`` the attention cores with decomposed relative positions
(SAM ViT's windowed blocks: softmax(q k^T + terms) v over 25 windows x 12 heads at ViT-B's size) run in bfloat16
as well (AMX tiles, else AVX512-BF16's VDPBF16PS; ``find_attention``, ``AttentionStep``:
``_ext.shared_attention_bf16`` with q, k and v heads first, as the graph holds them), in place of ONNX Runtime's
float32 product, two broadcast additions over the logits, softmax and second product; where the export's nodes
allow, straight from the qkv product (``find_window_attention``, ``WindowAttentionStep``:
``_ext.window_attention_bf16`` reads q, k and v in the product's layout, computes the relative-position terms from
the constant tables and writes the result as the next product takes it, so that ONNX Runtime's transposes, split
and term products around the core go too). TinyViT's windowed attention (LiteMedSAM's encoder: softmax(scale q
k^T + attention biases) v) runs the same way from its qkv product (``find_biased_attention``,
``BiasedAttentionStep``: ``_ext.biased_attention_bf16``). Everything else (convolutions, normalisation) stays
float32.

The pieces are the graph's nodes in their (topological) order between two products, so each piece needs only
tensors made before it; each tensor is dropped after its last use. A piece of nothing but Reshapes to constant
shapes (between two products, where the export reshapes for its MatMuls) runs as numpy views (``ReshapeStep``):
as a session it would copy its output (9 ms for an MLP's 48 MB at ViT-B's size).

The packing and the runs allocate without numpy's request for transparent huge pages (``pages.small_pages``): the
products' fresh arrays of tens of MB then page-fault in without waiting for memory compaction (ViT-B bf16x2 in fresh
processes on the 2-core Xeon, benchmarks/results/huge_pages_bf16x2.md: engine load 2.87 s against 5.02 s with
huge pages, the first encoding 1.72 against 5.59 s, the second 1.56 against 1.55 s).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from samreg_rt import _ext
from samreg_rt.pages import small_pages

TILE = 32  # _ext.linear_bf16's padding of K and N (and linear_int8x3's of N)
WEIGHTS = ("bf16", "bf16x2", "int8x3")  # Bf16Graph's weight products


def round_bf16(a: np.ndarray) -> np.ndarray:
    """float32 array -> uint16 array of the same shape: the bfloat16 bits of each value, rounded to nearest even
    (as VCVTNEPS2BF16 for finite values)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def bf16_to_float(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits -> float32 values."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary (numpy's own
    allocations are only 16-byte aligned)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(nbytes + align, np.uint8)
    start = -buf.ctypes.data % align
    return buf[start:start + nbytes].view(dtype).reshape(shape)


def pack_bf16_weight(w: np.ndarray, split: bool = False) -> np.ndarray:
    """W float32 [K, N] -> uint16 [N32 / 32, K32 / 32, 2, 16, 16, 2], the layout of ``_ext.linear_bf16``: W rounded
    to bfloat16, K and N padded with zeros to multiples of 32 (K32, N32); element [p, c, t, i, n, e] is
    W[32 c + 2 i + e, 32 p + 16 t + n] (AMX B tiles: rows of 16 pairs of K, 16 columns each).
    ``split``: [N32 / 32, K32 / 32, 4, 16, 16, 2], W as hi + lo (hi = bf16(W), lo = bf16(W - hi)): t = 0, 1 hi's
    tiles, t = 2, 3 lo's. The array starts on a 64-byte boundary: each 64-byte tile row is then one cache line
    (a tile load from a misaligned copy touches twice the lines: the split product 6-17% slower in runs of
    ``benchmarks/kernels.py`` on this Xeon)."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"pack_bf16_weight: expected a [K, N] weight, got shape {w.shape}")
    k, n = w.shape
    kp, np_ = -(-k // TILE) * TILE, -(-n // TILE) * TILE
    padded = np.zeros((kp, np_), np.float32)
    padded[:k, :n] = w
    hi = round_bf16(padded)
    parts = [hi, round_bf16(padded - bf16_to_float(hi))] if split else [hi]
    tiles = [part.reshape(kp // TILE, 16, 2, np_ // TILE, 2, 16).transpose(3, 0, 4, 1, 5, 2) for part in parts]
    packed = aligned_empty((np_ // TILE, kp // TILE, 2 * len(parts), 16, 16, 2), np.uint16)
    packed[...] = np.concatenate(tiles, axis=2)
    return packed


def int8_parts(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """v float32 (values in [-127, 127]) -> (hi, lo), int32: hi = round(v), lo = round(256 (v - hi)) clipped to
    [-128, 127] (nearest even, in float32 as ``_ext.linear_int8x3`` rounds x); hi + lo / 256 is v to within 1 / 512
    (1 / 256 where lo clips)."""
    v = np.asarray(v, dtype=np.float32)
    hi = np.rint(v)
    lo = np.clip(np.rint((v - hi) * np.float32(256)), -128, 127)
    return hi.astype(np.int32), lo.astype(np.int32)


def int8x3_weight_parts(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W float32 [K, N] -> (hi, lo) int32 [K, N] and scale float32 [N]: each column over its scale
    s = max |W[:, n]| / 127 (1 for a zero column) as two int8 parts (``int8_parts``), W = s (hi + lo / 256) to
    about 16 significant bits."""
    w = np.asarray(w, dtype=np.float32)
    scale = np.abs(w).max(axis=0) / np.float32(127)
    scale[scale == 0] = 1
    return (*int8_parts(w / scale), scale.astype(np.float32))


def pack_int8x3_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W float32 [K, N] -> (packed uint8 [N32 / 32, K4 / 4, 2, 32, 4], scale float32 [N]), the layout of
    ``_ext.linear_int8x3``: ``int8x3_weight_parts`` stored as part + 128 (VPDPBUSD's unsigned operand), K padded
    to a multiple of 4 and N to one of 32 with zeros (stored 128); element [p, q, t, n, e] is part t (0: hi,
    1: lo) of W[4 q + e, 32 p + n]. The array starts on a 64-byte boundary (the kernel's aligned loads)."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"pack_int8x3_weight: expected a [K, N] weight, got shape {w.shape}")
    k, n = w.shape
    kq, np_ = -(-k // 4) * 4, -(-n // TILE) * TILE
    hi, lo, scale = int8x3_weight_parts(w)
    parts = np.zeros((2, kq, np_), np.int32)
    parts[0, :k, :n], parts[1, :k, :n] = hi, lo
    packed = aligned_empty((np_ // TILE, kq // 4, 2, TILE, 4), np.uint8)
    packed[...] = (parts + 128).reshape(2, kq // 4, 4, np_ // TILE, TILE).transpose(3, 1, 0, 4, 2)
    return packed, scale


@dataclass(frozen=True)
class WeightProduct:
    """output = input @ weight + bias over the last axis of input (then GELU where ``activation`` is "gelu");
    weight packed by ``pack_bf16_weight``."""
    input: str
    output: str
    weight: np.ndarray   # uint16, packed
    bias: np.ndarray     # float32 [N]
    depth: int           # K
    activation: str = "none"

    def result_size(self, x: np.ndarray) -> int:
        return x.size // self.depth * self.bias.shape[0]

    def run(self, x: np.ndarray, threads: int, out: np.ndarray | None = None) -> np.ndarray:
        """x (..., K) float32 -> (..., N); into ``out`` (M x N values, M the product of x's other axes) if given,
        else into a new 64-byte aligned array (the tiles' 64-byte row stores then write whole cache lines, a few
        % faster than into numpy's 16-byte aligned arrays: ``benchmarks/kernels.py``; Bf16Graph.run reuses them)."""
        if x.shape[-1] != self.depth:
            raise ValueError(f"{self.input}: expected {self.depth} channels in the last axis, got shape {x.shape}")
        rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, self.depth)
        shape = (rows.shape[0], self.bias.shape[0])
        out = aligned_empty(shape, np.float32) if out is None else out.reshape(shape)
        return self._product(rows, out, threads).reshape(*x.shape[:-1], self.bias.shape[0])

    def _product(self, rows: np.ndarray, out: np.ndarray, threads: int) -> np.ndarray:
        return _ext.linear_bf16(rows, self.weight, self.bias, out=out, threads=threads, activation=self.activation)


@dataclass(frozen=True)
class Int8x3Product(WeightProduct):
    """A ``WeightProduct`` from three int8 products (``_ext.linear_int8x3``, AVX512-VNNI): weight packed by
    ``pack_int8x3_weight``, ``w_scale`` its column scales."""
    w_scale: np.ndarray | None = None   # float32 [N]

    def _product(self, rows: np.ndarray, out: np.ndarray, threads: int) -> np.ndarray:
        return _ext.linear_int8x3(rows, self.weight, self.w_scale, self.bias, out=out, threads=threads,
                                  activation=self.activation)


@dataclass(frozen=True)
class Piece:
    """Nodes run by one ONNX Runtime session: its inputs from earlier steps, its outputs for later ones."""
    session: ort.InferenceSession
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class ReshapeStep:
    """An ONNX Reshape to a constant ``shape`` (0: the input's dimension there, -1: inferred) as a numpy view of
    its input, where the input is C-contiguous (a copy otherwise)."""
    input: str
    output: str
    shape: tuple[int, ...]

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.reshape(x, [x.shape[i] if d == 0 else d for i, d in enumerate(self.shape)])


def _reshapes(nodes: list[onnx.NodeProto], inits: dict[str, onnx.TensorProto]) -> list[ReshapeStep] | None:
    """``nodes`` as ReshapeSteps when all of them are Reshapes to a constant shape (allowzero 0), else None."""
    steps = []
    for node in nodes:
        allowzero = next((a.i for a in node.attribute if a.name == "allowzero"), 0)
        if node.op_type != "Reshape" or allowzero or node.input[1] not in inits:
            return None
        steps.append(ReshapeStep(node.input[0], node.output[0],
                                 tuple(int(d) for d in numpy_helper.to_array(inits[node.input[1]]))))
    return steps


class Found(NamedTuple):
    """A weight product of a graph, the indices of the nodes it replaces, and nodes to run in edited form
    (index: node)."""
    product: WeightProduct
    replaced: set[int]
    edits: dict[int, onnx.NodeProto]


def find_products(graph: onnx.GraphProto, weights: str = "bf16") -> dict[int, Found]:
    """The weight products of a graph, by the index of their first node. ``weights``: "bf16" (``pack_bf16_weight``),
    "bf16x2" (the same split as hi + lo) or "int8x3" (``pack_int8x3_weight``, ``Int8x3Product``).

    Gemm(A, B, C?) with B (and C) initializers, transA 0, alpha and beta 1; MatMul(A, B) with B a 2-D initializer,
    with the bias of the one Add that takes its output when the other term is a 1-D initializer of N values; then
    the GELU (``_gelu_nodes``) of that output, or of a Reshape that is its only use: the product applies it (the
    Reshape, edited, then gives the GELU's output).
    """
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    graph_outputs = {o.name for o in graph.output}
    products = {}
    for i, node in enumerate(graph.node):
        if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.input[0] in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.ndim != 2 or w.dtype != np.float32:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and attrs.get("transB", 0):
            w = w.T
        replaced, output, bias = {i}, node.output[0], np.zeros(w.shape[1], np.float32)
        if node.op_type == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                continue
            if len(node.input) > 2 and node.input[2]:
                if node.input[2] not in inits:
                    continue
                c = numpy_helper.to_array(inits[node.input[2]])
                if c.dtype != np.float32 or c.size != w.shape[1]:
                    continue
                bias = c.reshape(-1).copy()
        else:
            users = consumers.get(output, [])
            if len(users) == 1 and output not in graph_outputs:
                add = graph.node[users[0]]
                other = [name for name in add.input if name != output]
                if add.op_type == "Add" and len(other) == 1 and other[0] in inits:
                    c = numpy_helper.to_array(inits[other[0]])
                    if c.dtype == np.float32 and c.shape == (w.shape[1],):
                        bias, output = c.copy(), add.output[0]
                        replaced.add(users[0])
        activation, edits = "none", {}
        users = consumers.get(output, [])
        reshape = graph.node[users[0]] if len(users) == 1 else None
        if (gelu := _gelu_nodes(graph, output, consumers, inits, graph_outputs)) is not None:
            activation, output = "gelu", gelu[1]
            replaced |= gelu[0]
        elif (reshape is not None and reshape.op_type == "Reshape" and reshape.input[0] == output
              and output not in graph_outputs
              and (gelu := _gelu_nodes(graph, reshape.output[0], consumers, inits, graph_outputs)) is not None):
            activation = "gelu"
            replaced |= gelu[0]
            edited = onnx.NodeProto()
            edited.CopyFrom(reshape)
            edited.output[0] = gelu[1]
            edits[users[0]] = edited
        if weights == "int8x3":
            packed, scale = pack_int8x3_weight(w)
            product = Int8x3Product(node.input[0], output, packed, bias, w.shape[0], activation, w_scale=scale)
        else:
            product = WeightProduct(node.input[0], output, pack_bf16_weight(w, weights == "bf16x2"), bias,
                                    w.shape[0], activation)
        products[i] = Found(product, replaced, edits)
    return products


def _gelu_nodes(graph: onnx.GraphProto, x: str, consumers: dict[str, list[int]], inits: dict[str, onnx.TensorProto],
                graph_outputs: set[str]) -> tuple[set[int], str] | None:
    """GELU(x) = x (1 + erf(x / sqrt 2)) / 2 as torch exports it: Div(x, sqrt 2), Erf, Add 1, Mul by x, Mul by
    0.5 (either operand order), where x and the steps between feed nothing else: (their indices, the output's
    name), else None."""
    def only_use(name: str, op: str) -> tuple[int, onnx.NodeProto] | None:
        users = consumers.get(name, [])
        ok = len(users) == 1 and name not in graph_outputs and graph.node[users[0]].op_type == op
        return (users[0], graph.node[users[0]]) if ok else None

    def other_is(node: onnx.NodeProto, name: str, value: float) -> bool:
        if len(node.input) != 2 or name not in node.input:
            return False
        other = node.input[1] if node.input[0] == name else node.input[0]
        if other not in inits:
            return False
        c = numpy_helper.to_array(inits[other])
        return c.size == 1 and c.dtype == np.float32 and abs(float(c.reshape(())) - value) <= 1e-6 * value

    users = consumers.get(x, [])
    if len(users) != 2 or x in graph_outputs:
        return None
    div = next((i for i in users if graph.node[i].op_type == "Div" and graph.node[i].input[0] == x), None)
    if div is None or not other_is(graph.node[div], x, math.sqrt(2)):
        return None
    if (erf := only_use(graph.node[div].output[0], "Erf")) is None:
        return None
    if (add := only_use(erf[1].output[0], "Add")) is None or not other_is(add[1], erf[1].output[0], 1.0):
        return None
    if (mul := only_use(add[1].output[0], "Mul")) is None or sorted(mul[1].input) != sorted([x, add[1].output[0]]):
        return None
    if mul[0] not in users or (half := only_use(mul[1].output[0], "Mul")) is None:
        return None
    if not other_is(half[1], mul[1].output[0], 0.5):
        return None
    return {div, erf[0], add[0], mul[0], half[0]}, half[1].output[0]


def _ints(node: onnx.NodeProto, name: str, inits: dict[str, onnx.TensorProto]) -> list[int] | None:
    """A node's integer-list attribute ``name`` (None where it has none); "axes" also from a constant second input
    (where opset 13 moved it)."""
    value = next((list(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == name), None)
    if value is None and name == "axes" and len(node.input) > 1 and node.input[1] in inits:
        value = numpy_helper.to_array(inits[node.input[1]]).reshape(-1).tolist()
    return value


def _static_shape(infos: dict[str, onnx.ValueInfoProto], name: str) -> tuple[int, ...] | None:
    """A tensor's inferred shape where every dimension is known, else None."""
    info = infos.get(name)
    if info is None:
        return None
    dims = info.type.tensor_type.shape.dim
    return tuple(d.dim_value for d in dims) if all(d.HasField("dim_value") for d in dims) else None


@dataclass(frozen=True)
class _Nodes:
    """A graph as the attention finders walk it: its initializers by name, its output names, the index of the node
    that makes each tensor and the indices of the nodes that take each."""
    graph: onnx.GraphProto
    inits: dict[str, onnx.TensorProto]
    outputs: set[str]
    producer: dict[str, int]
    consumers: dict[str, list[int]]

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> "_Nodes":
        producer = {name: i for i, node in enumerate(graph.node) for name in node.output}
        consumers: dict[str, list[int]] = {}
        for i, node in enumerate(graph.node):
            for name in node.input:
                consumers.setdefault(name, []).append(i)
        return cls(graph, {t.name: t for t in graph.initializer}, {o.name for o in graph.output}, producer, consumers)

    def made(self, name: str, op: str, attr: str | None = None, value: list[int] | None = None,
             only_use: bool = True) -> int | None:
        """The index of the node that makes ``name`` if it is an ``op`` (whose integer-list attribute ``attr`` is
        ``value``, where given) and ``name`` is no graph output and (``only_use``) feeds one node only, else None."""
        i = self.producer.get(name)
        if i is None or self.graph.node[i].op_type != op or name in self.outputs:
            return None
        if only_use and len(self.consumers.get(name, [])) != 1:
            return None
        return i if attr is None or _ints(self.graph.node[i], attr, self.inits) == value else None

    def constant(self, name: str) -> np.ndarray | None:
        """The initializer ``name`` as an array, or None."""
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None


@dataclass(frozen=True)
class AttentionStep:
    """An attention core with decomposed relative positions (SAM ViT's windowed blocks) in bfloat16
    (``_ext.shared_attention_bf16``, heads first): out[n] = softmax(scale q[n] k[n]^T + rel[n]) v[n] with
    rel[n, (i, j), (a, b)] = rel_h[n, i, j, a] + rel_w[n, i, j, b]. q [N, L, d], k and v [N, P, d] (N = windows x
    heads), rel_h [N, qh, qw, kh], rel_w [N, qh, qw, kw] (qh qw = L, kh kw = P), float32 -> [N, L, d]."""
    q: str
    k: str
    v: str
    rel_h: str
    rel_w: str
    output: str
    scale: float

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.q, self.k, self.v, self.rel_h, self.rel_w

    def result_size(self, q: np.ndarray, *others: np.ndarray) -> int:
        return q.size

    def run(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, rel_h: np.ndarray, rel_w: np.ndarray,
            threads: int, out: np.ndarray | None = None) -> np.ndarray:
        """-> [N, L, d], into ``out`` (N L d values) if given, else into a new 64-byte aligned array."""
        n, length, _ = q.shape
        out = aligned_empty(q.shape, np.float32) if out is None else out.reshape(q.shape)
        return _ext.shared_attention_bf16(q, k, v, rel_h.reshape(n, length, -1), rel_w.reshape(n, length, -1),
                                          threads=threads, scale=self.scale, heads_first=True, out=out)


def find_attention(graph: onnx.GraphProto,
                   infos: dict[str, onnx.ValueInfoProto]) -> dict[int, tuple[AttentionStep, set[int]]]:
    """The attention cores with decomposed relative positions of a graph (``infos``: its inferred value infos), by the
    index of their last node: the step and the indices of the nodes it replaces.

    The nodes torch exports for ``Attention.forward`` (export/modeling/image_encoder.py) on a window: MatMul(Mul(q,
    scale) or q, Transpose(k, perm 0 2 1)), Reshape to [N, qh, qw, kh, kw], Add of Unsqueeze(rel_h, axis 4) and Add of
    Unsqueeze(rel_w, axis 3) (either operand order, either Add first), Reshape to [N, L, P], Softmax over the last
    axis, MatMul by v; every shape static, d <= 64, float32, each result used only by the next node (the Mul and the
    Transpose are kept where something else uses them, their outputs then still computed by ONNX Runtime). In a whole
    ViT encoder graph each chunk of queries the exporter traces of a global block has this form too (the chunks share
    k's Transpose)."""
    nodes = _Nodes.of(graph)
    inits, outputs, producer, consumers = nodes.inits, nodes.outputs, nodes.producer, nodes.consumers
    only_use = nodes.made

    def shape(name: str) -> tuple[int, ...] | None:
        info = infos.get(name)
        if info is None or info.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            return None
        return _static_shape(infos, name)

    def unsqueezed_axis(i: int) -> int | None:
        axes = _ints(graph.node[i], "axes", inits)
        return int(axes[0]) % 5 if axes is not None and len(axes) == 1 else None

    def split_add(i: int, op: str) -> tuple[int, int] | None:
        """An Add's two operands' producers: (the ``op`` node, the Unsqueeze), each used only there."""
        a, b = graph.node[i].input
        for first, second in ((a, b), (b, a)):
            if (x := only_use(first, op)) is not None and (u := only_use(second, "Unsqueeze")) is not None:
                return x, u
        return None

    found = {}
    for s, softmax in enumerate(graph.node):
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), None)
        users = consumers.get(softmax.output[0], [])
        if softmax.op_type != "Softmax" or axis not in (-1, 2) or len(users) != 1 or softmax.output[0] in outputs:
            continue
        last = users[0]
        if graph.node[last].op_type != "MatMul" or graph.node[last].input[0] != softmax.output[0]:
            continue
        if (r2 := only_use(softmax.input[0], "Reshape")) is None:
            continue
        if (a2 := only_use(graph.node[r2].input[0], "Add")) is None:
            continue
        outer = split_add(a2, "Add")
        inner = split_add(outer[0], "Reshape") if outer else None
        if inner is None or (m1 := only_use(graph.node[inner[0]].input[0], "MatMul")) is None:
            continue
        unsqueezes = {unsqueezed_axis(outer[1]): outer[1], unsqueezed_axis(inner[1]): inner[1]}
        if set(unsqueezes) != {3, 4}:
            continue
        q, kt = graph.node[m1].input
        replaced = {m1, inner[0], *unsqueezes.values(), outer[0], a2, r2, s, last}
        scale = 1.0
        if (mul := producer.get(q)) is not None and graph.node[mul].op_type == "Mul":
            constant = [name for name in graph.node[mul].input if name in inits]
            c = numpy_helper.to_array(inits[constant[0]]) if len(constant) == 1 else None
            if c is not None and c.size == 1 and c.dtype == np.float32:
                scale = float(c.reshape(()))
                q = next(name for name in graph.node[mul].input if name != constant[0])
                if only_use(graph.node[m1].input[0], "Mul") is not None:
                    replaced.add(mul)
        t = producer.get(kt)
        if t is None or graph.node[t].op_type != "Transpose" or _ints(graph.node[t], "perm", inits) != [0, 2, 1]:
            continue
        if only_use(kt, "Transpose") is not None:
            replaced.add(t)
        k, v = graph.node[t].input[0], graph.node[last].input[1]
        rel_h, rel_w = graph.node[unsqueezes[4]].input[0], graph.node[unsqueezes[3]].input[0]
        shapes = [shape(name) for name in (q, k, v, rel_h, rel_w, graph.node[inner[0]].output[0],
                                           graph.node[r2].output[0], graph.node[last].output[0])]
        if any(sh is None for sh in shapes) or len(shapes[0]) != 3 or len(shapes[3]) != 4:
            continue
        (n, length, d), (_, qh, qw, kh), kw = shapes[0], shapes[3], shapes[4][-1]
        pixels = kh * kw
        if not (qh * qw == length and 1 <= d <= 64 and shapes[1:] == [
                (n, pixels, d), (n, pixels, d), (n, qh, qw, kh), (n, qh, qw, kw), (n, qh, qw, kh, kw),
                (n, length, pixels), (n, length, d)]):
            continue
        found[last] = (AttentionStep(q, k, v, rel_h, rel_w, graph.node[last].output[0], scale), replaced)
    return found


@dataclass(frozen=True)
class _FromQkv:
    """A windowed attention step from the qkv product ``qkv`` (B windows of L tokens, G heads) to ``output``:
    [B, L, G, d] values (``dims``) in the shape ``out_shape``, as the next product takes them."""
    qkv: str
    output: str
    dims: tuple[int, int, int, int]     # B, L, G, d
    out_shape: tuple[int, ...]

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.qkv,)

    def result_size(self, qkv: np.ndarray) -> int:
        return int(np.prod(self.dims))

    def _out(self, out: np.ndarray | None) -> np.ndarray:
        """``out`` as [B, L, G, d], or a new 64-byte aligned array."""
        return aligned_empty(self.dims, np.float32) if out is None else out.reshape(self.dims)


@dataclass(frozen=True)
class BiasedAttentionStep(_FromQkv):
    """TinyViT's windowed attention from its qkv product (``_ext.biased_attention_bf16``): ``qkv`` ([B, L, G, 3, d]
    values: each head's q, k, v side by side) -> softmax(scale q k^T + bias[g]) v; ``bias`` [G, L, L] the attention
    biases, the same for every window."""
    bias: np.ndarray
    scale: float

    def run(self, qkv: np.ndarray, threads: int, out: np.ndarray | None = None) -> np.ndarray:
        b, length, g, d = self.dims
        return _ext.biased_attention_bf16(np.ascontiguousarray(qkv).reshape(b, length, g, 3, d), self.bias,
                                          scale=self.scale, out=self._out(out), threads=threads).reshape(self.out_shape)


def find_biased_attention(graph: onnx.GraphProto, infos: dict[str, onnx.ValueInfoProto]
                          ) -> dict[int, tuple[BiasedAttentionStep, set[int]]]:
    """The windowed attention of TinyViT's blocks (LiteMedSAM's encoder) as torch exports ``Attention.forward``,
    by the index of its last node: the step and the nodes it replaces.

    Reshape [B, L, G, 3 d] of the qkv product's output, Transpose (perm 0 2 1 3), Split on the last axis into d, d,
    d (q, k, v), MatMul(q, Transpose(k, perm 0 1 3 2)), Mul by a constant scalar, Add of a constant [G, L, L] (either
    operand order), Softmax over the last axis, MatMul by v, Transpose (perm 0 2 1 3), Reshape; every shape static,
    d <= 64, float32, each result used only by the next of these nodes."""
    nodes = _Nodes.of(graph)
    inits, outputs, producer, consumers = nodes.inits, nodes.outputs, nodes.producer, nodes.consumers
    only_use, constant = nodes.made, nodes.constant

    found = {}
    for m2, node in enumerate(graph.node):
        if node.op_type != "MatMul" or (s := only_use(node.input[0], "Softmax")) is None:
            continue
        if next((a.i for a in graph.node[s].attribute if a.name == "axis"), None) not in (-1, 3):
            continue
        if (add := only_use(graph.node[s].input[0], "Add")) is None:
            continue
        bias = mul = None
        for first, second in (graph.node[add].input, reversed(graph.node[add].input)):
            if (c := constant(second)) is not None and (i := only_use(first, "Mul")) is not None:
                bias, mul = c, i
        if mul is None:
            continue
        scalar = [constant(name) for name in graph.node[mul].input]
        product = [name for name, c in zip(graph.node[mul].input, scalar) if c is None]
        scale = next((c for c in scalar if c is not None and c.size == 1 and c.dtype == np.float32), None)
        if len(product) != 1 or scale is None or (m1 := only_use(product[0], "MatMul")) is None:
            continue
        q, kt = graph.node[m1].input
        if (tk := only_use(kt, "Transpose", "perm", [0, 1, 3, 2])) is None:
            continue
        k, v = graph.node[tk].input[0], node.input[1]
        sp = producer.get(q)
        if sp is None or graph.node[sp].op_type != "Split" or list(graph.node[sp].output) != [q, k, v]:
            continue
        if any(len(consumers.get(name, [])) != 1 or name in outputs for name in (q, k, v)):
            continue
        sizes = (constant(graph.node[sp].input[1]) if len(graph.node[sp].input) > 1
                 else _ints(graph.node[sp], "split", inits))
        axis = next((a.i for a in graph.node[sp].attribute if a.name == "axis"), 0)
        if (t_a := only_use(graph.node[sp].input[0], "Transpose", "perm", [0, 2, 1, 3])) is None:
            continue
        if (r_a := only_use(graph.node[t_a].input[0], "Reshape")) is None:
            continue
        four = _static_shape(infos, graph.node[r_a].output[0])
        if four is None or len(four) != 4 or axis not in (-1, 3) or four[3] % 3:
            continue
        b, length, g, d = four[0], four[1], four[2], four[3] // 3
        if sizes is None or [int(x) for x in np.reshape(sizes, -1)] != [d, d, d] or not 1 <= d <= 64:
            continue
        if bias.shape != (g, length, length) or bias.dtype != np.float32:
            continue
        users = consumers.get(node.output[0], [])
        t_o = users[0] if len(users) == 1 and node.output[0] not in outputs else None
        if t_o is None or graph.node[t_o].op_type != "Transpose" or _ints(graph.node[t_o], "perm", inits) != [
                0, 2, 1, 3]:
            continue
        users = consumers.get(graph.node[t_o].output[0], [])
        r_o = users[0] if len(users) == 1 and graph.node[t_o].output[0] not in outputs else None
        if r_o is None or graph.node[r_o].op_type != "Reshape":
            continue
        out_shape = _static_shape(infos, graph.node[r_o].output[0])
        if out_shape is None or int(np.prod(out_shape)) != b * length * g * d:
            continue
        step = BiasedAttentionStep(graph.node[r_a].input[0], graph.node[r_o].output[0], (b, length, g, d), out_shape,
                                   np.ascontiguousarray(bias), float(scale.reshape(())))
        found[r_o] = (step, {r_a, t_a, sp, tk, m1, mul, add, s, m2, t_o, r_o})
    return found


@dataclass(frozen=True)
class WindowAttentionStep(_FromQkv):
    """SAM ViT's windowed attention core from its qkv product in bfloat16 (``_ext.window_attention_bf16``):
    ``qkv`` ([B, L, 3, G, d] values, B windows of L tokens, G heads) -> ``output`` (the core's result as the
    graph's next product takes it: [B, L, G, d] values in the shape ``out_shape``), the relative position terms
    computed in the kernel from q and the tables (``table_h`` [qh, kh, d], ``table_w`` [qw, kw, d])."""
    table_h: np.ndarray
    table_w: np.ndarray
    scale: float

    def run(self, qkv: np.ndarray, threads: int, out: np.ndarray | None = None) -> np.ndarray:
        b, length, g, d = self.dims
        return _ext.window_attention_bf16(np.ascontiguousarray(qkv).reshape(b, length, 3, g, d), self.table_h,
                                          self.table_w, scale=self.scale, out=self._out(out),
                                          threads=threads).reshape(self.out_shape)


def find_window_attention(graph: onnx.GraphProto, infos: dict[str, onnx.ValueInfoProto],
                          cores: dict[int, tuple[AttentionStep, set[int]]]
                          ) -> dict[int, tuple[WindowAttentionStep, set[int]]]:
    """The cores of ``find_attention`` whose q, k, v and terms come from a qkv product as torch exports SAM's
    windowed ``Attention.forward``, by the index of their new last node: the step and the nodes it replaces.

    q, k, v: Squeeze (axis 0) of the three outputs of Split (axis 0) of Reshape [3, N, L, d] of Transpose
    (perm 2 0 3 1 4) of Reshape [B, L, 3, G, d] of the product's output (N = B G); rel_h: MatMul(Reshape(q) [N, qh,
    qw, d], a constant [qh, d, kh]); rel_w: Transpose (perm 1 2 0 3) of Reshape [qw, N, qh, kw] of MatMul(Reshape
    [qw, N qh, d] of Transpose (perm 2 0 1 3) of that Reshape of q, a constant [qw, d, kw]); the result: Reshape
    [B, G, qh, qw, d], Transpose (perm 0 2 3 1 4), Reshape; each result used only within these nodes."""
    nodes = _Nodes.of(graph)
    outputs, producer, consumers, constant = nodes.outputs, nodes.producer, nodes.consumers, nodes.constant

    def made(name: str, op: str, attr: str | None = None, value: list[int] | None = None) -> int | None:
        return nodes.made(name, op, attr, value, only_use=False)      # what uses it is checked for the whole chain

    found = {}
    for last, (core, replaced) in cores.items():
        squeezes = [made(name, "Squeeze", "axes", [0]) for name in (core.q, core.k, core.v)]
        if None in squeezes:
            continue
        split = {producer.get(graph.node[i].input[0]) for i in squeezes}
        if len(split) != 1 or (sp := split.pop()) is None or graph.node[sp].op_type != "Split":
            continue
        if [graph.node[i].input[0] for i in squeezes] != list(graph.node[sp].output):
            continue
        if (r_b := made(graph.node[sp].input[0], "Reshape")) is None:
            continue
        if (t_qkv := made(graph.node[r_b].input[0], "Transpose", "perm", [2, 0, 3, 1, 4])) is None:
            continue
        if (r_a := made(graph.node[t_qkv].input[0], "Reshape")) is None:
            continue
        five = _static_shape(infos, graph.node[r_a].output[0])
        if five is None or len(five) != 5 or five[2] != 3:
            continue
        b, length, _, g, d = five
        # the terms
        mh = made(core.rel_h, "MatMul")
        tw2 = made(core.rel_w, "Transpose", "perm", [1, 2, 0, 3])
        r_w4 = made(graph.node[tw2].input[0], "Reshape") if tw2 is not None else None
        mw = made(graph.node[r_w4].input[0], "MatMul") if r_w4 is not None else None
        if mh is None or mw is None:
            continue
        c_h, c_w = constant(graph.node[mh].input[1]), constant(graph.node[mw].input[1])
        r_q = made(graph.node[mh].input[0], "Reshape")
        r_w3 = made(graph.node[mw].input[0], "Reshape")
        tw1 = made(graph.node[r_w3].input[0], "Transpose", "perm", [2, 0, 1, 3]) if r_w3 is not None else None
        if c_h is None or c_w is None or r_q is None or tw1 is None:
            continue
        if graph.node[tw1].input[0] != graph.node[r_q].output[0]:
            continue
        if graph.node[r_q].input[0] != core.q or c_h.ndim != 3 or c_w.ndim != 3:
            continue
        qh, qw = c_h.shape[0], c_w.shape[0]
        if c_h.shape[1] != d or c_w.shape[1] != d or qh * qw != length or c_h.shape[2] * c_w.shape[2] != length:
            continue
        # the result's way to the next product
        r_o1 = next(iter(consumers.get(graph.node[last].output[0], [])), None)
        if (r_o1 is None or len(consumers[graph.node[last].output[0]]) != 1 or graph.node[r_o1].op_type != "Reshape"
                or _static_shape(infos, graph.node[r_o1].output[0]) != (b, g, qh, qw, d)):
            continue
        users = consumers.get(graph.node[r_o1].output[0], [])
        t_o = users[0] if len(users) == 1 else None
        if t_o is None or made(graph.node[t_o].output[0], "Transpose", "perm", [0, 2, 3, 1, 4]) != t_o:
            continue
        users = consumers.get(graph.node[t_o].output[0], [])
        r_o2 = users[0] if len(users) == 1 and graph.node[users[0]].op_type == "Reshape" else None
        out_shape = _static_shape(infos, graph.node[r_o2].output[0]) if r_o2 is not None else None
        if out_shape is None or int(np.prod(out_shape)) != b * length * g * d:
            continue
        chain = {*squeezes, sp, r_b, t_qkv, r_a, mh, tw2, r_w4, mw, r_q, r_w3, tw1, r_o1, t_o, r_o2}
        inside = replaced | chain
        names = {name for i in inside for name in graph.node[i].output}
        if any(name in outputs or any(j not in inside for j in consumers.get(name, [])) for name in names
               if name != graph.node[r_o2].output[0]):
            continue
        step = WindowAttentionStep(graph.node[r_a].input[0], graph.node[r_o2].output[0], (b, length, g, d),
                                   out_shape, np.ascontiguousarray(c_h.transpose(0, 2, 1), np.float32),
                                   np.ascontiguousarray(c_w.transpose(0, 2, 1), np.float32), core.scale)
        found[r_o2] = (step, inside)
    return found


ATTENTION_STEPS = (AttentionStep, WindowAttentionStep, BiasedAttentionStep)


class Bf16Graph:
    """A float32 graph run with its weight products in bfloat16 (``_ext.linear_bf16``): ``run`` as
    ``onnxruntime.InferenceSession.run``. ``make_session(model_bytes)`` builds the session of each piece.
    ``weights``: "bf16"; "bf16x2", each weight as hi + lo in bfloat16 (twice the products' work, weights to about
    16 significant bits; x still rounded to bfloat16); or "int8x3", x and each weight as two int8 parts, three int8
    products (``_ext.linear_int8x3``, AVX512-VNNI; both to about 16 bits). ``attention``: the windowed attention
    runs in bfloat16 too (q, k, v and the softmax's weights rounded to bfloat16; AMX tiles or VDPBF16PS) instead
    of as ONNX Runtime's float32 passes over the logits: SAM ViT's from its qkv product (``find_window_attention``) or as cores on
    ONNX Runtime's q, k, v and terms (``find_attention``), TinyViT's from its qkv product
    (``find_biased_attention``). Raises ValueError for a graph with subgraphs (If, Loop, Scan) or no weight
    product, for ``attention`` on a CPU without AVX512-BF16 (``_ext.has_avx512_bf16``) and for "int8x3" on one
    without AVX512-VNNI (``_ext.has_avx512_vnni``)."""

    def __init__(self, model: onnx.ModelProto, make_session: Callable[[bytes], ort.InferenceSession],
                 threads: int = 0, weights: str = "bf16", attention: bool = False):
        graph = model.graph
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node
               for a in n.attribute):
            raise ValueError("Bf16Graph: graphs with subgraphs (If, Loop, Scan) are not supported")
        if weights not in WEIGHTS:
            raise ValueError(f"Bf16Graph: weights must be one of {WEIGHTS}, got {weights!r}")
        if weights == "int8x3" and not _ext.has_avx512_vnni():
            raise ValueError("Bf16Graph: weights 'int8x3' needs AVX512-VNNI, which this CPU does not have "
                             "(_ext.has_avx512_vnni() is False)")
        if attention and not _ext.has_avx512_bf16():
            raise ValueError("Bf16Graph: attention=True needs AVX512-BF16 (AMX-BF16 tiles or VDPBF16PS), which this "
                             "CPU does not have (_ext.has_avx512_bf16() is False)")
        with small_pages():
            products = find_products(graph, weights)
        if not products:
            raise ValueError("Bf16Graph: the graph has no product of an activation with a constant weight")
        inferred = onnx.shape_inference.infer_shapes(model)
        infos = {v.name: v for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)}
        cores: dict[int, tuple[AttentionStep | WindowAttentionStep | BiasedAttentionStep, set[int]]] = (
            find_attention(graph, infos) if attention else {})
        windows = find_window_attention(graph, infos, cores)     # those straight from their qkv product
        taken = set().union(*(nodes for _, nodes in windows.values()))
        cores = ({i: core for i, core in cores.items() if i not in taken} | windows
                 | (find_biased_attention(graph, infos) if attention else {}))
        self.threads = threads
        self._spare = threading.local()  # each thread's arrays for the products' results, by size
        self.inputs = tuple(i.name for i in graph.input if i.name not in {t.name for t in graph.initializer})
        self.outputs = tuple(o.name for o in graph.output)
        replaced = set().union(*(found.replaced for found in products.values()), *(r for _, r in cores.values()))
        edits = {i: node for found in products.values() for i, node in found.edits.items()}
        # the steps: runs of plain nodes, the products at the place of their first node, the attention cores at
        # the place of their last
        groups: list[list[onnx.NodeProto] | WeightProduct | AttentionStep | WindowAttentionStep
                     | BiasedAttentionStep] = [[]]
        for i, node in enumerate(graph.node):
            if i in products:
                groups += [products[i].product, []]
            elif i in cores:
                groups += [cores[i][0], []]
            elif i not in replaced:
                groups[-1].append(edits.get(i, node))
        groups = [g for g in groups if not (isinstance(g, list) and not g)]
        needs = [_node_inputs(g) if isinstance(g, list) else set(_step_inputs(g)) for g in groups]
        makes = [_node_outputs(g) if isinstance(g, list) else {g.output} for g in groups]
        later: set[str] = set(self.outputs)
        wanted = []
        for k in range(len(groups) - 1, -1, -1):
            wanted.append(makes[k] & later)
            later |= needs[k]
        wanted.reverse()
        inits = {t.name: t for t in graph.initializer}
        self.steps: list[Piece | WeightProduct | ReshapeStep | AttentionStep | WindowAttentionStep
                         | BiasedAttentionStep] = []
        alive: set[str] = set(self.inputs)
        for k, group in enumerate(groups):
            if not isinstance(group, list):
                self.steps.append(group)
            elif wanted[k] and (reshapes := _reshapes(group, inits)) is not None:
                self.steps += reshapes
            elif wanted[k]:  # (nodes whose results nothing uses are left out)
                inputs = tuple(sorted(needs[k] & alive))
                outputs = tuple(sorted(wanted[k]))
                piece = onnx.helper.make_graph(
                    group, f"{graph.name}_piece{k}", [_info(infos, name) for name in inputs],
                    [_info(infos, name) for name in outputs],
                    [inits[name] for name in sorted(needs[k] & inits.keys())])
                sub = onnx.helper.make_model(piece, opset_imports=model.opset_import, ir_version=model.ir_version)
                self.steps.append(Piece(make_session(sub.SerializeToString()), inputs, outputs))
            alive |= wanted[k]
        # the tensors each step is the last to use (graph outputs stay); a ReshapeStep's output shares its input's
        # array (``root``), so all the names of one array go at the last use of any of them
        root = {}
        for step in self.steps:
            if isinstance(step, ReshapeStep):
                root[step.output] = root.get(step.input, step.input)
        last_use: dict[str, int] = {}
        for k, step in enumerate(self.steps):
            for name in _step_inputs(step):
                last_use[root.get(name, name)] = k
        kept = set(self.outputs) | {root.get(name, name) for name in self.outputs}
        names = {r: [r] + [n for n, m in root.items() if m == r] for r in last_use}
        self.drops = [[n for r, k in last_use.items() if k == j and r not in kept for n in names[r]]
                      for j in range(len(self.steps))]
        # the products' and attention cores' results that the caller never sees (nor a view of them), whose arrays
        # run() keeps for the next run
        self.reused = {step.output for step in self.steps
                       if isinstance(step, (WeightProduct, *ATTENTION_STEPS))
                       and step.output not in kept}

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray],
            timings: dict[str, float] | None = None) -> list[np.ndarray]:
        """The graph's outputs (``output_names``, None: all) for the input arrays ``feeds``. ``timings``: a dict
        to which the wall seconds of the steps are added, under "products", "attention" and "onnxruntime"."""
        missing = [name for name in self.inputs if name not in feeds]
        if missing:
            raise ValueError(f"Bf16Graph.run: missing inputs {missing} (the graph takes {list(self.inputs)})")
        # the products' (and attention cores') results in arrays kept from earlier runs of this thread: fresh ones
        # of tens of MB would be new pages from the operating system each time (page faults took as long as the
        # products here)
        spare = self._spare.__dict__.setdefault("arrays", {})
        values = dict(feeds)
        with small_pages():
            for step, drops in zip(self.steps, self.drops):
                start = time.perf_counter()
                if isinstance(step, (WeightProduct, *ATTENTION_STEPS)):   # native: out reused
                    args = [values[name] for name in _step_inputs(step)]
                    size = step.result_size(*args)
                    out = spare[size].pop() if step.output in self.reused and spare.get(size) else None
                    values[step.output] = step.run(*args, threads=self.threads, out=out)
                elif isinstance(step, ReshapeStep):
                    values[step.output] = step.run(values[step.input])
                else:
                    results = step.session.run(list(step.outputs), {name: values[name] for name in step.inputs})
                    values.update(zip(step.outputs, results))
                if timings is not None:
                    kind = ("products" if isinstance(step, WeightProduct) else
                            "attention" if isinstance(step, ATTENTION_STEPS) else "onnxruntime")
                    timings[kind] = timings.get(kind, 0.0) + time.perf_counter() - start
                for name in drops:
                    array = values.pop(name)
                    if name in self.reused:
                        spare.setdefault(array.size, []).append(array.reshape(-1))
        return [values[name] for name in (output_names or self.outputs)]

    def get_providers(self) -> list[str]:
        """The execution providers of the ONNX Runtime pieces."""
        first = next(step for step in self.steps if isinstance(step, Piece))
        return first.session.get_providers()


def _step_inputs(step: Piece | WeightProduct | ReshapeStep | AttentionStep | WindowAttentionStep
                 | BiasedAttentionStep) -> tuple[str, ...]:
    return (step.input,) if isinstance(step, (WeightProduct, ReshapeStep)) else step.inputs


def _node_inputs(nodes: list[onnx.NodeProto]) -> set[str]:
    made = _node_outputs(nodes)
    return {name for node in nodes for name in node.input if name and name not in made}


def _node_outputs(nodes: list[onnx.NodeProto]) -> set[str]:
    return {name for node in nodes for name in node.output if name}


def _info(infos: dict[str, onnx.ValueInfoProto], name: str) -> onnx.ValueInfoProto:
    """The inferred type and shape of a tensor (float32 of unknown shape where inference gave none)."""
    if name in infos and infos[name].type.tensor_type.elem_type:
        return infos[name]
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
