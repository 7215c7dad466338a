"""``export_model``: checkpoint source -> model directory (graphs of each precision + manifest.json).

Order of work: fp32 encoder/decoder (always: the other precisions derive from them), fp16, int8,
parity of every precision against the PyTorch model, and the manifest last. An existing manifest
is removed first, so the directory reads as incomplete until the new one is in place.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import cv2
import numpy as np
import onnx

from samreg_rt.errors import InputError, ModelError
from samreg_rt.manifest import MANIFEST_NAME, PRECISIONS
from samreg_rt.models import REGISTRY
from samreg_rt.spec import ModelSpec

from . import manifest as manifest_io
from . import calibration, onnx_export, parity, quantize
from .checkpoints import load_source

log = logging.getLogger(__name__)

GRAPH_FILES = {
    "fp32": {"encoder": "encoder.onnx", "decoder": "decoder.onnx",
             "decoder_tokens": "decoder_tokens.onnx", "decoder_masks": "decoder_masks.onnx"},
    "fp16": {"encoder": "encoder.fp16.onnx", "decoder": "decoder.fp16.onnx",
             "decoder_tokens": "decoder_tokens.fp16.onnx", "decoder_masks": "decoder_masks.fp16.onnx"},
    "int8": {"encoder": "encoder.int8.onnx"},  # + the fp32 decoders (quantize.CONVERTED_GRAPHS)
}
CALIBRATION_PHANTOMS = 4   # int8's default calibration images (``calibration``: GPTQ's input statistics)
WEIGHT_FILES = {"mask_upscaling": "mask_upscaling.npz", "two_way": "two_way.npz"}
EXPORTERS = {"encoder": onnx_export.export_encoder, "decoder": onnx_export.export_decoder,
             "decoder_tokens": onnx_export.export_decoder_tokens, "decoder_masks": onnx_export.export_decoder_masks}


def default_spec(name: str, source: str, arch: str, input_size: int, trained: bool) -> ModelSpec:
    """The registry's spec of ``source`` (renamed), else SAM defaults for ``arch``: box prompts and
    the single-mask output at 256 px stretch for LiteMedSAM, point grids + multimask otherwise."""
    for entry in REGISTRY.values():
        if entry.source == source:
            return dataclasses.replace(entry.spec, name=name, trained=trained)
    if arch == "litemedsam":
        return ModelSpec(name=name, arch=arch, input_size=input_size, resize="stretch", normalization="unit",
                         prompt_kind="boxes", mask_output="single", stability_score_thresh=0.80, trained=trained)
    return ModelSpec(name=name, arch=arch, input_size=input_size, trained=trained)


def default_name(source: str) -> str:
    """Registry name of ``source`` if it has one, else a file-system-safe form of the source."""
    for entry in REGISTRY.values():
        if entry.source == source:
            return entry.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).stem if source.endswith((".pth", ".pt")) else source).strip("_")


def read_parity_image(path: str | Path) -> np.ndarray:
    """Image file (PNG/JPG/TIFF, grey, RGB or RGBA) -> array HxW[xC], channels in RGB order."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(f"{path}: cannot read as an image")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return image


def calibrate(encoder: Path, spec: ModelSpec, images: list[str | Path] | None) -> calibration.Calibration:
    """int8's weight calibration: the fp32 ``encoder``'s input statistics on ``images`` (image files), by default
    on ``CALIBRATION_PHANTOMS`` synthetic phantoms."""
    if images:
        arrays, label = [read_parity_image(path) for path in images], ", ".join(str(path) for path in images)
    else:
        arrays = [parity.synthetic_image(seed=i) for i in range(CALIBRATION_PHANTOMS)]
        label = f"{CALIBRATION_PHANTOMS} synthetic phantoms (samreg_export.parity.synthetic_image, seeds 0..{CALIBRATION_PHANTOMS - 1})"
    hessians = calibration.input_hessians(encoder, [parity.model_input(image, spec) for image in arrays])
    return calibration.Calibration(hessians, label)


def export_model(
    source: str,
    out_dir: str | Path,
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8"),
    name: str | None = None,
    spec: ModelSpec | None = None,
    opset: int = onnx_export.MIN_OPSET,
    seed: int = 0,
    parity_image: str | Path | None = None,
    parity_prompts: int = parity.PROMPT_COUNT,
    calibration_images: list[str | Path] | None = None,
) -> Path:
    """Export ``source`` (see ``samreg_export.checkpoints.load_source``) into ``out_dir``.

    fp32 graphs are always written; ``precisions`` adds fp16 and/or int8. ``spec`` defaults to the
    registry's spec of the source (else ``default_spec``); its ``trained`` flag is set from the
    checkpoint. Parity is measured on ``parity_image`` (default: a synthetic phantom) with
    ``parity_prompts`` point prompts and as many box prompts. int8 rounds its weights by GPTQ, calibrated on
    ``calibration_images`` (default: ``CALIBRATION_PHANTOMS`` synthetic phantoms). Returns ``out_dir``.

    Raises ``ModelError`` when the fp32 graphs miss the parity bounds (an export bug); fp16/int8
    figures outside their bounds are logged and recorded (``within_bounds`` in the manifest).
    """
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise InputError(f"unknown precisions {sorted(unknown)}; expected some of {PRECISIONS}")
    wanted = [p for p in PRECISIONS if p == "fp32" or p in precisions]
    for path in calibration_images or ():   # fail before the minutes of tracing, not after
        read_parity_image(path)
    loaded = load_source(source, seed=seed)
    sam = loaded.model.eval()
    input_size = int(sam.prompt_encoder.input_image_size[0])
    name = name or default_name(source)
    spec = dataclasses.replace(spec, name=name, trained=loaded.trained) if spec else default_spec(
        name, source, loaded.arch, input_size, loaded.trained)
    if spec.input_size != input_size:
        raise ModelError(f"model spec input_size {spec.input_size} != the model's frame {input_size} ({source})")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)

    log.info("exporting %s (%s) to %s", source, loaded.arch, out)
    fp32 = {g: export(sam, out / GRAPH_FILES["fp32"][g], opset) for g, export in EXPORTERS.items()}
    io = {g: onnx_export.graph_io(model) for g, model in fp32.items()}
    weights = {"mask_upscaling": onnx_export.export_mask_upscaling(sam, out / WEIGHT_FILES["mask_upscaling"]),
               "two_way": onnx_export.export_two_way(sam, out / WEIGHT_FILES["two_way"])}
    written: dict[str, dict[str, list[Path]]] = {
        "fp32": {g: onnx_export.graph_files(out / f) for g, f in GRAPH_FILES["fp32"].items()}}
    calib = calibrate(out / GRAPH_FILES["fp32"]["encoder"], spec, calibration_images) if "int8" in wanted else None
    for precision in wanted[1:]:
        written[precision] = dict(written["fp32"])
        for g in quantize.CONVERTED_GRAPHS[precision]:
            written[precision][g] = quantize.convert(precision, out / GRAPH_FILES["fp32"][g], out / GRAPH_FILES[precision][g],
                                                     calib=calib)
    # fp32 and int8: the encoder cut at its global attention (samreg_rt.split_encoder), for CPUs with AVX-512
    for i, path in enumerate(onnx_export.export_encoder_parts(sam, out, opset)):
        written["fp32"][f"encoder_part{i}"] = onnx_export.graph_files(path)
        if "int8" in written:
            written["int8"][f"encoder_part{i}"] = quantize.convert("int8", path, path.with_suffix(".int8.onnx"), calib=calib)

    image_label = str(parity_image) if parity_image else "synthetic phantom (samreg_export.parity.synthetic_image, seed 0)"
    raw = read_parity_image(parity_image) if parity_image else parity.synthetic_image()
    figures = parity.measure(
        sam, {p: {g: files[0] for g, files in graphs.items()} for p, graphs in written.items()},
        parity.model_input(raw, spec), prompt_count=parity_prompts, seed=seed,
    )
    for precision, entry in figures.items():
        failures = parity.check_bounds(precision, entry)
        entry["within_bounds"] = not failures
        if failures and precision == "fp32":
            raise ModelError(f"{source}: fp32 graphs differ from PyTorch beyond the bounds: {'; '.join(failures)}")
        for failure in failures:
            log.warning("%s %s parity outside bounds: %s", name, precision, failure)

    manifest = manifest_io.build_manifest(
        name=name,
        source={"id": loaded.source_id, "sha256": loaded.source_sha256, "trained": loaded.trained, "arch": loaded.arch},
        spec=spec,
        opset=onnx_export.onnx_opset(fp32["encoder"]),
        graphs={p: {g: manifest_io.file_entry(files) for g, files in graphs.items()} for p, graphs in written.items()},
        weights={k: manifest_io.file_entry([path]) for k, path in weights.items()},
        io=io,
        operators={p: {g: sorted(onnx_export.op_types(onnx.load(str(files[0]), load_external_data=False)))
                       for g, files in graphs.items()} for p, graphs in written.items()},
        parity=figures,
        parity_setup=parity.setup_description(image_label, seed, parity_prompts),
        precision_notes={p: quantize.precision_note(p, calib) for p in written},
    )
    manifest_io.write_manifest(out, manifest)
    return out
