"""Where a native-precision encoder's time goes: its weight products, the ONNX Runtime pieces between them, and the
rest; against ONNX Runtime's fp32 and int8 encoders of the same export, in the same run.

    python benchmarks/bf16_split.py [--threads 2] [--runs 3] [--out benchmarks/results]

For LiteMedSAM and the untrained ``random:vit_b`` (exported fresh, fp32 and int8, into a temporary directory),
engines of precision fp32 and int8 (ONNX Runtime's graphs; int8's attention as ``Engine.load`` picks it), bf16 and
bf16x2 (CPUs with AVX512-BF16 or AMX tiles) and int8x3 (CPUs with AVX512-VNNI) encode one image ``--runs`` times
after a warm-up; each encoder graph (or ViT part) of a native precision is a ``samreg_rt.bf16_graph.Bf16Graph``
whose ``run`` adds the seconds of its steps to ``timings``: "products" (``_ext.linear_bf16``,
``_ext.linear_int8x3``), "attention" (the windowed attention in bfloat16: SAM ViT's
``WindowAttentionStep``/``AttentionStep``, TinyViT's ``BiasedAttentionStep``) and "onnxruntime" (the pieces between
them; all of an fp32 or int8 graph); "other" is the rest of the wall time (a ViT's global attention cores between
its parts, Python). The embedding's cosine to the fp32 engine's is reported with each.
Writes ``bf16_split.md`` and ``bf16_split.json``.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from samreg_export.export import export_model
from samreg_rt import _ext
from samreg_rt.bf16_graph import Bf16Graph
from samreg_rt.engine import Engine
from samreg_rt.split_encoder import run_encoder_parts

from common import machine, write_report  # benchmarks/common.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
MODELS = {"litemedsam": "litemedsam", "vit_b": "random:vit_b"}


class _Timed:
    """A Bf16Graph whose runs add their steps' seconds to ``timings``, or a session whose runs add theirs to
    "onnxruntime" (``run`` as an InferenceSession's)."""

    def __init__(self, graph: Bf16Graph | ort.InferenceSession, timings: dict[str, float]):
        self.graph, self.timings = graph, timings

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if isinstance(self.graph, Bf16Graph):
            return self.graph.run(output_names, feeds, self.timings)
        start = time.perf_counter()
        out = self.graph.run(output_names, feeds)
        self.timings["onnxruntime"] = self.timings.get("onnxruntime", 0.0) + time.perf_counter() - start
        return out


def encode(engine: Engine, image: np.ndarray, timings: dict[str, float]) -> np.ndarray:
    """One encoding of ``image`` (1, 3, S, S), the Bf16Graphs' step times added to ``timings``: the embedding."""
    if engine.encoder_parts:
        return run_encoder_parts([_Timed(part, timings) for part in engine.encoder_parts], image, engine.threads,
                                 engine.encoder_attention)
    return _Timed(engine.sessions["encoder"], timings).run(None, {"image": image})[0]


def split(engine: Engine, size: int, runs: int, reference: np.ndarray | None) -> tuple[dict[str, float], np.ndarray]:
    """Mean seconds per encoding (total, products, attention, onnxruntime, other) and the embedding's cosine to
    ``reference`` (None: 1); the embedding."""
    image = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    embedding = np.asarray(encode(engine, image, {}), np.float64).ravel()
    want = embedding if reference is None else reference
    timings: dict[str, float] = {}
    start = time.perf_counter()
    for _ in range(runs):
        encode(engine, image, timings)
    total = (time.perf_counter() - start) / runs
    row = {"total": total, "products": 0.0, "attention": 0.0, "onnxruntime": 0.0,
           **{k: v / runs for k, v in timings.items()}}
    row["other"] = total - row["products"] - row["attention"] - row["onnxruntime"]
    row["cosine"] = float(embedding @ want / np.linalg.norm(embedding) / np.linalg.norm(want))
    return row, embedding


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Native-precision encoders: products, ONNX Runtime pieces and the rest, against fp32 and int8", "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, bf16 products on {m['bf16_products']}; "
        f"Python {m['python']}, onnxruntime {m['onnxruntime']}. Command: `{report['command']}`; "
        f"{report['threads']} threads, mean of {report['runs']} encodings after a warm-up. products: "
        "`_ext.linear_bf16` or `_ext.linear_int8x3`; windowed attention: the windowed attention in bfloat16 (`samreg_rt.bf16_graph`'s "
        "attention steps: SAM ViT's, TinyViT's, where the engine's encoder_attention is bf16); onnxruntime: the "
        "pieces of the fp32 graph between them (fp32, int8: their whole graphs); other: the rest of the wall time (a ViT's global attention cores, in "
        + ", ".join(f"{k}: {v}" for k, v in report["attention"].items()) + ").", "",
        "vs fp32: the fp32 engine's time over the row's (a ViT's fp32 engine: its parts around the native float32 "
        "global attention).", "",
        "| model | precision | total ms | vs fp32 | products ms | windowed attention ms | onnxruntime ms | other ms "
        "| embedding cosine to fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fp32 = {r["model"]: r["total"] for r in report["rows"] if r["precision"] == "fp32"}
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['precision']} | {1e3 * r['total']:.0f} | {fp32[r['model']] / r['total']:.2f}x"
                     f" | {1e3 * r['products']:.0f} | {1e3 * r['attention']:.0f} | {1e3 * r['onnxruntime']:.0f} | "
                     f"{1e3 * r['other']:.0f} | {r['cosine']:.6f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    native = (["bf16", "bf16x2"] if _ext.has_avx512_bf16() else []) + (["int8x3"] if _ext.has_avx512_vnni() else [])
    if not native:
        raise SystemExit("bf16_split.py: this CPU has neither AVX512-BF16 nor AVX512-VNNI (the native precisions "
                         "need one)")
    rows, attention = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, source in MODELS.items():
            model_dir = export_model(source, Path(tmp) / key, precisions=("fp32", "int8"), name=key)
            reference = None
            for precision in ["fp32", "int8", *native]:
                engine = Engine.load(model_dir, providers="cpu", threads=args.threads, precision=precision)
                attention[f"{key} {precision}"] = engine.encoder_attention if engine.encoder_parts else "none"
                row, embedding = split(engine, engine.spec.input_size, args.runs, reference)
                reference = embedding if reference is None else reference
                rows.append({"model": key, "precision": precision, **row})
                print(rows[-1], flush=True)
    report = {"machine": machine(), "threads": args.threads, "runs": args.runs, "attention": attention,
              "command": shlex.join(["python", "benchmarks/bf16_split.py",
                                     *(argv if argv is not None else sys.argv[1:])]),
              "rows": rows}
    write_report(args.out, "bf16_split", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
