"""``python -m samreg_export --model SOURCE --out DIR``: the exporter as its own process.

The runtime calls this in a subprocess to export a model on first use, so that the runtime
process never imports torch.
"""
from __future__ import annotations

import argparse
import sys

from samreg_rt.errors import SamregError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samreg_export", description=__doc__)
    parser.add_argument("--model", required=True,
                        help="litemedsam | hf:<hub id> | HF SamModel dir | Meta .pth | random:<arch>")
    parser.add_argument("--out", required=True, help="output directory (graphs + manifest.json)")
    parser.add_argument("--name", default=None, help="model name recorded in the manifest")
    parser.add_argument("--precision", nargs="+", default=["fp32", "fp16", "int8"],
                        choices=["fp32", "fp16", "int8"])
    parser.add_argument("--calibration", nargs="+", default=None, metavar="IMAGE",
                        help="int8: images whose encoder inputs calibrate the weight rounding (GPTQ); "
                             "default: synthetic phantoms")
    args = parser.parse_args(argv)
    from .export import export_model

    try:
        out = export_model(args.model, args.out, precisions=tuple(args.precision), name=args.name,
                           calibration_images=args.calibration)
    except SamregError as exc:
        print(f"samreg-rt export: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
