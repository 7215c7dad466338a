"""Write a model directory's ``manifest.json`` (format: docs/contracts.md; reader and verifier:
``samreg_rt.manifest``, which this module uses to check what it wrote)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import onnxslim
import torch

import samreg_rt
from samreg_rt.manifest import FORMAT_VERSION, MANIFEST_NAME, PRECISIONS, read_manifest, sha256_file, verify_files
from samreg_rt.spec import ModelSpec


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same directory and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_entry(files: list[Path]) -> dict[str, Any]:
    """Manifest entry of a graph written by ``onnx_export.save_model``: ``{file, sha256, bytes}``,
    plus ``data`` (same keys) when the weights live in an external-data file."""
    graph, *data = files
    entry: dict[str, Any] = {"file": graph.name, "sha256": sha256_file(graph), "bytes": graph.stat().st_size}
    if data:
        entry["data"] = {"file": data[0].name, "sha256": sha256_file(data[0]), "bytes": data[0].stat().st_size}
    return entry


def exporter_versions() -> dict[str, str]:
    """Versions of the tools that made the graphs."""
    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxslim": onnxslim.__version__,
        "onnxruntime": onnxruntime.__version__,
        "samreg_rt": samreg_rt.__version__,
    }


def build_manifest(
    *,
    name: str,
    source: dict[str, Any],
    spec: ModelSpec,
    opset: int,
    graphs: dict[str, dict[str, dict[str, Any]]],
    weights: dict[str, dict[str, Any]],
    io: dict[str, dict[str, Any]],
    operators: dict[str, dict[str, list[str]]],
    parity: dict[str, Any],
    parity_setup: dict[str, Any],
    precision_notes: dict[str, str],
) -> dict[str, Any]:
    """Assemble a manifest (``FORMAT_VERSION``). ``graphs`` = {precision: {graph role: entry}} for the
    roles in ``samreg_rt.manifest.GRAPH_NAMES``, with entries from ``file_entry``; ``weights`` = {name:
    entry} for ``samreg_rt.manifest.WEIGHT_NAMES``; ``io`` = {graph
    role: graph_io};
    ``operators`` = {precision: {graph: sorted op types}}; ``parity`` = {precision: figures from
    ``parity.measure``}."""
    unknown = set(graphs) - set(PRECISIONS)
    if unknown:
        raise ValueError(f"unknown precisions {sorted(unknown)}; expected a subset of {PRECISIONS}")
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "source": source,
        "spec": spec.to_dict(),
        "opset": opset,
        "graphs": graphs,
        "weights": weights,
        "precisions": precision_notes,
        "io": io,
        "operators": operators,
        "exporter": exporter_versions(),
        "parity_setup": parity_setup,
        "parity": parity,
    }


def write_manifest(model_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``model_dir/manifest.json`` atomically, then read it back and verify every listed file
    (``samreg_rt.manifest``), so a directory with a manifest is always a complete one."""
    path = Path(model_dir) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    written = read_manifest(model_dir)
    for precision in written["graphs"]:
        verify_files(model_dir, written, precision)
    return path
