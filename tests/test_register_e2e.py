"""End to end with LiteMedSAM's real weights: CLI, outputs, batch resume, prompt mode, odd inputs."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest

from samreg_rt.batch import is_done, register_many
from samreg_rt.cli import main
from samreg_rt.correspondence import Correspondence
from samreg_rt.engine import Engine
from samreg_rt.io import load_image
from samreg_rt.pipeline import register
from samreg_rt.prompt import register_prompts
from tests.conftest import EXAMPLE

GRID = ["--points-per-side", "8", "--pred-iou-thresh", "0.7"]
FAST = {"points_per_side": 8, "pred_iou_thresh": 0.7}


@pytest.fixture(scope="module")
def engine(litemedsam_dir):
    return Engine.load(litemedsam_dir, threads=2)


def test_cli_register_writes_every_output(litemedsam_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["register", str(EXAMPLE / "fixed.png"), str(EXAMPLE / "moving.png"), "--model", str(litemedsam_dir),
                 "--out", str(out), "--threads", "2", *GRID, "--ddf"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["failed"] == 0 and len(summary["done"]) == 1
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["name"] == "litemedsam" and run["model"]["trained"] is True
    assert run["model"]["provider"] == "CPUExecutionProvider" and len(run["model"]["manifest_sha256"]) == 64
    assert {"encode_fixed", "amg_fixed", "match", "write", "ddf"} <= set(run["timings_s"])
    corr = Correspondence.load(out / "correspondence.npz")
    assert len(corr.pairs) >= 1 and corr.fixed.original_shape == (216, 256)
    rows = list(csv.DictReader(open(out / "pairs.csv")))
    assert len(rows) == len(corr.pairs)
    assert all(0 <= float(r["fixed_cx"]) < 256 and 0 <= float(r["fixed_cy"]) < 216 for r in rows)
    overlay = cv2.imread(str(out / "overlay.png"))
    assert overlay is not None and overlay.shape[0] == 400
    field = np.load(out / "ddf.npy")
    assert field.shape == (216, 256, 2) and np.isfinite(field).all()
    assert run["ddf"]["folding_ratio"] < 0.01
    assert not list(out.glob(".*.tmp"))


# What the main job (an fp32 pair from the CLI, no field) must not import: each costs 0.5-1 s of every run's start
# (onnx: only the bf16 engines' graph surgery; scipy: the field, metrics, baselines, Hungarian matching).
_DEFERRED = ("onnx", "scipy", "torch", "samreg_rt.evaluate", "samreg_rt.ddf")
_IMPORTS_SCRIPT = """
import json, sys
from samreg_rt.cli import main
code = main(sys.argv[1:])
deferred = {names}
loaded = lambda: sorted(n for n in deferred if n in sys.modules)
before = loaded()
import samreg_rt.evaluate
print(json.dumps({{"code": code, "before": before, "after_evaluate": loaded()}}))
"""


def test_cli_register_imports_only_what_it_runs(litemedsam_dir, tmp_path):
    script = _IMPORTS_SCRIPT.format(names=repr(_DEFERRED))
    proc = subprocess.run([sys.executable, "-c", script, "register", str(EXAMPLE / "fixed.png"),
                           str(EXAMPLE / "moving.png"), "--model", str(litemedsam_dir), "--out", str(tmp_path / "o"),
                           "--threads", "2", *GRID], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and (tmp_path / "o" / "run.json").is_file()
    assert result["before"] == []
    # the check sees such imports: the eval command's module brings scipy and the field with it
    assert {"scipy", "samreg_rt.ddf", "samreg_rt.evaluate"} <= set(result["after_evaluate"])


def test_batch_skips_completed_and_redoes_partial(engine, tmp_path):
    jobs = [("a", str(EXAMPLE / "fixed.png"), str(EXAMPLE / "moving.png")),
            ("b", str(EXAMPLE / "moving.png"), str(EXAMPLE / "fixed.png"))]
    first = register_many(jobs[:1], engine, tmp_path, progress=False, **FAST)
    assert [d["id"] for d in first["done"]] == ["a"]
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "correspondence.npz", tmp_path / "b")  # as if killed before run.json
    assert not is_done(tmp_path / "b")
    second = register_many(jobs, engine, tmp_path, progress=False, **FAST)
    assert second["skipped"] == ["a"] and [d["id"] for d in second["done"]] == ["b"]
    assert is_done(tmp_path / "b")


def test_constant_image_gives_empty_correspondence_with_warning(engine):
    flat = np.full((120, 140), 80, np.uint8)
    with pytest.warns(UserWarning, match="no ROI survived"):
        reg = register(flat, str(EXAMPLE / "moving.png"), engine, points_per_side=4)
    assert len(reg.correspondence.pairs) == 0 and len(reg.correspondence.fixed.masks) == 0


def test_16bit_grey_and_rgba_inputs(engine, tmp_path):
    grey = load_image(EXAMPLE / "fixed.png").array[..., 0].astype(np.uint16) * 257
    rgba = np.dstack([load_image(EXAMPLE / "moving.png").array, np.full((216, 256), 255, np.uint8)])
    cv2.imwrite(str(tmp_path / "f16.png"), grey)
    cv2.imwrite(str(tmp_path / "m.png"), rgba)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = register(tmp_path / "f16.png", tmp_path / "m.png", engine, **FAST)
    assert reg.correspondence.fixed.original_shape == (216, 256)
    assert reg.counts["fixed"]["prompts"] == reg.counts["moving"]["prompts"]


def test_prompt_mode_is_deterministic(engine):
    box = [(60.0, 40.0, 120.0, 110.0), (150.0, 100.0)]
    a = register_prompts(str(EXAMPLE / "fixed.png"), str(EXAMPLE / "moving.png"), engine, box)
    b = register_prompts(str(EXAMPLE / "fixed.png"), str(EXAMPLE / "moving.png"), engine, box)
    assert len(a.pairs) == 2 and np.array_equal(a.moving.masks, b.moving.masks)
    assert a.fixed.unpacked()[0].sum() > 0 and a.moving.unpacked()[0].sum() > 0
    assert -1 <= a.similarity.min() and a.similarity.max() <= 1


def test_prompt_outside_image_is_an_error(engine):
    from samreg_rt.errors import InputError

    with pytest.raises(InputError, match="outside the fixed image"):
        register_prompts(str(EXAMPLE / "fixed.png"), str(EXAMPLE / "moving.png"), engine, [(500.0, 10.0)])


@pytest.mark.parametrize("content", [b"", b"not an image"])
def test_cli_bad_image_names_file_and_leaves_nothing(litemedsam_dir, tmp_path, capsys, content):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    out = tmp_path / "out"
    code = main(["register", str(bad), str(EXAMPLE / "moving.png"), "--model", str(litemedsam_dir),
                 "--out", str(out), *GRID])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1 and summary["failed"] == 1
    assert str(bad) in next(iter(summary["errors"].values()))
    assert not out.exists() or not any(out.iterdir())


def test_cli_usage_errors(capsys):
    assert main(["register", str(EXAMPLE / "fixed.png"), "--out", "x"]) == 2
    assert "FIXED MOVING" in capsys.readouterr().err


def test_cli_export_passes_the_calibration_images_to_the_exporter(monkeypatch, tmp_path):
    """``samreg-rt export`` runs ``python -m samreg_export`` with the registry's source, and ``--calibration``."""
    import samreg_rt.cli as cli

    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    images = [str(EXAMPLE / "fixed.png"), str(EXAMPLE / "moving.png")]
    assert main(["export", "--model", "litemedsam", "--out", str(tmp_path), "--precision", "int8",
                 "--calibration", *images]) == 0
    assert main(["export", "--model", "litemedsam", "--out", str(tmp_path)]) == 0
    with_images, default = calls
    assert with_images[1:3] == ["-m", "samreg_export"] and with_images[-3:] == ["--calibration", *images]
    assert "--calibration" not in default and default[default.index("--precision") + 1:][:3] == ["fp32", "fp16", "int8"]


def test_register_limits_blas_and_openmp_pools_to_the_engine_threads(litemedsam_dir, monkeypatch, tmp_path):
    """register() and register_one() run with at most engine.threads threads in every BLAS and OpenMP pool
    (numpy's, FAISS's: seen when the ROIs are matched), and restore the pools afterwards."""
    from threadpoolctl import threadpool_info

    from samreg_rt import batch, match

    engine = Engine.load(litemedsam_dir, threads=1)
    seen = []
    cosine_matrix = match.cosine_matrix

    def spy(*args, **kwargs):
        seen.append({(i["user_api"], i["filepath"]): i["num_threads"] for i in threadpool_info()})
        return cosine_matrix(*args, **kwargs)

    monkeypatch.setattr(match, "cosine_matrix", spy)
    before = {(i["user_api"], i["filepath"]): i["num_threads"] for i in threadpool_info()}
    register(str(EXAMPLE / "fixed.png"), str(EXAMPLE / "moving.png"), engine, **FAST)
    batch.register_one(str(EXAMPLE / "fixed.png"), str(EXAMPLE / "moving.png"), engine, tmp_path / "out", **FAST)
    assert len(seen) == 2 and all(seen)
    assert any(api == "openmp" for pools in seen for api, _ in pools)          # FAISS's OpenMP was seen
    assert all(n == 1 for pools in seen for n in pools.values())
    assert {(i["user_api"], i["filepath"]): i["num_threads"] for i in threadpool_info()} == before
