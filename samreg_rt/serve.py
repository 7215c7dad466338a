"""HTTP service: one warm engine behind ``POST /register``, with health, model and metrics routes.

Protocol (multipart/form-data, as ``curl -F`` and ``requests.post(files=...)`` send it):

- ``POST /register``: files ``fixed`` and ``moving`` (PNG, JPEG, TIFF or BMP bytes) and optional
  form fields ``preset`` (default | reference), ``prompt_kind`` (points | boxes),
  ``points_per_side``, ``pred_iou_thresh``, ``stability_thresh``, ``prompt`` (repeatable,
  ``x,y`` or ``x0,y0,x1,y1`` in fixed-image pixels: prompt mode), ``ddf`` (true: also fit the
  dense field and return it) and ``masks`` (false: leave the RLE masks out). The answer is the
  correspondence as JSON (see ``correspondence_json``).
- ``GET /health``, ``GET /models``, ``GET /metrics`` (JSON: request counts by route and status,
  latency percentiles of ``/register``, queue depth).

Errors are JSON ``{"error": <type>, "message": <text>}``: 400 for an unusable image or prompt,
411/413 for a request without Content-Length or over the byte or pixel limit, 422 for a missing
field or a bad parameter, 503 when the queue is full, 500 for an unexpected failure (that request
only). Registrations run one at a time on a single worker thread, so the engine's intra-op
threads are never oversubscribed; requests wait in a bounded queue. The embeddings of recently
seen images are kept (``CachingEngine``), so an image sent again is not encoded again.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import tempfile
import time
import warnings
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .correspondence import Correspondence, Side
from .engine import Engine, ImageEmbedding
from .errors import InputError, SamregError
from .io import Image, load_image
from .pipeline import PRESETS, register
from .prompt import register_prompts

log = logging.getLogger("samreg_rt")

LATENCY_WINDOW = 4096  # the latency percentiles cover the last this many /register answers


class RequestTooLarge(InputError):
    """A request over the service's byte or pixel limit (HTTP 413)."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the service.

    max_request_bytes: the whole multipart body; max_pixels: each image (checked from the file
    header, before decoding); max_points_per_side / max_prompts: the work one request can ask
    for; max_queue: registrations waiting or running at once (more get 503).
    """

    max_request_bytes: int = 32 * 2**20
    max_pixels: int = 16_000_000
    max_points_per_side: int = 64
    max_prompts: int = 64
    max_queue: int = 64
    cache_images: int = 16


class CachingEngine:
    """An ``Engine`` whose ``embed`` remembers the embeddings of the last ``size`` images it saw
    (keyed by the sha256 of the array's bytes, shape and dtype): a fixed image (an atlas) sent with
    many moving images is encoded once. Everything else is the wrapped engine's. Not thread-safe:
    the service calls it from its single worker thread only."""

    def __init__(self, engine: Engine, size: int):
        self.engine, self.size = engine, size
        self.cache: OrderedDict[tuple, ImageEmbedding] = OrderedDict()
        self.hits = self.misses = 0

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def embed(self, image: np.ndarray, name: str = "image") -> ImageEmbedding:
        array = np.ascontiguousarray(image)
        key = (hashlib.sha256(array.tobytes()).hexdigest(), array.shape, array.dtype.str)
        if key in self.cache:
            self.hits += 1
            self.cache.move_to_end(key)
            return self.cache[key]
        self.misses += 1
        emb = self.engine.embed(array, name=name)
        if self.size > 0:
            self.cache[key] = emb
            if len(self.cache) > self.size:
                self.cache.popitem(last=False)
        return emb


class Metrics:
    """Request counts by (route, status) and the latencies of recent successful registrations."""

    def __init__(self) -> None:
        self.started = time.time()
        self.counts: Counter[tuple[str, int]] = Counter()
        self.latency_s: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.engine_s: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def as_json(self, queued: int, cache: CachingEngine) -> dict:
        def summary(values: deque[float]) -> dict:
            if not values:
                return {"count": 0}
            a = np.asarray(values)
            p50, p95, p99 = np.percentile(a, [50, 95, 99])
            return {"count": len(a), "mean": float(a.mean()), "p50": float(p50), "p95": float(p95),
                    "p99": float(p99), "max": float(a.max())}

        requests: dict[str, dict[str, int]] = {}
        for (route, status), n in sorted(self.counts.items()):
            requests.setdefault(route, {})[str(status)] = n
        return {"uptime_s": round(time.time() - self.started, 3), "requests": requests, "queued": queued,
                "register_latency_s": summary(self.latency_s), "register_engine_s": summary(self.engine_s),
                "embedding_cache": {"size": len(cache.cache), "hits": cache.hits, "misses": cache.misses}}


def _error(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message}, status_code=status, headers=headers)


def rle_encode(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a bool (H, W) mask: ``{"size": [H, W], "counts": [...]}``, run
    lengths over the column-major (Fortran order) pixels, the first run counting zeros."""
    flat = np.asarray(mask, bool).ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def rle_decode(rle: dict) -> np.ndarray:
    """Inverse of ``rle_encode``: bool (H, W)."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], np.int64)
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    if flat.size != h * w:
        raise InputError(f"RLE counts sum to {flat.size}, expected {h}x{w} = {h * w}")
    return flat.reshape((h, w), order="F")


def original_masks(side: Side) -> np.ndarray:
    """A side's ROI masks at the original image resolution, bool (N, H, W): the working-grid
    masks resized with nearest neighbour (identical when the working grid is the image's)."""
    masks = side.unpacked()
    h, w = side.original_shape
    if masks.shape[1:] == (h, w):
        return masks
    return np.stack([cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
                     for m in masks]) if len(masks) else np.zeros((0, h, w), bool)


def correspondence_json(corr: Correspondence, include_masks: bool = True) -> dict:
    """The correspondence as JSON-ready data: pairs (fixed ROI, moving ROI), their similarity,
    and per side the image shape, ROI centroids (x, y px) and masks as COCO RLE."""
    out = {"pairs": corr.pairs.astype(int).tolist(), "similarity": corr.similarity.astype(float).tolist(),
           "model": corr.model}
    for name, side in (("fixed", corr.fixed), ("moving", corr.moving)):
        entry = {"shape": list(side.original_shape), "work_shape": list(side.work_shape), "rois": int(len(side.masks)),
                 "centroids": [[float(x), float(y)] for x, y in side.centroids()]}
        if include_masks:
            entry["masks"] = [rle_encode(m) for m in original_masks(side)]
        out[name] = entry
    return out


def field_json(field: np.ndarray) -> dict:
    """A dense field as base64 of its little-endian float32 bytes (C order) with its shape."""
    data = np.ascontiguousarray(field, dtype="<f4")
    return {"dtype": "float32", "byteorder": "little", "shape": list(data.shape),
            "data": base64.b64encode(data.tobytes()).decode("ascii")}


def decode_upload(data: bytes, name: str, max_pixels: int) -> Image:
    """Uploaded bytes -> ``Image``, as ``io.load_image`` reads the same file.

    The pixel count is read from the header before anything is decoded. Raises ``InputError``
    for an empty or undecodable upload and ``RequestTooLarge`` over ``max_pixels``.
    """
    from PIL import Image as PILImage, UnidentifiedImageError

    if not data:
        raise InputError(f"{name}: empty upload (0 bytes)")
    try:
        with PILImage.open(io.BytesIO(data)) as header:
            w, h = header.size
    except PILImage.DecompressionBombError as exc:
        raise RequestTooLarge(f"{name}: {exc}") from None
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image in a known format (PNG, JPEG, TIFF or BMP expected)") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{name}: unreadable image header ({exc})") from None
    if w * h > max_pixels:
        raise RequestTooLarge(f"{name}: image of {w}x{h} pixels exceeds the service limit of {max_pixels} pixels")
    with tempfile.TemporaryDirectory(prefix="samreg-serve-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        image = load_image(path)
    return Image(array=image.array, spacing=None, path=name)


def parse_prompts(texts: list[str], limit: int) -> list[tuple[float, ...]]:
    """``["x,y", "x0,y0,x1,y1", ...]`` -> tuples; ``InputError`` naming the bad one."""
    if len(texts) > limit:
        raise InputError(f"prompt: {len(texts)} prompts, the service takes at most {limit}")
    prompts = []
    for n, text in enumerate(texts):
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            values = ()
        if len(values) not in (2, 4) or not np.isfinite(values).all():
            raise InputError(f"prompt {n}: {text!r}: expected finite numbers x,y or x0,y0,x1,y1")
        prompts.append(values)
    return prompts


def run_registration(engine: Engine | CachingEngine, fixed: Image, moving: Image, preset: str,
                     prompts: list[tuple[float, ...]], fit_ddf: bool, include_masks: bool, overrides: dict) -> dict:
    """One registration, start to JSON (runs on the engine's worker thread)."""
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if prompts:
            corr = register_prompts(fixed, moving, engine, prompts, preset=preset)
            timings: dict[str, float] = {}
        else:
            reg = register(fixed, moving, engine, preset=preset, **overrides)
            corr, timings = reg.correspondence, reg.timings
        out = correspondence_json(corr, include_masks)
        if fit_ddf:
            from .batch import dense_field

            t_ddf = time.perf_counter()
            field, _, out["ddf"] = dense_field(corr, fixed, moving, preset)
            timings["ddf"] = time.perf_counter() - t_ddf
            out["field"] = field_json(field)
    out["preset"] = preset
    out["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    out["engine_s"] = round(time.perf_counter() - t, 4)
    out["warnings"] = sorted({str(w.message) for w in caught})
    return out


def create_app(engine: Engine, limits: Limits = Limits()) -> FastAPI:
    """The service around one loaded engine (see the module docstring for the protocol)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="samreg-engine")
    cached = CachingEngine(engine, limits.cache_images)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # warm-up: the first ONNX Runtime run of a session is slower than the rest
        await asyncio.get_running_loop().run_in_executor(executor, engine.embed, np.zeros((64, 64), np.uint8))
        yield
        executor.shutdown(wait=True)

    app = FastAPI(title="samreg-rt", lifespan=lifespan)
    app.state.metrics, app.state.queued = Metrics(), 0

    @app.middleware("http")
    async def count_and_limit(request: Request, call_next):
        t = time.perf_counter()
        route = request.url.path
        if request.method == "POST" and route == "/register":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                response = _error(411, "LengthRequired", "POST /register needs a Content-Length header")
            elif int(length) > limits.max_request_bytes:
                response = _error(413, "RequestTooLarge", f"request body of {int(length)} bytes exceeds the "
                                                          f"service limit of {limits.max_request_bytes} bytes")
            else:
                response = await call_next(request)
        else:
            response = await call_next(request)
        known = route in {"/register", "/health", "/models", "/metrics"}
        app.state.metrics.counts[(route if known else "other", response.status_code)] += 1
        if route == "/register" and response.status_code == 200:
            app.state.metrics.latency_s.append(time.perf_counter() - t)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}" for e in exc.errors()]
        return _error(422, "InvalidRequest", "; ".join(parts))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.manifest.get("name"), "provider": engine.provider,
                "queued": app.state.queued}

    @app.get("/models")
    async def models() -> dict:
        m = engine.manifest
        return {"models": [{"name": m.get("name"), "trained": bool(m.get("source", {}).get("trained", True)),
                            "precision": engine.precision, "provider": engine.provider,
                            "input_size": engine.spec.input_size, "prompt_kind": engine.spec.prompt_kind,
                            "manifest_sha256": engine.manifest_sha256, "source": m.get("source", {})}],
                "presets": sorted(PRESETS)}

    @app.get("/metrics")
    async def metrics() -> dict:
        return app.state.metrics.as_json(app.state.queued, cached)

    @app.post("/register")
    async def register_route(
        fixed: UploadFile = File(..., description="fixed image (PNG, JPEG, TIFF, BMP)"),
        moving: UploadFile = File(..., description="moving image"),
        preset: Literal["default", "reference"] = Form("default"),
        prompt_kind: Literal["points", "boxes"] | None = Form(None),
        points_per_side: int | None = Form(None, ge=1, le=limits.max_points_per_side),
        pred_iou_thresh: float | None = Form(None, ge=0.0, le=1.0),
        stability_thresh: float | None = Form(None, ge=0.0, le=1.0),
        prompt: list[str] = Form([], description="x,y or x0,y0,x1,y1 in fixed-image pixels; repeatable"),
        ddf: bool = Form(False),
        masks: bool = Form(True),
    ) -> JSONResponse:
        try:
            prompts = parse_prompts(prompt, limits.max_prompts)
            images = [await run_in_threadpool(decode_upload, await upload.read(), name, limits.max_pixels)
                      for name, upload in (("fixed", fixed), ("moving", moving))]
        except RequestTooLarge as exc:
            return _error(413, "RequestTooLarge", str(exc))
        except InputError as exc:
            return _error(400, type(exc).__name__, str(exc))
        if app.state.queued >= limits.max_queue:
            return _error(503, "Busy", f"{app.state.queued} registrations queued (limit {limits.max_queue})",
                          headers={"Retry-After": "1"})
        overrides = {"prompt_kind": prompt_kind, "points_per_side": points_per_side,
                     "pred_iou_thresh": pred_iou_thresh, "stability_score_thresh": stability_thresh}
        app.state.queued += 1
        try:
            out = await asyncio.get_running_loop().run_in_executor(
                executor, run_registration, cached, images[0], images[1], preset, prompts, ddf, masks, overrides)
        except InputError as exc:
            return _error(400, type(exc).__name__, str(exc))
        except SamregError as exc:
            return _error(500, type(exc).__name__, str(exc))
        except Exception as exc:  # a bug must fail this request only, never the service
            log.exception("POST /register failed")
            return _error(500, type(exc).__name__, f"unexpected failure: {exc}")
        finally:
            app.state.queued -= 1
        app.state.metrics.engine_s.append(out["engine_s"])
        return JSONResponse(out)

    return app
