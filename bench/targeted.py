"""Benchmark: a push to one person among many subscribers.

A real ``python api.py`` process on each store (the JSON file, then a real
redis-server) holds N subscriptions (default 100,000); ``--users`` of them
(default 1,000) are bound to users, two devices each, on the decrypting
push stand-in (tests/push_service.py), the rest on a port nobody answers.
For each run it sends ``POST /push {"users": [one]}`` and, side by side,
``POST /push {"topic": ...}`` to a topic that the same two devices alone
are on, and prints the time to the 202 answer and to the last of the two
messages arriving, decrypted, at the stand-in. Finding a user's devices is
an index lookup, so the two must cost the same, and the target is under
100 ms for both figures with 100,000 stored.

    python bench/targeted.py [--subscribers 100000] [--users 1000] [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import api
from tests.push_service import PushService
from tests.redis_server import RedisServer

TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "bench-user-token-secret-0123456789abcdef"
TARGET_MS = 100


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unanswered(n: int, p256dh: str) -> dict:
    """A subscription on a port nobody answers on: stored, never sent to here."""
    endpoint = f"http://127.0.0.1:9/push/stored-{n}"
    return {
        "id": api.subscription_id(endpoint),
        "endpoint": endpoint,
        "expirationTime": None,
        "keys": {"p256dh": p256dh, "auth": api.b64url_encode(os.urandom(16))},
        "topics": ["everyone-else"],
        "created": 0,
    }


def fill(store: api.SubscriptionStore, count: int, service: PushService, users: int):
    """``count`` records through the store itself; ``users`` users with two
    devices each on the stand-in, each pair alone on a topic of its own."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    p256dh = api.b64url_encode(
        key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    )
    records = [unanswered(n, p256dh) for n in range(count - 2 * users)]
    people = {}
    for u in range(users):
        user = f"user-{u}"
        devices = [service.subscriber() for _ in range(2)]
        people[user] = devices
        for device in devices:
            records.append(
                {
                    "id": api.subscription_id(device.endpoint),
                    **device.subscription,
                    "topics": [f"just-{u}"],
                    "user": user,
                    "created": 0,
                }
            )
    for start in range(0, len(records), 5000):
        store.write(records[start : start + 5000])
    return people


def measure(env: dict, people: dict, service: PushService, runs: int) -> dict:
    """Seconds to the answer and to the last message, per kind of push."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "api.py")],
        env={**os.environ, **env, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(url + "/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.05)
        session = requests.Session()
        figures: dict[str, dict[str, list[float]]] = {
            kind: {"answer": [], "delivered": []} for kind in ("user", "topic")
        }
        names = list(people)
        for run in range(runs + 1):  # the first of each is a warm-up
            for kind in ("user", "topic"):
                n = (2 * run + (kind == "topic")) % len(names)
                user = names[n]
                body = {"title": f"run {run}", "body": "for you"}
                body |= {"users": [user]} if kind == "user" else {"topic": f"just-{n}"}
                expected = len(service.deliveries) + 2
                started = time.monotonic()
                answer = session.post(url + "/push", json=body, headers=AUTH)
                answered = time.monotonic()
                if answer.status_code != 202 or answer.json()["subscriptions"] != 2:
                    raise SystemExit(f"unexpected answer: {answer.text}")
                arrived = service.wait_for(expected, timeout=30)[-2:]
                if {d.subscriber for d in arrived} != {s.id for s in people[user]}:
                    raise SystemExit("the messages reached someone else")
                if any(d.error for d in arrived):
                    raise SystemExit(f"a message did not decrypt: {arrived}")
                if run:
                    figures[kind]["answer"].append(answered - started)
                    figures[kind]["delivered"].append(
                        max(d.at for d in arrived) - started
                    )
        return figures
    finally:
        server.terminate()
        server.wait(30)


def report(store: str, figures: dict) -> bool:
    met = True
    for kind, label in (("user", "to one user"), ("topic", "to a topic of 2")):
        answer = [s * 1000 for s in figures[kind]["answer"]]
        delivered = [s * 1000 for s in figures[kind]["delivered"]]
        print(
            f"{store:<5} push {label:<16} answer median {statistics.median(answer):6.1f} ms"
            f" (max {max(answer):6.1f}); both messages in: median "
            f"{statistics.median(delivered):6.1f} ms (max {max(delivered):6.1f})"
        )
        met &= statistics.median(delivered) < TARGET_MS
    ratio = statistics.median(figures["user"]["delivered"]) / statistics.median(
        figures["topic"]["delivered"]
    )
    print(f"{store:<5} ratio user/topic (both messages in, medians): {ratio:.2f}")
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    met = True
    with tempfile.TemporaryDirectory() as tmp, PushService() as service:
        base = {
            "VAPID_DIR": str(Path(tmp, "vapid")),
            "PUSH_ENDPOINT_PATTERN": r"^http://127\.0\.0\.1:\d+/",
            "VAPID_SUBJECT": "mailto:bench@push.test",
            "PUSH_TOKEN": TOKEN,
            "USER_TOKEN_SECRET": SECRET,
            "LOG_LEVEL": "WARNING",
            "ACCESS_LOG": "false",
            "RATE_LIMIT": "0",
        }
        path = Path(tmp, "subscriptions.json")
        store = api.JsonSubscriptionStore(path)
        people = fill(store, args.subscribers, service, args.users)
        store.close()
        print(
            f"{args.subscribers:,} subscriptions stored, {args.users:,} users with "
            f"2 devices each; {args.runs} runs of each push"
        )
        figures = measure(
            {**base, "SUBSCRIPTIONS_FILE": str(path)}, people, service, args.runs
        )
        met &= report("json", figures)
        with RedisServer() as redis_server:
            import redis

            prefix = f"bench-{secrets.token_hex(3)}:"
            client = redis.Redis.from_url(redis_server.url, decode_responses=True)
            store = api.RedisSubscriptionStore(client, prefix)
            people = fill(store, args.subscribers, service, args.users)
            store.close()
            env = {**base, "REDIS_URL": redis_server.url, "REDIS_PREFIX": prefix}
            met &= report("redis", measure(env, people, service, args.runs))
    print(
        f"target: both messages in under {TARGET_MS} ms: {'met' if met else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
