"""ONNX Runtime's CPU memory arena: one per session, or one shared by the engine's sessions, by measurement.

    python benchmarks/memory_arena.py [--models litemedsam vit_b] [--threads 2] [--repeats 3]
        [--out benchmarks/results]

A ViT encoder runs as several graphs (its parts around the native global attention, on AVX-512
CPUs), and each ONNX Runtime session grows its own memory arena on its first run. For each model
(exported fresh into a temporary directory, fp32) and each setting of ``Engine.load(shared_arena=)``
a fresh process loads the engine and embeds the example image 1 + ``--repeats`` times: the first
embedding (what the first image of a ``register`` call pays), the median of the others, the process's
resident-memory high-water mark (VmHWM) and whether the embeddings equal the first setting's bit for
bit. Writes ``memory_arena.md`` and ``memory_arena.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from samreg_export.export import export_model

from common import machine, write_report  # benchmarks/common.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples" / "cardiac_2d" / "fixed.png"
MODELS = {"litemedsam": "litemedsam", "vit_b": "random:vit_b"}

# run in a fresh process per setting, so that neither the memory high-water mark nor the registered
# environment arena carries over from another setting
CHILD = r"""
import json, statistics, sys, time
import numpy as np
from samreg_rt.engine import Engine
from samreg_rt.io import load_image
model, threads, repeats, shared, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
t = time.perf_counter()
engine = Engine.load(model, providers="cpu", threads=threads, shared_arena=shared)
load_s = time.perf_counter() - t
image = load_image(sys.argv[6]).array
times = []
for _ in range(1 + repeats):
    t = time.perf_counter()
    embedding = engine.embed(image).embedding
    times.append(time.perf_counter() - t)
np.save(out, embedding)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"load_s": load_s, "first_s": times[0], "warm_s": statistics.median(times[1:]),
                  "hwm_mib": hwm / 1024, "encoder_parts": len(engine.encoder_parts)}))
"""


def measure(model_dir: Path, shared: bool, threads: int, repeats: int, work: Path) -> tuple[dict, Path]:
    """One fresh process: Engine.load(shared_arena=shared) and 1 + repeats embeddings of the example image."""
    out = work / f"{model_dir.name}_{int(shared)}.npy"
    result = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(threads), str(repeats),
                             str(int(shared)), str(out), str(IMAGE)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1]), out


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# ONNX Runtime CPU memory arena: one per session or one shared (`Engine.load(shared_arena=)`)", "",
             f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, SIMD {' '.join(m['simd_flags'])}; "
             f"Python {m['python']}, onnxruntime {m['onnxruntime']}. Command: `{report['command']}`. "
             f"{report['threads']} threads; a fresh process per row: Engine.load, then the example image embedded "
             f"1 + {report['repeats']} times (first; median of the rest); memory: the process's resident high-water "
             "mark (VmHWM).", "",
             "| model | arena | encoder graphs | load s | first embedding s | warm embedding s | memory high-water MiB "
             "| embedding equal to the per-session run's |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for key, rows in report["models"].items():
        for name, r in rows.items():
            lines.append(f"| {key} | {name} | {max(r['encoder_parts'], 1)} | {r['load_s']:.2f} | {r['first_s']:.3f} | "
                         f"{r['warm_s']:.3f} | {r['hwm_mib']:.0f} | {'yes' if r['identical'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    report = {"machine": machine(), "threads": args.threads, "repeats": args.repeats,
              "command": "python benchmarks/memory_arena.py " + " ".join(argv or sys.argv[1:]), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for key in args.models:
            model_dir = export_model(MODELS[key], work / key, precisions=("fp32",), name=key)
            rows = {}
            for name, shared in (("one per session", False), ("shared", True)):
                rows[name], emb = measure(model_dir, shared, args.threads, args.repeats, work)
                rows[name]["identical"] = bool(np.array_equal(np.load(emb), np.load(work / f"{model_dir.name}_0.npy")))
                print(key, name, rows[name], flush=True)
            report["models"][key] = rows
    write_report(args.out, "memory_arena", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
