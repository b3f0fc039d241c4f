"""Benchmark: requests libcurl leaves unsent at the end of a batch.

Two processes, each one ``api.WebPushDelivery`` (what a delivery process or
``--worker`` runs), send batches of 250 messages one after another to Debian's
nginx answering 201 itself over TLS and HTTP/2 (tests/nginx.py), for
``--seconds`` each way, on the machine's 2 cores. Counts the batches in which a
message waited for PUSH_TIMEOUT (2 s here) and was sent again.

libcurl 8.23 (pycurl's wheel) can keep a request's last DATA frame in nghttp2's
buffer, stop watching the socket for writing, and wait for an answer that
cannot come. api.py runs every transfer each FLUSH_EVERY (0.1 s) while any is
under way, which sends it; ``FLUSH_EVERY = inf`` shows libcurl without that.
Both ways are measured in this run, one after the other.

    python bench/stalls.py
    python bench/stalls.py --seconds 30
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import fanout  # puts ROOT on sys.path: api and tests import after it

import api
from tests.nginx import Nginx

PATTERN = r"^https://127\.0\.0\.1:\d+/"
TIMEOUT = 2.0  # PUSH_TIMEOUT: a stalled message costs this, then a retry


def send(records: list, ca_file: str, seconds: float, flush: float, results) -> None:
    os.environ["SSL_CERT_FILE"] = ca_file
    api.FLUSH_EVERY = flush
    settings = api.Settings.from_env(
        {}, vapid_dir=tempfile.mkdtemp(), push_endpoint_pattern=PATTERN
    )
    keys = api.VapidKeys.load_or_create(settings)
    delivery = api.WebPushDelivery(keys, 100, TIMEOUT, PATTERN)
    message = api.Message({"title": "t"}, b'{"title": "t"}', 60)
    batches = stalled = retried = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        outcomes = delivery.submit(records, message, "bench").result()
        batches += 1
        tries = sum(o.tries > 1 for o in outcomes)
        stalled += tries > 0
        retried += tries
        if any(o.result != "sent" for o in outcomes):
            raise SystemExit(
                f"not sent: {[o for o in outcomes if o.result != 'sent'][:1]}"
            )
    delivery.close()
    results.put((batches, stalled, retried))


def run(front: Nginx, seconds: float, flush: float) -> tuple[int, int, int]:
    records = [
        {**fanout.fast_subscription(front, n), "id": f"r{n}"} for n in range(250)
    ]
    results = multiprocessing.Queue()
    processes = [
        multiprocessing.Process(
            target=send, args=(records, front.ca_file, seconds, flush, results)
        )
        for _ in range(2)
    ]
    for p in processes:
        p.start()
    totals = [results.get() for _ in processes]
    for p in processes:
        p.join()
    return tuple(sum(t[i] for t in totals) for i in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90, help="each way")
    args = parser.parse_args()
    with Nginx(access_log=False, max_streams=1000) as front:
        rows = [
            (
                f"api.py (FLUSH_EVERY {api.FLUSH_EVERY} s)",
                run(front, args.seconds, api.FLUSH_EVERY),
            ),
            ("libcurl alone (FLUSH_EVERY inf)", run(front, args.seconds, math.inf)),
        ]
    print(
        f"2 processes x batches of 250 to nginx (TLS, HTTP/2), {args.seconds:.0f} s "
        f"each way, on {os.cpu_count()} cores; PUSH_TIMEOUT {TIMEOUT} s"
    )
    for name, (batches, stalled, retried) in rows:
        print(
            f"  {name}: {batches:,} batches, {stalled} with a message that waited "
            f"for PUSH_TIMEOUT ({retried} messages, sent again)"
        )


if __name__ == "__main__":
    main()
