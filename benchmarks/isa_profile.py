"""Which SIMD instructions ONNX Runtime's CPU kernels execute on this machine (VNNI, AMX, BF16, FMA).

    python benchmarks/isa_profile.py [--seconds 8] [--threads 2] [--out benchmarks/results]

Each workload runs alone in a child process under ``perf record`` (user-space cycles, 999 Hz) for
``--seconds`` after one warm-up run:

- ``gemm_fp32`` / ``gemm_int8``: the single-node graphs of ``performance.py``'s GEMM peaks
  (``MatMul`` fp32; ``MatMulInteger`` uint8 x int8, as dynamic quantization emits it), 2048^3;
- ``encoder_fp32`` / ``encoder_int8``: LiteMedSAM's image encoder (registry export) on an example image;
- ``decoder_fp32``: LiteMedSAM's ``decoder_tokens`` + ``decoder_masks`` on a batch of 64 box prompts.

ONNX Runtime's library has no symbols, so a sample is classified by the instructions within
``WINDOW`` bytes of its address (``objdump -d``), in this order: AMX (``tdp*``, ``tileloadd``),
VNNI (``vpdpbusd(s)``/``vpdpwssd(s)``; zmm = AVX512-VNNI, ymm = AVX-VNNI), BF16 (``vdpbf16ps``),
int8 without VNNI (``vpmaddubsw``), fp32 FMA on zmm (AVX-512) or ymm (AVX2), other. Shares are of the
samples in ONNX Runtime's library; the share of all (user-space) samples spent there is reported
beside. Needs ``perf`` and ``objdump``
(binutils). Writes ``isa_profile.md`` and ``.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from common import gemm_graph, machine, session, write_report  # benchmarks/common.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = ("gemm_fp32", "gemm_int8", "encoder_fp32", "encoder_int8", "decoder_fp32")
WINDOW = 256
COVER = 0.97          # classify the hottest addresses up to this share of the library's samples
CLASSES = [  # (name, pattern on the window's disassembly), first match wins
    ("AMX", re.compile(r"\b(tdpb[su][su]d|tdpbf16ps|tileloadd)\b")),
    ("VNNI zmm (AVX512-VNNI)", re.compile(r"\bvpdp(busds?|wssds?)\s+[^\n]*zmm")),
    ("VNNI ymm (AVX-VNNI)", re.compile(r"\bvpdp(busds?|wssds?)\s+[^\n]*ymm")),
    ("BF16 (vdpbf16ps)", re.compile(r"\bvdpbf16ps\b")),
    ("int8 without VNNI (vpmaddubsw)", re.compile(r"\bvpmaddubsw\b")),
    ("fp32 FMA zmm (AVX-512)", re.compile(r"\bvfn?m(add|sub)\d{3}ps\s+[^\n]*zmm")),
    ("fp32 FMA ymm (AVX2)", re.compile(r"\bvfn?m(add|sub)\d{3}ps\s+[^\n]*ymm")),
]


def ort_library() -> Path:
    """ONNX Runtime's native library (the Python binding, which links the CPU kernels in)."""
    return next((Path(ort.__file__).parent / "capi").glob("onnxruntime_pybind11_state*.so"))


def workload(name: str, threads: int) -> Callable[[], Any]:
    """A callable that runs one iteration of ``name`` (see the module docstring)."""
    if name.startswith("gemm"):
        int8 = name.endswith("int8")
        sess = session(gemm_graph(2048, 2048, 2048, int8), threads)
        rng = np.random.default_rng(0)
        feed = ({"A": rng.integers(0, 256, (2048, 2048), dtype=np.uint8), "a_zero": np.array(128, np.uint8)}
                if int8 else {"A": rng.standard_normal((2048, 2048), np.float32)})
        return lambda: sess.run(None, feed)
    from samreg_rt import amg
    from samreg_rt.engine import Engine
    from samreg_rt.io import load_image

    image = load_image(REPO / "examples" / "cardiac_2d" / "fixed.png").array
    engine = Engine.load("litemedsam", providers="cpu", threads=threads,
                         precision="int8" if name == "encoder_int8" else "fp32")
    if name.startswith("encoder"):
        return lambda: engine.embed(image)
    emb = engine.embed(image)
    coords, labels = amg.build_prompts(amg.AmgParams.from_spec(engine.spec), emb.frame)

    def decode() -> None:
        _, hyper_in, image_tokens = engine.decode_tokens(emb.embedding, coords[:64], labels[:64])
        engine.decode_masks(image_tokens, hyper_in[:, :1])
    return decode


def child(name: str, threads: int, seconds: float) -> None:
    """Warm up, then run ``name`` for ``seconds``; print the iteration count and seconds as JSON."""
    run = workload(name, threads)
    run()
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        run()
        count += 1
    print(json.dumps({"iterations": count, "seconds": time.perf_counter() - start}))


def samples(data: Path, library: Path) -> tuple[Counter, Counter]:
    """(samples per address in ``library``, samples in ``library`` / elsewhere)."""
    report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none",
                             "--sort", "dso,sym", "--percent-limit", "0", "-F", "sample,dso,sym"],
                            check=True, capture_output=True, text=True).stdout
    by_address, by_dso = Counter(), Counter()
    for line in report.splitlines():
        match = re.match(r"\s*(\d+)\s+(\S+)\s+\[.\]\s+(\S+)", line)
        if not match:
            continue
        count, dso, symbol = int(match[1]), match[2], match[3]
        if dso == library.name:
            by_dso["onnxruntime"] += count
            if symbol.startswith("0x"):
                by_address[int(symbol, 16)] += count
        else:
            by_dso["other"] += count
    return by_address, by_dso


def classify(library: Path, address: int) -> str:
    """Class of the code around ``address`` (see ``CLASSES``)."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={max(address - WINDOW, 0)}",
                           f"--stop-address={address + WINDOW}", str(library)],
                          check=True, capture_output=True, text=True).stdout
    return next((name for name, pattern in CLASSES if pattern.search(text)), "other")


def profile(name: str, threads: int, seconds: float, work: Path, library: Path) -> dict[str, Any]:
    """``perf record`` of one workload in a child process -> sample shares per class."""
    data = work / f"{name}.data"
    proc = subprocess.run(["perf", "record", "-e", "cycles:u", "-F", "999", "-o", str(data), "--",
                           sys.executable, __file__, "--child", name, "--threads", str(threads),
                           "--seconds", str(seconds)], check=True, capture_output=True, text=True)
    timing = json.loads(proc.stdout.strip().splitlines()[-1])
    by_address, by_dso = samples(data, library)
    total = sum(by_address.values())
    classes, covered = Counter(), 0
    for address, count in by_address.most_common():
        if covered >= COVER * total:
            break
        classes[classify(library, address)] += count
        covered += count
    all_samples = sum(by_dso.values())
    return {
        "iterations": timing["iterations"], "seconds": timing["seconds"],
        "samples": all_samples, "onnxruntime_samples": by_dso["onnxruntime"], "classified_samples": covered,
        "where_pct": {k: 100.0 * v / all_samples for k, v in by_dso.items()},
        "class_pct": {k: 100.0 * v / covered for k, v in classes.most_common()},
    }


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Which SIMD instructions ONNX Runtime's CPU kernels run here", "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, SIMD {' '.join(m['simd_flags'])}; "
        f"Python {m['python']}, onnxruntime {m['onnxruntime']}, numpy {m['numpy']}.",
        f"Command: `{report['command']}`. {report['threads']} threads; each workload {report['seconds']} s "
        f"under `perf record -e cycles:u -F 999` after one warm-up run. Method: see the script's docstring "
        f"(classes by the instructions within {WINDOW} bytes of each sampled address; the hottest addresses "
        f"up to {COVER:.0%} of the library's samples).", "",
        "| workload | runs / s | samples in onnxruntime / elsewhere (%) | classes of the onnxruntime samples (%) |",
        "|---|---:|---|---|",
    ]
    for name, r in report["workloads"].items():
        where = r["where_pct"]
        classes = ", ".join(f"{k} {v:.1f}" for k, v in r["class_pct"].items())
        lines.append(f"| {name} | {r['iterations'] / r['seconds']:.2f} | {where.get('onnxruntime', 0):.1f} / "
                     f"{where.get('other', 0):.1f} | {classes} |")
    lines += ["", report["reading"], ""]
    return "\n".join(lines)


def reading(workloads: dict[str, dict[str, Any]], flags: list[str]) -> str:
    """What the table says about VNNI, AMX and BF16 on this machine, from the measured shares."""
    def share(name: str, prefix: str) -> float:
        return sum(v for k, v in workloads[name]["class_pct"].items() if k.startswith(prefix))
    amx = "amx_tile" in flags
    parts = [
        f"int8 GEMM: {share('gemm_int8', 'VNNI'):.0f}% of its ONNX Runtime samples sit in VNNI code "
        f"({share('gemm_int8', 'int8 without'):.0f}% in vpmaddubsw code); the int8 encoder: "
        f"{share('encoder_int8', 'VNNI'):.0f}% VNNI, {share('encoder_int8', 'fp32 FMA'):.0f}% fp32 FMA "
        f"(its convolutions and the layers left in fp32).",
        f"fp32 GEMM: {share('gemm_fp32', 'fp32 FMA zmm'):.0f}% AVX-512 FMA, {share('gemm_fp32', 'fp32 FMA ymm'):.0f}% AVX2 FMA; "
        f"the decoder: {share('decoder_fp32', 'fp32 FMA zmm'):.0f}% AVX-512 FMA.",
        f"AMX: {'the CPU reports amx_tile' if amx else 'the CPU reports no AMX flag'}; AMX code was sampled in "
        f"{sum(1 for w in workloads.values() if w['class_pct'].get('AMX'))} workloads. BF16 code in "
        f"{sum(1 for w in workloads.values() if w['class_pct'].get('BF16 (vdpbf16ps)'))} workloads: the graphs are fp32 or int8.",
    ]
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.threads, args.seconds)
        return 0
    missing = [tool for tool in ("perf", "objdump") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"isa_profile.py needs {' and '.join(missing)} on PATH")
    library = ort_library()
    with tempfile.TemporaryDirectory(prefix="samreg_isa_") as tmp:
        workloads = {name: profile(name, args.threads, args.seconds, Path(tmp), library) for name in WORKLOADS}
    info = machine()
    report = {"machine": info, "threads": args.threads, "seconds": args.seconds,
              "command": "python benchmarks/isa_profile.py" + (f" --seconds {args.seconds:g}" if args.seconds != 8 else ""),
              "library": library.name, "workloads": workloads, "reading": reading(workloads, info["simd_flags"])}
    write_report(args.out, "isa_profile", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
