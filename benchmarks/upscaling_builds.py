"""The mask upscaling of kept masks: each build of the fused kernel against the ``decoder_masks`` graph.

Run from the repository root: ``python benchmarks/upscaling_builds.py [--out benchmarks/results]``.
LiteMedSAM (fp32) on examples/cardiac_2d/fixed.png: ``decode_tokens`` (the graph) of its first ``--prompts``
box prompts, every prompt's single-mask output kept, then the kept masks' low-resolution logits by
``decoder_masks`` (what ``Engine.decode_kept_masks`` runs without the kernel when every prompt is kept) and by ``_ext.mask_upscaling`` with
each build this CPU runs (``isa``: "auto" = AVX-512 where the CPU has it, "avx2", "generic"), on
``--threads`` threads. Prints and writes ``upscaling_builds.md`` / ``.json``: best of ``--repeats`` runs,
the speed-up over the graph, the kernel's GFLOP/s (its products, not LayerNorm and GELU), the largest
difference to the graph's logits and the binary-mask pixels that differ; checks that the AVX2 build's
logits equal the AVX-512 build's to the bit where both run. This decides where ``Engine`` fuses the
upscaling: the graph here runs ONNX Runtime's kernels for this CPU (AVX-512 ones where it has them),
so an AVX2 build that beats it on an AVX-512 CPU is compared with a stronger graph than on an AVX2 one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, write_report  # noqa: E402
from benchmarks.kernels import best_ms  # noqa: E402
from samreg_rt import _ext, amg  # noqa: E402
from samreg_rt.engine import Engine  # noqa: E402
from samreg_rt.io import load_image  # noqa: E402

IMAGE = ROOT / "examples" / "cardiac_2d" / "fixed.png"


def best_s(fn, repeats: int) -> float:
    return best_ms(fn, repeats) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    graph = Engine.load("litemedsam", threads=args.threads, fused_tokens=False)
    weights = graph.mask_upscaling
    if weights is None:
        raise SystemExit("the engine fuses no upscaling on this CPU (mask_upscaling_isa 'generic'): nothing to compare")
    image = load_image(IMAGE).array
    embedded = graph.embed(image)
    params = amg.AmgParams.from_spec(graph.spec)
    coords, labels = amg.build_prompts(params, embedded.frame)
    coords, labels = coords[:args.prompts], labels[:args.prompts]
    # LiteMedSAM's single-mask output of every prompt, as mask generation asks for it (amg.generate)
    _, hyper_in, image_tokens = graph.decode_tokens(embedded.embedding, coords, labels, mask_outputs=(0,))
    rows, mask_start = np.arange(len(coords)), np.arange(len(coords) + 1)    # one mask per prompt
    hyper = np.ascontiguousarray(hyper_in[:, 0])
    width = graph.spec.embedding_size
    hw = image_tokens.shape[1]
    flop = len(hyper) * (hw * 2 * 256 * 256 + 4 * hw * 2 * 64 * 128 + 16 * hw * 2 * 32)

    def fused(isa: str) -> np.ndarray:
        return _ext.mask_upscaling(image_tokens, rows, weights.w1, weights.b1, weights.ln_weight, weights.ln_bias,
                                   weights.eps, weights.w2, weights.b2, hyper, mask_start, width, isa=isa,
                                   threads=args.threads)

    # decode_kept_masks without the fused kernel, every prompt kept: decoder_masks on all of them
    want = graph.decode_masks(image_tokens, hyper_in)[:, 0]
    t_graph = best_s(lambda: graph.decode_masks(image_tokens, hyper_in), args.repeats)
    isas = ["auto", "avx2", "generic"] if _ext.mask_upscaling_isa() == "avx512" else ["auto", "generic"]
    rows_out = [{"path": "decoder_masks graph", "s": t_graph, "speedup": 1.0}]
    results = {}
    for isa in isas:
        got = results[isa] = fused(isa)
        t = best_s(lambda: fused(isa), args.repeats)
        rows_out.append({"path": f"mask_upscaling isa={isa}", "s": t, "speedup": t_graph / t, "gflop_s": flop / t / 1e9,
                         "max_abs_diff": float(np.abs(got - want).max()),
                         "mask_pixels_differ": int(((got > 0) != (want > 0)).sum())})
    if "avx2" in results:
        np.testing.assert_array_equal(results["avx2"], results["auto"])

    info = machine()
    lines = [
        "# Mask upscaling of kept masks: fused kernel builds against the decoder_masks graph", "",
        f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, SIMD {' '.join(info['simd_flags'])}; "
        f"Python {info['python']}, onnxruntime {info['onnxruntime']}. Command: `python benchmarks/upscaling_builds.py"
        f" --prompts {args.prompts} --threads {args.threads}`.",
        f"LiteMedSAM fp32, {IMAGE.relative_to(ROOT)}: {len(hyper)} kept masks ({args.prompts} box prompts, single "
        f"output), {args.threads} threads, best of {args.repeats}. GFLOP/s: the kernel's products "
        f"({flop / 1e9:.1f} GFLOP). Logits of each build against the graph's (max |difference|, and binary-mask "
        f"pixels that differ of {want.size}).", "",
        "| path | s | speed-up over the graph | GFLOP/s | max abs diff | mask pixels differ |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows_out:
        lines.append(f"| {r['path']} | {r['s']:.3f} | {r['speedup']:.2f}x | {r.get('gflop_s', float('nan')):.1f} | "
                     f"{r.get('max_abs_diff', 0.0):.2e} | {r.get('mask_pixels_differ', 0)} |")
    if "avx2" in results:
        lines += ["", "The AVX2 build's logits equal the AVX-512 build's to the bit."]
    write_report(args.out, "upscaling_builds", {"machine": info, "prompts": args.prompts, "threads": args.threads,
                                                "masks": len(hyper), "gflop": flop / 1e9, "rows": rows_out},
                 "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
