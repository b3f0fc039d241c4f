"""Benchmark: POST /subscription per second through a real server process.

Runs the server twice in one go, once on an empty store and once on a store
that already holds N subscriptions (default 100,000), and prints both rates
and their ratio: one write must not cost more when many are stored.
Target: at least 500 subscribes per second with 100,000 stored.

    python bench/subscribe.py [--stored 100000] [--seconds 10] [--clients 16]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import api

P256DH = api.b64url_encode(
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
)


def subscription(name: str) -> dict:
    return {
        "endpoint": f"http://127.0.0.1:9/push/{name}",
        "expirationTime": None,
        "keys": {"p256dh": P256DH, "auth": api.b64url_encode(os.urandom(16))},
    }


def fill_store(path: Path, count: int) -> None:
    """Write ``count`` records the way the store writes them."""
    with open(path, "w") as f:
        for n in range(count):
            sub = subscription(f"stored-{n}")
            record = {
                "id": api.subscription_id(sub["endpoint"]),
                **sub,
                "topics": [],
                "created": 0,
            }
            f.write(json.dumps(record, separators=(",", ":")) + "\n")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(
    directory: Path, stored: int, seconds: float, clients: int
) -> tuple[float, float]:
    """(subscribes per second, seconds the server took to start)."""
    store = directory / "subscriptions.json"
    fill_store(store, stored)
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "VAPID_DIR": str(directory / "vapid"),
        "SUBSCRIPTIONS_FILE": str(store),
        "PUSH_ENDPOINT_PATTERN": r"^http://127\.0\.0\.1:\d+/",
        "VAPID_SUBJECT": "mailto:bench@push.test",
        "PUSH_TOKEN": "bench",
        "LOG_LEVEL": "WARNING",
        "RATE_LIMIT": "0",  # one client on purpose
        "THREADS": str(clients),
    }
    started = time.monotonic()
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "api.py")], env=env, stdout=subprocess.DEVNULL
    )
    try:
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() - started > 120:
                    raise SystemExit("server did not start") from None
                time.sleep(0.05)
        startup = time.monotonic() - started
        counts = [0] * clients
        errors = [0] * clients
        stop = time.monotonic() + seconds

        def client(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            n = 0
            while time.monotonic() < stop:
                body = json.dumps(subscription(f"new-{i}-{n}"))
                n += 1
                conn.request(
                    "POST", "/subscription", body, {"Content-Type": "application/json"}
                )
                response = conn.getresponse()
                response.read()
                if response.status == 201:
                    counts[i] += 1
                else:
                    errors[i] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        begin = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - begin
        if sum(errors):
            raise SystemExit(f"{sum(errors)} subscribes failed")
        return sum(counts) / elapsed, startup
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stored", type=int, default=100_000, help="subscriptions stored first"
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="length of each run"
    )
    parser.add_argument(
        "--clients", type=int, default=16, help="concurrent HTTP clients"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        empty_dir, full_dir = Path(tmp, "empty"), Path(tmp, "full")
        empty_dir.mkdir()
        full_dir.mkdir()
        empty, _ = measure(empty_dir, 0, args.seconds, args.clients)
        full, startup = measure(full_dir, args.stored, args.seconds, args.clients)
    print(f"subscribes/s with 0 stored:        {empty:8.0f}")
    print(
        f"subscribes/s with {args.stored:,} stored: {full:8.0f}  (start-up {startup:.1f} s)"
    )
    print(f"ratio full/empty:                  {full / empty:8.2f}")
    print(
        f"target 500/s with {args.stored:,} stored:  {'met' if full >= 500 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
