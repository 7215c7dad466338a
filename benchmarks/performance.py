"""Where the time goes: GEMM peaks, achieved throughput of each graph, PyTorch eager, cost curves, memory.

    python benchmarks/performance.py [--threads 2] [--grids 8 16 32 64] [--repeats 3]
                                     [--out benchmarks/results] [--quick]

Everything runs in one process on this machine, with ``--threads`` threads for ONNX Runtime
(``intra_op_num_threads``) and torch (``torch.set_num_threads``):

1. GEMM peaks: single-node ONNX graphs (fp32 ``MatMul``; ``MatMulInteger`` uint8 x int8 as ONNX
   Runtime's dynamic quantization emits it) at the shapes of ``GEMM_SHAPES`` (M x K x N, B a
   weight); best of the timed runs; peak = the best shape. Measured twice, first thing and again
   after the graphs and the decoder are timed, each shape's figure the better of the two: on a
   shared virtual machine one sample can fall far below what the machine gives (and every
   percentage of it rise with it).
2. Graph throughput: the encoders (fp32, int8) and LiteMedSAM's ``decoder_tokens`` and
   ``decoder_masks`` (a batch of ``DECODER_BATCH`` box prompts of its grid: the batch mask
   generation runs) run with ONNX Runtime's profiler; FLOPs (2 x multiply-adds) are counted from
   each GEMM-class node's input and output shapes. The warm-up run is left out; latency, work and op
   times are those of the run of median latency. "% of peak" is the time the counted work takes at
   the measured peaks (fp32 FLOPs at the fp32 peak, int8 ops at the int8 peak) over the latency: of
   the whole graph, and of its GEMM-class kernels alone. Where the
   engine runs a step on its fused CPU path instead (``samreg_rt.two_way`` for decoder_tokens,
   ``samreg_rt.upscaling`` for decoder_masks), that path's row is timed by wall clock on the same
   batch and credited with the graph's FLOPs, and the decoder figure adds the two steps (dense image
   tokens: all of the graph's work). Mask generation runs them on factors (``decode_tokens`` with
   ``factors``, the factored upscaling), which does less work: those rows are timed too and credited
   with the graph's FLOPs, a graph-equivalent rate, not an achieved one.
3. PyTorch eager, same weights: encoder latency (ORT figures from the profiled runs; for a ViT also
   samreg-rt's encoder, its parts around the native global attention, fp32 and int8) and mask
   generation: ``amg.generate`` on the samreg-rt decoder against the same ``amg.generate`` driven
   by Meta's PyTorch decoder (``parity.torch_decoder``, in chunks of ``parity.CHUNK`` prompts) on
   the same embedding.
4. Cost curves (one run each): mask-generation latency vs grid; ``register()`` stages vs image
   side; ROI embedding + matching vs number of (synthetic) ROIs; pairs/s of ``register()`` and
   decoder prompts/s vs prompt batch size.
5. Peak resident memory per stage: VmHWM after resetting it (``/proc/self/clear_refs``).

Models are exported fresh into a temporary directory (``export_model``, fp32 + int8): LiteMedSAM,
and the untrained ``random:vit_b`` for the encoder rows. ``--quick`` (a check of the script, a few
minutes): no ViT-B, 1 timed run, grids 4 8, and mask generation (comparison, register curves,
memory) on an 8x8 instead of the spec's 16x16 box grid. Writes ``performance.md``, ``.json``,
``performance_curves.csv`` and ``performance_*.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import cv2
import matplotlib
import numpy as np
import onnx
import torch

from samreg_export import parity
from samreg_export.checkpoints import load_source
from samreg_export.export import default_spec, export_model, read_parity_image
from samreg_rt import _ext, amg, ddf, match, roi
from samreg_rt.correspondence import Side
from samreg_rt.engine import Engine, ImageEmbedding
from samreg_rt.io import load_image
from samreg_rt.masks import pack_masks
from samreg_rt.pipeline import PRESETS, embedding_weights, keep_rois, pair_rois, register, work_shape
from samreg_rt.split_encoder import run_encoder_parts

from common import WholeDecoder, gemm_graph, machine, same_masks, session, write_report  # benchmarks/common.py (the script's folder is on sys.path)
from encoder import encoder_flops, time_runs  # benchmarks/encoder.py

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXED, MOVING = (REPO / "examples" / "cardiac_2d" / f"{side}.png" for side in ("fixed", "moving"))
MODELS = {"litemedsam": "litemedsam", "vit_b": "random:vit_b"}
GEMM_SHAPES = [(4096, 256, 256), (4096, 256, 128), (2048, 2048, 2048), (16384, 64, 128), (448, 256, 4096)]
GEMM_OPS = {"MatMul", "FusedMatMul", "Gemm", "FusedGemm", "MatMulInteger", "DynamicQuantizeMatMul",
            "MatMulIntegerToFloat", "Conv", "FusedConv", "ConvTranspose", "Einsum"}
INT8_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
DECODER_BATCH = amg.AmgParams().batch_size   # the batch mask generation runs (64)
FUSED_TOKENS = f"litemedsam fused decoder tokens (B={DECODER_BATCH})"
FUSED_MASKS = f"litemedsam fused mask upscaling (B={DECODER_BATCH}, K=1)"
# the same steps as mask generation runs them, on factors (less work than the graph's, credited with the graph's)
FACTORED_TOKENS = f"litemedsam factored decoder tokens (B={DECODER_BATCH}; the graph's FLOPs credited)"
FACTORED_MASKS = f"litemedsam factored mask upscaling (B={DECODER_BATCH}, K=1; the graph's FLOPs credited)"
TARGETS = {"amg_speedup": 3.0, "mask_iou": 0.99, "decoder_peak_pct": 50.0}
FULL = {"sizes": [128, 256, 512, 1024], "rois": [10, 30, 100, 300, 1000], "batches": [8, 16, 32, 64, 128]}
QUICK = {"sizes": [128, 256], "rois": [10, 30, 100], "batches": [16, 64]}


def gemm_peaks(threads: int, runs: int) -> dict[str, Any]:
    """G(FL)OP/s per shape (2 M K N / best of ``runs`` after a warm-up) for fp32 and int8, and the peaks."""
    rng = np.random.default_rng(1)
    rows = []
    for m, k, n in GEMM_SHAPES:
        row: dict[str, Any] = {"shape": f"{m}x{k}x{n}"}
        for precision in ("fp32", "int8"):
            sess = session(gemm_graph(m, k, n, precision == "int8"), threads)
            feed = ({"A": rng.integers(0, 256, (m, k), dtype=np.uint8), "a_zero": np.array(128, np.uint8)}
                    if precision == "int8" else {"A": rng.standard_normal((m, k), np.float32)})
            timing = time_runs(lambda: sess.run(None, feed), 1, runs)
            row[precision] = 2 * m * k * n / min(timing["wall_all_s"]) / 1e9
        rows.append(row)
    return {"rows": rows, "fp32_gflops": max(r["fp32"] for r in rows), "int8_gops": max(r["int8"] for r in rows)}


def best_peaks(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Several ``gemm_peaks`` samples merged: each shape's best figure per precision, the peaks of those, and
    each sample's own peaks (``samples``)."""
    rows = [{"shape": row["shape"], **{p: max(s["rows"][i][p] for s in samples) for p in ("fp32", "int8")}}
            for i, row in enumerate(samples[0]["rows"])]
    return {"rows": rows, "fp32_gflops": max(r["fp32"] for r in rows), "int8_gops": max(r["int8"] for r in rows),
            "samples": [{"fp32_gflops": s["fp32_gflops"], "int8_gops": s["int8_gops"]} for s in samples]}


def node_flops(op: str, inputs: list[dict], outputs: list[dict]) -> int | None:
    """2 x multiply-adds of one GEMM-class node from its profiled shapes, None when not countable.

    MatMul family: K from the first input (the profiler leaves out pre-packed weights), taking the
    dimension that is not the output's M. Conv: output size x (C/g kH kW) of the weight.
    ConvTranspose: input size x (M/g kH kW). Einsum: None."""
    shapes = [list(d.values())[0] for d in inputs]
    out = list(outputs[0].values())[0] if outputs else None
    if op == "Einsum" or out is None or not shapes:
        return None
    if op.startswith("Conv") or op == "FusedConv":
        if len(shapes) < 2 or len(shapes[1]) < 3:
            return None
        per_output = int(np.prod(shapes[1][1:]))
        return 2 * per_output * int(np.prod(shapes[0] if op == "ConvTranspose" else out))
    a = shapes[0]
    k = a[0] if len(a) == 1 else (a[-1] if a[-2] == out[-2] else a[-2])
    return 2 * int(np.prod(out)) * int(k)


def profile_graph(path: Path, feed: dict[str, np.ndarray], threads: int, runs: int, work: Path) -> dict[str, Any]:
    """Latency, counted work and time per op type of the median of ``runs`` profiled runs after one warm-up.

    Returns latency_s, gflop_fp32 and gop_int8, ms per op type, gemm_ms, and the GEMM-class op types left
    uncounted (Einsum, unknown shapes), all of the run of median latency (so that an op's time never
    comes from another run than the latency it is compared with)."""
    sess = session(path, threads, work / f"profile_{path.parent.name}_{path.stem}")
    for _ in range(runs + 1):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e["name"] == "model_run"), key=lambda e: e["ts"])[1:]
    median = sorted(model_runs, key=lambda e: e["dur"])[(len(model_runs) - 1) // 2]
    start, stop = median["ts"], median["ts"] + median["dur"]
    op_us: dict[str, float] = defaultdict(float)
    flops = {"fp32": 0, "int8": 0}
    uncounted: set[str] = set()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or not start <= e["ts"] <= stop:
            continue
        op = e["args"]["op_name"]
        op_us[op] += e["dur"]
        if op in GEMM_OPS:
            count = node_flops(op, e["args"].get("input_type_shape", []), e["args"].get("output_type_shape", []))
            if count is None:
                uncounted.add(op)
            else:
                flops["int8" if op in INT8_OPS else "fp32"] += count
    ms = {op: us / 1e3 for op, us in sorted(op_us.items(), key=lambda kv: -kv[1])}
    return {"latency_s": median["dur"] / 1e6, "gflop_fp32": flops["fp32"] / 1e9, "gop_int8": flops["int8"] / 1e9,
            "op_ms": ms, "gemm_ms": sum(v for op, v in ms.items() if op in GEMM_OPS),
            "uncounted": sorted(uncounted)}


def throughput(p: dict[str, Any], peaks: dict[str, Any]) -> dict[str, float]:
    """Achieved G(FL)OP/s of a profile and % of the measured peaks (time at peak / time taken),
    over the whole graph and over its GEMM-class kernels."""
    ideal_s = p["gflop_fp32"] / peaks["fp32_gflops"] + p["gop_int8"] / peaks["int8_gops"]
    work = p["gflop_fp32"] + p["gop_int8"]
    return {"achieved_gops": work / p["latency_s"], "pct_peak": 100 * ideal_s / p["latency_s"],
            "pct_peak_gemm": 100 * ideal_s / (p["gemm_ms"] / 1e3) if p["gemm_ms"] else 0.0,
            "gemm_share": p["gemm_ms"] / 1e3 / p["latency_s"]}


def int8_best_case_s(p: dict[str, Any], peaks: dict[str, Any], all_int8: bool = False) -> float:
    """Latency of an int8 graph's profile if its GEMM-class kernels ran at the measured peaks and
    everything else (quantize, softmax, norms, activations, layout ops) took what it took: a
    ceiling on what faster int8 GEMMs alone can give. ``all_int8``: its fp32 GEMM work (the
    products of two activations, which dynamic quantization leaves in fp32) at the int8 peak too."""
    gemm_s = (p["gflop_fp32"] + p["gop_int8"]) / peaks["int8_gops"] if all_int8 else \
        p["gflop_fp32"] / peaks["fp32_gflops"] + p["gop_int8"] / peaks["int8_gops"]
    return p["latency_s"] - p["gemm_ms"] / 1e3 + gemm_s


def timed_amg(decoder: Any, emb: ImageEmbedding, params: amg.AmgParams, runs: int) -> tuple[amg.MaskSet, float]:
    """The masks of ``amg.generate`` on ``decoder`` (an ``Engine`` or an adapter), median wall s of ``runs`` calls."""
    walls = []
    for _ in range(runs):
        t = time.perf_counter()
        masks = amg.generate(decoder, emb, params)
        walls.append(time.perf_counter() - t)
    return masks, statistics.median(walls)


def encoder_rows(key: str, graphs: Path, threads: int, runs: int, work: Path) -> dict[str, Any]:
    """Torch eager vs profiled ORT fp32 / int8 encoder of ``MODELS[key]`` on the example image."""
    loaded = load_source(MODELS[key])
    sam = loaded.model.eval()
    size = int(sam.prompt_encoder.input_image_size[0])
    spec = default_spec(key, MODELS[key], loaded.arch, size, loaded.trained)
    image = parity.model_input(read_parity_image(FIXED), spec)
    x = torch.from_numpy(image)
    with torch.inference_mode():
        torch_s = time_runs(lambda: sam.image_encoder(x), 1, runs)["wall_s"]
    rows = {p: profile_graph(graphs / f"encoder{'' if p == 'fp32' else '.int8'}.onnx", {"image": image},
                             threads, runs, work) for p in ("fp32", "int8")}
    # how samreg-rt runs the encoder: a ViT's parts around the native attention on an AVX-512 CPU (int8 and bf16:
    # in bfloat16 where the CPU has AVX512-BF16 or AMX tiles), int8 with float32 attention, and bf16 (the fp32
    # graphs with the weight products in bfloat16, samreg_rt.bf16_graph) on CPUs with AVX512-BF16 or AMX tiles;
    # embedding cosine to the ORT fp32 graph's
    want = session(str(graphs / "encoder.onnx"), threads).run(None, {"image": image})[0].ravel()
    native, attention, cosine = {}, {}, {}
    variants = [("fp32", "fp32", "auto"), ("int8", "int8", "auto"), ("int8_fp32_attention", "int8", "fp32")]
    bf16 = [("bf16", "bf16", "auto"), ("bf16x2", "bf16x2", "auto")] if _ext.has_avx512_bf16() else []
    int8x3 = [("int8x3", "int8x3", "auto")] if _ext.has_avx512_vnni() else []
    for label, p, choice in variants + bf16 + int8x3:
        engine = Engine.load(graphs, providers="cpu", threads=threads, precision=p, encoder_attention=choice)
        if choice == "fp32" and (not engine.encoder_parts or attention.get("int8") == "fp32"):
            continue
        if engine.encoder_parts:
            run = lambda: run_encoder_parts(engine.encoder_parts, image, threads, engine.encoder_attention)  # noqa: E731
        else:
            run = lambda: engine.sessions["encoder"].run(None, {"image": image})[0]  # noqa: E731
        native[label] = time_runs(run, 1, runs)["wall_s"]
        attention[label] = engine.encoder_attention if engine.encoder_parts else "-"
        got = run().ravel()
        cosine[label] = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
    return {"source": MODELS[key], "trained": loaded.trained, "torch_s": torch_s, "profiles": rows,
            "torch_counted_gflop": encoder_flops(sam, x) / 1e9, "native_s": native, "native_attention": attention,
            "native_cosine": cosine}


def embed_and_match(embs: dict[str, ImageEmbedding], rois: dict[str, np.ndarray], preset: str) -> match.MatchResult:
    """``register()``'s ROI embedding and matching of ROIs {fixed, moving: bool (N, H, W) on the working grid}."""
    p = PRESETS[preset]
    protos, centres = {}, {}
    for name, masks in rois.items():
        protos[name] = roi.prototypes(embs[name].embedding, embedding_weights(masks, embs[name], p.pooling))
        shape = masks.shape[1:]
        centres[name] = Side(masks=pack_masks(masks), work_shape=shape, original_shape=shape).centroids()
    return pair_rois(protos, centres, p, rois["moving"].shape[1:])


def random_blobs(n: int, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``n`` random ellipses, bool (n, H, W), of areas within the default preset's ROI limits (before clipping)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    area = rng.uniform(PRESETS["default"].area_min, PRESETS["default"].area_max, n) * h * w
    aspect = rng.uniform(0.5, 2.0, n)
    ry, rx = np.sqrt(area * aspect / np.pi), np.sqrt(area / aspect / np.pi)
    cy, cx = rng.uniform(0, h, n), rng.uniform(0, w, n)
    return np.stack([((yy - cy[i]) / ry[i]) ** 2 + ((xx - cx[i]) / rx[i]) ** 2 <= 1 for i in range(n)])


def memory_stage(run: Callable[[], Any]) -> tuple[Any, dict[str, float | None]]:
    """Run one stage; resident-set MiB before it and its high-water mark (None when VmHWM cannot be reset)."""
    def status(key: str) -> float:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
        return int(line.split()[1]) / 1024
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = status("VmRSS")
    except OSError:
        return run(), {"rss_before_mib": None, "hwm_mib": None}
    out = run()
    return out, {"rss_before_mib": before, "hwm_mib": status("VmHWM")}


def resized(path: Path, side: int) -> np.ndarray:
    """The image with its longest side resized to ``side`` px (aspect kept)."""
    a = load_image(path).array
    scale = side / max(a.shape[:2])
    return cv2.resize(a, (round(a.shape[1] * scale), round(a.shape[0] * scale)), interpolation=cv2.INTER_LINEAR)


def curves(engine: Engine, embs: dict[str, ImageEmbedding], grids: list[int], lists: dict[str, list[int]],
           amg_grid: int, runs: int) -> list[dict[str, Any]]:
    """Tidy rows (curve, x, metric, value) of the four cost curves (module docstring); ``register()``
    runs on an ``amg_grid`` x ``amg_grid`` prompt grid; ``lists``: sizes, rois, batches (``FULL``)."""
    rows: list[dict[str, Any]] = []

    def add(curve: str, x: int, metric: str, value: float) -> None:
        rows.append({"curve": curve, "x": x, "metric": metric, "value": value})

    for g in grids:
        masks, wall = timed_amg(engine, embs["fixed"], amg.AmgParams.from_spec(engine.spec, points_per_side=g), 1)
        add("grid", g, "amg_latency_s", wall)
        add("grid", g, "masks", len(masks))
    for side in lists["sizes"]:
        t = time.perf_counter()
        reg = register(resized(FIXED, side), resized(MOVING, side), engine, points_per_side=amg_grid)
        add("image_size", side, "total_s", time.perf_counter() - t)
        for stage in ("encode", "amg", "filter", "embed_rois", "match"):
            add("image_size", side, f"{stage}_s", sum(v for k, v in reg.timings.items() if k.startswith(stage)))
    rng = np.random.default_rng(0)
    shape = work_shape(embs["fixed"].frame.original_shape, PRESETS["default"])
    for n in lists["rois"]:
        rois = {name: random_blobs(n, shape, rng) for name in embs}
        t = time.perf_counter()
        embed_and_match(embs, rois, "default")
        add("rois", n, "embed_match_s", time.perf_counter() - t)
    coords, labels = amg.build_prompts(amg.AmgParams.from_spec(engine.spec), embs["fixed"].frame)
    for b in lists["batches"]:
        t = time.perf_counter()
        register(FIXED, MOVING, engine, batch_size=b, points_per_side=amg_grid)
        add("batch", b, "register_pairs_per_s", 1 / (time.perf_counter() - t))
        c, l = np.resize(coords, (b, *coords.shape[1:])), np.resize(labels, (b, *labels.shape[1:]))

        def decode():
            _, hyper_in, image_tokens = engine.decode_tokens(embs["fixed"].embedding, c, l)
            engine.decode_masks(image_tokens, hyper_in[:, :1])
        add("batch", b, "decoder_prompts_per_s", b / time_runs(decode, 1, runs)["wall_s"])
    return rows


def plot_curves(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """One PNG per curve (log-log, one line per metric but counts); returns the file names."""
    names = []
    for curve in dict.fromkeys(r["curve"] for r in rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        sel = [r for r in rows if r["curve"] == curve and r["metric"] != "masks"]
        for metric in dict.fromkeys(r["metric"] for r in sel):
            pts = [(r["x"], r["value"]) for r in sel if r["metric"] == metric and r["value"] > 0]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=metric)
        xs = sorted({r["x"] for r in sel})
        ax.set(xscale="log", yscale="log", xlabel=curve, title=f"samreg-rt, LiteMedSAM: {curve} curve")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.legend(fontsize=8)
        fig.tight_layout()
        names.append(f"performance_{curve}.png")
        fig.savefig(out / names[-1], dpi=100)
        plt.close(fig)
    return names


def markdown(r: dict[str, Any]) -> str:
    """The report as a Markdown page."""
    m, peaks = r["machine"], r["gemm_peaks"]
    lines = [
        "# samreg-rt performance: GEMM peaks, graph throughput, PyTorch eager, cost curves, memory", "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, SIMD {' '.join(m['simd_flags'])}; Python "
        f"{m['python']}, onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, torch {m['torch']}, numpy {m['numpy']}.",
        f"Threads {r['threads']} (ORT intra-op = torch.set_num_threads); {r['runs']} timed run(s) after a warm-up; "
        f"load average (1/5/15 min) before {r['load_average']['before']}, after {r['load_average']['after']}. "
        f"Command: `{r['command']}`.", "",
        "## 1. GEMM peaks (single-node ONNX Runtime graphs, M x K x N, best run of the better of "
        f"{len(peaks['samples'])} samples)", "",
        "| shape | fp32 MatMul GFLOP/s | int8 MatMulInteger GOP/s |", "|---|---:|---:|",
        *(f"| {row['shape']} | {row['fp32']:.1f} | {row['int8']:.1f} |" for row in peaks["rows"]),
        f"| **peak** | **{peaks['fp32_gflops']:.1f}** | **{peaks['int8_gops']:.1f}** |", "",
        "Each sample's peaks (fp32 GFLOP/s / int8 GOP/s): "
        + ", ".join(f"{s['fp32_gflops']:.1f} / {s['int8_gops']:.1f}" for s in peaks["samples"]) + ".", "",
        "## 2. Achieved throughput of the graphs (ONNX Runtime profiler, the run of median latency after a warm-up)", "",
        "| graph | latency ms | GFLOP fp32 | GOP int8 | achieved G(FL)OP/s | % of peak | % of peak in GEMM kernels "
        "| GEMM-class time | top op types (ms) |", "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, g in r["graphs"].items():
        top = ", ".join(f"{op} {ms:.0f}" for op, ms in list(g["op_ms"].items())[:4])
        lines.append(f"| {name} | {1e3 * g['latency_s']:.0f} | {g['gflop_fp32']:.2f} | {g['gop_int8']:.2f} | "
                     f"{g['achieved_gops']:.1f} | {g['pct_peak']:.0f}% | {g['pct_peak_gemm']:.0f}% | "
                     f"{100 * g['gemm_share']:.0f}% | {top} |")
    skipped = sorted({op for g in r["graphs"].values() for op in g["uncounted"]})
    d = r["decoder"]
    fused = [step for step, path in r["decoder_path"].items() if path == "fused"]
    fused_note = (": the fused kernels doing all of the graphs' work" if len(fused) == len(r["decoder_path"])
                  else ": the fused kernel doing the mask upscaling's work" if fused == ["masks"] else "")
    lines += ["", f"Decoder ({DECODER_BATCH} box prompts, tokens + masks with dense image tokens: "
              f"tokens {'fused (samreg_rt.two_way)' if r['decoder_path']['tokens'] == 'fused' else 'decoder_tokens'}, "
              f"masks {'fused (_ext.mask_upscaling)' if r['decoder_path']['masks'] == 'fused' else 'decoder_masks'})"
              f": {d['achieved_gops']:.1f} GFLOP/s = "
              f"{d['pct_peak']:.0f}% of the fp32 peak ({d['pct_peak_gemm']:.0f}% in its GEMM kernels){fused_note}. "
              f"Uncounted GEMM-class ops: {', '.join(skipped) or 'none'}.", "",
              *([f"Mask generation runs both steps on factors (the factored rows: the image side and the first "
                 f"convolution of the upscaling in products of inner width J or 2J + 1, less work than the graph's): "
                 f"{1e3 * r['decoder_factored']['latency_s']:.0f} ms for the batch, "
                 f"{r['decoder_factored']['speedup_over_dense']:.2f}x the dense fused kernels; the graph's work in that "
                 f"time would be {r['decoder_factored']['graph_equivalent_gflops']:.0f} GFLOP/s (graph-equivalent, "
                 "not an achieved rate: the factored rows' % of peak are such too).", ""]
                if "decoder_factored" in r else []),
              "## 3. Against PyTorch eager (same weights, same threads)", "",
              "| encoder | torch ms | ORT fp32 ms | ORT int8 ms | fp32 / int8 speed-up | GFLOP (torch counter "
              "/ profile) | int8 / fp32 ORT | int8 best case ms (GEMMs at peak) | its int8 / fp32 ORT "
              "| with every GEMM int8 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, e in r["encoders"].items():
        f32, i8 = e["profiles"]["fp32"], e["profiles"]["int8"]
        best = int8_best_case_s(i8, peaks)
        lines.append(f"| {key}{'' if e['trained'] else ' (untrained)'} | {1e3 * e['torch_s']:.0f} | "
                     f"{1e3 * f32['latency_s']:.0f} | {1e3 * i8['latency_s']:.0f} | "
                     f"{e['torch_s'] / f32['latency_s']:.2f}x / {e['torch_s'] / i8['latency_s']:.2f}x | "
                     f"{e['torch_counted_gflop']:.2f} / {f32['gflop_fp32']:.2f} | "
                     f"{f32['latency_s'] / i8['latency_s']:.2f}x | {1e3 * best:.0f} | {f32['latency_s'] / best:.2f}x | "
                     f"{f32['latency_s'] / int8_best_case_s(i8, peaks, all_int8=True):.2f}x |")
    lines += ["", "int8 best case: the int8 graph's latency with its GEMM-class kernels at the section-1 peaks and "
              "its other ops as profiled; \"with every GEMM int8\": also its fp32 products of two activations "
              "(attention) as int8 at the int8 peak. These speed-ups over fp32 ORT bound what faster int8 GEMMs "
              "alone can give (issue 6 asks for int8 >= 3x fp32)."]
    for key, e in r["encoders"].items():
        native, f32 = e.get("native_s", {}), e["profiles"]["fp32"]["latency_s"]
        if {"fp32", "int8"} <= set(native):
            ratio, att, cos = f32 / native["int8"], e["native_attention"], e["native_cosine"]
            lines += ["", f"{key} as samreg-rt runs it (a ViT: the graphs `encoder_part<i>` around the native global "
                      "attention, `samreg_rt.split_encoder`; bf16: the fp32 graphs with their weight products in "
                      f"bfloat16 ({m['bf16_products']}), `samreg_rt.bf16_graph`; int8x3: the same graphs with them "
                      "from three int8 products (AVX512-VNNI); wall, median of the "
                      "runs; embedding cosine to the ORT fp32 graph's):",
                      "", "| encoder | global attention | ms | vs ORT fp32 graph | cosine |", "|---|---|---:|---:|---:|",
                      *(f"| {label} | {att[label]} | {1e3 * native[label]:.0f} | {f32 / native[label]:.2f}x | "
                        f"{cos[label]:.6f} |" for label in native),
                      "", f"int8 (as `Engine.load` picks its attention here: {att['int8']}) is {ratio:.2f}x the ORT fp32 "
                      f"graph ({'met' if ratio >= 3 else 'NOT met'} against issue 6's 3x) and "
                      f"{native['fp32'] / native['int8']:.2f}x samreg-rt's fp32 encoder."]
            if "bf16" in native:
                lines += ["", f"bf16 is {f32 / native['bf16']:.2f}x the ORT fp32 graph "
                          f"({'met' if f32 / native['bf16'] >= 3 else 'NOT met'} against issue 6's 3x for int8), "
                          f"embedding cosine {cos['bf16']:.6f} against int8's {cos['int8']:.6f}."]
            if "int8x3" in native:
                lines += ["", f"int8x3 (three int8 products of two-part inputs, `_ext.linear_int8x3`) is "
                          f"{f32 / native['int8x3']:.2f}x the ORT fp32 graph "
                          f"({'met' if f32 / native['int8x3'] >= 3 else 'NOT met'} against issue 6's 3x for int8), "
                          f"embedding cosine {cos['int8x3']:.6f}."]
    a, same = r["amg"], r["amg"]["masks"]
    met = "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in r["targets_met"].items())
    lines += ["", f"Mask generation, LiteMedSAM, {a['params']} on {a['image']} ({a['prompts']} prompts): PyTorch "
              f"decoder {a['torch_s']:.2f} s, samreg-rt {a['ort_s']:.2f} s, **{a['speedup']:.2f}x**; masks "
              f"{same['masks'][0]} / {same['masks'][1]}, identical: {'yes' if same['identical'] else 'NO'} "
              f"(min IoU {same['min_iou'] if same['min_iou'] is None else round(same['min_iou'], 4)}).", "",
              f"Targets: {met}.", "",
              "## 4. Cost curves (one run each; register() with the mask-generation parameters of section 3)", ""]
    for curve in dict.fromkeys(row["curve"] for row in r["curves"]):
        sel = [row for row in r["curves"] if row["curve"] == curve]
        metrics = list(dict.fromkeys(row["metric"] for row in sel))
        lines += [f"| {curve} | " + " | ".join(metrics) + " |", "|---:|" + "---:|" * len(metrics)]
        for x in dict.fromkeys(row["x"] for row in sel):
            vals = {row["metric"]: row["value"] for row in sel if row["x"] == x}
            lines.append(f"| {x} | " + " | ".join(f"{vals[k]:.4g}" for k in metrics) + " |")
        lines.append("")
    lines += ["## 5. Peak resident memory per stage (VmHWM after resetting it)", "",
              "| stage | RSS before MiB | high-water MiB | increase MiB |", "|---|---:|---:|---:|"]
    for stage, mem in r["memory"].items():
        if mem["hwm_mib"] is None:
            lines.append(f"| {stage} | n/a | n/a | n/a |")
        else:
            lines.append(f"| {stage} | {mem['rss_before_mib']:.0f} | {mem['hwm_mib']:.0f} | "
                         f"{mem['hwm_mib'] - mem['rss_before_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def stages_with_memory(model_dir: Path, threads: int, grid: int | None
                       ) -> tuple[Engine, dict[str, ImageEmbedding], amg.AmgParams, dict[str, Any]]:
    """LiteMedSAM's stages on the example pair, the high-water mark of each (``memory_stage``): engine load,
    encode, mask generation (fixed image, the spec's parameters on a ``grid`` x ``grid`` grid, None: the
    spec's), ROI embedding + matching (default preset), DDF fit of the pairs. Returns the engine, the
    embeddings {fixed, moving}, the mask-generation parameters and the memory figures."""
    memory: dict[str, Any] = {}
    engine, memory["engine load"] = memory_stage(lambda: Engine.load(model_dir, "cpu", threads))
    params = amg.AmgParams.from_spec(engine.spec, points_per_side=grid)
    embs = {}
    embs["fixed"], memory["encode"] = memory_stage(lambda: engine.embed(load_image(FIXED).array))
    embs["moving"] = engine.embed(load_image(MOVING).array)
    preset = PRESETS["default"]
    shape = work_shape(embs["fixed"].frame.original_shape, preset)
    sets = {}
    sets["fixed"], memory["mask generation"] = memory_stage(lambda: amg.generate(engine, embs["fixed"], params, shape))
    sets["moving"] = amg.generate(engine, embs["moving"], params, shape)
    rois = {k: s.masks[keep_rois(pack_masks(s.masks), preset, shape)] for k, s in sets.items()}
    result, memory["ROI embedding + matching"] = memory_stage(lambda: embed_and_match(embs, rois, "default"))
    if len(result.pairs):
        _, memory["DDF fit"] = memory_stage(lambda: ddf.fit(rois["fixed"][result.pairs[:, 0]],
                                                            rois["moving"][result.pairs[:, 1]]))
    return engine, embs, params, memory


def decoder_profiles(model_dir: Path, engine: Engine, emb: ImageEmbedding, params: amg.AmgParams, threads: int,
                     runs: int, work: Path) -> dict[str, dict[str, Any]]:
    """Profiles of ``decoder_tokens`` on the first ``DECODER_BATCH`` prompts of the grid and of
    ``decoder_masks`` on its outputs (the single-mask row, as mask generation uses it)."""
    coords, labels = (a[:DECODER_BATCH] for a in amg.build_prompts(params, emb.frame))
    feed = {"image_embeddings": emb.embedding[None], "point_coords": coords, "point_labels": labels}
    _, hyper_in, image_tokens = engine.decode_tokens(emb.embedding, coords, labels)
    masks = profile_graph(model_dir / "decoder_masks.onnx", {"image_tokens": image_tokens, "hyper_in": hyper_in[:, :1]},
                          threads, runs, work)
    tokens = profile_graph(model_dir / "decoder_tokens.onnx", feed, threads, runs, work)
    rows = {f"litemedsam decoder_tokens (B={DECODER_BATCH})": tokens,
            f"litemedsam decoder_masks (B={DECODER_BATCH}, K=1)": masks}
    if engine.two_way is not None:
        buffer = np.empty_like(image_tokens)          # as mask generation runs it: one buffer for every batch
        rows[FUSED_TOKENS] = fused_profile(lambda: engine.decode_tokens(emb.embedding, coords, labels, out=buffer),
                                           "two_way", tokens["gflop_fp32"], runs)
    keep = np.ones((len(coords), 1), bool)
    if engine.mask_upscaling is not None:
        rows[FUSED_MASKS] = fused_profile(lambda: engine.decode_kept_masks(image_tokens, hyper_in[:, :1], keep),
                                          "mask_upscaling", masks["gflop_fp32"], runs)
    factors = engine.factors_buffer(len(coords), coords.shape[1])
    if factors is not None:
        prepared = engine.prepare(emb.embedding)       # once per image, outside the batch's time
        _, hyper_f, image_factors = engine.decode_tokens(prepared, coords, labels, factors=factors)
        rows[FACTORED_TOKENS] = fused_profile(lambda: engine.decode_tokens(prepared, coords, labels, factors=factors),
                                              "two_way_factored", tokens["gflop_fp32"], runs)
        rows[FACTORED_MASKS] = fused_profile(lambda: engine.decode_kept_masks(image_factors, hyper_f[:, :1], keep),
                                             "mask_upscaling_factored", masks["gflop_fp32"], runs)
    return rows


def fused_profile(run: Callable[[], Any], name: str, gflop: float, runs: int) -> dict[str, Any]:
    """A graph's work through the engine's fused CPU path (``run``), as mask generation runs it: median
    wall time of ``runs`` after a warm-up, in the fields of ``profile_graph``. Its work is the graph's
    (``gflop``); all of its time counts as GEMM-class, since the element-wise steps run inside the
    kernels' products (the two-way decoder's numpy token side included)."""
    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    latency = statistics.median(times[1:])
    return {"latency_s": latency, "gflop_fp32": gflop, "gop_int8": 0.0, "op_ms": {name: 1e3 * latency},
            "gemm_ms": 1e3 * latency, "uncounted": []}


def amg_vs_torch(engine: Engine, emb: ImageEmbedding, params: amg.AmgParams, runs: int) -> dict[str, Any]:
    """Mask generation on the samreg-rt decoder and on Meta's PyTorch decoder: times and mask identity."""
    sam = load_source("litemedsam").model.eval()
    ort_set, ort_s = timed_amg(engine, emb, params, runs)
    torch_decoder = WholeDecoder(lambda e, c, l: parity.torch_decoder(sam, e[None], c, l, params.prompt_kind),
                                 engine.threads)
    torch_set, torch_s = timed_amg(torch_decoder, emb, params, runs)
    return {"image": str(FIXED.relative_to(REPO)), "prompts": ort_set.counts["prompts"],
            "params": f"{params.prompt_kind} grid {params.points_per_side}x{params.points_per_side} x sizes "
                      f"{list(params.box_sizes)}, {params.mask_output}-mask, pred-IoU {params.pred_iou_thresh}, "
                      f"stability {params.stability_score_thresh}, batch {params.batch_size}",
            "ort_s": ort_s, "torch_s": torch_s, "speedup": torch_s / ort_s,
            "masks": same_masks(torch_set, ort_set, TARGETS["mask_iou"])}


def write_outputs(report: dict[str, Any], out: Path) -> None:
    """performance.md, .json, performance_curves.csv and the plots into ``out``; prints the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = plot_curves(report["curves"], out)
    with open(out / "performance_curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["curve", "x", "metric", "value"])
        writer.writeheader()
        writer.writerows(report["curves"])
    write_report(out, "performance", report, markdown(report))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grids", type=int, nargs="+", help="points_per_side of the grid curve (default 8 16 32 64)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--quick", action="store_true", help="a short check of the script (see above)")
    args = ap.parse_args(argv)
    runs = 1 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "machine": {**machine(), "torch": torch.__version__, "onnx": onnx.__version__,
                    "matplotlib": matplotlib.__version__},
        "threads": args.threads, "runs": runs, "quick": args.quick,
        "command": "python benchmarks/performance.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "load_average": {"before": [round(v, 2) for v in os.getloadavg()]},
    }
    peak_runs = 3 if args.quick else 10
    first_peaks = gemm_peaks(args.threads, peak_runs)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        graphs = {k: export_model(MODELS[k], work / k, precisions=("fp32", "int8"), name=k)
                  for k in (["litemedsam"] if args.quick else MODELS)}
        engine, embs, params, report["memory"] = stages_with_memory(graphs["litemedsam"], args.threads,
                                                                    8 if args.quick else None)
        report["encoders"] = {k: encoder_rows(k, graphs[k], args.threads, runs, work) for k in graphs}
        decoders = decoder_profiles(graphs["litemedsam"], engine, embs["fixed"], params, args.threads, runs, work)
    report["gemm_peaks"] = peaks = best_peaks([first_peaks, gemm_peaks(args.threads, peak_runs)])
    profiles = {f"{k} encoder {p}": e["profiles"][p] for k, e in report["encoders"].items() for p in ("fp32", "int8")}
    report["graphs"] = {name: {**p, **throughput(p, peaks)} for name, p in {**profiles, **decoders}.items()}
    # the decoder with dense image tokens: each step fused where the engine has the kernel
    tokens = decoders.get(FUSED_TOKENS, decoders[f"litemedsam decoder_tokens (B={DECODER_BATCH})"])
    masks = decoders.get(FUSED_MASKS, decoders[f"litemedsam decoder_masks (B={DECODER_BATCH}, K=1)"])
    report["decoder"] = throughput({"latency_s": tokens["latency_s"] + masks["latency_s"], "gop_int8": 0.0,
                                    "gemm_ms": tokens["gemm_ms"] + masks["gemm_ms"],
                                    "gflop_fp32": tokens["gflop_fp32"] + masks["gflop_fp32"]}, peaks)
    report["decoder_path"] = {"tokens": "fused" if FUSED_TOKENS in decoders else "graph",
                              "masks": "fused" if FUSED_MASKS in decoders else "graph"}
    if FACTORED_TOKENS in decoders:
        # mask generation's own path: the same work (the graph's) in less time, since it does less of it
        factored_s = decoders[FACTORED_TOKENS]["latency_s"] + decoders[FACTORED_MASKS]["latency_s"]
        report["decoder_factored"] = {
            "latency_s": factored_s, "graph_equivalent_gflops": (tokens["gflop_fp32"] + masks["gflop_fp32"]) / factored_s,
            "speedup_over_dense": (tokens["latency_s"] + masks["latency_s"]) / factored_s}
    report["amg"] = amg_vs_torch(engine, embs["fixed"], params, runs)
    report["targets_met"] = {
        f"mask generation >= {TARGETS['amg_speedup']:g}x PyTorch eager":
            report["amg"]["speedup"] >= TARGETS["amg_speedup"],
        "identical masks": report["amg"]["masks"]["identical"],
        f"decoder >= {TARGETS['decoder_peak_pct']:g}% of fp32 GEMM peak":
            report["decoder"]["pct_peak"] >= TARGETS["decoder_peak_pct"],
    }
    grids = args.grids or ([4, 8] if args.quick else [8, 16, 32, 64])
    report["curves"] = curves(engine, embs, grids, QUICK if args.quick else FULL, params.points_per_side, runs)
    report["load_average"]["after"] = [round(v, 2) for v in os.getloadavg()]
    write_outputs(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
