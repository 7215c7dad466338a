"""Read and verify a model directory's ``manifest.json`` (format in docs/contracts.md).

Torch-free: only json and hashlib. The exporter (``samreg_export.manifest``) writes manifests with
the same constants; the engine calls ``read_manifest`` then ``verify_files`` before it opens a graph.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from samreg_rt.errors import ManifestError

# 2: the decoder also split at the mask upscaling; 3: + the upscaling weights (weights.mask_upscaling);
# 4: + the two-way transformer's weights (weights.two_way); 5: + a ViT encoder's parts around its global
# attention (graphs.fp32.encoder_part<i>). Version 4 is still read (a ViT's encoder then runs as one graph);
# the model cache re-exports anything older than FORMAT_VERSION.
FORMAT_VERSION = 5
OLDEST_READ_VERSION = 4
MANIFEST_NAME = "manifest.json"
GRAPH_NAMES = ("encoder", "decoder", "decoder_tokens", "decoder_masks")
WEIGHT_NAMES = ("mask_upscaling", "two_way")  # precision-independent float32 arrays for CPU kernels
PRECISIONS = ("fp32", "fp16", "int8")
_REQUIRED_KEYS = ("name", "source", "spec", "opset", "graphs", "weights", "io")
_FILE_KEYS = ("file", "sha256", "bytes")


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """Load ``model_dir/manifest.json`` and check its structure.

    Raises ``ManifestError`` naming the manifest when it is missing, is not valid JSON, comes from a
    format version this runtime does not read (newer than ``FORMAT_VERSION``, older than
    ``OLDEST_READ_VERSION``, or not a positive integer), lacks a required
    key, or lists a graph entry without file/sha256/bytes.
    """
    path = Path(model_dir) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest missing (export the model into this directory)") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read manifest: {e}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: malformed JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{path}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format_version {version} is newer than the supported version {FORMAT_VERSION}; "
            "upgrade samreg-rt or re-export the model"
        )
    if version < OLDEST_READ_VERSION:
        raise ManifestError(
            f"{path}: format_version {version} is older than {OLDEST_READ_VERSION} (no weights for the CPU kernels); "
            "re-export the model (`samreg-rt export`)"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ManifestError(f"{path}: missing keys {missing}")
    graphs = manifest["graphs"]
    if not isinstance(graphs, dict) or not graphs:
        raise ManifestError(f"{path}: 'graphs' must be a non-empty object of precisions")
    for precision, entries in graphs.items():
        for graph in GRAPH_NAMES:
            entry = entries.get(graph) if isinstance(entries, dict) else None
            _check_entry(path, f"graphs.{precision}.{graph}", entry)
            if entry is not None and "data" in entry:
                _check_entry(path, f"graphs.{precision}.{graph}.data", entry["data"])
        for part in encoder_part_names(entries):   # optional (ViT encoders)
            _check_entry(path, f"graphs.{precision}.{part}", entries[part])
    weights = manifest["weights"]
    for name in WEIGHT_NAMES:
        _check_entry(path, f"weights.{name}", weights.get(name) if isinstance(weights, dict) else None)
    return manifest


def encoder_part_names(entries: Any) -> list[str]:
    """The roles ``encoder_part0``, ``encoder_part1``, ... present in one precision's graph entries, in order
    (the first gap ends them): a ViT encoder cut at its global attention (``samreg_rt.split_encoder``)."""
    names: list[str] = []
    while isinstance(entries, dict) and f"encoder_part{len(names)}" in entries:
        names.append(f"encoder_part{len(names)}")
    return names


def _check_entry(path: Path, where: str, entry: Any) -> None:
    if not isinstance(entry, dict) or any(k not in entry for k in _FILE_KEYS):
        raise ManifestError(f"{path}: {where} must be an object with keys {list(_FILE_KEYS)}")
    name = entry["file"]
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ManifestError(f"{path}: {where}.file {name!r} must be a plain file name in the model directory")


def graph_files(model_dir: str | Path, manifest: dict[str, Any], precision: str) -> dict[str, Path]:
    """Paths of the graphs (``GRAPH_NAMES``) of ``precision``; ``ManifestError`` if the manifest has
    no such precision."""
    graphs = manifest["graphs"]
    if precision not in graphs:
        raise ManifestError(
            f"{Path(model_dir) / MANIFEST_NAME}: no {precision!r} graphs; available: {sorted(graphs)}"
        )
    return {g: Path(model_dir) / graphs[precision][g]["file"] for g in GRAPH_NAMES}


def verify_files(model_dir: str | Path, manifest: dict[str, Any], precision: str) -> None:
    """Check that the graph files of ``precision`` (and their external-data files, if
    any, and the encoder parts, if any) and the weight files exist with the size and sha256 the manifest lists. Raises
    ``ManifestError`` naming the file."""
    graph_files(model_dir, manifest, precision)
    for graph in GRAPH_NAMES:
        entry = manifest["graphs"][precision][graph]
        for item in (entry, entry.get("data")):
            if item is not None:
                _verify_file(Path(model_dir) / item["file"], item)
    for part in encoder_part_names(manifest["graphs"][precision]):
        _verify_file(Path(model_dir) / manifest["graphs"][precision][part]["file"], manifest["graphs"][precision][part])
    for name in WEIGHT_NAMES:
        _verify_file(Path(model_dir) / manifest["weights"][name]["file"], manifest["weights"][name])


def _verify_file(path: Path, entry: dict[str, Any]) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ManifestError(f"{path}: file listed in {MANIFEST_NAME} is missing") from None
    if size != entry["bytes"]:
        raise ManifestError(
            f"{path}: size {size} bytes, {MANIFEST_NAME} says {entry['bytes']} (truncated or replaced file)"
        )
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ManifestError(
            f"{path}: sha256 {digest} does not match {MANIFEST_NAME} ({entry['sha256']}): file corrupted or modified"
        )
