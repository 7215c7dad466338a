"""int8 and bf16 against fp32 on the labelled pairs of ../shared/data: masks, ROI pairs and registration Dice.

    python benchmarks/int8_accuracy.py [--model litemedsam] [--per-application 0] [--threads 2]
        [--out benchmarks/results]

Issue 6 bounds int8's loss: mask IoU >= 0.95 against fp32 and >= 90% of the fp32 pairs kept. Each labelled
2-D pair (all of them, or the first ``--per-application`` of each application) is registered with the
``default`` preset by an fp32 and an int8 engine of one fresh export (``export_model`` into a temporary
directory, as the exporter now quantizes on this CPU; ``Engine.load(..., precision=...)``, int8's encoder
attention as ``Engine.load`` picks it on this machine), and, on CPUs with AVX512-BF16 (or AMX tiles), by a bf16
engine (the fp32 graphs with the encoder's weight products in bfloat16, ``samreg_rt.bf16_graph``) and a bf16x2
engine (the same with each weight as two bfloat16 parts), and compared:

* ROIs: for each fp32 ROI (after the area filter and dedup) its best mask IoU with an int8 ROI of the same
  image (0 where int8 has none); their mean (the bound's figure), the fraction at IoU >= 0.95 and the lowest;
* pairs kept: the fp32 ROI pairs whose two ROIs both have an int8 counterpart at IoU >= 0.95 that int8
  pairs with each other (``fast_modes.compare``);
* Dice of the final registration (``fast_modes.run``: the field as ``samreg-rt eval`` fits it) and its change;
* the encoder: the cosine of the int8 embedding to the fp32 one, per image.

The same for the fp32 engine with Gaussian noise added to its embeddings (``--noise``, relative sizes):
how sensitive mask generation and matching are to a perturbation of the embedding as such.

Writes ``int8_accuracy.md`` and ``int8_accuracy.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from samreg_export.export import export_model
from samreg_rt import _ext
from samreg_rt.engine import Engine, ImageEmbedding
from samreg_rt.io import load_image
from samreg_rt.manifest import read_manifest
from samreg_rt.masks import iou_matrix

from common import machine, write_report  # benchmarks/common.py (the script's folder is on sys.path)
from fast_modes import compare, labelled_pairs, run  # benchmarks/fast_modes.py

REPO = Path(__file__).resolve().parents[1]
SAME_MASK_IOU = 0.95     # issue 6: int8 mask IoU >= 0.95 against fp32
PAIRS_KEPT = 0.90        # and >= 90% of the fp32 pairs kept


def best_ious(fp32: np.ndarray, int8: np.ndarray) -> list[float]:
    """For each fp32 ROI (packed masks) its best mask IoU with an int8 ROI (0 when int8 has none)."""
    if len(fp32) == 0:
        return []
    if len(int8) == 0:
        return [0.0] * len(fp32)
    return iou_matrix(fp32, int8).max(axis=1).astype(float).tolist()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


class NoisyEmbeddings:
    """An engine whose embeddings carry seeded Gaussian noise of ``sigma`` times their standard deviation (an
    embedding cosine of about 1 / sqrt(1 + sigma^2) to the clean one): how much of int8's loss any perturbation
    of that size would cause."""

    def __init__(self, engine: Engine, sigma: float, seed: int = 0):
        self.engine, self.sigma, self.rng = engine, sigma, np.random.default_rng(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def embed(self, image: np.ndarray, name: str = "image") -> ImageEmbedding:
        clean = self.engine.embed(image, name)
        x = clean.embedding
        noise = self.rng.standard_normal(x.shape, dtype=np.float32) * np.float32(self.sigma * x.std())
        return dataclasses.replace(clean, embedding=x + noise)


def bench(pairs: list, fp32: Engine, variants: dict[str, Any]) -> list[dict[str, Any]]:
    """Per pair and variant (an engine or a stand-in for one), its registration against fp32's."""
    rows = []
    for pair in pairs:
        images = (load_image(pair.fixed).array, load_image(pair.moving).array)
        clean = [fp32.embed(image).embedding for image in images]      # once per pair, not per variant
        ref, dice_ref = run(pair, fp32)
        for label, engine in variants.items():
            reg, dice = run(pair, engine)
            a, b = ref.correspondence, reg.correspondence
            ious = best_ious(a.fixed.masks, b.fixed.masks) + best_ious(a.moving.masks, b.moving.masks)
            cosines = [cosine(want, engine.embed(image).embedding) for want, image in zip(clean, images)]
            rows.append({"pair": pair.id, "application": pair.application, "variant": label,
                         "dice": [dice_ref, dice], "roi_ious": ious, "embedding_cosine": cosines,
                         **compare(ref, reg, SAME_MASK_IOU)})
            print(f"{pair.id} {label}: {rows[-1]['pairs']} pairs, kept {rows[-1]['pairs_kept']}, "
                  f"dice {rows[-1]['dice']}", file=sys.stderr)
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: ROIs, best IoUs, pairs kept, Dice and cosines over all pairs."""
    out = {}
    for label in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == label]
        ious = np.array([v for r in rs for v in r["roi_ious"]])
        pairs_fp32 = sum(r["pairs"][0] for r in rs)
        kept = sum(round(r["pairs_kept"] * r["pairs"][0]) for r in rs if r["pairs_kept"] is not None)
        dice = np.array([r["dice"] for r in rs], float)
        cosines = [c for r in rs for c in r["embedding_cosine"]]
        out[label] = {
            "pairs": len(rs), "rois_fp32": int(ious.size),
            "rois_same": float((ious >= SAME_MASK_IOU).mean()) if ious.size else None,
            "roi_iou_mean": float(ious.mean()) if ious.size else None,
            "roi_iou_median": float(np.median(ious)) if ious.size else None,
            "roi_iou_min": float(ious.min()) if ious.size else None,
            "roi_pairs_fp32": pairs_fp32, "roi_pairs_kept": float(kept / pairs_fp32) if pairs_fp32 else None,
            "dice_fp32": float(np.nanmean(dice[:, 0])), "dice": float(np.nanmean(dice[:, 1])),
            "worst_dice_change": float(np.nanmin(dice[:, 1] - dice[:, 0])),
            "embedding_cosine_mean": float(np.mean(cosines)), "embedding_cosine_min": float(min(cosines)),
        }
    return out


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def verdict(label: str, s: dict[str, Any]) -> str:
    """Whether a variant's summary meets issue 6's bounds (set for int8), in words."""
    met_masks = s["roi_iou_mean"] is not None and s["roi_iou_mean"] >= SAME_MASK_IOU
    met_pairs = s["roi_pairs_kept"] is not None and s["roi_pairs_kept"] >= PAIRS_KEPT
    return (f"{label}: mask IoU >= {SAME_MASK_IOU} against fp32 (the mean over the fp32 ROIs of the best IoU; an ROI "
            f"that {label} does not find counts 0): {'met' if met_masks else 'NOT met'}; >= {PAIRS_KEPT:.0%} of the "
            f"fp32 pairs kept: {'met' if met_pairs else 'NOT met'}.")


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    variants = [label for label in ("int8", "bf16", "bf16x2") if label in report["summary"]]
    lines = [
        f"# {' and '.join(variants)} against fp32: masks, ROI pairs and registration Dice", "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, SIMD {' '.join(m['simd_flags'])}; Python "
        f"{m['python']}, onnxruntime {m['onnxruntime']}. Load average before/after {report['load'][0]:.2f} / "
        f"{report['load'][1]:.2f}.",
        f"Command: `{report['command']}`. Model {report['model']}, `default` preset, {report['threads']} threads; "
        f"int8: {report['int8_note']}; encoder attention: {report['int8_encoder_attention']} "
        "(only ViT encoders have the global attention that it concerns). "
        + ("bf16: the fp32 graphs with the encoder's weight products (Gemm, MatMul with a constant weight) in "
           f"bfloat16 ({report['machine']['bf16_products']}; `samreg_rt.bf16_graph`, `_ext.linear_bf16`: inputs "
           "and weights rounded to bfloat16, sums in float32), everything else float32. " if "bf16" in variants
           else "")
        + ("bf16x2: the same with each weight as hi + lo, both bfloat16 (twice the products' work; "
           "the activations still rounded to bfloat16). " if "bf16x2" in variants else "") +
        f"ROIs count as the same at mask IoU >= {SAME_MASK_IOU}; pairs as kept when both ROIs are the same and "
        "the variant pairs them together. `noise s`: the fp32 engine with Gaussian noise of s times the "
        "embedding's standard deviation added to each embedding (seeded): the loss of a perturbation of that size.",
    ]
    for label in variants:
        lines += ["", f"## {label} per pair", "",
                  f"| pair | ROIs fp32 / {label} | ROIs same | lowest ROI IoU | pairs fp32 / {label} | pairs kept "
                  f"| Dice fp32 / {label} | embedding cosine (fixed, moving) |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in report["rows"]:
            if r["variant"] != label:
                continue
            low = min(r["roi_ious"]) if r["roi_ious"] else None
            lines.append(f"| {r['pair']} | {r['rois'][0]} / {r['rois'][1]} | {_f(r['rois_kept'], 2)} | {_f(low)} | "
                         f"{r['pairs'][0]} / {r['pairs'][1]} | {_f(r['pairs_kept'], 2)} | {_f(r['dice'][0])} / "
                         f"{_f(r['dice'][1])} | {', '.join(f'{c:.5f}' for c in r['embedding_cosine'])} |")
    lines += ["", "## Summary", "",
              "| variant | pairs | fp32 ROIs | ROIs same | best ROI IoU mean / median / lowest | fp32 ROI pairs "
              "| pairs kept | mean Dice fp32 / variant | worst Dice change | embedding cosine mean / lowest |",
              "|---|---:|---:|---:|---|---:|---:|---|---:|---|"]
    for label, v in report["summary"].items():
        lines.append(f"| {label} | {v['pairs']} | {v['rois_fp32']} | {_f(v['rois_same'])} | {_f(v['roi_iou_mean'])} / "
                     f"{_f(v['roi_iou_median'])} / {_f(v['roi_iou_min'])} | {v['roi_pairs_fp32']} | "
                     f"{_f(v['roi_pairs_kept'])} | {_f(v['dice_fp32'])} / {_f(v['dice'])} | "
                     f"{_f(v['worst_dice_change'])} | {v['embedding_cosine_mean']:.5f} / "
                     f"{v['embedding_cosine_min']:.5f} |")
    lines += ["", "Issue 6's accuracy bounds:", ""] + [f"- {verdict(label, report['summary'][label])}"
                                                       for label in variants]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="litemedsam")
    ap.add_argument("--per-application", type=int, default=0, help="pairs per application (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--noise", type=float, nargs="*", default=[0.03, 0.1],
                    help="also fp32 with embedding noise of these relative sizes")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_model(args.model, Path(tmp) / args.model, precisions=("fp32", "int8"), name=args.model)
        note = read_manifest(model_dir)["precisions"]["int8"]
        fp32 = Engine.load(model_dir, threads=args.threads)
        int8 = Engine.load(model_dir, threads=args.threads, precision="int8")
        variants = {"int8": int8}
        if _ext.has_avx512_bf16():
            variants["bf16"] = Engine.load(model_dir, threads=args.threads, precision="bf16")
            variants["bf16x2"] = Engine.load(model_dir, threads=args.threads, precision="bf16x2")
        variants.update({f"noise {sigma:g}": NoisyEmbeddings(fp32, sigma) for sigma in args.noise})
        load_before = os.getloadavg()[0]
        rows = bench(labelled_pairs(args.per_application or 10 ** 6), fp32, variants)
    report = {
        "machine": machine(), "load": [load_before, os.getloadavg()[0]], "threads": args.threads,
        "command": shlex.join(["python", "benchmarks/int8_accuracy.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": args.model, "int8_note": note, "int8_encoder_attention": int8.encoder_attention,
        "rows": rows, "summary": summarise(rows),
    }
    write_report(args.out, "int8_accuracy", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
