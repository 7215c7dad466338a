"""Mask generation with the split decoder against the one-graph decoder, same run, same outputs.

Mask generation runs ``decoder_tokens`` on every prompt and ``decoder_masks`` (the mask upscaling)
only on the prompts whose predicted IoU passes the threshold. The baseline is the one-graph
``decoder.onnx`` on every prompt followed by the same filters (what samreg-rt did before the
split): it is run through the same ``amg.generate`` by an adapter, so both sides share every line
but the decoder calls. Reported per image: wall and process-CPU seconds of both, the ratio, the
fraction of prompts upscaled, and whether the mask sets are equal (same prompts, same order,
mask IoU >= 0.999 each).

usage: python benchmarks/amg_decoder.py [--model litemedsam] [--grid 16] [--batch-size 32]
       [--threads 2] [--images PATH ...] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any


from samreg_rt import amg
from samreg_rt.engine import Engine
from samreg_rt.io import load_image

from common import WholeDecoder, machine, same_masks, write_report  # benchmarks/common.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
IMAGES = [REPO / "examples" / "cardiac_2d" / "fixed.png",
          DATA / "prostate_mr" / "prostate_slice_s30" / "fixed.png",
          DATA / "lung_ct" / "case001_slice_s100" / "fixed.png"]


def display_path(path: Path) -> str:
    """``path`` relative to the repository (``examples/...``) or beside it (``../shared/...``)."""
    path = path.resolve()
    if path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    return str(Path("..") / path.relative_to(REPO.parent)) if path.is_relative_to(REPO.parent) else str(path)


def timed(run) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def bench_image(engine: Engine, path: Path, params: amg.AmgParams) -> dict[str, Any]:
    image = load_image(path)
    emb = engine.embed(image.array, name=str(path))
    one_graph_decoder = WholeDecoder(lambda e, c, l: engine.decode(e, c, l, batch_size=len(c)), engine.threads)
    one_graph, wall_1, cpu_1 = timed(lambda: amg.generate(one_graph_decoder, emb, params))
    split, wall_2, cpu_2 = timed(lambda: amg.generate(engine, emb, params))
    prompts = split.counts["prompts"]
    return {
        "image": display_path(path),
        "shape": list(image.array.shape[:2]),
        "prompts": prompts,
        "candidates_above_pred_iou": split.counts["pred_iou"],
        "one_graph": {"wall_s": wall_1, "cpu_s": cpu_1},
        "split": {"wall_s": wall_2, "cpu_s": cpu_2},
        "speedup_wall": wall_1 / wall_2,
        "speedup_cpu": cpu_1 / cpu_2,
        "outputs": same_masks(one_graph, split, 0.999),
    }


def markdown(report: dict[str, Any]) -> str:
    m, p = report["machine"], report["params"]
    lines = [
        "# Mask generation: split decoder vs one-graph decoder",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, SIMD {' '.join(m['simd_flags'])}; "
        f"Python {m['python']}, onnxruntime {m['onnxruntime']}. Load average before/after "
        f"{report['load_average'][0]:.2f} / {report['load_average'][1]:.2f} (a shared machine: CPU s is the "
        "steadier figure).",
        f"Model {report['model']} ({report['precision']}), threads {report['threads']}; prompts "
        f"{p['prompt_kind']} grid {p['points_per_side']} x sizes {p['box_sizes']} ({p['mask_output']} output), "
        f"pred-IoU {p['pred_iou_thresh']}, stability {p['stability_score_thresh']}, batch {p['batch_size']}. "
        f"Command: `{report['command']}`.",
        "",
        "| image | prompts | kept by pred-IoU | one-graph s (CPU s) | split s (CPU s) | speed-up wall / CPU | masks | equal (min IoU) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["images"]:
        o = r["outputs"]
        min_iou = "-" if o["min_iou"] is None else f"{o['min_iou']:.4f}"
        lines.append(
            f"| {r['image']} | {r['prompts']} | {r['candidates_above_pred_iou']} | "
            f"{r['one_graph']['wall_s']:.1f} ({r['one_graph']['cpu_s']:.1f}) | {r['split']['wall_s']:.1f} "
            f"({r['split']['cpu_s']:.1f}) | {r['speedup_wall']:.2f}x / {r['speedup_cpu']:.2f}x | "
            f"{o['masks'][1]} | {'yes' if o['identical'] else 'NO'} ({min_iou}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="litemedsam")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--grid", type=int, default=16, help="prompt grid side (the model's default is 32)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", nargs="+", type=Path, default=IMAGES)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    engine = Engine.load(args.model, threads=args.threads, precision=args.precision)
    params = amg.AmgParams.from_spec(engine.spec, points_per_side=args.grid, batch_size=args.batch_size)
    load_before = os.getloadavg()[0]
    images = [bench_image(engine, path, params) for path in args.images]
    report = {
        "machine": machine(), "model": args.model, "precision": args.precision, "threads": args.threads,
        "params": {k: getattr(params, k) for k in ("prompt_kind", "points_per_side", "box_sizes", "mask_output",
                                                  "pred_iou_thresh", "stability_score_thresh", "batch_size")},
        "command": "python benchmarks/amg_decoder.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "load_average": [load_before, os.getloadavg()[0]],
        "images": images,
    }
    write_report(args.out, "amg_decoder", report, markdown(report))
    return 0 if all(r["outputs"]["identical"] for r in images) else 1


if __name__ == "__main__":
    sys.exit(main())
