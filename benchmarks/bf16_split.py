"""Where a bf16 encoder's time goes: its weight products, the ONNX Runtime pieces between them, and the rest.

    python benchmarks/bf16_split.py [--threads 2] [--runs 3] [--out benchmarks/results]

For LiteMedSAM and the untrained ``random:vit_b`` (exported fresh, fp32, into a temporary directory), engines of
precision bf16 and bf16x2 (``Engine.load``; CPUs with AVX512-BF16 or AMX tiles) encode one image ``--runs`` times
after a warm-up; each encoder graph (or ViT part) is a ``samreg_rt.bf16_graph.Bf16Graph`` whose ``run`` adds the
seconds of its steps to ``timings``: "products" (``_ext.linear_bf16``), "attention" (the windowed attention in
bfloat16: SAM ViT's ``WindowAttentionStep``/``AttentionStep``, TinyViT's ``BiasedAttentionStep``) and "onnxruntime"
(the pieces between them); "other" is the rest of the wall time (a ViT's global attention cores between its
parts, Python).
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

from samreg_export.export import export_model
from samreg_rt import _ext
from samreg_rt.bf16_graph import Bf16Graph
from samreg_rt.engine import Engine
from samreg_rt.split_encoder import run_encoder_parts

from common import machine, write_report  # benchmarks/common.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
MODELS = {"litemedsam": "litemedsam", "vit_b": "random:vit_b"}


class _Timed:
    """A Bf16Graph whose runs add their steps' seconds to ``timings`` (``run`` as an InferenceSession's)."""

    def __init__(self, graph: Bf16Graph, timings: dict[str, float]):
        self.graph, self.timings = graph, timings

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.graph.run(output_names, feeds, self.timings)


def encode(engine: Engine, image: np.ndarray, timings: dict[str, float]) -> None:
    """One encoding of ``image`` (1, 3, S, S), the Bf16Graphs' step times added to ``timings``."""
    if engine.encoder_parts:
        run_encoder_parts([_Timed(part, timings) for part in engine.encoder_parts], image, engine.threads,
                          engine.encoder_attention)
    else:
        _Timed(engine.sessions["encoder"], timings).run(None, {"image": image})


def split(engine: Engine, size: int, runs: int) -> dict[str, float]:
    """Mean seconds per encoding: total, products, attention, onnxruntime, other."""
    image = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    encode(engine, image, {})
    timings: dict[str, float] = {}
    start = time.perf_counter()
    for _ in range(runs):
        encode(engine, image, timings)
    total = (time.perf_counter() - start) / runs
    row = {"total": total, "products": 0.0, "attention": 0.0, "onnxruntime": 0.0,
           **{k: v / runs for k, v in timings.items()}}
    row["other"] = total - row["products"] - row["attention"] - row["onnxruntime"]
    return row


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# bf16 encoders: products, ONNX Runtime pieces and the rest", "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, bf16 products on {m['bf16_products']}; "
        f"Python {m['python']}, onnxruntime {m['onnxruntime']}. Command: `{report['command']}`; "
        f"{report['threads']} threads, mean of {report['runs']} encodings after a warm-up. products: "
        "`_ext.linear_bf16`; windowed attention: the windowed attention in bfloat16 (`samreg_rt.bf16_graph`'s "
        "attention steps: SAM ViT's, TinyViT's, where the engine's encoder_attention is bf16); onnxruntime: the "
        "pieces of the fp32 graph between them; other: the rest of the wall time (a ViT's global attention cores, in "
        + ", ".join(f"{k}: {v}" for k, v in report["attention"].items()) + ").", "",
        "| model | precision | total ms | products ms | windowed attention ms | onnxruntime ms | other ms |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['precision']} | {1e3 * r['total']:.0f} | {1e3 * r['products']:.0f} | "
                     f"{1e3 * r['attention']:.0f} | {1e3 * r['onnxruntime']:.0f} | {1e3 * r['other']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if not _ext.has_avx512_bf16():
        raise SystemExit("bf16_split.py: this CPU has no AVX512-BF16 (the bf16 precisions need it)")
    rows, attention = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, source in MODELS.items():
            model_dir = export_model(source, Path(tmp) / key, precisions=("fp32",), name=key)
            for precision in ("bf16", "bf16x2"):
                engine = Engine.load(model_dir, providers="cpu", threads=args.threads, precision=precision)
                attention[key] = engine.encoder_attention if engine.encoder_parts else "none"
                rows.append({"model": key, "precision": precision,
                             **split(engine, engine.spec.input_size, args.runs)})
                print(rows[-1], flush=True)
    report = {"machine": machine(), "threads": args.threads, "runs": args.runs, "attention": attention,
              "command": shlex.join(["python", "benchmarks/bf16_split.py",
                                     *(argv if argv is not None else sys.argv[1:])]),
              "rows": rows}
    write_report(args.out, "bf16_split", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
