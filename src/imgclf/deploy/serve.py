"""HTTP server for a bundle: POST /predict, GET /health, GET /model (FastAPI + uvicorn).

Uploads are decoded with `imgclf.data.images.open_rgb`, which reads the content (not the file
name) and refuses non-images and decompression bombs from their header; the pixels then go through
`imgclf.deploy.predict.predict_images`, the function `imgclf predict` uses, so the server predicts what
validation measured. Every way a request can be wrong gets a 4xx status with a JSON
{"error": "..."} that says what to fix:

    400 malformed multipart body, bad parameter     408 upload slower than the timeout
    413 body over the upload limit, too many files   415 not multipart, or a file is not an image
    422 no image in the request

Concurrent requests are batched: each request's decoded images join a queue, and one inference
thread takes up to `max_batch` images at a time (waiting at most `batch_wait_ms` for more), so
eight clients sending one image each cost about one forward pass of eight, not eight passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.allocator import release_freed_memory
from imgclf.data.cache import DecodedImages
from imgclf.data.images import open_rgb
from imgclf.data.transforms import Preprocess
from imgclf.deploy.bundle import Bundle
from imgclf.deploy.bundle import load as load_bundle
from imgclf.deploy.exported import is_export_file, load_exported
from imgclf.deploy.predict import predict_images
from imgclf.deploy.results import PredictionResult
from imgclf.errors import ImageError, ImgclfError

log = logging.getLogger(__name__)

try:
    # At module level: FastAPI resolves the handlers' annotations in this module's namespace.
    from fastapi import Request
except ImportError:  # the `serve` extra is not installed; create_app says so
    Request = None  # type: ignore[assignment,misc]

CONFIG_ENV = "IMGCLF_SERVE_CONFIG"


@dataclass
class ServeConfig:
    """Settings of `imgclf serve`.

    Attributes:
        bundle: Run directory or bundle folder.
        max_upload_bytes: Largest request body; larger ones get 413 before they are read.
        max_pixels: Largest image (width x height), checked from the header before decoding.
        max_files: Most images in one request.
        max_batch: Most images in one forward pass.
        batch_wait_ms: How long the batcher waits for more images once one is queued.
        upload_timeout: Seconds allowed for receiving a request body (408 after).
        predict_timeout: Seconds a prediction may wait and run once queued (503 after).
        threads: Torch threads (default: the cores, divided among the server processes).
        max_pixels_in_flight: Pixels (width x height, from the headers) decoded at once across
            all requests; further decodes wait for room (503 after `predict_timeout`).
    """

    bundle: str
    max_upload_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    max_files: int = 64
    max_batch: int = 32
    batch_wait_ms: float = 2.0
    upload_timeout: float = 30.0
    predict_timeout: float = 60.0
    threads: int | None = None
    max_pixels_in_flight: int = 100_000_000


# After decodes this large the server hands freed memory back to the system.
TRIM_PIXELS = 4_000_000


class PixelBudget:
    """How many pixels are being decoded at once, across requests.

    Decoding allocates about 3 bytes a pixel plus Pillow's working copies whatever the file's
    size: twelve concurrent requests of two 115 KB PNGs declaring 39.7 MP each took the server
    from 1.7 to 5.0 GB, and 4.5 GB stayed held. A decode waits here until its declared pixels
    fit; one image larger than the whole budget (but within `max_pixels`) runs alone. When the
    last large decode ends, freed memory goes back to the system (imgclf.allocator).
    """

    def __init__(self, limit: int):
        self.limit, self.in_flight, self.peak = int(limit), 0, 0
        self._cond: asyncio.Condition | None = None

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int, timeout: float):
        """Hold `pixels` of the budget for the block (asyncio.TimeoutError after `timeout`)."""
        self._cond = self._cond or asyncio.Condition()  # created in the serving loop
        pixels = max(1, min(int(pixels), self.limit))
        async with self._cond:
            await asyncio.wait_for(
                self._cond.wait_for(lambda: self.in_flight + pixels <= self.limit), timeout)
            self.in_flight += pixels
            self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            async with self._cond:
                self.in_flight -= pixels
                idle = self.in_flight == 0
                self._cond.notify_all()
            if idle and pixels >= TRIM_PIXELS:
                release_freed_memory()


def declared_pixels(data: bytes) -> int:
    """Width x height from the image's header, without decoding (0 when it has none: the
    decode itself then says what is wrong with the file)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return int(im.size[0]) * int(im.size[1])
    except Exception:  # any unreadable header; open_rgb reports it properly
        return 0


class RequestError(Exception):
    """A request the client must fix: its HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Batcher:
    """Runs the model on images queued by concurrent requests, several requests per pass.

    Args:
        bundle: The loaded bundle.
        max_batch: Most images per forward pass.
        wait_s: How long to wait for more images after the first one arrives.
    """

    def __init__(self, bundle, max_batch: int, wait_s: float):
        self.bundle, self.max_batch, self.wait_s = bundle, max(1, max_batch), wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        # One thread: torch already uses every core inside one forward pass.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgclf-infer")
        self.task: asyncio.Task | None = None
        self.passes = 0
        self.images = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def predict(self, squares: np.ndarray) -> np.ndarray:
        """Probabilities for presized uint8 squares [N, 3, P, P]."""
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((squares, fut))
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            n = len(items[0][0])
            deadline = loop.time() + self.wait_s
            while n < self.max_batch:
                try:
                    item = self.queue.get_nowait() if loop.time() >= deadline else \
                        await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                items.append(item)
                n += len(item[0])
            live = [(x, f) for x, f in items if not f.done()]  # a timed-out request left
            if not live:
                continue
            batch = np.concatenate([x for x, _ in live])
            try:
                probs = await loop.run_in_executor(self.pool, self._run, batch)
            except Exception as e:  # noqa: BLE001 - handed to the waiting requests
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.passes += 1
            self.images += len(batch)
            start = 0
            for x, f in live:
                if not f.done():
                    f.set_result(probs[start : start + len(x)])
                start += len(x)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        b = self.bundle
        if not isinstance(b, Bundle):  # an export: its own runtime, the same views and TTA
            return b.predict_presized(batch, self.max_batch)
        tta = b.tta or {}
        images = DecodedImages([Path("")] * len(batch), [""] * len(batch), batch)
        return predict_images(b.model, b.preprocess, images, b.multi_label,
                              batch_size=self.max_batch, tta=int(tta.get("n", 0)),
                              reduce=tta.get("reduce", "mean"))


def model_info(bundle) -> dict:
    """What GET /model returns: classes, task, versions and the validated metrics."""
    export = not isinstance(bundle, Bundle)
    weights = Path(bundle.weights_file if export else Path(bundle.path) / "weights.safetensors")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.is_file() else None
    meta = bundle.meta
    return {
        "classes": list(bundle.classes),
        "task": "multi_label" if bundle.multi_label else "single_label",
        "arch": bundle.arch,
        "version": digest,
        "imgclf_version": meta.get("imgclf_version"),
        "format_version": meta.get("format_version"),
        "preprocess": dict(bundle.preprocess) if export else bundle.preprocess.to_dict(),
        "runtime": type(bundle).__name__ if export else "torch",
        "thresholds": (dict(zip(bundle.classes, [float(t) for t in bundle.decision_thresholds()]))
                       if bundle.multi_label else None),
        "tta": bundle.tta,
        "valid_metrics": meta.get("valid_metrics"),
    }


def create_app(cfg: ServeConfig, bundle=None):
    """The FastAPI application for a bundle (loaded here unless given)."""
    from contextlib import asynccontextmanager

    if Request is None:
        raise ImgclfError("serving needs FastAPI and uvicorn: pip install 'imgclf[serve]'")
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.datastructures import UploadFile

    _set_threads(cfg.threads)
    bundle = bundle if bundle is not None else load_model(cfg.bundle, cfg.threads)
    info = model_info(bundle)
    pre = bundle.preprocess if isinstance(bundle, Bundle) else Preprocess.from_dict(bundle.preprocess)
    state: dict = {}
    pixels = PixelBudget(cfg.max_pixels_in_flight)

    @asynccontextmanager
    async def lifespan(app):
        state["batcher"] = Batcher(bundle, cfg.max_batch, cfg.batch_wait_ms / 1000)
        state["batcher"].start()
        # One pass before the first request, so it does not pay for lazy initialisation.
        await state["batcher"].predict(np.zeros((1, 3, pre.presize, pre.presize), np.uint8))
        yield
        await state["batcher"].stop()

    app = FastAPI(title="imgclf", version=str(info["version"]), lifespan=lifespan,
                  description=f"{info['arch']} classifier of {len(info['classes'])} classes "
                              f"({info['task'].replace('_', '-')})")

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        text = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                         for e in exc.errors())
        return JSONResponse({"error": text}, status_code=422)

    @app.get("/health")
    async def health():
        b = state.get("batcher")
        return {"status": "ok", "passes": b.passes if b else 0, "images": b.images if b else 0}

    @app.get("/model")
    async def model():
        return info

    def decode(data: bytes, name: str) -> np.ndarray:
        img = open_rgb(data, max_pixels=cfg.max_pixels, name=name)
        return pre.presize_image(img)

    @app.post("/predict")
    async def predict(request: Request, top_k: int = 5):
        if top_k < 1:
            raise RequestError(400, "top_k must be at least 1")
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise RequestError(415, "send the images as multipart/form-data, one 'file' field per "
                                    f"image (got content-type {ctype or 'none'!r})")
        form = await request.form(max_files=cfg.max_files + 1, max_fields=cfg.max_files + 16)
        uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not uploads:
            raise RequestError(422, "no image in the request: send one or more files in "
                                    "multipart/form-data fields named 'file'")
        if len(uploads) > cfg.max_files:
            raise RequestError(413, f"more than {cfg.max_files} images in one request: split it")
        squares, names = [], []
        for i, up in enumerate(uploads):
            name = up.filename or f"file {i + 1}"
            data = await up.read()
            try:
                async with pixels.hold(declared_pixels(data), cfg.predict_timeout):
                    squares.append(await run_in_threadpool(decode, data, name))
            except ImageError as e:
                raise RequestError(415, str(e)) from None
            except asyncio.TimeoutError:
                raise RequestError(503, "the server is decoding too many large images at once: "
                                        "retry later") from None
            names.append(name)
        try:
            probs = await asyncio.wait_for(state["batcher"].predict(np.stack(squares)),
                                           cfg.predict_timeout)
        except asyncio.TimeoutError:
            raise RequestError(503, f"prediction took longer than {cfg.predict_timeout:g}s: the "
                                    "server is overloaded; retry later") from None
        return {"task": info["task"], "version": info["version"],
                "predictions": _results(bundle, names, probs, top_k)}

    app.state.pixels = pixels  # read by tests and health checks
    return _BodyLimit(app, cfg.max_upload_bytes, cfg.upload_timeout)


def _results(bundle, names: list[str], probs: np.ndarray, top_k: int) -> list[dict]:
    res = PredictionResult(paths=[Path(n) for n in names], probs=probs, classes=bundle.classes,
                           multi_label=bundle.multi_label,
                           thresholds=bundle.decision_thresholds() if bundle.multi_label else None)
    out = []
    for name, labels, top, row in zip(names, res.labels(), res.top_k(top_k), probs):
        out.append({"filename": name, "labels": labels,
                    "probabilities": {c: float(p) for c, p in zip(bundle.classes, row)},
                    "top": [{"label": c, "probability": p} for c, p in top]})
    return out


class _BodyLimit:
    """ASGI middleware: refuses bodies over `max_bytes` and uploads slower than `timeout`.

    The body is read here, in full, before the application sees it, so a client that declares
    (Content-Length) or sends too much gets 413 and a stalled upload gets 408, and the multipart
    parser never touches more than `max_bytes`. An oversized body of up to `drain_factor` times
    the limit is read to its end and discarded before the 413: a client that sends its whole
    body before reading the answer (most do) would otherwise see a broken connection instead.
    """

    def __init__(self, app, max_bytes: int, timeout: float, drain_factor: int = 4):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout
        self.drain_limit = max_bytes * drain_factor

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await _reply(send, 400, "invalid Content-Length header")
        if declared is not None and int(declared) > self.drain_limit:
            return await _reply(send, 413, self._too_big(int(declared)))
        chunks, total = [], 0
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                if total > self.max_bytes:
                    return await _reply(send, 413, self._too_big(total))
                return await _reply(send, 408, f"the upload took longer than {self.timeout:g}s: "
                                               "send a smaller request or retry")
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            total += len(body)
            if total <= self.max_bytes:
                chunks.append(body)
            elif total > self.drain_limit:
                return await _reply(send, 413, self._too_big(total))
            if not msg.get("more_body", False):
                break
        if total > self.max_bytes:
            return await _reply(send, 413, self._too_big(total))
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return whole
            return await receive()

        await self.app(scope, replay, send)

    def _too_big(self, n: int) -> str:
        return (f"request body of {n / 1e6:.1f} MB is over the limit of "
                f"{self.max_bytes / 1e6:.1f} MB: send fewer or smaller images")


async def _reply(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(int(threads))


def load_model(path: str | Path, threads: int | None = None):
    """A bundle (run directory, bundle folder), or an export file (.onnx, OpenVINO .xml) that
    is then run by its own runtime."""
    return load_exported(path, threads) if is_export_file(path) else load_bundle(path)


def app_from_env():
    """Application factory for `uvicorn --factory` and for worker processes (reads $IMGCLF_SERVE_CONFIG)."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise ImgclfError(f"${CONFIG_ENV} is not set: start the server with `imgclf serve BUNDLE`")
    return create_app(ServeConfig(**json.loads(raw)))


def check_address(host: str, port: int) -> None:
    """Refuse a port out of range, or an address that cannot be listened on (in use, not this
    machine's), before anything says "Serving on"."""
    import socket

    if not 1 <= int(port) <= 65535:
        raise ImgclfError(f"--port {port} is not a port: use 1 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as e:
        raise ImgclfError(f"cannot listen on {host}:{port} ({e.strerror or e}): pass another "
                          "--port (or --host)") from None


def run_server(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
               ) -> None:
    """Load the bundle and serve it until interrupted (the address is logged first).

    Args:
        cfg: Limits and batching settings.
        host: Address to listen on.
        port: Port.
        workers: Server processes; each loads its own copy of the model.
    """
    import uvicorn

    if workers < 1:
        raise ImgclfError("--workers must be at least 1")
    check_address(host, port)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cfg.threads = cfg.threads or max(1, cores // workers)
    bundle = load_model(cfg.bundle, cfg.threads)  # fail here, with the message, not in each worker
    log.info(f"Serving {bundle.arch} ({len(bundle.classes)} classes) from {bundle.path} on "
             f"http://{host}:{port} ({workers} process{'es' if workers > 1 else ''}, "
             f"{cfg.threads} thread{'s' if cfg.threads > 1 else ''} each): POST /predict, "
             "GET /health, GET /model, docs at /docs")
    options = dict(host=host, port=port, log_level="warning", timeout_keep_alive=5,
                   limit_concurrency=512, h11_max_incomplete_event_size=64 * 1024)
    if workers == 1:
        uvicorn.run(create_app(cfg, bundle), **options)
    else:
        os.environ[CONFIG_ENV] = json.dumps(asdict(cfg))
        uvicorn.run("imgclf.deploy.serve:app_from_env", factory=True, workers=workers, **options)
