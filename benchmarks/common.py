"""Shared helpers of the benchmark scripts: the machine's description, the labelled 2-D images of
../shared/data."""
from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from samreg_rt.io import load_image


def machine() -> dict[str, Any]:
    """CPU model, logical CPUs, SIMD flags of interest, Python / ONNX Runtime / numpy versions."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    simd = sorted(f for f in (flags.group(1).split() if flags else []) if re.match(r"(avx|fma|f16c|amx)", f))
    return {
        "cpu": model.group(1).strip() if model else platform.processor(),
        "logical_cpus": os.cpu_count(),
        "simd_flags": simd,
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }


def labelled_images(data: Path, per_application: int | None) -> list[tuple[str, Path, Path]]:
    """(name, image, label) of the labelled 2-D pairs, at most ``per_application`` pairs each."""
    manifest = json.loads((data / "manifest.json").read_text())
    out, taken = [], {}
    for pair in manifest["pairs"]:
        if pair["dim"] != 2 or not pair["fixed_label"]:
            continue
        taken[pair["application"]] = taken.get(pair["application"], 0) + 1
        if per_application and taken[pair["application"]] > per_application:
            continue
        for side in ("fixed", "moving"):
            out.append((f"{pair['id']}/{side}", data / pair[side], data / pair[f"{side}_label"]))
    return out


def structures(label_path: Path, shape: tuple[int, int]) -> list[np.ndarray]:
    """Binary masks of each labelled structure (each class value; 0/255 and grey renders >= 128)."""
    lab = load_image(label_path).array
    lab = lab[..., 0] if lab.ndim == 3 else lab
    lab = cv2.resize(lab, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    values = [v for v in np.unique(lab) if v != 0]
    if len(values) > 4:  # a rendered label with grey edges: binarise at 128
        return [lab >= 128]
    return [lab == v for v in values]
