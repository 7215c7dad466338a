"""Field-fit settings against labels: how the regularisers of ``ddf.fit`` change the Dice of the
registration on labelled 2-D pairs of ../shared/data, for one fixed set of ROI pairs per image pair.

    python benchmarks/ddf_sweep.py [--model litemedsam] [--threads 2] [--pairs ID ...]
        [--out benchmarks/results]

Each pair is registered once with the ``default`` preset and the model's own prompting (the
correspondence is the same for every setting); then, for each setting of (bending_weight,
membrane_weight), ``ddf.fit_correspondence`` fits a field and the moving labels are warped with it
and scored against the fixed labels (mean Dice over classes, as ``samreg-rt eval``). The identity
column is the Dice before registration. Writes ``ddf_sweep.md`` and ``ddf_sweep.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from samreg_rt import ddf, metrics, volume
from samreg_rt.engine import Engine
from samreg_rt.evaluate import load_pairs, read_labels
from samreg_rt.io import atomic_write, load_image
from samreg_rt.pipeline import register

from common import machine  # benchmarks/common.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PAIRS = ["acdc2d_example", "acdc_patient067_slice_s1", "acdc_patient067_slice_s3", "acdc_patient067_slice_s6",
         "acdc_patient067_slice_s7", "case001_slice_s080", "case001_slice_s100", "case001_slice_s140",
         "prostate_slice_s40", "prostate_slice_s60", "inter_example_1_2"]
SETTINGS = [(1e-2, 0.0), (1e-2, 1.0), (1e-2, 10.0), (1e-1, 0.0), (1e-1, 1.0), (1.0, 0.0), (1.0, 10.0)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="litemedsam")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", nargs="+", default=PAIRS)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    specs = {p.id: p for p in load_pairs(DATA)}
    engine = Engine.load(args.model, threads=args.threads)
    rows = []
    for pid in args.pairs:
        pair = specs[pid]
        fixed, moving = load_image(pair.fixed), load_image(pair.moving)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            corr = register(fixed, moving, engine, preset="default").correspondence
        shape = fixed.array.shape[:2]
        fixed_lab = read_labels(pair.fixed_label, pair, shape)
        moving_lab = volume.resize_labels(read_labels(pair.moving_label, pair, moving.array.shape[:2]), shape)
        classes = sorted(pair.label_classes) or sorted(set(np.unique(fixed_lab)) - {0})

        def dice(field: np.ndarray) -> float:
            return float(np.nanmean(list(metrics.dice(fixed_lab, ddf.warp_labels(moving_lab, field), classes).values())))

        row = {"pair": pid, "pairs": int(len(corr.pairs)), "identity": dice(ddf.identity(shape)), "fits": []}
        for bending, membrane in SETTINGS:
            t = time.perf_counter()
            if len(corr.pairs):
                fit = ddf.fit_correspondence(corr, bending_weight=bending, membrane_weight=membrane)
                value = dice(ddf.resize_field(fit.field_px, shape))
            else:
                value = row["identity"]
            row["fits"].append({"bending_weight": bending, "membrane_weight": membrane, "dice": value,
                                "time_s": round(time.perf_counter() - t, 2)})
        rows.append(row)
        print(pid, row["pairs"], f"{row['identity']:.3f}", " ".join(f"{f['dice']:.3f}" for f in row["fits"]), flush=True)

    ident = np.array([r["identity"] for r in rows])
    table = np.array([[f["dice"] for f in r["fits"]] for r in rows])
    command = "python benchmarks/ddf_sweep.py " + " ".join(sys.argv[1:])
    head = " | ".join(f"b {b:g}, m {m:g}" for b, m in SETTINGS)
    m = machine()
    lines = ["# Field-fit regularisers against labels", "", f"Command: `{command.strip()}`", "",
             f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {args.threads} threads. Model: {args.model}, `default` preset, the model's own prompting; "
             "one correspondence per pair, every setting fitted to it. Mean Dice over label classes; "
             "b = bending_weight, m = membrane_weight.", "",
             f"| pair | ROI pairs | identity | {head} |", "|---|---:|---:|" + "---:|" * len(SETTINGS)]
    for r, vals in zip(rows, table):
        lines.append(f"| {r['pair']} | {r['pairs']} | {r['identity']:.3f} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    lines.append(f"| **mean** | | **{ident.mean():.3f}** | " + " | ".join(f"**{v:.3f}**" for v in table.mean(axis=0)) + " |")
    lines.append("| worst change vs identity | | | " + " | ".join(f"{v:+.3f}" for v in (table - ident[:, None]).min(axis=0)) + " |")
    lines.append("| pairs better than identity | | | " + " | ".join(str(int(v)) for v in (table > ident[:, None] + 1e-3).sum(axis=0)) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "ddf_sweep.md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    with atomic_write(out / "ddf_sweep.json", "w") as handle:
        json.dump({"command": command, "machine": m, "model": args.model, "settings": SETTINGS,
                   "rows": rows}, handle, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
