"""Opt-in fast mask generation against the full prompt grid: what it saves and what it costs.

    python benchmarks/fast_modes.py [--model litemedsam] [--per-application 2] [--grids 16 32]
        [--threads 2] [--out benchmarks/results]

Fast mode = ``AmgParams.skip_covered``: prompts run coarse to fine (grid points on every 4th row
and column, then every 2nd, then the rest) and a prompt whose grid point lies inside a mask kept
so far is not run. For each labelled 2-D pair of ../shared/data (at most ``--per-application``
per application) and each grid size, the pair is registered with the ``default`` preset twice,
full grid and fast mode, same engine, and compared:

* prompts run and mask-generation seconds (both images);
* ROIs kept: the fraction of the full grid's ROIs (after the area filter and dedup) that the
  fast mode also finds (a fast ROI with mask IoU >= 0.9), per image, and the ROI counts;
* pairs kept: the fraction of the full grid's ROI pairs whose two ROIs are both found and
  paired with each other in the fast mode;
* Dice of the final registration (mean over label classes, the field fitted from the ROI pairs by
  ``ddf.fit_correspondence`` and kept only if it does not lower the images' NCC, as ``samreg-rt
  eval`` does for the ``default`` preset) and its change against the full grid.

Writes ``fast_modes.md`` and ``fast_modes.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from samreg_rt import ddf, metrics, volume
from samreg_rt.engine import Engine
from samreg_rt.evaluate import PairSpec, load_pairs, read_labels
from samreg_rt.io import load_image
from samreg_rt.masks import iou_matrix
from samreg_rt.pipeline import PRESETS, Registration, register

from common import machine  # benchmarks/common.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SAME_ROI_IOU = 0.9


def labelled_pairs(per_application: int) -> list[PairSpec]:
    """The first ``per_application`` labelled 2-D pairs of each application in the manifest."""
    taken: dict[str, int] = {}
    out = []
    for pair in load_pairs(DATA):
        if pair.dim != 2 or not (pair.fixed_label and pair.moving_label):
            continue
        taken[pair.application] = taken.get(pair.application, 0) + 1
        if taken[pair.application] <= per_application:
            out.append(pair)
    return out


def run(pair: PairSpec, engine: Engine, **amg: Any) -> tuple[Registration, float]:
    """Register one pair with the ``default`` preset; returns the registration and its Dice (the
    field as ``samreg-rt eval`` makes it: identity without pairs or when it lowers the NCC)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = register(pair.fixed, pair.moving, engine, preset="default", **amg)
    fixed_lab = read_labels(pair.fixed_label, pair)
    shape = fixed_lab.shape
    corr = reg.correspondence
    checked = ddf.fit_checked(corr, load_image(pair.fixed).array, load_image(pair.moving).array,
                              PRESETS["default"].check_similarity)
    field = ddf.resize_field(checked.fit.field_px, shape) if checked.kept else ddf.identity(shape)
    moving_lab = read_labels(pair.moving_label, pair)
    warped = ddf.warp_labels(volume.resize_labels(moving_lab, shape), field)
    classes = sorted(pair.label_classes) or sorted(set(np.unique(fixed_lab)) - {0})
    scores = [v for v in metrics.dice(fixed_lab, warped, classes=classes).values() if not np.isnan(v)]
    return reg, float(np.mean(scores)) if scores else float("nan")


def roi_matches(full: np.ndarray, fast: np.ndarray, min_iou: float = SAME_ROI_IOU) -> np.ndarray:
    """For each full-grid ROI (packed masks) the index of its fast-mode counterpart (mask IoU >= ``min_iou``),
    -1 if none."""
    if len(full) == 0 or len(fast) == 0:
        return np.full(len(full), -1)
    iou = iou_matrix(full, fast)
    best = iou.argmax(axis=1)
    return np.where(iou[np.arange(len(full)), best] >= min_iou, best, -1)


def compare(full: Registration, fast: Registration, min_iou: float = SAME_ROI_IOU) -> dict[str, Any]:
    """ROIs and pairs of the full grid that the fast mode keeps (ROIs the same at mask IoU >= ``min_iou``)."""
    a, b = full.correspondence, fast.correspondence
    found = {side: roi_matches(getattr(a, side).masks, getattr(b, side).masks, min_iou)
             for side in ("fixed", "moving")}
    fast_pairs = {tuple(p) for p in b.pairs.tolist()}
    kept = sum((found["fixed"][i], found["moving"][j]) in fast_pairs for i, j in a.pairs.tolist())
    rois_full = len(a.fixed.masks) + len(a.moving.masks)
    return {
        "rois": [rois_full, len(b.fixed.masks) + len(b.moving.masks)],
        "rois_kept": float(sum(int((f >= 0).sum()) for f in found.values()) / rois_full) if rois_full else None,
        "pairs": [len(a.pairs), len(b.pairs)],
        "pairs_kept": float(kept / len(a.pairs)) if len(a.pairs) else None,
    }


def stage_seconds(reg: Registration) -> float:
    return float(reg.timings.get("amg_fixed", 0.0) + reg.timings.get("amg_moving", 0.0))


def prompts_run(reg: Registration) -> int:
    return int(reg.counts["fixed"]["run"] + reg.counts["moving"]["run"])


def bench(pairs: list[PairSpec], engine: Engine, grids: list[int]) -> list[dict[str, Any]]:
    rows = []
    for grid in grids:
        for pair in pairs:
            t = time.perf_counter()
            full, dice_full = run(pair, engine, points_per_side=grid)
            fast, dice_fast = run(pair, engine, points_per_side=grid, skip_covered=True)
            rows.append({"pair": pair.id, "application": pair.application, "grid": grid,
                         "prompts_run": [prompts_run(full), prompts_run(fast)],
                         "amg_s": [round(stage_seconds(full), 2), round(stage_seconds(fast), 2)],
                         "dice": [dice_full, dice_fast], **compare(full, fast)})
            print(f"{pair.id} grid {grid}: {rows[-1]} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    return rows


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Fast mask generation (skip covered prompts, coarse to fine) against the full prompt grid", "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, SIMD {' '.join(m['simd_flags'])}; Python "
        f"{m['python']}, onnxruntime {m['onnxruntime']}. Load average before/after "
        f"{report['load'][0]:.2f} / {report['load'][1]:.2f}.",
        f"Command: `{report['command']}`. Model {report['model']} ({report['spec']}), `default` preset, "
        f"{report['threads']} threads. Each pair registered with the full grid and with `skip_covered`; "
        f"ROIs count as kept at mask IoU >= {SAME_ROI_IOU}, pairs when both ROIs are kept and paired together.", "",
        "| pair | grid | prompts run full / fast | mask generation s full / fast | ROIs full / fast | ROIs kept "
        "| pairs full / fast | pairs kept | Dice full / fast |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['pair']} | {r['grid']} | {r['prompts_run'][0]} / {r['prompts_run'][1]} | "
                     f"{r['amg_s'][0]:.1f} / {r['amg_s'][1]:.1f} | {r['rois'][0]} / {r['rois'][1]} | "
                     f"{_f(r['rois_kept'], 2)} | {r['pairs'][0]} / {r['pairs'][1]} | {_f(r['pairs_kept'], 2)} | "
                     f"{_f(r['dice'][0])} / {_f(r['dice'][1])} |")
    lines += ["", "## Summary per grid", "",
              "| grid | pairs | prompts run (fast / full) | mask generation time (fast / full) | ROIs kept (mean) "
              "| ROI pairs kept (mean) | mean Dice full | mean Dice fast | worst Dice change |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for g, s in report["summary"].items():
        lines.append(f"| {g} | {s['pairs']} | {s['prompt_fraction']:.2f} | {s['time_fraction']:.2f} | "
                     f"{_f(s['rois_kept'], 2)} | {_f(s['pairs_kept'], 2)} | {_f(s['dice_full'])} | "
                     f"{_f(s['dice_fast'])} | {_f(s['worst_dice_change'])} |")
    return "\n".join(lines) + "\n"


def summarise(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    out = {}
    for grid in sorted({r["grid"] for r in rows}):
        rs = [r for r in rows if r["grid"] == grid]

        def mean(key: str) -> float | None:
            vals = [r[key] for r in rs if r[key] is not None]
            return float(np.mean(vals)) if vals else None

        dice = np.array([r["dice"] for r in rs], float)
        out[grid] = {
            "pairs": len(rs),
            "prompt_fraction": float(sum(r["prompts_run"][1] for r in rs) / sum(r["prompts_run"][0] for r in rs)),
            "time_fraction": float(sum(r["amg_s"][1] for r in rs) / sum(r["amg_s"][0] for r in rs)),
            "rois_kept": mean("rois_kept"), "pairs_kept": mean("pairs_kept"),
            "dice_full": float(np.nanmean(dice[:, 0])), "dice_fast": float(np.nanmean(dice[:, 1])),
            "worst_dice_change": float(np.nanmin(dice[:, 1] - dice[:, 0])),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="litemedsam")
    ap.add_argument("--per-application", type=int, default=2)
    ap.add_argument("--grids", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    engine = Engine.load(args.model, threads=args.threads)
    spec = engine.spec
    load_before = os.getloadavg()[0]
    rows = bench(labelled_pairs(args.per_application), engine, args.grids)
    report = {
        "machine": machine(), "load": [load_before, os.getloadavg()[0]], "threads": args.threads,
        "command": shlex.join(["python", "benchmarks/fast_modes.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": args.model,
        "spec": f"{spec.prompt_kind} grid, box sizes {list(spec.box_sizes)}, {spec.mask_output} output, pred-IoU "
                f"{spec.pred_iou_thresh}, stability {spec.stability_score_thresh}",
        "rows": rows, "summary": summarise(rows),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fast_modes.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / "fast_modes.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
