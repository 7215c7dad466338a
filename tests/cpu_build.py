"""Running code in a fresh interpreter whose kernels are capped at a build (SAMREG_RT_CPU_BUILD)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_capped(cap: str, code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c code`` from the repository root with SAMREG_RT_CPU_BUILD=cap (read when _ext loads)."""
    env = {**os.environ, "SAMREG_RT_CPU_BUILD": cap}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[1])
