"""Benchmark: the delivery policy's cost and accuracy at scale.

A real ``python api.py`` process on each store (the JSON file, then a real
redis-server) holds N subscriptions (default 20,000) on the push stand-in
(tests/push_service.py, checking one message in 50), each with a time zone
from a spread of real ones. Side by side, it sends:

- ``plain``: a push to everyone, as fast as it goes;
- ``local``: a ``send_at_local`` whose time has passed in every zone, so all
  N go at once, but through the local-time planner, which reads each
  subscriber's zone page by page: its cost is the gap to ``plain``;
- ``rate``: a push to everyone at a rate of N per ``--seconds`` (default
  10): the planner queues a second's worth at a time, the first at once, so
  the last should leave at ``seconds - 1``: how close it comes.

    python bench/policy.py [--subscribers 20000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import api
from tests.ports import free_port
from tests.push_service import PushService
from tests.redis_server import RedisServer

TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ZONES = (
    "Pacific/Kiritimati",
    "Asia/Tokyo",
    "Asia/Kolkata",
    "Europe/Paris",
    "UTC",
    "America/Sao_Paulo",
    "America/New_York",
    "America/Los_Angeles",
    "Pacific/Pago_Pago",
    None,  # none given: DEFAULT_TIMEZONE
)


def fill(store: api.SubscriptionStore, count: int, service: PushService) -> None:
    records = []
    for n in range(count):
        subscriber = service.subscriber()
        record = {
            "id": api.subscription_id(subscriber.endpoint),
            **subscriber.subscription,
            "topics": [],
            "created": int(time.time()),
        }
        if ZONES[n % len(ZONES)]:
            record["timezone"] = ZONES[n % len(ZONES)]
        records.append(record)
    for start in range(0, len(records), 5000):
        store.write(records[start : start + 5000])


def start(env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "api.py")],
        env={**os.environ, **env, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(url + "/health", timeout=1).ok:
                return server, url
        except requests.ConnectionError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.05)


def span(url: str, service: PushService, body: dict, count: int) -> float:
    """Seconds from POST /push to the last of its ``count`` messages (to 10
    ms: the stand-in counts every message and checks one in 50)."""
    expected = service.requests + count
    checked = len(service.deliveries)
    started = time.monotonic()
    answer = requests.post(url + "/push", json=body, headers=AUTH, timeout=30)
    if answer.status_code != 202:
        raise SystemExit(f"unexpected answer: {answer.text}")
    while service.requests < expected:
        if time.monotonic() - started > 600:
            raise SystemExit(f"{expected - service.requests} messages never came")
        time.sleep(0.01)
    ended = time.monotonic()
    if any(d.error for d in service.deliveries[checked:]):
        raise SystemExit("a message did not decrypt")
    return ended - started


def measure(store: str, env: dict, service: PushService, n: int, seconds: float):
    server, url = start(env)
    try:
        # Passed everywhere: the latest clock on Earth (UTC-12) a minute ago.
        latest = datetime.now(ZoneInfo("Etc/GMT+12")) - timedelta(minutes=1)
        local = latest.replace(tzinfo=None).isoformat(timespec="seconds")
        rate = round(n * 60 / seconds)
        span(url, service, {"title": "warm-up"}, n)
        plain = span(url, service, {"title": "plain"}, n)
        timed = span(url, service, {"title": "local", "send_at_local": local}, n)
        paced = span(url, service, {"title": "rate", "rate": rate}, n)
    finally:
        server.terminate()
        server.wait(30)
    # The first second's worth goes at once: the last leaves a second early.
    due = seconds - 1
    print(
        f"{store:<5} {n:,} subscribers: plain {plain:5.2f} s; send_at_local (all "
        f"passed) {timed:5.2f} s ({timed / plain:.2f}x plain); rate {rate:,}/min "
        f"(last second's worth due at {due:g} s) {paced:5.2f} s ({paced / due:.3f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, PushService(verify_every=50) as service:
        base = {
            "VAPID_DIR": str(Path(tmp, "vapid")),
            "PUSH_ENDPOINT_PATTERN": r"^http://127\.0\.0\.1:\d+/",
            "VAPID_SUBJECT": "mailto:bench@push.test",
            "PUSH_TOKEN": TOKEN,
            "LOG_LEVEL": "WARNING",
            "ACCESS_LOG": "false",
            "RATE_LIMIT": "0",
        }
        path = Path(tmp, "subscriptions.json")
        store = api.JsonSubscriptionStore(path)
        fill(store, args.subscribers, service)
        store.close()
        env = {**base, "SUBSCRIPTIONS_FILE": str(path)}
        measure("json", env, service, args.subscribers, args.seconds)
        with RedisServer() as redis_server:
            import redis

            prefix = f"bench-{secrets.token_hex(3)}:"
            client = redis.Redis.from_url(redis_server.url, decode_responses=True)
            store = api.RedisSubscriptionStore(client, prefix)
            fill(store, args.subscribers, service)
            store.close()
            env = {**base, "REDIS_URL": redis_server.url, "REDIS_PREFIX": prefix}
            measure("redis", env, service, args.subscribers, args.seconds)


if __name__ == "__main__":
    main()
