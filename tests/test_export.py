"""Export: graph structure and allow-list, decoder batching, parity against PyTorch per precision,
and the manifest's integrity checks. Each model is exported once per session."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from samreg_rt import _ext
from samreg_rt.engine import Engine
from samreg_rt.errors import InputError, ManifestError
from samreg_rt.manifest import FORMAT_VERSION, read_manifest, verify_files
from samreg_rt.spec import ModelSpec

torch = pytest.importorskip("torch")
from samreg_export import calibration, onnx_export, parity, quantize  # noqa: E402
from samreg_export.checkpoints import load_source  # noqa: E402
from samreg_export import export  # noqa: E402
from samreg_export.export import CALIBRATION_PHANTOMS, export_model, read_parity_image  # noqa: E402

PRECISIONS = ("fp32", "fp16", "int8")
PARITY_IMAGE = "prostate_mr/prostate_slice_s30/fixed.png"


def _figures(model_dir: Path) -> dict:
    return read_manifest(model_dir)["parity"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """random:tiny in every precision; 8 prompts of each kind are enough for structure tests."""
    return export_model("random:tiny", tmp_path_factory.mktemp("tiny"), precisions=PRECISIONS, parity_prompts=8)


@pytest.fixture(scope="session")
def tiny_model():
    return load_source("random:tiny").model


@pytest.fixture(scope="session")
def litemedsam_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    return export_model("litemedsam", tmp_path_factory.mktemp("litemedsam"), precisions=PRECISIONS,
                        parity_image=data_dir / PARITY_IMAGE)


@pytest.fixture(scope="session")
def vit_b_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """fp32 and int8 only: fp16 is covered on LiteMedSAM, and on this CPU ONNX Runtime runs most
    fp16 nodes in float32 anyway; converting and running ViT-B's fp16 graph adds minutes."""
    return export_model("random:vit_b", tmp_path_factory.mktemp("vit_b"), precisions=("fp32", "int8"),
                        parity_image=data_dir / PARITY_IMAGE)


# --- graph structure -------------------------------------------------------------------------

@pytest.mark.parametrize("precision", PRECISIONS)
def test_graphs_pass_checker_opset_and_allow_list(tiny_dir: Path, precision: str) -> None:
    manifest = read_manifest(tiny_dir)
    assert manifest["opset"] >= 17
    allowed = onnx_export.PORTABLE_OPS | (onnx_export.INT8_CPU_OPS if precision == "int8" else set())
    parts = {"encoder_part0", "encoder_part1"} if precision != "fp16" else set()   # ViT: fp32 and int8
    assert set(manifest["graphs"][precision]) == {"encoder", "decoder", "decoder_tokens", "decoder_masks"} | parts
    for graph in manifest["graphs"][precision]:
        model = onnx.load(str(tiny_dir / manifest["graphs"][precision][graph]["file"]))
        ops = onnx_export.check_graph(model, allowed)
        assert onnx_export.onnx_opset(model) >= 17
        if precision != "int8":
            assert not ops & onnx_export.INT8_CPU_OPS


def test_allow_list_rejects_unknown_op() -> None:
    node = onnx.helper.make_node("NonZero", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT64, [1, None])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    with pytest.raises(onnx_export.GraphCheckError, match="NonZero"):
        onnx_export.check_graph(model)


def test_io_names_and_shapes(tiny_dir: Path) -> None:
    io = read_manifest(tiny_dir)["io"]
    assert io["encoder"]["inputs"] == [{"name": "image", "shape": [1, 3, 256, 256], "dtype": "float32"}]
    assert io["encoder"]["outputs"] == [{"name": "image_embeddings", "shape": [1, 256, 64, 64], "dtype": "float32"}]
    assert [(v["name"], v["shape"]) for v in io["decoder"]["inputs"]] == [
        ("image_embeddings", [1, 256, 64, 64]), ("point_coords", ["B", "N", 2]), ("point_labels", ["B", "N"])]
    assert [(v["name"], v["shape"]) for v in io["decoder"]["outputs"]] == [
        ("iou_predictions", ["B", 4]), ("low_res_masks", ["B", 4, 256, 256])]
    assert io["decoder_tokens"]["inputs"] == io["decoder"]["inputs"]
    assert [(v["name"], v["shape"]) for v in io["decoder_tokens"]["outputs"]] == [
        ("iou_predictions", ["B", 4]), ("hyper_in", ["B", 4, 32]), ("image_tokens", ["B", 4096, 256])]
    assert [(v["name"], v["shape"]) for v in io["decoder_masks"]["inputs"]] == [
        ("image_tokens", ["B", 4096, 256]), ("hyper_in", ["B", "K", 32])]
    assert [(v["name"], v["shape"]) for v in io["decoder_masks"]["outputs"]] == [("low_res_masks", ["B", "K", 256, 256])]
    for precision in PRECISIONS:  # every precision keeps float32 inputs and outputs
        session = parity.session(tiny_dir / read_manifest(tiny_dir)["graphs"][precision]["decoder"]["file"])
        assert {v.type for v in session.get_inputs() + session.get_outputs()} == {"tensor(float)"}


# --- decoder batching --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["points", "boxes"])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_decoder_any_batch_matches_pytorch(tiny_dir: Path, tiny_model, kind: str, batch: int) -> None:
    """The graph runs at any B; rows first, middle and last match PyTorch (the PyTorch decoder
    is per-prompt, so checking a subset keeps the test cheap)."""
    make = parity.point_prompts if kind == "points" else parity.box_prompts
    coords, labels = make(batch, 256, seed=batch)
    embedding = np.random.default_rng(batch).standard_normal((1, 256, 64, 64)).astype(np.float32)
    iou, masks = parity.session(tiny_dir / "decoder.onnx").run(
        None, {"image_embeddings": embedding, "point_coords": coords, "point_labels": labels})
    assert iou.shape == (batch, 4) and masks.shape == (batch, 4, 256, 256)
    rows = sorted({0, batch // 2, batch - 1})
    ref_iou, ref_masks = parity.torch_decoder(tiny_model, embedding, coords[rows], labels[rows], kind)
    assert parity.max_abs(ref_iou, iou[rows]) <= 1e-4
    assert parity.max_abs(ref_masks, masks[rows]) <= 1e-4


def test_decoder_several_points_with_padding(tiny_dir: Path, tiny_model) -> None:
    coords = np.float32([[[10, 20], [200, 40], [50, 250], [0, 0]], [[5, 5], [6, 6], [128, 128], [0, 0]]])
    labels = np.float32([[1, 0, 1, -1], [1, 1, 0, -1]])
    embedding = np.random.default_rng(0).standard_normal((1, 256, 64, 64)).astype(np.float32)
    iou, masks = parity.session(tiny_dir / "decoder.onnx").run(
        None, {"image_embeddings": embedding, "point_coords": coords, "point_labels": labels})
    ref_iou, ref_masks = parity.torch_decoder(tiny_model, embedding, coords, labels, "points")
    assert parity.max_abs(ref_iou, iou) <= 1e-4 and parity.max_abs(ref_masks, masks) <= 1e-4


# --- parity -----------------------------------------------------------------------------------

def _assert_parity(model_dir: Path, precisions: tuple[str, ...] = PRECISIONS) -> None:
    figures = _figures(model_dir)
    assert set(figures) == set(precisions)
    for precision in precisions:
        assert parity.check_bounds(precision, figures[precision]) == [], (precision, figures[precision])
        assert figures[precision]["within_bounds"] is True
        assert set(figures[precision]["decoder"]) == {"points", "boxes"}
        assert set(figures[precision]["decoder_split"]) == {"points", "boxes"}
        if precision != "fp32":
            assert set(figures[precision]["end_to_end"]) == {"points", "boxes"}


def test_parity_litemedsam(litemedsam_dir: Path) -> None:
    _assert_parity(litemedsam_dir)
    manifest = read_manifest(litemedsam_dir)
    assert manifest["parity_setup"]["prompts"]["points"] == 64
    assert manifest["source"]["trained"] is True and manifest["spec"]["trained"] is True
    assert manifest["spec"]["prompt_kind"] == "boxes"
    assert "encoder_part0" not in manifest["graphs"]["fp32"]          # TinyViT: no global rel-pos attention
    assert "encoder_parts" not in manifest["parity"]["fp32"]


@pytest.mark.slow
def test_parity_vit_b_random(vit_b_dir: Path) -> None:
    _assert_parity(vit_b_dir, ("fp32", "int8"))
    manifest = read_manifest(vit_b_dir)
    assert manifest["source"]["trained"] is False and manifest["spec"]["trained"] is False
    assert manifest["spec"]["input_size"] == 1024


def test_fp32_parity_bounds_are_tight(tiny_dir: Path) -> None:
    fp32 = _figures(tiny_dir)["fp32"]
    assert fp32["encoder"]["max_abs"] <= 1e-3 and fp32["encoder"]["cosine"] >= 0.9999
    assert fp32["encoder_parts"]["max_abs"] <= 1e-3 and fp32["encoder_parts"]["cosine"] >= 0.9999
    assert _figures(tiny_dir)["int8"]["encoder_parts"]["cosine"] >= 0.99
    for kind in ("points", "boxes"):
        for section in ("decoder", "decoder_split"):
            assert fp32[section][kind]["iou_max_abs"] <= 1e-3
            assert fp32[section][kind]["mask_max_abs"] <= 1e-3


# --- manifest ---------------------------------------------------------------------------------

def test_manifest_contents(tiny_dir: Path) -> None:
    manifest = read_manifest(tiny_dir)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["source"]["id"].startswith("random:tiny") and manifest["source"]["trained"] is False
    spec = ModelSpec.from_dict(manifest["spec"])
    assert spec.arch == "tiny" and spec.input_size == 256 and spec.trained is False
    assert set(manifest["graphs"]) == set(PRECISIONS) == set(manifest["precisions"])
    assert manifest["graphs"]["fp16"]["encoder"]["file"] == "encoder.fp16.onnx"
    assert manifest["graphs"]["int8"]["encoder"]["file"] == "encoder.int8.onnx"
    for graph in ("decoder", "decoder_tokens", "decoder_masks"):              # fp32 decoders reused
        assert manifest["graphs"]["int8"][graph] == manifest["graphs"]["fp32"][graph]
    assert {"torch", "onnx", "onnxslim", "onnxruntime", "samreg_rt"} <= set(manifest["exporter"])
    assert set(manifest["operators"]["fp32"]["encoder"]) <= onnx_export.PORTABLE_OPS
    assert "MatMulInteger" in manifest["operators"]["int8"]["encoder"]
    # the ViT encoder cut at its one global-attention block: two parts, fp32 and int8 (quantized as the encoder)
    for precision in ("fp32", "int8"):
        assert [g for g in manifest["graphs"][precision] if g.startswith("encoder_part")] == \
            ["encoder_part0", "encoder_part1"]
    assert not any(g.startswith("encoder_part") for g in manifest["graphs"]["fp16"])
    for part in ("encoder_part0", "encoder_part1"):
        assert set(manifest["operators"]["fp32"][part]) <= onnx_export.PORTABLE_OPS
        assert "MatMulInteger" in manifest["operators"]["int8"][part]
        assert manifest["graphs"]["int8"][part]["file"] == f"{part}.int8.onnx"
    for precision in PRECISIONS:
        verify_files(tiny_dir, manifest, precision)


@pytest.fixture
def model_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


def _edit_manifest(model_dir: Path, edit) -> None:
    path = model_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_tampered_graph_byte_names_file(model_copy: Path) -> None:
    path = model_copy / "decoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"decoder\.onnx.*sha256"):
        verify_files(model_copy, read_manifest(model_copy), "fp32")


def test_changed_sha_names_file(model_copy: Path) -> None:
    _edit_manifest(model_copy, lambda m: m["graphs"]["int8"]["encoder"].update(sha256="0" * 64))
    verify_files(model_copy, read_manifest(model_copy), "fp32")
    with pytest.raises(ManifestError, match=r"encoder\.int8\.onnx"):
        verify_files(model_copy, read_manifest(model_copy), "int8")


def test_truncated_graph_names_file(model_copy: Path) -> None:
    path = model_copy / "encoder.fp16.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ManifestError, match=r"encoder\.fp16\.onnx.*size"):
        verify_files(model_copy, read_manifest(model_copy), "fp16")


def test_missing_graph_names_file(model_copy: Path) -> None:
    (model_copy / "encoder.int8.onnx").unlink()
    with pytest.raises(ManifestError, match=r"encoder\.int8\.onnx.*missing"):
        verify_files(model_copy, read_manifest(model_copy), "int8")


def test_future_format_version(model_copy: Path) -> None:
    _edit_manifest(model_copy, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ManifestError, match="newer"):
        read_manifest(model_copy)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"format_version": 1}', ""])
def test_malformed_manifest(model_copy: Path, text: str) -> None:
    (model_copy / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match="manifest.json"):
        read_manifest(model_copy)


def test_missing_manifest_and_unknown_precision(model_copy: Path) -> None:
    with pytest.raises(ManifestError, match="no 'bf16' graphs"):
        verify_files(model_copy, read_manifest(model_copy), "bf16")
    (model_copy / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="missing"):
        read_manifest(model_copy)


def test_encoder_parts_match_pytorch_where_relative_positions_matter(tmp_path: Path) -> None:
    """The parts chained through the native attention kernel give the PyTorch encoder's embedding, with
    relative-position tables large enough that their terms move the embedding (random init's are small)."""
    from samreg_rt.split_encoder import run_encoder_parts

    sam = load_source("random:tiny", seed=3).model.eval()
    attn = sam.image_encoder.blocks[1].attn
    image = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        attn.rel_pos_h.mul_(40.0)
        attn.rel_pos_w.mul_(40.0)
        want = sam.image_encoder(image).numpy()
        tables = attn.rel_pos_h.clone(), attn.rel_pos_w.clone()
        attn.rel_pos_h.zero_()
        attn.rel_pos_w.zero_()
        without = sam.image_encoder(image).numpy()
        attn.rel_pos_h.copy_(tables[0])
        attn.rel_pos_w.copy_(tables[1])
    assert np.abs(want - without).max() > 0.1
    paths = onnx_export.export_encoder_parts(sam, tmp_path)
    assert [p.name for p in paths] == ["encoder_part0.onnx", "encoder_part1.onnx"]
    got = run_encoder_parts([parity.session(p) for p in paths], image.numpy())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_encoder_parts_only_for_vit_encoders() -> None:
    assert onnx_export.encoder_parts_supported(load_source("random:tiny").model)
    assert not onnx_export.encoder_parts_supported(load_source("litemedsam").model)


def test_encoder_part_entries_are_checked(model_copy: Path) -> None:
    _edit_manifest(model_copy, lambda m: m["graphs"]["fp32"]["encoder_part1"].update(file="../x.onnx"))
    with pytest.raises(ManifestError, match="encoder_part1.file"):
        read_manifest(model_copy)


def test_tampered_encoder_part_names_file(model_copy: Path) -> None:
    path = model_copy / "encoder_part1.onnx"
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    with pytest.raises(ManifestError, match="encoder_part1.onnx"):
        verify_files(model_copy, read_manifest(model_copy), "fp32")


def test_file_entry_outside_directory_is_rejected(model_copy: Path) -> None:
    _edit_manifest(model_copy, lambda m: m["graphs"]["fp32"]["encoder"].update(file="../encoder.onnx"))
    with pytest.raises(ManifestError, match="plain file name"):
        read_manifest(model_copy)


def test_external_data_graph_is_listed_and_verified(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A graph over the protobuf limit (ViT-H fp32) is saved with one external-data file."""
    from samreg_export.manifest import file_entry

    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 1 << 20)
    files = onnx_export.save_model(onnx.load(str(tiny_dir / "encoder.onnx")), tmp_path / "encoder.onnx")
    assert [f.name for f in files] == ["encoder.onnx", "encoder.onnx.data"]
    entry = file_entry(files)
    assert entry["data"]["file"] == "encoder.onnx.data" and entry["bytes"] < 1 << 20
    image = np.zeros((1, 3, 256, 256), np.float32)
    expected = parity.session(tiny_dir / "encoder.onnx").run(None, {"image": image})[0]
    assert np.array_equal(parity.session(tmp_path / "encoder.onnx").run(None, {"image": image})[0], expected)


@pytest.mark.skipif(_ext.mask_upscaling_isa() != "avx512", reason="the native attention kernel runs on AVX-512 CPUs")
def test_int8_encoder_parts_give_the_int8_graph_embedding(tiny_dir):
    """The int8 export's encoder also runs as its (quantized) parts around the native global attention: the
    same dynamically quantized products as the single int8 graph, so the same embedding up to the rounding of
    the activations' quantization."""
    parts = Engine.load(tiny_dir, threads=2, precision="int8")
    graph = Engine.load(tiny_dir, threads=2, precision="int8", fused_encoder=False)
    assert len(parts.encoder_parts) == 2 and "encoder" not in parts.sessions and not graph.encoder_parts
    image = np.random.default_rng(9).integers(0, 255, (90, 130), np.uint8)
    got, want = parts.embed(image).embedding.ravel(), graph.embed(image).embedding.ravel()
    assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) >= 0.999


@pytest.mark.skipif(_ext.mask_upscaling_isa() != "avx512", reason="the native attention kernels run on AVX-512 CPUs")
def test_int8_engines_take_bf16_attention_where_the_cpu_has_avx512_bf16(tiny_dir, monkeypatch):
    """encoder_attention 'auto' runs an int8 engine's global attention in bfloat16 on CPUs with AVX512-BF16 (AMX
    tiles or VDPBF16PS; an embedding within the int8 graph's rounding of the float32-attention one), in float32
    elsewhere."""
    f32 = Engine.load(tiny_dir, threads=2, precision="int8", encoder_attention="fp32")
    if _ext.has_avx512_bf16():
        auto = Engine.load(tiny_dir, threads=2, precision="int8")
        assert auto.encoder_attention == "bf16"
        image = np.random.default_rng(9).integers(0, 255, (90, 130), np.uint8)
        got, want = auto.embed(image).embedding.ravel(), f32.embed(image).embedding.ravel()
        assert not np.array_equal(got, want)
        assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) >= 0.999
    monkeypatch.setattr(_ext, "has_avx512_bf16", lambda: False)
    assert Engine.load(tiny_dir, threads=2, precision="int8").encoder_attention == "fp32"


def test_has_vnni_reads_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    for flags, want in (("fpu avx2 avx512f avx512_vnni", True), ("fpu avx2 avx_vnni", True), ("fpu avx2 fma", False)):
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert quantize.has_vnni(info) is want
    assert quantize.has_vnni(tmp_path / "missing") is False


def test_int8_weights_take_the_full_range_where_the_cpu_has_vnni(tiny_dir, tmp_path, monkeypatch):
    """reduce_range=False quantizes the weights to the full int8 range, True to 7 bits; None follows has_vnni,
    and the manifest's note says which."""
    def peak(files):
        model = onnx.load(str(files[0]))
        return max(int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int32)).max())
                   for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8)

    src = tiny_dir / "encoder.onnx"
    assert peak(quantize.to_int8(src, tmp_path / "full.onnx", reduce_range=False)) == 127
    assert peak(quantize.to_int8(src, tmp_path / "reduced.onnx", reduce_range=True)) <= 64
    for vnni in (True, False):
        monkeypatch.setattr(quantize, "has_vnni", lambda vnni=vnni: vnni)
        assert (peak(quantize.to_int8(src, tmp_path / f"auto{vnni}.onnx")) == 127) is vnni
        assert ("full 8-bit range" in quantize.precision_note("int8")) is vnni
    assert quantize.precision_note("fp32") == quantize.PRECISION_NOTES["fp32"]


def _batched_constant_products(model: onnx.ModelProto) -> int:
    """How many float MatMuls take a 3-D constant (a ViT's relative position terms)."""
    inits = {t.name: t for t in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
               and len(inits[n.input[1]].dims) == 3 and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT)


def test_relative_position_terms_are_float_products(tiny_dir):
    """The relative position terms are exported as MatMuls with the gathered tables as 3-D constants (no Einsum,
    which ONNX Runtime runs more slowly), and int8 quantizes only the 2-D weights, leaving them float."""
    for graph in ("encoder", "encoder_part0", "encoder_part1"):
        fp32 = onnx.load(str(tiny_dir / f"{graph}.onnx"))
        int8 = onnx.load(str(tiny_dir / f"{graph}.int8.onnx"))
        assert not any(n.op_type == "Einsum" for n in fp32.graph.node), graph
        # random:tiny's part 1 finishes the last (global) block: no attention logits of its own
        assert _batched_constant_products(fp32) >= (0 if graph == "encoder_part1" else 2), graph
        assert _batched_constant_products(int8) == _batched_constant_products(fp32), graph
        weights = len(calibration.weight_products(fp32))
        assert weights >= 2 and sum(n.op_type == "MatMulInteger" for n in int8.graph.node) == weights, graph


def _int8_weights(path: Path) -> set[bytes]:
    model = onnx.load(str(path))
    return {onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8
            and len(t.dims) == 2}


def _gptq_weights(fp32_path: Path, hessians: dict, qmax: int) -> set[bytes]:
    model = onnx.load(str(fp32_path))
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    out = set()
    for node, name in calibration.weight_products(model):
        kn = calibration.as_kn(node, values[name])
        out.add(calibration.gptq_round(kn, hessians[calibration.weight_key(kn)], qmax)[0].tobytes())
    return out


def test_int8_weights_are_the_gptq_rounding(tiny_dir, tmp_path):
    """Every int8 weight of the encoder and of its parts is GPTQ's rounding, calibrated by default on the synthetic
    phantoms of the whole fp32 encoder (the parts share its weights): the quantizer reproduces it exactly, on the
    full and on the 7-bit grid."""
    calib = export.calibrate(tiny_dir / "encoder.onnx", ModelSpec.from_dict(read_manifest(tiny_dir)["spec"]), None)
    hessians, qmax = calib.hessians, 127 if quantize.has_vnni() else 64
    for graph in ("encoder", "encoder_part0", "encoder_part1"):
        want = _gptq_weights(tiny_dir / f"{graph}.onnx", hessians, qmax)
        assert len(want) >= 2 and _int8_weights(tiny_dir / f"{graph}.int8.onnx") == want, graph
    assert f"GPTQ calibrated on {CALIBRATION_PHANTOMS} synthetic phantoms" in read_manifest(tiny_dir)["precisions"]["int8"]
    # the 7-bit grid of CPUs without VNNI too
    files = quantize.to_int8(tiny_dir / "encoder.onnx", tmp_path / "reduced.onnx", reduce_range=True, calib=calib)
    assert _int8_weights(files[0]) == _gptq_weights(tiny_dir / "encoder.onnx", hessians, 64)


def test_gptq_brings_the_litemedsam_int8_encoder_closer_to_fp32(litemedsam_dir, data_dir, tmp_path):
    """Real weights: the export's int8 encoder (GPTQ on the phantoms) against the same recipe rounded to nearest,
    embedding cosine to fp32 on a cardiac MR image (scratch, 18 images: 0.9980 against 0.9969)."""
    spec = ModelSpec.from_dict(read_manifest(litemedsam_dir)["spec"])
    image = parity.model_input(read_parity_image(data_dir / "cardiac_mr/acdc_patient067_slice_s3/fixed.png"), spec)
    quantize.to_int8(litemedsam_dir / "encoder.onnx", tmp_path / "nearest.onnx")

    def embed(path):
        return parity.session(path).run(None, {"image": image})[0].ravel().astype(np.float64)

    want = embed(litemedsam_dir / "encoder.onnx")
    cos = {name: float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) for name, got in
           (("gptq", embed(litemedsam_dir / "encoder.int8.onnx")), ("nearest", embed(tmp_path / "nearest.onnx")))}
    assert cos["gptq"] >= 0.997 and 1 - cos["gptq"] < 0.8 * (1 - cos["nearest"]), cos


def test_unreadable_calibration_image_is_named_before_any_export(tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"no image here")
    with pytest.raises(InputError, match=f"{bad}: cannot read as an image"):
        export_model("random:tiny", tmp_path / "out", precisions=("fp32", "int8"), calibration_images=[bad])
    assert not (tmp_path / "out").exists()


def test_int8_calibration_images_are_named_in_the_manifest(data_dir, tmp_path):
    image = data_dir / PARITY_IMAGE
    out = export_model("random:tiny", tmp_path / "tiny", precisions=("fp32", "int8"), parity_prompts=4,
                       calibration_images=[image])
    assert f"GPTQ calibrated on {image}" in read_manifest(out)["precisions"]["int8"]
    spec = ModelSpec.from_dict(read_manifest(out)["spec"])
    hessians = export.calibrate(out / "encoder.onnx", spec, [image]).hessians
    qmax = 127 if quantize.has_vnni() else 64
    assert _int8_weights(out / "encoder.int8.onnx") == _gptq_weights(out / "encoder.onnx", hessians, qmax)
