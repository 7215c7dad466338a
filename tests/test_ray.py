"""Batch registration on a local Ray instance: pair-for-pair equal to the sequential batch, resumable,
and a worker killed mid-run neither loses nor duplicates a pair. Untrained ``random_tiny``, 64 px
images, one point prompt per pair (prompt mode), so that the file stays within a few minutes."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import ray

from samreg_rt.batch import read_pairs_list, register_many
from samreg_rt.cli import main
from samreg_rt.correspondence import Correspondence
from samreg_rt.engine import Engine
from samreg_rt.errors import SamregError
from samreg_rt.ray_batch import JOURNAL, RegistrationWorker, connect, register_many_ray

PROMPT = [(24.0, 20.0)]
N_PAIRS = 10


@pytest.fixture(scope="module")
def local_ray():
    Engine.load("random_tiny")  # exported once here, before the workers look for it
    assert connect(None, num_cpus=2, object_store_mb=200)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray_pairs")
    rng = np.random.default_rng(11)
    with open(root / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fixed", "moving", "id"])
        for k in range(N_PAIRS):
            fixed = (rng.random((64, 64)) * 60).astype(np.uint8)
            cv2.circle(fixed, (20 + k, 22), 10, 220, -1)
            cv2.rectangle(fixed, (36, 34), (56, 58 - k), 140, -1)
            moving = np.roll(fixed, (k % 3, 2), axis=(0, 1))
            cv2.imwrite(str(root / f"f{k}.png"), fixed)
            cv2.imwrite(str(root / f"m{k}.png"), moving)
            writer.writerow([f"f{k}.png", f"m{k}.png", f"case{k:02d}"])
    return root / "pairs.csv"


@pytest.fixture(scope="module")
def sequential(pairs_csv, tmp_path_factory) -> Path:
    """The single-machine batch's output for the same list, engine with one thread as each actor."""
    out = tmp_path_factory.mktemp("sequential")
    summary = register_many(read_pairs_list(pairs_csv), Engine.load("random_tiny", threads=1), out,
                            progress=False, prompts=PROMPT)
    assert summary["failed"] == 0 and len(summary["done"]) == N_PAIRS
    return out


def _assert_same_pair(got: Path, want: Path) -> None:
    a, b = Correspondence.load(got / "correspondence.npz"), Correspondence.load(want / "correspondence.npz")
    for side in ("fixed", "moving"):
        np.testing.assert_array_equal(getattr(a, side).masks, getattr(b, side).masks)
    np.testing.assert_array_equal(a.pairs, b.pairs)
    np.testing.assert_array_equal(a.similarity, b.similarity)
    assert a.params == b.params and a.model == b.model
    for name in ("pairs.csv", "overlay.png"):
        assert (got / name).read_bytes() == (want / name).read_bytes(), name
    run_a, run_b = (json.loads((d / "run.json").read_text()) for d in (got, want))
    for run in (run_a, run_b):
        run.pop("timings_s"), run.pop("register_s")
    assert run_a == run_b


def _journal(out: Path) -> list[dict]:
    path = out / JOURNAL
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []  # complete lines only
    return [json.loads(line) for line in lines]


def test_cli_ray_equals_sequential_and_resumes(local_ray, pairs_csv, sequential, tmp_path, capsys):
    out = tmp_path / "ray"
    for pair_id in ("case00", "case03"):  # completed by an earlier, interrupted run
        shutil.copytree(sequential / pair_id, out / pair_id)
    (out / "case05").mkdir()
    (out / "case05" / "pairs.csv").write_text("partial")  # no run.json: not complete, redone
    code = main(["register", "--pairs", str(pairs_csv), "--ray", "--out", str(out), "--model", "random_tiny",
                 "--prompt", "24,20"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["failed"] == 0
    assert sorted(summary["skipped"]) == ["case00", "case03"]
    assert sorted(d["id"] for d in summary["done"]) == [f"case{k:02d}" for k in range(N_PAIRS) if k not in (0, 3)]
    assert len(summary["workers"]) == 2 and len({w["pid"] for w in summary["workers"]}) == 2
    for k in range(N_PAIRS):
        _assert_same_pair(out / f"case{k:02d}", sequential / f"case{k:02d}")
    assert sorted(p.name for p in out.iterdir()) == sorted([JOURNAL] + [p.name for p in sequential.iterdir()])
    # a worker handed a pair that is complete already leaves it alone
    worker = RegistrationWorker("random_tiny", "cpu", 1, "fp32")
    before = (out / "case01" / "run.json").stat().st_mtime_ns
    job = read_pairs_list(pairs_csv)[1]
    assert worker.register(*job, str(out / "case01"), {"prompts": PROMPT})["status"] == "found_done"
    assert (out / "case01" / "run.json").stat().st_mtime_ns == before


def test_killed_worker_loses_and_duplicates_no_pair(local_ray, pairs_csv, sequential, tmp_path):
    out = tmp_path / "ray"
    jobs = read_pairs_list(pairs_csv)
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(
        register_many_ray(jobs, "random_tiny", out, prompts=PROMPT, progress=False)))
    driver.start()
    inodes: dict[str, set[int]] = {pair_id: set() for pair_id, _, _ in jobs}

    def look() -> None:  # every version of run.json ever seen: a rewrite shows a second inode
        for pair_id in inodes:
            try:
                inodes[pair_id].add(os.stat(out / pair_id / "run.json").st_ino)
            except FileNotFoundError:
                pass

    killed = None
    deadline = time.monotonic() + 900  # a hang guard: 10 tiny pairs took 60-240 s on a loaded 2-core box
    while driver.is_alive():
        assert time.monotonic() < deadline, "ray batch did not finish"
        look()
        events = _journal(out)
        if killed is None and any(e["event"] == "done" for e in events):
            killed = next(e for e in events if e["event"] == "worker" and e["actor"] == 0)["pid"]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    driver.join()
    look()
    assert killed is not None, "the batch finished before a worker could be killed"
    events = _journal(out)
    done = [e["id"] for e in events if e["event"] == "done"]
    found = [e["id"] for e in events if e["event"] == "found_done"]  # run.json written, then the worker died
    assert sorted(done + found) == sorted(inodes), "every pair registered exactly once"
    assert result["failed"] == 0 and sorted(d["id"] for d in result["done"]) == sorted(done)
    lost = [e for e in events if e["event"] == "worker_lost"]
    assert result["worker_losses"] == len(lost) >= 1 and any(e["actor"] == 0 for e in lost)
    back = [e for e in events if e["event"] == "worker" and e.get("after_loss") and e["actor"] == 0]
    assert back and all(e["pid"] != killed for e in back)  # Ray restarted the killed worker
    t_lost = min(e["t"] for e in lost if e["actor"] == 0)
    assert all(e["pid"] != killed for e in events if e["event"] == "done" and e["t"] > t_lost)
    assert all(len(seen) == 1 for seen in inodes.values()), ({k: v for k, v in inodes.items() if len(v) != 1}, events)
    for pair_id in inodes:
        _assert_same_pair(out / pair_id, sequential / pair_id)


def test_workers_that_cannot_load_the_model_fail_fast(local_ray, pairs_csv, tmp_path):
    bad_model = tmp_path / "no_model"
    bad_model.mkdir()
    with pytest.raises(SamregError, match="could not load model"):
        register_many_ray(read_pairs_list(pairs_csv)[:2], str(bad_model), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "case00").exists()
