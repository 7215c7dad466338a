"""ViT-B encoder: queries per chunk of the global attention in the export, by measurement.

    python benchmarks/global_attention_chunks.py [--queries 64 128 256 512] [--threads 2] [--repeats 3]

The exporter traces a ViT's global-attention blocks a chunk of queries at a time
(``samreg_export.onnx_export.GLOBAL_ATTENTION_QUERIES``): smaller chunks keep each chunk's attention
matrix and its relative-position sums (12 heads x queries x 4096 floats) in the caches between the
product, the two additions and the softmax, but make a larger graph (more nodes: a slower session
creation). For each chunk size this exports the seeded random SAM ViT-B encoder (fp32), creates the
session (``Engine.load``, timed), runs the encoder on one 200x200 image (median of ``--repeats``
after a warm-up) and checks that the embedding equals the first size's bit for bit. Writes
``global_attention_chunks.md`` and ``.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from samreg_export import onnx_export
from samreg_export.export import export_model
from samreg_rt.engine import Engine

from common import machine, write_report  # benchmarks/common.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]


def measure(queries: int, work: Path, threads: int, repeats: int) -> tuple[dict, np.ndarray]:
    """Export with ``queries`` per chunk, then session creation and encoder latency (s)."""
    default = onnx_export.GLOBAL_ATTENTION_QUERIES
    onnx_export.GLOBAL_ATTENTION_QUERIES = queries
    try:
        out = export_model("random:vit_b", work / f"q{queries}", precisions=("fp32",), name=f"vit_b_q{queries}")
    finally:
        onnx_export.GLOBAL_ATTENTION_QUERIES = default
    t = time.perf_counter()
    engine = Engine.load(out, providers="cpu", threads=threads)
    load_s = time.perf_counter() - t
    image = np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)
    engine.embed(image)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        embedding = engine.embed(image).embedding
        times.append(time.perf_counter() - t)
    return {"queries": queries, "session_s": load_s, "encode_s": statistics.median(times),
            "encode_best_s": min(times)}, embedding


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, nargs="+", default=[512, 256, 128, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    rows, first = [], None
    with tempfile.TemporaryDirectory(prefix="samreg_chunks_") as tmp:
        for q in args.queries:
            row, embedding = measure(q, Path(tmp), args.threads, args.repeats)
            first = embedding if first is None else first
            row["identical_to_first"] = bool(np.array_equal(embedding, first))
            rows.append(row)
            print(row, flush=True)
    m = machine()
    report = {"machine": m, "command": " ".join(["python", "benchmarks/global_attention_chunks.py", *(argv or sys.argv[1:])]),
              "threads": args.threads, "repeats": args.repeats, "default": onnx_export.GLOBAL_ATTENTION_QUERIES,
              "rows": rows}
    lines = ["# ViT-B encoder: queries per chunk of the global attention", "",
             f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs. Command: `{report['command']}`. "
             f"{args.threads} threads; encode = median of {args.repeats} runs after a warm-up (200x200 image, "
             "seeded random ViT-B, fp32); session = Engine.load (graph read, hashed, ONNX Runtime session).", "",
             "| queries per chunk | session s | encode s (median) | encode s (best) | embedding identical to the first row's |",
             "|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['queries']} | {r['session_s']:.2f} | {r['encode_s']:.2f} | {r['encode_best_s']:.2f} | "
                     f"{'yes' if r['identical_to_first'] else 'no'} |")
    lines += ["", f"The exporter's default: {onnx_export.GLOBAL_ATTENTION_QUERIES} queries per chunk."]
    write_report(args.out, "global_attention_chunks", report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
