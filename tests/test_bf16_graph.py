"""bfloat16 weight products: _ext.linear_bf16 against its twin (on AMX tiles and with AVX512-BF16, where the CPU
has them), the packing, Bf16Graph on hand-made graphs, and engines of precision 'bf16' (the fp32 export with the
encoder's weight products in bfloat16)."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import onnxslim
import pytest
import torch
from numpy._core import multiarray
from onnx import TensorProto, helper, numpy_helper

from samreg_rt import _ext, bf16_graph
from samreg_rt import engine as engine_module
from samreg_rt.bf16_graph import (AttentionStep, BiasedAttentionStep, Bf16Graph, WeightProduct, WindowAttentionStep,
                                  bf16_to_float, find_biased_attention,
                                  find_attention, find_products, find_window_attention, pack_bf16_weight, round_bf16)
from samreg_rt.engine import Engine
from samreg_rt.errors import ModelError
from samreg_rt.io import load_image
from samreg_export.export import export_model
from samreg_export.modeling.image_encoder import Block

from . import twins
from .test_amg_unit import _huge_pages

needs_bf16 = pytest.mark.skipif(not _ext.has_avx512_bf16(), reason="no AVX512-BF16 on this CPU")
# linear_bf16's two builds, each where the CPU runs it
ISAS = [pytest.param("amx", marks=pytest.mark.skipif(not _ext.has_amx_bf16(), reason="no AMX-BF16 tiles")),
        pytest.param("avx512", marks=needs_bf16)]


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


def _linear_inputs(rng, m, k, n):
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    return x, w, rng.standard_normal(n).astype(np.float32)


def test_round_bf16_is_torch_bfloat16(rng):
    """Nearest even, as torch's float32 -> bfloat16 conversion (ties included)."""
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
                        np.array([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, -(1 + 2.0 ** -8), 0.0, -0.0, 3.0e38],
                                 np.float32)]).astype(np.float32)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(round_bf16(x), want)
    np.testing.assert_array_equal(bf16_to_float(round_bf16(x)), twins.bf16(x))


def test_pack_bf16_weight_layout(rng):
    """Element [p, c, t, i, n, e] is W[32 c + 2 i + e, 32 p + 16 t + n], zero past K and N."""
    k, n = 45, 70
    w = rng.standard_normal((k, n)).astype(np.float32)
    packed = pack_bf16_weight(w)
    assert packed.dtype == np.uint16 and packed.shape == (3, 2, 2, 16, 16, 2)
    values = bf16_to_float(packed)
    for p, c, t, i, col, e in [(0, 0, 0, 0, 0, 0), (2, 1, 0, 6, 5, 1), (1, 0, 1, 15, 15, 1), (2, 1, 1, 15, 15, 1),
                               (2, 1, 0, 6, 6, 0)]:
        row, column = 32 * c + 2 * i + e, 32 * p + 16 * t + col
        want = twins.bf16(w[row, column]) if row < k and column < n else 0.0
        assert values[p, c, t, i, col, e] == want, (p, c, t, i, col, e)
    assert np.count_nonzero(values) == np.count_nonzero(twins.bf16(w))
    with pytest.raises(ValueError, match=r"expected a \[K, N\] weight"):
        pack_bf16_weight(w[None])


def test_pack_bf16_weight_is_64_byte_aligned(rng):
    """Each 64-byte tile row of the packing on one cache line, whatever numpy's allocator gives."""
    for k, n in [(1, 1), (45, 70), (768, 96), (3072, 64)]:
        for split in (False, True):
            packed = pack_bf16_weight(rng.standard_normal((k, n)).astype(np.float32), split)
            assert packed.ctypes.data % 64 == 0 and packed.flags.c_contiguous and packed.flags.writeable


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 7, 3), (33, 40, 50), (64, 64, 64), (97, 160, 640),
                                   (300, 1280, 320), (4096, 768, 96), (70, 3100, 100)])
def test_linear_bf16_matches_twin(rng, m, k, n, isa):
    x, w, b = _linear_inputs(rng, m, k, n)
    got = _ext.linear_bf16(x, pack_bf16_weight(w), b, isa=isa)
    want = twins.linear_bf16(x, w, b)
    assert got.dtype == np.float32 and got.shape == (m, n)
    # float32 sums of k exact products: within k float32 roundings of the sum of magnitudes
    scale = np.abs(twins.bf16(x)).astype(np.float64) @ np.abs(twins.bf16(w)) + np.abs(b)
    assert (np.abs(got - want) <= 2 * k * np.finfo(np.float32).eps * scale + 1e-30).all()
    # and the bfloat16 rounding shows against float32: the twin is not float32's product
    if k >= 40:
        assert np.abs(want - twins.linear(x, w, b)).max() > 1e-4


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n", [(5, 7, 3), (97, 160, 640), (300, 768, 96)])
def test_linear_bf16_gelu(rng, m, k, n, isa):
    """activation 'gelu': the exact GELU of each float32 result (the plain product's) within 4e-7 |y| (measured
    when written: 2.7e-7), with either packing."""
    x, w, b = _linear_inputs(rng, m, k, n)
    x *= 8
    for packed in (pack_bf16_weight(w), pack_bf16_weight(w, split=True)):
        y = _ext.linear_bf16(x, packed, b, isa=isa)
        got = _ext.linear_bf16(x, packed, b, isa=isa, activation="gelu")
        assert (np.abs(got - twins.gelu(y)) <= 4e-7 * np.abs(y) + 1e-37).all()
        assert (y < -1).any() and not np.allclose(got, y)


@pytest.mark.parametrize("isa", ISAS)
def test_linear_bf16_gelu_range(isa):
    """GELU over [-12, 12] and its limits, through a 1 x 1 identity product (exact in bfloat16 for these y)."""
    y = twins.bf16(np.concatenate([np.linspace(-12, 12, 20001), [-100, 100, 0, 1e-30, -1e-30, -3e38, np.inf]]))
    got = _ext.linear_bf16(y[:, None].copy(), pack_bf16_weight(np.ones((1, 1), np.float32)),
                           np.zeros(1, np.float32), isa=isa, activation="gelu")[:, 0]
    assert (np.abs(got[:-1] - twins.gelu(y[:-1])) <= 4e-7 * np.abs(y[:-1]) + 1e-37).all()
    assert got[-7] == 0 and got[-6] == 100 and got[-5] == 0 and got[-2] == 0 and got[-1] == np.inf


def test_pack_bf16_weight_split(rng):
    """split: the hi tiles as the plain packing, then the tiles of lo = bf16(W - hi); hi + lo is W to ~16 bits."""
    w = rng.standard_normal((45, 70)).astype(np.float32)
    packed = pack_bf16_weight(w, split=True)
    assert packed.shape == (3, 2, 4, 16, 16, 2)
    np.testing.assert_array_equal(packed[:, :, :2], pack_bf16_weight(w))
    lo = w - twins.bf16(w)
    np.testing.assert_array_equal(packed[:, :, 2:], pack_bf16_weight(lo))
    both = twins.bf16(w).astype(np.float64) + twins.bf16(lo)
    assert np.abs(both - w).max() <= 2.0 ** -16 * np.abs(w).max()
    assert np.abs(twins.bf16(w) - w).max() > 2.0 ** -10 * np.abs(w).max()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n", [(5, 7, 3), (97, 160, 640), (300, 768, 96), (70, 3100, 100)])
def test_linear_bf16_split_matches_twin(rng, m, k, n, isa):
    x, w, b = _linear_inputs(rng, m, k, n)
    got = _ext.linear_bf16(x, pack_bf16_weight(w, split=True), b, isa=isa)
    want = twins.linear_bf16_split(x, w, b)
    scale = np.abs(twins.bf16(x)).astype(np.float64) @ np.abs(w) + np.abs(b)
    assert (np.abs(got - want) <= 4 * k * np.finfo(np.float32).eps * scale + 1e-30).all()
    # closer to bf16(x) @ W than the plain packing
    exact = twins.linear(twins.bf16(x), w, b)
    plain = _ext.linear_bf16(x, pack_bf16_weight(w), b, isa=isa)
    if k >= 40:
        assert np.abs(got - exact).max() < 0.1 * np.abs(plain - exact).max()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", [100, 1500, 3100])
def test_linear_bf16_columns_do_not_depend_on_the_panel_groups(rng, k, isa):
    """Each 32-column panel's results are those of its columns alone, bit for bit, however many panels share a
    pass over the rows (the kernel groups as many panels as 768 KiB of packed weights hold, at most 8: of 7 panels
    here, 8 / 8, 8 / 4 and 3 / 1 at a time for plain / split weights at these depths)."""
    x, w, b = _linear_inputs(rng, 70, k, 200)
    for split in (False, True):
        got = _ext.linear_bf16(x, pack_bf16_weight(w, split), b, isa=isa, activation="gelu")
        for c0 in (0, 96, 192):
            alone = _ext.linear_bf16(x, pack_bf16_weight(w[:, c0:c0 + 32], split), b[c0:c0 + 32], isa=isa,
                                     activation="gelu")
            np.testing.assert_array_equal(got[:, c0:c0 + 32], alone)


@pytest.mark.parametrize("isa", ISAS)
def test_linear_bf16_threads_and_out(rng, isa):
    x, w, b = _linear_inputs(rng, 1000, 96, 200)
    packed = pack_bf16_weight(w)
    one = _ext.linear_bf16(x, packed, b, isa=isa, threads=1)
    np.testing.assert_array_equal(_ext.linear_bf16(x, packed, b, isa=isa, threads=2), one)
    out = np.full((1000, 200), np.nan, np.float32)
    assert _ext.linear_bf16(x, packed, b, out=out, isa=isa) is out
    np.testing.assert_array_equal(out, one)
    assert _ext.linear_bf16(x[:0].copy(), packed, b, isa=isa).shape == (0, 200)


@pytest.mark.skipif(not _ext.has_amx_bf16(), reason="needs both builds: AMX-BF16 tiles")
def test_linear_bf16_builds_agree(rng):
    """The tiles and VDPBF16PS sum the same exact products, in other orders: float32 roundings apart."""
    x, w, b = _linear_inputs(rng, 300, 1280, 320)
    packed = pack_bf16_weight(w, split=True)
    amx, dp = (_ext.linear_bf16(x, packed, b, isa=isa) for isa in ("amx", "avx512"))
    np.testing.assert_array_equal(_ext.linear_bf16(x, packed, b), amx)      # 'auto' takes the tiles
    assert not np.array_equal(amx, dp)
    scale = np.abs(twins.bf16(x)).astype(np.float64) @ np.abs(w) + np.abs(b)
    assert (np.abs(amx - dp) <= 4 * 1280 * np.finfo(np.float32).eps * scale).all()


def test_linear_bf16_rejects_bad_arguments(rng):
    """Argument checks run before the CPU is asked for AMX tiles or AVX512-BF16, on any CPU."""
    x, w, b = _linear_inputs(rng, 10, 40, 50)
    packed = pack_bf16_weight(w)
    shared = np.zeros(1000, np.float32)
    shared[:400] = x.ravel()
    cases = [
        (dict(x=shared[:400].reshape(10, 40), out=shared[300:800].reshape(10, 50)), ValueError,
         "out: must not overlap x"),
        (dict(out=np.zeros((10, 50), np.float32)[:, ::-1]), ValueError, "out: array is not C-contiguous"),
        (dict(x=x.astype(np.float64)), TypeError, "x: expected dtype float32"),
        (dict(w=packed.astype(np.int16)), TypeError, "w: expected dtype uint16"),
        (dict(x=x[:, :30].copy()), ValueError, r"w: expected the packing of a \(30, 50\) weight"),
        (dict(bias=b[:20].copy()), ValueError, r"w: expected the packing of a \(40, 20\) weight"),
        (dict(x=x.T), ValueError, "x: array is not C-contiguous"),
        (dict(out=np.zeros((10, 49), np.float32)), ValueError, r"out: expected shape \(10, 50\)"),
        (dict(threads=-1), ValueError, "threads"),
        (dict(isa="sse"), ValueError, "isa must be 'auto', 'amx' or 'avx512', got 'sse'"),
        (dict(activation="relu"), ValueError, "activation must be 'none' or 'gelu', got 'relu'"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            _ext.linear_bf16(**{**dict(x=x, w=packed, bias=b), **change})


@pytest.mark.skipif(_ext.has_amx_bf16(), reason="this CPU has AMX-BF16 tiles")
def test_linear_bf16_refuses_amx_without_tiles(rng):
    x, w, b = _linear_inputs(rng, 10, 40, 50)
    with pytest.raises(RuntimeError, match="no AMX-BF16 tiles"):
        _ext.linear_bf16(x, pack_bf16_weight(w), b, isa="amx")
    if _ext.has_avx512_bf16():  # 'auto' takes VDPBF16PS
        np.testing.assert_array_equal(_ext.linear_bf16(x, pack_bf16_weight(w), b),
                                      _ext.linear_bf16(x, pack_bf16_weight(w), b, isa="avx512"))


@pytest.mark.skipif(_ext.has_avx512_bf16(), reason="this CPU has AVX512-BF16")
def test_linear_bf16_refuses_without_avx512_bf16(rng):
    assert not _ext.has_amx_bf16()
    x, w, b = _linear_inputs(rng, 10, 40, 50)
    with pytest.raises(RuntimeError, match="no AVX512-BF16"):
        _ext.linear_bf16(x, pack_bf16_weight(w), b)


def _graph(rng) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x [2, 5, 24] -> LayerNorm -> MatMul(w1) + b1 -> Relu -> Reshape [10, 40] -> Gemm(w2^T, c2, transB) -> y,
    and z = MatMul(x, w3) (no bias, a graph output itself), u = Gemm with alpha 2 (left to ONNX Runtime)."""
    w = {"w1": rng.standard_normal((24, 40)), "b1": rng.standard_normal(40), "w2": rng.standard_normal((16, 40)),
         "c2": rng.standard_normal(16), "w3": rng.standard_normal((24, 8)), "w4": rng.standard_normal((40, 4)),
         "scale": np.ones(24), "shift": np.zeros(24)}
    w = {name: (a / 4).astype(np.float32) for name, a in w.items()}
    w["shape"] = np.array([10, 40], np.int64)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "scale", "shift"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["r2"]),
        helper.make_node("Gemm", ["r2", "w2", "c2"], ["y"], transB=1),
        helper.make_node("MatMul", ["x", "w3"], ["z"]),
        helper.make_node("Gemm", ["r2", "w4"], ["u"], alpha=2.0),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 24])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", "z", "u")],
        [numpy_helper.from_array(a, name) for name, a in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), w


def _session(data: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def test_find_products(rng):
    model, w = _graph(rng)
    products = find_products(model.graph)
    assert sorted(products) == [1, 5, 6]     # the Gemm with alpha 2 stays in ONNX Runtime
    first, replaced, edits = products[1]
    assert (first.input, first.output, first.depth, replaced, edits) == ("n", "hb", 24, {1, 2}, {})
    assert {found.product.activation for found in products.values()} == {"none"}
    np.testing.assert_array_equal(first.bias, w["b1"])
    gemm = products[5][0]
    np.testing.assert_array_equal(gemm.weight, pack_bf16_weight(w["w2"].T))
    np.testing.assert_array_equal(gemm.bias, w["c2"])
    assert products[6][0].output == "z" and not products[6][0].bias.any()


@needs_bf16
def test_weight_product_writes_into_aligned_arrays(rng):
    """WeightProduct.run: x (..., K) -> (..., N) as linear_bf16, into a new 64-byte aligned array (whole-line tile
    stores) or into the given ``out``."""
    x, w, b = _linear_inputs(rng, 70, 48, 40)
    step = WeightProduct("x", "y", pack_bf16_weight(w), b, 48)
    want = _ext.linear_bf16(x, pack_bf16_weight(w), b)
    for _ in range(3):
        got = step.run(x.reshape(2, 35, 48), threads=1)
        assert got.shape == (2, 35, 40) and got.ctypes.data % 64 == 0
        np.testing.assert_array_equal(got.reshape(70, 40), want)
    out = np.full(70 * 40, np.nan, np.float32)
    got = step.run(x, threads=2, out=out)
    assert np.shares_memory(got, out)
    np.testing.assert_array_equal(out.reshape(70, 40), want)


@needs_bf16
def test_bf16_graph_matches_its_numpy_emulation(rng):
    model, w = _graph(rng)
    graph = Bf16Graph(model, _session, threads=2)
    assert sum(type(step).__name__ == "WeightProduct" for step in graph.steps) == 3
    x = rng.standard_normal((2, 5, 24)).astype(np.float32)
    y, z, u = graph.run(None, {"x": x})
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    n = ((x - mean) / np.sqrt(var + 1e-5) * w["scale"] + w["shift"]).astype(np.float32)
    h = twins.linear_bf16(n.reshape(10, 24), w["w1"], w["b1"])
    r2 = np.maximum(h, 0).reshape(10, 40)
    np.testing.assert_allclose(y, twins.linear_bf16(r2, w["w2"].T, w["c2"]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(z, twins.linear_bf16(x.reshape(10, 24), w["w3"], np.zeros(8, np.float32))
                               .reshape(2, 5, 8), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u, 2 * r2 @ w["w4"], rtol=1e-4, atol=1e-4)          # float32 in ONNX Runtime
    # the products are bfloat16's, not float32's
    full = _session(model.SerializeToString()).run(None, {"x": x})
    assert np.abs(z - full[1]).max() > 1e-4
    np.testing.assert_allclose(y, full[0], atol=0.05)
    # outputs by name; a second run (the products' arrays reused) gives the same; missing inputs are named
    again = graph.run(["z", "y"], {"x": x})
    np.testing.assert_array_equal(again[0], z)
    np.testing.assert_array_equal(again[1], y)
    timings = {"products": 1.0}     # adds to what is there
    graph.run(None, {"x": x}, timings)
    assert set(timings) == {"products", "onnxruntime"} and timings["products"] > 1.0 and timings["onnxruntime"] > 0
    with pytest.raises(ValueError, match=r"missing inputs \['x'\]"):
        graph.run(None, {})


@needs_bf16
def test_bf16_graph_runs_without_huge_pages(rng, monkeypatch):
    """The products' arrays are allocated without numpy's huge-page request (pages.small_pages), and numpy's
    setting is back after the run."""
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    model, _ = _graph(rng)
    graph = Bf16Graph(model, _session, threads=2)
    seen, linear = [], _ext.linear_bf16

    def recording(*args, **kwargs):
        seen.append(_huge_pages())
        return linear(*args, **kwargs)

    monkeypatch.setattr(_ext, "linear_bf16", recording)
    previous = multiarray._set_madvise_hugepage(True)
    try:
        graph.run(None, {"x": rng.standard_normal((2, 5, 24)).astype(np.float32)})
        assert seen and not any(seen)
        assert _huge_pages() is True
    finally:
        multiarray._set_madvise_hugepage(previous)


def _reshape_graph(rng, flat_output: bool, allowzero: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x [4, 6, 24] -> MatMul(w1) + b1 -> h -> Reshape [0, -1] -> Reshape [24, 40] -> MatMul(w2) + b2 -> y; with
    ``flat_output`` also flat = Reshape(h, [-1]), a graph output."""
    w = {"w1": rng.standard_normal((24, 40)) / 4, "b1": rng.standard_normal(40), "w2": rng.standard_normal((40, 16)) / 4,
         "b2": rng.standard_normal(16)}
    w = {name: a.astype(np.float32) for name, a in w.items()}
    w |= {"keep": np.array([4, 240] if allowzero else [0, -1], np.int64), "rows": np.array([24, 40], np.int64),
          "all": np.array([-1], np.int64)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h"]),
             helper.make_node("Reshape", ["h", "keep"], ["h2"], allowzero=allowzero),
             helper.make_node("Reshape", ["h2", "rows"], ["h3"])]
    nodes += [helper.make_node("Reshape", ["h", "all"], ["flat"])] if flat_output else []
    nodes += [helper.make_node("MatMul", ["h3", "w2"], ["y0"]), helper.make_node("Add", ["y0", "b2"], ["y"])]
    outputs = ["y", "flat"] if flat_output else ["y"]
    graph = helper.make_graph(nodes, "r", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6, 24])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
                              [numpy_helper.from_array(a, name) for name, a in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), w


@needs_bf16
@pytest.mark.parametrize("flat_output", [False, True])
def test_bf16_graph_runs_reshapes_as_views(rng, flat_output):
    """A piece of Reshapes to constant shapes between two products runs as numpy views (ReshapeStep); the
    products' arrays are reused across runs only where no graph output is a view of them, and every run's
    results are right (an earlier run's outputs untouched)."""
    model, w = _reshape_graph(rng, flat_output)
    graph = Bf16Graph(model, _session, threads=2)
    kinds = [type(step).__name__ for step in graph.steps]
    assert kinds == ["WeightProduct"] + ["ReshapeStep"] * (3 if flat_output else 2) + ["WeightProduct"]
    assert graph.reused == ({"y"} - set(graph.outputs) | ({"h"} if not flat_output else set()))
    runs = []
    for _ in range(3):
        x = rng.standard_normal((4, 6, 24)).astype(np.float32)
        h = twins.linear_bf16(x.reshape(24, 24), w["w1"], w["b1"])
        runs.append(((x, h), [a.copy() for a in graph.run(None, {"x": x})], graph.run(None, {"x": x})))
    for (x, h), first, outputs in runs:     # (each run's outputs as it returned them, after the later runs)
        for got, kept in zip(outputs, first):
            np.testing.assert_array_equal(got, kept)
        np.testing.assert_allclose(outputs[0], twins.linear_bf16(h.reshape(24, 40), w["w2"], w["b2"]),
                                   rtol=1e-5, atol=1e-5)
        if flat_output:
            np.testing.assert_allclose(outputs[1], h.reshape(-1), rtol=1e-5, atol=1e-5)


@needs_bf16
def test_bf16_graph_keeps_other_reshapes_in_onnxruntime(rng):
    """A Reshape with allowzero 1 (where a 0 would mean an empty axis) stays in an ONNX Runtime piece."""
    model, _ = _reshape_graph(rng, False, allowzero=1)
    graph = Bf16Graph(model, _session, threads=2)
    assert [type(step).__name__ for step in graph.steps] == ["WeightProduct", "Piece", "WeightProduct"]


def _gelu(x: str, out: str, swap: bool = False) -> list[onnx.NodeProto]:
    """GELU as torch exports it (constants "sqrt2", "one", "half"); swap: the Muls' operands the other way."""
    first = [x, f"{out}_a"] if not swap else [f"{out}_a", x]
    return [helper.make_node("Div", [x, "sqrt2"], [f"{out}_d"]), helper.make_node("Erf", [f"{out}_d"], [f"{out}_e"]),
            helper.make_node("Add", [f"{out}_e", "one"], [f"{out}_a"]), helper.make_node("Mul", first, [f"{out}_m"]),
            helper.make_node("Mul", [f"{out}_m", "half"] if not swap else ["half", f"{out}_m"], [out])]


def _gelu_graph(rng) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x [2, 5, 24] -> MatMul(w1) + b1 -> GELU -> Reshape [10, 40] -> Gemm(w2, c2) -> Reshape [2, 5, 16] -> GELU
    -> y; z = MatMul(x, w3), a graph output, and its GELU zg (not fused: z is wanted as it is)."""
    w = {"w1": rng.standard_normal((24, 40)), "b1": rng.standard_normal(40), "w2": rng.standard_normal((40, 16)),
         "c2": rng.standard_normal(16), "w3": rng.standard_normal((24, 8))}
    w = {name: (a / 4).astype(np.float32) for name, a in w.items()}
    w.update(sqrt2=np.float32(np.sqrt(2)), one=np.float32(1), half=np.float32(0.5),
             s1=np.array([10, 40], np.int64), s2=np.array([2, 5, 16], np.int64))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             *_gelu("hb", "g"), helper.make_node("Reshape", ["g", "s1"], ["g2"]),
             helper.make_node("Gemm", ["g2", "w2", "c2"], ["y2"]), helper.make_node("Reshape", ["y2", "s2"], ["y3"]),
             *_gelu("y3", "y", swap=True), helper.make_node("MatMul", ["x", "w3"], ["z"]), *_gelu("z", "zg")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 24])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", "z", "zg")],
        [numpy_helper.from_array(np.asarray(a), name) for name, a in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), w


def test_find_products_takes_gelu(rng):
    """A GELU after a product (directly or after a Reshape that is the product's only use) runs in the product;
    not where the product's result is wanted by something else."""
    model, _ = _gelu_graph(rng)
    products = find_products(model.graph)
    assert sorted(products) == [0, 8, 15]
    first, gemm, plain = (products[i] for i in (0, 8, 15))
    assert (first.product.output, first.product.activation, first.replaced, first.edits) == \
        ("g", "gelu", {0, 1, 2, 3, 4, 5, 6}, {})
    assert (gemm.product.output, gemm.product.activation, gemm.replaced) == ("y2", "gelu", {8, 10, 11, 12, 13, 14})
    assert list(gemm.edits) == [9] and list(gemm.edits[9].input) == ["y2", "s2"] and gemm.edits[9].output == ["y"]
    assert model.graph.node[9].output == ["y3"]                       # the graph itself is left as it was
    assert (plain.product.output, plain.product.activation, plain.replaced) == ("z", "none", {15})


@needs_bf16
def test_bf16_graph_with_gelu_matches_its_numpy_emulation(rng):
    model, w = _gelu_graph(rng)
    graph = Bf16Graph(model, _session, threads=2)
    x = rng.standard_normal((2, 5, 24)).astype(np.float32)
    y, z, zg = graph.run(None, {"x": x})
    g = twins.gelu(twins.linear_bf16(x.reshape(10, 24), w["w1"], w["b1"])).astype(np.float32)
    want = twins.gelu(twins.linear_bf16(g, w["w2"], w["c2"])).reshape(2, 5, 16)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(zg, twins.gelu(z), rtol=1e-5, atol=1e-6)     # ONNX Runtime's float32 GELU
    full = _session(model.SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(y, full[0], atol=0.05)
    assert np.abs(y - full[0]).max() > 1e-5                                 # bfloat16's products, not float32's


def _window_block(tmp_path, use_rel_pos: bool = True) -> onnx.ModelProto:
    """torch's export of a windowed SAM ViT block (export/modeling/image_encoder.py), simplified by onnxslim as the
    exporter does, on 7 x 7 tokens of 32 channels,
    windows of 5 (the grid padded to 10 x 10: 4 windows x 2 heads of 25 tokens), random weights and relative
    position tables."""
    torch.manual_seed(0)
    block = Block(dim=32, num_heads=2, mlp_dim=64, attn_dim=32, qkv_bias=True, layer_norm_eps=1e-6,
                  use_rel_pos=use_rel_pos, window_size=5, input_size=(7, 7)).eval()
    if use_rel_pos:
        with torch.no_grad():
            block.attn.rel_pos_h.normal_(0, 0.5)
            block.attn.rel_pos_w.normal_(0, 0.5)
    path = tmp_path / "block.onnx"
    with warnings.catch_warnings():     # the tracer's, on the sizes it turns into constants
        warnings.simplefilter("ignore")
        torch.onnx.export(block, (torch.randn(1, 7, 7, 32),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], do_constant_folding=True)
    return onnxslim.slim(onnx.load(str(path)))      # as the exporter simplifies (static shapes folded)


def test_find_attention(tmp_path):
    """The windowed block's core: the nodes from the logits' MatMul to the MatMul by v, with the scale's Mul and k's
    Transpose (nothing else uses them); q, k and v [8, 25, 16], the terms [8, 5, 5, 5]. None without the terms."""
    model = _window_block(tmp_path)
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = {v.name: v for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)}
    found = find_attention(model.graph, infos)
    assert len(found) == 1
    (last, (step, replaced)), = found.items()
    nodes = model.graph.node
    assert nodes[last].op_type == "MatMul" and step.output == nodes[last].output[0] and step.scale == 0.25
    assert sorted(nodes[i].op_type for i in replaced) == sorted(
        ["Mul", "Transpose", "MatMul", "Reshape", "Unsqueeze", "Unsqueeze", "Add", "Add", "Reshape", "Softmax",
         "MatMul"])
    dims = {name: [d.dim_value for d in infos[name].type.tensor_type.shape.dim] for name in step.inputs}
    assert [dims[name] for name in step.inputs] == [[8, 25, 16]] * 3 + [[8, 5, 5, 5]] * 2
    plain = _window_block(tmp_path, use_rel_pos=False)
    inferred_plain = onnx.shape_inference.infer_shapes(plain)
    assert find_attention(plain.graph, {v.name: v for v in inferred_plain.graph.value_info}) == {}
    # and straight from the qkv product: q, k, v's Split chain, the terms' MatMuls, the result's way to the proj
    windows = find_window_attention(model.graph, infos, found)
    assert len(windows) == 1
    (_, (window, nodes)), = windows.items()
    assert window.dims == (4, 25, 2, 16) and window.out_shape[-1] == 32 and window.scale == 0.25
    assert window.table_h.shape == (5, 5, 16) and window.table_w.shape == (5, 5, 16)
    added = sorted(model.graph.node[i].op_type for i in nodes - replaced)
    assert replaced < nodes and added == sorted(["Squeeze"] * 3 + ["Split"] + ["Reshape"] * 2 + ["Transpose"]
                                                + ["MatMul"] * 2 + ["Reshape"] * 3 + ["Transpose"] * 2
                                                + ["Reshape", "Transpose", "Reshape"])


@needs_bf16
def test_bf16_graph_runs_windowed_attention_in_bf16(tmp_path, monkeypatch):
    """attention=True: the windowed core as a WindowAttentionStep on the qkv product (its q, k, v and terms gone
    from the pieces), the block's output within bfloat16 rounding of ONNX Runtime's float32, as with the core alone
    (an AttentionStep on ONNX Runtime's q, k, v and terms); False keeps it in ONNX Runtime."""
    model = _window_block(tmp_path)
    x = np.random.default_rng(1).standard_normal((1, 7, 7, 32)).astype(np.float32)
    want = _session(model.SerializeToString()).run(None, {"x": x})[0]
    tiles, plain = Bf16Graph(model, _session, threads=2, attention=True), Bf16Graph(model, _session, threads=2)
    kinds = [type(s).__name__ for s in tiles.steps]
    assert kinds.count("WindowAttentionStep") == 1 and "AttentionStep" not in kinds
    assert not any(isinstance(s, (AttentionStep, WindowAttentionStep)) for s in plain.steps)
    timings: dict[str, float] = {}
    got, base = tiles.run(None, {"x": x}, timings)[0], plain.run(None, {"x": x})[0]
    assert set(timings) == {"products", "attention", "onnxruntime"}
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 0.02 * scale and np.abs(base - want).max() <= 0.02 * scale
    assert not np.array_equal(got, base)
    np.testing.assert_array_equal(tiles.run(None, {"x": x})[0], got)    # the arrays reused: the same again
    with monkeypatch.context() as m:    # the core alone, on the terms ONNX Runtime computes
        m.setattr(bf16_graph, "find_window_attention", lambda *args: {})
        core = Bf16Graph(model, _session, threads=2, attention=True)
    assert [type(s).__name__ for s in core.steps].count("AttentionStep") == 1
    alone = core.run(None, {"x": x})[0]
    assert np.abs(alone - want).max() <= 0.02 * scale and np.abs(got - alone).max() <= 0.01 * scale


def test_bf16_graph_attention_needs_avx512_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(_ext, "has_avx512_bf16", lambda: False)
    with pytest.raises(ValueError, match=r"attention=True needs AVX512-BF16 \(AMX-BF16 tiles or VDPBF16PS\)"):
        Bf16Graph(_window_block(tmp_path), _session, attention=True)


def _litemedsam_encoder(litemedsam_dir) -> tuple[onnx.ModelProto, dict[str, onnx.ValueInfoProto]]:
    model = onnx.load(str(litemedsam_dir / "encoder.onnx"))
    inferred = onnx.shape_inference.infer_shapes(model)
    return model, {v.name: v for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)}


def test_find_biased_attention_on_litemedsam(litemedsam_dir):
    """LiteMedSAM's TinyViT: the windowed attention of all 10 of its attention blocks (stages 1-3: 361 windows of
    7 x 7 tokens x 4 heads, 25 of 14 x 14 x 5, 100 of 7 x 7 x 10; d 32), each from its qkv product's output to
    the Reshape the proj takes, with the blocks' attention biases; a block whose softmax is also a graph output
    keeps its nodes."""
    model, infos = _litemedsam_encoder(litemedsam_dir)
    found = find_biased_attention(model.graph, infos)
    steps = [step for step, _ in found.values()]
    assert sorted(s.dims for s in steps) == sorted([(361, 49, 4, 32)] * 2 + [(25, 196, 5, 32)] * 6
                                                   + [(100, 49, 10, 32)] * 2)
    names = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for last, (step, nodes) in found.items():
        assert step.scale == pytest.approx(32 ** -0.5)
        assert step.bias.shape == (step.dims[2], step.dims[1], step.dims[1])
        assert any(np.array_equal(step.bias, c) for c in names.values() if c.shape == step.bias.shape)
        assert sorted(model.graph.node[i].op_type for i in nodes) == sorted(
            ["Reshape", "Transpose", "Split", "Transpose", "MatMul", "Mul", "Add", "Softmax", "MatMul", "Transpose",
             "Reshape"])
        assert model.graph.node[last].output[0] == step.output and step.out_shape == (
            step.dims[0] * step.dims[1], step.dims[2] * step.dims[3])
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    model.graph.output.append(helper.make_tensor_value_info(softmax.output[0], TensorProto.FLOAT, None))
    assert len(find_biased_attention(model.graph, infos)) == 9


@needs_bf16
def test_bf16_graph_runs_litemedsam_attention_in_bf16(litemedsam_dir):
    """attention=True: LiteMedSAM's encoder with its 10 windowed attention blocks as BiasedAttentionSteps: the
    embedding within bfloat16 rounding of ONNX Runtime's float32 graph and of the float32-attention Bf16Graph."""
    model, _ = _litemedsam_encoder(litemedsam_dir)
    image = np.random.default_rng(5).standard_normal((1, 3, 256, 256)).astype(np.float32)
    want = _session(model.SerializeToString()).run(None, {"image": image})[0]
    on = Bf16Graph(model, _session, threads=2, weights="bf16x2", attention=True)
    off = Bf16Graph(model, _session, threads=2, weights="bf16x2")
    assert sum(isinstance(step, BiasedAttentionStep) for step in on.steps) == 10
    assert not any(isinstance(step, BiasedAttentionStep) for step in off.steps)
    timings: dict[str, float] = {}
    got, base = on.run(None, {"image": image}, timings)[0], off.run(None, {"image": image})[0]
    assert set(timings) == {"products", "attention", "onnxruntime"}
    assert not np.array_equal(got, base)
    assert _cosine(got, want) >= 0.9999 and _cosine(got, base) >= 0.9999


def test_bf16_graph_refuses_graphs_without_products():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    with pytest.raises(ValueError, match="no product of an activation with a constant weight"):
        Bf16Graph(model, _session)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@needs_bf16
def test_bf16_engine_litemedsam(litemedsam_dir, data_dir):
    """LiteMedSAM's real weights: the bf16 encoder's embedding is within bfloat16 rounding of fp32's (cosine
    0.99995 on this image when written) and the decoders are fp32's."""
    fp32 = Engine.load(litemedsam_dir, threads=2)
    bf16 = Engine.load(litemedsam_dir, threads=2, precision="bf16")
    assert bf16.precision == "bf16" and bf16.provider == "CPUExecutionProvider"
    assert isinstance(bf16.sessions["encoder"], Bf16Graph)
    image = load_image(data_dir / "cardiac_mr" / "acdc2d_example" / "fixed.png").array
    want, got = fp32.embed(image).embedding, bf16.embed(image).embedding
    assert not np.array_equal(got, want)
    assert _cosine(got, want) >= 0.9999
    np.testing.assert_array_equal(bf16.embed(image).embedding, got)     # deterministic
    # bf16x2 (weights as two bfloat16 parts) is closer still
    split = Engine.load(litemedsam_dir, threads=2, precision="bf16x2").embed(image).embedding
    assert 1 - _cosine(split, want) < 0.5 * (1 - _cosine(got, want))


@needs_bf16
def test_bf16_engine_vit_parts(tmp_path_factory):
    """A ViT export: the encoder parts around the native attention run with bfloat16 products and attention."""
    model_dir = export_model("random:tiny", tmp_path_factory.mktemp("tiny"), precisions=("fp32",), name="tiny")
    fp32 = Engine.load(model_dir, threads=2)
    bf16 = Engine.load(model_dir, threads=2, precision="bf16")
    image = np.random.default_rng(3).integers(0, 255, (90, 130), np.uint8)
    want, got = fp32.embed(image).embedding, bf16.embed(image).embedding
    if fp32.encoder_parts:
        assert bf16.encoder_attention == "bf16"
        assert all(isinstance(part, Bf16Graph) for part in bf16.encoder_parts)
        # the windowed block's attention in bfloat16 too, from its qkv product (block 0 of 2; block 1 is global)
        cores = [step for part in bf16.encoder_parts for step in part.steps if isinstance(step, WindowAttentionStep)]
        assert len(cores) == 1
    # the whole encoder graph: the global block's core, traced 2 grid rows (128 queries) at a time, is 32 cores of
    # the windowed core's form (its k Transpose shared by them, left in ONNX Runtime)
    whole = Engine.load(model_dir, threads=2, precision="bf16", fused_encoder=False)
    kinds = [type(step).__name__ for step in whole.sessions["encoder"].steps]
    assert (kinds.count("AttentionStep"), kinds.count("WindowAttentionStep")) == (32, 1)
    assert _cosine(whole.embed(image).embedding, want) >= 0.999
    assert _cosine(got, want) >= 0.999


def test_bf16_engine_errors(litemedsam_dir, monkeypatch):
    """bf16 needs the fp32 graphs and AVX512-BF16, and runs on the CPU provider."""
    monkeypatch.setattr(engine_module._ext, "has_avx512_bf16", lambda: False)
    with pytest.raises(ModelError, match="precision 'bf16' needs AVX512-BF16"):
        Engine.load(litemedsam_dir, precision="bf16")
    monkeypatch.setattr(engine_module._ext, "has_avx512_bf16", lambda: True)
    monkeypatch.setattr(engine_module, "select_providers", lambda providers: ["CUDAExecutionProvider"])
    with pytest.raises(ModelError, match="precision 'bf16' runs on the CPU"):
        Engine.load(litemedsam_dir, precision="bf16")
