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

``--variants int8_per_token int8_weights_only int8_activations_only`` (not run by default; a study, not engines):
int8 products with one activation scale per token, simulated (``SimulatedInt8Product``: each row of a product's
input as uint8 with its own scale and zero point, the weights int8 per output channel rounded to nearest, the
integer sums exact in float64): what a native int8 kernel with per-token scales would give in place of ONNX
Runtime's one scale per tensor; each half of that rounding alone (which of weights and activations costs the
accuracy); and ``int8x2_per_token``, the same activations with each weight as two int8 parts (W / s = hi + lo / 256:
an int8 kernel with two passes over the weights). ``int8x3`` (CPUs with AVX512-VNNI): the engine of that precision,
the encoder's weight products from three int8 products of inputs and weights each as two int8 parts
(``_ext.linear_int8x3``).

Writes ``<name>.md`` and ``<name>.json`` (``--name``, default ``int8_accuracy``).
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
from scipy import special

from samreg_export.export import export_model
from samreg_rt import _ext
from samreg_rt.bf16_graph import Bf16Graph, WeightProduct
from samreg_rt.engine import Engine, ImageEmbedding
from samreg_rt.io import load_image
from samreg_rt.manifest import read_manifest

from common import best_ious, cosine, machine, write_report  # benchmarks/common.py (the script's folder is on sys.path)
from fast_modes import compare, labelled_pairs, run  # benchmarks/fast_modes.py

REPO = Path(__file__).resolve().parents[1]
SAME_MASK_IOU = 0.95     # issue 6: int8 mask IoU >= 0.95 against fp32
PAIRS_KEPT = 0.90        # and >= 90% of the fp32 pairs kept
VARIANTS = ("int8", "bf16", "bf16x2", "int8_per_token", "int8_weights_only", "int8_activations_only",
            "int8x2_per_token", "int8x3")


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


def unpack_split_weight(packed: np.ndarray, depth: int, width: int) -> np.ndarray:
    """The inverse of ``pack_bf16_weight(w, split=True)``: W [depth, width] as hi + lo in float64 (W to about 16
    significant bits)."""
    parts = packed.reshape(*packed.shape[:2], 2, 2, 16, 16, 2).astype(np.uint32) << 16
    hi_lo = parts.view(np.float32).astype(np.float64)       # [p, c, part, t, i, n, e]
    w = hi_lo.sum(axis=2).transpose(1, 3, 5, 0, 2, 4)        # [c, i, e, p, t, n]
    return w.reshape(w.shape[0] * 32, -1)[:depth, :width]


def per_token_int8(x: np.ndarray, w_int: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """x [M, K] float -> x @ W [M, N] float64 as int8 hardware with per-token scales gives it: each row of x as
    uint8 q = clip(round(x / s) + z, 0, 255), s = (max - min) / 255 and z = round(-min / s) over the row (its range
    widened to hold 0); W as ``w_int`` [K, N] (integers in [-127, 127]) times ``w_scale`` [N] per column. The
    integer sums are exact (float64 holds them)."""
    x = np.asarray(x, dtype=np.float64)
    low, high = np.minimum(x.min(axis=1, keepdims=True), 0), np.maximum(x.max(axis=1, keepdims=True), 0)
    scale = (high - low) / 255
    scale[scale == 0] = 1
    zero = np.round(-low / scale)
    q = np.clip(np.round(x / scale) + zero, 0, 255) - zero
    return (q @ w_int) * scale * w_scale


@dataclasses.dataclass(frozen=True)
class SimulatedInt8Product(WeightProduct):
    """A weight product of a ``Bf16Graph`` simulated with int8 weights, int8 activations with per-token scales, or
    both (``per_token_int8``); the rest in float64. ``weight``: W's integers (int8 weights: per-column scales
    ``w_scale`` = max |W| / 127, rounded to nearest) or W itself (scales 1); the GELU that the graph runs in the
    product (``activation``) in float64."""
    w_scale: np.ndarray | None = None
    activations_int8: bool = True

    @classmethod
    def from_split(cls, step: WeightProduct, weights: str, activations_int8: bool) -> "SimulatedInt8Product":
        """``weights``: "int8", "int8x2" (two int8 parts: W / s = hi + lo / 256, hi = round(W / s),
        lo = round(256 (W / s - hi)), as an int8 kernel with two passes over the weights would take them) or
        "float"."""
        w = unpack_split_weight(step.weight, step.depth, step.bias.shape[0])
        scale = np.abs(w).max(axis=0) / 127 if weights != "float" else np.ones(w.shape[1])
        scale[scale == 0] = 1
        values = {"int8": lambda v: np.round(v), "int8x2": lambda v: np.round(v) + np.round(256 * (v - np.round(v))) / 256,
                  "float": lambda v: v}[weights](w / scale)
        return cls(step.input, step.output, values, step.bias, step.depth, activation=step.activation, w_scale=scale,
                   activations_int8=activations_int8)

    def run(self, x: np.ndarray, threads: int, out: np.ndarray | None = None) -> np.ndarray:
        rows = np.asarray(x, dtype=np.float64).reshape(-1, self.depth)
        y = (per_token_int8(rows, self.weight, self.w_scale) if self.activations_int8
             else rows @ self.weight * self.w_scale) + self.bias
        if self.activation == "gelu":
            y = 0.5 * y * special.erfc(-y / np.sqrt(2))
        return y.astype(np.float32).reshape(*x.shape[:-1], self.bias.shape[0])


SIMULATED = {"int8_per_token": ("int8", True), "int8_weights_only": ("int8", False),
             "int8_activations_only": ("float", True), "int8x2_per_token": ("int8x2", True)}  # (weights, activations int8)


def simulated_engine(model_dir: Path, threads: int, label: str) -> Engine:
    """The bf16x2 engine (fp32 graphs, weight products cut out) with its encoder's products swapped for
    ``SimulatedInt8Product`` as ``SIMULATED[label]`` says: everything else as fp32 runs it (attention,
    convolutions, the decoder)."""
    engine = Engine.load(model_dir, threads=threads, precision="bf16x2", encoder_attention="fp32")
    graphs = [g for g in (engine.sessions.get("encoder"), *engine.encoder_parts) if isinstance(g, Bf16Graph)]
    if not graphs:
        raise RuntimeError(f"{model_dir}: the bf16x2 engine has no encoder graph with weight products")
    for graph in graphs:
        graph.steps = [SimulatedInt8Product.from_split(s, *SIMULATED[label]) if isinstance(s, WeightProduct) else s
                       for s in graph.steps]
    return engine


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
    variants = [label for label in VARIANTS if label in report["summary"]]
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
           "and weights rounded to bfloat16, sums in float32) and, with the engine's encoder attention "
           f"{report.get('bf16_encoder_attention', 'fp32')}, "
           + ("the windowed attention too (q, k, v and the softmax's weights rounded to bfloat16, `samreg_rt."
              "bf16_graph`'s attention steps: TinyViT's `BiasedAttentionStep`)"
              if report.get("bf16_encoder_attention") == "bf16" else "not the attention")
           + "; everything else float32. " if "bf16" in variants else "")
        + ("bf16x2: the same with each weight as hi + lo, both bfloat16 (twice the products' work; "
           "the activations still rounded to bfloat16). " if "bf16x2" in variants else "")
        + ("int8_per_token (simulated, `SimulatedInt8Product`): the encoder's weight products as int8 with one "
           "uint8 scale and zero point per token (each row of the product's input), the weights int8 per output "
           "channel rounded to nearest, the integer sums exact; everything else float32; int8_weights_only: the "
           "same weights, the activations float; int8_activations_only: the activations as int8_per_token's, the "
           "weights float; int8x2_per_token: the activations as int8_per_token's, each weight as two int8 parts "
           "(W / s = hi + lo / 256), as an int8 kernel with two passes over the weights would compute it. "
           if set(SIMULATED) & set(variants) else "")
        + ("int8x3: the fp32 graphs with the encoder's weight products from three int8 products (AVX512-VNNI; "
           "`_ext.linear_int8x3`): each row of the product's input (a symmetric scale per row) and each weight column "
           "as two int8 parts, x W = s_x s_w (hi hi + (hi lo + lo hi) / 256). " if "int8x3" in variants else "") +
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
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=["int8", "bf16", "bf16x2"],
                    help="engines to compare with fp32 (int8x3 needs AVX512-VNNI, all others but int8 AVX512-BF16)")
    ap.add_argument("--name", default="int8_accuracy", help="the report's file name, without suffix")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if not _ext.has_avx512_bf16() and set(args.variants) - {"int8", "int8x3"}:
        ap.error(f"--variants {' '.join(sorted(set(args.variants) - {'int8', 'int8x3'}))}: this CPU has no "
                 "AVX512-BF16")
    if not _ext.has_avx512_vnni() and "int8x3" in args.variants:
        ap.error("--variants int8x3: this CPU has no AVX512-VNNI")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_model(args.model, Path(tmp) / args.model, precisions=("fp32", "int8"), name=args.model)
        note = read_manifest(model_dir)["precisions"]["int8"]
        fp32 = Engine.load(model_dir, threads=args.threads)
        int8 = Engine.load(model_dir, threads=args.threads, precision="int8")
        make = {"int8": lambda: int8,
                **{p: (lambda p=p: Engine.load(model_dir, threads=args.threads, precision=p))
                   for p in ("bf16", "bf16x2", "int8x3")},
                **{label: (lambda label=label: simulated_engine(model_dir, args.threads, label))
                   for label in SIMULATED}}
        variants = {label: make[label]() for label in VARIANTS if label in args.variants}
        variants.update({f"noise {sigma:g}": NoisyEmbeddings(fp32, sigma) for sigma in args.noise})
        load_before = os.getloadavg()[0]
        rows = bench(labelled_pairs(args.per_application or 10 ** 6), fp32, variants)
    report = {
        "machine": machine(), "load": [load_before, os.getloadavg()[0]], "threads": args.threads,
        "command": shlex.join(["python", "benchmarks/int8_accuracy.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": args.model, "int8_note": note, "int8_encoder_attention": int8.encoder_attention,
        "bf16_encoder_attention": next((v.encoder_attention for label, v in variants.items()
                                        if label in ("bf16", "bf16x2", "int8x3")), None),
        "rows": rows, "summary": summarise(rows),
    }
    write_report(args.out, args.name, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
