"""ONNX Runtime engine: verified graphs, one session per graph, ``embed`` and ``decode``."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import onnxruntime as ort

from . import _ext
from .cpus import usable_cpus
from .errors import InputError, ManifestError, ModelError, ModelNotAvailableError
from .io import validate_image
from .manifest import encoder_part_names, read_manifest
from .preprocess import Frame, to_model_input
from .spec import ModelSpec
from .split_encoder import PART_INPUTS, PART_OUTPUTS, run_encoder_parts
from .two_way import MAX_TOKENS, ImageTokenFactors, SharedImage, TwoWayWeights, decode_tokens as fused_decode_tokens
from .two_way import shared_image
from .upscaling import UpscalingWeights, upscale_kept, upscale_kept_factored

if TYPE_CHECKING:  # imported where used: onnx takes about a second to import, and only bf16 engines need it
    from .bf16_graph import Bf16Graph

log = logging.getLogger("samreg_rt")

PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROMPT_INPUTS = ("image_embeddings", "point_coords", "point_labels")
# run-time precisions of the fp32 export, the encoder's weight products native (samreg_rt.bf16_graph): the CPU
# feature each needs and the _ext function that tells whether this CPU has it
NATIVE_PRECISIONS = {"bf16": ("AVX512-BF16", "has_avx512_bf16"), "bf16x2": ("AVX512-BF16", "has_avx512_bf16"),
                     "int8x3": ("AVX512-VNNI", "has_avx512_vnni")}
GRAPH_IO = {  # role -> (inputs, outputs), as docs/contracts.md
    "encoder": (("image",), ("image_embeddings",)),
    "decoder": (PROMPT_INPUTS, ("iou_predictions", "low_res_masks")),
    "decoder_tokens": (PROMPT_INPUTS, ("iou_predictions", "hyper_in", "image_tokens")),
    "decoder_masks": (("image_tokens", "hyper_in"), ("low_res_masks",)),
}


# the ONNX Runtime device of the decoders' outputs that stay where they are made (DeviceTokens), by provider
TOKEN_DEVICES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}


@dataclasses.dataclass(frozen=True)
class DeviceTokens:
    """The image tokens (B, hw, C) float32 of a ``decode_tokens`` call left where the decoder graphs run: an ONNX
    Runtime ``OrtValue`` in the decoders' device memory (a GPU's, with the CUDA or TensorRT provider), which
    ``decode_kept_masks`` binds as ``decoder_masks``' input instead of their being copied to the host and back
    (4 MB a prompt of a 64x64 embedding each way)."""
    value: ort.OrtValue

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape())


@dataclasses.dataclass(frozen=True)
class ImageEmbedding:
    """Encoder output for one image: embedding (C, 64, 64) float32 and the image's frame."""

    embedding: np.ndarray
    frame: Frame


def select_providers(requested: str | Sequence[str] = "auto") -> list[str]:
    """Execution providers to use, best first.

    ``auto`` takes TensorRT > CUDA > CPU from what this ONNX Runtime build offers; otherwise a
    name (``tensorrt``, ``cuda``, ``cpu`` or ORT's own provider names) or a list of them, each of
    which must be available (``ModelError`` otherwise). TensorRT is followed by CUDA where this build has it (the
    nodes TensorRT does not take then run on the GPU too, not on the CPU), and CPU is always appended as the
    fallback.
    """
    available = ort.get_available_providers()
    if requested == "auto":
        chosen = [p for p in PROVIDER_PREFERENCE if p in available]
    else:
        names = [requested] if isinstance(requested, str) else list(requested)
        chosen = []
        for name in names:
            full = PROVIDER_ALIASES.get(name.lower(), name)
            if full not in available:
                raise ModelError(
                    f"execution provider {name!r} is not available in this onnxruntime build "
                    f"(available: {', '.join(available)})"
                )
            chosen.append(full)
    tensorrt, cuda = "TensorrtExecutionProvider", "CUDAExecutionProvider"
    if tensorrt in chosen and cuda in available and cuda not in chosen:
        chosen.insert(chosen.index(tensorrt) + 1, cuda)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A registry name, an exported model directory, an HF ``SamModel`` directory or a Meta
    ``.pth`` -> the directory holding manifest.json and the graphs.

    Names and checkpoints not yet exported are exported into the cache on first use, in a
    separate process (the runtime never imports torch); without the export extra this raises
    ``ModelNotAvailableError`` saying how to install it.
    """
    from samreg_rt.models import REGISTRY, cache_dir

    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "manifest.json").is_file():
        return path
    if text in REGISTRY:
        target = cache_dir() / text
        if (target / "manifest.json").is_file() and not _older_format(target):
            return target
        return _export(REGISTRY[text].source, target, name=text)
    if path.is_dir() and (path / "config.json").is_file() or path.is_file() and path.suffix in (".pth", ".pt"):
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        target = cache_dir() / f"local-{path.stem}-{digest}"
        if (target / "manifest.json").is_file() and not _older_format(target):
            return target
        source = f"hf:{path}" if path.is_dir() else str(path)
        return _export(source, target, name=path.stem)
    if path.exists():
        raise ModelError(
            f"{path}: not a model: expected an exported model directory (with manifest.json), an HF "
            "SamModel directory (with config.json) or a Meta .pth / MobileSAM .pt checkpoint"
        )
    raise ModelNotAvailableError(
        f"unknown model {text!r}: not a registry name ({', '.join(sorted(REGISTRY))}) and no such path"
    )


def _older_format(model_dir: Path) -> bool:
    """True when a cached export's manifest predates this runtime's format (it is re-exported)."""
    from .manifest import FORMAT_VERSION

    try:
        version = json.loads((model_dir / "manifest.json").read_text()).get("format_version")
    except (OSError, ValueError, AttributeError):
        return False                     # unreadable: read_manifest reports it
    return isinstance(version, int) and version < FORMAT_VERSION


def _registry_spec(model: str | os.PathLike, spec: ModelSpec, model_dir: Path) -> ModelSpec:
    """The registry's spec when ``resolve_model_dir`` took ``model`` as a registry name, else ``spec``."""
    from samreg_rt.models import REGISTRY

    entry = REGISTRY.get(str(model))
    if entry is None or (Path(str(model)).expanduser() / "manifest.json").is_file():
        return spec
    fixed_by_graphs = ("arch", "input_size", "embedding_size")
    if any(getattr(entry.spec, k) != getattr(spec, k) for k in fixed_by_graphs):
        raise ManifestError(f"{model_dir / 'manifest.json'}: the export's {fixed_by_graphs} differ from "
                            f"the registry's for {entry.name!r}; delete {model_dir} to re-export it")
    return dataclasses.replace(entry.spec, name=spec.name)


def _export(source: str, target: Path, name: str) -> Path:
    try:
        import importlib.util

        has_export = importlib.util.find_spec("torch") is not None
    except ValueError:
        has_export = False
    if not has_export:
        raise ModelNotAvailableError(
            f"model {name!r} is not exported yet (looked in {target}) and the export extra is not "
            "installed: run `pip install -e .[export]` (see README) or pass --model DIR of an "
            "exported model"
        )
    log.info("exporting %s to %s (first use)", source, target)
    cmd = [sys.executable, "-m", "samreg_export", "--model", source, "--out", str(target), "--name", name]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ModelNotAvailableError(f"exporting {source!r} failed: {tail[0]}")
    return target


class Engine:
    """Loaded sessions of one exported model: one per graph role of ``GRAPH_IO``, except that a ViT
    encoder may run as ``encoder_parts`` instead (see ``Engine.load``'s ``fused_encoder``).

    Create with ``Engine.load``. ``embed`` runs the encoder once per image; ``decode`` runs the
    whole decoder on batches of prompts against one embedding; ``decode_tokens`` and
    ``decode_masks`` run it in two steps, so that masks are upscaled only for the prompts kept;
    ``decode_kept_masks`` upscales only the kept masks. On CPUs with AVX-512 or AVX2 two steps run fused
    CPU kernels instead of graphs: ``decode_tokens`` when ``two_way`` (its weights) is set, the mask
    upscaling when ``mask_upscaling`` is. ``threads``: the thread limit of those kernels and of the ones mask generation
    runs after them (``Engine.load`` sets it; 0: as many as the CPUs this process may run on). ``token_device``:
    the ONNX Runtime device ("cuda", "cpu") in whose memory ``decode_tokens`` leaves the graph's image tokens
    (``DeviceTokens``), or None: they come back to the host as arrays (``Engine.load``'s ``device_tokens``).
    """

    def __init__(self, model_dir: Path, manifest: dict, spec: ModelSpec, precision: str,
                 sessions: dict[str, ort.InferenceSession], providers: list[str],
                 mask_upscaling: UpscalingWeights | None = None, two_way: TwoWayWeights | None = None,
                 threads: int = 0, encoder_parts: list[ort.InferenceSession] | None = None,
                 encoder_attention: str = "fp32", token_device: str | None = None):
        self.model_dir = model_dir
        self.manifest = manifest
        self.manifest_sha256 = hashlib.sha256((model_dir / "manifest.json").read_bytes()).hexdigest()
        self.spec = spec
        self.precision = precision
        self.sessions = sessions
        self.providers = providers
        self.mask_upscaling = mask_upscaling
        self.two_way = two_way
        self.threads = threads
        self.encoder_parts = encoder_parts or []
        self.encoder_attention = encoder_attention
        self.token_device = token_device
        self._buffers = threading.local()     # each thread's last factors_buffer

    @classmethod
    def load(cls, model: str | os.PathLike, providers: str | Sequence[str] = "auto",
             threads: int | None = None, precision: str = "fp32", fused_upscaling: bool = True,
             fused_tokens: bool = True, fused_encoder: bool = True, shared_arena: bool = True,
             encoder_attention: str = "auto", device_tokens: bool | None = None) -> "Engine":
        """Load and verify a model (see ``resolve_model_dir``) and create its sessions.

        Every graph file is hashed and checked against the manifest before a session is built
        from those same bytes (``ManifestError`` names the file on mismatch).
        ``precision``: the export's "fp32", "fp16" or "int8" graphs; or the fp32 graphs with the encoder's weight
        products native on the CPU (``NATIVE_PRECISIONS``, ModelError on a CPU without the feature): "bf16" and
        "bf16x2" (bfloat16, each weight as one or two parts) or "int8x3" (x and each weight as two int8 parts,
        three int8 products: ``_ext.linear_int8x3``).
        ``threads``: ONNX Runtime's intra-op threads and the fused CPU kernels' thread limit (None: the CPUs
        this process may use, ``cpus.usable_cpus``: its affinity mask, at most its cgroup's CPU quota).
        ``fused_upscaling``: upscale kept masks with the fused kernel (``samreg_rt.upscaling``) when the
        decoders run on the CPU provider (not fp16) of a CPU with AVX-512 or AVX2 and FMA
        (``_ext.mask_upscaling_isa``; elsewhere ``decoder_masks`` is faster); False always runs the graph.
        ``fused_tokens``: the same for ``decode_tokens`` (``samreg_rt.two_way`` instead of
        ``decoder_tokens``).
        ``fused_encoder``: the same for a ViT encoder's global attention: the encoder runs as the graphs
        ``encoder_part<i>`` around ``_ext.shared_attention`` (``samreg_rt.split_encoder``) when the export
        has them for the precision (fp32 and int8 ViT exports since they exist: re-export older ones).
        ``encoder_attention``: the precision of those attention cores: "fp32", "bf16"
        (``_ext.shared_attention_bf16``: AMX tiles, or AVX512-BF16's VDPBF16PS on CPUs without them; ModelError on
        a CPU with neither, ``_ext.has_avx512_bf16``) or "auto": bf16 for int8 and the native precisions on CPUs with
        AVX512-BF16 (ViT-B int8: embedding cosine to fp32 0.99967 with either core,
        benchmarks/results/performance.md), fp32 otherwise: fp32 engines keep their float32 results.
        With "bf16" the native-precision engines run the windowed blocks' attention in bfloat16 as well, straight
        from the qkv product (SAM ViT: ``samreg_rt.bf16_graph.find_window_attention``, else the cores alone,
        ``find_attention``; TinyViT, LiteMedSAM's encoder: ``find_biased_attention``); with "fp32" ONNX Runtime
        runs them in float32.
        ``shared_arena``: the sessions allocate from one CPU memory arena registered in ONNX Runtime's
        process-wide environment (and shared with the other engines of the process that use it) instead of
        one arena each (benchmarks/results/memory_arena.md).
        A provider asked for by name that ONNX Runtime cannot create (it would run the graph on the CPU instead)
        is a ``ModelError``; with "auto" it is logged and the next one runs.
        ``device_tokens``: ``decode_tokens`` on the ``decoder_tokens`` graph leaves the image tokens where the graph
        ran (``DeviceTokens``, by ONNX Runtime's IO binding) for ``decode_kept_masks`` to bind as ``decoder_masks``'
        input, instead of copying them to the host and back; None (default): where the decoders run on the CUDA or
        TensorRT provider. True on the CPU provider binds them in host memory (the same path; for tests).
        The spec (preprocessing, prompting defaults) is the manifest's, except for a registry name,
        whose spec is the registry's: a cached export keeps up with changed defaults.
        """
        model_dir = resolve_model_dir(model)
        manifest = read_manifest(model_dir)
        graphs = manifest.get("graphs", {})
        # bf16 (and bf16x2, its weights as two bfloat16 parts; int8x3, three int8 products of two-part inputs) runs
        # the fp32 graphs, the encoder's weight products native (samreg_rt.bf16_graph)
        files = "fp32" if precision in NATIVE_PRECISIONS else precision
        if files not in graphs:
            raise ModelError(
                f"{model_dir / 'manifest.json'}: no {files!r} graphs (has {', '.join(sorted(graphs))})"
                + (f" (precision {precision!r} runs the fp32 graphs)" if precision in NATIVE_PRECISIONS else "")
            )
        try:
            spec = ModelSpec.from_dict(manifest["spec"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{model_dir / 'manifest.json'}: invalid model spec ({exc})") from None
        spec = _registry_spec(model, spec, model_dir)
        chosen = select_providers(providers)
        if precision in NATIVE_PRECISIONS:
            feature, has_feature = NATIVE_PRECISIONS[precision]
            if not getattr(_ext, has_feature)():
                raise ModelError(f"precision {precision!r} needs {feature}, which this CPU does not have "
                                 f"(_ext.{has_feature}() is False); use 'fp32' or 'int8'")
            if chosen[0] != "CPUExecutionProvider":
                raise ModelError(f"precision {precision!r} runs on the CPU ({feature}), not on {chosen[0]}: "
                                 "pass providers='cpu', or use 'fp16' on a GPU")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                    or threads < 1):
            raise InputError(f"threads: expected a positive integer or None, got {threads!r}")
        threads = usable_cpus() if threads is None else int(threads)
        if encoder_attention not in ("auto", "fp32", "bf16"):
            raise InputError(f"encoder_attention: expected 'auto', 'fp32' or 'bf16', got {encoder_attention!r}")
        if encoder_attention == "bf16" and not _ext.has_avx512_bf16():
            raise ModelError("encoder_attention 'bf16' needs AVX512-BF16 (or AMX tiles), which this CPU does not "
                             "have (_ext.has_avx512_bf16() is False); use 'fp32' or 'auto'")
        if encoder_attention == "auto":
            encoder_attention = ("bf16" if precision in ("int8", *NATIVE_PRECISIONS) and _ext.has_avx512_bf16()
                                 else "fp32")
        if shared_arena:
            _register_shared_cpu_arena()
        options = _session_options(threads, shared_arena, spinning=True)
        # ONNX Runtime's threads spin for a while after a run; between the encoder parts the native attention
        # kernel then shares the CPUs with them (ViT-B int8: 0.28 against 0.23 s of attention per image)
        part_options = _session_options(threads, shared_arena, spinning=False)
        # every graph listed must be there (a broken model directory fails here, not when a graph is first
        # needed); those that run are hashed when read
        for role, entry in graphs[files].items():
            path = model_dir / entry["file"]
            if not path.is_file() or path.stat().st_size != entry.get("bytes"):
                raise ManifestError(f"{path}: {role} graph listed in the manifest is missing or has another size")
        # A thread reads and hashes the graphs in the order they are loaded, so that the next one is hashed
        # while ONNX Runtime builds a session from the last one's verified bytes.
        reader = ThreadPoolExecutor(max_workers=1)
        reads: dict[str, Future] = {}

        def read(roles: list[str]) -> None:
            for role in roles:
                entry = graphs[files].get(role)
                if entry is None:
                    raise ManifestError(f"{model_dir / 'manifest.json'}: no {role} graph for {files}")
                reads[role] = reader.submit(_read_verified, model_dir / entry["file"], entry)

        def load_graph(role: str, inputs: tuple[str, ...], outputs: tuple[str, ...],
                       role_options: ort.SessionOptions = options) -> ort.InferenceSession:
            path = model_dir / graphs[files][role]["file"]
            if precision in NATIVE_PRECISIONS and role.startswith("encoder"):
                # its pieces alternate with native products: no spinning threads (part_options)
                return _bf16_graph(path, reads[role].result(), part_options, chosen, inputs, outputs, threads,
                                   weights=precision, attention=encoder_attention == "bf16")
            return _session(path, reads[role].result(), role_options, chosen, inputs, outputs, model_dir, precision)

        try:
            # the decoders first: whether they run on the CPU decides the fused kernels, and so which encoder
            read([role for role in GRAPH_IO if role != "encoder"])
            sessions = {role: load_graph(role, *io) for role, io in GRAPH_IO.items() if role != "encoder"}
            upscaling = two_way = None
            encoder_parts: list[ort.InferenceSession] = []
            # the fused kernels' build on this CPU, where the decoders run on it
            isa = (_ext.mask_upscaling_isa() if precision != "fp16"
                   and sessions["decoder_masks"].get_providers()[0] == "CPUExecutionProvider" else "generic")
            if fused_upscaling and isa != "generic":
                upscaling = UpscalingWeights.from_bytes(*_read_weights(model_dir, manifest, "mask_upscaling"))
            if fused_tokens and isa != "generic":
                two_way = TwoWayWeights.from_bytes(*_read_weights(model_dir, manifest, "two_way"))
            if isa == "avx512":
                roles = encoder_part_names(graphs[files]) if fused_encoder else []
                read(roles)
                # the first part takes the image, the last ends with the embedding
                encoder_parts = [load_graph(role, PART_INPUTS[min(i, 1)], PART_OUTPUTS[int(i == len(roles) - 1)],
                                            part_options)
                                 for i, role in enumerate(roles)]
            if not encoder_parts:
                read(["encoder"])
                sessions["encoder"] = load_graph("encoder", *GRAPH_IO["encoder"])
        finally:
            reader.shutdown(cancel_futures=True)        # after an error: no read left behind
        # ONNX Runtime runs a graph on the CPU when it cannot create a provider asked for (its libraries missing, or
        # for another CUDA): a provider asked for by name must be there; "auto" takes what is and logs the rest
        for role, session in [*sessions.items(), *(("first encoder part", part) for part in encoder_parts[:1])]:
            got = session.get_providers()
            lost = [name for name in chosen if name not in got]
            if lost and providers != "auto":
                raise ModelError(f"{model_dir}: ONNX Runtime could not create {lost[0]} for the {role} graph (it would "
                                 f"run on {got[0]}): its libraries are missing or do not match this onnxruntime build "
                                 "(ONNX Runtime's log names them)")
            if lost:
                log.warning("%s: ONNX Runtime could not create %s for the %s graph; it runs on %s", model_dir,
                            ", ".join(lost), role, got[0])
        decoder_provider = sessions["decoder_tokens"].get_providers()[0]
        if device_tokens is None:
            device_tokens = decoder_provider != "CPUExecutionProvider"
        if device_tokens and decoder_provider not in TOKEN_DEVICES:
            raise ModelError(f"device_tokens: the decoders run on {decoder_provider}, whose device memory this engine "
                             f"does not bind (it binds that of {', '.join(TOKEN_DEVICES)}); pass device_tokens=False")
        token_device = TOKEN_DEVICES[decoder_provider] if device_tokens else None
        providers_used = (encoder_parts[0] if encoder_parts else sessions["encoder"]).get_providers()
        log.info("loaded %s (%s) with %s%s%s%s", manifest.get("name"), precision, providers_used[0],
                 ", fused two-way transformer" if two_way else "", ", fused mask upscaling" if upscaling else "",
                 f", encoder around the native global attention ({encoder_attention})" if encoder_parts else "")
        return cls(model_dir, manifest, spec, precision, sessions, providers_used, upscaling, two_way,
                   threads, encoder_parts, encoder_attention, token_device)

    def with_spec(self, spec: ModelSpec) -> "Engine":
        """The same sessions with another preprocessing/prompting spec (same input size)."""
        if spec.input_size != self.spec.input_size:
            raise ModelError(f"spec input_size {spec.input_size} differs from the graphs' {self.spec.input_size}")
        return Engine(self.model_dir, self.manifest, spec, self.precision, self.sessions, self.providers,
                      self.mask_upscaling, self.two_way, self.threads, self.encoder_parts, self.encoder_attention,
                      self.token_device)

    @property
    def provider(self) -> str:
        """The execution provider that runs the encoder."""
        return self.providers[0]

    def embed(self, image: np.ndarray, name: str = "image") -> ImageEmbedding:
        """Encode one image (HxW or HxWxC array, see ``io.validate_image``) -> ``ImageEmbedding``."""
        array = validate_image(image, name)
        tensor, frame = to_model_input(array, self.spec)
        if self.encoder_parts:
            embedding = run_encoder_parts(self.encoder_parts, tensor, self.threads, self.encoder_attention)
        else:
            (embedding,) = self.sessions["encoder"].run(None, {"image": tensor})
        return ImageEmbedding(embedding=embedding[0], frame=frame)

    def decode(self, embedding: np.ndarray, point_coords: np.ndarray, point_labels: np.ndarray,
               batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Run the mask decoder on B prompts of N points each.

        embedding: (C, 64, 64) or (1, C, 64, 64) float32.
        point_coords: (B, N, 2) float, (x, y) in pixels of the S x S model frame.
        point_labels: (B, N), 1 foreground, 0 background, -1 padding, 2/3 box corners.
        Returns iou_predictions (B, 4) and low-resolution mask logits (B, 4, 256, 256), float32;
        output 0 is the single-mask output, 1..3 the multimask outputs.
        """
        emb, coords, labels = _check_prompts(embedding, point_coords, point_labels)
        b = coords.shape[0]
        if b == 0:
            return np.zeros((0, 4), np.float32), np.zeros((0, 4, 256, 256), np.float32)
        ious, masks = [], []
        for start in range(0, b, max(1, batch_size)):
            stop = start + max(1, batch_size)
            iou, low = self.sessions["decoder"].run(None, {"image_embeddings": emb,
                                                           "point_coords": coords[start:stop],
                                                           "point_labels": labels[start:stop]})
            ious.append(iou)
            masks.append(low)
        return np.concatenate(ious), np.concatenate(masks)

    def factors_buffer(self, capacity: int, points: int) -> ImageTokenFactors | None:
        """An ``ImageTokenFactors`` buffer for ``decode_tokens(factors=...)`` of up to ``capacity`` prompts
        of ``points`` points each, when both fused kernels run (the fused decoder returns the image tokens
        factored and the fused upscaling takes them: ``upscaling.upscale_kept_factored``), else None.

        The calling thread gets the same buffer again for the same sizes (mask generation, image after
        image, then reuses its 100 MB for SAM's 64-prompt batches instead of page-faulting fresh memory in
        each time): what a ``decode_tokens`` call left in it holds until this thread's next call with it."""
        if self.two_way is None or self.mask_upscaling is None or int(self.two_way["depth"]) != 2 \
                or points + 5 > MAX_TOKENS:
            return None
        hw, tokens = len(self.two_way["image_pe"]), self.two_way.num_heads * (5 + points)
        last = getattr(self._buffers, "factors", None)
        if last is None or len(last) != capacity or last.probs.shape[2:4] != (hw // 16, tokens):
            last = self._buffers.factors = ImageTokenFactors.empty(capacity, hw, tokens)
        return last

    def prepare(self, embedding: np.ndarray) -> np.ndarray | SharedImage:
        """An embedding (C, 64, 64) or (1, C, 64, 64) made ready for ``decode_tokens`` calls on many prompt
        batches: with the fused decoder its ``two_way.SharedImage`` (the first layer's image-only
        projections and the per-image features of factored image tokens, computed once instead of once
        per call), else the (1, C, 64, 64) array."""
        emb = _check_embedding(embedding)
        return shared_image(self.two_way, emb, self.threads) if self.two_way is not None else emb

    def decode_tokens(self, embedding: np.ndarray | SharedImage, point_coords: np.ndarray, point_labels: np.ndarray,
                      out: np.ndarray | None = None, mask_outputs: tuple[int, ...] = (0, 1, 2, 3),
                      factors: ImageTokenFactors | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | ImageTokenFactors]:
        """First step of ``decode`` (one decoder call, B >= 1 prompts): everything but the masks.

        Inputs as ``decode``; the embedding may be the one ``prepare`` returns. Returns iou_predictions
        (B, 4), hyper_in (B, K, C/8) (the hypernetwork
        outputs of the K = len(mask_outputs) mask outputs asked for: 0 single-mask, 1..3 multimask,
        distinct, in the order given) and image_tokens (B, 4096, C) (the two-way transformer's image
        side), float32; ``decode_masks`` turns the last two into mask logits. Runs the fused CPU
        decoder when ``two_way`` is set and prompts have at most 3 points (it skips the final
        attention of the mask tokens not asked for), else ``decoder_tokens``.
        ``out``: an optional float32 (B', 4096, C) buffer, B' >= B, that the fused decoder computes
        image_tokens in (they are then a view of it, overwritten by the next call with the same
        buffer); the graph ignores it.
        ``factors``: a ``factors_buffer``: the fused decoder then returns the image tokens in factored form
        (``ImageTokenFactors``, views of the buffer), which ``decode_kept_masks`` takes; the graph ignores it.
        With ``token_device`` set (``Engine.load``'s ``device_tokens``) the graph returns them as ``DeviceTokens``,
        which ``decode_kept_masks`` takes.
        """
        prepared = isinstance(embedding, SharedImage)
        emb, coords, labels = _check_prompts(embedding.embedding if prepared else embedding, point_coords,
                                             point_labels)
        if coords.shape[0] == 0:
            raise InputError("prompts: decode_tokens needs at least one prompt")
        outputs = tuple(mask_outputs)
        if not outputs or len(set(outputs)) != len(outputs) or \
                not all(isinstance(k, (int, np.integer)) and 0 <= k < 4 for k in outputs):
            raise InputError(f"mask_outputs: expected distinct mask output indices in 0..3, got {mask_outputs}")
        if self.two_way is not None and coords.shape[1] + 5 <= MAX_TOKENS:
            return fused_decode_tokens(self.two_way, embedding if prepared else emb, coords, labels, out, outputs,
                                       self.threads, factors)
        session = self.sessions["decoder_tokens"]
        if self.token_device is None:
            iou, hyper_in, image_tokens = session.run(None, dict(zip(PROMPT_INPUTS, (emb, coords, labels))))
        else:
            binding = session.io_binding()
            for name, array in zip(PROMPT_INPUTS, (emb, coords, labels)):
                binding.bind_cpu_input(name, array)
            binding.bind_output("iou_predictions")
            binding.bind_output("hyper_in")
            binding.bind_output("image_tokens", self.token_device)
            session.run_with_iobinding(binding)
            iou, hyper_in, tokens = binding.get_outputs()
            iou, hyper_in, image_tokens = iou.numpy(), hyper_in.numpy(), DeviceTokens(tokens)
        return iou, np.ascontiguousarray(hyper_in[:, list(outputs)]), image_tokens

    def decode_masks(self, image_tokens: np.ndarray, hyper_in: np.ndarray) -> np.ndarray:
        """Second step of ``decode``: image_tokens (B, 4096, C) and hyper_in (B, K, C/8) from
        ``decode_tokens`` (any K >= 1 of the 4 rows, e.g. only the mask outputs in use) ->
        low-resolution mask logits (B, K, 256, 256) float32, equal to ``decode``'s up to float
        rounding."""
        tokens = np.ascontiguousarray(image_tokens, np.float32)
        hyper = np.ascontiguousarray(hyper_in, np.float32)
        if tokens.ndim != 3 or hyper.ndim != 3 or tokens.shape[0] != hyper.shape[0] or hyper.shape[1] == 0:
            raise InputError(f"decode_masks: expected image_tokens (B, hw, C) and hyper_in (B, K, C/8), got "
                             f"{tokens.shape} and {hyper.shape}")
        if tokens.shape[0] == 0:
            return np.zeros((0, hyper.shape[1], 256, 256), np.float32)
        (low,) = self.sessions["decoder_masks"].run(None, {"image_tokens": tokens, "hyper_in": hyper})
        return low

    def decode_kept_masks(self, image_tokens: np.ndarray | ImageTokenFactors, hyper_in: np.ndarray,
                          keep: np.ndarray, low_rows: int = 256) -> np.ndarray:
        """``decode_masks`` of the kept masks only: image_tokens (B, 4096, C) and hyper_in (B, K, C/8)
        as there, keep bool (B, K) -> low-resolution logits (M, low_rows, 256) float32 of keep's True
        entries in row-major order, equal to ``decode_masks(image_tokens, hyper_in)[keep][:, :low_rows]`` up to
        float rounding. low_rows: a multiple of 4 in 4..256; the fused kernels upscale only the token rows that
        make them (each token row makes 4 rows), e.g. not those of an image's padding. Runs the fused kernel when
        ``mask_upscaling`` is set, else ``decoder_masks`` on the prompts with a kept mask. image_tokens may be in
        factored form (``decode_tokens(factors=...)``) or ``DeviceTokens`` (then ``decoder_masks`` runs on all B
        prompts: they are where it runs, a subset would be a copy)."""
        keep = np.asarray(keep, bool)
        if keep.ndim != 2 or np.ndim(hyper_in) != 3 or keep.shape != np.shape(hyper_in)[:2]:
            raise InputError(f"decode_kept_masks: expected hyper_in (B, K, C/8) and keep (B, K), got "
                             f"{np.shape(hyper_in)} and {keep.shape}")
        if not (isinstance(low_rows, (int, np.integer)) and 4 <= low_rows <= 256 and low_rows % 4 == 0):
            raise InputError(f"decode_kept_masks: low_rows must be a multiple of 4 in 4..256, got {low_rows!r}")
        if not keep.any():
            return np.zeros((0, low_rows, 256), np.float32)
        if isinstance(image_tokens, DeviceTokens):
            return self._kept_masks_on_device(image_tokens, hyper_in, keep, low_rows)
        if isinstance(image_tokens, ImageTokenFactors):
            if self.mask_upscaling is not None:
                return upscale_kept_factored(image_tokens, hyper_in, keep, self.mask_upscaling,
                                             self.spec.embedding_size, self.threads, low_rows // 4)
            image_tokens = image_tokens.dense()
        if self.mask_upscaling is not None:
            return upscale_kept(image_tokens, hyper_in, keep, self.mask_upscaling, self.spec.embedding_size,
                                self.threads, low_rows // 4)
        rows = np.flatnonzero(keep.any(axis=1))
        if rows.size < len(keep):          # (image_tokens is 4 MB per prompt: no copy when all are kept)
            image_tokens, hyper_in, keep = image_tokens[rows], hyper_in[rows], keep[rows]
        return np.ascontiguousarray(self.decode_masks(image_tokens, hyper_in)[keep][:, :low_rows])

    def _kept_masks_on_device(self, tokens: DeviceTokens, hyper_in: np.ndarray, keep: np.ndarray,
                              low_rows: int) -> np.ndarray:
        """``decode_kept_masks`` of ``DeviceTokens``: ``decoder_masks`` with the tokens bound where they are."""
        hyper = np.ascontiguousarray(hyper_in, np.float32)
        if len(tokens.shape) != 3 or tokens.shape[0] != hyper.shape[0]:
            raise InputError(f"decode_kept_masks: expected image_tokens (B, hw, C) for the B = {hyper.shape[0]} "
                             f"prompts of hyper_in, got device tokens of shape {tokens.shape}")
        session = self.sessions["decoder_masks"]
        binding = session.io_binding()
        binding.bind_ortvalue_input("image_tokens", tokens.value)
        binding.bind_cpu_input("hyper_in", hyper)
        binding.bind_output("low_res_masks")
        session.run_with_iobinding(binding)
        return np.ascontiguousarray(binding.get_outputs()[0].numpy()[keep][:, :low_rows])


def _register_shared_cpu_arena() -> None:
    """Register a CPU arena allocator in ONNX Runtime's process-wide environment, which the sessions made
    with ``session.use_env_allocators`` share (ONNX Runtime keeps the first one registered)."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))


def _check_embedding(embedding: np.ndarray) -> np.ndarray:
    """An embedding (C, h, w) or (1, C, h, w) -> (1, C, h, w) float32 C-contiguous (``InputError``)."""
    emb = np.ascontiguousarray(embedding, np.float32)
    if emb.ndim == 3:
        emb = emb[None]
    if emb.ndim != 4 or emb.shape[0] != 1:
        raise InputError(f"embedding: expected (C, 64, 64) or (1, C, 64, 64), got {embedding.shape}")
    return emb


def _check_prompts(embedding: np.ndarray, point_coords: np.ndarray,
                   point_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate decoder inputs -> (1, C, 64, 64), (B, N, 2), (B, N) float32 arrays (``InputError``)."""
    emb = _check_embedding(embedding)
    coords = np.asarray(point_coords, np.float32)
    labels = np.asarray(point_labels, np.float32)
    if coords.ndim != 3 or coords.shape[2] != 2 or labels.shape != coords.shape[:2]:
        raise InputError(
            f"prompts: expected point_coords (B, N, 2) and point_labels (B, N), got "
            f"{coords.shape} and {labels.shape}"
        )
    if not (np.isfinite(coords).all() and np.isin(labels, (-1, 0, 1, 2, 3)).all()):
        raise InputError("prompts: coordinates must be finite and labels in {-1, 0, 1, 2, 3}")
    return emb, coords, labels


def _read_weights(model_dir: Path, manifest: dict, name: str) -> tuple[bytes, Path]:
    """The verified bytes of the manifest's ``weights.<name>`` file and its path."""
    entry = manifest["weights"][name]
    path = model_dir / entry["file"]
    return _read_verified(path, entry), path


def _read_verified(path: Path, entry: dict) -> bytes:
    if not path.is_file():
        raise ManifestError(f"{path}: graph file listed in the manifest is missing")
    data = path.read_bytes()
    if len(data) != entry.get("bytes", len(data)):
        raise ManifestError(f"{path}: size {len(data)} bytes, manifest says {entry['bytes']} (file changed?)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.get("sha256"):
        raise ManifestError(f"{path}: sha256 {digest} does not match the manifest ({entry.get('sha256')})")
    return data


def _session_options(threads: int, shared_arena: bool, spinning: bool) -> ort.SessionOptions:
    """Options of an engine's sessions: ``threads`` intra-op threads, one memory arena for all of them when
    ``shared_arena`` (a ViT's encoder parts then reuse the memory the first part's run grew instead of
    page-faulting in arenas of their own), ONNX Runtime's thread spinning after a run when ``spinning``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The decoders' batch changes from call to call (the prompts kept); ONNX Runtime's memory
    # pattern is planned per input shape, and mask generation is faster without it
    # (benchmarks/results/session_options.md).
    options.enable_mem_pattern = False
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if shared_arena:
        options.add_session_config_entry("session.use_env_allocators", "1")
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _bf16_graph(path: Path, data: bytes, options: ort.SessionOptions, providers: list[str],
                inputs: tuple[str, ...], outputs: tuple[str, ...], threads: int, weights: str,
                attention: bool) -> Bf16Graph:
    """An fp32 encoder graph (or part) with its weight products native (``weights``: "bf16", "bf16x2" or "int8x3")
    and with ``attention`` its windowed attention cores in bfloat16 (``samreg_rt.bf16_graph``)."""
    import onnx

    from .bf16_graph import Bf16Graph

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and onnx's own
        raise ModelError(f"{path}: not a loadable ONNX graph ({str(exc)[:300]})") from None
    initializers = {t.name for t in model.graph.initializer}
    _require_io(path, tuple(i.name for i in model.graph.input if i.name not in initializers),
                tuple(o.name for o in model.graph.output), inputs, outputs)
    try:
        return Bf16Graph(model, lambda piece: _session(path, piece, options, providers, None, None, path.parent,
                                                       "fp32"), threads, weights, attention)
    except ValueError as exc:
        raise ModelError(f"{path}: cannot run in {weights} ({exc})") from None


def _session(path: Path, data: bytes, options: ort.SessionOptions, providers: list[str],
             inputs: tuple[str, ...] | None, outputs: tuple[str, ...] | None, model_dir: Path,
             precision: str) -> ort.InferenceSession:
    """A session of the graph bytes ``data`` (read from ``path``) with these inputs and outputs (None: a piece of a
    graph, whatever it has)."""
    try:
        session = ort.InferenceSession(data, sess_options=options,
                                       providers=[provider_entry(name, precision, model_dir) for name in providers])
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not a loadable ONNX graph ({first[:300]})") from None
    if inputs is not None:
        _require_io(path, tuple(i.name for i in session.get_inputs()), tuple(o.name for o in session.get_outputs()),
                    inputs, outputs)
    return session


def provider_entry(name: str, precision: str, model_dir: Path) -> str | tuple[str, dict[str, str]]:
    """A session's providers entry for ``name``: TensorRT with its engine cache in ``model_dir``/trt_cache and fp16
    for the fp16 graphs; CUDA without TF32 for the fp32 graphs (TF32 rounds the products' inputs to 10 bits, ONNX
    Runtime's default; fp32 keeps float32 products, as on the CPU); any other by name."""
    if name == "TensorrtExecutionProvider":
        return name, {"trt_engine_cache_enable": "1", "trt_engine_cache_path": str(model_dir / "trt_cache"),
                      "trt_fp16_enable": "1" if precision == "fp16" else "0"}
    if name == "CUDAExecutionProvider" and precision == "fp32":
        return name, {"use_tf32": "0"}
    return name


def _require_io(path: Path, got_in: tuple[str, ...], got_out: tuple[str, ...], inputs: tuple[str, ...],
                outputs: tuple[str, ...]) -> None:
    if got_in != inputs or got_out != outputs:
        raise ModelError(f"{path}: graph has inputs {got_in} and outputs {got_out}; expected {inputs} and {outputs}")
