"""One image pair end to end: samreg-rt against the SAMReg reference code's structure, per stage.

    python benchmarks/pipeline.py [--pair acdc2d_example] [--points-per-side 32] [--threads 2]
        [--pred-iou-thresh 0.75] [--stability-thresh 0.1] [--mask-threshold -6]
        [--out benchmarks/results]

Same weights on both sides: a transformers ``SamModel`` saved as an HF directory whose image
encoder is the seeded random SAM ViT-B (``random:vit_b``: full size, so it costs what ViT-B
costs) and whose prompt encoder and mask decoder are LiteMedSAM's trained weights with the
single-mask slot copied into the multimask slots (tests/reference/hf_model.py, as the parity
test). samreg-rt exports that directory with its own HF loader (fp32 graphs, int8 encoder), with
the SAM defaults of an HF ViT-B (point grid, multimask outputs).

Embeddings: the untrained encoder's output makes this decoder give scattered noise masks whose
boxes span the image, so NMS leaves one mask per image (``reference_style.py`` without
``--embeddings``). Both sides therefore run the ViT-B encoder on every pass as usual and then hand
the decoder and the ROI pooling the image's LiteMedSAM embedding instead (computed beforehand
with samreg-rt's LiteMedSAM export on the squashed image, not timed, the same arrays on both
sides). Timings are those of the full structure; outputs are tens of masks, ROIs and pairs from
a trained decoder. The encoder outputs themselves are not
compared here (export parity is in each model's manifest); since the int8 variant changes only
the encoder, its outputs equal fp32's by construction and its row is a speed figure.

* reference style: ``benchmarks/reference_style.py`` in ``.venv-ref`` (transformers' own
  ``pipeline("mask-generation")``; three model loads and four encoder passes per pair, as the
  reference code), ``torch.set_num_threads(threads)``;
* samreg-rt: ``Engine.load(..., threads=threads)`` (ONNX Runtime intra-op threads) and
  ``samreg_rt.batch.register_one`` (what ``samreg-rt register`` runs: the ``reference`` preset,
  then correspondence.npz, pairs.csv, overlay.png and run.json), fp32 and int8;
* LiteMedSAM (real weights, its own spec: box grid, single-mask output, its thresholds; no
  substitution): samreg-rt only, as the transformers pipeline cannot run its TinyViT encoder.

Both ViT-B sides use the same point grid (``--points-per-side``; the reference's default is 32;
transformers' pipeline needs the point count to be a multiple of 64) and the same predicted-IoU,
stability and mask thresholds (the defaults are the parity test's, which give tens of masks from
LiteMedSAM embeddings). Outputs are compared mask by mask. Writes ``pipeline.md`` and
``pipeline.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from samreg_export.checkpoints import load_source
from samreg_rt.batch import register_one
from samreg_rt.correspondence import Correspondence
from samreg_rt.engine import Engine, ImageEmbedding
from samreg_rt.io import load_image
from samreg_rt.masks import iou_matrix, pack_masks
from samreg_rt.pipeline import PRESETS, working_image

from encoder import machine  # benchmarks/encoder.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.reference.hf_model import hf_sam_model, litemedsam_multimask, save_hf_dir  # noqa: E402

DATA = REPO.parent / "shared" / "data"
REF_PYTHON = Path(os.environ.get("SAMREG_REF_PYTHON", REPO / ".venv-ref" / "bin" / "python"))
TARGET_SPEEDUP = 5.0
TARGET_SPEEDUP_ISSUE6 = 8.0
HUGE_PAGES = "samreg-rt fp32, numpy huge pages"
REFERENCE = "reference style"
# stage of the issue's list -> (reference_style.py stages, samreg-rt stages)
STAGES = {
    "load (images, models)": (("load_images", "load_model_pipeline", "load_model_roi_0", "load_model_roi_1"),
                              ("engine_load", "other")),
    "encode": (("encode_pipeline", "encode_roi_0", "encode_roi_1"), ("encode_fixed", "encode_moving")),
    "mask generation": (("amg_pipeline",), ("amg_fixed", "amg_moving")),
    "filtering": (("filter",), ("filter_fixed", "filter_moving")),
    "embedding + matching": (("prototypes", "match"), ("embed_rois_fixed", "embed_rois_moving", "match")),
    "writing": (("write",), ("write",)),
}


def build_models(work: Path, exports: tuple[str, ...] = ("vit_b", "litemedsam"),
                 precisions: tuple[str, ...] = ("fp32", "int8")) -> dict[str, Path]:
    """The HF directory of the benchmark model, its samreg-rt export (``vit_b``: SAM defaults for an HF ViT-B:
    point grid, multimask outputs) and LiteMedSAM's export (``litemedsam``), each of ``exports`` in ``precisions``.
    The exports run as ``python -m samreg_export`` processes, as the runtime runs them, so that the exporter's peak
    memory is gone before anything is timed."""
    meta = {k: v for k, v in load_source("random:vit_b").model.state_dict().items()
            if k.startswith("image_encoder.")}
    meta.update({k: v for k, v in litemedsam_multimask(load_source("litemedsam").model.state_dict()).items()
                 if k.startswith(("prompt_encoder.", "mask_decoder."))})
    models = {"hf": save_hf_dir(hf_sam_model(meta), work / "hf")}
    del meta
    for name, source in (("vit_b", f"hf:{models['hf']}"), ("litemedsam", "litemedsam")):
        if name not in exports:
            continue
        models[name] = work / name
        subprocess.run([sys.executable, "-m", "samreg_export", "--model", source, "--out", str(models[name]),
                        "--name", name, "--precision", *precisions], check=True, capture_output=True)
    return models


def _litemedsam_prompting() -> str:
    """How the LiteMedSAM rows prompt: the registry spec."""
    from samreg_rt.models import REGISTRY

    spec = REGISTRY["litemedsam"].spec
    n = spec.points_per_side
    return (f"registry spec: box grid of {n}x{n} centres x box sizes "
            f"{list(spec.box_sizes)} of the side, {spec.mask_output}-mask output, pred_iou "
            f"{spec.pred_iou_thresh}, stability {spec.stability_score_thresh}, mask threshold {spec.mask_threshold:g}")


def _digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def litemedsam_embeddings(lite_dir: Path, paths: tuple[Path, Path], threads: int) -> dict[str, np.ndarray]:
    """LiteMedSAM embeddings (256, 64, 64) float32 of the images (fixed, moving) as the reference
    preset squashes them (200x200 RGB), keyed by the digest of the squashed array."""
    lite = Engine.load(lite_dir, providers="cpu", threads=threads)
    arrays = [working_image(load_image(p), PRESETS["reference"]) for p in paths]
    return {_digest(a): lite.embed(a).embedding for a in arrays}


def substitute_embeddings(engine: Engine, by_image: dict[str, np.ndarray]) -> None:
    """Make ``engine.embed`` run its encoder as usual, then return ``by_image[digest(image)]``."""
    embed = engine.embed

    def substituted(image: np.ndarray, name: str = "image") -> ImageEmbedding:
        return ImageEmbedding(by_image[_digest(image)], embed(image, name).frame)

    engine.embed = substituted


def run_reference(hf_dir: Path, fixed: Path, moving: Path, work: Path, embeddings: dict[str, np.ndarray],
                  args: argparse.Namespace) -> dict[str, Any]:
    """reference_style.py in the reference venv; its JSON, with the pipeline's encoder time split
    from its mask generation (``encode_pipeline`` / ``amg_pipeline``); its arrays in work/ref.npz."""
    if len(embeddings) != 2:
        raise SystemExit(f"{fixed} and {moving}: the same image after squashing; pick another pair")
    np.savez(work / "embeddings.npz", embeddings=np.stack(list(embeddings.values())))  # fixed, moving
    cmd = [str(REF_PYTHON), str(REPO / "benchmarks" / "reference_style.py"), str(hf_dir), str(fixed),
           str(moving), str(work / "ref.npz"), "--points-per-side", str(args.points_per_side),
           "--pred-iou-thresh", str(args.pred_iou_thresh), "--stability-thresh", str(args.stability_thresh),
           "--mask-threshold", str(args.mask_threshold), "--threads", str(args.threads),
           "--embeddings", str(work / "embeddings.npz")]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    wall = report["wall_s"]
    wall["encode_pipeline"] = report["encoder_s"]["pipeline"]
    wall["amg_pipeline"] = wall.pop("pipeline") - wall["encode_pipeline"]
    report["total_wall_s"] = sum(wall.values())
    report["total_cpu_s"] = sum(report["cpu_s"].values())
    report["load_average_before_after"] = [load, os.getloadavg()[0]]
    return report


def run_samreg(model_dir: Path, precision: str, fixed: Path, moving: Path, out: Path, threads: int,
               embeddings: dict[str, np.ndarray] | None = None, **amg) -> dict[str, Any]:
    """Engine.load + register_one (reference preset) timed; stage seconds from run.json, ``other``
    = the part of register_one outside register() and its timed writes (reading the images,
    drawing the overlay, run.json). ``embeddings``: see ``substitute_embeddings``."""
    load = os.getloadavg()[0]
    w, c = time.perf_counter(), time.process_time()
    engine = Engine.load(model_dir, providers="cpu", threads=threads, precision=precision)
    engine_load = time.perf_counter() - w
    if embeddings is not None:
        substitute_embeddings(engine, embeddings)
    t = time.perf_counter()
    record = register_one(str(fixed), str(moving), engine, out, preset="reference", **amg)
    end = time.perf_counter()
    wall = {**record["timings_s"], "engine_load": engine_load}
    wall["other"] = end - t - record["register_s"] - wall["write"]
    return {"wall_s": wall, "total_wall_s": end - w, "total_cpu_s": time.process_time() - c,
            "counts": record["counts"], "provider": engine.provider, "precision": precision,
            "load_average_before_after": [load, os.getloadavg()[0]]}


def run_samreg_fresh(work: Path, args: argparse.Namespace, huge_pages: bool, precision: str = "fp32") -> dict[str, Any]:
    """``run_samreg`` of the ViT-B export in ``work`` (``build_models``) at ``precision`` in a fresh process (this
    script with ``--child-run``), after the same LiteMedSAM embeddings as in the parent. ``huge_pages``: with
    ``NUMPY_MADVISE_HUGEPAGE=1``, so that numpy asks for transparent huge pages during mask generation too
    (``samreg_rt.pages.small_pages`` leaves the user's setting alone); else without the variable."""
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if huge_pages:
        env["NUMPY_MADVISE_HUGEPAGE"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-run", str(work), "--pair", args.pair,
           "--points-per-side", str(args.points_per_side), "--pred-iou-thresh", str(args.pred_iou_thresh),
           "--stability-thresh", str(args.stability_thresh), "--mask-threshold", str(args.mask_threshold),
           "--threads", str(args.threads), "--child-precision", precision]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def transparent_huge_pages() -> dict[str, str]:
    """This machine's THP settings (the bracketed choice of /sys/kernel/mm/transparent_hugepage/*)."""
    out = {}
    for name in ("enabled", "defrag"):
        path = Path("/sys/kernel/mm/transparent_hugepage") / name
        text = path.read_text() if path.is_file() else ""
        out[name] = text[text.find("[") + 1:text.find("]")] if "[" in text else "unknown"
    return out


def compare(ref: dict[str, np.ndarray], ours: dict[str, Any], corr: Correspondence) -> dict[str, Any]:
    """samreg-rt's masks, ROIs and pairs against the reference-style run's, in output order.

    identical: the same number of masks (after NMS) and of ROIs per image, each ROI with IoU >= 0.99
    against its counterpart (the parity test's criterion) and the same pairs.
    """
    out: dict[str, Any] = {"masks": [], "rois": [], "roi_min_iou": [], "rois_pixel_identical": []}
    for n, side in enumerate(("fixed", "moving")):
        theirs = ref[f"masks_{n}"][ref[f"kept_{n}"]]
        rois = getattr(corr, side).unpacked()
        out["masks"].append([ours["counts"][side]["nms"], len(ref[f"masks_{n}"])])
        out["rois"].append([len(rois), len(theirs)])
        if len(rois) == len(theirs) and len(rois):
            out["roi_min_iou"].append(float(np.diag(iou_matrix(pack_masks(rois), pack_masks(theirs))).min()))
            out["rois_pixel_identical"].append(int(sum(np.array_equal(a, b) for a, b in zip(rois, theirs))))
    out["pairs"] = [int(len(corr.pairs)), int(len(ref["pairs"]))]
    out["pairs_equal"] = bool(np.array_equal(corr.pairs, ref["pairs"]))
    out["similarity_max_abs_diff"] = (float(np.abs(corr.similarity - ref["similarity"]).max())
                                      if out["pairs_equal"] and len(ref["pairs"]) else None)
    out["identical"] = bool(all(a == b for a, b in out["masks"] + out["rois"])
                            and all(v >= 0.99 for v in out["roi_min_iou"]) and out["pairs_equal"])
    return out


def speedups(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Reference-style seconds / samreg-rt seconds, end to end (wall, process CPU) and without
    the model loads (the reference's three, samreg-rt's Engine.load)."""
    ref = runs[REFERENCE]
    ref_loads = sum(ref["wall_s"][k] for k in STAGES["load (images, models)"][0][1:])
    return {name: {"wall": ref["total_wall_s"] / r["total_wall_s"], "cpu": ref["total_cpu_s"] / r["total_cpu_s"],
                   "wall_without_loads": (ref["total_wall_s"] - ref_loads) / (r["total_wall_s"] - r["wall_s"]["engine_load"])}
            for name, r in runs.items() if name != REFERENCE}


def stage_table(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows: wall seconds per stage of the issue's list, each run a column."""
    lines = ["| stage | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]
    for stage, (ref_keys, our_keys) in STAGES.items():
        cells = [f"{sum(run['wall_s'][k] for k in (ref_keys if name == REFERENCE else our_keys)):.2f}"
                 for name, run in runs.items()]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("| **end to end** | " + " | ".join(f"**{r['total_wall_s']:.2f}**" for r in runs.values()) + " |")
    lines.append("| process CPU s | " + " | ".join(f"{r['total_cpu_s']:.2f}" for r in runs.values()) + " |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page."""
    m, runs, p = report["machine"], report["runs"], report["params"]
    ref = runs[REFERENCE]
    fp32 = report["comparison"]["samreg-rt fp32"]
    lines = [
        "# One pair end to end: samreg-rt vs the reference code's structure on transformers",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, SIMD {' '.join(m['simd_flags'])}; samreg-rt "
        f"side: Python {m['python']}, onnxruntime {m['onnxruntime']}, numpy {m['numpy']}; reference side: "
        + ", ".join(f"{k} {v}" for k, v in ref["versions"].items()) + ".",
        f"Command: `{report['command']}`.",
        "",
        f"Pair `{p['pair']}` (both images squashed to 200x200 as the reference does). Point grid "
        f"{p['points_per_side']}x{p['points_per_side']} (the reference's default is 32x32), points_per_batch 64, "
        f"pred_iou_thresh {p['pred_iou_thresh']}, stability_score_thresh {p['stability_thresh']}, "
        f"mask_threshold {p['mask_threshold']} on both ViT-B sides. {p['threads']} threads on every run "
        "(torch.set_num_threads = ONNX Runtime intra_op_num_threads). One run each, in the order of the "
        "columns (1-minute load average before/after each run below; process CPU seconds are less "
        "sensitive to other processes' load than wall seconds).",
        "",
        "Model: " + report["model"],
        "",
        "## Seconds per stage (wall)",
        "",
        *stage_table(runs),
        "",
        f"Reference style: {sum(ref['encoder_calls'].values())} encoder passes, {ref['model_loads']} model loads; "
        "its mask generation is the pipeline call minus the encoder passes inside it. samreg-rt: 2 encoder "
        "passes, 1 model load (`Engine.load`); its load row also holds the part of `register_one` outside "
        "`register()` and its timed writes (reading the two images, drawing the overlay, writing run.json); "
        "its writing row is correspondence.npz, pairs.csv and overlay.png. The reference style writes its "
        "masks, ROIs, prototypes and pairs to one .npz.",
        "",
        f"{HUGE_PAGES}: the fp32 run again, in a fresh process with `NUMPY_MADVISE_HUGEPAGE=1`, so that numpy asks "
        "for transparent huge pages during mask generation as it does by default (samreg-rt turns that off "
        "there: `samreg_rt.pages`). This machine's transparent huge pages: enabled "
        f"`{report['transparent_huge_pages']['enabled']}`, defrag `{report['transparent_huge_pages']['defrag']}`. "
        f"Outputs identical to the reference's: {'yes' if report['comparison'][HUGE_PAGES]['identical'] else 'NO'}.",
        "",
        "| run | load average before / after |",
        "|---|---|",
        *[f"| {name} | {r['load_average_before_after'][0]:.2f} / {r['load_average_before_after'][1]:.2f} |"
          for name, r in runs.items()],
        "",
        "## End to end and outputs",
        "",
        "| samreg-rt run | speed-up vs reference style (wall) | (process CPU) | without model loads (wall) |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {s['wall']:.2f}x | {s['cpu']:.2f}x | {s['wall_without_loads']:.2f}x |"
          for name, s in report["speedups"].items()],
        "",
        "Outputs of samreg-rt fp32 against the reference style (same weights, same embeddings):",
        "",
        "| | fixed | moving |",
        "|---|---|---|",
        f"| masks after NMS (samreg-rt / reference) | {fp32['masks'][0][0]} / {fp32['masks'][0][1]} "
        f"| {fp32['masks'][1][0]} / {fp32['masks'][1][1]} |",
        f"| ROIs (samreg-rt / reference) | {fp32['rois'][0][0]} / {fp32['rois'][0][1]} "
        f"| {fp32['rois'][1][0]} / {fp32['rois'][1][1]} |",
        "| lowest ROI IoU with its counterpart | " + " | ".join(f"{v:.4f}" for v in fp32["roi_min_iou"]) + " |",
        "| ROIs pixel-identical | " + " | ".join(str(v) for v in fp32["rois_pixel_identical"]) + " |",
        "",
        f"Pairs: samreg-rt {fp32['pairs'][0]}, reference {fp32['pairs'][1]}, "
        f"{'identical' if fp32['pairs_equal'] else 'DIFFERENT'}"
        + (f" (similarities within {fp32['similarity_max_abs_diff']:.1e})" if fp32["similarity_max_abs_diff"] is not None else "")
        + f". Outputs identical (same counts, every ROI IoU >= 0.99, same pairs): {'yes' if fp32['identical'] else 'NO'}.",
        "",
        f"Target (issue 4): samreg-rt fp32 >= {TARGET_SPEEDUP:.0f}x faster end to end with identical outputs: "
        + ("met." if report["target_met"] else f"NOT met ({report['speedups']['samreg-rt fp32']['wall']:.2f}x).")
        + f" Target (issue 6): >= {TARGET_SPEEDUP_ISSUE6:.0f}x, identical outputs: "
        + ("met" if report["speedups"]["samreg-rt fp32"]["wall"] >= TARGET_SPEEDUP_ISSUE6 and fp32["identical"]
           else "NOT met") + f" in wall time ({report['speedups']['samreg-rt fp32']['wall']:.2f}x), "
        + ("met" if report["speedups"]["samreg-rt fp32"]["cpu"] >= TARGET_SPEEDUP_ISSUE6 and fp32["identical"]
           else "NOT met") + f" in process CPU time ({report['speedups']['samreg-rt fp32']['cpu']:.2f}x)."
        + " The int8 rows change only the encoder, whose output is substituted (see Model), so their outputs "
        "equal fp32's by construction. The LiteMedSAM rows run another model (TinyViT encoder at 256 px, box "
        "grid, single-mask output), so their speed-up is against the ViT-B reference-style run and their "
        "outputs are not compared. Masks, ROIs and pairs of every run: pipeline.json.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", default="acdc2d_example", help="pair id in ../shared/data/manifest.json (2-D)")
    ap.add_argument("--points-per-side", type=int, default=32, help="ViT-B point grid (the reference's default 32)")
    ap.add_argument("--pred-iou-thresh", type=float, default=0.75)
    ap.add_argument("--stability-thresh", type=float, default=0.1)
    ap.add_argument("--mask-threshold", type=float, default=-6.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--child-run", type=Path, help=argparse.SUPPRESS)  # internal: run_samreg_fresh's child
    ap.add_argument("--child-precision", default="fp32", help=argparse.SUPPRESS)  # and its precision
    args = ap.parse_args(argv)
    if not REF_PYTHON.is_file():
        raise SystemExit(f"reference venv missing at {REF_PYTHON}: run `bash scripts/install.sh --with-reference`")
    if args.points_per_side ** 2 % 64:
        raise SystemExit(f"--points-per-side {args.points_per_side}: transformers' pipeline needs the point "
                         "count to be a multiple of 64 (e.g. 8, 16, 24, 32)")
    entry = next(p for p in json.loads((DATA / "manifest.json").read_text())["pairs"] if p["id"] == args.pair)
    fixed, moving = DATA / entry["fixed"], DATA / entry["moving"]
    vit_b_amg = {"points_per_side": args.points_per_side, "pred_iou_thresh": args.pred_iou_thresh,
                 "stability_score_thresh": args.stability_thresh, "mask_threshold": args.mask_threshold}
    if args.child_run:      # the child: the same steps as the parent's fp32 run (or another precision), fresh
        work = args.child_run
        embeddings = litemedsam_embeddings(work / "litemedsam", (fixed, moving), args.threads)
        print(json.dumps(run_samreg(work / "vit_b", args.child_precision, fixed, moving, work / "child run",
                                    args.threads,
                                    embeddings, **vit_b_amg)))
        return 0

    with tempfile.TemporaryDirectory(prefix="samreg_pipeline_bench_") as tmp:
        work = Path(tmp)
        models = build_models(work)
        embeddings = litemedsam_embeddings(models["litemedsam"], (fixed, moving), args.threads)
        runs = {REFERENCE: run_reference(models["hf"], fixed, moving, work, embeddings, args)}
        ref = dict(np.load(work / "ref.npz"))
        comparison = {}
        for precision in ("fp32", "int8"):
            name = f"samreg-rt {precision}"
            runs[name] = run_samreg(models["vit_b"], precision, fixed, moving, work / name, args.threads,
                                    embeddings, **vit_b_amg)
            comparison[name] = compare(ref, runs[name], Correspondence.load(work / name / "correspondence.npz"))
            if precision == "fp32":
                runs[HUGE_PAGES] = run_samreg_fresh(work, args, huge_pages=True)
                comparison[HUGE_PAGES] = compare(ref, runs[HUGE_PAGES],
                                                 Correspondence.load(work / "child run" / "correspondence.npz"))
        for precision in ("fp32", "int8"):
            name = f"samreg-rt LiteMedSAM {precision}"
            runs[name] = run_samreg(models["litemedsam"], precision, fixed, moving, work / name, args.threads)

    report = {
        "machine": machine(),
        "command": shlex.join(["python", "benchmarks/pipeline.py", *(argv if argv is not None else sys.argv[1:])]),
        "params": {"pair": args.pair, "points_per_side": args.points_per_side, "threads": args.threads,
                   "pred_iou_thresh": args.pred_iou_thresh, "stability_thresh": args.stability_thresh,
                   "mask_threshold": args.mask_threshold},
        "model": ("HF SamModel = random:vit_b image encoder (seed 0, untrained, full size) + LiteMedSAM's trained "
                  "prompt encoder and mask decoder, single-mask slot copied into the three multimask slots "
                  "(tests/reference/hf_model.py); samreg-rt runs its own export of that directory. Every encoder "
                  "pass runs ViT-B on both sides; its output is then replaced by the image's LiteMedSAM embedding "
                  "(computed beforehand, untimed, the same arrays on both sides), because this decoder on the "
                  "untrained encoder's output gives one noise mask per image. The LiteMedSAM rows run the real "
                  f"LiteMedSAM without substitution ({_litemedsam_prompting()})."),
        "runs": runs,
        "comparison": comparison,
        "speedups": speedups(runs),
        "target_speedup": TARGET_SPEEDUP,
        "transparent_huge_pages": transparent_huge_pages(),
    }
    report["target_met"] = bool(report["speedups"]["samreg-rt fp32"]["wall"] >= TARGET_SPEEDUP
                                and comparison["samreg-rt fp32"]["identical"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / "pipeline.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
