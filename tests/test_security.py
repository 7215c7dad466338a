"""Security: checkpoints never execute pickled code, pairs-list ids and pair folders cannot put
outputs outside the output folder, and registering touches no network."""
from __future__ import annotations

import pickle
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest

from samreg_rt.batch import read_pairs_list, register_many
from samreg_rt.cli import main
from samreg_rt.errors import CheckpointError, InputError
from tests.bad_inputs.make_corpus import random_tiny_dir


class _Payload:
    """Unpickling this object would create the marker file (arbitrary code execution)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_checkpoint_is_refused_without_running_its_code(tmp_path, writer):
    torch = pytest.importorskip("torch")
    from samreg_export.checkpoints import load_source

    marker = tmp_path / "pwned"
    path = tmp_path / "sam_vit_b_evil.pth"
    state = {"image_encoder.pos_embed": _Payload(marker)}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=f"{path.name}: not a readable checkpoint"):
        load_source(str(path))
    assert not marker.exists(), "unpickling ran the checkpoint's code"


@pytest.mark.parametrize("pair_id", ["..", "../x", "a/../../x", "/etc", "a/b", ".hidden", "a\\..\\b", "~root",
                                     "x\x00y", " ", "é/.."])
def test_pairs_list_ids_cannot_leave_the_output_folder(tmp_path, pair_id):
    path = tmp_path / "pairs.csv"
    path.write_text(f"fixed,moving,id\na.png,b.png,\"{pair_id}\"\n")
    with pytest.raises(InputError, match="plain name"):
        read_pairs_list(path)


def test_symlinked_pair_folder_is_refused(tmp_path):
    outside, out = tmp_path / "outside", tmp_path / "out"
    outside.mkdir()
    out.mkdir()
    (out / "p1").symlink_to(outside, target_is_directory=True)
    summary = register_many([("p1", "a.png", "b.png")], engine=None, out_dir=out, progress=False)
    assert "symbolic link" in summary["errors"]["p1"]
    assert not any(outside.iterdir())


def test_registering_touches_no_network(tmp_path, monkeypatch):
    random_tiny_dir()  # exported before the network is cut (export is the only step that may fetch)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted")

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    rng = np.random.default_rng(3)
    for name in ("fixed.png", "moving.png"):
        cv2.imwrite(str(tmp_path / name), (rng.random((40, 48)) * 255).astype(np.uint8))
    out = tmp_path / "out"
    code = main(["register", str(tmp_path / "fixed.png"), str(tmp_path / "moving.png"), "--model", "random_tiny",
                 "--points-per-side", "2", "--threads", "1", "--out", str(out)])
    assert code == 0 and (out / "run.json").is_file()
    assert main(["embed", str(tmp_path / "fixed.png"), "--model", "random_tiny"]) == 0
    assert attempts == []
