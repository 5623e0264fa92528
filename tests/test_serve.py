"""`imgclf serve` in a subprocess on 127.0.0.1: valid, oversized, non-image and concurrent requests."""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.deploy.bundle import load as load_bundle

MAX_UPLOAD_MB = 1.0
MAX_PIXELS = 1_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(files: list[tuple[str, bytes]], field: str = "file") -> tuple[bytes, str]:
    """A multipart/form-data body with one `field` part per (filename, content)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                     f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                     .encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Server:
    """A running `imgclf serve` and a tiny client for it."""

    def __init__(self, port: int):
        self.port = port

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else {}
        finally:
            conn.close()

    def predict(self, files: list[tuple[str, bytes]], query: str = "",
                timeout: float = 60) -> tuple[int, dict]:
        body, ctype = multipart(files)
        return self.request("POST", "/predict" + query, body, {"Content-Type": ctype}, timeout)


@pytest.fixture(scope="module")
def server(tiny_run):
    port = _free_port()
    cmd = [sys.executable, "-m", "imgclf.cli", "serve", str(tiny_run.path), "--host", "127.0.0.1",
           "--port", str(port), "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-pixels",
           str(MAX_PIXELS), "--max-files", "8", "--upload-timeout", "2", "--predict-timeout",
           "120", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ))
    srv = Server(port)
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read().decode(errors='replace')}")
            try:
                if srv.request("GET", "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not answer /health within 180 s")
            time.sleep(0.5)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def images(tiny_run) -> list[Path]:
    import csv

    with open(tiny_run.path / "predictions.csv", newline="") as f:
        return [Path(r["path"]) for r in csv.DictReader(f)]


def png_bytes(size: tuple[int, int], color=(90, 160, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_health_and_model(server, tiny_run):
    status, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok"
    status, info = server.request("GET", "/model")
    bundle = load_bundle(tiny_run.path)
    assert status == 200
    assert info["classes"] == bundle.classes and info["task"] == "single_label"
    assert info["arch"] == "test_efficientnet" and len(info["version"]) == 16
    assert info["imgclf_version"] == bundle.meta["imgclf_version"]


def test_predict_one_and_many_match_the_bundle(server, tiny_run, images):
    bundle = load_bundle(tiny_run.path)
    ref = bundle.predict(images, tta=0)
    status, body = server.predict([(images[0].name, images[0].read_bytes())], "?top_k=2")
    assert status == 200
    (pred,) = body["predictions"]
    assert pred["filename"] == images[0].name and pred["labels"] == ref.labels()[0]
    assert len(pred["top"]) == 2 and pred["top"][0]["label"] == ref.labels()[0][0]
    np.testing.assert_allclose([pred["probabilities"][c] for c in bundle.classes], ref.probs[0],
                               atol=1e-5)
    # Several images in one request come back in order; the extension is not trusted (a PNG
    # named .jpg is read as the PNG it is).
    files = [(p.stem + ".jpg", p.read_bytes()) for p in images[:5]]
    status, body = server.predict(files)
    assert status == 200 and [p["filename"] for p in body["predictions"]] == [f for f, _ in files]
    got = np.array([[p["probabilities"][c] for c in bundle.classes] for p in body["predictions"]])
    np.testing.assert_allclose(got, ref.probs[:5], atol=1e-5)


@pytest.mark.parametrize("name,data,status,words", [
    ("notes.jpg", b"just some text, not a photo\n" * 10, 415, "not an image"),
    ("doc.png", b"%PDF-1.4\n" + bytes(200), 415, "PDF"),
    ("empty.jpg", b"", 415, "empty"),
    ("broken.jpg", b"\xff\xd8\xff\xe0" + bytes(100), 415, "corrupt"),
    ("huge.png", png_bytes((1100, 1000)), 415, "over the limit"),
])
def test_bad_images_get_415_with_the_reason(server, name, data, status, words):
    code, body = server.predict([(name, data)])
    assert code == status and words in body["error"] and name in body["error"]


def test_bad_requests_get_4xx_never_500(server, images):
    one = images[0].read_bytes()
    # Over the upload limit: refused before the body is parsed (read and dropped, so that a
    # client that sends everything before reading gets the answer); far over it, from
    # Content-Length alone.
    code, body = server.predict([("big.jpg", os.urandom(int(MAX_UPLOAD_MB * 1e6) + 1000))])
    assert code == 413 and "limit" in body["error"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                  b"boundary=b\r\nContent-Length: 900000000\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    code, body = server.request("POST", "/predict", b"x" * 10, {"Content-Type": "image/jpeg"})
    assert code == 415 and "multipart/form-data" in body["error"]
    body_, ctype = multipart([("a.jpg", one)], field="other")
    assert server.request("POST", "/predict", body_, {"Content-Type": ctype})[0] == 200
    code, body = server.request("POST", "/predict", b"--x--\r\n",
                                {"Content-Type": "multipart/form-data; boundary=x"})
    assert code == 422 and "no image" in body["error"]
    code, body = server.request("POST", "/predict", b"garbage",
                                {"Content-Type": "multipart/form-data; boundary=zz"})
    assert code == 400 and body["error"]
    code, body = server.predict([("a.jpg", one)] * 9)
    assert code == 413 and "more than 8 images" in body["error"]
    code, body = server.predict([("a.jpg", one)], "?top_k=zero")
    assert code == 422 and "top_k" in body["error"]
    assert server.predict([("a.jpg", one)], "?top_k=0")[0] == 400
    assert server.request("GET", "/nowhere")[0] == 404
    assert server.request("GET", "/predict")[0] == 405


@pytest.mark.slow
def test_stalled_upload_gets_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                  b"boundary=b\r\nContent-Length: 5000\r\n\r\n--b\r\n")
        data = b""
        while chunk := s.recv(4096):  # the server gives up after --upload-timeout 2, and closes
            data += chunk
    assert data.startswith(b"HTTP/1.1 408") and b"longer than 2s" in data


@pytest.mark.slow
def test_concurrent_requests(server, tiny_run, images):
    """A bounded load: 8 threads x 30 requests of 1-3 images, every answer checked."""
    bundle = load_bundle(tiny_run.path)
    ref = bundle.predict(images, tta=0)
    expected = {p.name: row for p, row in zip(ref.paths, ref.probs)}
    payloads = [(p.name, p.read_bytes()) for p in images]
    threads, per_thread = 8, 30
    latencies: list[float] = []
    statuses: list[int] = []
    wrong: list[str] = []
    lock = threading.Lock()
    _, before = server.request("GET", "/health")

    def client(t: int) -> None:
        for i in range(per_thread):
            k = 1 + (t + i) % 3
            files = [payloads[(t * 7 + i + j) % len(payloads)] for j in range(k)]
            t0 = time.perf_counter()
            try:
                status, body = server.predict(files, timeout=120)
            except (OSError, ValueError) as e:  # recorded, and failed below
                status, body = 0, {"error": repr(e)}
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                statuses.append(status)
                if status == 200:
                    for (name, _), pred in zip(files, body["predictions"]):
                        got = [pred["probabilities"][c] for c in bundle.classes]
                        if pred["filename"] != name or not np.allclose(got, expected[name],
                                                                       atol=1e-5):
                            wrong.append(name)

    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=600)
    wall = time.perf_counter() - t0
    _, after = server.request("GET", "/health")
    n = threads * per_thread
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    passes = after["passes"] - before["passes"]
    imgs = after["images"] - before["images"]
    print(f"\nload test: {n} requests from {threads} threads in {wall:.1f}s "
          f"({n / wall:.1f} req/s), latency p50 {p50:.0f} ms, p99 {p99:.0f} ms; "
          f"{imgs} images in {passes} forward passes ({imgs / max(passes, 1):.1f} per pass); "
          f"statuses {sorted(set(statuses))}")
    assert not any(w.is_alive() for w in workers)
    assert len(statuses) == n
    assert not [s for s in statuses if s >= 500] and statuses.count(200) == n
    assert not wrong, f"responses mixed up between requests: {wrong[:5]}"
    assert imgs == sum(1 + (t + i) % 3 for t in range(threads) for i in range(per_thread))


async def _asgi(app, method: str, path: str, body: bytes = b"",
                headers: dict | None = None) -> tuple[int, dict]:
    """One request to an ASGI application, in process: no socket, no HTTP client library."""
    import asyncio

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 80),
             "headers": raw + [(b"content-length", str(len(body)).encode())]}
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if pending:
            return pending.pop()
        await asyncio.Event().wait()  # the client stays connected until the answer

    status, chunks = 0, []

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    raw_body = b"".join(chunks)
    return status, json.loads(raw_body) if raw_body else {}


@pytest.mark.slow
def test_concurrent_single_image_requests_share_forward_passes(tiny_run, images):
    """The README's claim: the server batches concurrent requests into one forward pass.

    Each request carries one image, so more than one image per pass can only come from
    batching across requests. The model is slowed down so that the other requests are queued
    while a pass runs, as they are under real load, which makes the count deterministic.
    """
    import asyncio

    pytest.importorskip("fastapi")
    from imgclf.deploy.serve import ServeConfig, create_app

    bundle = load_bundle(tiny_run.path)
    sizes: list[int] = []
    forward = bundle.model.forward

    def slow_forward(x):
        sizes.append(len(x))
        time.sleep(0.2)
        return forward(x)

    bundle.model.forward = slow_forward
    outer = create_app(ServeConfig(str(tiny_run.path), batch_wait_ms=20), bundle=bundle)
    inner = outer.app  # the FastAPI app inside the body-size middleware
    n_requests = 8
    payloads = [(p.name, p.read_bytes()) for p in
                (images[i % len(images)] for i in range(n_requests))]

    async def scenario():
        async with inner.router.lifespan_context(inner):
            _, before = await _asgi(outer, "GET", "/health")
            del sizes[:]  # not the warm-up pass
            answers = []
            for name, data in payloads:
                body, ctype = multipart([(name, data)])
                answers.append(_asgi(outer, "POST", "/predict", body, {"Content-Type": ctype}))
            answers = await asyncio.wait_for(asyncio.gather(*answers), 120)
            _, after = await _asgi(outer, "GET", "/health")
        return answers, before, after

    answers, before, after = asyncio.run(scenario())
    assert [status for status, _ in answers] == [200] * n_requests
    assert [body["predictions"][0]["filename"] for _, body in answers] == [n for n, _ in payloads]
    passes, imgs = after["passes"] - before["passes"], after["images"] - before["images"]
    assert imgs == n_requests
    print(f"\n{imgs} single-image requests in {passes} passes; forward batch sizes {sizes}")
    assert imgs / passes > 1.5
    assert sum(sizes) / len(sizes) > 1.5  # images per call of the model's forward


def test_a_busy_port_or_no_port_is_one_clear_error_before_serving():
    import socket

    from imgclf.deploy.serve import check_address
    from imgclf.errors import ImgclfError

    with pytest.raises(ImgclfError, match="--port 99999 is not a port: use 1 to 65535"):
        check_address("127.0.0.1", 99999)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ImgclfError, match=f"cannot listen on 127.0.0.1:{port} .*--port"):
            check_address("127.0.0.1", port)
    check_address("127.0.0.1", port)  # free again
