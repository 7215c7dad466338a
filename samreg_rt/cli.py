"""Command line: ``samreg-rt models | export | embed | register | serve | eval``."""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time

import numpy as np

from .errors import SamregError


def _cmd_models(args: argparse.Namespace) -> int:
    from samreg_rt.models import REGISTRY, cache_dir

    root = cache_dir()
    for entry in REGISTRY.values():
        state = "exported" if (root / entry.name / "manifest.json").is_file() else "not exported"
        print(f"{entry.name:18s} {entry.source:32s} {state:13s} {entry.description}")
    print(f"cache: {root}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from samreg_rt.models import REGISTRY

    source = REGISTRY[args.model].source if args.model in REGISTRY else args.model
    name = args.name or (args.model if args.model in REGISTRY else None)
    cmd = [sys.executable, "-m", "samreg_export", "--model", source, "--out", args.out,
           "--precision", *args.precision]
    if name:
        cmd += ["--name", name]
    if args.calibration:
        cmd += ["--calibration", *args.calibration]
    return subprocess.call(cmd)


def _cmd_embed(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .io import load_image

    t0 = time.perf_counter()
    engine = Engine.load(args.model, providers=args.provider, threads=args.threads, precision=args.precision)
    t_load = time.perf_counter() - t0
    manifest = engine.manifest
    trained = manifest.get("source", {}).get("trained", True)
    summary = {"model": manifest.get("name"), "trained": trained, "precision": engine.precision,
               "provider": engine.provider, "load_s": round(t_load, 3), "images": []}
    embeddings = []
    for path in args.images:
        image = load_image(path)
        t = time.perf_counter()
        emb = engine.embed(image.array, name=path)
        summary["images"].append({"path": path, "shape": list(image.array.shape),
                                  "resized": list(emb.frame.resized_shape),
                                  "embedding": list(emb.embedding.shape),
                                  "encode_s": round(time.perf_counter() - t, 3)})
        embeddings.append(emb.embedding.ravel())
    if len(embeddings) == 2:
        a, b = embeddings
        summary["embedding_cosine"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    if not trained:
        print("WARNING: model is UNTRAINED (random weights); outputs are meaningless", file=sys.stderr)
    print(json.dumps(summary, indent=1))
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    from .batch import read_pairs_list, register_many
    from .engine import Engine

    if bool(args.pairs) == bool(args.images):
        raise SamregError("register: give FIXED MOVING, or --pairs LIST.csv (not both)")
    if args.images and len(args.images) != 2:
        raise SamregError(f"register: expected FIXED MOVING, got {len(args.images)} paths")
    overrides = {"prompt_kind": args.prompt_kind, "points_per_side": args.points_per_side,
                 "box_sizes": tuple(args.box_sizes) if args.box_sizes else None,
                 "pred_iou_thresh": args.pred_iou_thresh, "stability_score_thresh": args.stability_thresh,
                 "batch_size": args.batch_size, "skip_covered": args.skip_covered}
    jobs = read_pairs_list(args.pairs) if args.pairs else [("", args.images[0], args.images[1])]
    if args.ray is not None:
        return _register_ray(args, jobs, overrides)
    engine = Engine.load(args.model, providers=args.provider, threads=args.threads, precision=args.precision)
    if not engine.manifest.get("source", {}).get("trained", True):
        print("WARNING: model is UNTRAINED (random weights); the correspondence is meaningless", file=sys.stderr)
    summary = register_many(jobs, engine, args.out, preset=args.preset, progress=bool(args.pairs),
                            fit_ddf=args.ddf, prompts=args.prompt, **overrides)
    print(json.dumps(summary, indent=1))
    return 0 if summary["failed"] == 0 else 1


def _register_ray(args: argparse.Namespace, jobs: list[tuple[str, str, str]], overrides: dict) -> int:
    import ray

    from .engine import resolve_model_dir
    from .manifest import read_manifest
    from .ray_batch import connect, register_many_ray

    if not args.pairs:
        raise SamregError("register: --ray needs --pairs LIST.csv")
    # export (if needed) once here, not in every worker at once; workers resolve the same name
    if not read_manifest(resolve_model_dir(args.model)).get("source", {}).get("trained", True):
        print("WARNING: model is UNTRAINED (random weights); the correspondence is meaningless", file=sys.stderr)
    started = connect(args.ray or None, num_cpus=args.ray_cpus)
    try:
        summary = register_many_ray(jobs, args.model, args.out, workers=args.workers, threads=args.threads or 1,
                                    providers=args.provider, precision=args.precision, preset=args.preset,
                                    fit_ddf=args.ddf, prompts=args.prompt, **overrides)
    finally:
        if started:
            ray.shutdown()
    print(json.dumps(summary, indent=1))
    return 0 if summary["failed"] == 0 else 1


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .engine import Engine
    from .serve import Limits, create_app

    engine = Engine.load(args.model, providers=args.provider, threads=args.threads, precision=args.precision)
    if not engine.manifest.get("source", {}).get("trained", True):
        print("WARNING: model is UNTRAINED (random weights); the correspondence is meaningless", file=sys.stderr)
    limits = Limits(max_request_bytes=int(args.max_request_mb * 2**20), max_pixels=args.max_pixels,
                    max_queue=args.max_queue, cache_images=args.cache_images)
    uvicorn.run(create_app(engine, limits), host=args.host, port=args.port, workers=1,
                log_level="info" if args.verbose else "warning")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import run_command  # with scipy and the baselines: imported only for this command

    return run_command(args)


def _prompt(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers x,y or x0,y0,x1,y1") from None
    if len(values) not in (2, 4):
        raise argparse.ArgumentTypeError(f"{text!r}: expected x,y or x0,y0,x1,y1")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number in [0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samreg-rt", description="SAMReg registration on ONNX Runtime")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registry models and whether they are exported")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("export", help="export a checkpoint to ONNX graphs + manifest")
    p.add_argument("--model", required=True,
                   help="registry name, litemedsam, hf:<hub id>, HF SamModel dir, Meta .pth, random:<arch>")
    p.add_argument("--out", required=True)
    p.add_argument("--name", default=None)
    p.add_argument("--precision", nargs="+", default=["fp32", "fp16", "int8"], choices=["fp32", "fp16", "int8"])
    p.add_argument("--calibration", nargs="+", default=None, metavar="IMAGE",
                   help="int8: images that calibrate the weight rounding (GPTQ); default: synthetic phantoms")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("embed", help="encode images and print a summary")
    p.add_argument("images", nargs="+")
    _engine_args(p)
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("register", help="register MOVING to FIXED by ROI correspondence")
    p.add_argument("images", nargs="*", metavar="FIXED MOVING")
    p.add_argument("--pairs", default=None, help="CSV with columns fixed,moving[,id]: many pairs, one engine")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--preset", default="default", choices=["default", "reference"])
    p.add_argument("--prompt-kind", default=None, choices=["points", "boxes"])
    p.add_argument("--points-per-side", type=_positive_int, default=None)
    p.add_argument("--box-sizes", type=_fraction, nargs="+", default=None, metavar="F",
                   help="box grid: box sides as fractions of the image side (default: the model's)")
    p.add_argument("--pred-iou-thresh", type=_fraction, default=None)
    p.add_argument("--stability-thresh", type=_fraction, default=None)
    p.add_argument("--batch-size", type=_positive_int, default=None, help="prompts per decoder call")
    p.add_argument("--skip-covered", action="store_true", default=None,
                   help="fast mode: prompts coarse to fine, none inside a mask already kept (fewer ROIs and "
                        "pairs: benchmarks/results/fast_modes.md)")
    p.add_argument("--prompt", action="append", type=_prompt, default=None, metavar="x,y|x0,y0,x1,y1",
                   help="prompt mode: a point or box in fixed-image pixels (repeatable); its ROI and the "
                        "counterpart found in the moving image form the correspondence")
    p.add_argument("--ddf", action="store_true", help="also fit a dense field: ddf.npy + warped_moving.png")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="with --pairs: spread the pairs over Ray actors, one engine each; a local Ray "
                        "instance without ADDRESS, else the cluster at ADDRESS (e.g. auto, HOST:6379)")
    p.add_argument("--workers", type=int, default=None,
                   help="--ray: number of actors (default: one per GPU, else one per --threads CPUs)")
    p.add_argument("--ray-cpus", type=int, default=None, help="--ray without ADDRESS: CPUs of the local instance")
    _engine_args(p)
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("serve", help="HTTP service: POST /register with a warm engine")
    p.add_argument("--host", default="127.0.0.1", help="bind address (the service has no authentication)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-request-mb", type=float, default=32.0, help="largest request body, MiB")
    p.add_argument("--max-pixels", type=int, default=16_000_000, help="largest image, pixels")
    p.add_argument("--max-queue", type=int, default=64, help="registrations waiting at once (more get 503)")
    p.add_argument("--cache-images", type=int, default=16, help="image embeddings kept for reuse (0: none)")
    _engine_args(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("eval", help="register and score every pair of a data manifest (samreg-rt and baselines)")
    p.add_argument("manifest", metavar="MANIFEST_OR_DIR", help="manifest.json or the folder holding it")
    p.add_argument("--out", required=True, help="output directory (results.json/.csv/.md, plots)")
    p.add_argument("--pairs", nargs="+", default=None, metavar="ID", help="only these pair ids")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of identity,reference,default,elastix,ants (default: all)")
    p.add_argument("--points-per-side", type=_positive_int, default=None, help="AMG prompt grid (default: the model's)")
    p.add_argument("--box-sizes", type=_fraction, nargs="+", default=None, metavar="F",
                   help="box grid: box sides as fractions of the image side (default: the model's)")
    p.add_argument("--pred-iou-thresh", type=_fraction, default=None)
    p.add_argument("--stability-thresh", type=_fraction, default=None)
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="prompts per decoder call (memory: about 70 MB per prompt for SAM-style decoders)")
    p.add_argument("--skip-covered", action="store_true", default=None,
                   help="fast mask generation (see samreg-rt register --help)")
    p.add_argument("--baseline-max-side", type=_positive_int, default=512, help="2-D working size of elastix/ANTs (px)")
    _engine_args(p)
    p.set_defaults(func=_cmd_eval)
    return parser


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="litemedsam", help="registry name, exported model dir, HF dir or .pth")
    p.add_argument("--provider", default="auto", help="auto | tensorrt | cuda | cpu")
    p.add_argument("--threads", type=_positive_int, default=None)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "bf16", "bf16x2", "int8x3"],
                   help="bf16: the fp32 graphs with the encoder's weight products in bfloat16 (CPUs with AVX512-BF16 "
                        "or AMX); bf16x2: the same with each weight as two bfloat16 parts (closer to fp32, slower); "
                        "int8x3: inputs and weights each as two int8 parts, three int8 products (CPUs with "
                        "AVX512-VNNI; as close to fp32 as bf16x2)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SamregError as exc:
        print(f"samreg-rt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
