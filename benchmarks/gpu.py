"""GPU check: a model on ONNX Runtime's CUDA and TensorRT providers against its CPU provider, in one run on the
machine of the GPU.

    python benchmarks/gpu.py --model DIR [--providers cuda tensorrt] [--precisions fp32 fp16] [--repeats 5]
                             [--batches 64 256] [--threads N] [--pair FIXED MOVING] [--out benchmarks/results/gpu]

One image pair (default: examples/cardiac_2d) registered with the ``default`` preset (``pipeline.register``):

1. the CPU provider's fp32 engine first (the reference of the outputs, and the CPU figures of the same run);
2. for each provider and precision: ``Engine.load`` time (TensorRT: with its engine build, cached in the model
   directory's trt_cache), a warm-up registration, then ``--repeats`` timed ones: wall seconds per stage (encode,
   mask generation, ROI filtering, ROI embedding, matching; the mean, and the pair's best total), pairs/s;
   the outputs against the CPU fp32 run's: embedding cosine, masks and ROIs per image, for each CPU ROI its best
   mask IoU with this run's ROIs, ROIs kept (IoU >= 0.95) and pairs kept (both ROIs kept and paired together);
   fp32 counts as identical when both images have the same ROIs at IoU >= 0.99 and the pairs are the same;
3. mask generation alone on the fixed image's embedding at each ``--batches`` prompt batch size: prompts/s.

A provider that this ONNX Runtime build or machine cannot run (no CUDA, no TensorRT libraries) is reported as
such, with ONNX Runtime's message, and the rest runs. The decoders' image tokens stay in GPU memory between the
two decoder graphs (``Engine.load``'s ``device_tokens``). Without a GPU, ``--providers cpu`` runs the same steps
(the CPU against itself). Writes gpu.md and gpu.json to ``--out``, with the GPU (nvidia-smi), the CPU and the
versions.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from samreg_rt import amg
from samreg_rt.engine import Engine, ImageEmbedding
from samreg_rt.errors import ModelError
from samreg_rt.io import load_image
from samreg_rt.pipeline import Registration, register

from common import best_ious, cosine, machine, write_report  # benchmarks/common.py (on sys.path as the script's)
from fast_modes import compare  # benchmarks/fast_modes.py

REPO = Path(__file__).resolve().parents[1]
PAIR = (REPO / "examples" / "cardiac_2d" / "fixed.png", REPO / "examples" / "cardiac_2d" / "moving.png")
SAME_ROI_IOU = 0.95      # issue 6's bound for a changed precision
IDENTICAL_ROI_IOU = 0.99  # the parity tests' criterion for the same arithmetic
STAGES = ("encode", "amg", "filter", "embed_rois", "match")
TARGET_MS = {"litemedsam": 30.0, "vit_b": 50.0}  # issue 6: TensorRT fp16 on an H100-class GPU, one pair


def gpus() -> list[str]:
    """nvidia-smi's name, driver and memory of each GPU (empty without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return []
    done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True)
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def cuda_libraries() -> str:
    """Load the CUDA and cuDNN libraries that ONNX Runtime's CUDA provider opens by name: ``ort.preload_dlls``
    (from the nvidia-* wheels), and PyTorch's CUDA build where it is installed (importing it loads its own copies).
    Returns what was done, for the report."""
    done = []
    try:
        ort.preload_dlls()
        done.append("onnxruntime.preload_dlls()")
    except Exception as exc:  # noqa: BLE001 -- any failure here is reported, and the providers' rows show its effect
        done.append(f"onnxruntime.preload_dlls() failed: {str(exc)[:200]}")
    try:
        import torch
        done.append(f"torch {torch.__version__} imported, CUDA available: {torch.cuda.is_available()}")
    except ImportError:
        done.append("no torch")
    return "; ".join(done)


def registered(engine: Engine, pair: tuple[Path, Path]) -> Registration:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return register(pair[0], pair[1], engine, preset="default")


def stage_seconds(reg: Registration) -> dict[str, float]:
    """Wall seconds per stage of ``STAGES``, both images together."""
    return {s: float(sum(v for k, v in reg.timings.items() if k == s or k.startswith(f"{s}_"))) for s in STAGES}


def against(ref: Registration, reg: Registration) -> dict[str, Any]:
    """This run's ROIs and pairs against the reference run's (module docstring): ROIs and pairs kept as
    ``fast_modes.compare`` counts them, each reference ROI's best IoU (``common.best_ious``)."""
    a, b = ref.correspondence, reg.correspondence
    sides = ("fixed", "moving")
    best = np.array([v for s in sides for v in best_ious(getattr(a, s).masks, getattr(b, s).masks)])
    kept = compare(ref, reg, SAME_ROI_IOU)
    same_counts = all(len(getattr(a, s).masks) == len(getattr(b, s).masks) for s in sides)
    return {
        "masks": [[ref.counts[s]["nms"], reg.counts[s]["nms"]] for s in sides],
        "rois": [[len(getattr(a, s).masks), len(getattr(b, s).masks)] for s in sides],
        "roi_best_iou_mean": float(best.mean()) if best.size else None,
        "roi_best_iou_min": float(best.min()) if best.size else None,
        "rois_kept": kept["rois_kept"], "pairs": kept["pairs"], "pairs_kept": kept["pairs_kept"],
        "identical": bool(same_counts and (not best.size or best.min() >= IDENTICAL_ROI_IOU)
                          and np.array_equal(a.pairs, b.pairs)),
    }


def prompt_rates(engine: Engine, emb: ImageEmbedding, batches: list[int]) -> dict[int, float]:
    """Prompts/s of mask generation on an image's embedding at each prompt batch size (after a warm-up)."""
    rates = {}
    for size in batches:
        params = amg.AmgParams.from_spec(engine.spec, batch_size=size)
        amg.generate(engine, emb, params)
        t = time.perf_counter()
        masks = amg.generate(engine, emb, params)
        rates[size] = masks.counts["run"] / (time.perf_counter() - t)
    return rates


def bench(model: Path, provider: str, precision: str, threads: int | None, pair: tuple[Path, Path], repeats: int,
          batches: list[int], ref: tuple[Registration, list[np.ndarray]] | None
          ) -> tuple[dict[str, Any], Registration | None, list[np.ndarray]]:
    """One provider and precision (module docstring); ``ref``: the CPU fp32 run and its embeddings. Returns the
    row, the last registration and the pair's embeddings (None and [] where the provider is unavailable)."""
    row: dict[str, Any] = {"provider": provider, "precision": precision}
    t = time.perf_counter()
    try:
        engine = Engine.load(model, providers=provider, threads=threads, precision=precision)
    except ModelError as exc:
        return {**row, "unavailable": str(exc)}, None, []
    row["load_s"] = time.perf_counter() - t
    row.update(providers=engine.providers, token_device=engine.token_device, threads=engine.threads,
               model_name=engine.manifest.get("name"))
    t = time.perf_counter()
    first = registered(engine, pair)           # the warm-up (TensorRT builds its engines here)
    row["first_s"] = time.perf_counter() - t
    regs, totals = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        regs.append(registered(engine, pair))
        totals.append(time.perf_counter() - t)
    stages = [stage_seconds(r) for r in regs]
    row["stages_s"] = {s: float(np.mean([st[s] for st in stages])) for s in STAGES}
    row["pair_s_mean"], row["pair_s_best"] = float(np.mean(totals)), float(min(totals))
    row["pairs_per_s"] = 1.0 / row["pair_s_mean"]
    row["counts"] = regs[-1].counts
    row["runs_same"] = all(np.array_equal(r.correspondence.pairs, first.correspondence.pairs) for r in regs)
    embedded = [engine.embed(load_image(p).array) for p in pair]
    embeddings = [e.embedding for e in embedded]
    if ref is not None:
        row["against_cpu_fp32"] = against(ref[0], regs[-1])
        row["embedding_cosine"] = [cosine(a, b) for a, b in zip(ref[1], embeddings)]
    row["prompts_per_s"] = prompt_rates(engine, embedded[0], batches)
    return row, regs[-1], embeddings


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# GPU check: ONNX Runtime's CUDA and TensorRT providers against its CPU provider", "",
        f"GPU: {', '.join(report['gpus']) or 'none found (nvidia-smi)'}. CPU: {m['cpu']}, {m['logical_cpus']} logical "
        f"CPUs; Python {m['python']}, onnxruntime {m['onnxruntime']} (providers of this build: "
        f"{', '.join(report['available_providers'])}), numpy {m['numpy']}. CUDA libraries: {report['cuda_libraries']}.",
        f"Command: `{report['command']}`. Model `{report['model']}`; pair {report['pair'][0]} / {report['pair'][1]}, "
        f"`default` preset; {report['repeats']} timed registrations after a warm-up; {report['threads']} CPU "
        "threads (ONNX Runtime's intra-op and the CPU kernels).", "",
        "## Registration of the pair (wall ms; stages: mean of the timed runs, both images)", "",
        "| provider | precision | load s | first run s | encode | mask generation | filter | ROI embedding | "
        "match | pair mean | pair best | pairs/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        if "unavailable" in r:
            lines.append(f"| {r['provider']} | {r['precision']} | unavailable: {r['unavailable']} |")
            continue
        st = r["stages_s"]
        lines.append(f"| {r['provider']} ({r['providers'][0]}) | {r['precision']} | {r['load_s']:.2f} | "
                     f"{r['first_s']:.2f} | " + " | ".join(f"{1e3 * st[s]:.1f}" for s in STAGES) +
                     f" | {1e3 * r['pair_s_mean']:.1f} | {1e3 * r['pair_s_best']:.1f} | {r['pairs_per_s']:.2f} |")
    lines += ["", "## Outputs against the CPU provider's fp32 run", "",
              "| provider | precision | embedding cosine | masks (CPU, this) | ROIs (CPU, this) | best ROI IoU mean / "
              "lowest | ROIs kept | pairs (CPU, this) | pairs kept | identical | timed runs alike |",
              "|---|---|---|---|---|---|---:|---|---:|---|---|"]
    for r in report["rows"]:
        if "against_cpu_fp32" not in r:
            continue
        c = r["against_cpu_fp32"]
        best = ("-" if c["roi_best_iou_mean"] is None else
                f"{c['roi_best_iou_mean']:.3f} / {c['roi_best_iou_min']:.3f}")
        lines.append(f"| {r['provider']} | {r['precision']} | {', '.join(f'{v:.6f}' for v in r['embedding_cosine'])} | "
                     f"{c['masks']} | {c['rois']} | {best} | {_pct(c['rois_kept'])} | {c['pairs']} | "
                     f"{_pct(c['pairs_kept'])} | {'yes' if c['identical'] else 'no'} | "
                     f"{'yes' if r['runs_same'] else 'no'} |")
    sizes = report["batches"]
    lines += ["", "## Mask generation on the fixed image: prompts/s by prompt batch size", "",
              "| provider | precision | " + " | ".join(f"batch {b}" for b in sizes) + " |",
              "|---|---|" + "---:|" * len(sizes)]
    for r in report["rows"]:
        if "prompts_per_s" in r:
            lines.append(f"| {r['provider']} | {r['precision']} | " +
                         " | ".join(f"{r['prompts_per_s'][b]:.0f}" for b in sizes) + " |")
    target = TARGET_MS.get(report["model_name"])
    if target is not None:
        lines += ["", f"Issue 6's target for {report['model_name']}: a pair in <= {target:.0f} ms with TensorRT fp16 "
                  "on an H100-class GPU."]
        for r in report["rows"]:
            if r["provider"] == "tensorrt" and r["precision"] == "fp16":
                verdict = ("not run: " + r["unavailable"] if "unavailable" in r else
                           f"{1e3 * r['pair_s_best']:.1f} ms: {'met' if 1e3 * r['pair_s_best'] <= target else 'NOT met'}")
                lines.append(f"TensorRT fp16: {verdict}.")
    return "\n".join(lines) + "\n"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="an exported model directory")
    ap.add_argument("--providers", nargs="+", default=["cuda", "tensorrt"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: the CPUs this process may use)")
    ap.add_argument("--pair", type=Path, nargs=2, default=PAIR, metavar=("FIXED", "MOVING"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu")
    args = ap.parse_args(argv)
    libraries = cuda_libraries() if {"cuda", "tensorrt"} & set(args.providers) else "not asked for"
    pair = tuple(args.pair)
    cpu_row, ref_reg, ref_emb = bench(args.model, "cpu", "fp32", args.threads, pair, args.repeats, args.batches,
                                      None)
    if ref_reg is None:
        raise SystemExit(f"{args.model}: the CPU provider's fp32 engine did not load: {cpu_row['unavailable']}")
    rows = [cpu_row]
    for provider in args.providers:
        for precision in args.precisions:
            if (provider, precision) != ("cpu", "fp32"):
                rows.append(bench(args.model, provider, precision, args.threads, pair, args.repeats, args.batches,
                                  (ref_reg, ref_emb))[0])
                print(f"{provider} {precision}: {rows[-1].get('pair_s_mean', rows[-1].get('unavailable'))}",
                      file=sys.stderr)
    report = {
        "machine": machine(), "gpus": gpus(), "available_providers": ort.get_available_providers(),
        "cuda_libraries": libraries,
        "command": shlex.join(["python", "benchmarks/gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": str(args.model), "model_name": cpu_row["model_name"], "pair": [str(p) for p in pair],
        "repeats": args.repeats, "batches": args.batches, "threads": cpu_row["threads"], "rows": rows,
    }
    write_report(args.out, "gpu", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
