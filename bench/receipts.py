"""Benchmark: receipts (POST /notifications/<id>/events) through a real server
process, and what each counted receipt costs to keep.

A. Rate: ``--receipts`` (20,000) distinct receipts, each a subscriber's
   ``delivered`` for one notification, posted by ``--clients`` (16) keep-alive
   connections to ``python api.py`` on the JSON files and on Redis (its own
   redis-server, tests/redis_server.py), one after the other in this run. Each
   is fsynced (JSON) or in Redis before its answer. Prints receipts per second
   for both, and checks the notification then counts exactly that many.
B. Memory: the server's RSS before and after (JSON: the receipts are in an
   SQLite file, only their counts in memory), and Redis's ``used_memory``
   before and after; both per receipt.

    python bench/receipts.py [--receipts 20000] [--clients 16]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import api
from tests.redis_server import RedisServer

TOKEN = "bench-token-0123456789"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def request(port: int, method: str, path: str, body: dict | None = None) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    conn.request(method, path, json.dumps(body) if body else None, headers)
    response = conn.getresponse()
    return json.loads(response.read() or b"{}")


def measure(directory: Path, receipts: int, clients: int, env_extra: dict) -> dict:
    port = free_port()
    vapid = directory / "vapid"
    env = {
        **os.environ,
        "PORT": str(port),
        "VAPID_DIR": str(vapid),
        "SUBSCRIPTIONS_FILE": str(directory / "subscriptions.json"),
        "VAPID_SUBJECT": "mailto:bench@push.test",
        "PUSH_TOKEN": TOKEN,
        "LOG_LEVEL": "WARNING",
        "ACCESS_LOG": "false",
        "RECEIPT_RATE_LIMIT": "0",  # the clients share one address on purpose
        "THREADS": str(clients),
        "PUSH_PROCESSES": "1",
        **env_extra,
    }
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "api.py")], env=env, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                request(port, "GET", "/health")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("server did not start") from None
                time.sleep(0.05)
        # A notification to nobody: receipts need only that it exists.
        notification = request(port, "POST", "/push", {"title": "bench"})["id"]
        settings = api.Settings(
            vapid_dir=str(vapid), vapid_subject="mailto:b@push.test"
        )
        key = api.receipt_key_of(settings, api.VapidKeys.load_or_create(settings))
        bodies = [
            json.dumps(
                {
                    "event": "delivered",
                    "receipt": api.receipt(
                        key, notification, api.subscription_id(f"subscriber-{n}")
                    ),
                }
            )
            for n in range(receipts)
        ]
        time.sleep(1)
        rss_before = rss_mb(server.pid)
        counted = [0] * clients
        path = f"/notifications/{notification}/events"

        def client(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            for body in bodies[i::clients]:
                conn.request("POST", path, body)  # text/plain, as service workers
                response = conn.getresponse()
                answer = json.loads(response.read())
                counted[i] += answer.get("counted") is True

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - began
        document = request(port, "GET", f"/notifications/{notification}")
        if sum(counted) != receipts or document["delivered"] != receipts:
            raise SystemExit(
                f"counted {sum(counted)}, the notification says "
                f"{document['delivered']}, of {receipts}"
            )
        return {
            "rate": receipts / elapsed,
            "rss_before": rss_before,
            "rss_after": rss_mb(server.pid),
        }
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receipts", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    n = args.receipts
    print(f"{n} receipts, {args.clients} clients, on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        json_run = measure(Path(tmp) / "json", n, args.clients, {})
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis_server:
        client = redis_server.client()
        used_before = client.info("memory")["used_memory"]
        redis_run = measure(
            Path(tmp) / "redis",
            n,
            args.clients,
            {"REDIS_URL": redis_server.url, "REDIS_PREFIX": "bench:"},
        )
        used_after = client.info("memory")["used_memory"]
    per_receipt = (json_run["rss_after"] - json_run["rss_before"]) * 2**20 / n
    print(
        f"JSON files: {json_run['rate']:,.0f} receipts/s; server RSS "
        f"{json_run['rss_before']:.1f} -> {json_run['rss_after']:.1f} MB, "
        f"{per_receipt:.0f} bytes per receipt"
    )
    print(
        f"Redis:      {redis_run['rate']:,.0f} receipts/s "
        f"({redis_run['rate'] / json_run['rate']:.2f}x the JSON files); Redis "
        f"used_memory +{(used_after - used_before) / 2**20:.1f} MB, "
        f"{(used_after - used_before) / n:.0f} bytes per receipt; server RSS "
        f"{redis_run['rss_before']:.1f} -> {redis_run['rss_after']:.1f} MB"
    )


if __name__ == "__main__":
    main()
