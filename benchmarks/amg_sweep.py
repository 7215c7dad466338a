"""Choose LiteMedSAM's box-grid prompts and thresholds by measurement on ../shared/data.

For every labelled 2-D pair image, the decoder runs once on the largest prompt set (a dense box
grid with every candidate box size; the mask upscaling only for prompts above the lowest
predicted-IoU threshold, as mask generation does); each configuration (grid side, box sizes, predicted-IoU and
stability thresholds) then selects its prompts from that cache, so all configurations see the same
decoder outputs. Reported per configuration: prompts, masks after NMS, ROIs after the `default`
preset's area filter and de-duplication, and label coverage: for each labelled structure, the best
Dice of any ROI with it (mean over structures), and the fraction of structures with a ROI at
Dice >= 0.5.

usage: python benchmarks/amg_sweep.py [--data ../shared/data] [--model litemedsam] [--grids 8 16 32]
       [--per-application N] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from samreg_rt import amg, amg_utils, roi
from samreg_rt.engine import Engine
from samreg_rt.io import load_image
from samreg_rt.masks import box_nms, iou_matrix, pack_masks, stability_scores
from samreg_rt.pipeline import PRESETS, work_shape

from common import labelled_images, machine, structures  # benchmarks/common.py (the script's folder is on sys.path)

GRIDS = (8, 16, 32)
SIZE_SETS = ((0.1, 0.2, 0.4), (0.1, 0.2), (0.2, 0.4), (0.2,), (0.4,))
IOU_THRESH = (0.6, 0.7, 0.8, 0.88)
STAB_THRESH = (0.7, 0.8, 0.9)
ALL_SIZES = tuple(sorted({s for sizes in SIZE_SETS for s in sizes}))


def single_mask_outputs(engine: Engine, embedding: np.ndarray, coords: np.ndarray, labels: np.ndarray,
                        floor: float, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Single-mask output of every prompt: predicted IoU (B,) and low-res logits (B, 256, 256),
    the logits filled only where the IoU exceeds ``floor`` (zeros elsewhere: never selected)."""
    ious = np.empty(len(coords), np.float32)
    low = np.zeros((len(coords), amg.LOW_RES, amg.LOW_RES), np.float32)
    for start in range(0, len(coords), batch_size):
        iou, hyper_in, image_tokens = engine.decode_tokens(embedding, coords[start:start + batch_size],
                                                           labels[start:start + batch_size])
        ious[start:start + len(iou)] = iou[:, 0]
        rows = np.flatnonzero(iou[:, 0] > floor)
        if rows.size:
            low[start + rows] = engine.decode_masks(image_tokens[rows], hyper_in[rows][:, :1])[:, 0]
    return ious, low


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--model", default="litemedsam")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--per-application", type=int, default=None, help="at most N pairs per application")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grids", type=int, nargs="+", default=list(GRIDS), help="box-grid sides to sweep")
    args = ap.parse_args()
    engine = Engine.load(args.model, threads=args.threads)
    preset = PRESETS["default"]
    rows: dict[tuple, list[dict]] = {}
    t0 = time.perf_counter()
    for name, image_path, label_path in labelled_images(Path(args.data), args.per_application):
        image = load_image(image_path)
        emb = engine.embed(image.array, name=str(image_path))
        shape = work_shape(image.array.shape[:2], preset)
        labels = structures(label_path, shape)
        cache = {}
        for grid in args.grids:  # decode every (grid, size) box once
            params = amg.AmgParams(prompt_kind="boxes", points_per_side=grid, box_sizes=ALL_SIZES)
            coords, labs = amg.build_prompts(params, emb.frame)
            cache[grid] = single_mask_outputs(engine, emb.embedding, coords, labs, min(IOU_THRESH))
        for grid, sizes, t_iou, t_stab in itertools.product(args.grids, SIZE_SETS, IOU_THRESH, STAB_THRESH):
            iou, low = cache[grid]
            cols = [ALL_SIZES.index(s) for s in sizes]
            sel = (np.arange(grid * grid)[:, None] * len(ALL_SIZES) + np.array(cols)[None]).ravel()
            ious, lows = iou[sel], low[sel]
            keep = ious > t_iou
            up = amg.upscale_logits(lows[keep], emb.frame, shape)
            stab = stability_scores(up, 0.0, 1.0)
            ok = stab > t_stab
            masks, scores = up[ok] > 0, ious[keep][ok]
            boxes = amg_utils.batched_mask_to_box(masks).astype(np.float32)
            masks = masks[box_nms(boxes, scores, 0.7)]
            packed = pack_masks(np.ascontiguousarray(masks))
            area = shape[0] * shape[1]
            kept = roi.select_rois(packed, preset.area_min * area, preset.area_max * area, preset.dedup_thresh)
            best = [float(iou_matrix(packed[kept], pack_masks(s[None])).max(initial=0.0)) for s in labels]
            dice = [2 * b / (1 + b) for b in best]  # Dice from IoU
            rows.setdefault((grid, sizes, t_iou, t_stab), []).append(
                {"image": name, "prompts": len(sel), "masks": len(masks), "rois": len(kept),
                 "coverage_dice": float(np.mean(dice)) if dice else None,
                 "covered_05": float(np.mean([d >= 0.5 for d in dice])) if dice else None})
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    table = []
    for (grid, sizes, t_iou, t_stab), r in rows.items():
        table.append({"grid": grid, "box_sizes": list(sizes), "pred_iou_thresh": t_iou, "stability_thresh": t_stab,
                      "prompts": r[0]["prompts"], "masks_mean": float(np.mean([x["masks"] for x in r])),
                      "rois_mean": float(np.mean([x["rois"] for x in r])),
                      "coverage_dice_mean": float(np.mean([x["coverage_dice"] for x in r])),
                      "covered_05": float(np.mean([x["covered_05"] for x in r])), "images": len(r)})
    table.sort(key=lambda t: (-t["coverage_dice_mean"], t["prompts"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m = machine()
    command = "python benchmarks/amg_sweep.py " + " ".join(sys.argv[1:])
    (out / "amg_sweep.json").write_text(json.dumps({"machine": m, "command": command, "model": args.model,
                                                    "seconds": time.perf_counter() - t0, "rows": table}, indent=1))
    lines = [f"# LiteMedSAM box-grid sweep ({args.model})", "",
             f"Command: `{command}`",
             f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {args.threads} threads. Images: "
             f"{table[0]['images']} labelled 2-D images of ../shared/data.", "",
             "| grid | box sizes | pred IoU > | stability > | prompts | masks | ROIs | best Dice per structure | structures with ROI Dice >= 0.5 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['grid']} | {t['box_sizes']} | {t['pred_iou_thresh']} | {t['stability_thresh']} | {t['prompts']} | "
                     f"{t['masks_mean']:.1f} | {t['rois_mean']:.1f} | {t['coverage_dice_mean']:.3f} | {t['covered_05']:.2f} |")
    (out / "amg_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:14]))


if __name__ == "__main__":
    main()
