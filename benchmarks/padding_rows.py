"""Mask generation on the image's rows only: what skipping the padding's rows saves, same run, same outputs.

    python benchmarks/padding_rows.py [--repeats 3] [--threads 2] [--out benchmarks/results]

SAM's ViT models scale an image's longest side to 1024 and pad below (and right), so a landscape image fills only
the top rows of the 256 x 256 low-resolution masks. Mask generation upscales only the rows that the working grid
reads (``amg.low_rows_read``: each token row makes 4 rows, ``_ext.mask_upscaling_factored(grid_rows=...)``). The
baseline is the same ``amg.generate`` with every row upscaled (``amg.low_rows_read`` replaced by 256: what samreg-rt
did before), the two alternating ``--repeats`` times per image. LiteMedSAM stretches its input to 256 x 256 (no
padding), so this concerns the SAM ViT models only.

Model: pipeline.py's benchmark ViT-B export (LiteMedSAM's trained prompt encoder and mask decoder in SAM's multimask
slots, fp32). Its encoder is not run: each image's embedding is LiteMedSAM's (as pipeline.py substitutes it, on the
image squashed to 200 x 200), in the ViT's frame of the image (longest side 1024, padded). Prompting: pipeline.py's
(32 x 32 points, multimask, predicted IoU 0.75, stability 0.1, mask threshold -6), on the default preset's working
grid of each image. Reports per image the low-resolution rows upscaled, mask-generation seconds (medians) and whether
the two mask sets are identical (masks, scores, boxes, prompts, order). Writes padding_rows.md and .json to ``--out``.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from samreg_rt import amg
from samreg_rt.engine import Engine, ImageEmbedding
from samreg_rt.io import load_image
from samreg_rt.pipeline import PRESETS, work_shape
from samreg_rt.preprocess import Frame, resized_shape

from common import machine, write_report  # benchmarks/common.py (the script's folder is on sys.path)
from pipeline import DATA, build_models, litemedsam_embeddings  # benchmarks/pipeline.py

REPO = Path(__file__).resolve().parents[1]
IMAGES = {  # landscape shapes of ../shared/data and the README's example, and a square one (nothing to skip)
    "examples/cardiac_2d (216 x 256)": REPO / "examples" / "cardiac_2d" / "fixed.png",
    "acdc_patient067_slice_s1 (440 x 517)": DATA / "cardiac_mr" / "acdc_patient067_slice_s1" / "fixed.png",
    "amos_a1_s270_vs_a1_s200 (85 x 512)": DATA / "abdomen" / "amos_a1_s270_vs_a1_s200" / "fixed.png",
    "zh12_01_01 (300 x 300)": DATA / "aerial" / "zh12_01_01" / "fixed.png",
}
SETTINGS = ("image rows (as is)", "all 256 rows")
FIELDS = ("masks", "iou_preds", "stability", "boxes", "prompt_ids")


def timed(engine: Engine, emb: ImageEmbedding, params: amg.AmgParams, out_shape: tuple[int, int],
          all_rows: bool) -> tuple[float, amg.MaskSet]:
    """Seconds of one ``amg.generate`` and its masks; ``all_rows``: every low-resolution row upscaled."""
    rows_read = amg.low_rows_read
    if all_rows:
        amg.low_rows_read = lambda ry, image_rows: amg.LOW_RES
    try:
        t = time.perf_counter()
        masks = amg.generate(engine, emb, params, out_shape)
        return time.perf_counter() - t, masks
    finally:
        amg.low_rows_read = rows_read


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="samreg_padding_rows_") as tmp:
        models = build_models(Path(tmp), precisions=("fp32",))
        names, paths = list(IMAGES), list(IMAGES.values())
        embeddings = [litemedsam_embeddings(models["litemedsam"], (p, p), args.threads) for p in paths]
        engine = Engine.load(models["vit_b"], providers="cpu", threads=args.threads)
        params = amg.AmgParams.from_spec(engine.spec, points_per_side=32, pred_iou_thresh=0.75,
                                         stability_score_thresh=0.1, mask_threshold=-6.0)
        rows = []
        for name, path, by_image in zip(names, paths, embeddings):
            shape = load_image(path).array.shape[:2]
            frame = Frame(shape, resized_shape(shape, engine.spec), engine.spec.input_size)
            emb = ImageEmbedding(next(iter(by_image.values())), frame)
            out_shape = work_shape(shape, PRESETS["default"])
            ry, _ = amg.upscale_matrices(frame, (amg.LOW_RES, amg.LOW_RES), out_shape)
            low_rows = amg.low_rows_read(ry, int(np.ceil(frame.resized_shape[0] * amg.LOW_RES / frame.input_size)))
            timed(engine, emb, params, out_shape, False)                          # warm-up
            seconds: dict[str, list[float]] = {s: [] for s in SETTINGS}
            results = {}
            for _ in range(args.repeats):
                for setting in SETTINGS:
                    t, results[setting] = timed(engine, emb, params, out_shape, setting == SETTINGS[1])
                    seconds[setting].append(t)
            a, b = (results[s] for s in SETTINGS)
            identical = len(a) == len(b) and all(np.array_equal(getattr(a, f), getattr(b, f)) for f in FIELDS)
            medians = {s: statistics.median(v) for s, v in seconds.items()}
            rows.append({"image": name, "shape": list(shape), "resized": list(frame.resized_shape),
                         "working_grid": list(out_shape), "low_rows": low_rows, "masks": len(a),
                         "upscaled": a.counts["pred_iou"], "seconds": seconds, "medians": medians,
                         "speedup": medians[SETTINGS[1]] / medians[SETTINGS[0]], "identical": identical})
    report = {"machine": machine(), "threads": args.threads,
              "command": shlex.join(["python", "benchmarks/padding_rows.py", *(argv if argv is not None else sys.argv[1:])]),
              "images": rows}
    m = report["machine"]
    lines = ["# Mask generation on the image's rows only (SAM ViT frame, padding below)", "",
             f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, fp32 kernels' build {m['fp32_kernels']}; Python "
             f"{m['python']}, onnxruntime {m['onnxruntime']}. Command: `{report['command']}`. {args.threads} threads.",
             "", "pipeline.py's ViT-B export (LiteMedSAM's trained decoder), each image's LiteMedSAM embedding in the "
             "ViT's frame (longest side 1024, padded below), 32 x 32 points, multimask, predicted IoU 0.75, stability "
             "0.1, mask threshold -6, on the default preset's working grid. `amg.generate` as is (the low-resolution "
             "rows of the image) against every one of the 256 rows upscaled, alternating, "
             f"{args.repeats} runs each after a warm-up; median seconds.", "",
             "| image | working grid | low-res rows upscaled | masks upscaled | masks | image rows s | all rows s | "
             "speed-up | identical |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['image']} | {r['working_grid'][0]} x {r['working_grid'][1]} | {r['low_rows']} of 256 | "
                     f"{r['upscaled']} | {r['masks']} | {r['medians'][SETTINGS[0]]:.2f} | "
                     f"{r['medians'][SETTINGS[1]]:.2f} | {r['speedup']:.2f}x | {'yes' if r['identical'] else 'NO'} |")
    write_report(args.out, "padding_rows", report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
