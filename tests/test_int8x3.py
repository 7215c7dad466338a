"""int8 weight products with two-part inputs (int8x3): _ext.linear_int8x3 against its twin (where the CPU has
AVX512-VNNI), the packing, Bf16Graph(weights='int8x3') and engines of precision 'int8x3'."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from samreg_rt import _ext
from samreg_rt import engine as engine_module
from samreg_rt.bf16_graph import Bf16Graph, Int8x3Product, int8x3_weight_parts, pack_int8x3_weight
from samreg_rt.engine import Engine
from samreg_rt.errors import ModelError
from samreg_rt.io import load_image

from . import twins
from .test_bf16_graph import _cosine, _gelu_graph, _graph, _linear_inputs, _session

needs_vnni = pytest.mark.skipif(not _ext.has_avx512_vnni(), reason="no AVX512-VNNI on this CPU")


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


def _close_to_twin(got: np.ndarray, x: np.ndarray, w: np.ndarray, b: np.ndarray) -> None:
    """got within float32 rounding of the twin's exact integer sums: the kernel's int32 -> float32 conversions,
    one fma, one scale product and one bias fma, a few ulp of the terms' size."""
    want = twins.linear_int8x3(x, w, b)
    size = (np.abs(x).max(axis=1, keepdims=True) * np.abs(w).max(axis=0) * x.shape[1] / 4 + np.abs(b))
    assert np.all(np.abs(got.astype(np.float64) - want) <= 8 * np.finfo(np.float32).eps * size)


def test_int8x3_weight_parts(rng):
    """W = s (hi + lo / 256) to within s / 512 per value (s / 256 where lo clips at 127); parts in int8's range;
    zero columns scale 1."""
    w = rng.standard_normal((70, 45)).astype(np.float32)
    w[:, 3] = 0
    hi, lo, scale = int8x3_weight_parts(w)
    assert hi.min() >= -127 and hi.max() <= 127 and lo.min() >= -128 and lo.max() <= 127
    assert scale.dtype == np.float32 and scale[3] == 1 and not hi[:, 3].any() and not lo[:, 3].any()
    err = np.abs(scale * (hi + lo / 256) - w) / scale
    assert err.max() <= 1.001 / 256 and (err > 1.001 / 512).mean() < 0.01    # 1 / 256 only where lo clips
    np.testing.assert_array_equal(np.abs(hi).max(axis=0)[np.arange(45) != 3], 127)


def test_pack_int8x3_weight_layout(rng):
    """Element [p, q, t, n, e] is part t of W[4 q + e, 32 p + n] + 128, 128 past K and N; 64-byte aligned."""
    k, n = 45, 70
    w = rng.standard_normal((k, n)).astype(np.float32)
    packed, scale = pack_int8x3_weight(w)
    assert packed.dtype == np.uint8 and packed.shape == (3, 12, 2, 32, 4) and packed.ctypes.data % 64 == 0
    hi, lo, want_scale = int8x3_weight_parts(w)
    np.testing.assert_array_equal(scale, want_scale)
    for p, q, t, col, e in [(0, 0, 0, 0, 0), (2, 5, 1, 5, 3), (1, 11, 0, 31, 0), (2, 11, 1, 6, 1), (1, 3, 1, 13, 2)]:
        row, column = 4 * q + e, 32 * p + col
        want = ((hi, lo)[t][row, column] if row < k and column < n else 0) + 128
        assert packed[p, q, t, col, e] == want, (p, q, t, col, e)
    assert np.count_nonzero(packed != 128) == np.count_nonzero(hi) + np.count_nonzero(lo)
    with pytest.raises(ValueError, match=r"expected a \[K, N\] weight"):
        pack_int8x3_weight(w[None])


@needs_vnni
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 7, 3), (7, 40, 50), (33, 64, 64), (97, 160, 640),
                                   (300, 1280, 320), (4096, 768, 96), (70, 3100, 100)])
def test_linear_int8x3_matches_twin(rng, m, k, n):
    x, w, b = _linear_inputs(rng, m, k, n)
    x[0] *= 50                      # rows of other sizes: each its own scale
    packed, scale = pack_int8x3_weight(w)
    got = _ext.linear_int8x3(x, packed, scale, b)
    assert got.shape == (m, n) and got.dtype == np.float32
    _close_to_twin(got, x, w, b)


@needs_vnni
def test_linear_int8x3_is_near_the_float_product(rng):
    """About 16-bit inputs: the error against the float64 product is below 2^-14 of the terms' size (bf16x2 on
    the same inputs: the activations' bfloat16 rounding alone, 2^-9)."""
    x, w, b = _linear_inputs(rng, 200, 768, 300)
    packed, scale = pack_int8x3_weight(w)
    got = _ext.linear_int8x3(x, packed, scale, b).astype(np.float64)
    exact = x.astype(np.float64) @ w + b
    size = np.abs(x).astype(np.float64) @ np.abs(w)
    assert np.abs(got - exact).max() <= 2.0 ** -14 * size.mean()
    bf16x2 = twins.linear_bf16_split(x, w, b).astype(np.float64)
    assert np.abs(got - exact).mean() < 0.1 * np.abs(bf16x2 - exact).mean()


@needs_vnni
def test_linear_int8x3_gelu(rng):
    x, w, b = _linear_inputs(rng, 50, 96, 70)
    packed, scale = pack_int8x3_weight(w)
    y = _ext.linear_int8x3(x, packed, scale, b).astype(np.float64)
    got = _ext.linear_int8x3(x, packed, scale, b, activation="gelu")
    np.testing.assert_allclose(got, twins.gelu(y), rtol=1e-5, atol=2e-6)


@needs_vnni
def test_linear_int8x3_rows_are_independent(rng):
    """Zero rows give the bias; a row with a NaN or an infinity gives NaN, the other rows unchanged; the
    result does not depend on the threads; out= is written and returned; no rows, no work."""
    x, w, b = _linear_inputs(rng, 40, 100, 60)
    packed, scale = pack_int8x3_weight(w)
    clean = _ext.linear_int8x3(x, packed, scale, b, threads=1)
    np.testing.assert_array_equal(_ext.linear_int8x3(x, packed, scale, b, threads=2), clean)
    bad = x.copy()
    bad[3] = 0
    bad[5, 7], bad[9, 99] = np.nan, np.inf
    got = _ext.linear_int8x3(bad, packed, scale, b)
    np.testing.assert_array_equal(got[3], b)
    assert np.isnan(got[[5, 9]]).all()
    rest = np.setdiff1d(np.arange(40), [3, 5, 9])
    np.testing.assert_array_equal(got[rest], clean[rest])
    out = np.full((40, 60), 7, np.float32)
    assert _ext.linear_int8x3(x, packed, scale, b, out=out) is out
    np.testing.assert_array_equal(out, clean)
    assert _ext.linear_int8x3(x[:0].copy(), packed, scale, b).shape == (0, 60)


def test_linear_int8x3_rejects_bad_arguments(rng):
    """Argument checks run before the CPU is asked for AVX512-VNNI, on any CPU."""
    x, w, b = _linear_inputs(rng, 10, 40, 50)
    packed, scale = pack_int8x3_weight(w)
    shifted = np.empty(packed.nbytes + 1, np.uint8)[1:].reshape(packed.shape)
    shifted[...] = packed
    buffer = np.zeros(1000, np.float32)
    buffer[:400] = x.ravel()
    cases = [
        (dict(x=buffer[:400].reshape(10, 40), out=buffer[300:800].reshape(10, 50)), ValueError,
         "out: must not overlap x"),
        (dict(x=x.astype(np.float64)), TypeError, "x: expected dtype float32"),
        (dict(w=packed.astype(np.int8)), TypeError, "w: expected dtype uint8"),
        (dict(x=x[:, :30].copy()), ValueError, r"w: expected the packing of a \(30, 50\) weight"),
        (dict(bias=b[:20].copy()), ValueError, r"w: expected the packing of a \(40, 20\) weight"),
        (dict(w_scale=scale[:20].copy()), ValueError, r"w_scale: expected shape \(50\), got \(20,\)"),
        (dict(w=shifted), ValueError, "64-byte boundary"),
        (dict(x=np.zeros((2, 40000), np.float32)), ValueError, "K up to 32768"),
        (dict(out=np.zeros((10, 49), np.float32)), ValueError, r"out: expected shape \(10, 50\)"),
        (dict(threads=-1), ValueError, "threads"),
        (dict(activation="relu"), ValueError, "activation must be 'none' or 'gelu', got 'relu'"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            _ext.linear_int8x3(**{**dict(x=x, w=packed, w_scale=scale, bias=b), **change})


@pytest.mark.skipif(_ext.has_avx512_vnni(), reason="this CPU has AVX512-VNNI")
def test_linear_int8x3_refuses_without_vnni(rng):
    x, w, b = _linear_inputs(rng, 10, 40, 50)
    with pytest.raises(RuntimeError, match="no AVX512-VNNI"):
        _ext.linear_int8x3(x, *pack_int8x3_weight(w), b)


@needs_vnni
@pytest.mark.parametrize("make", [_graph, _gelu_graph])
def test_int8x3_graph_matches_onnxruntime(rng, make):
    """Bf16Graph(weights='int8x3') on hand-made graphs (with and without a GELU after a product): its products
    are Int8x3Products, its outputs ONNX Runtime's fp32 ones to within int8x3's rounding."""
    model, _ = make(rng)
    graph = Bf16Graph(model, _session, threads=2, weights="int8x3")
    products = [s for s in graph.steps if isinstance(s, Int8x3Product)]
    assert products and all(p.weight.dtype == np.uint8 for p in products)
    feeds = {name: rng.standard_normal(
        [d.dim_value for d in next(i for i in model.graph.input if i.name == name).type.tensor_type.shape.dim]
    ).astype(np.float32) for name in graph.inputs}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for got, ref in zip(graph.run(None, feeds), want):
        np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def test_int8x3_graph_needs_vnni(rng, monkeypatch):
    model, _ = _graph(rng)
    monkeypatch.setattr(_ext, "has_avx512_vnni", lambda: False)
    with pytest.raises(ValueError, match="weights 'int8x3' needs AVX512-VNNI"):
        Bf16Graph(model, _session, weights="int8x3")
    with pytest.raises(ValueError, match="weights must be one of"):
        Bf16Graph(model, _session, weights="int4")


@needs_vnni
def test_int8x3_engine_litemedsam(litemedsam_dir, data_dir):
    """LiteMedSAM's real weights: the int8x3 encoder's embedding is as close to fp32's as bf16x2's (cosine
    0.999998 on this image when written; ONNX Runtime's int8 0.998) and the decoders are fp32's."""
    fp32 = Engine.load(litemedsam_dir, threads=2)
    int8x3 = Engine.load(litemedsam_dir, threads=2, precision="int8x3")
    assert int8x3.precision == "int8x3" and int8x3.provider == "CPUExecutionProvider"
    graph = int8x3.sessions["encoder"]
    assert isinstance(graph, Bf16Graph) and any(isinstance(s, Int8x3Product) for s in graph.steps)
    image = load_image(data_dir / "cardiac_mr" / "acdc2d_example" / "fixed.png").array
    want, got = fp32.embed(image).embedding, int8x3.embed(image).embedding
    assert not np.array_equal(got, want)
    assert _cosine(got, want) >= 0.99999
    np.testing.assert_array_equal(int8x3.embed(image).embedding, got)     # deterministic


def test_int8x3_engine_errors(litemedsam_dir, monkeypatch):
    """int8x3 needs AVX512-VNNI and runs on the CPU provider."""
    monkeypatch.setattr(engine_module._ext, "has_avx512_vnni", lambda: False)
    with pytest.raises(ModelError, match=r"precision 'int8x3' needs AVX512-VNNI, .*has_avx512_vnni\(\) is False"):
        Engine.load(litemedsam_dir, precision="int8x3")
    monkeypatch.setattr(engine_module._ext, "has_avx512_vnni", lambda: True)
    monkeypatch.setattr(engine_module, "select_providers", lambda providers: ["CUDAExecutionProvider"])
    with pytest.raises(ModelError, match="precision 'int8x3' runs on the CPU"):
        Engine.load(litemedsam_dir, precision="int8x3")
