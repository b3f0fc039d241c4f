"""Benchmark: fan-out of one notification to N subscribers.

Makes N subscribers (default 10,000) with real keys on a local HTTPS push-service
stand-in (its own throwaway CA, given to the server through SSL_CERT_FILE) that
answers after a configurable latency, and compares, in the same run:

- the common recipe (``webpush()`` per subscriber in a loop, one shared
  ``vapid_claims`` dict) on a sample of subscribers, and
- ``POST /push`` through a real ``python api.py`` process, for all N.

The stand-in checks the VAPID JWT and decrypts a sample of the messages; any
failure there fails the run. Targets on a 2-core machine: at least 2,500 msg/s
and 100x the loop at 50 ms latency; at least 4,000 msg/s at 0 ms.

    python bench/fanout.py [--subscribers 10000] [--latency 0.05 0] [--sample 100]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from pywebpush import WebPushException, webpush

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import api
from tests.push_service import PushService

TOKEN = "bench-token"
MESSAGE = {"title": "Benchmark", "body": "One message to many subscribers", "url": "/"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def blog_loop(subscriptions: list[dict], key_file: str) -> tuple[float, int]:
    """The recipe from the blog: one webpush() call after another. Returns
    (messages per second, messages that failed)."""
    claims = {"sub": "mailto:bench@push.test"}
    failed = 0
    started = time.perf_counter()
    for sub in subscriptions:
        try:
            webpush(
                sub,
                json.dumps(MESSAGE),
                vapid_private_key=key_file,
                vapid_claims=claims,
            )
        except WebPushException:
            failed += 1
    return len(subscriptions) / (time.perf_counter() - started), failed


def start_server(directory: Path, ca_file: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "VAPID_DIR": str(directory / "vapid"),
        "SUBSCRIPTIONS_FILE": str(directory / "subscriptions.json"),
        "PUSH_ENDPOINT_PATTERN": r"^https://127\.0\.0\.1:\d+/",
        "VAPID_SUBJECT": "mailto:bench@push.test",
        "PUSH_TOKEN": TOKEN,
        "LOG_LEVEL": "WARNING",
        "RATE_LIMIT": "0",  # one client on purpose
        "SSL_CERT_FILE": ca_file,
    }
    server = subprocess.Popen([sys.executable, str(ROOT / "api.py")], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=1).ok:
                return server, url
        except requests.ConnectionError:
            time.sleep(0.05)
    server.kill()
    raise SystemExit("server did not start")


def store_subscriptions(path: Path, subscriptions: list[dict]) -> None:
    with open(path, "w") as f:
        for sub in subscriptions:
            record = {"id": api.subscription_id(sub["endpoint"]), **sub, "topics": []}
            f.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--latency", type=float, nargs="+", default=[0.05, 0.0])
    parser.add_argument(
        "--sample", type=int, default=100, help="subscribers the loop sends to"
    )
    parser.add_argument(
        "--verify-every", type=int, default=20, help="stand-in checks every Nth"
    )
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory() as tmp,
        PushService(tls=True, verify_every=args.verify_every) as service,
    ):
        directory = Path(tmp)
        os.environ["REQUESTS_CA_BUNDLE"] = service.ca_file  # for the blog's loop
        subscribers = [service.subscriber() for _ in range(args.subscribers)]
        subscriptions = [s.subscription for s in subscribers]
        store_subscriptions(directory / "subscriptions.json", subscriptions)
        server, url = start_server(directory, service.ca_file)
        key_file = str(directory / "vapid" / "private_key.pem")
        rows = []
        try:
            for latency in args.latency:
                service.latency = latency
                loop_rate, loop_failed = blog_loop(
                    subscriptions[: args.sample], key_file
                )
                started = time.perf_counter()
                answer = requests.post(
                    url + "/push",
                    json=MESSAGE,
                    headers={"Authorization": f"Bearer {TOKEN}"},
                ).json()
                elapsed = time.perf_counter() - started
                rate = answer["sent"] / elapsed
                rows.append((latency, loop_rate, loop_failed, answer, elapsed, rate))
        finally:
            server.terminate()
            server.wait(10)
        bad = [d for d in service.received() if d.error or d.status >= 300]
        checked = len(service.received())

    print(f"fan-out to {args.subscribers:,} subscribers on a local HTTPS push service")
    for latency, loop_rate, loop_failed, answer, elapsed, rate in rows:
        target = 2500 if latency else 4000
        print(f"\nlatency {latency * 1000:.0f} ms")
        print(
            f"  blog loop ({args.sample} messages): {loop_rate:9.1f} msg/s  ({loop_failed} failed)"
        )
        print(
            f"  POST /push:                {rate:9.0f} msg/s  ({answer['sent']} sent, "
            f"{answer['failed']} failed, {elapsed:.2f} s)"
        )
        print(f"  ratio:                     {rate / loop_rate:9.0f}x")
        met = rate >= target and (not latency or rate >= 100 * loop_rate)
        print(
            f"  target {target} msg/s{' and 100x' if latency else ''}: {'met' if met else 'NOT met'}"
        )
    print(
        f"\nstand-in checked {checked} messages (VAPID and decryption): {len(bad)} bad"
    )
    if bad:
        print("  first:", bad[0].error)
        sys.exit(1)


if __name__ == "__main__":
    main()
