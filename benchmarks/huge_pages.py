"""numpy's transparent huge pages on or off, samreg-rt's ViT-B reference-preset pair, fresh processes.

    python benchmarks/huge_pages.py [--repeats 3] [--threads 2] [--precision fp32] [--out benchmarks/results]

numpy asks Linux for transparent huge pages for every array of 4 MB or more; samreg-rt's mask generation
turns that off (``samreg_rt.pages.small_pages``, unless ``NUMPY_MADVISE_HUGEPAGE`` is set), and so do the bf16
precisions' encoders (``samreg_rt.bf16_graph``: their packing and products). This runs pipeline.py's samreg-rt run
at ``--precision`` (fp32 by default; its benchmark model, pair ``acdc2d_example``, the reference preset's
32x32 point grid, the LiteMedSAM embeddings substituted) in fresh processes, alternating: without the
variable (samreg-rt's default: small pages during mask generation) and with ``NUMPY_MADVISE_HUGEPAGE=1``
(numpy's default everywhere), ``--repeats`` times each. Writes huge_pages.md and .json (another precision:
huge_pages_<precision>.md and .json) to ``--out``: every run's stage seconds, the medians, and the machine's THP
settings.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from common import machine, write_report  # benchmarks/common.py (the script's folder is on sys.path)
from pipeline import build_models, run_samreg_fresh, transparent_huge_pages  # benchmarks/pipeline.py

SETTINGS = {"small pages in mask generation and bf16 encoders (default)": False, "NUMPY_MADVISE_HUGEPAGE=1": True}
STAGES = ("engine_load", "encode_fixed", "amg_fixed", "encode_moving", "amg_moving")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "int8", "bf16", "bf16x2"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    child = argparse.Namespace(pair="acdc2d_example", points_per_side=32, pred_iou_thresh=0.75, stability_thresh=0.1,
                               mask_threshold=-6.0, threads=args.threads)
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="samreg_huge_pages_") as tmp:
        work = Path(tmp)
        build_models(work)
        for _ in range(args.repeats):
            for name, huge in SETTINGS.items():
                run = run_samreg_fresh(work, child, huge_pages=huge, precision=args.precision)
                runs[name].append({**{k: run["wall_s"][k] for k in STAGES}, "total": run["total_wall_s"],
                                   "masks": [run["counts"][side]["nms"] for side in ("fixed", "moving")]})
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in (*STAGES, "total")} for name, rs in runs.items()}
    report = {"machine": machine(), "transparent_huge_pages": transparent_huge_pages(), "precision": args.precision,
              "command": shlex.join(["python", "benchmarks/huge_pages.py", *(argv if argv is not None else sys.argv[1:])]),
              "runs": runs, "medians": medians}
    m, thp = report["machine"], report["transparent_huge_pages"]
    lines = ["# numpy's transparent huge pages: samreg-rt's ViT-B reference-preset pair in fresh processes", "",
             f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs; transparent huge pages: enabled "
             f"`{thp['enabled']}`, defrag `{thp['defrag']}`. Command: `{report['command']}`.", "",
             f"pipeline.py's samreg-rt {args.precision} run (LiteMedSAM embeddings substituted, see pipeline.md) in a fresh "
             f"process per run, the two settings alternating, {args.repeats} runs each. Wall seconds:", "",
             "| setting | run | " + " | ".join(STAGES) + " | total | masks (fixed, moving) |",
             "|---|---:|" + "---:|" * (len(STAGES) + 2)]
    for name, rs in runs.items():
        for i, r in enumerate(rs):
            lines.append(f"| {name} | {i + 1} | " + " | ".join(f"{r[k]:.2f}" for k in (*STAGES, "total"))
                         + f" | {r['masks'][0]}, {r['masks'][1]} |")
        lines.append(f"| {name} | **median** | " + " | ".join(f"**{medians[name][k]:.2f}**" for k in (*STAGES, "total"))
                     + " | |")
    name = "huge_pages" if args.precision == "fp32" else f"huge_pages_{args.precision}"
    write_report(args.out, name, report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
