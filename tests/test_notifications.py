"""Notifications as durable jobs: docs/notifications.md, one test a
promise. The app runs in-process through WebTest, or as a real ``python
api.py`` process where a restart, kill -9 or SIGTERM is the point; pushes go to
the decrypting stand-in (tests/push_service.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import redis
import requests
import webtest

import api
from conftest import AUTH, preload, status_document, stored_state, wait_status
from tests.push_service import PushService

WAIT = {**AUTH, "Prefer": "wait=30"}
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
DOCUMENT_FIELDS = {
    "id",
    "delivered",
    "clicked",
    "closed",
    "status",
    "title",
    "topic",
    "audience",
    "named",
    "created_by",
    "created",
    "send_at",
    "started",
    "finished",
    "total",
    "sent",
    "failed",
    "removed",
    "capped",
    "retried",
    "pending",
    "rate",
    "send_at_local",
    "finish",
    "channels",
    "errors",
}


def subscribe(client, service: PushService, count: int, topics=None) -> list:
    subs = [service.subscriber() for _ in range(count)]
    for sub in subs:
        body = {**sub.subscription, **({"topics": topics} if topics else {})}
        client.post_json("/subscription", body)
    return subs


def wait_dropped(client, notification_id: str, timeout: float = 10) -> None:
    """Until the retention sweep has forgotten the notification (404)."""
    deadline = time.monotonic() + timeout
    path = f"/notifications/{notification_id}"
    while client.get(path, headers=AUTH, expect_errors=True).status_int != 404:
        assert time.monotonic() < deadline, "not dropped"
        time.sleep(0.05)


@contextlib.contextmanager
def hung_push_service():
    """A push service that takes connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def json_app(json_settings):
    """The app on the JSON-lines backend alone, for the tests of its journal."""
    application = api.create_app(json_settings)
    yield webtest.TestApp(application)
    application.config["webpush.close"]()


# -- POST /push -------------------------------------------------------------------


def test_push_answers_202_with_its_id_and_location_before_delivery(app, push_service):
    subscribe(app, push_service, 3)
    push_service.latency = 0.5  # delivery takes longer than the answer
    started = time.monotonic()
    response = app.post_json("/push", {"title": "t"}, headers=AUTH, status=202)
    assert time.monotonic() - started < 0.4
    assert set(response.json) == {"id", "status", "subscriptions"}
    assert response.json["status"] == "queued"
    assert response.json["subscriptions"] == 3
    assert response.headers["Location"] == f"/notifications/{response.json['id']}"
    assert not push_service.received()
    done = wait_status(app, response.json["id"], "done")
    assert (done["sent"], done["pending"]) == (3, 0)


def test_prefer_wait_answers_200_with_the_final_status_document(app, push_service):
    subscribe(app, push_service, 2, topics=["news"])
    gone = push_service.subscriber(script=[410])
    app.post_json("/subscription", {**gone.subscription, "topics": ["news"]})
    response = app.post_json(
        "/push", {"title": "Hello", "topic": "news"}, headers=WAIT, status=200
    )
    document = response.json
    assert set(document) == DOCUMENT_FIELDS
    assert response.headers["Preference-Applied"] == "wait=30"
    assert document["status"] == "done"
    assert (document["title"], document["topic"]) == ("Hello", "news")
    assert (document["total"], document["sent"], document["removed"]) == (3, 2, 1)
    assert (document["failed"], document["pending"], document["send_at"]) == (
        0,
        0,
        None,
    )
    assert document["channels"]["webpush"]["sent"] == 2
    for name in ("created", "started", "finished"):
        assert RFC3339_UTC.fullmatch(document[name]), document[name]
    assert document == status_document(app, document["id"])


def test_prefer_wait_answers_202_when_delivery_outlasts_it(app, push_service):
    subscribe(app, push_service, 1)
    push_service.latency = 2
    started = time.monotonic()
    response = app.post_json(
        "/push", {"title": "t"}, headers={**AUTH, "Prefer": "wait=1"}, status=202
    )
    assert 1 <= time.monotonic() - started < 2.5
    assert response.json["status"] == "sending"
    assert wait_status(app, response.json["id"], "done")["sent"] == 1


def test_prefer_wait_above_60_is_treated_as_60(app):
    response = app.post_json(
        "/push",
        {"title": "t"},
        headers={**AUTH, "Prefer": "respond-async, wait=600"},
    )
    assert response.headers["Preference-Applied"] == "wait=60"
    assert response.json["status"] == "done"  # nobody to send to: at once


def test_failures_are_reported_by_cause_in_the_status_document(app, push_service):
    subscribe(app, push_service, 1)
    for _ in range(3):
        bad = push_service.subscriber(script=[400])
        app.post_json("/subscription", bad.subscription)
    document = app.post_json("/push", {"title": "t"}, headers=WAIT).json
    assert (document["sent"], document["failed"]) == (1, 3)
    [error] = document["errors"]
    assert error["channel"] == "webpush" and error["origin"] == push_service.origin
    assert (error["status"], error["count"]) == (400, 3)


# -- Idempotency-Key ----------------------------------------------------------------


def test_the_same_idempotency_key_returns_the_same_notification_and_sends_once(
    app, push_service
):
    subscribe(app, push_service, 2)
    headers = {**AUTH, "Idempotency-Key": "order-1234"}
    first = app.post_json("/push", {"title": "t", "body": "b"}, headers=headers).json
    wait_status(app, first["id"], "done")
    again = app.post_json("/push", {"body": "b", "title": "t"}, headers=headers)
    assert again.status_int == 202 and again.json["id"] == first["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert status_document(app, first["id"])["sent"] == 2  # ended, sent once
    assert len(push_service.received()) == 2
    assert len(app.get("/notifications", headers=AUTH).json["notifications"]) == 1


def test_the_same_idempotency_key_with_another_body_answers_422(app, push_service):
    subscribe(app, push_service, 1)
    headers = {**AUTH, "Idempotency-Key": "k"}
    first = app.post_json("/push", {"title": "one"}, headers=headers).json
    refused = app.post_json("/push", {"title": "two"}, headers=headers, status=422)
    assert first["id"] in refused.json["error"]
    assert "Idempotency-Key" in refused.json["error"]
    assert len(app.get("/notifications", headers=AUTH).json["notifications"]) == 1


class _Later:
    """The ``time`` module as api.py sees it once ``by`` seconds have passed."""

    def __init__(self, by: float):
        self.by = by

    def __getattr__(self, name: str):
        return getattr(time, name)

    def time(self) -> float:
        return time.time() + self.by


def time_passes(settings: api.Settings, monkeypatch, seconds: float) -> None:
    """``seconds`` pass for the next app on ``settings``: api.py's clock moves
    on, and on Redis, whose own clock cannot be moved, every key under the
    prefix comes that much nearer its end (those due by then are gone)."""
    already = getattr(api.time, "by", 0)
    monkeypatch.setattr(api, "time", _Later(already + seconds))
    if not settings.redis_url:
        return
    with redis.Redis.from_url(settings.redis_url) as client:
        for key in client.scan_iter(match=settings.redis_prefix + "*"):
            left = client.pttl(key)
            if left > seconds * 1000:
                client.pexpire(key, left - int(seconds * 1000))
            elif left >= 0:
                client.delete(key)


def test_idempotency_keys_are_kept_24_hours(settings, monkeypatch):
    headers = {**AUTH, "Idempotency-Key": "daily"}

    def push_once_more() -> str:
        """The notification's id for the key, from a new app: a restart."""
        application = api.create_app(settings)
        try:
            client = webtest.TestApp(application)
            answer = client.post_json("/push", {"title": "t"}, headers=headers).json
            wait_status(client, answer["id"], "done")
            return answer["id"]
        finally:
            application.config["webpush.close"]()

    first = push_once_more()
    time_passes(settings, monkeypatch, 86400 - 60)
    assert push_once_more() == first  # a minute before the day is out
    time_passes(settings, monkeypatch, 61)
    assert push_once_more() != first  # a day and a second after


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "a\tb"])
def test_a_malformed_idempotency_key_answers_400(app, key):
    headers = {**AUTH, "Idempotency-Key": key.encode("utf-8").decode("latin-1")}
    response = app.post_json("/push", {"title": "t"}, headers=headers, status=400)
    assert "Idempotency-Key" in response.json["error"]
    assert app.get("/notifications", headers=AUTH).json["notifications"] == []


# -- scheduling -------------------------------------------------------------------


def test_send_at_schedules_a_notification_and_it_goes_out_when_due(app, push_service):
    subscribe(app, push_service, 2)
    when, due = time.time() + 1.5, time.monotonic() + 1.5  # the push service's clock
    send_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
    send_at += f".{int(when % 1 * 1000):03d}+00:00"
    answer = app.post_json("/push", {"title": "t", "send_at": send_at}, headers=AUTH)
    assert answer.json["status"] == "scheduled"
    document = status_document(app, answer.json["id"])
    assert abs(api.parse_rfc3339(document["send_at"]) - when) < 0.01
    done = wait_status(app, answer.json["id"], "done", timeout=5)
    assert done["sent"] == 2
    assert api.parse_rfc3339(done["started"]) >= when - 0.001
    assert all(d.at >= due - 0.01 for d in push_service.received())  # not before


def test_delay_schedules_it_seconds_from_now(app, push_service):
    subscribe(app, push_service, 1)
    answer = app.post_json("/push", {"title": "t", "delay": 1}, headers=AUTH).json
    assert answer["status"] == "scheduled"
    assert not push_service.received()
    assert wait_status(app, answer["id"], "done", timeout=5)["sent"] == 1


def test_an_offset_send_at_is_the_same_moment_in_utc(app):
    when = int(time.time()) + 600
    local = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when + 7200)) + "+02:00"
    answer = app.post_json("/push", {"title": "t", "send_at": local}, headers=AUTH)
    document = status_document(app, answer.json["id"])
    assert document["send_at"] == time.strftime(
        "%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(when)
    )


BAD_SCHEDULES = {
    "no offset": {"send_at": "2030-01-01T10:00:00"},
    "a date alone": {"send_at": "2030-01-01"},
    "not a date": {"send_at": "tomorrow"},
    "a number for send_at": {"send_at": 1700000000},
    "February 30th": {"send_at": "2030-02-30T10:00:00Z"},
    "more than 30 days ahead": {"delay": 31 * 86400},
    "a negative delay": {"delay": -5},
    "a string delay": {"delay": "60"},
    "both": {"delay": 5, "send_at": "2030-01-01T10:00:00Z"},
}


@pytest.mark.parametrize("case", BAD_SCHEDULES)
def test_a_bad_schedule_answers_400_and_records_nothing(app, case):
    body = {"title": "t", **BAD_SCHEDULES[case]}
    response = app.post_json("/push", body, headers=AUTH, status=400)
    assert response.json["error"]
    assert app.get("/notifications", headers=AUTH).json["notifications"] == []


def test_a_send_at_already_past_sends_it_now(app, push_service):
    subscribe(app, push_service, 1)
    for past in ("0001-01-01T00:00:00+01:00", "2020-01-01T00:00:00Z"):
        body = {"title": "t", "send_at": past}
        document = app.post_json("/push", body, headers=WAIT).json
        assert (document["status"], document["sent"]) == ("done", 1)
    assert app.get("/notifications", headers=AUTH).status_int == 200


def test_a_prefer_header_the_server_does_not_understand_is_ignored(app):
    for prefer in ("wait=\xb2", "wait=soon", "handling=lenient", "wait"):
        headers = {**AUTH, "Prefer": prefer}
        response = app.post_json("/push", {"title": "t"}, headers=headers)
        assert response.status_int == 202, prefer
        assert "Preference-Applied" not in response.headers


def test_send_at_at_most_30_days_ahead_is_accepted(app):
    when = time.gmtime(time.time() + 29 * 86400)
    send_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", when)
    answer = app.post_json("/push", {"title": "t", "send_at": send_at}, headers=AUTH)
    assert answer.json["status"] == "scheduled"


# -- GET /notifications and DELETE ------------------------------------------------


def test_notifications_are_listed_newest_first_up_to_the_limit(app):
    ids = [
        app.post_json("/push", {"title": f"n{n}"}, headers=AUTH).json["id"]
        for n in range(4)
    ]
    listed = app.get("/notifications?limit=3", headers=AUTH).json["notifications"]
    assert [d["id"] for d in listed] == ids[::-1][:3]
    assert [d["title"] for d in listed] == ["n3", "n2", "n1"]
    assert set(listed[0]) == DOCUMENT_FIELDS
    everything = app.get("/notifications", headers=AUTH).json["notifications"]
    assert len(everything) == 4


@pytest.mark.parametrize("limit", ["0", "1001", "x", "-1", "2.5", "%B2", "%C2%B2"])
def test_a_bad_limit_answers_400(app, limit):
    response = app.get(f"/notifications?limit={limit}", headers=AUTH, status=400)
    assert "limit" in response.json["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/notifications"),
        ("GET", "/notifications/AAAAAAAAAAAAAAAA"),
        ("DELETE", "/notifications/AAAAAAAAAAAAAAAA"),
    ],
)
def test_the_notification_routes_need_the_token(app, method, path):
    response = app.request(path, method=method, status=401)
    assert "Bearer" in response.json["error"]


@pytest.mark.parametrize("nid", ["AAAAAAAAAAAAAAAA", "short", "../../etc/passwd"])
def test_an_unknown_notification_answers_404(app, nid):
    assert app.get(f"/notifications/{nid}", headers=AUTH, status=404).json["error"]
    assert app.delete(f"/notifications/{nid}", headers=AUTH, status=404).json["error"]


def test_a_cancelled_scheduled_notification_is_never_sent(app, push_service):
    subscribe(app, push_service, 2)
    answer = app.post_json("/push", {"title": "t", "delay": 1}, headers=AUTH).json
    cancelled = app.delete(f"/notifications/{answer['id']}", headers=AUTH).json
    assert cancelled["status"] == "cancelled"
    assert RFC3339_UTC.fullmatch(cancelled["finished"])
    later = app.post_json("/push", {"title": "later", "delay": 1}, headers=AUTH).json
    assert wait_status(app, later["id"])["sent"] == 2  # the first was due by then
    assert [d.message["title"] for d in push_service.received()] == ["later"] * 2
    assert status_document(app, answer["id"])["status"] == "cancelled"


def test_cancelling_a_notification_being_sent_sends_no_more(settings, push_service):
    application = api.create_app(dataclasses.replace(settings, push_concurrency=2))
    client = webtest.TestApp(application)
    try:
        subscribe(client, push_service, 40)
        push_service.latency = 0.3  # 2 at a time: about 6 s for all
        answer = client.post_json("/push", {"title": "t"}, headers=AUTH).json
        push_service.wait_for(4)
        cancelled = client.delete(f"/notifications/{answer['id']}", headers=AUTH)
        assert cancelled.json["status"] == "cancelled"
        wait_status(client, answer["id"], "cancelled")
        deadline = time.monotonic() + 10
        while (final := status_document(client, answer["id"]))["sent"] < len(
            push_service.received()
        ):  # what was in flight has landed, and is counted
            assert time.monotonic() < deadline, final
            time.sleep(0.05)
        received = len(push_service.received())
        assert received <= 8  # those sent before, and the 2 in flight
        assert final["sent"] == received
        assert final["pending"] == 40 - received  # the rest is never sent
    finally:
        application.config["webpush.close"]()


def test_cancelling_an_ended_notification_answers_409(app):
    answer = app.post_json("/push", {"title": "t"}, headers=WAIT).json
    assert answer["status"] == "done"
    refused = app.delete(f"/notifications/{answer['id']}", headers=AUTH, status=409)
    assert "done" in refused.json["error"]
    assert status_document(app, answer["id"])["status"] == "done"


# -- expiry and retention -----------------------------------------------------------


def test_a_notification_past_its_ttl_before_it_could_start_is_expired(
    settings, push_service, monkeypatch
):
    monkeypatch.setattr(api, "EXPIRY_SLACK", 0.5)  # 5 s would be the same, slower
    application = api.create_app(settings)
    client = webtest.TestApp(application)
    subscribe(client, push_service, 2)
    body = {"title": "t", "delay": 1, "ttl": 0}
    answer = client.post_json("/push", body, headers=AUTH).json
    application.config["webpush.close"]()  # the server is down when it is due
    time.sleep(1 + api.EXPIRY_SLACK + 0.5)
    application = api.create_app(settings)
    client = webtest.TestApp(application)
    try:
        document = wait_status(client, answer["id"], "expired", timeout=5)
        assert document["status"] == "expired"
        assert (document["sent"], document["pending"]) == (0, 2)  # ended, unsent
        assert not push_service.received()
    finally:
        application.config["webpush.close"]()


def test_a_late_notification_is_sent_with_what_is_left_of_its_ttl(
    settings, push_service
):
    application = api.create_app(settings)
    client = webtest.TestApp(application)
    subscribe(client, push_service, 1)
    body = {"title": "t", "delay": 1, "ttl": 600}
    answer = client.post_json("/push", body, headers=AUTH).json
    application.config["webpush.close"]()
    time.sleep(3)  # due a second from the start; sent two seconds late
    application = api.create_app(settings)
    try:
        client = webtest.TestApp(application)
        assert wait_status(client, answer["id"], "done")["sent"] == 1
        [delivery] = push_service.received()
        assert 595 <= int(delivery.headers["ttl"]) <= 598
    finally:
        application.config["webpush.close"]()


def test_ended_notifications_are_dropped_after_the_retention(settings, monkeypatch):
    monkeypatch.setattr(api, "DROP_PAGE", 1)  # Redis: kept ones never hide the rest
    short = dataclasses.replace(settings, notification_retention=0)  # at once
    application = api.create_app(short)
    client = webtest.TestApp(application)
    scheduled = client.post_json("/push", {"title": "t", "delay": 60}, headers=AUTH)
    answer = client.post_json("/push", {"title": "t"}, headers=WAIT).json
    application.config["webpush.close"]()
    application = api.create_app(short)  # the sweep runs at start, then each minute
    client = webtest.TestApp(application)
    try:
        wait_dropped(client, answer["id"])  # the sweep runs in the background
        kept = status_document(client, scheduled.json["id"])  # not ended: kept
        assert kept["status"] == "scheduled"
    finally:
        application.config["webpush.close"]()


# -- receipts ---------------------------------------------------------------------------


def _receipts(app, push_service, count: int) -> tuple[str, list[dict]]:
    """A notification delivered to ``count`` new subscribers: its id, and the
    messages they decrypted (each with the id and its own receipt)."""
    topic = f"t{len(push_service.subscribers)}"
    subscribe(app, push_service, count, topics=[topic])
    body = {"title": "t", "topic": topic}
    answer = app.post_json("/push", body, headers=WAIT).json
    messages = [d.message for d in push_service.received()]
    return answer["id"], [m for m in messages if m["id"] == answer["id"]]


def _report(app, notification_id: str, event: str, receipt, status: int = 200):
    return app.post_json(
        f"/notifications/{notification_id}/events",
        {"event": event, "receipt": receipt},
        status=status,
    ).json


def test_each_message_carries_the_notification_id_and_its_own_receipt(
    app, push_service
):
    notification_id, messages = _receipts(app, push_service, 3)
    assert {m["id"] for m in messages} == {notification_id}
    receipts = [m["receipt"] for m in messages]
    assert len(set(receipts)) == 3
    key = app.app.config["webpush.receipt_key"]
    for receipt in receipts:
        assert api.receipt_subscriber(key, notification_id, receipt) is not None


def test_receipts_are_counted_once_per_subscriber_and_event(app, push_service):
    notification_id, messages = _receipts(app, push_service, 3)
    for message in messages:
        answer = _report(app, notification_id, "delivered", message["receipt"])
        assert answer == {"event": "delivered", "counted": True}
    first = messages[0]["receipt"]
    assert _report(app, notification_id, "clicked", first)["counted"] is True
    for _ in range(3):  # sent again: counted once
        assert _report(app, notification_id, "clicked", first)["counted"] is False
        assert _report(app, notification_id, "delivered", first)["counted"] is False
    _report(app, notification_id, "closed", messages[1]["receipt"])
    document = status_document(app, notification_id)
    assert (document["delivered"], document["clicked"], document["closed"]) == (3, 1, 1)
    listed = app.get("/notifications", headers=AUTH).json["notifications"][0]
    assert (listed["delivered"], listed["clicked"], listed["closed"]) == (3, 1, 1)


def test_a_receipt_needs_no_token_and_is_a_simple_cross_origin_request(
    app, push_service
):
    """Service workers post it as text/plain, so no preflight is needed."""
    notification_id, [message] = _receipts(app, push_service, 1)
    body = json.dumps({"event": "clicked", "receipt": message["receipt"]})
    response = app.post(
        f"/notifications/{notification_id}/events",
        body,
        headers={
            "Content-Type": "text/plain;charset=UTF-8",
            "Origin": "https://a.test",
        },
    )
    assert response.json == {"event": "clicked", "counted": True}
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_forged_or_replayed_receipts_change_nothing(app, settings, push_service):
    notification_id, [mine, theirs] = _receipts(app, push_service, 2)
    other_id, [other] = _receipts(app, push_service, 1)
    _report(app, notification_id, "delivered", mine["receipt"])
    before = stored_state(settings)
    subscriber, _, mac = mine["receipt"].partition(".")
    forged = [
        f"{subscriber}.{'A' * 22}",  # a made-up signature
        f"{theirs['receipt'].partition('.')[0]}.{mac}",  # my signature, their name
        other["receipt"],  # another notification's receipt
    ]
    for receipt in forged:
        error = _report(app, notification_id, "clicked", receipt, status=403)["error"]
        assert "not made for this notification" in error
    bad = [
        ({"event": "opened", "receipt": mine["receipt"]}, 400, "'event' must be"),
        ({"event": "clicked"}, 400, "'receipt' must be"),
        ({"event": "clicked", "receipt": 7}, 400, "'receipt' must be"),
        ({"event": "clicked", "receipt": "x" * 5000}, 403, "not made for"),
        ([1], 400, "JSON object"),
    ]
    for body, status, words in bad:
        error = app.post_json(
            f"/notifications/{notification_id}/events", body, status=status
        ).json["error"]
        assert words in error
    app.post(f"/notifications/{notification_id}/events", b"{", status=400)
    # A receipt of a notification the server no longer has: 404.
    key = app.app.config["webpush.receipt_key"]
    gone = "A" * 16
    receipt = api.receipt(key, gone, subscriber)
    assert (
        "no such notification" in _report(app, gone, "clicked", receipt, 404)["error"]
    )
    app.post_json("/notifications/short/events", {}, status=404)
    # A replay of the counted one: counted before, so nothing changes either.
    assert (
        _report(app, notification_id, "delivered", mine["receipt"])["counted"] is False
    )

    def counted(state: dict) -> dict:  # what the rate limiter spent aside
        return {k: v for k, v in state.items() if ":rate:" not in str(k)}

    assert counted(stored_state(settings)) == counted(before)
    document = status_document(app, notification_id)
    assert (document["delivered"], document["clicked"], document["closed"]) == (1, 0, 0)
    assert status_document(app, other_id)["clicked"] == 0


def test_a_receipt_posted_to_an_id_no_notification_has_is_403_not_404(
    app, push_service
):
    """docs/api.md: the receipt is checked before the notification is looked
    up, so an id that was never a notification's answers as a forged receipt
    does, and says nothing of which ids exist."""
    _, [message] = _receipts(app, push_service, 1)
    never = "N" * 16
    error = _report(app, never, "clicked", message["receipt"], status=403)["error"]
    assert "not made for this notification" in error


def test_receipts_are_rate_limited_per_client_apart_from_subscription_writes(
    app_with, push_service
):
    client = app_with(receipt_rate_limit=2, rate_limit=1)
    notification_id, messages = _receipts(client, push_service, 1)  # one write
    receipt = messages[0]["receipt"]
    _report(client, notification_id, "delivered", receipt)
    _report(client, notification_id, "clicked", receipt)
    refused = _report(client, notification_id, "closed", receipt, status=429)
    assert refused["error"].startswith("too many receipts from ")
    assert status_document(client, notification_id)["closed"] == 0


def test_counted_receipts_survive_kill_9(server_factory, backend_env, push_service):
    server = server_factory(**backend_env).start()
    sub = push_service.subscriber()
    requests.post(server.url + "/subscription", json=sub.subscription)
    answer = requests.post(server.url + "/push", json={"title": "t"}, headers=WAIT)
    notification_id = answer.json()["id"]
    [delivery] = push_service.wait_for(1)
    url = f"{server.url}/notifications/{notification_id}/events"
    body = {"event": "clicked", "receipt": delivery.message["receipt"]}
    assert requests.post(url, json=body).json()["counted"] is True
    server.stop(signal.SIGKILL)
    server.start()
    document = requests.get(
        f"{server.url}/notifications/{notification_id}", headers=AUTH
    ).json()
    assert document["clicked"] == 1
    assert requests.post(url, json=body).json()["counted"] is False


def test_receipts_are_dropped_with_their_notification(settings, monkeypatch):
    short = dataclasses.replace(settings, notification_retention=1)
    with PushService() as service:
        application = api.create_app(short)
        client = webtest.TestApp(application)
        notification_id, [message] = _receipts(client, service, 1)
        _report(client, notification_id, "delivered", message["receipt"])
        application.config["webpush.close"]()
    time.sleep(1.5)  # past the retention, while no app runs
    application = api.create_app(short)  # the sweep runs at start
    client = webtest.TestApp(application)
    try:
        wait_dropped(client, notification_id)
        receipt = message["receipt"]
        _report(client, notification_id, "delivered", receipt, status=404)
        if short.redis_url:
            with redis.Redis.from_url(short.redis_url) as r:
                assert not r.keys(short.redis_prefix + "rc:*")
        else:
            receipts = application.config["webpush.queue"].jobs.receipts
            assert receipts.notifications() == []
    finally:
        application.config["webpush.close"]()


# -- the journal ----------------------------------------------------------------------
# JSON only: the journal is the JSON store's file of notifications (its mode,
# format, torn line, a disk that refuses it). On Redis, notifications are keys
# (tests/test_scale_out.py covers a Redis that is full or refuses writes).


def test_the_journal_is_a_private_json_lines_file_beside_the_store(
    json_app, json_settings
):
    json_app.post_json("/push", {"title": "t"}, headers=WAIT)
    journal = Path(json_settings.subscriptions_file).with_name(
        "subscriptions.notifications.json"
    )
    assert journal == json_settings.journal_path
    assert journal.stat().st_mode & 0o777 == 0o600
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert lines and all("id" in line for line in lines)


def test_a_torn_last_journal_line_is_skipped_at_start(json_settings):
    application = api.create_app(json_settings)
    client = webtest.TestApp(application)
    answer = client.post_json("/push", {"title": "t"}, headers=WAIT).json
    application.config["webpush.close"]()
    with open(json_settings.journal_path, "ab") as f:
        f.write(b'{"id": "cut-off-by-a-cr')
    application = api.create_app(json_settings)
    try:
        client = webtest.TestApp(application)
        assert status_document(client, answer["id"])["status"] == "done"
        assert json_settings.journal_path.read_bytes().endswith(b"\n")
    finally:
        application.config["webpush.close"]()


def test_a_journal_the_disk_refuses_answers_507_and_records_nothing(
    json_app, monkeypatch
):
    real_write = api.os.write
    journal_fd = json_app.app.config["webpush.journal"]._fd

    def full(fd, data):
        if fd == journal_fd:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(api.os, "write", full)
    refused = json_app.post_json("/push", {"title": "t"}, headers=AUTH, status=507)
    assert "disk is full" in refused.json["error"]
    assert json_app.get("/notifications", headers=AUTH).json["notifications"] == []
    monkeypatch.setattr(api.os, "write", real_write)
    assert json_app.post_json("/push", {"title": "t"}, headers=AUTH).status_int == 202


# -- webhooks -------------------------------------------------------------------------


def test_a_webhook_makes_a_notification_named_in_its_202(settings, push_service):
    import hashlib
    import hmac

    application = api.create_app(dataclasses.replace(settings, webhook_secret="s3"))
    client = webtest.TestApp(application)
    try:
        subscribe(client, push_service, 1)
        body = json.dumps({"title": "Deployed", "body": "v2"}).encode()
        signature = "sha256=" + hmac.new(b"s3", body, hashlib.sha256).hexdigest()
        response = client.post(
            "/webhooks/generic",
            body,
            headers={
                "Content-Type": "application/json",
                "X-Signature-256": signature,
            },
            status=202,
        )
        assert response.headers["Location"] == f"/notifications/{response.json['id']}"
        document = wait_status(client, response.json["id"], "done")
        assert (document["title"], document["sent"]) == ("Deployed", 1)
    finally:
        application.config["webpush.close"]()


# -- the real server: restarts, kill -9, SIGTERM, isolation ------------------------------


def test_a_scheduled_notification_fires_after_a_restart(
    server_factory, backend_env, tmp_path, push_service
):
    subs = [push_service.subscriber() for _ in range(3)]
    preload(backend_env, tmp_path, [s.subscription for s in subs])
    server = server_factory(**backend_env).start()
    answer = requests.post(
        server.url + "/push", json={"title": "later", "delay": 2}, headers=AUTH
    ).json()
    assert answer["status"] == "scheduled"
    server.stop()  # SIGTERM, before it is due
    assert not push_service.received()
    server.start()
    push_service.wait_for(3, timeout=10)
    document = wait_status(server, answer["id"], timeout=60)
    assert (document["status"], document["sent"]) == ("done", 3)
    assert {d.subscriber for d in push_service.received()} == {s.id for s in subs}


def test_kill_9_in_the_middle_of_a_fan_out_resumes_it_and_everyone_gets_it(
    server_factory, backend_env, tmp_path
):
    """2,000 subscribers on one delivery process, whose batches in flight
    (the duplicates' bound) are half of them; the server is killed when about
    a third have it. On Redis, a killed process's batches go to another
    once it has been silent WORKER_TIMEOUT seconds: 2 here, not 30."""
    total, processes = 2000, 1
    with PushService(latency=0.02) as service:
        subs = [service.subscriber() for _ in range(total)]
        preload(backend_env, tmp_path, [s.subscription for s in subs])
        server = server_factory(
            PUSH_PROCESSES=str(processes),
            PUSH_CONCURRENCY="100",
            WORKER_TIMEOUT="2",
            **backend_env,
        ).start()
        answer = requests.post(
            server.url + "/push", json={"title": "t"}, headers=AUTH
        ).json()
        assert answer["subscriptions"] == total
        service.wait_for(total // 3, timeout=60)
        server.stop(signal.SIGKILL)
        before = len(service.received())
        assert before < total, "the fan-out ended before the kill: make it slower"
        server.start()
        document = wait_status(server, answer["id"], timeout=120)
        received = service.received()
    counts: dict[str, int] = {}
    for delivery in received:
        assert delivery.error is None
        counts[delivery.subscriber] = counts.get(delivery.subscriber, 0) + 1
    assert set(counts) == {s.id for s in subs}  # everyone got it
    duplicates = len(received) - total
    bound = api.BATCH_SIZE * api.BATCHES_PER_PROCESS * processes  # 1 push service
    assert bound < total and 0 <= duplicates <= bound
    assert (document["status"], document["total"]) == ("done", total)
    assert document["sent"] == total and document["pending"] == 0


def test_sigterm_stops_within_shutdown_timeout_and_the_rest_resumes(
    server_factory, backend_env, tmp_path
):
    with PushService(latency=0.5) as service:
        subs = [service.subscriber() for _ in range(100)]
        preload(backend_env, tmp_path, [s.subscription for s in subs])
        server = server_factory(
            PUSH_PROCESSES="1",
            PUSH_CONCURRENCY="4",  # 8 a second: 12 s for all
            SHUTDOWN_TIMEOUT="2",
            **backend_env,
        ).start()
        answer = requests.post(
            server.url + "/push", json={"title": "t"}, headers=AUTH
        ).json()
        service.wait_for(8)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(15)
        assert time.monotonic() - started < 2 + 1.5
        stopped_with = len(service.received())
        assert stopped_with < 100
        service.latency = 0
        server.start()
        document = wait_status(server, answer["id"], timeout=60)
        received = service.received()
    assert {d.subscriber for d in received} == {s.id for s in subs}
    assert document["sent"] == 100
    assert len(received) - 100 <= 8  # at most what was in flight


def test_a_hung_push_service_delays_no_other_notification_nor_the_api(
    server_factory, backend_env, tmp_path, push_service
):
    """2,000 subscribers on a push service that never answers: eight batches,
    more than the delivery process takes of one push service at a time."""
    with hung_push_service() as hung:
        hung_subs = []
        for n in range(2000):
            sub = push_service.subscriber().subscription
            hung_subs.append({**sub, "endpoint": f"{hung}/push/{n}"})
        healthy = [push_service.subscriber() for _ in range(10)]
        preload(backend_env, tmp_path, hung_subs, ["all"])
        preload(
            backend_env, tmp_path, [s.subscription for s in healthy], ["all", "healthy"]
        )
        server = server_factory(PUSH_TIMEOUT="5", **backend_env).start()
        tester = push_service.subscriber()
        requests.post(server.url + "/subscription", json=tester.subscription)
        first = requests.post(
            server.url + "/push",
            json={"title": "everyone", "topic": "all"},
            headers=AUTH,
        ).json()
        assert first["subscriptions"] == 2010
        # The healthy subscribers of the same fan-out get it: by then the
        # hung push service has its batches.
        deadline = time.monotonic() + 10
        while status_document(server, first["id"])["sent"] < 10:
            assert time.monotonic() < deadline, status_document(server, first["id"])
            time.sleep(0.05)
        slow: list[tuple[str, float]] = []
        rounds = 0
        stop = threading.Event()

        def watch() -> None:
            nonlocal rounds
            while not stop.is_set():
                for path, kwargs in (
                    ("/health", {}),
                    ("/subscription/test", {"json": tester.subscription}),
                ):
                    started = time.monotonic()
                    method = requests.post if kwargs else requests.get
                    answer = method(server.url + path, timeout=10, **kwargs)
                    took = time.monotonic() - started
                    if took > 1 or not answer.ok:
                        slow.append((path, took))
                rounds += 1
                stop.wait(0.1)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            started = time.monotonic()
            second = requests.post(
                server.url + "/push",
                json={"title": "healthy only", "topic": "healthy"},
                headers={**AUTH, "Prefer": "wait=10"},
            )
            took = time.monotonic() - started
            watched_until = rounds + 10  # and ten rounds more of the API's answers
            deadline = time.monotonic() + 30
            while rounds < watched_until and watcher.is_alive():
                assert time.monotonic() < deadline, f"{rounds} rounds watched"
                time.sleep(0.05)
        finally:
            stop.set()
            watcher.join()
        assert second.status_code == 200 and second.json()["sent"] == 10
        assert took < 2, f"the second notification took {took:.1f} s"
        assert not slow, slow
        titles = [d.message["title"] for d in push_service.received()]
        assert titles.count("everyone") == 10
        assert titles.count("healthy only") == 10
        assert titles.count("Test notification") >= 3
        assert status_document(server, first["id"])["status"] == "sending"
