"""Faults: a batch killed with SIGKILL and rerun, two runs into one output folder, a model file
changed on disk after loading, and bounded memory for huge (decompression-bomb) inputs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from samreg_rt.batch import is_done
from samreg_rt.correspondence import Correspondence
from samreg_rt.engine import Engine
from samreg_rt.errors import ManifestError
from tests.bad_inputs.make_corpus import HUGE, nifti_bomb, png_bytes, random_tiny_dir

REGISTER = [sys.executable, "-m", "samreg_rt.cli", "register", "--model", "random_tiny", "--points-per-side", "2",
            "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    return random_tiny_dir()


def _pairs(folder: Path, n: int) -> Path:
    """n pairs of small textured images and their pairs list (ids p0..p{n-1})."""
    rng = np.random.default_rng(7)
    rows = ["fixed,moving,id"]
    for k in range(n):
        for side in ("f", "m"):
            img = (rng.random((48, 56)) * 80).astype(np.uint8)
            cv2.circle(img, (20 + k, 24), 12, 220, -1)
            cv2.imwrite(str(folder / f"{side}{k}.png"), img)
        rows.append(f"f{k}.png,m{k}.png,p{k}")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def _assert_complete(out: Path, ids: list[str]) -> None:
    """Every pair complete and readable, and no temporary file anywhere."""
    for pair_id in ids:
        target = out / pair_id
        assert is_done(target), pair_id
        record = json.loads((target / "run.json").read_text())
        corr = Correspondence.load(target / "correspondence.npz")
        assert record["counts"]["pairs"] == len(corr.pairs)
        assert (target / "pairs.csv").read_text().startswith("fixed_id,moving_id")
        assert cv2.imread(str(target / "overlay.png")) is not None
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_batch_killed_mid_way_resumes_without_registering_a_pair_twice(tiny_model, tmp_path):
    ids = [f"p{k}" for k in range(6)]
    pairs, out = _pairs(tmp_path, len(ids)), tmp_path / "out"
    proc = subprocess.Popen([*REGISTER, "--pairs", str(pairs), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while sum(is_done(out / i) for i in ids) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = [i for i in ids if is_done(out / i)]
    assert 2 <= len(done_before) < len(ids), f"the kill did not land mid-way: {done_before}"
    stamps = {i: _stamps(out / i) for i in done_before}
    pending = next(i for i in ids if i not in done_before)
    (out / pending).mkdir(parents=True, exist_ok=True)
    (out / pending / ".correspondence.npz.killed.tmp").write_bytes(b"half a file")  # as a kill mid-write leaves

    rerun = subprocess.run([*REGISTER, "--pairs", str(pairs), "--out", str(out)], capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert sorted(summary["skipped"]) == sorted(done_before)
    assert sorted(d["id"] for d in summary["done"]) == sorted(set(ids) - set(done_before))
    for pair_id in done_before:  # completed pairs were not touched, let alone recomputed
        assert _stamps(out / pair_id) == stamps[pair_id], pair_id
    _assert_complete(out, ids)


def test_two_runs_into_one_output_folder(tiny_model, tmp_path):
    ids = [f"p{k}" for k in range(4)]
    pairs, out = _pairs(tmp_path, len(ids)), tmp_path / "out"
    procs = [subprocess.Popen([*REGISTER, "--pairs", str(pairs), "--out", str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    summaries = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0
        summaries.append(json.loads(stdout))
    done = [{d["id"] for d in s["done"]} for s in summaries]
    assert not done[0] & done[1], f"pairs registered by both runs: {done[0] & done[1]}"
    assert done[0] | done[1] == set(ids)
    for s, d in zip(summaries, done):
        assert set(s["skipped"]) == set(ids) - d and not s["errors"]
    _assert_complete(out, ids)


def test_model_file_changed_after_loading_is_detected_at_the_next_load(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    engine = Engine.load(model, threads=1)
    image = np.random.default_rng(0).integers(0, 255, (40, 48), np.uint8)
    before = engine.embed(image).embedding
    role = "encoder_part0" if engine.encoder_parts else "encoder"     # the encoder graph that runs
    graph = model / engine.manifest["graphs"]["fp32"][role]["file"]
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit changed
    graph.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=f"{graph.name}: sha256 .* does not match"):
        Engine.load(model, threads=1)
    # the loaded engine runs the bytes it verified, not the file now on disk
    np.testing.assert_array_equal(engine.embed(image).embedding, before)


BOMB_PROBE = textwrap.dedent("""
    import resource, sys
    import numpy as np, cv2
    from samreg_rt.errors import InputError
    from samreg_rt.io import load_image
    from samreg_rt.volume import load_volume
    load_image(sys.argv[1])  # warm up every decoder and library once
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for loader, path in ((load_image, sys.argv[2]), (load_image, sys.argv[3]), (load_volume, sys.argv[4])):
        try:
            loader(path)
            print("LOADED", path)
        except InputError as exc:
            print("REFUSED", exc)
    print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
""")


def test_memory_is_bounded_for_decompression_bombs(tmp_path):
    """Files of about 2 MB that decode to 20000 x 20000 (400 MB as uint8) are refused from their
    headers: peak memory grows by far less than one decoded copy."""
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.full((32, 32), 9, np.uint8))
    png = tmp_path / "bomb.png"
    png.write_bytes(png_bytes(HUGE, HUGE))
    slice_bomb = nifti_bomb(tmp_path / "bomb2d.nii.gz", (HUGE, HUGE))
    volume_bomb = nifti_bomb(tmp_path / "bomb3d.nii.gz", (HUGE, HUGE, 1))
    assert png.stat().st_size < 4_000_000 and slice_bomb.stat().st_size < 4_000_000
    proc = subprocess.run([sys.executable, "-c", BOMB_PROBE, str(small), str(png), str(slice_bomb),
                           str(volume_bomb)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["REFUSED"] * 3 + ["GROWTH_KB"], proc.stdout
    assert all("exceeds the limit" in ln for ln in lines[:3]), proc.stdout
    growth_mb = int(lines[-1].split()[1]) / 1024
    assert growth_mb < 100, f"peak memory grew by {growth_mb:.0f} MB while refusing the bombs"
