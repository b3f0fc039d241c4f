"""Delivery policy (docs/delivery-policy.md), on both stores: a push's ``rate``
and ``send_at_local``, a subscription's ``timezone``, MAX_RATE,
DEFAULT_TIMEZONE, MAX_PER_DAY and STALE_AFTER_DAYS; each also through a
restart in the middle."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import requests
import webtest

import api
from conftest import (
    AUTH,
    WAIT,
    Server,
    close_app,
    env_of,
    preload,
    pushed,
    status_document,
    subscription_store,
    wait_status,
)
from tests.push_service import PushService

KIRITIMATI = "Pacific/Kiritimati"  # UTC+14, the earliest clock on Earth
PAGO_PAGO = "Pacific/Pago_Pago"  # UTC-11


def subscribed(client, push_service: PushService, count: int, zone=None) -> list:
    """``count`` subscribers of the stand-in, subscribed through the API (in
    ``zone``, if given)."""
    subscribers = [push_service.subscriber() for _ in range(count)]
    for subscriber in subscribers:
        body = dict(subscriber.subscription)
        if zone is not None:
            body["timezone"] = zone
        client.post_json("/subscription", body)
    return subscribers


@contextlib.contextmanager
def running(settings: api.Settings, **changes):
    """An app on ``settings`` with some changed, closed (its files written)
    at the end of the block: a restart is two blocks in a row."""
    application = api.create_app(dataclasses.replace(settings, **changes))
    try:
        yield webtest.TestApp(application)
    finally:
        close_app(application)


def wall_clock(zone: str, seconds_from_now: float = 0.0) -> str:
    """What a clock in ``zone`` shows ``seconds_from_now``, as send_at_local
    takes it (to the second, no offset)."""
    moment = datetime.now(ZoneInfo(zone)) + timedelta(seconds=seconds_from_now)
    return moment.replace(tzinfo=None).isoformat(timespec="seconds")


def counted(target, notification_id: str, sent: int) -> dict:
    """The status document once ``sent`` messages are counted as sent."""
    deadline = time.monotonic() + 30
    while (document := status_document(target, notification_id))["sent"] < sent:
        assert time.monotonic() < deadline, document
        time.sleep(0.05)
    return document


def spread(push_service: PushService, count: int, started: float) -> float:
    """Seconds from ``started`` to the last of ``count`` deliveries."""
    deliveries = push_service.wait_for(count, timeout=30)
    return max(d.at for d in deliveries) - started


# -- throttle -----------------------------------------------------------------


def test_a_rate_of_600_a_minute_spreads_60_messages_over_5_to_10_seconds_and_none_is_under_2(
    app, push_service
):
    subscribed(app, push_service, 60)
    started = time.monotonic()
    answer = app.post_json("/push", {"title": "Fast"}, headers=AUTH).json
    assert spread(push_service, 60, started) < 2
    assert "rate" not in answer

    started = time.monotonic()
    answer = app.post_json("/push", {"title": "Slow", "rate": 600}, headers=AUTH).json
    assert answer["rate"] == 600
    document = wait_status(app, answer["id"], "sending")
    assert document["finish"] is not None
    assert 5 <= spread(push_service, 120, started) <= 10
    document = wait_status(app, answer["id"])
    assert (document["status"], document["sent"], document["rate"]) == ("done", 60, 600)
    assert document["finish"] is None


@pytest.mark.parametrize("rate", [59, 1_000_001, 0, -600, 600.5, "600", True, [600]])
def test_a_rate_outside_60_to_a_million_whole_messages_a_minute_is_a_400(
    app, unchanged, rate
):
    answer = app.post_json(
        "/push", {"title": "t", "rate": rate}, headers=AUTH, expect_errors=True
    )
    assert answer.status_int == 400
    assert (
        "'rate' must be whole messages per minute from 60 to 1,000,000"
        in (answer.json["error"])
    )
    assert unchanged()


def test_max_rate_caps_every_notification_and_is_the_rate_of_those_that_give_none(
    app_with, push_service
):
    app = app_with(max_rate=60)
    subscribed(app, push_service, 3)
    given = app.post_json("/push", {"title": "a", "rate": 6000}, headers=AUTH).json
    none = app.post_json("/push", {"title": "b"}, headers=AUTH).json
    slower = app.post_json("/push", {"title": "c", "rate": 60}, headers=AUTH).json
    assert (given["rate"], none["rate"], slower["rate"]) == (60, 60, 60)
    document = wait_status(app, given["id"], "sending")
    finish = api.parse_rfc3339(document["finish"])
    assert finish <= time.time() + 4  # 3 messages at 1 a second
    assert document["pending"] == 0 or time.time() - 1 < finish
    for notification in (given, none, slower):
        app.delete(f"/notifications/{notification['id']}", headers=AUTH)


def test_a_throttled_notification_does_not_slow_another(app, push_service):
    slow = subscribed(app, push_service, 30)
    app.post_json("/push", {"title": "Slow", "rate": 60}, headers=AUTH)
    fast = push_service.subscriber()
    app.post_json("/subscription", fast.subscription)
    started = time.monotonic()
    app.post_json(
        "/push",
        {"title": "Now", "subscriptions": [api.endpoint_id(fast.endpoint)]},
        headers=WAIT,
    )
    assert push_service.received(fast) and time.monotonic() - started < 2
    assert len([d for d in push_service.received() if d.subscriber != fast.id]) < len(
        slow
    )


def test_two_delivering_processes_on_redis_keep_one_rate_between_them(
    tmp_path, request, push_service
):
    env = {**env_of("redis", request), "PUSH_PROCESSES": "1"}
    servers = [Server(tmp_path, **env).start(), Server(tmp_path, **env).start()]
    try:
        with subscription_store(env, tmp_path) as store:
            store.write([record_of(push_service.subscriber()) for _ in range(60)])
        started = time.monotonic()
        answer = requests.post(
            servers[0].url + "/push", json={"title": "t", "rate": 600}, headers=AUTH
        ).json()
        assert 5 <= spread(push_service, 60, started) <= 10
        document = wait_status(servers[1], answer["id"])
        assert (document["status"], document["sent"]) == ("done", 60)
        counted = sum(sent_by(server) for server in servers)
        assert counted == 60  # each message sent by one of them, once
    finally:
        for server in servers:
            server.stop(signal.SIGKILL)


def record_of(subscriber, **fields) -> dict:
    """The record the store keeps of a stand-in subscriber."""
    validate = api.Validator(
        api.Settings.from_env({}, push_endpoint_pattern=r"^http://127\.0\.0\.1:\d+/")
    )
    record = validate.subscription(subscriber.subscription)
    record.update({"created": int(time.time()), "topics": [], **fields})
    return record


def sent_by(server: Server) -> int:
    """The messages a server process says it sent (its /metrics)."""
    text = requests.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("webpush_messages_total") and 'result="sent"' in line
        )
    )


def test_a_throttled_notification_resumes_at_once_and_at_its_rate_after_a_kill_9(
    tmp_path, backend_env, push_service
):
    env = {**backend_env, "PUSH_PROCESSES": "1", "WORKER_TIMEOUT": "1"}
    subscribers = [push_service.subscriber() for _ in range(100)]
    preload(env, tmp_path, [s.subscription for s in subscribers])
    server = Server(tmp_path, **env).start()
    answer = requests.post(
        server.url + "/push", json={"title": "t", "rate": 600}, headers=AUTH
    ).json()
    push_service.wait_for(50, timeout=10)
    server.stop(signal.SIGKILL)
    reached = {d.subscriber for d in push_service.received()}
    server = Server(tmp_path, **env).start()
    try:
        restarted = time.monotonic()
        document = wait_status(server, answer["id"], timeout=30)
        assert (document["status"], document["sent"]) == ("done", 100)
        assert document["rate"] == 600
        assert {d.subscriber for d in push_service.received()} == {
            s.id for s in subscribers
        }
        later = [d.at for d in push_service.received() if d.at >= restarted]
        # At once: not walking again, at its rate, over those sent already...
        assert min(later) - restarted < 2.5
        # ...and at its rate, with no burst to catch up: those not reached
        # before, but the second's worth or two that was in flight, at 10/s.
        paced = len(subscribers) - len(reached) - 20
        assert max(later) - restarted >= paced / 10 - 0.5, (paced, later)
    finally:
        server.stop(signal.SIGKILL)


# -- local time ---------------------------------------------------------------


def test_send_at_local_reaches_utc_minus_11_at_its_time_and_utc_plus_14_at_once(
    app, push_service
):  # and each message with its whole TTL, from when it is sent
    (late,) = subscribed(app, push_service, 1, PAGO_PAGO)
    (early,) = subscribed(app, push_service, 1, KIRITIMATI)
    (nowhere,) = subscribed(app, push_service, 1)  # DEFAULT_TIMEZONE: UTC
    local = wall_clock(PAGO_PAGO, 3)
    started = time.monotonic()
    answer = app.post_json(
        "/push", {"title": "Morning", "send_at_local": local, "ttl": 600}, headers=AUTH
    ).json
    assert answer["send_at_local"] == local
    deliveries = push_service.wait_for(2, timeout=5)
    assert {d.subscriber for d in deliveries} == {early.id, nowhere.id}
    assert all(d.at - started < 2 for d in deliveries)
    document = counted(app, answer["id"], 2)
    assert (document["status"], document["pending"]) == ("sending", 1)
    last = push_service.wait_for(3, timeout=10)[-1]
    assert last.subscriber == late.id
    assert last.at - started >= 2  # its second, to the clock's whole second
    assert last.headers["ttl"] == "600"
    document = wait_status(app, answer["id"])
    assert (document["status"], document["sent"], document["pending"]) == ("done", 3, 0)


def test_default_timezone_places_those_who_gave_none(app_with, push_service):
    app = app_with(default_timezone=KIRITIMATI)
    (nowhere,) = subscribed(app, push_service, 1)
    subscribed(app, push_service, 1, "UTC")
    answer = app.post_json(
        "/push",
        {"title": "t", "send_at_local": wall_clock(KIRITIMATI, 2)},
        headers=AUTH,
    ).json
    assert answer["status"] == "scheduled"
    [delivery] = push_service.wait_for(1, timeout=10)
    assert delivery.subscriber == nowhere.id
    document = counted(app, answer["id"], 1)
    assert (document["status"], document["pending"]) == ("sending", 1)  # UTC: 14 h
    app.delete(f"/notifications/{answer['id']}", headers=AUTH)


def test_a_local_time_notification_survives_a_kill_9_between_zones_and_cancel_stops_the_rest(
    tmp_path, backend_env, push_service
):
    env = {**backend_env, "PUSH_PROCESSES": "1", "WORKER_TIMEOUT": "1"}
    server = Server(tmp_path, **env).start()
    zones = {zone: push_service.subscriber() for zone in (KIRITIMATI, "UTC", PAGO_PAGO)}
    for zone, subscriber in zones.items():
        body = {**subscriber.subscription, "timezone": zone}
        assert requests.post(server.url + "/subscription", json=body).ok
    local = wall_clock(KIRITIMATI, 2)
    answer = requests.post(
        server.url + "/push",
        json={"title": "Christmas", "send_at_local": local},
        headers=AUTH,
    ).json()
    assert (answer["status"], answer["subscriptions"]) == ("scheduled", 3)
    assert status_document(server, answer["id"])["pending"] == 3
    [delivery] = push_service.wait_for(1, timeout=10)
    assert delivery.subscriber == zones[KIRITIMATI].id
    document = counted(server, answer["id"], 1)
    assert (document["status"], document["pending"]) == ("sending", 2)

    server.stop(signal.SIGKILL)
    server = Server(tmp_path, **env).start()
    try:
        # Resumed: still waiting for UTC (in 14 hours) and Pago Pago (25).
        document = status_document(server, answer["id"])
        assert (document["status"], document["sent"], document["pending"]) == (
            "sending",
            1,
            2,
        )
        cancelled = requests.delete(
            f"{server.url}/notifications/{answer['id']}", headers=AUTH
        )
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["send_at_local"] == local
        probe = requests.post(
            server.url + "/push", json={"title": "probe"}, headers=WAIT
        ).json()
        assert probe["sent"] == 3  # delivery works; the cancelled one sent no more
        assert [d.message["title"] for d in push_service.received()].count(
            "Christmas"
        ) == 1
    finally:
        server.stop(signal.SIGKILL)


@pytest.mark.parametrize(
    "body",
    [
        {"send_at_local": "2026-12-24T09:00Z"},
        {"send_at_local": "2026-12-24T09:00+01:00"},
        {"send_at_local": "2026-12-24 09:00"},
        {"send_at_local": "2026-02-30T09:00"},
        {"send_at_local": "tomorrow"},
        {"send_at_local": 1766566800},
        {"send_at_local": "2026-12-24T09:00", "send_at": "2026-12-24T09:00:00Z"},
        {"send_at_local": "2026-12-24T09:00", "delay": 60},
    ],
    ids=lambda body: " ".join(f"{k}={v}" for k, v in body.items()),
)
def test_a_send_at_local_with_an_offset_or_not_a_time_or_with_send_at_is_a_400(
    app, unchanged, body
):
    answer = app.post_json(
        "/push", {"title": "t", **body}, headers=AUTH, expect_errors=True
    )
    assert answer.status_int == 400 and "send_at_local" in answer.json["error"]
    assert unchanged()


def test_a_send_at_local_more_than_30_days_ahead_is_a_400(app, unchanged):
    local = wall_clock(KIRITIMATI, 31 * 86400)
    answer = app.post_json(
        "/push",
        {"title": "t", "send_at_local": local},
        headers=AUTH,
        expect_errors=True,
    )
    assert answer.status_int == 400
    assert "at most 30 days ahead" in answer.json["error"]
    assert unchanged()


@pytest.mark.parametrize(
    "zone", ["Mars/Olympus_Mons", "utc", "", "../../etc/passwd", 5]
)
def test_a_subscription_with_an_unknown_timezone_is_a_400_and_not_stored(
    app, unchanged, push_service, zone
):
    body = {**push_service.subscriber().subscription, "timezone": zone}
    answer = app.post_json("/subscription", body, expect_errors=True)
    assert answer.status_int == 400 and "IANA time zone" in answer.json["error"]
    assert unchanged()


def test_a_subscription_keeps_its_timezone_when_posted_again_and_null_drops_it(
    app, store, push_service
):
    subscriber = push_service.subscriber()
    record_id = api.endpoint_id(subscriber.endpoint)
    app.post_json("/subscription", {**subscriber.subscription, "timezone": PAGO_PAGO})
    assert store.get(record_id)["timezone"] == PAGO_PAGO
    app.post_json("/subscription", subscriber.subscription)
    assert store.get(record_id)["timezone"] == PAGO_PAGO
    app.post_json("/subscription", {**subscriber.subscription, "timezone": None})
    assert "timezone" not in store.get(record_id)


# -- the daily cap --------------------------------------------------------------


def test_max_per_day_caps_a_subscriber_but_not_urgency_high_even_after_a_restart(
    settings, push_service
):
    with running(settings, max_per_day=2) as app:
        subscribed(app, push_service, 1)
        assert [pushed(app, {"title": str(n)})["sent"] for n in range(2)] == [1, 1]
        capped = pushed(app, {"title": "third"})
        assert (capped["sent"], capped["capped"], capped["pending"]) == (0, 1, 0)
        assert capped["channels"]["webpush"]["capped"] == 1
        metrics = app.get("/metrics", headers=AUTH).text
        assert 'result="capped"} 1.0' in metrics
    with running(settings, max_per_day=2) as app:  # a restart: the counts are kept
        assert pushed(app, {"title": "fourth"})["capped"] == 1
        urgent = pushed(app, {"title": "fire", "urgency": "high"})
        assert (urgent["sent"], urgent["capped"]) == (1, 0)
    with running(settings, max_per_day=0) as app:  # no cap
        assert pushed(app, {"title": "fifth"})["sent"] == 1
    titles = [d.message["title"] for d in push_service.received()]
    assert titles == ["0", "1", "fire", "fifth"]


# -- stale subscriptions ----------------------------------------------------------


def test_a_subscription_not_reached_for_stale_after_days_is_removed_by_the_next_fan_out(
    settings, push_service
):
    day = 86400
    now = int(time.time())
    dead, revived, new = (push_service.subscriber() for _ in range(3))
    dead_id = api.endpoint_id(dead.endpoint)
    with running(settings, stale_after_days=1) as app:
        store = app.app.config["webpush.store"]
        store.write(
            [
                record_of(dead, created=now - 2 * day),
                record_of(revived, created=now - 90 * day, last_success=now - 3600),
                record_of(new, created=now),
            ]
        )
        ages = app.get("/subscriptions/ages", headers=AUTH).json
        assert ages == {
            "stale_after_days": 1,
            "never_reached": 2,
            "unknown": 0,
            "ages": [
                {"up_to_days": 1, "subscriptions": 2},
                {"up_to_days": None, "subscriptions": 1},
            ],
        }
        document = pushed(app, {"title": "t"})
        assert (document["sent"], document["removed"]) == (2, 1)
        assert document["errors"] == [
            {
                "channel": "webpush",
                "origin": api.endpoint_origin(dead.endpoint),
                "status": None,
                "reason": "stale",
                "count": 1,
            }
        ]
        assert {d.subscriber for d in push_service.received()} == {revived.id, new.id}
        assert store.get(dead_id) is None
        metrics = app.get("/metrics", headers=AUTH).text
        assert 'result="removed"} 1.0' in metrics
    with running(settings, stale_after_days=1) as app:  # a restart: gone for good
        assert app.app.config["webpush.store"].get(dead_id) is None
        assert pushed(app, {"title": "again"})["total"] == 2


def test_stale_after_days_0_never_removes_and_the_ages_show_no_stale_bound(
    settings, push_service
):
    old = push_service.subscriber()
    with running(settings, stale_after_days=0) as app:
        app.app.config["webpush.store"].write(
            [record_of(old, created=int(time.time()) - 400 * 86400)]
        )
        ages = app.get("/subscriptions/ages", headers=AUTH).json
        assert ages["stale_after_days"] is None
        assert [a["up_to_days"] for a in ages["ages"]] == [1, 7, 30, None]
        assert ages["ages"][-1]["subscriptions"] == 1
        assert pushed(app, {"title": "t"})["sent"] == 1


def test_success_maps_beside_the_json_store_that_were_damaged_by_hand_do_not_stop_it(
    json_settings, push_service
):
    with running(json_settings, max_per_day=1) as app:
        (subscriber,) = subscribed(app, push_service, 1)
        record_id = api.endpoint_id(subscriber.endpoint)
    path = json_settings.subscriptions_file
    Path(path + ".last").write_text(f'{{"{record_id}": NaN, "other": 1}}')
    Path(path + ".recent").write_text(f'{{"{record_id}": [Infinity, "x", 1e400]}}')
    with running(json_settings, max_per_day=1) as app:
        stored = app.app.config["webpush.store"].get(record_id)
        assert "last_success" not in stored and stored["recent"] == []
        assert pushed(app, {"title": "still here"})["sent"] == 1
        assert pushed(app, {"title": "capped"})["capped"] == 1
