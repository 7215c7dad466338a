"""Engine: loading with manifest verification, providers, embed/decode, typed errors."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

from samreg_export.export import export_model
from samreg_rt import _ext, amg, cpus, two_way
from samreg_rt import engine as engine_module
from samreg_rt.engine import Engine, resolve_model_dir, select_providers
from samreg_rt.io import load_image
from samreg_rt.errors import InputError, ManifestError, ModelError, ModelNotAvailableError
from tests.cpu_build import run_capped
from tests.threadcount import most_threads_during


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return export_model("random:tiny", tmp_path_factory.mktemp("tiny"), precisions=("fp32",), name="random_tiny")


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine.load(tiny_dir, threads=1)


def _copy(tiny_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_dir, target)
    return target


def test_load_embed_decode(engine):
    assert engine.provider == "CPUExecutionProvider"
    assert engine.spec.input_size == 256 and not engine.manifest["source"]["trained"]
    emb = engine.embed(np.random.default_rng(0).integers(0, 255, (50, 80), np.uint8))
    assert emb.embedding.shape == (256, 64, 64) and emb.embedding.dtype == np.float32
    assert emb.frame.original_shape == (50, 80) and emb.frame.resized_shape == (160, 256)
    assert np.isfinite(emb.embedding).all() and emb.embedding.std() > 1e-3
    coords = np.array([[[10.0, 20.0], [0.0, 0.0]]] * 5, np.float32)
    labels = np.array([[1.0, -1.0]] * 5, np.float32)
    iou, masks = engine.decode(emb.embedding, coords, labels, batch_size=2)
    assert iou.shape == (5, 4) and masks.shape == (5, 4, 256, 256)
    iou1, masks1 = engine.decode(emb.embedding, coords[:1], labels[:1])
    np.testing.assert_allclose(masks1, masks[:1], atol=1e-5)  # batching does not change results
    boxes = np.array([[[10.0, 10.0], [100.0, 90.0]]], np.float32)
    assert engine.decode(emb.embedding, boxes, np.array([[2.0, 3.0]], np.float32))[1].shape == (1, 4, 256, 256)
    empty = engine.decode(emb.embedding, np.zeros((0, 2, 2), np.float32), np.zeros((0, 2), np.float32))
    assert empty[0].shape == (0, 4) and empty[1].shape == (0, 4, 256, 256)


def test_two_step_decode_equals_decode(engine):
    """decode_tokens + decode_masks (what mask generation runs) == the one-graph decoder."""
    rng = np.random.default_rng(1)
    emb = engine.embed(rng.integers(0, 255, (64, 64), np.uint8)).embedding
    points = np.concatenate([rng.uniform(0, 255, (6, 1, 2)), np.zeros((6, 1, 2))], axis=1).astype(np.float32)
    boxes = np.sort(rng.uniform(0, 255, (6, 2, 2)), axis=1).astype(np.float32)
    for coords, labels in ((points, np.tile([1.0, -1.0], (6, 1))), (boxes, np.tile([2.0, 3.0], (6, 1)))):
        iou, masks = engine.decode(emb, coords, labels)
        iou2, hyper_in, image_tokens = engine.decode_tokens(emb, coords, labels)
        assert hyper_in.shape[:2] == (6, 4) and image_tokens.shape == (6, 64 * 64, 256)
        np.testing.assert_allclose(iou2, iou, atol=1e-5)
        np.testing.assert_allclose(engine.decode_masks(image_tokens, hyper_in), masks, atol=1e-4)
        rows, outputs = [4, 1], [1, 2, 3]        # a subset of prompts and of mask outputs
        subset = engine.decode_masks(image_tokens[rows], hyper_in[rows][:, outputs])
        np.testing.assert_allclose(subset, masks[rows][:, outputs], atol=1e-4)
    assert engine.decode_masks(image_tokens[:0], hyper_in[:0]).shape == (0, 4, 256, 256)
    with pytest.raises(InputError, match="decode_masks"):
        engine.decode_masks(image_tokens[:2], hyper_in[:3])
    with pytest.raises(InputError, match="at least one prompt"):
        engine.decode_tokens(emb, np.zeros((0, 2, 2), np.float32), np.zeros((0, 2), np.float32))


def _kept_masks_both_ways(model_dir, embed_image, coords, labels, outputs, keep_of):
    """decode_kept_masks with the fused kernel (when this CPU has it) and with the graph, and
    decode_masks(...)[keep] -> (fused engine, fused, graph, reference)."""
    fused_engine = Engine.load(model_dir, threads=2)
    graph_engine = Engine.load(model_dir, threads=2, fused_upscaling=False)
    assert graph_engine.mask_upscaling is None
    assert (fused_engine.mask_upscaling is not None) == (_ext.mask_upscaling_isa() != "generic")
    emb = fused_engine.embed(embed_image).embedding
    iou, hyper_in, image_tokens = fused_engine.decode_tokens(emb, coords, labels)
    keep = keep_of(iou[:, outputs])
    want = fused_engine.decode_masks(image_tokens, hyper_in[:, outputs])[keep]
    fused = fused_engine.decode_kept_masks(image_tokens, hyper_in[:, outputs], keep)
    graph = graph_engine.decode_kept_masks(image_tokens, hyper_in[:, outputs], keep)
    return fused_engine, fused, graph, want


def test_decode_kept_masks_equals_decode_masks(tiny_dir):
    """The kept masks' logits, fused kernel or graph, are decode_masks' rows of keep (random weights)."""
    rng = np.random.default_rng(2)
    coords = np.concatenate([rng.uniform(0, 255, (6, 1, 2)), np.zeros((6, 1, 2))], axis=1).astype(np.float32)
    labels = np.tile([1.0, -1.0], (6, 1)).astype(np.float32)
    keep = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0], [0, 0, 0], [0, 0, 1]], bool)
    engine, fused, graph, want = _kept_masks_both_ways(
        tiny_dir, rng.integers(0, 255, (64, 64), np.uint8), coords, labels, [1, 2, 3], lambda _: keep)
    assert want.shape == (7, 256, 256)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(fused, want, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(graph, want, rtol=0, atol=1e-5 * scale)
    _, hyper_in, image_tokens = engine.decode_tokens(engine.embed(np.zeros((8, 8), np.uint8)).embedding, coords, labels)
    assert engine.decode_kept_masks(image_tokens, hyper_in, np.zeros((6, 4), bool)).shape == (0, 256, 256)
    with pytest.raises(InputError, match="decode_kept_masks"):
        engine.decode_kept_masks(image_tokens, hyper_in, keep[:5])
    # low_rows: the first rows of the same logits (the fused kernel skips the other token rows: to the bit)
    graph_engine = Engine.load(tiny_dir, threads=2, fused_upscaling=False)
    for each in (engine, graph_engine):
        whole = each.decode_kept_masks(image_tokens, hyper_in[:, 1:], keep)
        part = each.decode_kept_masks(image_tokens, hyper_in[:, 1:], keep, 120)
        assert part.shape == (7, 120, 256) and part.flags.c_contiguous
        np.testing.assert_array_equal(part, whole[:, :120])
        assert each.decode_kept_masks(image_tokens, hyper_in[:, 1:], np.zeros((6, 3), bool), 8).shape == (0, 8, 256)
    for bad in (0, 6, 260, 3.5):
        with pytest.raises(InputError, match=f"low_rows must be a multiple of 4 in 4..256, got {bad}"):
            engine.decode_kept_masks(image_tokens, hyper_in[:, 1:], keep, bad)


def test_mask_generation_skips_the_padding_rows(tiny_dir, monkeypatch):
    """A SAM-style model (longest side resized, padded below; random weights): on a 54 x 64 image mask generation
    upscales the 216 low-resolution rows of the image only, and its masks, scores and order are those of
    upscaling all 256."""
    engine = Engine.load(tiny_dir, threads=2)
    image = np.random.default_rng(4).integers(0, 255, (54, 64), np.uint8)
    emb = engine.embed(image)
    params = amg.AmgParams(points_per_side=6, mask_output="single", pred_iou_thresh=0.0, stability_score_thresh=0.0,
                           batch_size=16)
    asked = []
    decode_kept_masks = engine.decode_kept_masks

    def recording(image_tokens, hyper_in, keep, low_rows=256):
        asked.append(low_rows)
        return decode_kept_masks(image_tokens, hyper_in, keep, low_rows)

    monkeypatch.setattr(engine, "decode_kept_masks", recording)
    trimmed = amg.generate(engine, emb, params)
    assert engine.spec.resize == "longest_side" and emb.frame.resized_shape[0] < emb.frame.input_size
    assert asked and set(asked) == {216}
    monkeypatch.setattr(amg, "low_rows_read", lambda ry, image_rows: 256)
    whole = amg.generate(engine, emb, params)
    assert asked[-1] == 256 and len(trimmed) > 0
    for name in ("masks", "iou_preds", "stability", "boxes", "prompt_ids"):
        np.testing.assert_array_equal(getattr(trimmed, name), getattr(whole, name), err_msg=name)


def test_decode_kept_masks_litemedsam(litemedsam_dir, data_dir):
    """Real weights: the fused kernel's masks of LiteMedSAM's box grid are the graph's."""
    image = load_image(data_dir / "cardiac_mr" / "acdc2d_example" / "fixed.png").array
    engine = Engine.load(litemedsam_dir, threads=2)
    params = amg.AmgParams.from_spec(engine.spec, points_per_side=8)
    coords, labels = amg.build_prompts(params, engine.embed(image).frame)
    _, fused, graph, want = _kept_masks_both_ways(litemedsam_dir, image, coords, labels, [0],
                                                  lambda iou: iou > np.median(iou))
    assert len(want) == len(coords) // 2
    np.testing.assert_allclose(fused, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))
    np.testing.assert_allclose(graph, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))
    flips = (fused > 0) != (want > 0)
    assert flips.mean() < 1e-4        # binary masks: at most a few boundary pixels differ


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_fused_kernels_by_cpu_build(tiny_dir, monkeypatch, isa):
    """Where the kernels' best build is AVX2 the decoder runs fused as with AVX-512 (the two-way transformer, dense
    image tokens or factored ones, and the mask upscaling) while the encoder runs its graph; with the portable
    build nothing is fused."""
    monkeypatch.setattr(engine_module._ext, "mask_upscaling_isa", lambda: isa)
    engine = Engine.load(tiny_dir, threads=2)
    graph = Engine.load(tiny_dir, threads=2, fused_tokens=False, fused_upscaling=False)
    assert (engine.mask_upscaling is not None) == (engine.two_way is not None) == (isa == "avx2")
    assert not engine.encoder_parts and "encoder" in engine.sessions
    assert (Engine.load(tiny_dir, fused_upscaling=False).two_way is not None) == (isa == "avx2")
    rng = np.random.default_rng(5)
    coords = rng.uniform(0, 255, (3, 1, 2)).astype(np.float32)
    labels = np.ones((3, 1), np.float32)
    emb = engine.embed(np.zeros((64, 64), np.uint8)).embedding
    buffer = np.empty((3, 64 * 64, 256), np.float32)
    iou, hyper_in, image_tokens = engine.decode_tokens(engine.prepare(emb), coords, labels, out=buffer)
    assert np.shares_memory(image_tokens, buffer) == (isa == "avx2")      # the fused decoder ran, else the graph
    want_iou, want_hyper, want_tokens = graph.decode_tokens(emb, coords, labels)
    _assert_tokens_close((iou, hyper_in, image_tokens), (want_iou, want_hyper, want_tokens), 1e-5)
    keep = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]], bool)
    want = graph.decode_masks(want_tokens, want_hyper)[keep]
    np.testing.assert_allclose(engine.decode_kept_masks(image_tokens, hyper_in, keep), want, rtol=0,
                               atol=1e-4 * float(np.abs(want).max()))
    factors = engine.factors_buffer(3, 1)
    assert (factors is not None) == (isa == "avx2")
    if factors is not None:
        iou2, hyper2, factored = engine.decode_tokens(emb, coords, labels, factors=factors)
        assert isinstance(factored, two_way.ImageTokenFactors)
        np.testing.assert_allclose(iou2, iou, rtol=0, atol=1e-5)
        np.testing.assert_allclose(hyper2, hyper_in, rtol=0, atol=1e-5 * float(np.abs(hyper_in).max()))
        np.testing.assert_allclose(engine.decode_kept_masks(factored, hyper2, keep), want, rtol=0,
                                   atol=1e-4 * float(np.abs(want).max()))


def test_mask_generation_on_the_avx2_builds(litemedsam_dir, data_dir):
    """With the kernels capped at their AVX2 builds (SAMREG_RT_CPU_BUILD=avx2, what a CPU without AVX-512 runs),
    LiteMedSAM's mask generation runs the fused two-way transformer on factored image tokens and the fused
    upscaling, and gives the graphs' masks: the same prompts kept, in the same order, each mask IoU >= 0.99."""
    if _ext.mask_upscaling_isa() == "generic":
        pytest.skip("the AVX2 builds need AVX2 and FMA")
    image = data_dir / "cardiac_mr" / "acdc2d_example" / "fixed.png"
    code = f"""
import numpy as np
from samreg_rt import _ext, amg
from samreg_rt.engine import Engine
from samreg_rt.io import load_image
from samreg_rt.masks import iou_matrix, pack_masks
fused = Engine.load({str(litemedsam_dir)!r}, threads=2)
graph = Engine.load({str(litemedsam_dir)!r}, threads=2, fused_tokens=False, fused_upscaling=False)
emb = fused.embed(load_image({str(image)!r}).array)
params = amg.AmgParams.from_spec(fused.spec, points_per_side=12)
a, b = amg.generate(fused, emb, params), amg.generate(graph, emb, params)
ious = np.diag(iou_matrix(pack_masks(a.masks), pack_masks(b.masks))) if len(a) == len(b) else [0.0]
print(_ext.mask_upscaling_isa(), fused.two_way is not None, fused.mask_upscaling is not None,
      fused.factors_buffer(64, 1) is not None, len(a), np.array_equal(a.prompt_ids, b.prompt_ids), float(np.min(ious)) >= 0.99)
"""
    done = run_capped("avx2", code, timeout=600)
    assert done.returncode == 0, done.stderr
    isa, two_way_set, upscaling_set, factored, count, same_prompts, close = done.stdout.split()
    assert (isa, two_way_set, upscaling_set, factored) == ("avx2", "True", "True", "True")
    assert int(count) > 5 and same_prompts == "True" and close == "True"


def _tokens_both_ways(model_dir, image, coords, labels):
    """decode_tokens with the fused CPU decoder (when this CPU has it) and with decoder_tokens."""
    fused_engine = Engine.load(model_dir, threads=2)
    graph_engine = Engine.load(model_dir, threads=2, fused_tokens=False)
    assert graph_engine.two_way is None
    assert (fused_engine.two_way is not None) == (_ext.mask_upscaling_isa() != "generic")
    emb = fused_engine.embed(image).embedding
    return fused_engine.decode_tokens(emb, coords, labels), graph_engine.decode_tokens(emb, coords, labels)


def _assert_tokens_close(fused, graph, rtol):
    for name, got, want in zip(("iou_predictions", "hyper_in", "image_tokens"), fused, graph):
        assert got.shape == want.shape and got.dtype == np.float32, name
        np.testing.assert_allclose(got, want, rtol=0, atol=rtol * float(np.abs(want).max()), err_msg=name)


def test_fused_tokens_equal_graph(tiny_dir):
    """The CPU decoder (numpy token side + fused passes) gives decoder_tokens' outputs (random weights):
    point prompts, boxes, 3-point prompts; 4 points fall back to the graph."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (64, 64), np.uint8)
    points = np.concatenate([rng.uniform(0, 255, (5, 1, 2)), np.zeros((5, 1, 2))], axis=1).astype(np.float32)
    boxes = np.sort(rng.uniform(0, 255, (5, 2, 2)), axis=1).astype(np.float32)
    three = rng.uniform(0, 255, (3, 3, 2)).astype(np.float32)
    for coords, labels in ((points, np.tile([1.0, -1.0], (5, 1))), (boxes, np.tile([2.0, 3.0], (5, 1))),
                           (three, np.array([[1.0, 0.0, 1.0], [1.0, 1.0, -1.0], [2.0, 3.0, 0.0]]))):
        fused, graph = _tokens_both_ways(tiny_dir, image, coords, labels.astype(np.float32))
        _assert_tokens_close(fused, graph, 1e-5)
    four = rng.uniform(0, 255, (2, 4, 2)).astype(np.float32)
    fused, graph = _tokens_both_ways(tiny_dir, image, four, np.ones((2, 4), np.float32))
    for got, want in zip(fused, graph):
        np.testing.assert_array_equal(got, want)       # the graph ran on both sides


@pytest.mark.parametrize("mask_outputs", [(1, 2, 3), (0,), (3, 1)])
def test_fused_tokens_of_some_mask_outputs(tiny_dir, mask_outputs):
    """decode_tokens(mask_outputs=...): the fused decoder, which then pools the final attention for
    fewer tokens, gives the graph's hyper_in rows of those outputs and its other outputs unchanged."""
    rng = np.random.default_rng(5)
    image = rng.integers(0, 255, (64, 64), np.uint8)
    coords = np.concatenate([rng.uniform(0, 255, (5, 1, 2)), np.zeros((5, 1, 2))], axis=1).astype(np.float32)
    labels = np.tile([1.0, -1.0], (5, 1)).astype(np.float32)
    fused_engine = Engine.load(tiny_dir, threads=2)
    graph_engine = Engine.load(tiny_dir, threads=2, fused_tokens=False)
    emb = fused_engine.embed(image).embedding
    graph = graph_engine.decode_tokens(emb, coords, labels)
    fused = fused_engine.decode_tokens(emb, coords, labels, mask_outputs=mask_outputs)
    assert fused[1].shape == (5, len(mask_outputs), 32)
    _assert_tokens_close(fused, (graph[0], graph[1][:, list(mask_outputs)], graph[2]), 1e-5)
    np.testing.assert_array_equal(graph_engine.decode_tokens(emb, coords, labels, mask_outputs=mask_outputs)[1],
                                  graph[1][:, list(mask_outputs)])
    for bad in ((), (1, 1), (4,), (0.5,)):
        for engine in (fused_engine, graph_engine):
            with pytest.raises(InputError, match="mask_outputs"):
                engine.decode_tokens(emb, coords, labels, mask_outputs=bad)
        if fused_engine.two_way is not None:
            with pytest.raises(InputError, match="mask_outputs"):
                two_way.decode_tokens(fused_engine.two_way, emb[None], coords, labels, mask_outputs=bad)


def test_fused_tokens_into_a_buffer(engine):
    """decode_tokens(out=buffer): the fused decoder computes image_tokens in the buffer, batch after batch,
    with the values it returns without one; a buffer of the wrong kind is an InputError."""
    rng = np.random.default_rng(4)
    emb = engine.embed(rng.integers(0, 255, (64, 64), np.uint8)).embedding
    coords = np.concatenate([rng.uniform(0, 255, (6, 1, 2)), np.zeros((6, 1, 2))], axis=1).astype(np.float32)
    labels = np.tile([1.0, -1.0], (6, 1)).astype(np.float32)
    buffer = np.empty((4, 64 * 64, 256), np.float32)
    for rows in (slice(0, 4), slice(4, 6)):
        want = engine.decode_tokens(emb, coords[rows], labels[rows])
        got = engine.decode_tokens(emb, coords[rows], labels[rows], out=buffer)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        assert np.shares_memory(got[2], buffer) == (engine.two_way is not None)
    if engine.two_way is not None:
        for bad in (np.empty((2, 64 * 64, 256), np.float32), np.empty((8, 64 * 64, 256), np.float64)):
            with pytest.raises(InputError, match="out"):
                engine.decode_tokens(emb, coords, labels, out=bad)


@pytest.mark.parametrize("fused", [True, False])
def test_prepared_embedding(tiny_dir, fused):
    """Engine.prepare: the fused decoder's image-only projections, computed once, give every later
    decode_tokens call what the raw embedding gives (the same arithmetic, so bit for bit); the graph
    decoder gets the embedding back; a wrong embedding is an InputError."""
    engine = Engine.load(tiny_dir, threads=1, fused_tokens=fused)
    rng = np.random.default_rng(5)
    emb = engine.embed(rng.integers(0, 255, (64, 64), np.uint8)).embedding
    prepared = engine.prepare(emb)
    assert isinstance(prepared, two_way.SharedImage) == (engine.two_way is not None)
    coords = np.concatenate([rng.uniform(0, 255, (6, 1, 2)), np.zeros((6, 1, 2))], axis=1).astype(np.float32)
    labels = np.tile([1.0, -1.0], (6, 1)).astype(np.float32)
    for rows in (slice(0, 4), slice(4, 6)):
        want = engine.decode_tokens(emb, coords[rows], labels[rows], mask_outputs=(1, 2, 3))
        got = engine.decode_tokens(prepared, coords[rows], labels[rows], mask_outputs=(1, 2, 3))
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match="embedding"):
        engine.prepare(emb[0, :, :32])
    if engine.two_way is not None:
        with pytest.raises(InputError, match="embedding"):
            two_way.shared_image(engine.two_way, np.zeros((1, 256, 32, 32), np.float32))
        # prepared with other weights (another digest): rejected, not decoded with the wrong projections
        other = dataclasses.replace(engine.two_way, digest="0" * 64)
        with pytest.raises(InputError, match="prepared with other weights"):
            two_way.decode_tokens(other, prepared, coords[:2], labels[:2])


def test_fused_tokens_litemedsam(litemedsam_dir, data_dir):
    """Real weights: LiteMedSAM's box grid through the CPU decoder and through decoder_tokens."""
    image = load_image(data_dir / "cardiac_mr" / "acdc2d_example" / "fixed.png").array
    engine = Engine.load(litemedsam_dir, threads=2)
    coords, labels = amg.build_prompts(amg.AmgParams.from_spec(engine.spec, points_per_side=6),
                                       engine.embed(image).frame)
    fused, graph = _tokens_both_ways(litemedsam_dir, image, coords, labels)
    _assert_tokens_close(fused, graph, 5e-5)          # float32 rounding through two layers of trained weights
    flips = (engine.decode_masks(fused[2], fused[1]) > 0) != (engine.decode_masks(graph[2], graph[1]) > 0)
    assert flips.mean() < 1e-4                         # binary masks: at most a few boundary pixels differ


def test_bad_two_way_weights_are_model_errors(tiny_dir, tmp_path):
    import hashlib

    for name, data in (("garbage", b"not an npz"), ("incomplete", None)):
        model = _copy(tiny_dir, tmp_path / name)
        if data is None:
            with np.load(model / "two_way.npz") as npz:
                arrays = {k: npz[k] for k in npz.files if k != "transformer.layers.1.mlp.lin1.weight"}
            np.savez(model / "two_way.npz", **arrays)
        else:
            (model / "two_way.npz").write_bytes(data)
        data = (model / "two_way.npz").read_bytes()
        manifest = json.loads((model / "manifest.json").read_text())
        manifest["weights"]["two_way"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        (model / "manifest.json").write_text(json.dumps(manifest))
        if _ext.mask_upscaling_isa() == "generic":
            continue                                    # the weights are read only where they are used
        with pytest.raises(ModelError, match="two_way.npz"):
            Engine.load(model)


def test_older_cached_export_is_reexported(tiny_dir, monkeypatch, tmp_path):
    """A registry model cached by an older samreg-rt (manifest format 1) is exported again, not used."""
    cached = tmp_path / "cache" / "random_tiny"
    shutil.copytree(tiny_dir, cached)
    manifest = json.loads((cached / "manifest.json").read_text())
    manifest["format_version"] = 1
    (cached / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="older"):
        Engine.load(cached)                        # an explicit directory is not touched: clear error
    monkeypatch.setenv("SAMREG_RT_CACHE", str(tmp_path / "cache"))
    assert resolve_model_dir("random_tiny") == cached
    assert json.loads((cached / "manifest.json").read_text())["format_version"] > 1


def test_format_4_is_read_and_cached_exports_of_it_are_renewed(tiny_dir, tmp_path):
    """A format-4 manifest (before the encoder parts) still loads from an explicit directory, and the
    model cache counts it as older, so a registry model cached in it is exported again."""
    model = _copy(tiny_dir, tmp_path)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["format_version"] = 4
    for precision in manifest["graphs"].values():
        for role in [r for r in precision if r.startswith("encoder_part")]:
            del precision[role]
    (model / "manifest.json").write_text(json.dumps(manifest))
    engine = Engine.load(model, threads=1)
    assert not engine.encoder_parts
    assert engine.embed(np.zeros((16, 16), np.uint8)).embedding.shape[0] == 256
    assert engine_module._older_format(model) and not engine_module._older_format(tiny_dir)


def test_older_cached_export_of_a_local_checkpoint_is_reexported(tiny_dir, monkeypatch, tmp_path):
    """An HF directory's cached export is used while its format is current and exported again once older."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    monkeypatch.setenv("SAMREG_RT_CACHE", str(tmp_path / "cache"))
    exports = []
    monkeypatch.setattr(engine_module, "_export", lambda source, target, name: exports.append(source) or target)
    cached = resolve_model_dir(hf)
    assert exports == [f"hf:{hf}"]
    shutil.copytree(tiny_dir, cached)                      # what the export writes
    assert resolve_model_dir(hf) == cached and len(exports) == 1
    manifest = json.loads((cached / "manifest.json").read_text())
    manifest["format_version"] = 4
    (cached / "manifest.json").write_text(json.dumps(manifest))
    assert resolve_model_dir(hf) == cached and len(exports) == 2


def test_shared_arena_gives_the_same_outputs(tiny_dir):
    """Engine.load(shared_arena=...): the sessions allocating from one arena or from one each compute the same
    embedding and decoder outputs, bit for bit."""
    image = np.random.default_rng(6).integers(0, 255, (48, 40), np.uint8)
    coords = np.array([[[100.0, 80.0], [0.0, 0.0]]], np.float32)
    labels = np.array([[1.0, -1.0]], np.float32)
    outputs = []
    for shared in (False, True):
        engine = Engine.load(tiny_dir, threads=1, shared_arena=shared, fused_tokens=False, fused_upscaling=False)
        emb = engine.embed(image).embedding
        outputs.append((emb, *engine.decode(emb, coords, labels)))
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("coords, labels, problem", [
    (np.zeros((2, 2), np.float32), np.zeros((2,), np.float32), "expected point_coords"),
    (np.zeros((1, 2, 2), np.float32), np.array([[1.0, 7.0]], np.float32), "labels"),
    (np.full((1, 2, 2), np.nan, np.float32), np.array([[1.0, -1.0]], np.float32), "finite"),
])
def test_decode_rejects_bad_prompts(engine, coords, labels, problem):
    with pytest.raises(InputError, match=problem):
        engine.decode(np.zeros((256, 64, 64), np.float32), coords, labels)


@pytest.mark.parametrize("image, problem", [
    (np.zeros((5,), np.uint8), "expected an HxW"),
    (np.full((8, 8), np.nan, np.float32), "NaN"),
    (np.zeros((8, 8, 2), np.uint8), "expected an HxW"),
])
def test_embed_rejects_bad_images(engine, image, problem):
    with pytest.raises(InputError, match=problem):
        engine.embed(image, name="bad.png")


def test_tampered_graph_is_detected(tiny_dir, tmp_path):
    model = _copy(tiny_dir, tmp_path)
    data = bytearray((model / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="decoder.onnx.*sha256"):
        Engine.load(model)


def test_missing_graph_and_future_manifest(tiny_dir, tmp_path):
    model = _copy(tiny_dir, tmp_path)
    (model / "encoder.onnx").unlink()
    with pytest.raises(ManifestError, match="encoder.onnx"):
        Engine.load(model)
    model2 = _copy(tiny_dir, tmp_path / "b")
    manifest = json.loads((model2 / "manifest.json").read_text())
    manifest["format_version"] = 99
    (model2 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="format_version"):
        Engine.load(model2)


def _rehash(model, role, data):
    import hashlib

    (model / f"{role}.onnx").write_bytes(data)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["graphs"]["fp32"][role].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (model / "manifest.json").write_text(json.dumps(manifest))


def test_truncated_or_foreign_graph_is_a_model_error(tiny_dir, tmp_path):
    model = _copy(tiny_dir, tmp_path)
    _rehash(model, "decoder", (model / "decoder.onnx").read_bytes()[:5000])
    with pytest.raises(ModelError, match="decoder.onnx: not a loadable ONNX graph"):
        Engine.load(model)
    model2 = _copy(tiny_dir, tmp_path / "b")
    _rehash(model2, "encoder", b"this is not onnx at all")
    with pytest.raises(ModelError, match="encoder.onnx"):
        Engine.load(model2, fused_encoder=False)     # (with the encoder parts, encoder.onnx is not read)


def test_graph_with_wrong_input_names(tiny_dir, tmp_path):
    model = _copy(tiny_dir, tmp_path)
    graph = onnx.load(str(model / "encoder.onnx"))
    old = graph.graph.input[0].name
    graph.graph.input[0].name = "pixels"
    for node in graph.graph.node:
        node.input[:] = ["pixels" if i == old else i for i in node.input]
    _rehash(model, "encoder", graph.SerializeToString())
    with pytest.raises(ModelError, match="expected \\('image',\\)"):
        Engine.load(model, fused_encoder=False)


def test_unknown_precision_and_provider(tiny_dir):
    with pytest.raises(ModelError, match="no 'int8' graphs"):
        Engine.load(tiny_dir, precision="int8")
    with pytest.raises(ModelError, match="not available"):
        select_providers("tensorrt")
    assert select_providers("auto")[-1] == "CPUExecutionProvider"


def test_provider_entries(tmp_path):
    """What the sessions ask of the GPU providers: CUDA keeps float32 products for the fp32 graphs (no TF32),
    TensorRT caches its engines in the model directory and runs fp16 for the fp16 graphs."""
    entry = engine_module.provider_entry
    assert entry("CUDAExecutionProvider", "fp32", tmp_path) == ("CUDAExecutionProvider", {"use_tf32": "0"})
    assert entry("CUDAExecutionProvider", "fp16", tmp_path) == "CUDAExecutionProvider"
    for precision, fp16 in (("fp32", "0"), ("fp16", "1")):
        assert entry("TensorrtExecutionProvider", precision, tmp_path) == (
            "TensorrtExecutionProvider", {"trt_engine_cache_enable": "1", "trt_fp16_enable": fp16,
                                          "trt_engine_cache_path": str(tmp_path / "trt_cache")})
    assert entry("CPUExecutionProvider", "fp32", tmp_path) == "CPUExecutionProvider"


def test_providers_of_a_gpu_build(monkeypatch):
    """As onnxruntime-gpu lists them: TensorRT asked for brings CUDA after it, for the nodes it does not take."""
    trt, cuda, cpu = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
    monkeypatch.setattr(engine_module.ort, "get_available_providers", lambda: [trt, cuda, cpu])
    assert select_providers("tensorrt") == [trt, cuda, cpu]
    assert select_providers(["TensorrtExecutionProvider", "cpu"]) == [trt, cuda, cpu]
    assert select_providers("auto") == [trt, cuda, cpu]
    assert select_providers("cuda") == [cuda, cpu]
    assert select_providers(["cuda", "tensorrt"]) == [cuda, trt, cpu]
    monkeypatch.setattr(engine_module.ort, "get_available_providers", lambda: [trt, cpu])
    assert select_providers("tensorrt") == [trt, cpu]


def test_resolve_unknown_model(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="unknown model"):
        resolve_model_dir("no_such_model")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ModelError, match="not a model"):
        resolve_model_dir(tmp_path / "junk")


def test_registry_name_is_exported_on_first_use(_model_cache):
    engine = Engine.load("random_tiny", threads=1)  # exported into the session's cache by a subprocess
    assert (_model_cache / "random_tiny" / "manifest.json").is_file()
    assert engine.manifest["name"] == "random_tiny" and engine.manifest["source"]["trained"] is False


def test_registry_name_takes_the_registry_spec(_model_cache, tmp_path, monkeypatch):
    """A cached export keeps up with the registry's prompting defaults; a directory keeps its own."""
    from samreg_rt.models import REGISTRY

    Engine.load("random_tiny", threads=1)                       # exported into the cache (or cached)
    cached = tmp_path / "random_tiny"                           # edited in a cache of this test's own
    shutil.copytree(_model_cache / "random_tiny", cached)
    monkeypatch.setenv("SAMREG_RT_CACHE", str(tmp_path))
    manifest = json.loads((cached / "manifest.json").read_text())
    manifest["spec"]["pred_iou_thresh"] = 0.123
    (cached / "manifest.json").write_text(json.dumps(manifest))
    by_name = Engine.load("random_tiny", threads=1)
    assert by_name.spec.pred_iou_thresh == REGISTRY["random_tiny"].spec.pred_iou_thresh != 0.123
    assert Engine.load(cached, threads=1).spec.pred_iou_thresh == 0.123
    manifest["spec"]["input_size"] = 512
    (cached / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="differ from the registry"):
        Engine.load("random_tiny", threads=1)


def test_threads_reach_the_cpu_kernels(tiny_dir):
    """Engine.load(threads=n) limits the fused CPU decoder's kernels too, not only ONNX Runtime: with
    threads=1 decode_tokens and decode_kept_masks start no thread, and give what threads=2 gives."""
    one, two = Engine.load(tiny_dir, threads=1), Engine.load(tiny_dir, threads=2)
    assert (one.threads, two.threads, Engine.load(tiny_dir).threads) == (1, 2, cpus.usable_cpus())
    assert one.with_spec(one.spec).threads == 1
    if one.two_way is None or one.mask_upscaling is None:
        pytest.skip("the fused CPU decoder needs AVX-512 or AVX2 and FMA")
    rng = np.random.default_rng(7)
    emb = one.embed(rng.integers(0, 255, (64, 64), np.uint8)).embedding
    coords = rng.uniform(0, 255, (16, 1, 2)).astype(np.float32)
    labels = np.ones((16, 1), np.float32)
    keep = np.ones((16, 3), bool)
    if Path("/proc/self/task").is_dir():
        assert most_threads_during(lambda: one.decode_tokens(emb, coords, labels, mask_outputs=(1, 2, 3))) == 1
        _, hyper, tokens = one.decode_tokens(emb, coords, labels, mask_outputs=(1, 2, 3))
        assert most_threads_during(lambda: one.decode_kept_masks(tokens, hyper, keep)) == 1
    got, want = (e.decode_tokens(emb, coords, labels, mask_outputs=(1, 2, 3)) for e in (one, two))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(one.decode_kept_masks(got[2], got[1], keep), two.decode_kept_masks(want[2], want[1], keep))


@pytest.mark.parametrize("threads", [0, -2, 1.5, True, "2"])
def test_bad_threads_are_input_errors(tiny_dir, threads):
    with pytest.raises(InputError, match="threads"):
        Engine.load(tiny_dir, threads=threads)


def test_device_tokens_give_the_same_tokens_and_masks(tiny_dir):
    """device_tokens (the GPU path: decoder_tokens' image tokens left in the decoders' device memory, bound as
    decoder_masks' input) run on the CPU provider's memory here: the same iou, hyper_in, tokens and kept masks
    as the arrays' path; by default a CPU engine copies the tokens back as arrays."""
    rng = np.random.default_rng(5)
    plain = Engine.load(tiny_dir, threads=2, fused_tokens=False, fused_upscaling=False)
    bound = Engine.load(tiny_dir, threads=2, fused_tokens=False, fused_upscaling=False, device_tokens=True)
    assert plain.token_device is None and bound.token_device == "cpu"
    assert Engine.load(tiny_dir, threads=1).token_device is None
    emb = plain.embed(rng.integers(0, 255, (64, 64), np.uint8)).embedding
    coords = np.concatenate([rng.uniform(0, 255, (6, 1, 2)), np.zeros((6, 1, 2))], axis=1).astype(np.float32)
    labels = np.tile([1.0, -1.0], (6, 1)).astype(np.float32)
    iou, hyper, tokens = plain.decode_tokens(emb, coords, labels, mask_outputs=(3, 1))
    iou2, hyper2, device = bound.decode_tokens(emb, coords, labels, mask_outputs=(3, 1))
    assert isinstance(device, engine_module.DeviceTokens) and device.shape == tokens.shape == (6, 4096, 256)
    np.testing.assert_array_equal(iou2, iou)
    np.testing.assert_array_equal(hyper2, hyper)
    np.testing.assert_array_equal(device.value.numpy(), tokens)
    keep = np.array([[1, 0], [0, 0], [1, 1], [0, 1], [0, 0], [0, 1]], bool)
    want = plain.decode_kept_masks(tokens, hyper, keep, 120)
    got = bound.decode_kept_masks(device, hyper, keep, 120)
    assert got.shape == want.shape == (5, 120, 256) and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
    assert bound.decode_kept_masks(device, hyper, np.zeros((6, 2), bool)).shape == (0, 256, 256)
    with pytest.raises(InputError, match=r"device tokens of shape \(6, 4096, 256\)"):
        bound.decode_kept_masks(device, hyper[:5], keep[:5])


def test_a_provider_onnx_runtime_cannot_create_is_a_model_error(tiny_dir, monkeypatch, caplog):
    """ONNX Runtime runs a graph on the CPU when a provider asked for cannot be created (here: CUDA, which this
    build lacks; on a GPU machine: its libraries missing): by name that is an error, with "auto" a warning."""
    monkeypatch.setattr(engine_module, "select_providers",
                        lambda requested: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ModelError, match="could not create CUDAExecutionProvider for the decoder graph "
                                         "\\(it would run on CPUExecutionProvider\\)"):
        Engine.load(tiny_dir, providers="cuda", threads=1)
    with caplog.at_level("WARNING", logger="samreg_rt"):
        engine = Engine.load(tiny_dir, providers="auto", threads=1)
    assert engine.provider == "CPUExecutionProvider" and engine.token_device is None
    # (the encoder runs as parts around the native attention on AVX-512 CPUs, else as one graph)
    assert re.search("could not create CUDAExecutionProvider for the (first encoder part|encoder) graph", caplog.text)


def test_device_tokens_on_a_provider_without_a_known_device(tiny_dir, monkeypatch):
    monkeypatch.setattr(engine_module, "TOKEN_DEVICES", {"CUDAExecutionProvider": "cuda"})
    with pytest.raises(ModelError, match="device_tokens: the decoders run on CPUExecutionProvider"):
        Engine.load(tiny_dir, threads=1, device_tokens=True)
    assert Engine.load(tiny_dir, threads=1).token_device is None


def test_mask_generation_with_device_tokens(litemedsam_dir, data_dir):
    """Mask generation (LiteMedSAM, its box grid) on the decoder graphs with the tokens bound in device memory
    gives the masks of the arrays' path."""
    image = load_image(data_dir / "cardiac_mr" / "acdc2d_example" / "fixed.png").array
    params = amg.AmgParams.from_spec(Engine.load(litemedsam_dir, threads=2).spec, points_per_side=6)
    masks = []
    for device_tokens in (False, True):
        engine = Engine.load(litemedsam_dir, threads=2, fused_tokens=False, fused_upscaling=False,
                             device_tokens=device_tokens)
        masks.append(amg.generate(engine, engine.embed(image), params))
    assert len(masks[0]) > 5 and masks[1].counts == masks[0].counts
    np.testing.assert_array_equal(masks[1].masks, masks[0].masks)
    np.testing.assert_array_equal(masks[1].prompt_ids, masks[0].prompt_ids)


def _factored_both_ways(engine, emb, coords, labels, keep_rule):
    """decode_tokens and decode_kept_masks with the image tokens dense and factored (a factors_buffer
    larger than the batch, used twice) -> (dense tokens, factors, dense masks, factored masks)."""
    factors = engine.factors_buffer(len(coords) + 3, coords.shape[1])
    iou, hyper, tokens = engine.decode_tokens(emb, coords, labels, mask_outputs=(1, 2, 3))
    for _ in range(2):
        iou2, hyper2, got = engine.decode_tokens(emb, coords, labels, mask_outputs=(1, 2, 3), factors=factors)
    # the token side changes only by rounding: the second layer runs on the first one's factors
    np.testing.assert_allclose(iou2, iou, rtol=0, atol=1e-4)
    np.testing.assert_allclose(hyper2, hyper, rtol=0, atol=1e-4 * float(np.abs(hyper).max()))
    assert isinstance(got, two_way.ImageTokenFactors) and len(got) == len(coords)
    assert np.shares_memory(got.probs, factors.probs)
    keep = keep_rule(iou[:, 1:])
    return tokens, got, engine.decode_kept_masks(tokens, hyper, keep), engine.decode_kept_masks(got, hyper, keep)


@pytest.mark.skipif(_ext.mask_upscaling_isa() == "generic", reason="the fused kernels run on AVX-512 or AVX2 CPUs")
def test_factored_image_tokens_give_the_same_masks(litemedsam_dir, data_dir):
    """Real weights (LiteMedSAM, point prompts): the image tokens in factored form reproduce the dense ones,
    and the kept masks' logits upscaled from the factors equal those upscaled from the dense tokens up to
    float rounding (binary masks at 0 identical but for a few boundary pixels at most)."""
    image = load_image(data_dir / "cardiac_mr" / "acdc2d_example" / "fixed.png").array
    engine = Engine.load(litemedsam_dir, threads=2)
    emb = engine.embed(image)
    coords, labels = amg.build_prompts(amg.AmgParams(prompt_kind="points", points_per_side=5), emb.frame)
    tokens, factors, dense, factored = _factored_both_ways(engine, emb.embedding, coords, labels,
                                                           lambda iou: iou > np.median(iou))
    np.testing.assert_allclose(factors.dense(), tokens, rtol=0, atol=1e-5 * float(np.abs(tokens).max()))
    assert len(dense) == len(coords) * 3 // 2
    np.testing.assert_allclose(factored, dense, rtol=0, atol=1e-5 * float(np.abs(dense).max()))
    assert ((factored > 0) != (dense > 0)).mean() < 1e-5


@pytest.mark.skipif(_ext.mask_upscaling_isa() == "generic", reason="the fused kernels run on AVX-512 or AVX2 CPUs")
def test_factors_buffer_is_kept_per_thread(tiny_dir):
    """The calling thread gets its last buffer back for the same sizes (no fresh memory per image), a new one
    for other sizes; another thread gets its own; probs is 64-byte aligned (the kernel streams into it)."""
    engine = Engine.load(tiny_dir, threads=2)
    first = engine.factors_buffer(4, 2)
    assert engine.factors_buffer(4, 2) is first
    assert first.probs.ctypes.data % 64 == 0 and len(first) == 4
    other = engine.factors_buffer(6, 2)
    assert other is not first and len(other) == 6 and engine.factors_buffer(6, 2) is other
    assert engine.factors_buffer(6, 1).probs.shape[3] == engine.two_way.num_heads * 6     # other points: new
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(engine.factors_buffer(4, 2)))
    thread.start()
    thread.join()
    assert elsewhere[0] is not first and len(elsewhere[0]) == 4


@pytest.mark.skipif(_ext.mask_upscaling_isa() == "generic", reason="the fused kernels run on AVX-512 or AVX2 CPUs")
def test_factors_buffer_only_where_both_kernels_take_it(tiny_dir):
    """A factors buffer exists only when the fused decoder and the fused upscaling both run; factored image
    tokens also go through the upscaling graph (densified); a buffer too small is an InputError."""
    assert Engine.load(tiny_dir, fused_upscaling=False).factors_buffer(4, 2) is None
    assert Engine.load(tiny_dir, fused_tokens=False).factors_buffer(4, 2) is None
    engine = Engine.load(tiny_dir, threads=2)
    assert engine.factors_buffer(4, 4) is None                  # 4 points: the graph decodes them
    rng = np.random.default_rng(6)
    emb = engine.embed(rng.integers(0, 255, (64, 64), np.uint8)).embedding
    coords = np.concatenate([rng.uniform(0, 255, (5, 1, 2)), np.zeros((5, 1, 2))], axis=1).astype(np.float32)
    labels = np.tile([1.0, -1.0], (5, 1)).astype(np.float32)
    _, _, dense, factored = _factored_both_ways(engine, emb, coords, labels, lambda iou: iou > np.median(iou))
    np.testing.assert_allclose(factored, dense, rtol=0, atol=1e-5 * float(np.abs(dense).max()))
    graph_engine = Engine.load(tiny_dir, threads=2, fused_upscaling=False)
    _, hyper, got = engine.decode_tokens(emb, coords, labels, mask_outputs=(1, 2, 3),
                                         factors=engine.factors_buffer(5, 2))
    keep = np.ones((5, 3), bool)
    np.testing.assert_allclose(graph_engine.decode_kept_masks(got, hyper, keep), engine.decode_kept_masks(got, hyper, keep),
                               rtol=0, atol=1e-4 * float(np.abs(dense).max()))
    with pytest.raises(InputError, match="factors: expected"):
        engine.decode_tokens(emb, coords, labels, factors=engine.factors_buffer(4, 2))


def test_encoder_parts_give_the_encoder_graph_embedding(tiny_dir, tmp_path):
    """A ViT export's encoder runs as its parts around the native global attention (on AVX-512 CPUs, fp32),
    with the single graph's embedding up to float rounding; fused_encoder=False runs the graph; a changed
    part is a ManifestError naming it."""
    parts = Engine.load(tiny_dir, threads=2)
    graph = Engine.load(tiny_dir, threads=2, fused_encoder=False)
    assert not graph.encoder_parts and "encoder" in graph.sessions
    if _ext.mask_upscaling_isa() != "avx512":
        assert not parts.encoder_parts
        pytest.skip("the native attention kernel runs on AVX-512 CPUs")
    assert len(parts.encoder_parts) == 2 and "encoder" not in parts.sessions
    # ONNX Runtime's threads do not spin after a part's run (the native attention runs next on the same CPUs)
    spinning = "session.intra_op.allow_spinning"
    assert all(p.get_session_options().get_session_config_entry(spinning) == "0" for p in parts.encoder_parts)
    with pytest.raises(RuntimeError, match="does not have configuration"):    # ONNX Runtime's default: spinning
        parts.sessions["decoder_tokens"].get_session_options().get_session_config_entry(spinning)
    image = np.random.default_rng(8).integers(0, 255, (90, 130), np.uint8)
    got, want = parts.embed(image), graph.embed(image)
    assert got.frame == want.frame
    np.testing.assert_allclose(got.embedding, want.embedding, rtol=0, atol=1e-5 * float(np.abs(want.embedding).max()))
    assert parts.with_spec(parts.spec).encoder_parts == parts.encoder_parts
    copy = _copy(tiny_dir, tmp_path)
    path = copy / "encoder_part0.onnx"
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    with pytest.raises(ManifestError, match="encoder_part0.onnx"):
        Engine.load(copy)
    Engine.load(copy, fused_encoder=False)        # the part is not read then


def test_encoder_attention_choice(tiny_dir, monkeypatch):
    """fp32 engines run the encoder parts' attention in float32 unless told otherwise; an unknown choice is an
    InputError, and 'bf16' on a CPU without AVX512-BF16 (nor AMX tiles) a ModelError."""
    assert Engine.load(tiny_dir, threads=1).encoder_attention == "fp32"
    with pytest.raises(InputError, match="encoder_attention: expected 'auto', 'fp32' or 'bf16', got 'int8'"):
        Engine.load(tiny_dir, encoder_attention="int8")
    if _ext.has_avx512_bf16() and _ext.mask_upscaling_isa() == "avx512":
        parts = Engine.load(tiny_dir, threads=2, encoder_attention="bf16")
        assert parts.encoder_attention == "bf16" and parts.with_spec(parts.spec).encoder_attention == "bf16"
        image = np.random.default_rng(8).integers(0, 255, (90, 130), np.uint8)
        got = parts.embed(image).embedding.ravel()
        want = Engine.load(tiny_dir, threads=2).embed(image).embedding.ravel()
        assert not np.array_equal(got, want)
        assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) >= 0.999
    monkeypatch.setattr(engine_module._ext, "has_avx512_bf16", lambda: False)
    with pytest.raises(ModelError, match=r"encoder_attention 'bf16' needs AVX512-BF16 \(or AMX tiles\)"):
        Engine.load(tiny_dir, encoder_attention="bf16")



@pytest.mark.skipif(_ext.mask_upscaling_isa() == "generic", reason="the fused kernels run on AVX-512 or AVX2 CPUs")
def test_image_side_on_factors_equals_the_dense_passes(litemedsam_dir, data_dir):
    """Real weights (LiteMedSAM, its box prompts): both layers' image sides computed from factors
    (two_way_factored on the prepared image's features) give the token outputs of the dense passes
    (two_way_pass over the image tokens), image tokens equal to theirs when densified, and the same kept
    masks, up to float rounding; a SharedImage without the features cannot give factors."""
    image = load_image(data_dir / "cardiac_mr" / "acdc2d_example" / "fixed.png").array
    engine = Engine.load(litemedsam_dir, threads=2)
    emb = engine.embed(image)
    params = amg.AmgParams(prompt_kind="boxes", points_per_side=6, box_sizes=(0.4,), mask_output="single")
    coords, labels = amg.build_prompts(params, emb.frame)
    prepared = engine.prepare(emb.embedding)
    assert len(prepared.features) == 2 and all(f.ctypes.data % 64 == 0 for f in prepared.features)
    factors = engine.factors_buffer(len(coords), coords.shape[1])
    iou, hyper, got = engine.decode_tokens(prepared, coords, labels, mask_outputs=(0,), factors=factors)
    iou0, hyper0, tokens = engine.decode_tokens(prepared, coords, labels, mask_outputs=(0,))
    np.testing.assert_allclose(iou, iou0, rtol=0, atol=1e-4)
    np.testing.assert_allclose(hyper, hyper0, rtol=0, atol=1e-4 * float(np.abs(hyper0).max()))
    np.testing.assert_allclose(got.dense(), tokens, rtol=0, atol=1e-4 * float(np.abs(tokens).max()))
    keep = np.ones((len(coords), 1), bool)
    masks, masks0 = engine.decode_kept_masks(got, hyper, keep), engine.decode_kept_masks(tokens, hyper0, keep)
    np.testing.assert_allclose(masks, masks0, rtol=0, atol=1e-4 * float(np.abs(masks0).max()))
    assert ((masks > 0) != (masks0 > 0)).mean() < 1e-4
    with pytest.raises(InputError, match="without the factored features"):
        engine.decode_tokens(dataclasses.replace(prepared, features=None), coords, labels, factors=factors)
