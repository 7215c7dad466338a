"""Where a bf16 encoder's time goes: its weight products, the ONNX Runtime pieces between them, and the rest.

    python benchmarks/bf16_split.py [--threads 2] [--runs 3] [--out benchmarks/results]

For LiteMedSAM and the untrained ``random:vit_b`` (exported fresh, fp32, into a temporary directory), engines of
precision bf16 and bf16x2 (``Engine.load``; CPUs with AVX512-BF16 or AMX tiles) encode one image ``--runs`` times
after a warm-up; each encoder graph (or ViT part) is a ``samreg_rt.bf16_graph.Bf16Graph`` whose ``run`` adds the
seconds of its steps to ``timings``: "products" (``_ext.linear_bf16``) and "onnxruntime" (the pieces between
them); "other" is the rest of the wall time (a ViT's global attention cores between its parts, Python).
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
from samreg_rt.engine import Engine
from samreg_rt.split_encoder import ATTENTION_KERNELS

from common import machine, write_report  # benchmarks/common.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
MODELS = {"litemedsam": "litemedsam", "vit_b": "random:vit_b"}


def encode(engine: Engine, image: np.ndarray, timings: dict[str, float]) -> None:
    """One encoding of ``image`` (1, 3, S, S), the Bf16Graphs' step times added to ``timings``."""
    if not engine.encoder_parts:
        engine.sessions["encoder"].run(None, {"image": image}, timings)
        return
    core = ATTENTION_KERNELS[engine.encoder_attention]
    out = engine.encoder_parts[0].run(None, {"image": image}, timings)
    for part in engine.encoder_parts[1:]:
        tokens, q, k, v, rel_h, rel_w = out
        attention = core(q, k, v, rel_h, rel_w, threads=engine.threads)
        out = part.run(None, {"tokens": tokens, "attention": attention}, timings)


def split(engine: Engine, size: int, runs: int) -> dict[str, float]:
    """Mean seconds per encoding: total, products, onnxruntime, other."""
    image = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    encode(engine, image, {})
    timings: dict[str, float] = {}
    start = time.perf_counter()
    for _ in range(runs):
        encode(engine, image, timings)
    total = (time.perf_counter() - start) / runs
    row = {"total": total, **{k: v / runs for k, v in timings.items()}}
    row["other"] = total - row.get("products", 0.0) - row.get("onnxruntime", 0.0)
    return row


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# bf16 encoders: products, ONNX Runtime pieces and the rest", "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, bf16 products on {m['bf16_products']}; "
        f"Python {m['python']}, onnxruntime {m['onnxruntime']}. Command: `{report['command']}`; "
        f"{report['threads']} threads, mean of {report['runs']} encodings after a warm-up. products: "
        "`_ext.linear_bf16`; onnxruntime: the pieces of the fp32 graph between them; other: the rest of the wall "
        "time (a ViT's global attention cores, in "
        + ", ".join(f"{k}: {v}" for k, v in report["attention"].items()) + ").", "",
        "| model | precision | total ms | products ms | onnxruntime ms | other ms |", "|---|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['precision']} | {1e3 * r['total']:.0f} | {1e3 * r['products']:.0f} | "
                     f"{1e3 * r['onnxruntime']:.0f} | {1e3 * r['other']:.0f} |")
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
