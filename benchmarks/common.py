"""Shared helpers of the benchmark scripts: the machine's description, the labelled 2-D images of
../shared/data, CPU sessions and single-GEMM graphs, mask generation on a whole decoder, and writing a
results file pair."""
from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from samreg_rt import _ext, amg
from samreg_rt.io import load_image
from samreg_rt.masks import iou_matrix, pack_masks


def machine() -> dict[str, Any]:
    """CPU model, logical CPUs, SIMD flags of interest, what runs ``_ext.linear_bf16`` (the bf16 precisions' products:
    "AMX tiles", "AVX512-BF16" or "none"), the build of the fp32 kernels (``_ext.mask_upscaling_isa``), Python / ONNX Runtime / numpy versions."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    simd = sorted(f for f in (flags.group(1).split() if flags else []) if re.match(r"(avx|fma|f16c|amx)", f))
    return {
        "cpu": model.group(1).strip() if model else platform.processor(),
        "logical_cpus": os.cpu_count(),
        "simd_flags": simd,
        "bf16_products": "AMX tiles" if _ext.has_amx_bf16() else "AVX512-BF16" if _ext.has_avx512_bf16() else "none",
        # the build of the fused fp32 kernels: "avx512" (Engine runs them all), "avx2" (the mask upscaling and
        # the two-way transformer on factored image tokens) or "generic" (none)
        "fp32_kernels": _ext.mask_upscaling_isa(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays taken as flat vectors (float64)."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def best_ious(reference: np.ndarray, other: np.ndarray) -> list[float]:
    """For each reference ROI (packed masks) its best mask IoU with another run's ROIs (0 when that has none)."""
    if len(reference) == 0:
        return []
    if len(other) == 0:
        return [0.0] * len(reference)
    return iou_matrix(reference, other).max(axis=1).astype(float).tolist()


def write_report(out: Path, stem: str, report: dict[str, Any], text: str) -> None:
    """``out/<stem>.json`` (the report) and ``out/<stem>.md`` (its text), creating ``out``; the text also on
    stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(text)


def labelled_images(data: Path, per_application: int | None) -> list[tuple[str, Path, Path]]:
    """(name, image, label) of the labelled 2-D pairs, at most ``per_application`` pairs each."""
    manifest = json.loads((data / "manifest.json").read_text())
    out, taken = [], {}
    for pair in manifest["pairs"]:
        if pair["dim"] != 2 or not pair["fixed_label"]:
            continue
        taken[pair["application"]] = taken.get(pair["application"], 0) + 1
        if per_application and taken[pair["application"]] > per_application:
            continue
        for side in ("fixed", "moving"):
            out.append((f"{pair['id']}/{side}", data / pair[side], data / pair[f"{side}_label"]))
    return out


def structures(label_path: Path, shape: tuple[int, int]) -> list[np.ndarray]:
    """Binary masks of each labelled structure (each class value; 0/255 and grey renders >= 128)."""
    lab = load_image(label_path).array
    lab = lab[..., 0] if lab.ndim == 3 else lab
    lab = cv2.resize(lab, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    values = [v for v in np.unique(lab) if v != 0]
    if len(values) > 4:  # a rendered label with grey edges: binarise at 128
        return [lab >= 128]
    return [lab == v for v in values]


def session(model: str | bytes, threads: int, profile_prefix: Path | None = None) -> ort.InferenceSession:
    """CPU session of a graph file or serialized graph; profiling into ``profile_prefix*`` if given."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


def gemm_graph(m: int, k: int, n: int, int8: bool) -> bytes:
    """One-node graph A (M, K) x B (K, N) -> (M, N), B a weight: fp32 ``MatMul``, or
    ``MatMulInteger`` of uint8 A (zero point an input) x int8 B (per-column zero points) -> int32."""
    rng = np.random.default_rng(0)
    if int8:
        weights = [numpy_helper.from_array(rng.integers(-64, 64, (k, n), dtype=np.int8), "B"),
                   numpy_helper.from_array(np.zeros(n, np.int8), "b_zero")]
        node = helper.make_node("MatMulInteger", ["A", "B", "a_zero", "b_zero"], ["Y"])
        inputs = [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k]),
                  helper.make_tensor_value_info("a_zero", TensorProto.UINT8, [])]
        out = helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])
    else:
        weights = [numpy_helper.from_array(rng.standard_normal((k, n), np.float32), "B")]
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])]
        out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])
    graph = helper.make_graph([node], "gemm", inputs, [out], initializer=weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


class WholeDecoder:
    """``amg.generate``'s decoder interface over a whole decoder ``decode(embedding (C,h,w), coords
    (B,N,2), labels (B,N)) -> iou (B,4), low-res logits (B,4,256,256)`` (the one-graph decoder,
    PyTorch's): ``decode_tokens`` runs it for every prompt; ``decode_kept_masks`` selects the masks kept.
    ``threads``: the thread limit of the kernels amg runs after the decoder (``Engine.threads``)."""

    def __init__(self, decode: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
                 threads: int = 0):
        self.decode = decode
        self.threads = threads

    def prepare(self, embedding):
        return embedding                            # nothing to compute once per image

    def factors_buffer(self, capacity, points):
        return None                                 # image tokens are never factored here

    def decode_tokens(self, embedding, coords, labels, out=None, mask_outputs=(0, 1, 2, 3), factors=None):
        iou, low = self.decode(embedding, coords, labels)
        rows = np.broadcast_to(np.asarray(mask_outputs, np.float32)[None, :, None], (len(coords), len(mask_outputs), 1))
        return iou, rows, low                       # "hyper_in" carries the output index

    def decode_kept_masks(self, low, rows, keep, low_rows=256):
        kept = np.take_along_axis(low, rows[:, :, 0].astype(np.int64)[:, :, None, None], axis=1)[keep]
        return np.ascontiguousarray(kept[:, :low_rows])


def same_masks(a: amg.MaskSet, b: amg.MaskSet, min_iou: float) -> dict[str, Any]:
    """Same prompt ids in the same order and every mask IoU >= ``min_iou`` -> identical (bool),
    mask counts and the worst IoU (None when the prompt ids differ)."""
    if len(a) != len(b) or not np.array_equal(a.prompt_ids, b.prompt_ids):
        return {"identical": False, "masks": [len(a), len(b)], "min_iou": None}
    ious = np.diag(iou_matrix(pack_masks(a.masks), pack_masks(b.masks))) if len(a) else np.ones(1)
    return {"identical": bool(ious.min() >= min_iou), "masks": [len(a), len(b)], "min_iou": float(ious.min())}
