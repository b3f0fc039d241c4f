"""What a hostile client found, and the promises that now hold against it.

Each test about HTTP talks to a real ``python api.py`` process; a request
that no client library would send (a Host that is not a host) goes over a
raw socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time

import pytest
import requests

from test_api import AUTH, ROOT
from tests.push_service import HANG, PushService

BAD_HOSTS = ["[", "[::1", "a]b[", "[fff]", "x:port"]


def raw_request(port: int, data: bytes) -> bytes:
    """Send ``data`` as it is; the whole answer, until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def raw_post(port: int, path: str, host: str, body: dict, headers: dict) -> tuple:
    """POST ``body`` with this exact Host header: (status, JSON answer)."""
    data = json.dumps(body).encode()
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    answer = raw_request(port, "\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + data)
    status_line, _, rest = answer.partition(b"\r\n")
    _, _, body_bytes = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(body_bytes)


# -- input that made a 500 ------------------------------------------------------


@pytest.fixture
def hostile_server(server_factory, push_service):
    """A server with webhooks on, and one subscriber stored on the stand-in."""
    server = server_factory(WEBHOOK_SECRET="s3cret").start()
    subscriber = push_service.subscriber()
    stored = requests.post(server.url + "/subscription", json=subscriber.subscription)
    assert stored.status_code == 201
    server.subscription = subscriber.subscription
    return server


def test_a_host_header_that_is_no_host_gets_a_400_json_error_never_a_500(
    hostile_server,
):
    server = hostile_server
    routes = [
        ("/push", {"title": "t"}, AUTH),
        ("/subscription/test", server.subscription, {}),
        ("/webhooks/generic", {"title": "t"}, AUTH),
    ]
    for host in BAD_HOSTS:
        for path, body, headers in routes:
            status, answer = raw_post(server.port, path, host, body, headers)
            assert status == 400, (host, path, answer)
            assert "Host" in answer["error"], (host, path, answer)
    # a good Host still works, an IPv6 literal too
    for host in ["push.example.org", "[::1]:8080"]:
        status, answer = raw_post(server.port, "/push", host, {"title": "t"}, AUTH)
        assert status == 202, (host, answer)


def test_with_public_url_set_the_host_header_is_not_needed(
    server_factory, push_service
):
    server = server_factory(PUBLIC_URL="https://push.example.org").start()
    status, answer = raw_post(server.port, "/push", "[", {"title": "t"}, AUTH)
    assert status == 202, answer


def test_a_push_url_with_a_broken_host_gets_a_400_saying_so(hostile_server):
    for url in ["http://[::1", "https://[x]y", "http://x:port/"]:
        for body in [
            {"title": "t", "url": url},
            {"title": "t", "actions": [{"action": "a", "title": "A", "url": url}]},
        ]:
            answer = requests.post(
                hostile_server.url + "/push", json=body, headers=AUTH
            )
            assert answer.status_code == 400, (body, answer.text)
            assert "is not a URL" in answer.json()["error"], answer.text


def test_prefer_wait_with_thousands_of_digits_counts_as_the_longest_wait(
    hostile_server,
):
    for digits in ["9" * 5000, "0" * 5000 + "1"]:
        answer = requests.post(
            hostile_server.url + "/push",
            json={"title": "t"},
            headers={**AUTH, "Prefer": f"wait={digits}"},
        )
        assert answer.status_code == 200, answer.text
        expected = "60" if digits.startswith("9") else "1"
        assert answer.headers["Preference-Applied"] == f"wait={expected}"


def test_a_content_length_of_thousands_of_digits_gets_a_400_json_error(
    server_factory,
):
    server = server_factory().start()
    head = (
        b"POST /push HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n{}"
    )
    answer = raw_request(server.port, head)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert "Content-Length" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert "Traceback" not in server.output()


# -- Idempotency-Key ------------------------------------------------------------


def test_a_push_idempotency_key_never_swallows_a_webhook_delivery_of_that_id(
    server_factory, backend_env
):
    server = server_factory(WEBHOOK_SECRET="s3cret", **backend_env).start()
    key = {"Idempotency-Key": "webhook:generic:abc"}
    pushed = requests.post(
        server.url + "/push", json={"title": "t"}, headers={**AUTH, **key}
    )
    assert pushed.status_code == 202, pushed.text
    hooked = requests.post(
        server.url + "/webhooks/generic",
        json={"title": "t"},
        headers={**AUTH, "X-Delivery-Id": "abc"},
    )
    assert hooked.status_code == 202, hooked.text
    assert "duplicate" not in hooked.json()
    assert hooked.json()["id"] != pushed.json()["id"]
    # each still replays in its own namespace
    again = requests.post(
        server.url + "/push", json={"title": "t"}, headers={**AUTH, **key}
    )
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == pushed.json()["id"]
    redelivered = requests.post(
        server.url + "/webhooks/generic",
        json={"title": "t"},
        headers={**AUTH, "X-Delivery-Id": "abc"},
    )
    assert redelivered.json() == {"duplicate": "abc", "id": hooked.json()["id"]}


# -- the console ------------------------------------------------------------------

FRAMING = {
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def test_the_console_is_never_framed_nor_referred_by_whatever_route_reaches_it(
    server_factory,
):
    server = server_factory().start()
    console = (ROOT / "static" / "admin.html").read_bytes()
    reached = []
    for path in [
        "/admin",
        "/static/admin.html",
        "/static//admin.html",
        "/static/%61dmin.html",
        "/static/./admin.html",
        "/static/x/../admin.html",
        "/admin/",
    ]:
        for method in ("GET", "HEAD"):
            page = requests.request(method, server.url + path, allow_redirects=False)
            if page.status_code == 200 and (
                method == "HEAD" or page.content == console
            ):
                reached.append(path)
                for name, value in FRAMING.items():
                    assert page.headers.get(name) == value, (method, path, name)
    assert {"/admin", "/static/admin.html"} <= set(reached)


# -- send_at and the key directory ----------------------------------------------


def test_send_at_refuses_seconds_over_60_offset_minutes_over_59_and_non_ascii_digits(
    server_factory,
):
    server = server_factory().start()
    refused = [
        "2026-12-01T09:00:61Z",
        "2026-12-01T09:00:99Z",
        "2026-12-01T09:00:00+01:60",
        "2026-12-01T09:00:00+01:99",
        "２０２６-12-01T09:00:00Z",  # fullwidth digits
        "2026-12-01T09:00:00.٥Z",  # an Arabic-Indic digit
        "2026-12-0١T09:00:00Z",
    ]
    for send_at in refused:
        answer = requests.post(
            server.url + "/push", json={"title": "t", "send_at": send_at}, headers=AUTH
        )
        assert answer.status_code == 400, (send_at, answer.text)
        assert "RFC 3339" in answer.json()["error"]
    accepted = ["2020-12-31T23:59:60Z", "2020-12-01T09:00:00.5-09:59"]  # past: now
    for send_at in accepted:
        answer = requests.post(
            server.url + "/push", json={"title": "t", "send_at": send_at}, headers=AUTH
        )
        assert answer.status_code == 202, (send_at, answer.text)


def test_a_vapid_directory_left_open_to_others_is_made_0700_at_start(
    server_factory, tmp_path
):
    server = server_factory().start()
    server.stop()
    vapid = tmp_path / "vapid"
    os.chmod(vapid, 0o755)
    server.start()
    assert stat.S_IMODE(vapid.stat().st_mode) == 0o700
    assert "was mode 0755; made it 0700" in server.output()


# -- SIGTERM within SHUTDOWN_TIMEOUT ----------------------------------------------


def _exits_within(server, seconds: float) -> float:
    """Send SIGTERM; the seconds until the process exited, which must be at most
    ``seconds``."""
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        assert server.proc.wait(seconds) == 0
    except subprocess.TimeoutExpired:
        server.proc.wait(30)
        pytest.fail(
            f"exited after {time.monotonic() - started:.1f} s, over {seconds} s"
        )
    return time.monotonic() - started


@pytest.mark.parametrize("pending", ["fan-out", "test notifications"])
def test_sigterm_stops_the_server_within_shutdown_timeout_even_with_a_hung_push_service(
    server_factory, backend_env, pending
):
    with PushService() as hung:
        server = server_factory(
            SHUTDOWN_TIMEOUT="3", PUSH_TIMEOUT="60", PUSH_PROCESSES="2", **backend_env
        ).start()
        subscribers = [hung.subscriber(script=[HANG] * 3) for _ in range(2)]
        for subscriber in subscribers:
            stored = requests.post(
                server.url + "/subscription", json=subscriber.subscription
            )
            assert stored.status_code == 201

        answers = []

        def post(path: str, body: dict, headers: dict) -> None:
            with contextlib.suppress(requests.RequestException):  # cut off: expected
                answers.append(
                    requests.post(server.url + path, json=body, headers=headers)
                )

        if pending == "fan-out":
            requests_ = [("/push", {"title": "t"}, {**AUTH, "Prefer": "wait=60"})]
        else:
            requests_ = [
                ("/subscription/test", s.subscription, {}) for s in subscribers
            ]
        clients = [threading.Thread(target=post, args=r) for r in requests_]
        for client in clients:
            client.start()
        hung.wait_for(2)  # both messages are out, and will never be answered
        took = _exits_within(server, 3.5)
        print(f"SIGTERM to exit with {pending} pending: {took:.2f} s")  # -s shows it
        for client in clients:
            client.join(10)
        # what was under way was answered before the exit, not cut off
        if pending == "fan-out":
            assert [a.status_code for a in answers] == [202]
        else:
            assert [a.status_code for a in answers] == [200, 200]
            reasons = {r["reason"] for a in answers for r in a.json()["results"]}
            assert reasons == {"the server is stopping"}
