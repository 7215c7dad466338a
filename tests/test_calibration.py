"""int8 weight calibration (samreg_export.calibration): GPTQ rounding against round-to-nearest, and the input
statistics it takes from a graph."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from samreg_export import calibration


def _round_to_nearest(w: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    scale = np.abs(w).max(axis=0) / qmax
    return np.clip(np.round(w / scale), -qmax, qmax), scale


@pytest.mark.parametrize("qmax", [127, 64])
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(qmax):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 7))
    q, scale = calibration.gptq_round(w, np.diag(rng.uniform(0.5, 2.0, 40)), qmax)
    want_q, want_scale = _round_to_nearest(w, qmax)
    assert q.dtype == np.int8 and np.array_equal(q, want_q)
    assert np.allclose(scale, want_scale, rtol=1e-6)


@pytest.mark.parametrize("qmax", [127, 64])
def test_gptq_lowers_the_output_error_on_correlated_inputs(qmax):
    """On inputs with correlated channels, the layer's output on those inputs moves less than with
    round-to-nearest, on the same grid: the same scales, every value within +-qmax and each output channel
    keeping its largest weight at +-qmax (so a quantizer given q * scale finds the same scale)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 16)) @ rng.standard_normal((16, 300)) + 0.1 * rng.standard_normal((2000, 300))
    w = rng.standard_normal((300, 24)) / np.sqrt(300)
    given = w.copy()
    q, scale = calibration.gptq_round(w, x.T @ x, qmax)
    assert np.array_equal(w, given)
    rtn_q, rtn_scale = _round_to_nearest(w, qmax)
    assert np.allclose(scale, rtn_scale, rtol=1e-6)
    assert np.abs(q.astype(int)).max() <= qmax
    assert np.array_equal(q[np.abs(w).argmax(axis=0), np.arange(24)], np.sign(w[np.abs(w).argmax(axis=0), np.arange(24)]) * qmax)
    error = np.linalg.norm(x @ (w - q * scale))
    rtn_error = np.linalg.norm(x @ (w - rtn_q * rtn_scale))
    assert error < 0.5 * rtn_error, (error, rtn_error)


def test_gptq_rounds_the_weights_of_inputs_that_never_fired_to_nearest():
    """Synthetic calibration images may leave an input at zero that real images use: its weights keep
    round-to-nearest (neither zeroed nor shifted by the other inputs' errors)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12))
    x[:, 3] = 0.0
    w = rng.standard_normal((12, 5))
    q, _ = calibration.gptq_round(w, x.T @ x, 127)
    assert np.array_equal(q[3], _round_to_nearest(w, 127)[0][3])
    assert not np.array_equal(q, _round_to_nearest(w, 127)[0])


def _product_graph() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """image [R, 6] -> Relu -> MatMul(w1 [6, 4]) -> Gemm(transB, w2 [3, 4]) -> out."""
    rng = np.random.default_rng(3)
    w1, w2 = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["r"]), helper.make_node("MatMul", ["r", "w1"], ["h"]),
         helper.make_node("Gemm", ["h", "w2"], ["out"], transB=1)],
        "products", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["R", 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["R", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), w1, w2


def test_input_hessians_sum_the_inputs_products_over_the_images(tmp_path):
    model, w1, w2 = _product_graph()
    onnx.save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(4)
    images = [rng.standard_normal((n, 6)).astype(np.float32) for n in (5, 9)]
    hessians = calibration.input_hessians(tmp_path / "m.onnx", images)
    relu = [np.maximum(x, 0).astype(np.float64) for x in images]
    hidden = [r @ w1 for r in relu]
    assert set(hessians) == {calibration.weight_key(w1), calibration.weight_key(w2.T)}
    assert np.allclose(hessians[calibration.weight_key(w1)], sum(r.T @ r for r in relu), rtol=1e-5)
    assert np.allclose(hessians[calibration.weight_key(w2.T)], sum(h.T @ h for h in hidden), rtol=1e-4)
    assert [n.op_type for n, _ in calibration.weight_products(model)] == ["MatMul", "Gemm"]
