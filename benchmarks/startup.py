"""The main job's start-up: what a `samreg-rt register` process spends before and around the registration.

    python benchmarks/startup.py [--repeats 5] [--threads 2] [--out benchmarks/results]

Runs the README's main job (`samreg-rt register` on examples/cardiac_2d with LiteMedSAM, fp32, no field) in fresh
processes through ``samreg_rt.cli.main``, alternating two settings ``--repeats`` times each:

- as samreg-rt is: the register path imports what it runs (onnx only for the bf16 engines' graph surgery; scipy
  only for the field, the metrics, the baselines and Hungarian matching; the ``eval`` command's module only for
  that command);
- with the modules the CLI imported at start-up before that change imported first (``onnx``,
  ``samreg_rt.bf16_graph`` and ``samreg_rt.evaluate``, which brings scipy's ndimage, optimize and sparse): the
  baseline, measured in the same run.

Per run: the process's wall seconds (interpreter start to exit), the seconds to import the CLI and build its parser,
``register_s`` from run.json (the registration itself, engine loaded) and the rest (engine load, reading, writing).
Writes startup.md and startup.json to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, write_report  # benchmarks/common.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "cardiac_2d"
# What `samreg-rt register` imported at start-up before the imports were deferred (commit 7135182): cli.build_parser
# imported samreg_rt.evaluate (baselines, ddf, metrics, volume: scipy), the engine onnx and samreg_rt.bf16_graph.
EAGER = ("onnx", "samreg_rt.bf16_graph", "samreg_rt.evaluate")
SETTINGS = {"as is": (), "with the former start-up imports": EAGER}
CHILD = """
import time
t0 = time.perf_counter()
import importlib, json, sys
for name in {eager!r}:
    importlib.import_module(name)
from samreg_rt.cli import build_parser, main
build_parser()
import samreg_rt.batch
t_import = time.perf_counter() - t0
code = main(sys.argv[1:])
print(json.dumps({{"code": code, "import_s": t_import, "main_s": time.perf_counter() - t0 - t_import}}))
"""


def run_once(eager: tuple[str, ...], out: Path, threads: int) -> dict:
    """One fresh `samreg-rt register` process; its wall, import and registration seconds."""
    argv = ["register", str(EXAMPLE / "fixed.png"), str(EXAMPLE / "moving.png"), "--model", "litemedsam",
            "--out", str(out), "--threads", str(threads)]
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD.format(eager=eager), *argv], capture_output=True, text=True,
                          cwd=REPO)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"register failed ({proc.returncode}): {proc.stderr[-2000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    run = json.loads((out / "run.json").read_text())
    return {"wall_s": wall, "import_s": child["import_s"], "register_s": run["register_s"],
            "rest_s": wall - child["import_s"] - run["register_s"], "pairs": run["counts"]["pairs"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="samreg_startup_") as tmp:
        for i in range(args.repeats):
            for name, eager in SETTINGS.items():
                runs[name].append(run_once(eager, Path(tmp) / f"{i}_{'eager' if eager else 'now'}", args.threads))
    keys = ("wall_s", "import_s", "register_s", "rest_s")
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
    base, now = medians["with the former start-up imports"], medians["as is"]
    report = {"machine": machine(), "threads": args.threads, "eager_imports": list(EAGER),
              "load_average_before_after": [list(load_before), list(os.getloadavg())],
              "command": shlex.join(["python", "benchmarks/startup.py", *(argv if argv is not None else sys.argv[1:])]),
              "runs": runs, "medians": medians, "wall_speedup": base["wall_s"] / now["wall_s"]}
    m = report["machine"]
    lines = ["# The main job's start-up: `samreg-rt register` in fresh processes", "",
             f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs; Python {m['python']}, onnxruntime "
             f"{m['onnxruntime']}. Command: `{report['command']}`. Load average (1/5/15 min) before "
             f"{[round(x, 2) for x in load_before]}, after {[round(x, 2) for x in os.getloadavg()]}.", "",
             f"The README's main job (examples/cardiac_2d, LiteMedSAM fp32, {args.threads} threads, no field) through "
             f"`samreg_rt.cli.main` in a fresh process per run, the two settings alternating, {args.repeats} runs "
             "each. *with the former start-up imports*: the same process with "
             + ", ".join(f"`{e}`" for e in EAGER) + " imported first, what the CLI imported at start-up before "
             "its imports were deferred. Seconds: process wall (interpreter start to exit); import (the CLI, its "
             "parser and the register path); register (run.json's `register_s`: encoding, mask generation, "
             "matching); rest (engine load, reading the images, writing the outputs, interpreter start and exit).", "",
             "| setting | run | wall | import | register | rest | pairs |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rs in runs.items():
        for i, r in enumerate(rs):
            lines.append(f"| {name} | {i + 1} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + f" | {r['pairs']} |")
        lines.append(f"| {name} | **median** | " + " | ".join(f"**{medians[name][k]:.2f}**" for k in keys) + " | |")
    lines += ["", f"Median wall {now['wall_s']:.2f} s against {base['wall_s']:.2f} s with the former start-up imports: "
              f"{report['wall_speedup']:.2f}x; import {now['import_s']:.2f} s against {base['import_s']:.2f} s."]
    write_report(args.out, "startup", report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
