"""Registration throughput: sequential batch, multi-process batch, Ray batch; service latency.

    python benchmarks/throughput.py [--model random_tiny] [--pairs 12] [--size 128] [--threads 2]
                                    [--prompt-mode | --points-per-side 4] [--requests 24]

One list of ``--pairs`` synthetic image pairs (``--size`` px, shapes shifted between fixed and
moving) is registered four ways on this machine, each into a fresh output folder and end to end
(worker start and engine load included, Ray's own start excluded and reported apart):

- sequential: ``batch.register_many`` with one engine of ``--threads`` intra-op threads;
- multi-process: a process pool of ``--threads`` processes, one engine of one thread each,
  ``batch.register_one`` per pair;
- Ray: ``ray_batch.register_many_ray`` on a local Ray instance of ``--threads`` CPUs (one actor of
  one thread per CPU);
- service: ``serve.create_app`` under uvicorn on loopback (embedding cache off, so every request
  encodes its two images), ``--requests`` requests from 1 client and then from 4 concurrent
  clients; latency is the client's wall time per request.

By default each pair is registered in prompt mode (one box prompt), the cheapest mode, because
the automatic mask generator takes tens of seconds per pair on a 2-core machine; pass
``--points-per-side N`` for AMG mode. Writes ``benchmarks/results/throughput.md`` and ``.json``
with the machine (CPU model, cores, load average), the model and the exact command.
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from samreg_rt.batch import read_pairs_list, register_many, register_one
from samreg_rt.engine import Engine

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def machine() -> dict:
    """CPU model, logical cores, load average, library versions."""
    import onnxruntime
    import ray

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    return {"cpu": model.group(1).strip() if model else platform.processor(), "logical_cpus": os.cpu_count(),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "ray": ray.__version__,
            "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                         text=True).stdout.strip()}


def make_pairs(root: Path, n: int, size: int) -> Path:
    """``n`` synthetic grey pairs of ``size`` px (noise, a disc and a bar, shifted) + pairs.csv."""
    rng = np.random.default_rng(0)
    with open(root / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fixed", "moving", "id"])
        for k in range(n):
            fixed = (rng.random((size, size)) * 50).astype(np.uint8)
            cv2.circle(fixed, (size // 3 + k % 7, size // 3), size // 6, 210, -1)
            cv2.rectangle(fixed, (size // 2, size // 2), (size - 10, size - 12 - k % 5), 130, -1)
            moving = np.roll(fixed, (k % 4, 3), axis=(0, 1))
            cv2.imwrite(str(root / f"f{k}.png"), fixed)
            cv2.imwrite(str(root / f"m{k}.png"), moving)
            writer.writerow([f"f{k}.png", f"m{k}.png", f"pair{k:03d}"])
    return root / "pairs.csv"


_WORKER_ENGINE: dict = {}


def _pool_init(model: str) -> None:
    _WORKER_ENGINE["engine"] = Engine.load(model, threads=1)


def _pool_register(job: tuple[str, str, str], out: str, options: dict) -> str:
    warnings.simplefilter("ignore")
    register_one(job[1], job[2], _WORKER_ENGINE["engine"], Path(out) / job[0], **options)
    return job[0]


def run_sequential(jobs, model: str, threads: int, out: Path, options: dict) -> dict:
    t = time.perf_counter()
    engine = Engine.load(model, threads=threads)
    summary = register_many(jobs, engine, out, progress=False, **options)
    assert summary["failed"] == 0, summary["errors"]
    return {"wall_s": time.perf_counter() - t}


def run_processes(jobs, model: str, processes: int, out: Path, options: dict) -> dict:
    t = time.perf_counter()
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"), initializer=_pool_init,
                             initargs=(model,)) as pool:
        done = list(pool.map(_pool_register, jobs, [str(out)] * len(jobs), [options] * len(jobs)))
    assert len(done) == len(jobs)
    return {"wall_s": time.perf_counter() - t}


def run_ray(jobs, model: str, cpus: int, out: Path, options: dict) -> dict:
    import ray

    from samreg_rt.ray_batch import connect, register_many_ray

    t = time.perf_counter()
    connect(None, num_cpus=cpus)
    started = time.perf_counter() - t
    try:
        t = time.perf_counter()
        summary = register_many_ray(jobs, model, out, threads=1, progress=False, **options)
        wall = time.perf_counter() - t
    finally:
        ray.shutdown()
    assert summary["failed"] == 0, summary["errors"]
    return {"wall_s": wall, "ray_init_s": started, "actors": len(summary["workers"])}


def run_service(jobs, model: str, threads: int, requests: int, options: dict) -> dict:
    import httpx
    import uvicorn

    from samreg_rt.serve import Limits, create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(Engine.load(model, threads=threads), Limits(cache_images=0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/register"
    form = {k: str(v) for k, v in options.items() if k != "prompts" and v is not None}
    if options.get("prompts"):
        form["prompt"] = [",".join(f"{x:g}" for x in p) for p in options["prompts"]]

    def send(k: int) -> float:
        _, fixed, moving = jobs[k % len(jobs)]
        files = {"fixed": ("f.png", Path(fixed).read_bytes()), "moving": ("m.png", Path(moving).read_bytes())}
        t = time.perf_counter()
        response = httpx.post(url, files=files, data=form, timeout=600)
        assert response.status_code == 200, response.text
        return time.perf_counter() - t

    out = {}
    try:
        for clients in (1, 4):
            t = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                latencies = np.array(list(pool.map(send, range(requests))))
            wall = time.perf_counter() - t
            p50, p95 = np.percentile(latencies, [50, 95])
            out[f"clients_{clients}"] = {"requests": requests, "p50_s": float(p50), "p95_s": float(p95),
                                         "mean_s": float(latencies.mean()), "requests_per_s": requests / wall}
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    return out


def write_results(record: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(record, indent=1) + "\n")
    m, r = record["machine"], record["results"]
    lines = [
        "# Registration throughput",
        "",
        f"Command: `{record['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, load average {m['load_average_1_5_15']} at the "
        f"start; onnxruntime "
        f"{m['onnxruntime']}, ray {m['ray']}, Python {m['python']}, commit {m['git_commit']}"
        + (f" ({m['note']})" if m.get("note") else "") + ".",
        "",
        f"Model: `{record['model']}`{' (untrained, random weights: speed only)' if not record['trained'] else ''}; "
        f"{record['pairs']} synthetic pairs of {record['size']}x{record['size']} px; mode: {record['mode']}.",
        "",
        "| method | workers | wall s | pairs/s |",
        "|---|---|---|---|",
    ]
    for name, label, workers in (("sequential", "sequential batch", f"1 process x {record['threads']} threads"),
                                 ("processes", "multi-process batch", f"{record['threads']} processes x 1 thread"),
                                 ("ray", "Ray batch (local)", f"{r['ray'].get('actors')} actors x 1 thread")):
        lines.append(f"| {label} | {workers} | {r[name]['wall_s']:.1f} | {r[name]['pairs_per_s']:.2f} |")
    lines += ["", f"Ray's own start (`ray.init`, not counted above): {r['ray']['ray_init_s']:.1f} s. Every wall "
              "time includes starting the workers and loading the engine(s).", "",
              f"Service (`samreg-rt serve` app, engine of {record['threads']} threads, embedding cache off):", "",
              "| clients | requests | p50 ms | p95 ms | requests/s |", "|---|---|---|---|---|"]
    for clients in (1, 4):
        s = r["service"][f"clients_{clients}"]
        lines.append(f"| {clients} | {s['requests']} | {s['p50_s'] * 1000:.0f} | {s['p95_s'] * 1000:.0f} | "
                     f"{s['requests_per_s']:.2f} |")
    lines += ["", "With 4 clients the requests queue for the single engine worker, so latency includes queueing."]
    if m["load_average_1_5_15"][0] > m["logical_cpus"]:
        lines += ["", f"The load average ({m['load_average_1_5_15'][0]}) exceeded the {m['logical_cpus']} CPUs: "
                  "these figures measure how large a share of a contended CPU each layout got as much as its "
                  "speed (layouts with more processes, multi-process and Ray, get a larger share). Rerun on an "
                  "idle machine before comparing the layouts."]
    (RESULTS / "throughput.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random_tiny")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="threads of the sequential engine = processes = "
                        "Ray CPUs")
    parser.add_argument("--points-per-side", type=int, default=None, help="AMG mode with this grid")
    parser.add_argument("--requests", type=int, default=24)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    s = args.size
    if args.points_per_side:
        grid = args.points_per_side
        options, mode = {"points_per_side": grid}, f"AMG, {grid}x{grid} grid"
    else:
        box = (s / 4, s / 4, 3 * s / 4, 3 * s / 4)
        options, mode = {"prompts": [box]}, f"prompt mode, one box prompt {tuple(round(v) for v in box)}"
    engine = Engine.load(args.model)  # exported once before any worker looks for it
    record = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "model": args.model, "trained": bool(engine.manifest.get("source", {}).get("trained", True)),
              "pairs": args.pairs, "size": s, "mode": mode, "threads": args.threads, "results": {}}
    with tempfile.TemporaryDirectory(prefix="samreg-throughput-") as tmp:
        root = Path(tmp)
        jobs = read_pairs_list(make_pairs(root, args.pairs, s))
        runs = {"sequential": lambda out: run_sequential(jobs, args.model, args.threads, out, options),
                "processes": lambda out: run_processes(jobs, args.model, args.threads, out, options),
                "ray": lambda out: run_ray(jobs, args.model, args.threads, out, options)}
        for name, run in runs.items():
            result = run(root / name)
            result["pairs_per_s"] = args.pairs / result["wall_s"]
            record["results"][name] = result
            print(name, json.dumps(result), flush=True)
        record["results"]["service"] = run_service(jobs, args.model, args.threads, args.requests, options)
        print("service", json.dumps(record["results"]["service"]), flush=True)
    record["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write_results(record)


if __name__ == "__main__":
    main()
