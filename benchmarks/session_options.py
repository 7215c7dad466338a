"""ONNX Runtime session options, measured: what ``Engine.load`` should set on this machine.

    python benchmarks/session_options.py [--models litemedsam vit_b] [--threads 2] [--repeats 3]
        [--out benchmarks/results]

For each model (exported fresh into a temporary directory by ``samreg_export``, fp32) and each of
its graphs as the runtime calls them (encoder on the example image; ``decoder_tokens`` on a batch
of ``TOKENS_BATCH`` prompts of the model's grid; ``decoder_masks`` on ``MASKS_BATCH`` of them, one
mask output), one option is changed at a time from the runtime's settings (``BASELINE``: all graph
optimisations, CPU memory arena on, memory pattern off, ``--threads`` intra-op threads, 1 inter-op
thread, sequential execution, ``session.run``). Recorded per setting: session creation seconds, the first run (a cold
start: what the first image of a ``register`` call pays), the median of ``--repeats`` further
runs, and the process's resident-memory high-water mark over the setting (VmHWM, reset through
/proc/self/clear_refs). IO binding binds the inputs once and lets ONNX Runtime allocate the
outputs (``run_with_iobinding``), the CPU form of what a GPU deployment does with device buffers.
Single graphs run at one input shape; mask generation calls the decoder graphs with a batch that
changes from call to call, so ``amg.generate`` on the example image (LiteMedSAM, its spec's grid)
is also timed with the decoder sessions of each setting: its first run and the median of
``--repeats`` more. Writes ``session_options.md`` and ``session_options.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from samreg_export.export import export_model
from samreg_rt import amg
from samreg_rt.engine import Engine
from samreg_rt.io import load_image
from samreg_rt.preprocess import to_model_input

from common import machine  # benchmarks/common.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples" / "cardiac_2d" / "fixed.png"
MODELS = {"litemedsam": "litemedsam", "vit_b": "random:vit_b"}
TOKENS_BATCH = 64
MASKS_BATCH = 16
BASELINE = {"optimization": "all", "arena": True, "mem_pattern": False, "threads": None, "execution": "sequential",
            "io_binding": False}
LEVELS = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def variants(threads: int) -> dict[str, dict[str, Any]]:
    """Name -> settings: the baseline and one change at a time."""
    base = {**BASELINE, "threads": threads}
    return {
        "baseline (runtime)": base,
        "optimisation basic": {**base, "optimization": "basic"},
        "optimisation extended": {**base, "optimization": "extended"},
        "optimisation disabled": {**base, "optimization": "disabled"},
        "memory arena off": {**base, "arena": False},
        "memory pattern on": {**base, "mem_pattern": True},
        "1 thread": {**base, "threads": 1},
        "parallel execution": {**base, "execution": "parallel"},
        "IO binding": {**base, "io_binding": True},
    }


def make_session(path: Path, settings: dict[str, Any]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[settings["optimization"]]
    options.enable_cpu_mem_arena = settings["arena"]
    options.enable_mem_pattern = settings["mem_pattern"]
    options.intra_op_num_threads = settings["threads"]
    options.inter_op_num_threads = 1
    options.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if settings["execution"] == "parallel"
                              else ort.ExecutionMode.ORT_SEQUENTIAL)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def runner(session: ort.InferenceSession, feed: dict[str, np.ndarray], io_binding: bool) -> Callable[[], Any]:
    """One call of the graph, returning its outputs as numpy arrays."""
    if not io_binding:
        return lambda: session.run(None, feed)
    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_cpu_input(name, value)
    for out in session.get_outputs():
        binding.bind_output(out.name)

    def run():
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()
    return run


def hwm_mib() -> float | None:
    """Resident-set high-water mark of this process (MiB), None if /proc has no VmHWM."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return None


def reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(path: Path, feed: dict[str, np.ndarray], settings: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Creation, first-run and warm median seconds, and the memory high-water mark, of one setting."""
    reset = reset_hwm()
    t = time.perf_counter()
    session = make_session(path, settings)
    create = time.perf_counter() - t
    run = runner(session, feed, settings["io_binding"])
    t = time.perf_counter()
    run()
    first = time.perf_counter() - t
    walls = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        walls.append(time.perf_counter() - t)
    result = {"create_s": create, "first_s": first, "warm_s": statistics.median(walls), "hwm_mib": hwm_mib() if reset else None}
    del session, run
    return result


def graph_feeds(model_dir: Path, threads: int) -> dict[str, dict[str, np.ndarray]]:
    """The inputs each graph sees in ``register``: the example image, its embedding, its prompt grid."""
    engine = Engine.load(model_dir, providers="cpu", threads=threads)
    image = load_image(IMAGE).array
    tensor, _ = to_model_input(image, engine.spec)
    emb = engine.embed(image)
    coords, labels = amg.build_prompts(amg.AmgParams.from_spec(engine.spec), emb.frame)
    coords, labels = coords[:TOKENS_BATCH], labels[:TOKENS_BATCH]
    _, hyper_in, image_tokens = engine.decode_tokens(emb.embedding, coords, labels)
    return {
        "encoder": {"image": tensor},
        "decoder_tokens": {"image_embeddings": emb.embedding[None], "point_coords": coords, "point_labels": labels},
        "decoder_masks": {"image_tokens": image_tokens[:MASKS_BATCH], "hyper_in": hyper_in[:MASKS_BATCH, :1]},
    }


def mask_generation(model_dir: Path, threads: int, settings: dict[str, Any], repeats: int) -> dict[str, Any]:
    """``amg.generate`` on the example image with decoder sessions made with ``settings`` (IO binding
    aside): seconds of the first run and median of ``repeats`` more, and the number of masks."""
    engine = Engine.load(model_dir, providers="cpu", threads=threads)
    sessions = {**engine.sessions, **{role: make_session(model_dir / f"{role}.onnx", settings)
                                      for role in ("decoder_tokens", "decoder_masks")}}
    engine = Engine(engine.model_dir, engine.manifest, engine.spec, engine.precision, sessions, engine.providers)
    emb = engine.embed(load_image(IMAGE).array)
    params = amg.AmgParams.from_spec(engine.spec)
    walls = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        masks = amg.generate(engine, emb, params)
        walls.append(time.perf_counter() - t)
    return {"first_s": walls[0], "warm_s": statistics.median(walls[1:]), "masks": len(masks)}


def bench_model(key: str, threads: int, repeats: int, work: Path) -> dict[str, Any]:
    model_dir = work / key
    export_model(MODELS[key], model_dir, precisions=("fp32",), name=key)
    feeds = graph_feeds(model_dir, threads)
    out: dict[str, Any] = {}
    for graph, feed in feeds.items():
        out[graph] = {}
        for name, settings in variants(threads).items():
            out[graph][name] = measure(model_dir / f"{graph}.onnx", feed, settings, repeats)
            print(f"{key} {graph} {name}: {out[graph][name]}", file=sys.stderr)
    if key == "litemedsam":          # an untrained decoder (random:vit_b) keeps almost no prompt
        out["mask generation"] = {name: mask_generation(model_dir, threads, settings, repeats)
                                  for name, settings in variants(threads).items() if not settings["io_binding"]}
        print(f"{key} mask generation: {out['mask generation']}", file=sys.stderr)
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# ONNX Runtime session options (CPU), one change at a time from the runtime's settings", "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, SIMD {' '.join(m['simd_flags'])}; Python "
        f"{m['python']}, onnxruntime {m['onnxruntime']}. Load average before/after {report['load'][0]:.2f} / "
        f"{report['load'][1]:.2f}.",
        f"Command: `{report['command']}`. Inputs as in `register` on examples/cardiac_2d/fixed.png: encoder on the "
        f"image, decoder_tokens on {TOKENS_BATCH} prompts of the model's grid, decoder_masks on {MASKS_BATCH} of "
        f"them (one mask output). Seconds: session creation, first run (cold), median of {report['repeats']} warm "
        "runs; memory: resident high-water mark of the process during the setting (MiB).", "",
    ]
    for key, graphs in report["models"].items():
        for graph, rows in graphs.items():
            base = rows["baseline (runtime)"]["warm_s"]
            if graph == "mask generation":
                lines += [f"## {key}: mask generation (`amg.generate`, decoder sessions with each setting)", "",
                          "| setting | first run s | warm s | warm vs runtime | masks |", "|---|---:|---:|---:|---:|"]
                lines += [f"| {name} | {r['first_s']:.2f} | {r['warm_s']:.2f} | {base / r['warm_s']:.2f}x | {r['masks']} |"
                          for name, r in rows.items()]
                lines.append("")
                continue
            lines += [f"## {key}: {graph}", "",
                      "| setting | create s | first run s | warm s | warm vs runtime | memory high-water MiB |",
                      "|---|---:|---:|---:|---:|---:|"]
            for name, r in rows.items():
                hwm = "n/a" if r["hwm_mib"] is None else f"{r['hwm_mib']:.0f}"
                lines.append(f"| {name} | {r['create_s']:.2f} | {r['first_s']:.3f} | {r['warm_s']:.3f} | "
                             f"{base / r['warm_s']:.2f}x | {hwm} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="samreg_session_options_") as tmp:
        models = {key: bench_model(key, args.threads, args.repeats, Path(tmp)) for key in args.models}
    report = {"machine": machine(), "load": [load_before, os.getloadavg()[0]], "repeats": args.repeats,
              "command": shlex.join(["python", "benchmarks/session_options.py", *(argv if argv is not None else sys.argv[1:])]),
              "baseline": BASELINE, "models": models}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "session_options.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / "session_options.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
