"""Mask generation on each build of the fused CPU kernels against PyTorch eager capped to the same instructions.

Run from the repository root: ``python benchmarks/cpu_builds.py [--out benchmarks/results] [--threads 2]
[--repeats 3]``. For each build this CPU runs ("avx512" where it has AVX-512, "avx2"), a fresh process with
``SAMREG_RT_CPU_BUILD`` set to it runs LiteMedSAM's mask generation (its spec's full prompt grid, on
examples/cardiac_2d/fixed.png) through the engine and through Meta's PyTorch decoder on the same prompts
(``performance.amg_vs_torch``: median of ``--repeats`` runs each, masks compared). For "avx2" the baselines are
capped too, so that the run stands for a CPU without AVX-512: PyTorch (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``) and numpy's OpenBLAS (``OPENBLAS_CORETYPE=Haswell``);
the report gives the capability PyTorch says it runs. Every run keeps glibc from returning freed memory to the
kernel (``ALLOCATOR``), as a long-running process effectively does. Mask generation on the fused path runs no ONNX Runtime
graph (the encoder runs once per process, outside the timing). A last row runs the AVX2 builds with the two-way
transformer as the ``decoder_tokens`` graph (``fused_tokens=False``: what AVX2 CPUs ran before its AVX2 build);
ONNX Runtime has no such cap, so that graph still runs its AVX-512 kernels here (a stronger baseline than on an
AVX2 CPU). Each run also times ``decode_tokens`` with dense image tokens (one batch of ``DENSE_BATCH`` grid
prompts, what a caller of the decoder outside mask generation gets): the fused two-way transformer where the run
loads it and the ``decoder_tokens`` graph. Prints and writes ``cpu_builds.md`` / ``.json``.
What the cap cannot give is another core: an AVX2 CPU's clock, caches and FMA ports differ from this one's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]     # this checkout's samreg_rt; benchmarks/common.py

from common import machine, write_report  # noqa: E402
IMAGE = REPO / "examples" / "cardiac_2d" / "fixed.png"
DENSE_BATCH = 64     # prompts of the dense decode_tokens timing (mask generation's batch)
# glibc's allocator keeps freed memory instead of handing large blocks back to the kernel: otherwise each of the
# PyTorch decoder's large temporaries is mapped and faulted in afresh, and in a fresh process eager mask generation
# took 22-25 s here against 13.4 s in performance.py's long-running one (14 s with these settings)
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296",
             "MALLOC_TOP_PAD_": "1073741824"}
CAPS = {"avx512": {},
        "avx2": {"SAMREG_RT_CPU_BUILD": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                 "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OPENBLAS_CORETYPE": "Haswell"}}


def median_s(run: Callable[[], object], repeats: int) -> float:
    """Median wall time in seconds of ``repeats`` calls of ``run`` after a warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def child(threads: int, repeats: int, fused_tokens: bool) -> dict[str, Any]:
    """This process's build: mask generation against PyTorch eager, and dense decode_tokens on the fused two-way
    transformer (where loaded) and the decoder_tokens graph (run with the caps in the environment)."""
    import numpy as np
    import torch

    from performance import amg_vs_torch  # benchmarks/performance.py
    from samreg_rt import _ext, amg
    from samreg_rt.engine import Engine
    from samreg_rt.io import load_image

    torch.set_num_threads(threads)
    engine = Engine.load("litemedsam", "cpu", threads, fused_tokens=fused_tokens)
    emb = engine.embed(load_image(IMAGE).array)
    params = amg.AmgParams.from_spec(engine.spec)
    result = amg_vs_torch(engine, emb, params, repeats)
    coords, labels = (a[:DENSE_BATCH] for a in amg.build_prompts(params, emb.frame))
    feed = {"image_embeddings": emb.embedding[None], "point_coords": coords, "point_labels": labels}
    dense = {"prompts": len(coords),
             "graph_s": median_s(lambda: engine.sessions["decoder_tokens"].run(None, feed), repeats), "fused_s": None}
    if engine.two_way is not None:
        prepared, buffer = engine.prepare(emb.embedding), np.empty((len(coords), 64 * 64, 256), np.float32)
        dense["fused_s"] = median_s(lambda: engine.decode_tokens(prepared, coords, labels, out=buffer), repeats)
    return {"build": _ext.mask_upscaling_isa(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "fused": {"two_way (factored)": engine.two_way is not None, "mask_upscaling": engine.mask_upscaling is not None},
            **result, "dense_tokens": dense}


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# Mask generation on each build of the fused CPU kernels", "",
             f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, SIMD {' '.join(m['simd_flags'])}; "
             f"onnxruntime {m['onnxruntime']}, numpy {m['numpy']}. Threads {report['threads']}; median of "
             f"{report['repeats']} runs. Command: `{report['command']}`.", "",
             "LiteMedSAM, the spec's full prompt grid on examples/cardiac_2d/fixed.png; each row a fresh process with "
             "the environment caps of `benchmarks/cpu_builds.py` (avx2: the kernels' AVX2 builds, PyTorch and "
             "OpenBLAS capped at AVX2; ONNX Runtime, which the last row's decoder_tokens graph runs on, is not). "
             f"Dense tokens: `decode_tokens` on the first {DENSE_BATCH} prompts with dense image tokens, the fused "
             "two-way transformer (its dense passes, `_ext.two_way_pass`) and the `decoder_tokens` graph.", "",
             "| build | PyTorch capability | fused steps | prompts | samreg-rt s | PyTorch eager s | speed-up | "
             "same masks (min IoU) | dense tokens: fused ms | graph ms |",
             "|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in report["rows"]:
        fused = ", ".join(k for k, v in r["fused"].items() if v) or "none"
        fused += "" if r["fused"]["two_way (factored)"] else " (tokens: the decoder_tokens graph)"
        same, dense = r["masks"], r["dense_tokens"]
        fused_ms = "-" if dense["fused_s"] is None else f"{1e3 * dense['fused_s']:.0f}"
        lines.append(f"| {r['build']} | {r['torch_capability']} | {fused} | {r['prompts']} | {r['ort_s']:.2f} | "
                     f"{r['torch_s']:.2f} | {r['speedup']:.2f}x | {same['identical']} ({same['min_iou']}) | "
                     f"{fused_ms} | {1e3 * dense['graph_s']:.0f} |")
    lines += ["", "Target (issue 6): mask generation >= 3x PyTorch eager of the same decoder on the same prompts, "
              "identical masks.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--graph-tokens", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.threads, args.repeats, not args.graph_tokens)))
        return
    from samreg_rt import _ext

    # (build, the graph decoder_tokens instead of the fused two-way transformer)
    runs = {"avx512": [("avx512", False), ("avx2", False), ("avx2", True)],
            "avx2": [("avx2", False), ("avx2", True)]}.get(_ext.mask_upscaling_isa())
    if not runs:
        raise SystemExit("this CPU has no AVX2 and FMA: the fused kernels do not run here")
    rows = []
    for build, graph_tokens in runs:
        env = {k: v for k, v in os.environ.items() if k not in CAPS["avx2"]} | ALLOCATOR | CAPS[build]
        done = subprocess.run([sys.executable, __file__, "--child", "--threads", str(args.threads),
                               "--repeats", str(args.repeats), *(["--graph-tokens"] if graph_tokens else [])],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"the {build} run failed:\n{done.stderr}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{build}{' (graph tokens)' if graph_tokens else ''}: {rows[-1]['ort_s']:.2f} s against "
              f"{rows[-1]['torch_s']:.2f} s eager", file=sys.stderr)
    report = {"machine": machine(), "threads": args.threads, "repeats": args.repeats,
              "command": "python benchmarks/cpu_builds.py " + " ".join(sys.argv[1:]), "rows": rows}
    write_report(args.out, "cpu_builds", report, markdown(report))


if __name__ == "__main__":
    main()
