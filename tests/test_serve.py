"""The HTTP service on loopback: a bounded load test with malformed requests mixed in, answers equal
to direct ``register()`` calls, the dense field, the queue limit and the ``serve`` subcommand.

Uses the untrained ``random_tiny`` model and small images; valid requests use prompt mode and a
1x1 point grid, and 90 of the 200 requests are malformed (cheap to refuse), so that the load test
stays within about two minutes on two otherwise idle cores.
"""
from __future__ import annotations

import base64
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient

from samreg_rt.batch import dense_field
from samreg_rt.engine import Engine
from samreg_rt.io import load_image
from samreg_rt.pipeline import register
from samreg_rt.prompt import register_prompts
from samreg_rt.serve import Limits, create_app, original_masks, rle_decode, rle_encode

LIMITS = Limits(max_request_bytes=150_000, max_pixels=150 * 150)
VALID_PARAMS = {  # name -> form fields of a valid request
    "point": {"prompt": "30,30"},
    "box": {"prompt": "10,12,50,44"},
    "grid": {"points_per_side": "1", "pred_iou_thresh": "0.0", "stability_thresh": "0.0"},
}


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def engine():
    return Engine.load("random_tiny", threads=2)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four small image pairs (64..96 px, grey and colour) as PNG files."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("serve_images")
    pairs = []
    for k, (h, w) in enumerate([(64, 64), (72, 96), (96, 80), (64, 88)]):
        fixed = (rng.random((h, w)) * 40).astype(np.uint8)
        cv2.circle(fixed, (w // 3, h // 3), h // 5, 200, -1)
        cv2.rectangle(fixed, (w // 2, h // 2), (w - 8, h - 6), 120, -1)
        moving = np.roll(fixed, (2 + k, 3), axis=(0, 1))
        if k % 2:
            fixed, moving = (np.dstack([a, a // 2, 255 - a]) for a in (fixed, moving))
        paths = root / f"f{k}.png", root / f"m{k}.png"
        for path, array in zip(paths, (fixed, moving)):
            path.write_bytes(_png(array))
        pairs.append(paths)
    return pairs


def _direct(engine: Engine, fixed, moving, params: dict):
    """The correspondence ``register()`` (or prompt mode) gives for the same input."""
    fixed_img, moving_img = load_image(fixed), load_image(moving)
    if "prompt" in params:
        prompt = tuple(float(v) for v in params["prompt"].split(","))
        return register_prompts(fixed_img, moving_img, engine, [prompt])
    return register(fixed_img, moving_img, engine, points_per_side=1, pred_iou_thresh=0.0,
                    stability_score_thresh=0.0).correspondence


def _assert_same(answer: dict, corr) -> None:
    assert answer["pairs"] == corr.pairs.tolist()
    assert answer["similarity"] == corr.similarity.astype(float).tolist()
    for name, side in (("fixed", corr.fixed), ("moving", corr.moving)):
        got = answer[name]
        assert got["shape"] == list(side.original_shape) and got["rois"] == len(side.masks)
        want = original_masks(side)
        assert len(got["masks"]) == len(want)
        for rle, mask in zip(got["masks"], want):
            np.testing.assert_array_equal(rle_decode(rle), mask)


@pytest.fixture(scope="module")
def server(engine):
    """The service on a free loopback port, uvicorn in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(engine, LIMITS)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "service did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    srv.should_exit = True
    thread.join(timeout=30)


def test_rle_matches_column_major_run_lengths():
    rng = np.random.default_rng(0)
    masks = [np.zeros((5, 7), bool), np.ones((5, 7), bool), rng.random((9, 4)) > 0.5, rng.random((1, 13)) > 0.3]
    masks[2][0, 0] = True
    for mask in masks:
        rle = rle_encode(mask)
        flat = mask.ravel(order="F")
        runs = [len(list(g)) for _, g in itertools.groupby(flat)]
        assert rle["counts"] == ([0] if flat[0] else []) + runs
        assert rle["size"] == list(mask.shape) and sum(rle["counts"]) == mask.size
        np.testing.assert_array_equal(rle_decode(rle), mask)


def _malformed_requests(images) -> list[tuple[str, dict, dict, int]]:
    """(kind, files, form data, expected status) of requests the service must refuse."""
    fixed, moving = (p.read_bytes() for p in images[0])
    huge = _png(np.zeros((200, 200), np.uint8))  # small file, too many pixels
    noise = np.random.default_rng(1).integers(0, 256, 160_000, dtype=np.uint8).tobytes()
    return [
        ("not_an_image", {"fixed": ("f.png", b"this is not an image"), "moving": ("m.png", moving)}, {}, 400),
        ("empty_file", {"fixed": ("f.png", b""), "moving": ("m.png", moving)}, {}, 400),
        ("too_many_bytes", {"fixed": ("f.png", noise), "moving": ("m.png", moving)}, {}, 413),
        ("too_many_pixels", {"fixed": ("f.png", fixed), "moving": ("m.png", huge)}, {}, 413),
        ("missing_moving", {"fixed": ("f.png", fixed)}, {}, 422),
        ("bad_grid", {"fixed": ("f.png", fixed), "moving": ("m.png", moving)}, {"points_per_side": "0"}, 422),
        ("bad_thresh", {"fixed": ("f.png", fixed), "moving": ("m.png", moving)}, {"pred_iou_thresh": "x"}, 422),
        ("bad_preset", {"fixed": ("f.png", fixed), "moving": ("m.png", moving)}, {"preset": "fast"}, 422),
        ("bad_prompt", {"fixed": ("f.png", fixed), "moving": ("m.png", moving)}, {"prompt": "1,2,3"}, 400),
        ("prompt_outside", {"fixed": ("f.png", fixed), "moving": ("m.png", moving)}, {"prompt": "500,5"}, 400),
    ]


def test_load_200_requests_8_clients(server, engine, images):
    url, app = server
    direct = {(k, name): _direct(engine, *images[k], params)
              for k in range(len(images)) for name, params in VALID_PARAMS.items()}
    bad = _malformed_requests(images)
    requests = [("valid", combo) for _, combo in zip(range(110), itertools.cycle(direct))]
    requests += [("bad", b) for b in bad for _ in range(9)]
    assert len(requests) == 200
    order = np.random.default_rng(3).permutation(len(requests))

    def send(item):
        kind, spec = item
        if kind == "valid":
            k, name = spec
            files = {"fixed": ("f.png", images[k][0].read_bytes()), "moving": ("m.png", images[k][1].read_bytes())}
            data = VALID_PARAMS[name]
        else:
            _, files, data, _ = spec
        t = time.perf_counter()
        response = httpx.post(f"{url}/register", files=files, data=data, timeout=300)
        return item, response, time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, [requests[i] for i in order]))
    wall = time.perf_counter() - t0

    latencies = []
    for (kind, spec), response, seconds in results:
        if kind == "valid":
            assert response.status_code == 200, response.text
            _assert_same(response.json(), direct[spec])
            latencies.append(seconds)
        else:
            name, _, _, status = spec
            body = response.json()
            assert response.status_code == status, (name, response.status_code, body)
            assert body["error"] and len(body["message"]) > 10, (name, body)
    metrics = httpx.get(f"{url}/metrics").json()
    counts = metrics["requests"]["/register"]
    assert counts["200"] == 110
    assert sum(n for status, n in counts.items() if status.startswith("4")) == 90
    assert metrics["queued"] == 0 and metrics["embedding_cache"]["misses"] >= 8
    p50, p95 = np.percentile(latencies, [50, 95])
    server_p = metrics["register_latency_s"]
    print(f"\nload test: 200 requests (110 valid, 90 malformed), 8 clients, {wall:.1f} s wall; valid requests "
          f"client latency p50 {p50 * 1000:.0f} ms p95 {p95 * 1000:.0f} ms (queueing included); server "
          f"p50 {server_p['p50'] * 1000:.0f} ms, engine p50 {metrics['register_engine_s']['p50'] * 1000:.0f} ms")
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == "random_tiny"


def test_dense_field_equals_direct_fit(server, engine, images):
    url, _ = server
    fixed, moving = images[1]
    files = {"fixed": ("f.png", fixed.read_bytes()), "moving": ("m.png", moving.read_bytes())}
    # the reference preset keeps the fitted field (the default one may replace it by the identity)
    answer = httpx.post(f"{url}/register", files=files,
                        data={"prompt": "30,30", "ddf": "true", "masks": "false", "preset": "reference"},
                        timeout=300).json()
    corr = register_prompts(load_image(fixed), load_image(moving), engine, [(30.0, 30.0)], preset="reference")
    field, _, summary = dense_field(corr, load_image(fixed), load_image(moving), preset="reference")
    assert np.abs(field).max() > 0
    got = answer["field"]
    assert got["shape"] == [72, 96, 2] and got["dtype"] == "float32" and "masks" not in answer["fixed"]
    array = np.frombuffer(base64.b64decode(got["data"]), "<f4").reshape(got["shape"])
    np.testing.assert_array_equal(array, field.astype(np.float32))
    assert answer["ddf"] == summary


def test_models_route_and_full_queue(engine, images):
    fixed, moving = (p.read_bytes() for p in images[0])
    with TestClient(create_app(engine, Limits(max_queue=0))) as client:
        models = client.get("/models").json()["models"]
        assert models[0]["name"] == "random_tiny" and models[0]["trained"] is False
        response = client.post("/register", files={"fixed": ("f.png", fixed), "moving": ("m.png", moving)})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"] == "Busy"


def test_serve_subcommand(engine, images):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "samreg_rt.cli", "serve", "--model", "random_tiny", "--port",
                             str(port), "--threads", "1"], env=dict(os.environ), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "serve did not answer within 120 s"
                time.sleep(0.5)
        assert health.json()["model"] == "random_tiny"
        fixed, moving = images[2]
        answer = httpx.post(f"http://127.0.0.1:{port}/register", data={"prompt": "20,20"}, timeout=300,
                            files={"fixed": ("f.png", fixed.read_bytes()), "moving": ("m.png", moving.read_bytes())})
        assert answer.status_code == 200
        assert answer.json()["pairs"] == [[0, 0]]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
