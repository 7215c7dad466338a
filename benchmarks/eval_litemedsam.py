"""Full evaluation of samreg-rt with LiteMedSAM against identity, elastix and ANTs on ../shared/data.

Runs exactly what ``samreg-rt eval`` runs (``samreg_rt.cli.main``)
with the settings used for ``benchmarks/results/eval_litemedsam``; extra arguments are appended
(e.g. ``--pairs fire_A01``). An interrupted run resumes from the records already written.

usage: python benchmarks/eval_litemedsam.py [extra samreg-rt eval arguments]
"""
from __future__ import annotations

import sys
from pathlib import Path

from samreg_rt.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
OUT = REPO / "benchmarks" / "results" / "eval_litemedsam"
# The model's own prompting (registry: 16 x 16 box grid of 0.4 of the side, predicted IoU 0.7,
# stability 0.7); 16 prompts per decoder call keep the process near 1.5 GB (64 took about 5 GB).
SETTINGS = ["--model", "litemedsam", "--threads", "2", "--batch-size", "16"]


def main(extra: list[str]) -> int:
    argv = ["eval", str(DATA), "--out", str(OUT.relative_to(REPO)), *SETTINGS, *extra]
    sys.argv = ["samreg-rt", *argv]          # recorded as the command at the top of results.md
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
