"""Load-test `imgclf serve` with and without batching of concurrent requests.

Builds a tf_efficientnet_lite0 bundle from ../shared/weights (a 4-class head; its accuracy does not
matter here), starts `imgclf serve` on 127.0.0.1 once per --max-batch setting, sends the same
bounded load from several threads (one photo per request, from ../shared/data) and prints
throughput, latency percentiles and images per forward pass.

    python benchmarks/serve_load.py [--threads 8] [--requests 25] [--batches 1,32]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"


def build_bundle(folder: Path) -> Path:
    from imgclf.training import models
    from imgclf.deploy.bundle import save_bundle
    from imgclf.data.transforms import Preprocess

    weights = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    model = models.create_model("tf_efficientnet_lite0", 4, weights=weights)
    pre = Preprocess.from_model_cfg(model.pretrained_cfg)
    return save_bundle(folder, model, "tf_efficientnet_lite0",
                       ["can", "carton", "milk_bottle", "water_bottle"], False, pre)


def post(port: int, name: str, data: bytes) -> int:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/predict", body,
                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def run(bundle: Path, max_batch: int, photos: list[tuple[str, bytes]], threads: int,
        requests: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "imgclf.cli", "serve", str(bundle), "--port",
                             str(port), "--max-batch", str(max_batch)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                before = health(port)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("server did not start")
                time.sleep(0.5)
        latencies, statuses, lock = [], [], threading.Lock()

        def client(t: int) -> None:
            for i in range(requests):
                name, data = photos[(t * requests + i) % len(photos)]
                t0 = time.perf_counter()
                status = post(port, name, data)
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    statuses.append(status)

        workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
        after = health(port)
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99]) * 1000
        passes = after["passes"] - before["passes"]
        images = after["images"] - before["images"]
        print(f"--max-batch {max_batch:>3}: {len(statuses)} requests in {wall:.1f}s = "
              f"{len(statuses) / wall:.1f} img/s; latency p50 {p50:.0f} ms, p90 {p90:.0f} ms, "
              f"p99 {p99:.0f} ms; {images / max(passes, 1):.1f} images per forward pass; "
              f"statuses {sorted(set(statuses))}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25, help="requests per thread")
    ap.add_argument("--batches", default="1,32", help="--max-batch values to compare")
    args = ap.parse_args()
    data = SHARED / "data" / "fridgeObjects_150px"
    if not data.is_dir():
        raise SystemExit(f"{data} not found")
    photos = [(p.name, p.read_bytes()) for p in sorted(data.rglob("*.jpg"))[:64]]
    print(f"{os.cpu_count()} cores; {args.threads} client threads x {args.requests} requests, "
          f"one {len(photos)}-photo cycle of fridgeObjects_150px JPEGs; tf_efficientnet_lite0 at 224")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_bundle(Path(tmp) / "model")
        for b in [int(x) for x in args.batches.split(",")]:
            run(bundle, b, photos, args.threads, args.requests)


if __name__ == "__main__":
    main()
