"""scripts/device_bundle.py: the parts that carry the GPU check's bundle to a lent GPU machine, checked and joined
back to the same bytes; a missing, foreign or damaged part is a BundleError naming it."""
from __future__ import annotations

import importlib.util
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("device_bundle", REPO / "scripts" / "device_bundle.py")
device_bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(device_bundle)


@pytest.fixture
def bundle(tmp_path):
    path = tmp_path / "bundle.tar"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 10_000, np.uint8).tobytes())
    return path


def test_parts_join_back_to_the_bundle(bundle, tmp_path):
    index = device_bundle.split(bundle, tmp_path / "parts", 3_000)
    assert [p["bytes"] for p in index["parts"]] == [3_000, 3_000, 3_000, 1_000]
    assert json.loads((tmp_path / "parts" / "index.json").read_text()) == index
    store = tmp_path / "store"
    for n, entry in enumerate(index["parts"]):
        missing = device_bundle.receive(tmp_path / "parts" / entry["file"], index, store)
        assert missing == [e["file"] for e in index["parts"][n + 1:]]
    joined = device_bundle.join(store, index, tmp_path / "out" / "joined.tar")
    assert joined.read_bytes() == bundle.read_bytes()
    # a second split of another bundle leaves no part of the first behind
    bundle.write_bytes(b"x" * 10)
    assert [p["file"] for p in device_bundle.split(bundle, tmp_path / "parts", 3_000)["parts"]] == ["part-01.bin"]
    assert sorted(p.name for p in (tmp_path / "parts").glob("part-*.bin")) == ["part-01.bin"]


def test_bad_parts_are_bundle_errors(bundle, tmp_path):
    parts, store = tmp_path / "parts", tmp_path / "store"
    index = device_bundle.split(bundle, parts, 4_000)
    with pytest.raises(device_bundle.BundleError, match="parts not received yet: part-01.bin, part-02.bin"):
        device_bundle.join(store, index, tmp_path / "joined.tar")
    damaged = parts / "part-02.bin"
    data = bytearray(damaged.read_bytes())
    data[7] ^= 1
    damaged.write_bytes(bytes(data))
    with pytest.raises(device_bundle.BundleError, match="part-02.bin: not the part pack wrote"):
        device_bundle.receive(damaged, index, store)
    foreign = tmp_path / "part-09.bin"
    foreign.write_bytes(b"abc")
    with pytest.raises(device_bundle.BundleError, match="part-09.bin: not a part of this bundle"):
        device_bundle.receive(foreign, index, store)
    with pytest.raises(device_bundle.BundleError, match="part-01.bin.gone: missing"):
        device_bundle.receive(parts / "part-01.bin.gone", {"parts": [{"file": "part-01.bin.gone"}]}, store)
    # a part damaged in the store after it was received, and a bundle whose index was not the parts' own
    store.mkdir(exist_ok=True)
    for entry in index["parts"]:
        shutil.copyfile(parts / entry["file"], store / entry["file"])
    with pytest.raises(device_bundle.BundleError, match="part-02.bin: not the part pack wrote"):
        device_bundle.join(store, index, tmp_path / "joined.tar")
    shutil.copyfile(store / "part-01.bin", store / "part-02.bin")
    index["parts"][1] = dict(index["parts"][0], file="part-02.bin")
    with pytest.raises(device_bundle.BundleError, match="the joined parts are not the bundle pack wrote"):
        device_bundle.join(store, index, tmp_path / "joined.tar")
    with pytest.raises(ValueError, match="part_bytes must be positive"):
        device_bundle.split(bundle, parts, 0)


def test_the_bundle_holds_the_model_the_wheels_and_the_extension(tmp_path, monkeypatch):
    """pack's tar: the manifest, the graphs of the asked precisions and the kernels' weights, the wheels pip
    downloaded and samreg-rt's own (the download and the build stubbed: they need the network and CPython 3.12)."""
    model = tmp_path / "model"
    model.mkdir()
    graphs = {"fp32": {"encoder": {"file": "encoder.onnx"}, "decoder": {"file": "decoder.onnx"}},
              "fp16": {"encoder": {"file": "encoder.fp16.onnx"}}, "int8": {"encoder": {"file": "encoder.int8.onnx"}}}
    weights = {"two_way": {"file": "two_way.npz"}}
    (model / "manifest.json").write_text(json.dumps({"graphs": graphs, "weights": weights}))
    for name in ("encoder.onnx", "decoder.onnx", "encoder.fp16.onnx", "encoder.int8.onnx", "two_way.npz"):
        (model / name).write_bytes(name.encode())
    own = tmp_path / "built" / "samreg_rt-0.1.0-cp312-cp312-linux_x86_64.whl"
    own.parent.mkdir()
    own.write_bytes(b"PK")
    monkeypatch.setattr(device_bundle, "build_wheel", lambda python312, work: own)

    def download(cmd, check):
        assert cmd[:4] == [device_bundle.sys.executable, "-m", "pip", "download"] and check
        target = Path(cmd[cmd.index("-d") + 1])
        for wheel in ("onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl", "faiss_cpu-1.15.1-x.whl"):
            (target / wheel).write_bytes(b"PK")

    monkeypatch.setattr(device_bundle.subprocess, "run", download)
    index = device_bundle.pack(model, ["fp32", "fp16"], 1 / 1024, "python3.12", tmp_path / "out")
    store = tmp_path / "store"
    for entry in index["parts"]:
        device_bundle.receive(tmp_path / "out" / "parts" / entry["file"], index, store)
    with tarfile.open(device_bundle.join(store, index, tmp_path / "joined.tar")) as tar:
        names = sorted(tar.getnames())
    assert names == sorted(["model/manifest.json", "model/encoder.onnx", "model/decoder.onnx", "model/two_way.npz",
                            "model/encoder.fp16.onnx", f"wheels/{own.name}", "wheels/faiss_cpu-1.15.1-x.whl",
                            "wheels/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"])
    with pytest.raises(SystemExit, match="no \\['int4'\\] graphs"):
        device_bundle.pack(model, ["fp32", "int4"], 1, "python3.12", tmp_path / "out")
