"""Command line: ``samreg-rt models | export | embed | register | eval``."""
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
                 "pred_iou_thresh": args.pred_iou_thresh, "stability_score_thresh": args.stability_thresh,
                 "batch_size": args.batch_size}
    jobs = read_pairs_list(args.pairs) if args.pairs else [("", args.images[0], args.images[1])]
    engine = Engine.load(args.model, providers=args.provider, threads=args.threads, precision=args.precision)
    if not engine.manifest.get("source", {}).get("trained", True):
        print("WARNING: model is UNTRAINED (random weights); the correspondence is meaningless", file=sys.stderr)
    summary = register_many(jobs, engine, args.out, preset=args.preset, progress=bool(args.pairs),
                            fit_ddf=args.ddf, prompts=args.prompt, **overrides)
    print(json.dumps(summary, indent=1))
    return 0 if summary["failed"] == 0 else 1


def _prompt(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers x,y or x0,y0,x1,y1") from None
    if len(values) not in (2, 4):
        raise argparse.ArgumentTypeError(f"{text!r}: expected x,y or x0,y0,x1,y1")
    return values


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
    p.add_argument("--points-per-side", type=int, default=None)
    p.add_argument("--pred-iou-thresh", type=float, default=None)
    p.add_argument("--stability-thresh", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="prompts per decoder call")
    p.add_argument("--prompt", action="append", type=_prompt, default=None, metavar="x,y|x0,y0,x1,y1",
                   help="prompt mode: a point or box in fixed-image pixels (repeatable); its ROI and the "
                        "counterpart found in the moving image form the correspondence")
    p.add_argument("--ddf", action="store_true", help="also fit a dense field: ddf.npy + warped_moving.png")
    _engine_args(p)
    p.set_defaults(func=_cmd_register)

    from .evaluate import add_eval_parser

    add_eval_parser(sub)
    return parser


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="litemedsam", help="registry name, exported model dir, HF dir or .pth")
    p.add_argument("--provider", default="auto", help="auto | tensorrt | cuda | cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])


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
