"""fp16 and int8 variants of an exported fp32 graph. Both keep float32 inputs and outputs, so the
runtime feeds every precision alike (docs/contracts.md).

- fp16: ``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)``, then
  onnxslim (the converter appends its input casts at the end of the node list; onnxslim sorts
  the graph topologically and folds the casts of constants).
- int8: ``onnxruntime.quantization.quantize_dynamic`` of the MatMul/Gemm nodes whose second input
  is a weight: weights int8 per output channel, activations uint8 quantized at run time. The weights
  take the full 8-bit range where the exporting CPU has VNNI (``has_vnni``), a 7-bit range
  (``reduce_range``) elsewhere. On the AMX Xeon, LiteMedSAM's int8 encoder against fp32 on 16 images of
  ../shared/data: embedding cosine 0.9970 full range against 0.9923 with reduce_range (mean), and
  registering 4 labelled pairs, mean best ROI mask IoU 0.910 against 0.858 and ROI pairs kept 0.60
  against 0.40 (scratch measurements; benchmarks/int8_accuracy.py measures the export as it is).
  Given a ``calibration.Calibration``, the weights are rounded to that grid by GPTQ instead of to
  nearest (``gptq_weights``): same graph, same scales, other int8 values; LiteMedSAM's cosine 0.9969 ->
  0.9980 with the exporter's default calibration on 4 synthetic phantoms (``calibration``'s figures).
  Activations need no calibration data, so one recipe serves every model. The
  activation x activation MatMuls of attention stay float (8-bit softmax probabilities over
  4096 keys lose most of their information), and so do convolutions (with ``ConvInteger`` the
  LiteMedSAM encoder took 5.5 instead of 3.0 CPU s and its cosine fell to 0.73). ``reduce_range`` avoids the int16
  saturation of the u8 x s8 ``vpmaddubsw`` path on x86 CPUs without VNNI. Measured on LiteMedSAM
  (AMD EPYC, AVX2, 1 thread): encoder cosine to fp32 0.976 plain, 0.986 per channel, 0.994 per
  channel + reduce_range; static QDQ (8 calibration images, Conv+MatMul) 0.66. Speed on this
  AVX2-only CPU: no gain (LiteMedSAM 3.04 vs 3.05 CPU s, SAM ViT-B 33.0 vs 36.1; MLAS's u8 x s8
  kernel is no faster than its fp32 SGEMM without VNNI); CPUs with VNNI are where int8 pays. Runs on ONNX
  Runtime's CPU execution provider; TensorRT does not parse ``MatMulInteger`` /
  ``DynamicQuantizeLinear`` (see ``onnx_export``).
  The int8 variant quantizes the encoder only and reuses the fp32 decoder: on the same CPU the
  int8 decoder ran no faster (2.18 vs 2.14 CPU s for 16 prompts) and its binarised masks agreed
  with PyTorch at IoU 0.86 (point prompts) / 0.96 (box prompts) against 1.0 for fp32.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxslim
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType
from onnxruntime.transformers.float16 import convert_float_to_float16

from . import calibration
from .onnx_export import INT8_CPU_OPS, PORTABLE_OPS, PROTOBUF_LIMIT, check_graph, save_model

log = logging.getLogger(__name__)

PRECISION_NOTES = {
    "fp32": "torch.onnx.export(dynamo=False) + onnxslim",
    "fp16": "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True) + onnxslim; "
            "float32 inputs/outputs",
    "int8": "encoder: onnxruntime.quantization.quantize_dynamic of weight MatMul/Gemm, weights int8 per "
            "channel ({range}; rounding: {rounding}), activations uint8 at run time, attention and convolutions float; "
            "decoder: the fp32 graph; float32 inputs/outputs; for the CPU execution provider",
}
INT8_OP_TYPES = ("MatMul", "Gemm")
# Graphs each precision converts; the others reuse the fp32 file.
CONVERTED_GRAPHS = {"fp16": ("encoder", "decoder", "decoder_tokens", "decoder_masks"), "int8": ("encoder",)}


def has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has VNNI (``avx512_vnni`` or ``avx_vnni`` among ``cpuinfo``'s flags; False where the file
    cannot be read): its u8 x s8 products then sum in int32, without the int16 saturation that ``reduce_range``
    avoids."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return "avx512_vnni" in flags or "avx_vnni" in flags


def precision_note(precision: str, calib: calibration.Calibration | None = None) -> str:
    """The manifest's note on how ``precision``'s graphs were made (on this CPU; int8: GPTQ on ``calib``, or
    rounded to nearest without it)."""
    rounding = f"GPTQ calibrated on {calib.label}" if calib is not None else "round to nearest"
    return PRECISION_NOTES[precision].format(range="full 8-bit range: VNNI" if has_vnni() else "reduce_range: 7 bits",
                                             rounding=rounding)


def convert(precision: str, src: str | Path, dst: str | Path, calib: calibration.Calibration | None = None) -> list[Path]:
    """fp32 graph file -> ``precision`` ("fp16" or "int8") graph file; returns the files written. ``calib``:
    int8's weight calibration (``to_int8``)."""
    return to_fp16(src, dst) if precision == "fp16" else to_int8(src, dst, calib=calib)


def to_fp16(src: str | Path, dst: str | Path) -> list[Path]:
    """fp32 graph file -> fp16 graph file with float32 inputs/outputs; returns the files written."""
    model = onnx.load(str(src))
    model = onnxslim.slim(convert_float_to_float16(model, keep_io_types=True))
    check_graph(model, PORTABLE_OPS)
    return save_model(model, dst)


def gptq_weights(model: onnx.ModelProto, calib: calibration.Calibration, qmax: int) -> int:
    """Replace, in place, each weight of ``model``'s products that ``calib`` covers by its GPTQ rounding
    ``q * scale`` (``calibration.gptq_round``), which the quantizer then reproduces exactly. Returns how many
    weights were replaced."""
    values = {init.name: init for init in model.graph.initializer}
    done = 0
    for node, name in calibration.weight_products(model):
        w = numpy_helper.to_array(values[name])
        kn = calibration.as_kn(node, w)
        rounding = calib.round(kn, qmax)
        if rounding is None:
            continue
        rounded = rounding[0].astype(np.float32) * rounding[1]
        values[name].CopyFrom(numpy_helper.from_array(rounded if kn is w else np.ascontiguousarray(rounded.T), name))
        done += 1
    return done


def to_int8(src: str | Path, dst: str | Path, reduce_range: bool | None = None,
            calib: calibration.Calibration | None = None) -> list[Path]:
    """fp32 graph file -> dynamically quantized int8 graph file; returns the files written. ``reduce_range``:
    7-bit weights (None: where this CPU lacks VNNI, ``has_vnni``). ``calib``: the weights it covers are rounded
    by GPTQ, the others (all without it) to nearest."""
    reduce_range = not has_vnni() if reduce_range is None else reduce_range
    model = onnx.load(str(src))
    if calib is not None:
        qmax = int(get_qmin_qmax_for_qType(onnx.TensorProto.INT8, reduce_range=reduce_range, symmetric=True)[1])
        replaced = gptq_weights(model, calib, qmax)
        log.info("%s: %d of %d weights rounded by GPTQ", src, replaced, len(calibration.weight_products(model)))
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    # the other MatMuls stay float: products of two activations (attention) and with a batched constant (a ViT's
    # relative position terms)
    products = {node.name for node, _ in calibration.weight_products(model)}
    float_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in products]
    root = logging.getLogger()
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "int8.onnx"
        was_disabled, root.disabled = root.disabled, True  # the quantizer warns on the root logger
        try:
            quantize_dynamic(
                model, staged, op_types_to_quantize=list(INT8_OP_TYPES), nodes_to_exclude=float_matmuls,
                per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                use_external_data_format=model.ByteSize() >= PROTOBUF_LIMIT,
            )
        finally:
            root.disabled = was_disabled
        model = onnx.load(str(staged))
    check_graph(model, PORTABLE_OPS | INT8_CPU_OPS)
    return save_model(model, dst)
