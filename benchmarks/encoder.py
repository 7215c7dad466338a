"""Encoder latency: ONNX Runtime fp32 / fp16 / int8 against PyTorch eager of the same weights.

    python benchmarks/encoder.py [--threads 2] [--warmup 1] [--repeats 3] [--models litemedsam vit_b]

For each model the encoder graphs are exported into a temporary directory with the project's own
exporter (``samreg_export``), then timed in the same process, on the same normalised image, with the
same thread count for torch (``torch.set_num_threads``) and ONNX Runtime (``intra_op_num_threads``).
Latency is the median wall time of the timed repeats; the process CPU time of the same runs is
kept too, because on a shared machine wall time also counts other processes' load (the load
average before and after each model is recorded). GFLOP/s = encoder FLOPs (2 x multiply-adds of
matmuls, convolutions and einsums, counted by ``torch.utils.flop_counter``) / latency. Writes
``benchmarks/results/encoder.md`` and ``encoder.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from samreg_export import onnx_export, parity, quantize
from samreg_export.checkpoints import load_source
from samreg_export.export import calibrate, default_spec, read_parity_image

from common import machine as common_machine, write_report  # benchmarks/common.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO.parent / "shared" / "data" / "prostate_mr" / "prostate_slice_s30" / "fixed.png"
MODELS = {"litemedsam": "litemedsam", "vit_b": "random:vit_b"}
TARGETS = {"ort_fp32_speedup": 1.5, "ort_int8_speedup": 3.0, "int8_cosine": 0.99}


def machine() -> dict[str, Any]:
    """``common.machine()`` plus the exporter's library versions."""
    return {**common_machine(), "torch": torch.__version__, "onnx": onnx.__version__}


def encoder_flops(sam: torch.nn.Module, image: torch.Tensor) -> int:
    """FLOPs (2 x multiply-adds of matmuls, convolutions and einsums) of one encoder pass, counted by
    ``torch.utils.flop_counter`` (ONNX shape inference leaves too many of ViT-B's shapes unknown)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        sam.image_encoder(image)
    return counter.get_total_flops()


def time_runs(run: Callable[[], Any], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall and process CPU seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "wall_all_s": wall}


def bench_model(key: str, threads: int, warmup: int, repeats: int, work: Path) -> dict[str, Any]:
    """Export the encoder of ``MODELS[key]`` in three precisions and time them against torch."""
    loaded = load_source(MODELS[key])
    sam = loaded.model.eval()
    size = int(sam.prompt_encoder.input_image_size[0])
    spec = default_spec(key, MODELS[key], loaded.arch, size, loaded.trained)
    image = parity.model_input(read_parity_image(IMAGE) if IMAGE.exists() else parity.synthetic_image(), spec)
    paths = {"fp32": work / f"{key}.encoder.onnx"}
    onnx_export.export_encoder(sam, paths["fp32"])
    paths["fp16"] = quantize.to_fp16(paths["fp32"], work / f"{key}.encoder.fp16.onnx")[0]
    paths["int8"] = quantize.to_int8(paths["fp32"], work / f"{key}.encoder.int8.onnx",
                                     calib=calibrate(paths["fp32"], spec, None))[0]   # as the exporter makes it
    flops = encoder_flops(sam, torch.from_numpy(image))

    load_before = os.getloadavg()[0]
    torch.set_num_threads(threads)
    x = torch.from_numpy(image)
    with torch.inference_mode():
        reference = sam.image_encoder(x).numpy()
        rows = {"torch eager fp32": time_runs(lambda: sam.image_encoder(x), warmup, repeats)}
    rows["torch eager fp32"].update(cosine_vs_fp32=1.0, max_abs_vs_fp32=0.0)
    for precision, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"image": image}
        out = session.run(None, feed)[0]
        rows[f"onnxruntime {precision}"] = {
            **time_runs(lambda: session.run(None, feed), warmup, repeats),
            "cosine_vs_fp32": parity.cosine(reference, out),
            "max_abs_vs_fp32": parity.max_abs(reference, out),
        }
    torch_wall = rows["torch eager fp32"]["wall_s"]
    for row in rows.values():
        row["speedup_vs_torch"] = torch_wall / row["wall_s"]
        row["gflops_per_s"] = flops / row["wall_s"] / 1e9
    return {
        "source": loaded.source_id,
        "trained": loaded.trained,
        "input": [1, 3, size, size],
        "encoder_gflop": flops / 1e9,
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "rows": rows,
        "targets_met": {
            "ort_fp32_speedup>=1.5": rows["onnxruntime fp32"]["speedup_vs_torch"] >= TARGETS["ort_fp32_speedup"],
            "ort_int8_speedup>=3": rows["onnxruntime int8"]["speedup_vs_torch"] >= TARGETS["ort_int8_speedup"],
            "int8_cosine>=0.99": rows["onnxruntime int8"]["cosine_vs_fp32"] >= TARGETS["int8_cosine"],
        },
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page."""
    m = report["machine"]
    lines = [
        "# Encoder latency: ONNX Runtime vs PyTorch eager",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, SIMD {' '.join(m['simd_flags'])}; "
        f"Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}, onnx {m['onnx']}.",
        f"Threads: {report['threads']} (torch.set_num_threads = ORT intra_op_num_threads); "
        f"{report['warmup']} warm-up + {report['repeats']} timed runs, median. Command: `{report['command']}`.",
        "",
    ]
    for key, result in report["models"].items():
        label = "trained weights" if result["trained"] else "random init, UNTRAINED (speed only)"
        lines += [
            f"## {key} ({result['source']}, {label})",
            "",
            f"Input {result['input']}; encoder {result['encoder_gflop']:.1f} GFLOP (2 x multiply-adds); "
            f"load average before/after {result['load_average_before_after'][0]:.2f} / "
            f"{result['load_average_before_after'][1]:.2f}.",
            "",
            "| runtime | latency ms (median) | CPU s / run | vs torch | GFLOP/s | cosine vs fp32 | max abs vs fp32 |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, row in result["rows"].items():
            lines.append(
                f"| {name} | {1e3 * row['wall_s']:.0f} | {row['cpu_s']:.2f} | {row['speedup_vs_torch']:.2f}x | "
                f"{row['gflops_per_s']:.1f} | {row['cosine_vs_fp32']:.6f} | {row['max_abs_vs_fp32']:.2e} |"
            )
        met = ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in result["targets_met"].items())
        lines += ["", f"Targets: {met}.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "machine": machine(), "threads": args.threads, "warmup": args.warmup, "repeats": args.repeats,
        "command": "python benchmarks/encoder.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            report["models"][key] = bench_model(key, args.threads, args.warmup, args.repeats, Path(tmp))
    write_report(args.out, "encoder", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
